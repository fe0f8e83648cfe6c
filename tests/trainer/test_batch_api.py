"""The provider's Batch API for large passes (issue 21, item 4).

``Trainer.validate/test/predict(..., batch_api=True)`` send the pass's chat calls as
one batch per round through ``/v1/files`` + ``/v1/batches``, map the results back by
``custom_id``, retry failed items in a new batch, price them at the batch rate of the
pricing table, and keep the batch ids in ``<root>/batch_api_state.json`` so that an
interrupted pass resumes polling instead of paying again. Everything runs on the live
simulator (loopback, deterministic polls): behaviour is proved by counters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest

from afnio.models import batch as batch_module
from afnio.models.batch import (
    BATCH_STATE_FILE,
    BatchFailed,
    BatchOptions,
    BatchRun,
    MemoryStore,
)
from afnio.models.openai import OpenAI
from afnio.models.pricing import get_batch_price, get_model_price
from afnio.testing import SIMULATOR_MODEL, Simulator
from afnio.trainer import Trainer
from afnio.utils.data import DataLoader
from benchmarks.resume_kills import MESSAGES, Messages
from examples.facility_support import SentimentClassifier
from tests.trainer import _batch_helpers
from tests.trainer._batch_helpers import FAST, RULES, SecondStage, quiet_trainer

sim, client = _batch_helpers.sim, _batch_helpers.client  # the fixtures


def _loader() -> DataLoader:
    return DataLoader(Messages(MESSAGES), batch_size=4)


def _trainer(root: Path) -> Trainer:
    return quiet_trainer(root, enable_checkpointing=False)


def _texts(outputs: list[Any]) -> list[Any]:
    return [None if o is None else o.data for o in outputs]


class _TwoStage(SecondStage, SentimentClassifier):
    """A second LM call that depends on the first one's answer (two rounds)."""

    def __init__(self, client: OpenAI) -> None:
        super().__init__(client, SIMULATOR_MODEL, RULES)


# -- the simulator --------------------------------------------------------------------


def _line(i: int, text: str) -> dict[str, Any]:
    return {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": SIMULATOR_MODEL,
            "messages": [
                {"role": "system", "content": RULES},
                {"role": "user", "content": text},
            ],
        },
    }


def test_simulator_batch_completes_after_the_configured_polls_with_sync_answers(
    sim: Simulator,
) -> None:
    sim.batch_polls = 3
    texts = [text for text, _ in MESSAGES[:5]]
    with openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0) as sdk:
        sync = [
            sdk.chat.completions.create(**_line(i, t)["body"])
            .choices[0]
            .message.content
            for i, t in enumerate(texts)
        ]
        data = "\n".join(json.dumps(_line(i, t)) for i, t in enumerate(texts))
        upload = sdk.files.create(file=("in.jsonl", data.encode()), purpose="batch")
        assert upload.purpose == "batch" and upload.bytes == len(data.encode())
        batch = sdk.batches.create(
            input_file_id=upload.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        statuses = [batch.status]
        while batch.status not in ("completed", "failed"):
            batch = sdk.batches.retrieve(batch.id)
            statuses.append(batch.status)
        out = sdk.files.content(batch.output_file_id).text
    assert statuses == ["validating", "in_progress", "in_progress", "completed"]
    assert batch.request_counts.completed == 5 and batch.error_file_id is None
    answers = {
        row["custom_id"]: row["response"]["body"]["choices"][0]["message"]["content"]
        for row in map(json.loads, out.splitlines())
    }
    assert [answers[f"req-{i}"] for i in range(5)] == sync
    assert sim.batches_created == 1


def test_simulator_fails_requested_lines_and_whole_batches(sim: Simulator) -> None:
    sim.fail_batch_lines("heater")
    sim.fail_next_batch("expired")
    texts = [text for text, _ in MESSAGES[:3]]
    data = "\n".join(json.dumps(_line(i, t)) for i, t in enumerate(texts)).encode()
    with openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0) as sdk:
        upload = sdk.files.create(file=("in.jsonl", data), purpose="batch")

        def run() -> Any:
            batch = sdk.batches.create(
                input_file_id=upload.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
            )
            return sdk.batches.retrieve(batch.id)

        expired = run()
        done = run()
        errors = sdk.files.content(done.error_file_id).text.splitlines()
        cancelled = sdk.batches.cancel(
            sdk.batches.create(
                input_file_id=upload.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
            ).id
        )
        assert cancelled.status == "cancelling"
        assert sdk.batches.retrieve(cancelled.id).status == "cancelled"
    assert expired.status == "expired" and expired.output_file_id is None
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
    assert [json.loads(e)["custom_id"] for e in errors] == ["req-1"]
    assert json.loads(errors[0])["response"]["status_code"] == 500


# -- the pricing table ----------------------------------------------------------------


def test_batch_price_comes_from_the_table_discount() -> None:
    for model in ("gpt-4o-mini", "gpt-5", SIMULATOR_MODEL):
        sync, batch = get_model_price(model), get_batch_price(model)
        assert sync is not None and batch is not None
        assert batch.input == pytest.approx(sync.input / 2)
        assert batch.output == pytest.approx(sync.output / 2)
    assert get_batch_price("no-such-model") is None


