"""Evaluators: differentiable losses that return ``(score, explanation)``.

:class:`DeterministicEvaluator` scores with a user function,
:class:`ExactMatchEvaluator` with equality, :class:`LMJudgeEvaluator` with an LM
judge. Their roles and explanation texts follow the upstream contract exactly.
``explanation.backward()`` (no gradient needed: they are evaluators) asks the backward
model for feedback on the prediction from every sample that did not get the best
score, showing each sample's prediction, target and the input that led to it (found
through the graph; an LM judge's own explanation too). One call covers a group of at
most ``samples_per_call`` failed samples (default
:data:`afnio.autodiff.config.EVALUATOR_SAMPLES_PER_CALL`, 8); the groups are sent
concurrently, so a batch of 32 with 19 wrong answers costs 3 calls, in one LM round.

* ``success_fn(scores) -> bool``: if it returns True, backward makes no LM call and
  produces no gradient.
* Per-sample skip (difference 14, on by default, ``per_sample_skip=False`` turns it
  off): samples with the best score get no LM call and ``""`` feedback. The best score
  is 1 for exact match, ``True`` for boolean scores, else the ``best_score`` argument
  (without one, every sample is sent).
* ``reduction_fn(scores)`` (default ``sum``) aggregates a batch; pass ``None`` (with
  ``reduction_fn_purpose=None``) to keep per-sample scores and explanations.

Direct feedback (``feedback_mode="direct"``, or ``None`` and the active
``afnio.backward_options(evaluator_feedback="direct")``; the default is ``"lm"``,
upstream's behaviour): :class:`DeterministicEvaluator` and :class:`ExactMatchEvaluator`
write each failed sample's feedback themselves, with no LM call and no LM round:
``The metric "<purpose>" gave the prediction "<prediction>" the score <score>; the
expected value is "<target>".`` (:data:`~afnio.autodiff.prompts.
DIRECT_EVALUATOR_FEEDBACK`), followed by the feedback on the evaluation's explanation
when there is some (for a per-sample explanation, that sample's). Which samples get
feedback (``success_fn``, per-sample skip) and the provenance (``(s,)`` per text, in
the same basis) are as in LM mode; no text records a call group. An
:class:`LMJudgeEvaluator`'s feedback stays LM-written in both modes (the judge's own
reasoning is what it adds).
"""

from __future__ import annotations

import asyncio
import builtins
import json
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from afnio._template import render
from afnio._utils import _validate_multi_turn_messages
from afnio._variable import Variable
from afnio.autodiff import config
from afnio.autodiff.decorators import evaluator
from afnio.autodiff.function import Function, _flatten_slots
from afnio.autodiff.lm_backward import VariableInfo, format_variables, request_gradients
from afnio.autodiff.options import check_evaluator_feedback, get_backward_options
from afnio.autodiff.prompts import (
    DIRECT_EVALUATOR_DETAIL,
    DIRECT_EVALUATOR_FEEDBACK,
    EVALUATOR_BACKWARD_SYSTEM,
    EVALUATOR_BACKWARD_USER,
    EVALUATOR_SAMPLE_ELEMENT,
    EVALUATOR_SAMPLE_EXPLANATION,
    EVALUATOR_SAMPLE_VALUE,
    PREDICTION_PLACEHOLDER,
    judge_response_format,
)
from afnio.autodiff.provenance import Basis, _join_bases, basis_of, set_sources
from afnio.errors import JudgeParseError
from afnio.models.model import ChatCompletionModel
from afnio.models.phases import lm_phase
from afnio.models.step_memo import reject_answer

__all__ = [
    "DeterministicEvaluator",
    "ExactMatchEvaluator",
    "LMJudgeEvaluator",
    "direct_feedback_texts",
]

SCALAR_EXPLANATION = (
    "The evaluation function, designed for '{purpose}', compared the <DATA> field of "
    "the predicted variable ('{prediction}') with the <DATA> field of the target "
    "variable ('{target}'), resulting in a score: {score}."
)
BATCH_EXPLANATION = (
    "The evaluation function, designed for '{purpose}', compared the <DATA> fields of "
    "the predicted variable and the target variable across all samples in the batch, "
    "generating individual scores for each pair. These scores were then aggregated "
    "using the reduction function '{reduction_purpose}', resulting in a final "
    "aggregated score: {score}."
)
JUDGE_BATCH_EXPLANATION = (
    "The evaluation function, designed using an LM as the judge, compared the <DATA> "
    "fields of the predicted variable and the target variable across all samples in "
    "the batch. These scores were then aggregated using the reduction function "
    "'{reduction_purpose}', resulting in a final aggregated score: {score}."
)
JUDGE_PURPOSE = "LM as the judge"
NO_INPUT = "(not available)"


