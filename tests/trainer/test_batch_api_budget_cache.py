"""The Batch API with the response cache and ``max_cost`` (issue 21 review, items 6
and 7).

* A chat call whose answer is in the response cache is answered from it during a
  Batch API pass: not collected, not batched, not paid (no usage, no cost, no
  ``calls``), exactly as a synchronous cache hit. The answers a batch maps back are
  stored in the cache, under the key a synchronous call uses, so a later pass
  (synchronous or batched) pays nothing more.
* The calls a Batch API round makes synchronously (``embed``/``complete``, other
  clients) are checked against ``max_cost`` before each batch of the pass: a pass
  that has spent past it stops with ``BudgetExceeded``.

Everything runs on the live simulator; behaviour is proved by counters (requests,
batches, cache hits), never by timings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from afnio.models import batch as batch_module
from afnio.models import disable_cache, enable_cache, get_cache
from afnio.models.batch import BATCH_STATE_FILE
from afnio.models.openai import OpenAI
from afnio.testing import SIMULATOR_MODEL, Simulator
from afnio.trainer import Trainer
from afnio.trainer.trainer import BudgetExceeded
from afnio.utils.data import DataLoader
from benchmarks.resume_kills import MESSAGES, Messages
from examples.facility_support import SentimentClassifier
from tests.trainer import _batch_helpers
from tests.trainer._batch_helpers import FAST, RULES, SecondStage, quiet_trainer

sim, client = _batch_helpers.sim, _batch_helpers.client  # fixtures
backward_client = _batch_helpers.backward_client  # a fixture

BATCHES = 3  # MESSAGES in batches of 4


def _loader(rows: list[tuple[str, str]] | None = None) -> DataLoader:
    return DataLoader(Messages(rows or MESSAGES), batch_size=4)


def _trainer(root: Path, **kwargs: Any) -> Trainer:
    return quiet_trainer(root, enable_checkpointing=False, **kwargs)


def _texts(outputs: list[Any]) -> list[Any]:
    return [None if o is None else o.data for o in outputs]


def _chat_requests(sim: Simulator) -> int:
    return sim.stats.calls_by_endpoint.get("chat/completions", 0)


def _embed_requests(sim: Simulator) -> int:
    return sim.stats.calls_by_endpoint.get("embeddings", 0)


def _batch_lines(sim: Simulator) -> int:
    """Requests sent in every batch the simulator ran (paid at the batch price)."""
    return sum(b["request_counts"]["total"] for b in sim.batches.values())


class _TwoStage(SecondStage, SentimentClassifier):
    """A second LM call that depends on the first one's answer (two rounds)."""

    def __init__(self, client: OpenAI) -> None:
        super().__init__(client, SIMULATOR_MODEL, RULES)


class _Embedding(SentimentClassifier):
    """Each validation/test step first embeds its messages synchronously (as a
    retriever would), then classifies them with a (batched) chat call."""

    def _step(self, batch: Any) -> dict[str, Any]:
        emails = batch[0]
        self.client.embed(list(emails.data), model=SIMULATOR_MODEL)
        return super()._step(batch)

    def predict_step(self, batch: Any, batch_idx: int) -> list[list[float]]:
        """Only synchronous calls: no chat call to batch at all."""
        return self.client.embed(list(batch[0].data), model=SIMULATOR_MODEL)


class _TwoStageEmbedding(SecondStage, _Embedding):
    """:class:`_Embedding` with a second, dependent chat call (two rounds)."""

    def __init__(self, client: OpenAI) -> None:
        super().__init__(client, SIMULATOR_MODEL, RULES)


# -- item 6: the response cache -------------------------------------------------------


def test_a_cached_chat_is_answered_from_the_cache_and_never_batched_or_paid(
    sim: Simulator, client: OpenAI, tmp_path: Path
) -> None:
    cache = enable_cache()
    agent = SentimentClassifier(client, SIMULATOR_MODEL, RULES)
    sync = _trainer(tmp_path).validate(agent, _loader())
    assert _chat_requests(sim) == len(MESSAGES) and cache.misses == len(MESSAGES)
    client.clear_usage()
    sim.reset_stats()
    calls = client.calls

    trainer = _trainer(tmp_path)
    batched = trainer.validate(agent, _loader(), batch_api=FAST)
    assert batched["val_accuracy"] == sync["val_accuracy"]
    assert sim.batches_created == 0  # nothing batched...
    assert sim.stats.calls_by_endpoint.get("files", 0) == 0  # ...nor uploaded
    assert _chat_requests(sim) == 0
    # accounted as a synchronous cache hit is: no calls, no usage, no cost
    assert client.calls == calls and batched["total_cost"] == 0
    assert client.get_usage()["cost"]["amount"] == 0
    assert sum(r.calls for r in trainer.phase_rows()) == 0
    assert cache.hits == len(MESSAGES) and cache.misses == len(MESSAGES)
    assert trainer.last_batch_run.stats.rounds == 0