# -- the Trainer ----------------------------------------------------------------------


def test_batch_predict_equals_the_synchronous_pass_in_order(
    sim: Simulator, client: OpenAI, tmp_path: Path
) -> None:
    agent = SentimentClassifier(client, SIMULATOR_MODEL, RULES)
    sync = _texts(_trainer(tmp_path).predict(agent, _loader()))
    sync_calls = sim.stats.calls_by_endpoint.get("chat/completions", 0)
    sim.reset_stats()
    trainer = _trainer(tmp_path)
    batched = _texts(trainer.predict(agent, _loader(), batch_api=FAST))
    assert batched == sync
    assert len({label for batch in sync for label in batch}) == 3  # not all alike
    assert sync_calls == len(MESSAGES)
    assert sim.stats.calls_by_endpoint.get("chat/completions", 0) == 0
    assert sim.batches_created == 1  # every sample of every batch: one batch
    stats = trainer.last_batch_run.stats
    assert (stats.rounds, stats.lines_answered) == (1, len(MESSAGES))


def test_batch_validate_costs_the_table_batch_rate_of_the_synchronous_pass(
    sim: Simulator, client: OpenAI, tmp_path: Path
) -> None:
    agent = SentimentClassifier(client, SIMULATOR_MODEL, RULES)
    sync_trainer = _trainer(tmp_path)
    sync = sync_trainer.validate(agent, _loader())
    sync_calls = client.calls
    client.clear_usage()
    trainer = _trainer(tmp_path)
    batched = trainer.validate(agent, _loader(), batch_api=FAST)
    assert batched["val_accuracy"] == sync["val_accuracy"]
    assert batched["val_loss"] == sync["val_loss"]
    ratio = (
        get_batch_price(SIMULATOR_MODEL).input
        / get_model_price(  # type: ignore[union-attr]
            SIMULATOR_MODEL
        ).input
    )  # type: ignore[union-attr]
    assert ratio == 0.5
    assert batched["total_cost"] == pytest.approx(sync["total_cost"] * ratio)
    assert client.get_usage()["cost"]["amount"] == pytest.approx(batched["total_cost"])
    rows = trainer.phase_rows()
    assert sum(r.calls for r in rows) == sync_calls == len(MESSAGES)
    assert sum(r.cost for r in rows) == pytest.approx(batched["total_cost"])
    assert not (tmp_path / BATCH_STATE_FILE).exists()  # cleared when the pass ends


def test_a_failed_item_is_retried_in_a_new_batch(
    sim: Simulator, client: OpenAI, tmp_path: Path
) -> None:
    agent = SentimentClassifier(client, SIMULATOR_MODEL, RULES)
    sync = _texts(_trainer(tmp_path).predict(agent, _loader()))
    sim.fail_batch_lines("heater")  # one line of the first batch fails
    trainer = _trainer(tmp_path)
    batched = _texts(trainer.predict(agent, _loader(), batch_api=FAST))
    assert batched == sync
    assert sim.batches_created == 2
    stats = trainer.last_batch_run.stats
    assert (stats.lines_answered, stats.lines_failed) == (len(MESSAGES), 1)
    # the retry batch held the failed item only
    second = sorted(sim.batches.values(), key=lambda b: b["id"])
    assert sorted(b["request_counts"]["total"] for b in second) == [1, len(MESSAGES)]


def test_an_expired_batch_is_sent_again(
    sim: Simulator, client: OpenAI, tmp_path: Path
) -> None:
    agent = SentimentClassifier(client, SIMULATOR_MODEL, RULES)
    sim.fail_next_batch("expired")
    trainer = _trainer(tmp_path)
    out = trainer.test(agent, _loader(), batch_api=FAST)
    assert sim.batches_created == 2
    assert trainer.last_batch_run.stats.lines_answered == len(MESSAGES)
    assert out["test_accuracy"] > 0


def test_an_item_failing_every_attempt_raises_batch_failed(
    sim: Simulator, client: OpenAI, tmp_path: Path
) -> None:
    agent = SentimentClassifier(client, SIMULATOR_MODEL, RULES)
    sim.fail_batch_lines("heater", times=2)
    with pytest.raises(BatchFailed, match="max_attempts=2"):
        _trainer(tmp_path).predict(
            agent, _loader(), batch_api=BatchOptions(poll_interval=0, max_attempts=2)
        )
    assert sim.batches_created == 2
    state = json.loads((tmp_path / BATCH_STATE_FILE).read_text())["predict"]
    assert len(state["answers"]) == len(MESSAGES) - 1  # the paid answers are kept


def test_dependent_calls_take_one_batch_per_round(
    sim: Simulator, client: OpenAI, tmp_path: Path
) -> None:
    agent = _TwoStage(client)
    sync = _texts(_trainer(tmp_path).predict(agent, _loader()))
    trainer = _trainer(tmp_path)
    batched = _texts(trainer.predict(agent, _loader(), batch_api=FAST))
    assert batched == sync
    assert sim.batches_created == 2
    assert trainer.last_batch_run.stats.rounds == 2