# -- shared helpers ------------------------------------------------------------------


def _check_prediction(prediction: Any) -> Variable:
    if not isinstance(prediction, Variable):
        raise TypeError(
            f"`prediction` must be a Variable, got {type(prediction).__name__}."
        )
    return prediction


def _samples(prediction: Variable) -> list[Any]:
    data = prediction.data
    return list(data) if isinstance(data, list) else [data]


def _targets(target: Any, prediction: Variable, required: bool = True) -> list[Any]:
    """One target per sample; checks the batch lengths."""
    batched = isinstance(prediction.data, list)
    n = len(prediction.data) if batched else 1
    if target is None:
        if required:
            raise TypeError("`target` is required: a str, a list of str or a Variable.")
        return [None] * n
    data = target.data if isinstance(target, Variable) else target
    if isinstance(data, (list, tuple)):
        if not batched:
            raise ValueError(
                "`target` is a list but `prediction` is a scalar: both must be "
                "batches of the same length, or both scalars."
            )
        if len(data) != n:
            raise ValueError(
                f"`prediction` has {n} samples but `target` has {len(data)}: they "
                "must have the same length."
            )
        return list(data)
    if not isinstance(data, (str, int, float)):
        raise TypeError(
            f"`target` must be a str, a list of str or a Variable, got "
            f"{type(target).__name__}."
        )
    if batched:
        raise ValueError(
            "`prediction` is a batch but `target` is a scalar: pass one target per "
            "sample."
        )
    return [data]


def _purpose(value: Any, name: str, allow_none: bool = False) -> str | None:
    if value is None and allow_none:
        return None
    text = value.data if isinstance(value, Variable) else value
    if not isinstance(text, str):
        raise TypeError(f"`{name}` must be a str or a Variable holding a str.")
    if not text:
        raise ValueError(f"`{name}` must not be empty: say what it does.")
    return text


def _reduce(
    scores: list[Any],
    reduction_fn: Callable[[list[Any]], Any] | None,
    purpose: str | None,
) -> Any:
    if reduction_fn is None:
        return scores
    if purpose is None:
        raise ValueError(
            "`reduction_fn_purpose` must describe `reduction_fn` (e.g. 'summation'); "
            "pass reduction_fn=None to keep per-sample scores."
        )
    return reduction_fn(scores)


def _best_score(scores: list[Any], best_score: Any) -> Any:
    if best_score is not None:
        return best_score
    if scores and all(isinstance(s, bool) for s in scores):
        return True
    return None


def _producer_inputs(prediction: Variable, n: int) -> list[str]:
    """The user text that led to each sample of ``prediction``: found by walking the
    graph back to the nearest ChatCompletion node."""
    start = prediction.grad_fn
    if start is None:
        return [NO_INPUT] * n
    queue, seen = deque([start]), {id(start)}
    while queue:
        node = queue.popleft()
        rendered = getattr(node, "rendered", None)
        if isinstance(rendered, list) and rendered:
            texts = [
                "\n".join(m["content"] for m in sample if m["role"] == "user")
                for sample in rendered
            ]
            if len(texts) == n:
                return texts
            if len(texts) == 1:
                return texts * n
            return [NO_INPUT] * n
        for edge in getattr(node, "next_functions", ()):
            if edge.node is not None and id(edge.node) not in seen:
                seen.add(id(edge.node))
                queue.append(edge.node)
    return [NO_INPUT] * n