def test_only_the_uncached_chats_are_batched_and_paid(
    sim: Simulator, client: OpenAI, tmp_path: Path
) -> None:
    agent = SentimentClassifier(client, SIMULATOR_MODEL, RULES)
    rest = MESSAGES[4:]  # the requests the cache will not hold
    _trainer(tmp_path).predict(agent, _loader(rest))
    rest_sync_cost = client.get_usage()["cost"]["amount"]
    full = _trainer(tmp_path).validate(agent, _loader())
    cache = enable_cache()
    _trainer(tmp_path).predict(agent, _loader(MESSAGES[:4]))  # 4 answers cached
    assert cache.misses == 4
    client.clear_usage()
    sim.reset_stats()
    calls = client.calls

    trainer = _trainer(tmp_path)
    batched = trainer.validate(agent, _loader(), batch_api=FAST)
    assert batched["val_accuracy"] == full["val_accuracy"]
    assert sim.batches_created == 1 and _batch_lines(sim) == len(rest)
    assert _chat_requests(sim) == 0
    assert client.calls - calls == len(rest)
    assert sum(r.calls for r in trainer.phase_rows()) == len(rest)
    # the batch price of the uncached requests only
    assert batched["total_cost"] == pytest.approx(rest_sync_cost / 2)
    assert cache.hits == 4 and cache.misses == 4 + len(rest)


def test_batch_answers_are_stored_in_the_cache_so_later_passes_pay_nothing(
    sim: Simulator, client: OpenAI, tmp_path: Path
) -> None:
    cache = enable_cache()
    agent = _TwoStage(client)  # two rounds: the first round's answers re-asked
    trainer = _trainer(tmp_path)
    batched = _texts(trainer.predict(agent, _loader(), batch_api=FAST))
    assert sim.batches_created == 2 and trainer.last_batch_run.stats.rounds == 2
    paid = _batch_lines(sim)
    # each paid request is one miss, once per pass (not once per round)
    assert cache.misses == paid and cache.hits == 0
    assert get_cache() is cache and cache.stats().entries == paid

    sync = _texts(_trainer(tmp_path).predict(agent, _loader()))
    assert sync == batched
    assert _chat_requests(sim) == 0  # every synchronous call was a hit
    again = _trainer(tmp_path)
    assert _texts(again.predict(agent, _loader(), batch_api=FAST)) == batched
    assert sim.batches_created == 2  # no new batch
    assert again.last_batch_run.stats.rounds == 0
    assert cache.misses == paid


def test_batch_answers_persist_in_a_cache_file_for_the_next_process(
    sim: Simulator, client: OpenAI, tmp_path: Path
) -> None:
    path = tmp_path / "lm.sqlite"
    enable_cache(path)
    agent = SentimentClassifier(client, SIMULATOR_MODEL, RULES)
    batched = _trainer(tmp_path).validate(agent, _loader(), batch_api=FAST)
    assert sim.batches_created == 1
    disable_cache()  # writes the file; a new process would open it again
    cache = enable_cache(path)
    client.clear_usage()
    calls = client.calls

    sync = _trainer(tmp_path).validate(agent, _loader())
    assert _chat_requests(sim) == 0 and client.calls == calls
    assert sync["val_accuracy"] == batched["val_accuracy"]
    assert sync["total_cost"] == 0
    assert cache.hits == len(MESSAGES) and cache.misses == 0
    disable_cache()
    cache = enable_cache(path)
    _trainer(tmp_path).validate(agent, _loader(), batch_api=FAST)
    assert sim.batches_created == 1  # the file answered the batched pass too
    assert cache.hits == len(MESSAGES) and cache.misses == 0


# -- item 7: max_cost and the synchronous calls of a round ----------------------------


def _embed_costs(sim: Simulator, client: OpenAI) -> list[float]:
    """The cost of the synchronous embedding of each batch of :func:`_loader`
    (measured, then forgotten: usage and simulator counters start from zero)."""
    costs = []
    for start in range(0, len(MESSAGES), 4):
        before = client.get_usage()["cost"]["amount"]
        texts = [text for text, _ in MESSAGES[start : start + 4]]
        client.embed(texts, model=SIMULATOR_MODEL)
        costs.append(client.get_usage()["cost"]["amount"] - before)
    assert len(costs) == BATCHES and min(costs) > 0
    client.clear_usage()
    sim.reset_stats()
    return costs


def test_a_batch_api_validate_stops_once_its_synchronous_calls_pass_max_cost(
    sim: Simulator, client: OpenAI, tmp_path: Path
) -> None:
    costs = _embed_costs(sim, client)
    agent = _Embedding(client, SIMULATOR_MODEL, RULES)
    trainer = _trainer(tmp_path, max_cost=costs[0] + costs[1] / 2)
    with pytest.raises(BudgetExceeded, match=r"max_cost.*synchronously"):
        trainer.validate(agent, _loader(), batch_api=FAST)
    # batches 0 and 1 embedded (then past max_cost), batch 2 never ran
    assert _embed_requests(sim) == 2
    assert sim.batches_created == 0 and _chat_requests(sim) == 0


