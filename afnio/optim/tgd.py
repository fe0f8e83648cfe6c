"""Textual gradient descent: :class:`TGD` and the functional :func:`tgd`.

One optimizer LM call per parameter that has feedback, all parameters of a step
concurrently (bounded by :func:`afnio.set_max_concurrency`). The model answers the JSON
schema ``afnio_improved_variable``; an unusable answer (not that JSON, or a new value
that drops or adds ``{placeholders}`` of a template parameter) is shown back to the
model with the error, up to ``BACKWARD_PASS_MAX_RETRIES`` times.

Atomic steps (difference 16): with ``on_error="raise"`` (the default) nothing changes
unless every parameter's call succeeded, and the error names the parameter; with
``on_error="skip"`` the failed parameters keep their value (a warning is logged) and
the others are updated. A raw answer never becomes a value.

Example::

    >>> import afnio
    >>> from afnio.cognitive import Parameter
    >>> from afnio.models.openai import OpenAI
    >>> from afnio.optim import TGD
    >>> from afnio.testing import Simulator
    >>> prompt = Parameter("Classify the sentiment.", role="system prompt")
    >>> prompt.append_grad(afnio.Variable(
    ...     'If the message mentions "awful", the sentiment is negative.'))
    >>> with Simulator() as sim, OpenAI(base_url=sim.base_url, api_key="k") as llm:
    ...     optimizer = TGD([prompt], model_client=llm, model="afnio-sim-1")
    ...     optimizer.step()
    >>> prompt.data
    'Classify the sentiment. If the message mentions "awful", the sentiment is negative.'
"""  # noqa: E501

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pydantic

from afnio._runtime import run_async, run_sync
from afnio._template import placeholders, render
from afnio._utils import _validate_multi_turn_messages
from afnio._variable import Variable
from afnio.autodiff.config import BACKWARD_PASS_MAX_RETRIES
from afnio.autodiff.grad_mode import no_grad
from afnio.errors import AfnioError
from afnio.models.model import ChatCompletionModel
from afnio.models.phases import lm_phase
from afnio.models.step_memo import reject_answer
from afnio.optim import prompts
from afnio.optim.optimizer import Optimizer

if TYPE_CHECKING:
    from afnio.cognitive.parameter import Parameter

__all__ = [
    "TGD",
    "TGD_MESSAGES",
    "OptimizerStepError",
    "StepAnswer",
    "TGDMessagesWarning",
    "render_feedback",
    "tgd",
]

logger = logging.getLogger("afnio.optim")

_QUOTED = re.compile(r'"[^"\n]*"')


