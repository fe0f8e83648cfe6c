"""Pieces shared by the integrations' optimization loops (LangChain ``optimize``, DSPy
``AfnioTGD``): a dataset of indices, an agent that runs one step per split, and the
``model=`` a client needs (:func:`model_args`), settled before any LM call."""

from __future__ import annotations

import inspect
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from afnio.cognitive.modules.module import Module
from afnio.models.phases import LEDGER, PhaseRow
from afnio.trainer import Trainer
from afnio.utils.data import DataLoader, Dataset
from afnio_integrations._report import OptimizeReport

__all__ = [
    "IndexDataset",
    "LoopOutcome",
    "SplitAgent",
    "client_model",
    "model_args",
    "needs_model",
    "parameter_feedback",
    "train_agent",
]


class IndexDataset(Dataset):
    """``n`` items, each ``(index, index)``: the loader batches indices and the agent
    looks the rows up (they can be any Python objects)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[int, int]:
        return index, index


class SplitAgent(Module):
    """A Trainer agent whose steps all run :meth:`_step` on a split (``"train"`` for
    training, ``"val"`` for validation and test) and whose optimizer is built by
    ``make_optimizer``."""

    def __init__(self, make_optimizer: Callable[[], Any]) -> None:
        super().__init__()
        object.__setattr__(self, "_make_optimizer", make_optimizer)

    def _step(self, batch: Any, split: str) -> dict[str, Any]:
        raise NotImplementedError  # abstract: every subclass defines its step

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._step(batch, "val")

    def configure_optimizers(self) -> Any:
        """The optimizer built by ``make_optimizer``; before each of its steps, the
        feedback its parameters received is kept (see :attr:`last_feedback`)."""
        optimizer = self._make_optimizer()
        object.__setattr__(self, "last_feedback", {})
        step = optimizer.step

        def step_keeping_feedback(*args: Any, **kwargs: Any) -> Any:
            feedback = parameter_feedback(optimizer)
            if feedback:
                object.__setattr__(self, "last_feedback", feedback)
            return step(*args, **kwargs)

        optimizer.step = step_keeping_feedback
        return optimizer


def parameter_feedback(optimizer: Any) -> dict[str, str]:
    """The feedback (the texts of ``.grad``, non-blank, joined by a blank line) each
    trainable parameter of ``optimizer`` holds, by the parameter's role; parameters
    without feedback are left out."""
    feedback: dict[str, str] = {}
    for group in getattr(optimizer, "param_groups", []):
        for param in group.get("params", []):
            if not getattr(param, "requires_grad", False):
                continue
            texts = [
                str(getattr(g, "data", g)).strip() for g in getattr(param, "grad", [])
            ]
            texts = [t for t in texts if t]
            if texts:
                role = str(getattr(param, "role", "") or "parameter")
                key, n = role, 2
                while key in feedback:
                    key, n = f"{role} ({n})", n + 1
                feedback[key] = "\n\n".join(texts)
    return feedback


@dataclass
class LoopOutcome:
    """What :func:`train_agent` measured."""

    score_before: float | None
    score_after: float | None  # None: stopped early, the last texts were not scored
    history: list[dict[str, Any]]
    calls: int
    tokens: int
    cost: float
    stopped_reason: str | None
    phases: list[PhaseRow]
    train_samples: int
    val_samples: int
    steps: int
    # the feedback the parameters held at the last optimizer step that had any
    last_feedback: dict[str, str] = field(default_factory=dict)

    def report(
        self,
        prompts_before: dict[str, str],
        prompts_after: dict[str, str],
        failed_samples: int = 0,
    ) -> OptimizeReport:
        """The run's :class:`OptimizeReport`, with the texts before and after."""
        return OptimizeReport(
            last_feedback=dict(self.last_feedback),
            score_before=self.score_before,
            score_after=self.score_after,
            prompts_before=prompts_before,
            prompts_after=prompts_after,
            history=self.history,
            calls=self.calls,
            tokens=self.tokens,
            cost=self.cost,
            stopped_reason=self.stopped_reason,
            failed_samples=failed_samples,
            phases=self.phases,
            train_samples=self.train_samples,
            val_samples=self.val_samples,
            steps=self.steps,
        )


def _calls_and_tokens(trainer: Trainer) -> tuple[int, int]:
    meter = trainer._meter
    if meter is None:
        return 0, 0
    rows = meter.per_client()
    return sum(r[3] for r in rows), sum(r[2] for r in rows)