def _explain(
    prediction: Variable,
    predictions: list[Any],
    targets: list[Any],
    scores: list[Any],
    purpose: str,
    reduction_fn: Callable[[list[Any]], Any] | None,
    reduction_purpose: str | None,
) -> tuple[Any, Any]:
    """The score and explanation of a deterministic evaluation: per-sample scores
    reduced (or kept) and the contract's explanation texts."""
    if not isinstance(prediction.data, list):
        explanation = render(
            SCALAR_EXPLANATION,
            {
                "purpose": purpose,
                "prediction": predictions[0],
                "target": targets[0],
                "score": scores[0],
            },
        )
        return scores[0], explanation
    score = _reduce(scores, reduction_fn, reduction_purpose)
    if reduction_fn is None:
        return score, [
            render(
                SCALAR_EXPLANATION,
                {"purpose": purpose, "prediction": p, "target": t, "score": s},
            )
            for p, t, s in zip(predictions, targets, scores, strict=True)
        ]
    explanation = render(
        BATCH_EXPLANATION,
        {"purpose": purpose, "reduction_purpose": reduction_purpose, "score": score},
    )
    return score, explanation


def _failed_samples(ctx: Any) -> list[int]:
    if not ctx.per_sample_skip or ctx.best is None:
        return list(range(len(ctx.scores)))
    return [s for s, score in enumerate(ctx.scores) if score != ctx.best]


def _samples_per_call(value: Any) -> int:
    name = "samples_per_call"
    if value is None:
        value, name = config.EVALUATOR_SAMPLES_PER_CALL, "EVALUATOR_SAMPLES_PER_CALL"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {value!r}.")
    if value < 1:
        raise ValueError(
            f"`{name}` must be >= 1 (1 = one backward call per failed sample), got "
            f"{value!r}."
        )
    return value


class SampleTexts(list[list[str]]):
    """The evaluator-backward feedback of one backward call: ``texts[k][s]`` (a list
    of per-variable lists of per-sample texts) plus ``call_groups``, which maps each
    sample sent to the positions its LM call covered (the provenance of the
    feedback). Kept with the texts, not on the shared ``ctx``: two passes over one
    evaluator (``retain_graph=True``) may run at once, in different modes."""

    call_groups: dict[int, tuple[int, ...]]

    def __init__(
        self,
        texts: list[list[str]],
        call_groups: dict[int, tuple[int, ...]] | None = None,
    ) -> None:
        super().__init__(texts)
        self.call_groups = {} if call_groups is None else call_groups


async def _ask_for_samples(
    ctx: Any,
    grad_explanation: Variable | None,
    variables: list[tuple[Variable, str]],
    samples: list[int] | None = None,
) -> SampleTexts:
    """Feedback for each of ``variables`` (Variable, location) from each failed sample
    (or from ``samples`` only): ``result[k][s]`` (``""`` where no call was made).

    The samples are sent in groups of at most ``ctx.samples_per_call``, one backward
    call per group, all groups concurrently. ``result.call_groups`` maps each sample
    sent to the positions its call covered (the provenance of the feedback); nothing
    is stored on ``ctx``."""
    n = len(ctx.scores)
    result = SampleTexts([[""] * n for _ in variables])
    if not variables or (ctx.success_fn is not None and ctx.success_fn(ctx.scores)):
        return result
    feedback = ""
    if grad_explanation is not None:
        data = grad_explanation.data
        feedback = (
            "\n".join(str(d) for d in data if d)
            if isinstance(data, list)
            else str(data)
        )

    def per_sample(var: Variable) -> bool:
        return isinstance(var.data, list) and len(var.data) == n

    listed = format_variables(
        [
            VariableInfo(
                role=var.role,
                location=location,
                trainable=var.is_leaf and var.requires_grad,
                text=PREDICTION_PLACEHOLDER
                if location == "prediction"
                else ("" if per_sample(var) else str(var.data)),
            )
            for var, location in variables
        ]
    )

    def sample_element(s: int) -> str:
        details = ""
        if ctx.sample_explanations is not None:
            details += render(
                EVALUATOR_SAMPLE_EXPLANATION,
                {"explanation": ctx.sample_explanations[s]},
            )
        for i, (var, location) in enumerate(variables, start=1):
            if location != "prediction" and per_sample(var):
                details += render(
                    EVALUATOR_SAMPLE_VALUE, {"index": i, "text": str(var.data[s])}
                )
        return render(
            EVALUATOR_SAMPLE_ELEMENT,
            {
                "index": s + 1,
                "input": ctx.inputs_text[s],
                "prediction_role": ctx.prediction_role,
                "prediction": ctx.predictions[s],
                "target": ctx.targets[s],
                "score": ctx.scores[s],
                "details": details,
            },
        )

    async def one(group: list[int]) -> None:
        k = len(variables)
        user = render(
            EVALUATOR_BACKWARD_USER,
            {
                "purpose": ctx.purpose,
                "explanation": ctx.explanation_text,
                "feedback": feedback,
                "variable_count": k,
                "variables": listed,
                "sample_count": len(group),
                "samples": "\n".join(sample_element(s) for s in group),
                "count": k * len(group),
            },
        )
        texts = await request_gradients(
            ctx.name(), EVALUATOR_BACKWARD_SYSTEM, user, k * len(group)
        )
        for j, s in enumerate(group):
            for v in range(k):
                result[v][s] = texts[j * k + v].strip()

    chosen = _failed_samples(ctx) if samples is None else samples
    size = ctx.samples_per_call
    groups = [chosen[i : i + size] for i in range(0, len(chosen), size)]
    result.call_groups = {s: tuple(group) for group in groups for s in group}
    await asyncio.gather(*(one(group) for group in groups))
    return result