class OptimizerStepError(AfnioError, RuntimeError):
    """An optimizer call failed (after retries) for the parameter named in
    ``parameter``; with ``on_error="raise"`` no parameter was changed."""

    def __init__(self, message: str, *, parameter: str | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter


@dataclass
class StepAnswer:
    """What :meth:`TGD.step` did with one parameter (see :attr:`TGD.last_step`).

    Attributes:
        param: the parameter.
        status: ``"updated"`` (the new value was applied), ``"unchanged"`` (the LM
            proposed the current text again), ``"no_feedback"`` (no feedback, no LM
            call) or ``"failed"`` (the LM's answer was unusable after the retries, or
            the call failed; with ``on_error="raise"`` every parameter of the step is
            ``"failed"``, since nothing was applied).
        value: the accepted new value (``"updated"``/``"unchanged"``), else None.
        error: ``str(exception)`` when ``"failed"``, else None.
        attempts: the optimizer LM calls made for this parameter (retries included;
            0 without feedback).
        raw_answer: the last raw LM answer when ``"failed"`` (None if no answer came
            back, and for the other statuses).
        feedback_shown: the feedback text the optimizer prompt showed for this
            parameter (:func:`render_feedback`'s text; ``""`` without feedback).

    Example::

        >>> from afnio.cognitive import Parameter
        >>> StepAnswer(Parameter("Be brief."), "no_feedback", None, None, 0, None, "")
        ... # doctest: +ELLIPSIS
        StepAnswer(param=Parameter containing:...status='no_feedback'...)
    """

    param: Parameter
    status: Literal["updated", "no_feedback", "failed", "unchanged"]
    value: str | None
    error: str | None
    attempts: int
    raw_answer: str | None
    feedback_shown: str


class _Attempts:
    """What one parameter's proposal did: its LM calls and last raw answer."""

    __slots__ = ("attempts", "feedback", "raw_answer")

    def __init__(self) -> None:
        self.attempts = 0
        self.raw_answer: str | None = None
        self.feedback = ""


class TGDMessagesWarning(UserWarning):
    """Custom TGD ``messages`` lack the ``{variable}`` or ``{feedback}`` placeholder,
    so the optimizer LM will not see the parameter's value or its feedback. Filter it
    with ``warnings.filterwarnings("ignore", category=TGDMessagesWarning)`` when that
    is intended."""


_PLACEHOLDER_ROLE = "Textual Gradient Descent optimizer {} prompt"
_PLACEHOLDER_DATA = "Placeholder for Textual Gradient Descent optimizer {} prompt"

# Upstream afnio's placeholder texts (its server swapped them for its own prompts);
# upstream's docstrings also spell them without "for".
_PLACEHOLDER_TEXT = re.compile(
    r"\s*placeholder\s+(?:for\s+)?textual\s+gradient\s+descent\s+optimizer\s+"
    r"(system|user)\s+prompt\.?\s*",
    re.IGNORECASE,
)

TGD_MESSAGES: list[dict[str, Any]] = [
    {
        "role": kind,
        "content": [
            Variable(
                _PLACEHOLDER_DATA.format(kind), role=_PLACEHOLDER_ROLE.format(kind)
            )
        ],
    }
    for kind in ("system", "user")
]
"""Upstream afnio's placeholder optimizer messages (same texts and roles), kept for
code written for upstream: ``TGD(..., messages=TGD_MESSAGES)`` and
``tgd(..., messages=TGD_MESSAGES)``. Any message content equal to one of these
placeholder texts is replaced by afnio's default prompt (``prompts.TGD_SYSTEM`` for
the system placeholder, ``prompts.TGD_USER`` for the user one), so the optimizer LM
sees the parameter's value and its feedback. Leaving ``messages`` out does the same.
"""


def _placeholder_kind(data: Any) -> str | None:
    """``"system"``/``"user"`` if ``data`` is one of upstream's placeholder texts.

    Example::

        >>> _placeholder_kind("Placeholder for Textual Gradient Descent optimizer "
        ...                   "user prompt")
        'user'
        >>> _placeholder_kind("Rewrite {variable} using {feedback}.") is None
        True
    """
    if not isinstance(data, str):
        return None
    match = _PLACEHOLDER_TEXT.fullmatch(data)
    return match.group(1).lower() if match else None


def _default_text(kind: str) -> str:
    return prompts.TGD_SYSTEM if kind == "system" else prompts.TGD_USER


def _template_of(content: Variable) -> str:
    """The template a message content renders from: afnio's default prompt in place
    of an upstream placeholder, else the content's own text."""
    kind = _placeholder_kind(content.data)
    return _default_text(kind) if kind else str(content.data)


_AFNIO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by the caller of this function
    point at the first frame outside the ``afnio`` package (the user's ``TGD(...)``,
    ``tgd(...)`` or ``add_param_group(...)`` line)."""
    frame = sys._getframe(1)  # the function that calls warnings.warn: level 1
    level = 1
    while frame.f_back is not None and os.path.abspath(
        frame.f_code.co_filename
    ).startswith(_AFNIO_DIR + os.sep):
        frame = frame.f_back
        level += 1
    return level


def _prepare_messages(messages: Any) -> Any:
    """Resolve and check the optimizer ``messages`` given by a user.

    ``None`` and :data:`TGD_MESSAGES` (or any copy of upstream's placeholders) give
    afnio's default prompt: each placeholder content becomes a fresh Variable holding
    the default system or user prompt (its role kept). Other contents are kept as
    given (the list is returned unchanged when nothing was replaced). Messages
    without a ``{variable}`` or ``{feedback}`` placeholder get a
    :class:`TGDMessagesWarning`. Invalid structures are returned as given, for
    :func:`afnio._utils._validate_multi_turn_messages` to report.
    """
    if messages is None or messages is TGD_MESSAGES:
        return _default_messages()
    if not _validate_multi_turn_messages(messages, raise_error=False):
        return messages
    replaced = False
    resolved = []
    for message in messages:
        content = []
        for v in message["content"]:
            kind = _placeholder_kind(v.data)
            if kind is not None:
                replaced = True
                v = Variable(_default_text(kind), role=v.role)
            content.append(v)
        resolved.append({**message, "content": content})
    _warn_missing_slots(resolved)
    return resolved if replaced else messages


def _warn_missing_slots(messages: list[dict[str, Any]]) -> None:
    """Warn when custom ``messages`` cannot show the LM the parameter's value
    (``{variable}``) or its feedback (``{feedback}``)."""
    found: set[str] = set()
    for message in messages:
        for v in message["content"]:
            found.update(placeholders(_template_of(v)))
    missing = [name for name in ("variable", "feedback") if name not in found]
    if not missing:
        return
    if len(missing) == 2:
        what = (
            "neither a {variable} nor a {feedback} placeholder: the optimizer LM "
            "will see neither the parameter's current value nor its feedback"
        )
    elif missing == ["variable"]:
        what = (
            "no {variable} placeholder: the optimizer LM will not see the "
            "parameter's current value"
        )
    else:
        what = (
            "no {feedback} placeholder: the optimizer LM will not see the feedback "
            "(the gradients) it should act on"
        )
    warnings.warn(
        f"TGD `messages` contain {what}, yet its answer replaces the parameter. "
        "Write {variable} (the current value) and {feedback} (the feedback texts) "
        "into your messages (also available: {variable_role}, {feedback_count}, "
        "{past_iterations}, {constraints} and the keys of `inputs`), or leave "
        "`messages` out to use afnio's default prompt "
        "(afnio.optim.prompts.TGD_SYSTEM and TGD_USER).",
        TGDMessagesWarning,
        stacklevel=_user_stacklevel(),
    )


class _ImprovedVariable(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    improved_value: str


def _feedback_texts(grads: Iterable[Variable]) -> list[str]:
    texts: list[str] = []
    for g in grads:
        data = g.data
        for item in data if isinstance(data, list) else [data]:
            text = str(item).strip()
            if text:
                texts.append(text)
    return texts


def render_feedback(grads: Iterable[Variable]) -> tuple[str, int]:
    """Render a parameter's gradients for the optimizer prompt.

    Returns ``(text, count)`` where ``count`` is the number of non-empty feedback texts.
    Distinct texts appear once (``(xN)`` for repeats). Above
    ``prompts.FEEDBACK_CONDENSE_CHARS`` characters, texts differing only in their
    double-quoted parts are condensed into one line with ``{"a" (x2) | "b"}``
    alternatives, each value with how many feedbacks gave it (``(xN)`` above one).

    Example::

        >>> from afnio import Variable
        >>> text, n = render_feedback([Variable(["Use A.", "Use A.", "Use B."])])
        >>> print(text)
        - Use A. (x2)
        - Use B.
        >>> n
        3
    """
    texts = _feedback_texts(grads)
    counts: dict[str, int] = {}
    for text in texts:
        counts[text] = counts.get(text, 0) + 1
    lines = [f"- {t} (x{n})" if n > 1 else f"- {t}" for t, n in counts.items()]
    plain = "\n".join(lines)
    if len(plain) <= prompts.FEEDBACK_CONDENSE_CHARS:
        return plain, len(texts)
    # condense: group by shape (quoted parts blanked), keep first-seen order
    groups: dict[str, list[tuple[list[str], int]]] = {}
    for text, n in counts.items():
        shape = _QUOTED.sub('"…"', text)
        groups.setdefault(shape, []).append((_QUOTED.findall(text), n))
    out = []
    for shape, members in groups.items():
        total = sum(n for _, n in members)
        if len(members) == 1:
            text = shape
            for value in members[0][0]:
                text = text.replace('"…"', value, 1)
        else:
            text = shape
            for slot in range(len(members[0][0])):
                tally: dict[str, int] = {}
                for values_of, n in members:
                    tally[values_of[slot]] = tally.get(values_of[slot], 0) + n
                text = text.replace('"…"', _alternatives(tally), 1)
        out.append(f"- {text} (x{total})" if total > 1 else f"- {text}")
    return "\n".join(out), len(texts)


def _alternatives(tally: dict[str, int]) -> str:
    """One condensed slot: the value alone when all members share it, else
    ``{"a" (x3) | "b"}``, each value with how many feedbacks gave it (``(xN)`` when
    more than one), in first-seen order."""
    if len(tally) == 1:
        return next(iter(tally))
    return (
        "{" + " | ".join(f"{v} (x{n})" if n > 1 else v for v, n in tally.items()) + "}"
    )


def _render_past(buffer: list[tuple[Variable, list[Variable]]]) -> str:
    if not buffer:
        return ""
    iterations = "\n".join(
        render(
            prompts.ITERATION,
            {"index": i, "value": snap.data, "feedback": render_feedback(grads)[0]},
        )
        for i, (snap, grads) in enumerate(buffer, start=1)
    )
    return render(prompts.PAST_ITERATIONS, {"iterations": iterations})


def _render_constraints(constraints: list[str | Variable]) -> str:
    if not constraints:
        return ""
    lines = "\n".join(
        f"- {c.data if isinstance(c, Variable) else c}" for c in constraints
    )
    return render(prompts.CONSTRAINTS, {"constraints": lines})


def _default_messages() -> list[dict[str, Any]]:
    return [
        {
            "role": "system",
            "content": [
                Variable(
                    prompts.TGD_SYSTEM,
                    role="Textual Gradient Descent optimizer system prompt",
                )
            ],
        },
        {
            "role": "user",
            "content": [
                Variable(
                    prompts.TGD_USER,
                    role="Textual Gradient Descent optimizer user prompt",
                )
            ],
        },
    ]


def _wrapped_value(text: str) -> str | None:
    """The inner string if ``text`` is a JSON object whose only key is
    ``improved_value`` (an LM that encoded its answer twice), else ``None``.

    Example::

        >>> _wrapped_value('{"improved_value": "Be brief."}')
        'Be brief.'
        >>> _wrapped_value('{"label": "x"}') is None  # other JSON may be a prompt
        True
    """
    stripped = text.strip()
    if not stripped.startswith("{"):
        return None
    try:
        data = json.loads(stripped)
    except json.JSONDecodeError:
        return None
    if isinstance(data, dict) and list(data) == ["improved_value"]:
        inner = data["improved_value"]
        return inner if isinstance(inner, str) else ""
    return None


def _check_answer(answer: str, param: Variable) -> str:
    try:
        data = json.loads(answer)
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"the answer is not valid JSON ({e.msg})") from None
    try:
        value = _ImprovedVariable.model_validate(data).improved_value
    except pydantic.ValidationError:
        raise ValueError('the answer must be {"improved_value": "<string>"}') from None
    inner = _wrapped_value(value)
    if inner is not None:  # double-encoded: unwrap one level of the same schema
        value = inner
        if _wrapped_value(value) is not None:
            raise ValueError(
                'the improved value is itself a JSON {"improved_value": ...} object '
                "nested more than once"
            )
    if not value.strip():
        raise ValueError("the improved value is empty")
    expected = set(placeholders(str(param.data)))
    found = set(placeholders(value))
    if expected != found:
        missing, extra = sorted(expected - found), sorted(found - expected)
        detail = []
        if missing:
            detail.append("it drops " + ", ".join("{" + m + "}" for m in missing))
        if extra:
            detail.append("it adds " + ", ".join("{" + x + "}" for x in extra))
        raise ValueError(
            "the new value must keep exactly the placeholders of the current one ("
            + "; ".join(detail)
            + ")"
        )
    return value


async def _propose(
    param: Variable,
    grads: list[Variable],
    buffer: list[tuple[Variable, list[Variable]]],
    model_client: ChatCompletionModel,
    messages: list[dict[str, Any]],
    inputs: dict[str, Any],
    constraints: list[str | Variable],
    completion_args: dict[str, Any],
    record: _Attempts | None = None,
) -> str:
    feedback, count = render_feedback(grads)
    if record is not None:
        record.feedback = feedback
    values = {
        **{k: (v.data if isinstance(v, Variable) else v) for k, v in inputs.items()},
        "variable_role": param.role,
        "variable": param.data,
        "feedback": feedback,
        "feedback_count": count,
        "past_iterations": _render_past(buffer),
        "constraints": _render_constraints(constraints),
    }
    chat = [
        {
            "role": m["role"],
            "content": "\n".join(render(_template_of(v), values) for v in m["content"]),
        }
        for m in messages
    ]
    args = {
        "response_format": prompts.improved_variable_response_format(),
        **completion_args,
    }
    answer, error = "", None
    for _ in range(BACKWARD_PASS_MAX_RETRIES + 1):
        if record is not None:
            record.attempts += 1
        answer = await model_client.achat(chat, **args)
        if record is not None:
            record.raw_answer = answer
        try:
            return _check_answer(answer, param)
        except ValueError as e:
            error = e
            reject_answer(answer)  # a retried step must not replay it
            chat = [
                *chat,
                {"role": "assistant", "content": answer},
                {
                    "role": "user",
                    "content": render(prompts.TGD_RETRY_USER, {"error": str(e)}),
                },
            ]
    raise OptimizerStepError(
        f"TGD could not update the parameter {param.role!r}: the optimizer's answer "
        f"was unusable after {BACKWARD_PASS_MAX_RETRIES} retries: {error}. "
        f"Last answer: {answer[:300]!r}.",
        parameter=param.role,
    )


async def _propose_all(
    params: list[Variable],
    grads: list[list[Variable]],
    buffers: list[list[tuple[Variable, list[Variable]]]],
    model_client: ChatCompletionModel,
    messages: list[dict[str, Any]],
    inputs: dict[str, Any],
    constraints: list[str | Variable],
    completion_args: dict[str, Any],
    records: list[_Attempts] | None = None,
) -> list[Any]:
    """One optimizer call per parameter with feedback, concurrently. Per parameter:
    the new value, the exception, or ``None`` (no feedback: no call). ``records``
    (one per parameter) receive each proposal's attempts and last raw answer."""
    todo = [i for i, g in enumerate(grads) if _feedback_texts(g)]
    results = await asyncio.gather(
        *(
            _propose(
                params[i],
                grads[i],
                buffers[i],
                model_client,
                messages,
                inputs,
                constraints,
                completion_args,
                records[i] if records is not None else None,
            )
            for i in todo
        ),
        return_exceptions=True,
    )
    proposals: list[Any] = [None] * len(params)
    for i, result in zip(todo, results, strict=True):
        if isinstance(result, BaseException) and not isinstance(result, Exception):
            raise result  # cancellation, KeyboardInterrupt: nothing was applied
        proposals[i] = result
    return proposals


def _raise_first_failure(params: list[Variable], proposals: list[Any]) -> None:
    for param, result in zip(params, proposals, strict=True):
        if isinstance(result, OptimizerStepError):
            raise result
        if isinstance(result, Exception):
            raise OptimizerStepError(
                f"TGD could not update the parameter {param.role!r}: {result}",
                parameter=param.role,
            ) from result


def _apply(
    params: list[Variable],
    grads: list[list[Variable]],
    proposals: list[Any],
    buffers: list[list[tuple[Variable, list[Variable]]]],
    momentum: int,
) -> None:
    for param, param_grads, value, buffer in zip(
        params, grads, proposals, buffers, strict=True
    ):
        if value is None:
            continue
        if isinstance(value, Exception):
            logger.warning("TGD left %r unchanged: %s", param.role, value)
            continue
        snapshot = Variable(param.data, role=param.role)
        param.data = value
        window = [*buffer, (snapshot, list(param_grads))]
        buffer.clear()
        buffer.extend(window[-momentum:] if momentum > 0 else [])


def _answer(
    param: Any, proposal: Any, record: _Attempts, failure: Exception | None
) -> StepAnswer:
    """The :class:`StepAnswer` of one parameter, before the step is applied
    (``failure``: the error that makes an ``on_error="raise"`` step apply nothing)."""
    shown = record.feedback
    if proposal is None:
        return StepAnswer(param, "no_feedback", None, None, 0, None, shown)
    if isinstance(proposal, Exception):
        return StepAnswer(
            param,
            "failed",
            None,
            str(proposal),
            record.attempts,
            record.raw_answer,
            shown,
        )
    if failure is not None:  # its proposal was fine, but the step applied nothing
        return StepAnswer(
            param,
            "failed",
            None,
            f"not applied: {failure}",
            record.attempts,
            None,
            shown,
        )
    status = "unchanged" if proposal == param.data else "updated"
    return StepAnswer(param, status, proposal, None, record.attempts, None, shown)


def _check_options(
    model_client: Any,
    messages: Any,
    inputs: Any,
    constraints: Any,
    momentum: Any,
    on_error: Any,
) -> None:
    if not isinstance(model_client, ChatCompletionModel):
        raise TypeError(
            "`model_client` must be a ChatCompletionModel (e.g. "
            f"afnio.models.openai.OpenAI), got {type(model_client).__name__}."
        )
    _validate_multi_turn_messages(messages)
    if not isinstance(inputs, dict):
        raise TypeError(f"`inputs` must be a dict, got {type(inputs).__name__}.")
    if not isinstance(constraints, list) or not all(
        isinstance(c, (str, Variable)) for c in constraints
    ):
        raise TypeError("`constraints` must be a list of strings or Variables.")
    if isinstance(momentum, bool) or not isinstance(momentum, int) or momentum < 0:
        raise ValueError(f"`momentum` must be an int >= 0, got {momentum!r}.")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"`on_error` must be 'raise' or 'skip', got {on_error!r}.")


def tgd(
    params: list[Variable],
    grads: list[list[Variable]],
    momentum_buffer_list: list[list[tuple[Variable, list[Variable]]]],
    model_client: ChatCompletionModel,
    messages: list[dict[str, Any]] | None = None,
    inputs: dict[str, Any] | None = None,
    constraints: list[str | Variable] | None = None,
    momentum: int = 0,
    on_error: str = "raise",
    **completion_args: Any,
) -> None:
    """Functional TGD: rewrite ``params[i]`` from ``grads[i]`` in place, and update
    ``momentum_buffer_list[i]`` in place (the last ``momentum`` ``(snapshot, grads)``
    pairs). Atomic with ``on_error="raise"``.

    ``messages`` left out, or upstream's placeholders (:data:`TGD_MESSAGES`), use
    afnio's default prompt; custom messages without ``{variable}`` or ``{feedback}``
    get a :class:`TGDMessagesWarning`.
    """
    messages = _prepare_messages(messages)
    inputs = dict(inputs or {})
    constraints = list(constraints or [])
    _check_options(model_client, messages, inputs, constraints, momentum, on_error)
    if not (len(params) == len(grads) == len(momentum_buffer_list)):
        raise ValueError(
            "`params`, `grads` and `momentum_buffer_list` must have the same length."
        )
    proposals = run_sync(
        _propose_all(
            params,
            grads,
            momentum_buffer_list,
            model_client,
            messages,
            inputs,
            constraints,
            completion_args,
        )
    )
    if on_error == "raise":
        _raise_first_failure(params, proposals)
    _apply(params, grads, proposals, momentum_buffer_list, momentum)


class TGD(Optimizer):
    """Textual gradient descent: each parameter with feedback is rewritten by
    ``model_client`` from all its feedback at once (see the module docstring).

    Args:
        params: the Parameters (or parameter groups) to optimize.
        model_client: the LM that writes the new values.
        messages: custom optimizer prompt (a chat of Variables); the default is
            afnio's (``afnio.optim.prompts``), also used for upstream's placeholders
            (:data:`TGD_MESSAGES`). Placeholders: ``variable_role``,
            ``variable``, ``feedback``, ``feedback_count``, ``past_iterations``,
            ``constraints`` and the keys of ``inputs``; messages without
            ``{variable}`` or ``{feedback}`` get a :class:`TGDMessagesWarning`.
        inputs: values for extra placeholders of ``messages``.
        constraints: natural-language rules every new value must respect.
        momentum: how many past ``(value, feedback)`` iterations to show.
        on_error: ``"raise"`` (atomic step) or ``"skip"`` (update what succeeded).
        **completion_args: passed to the client (``model=`` included).

    After each :meth:`step`, :attr:`last_step` lists a :class:`StepAnswer` per
    parameter that requires grad (in param-group order): its status, the accepted
    value, the error and last raw answer of a failed proposal, the LM attempts and
    the feedback text the optimizer was shown.
    """

    last_step: list[StepAnswer]

    def __init__(
        self,
        params: Iterable[Variable] | Iterable[dict[str, Any]],
        model_client: ChatCompletionModel | None,
        messages: list[dict[str, Any]] | None = None,
        inputs: dict[str, Any] | None = None,
        constraints: list[str | Variable] | None = None,
        momentum: int = 0,
        on_error: str = "raise",
        **completion_args: Any,
    ) -> None:
        messages = _prepare_messages(messages)
        defaults = {
            "model_client": model_client,
            "messages": messages,
            "inputs": inputs or {},
            "constraints": constraints or [],
            "momentum": momentum,
            "completion_args": completion_args,
        }
        if on_error not in ("raise", "skip"):
            raise ValueError(f"`on_error` must be 'raise' or 'skip', got {on_error!r}.")
        if model_client is not None:
            _check_options(
                model_client,
                messages,
                defaults["inputs"],
                defaults["constraints"],
                momentum,
                on_error,
            )
        self.on_error = on_error
        self.last_step = []
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group; its own ``messages``, if any, are resolved as the
        constructor's are (upstream's placeholders give the default prompt; messages
        without ``{variable}``/``{feedback}`` warn)."""
        if isinstance(param_group, dict) and "messages" in param_group:
            param_group["messages"] = _prepare_messages(param_group["messages"])
            _validate_multi_turn_messages(param_group["messages"])
        super().add_param_group(param_group)

    def step(self, closure: Any = None) -> Any:
        """Rewrite every parameter that has feedback; returns ``closure()``'s value
        (``None`` without a closure). ``.grad`` is not cleared."""
        loss = closure() if closure is not None else None
        run_sync(self._step_all())
        return loss

    async def astep(self, closure: Any = None) -> Any:
        """Async :meth:`step` (``closure`` may be a coroutine function)."""
        loss = None
        if closure is not None:
            loss = closure()
            if asyncio.iscoroutine(loss):
                loss = await loss
        await run_async(self._step_all())
        return loss

    async def _step_all(self) -> None:
        with lm_phase("optimizer"):
            await self._step_groups()

    async def _step_groups(self) -> None:
        self.last_step = []
        jobs = []
        for group in self.param_groups:
            if group["model_client"] is None:
                raise TypeError("TGD needs a `model_client` to step.")
            params = [p for p in group["params"] if p.requires_grad]
            grads = [list(p.grad) for p in params]
            buffers = [
                self.state.setdefault(p, {}).setdefault("momentum_buffer", [])
                for p in params
            ]
            jobs.append((group, params, grads, buffers))
        records = [[_Attempts() for _ in params] for _, params, _, _ in jobs]
        # every call of every group first; values change only afterwards
        all_proposals = await asyncio.gather(
            *(
                _propose_all(
                    params,
                    grads,
                    buffers,
                    group["model_client"],
                    group["messages"],
                    group["inputs"],
                    group["constraints"],
                    group["completion_args"],
                    group_records,
                )
                for (group, params, grads, buffers), group_records in zip(
                    jobs, records, strict=True
                )
            )
        )
        failure: Exception | None = None
        if self.on_error == "raise":
            for (_, params, _, _), proposals in zip(jobs, all_proposals, strict=True):
                try:
                    _raise_first_failure(params, proposals)
                except Exception as e:
                    failure = e
                    break
        self.last_step = [
            _answer(param, proposal, record, failure)
            for (_, params, _, _), proposals, group_records in zip(
                jobs, all_proposals, records, strict=True
            )
            for param, proposal, record in zip(
                params, proposals, group_records, strict=True
            )
        ]
        if failure is not None:
            raise failure
        with no_grad():
            for (group, params, grads, buffers), proposals in zip(
                jobs, all_proposals, strict=True
            ):
                _apply(params, grads, proposals, buffers, group["momentum"])
