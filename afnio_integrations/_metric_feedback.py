"""Direct feedback for samples whose metric wrote its own textual feedback (issue 23).

The LangChain ``optimize()`` metric may return ``(score, feedback)`` (see
:class:`~afnio_integrations.langchain._optimize.MetricFeedback`), a DSPy metric a
GEPA-style ``dspy.Prediction(score=..., feedback=...)`` (see
:class:`~afnio_integrations.dspy.MetricEvaluator`). In direct mode
(``evaluator_feedback="direct"``, the cheap backward) such a sample's feedback is
what a deterministic evaluator writes itself
(:data:`~afnio.autodiff.prompts.DIRECT_EVALUATOR_FEEDBACK`: the metric's name, the
prediction, its score and the expected value) together with the metric's own text
(:data:`~afnio.autodiff.prompts.DIRECT_EVALUATOR_DETAIL`); in ``"lm"`` mode the
callers keep the metric's text alone.

Order: the direct sentence first, the metric's text after it, when the target is a
*plain value* (one line, no double quote, not a JSON/Python object or list: see
:func:`is_plain_target`). Otherwise the sentence could not quote the expected value
unambiguously (``the expected value is "{"label": "x"}"``), and a reader that takes
the first expected value it finds (the bundled simulator does, as a hurried model
may) would take that, not what the metric said it expected; so the metric's text
comes first (:data:`~afnio.autodiff.prompts.METRIC_FEEDBACK_THEN_DIRECT`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from afnio._template import render
from afnio._variable import Variable
from afnio.autodiff.evaluator import direct_feedback_texts
from afnio.autodiff.prompts import DIRECT_EVALUATOR_DETAIL, METRIC_FEEDBACK_THEN_DIRECT

__all__ = ["direct_metric_feedback_texts", "is_plain_target"]


def is_plain_target(target: str) -> bool:
    """Whether ``target`` can be quoted as a value in one sentence: one line, no
    double quote, and not a JSON or Python object or list (``{...}``, ``[...]``).

    >>> is_plain_target("repairs"), is_plain_target("lookup, refund")
    (True, True)
    >>> is_plain_target('{"sentiment": "negative"}'), is_plain_target("{'a': 1}")
    (False, False)
    >>> is_plain_target("sentiment: negative\\nurgency: high")
    False
    """
    text = target.strip()
    return "\n" not in text and '"' not in text and not text.startswith(("{", "["))


def direct_metric_feedback_texts(
    ctx: Any,
    explanation_grad: Variable | None,
    feedback: Sequence[str],
    samples: Sequence[int],
) -> list[str]:
    """Direct feedback for ``samples`` (no LM call): one text per sample, ``""`` for
    a sample not in ``samples``.

    A sample without metric feedback (blank ``feedback[s]``) gets what
    :func:`~afnio.autodiff.evaluator.direct_feedback_texts` writes: the
    :data:`~afnio.autodiff.prompts.DIRECT_EVALUATOR_FEEDBACK` sentence, then the
    feedback on the evaluation's explanation when there is some. A sample with
    metric feedback gets the sentence followed by
    :data:`~afnio.autodiff.prompts.DIRECT_EVALUATOR_DETAIL` holding the metric's
    text (stripped), then the feedback on the explanation; when its target is not a
    plain value (:func:`is_plain_target`), the metric's text comes first
    (:data:`~afnio.autodiff.prompts.METRIC_FEEDBACK_THEN_DIRECT`).

    Args:
        ctx: the evaluator's ctx, with what ``direct_feedback_texts`` reads
            (``scores``, ``predictions``, ``targets``, ``purpose``, ``success_fn``,
            ``batched``; ``per_sample_skip`` and ``best`` are not read: ``samples``
            is given).
        explanation_grad: the feedback on the explanation output (or ``None``).
        feedback: the metric's own text per sample (``""`` for none).
        samples: the samples that get feedback.
    """
    chosen = list(samples)
    plain = direct_feedback_texts(ctx, None, samples=chosen)
    full = (
        plain
        if explanation_grad is None
        else direct_feedback_texts(ctx, explanation_grad, samples=chosen)
    )
    texts = list(full)
    for s in chosen:
        metric = str(feedback[s]).strip()
        if not metric or not plain[s]:  # no metric text, or success_fn said done
            continue
        # what the explanation's feedback added after the sentence (usually nothing)
        extra = full[s][len(plain[s]) :]
        if is_plain_target(str(ctx.targets[s])):
            text = plain[s] + render(DIRECT_EVALUATOR_DETAIL, {"detail": metric})
        else:
            text = render(
                METRIC_FEEDBACK_THEN_DIRECT, {"feedback": metric, "direct": plain[s]}
            )
        texts[s] = text + extra
    return texts