def test_an_interrupted_validate_resumes_the_same_batch_without_paying_again(
    sim: Simulator,
    client: OpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    agent = SentimentClassifier(client, SIMULATOR_MODEL, RULES)
    sync = _trainer(tmp_path / "sync").validate(agent, _loader())
    client.clear_usage()
    sim.batch_polls = 3
    polls = []

    def interrupt(seconds: float) -> None:
        polls.append(seconds)
        raise KeyboardInterrupt

    monkeypatch.setattr(batch_module, "_sleep", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path).validate(agent, _loader(), batch_api=FAST)
    assert len(polls) == 1 and sim.batches_created == 1
    state = json.loads((tmp_path / BATCH_STATE_FILE).read_text())["validate"]
    [record] = state["batches"]
    assert record["status"] == "submitted"
    monkeypatch.undo()

    trainer = _trainer(tmp_path)  # a new process would build a new Trainer too
    result = trainer.validate(agent, _loader(), batch_api=FAST)
    assert sim.batches_created == 1  # 0 new submissions
    stats = trainer.last_batch_run.stats
    assert (stats.batches_submitted, stats.batches_resumed) == (0, 1)
    assert sim.batches[record["id"]]["status"] == "completed"
    assert result["val_accuracy"] == sync["val_accuracy"]
    assert result["total_cost"] == pytest.approx(sync["total_cost"] / 2)
    assert not (tmp_path / BATCH_STATE_FILE).exists()


def test_a_run_resumed_after_its_results_were_downloaded_pays_nothing_more(
    sim: Simulator, client: OpenAI
) -> None:
    """Round 1 downloaded, interrupted in round 2: the resumed run counts round 1's
    cost from the state (``prior_cost``) and never sends round 1 again."""
    agent = _TwoStage(client)
    store = MemoryStore()
    sim.batch_polls = 2
    calls = {"n": 0}

    def stop_in_round_two(seconds: float) -> None:
        calls["n"] += 1
        if sim.batches_created == 2:
            raise KeyboardInterrupt

    def sweep() -> Any:
        return _texts(Trainer.__new__(Trainer)._predict(agent, _loader()))

    original = batch_module._sleep
    batch_module._sleep = stop_in_round_two
    try:
        with pytest.raises(KeyboardInterrupt):
            BatchRun(store, FAST).run(sweep)
    finally:
        batch_module._sleep = original
    spent = client.get_usage()["cost"]["amount"]
    assert sim.batches_created == 2 and spent > 0
    run = BatchRun(store, FAST)
    run.run(sweep)
    assert sim.batches_created == 2
    assert run.stats.batches_resumed == 1 and run.stats.batches_submitted == 0
    assert run.prior_cost == pytest.approx(spent)


# -- dry-run estimates ----------------------------------------------------------------


def _shape() -> Any:
    from afnio.trainer.estimate import GraphShape

    return GraphShape(
        forward_calls=1,
        prompt_texts=(RULES,),
        parameters=(RULES,),
        inputs=tuple(text for text, _ in MESSAGES),
    )


def test_estimates_price_batch_passes_at_the_tables_batch_rate() -> None:
    from afnio.trainer.estimate import Assumptions, estimate, estimate_pass

    shape = _shape()
    sync = estimate_pass(shape, 2000, models="gpt-4o-mini")
    batch = estimate_pass(shape, 2000, models="gpt-4o-mini", batch_api=True)
    assert batch.calls == sync.calls == 2000
    assert batch.cost == pytest.approx(sync.cost / 2)
    # a run: only the validation passes go through the Batch API (no failures, so
    # the prompt does not grow and the run's validation is estimate_pass's)
    steady = Assumptions(failure_rate=0.0)
    kwargs: dict[str, Any] = {"n_train": 40, "n_val": 400, "batch_size": 8}
    run = estimate(shape, models="gpt-4o-mini", assumptions=steady, **kwargs)
    run_batch = estimate(
        shape, models="gpt-4o-mini", assumptions=steady, batch_api=True, **kwargs
    )
    validation = estimate_pass(shape, 400, models="gpt-4o-mini", assumptions=steady)
    assert run_batch.calls == run.calls
    assert run_batch.cost == pytest.approx(run.cost - validation.cost / 2)
    failing = estimate(shape, models="gpt-4o-mini", **kwargs)
    failing_batch = estimate(shape, models="gpt-4o-mini", batch_api=True, **kwargs)
    assert failing_batch.by_phase["backward"].cost == failing.by_phase["backward"].cost
    assert failing_batch.cost < failing.cost


def test_trainer_estimate_prices_validation_through_the_batch_api(
    client: OpenAI,
) -> None:
    agent = SentimentClassifier(client, SIMULATOR_MODEL, RULES)
    trainer = Trainer(max_epochs=1, enable_progress_bar=False)
    train, val = _loader(), _loader()
    sync = trainer.estimate(agent, train, val, models="gpt-4o-mini")
    batch = trainer.estimate(agent, train, val, models="gpt-4o-mini", batch_api=True)
    assert batch.calls == sync.calls
    assert batch.by_phase["forward"].cost < sync.by_phase["forward"].cost
