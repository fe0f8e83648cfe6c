"""The Trainer counts each model client's cost once (issue 18, item 7).

Upstream's README passes ``llm_clients=[fw, afnio.get_backward_model_client(), optim]``:
the backward singleton reports the usage of the client it wraps, which the Trainer
also meters itself. ``total_cost`` must equal the per-phase ledger, and a
``max_cost`` above what the run really spends must not stop it. Runs on the live
simulator (loopback, deterministic), as tests/trainer/test_trainer.py does."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

import afnio
from afnio._model_client import ModelClientSingleton
from afnio.models.model import ChatCompletionModel
from afnio.models.openai import OpenAI
from afnio.optim import TGD
from afnio.testing import SIMULATOR_MODEL, Simulator
from afnio.trainer import Trainer
from afnio.trainer.trainer import _CostMeter
from afnio.utils.data import DataLoader
from benchmarks.common import simulated
from benchmarks.resume_kills import MESSAGES, Messages
from examples.facility_support import SentimentClassifier


class _SplitClients(SentimentClassifier):
    """Forward calls on one client, optimizer calls on another (upstream's README:
    ``fw`` for the agent, ``optim`` for TGD, the backward client set globally)."""

    def __init__(self, forward: OpenAI, optimizer: OpenAI) -> None:
        super().__init__(forward, SIMULATOR_MODEL)
        object.__setattr__(self, "_optimizer_client", optimizer)

    def configure_optimizers(self) -> TGD:
        return TGD(
            [self.system_prompt],
            model_client=self._optimizer_client,
            **self.completion_args,
        )


def _loaders() -> tuple[DataLoader, DataLoader]:
    train = DataLoader(Messages(MESSAGES[:8]), batch_size=4, shuffle=True, seed=3)
    val = DataLoader(Messages(MESSAGES[8:]), batch_size=4)
    return train, val


def _trainer(root: Path, **kwargs: Any) -> Trainer:
    return Trainer(
        max_epochs=2,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_agent_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )


def _ledger_cost(trainer: Trainer) -> float:
    return sum(row.cost for row in trainer.phase_rows())


@pytest.fixture
def three_clients() -> Iterator[tuple[OpenAI, OpenAI, OpenAI]]:
    """``fw``, ``bw`` (afnio's backward client) and ``optim`` on one simulator."""
    with Simulator() as sim, ExitStack() as stack:
        fw, bw, optim = (
            stack.enter_context(
                OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0)
            )
            for _ in range(3)
        )
        afnio.set_backward_model_client(bw, completion_args={"model": SIMULATOR_MODEL})
        yield fw, bw, optim


def test_upstream_llm_clients_pattern_counts_the_backward_client_once(
    three_clients: tuple[OpenAI, OpenAI, OpenAI], tmp_path: Path
) -> None:
    fw, bw, optim = three_clients
    agent = _SplitClients(fw, optim)
    train, val = _loaders()
    trainer = _trainer(tmp_path)
    history = trainer.fit(
        agent,
        train,
        val,
        llm_clients=[fw, afnio.get_backward_model_client(), optim],
    )
    phases = {row.phase for row in trainer.phase_rows()}
    assert {"forward", "backward", "optimizer"} <= phases
    assert bw.get_usage()["cost"]["amount"] > 0  # the backward client did work
    assert trainer.total_cost == pytest.approx(_ledger_cost(trainer), rel=1e-9)
    assert history[-1]["total_cost"] == pytest.approx(trainer.total_cost, rel=1e-9)
    assert trainer._meter is not None
    metered = [client for client, *_ in trainer._meter.per_client()]
    assert len(metered) == 3
    assert {id(c) for c in metered} == {id(fw), id(bw), id(optim)}
    calls = sum(row[3] for row in trainer._meter.per_client())
    assert calls == sum(row.calls for row in trainer.phase_rows())


