"""Batch API recovery and accounting (the issue-21 review, items 1-5 and 10).

Every interruption window of a pass through ``/v1/batches`` must keep "paid once,
counted once": a download interrupted midway counts each line once (client usage,
the phase ledger and so a fit's spend log, ``total_cost``); a batch created by a
``batches.create`` whose id was never saved is found again with ``batches.list``
instead of being sent twice; a stale batch the provider billed is accounted; the
state holds no URL password; a resumed batch is polled by the client (URL and
account) that submitted it; polling has an overall deadline. Proved by counters on
the live simulator; interruptions are simulated by raising inside the loops."""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import openai
import pytest
from openai.resources.batches import AsyncBatches

from afnio._secrets import mask_url
from afnio.models import batch as batch_module
from afnio.models.batch import (
    BATCH_STATE_FILE,
    NONCE_KEY,
    BatchClientNotFound,
    BatchDeferred,
    BatchOptions,
    BatchRun,
    BatchTimeout,
    MemoryStore,
)
from afnio.models.openai import OpenAI
from afnio.models.phases import LEDGER, PhaseRow
from afnio.models.pricing import batch_cost_of
from afnio.testing import SIMULATOR_MODEL, Simulator
from afnio.trainer import Trainer
from afnio.utils.data import DataLoader
from benchmarks.resume_kills import MESSAGES, Messages
from examples.facility_support import SentimentClassifier
from tests.trainer import _batch_helpers
from tests.trainer._batch_helpers import FAST, RULES, quiet_trainer

sim, client = _batch_helpers.sim, _batch_helpers.client  # fixtures
backward_client = _batch_helpers.backward_client  # a fixture

VAL = MESSAGES[4:]
"""The validation rows (one request each)."""


def _val(rows: list[tuple[str, str]] | None = None) -> DataLoader:
    return DataLoader(Messages(rows or VAL), batch_size=4)


def _texts(rows: list[tuple[str, str]]) -> list[str]:
    return [text for text, _ in rows]


def _ask(pairs: list[tuple[OpenAI, str]]) -> Any:
    """A sweep: one chat call per ``(client, message)``, each collected (or
    answered) independently, so one round collects them all."""

    def sweep() -> list[str | None]:
        answers: list[str | None] = []
        for c, text in pairs:
            try:
                answers.append(
                    c.chat(
                        [
                            {"role": "system", "content": RULES},
                            {"role": "user", "content": text},
                        ],
                        model=SIMULATOR_MODEL,
                    )
                )
            except BatchDeferred:
                answers.append(None)
        return answers

    return sweep


def _cost(c: OpenAI) -> float:
    return float((c.get_usage().get("cost") or {}).get("amount") or 0.0)


def _batch_cost(sim: Simulator, batch_id: str) -> tuple[float, int]:
    """What a completed simulated batch's output lines cost at the batch price, and
    how many there are."""
    output = sim.batches[batch_id]["output_file_id"]
    with openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0) as sdk:
        text = sdk.files.content(output).text
    lines = [json.loads(raw) for raw in text.splitlines() if raw.strip()]
    cost = sum(
        batch_cost_of(line["response"]["body"]["usage"], SIMULATOR_MODEL)
        for line in lines
    )
    return cost, len(lines)


def _finish_at_the_provider(sim: Simulator, batch_id: str) -> None:
    """Poll a simulated batch (as the provider's clock would) until it ends."""
    with openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0) as sdk:
        while sdk.batches.retrieve(batch_id).status not in batch_module.TERMINAL:
            pass


@pytest.fixture
def ledger_rows() -> Iterator[list[PhaseRow]]:
    """Every row the phase ledger records during the test (what a fit's spend log
    writes)."""
    rows: list[PhaseRow] = []
    unsubscribe = LEDGER.subscribe(rows.append)
    try:
        yield rows
    finally:
        unsubscribe()