def _feedback_mode(value: Any) -> str | None:
    """``feedback_mode`` checked (``None``: the active backward options decide)."""
    if value is None:
        return None
    return check_evaluator_feedback(value, "feedback_mode")


def _active_feedback_mode(ctx: Any) -> str:
    """The evaluator's ``feedback_mode``, else the active backward options' (read at
    backward time)."""
    mode = getattr(ctx, "feedback_mode", None)
    return mode if mode is not None else get_backward_options().evaluator_feedback


def direct_feedback_texts(
    ctx: Any, grad_explanation: Variable | None, samples: list[int] | None = None
) -> list[str]:
    """Direct evaluator feedback (no LM call): one text per sample, ``""`` for a
    sample that gets none.

    Each failed sample (or each of ``samples``) gets
    :data:`~afnio.autodiff.prompts.DIRECT_EVALUATOR_FEEDBACK` filled with
    ``ctx.purpose`` (the metric), its prediction, target and score, followed by
    :data:`~afnio.autodiff.prompts.DIRECT_EVALUATOR_DETAIL` holding the non-empty
    feedback on the explanation (``grad_explanation``; when it is a list aligned
    with the samples, the sample's own item). Nothing when ``success_fn`` says the
    batch succeeded.

    Args:
        ctx: an evaluator's ctx (``scores``, ``predictions``, ``targets``,
            ``purpose``, ``success_fn``, ``per_sample_skip``, ``best`` and
            ``batched``, as ``_save`` sets them).
        grad_explanation: the feedback on the explanation output (or ``None``).
        samples: the samples to write feedback for (default: the failed ones).
    """
    n = len(ctx.scores)
    texts = [""] * n
    if ctx.success_fn is not None and ctx.success_fn(ctx.scores):
        return texts
    data = grad_explanation.data if grad_explanation is not None else ""
    aligned = (
        isinstance(data, list) and len(data) == n and getattr(ctx, "batched", n > 1)
    )
    joined = (
        "\n".join(str(d) for d in data if d) if isinstance(data, list) else str(data)
    )
    chosen = _failed_samples(ctx) if samples is None else samples
    for s in chosen:
        text = render(
            DIRECT_EVALUATOR_FEEDBACK,
            {
                "metric": ctx.purpose,
                "prediction": ctx.predictions[s],
                "target": ctx.targets[s],
                "score": ctx.scores[s],
            },
        )
        detail = str(data[s]) if aligned else joined
        if detail.strip():
            text += render(DIRECT_EVALUATOR_DETAIL, {"detail": detail.strip()})
        texts[s] = text
    return texts