def train_agent(
    agent: SplitAgent,
    *,
    n_train: int,
    n_val: int,
    score_key: str,
    clients: list[Any],
    epochs: int,
    batch_size: int,
    seed: int,
    max_cost: float | None,
    revert_on_regression: bool,
    progress: bool,
    root_dir: str | None,
) -> LoopOutcome:
    """Score the validation split, train with the Trainer, and measure the run.

    ``clients`` are metered besides the agent's own (a traced program's LM usage), so
    ``max_cost`` and the totals cover every LM call; the first validation counts in
    the budget and in the Trainer's run summary too (its figures are the report's).
    Metrics and checkpoints go to ``root_dir``, or to a new temporary
    folder with no checkpoints (never the current directory).
    """
    phase_start = LEDGER.snapshot()
    trainer = Trainer(
        max_epochs=epochs,
        enable_progress_bar=progress,
        enable_agent_summary=False,
        enable_run_summary=progress,  # progress=False: nothing on stdout
        # the bar shows the per-sample score users read (accuracy, score), not the
        # batch's summed score that the Trainer's loss is
        show_metrics=(score_key.removeprefix("val_"),),
        enable_checkpointing=root_dir is not None,
        default_root_dir=root_dir or tempfile.mkdtemp(prefix="afnio-optimize-"),
        max_cost=max_cost,
        revert_on_regression=revert_on_regression,
    )
    val_loader = DataLoader(IndexDataset(n_val), batch_size=max(1, n_val))
    train_loader = DataLoader(
        IndexDataset(n_train), batch_size=batch_size, shuffle=True, seed=seed
    )
    before = trainer.validate(agent, val_loader, llm_clients=clients).get(score_key)
    spent = trainer.total_cost
    calls_before, tokens_before = _calls_and_tokens(trainer)
    if trainer._meter is not None:  # fit's run summary counts the first validation
        trainer._summary_prior = (phase_start, trainer._meter.per_client())
    if max_cost is not None:
        trainer.max_cost = max(0.0, max_cost - spent)
    history = trainer.fit(agent, train_loader, val_loader, llm_clients=clients)
    calls, tokens = _calls_and_tokens(trainer)
    after = None
    if trainer.stopped_reason is None:
        after = history[-1].get(score_key) if history else before
    epochs_run = len(history)
    return LoopOutcome(
        train_samples=n_train * epochs_run,
        val_samples=n_val * (epochs_run + 1),
        steps=math.ceil(n_train / batch_size) * epochs_run,
        score_before=before,
        score_after=after,
        history=history,
        calls=calls_before + calls,
        tokens=tokens_before + tokens,
        cost=spent + trainer.total_cost,
        stopped_reason=trainer.stopped_reason,
        phases=LEDGER.since(phase_start),
        last_feedback=dict(getattr(agent, "last_feedback", {})),
    )


def needs_model(client: Any) -> bool:
    """Whether ``client.achat`` requires a ``model=`` argument (afnio's OpenAI
    clients do; the LangChain and DSPy adapters name their model themselves)."""
    try:
        params = inspect.signature(client.achat).parameters
    except (AttributeError, TypeError, ValueError):
        return False
    param = params.get("model")
    return (
        param is not None
        and param.default is inspect.Parameter.empty
        and param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD)
    )


def client_model(client: Any) -> str | None:
    """The model ``client`` already names, if any: a backward-client singleton's
    ``model``, a LangChain chat model's ``model_name``/``model``, a DSPy LM's
    ``model``, or a ``model``/``model_name`` string attribute of the client."""
    from afnio._model_client import ModelClientSingleton

    if isinstance(client, ModelClientSingleton):
        name = client._completion_args.get("model") or client._model
        return name if isinstance(name, str) and name else None
    candidates = [client, getattr(client, "model", None), getattr(client, "lm", None)]
    for owner in candidates:
        for attr in ("model_name", "model"):
            name = getattr(owner, attr, None)
            if isinstance(name, str) and name:
                return name
    return None


def model_args(
    client: Any,
    args: dict[str, Any],
    *,
    what: str,
    default: str | None = None,
    how: str,
) -> dict[str, Any]:
    """``args`` with a ``model`` when ``client`` needs one (:func:`needs_model`):
    ``args["model"]`` if given, else ``default`` (e.g. the backward client's model),
    else the model the client names itself (:func:`client_model`).

    Args:
        what: the client in a message (``"the optimizer client"``).
        how: what the user passes to name the model (``"model='gpt-4o-mini'"``).

    Raises:
        ValueError: the client needs a model and none was found (before any LM
            call).
    """
    args = dict(args)
    if args.get("model") is not None or not needs_model(client):
        return args
    model = default or client_model(client)
    if model is None:
        raise ValueError(
            f"{what} {client!r} needs a model name and none was given: pass {how} "
            "(no LM call was made)."
        )
    args["model"] = model
    return args