def _interrupt_accounting_after(
    monkeypatch: pytest.MonkeyPatch, lines: int
) -> list[int]:
    """Ctrl-C while the output file is read: the line after ``lines`` accounted
    ones raises KeyboardInterrupt (``monkeypatch.undo()`` ends it)."""
    seen = [0]
    price = batch_module.batch_cost_of

    def interrupting(*args: Any, **kwargs: Any) -> float:
        seen[0] += 1
        if seen[0] > lines:
            raise KeyboardInterrupt
        return price(*args, **kwargs)

    monkeypatch.setattr(batch_module, "batch_cost_of", interrupting)
    return seen


def _interrupt_first_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the first wait between two polls."""

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(batch_module, "_sleep", interrupt)


# -- item 1: a download interrupted midway counts each line once ----------------------


def test_a_download_interrupted_midway_accounts_each_line_once(
    sim: Simulator,
    client: OpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    ledger_rows: list[PhaseRow],
) -> None:
    agent = SentimentClassifier(client, SIMULATOR_MODEL)
    with OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as ref:
        expected = quiet_trainer(tmp_path / "ref").validate(
            SentimentClassifier(ref, SIMULATOR_MODEL), _val(), batch_api=FAST
        )
        reference_cost = _cost(ref)
    assert reference_cost > 0 and len(ledger_rows) == len(VAL)
    ledger_rows.clear()

    _interrupt_accounting_after(monkeypatch, 2)
    root = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        quiet_trainer(root).validate(agent, _val(), batch_api=FAST)
    assert client.calls == 2  # two lines were accounted before the Ctrl-C
    state = json.loads((root / BATCH_STATE_FILE).read_text())["validate"]
    [record] = state["batches"]
    monkeypatch.undo()

    trainer = quiet_trainer(root)
    result = trainer.validate(agent, _val(), batch_api=FAST)
    assert sim.batches_created == 2  # the reference's and this pass's: none again
    # every line counted once: the client, the phase ledger (the spend log)...
    assert client.calls == len(VAL)
    assert _cost(client) == pytest.approx(reference_cost)
    assert len(ledger_rows) == len(VAL)
    assert sum(r.cost for r in ledger_rows) == pytest.approx(reference_cost)
    # ...and the pass's total (what the interrupted call counted, plus the rest)
    assert trainer.last_batch_run.stats.lines_answered == len(VAL) - 2
    assert result["val_accuracy"] == expected["val_accuracy"]
    assert result["total_cost"] == pytest.approx(expected["total_cost"])
    assert not (root / BATCH_STATE_FILE).exists()
    # what the interrupted call saved: the lines it had accounted
    assert record["status"] == "submitted" and len(record.get("accounted", [])) == 2


def test_a_fit_interrupted_while_reading_the_output_totals_each_line_once(
    sim: Simulator,
    backward_client: OpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fit's spend log holds the lines the interrupted process accounted: the
    resumed run must not count them a second time (``total_cost``, ``max_cost``)."""
    train = DataLoader(Messages(MESSAGES[:4]), batch_size=4)

    def trainer(root: Path) -> Trainer:
        return quiet_trainer(root, max_epochs=1)

    expected = trainer(tmp_path / "ref").fit(
        SentimentClassifier(backward_client, SIMULATOR_MODEL),
        train,
        _val(),
        batch_api=FAST,
    )
    _interrupt_accounting_after(monkeypatch, 2)
    root = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        trainer(root).fit(
            SentimentClassifier(backward_client, SIMULATOR_MODEL),
            train,
            _val(),
            batch_api=FAST,
        )
    monkeypatch.undo()
    resumed = trainer(root)
    history = resumed.fit(
        SentimentClassifier(backward_client, SIMULATOR_MODEL),
        train,
        _val(),
        ckpt_path="last",
        batch_api=FAST,
    )
    assert sim.batches_created == 2  # the reference's and the run's: none again
    assert history[-1]["val_accuracy"] == expected[-1]["val_accuracy"]
    assert history[-1]["total_cost"] == pytest.approx(expected[-1]["total_cost"])
    assert resumed.total_cost == pytest.approx(expected[-1]["total_cost"])
    assert resumed.last_batch_run.stats.lines_answered == len(VAL) - 2