def _gradient(
    var: Variable,
    texts: list[str],
    batched: bool,
    call_groups: dict[int, tuple[int, ...]] | None = None,
    basis: Basis = None,
) -> Variable | None:
    """Difference 13: aligned list for a batched Variable, the non-empty texts for a
    shared one in a batched call, a str in an unbatched call; ``None`` if empty.

    In a batched call each text records its sample ``(s,)``, numbered in ``basis``
    (the evaluator's targets and per-sample inputs) and, when its backward call
    covered several samples (``call_groups``), that group
    (:mod:`afnio.autodiff.provenance`); an unbatched call records nothing."""
    role = f"feedback to {var.role}"
    groups = call_groups or {}

    def call_of(s: int) -> tuple[int, ...] | None:
        group = groups.get(s)
        return group if group is not None and len(group) > 1 else None

    if isinstance(var.data, list):
        if not any(texts):
            return None
        grad = Variable(texts, role=role)
        if batched:
            set_sources(
                grad,
                [(s,) for s in range(len(texts))],
                [call_of(s) if t else None for s, t in enumerate(texts)],
                basis=basis,
            )
        return grad
    if batched:
        kept = [s for s, t in enumerate(texts) if t]
        if not kept:
            return None
        grad = Variable([texts[s] for s in kept], role=role)
        set_sources(grad, [(s,) for s in kept], [call_of(s) for s in kept], basis=basis)
        return grad
    return Variable(texts[0], role=role) if texts[0] else None


def _outputs(
    ctx: Any, prediction: Variable, score: Any, explanation: Any
) -> tuple[Variable, Variable]:
    return (
        Variable(score, role=f"Evaluation result score of {prediction.role}"),
        Variable(
            explanation, role=f"Evaluation result explanation of {prediction.role}"
        ),
    )


def _save(
    ctx: Any,
    prediction: Variable,
    targets: list[Any],
    scores: list[Any],
    explanation: Any,
    purpose: str,
    success_fn: Any,
    best_score: Any,
    per_sample_skip: bool,
    samples_per_call: int | None = None,
    sample_explanations: list[str] | None = None,
) -> None:
    n = len(scores)
    ctx.batched = isinstance(prediction.data, list)
    ctx.prediction = prediction
    ctx.prediction_role = prediction.role
    ctx.predictions = [str(p) for p in _samples(prediction)]
    ctx.targets = ["" if t is None else str(t) for t in targets]
    ctx.scores = scores
    ctx.purpose = purpose
    # per-sample explanations (reduction_fn=None) restate each sample's own
    # prediction, target and score, which its <SAMPLE> shows anyway
    ctx.explanation_text = "" if isinstance(explanation, list) else str(explanation)
    ctx.sample_explanations = sample_explanations
    ctx.samples_per_call = _samples_per_call(samples_per_call)
    ctx.success_fn = success_fn
    ctx.best = _best_score(scores, best_score)
    ctx.per_sample_skip = bool(per_sample_skip)
    ctx.inputs_text = _producer_inputs(prediction, n)
    # what the sample positions of the feedback are numbered in (provenance);
    # the forward replaces it with its target's own list when it has one
    ctx.basis = basis_of(ctx.targets) if ctx.batched else None


def _target_basis(ctx: Any, target: Any) -> None:
    """Number the feedback's samples in the ``target`` list object itself (a batch
    column passed as it is is then recognized by identity)."""
    if ctx.batched:
        ctx.basis = basis_of(target) or ctx.basis


def _prediction_only_backward(
    ctx: Any,
    texts: list[list[str]],
    call_groups: dict[int, tuple[int, ...]] | None = None,
) -> tuple[Variable | None, ...]:
    """The gradients of an evaluator whose only input with feedback is the
    prediction. ``call_groups``: the samples' LM-call groups (by default those
    ``texts`` carries when :func:`_ask_for_samples` returned it; none for texts made
    without an LM call)."""
    if call_groups is None:
        call_groups = getattr(texts, "call_groups", None)
    result: list[Variable | None] = [None] * len(ctx.needs_input_grad)
    result[0] = _gradient(
        ctx.prediction,
        texts[0],
        ctx.batched,
        call_groups,
        getattr(ctx, "basis", None),
    )
    return tuple(result)


# -- DeterministicEvaluator ------------------------------------------------------------