def test_a_batch_api_predict_of_synchronous_calls_only_is_held_to_max_cost(
    sim: Simulator, client: OpenAI, tmp_path: Path
) -> None:
    """No chat call is collected, so no batch is ever priced: without a check of
    the spend, the pass goes past max_cost unnoticed."""
    costs = _embed_costs(sim, client)
    agent = _Embedding(client, SIMULATOR_MODEL, RULES)
    trainer = _trainer(tmp_path, max_cost=costs[0] + costs[1] / 2)
    with pytest.raises(BudgetExceeded, match=r"max_cost.*synchronously"):
        trainer.predict(agent, _loader(), batch_api=FAST)
    assert _embed_requests(sim) == 2
    assert client.get_usage()["cost"]["amount"] == pytest.approx(costs[0] + costs[1])
    # with room for the whole pass it completes
    sim.reset_stats()
    roomy = _trainer(tmp_path, max_cost=sum(costs) + costs[0] / 2)
    assert len(roomy.predict(agent, _loader(), batch_api=FAST)) == BATCHES
    assert _embed_requests(sim) == BATCHES and sim.batches_created == 0


def test_a_standalone_pass_counts_what_its_interrupted_call_paid(
    sim: Simulator, client: OpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resumed validate counts the batch cost its interrupted call accounted (the
    state's cost) in what the pass spent, as the check before a batch does."""
    costs = _embed_costs(sim, client)
    agent = _TwoStageEmbedding(client)

    def stop_in_round_two(seconds: float) -> None:
        if sim.batches_created == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(batch_module, "_sleep", stop_in_round_two)
    sim.batch_polls = 2
    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path).validate(agent, _loader(), batch_api=FAST)
    state = json.loads((tmp_path / BATCH_STATE_FILE).read_text())["validate"]
    prior = state["cost"]  # round 1's batch, accounted before the interrupt
    assert sim.batches_created == 2 and prior > costs[0]
    monkeypatch.undo()
    client.clear_usage()
    sim.reset_stats()

    # this call may spend half of batch 0's embedding on top of the prior batch
    trainer = _trainer(tmp_path, max_cost=prior + costs[0] / 2)
    with pytest.raises(BudgetExceeded, match=r"max_cost.*synchronously"):
        trainer.validate(agent, _loader(), batch_api=FAST)
    assert _embed_requests(sim) == 1  # batch 0's; batch 1 was stopped


def test_fit_stops_when_a_batch_api_validation_spends_past_max_cost_synchronously(
    sim: Simulator, backward_client: OpenAI, tmp_path: Path
) -> None:
    client = backward_client
    costs = _embed_costs(sim, client)
    train = DataLoader(Messages(MESSAGES[:4]), batch_size=4)  # one step

    def trainer(name: str, **kwargs: Any) -> Trainer:
        return quiet_trainer(tmp_path / name, max_epochs=1, **kwargs)

    step = trainer("step")  # the training step alone, no validation
    step.fit(_Embedding(client, SIMULATOR_MODEL, RULES), train, batch_api=FAST)
    assert step.total_cost > 0
    sim.reset_stats()

    # room for the step and the first validation batch's embedding only
    tight = trainer("tight", max_cost=step.total_cost + costs[0] / 2)
    history = tight.fit(
        _Embedding(client, SIMULATOR_MODEL, RULES), train, _loader(), batch_api=FAST
    )
    assert history == [] and tight.stopped_reason is not None
    assert "synchronously" in tight.stopped_reason
    assert sim.batches_created == 0  # the validation batch was never submitted
    # the step's embedding and validation batch 0's; batches 1 and 2 never ran
    assert _embed_requests(sim) == 2


def test_a_saved_batch_resumes_when_every_call_of_the_pass_is_a_cache_hit(
    sim: Simulator, client: OpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    enable_cache()
    agent = SentimentClassifier(client, SIMULATOR_MODEL, RULES)

    def interrupted(self: Any, *args: Any) -> Any:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(batch_module.BatchRun, "_wait", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _trainer(tmp_path).validate(agent, _loader(), batch_api=FAST)
    assert sim.batches_created == 1  # submitted, then interrupted while polling
    sync = _trainer(tmp_path).validate(agent, _loader())  # fills the cache
    # every call of the resumed pass is a cache hit: the saved batch is still
    # matched to its client (not BatchClientNotFound), settled and its lines paid
    trainer = _trainer(tmp_path)
    resumed = trainer.validate(agent, _loader(), batch_api=FAST)
    assert resumed["val_accuracy"] == sync["val_accuracy"]
    assert sim.batches_created == 1  # nothing sent again
    # the simulator had not started it (no poll yet): cancelled, nothing billed
    assert trainer.last_batch_run.stats.batches_cancelled == 1
    assert [b["status"] for b in sim.batches.values()] == ["cancelled"]
    assert trainer.last_batch_run.stats.stale_lines == 0
    assert not (tmp_path / BATCH_STATE_FILE).exists() or not json.loads(
        (tmp_path / BATCH_STATE_FILE).read_text()
    ).get("validation", {}).get("batches")