# -- item 2: a batch whose id was never saved is found, not sent again ----------------


class _InterruptOnSubmitted(MemoryStore):
    """A store whose first save of a ``"submitted"`` record raises KeyboardInterrupt
    before keeping it: Ctrl-C between ``batches.create`` answering and the state
    being saved."""

    def __init__(self) -> None:
        super().__init__("pass")
        self.armed = True

    def save(self, entry: Any) -> None:
        if self.armed and any(
            b.get("status") == "submitted" for b in entry.get("batches", [])
        ):
            self.armed = False
            raise KeyboardInterrupt
        super().save(entry)


def test_a_batch_created_before_its_id_was_saved_is_found_not_sent_again(
    sim: Simulator, client: OpenAI
) -> None:
    pairs = [(client, text) for text in _texts(VAL)]
    store = _InterruptOnSubmitted()
    with pytest.raises(KeyboardInterrupt):
        BatchRun(store, FAST).run(_ask(pairs))
    assert sim.batches_created == 1  # the provider runs (and bills) it
    [batch] = sim.batches.values()
    run = BatchRun(store, FAST)
    answers = run.run(_ask(pairs))
    assert sim.batches_created == 1  # found with batches.list: not sent again
    assert (batch["metadata"] or {}).get(NONCE_KEY)  # the nonce it was found by
    assert (run.stats.batches_recovered, run.stats.batches_submitted) == (1, 0)
    assert None not in answers and len(answers) == len(VAL)
    assert client.calls == len(VAL)
    assert _cost(client) == pytest.approx(_batch_cost(sim, batch["id"])[0])