@evaluator
class DeterministicEvaluator(Function):
    """Score ``prediction`` against ``target`` with ``eval_fn(pred, target)`` per
    sample, then reduce (see the module docstring).

    ``feedback_mode="direct"`` makes backward write each failed sample's feedback
    without an LM call; ``"lm"`` asks the backward model (upstream); ``None`` (the
    default) follows ``afnio.get_backward_options().evaluator_feedback`` when backward
    runs.

    Example::

        >>> import afnio
        >>> from afnio.autodiff.evaluator import DeterministicEvaluator
        >>> prediction = afnio.Variable("green", role="color prediction")
        >>> def exact_match_fn(p, t):
        ...     return 1 if p == t else 0
        >>> score, explanation = DeterministicEvaluator.apply(
        ...     prediction, "red", exact_match_fn, "exact match")
        >>> score.data
        0
        >>> explanation.data
        "The evaluation function, designed for 'exact match', compared the <DATA> field of the predicted variable ('green') with the <DATA> field of the target variable ('red'), resulting in a score: 0."
    """  # noqa: E501

    @staticmethod
    def forward(
        ctx: Any,
        prediction: Variable,
        target: str | list[str] | Variable,
        eval_fn: Callable[[Any, Any], Any],
        eval_fn_purpose: str | Variable,
        success_fn: Callable[[list[Any]], bool] | None = None,
        reduction_fn: Callable[[list[Any]], Any] | None = builtins.sum,
        reduction_fn_purpose: str | Variable | None = "summation",
        *,
        best_score: Any = None,
        per_sample_skip: bool = True,
        samples_per_call: int | None = None,
        feedback_mode: Literal["lm", "direct"] | None = None,
    ) -> tuple[Variable, Variable]:
        _check_prediction(prediction)
        _samples_per_call(samples_per_call)  # before any work: a clear error
        mode = _feedback_mode(feedback_mode)
        if not callable(eval_fn):
            raise TypeError(
                "`eval_fn` must be a function (prediction, target) -> score."
            )
        purpose = _purpose(eval_fn_purpose, "eval_fn_purpose")
        reduction_purpose = _purpose(
            reduction_fn_purpose, "reduction_fn_purpose", allow_none=True
        )
        targets = _targets(target, prediction)
        predictions = _samples(prediction)
        scores = [eval_fn(p, t) for p, t in zip(predictions, targets, strict=True)]
        score, explanation = _explain(
            prediction,
            predictions,
            targets,
            scores,
            purpose,
            reduction_fn,
            reduction_purpose,
        )
        _save(
            ctx,
            prediction,
            targets,
            scores,
            explanation,
            purpose,
            success_fn,
            best_score,
            per_sample_skip,
            samples_per_call,
        )
        ctx.feedback_mode = mode
        _target_basis(ctx, target)
        return _outputs(ctx, prediction, score, explanation)

    @staticmethod
    async def backward(
        ctx: Any, score_grad: Variable | None, explanation_grad: Variable | None
    ) -> tuple[Variable | None, ...]:
        if not ctx.needs_input_grad[0]:
            return (None,) * len(ctx.needs_input_grad)
        if _active_feedback_mode(ctx) == "direct":  # no LM call: no call group
            return _prediction_only_backward(
                ctx, [direct_feedback_texts(ctx, explanation_grad)], {}
            )
        texts = await _ask_for_samples(
            ctx, explanation_grad, [(ctx.prediction, "prediction")]
        )
        return _prediction_only_backward(ctx, texts)


def _exact_match(prediction: Any, target: Any) -> int:
    return 1 if prediction == target else 0


@evaluator
class ExactMatchEvaluator(Function):
    """Score 1 per sample whose data equals the target, else 0; then reduce.
    ``feedback_mode`` as for :class:`DeterministicEvaluator`.

    Example::

        >>> import afnio
        >>> from afnio.autodiff.evaluator import ExactMatchEvaluator
        >>> prediction = afnio.Variable(["green", "blue"], role="color prediction")
        >>> score, _ = ExactMatchEvaluator.apply(prediction, ["red", "blue"])
        >>> score.data
        1
    """

    @staticmethod
    def forward(
        ctx: Any,
        prediction: Variable,
        target: str | list[str] | Variable,
        reduction_fn: Callable[[list[Any]], Any] | None = builtins.sum,
        reduction_fn_purpose: str | Variable | None = "summation",
        *,
        per_sample_skip: bool = True,
        samples_per_call: int | None = None,
        feedback_mode: Literal["lm", "direct"] | None = None,
    ) -> tuple[Variable, Variable]:
        return DeterministicEvaluator.forward(
            ctx,
            prediction,
            target,
            _exact_match,
            "exact match",
            None,
            reduction_fn,
            reduction_fn_purpose,
            best_score=1,
            per_sample_skip=per_sample_skip,
            samples_per_call=samples_per_call,
            feedback_mode=feedback_mode,
        )

    @staticmethod
    async def backward(
        ctx: Any, score_grad: Variable | None, explanation_grad: Variable | None
    ) -> tuple[Variable | None, ...]:
        return await DeterministicEvaluator.backward(ctx, score_grad, explanation_grad)


