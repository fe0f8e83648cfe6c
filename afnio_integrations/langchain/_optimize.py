"""``optimize(chain, trainset, metric)``: prompt optimization for users who do not write
an afnio Module.

The chain is traced (:func:`trace`), trained with TGD through the
:class:`~afnio.trainer.Trainer` (progress, ``max_cost``, ``revert_on_regression``), the
improved prompts are written back into the user's own chain, and a report tells the
scores before and after, the prompt diff, and the LM calls, tokens and cost.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from typing import Any

from afnio._variable import Variable
from afnio.autodiff.decorators import evaluator
from afnio.autodiff.evaluator import DeterministicEvaluator
from afnio.autodiff.function import Function
from afnio.models.model import ChatCompletionModel
from afnio.optim import TGD
from afnio_integrations._report import OptimizeReport
from afnio_integrations._training import SplitAgent, train_agent
from afnio_integrations.langchain._discovery import Selector
from afnio_integrations.langchain._traced import TracedChain, trace

__all__ = ["OptimizeReport", "optimize"]


@evaluator
class MetricFeedback(Function):
    """An evaluator built from a metric's own results: ``(score, feedback)`` per
    sample. The metric's textual feedback *is* the gradient of the prediction (no LM
    call is made to write it)."""

    run_backward_inline = True

    @staticmethod
    def forward(
        ctx: Any, prediction: Variable, scores: list[Any], feedback: list[str]
    ) -> tuple[Variable, Variable]:
        ctx.feedback = [str(f) for f in feedback]
        ctx.batched = isinstance(prediction.data, list)
        ctx.role = prediction.role
        text = "\n".join(f for f in ctx.feedback if f)
        return (
            Variable(
                builtins.sum(scores), role=f"Evaluation result score of {ctx.role}"
            ),
            Variable(text, role=f"Evaluation result explanation of {ctx.role}"),
        )

    @staticmethod
    def backward(ctx: Any, score_grad: Any, explanation_grad: Any) -> tuple[Any, ...]:
        if not any(ctx.feedback):
            return None, None, None
        data: Any = ctx.feedback if ctx.batched else ctx.feedback[0]
        return Variable(data, role=f"feedback to {ctx.role}"), None, None


class _ChainAgent(SplitAgent):
    def __init__(
        self,
        traced: TracedChain,
        metric: Callable[..., Any],
        pairs: dict[str, list[tuple[Any, Any]]],
        optimizer: Callable[[], Any],
        best_score: Any,
        is_evaluator: bool,
    ) -> None:
        super().__init__(optimizer)
        self.traced = traced
        object.__setattr__(self, "_metric", metric)
        object.__setattr__(self, "_pairs", pairs)
        object.__setattr__(self, "_best", best_score)
        object.__setattr__(self, "_is_evaluator", is_evaluator)

    def forward(self, inputs: list[Any]) -> Variable:
        return self.traced.batch(inputs)

    def _step(self, batch: Any, split: str) -> dict[str, Any]:
        indices = batch[0]
        rows = [self._pairs[split][int(i)] for i in indices]
        prediction = self([inputs for inputs, _ in rows])
        targets = [str(target) for _, target in rows]
        results = (
            []
            if self._is_evaluator
            else [
                self._metric(str(p), t)
                for p, t in zip(prediction.data, targets, strict=True)
            ]
        )
        if self._is_evaluator:
            score, explanation = self._metric(prediction, targets)
        elif any(isinstance(r, tuple) for r in results):
            # the metric returned (score, textual feedback): use its feedback
            pairs = [r if isinstance(r, tuple) else (r, "") for r in results]
            score, explanation = MetricFeedback.apply(
                prediction, [p[0] for p in pairs], [p[1] for p in pairs]
            )
        else:
            score, explanation = DeterministicEvaluator.apply(
                prediction,
                targets,
                self._metric,
                getattr(self._metric, "__name__", "the metric"),
                None,
                builtins.sum,
                "summation",
                best_score=self._best,
            )
        return {"loss": (score, explanation), "accuracy": float(score.data) / len(rows)}


def optimize(
    chain: Any,
    trainset: Sequence[tuple[Any, Any]],
    metric: Callable[..., Any],
    *,
    valset: Sequence[tuple[Any, Any]] | None = None,
    model_client: ChatCompletionModel | None = None,
    epochs: int = 3,
    batch_size: int = 16,
    seed: int = 0,
    select: Selector = "system",
    best_score: Any = 1,
    max_cost: float | None = None,
    revert_on_regression: bool = False,
    root_dir: str | None = None,
    progress: bool = True,
    **completion_args: Any,
) -> tuple[Any, OptimizeReport]:
    """Improve the prompts of ``chain`` on ``trainset``; returns ``(chain, report)``.

    Args:
        chain: the user's LangChain chain (its prompts are updated in place).
        trainset: ``(inputs, target)`` pairs; ``inputs`` is what ``chain.invoke``
            takes.
        metric: ``metric(prediction: str, target: str) -> score`` (e.g. 1/0), or
            ``-> (score, feedback)`` whose text is then used as the feedback itself
            (no LM call writes it), or an afnio evaluator function such as
            ``afnio.functional.exact_match_evaluator``.
        valset: pairs scored before and after (and per epoch); default ``trainset``.
        model_client: the LM that writes feedback and new prompts (TGD's client); by
            default the backward client set with ``afnio.set_backward_model_client``.
        epochs, batch_size, seed: the training loop (shuffled with ``seed``).
        select: which prompt messages to optimize (see :func:`trace`).
        best_score: a sample's best metric value (no feedback is asked for it).
        max_cost, revert_on_regression: as for :class:`~afnio.trainer.Trainer`.
        root_dir: where metrics and checkpoints go (default: a new temporary folder,
            and no checkpoints).
        **completion_args: passed to the optimizer client (``model=`` included).
    """
    if not trainset:
        raise ValueError("`trainset` is empty: pass (inputs, target) pairs.")
    if model_client is None:
        from afnio._model_client import get_backward_model_client

        model_client = get_backward_model_client().client
    traced = trace(chain, select)
    pairs = {"train": list(trainset), "val": list(valset or trainset)}

    def make_optimizer() -> TGD:
        return TGD(traced.parameters(), model_client=model_client, **completion_args)

    # an afnio evaluator function returns (score, explanation) itself
    is_evaluator = getattr(metric, "__module__", "") == "afnio.cognitive.functional"
    agent = _ChainAgent(traced, metric, pairs, make_optimizer, best_score, is_evaluator)
    before_prompts = traced.prompts()
    outcome = train_agent(
        agent,
        n_train=len(pairs["train"]),
        n_val=len(pairs["val"]),
        score_key="val_accuracy",
        clients=[traced.usage],  # the chain's own LM calls count in budgets too
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        max_cost=max_cost,
        revert_on_regression=revert_on_regression,
        progress=progress,
        root_dir=root_dir,
    )
    traced.write_back()
    report = outcome.report(before_prompts, traced.prompts())
    return chain, report