def test_a_create_call_lost_after_reaching_the_server_is_not_paid_twice(
    sim: Simulator, client: OpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    create = AsyncBatches.create

    async def lost_answer(self: AsyncBatches, **kwargs: Any) -> Any:
        await create(self, **kwargs)  # the server created it...
        raise RuntimeError("connection reset")  # ...the answer never came back

    monkeypatch.setattr(AsyncBatches, "create", lost_answer)
    pairs = [(client, text) for text in _texts(VAL)]
    store = MemoryStore()
    with pytest.raises(RuntimeError, match="connection reset"):
        BatchRun(store, FAST).run(_ask(pairs))
    monkeypatch.undo()
    assert sim.batches_created == 1
    run = BatchRun(store, FAST)
    assert None not in run.run(_ask(pairs))
    assert sim.batches_created == 1
    assert run.stats.batches_recovered == 1
    assert client.calls == len(VAL)


def test_a_create_call_that_never_reached_the_server_is_sent_once_on_resume(
    sim: Simulator, client: OpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refused(self: AsyncBatches, **kwargs: Any) -> Any:
        raise RuntimeError("connection refused")

    monkeypatch.setattr(AsyncBatches, "create", refused)
    pairs = [(client, text) for text in _texts(VAL)]
    store = MemoryStore()
    with pytest.raises(RuntimeError, match="connection refused"):
        BatchRun(store, FAST).run(_ask(pairs))
    [record] = store.load()["batches"]
    assert record["status"] == "creating" and record["input_file_id"]
    monkeypatch.undo()
    assert sim.batches_created == 0
    run = BatchRun(store, FAST)
    assert None not in run.run(_ask(pairs))
    assert sim.batches_created == 1
    assert (run.stats.batches_recovered, run.stats.batches_submitted) == (0, 1)


# -- item 3: stale batches the provider billed are accounted --------------------------


def _interrupted_validate(
    root: Path, agent: Any, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """A validate over ``VAL`` interrupted at its first poll (the batch in
    progress); the saved record."""
    sim.batch_polls = 3
    _interrupt_first_poll(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        quiet_trainer(root).validate(agent, _val(), batch_api=FAST)
    monkeypatch.undo()
    [record] = json.loads((root / BATCH_STATE_FILE).read_text())["validate"]["batches"]
    return record


@pytest.mark.parametrize("cancel", ["accepted", "refused"])
def test_a_stale_batch_that_already_ended_is_accounted_at_the_batch_price(
    sim: Simulator,
    client: OpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cancel: str,
) -> None:
    """The batch completed at the provider (billed) before a later run found it
    stale: a cancel that the provider answers without effect or refuses (OpenAI
    refuses to cancel an ended batch) must not hide its cost."""
    agent = SentimentClassifier(client, SIMULATOR_MODEL)
    old = _interrupted_validate(tmp_path, agent, sim, monkeypatch)
    _finish_at_the_provider(sim, old["id"])
    stale_cost, stale_lines = _batch_cost(sim, old["id"])
    assert stale_cost > 0 and stale_lines == len(VAL)
    if cancel == "refused":

        async def refuse(self: AsyncBatches, batch_id: str, **kwargs: Any) -> Any:
            raise RuntimeError(
                f"Cannot cancel a batch with status 'completed' {batch_id}"
            )

        monkeypatch.setattr(AsyncBatches, "cancel", refuse)
    sim.batch_polls = 1
    trainer = quiet_trainer(tmp_path)
    rows = MESSAGES[:4]  # the data changed: the old batch is stale
    result = trainer.validate(agent, _val(rows), batch_api=FAST)
    run = trainer.last_batch_run
    new_cost, _ = _batch_cost(sim, run.stats.batch_ids[0])
    # what the provider billed for the stale batch is in every total
    assert result["total_cost"] == pytest.approx(stale_cost + new_cost)
    assert _cost(client) == pytest.approx(stale_cost + new_cost)
    assert client.calls == stale_lines + len(rows)
    assert run.stats.stale_lines == stale_lines
    assert run.stats.lines_answered == len(rows)  # its answers are not used
    assert sim.batches_created == 2


def test_a_stale_batch_cancelled_in_progress_is_waited_for_until_it_ends(
    sim: Simulator, client: OpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = SentimentClassifier(client, SIMULATOR_MODEL)
    old = _interrupted_validate(tmp_path, agent, sim, monkeypatch)
    trainer = quiet_trainer(tmp_path)
    trainer.validate(agent, _val(MESSAGES[:4]), batch_api=FAST)
    assert sim.batches[old["id"]]["status"] == "cancelled"  # polled to its end
    assert trainer.last_batch_run.stats.batches_cancelled == 1
    assert trainer.last_batch_run.stats.stale_lines == 0  # nothing billed


def test_a_stale_batch_that_does_not_end_in_cancel_timeout_is_logged_unaccounted(
    sim: Simulator,
    client: OpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = SentimentClassifier(client, SIMULATOR_MODEL)
    old = _interrupted_validate(tmp_path, agent, sim, monkeypatch)

    async def refuse(self: AsyncBatches, batch_id: str, **kwargs: Any) -> Any:
        raise RuntimeError("cancel is not supported here")

    monkeypatch.setattr(AsyncBatches, "cancel", refuse)
    sim.batch_polls = 1  # the new batch ends at its first poll; the old one runs on
    trainer = quiet_trainer(tmp_path)
    options = BatchOptions(poll_interval=0, cancel_timeout=0)
    with caplog.at_level(logging.WARNING, logger="afnio.models"):
        result = trainer.validate(agent, _val(MESSAGES[:4]), batch_api=options)
    assert sim.batches[old["id"]]["status"] == "in_progress"  # never waited out
    assert trainer.last_batch_run.stats.stale_lines == 0
    assert result["total_cost"] == pytest.approx(_cost(client))  # the pass ran on
    assert any(
        old["id"] in r.getMessage() and "NOT counted" in r.getMessage()
        for r in caplog.records
    )


# -- item 4: no URL password in the state or the logs ---------------------------------


def _with_password(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"me:s3cret-pw@{parts.netloc}"))


def test_the_state_and_logs_hold_the_masked_url_never_its_password(
    sim: Simulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = _with_password(sim.base_url)
    with OpenAI(
        base_url=url, api_key="sk-test", max_retries=0, transport="httpx"
    ) as c:  # (aiohttp refuses credentials in a URL; httpx sends them)
        agent = SentimentClassifier(c, SIMULATOR_MODEL)
        with caplog.at_level(logging.DEBUG, logger="afnio"):
            record = _interrupted_validate(tmp_path, agent, sim, monkeypatch)
            text = (tmp_path / BATCH_STATE_FILE).read_text()
            assert "s3cret-pw" not in text
            assert record["base_url"] == mask_url(str(c.client.base_url))
            assert "<redacted>" in record["base_url"]
            # a stale batch is logged with the masked form too
            trainer = quiet_trainer(tmp_path)
            trainer.validate(agent, _val(MESSAGES[:4]), batch_api=FAST)
        assert trainer.last_batch_run.stats.batches_cancelled == 1
    assert not any("s3cret-pw" in r.getMessage() for r in caplog.records)


def test_an_older_state_with_the_raw_url_still_resumes_its_batch(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = _with_password(sim.base_url)
    with OpenAI(
        base_url=url, api_key="sk-test", max_retries=0, transport="httpx"
    ) as c:  # (aiohttp refuses credentials in a URL; httpx sends them)
        agent = SentimentClassifier(c, SIMULATOR_MODEL)
        _interrupted_validate(tmp_path, agent, sim, monkeypatch)
        path = tmp_path / BATCH_STATE_FILE
        data = json.loads(path.read_text())
        for record in data["validate"]["batches"]:  # as an older afnio wrote it
            record["base_url"] = str(c.client.base_url)
            for name in ("client", "nonce", "input_file_id", "accounted"):
                record.pop(name, None)
        path.write_text(json.dumps(data))
        trainer = quiet_trainer(tmp_path)
        trainer.validate(agent, _val(), batch_api=FAST)
        stats = trainer.last_batch_run.stats
        assert (stats.batches_resumed, stats.batches_submitted) == (1, 0)
        assert stats.lines_answered == len(VAL) and sim.batches_created == 1


# -- item 5: a resumed batch is polled by the client that submitted it ----------------


def test_two_clients_on_one_url_each_resume_and_pay_for_their_own_batch(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = _texts(VAL)
    half = len(texts) // 2

    def clients() -> tuple[OpenAI, OpenAI]:
        return (
            OpenAI(base_url=sim.base_url, api_key="sk-forward", max_retries=0),
            OpenAI(base_url=sim.base_url, api_key="sk-judge", max_retries=0),
        )

    def pairs(a: OpenAI, b: OpenAI) -> list[tuple[OpenAI, str]]:
        return [(a, t) for t in texts[:half]] + [(b, t) for t in texts[half:]]

    a0, b0 = clients()
    BatchRun(MemoryStore(), FAST).run(_ask(pairs(a0, b0)))
    expected = (_cost(a0), a0.calls, _cost(b0), b0.calls)
    assert expected[1] == half and expected[3] == len(texts) - half

    store = MemoryStore()
    sim.batch_polls = 3
    _interrupt_first_poll(monkeypatch)
    a1, b1 = clients()
    with pytest.raises(KeyboardInterrupt):
        BatchRun(store, FAST).run(_ask(pairs(a1, b1)))
    monkeypatch.undo()
    records = store.load()["batches"]
    assert [r["status"] for r in records] == ["submitted", "submitted"]

    a2, b2 = clients()  # a new process
    run = BatchRun(store, FAST)
    run.run(_ask(pairs(a2, b2)))
    assert run.stats.batches_resumed == 2 and sim.batches_created == 4
    assert (_cost(a2), a2.calls, _cost(b2), b2.calls) == pytest.approx(expected)
    # same URL, two accounts: two client refs (hashes, no key)
    assert records[0].get("client") != records[1].get("client")
    assert "sk-forward" not in json.dumps(records)
    for c in (a0, b0, a1, b1, a2, b2):
        c.close()


def test_a_saved_batch_no_client_matches_raises_a_clear_error(
    sim: Simulator, client: OpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = MemoryStore()
    sim.batch_polls = 3
    _interrupt_first_poll(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        BatchRun(store, FAST).run(_ask([(client, t) for t in _texts(VAL)]))
    monkeypatch.undo()
    [record] = store.load()["batches"]
    with OpenAI(base_url=sim.base_url, api_key="sk-other", max_retries=0) as other:
        sweep = _ask([(other, t) for t in _texts(MESSAGES[:2])])
        with pytest.raises(BatchClientNotFound) as error:
            BatchRun(store, FAST).run(sweep)
        message = str(error.value)
        assert record["id"] in message and "abandon_unmatched" in message
        assert "another API key" in message
        assert store.load()["batches"][0]["status"] == "submitted"  # kept
        assert sim.batches_created == 1  # nothing sent before the error
        run = BatchRun(store, BatchOptions(poll_interval=0, abandon_unmatched=True))
        assert None not in run.run(sweep)
        assert sim.batches_created == 2 and run.stats.batches_cancelled == 0


# -- item 10: polling has an overall deadline -----------------------------------------


def test_polling_stops_at_poll_timeout_and_the_pass_resumes_without_paying_again(
    sim: Simulator, client: OpenAI, tmp_path: Path
) -> None:
    agent = SentimentClassifier(client, SIMULATOR_MODEL)
    sim.batch_polls = 3
    options = BatchOptions(poll_interval=0, poll_timeout=0)
    with pytest.raises(BatchTimeout, match="poll_timeout"):
        quiet_trainer(tmp_path).validate(agent, _val(), batch_api=options)
    [record] = json.loads((tmp_path / BATCH_STATE_FILE).read_text())["validate"][
        "batches"
    ]
    assert record["status"] == "submitted"
    trainer = quiet_trainer(tmp_path)
    trainer.validate(agent, _val(), batch_api=FAST)
    stats = trainer.last_batch_run.stats
    assert (stats.batches_resumed, stats.batches_submitted) == (1, 0)
    assert sim.batches_created == 1 and client.calls == len(VAL)


def test_batch_options_check_the_new_fields() -> None:
    assert BatchOptions().poll_timeout == 25 * 3600
    for bad in ({"poll_timeout": -1}, {"cancel_timeout": True}):
        with pytest.raises(ValueError, match="seconds >= 0 or None"):
            BatchOptions(**bad)
    with pytest.raises(ValueError, match=NONCE_KEY):
        BatchOptions(metadata={NONCE_KEY: "x"})
    assert BatchOptions(poll_timeout=None).poll_timeout is None


def test_a_ctrl_c_inside_a_lines_bookkeeping_counts_that_line_once(
    sim: Simulator,
    client: OpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    ledger_rows: list[PhaseRow],
) -> None:
    """A real SIGINT between the client's usage and the ledger row of one line is
    held off to the end of that line's bookkeeping: no half-counted line."""
    agent = SentimentClassifier(client, SIMULATOR_MODEL)
    account = batch_module._account
    seen = [0]

    def interrupted_midway(*args: Any, **kwargs: Any) -> None:
        account(*args, **kwargs)  # the client has counted the line...
        seen[0] += 1
        if seen[0] == 2:  # ...and Ctrl-C comes before the ledger and the record
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(batch_module, "_account", interrupted_midway)
    root = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        quiet_trainer(root).validate(agent, _val(), batch_api=FAST)
    monkeypatch.undo()
    [record] = json.loads((root / BATCH_STATE_FILE).read_text())["validate"]["batches"]
    # the interrupted line was counted whole, everywhere, and saved as counted
    assert client.calls == len(ledger_rows) == len(record["accounted"]) == 2

    quiet_trainer(root).validate(agent, _val(), batch_api=FAST)
    assert client.calls == len(ledger_rows) == len(VAL)
    assert sim.batches_created == 1