def test_max_cost_above_the_real_spend_does_not_stop_the_upstream_pattern_early(
    three_clients: tuple[OpenAI, OpenAI, OpenAI], tmp_path: Path
) -> None:
    fw, _, optim = three_clients
    clients = [fw, afnio.get_backward_model_client(), optim]
    train, val = _loaders()
    free = _trainer(tmp_path / "free")
    free.fit(_SplitClients(fw, optim), train, val, llm_clients=clients)
    spent = _ledger_cost(free)
    assert free.stopped_reason is None and spent > 0
    # room for the whole run: before each unit of work the Trainer checks that the
    # most expensive unit so far still fits, so the budget is what the run spends
    # plus one such unit (and a little); the backward calls counted twice (the
    # singleton beside the client it wraps) would overrun it
    largest_unit = max(free._max_step_cost, free._max_eval_cost)
    assert 0 < largest_unit < free.total_cost
    budget = spent + largest_unit * 1.1
    train, val = _loaders()
    budgeted = _trainer(tmp_path / "budget", max_cost=budget)
    history = budgeted.fit(_SplitClients(fw, optim), train, val, llm_clients=clients)
    assert budgeted.stopped_reason is None, budgeted.stopped_reason
    assert [row["epoch"] for row in history] == [1, 2]
    assert budgeted.total_cost == pytest.approx(_ledger_cost(budgeted), rel=1e-9)
    assert budgeted.total_cost == pytest.approx(spent, rel=1e-6)


def test_one_client_everywhere_passed_twice_and_wrapped_is_counted_once(
    tmp_path: Path,
) -> None:
    # the agent's model is also the optimizer's and the backward client
    with simulated() as (_, client):
        agent = SentimentClassifier(client, SIMULATOR_MODEL)
        train, val = _loaders()
        trainer = _trainer(tmp_path)
        trainer.fit(
            agent,
            train,
            val,
            llm_clients=[client, client, afnio.get_backward_model_client()],
        )
        assert trainer.total_cost == pytest.approx(_ledger_cost(trainer), rel=1e-9)
        assert trainer._meter is not None
        assert [c for c, *_ in trainer._meter.per_client()] == [client]
        result = trainer.validate(
            agent, val, llm_clients=[afnio.get_backward_model_client(), client]
        )
        assert result["total_cost"] == pytest.approx(_ledger_cost(trainer), rel=1e-9)
        assert result["total_cost"] > 0


class _FakeClient(ChatCompletionModel):
    """A client that charges a fixed price per call, without HTTP."""

    def __init__(self, price: float) -> None:
        super().__init__(provider="fake")
        self.price = price

    def update_usage(self, usage: Any, model_name: str | None = None) -> float | None:
        self._usage["total_tokens"] = self._usage.get("total_tokens", 0) + usage
        self._usage["cost"]["amount"] += self.price
        return self.price

    def chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        self.calls += 1
        self.update_usage(10, "fake-model")
        return "ok"

    async def achat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        return self.chat(messages, **kwargs)


def test_cost_meter_unwraps_the_backward_singleton_and_dedupes_by_identity() -> None:
    inner, other = _FakeClient(0.5), _FakeClient(0.25)
    wrapper = ModelClientSingleton()
    wrapper._client = inner
    meter = _CostMeter([wrapper, inner, other, other, None, "not a client"])
    assert meter.clients == [inner, other]
    wrapper.chat([{"role": "user", "content": "hi"}])  # through the wrapper
    inner.chat([{"role": "user", "content": "hi"}])
    other.chat([{"role": "user", "content": "hi"}])
    assert meter.cost() == pytest.approx(1.25)
    rows = {
        id(c): (cost, tokens, calls) for c, cost, tokens, calls in meter.per_client()
    }
    assert rows[id(inner)] == (pytest.approx(1.0), 20, 2)
    assert rows[id(other)] == (pytest.approx(0.25), 10, 1)
