"""Asking the backward model for textual gradients (shared by every LM-backed node).

One call sends a system and a user prompt (see :mod:`afnio.autodiff.prompts`) with the
JSON-schema ``response_format`` ``afnio_gradients`` and expects one feedback string per
variable. An unusable answer (not JSON, wrong shape, wrong count) is shown back to the
model with the error, up to ``BACKWARD_PASS_MAX_RETRIES`` times; then a
:class:`~afnio.errors.BackwardParseError` (or :class:`~afnio.errors.GradientCountError`)
names the node. A raw answer never becomes a gradient.

Chat backward (:func:`chat_backward_gradients`): one :class:`ChatBackwardItem` per
sample that got feedback. With ``chat_samples_per_call == 1`` (the default, see
:class:`afnio.autodiff.options.BackwardOptions`) each item is one call with
:data:`~afnio.autodiff.prompts.CHAT_BACKWARD_SYSTEM`, as upstream does. With ``n > 1``
the items with the same ``key`` (the same prompt template: :func:`template_key`) of a
whole backward pass share calls (:mod:`afnio.autodiff.grouping`), at most ``n`` per
call, split as evenly as possible (:func:`split_evenly`), every group sent at once; a
group of several items uses :data:`~afnio.autodiff.prompts.CHAT_BACKWARD_GROUP_SYSTEM`
and :func:`chat_backward_group_user`, a group of one the single-call prompt.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pydantic

from afnio._template import render
from afnio.autodiff import config
from afnio.autodiff.prompts import (
    CHAT_BACKWARD_GROUP_SYSTEM,
    CHAT_BACKWARD_GROUP_USER,
    CHAT_BACKWARD_SYSTEM,
    CHAT_BACKWARD_USER,
    LM_CALL_ELEMENT,
    LM_CALL_VALUE,
    MESSAGE_ELEMENT,
    RETRY_USER,
    SHARED_MESSAGE_ELEMENT,
    SHARED_MESSAGE_POINTER,
    VALUE_IN_MESSAGE,
    VARIABLE_ELEMENT,
    VARIABLE_IN_MESSAGE,
    VARIABLE_IN_SHARED_MESSAGE,
    VARIABLE_PER_CALL,
    gradients_response_format,
)
from afnio.errors import BackwardParseError, GradientCountError
from afnio.models.step_memo import reject_answer

if TYPE_CHECKING:
    from afnio._variable import Variable

__all__ = [
    "ChatBackwardItem",
    "VariableInfo",
    "chat_backward_gradients",
    "chat_backward_group_user",
    "chat_backward_user",
    "format_conversation",
    "format_variables",
    "request_gradients",
    "split_evenly",
    "template_key",
]


class _GradientsAnswer(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    gradients: list[str]


@dataclass(frozen=True)
class VariableInfo:
    """How a variable is shown to the backward model."""

    role: str
    location: str  # the chat role of its message, "input:<key>", or "prediction"
    trainable: bool
    text: str


def format_conversation(messages: list[dict[str, str]]) -> str:
    """One ``<MESSAGE>`` element per rendered message."""
    return "\n".join(
        render(MESSAGE_ELEMENT, {"role": m["role"], "content": m["content"]})
        for m in messages
    )


def format_variables(variables: list[VariableInfo]) -> str:
    """One ``<VARIABLE>`` element per variable, numbered from 1."""
    return "\n".join(
        render(
            VARIABLE_ELEMENT,
            {
                "index": i,
                "role": v.role,
                "location": v.location,
                "trainable": "true" if v.trainable else "false",
                "text": v.text,
            },
        )
        for i, v in enumerate(variables, start=1)
    )


def chat_backward_user(
    conversation: list[dict[str, str]],
    output_role: str,
    output: str,
    feedback: str,
    variables: list[VariableInfo],
) -> str:
    """The user prompt of a ChatCompletion backward call (``CHAT_BACKWARD_USER``).

    A variable whose text is the whole content of a message of the conversation
    (a system prompt) is not repeated: its ``<VARIABLE>`` points at that message
    (unless the text is shorter than the pointer)."""
    where: dict[str, tuple[int, str]] = {}
    for i, message in enumerate(conversation, start=1):
        if message["content"].strip():
            where.setdefault(message["content"], (i, message["role"]))
    shown = []
    for v in variables:
        if v.text in where:
            index, role = where[v.text]
            pointer = render(VARIABLE_IN_MESSAGE, {"index": index, "role": role})
            if len(pointer) < len(v.text):  # a short text is cheaper as it is
                v = VariableInfo(v.role, v.location, v.trainable, pointer)
        shown.append(v)
    return render(
        CHAT_BACKWARD_USER,
        {
            "conversation": format_conversation(conversation),
            "output_role": output_role,
            "output": output,
            "feedback": feedback,
            "count": len(shown),
            "variables": format_variables(shown),
        },
    )


def _parse(answer: str, count: int) -> list[str]:
    try:
        data = json.loads(answer)
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"the answer is not valid JSON ({e.msg})") from None
    try:
        gradients = _GradientsAnswer.model_validate(data).gradients
    except pydantic.ValidationError as e:
        raise ValueError(
            'the answer must be {"gradients": [string, ...]}: '
            + "; ".join(err["msg"] for err in e.errors())
        ) from None
    if len(gradients) != count:
        raise _CountMismatch(
            f"it holds {len(gradients)} feedback strings, but {count} are asked for "
            "(one per variable, for each sample listed)"
        )
    return gradients


class _CountMismatch(ValueError):
    pass


async def request_gradients(
    node: str, system: str, user: str, count: int, **completion_args: Any
) -> list[str]:
    """Ask the backward model for ``count`` feedback strings.

    Args:
        node: the node's name, for errors (``"ChatCompletionBackward0"``).
        system, user: the rendered prompts.
        count: how many variables the prompt lists.
        **completion_args: overrides of the backward client's completion args.

    Raises:
        GradientCountError: the count stayed wrong after the retries.
        BackwardParseError: the answer stayed unusable after the retries.
    """
    from afnio._model_client import get_backward_model_client

    client = get_backward_model_client()
    messages: list[dict[str, str]] = [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
    ]
    retries = config.BACKWARD_PASS_MAX_RETRIES
    answer = ""
    error: ValueError | None = None
    for _ in range(retries + 1):
        answer = await client.achat(
            messages, response_format=gradients_response_format(), **completion_args
        )
        try:
            return _parse(answer, count)
        except ValueError as e:
            error = e
            reject_answer(answer)  # a retried step must not replay it
            messages = [
                *messages,
                {"role": "assistant", "content": answer},
                {
                    "role": "user",
                    "content": render(RETRY_USER, {"error": str(e), "count": count}),
                },
            ]
    cls = (
        GradientCountError if isinstance(error, _CountMismatch) else BackwardParseError
    )
    raise cls(
        f"{node}: the backward model's answer could not be used after {retries} "
        f"retries: {error}. Last answer: {answer[:300]!r}. Check the backward model "
        "(afnio.set_backward_model_client) supports JSON-schema answers.",
        node=node,
    )


# -- chat backward: one item per sample, grouped by prompt template -----------------


@dataclass(frozen=True)
class ChatBackwardItem:
    """One sample's chat-backward request.

    Attributes:
        conversation: the messages the model received (``{"role", "content"}``).
        output_role: the role of its output (``<LM_OUTPUT role="...">``).
        output: the text it answered.
        feedback: the feedback on that output.
        variables: the variables to get feedback for, in order (their text as in
            this sample).
        key: items with equal keys went through the same prompt template and may
            share a call (:func:`template_key`).
    """

    conversation: list[dict[str, str]]
    output_role: str
    output: str
    feedback: str
    variables: list[VariableInfo]
    key: Hashable

    def single_user(self) -> str:
        """The user prompt of this item sent alone (:func:`chat_backward_user`)."""
        return chat_backward_user(
            self.conversation, self.output_role, self.output, self.feedback,
            self.variables,
        )  # fmt: skip


def template_key(
    output_role: str, variables: Sequence[tuple[Variable, str]]
) -> Hashable:
    """The grouping key of a chat-backward item: its output role and, per variable
    (in order), the variable itself when it is a trainable leaf (a prompt being
    optimized: two calls share a template when they share that Parameter), its role
    and its location."""
    return (
        output_role,
        tuple(
            (
                id(var) if var.is_leaf and var.requires_grad else None,
                var.role,
                location,
            )
            for var, location in variables
        ),
    )


def split_evenly(n: int, per_call: int) -> list[int]:
    """The sizes of ``ceil(n / per_call)`` groups holding ``n`` items, as equal as
    possible, larger first: ``split_evenly(19, 8) == [7, 6, 6]``.

    Raises:
        ValueError: ``n < 0`` or ``per_call < 1``.
    """
    if n < 0:
        raise ValueError(f"`n` must be >= 0, got {n}.")
    if per_call < 1:
        raise ValueError(f"`per_call` must be >= 1, got {per_call}.")
    if n == 0:
        return []
    calls = -(-n // per_call)
    base, extra = divmod(n, calls)
    return [base + 1] * extra + [base] * (calls - extra)


def chat_backward_group_user(items: Sequence[ChatBackwardItem]) -> str:
    """The user prompt of a grouped chat-backward call
    (:data:`~afnio.autodiff.prompts.CHAT_BACKWARD_GROUP_USER`) for two or more items
    with the same variables (roles and locations).

    A message at the same position with the same role and non-blank content in every
    call is listed once (``<SHARED_MESSAGES>``) and pointed at; a variable with the
    same text everywhere is listed once (or points at the shared message it is the
    whole content of); a variable whose text differs has a ``<VALUE>`` in each call
    (or points at the call's own message it is the whole content of).

    Raises:
        ValueError: fewer than two items, or items with different variable counts.
    """
    if len(items) < 2:
        raise ValueError(
            "chat_backward_group_user needs at least two items; send one item with "
            "chat_backward_user (the single-call prompt)."
        )
    k = len(items[0].variables)
    if any(len(item.variables) != k for item in items):
        raise ValueError(
            "the items of a chat-backward group must have the same variables (one "
            "prompt template); got variable counts "
            f"{[len(item.variables) for item in items]}."
        )
    # shared messages: same position, role and (non-blank) content in every call
    first = items[0].conversation
    shared: dict[int, dict[str, str]] = {}
    for i, message in enumerate(first, start=1):
        if not message["content"].strip():
            continue
        if all(
            len(item.conversation) >= i
            and item.conversation[i - 1]["role"] == message["role"]
            and item.conversation[i - 1]["content"] == message["content"]
            for item in items
        ):
            shared[i] = message
    shared_where: dict[str, tuple[int, str]] = {}
    for i, message in shared.items():
        shared_where.setdefault(message["content"], (i, message["role"]))

    listed: list[VariableInfo] = []
    per_call: list[int] = []  # variable positions (from 1) whose text differs
    for j in range(k):
        info = items[0].variables[j]
        texts = [item.variables[j].text for item in items]
        if all(t == texts[0] for t in texts):
            text = info.text
            if text in shared_where:
                index, role = shared_where[text]
                pointer = render(
                    VARIABLE_IN_SHARED_MESSAGE, {"index": index, "role": role}
                )
                if len(pointer) < len(text):
                    text = pointer
        else:
            text = render(VARIABLE_PER_CALL, {"index": j + 1})
            per_call.append(j + 1)
        listed.append(VariableInfo(info.role, info.location, info.trainable, text))

    calls = []
    for c, item in enumerate(items, start=1):
        lines = []
        own: dict[str, tuple[int, str]] = {}
        for i, message in enumerate(item.conversation, start=1):
            if i in shared:
                lines.append(
                    render(
                        SHARED_MESSAGE_POINTER, {"role": message["role"], "index": i}
                    )
                )
                continue
            if message["content"].strip():
                own.setdefault(message["content"], (i, message["role"]))
            lines.append(
                render(
                    MESSAGE_ELEMENT,
                    {"role": message["role"], "content": message["content"]},
                )
            )
        values = ""
        for j in per_call:
            text = item.variables[j - 1].text
            if text in own:
                index, role = own[text]
                pointer = render(VALUE_IN_MESSAGE, {"index": index, "role": role})
                if len(pointer) < len(text):
                    text = pointer
            values += render(LM_CALL_VALUE, {"index": j, "text": text})
        calls.append(
            render(
                LM_CALL_ELEMENT,
                {
                    "index": c,
                    "conversation": "\n".join(lines),
                    "output_role": item.output_role,
                    "output": item.output,
                    "feedback": item.feedback,
                    "values": values,
                },
            )
        )
    return render(
        CHAT_BACKWARD_GROUP_USER,
        {
            "shared_count": len(shared),
            "shared": "\n".join(
                render(
                    SHARED_MESSAGE_ELEMENT,
                    {"index": i, "role": m["role"], "content": m["content"]},
                )
                for i, m in shared.items()
            ),
            "variable_count": k,
            "variables": format_variables(listed),
            "call_count": len(items),
            "calls": "\n".join(calls),
            "count": k * len(items),
        },
    )


def _node_name(node: Any) -> str:
    if isinstance(node, str):
        return node
    name = getattr(node, "name", None)
    return name() if callable(name) else type(node).__name__


async def send_group(
    names: Sequence[str], items: Sequence[ChatBackwardItem]
) -> list[list[str]]:
    """One chat-backward call for ``items`` (a group of one: the single-call prompt,
    byte for byte what per-sample mode sends); one list of stripped texts per item.
    ``names``: the nodes the items come from (named in errors)."""
    label = ", ".join(dict.fromkeys(names))
    if len(items) == 1:
        item = items[0]
        texts = await request_gradients(
            label, CHAT_BACKWARD_SYSTEM, item.single_user(), len(item.variables)
        )
        return [[t.strip() for t in texts]]
    k = len(items[0].variables)
    user = chat_backward_group_user(items)
    texts = await request_gradients(
        label, CHAT_BACKWARD_GROUP_SYSTEM, user, k * len(items)
    )
    return [[t.strip() for t in texts[j * k : (j + 1) * k]] for j in range(len(items))]


def group_items(
    entries: Sequence[tuple[Hashable, ChatBackwardItem]], per_call: int
) -> list[list[int]]:
    """Positions of ``entries`` (``(key, item)`` in send order) grouped by key (keys
    in order of first appearance), each key's positions split with
    :func:`split_evenly`."""
    by_key: dict[Hashable, list[int]] = {}
    for pos, (key, _) in enumerate(entries):
        by_key.setdefault(key, []).append(pos)
    groups: list[list[int]] = []
    for positions in by_key.values():
        start = 0
        for size in split_evenly(len(positions), per_call):
            groups.append(positions[start : start + size])
            start += size
    return groups


async def chat_backward_gradients(
    node: Any, items: Sequence[ChatBackwardItem]
) -> list[list[str]]:
    """The chat-backward feedback of ``items``: one list of ``len(item.variables)``
    stripped texts per item, in order.

    ``chat_samples_per_call == 1`` (the active :class:`~afnio.autodiff.options.
    BackwardOptions`): one call per item, all at once, exactly as upstream. Else,
    inside a backward pass the items join the pass's grouper
    (:mod:`afnio.autodiff.grouping`), which groups them with the other nodes' items of
    the same key; outside one they are grouped among themselves.

    In a custom ``Function``'s ``backward``: submit all the items of the node in
    **one** call of this function and await it, doing nothing else meanwhile (as
    ``ChatCompletion`` does). A ``backward`` that submits while it still does other
    work (a sub-task that submits later, an LM call of its own) works, but the pass
    may send the groups before its later items arrive, so its groups (and the request
    bodies, and recorded cassettes) may depend on timing.

    Args:
        node: the node asking (its ``ctx``; or a name): names the items in errors.
            Inside a pass the items belong to the node task they are submitted from
            (its position in the pass orders them), whatever ``node`` is.
        items: one per sample that got feedback.

    Raises:
        GradientCountError, BackwardParseError: as :func:`request_gradients`.
        RuntimeError: the pass ended (another node failed, or it was cancelled)
            before the items were sent.
    """
    from afnio.autodiff.grouping import current_grouper
    from afnio.autodiff.options import get_backward_options

    if not items:
        return []
    per_call = get_backward_options().chat_samples_per_call
    name = _node_name(node)
    if per_call == 1:
        answers = await asyncio.gather(*(send_group([name], [i]) for i in items))
        return [answer for (answer,) in answers]
    grouper = current_grouper()
    if grouper is not None:
        return await grouper.submit(node, items, per_call)
    groups = group_items([(item.key, item) for item in items], per_call)
    answers = await asyncio.gather(
        *(send_group([name] * len(g), [items[i] for i in g]) for g in groups)
    )
    result: list[list[str]] = [[] for _ in items]
    for g, answer in zip(groups, answers, strict=True):
        for i, texts in zip(g, answer, strict=True):
            result[i] = texts
    return result
