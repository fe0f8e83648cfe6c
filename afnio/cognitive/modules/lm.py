"""Module forms of the LM operations: :class:`ChatCompletion` and the evaluators.

Each module keeps the arguments of its last call as registered state (model client,
chat, completion config, functions, buffers), so they appear in ``state_dict`` and an
optimizer or a checkpoint can see them.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from typing import Any

from afnio._variable import Variable
from afnio.autodiff import evaluator as ev
from afnio.autodiff import lm_ops
from afnio.cognitive.modules.module import Module
from afnio.models.model import ChatCompletionModel

__all__ = [
    "ChatCompletion",
    "DeterministicEvaluator",
    "ExactMatchEvaluator",
    "LMJudgeEvaluator",
]


def _as_variable(value: Any, role: str) -> Variable | None:
    if value is None or isinstance(value, Variable):
        return value
    return Variable(value, role=role)


class ChatCompletion(Module):
    """``ChatCompletion()(client, messages, inputs=None, **completion_args)``: a
    differentiable chat completion (see :class:`afnio.autodiff.lm_ops.ChatCompletion`).
    After a call, ``forward_model_client``, ``messages`` and ``completion_args`` are in
    ``state_dict``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_model("forward_model_client", None)
        self.register_chat("messages", None)
        self.register_completion_config("completion_args", None)

    def forward(
        self,
        forward_model_client: ChatCompletionModel | None,
        messages: list[dict[str, Any]],
        inputs: dict[str, Any] | None = None,
        **completion_args: Any,
    ) -> Variable:
        self.forward_model_client = forward_model_client
        self.messages = messages
        self.completion_args = completion_args
        return lm_ops.ChatCompletion.apply(
            forward_model_client, messages, inputs, **completion_args
        )


class DeterministicEvaluator(Module):
    """Module form of :class:`afnio.autodiff.evaluator.DeterministicEvaluator`
    (keyword arguments such as ``samples_per_call`` and ``feedback_mode`` go to
    it)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_function("eval_fn", None)
        self.register_function("success_fn", None)
        self.register_function("reduction_fn", None)
        self.register_buffer("eval_fn_purpose", None)
        self.register_buffer("reduction_fn_purpose", None)

    def forward(
        self,
        prediction: Variable,
        target: Any,
        eval_fn: Callable[[Any, Any], Any],
        eval_fn_purpose: str | Variable,
        success_fn: Callable[[list[Any]], bool] | None = None,
        reduction_fn: Callable[[list[Any]], Any] | None = builtins.sum,
        reduction_fn_purpose: str | Variable | None = "summation",
        **kwargs: Any,
    ) -> tuple[Variable, Variable]:
        self.eval_fn = eval_fn
        self.success_fn = success_fn
        self.reduction_fn = reduction_fn
        self.eval_fn_purpose = _as_variable(
            eval_fn_purpose, "evaluation function purpose"
        )
        self.reduction_fn_purpose = _as_variable(
            reduction_fn_purpose, "reduction function purpose"
        )
        return ev.DeterministicEvaluator.apply(
            prediction,
            target,
            eval_fn,
            self.eval_fn_purpose,
            success_fn,
            reduction_fn,
            self.reduction_fn_purpose,
            **kwargs,
        )


class ExactMatchEvaluator(Module):
    """Module form of :class:`afnio.autodiff.evaluator.ExactMatchEvaluator`
    (keyword arguments such as ``samples_per_call`` and ``feedback_mode`` go to
    it)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_function("reduction_fn", None)
        self.register_buffer("reduction_fn_purpose", None)

    def forward(
        self,
        prediction: Variable,
        target: Any,
        reduction_fn: Callable[[list[Any]], Any] | None = builtins.sum,
        reduction_fn_purpose: str | Variable | None = "summation",
        **kwargs: Any,
    ) -> tuple[Variable, Variable]:
        self.reduction_fn = reduction_fn
        self.reduction_fn_purpose = _as_variable(
            reduction_fn_purpose, "reduction function purpose"
        )
        return ev.ExactMatchEvaluator.apply(
            prediction, target, reduction_fn, self.reduction_fn_purpose, **kwargs
        )


class LMJudgeEvaluator(Module):
    """Module form of :class:`afnio.autodiff.evaluator.LMJudgeEvaluator`."""

    def __init__(self) -> None:
        super().__init__()
        self.register_model("forward_model_client", None)
        self.register_chat("messages", None)
        self.register_function("success_fn", None)
        self.register_function("reduction_fn", None)
        self.register_buffer("reduction_fn_purpose", None)
        self.register_buffer("eval_mode", None)
        self.register_completion_config("completion_args", None)

    def forward(
        self,
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
        self.forward_model_client = forward_model_client
        self.messages = messages
        self.success_fn = success_fn
        self.reduction_fn = reduction_fn
        self.reduction_fn_purpose = _as_variable(
            reduction_fn_purpose, "reduction function purpose"
        )
        self.eval_mode = _as_variable(eval_mode, "evaluation mode")
        self.completion_args = completion_args
        return ev.LMJudgeEvaluator.apply(
            forward_model_client,
            messages,
            prediction,
            target,
            inputs,
            success_fn,
            reduction_fn,
            self.reduction_fn_purpose,
            self.eval_mode,
            **completion_args,
        )