# -- LMJudgeEvaluator ------------------------------------------------------------------


def _parse_judgement(answer: str) -> tuple[Any, str]:
    try:
        data = json.loads(answer)
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"the answer is not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or "score" not in data or "explanation" not in data:
        raise ValueError('the answer must be {"score": ..., "explanation": "..."}')
    score, explanation = data["score"], data["explanation"]
    if not isinstance(score, (bool, int, float)) or not isinstance(explanation, str):
        raise ValueError(
            "`score` must be a boolean or a number, `explanation` a string"
        )
    return score, explanation


async def _judge(
    node: str,
    client: ChatCompletionModel,
    messages: list[dict[str, str]],
    completion_args: dict[str, Any],
) -> tuple[Any, str]:
    args = {"response_format": judge_response_format(), **completion_args}
    answer = ""
    error: ValueError | None = None
    for _ in range(config.BACKWARD_PASS_MAX_RETRIES + 1):
        answer = await client.achat(messages, **args)
        try:
            return _parse_judgement(answer)
        except ValueError as e:
            error = e
            reject_answer(answer)  # a retried step must not replay it
            messages = [
                *messages,
                {"role": "assistant", "content": answer},
                {
                    "role": "user",
                    "content": f"Your answer could not be used: {e}. Answer again with "
                    'a JSON object only: {"score": ..., "explanation": "..."}.',
                },
            ]
    raise JudgeParseError(
        f"{node}: the judge's answer was not valid judgement JSON after "
        f"{config.BACKWARD_PASS_MAX_RETRIES} retries: {error}. "
        f"Last answer: {answer[:300]!r}."
    )


