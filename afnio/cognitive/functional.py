"""Functional forms of afnio's differentiable operations (``afnio.functional``).

Example::

    >>> import afnio
    >>> import afnio.functional as F
    >>> F.add(afnio.Variable("a"), afnio.Variable("b")).data
    'ab'
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from typing import Any

from afnio._variable import Variable
from afnio.autodiff.basic_ops import Add, Split, Sum
from afnio.autodiff.evaluator import (
    DeterministicEvaluator,
    ExactMatchEvaluator,
    LMJudgeEvaluator,
)
from afnio.autodiff.lm_ops import ChatCompletion
from afnio.models.model import ChatCompletionModel

__all__ = [
    "add",
    "chat_completion",
    "deterministic_evaluator",
    "exact_match_evaluator",
    "lm_judge_evaluator",
    "split",
    "sum",
]


def add(x: Variable, y: Variable) -> Variable:
    """``x + y`` (see :class:`afnio.autodiff.basic_ops.Add`)."""
    return Add.apply(x, y)


def sum(x: list[Variable]) -> Variable:
    """Aggregate Variables (see :class:`afnio.autodiff.basic_ops.Sum`)."""
    return Sum.apply(x)


def split(
    x: Variable,
    sep: str | Variable | None = None,
    maxsplit: int | Variable | None = -1,
) -> tuple[Variable, ...]:
    """Split text into parts (see :class:`afnio.autodiff.basic_ops.Split`)."""
    return Split.apply(x, sep, maxsplit)


def chat_completion(
    forward_model_client: ChatCompletionModel | None,
    messages: list[dict[str, Any]],
    inputs: dict[str, Any] | None = None,
    **completion_args: Any,
) -> Variable:
    """A differentiable chat completion (see
    :class:`afnio.autodiff.lm_ops.ChatCompletion`)."""
    return ChatCompletion.apply(
        forward_model_client, messages, inputs, **completion_args
    )


def deterministic_evaluator(
    prediction: Variable,
    target: Any,
    eval_fn: Callable[[Any, Any], Any],
    eval_fn_purpose: str | Variable,
    success_fn: Callable[[list[Any]], bool] | None,
    reduction_fn: Callable[[list[Any]], Any] | None,
    reduction_fn_purpose: str | Variable | None,
    **kwargs: Any,
) -> tuple[Variable, Variable]:
    """Score with ``eval_fn`` (see
    :class:`afnio.autodiff.evaluator.DeterministicEvaluator`). Keyword arguments
    (``best_score``, ``per_sample_skip``, ``samples_per_call``, ``feedback_mode``:
    ``"lm"``, ``"direct"`` or ``None`` for the active backward options) go to it."""
    return DeterministicEvaluator.apply(
        prediction,
        target,
        eval_fn,
        eval_fn_purpose,
        success_fn,
        reduction_fn,
        reduction_fn_purpose,
        **kwargs,
    )


def exact_match_evaluator(
    prediction: Variable,
    target: Any,
    reduction_fn: Callable[[list[Any]], Any] | None = builtins.sum,
    reduction_fn_purpose: str | Variable | None = "summation",
    **kwargs: Any,
) -> tuple[Variable, Variable]:
    """Exact-match score (see :class:`afnio.autodiff.evaluator.ExactMatchEvaluator`).
    Keyword arguments (``per_sample_skip``, ``samples_per_call``, ``feedback_mode``)
    go to it."""
    return ExactMatchEvaluator.apply(
        prediction, target, reduction_fn, reduction_fn_purpose, **kwargs
    )


def lm_judge_evaluator(
    forward_model_client: ChatCompletionModel | None,
    messages: list[dict[str, Any]],
    prediction: Variable,
    target: Any = None,
    inputs: dict[str, Any] | None = None,
    success_fn: Callable[[list[Any]], bool] | None = None,
    reduction_fn: Callable[[list[Any]], Any] | None = builtins.sum,
    reduction_fn_purpose: str | Variable | None = "summation",
    eval_mode: bool | Variable = True,
    **completion_args: Any,
) -> tuple[Variable, Variable]:
    """An LM judge (see :class:`afnio.autodiff.evaluator.LMJudgeEvaluator`)."""
    return LMJudgeEvaluator.apply(
        forward_model_client,
        messages,
        prediction,
        target,
        inputs,
        success_fn,
        reduction_fn,
        reduction_fn_purpose,
        eval_mode,
        **completion_args,
    )