@evaluator
class LMJudgeEvaluator(Function):
    """Score ``prediction`` with an LM judge: ``messages`` (templates that may use
    ``{prediction}``, ``{target}`` and keys of ``inputs``) are rendered per sample and
    the judge answers ``{"score", "explanation"}`` JSON.

    ``eval_mode=True`` sends gradients to ``prediction``; ``eval_mode=False`` to the
    Variables of ``messages`` and ``inputs`` instead (to optimize the judge).
    """

    @staticmethod
    async def forward(
        ctx: Any,
        forward_model_client: ChatCompletionModel | None,
        messages: list[dict[str, Any]],
        prediction: Variable,
        target: str | list[str] | Variable | None = None,
        inputs: dict[str, Any] | None = None,
        success_fn: Callable[[list[Any]], bool] | None = None,
        reduction_fn: Callable[[list[Any]], Any] | None = builtins.sum,
        reduction_fn_purpose: str | Variable | None = "summation",
        eval_mode: bool | Variable = True,
        *,
        best_score: Any = None,
        per_sample_skip: bool = True,
        samples_per_call: int | None = None,
        **completion_args: Any,
    ) -> tuple[Variable, Variable]:
        if not isinstance(forward_model_client, ChatCompletionModel):
            raise TypeError(
                "`forward_model_client` must be a ChatCompletionModel, got "
                f"{type(forward_model_client).__name__}."
            )
        _validate_multi_turn_messages(messages)
        _check_prediction(prediction)
        _samples_per_call(samples_per_call)  # before the judge calls are paid for
        inputs = dict(inputs or {})
        clash = sorted({"prediction", "target"} & set(inputs))
        if clash:
            raise ValueError(
                f"`inputs` must not use the keys {clash}: `prediction` and `target` "
                "fill those placeholders."
            )
        reduction_purpose = _purpose(
            reduction_fn_purpose, "reduction_fn_purpose", allow_none=True
        )
        mode = eval_mode.data if isinstance(eval_mode, Variable) else eval_mode
        targets = _targets(target, prediction, required=False)
        predictions = _samples(prediction)
        n = len(predictions)

        def value(v: Any, s: int) -> str:
            data = v.data if isinstance(v, Variable) else v
            if isinstance(data, list):
                item = data[s]
                return str(item.data if isinstance(item, Variable) else item)
            return str(data)

        rendered = []
        for s in range(n):
            values = {k: value(v, s) for k, v in inputs.items()}
            values["prediction"] = str(predictions[s])
            values["target"] = "" if targets[s] is None else str(targets[s])
            rendered.append(
                [
                    {
                        "role": m["role"],
                        "content": "\n".join(
                            render(value(v, s), values) for v in m["content"]
                        ),
                    }
                    for m in messages
                ]
            )
        with lm_phase("evaluator"):
            judged = await asyncio.gather(
                *(
                    _judge(ctx.name(), forward_model_client, sample, completion_args)
                    for sample in rendered
                )
            )
        scores = [score for score, _ in judged]
        explanations = [text for _, text in judged]
        if isinstance(prediction.data, list):
            score = _reduce(scores, reduction_fn, reduction_purpose)
            explanation: Any = (
                explanations
                if reduction_fn is None
                else render(
                    JUDGE_BATCH_EXPLANATION,
                    {"reduction_purpose": reduction_purpose, "score": score},
                )
            )
        else:
            score, explanation = scores[0], explanations[0]
        _save(
            ctx,
            prediction,
            targets,
            scores,
            explanation,
            JUDGE_PURPOSE,
            success_fn,
            best_score,
            per_sample_skip,
            samples_per_call,
            explanations if isinstance(prediction.data, list) else None,
        )
        _target_basis(ctx, target)
        ctx.eval_mode = bool(mode)
        # the judge's Variables, for eval_mode=False, in slot order
        judge_vars: list[tuple[Variable, str]] = [
            (v, m["role"]) for m in messages for v in m["content"]
        ]
        for key, v in inputs.items():
            if isinstance(v, Variable):
                judge_vars.append((v, f"input:{key}"))
            elif isinstance(v, list):
                judge_vars.extend(
                    (x, f"input:{key}") for x in v if isinstance(x, Variable)
                )
        slots = _flatten_slots(
            (forward_model_client, messages, prediction, target, inputs or None)
        )
        var_positions = [i for i, s in enumerate(slots) if isinstance(s, Variable)]
        prediction_position = next(i for i, s in enumerate(slots) if s is prediction)
        judge_positions = [p for p in var_positions if slots[p] is not prediction]
        if isinstance(target, Variable):
            judge_positions = [p for p in judge_positions if slots[p] is not target]
        ctx.judge_vars = judge_vars
        if ctx.batched:  # per-sample judge inputs number the samples too
            n = len(scores)
            ctx.basis = _join_bases(
                ctx.basis,
                basis_of(
                    *(
                        v
                        for v, _ in judge_vars
                        if isinstance(v.data, list) and len(v.data) == n
                    )
                ),
            )
        ctx.judge_positions = judge_positions[: len(judge_vars)]
        ctx.prediction_position = prediction_position
        ctx.rendered_judge = rendered
        return _outputs(ctx, prediction, score, explanation)

    @staticmethod
    async def backward(
        ctx: Any, score_grad: Variable | None, explanation_grad: Variable | None
    ) -> tuple[Variable | None, ...]:
        needs = ctx.needs_input_grad
        result: list[Variable | None] = [None] * len(needs)
        if ctx.eval_mode:
            if not needs[ctx.prediction_position]:
                return tuple(result)
            texts = await _ask_for_samples(
                ctx, explanation_grad, [(ctx.prediction, "prediction")]
            )
            result[ctx.prediction_position] = _gradient(
                ctx.prediction, texts[0], ctx.batched, texts.call_groups, ctx.basis
            )
            return tuple(result)
        asked = [
            (k, pair)
            for k, pair in enumerate(ctx.judge_vars)
            if needs[ctx.judge_positions[k]]
        ]
        if not asked:
            return tuple(result)
        texts = await _ask_for_samples(
            ctx, explanation_grad, [pair for _, pair in asked]
        )
        for (k, (var, _)), var_texts in zip(asked, texts, strict=True):
            result[ctx.judge_positions[k]] = _gradient(
                var, var_texts, ctx.batched, texts.call_groups, ctx.basis
            )
        return tuple(result)
