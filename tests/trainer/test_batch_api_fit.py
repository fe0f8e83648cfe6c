"""The Batch API inside ``Trainer.fit`` and around it (issue 21, item 4): validation
passes of a run through ``/v1/batches`` with the batch state in the checkpoint (an
interrupted run resumes polling the same batch), ``max_cost`` checked before a batch
is submitted, stale batches cancelled, exact cost sums, and the simulator CLI's
``--batch-polls``. Proved by counters on the live simulator."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import openai
import pytest

from afnio.models import batch as batch_module
from afnio.models.batch import BATCH_STATE_FILE, projected_cost
from afnio.models.openai import OpenAI
from afnio.serialization import load
from afnio.testing import SIMULATOR_MODEL, Simulator
from afnio.trainer import Trainer
from afnio.trainer.trainer import BudgetExceeded
from afnio.utils.data import DataLoader
from benchmarks.resume_kills import MESSAGES, Messages
from examples.facility_support import SentimentClassifier
from tests.trainer import _batch_helpers
from tests.trainer._batch_helpers import FAST, quiet_trainer, without_cost

REPO = Path(__file__).resolve().parents[2]
POLLS = ("--batch-polls", "3")
sim, client = _batch_helpers.sim, _batch_helpers.backward_client  # the fixtures


def _train() -> DataLoader:
    return DataLoader(Messages(MESSAGES[:4]), batch_size=4)  # one step


def _val(rows: list[tuple[str, str]] | None = None) -> DataLoader:
    return DataLoader(Messages(rows or MESSAGES[4:]), batch_size=4)


def _trainer(root: Path, **kwargs: Any) -> Trainer:
    return quiet_trainer(root, max_epochs=1, **kwargs)


@pytest.fixture
def interrupt_first_poll(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The first wait between two polls raises KeyboardInterrupt (Ctrl-C while a
    batch is polled); ``monkeypatch.undo()`` ends it."""
    polls: list[float] = []

    def interrupt(seconds: float) -> None:
        polls.append(seconds)
        raise KeyboardInterrupt

    monkeypatch.setattr(batch_module, "_sleep", interrupt)
    return polls


# -- fit ------------------------------------------------------------------------------


def test_fit_validates_through_the_batch_api_at_the_batch_price(
    sim: Simulator, client: OpenAI, tmp_path: Path
) -> None:
    sync = _trainer(tmp_path / "sync")
    sync_history = sync.fit(SentimentClassifier(client, SIMULATOR_MODEL), *_loaders())
    sync_chat = sim.stats.calls_by_endpoint["chat/completions"]
    sim.reset_stats()
    trainer = _trainer(tmp_path / "batch")
    history = trainer.fit(
        SentimentClassifier(client, SIMULATOR_MODEL), *_loaders(), batch_api=FAST
    )
    assert sim.batches_created == 1
    stats = trainer.last_batch_run.stats
    assert (stats.batches_submitted, stats.lines_answered) == (1, len(MESSAGES[4:]))
    # training stays synchronous: every chat request but the validation's was made
    chat = sim.stats.calls_by_endpoint["chat/completions"]
    assert chat == sync_chat - len(MESSAGES[4:])
    [row], [sync_row] = history, sync_history
    assert without_cost(row) == without_cost(sync_row)
    # the same run, its validation paid at half the price (batch_discount 0.5):
    # the synchronous validation cost twice what the batch's lines cost
    assert stats.cost > 0
    assert row["total_cost"] == pytest.approx(sync_row["total_cost"] - stats.cost)
    assert trainer.total_cost == pytest.approx(row["total_cost"])


def _loaders() -> tuple[DataLoader, DataLoader]:
    return _train(), _val()


def test_a_fit_interrupted_while_polling_resumes_the_batch_from_its_checkpoint(
    sim: Simulator,
    client: OpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reference = _trainer(tmp_path / "ref")
    expected = reference.fit(
        SentimentClassifier(client, SIMULATOR_MODEL), *_loaders(), batch_api=FAST
    )
    assert sim.batches_created == 1
    polls: list[float] = []

    def interrupt(seconds: float) -> None:  # Ctrl-C while the batch is polled
        polls.append(seconds)
        raise KeyboardInterrupt

    monkeypatch.setattr(batch_module, "_sleep", interrupt)
    sim.batch_polls = 3  # the batch is still in progress at the first poll
    root = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _trainer(root).fit(
            SentimentClassifier(client, SIMULATOR_MODEL), *_loaders(), batch_api=FAST
        )
    assert len(polls) == 1
    assert sim.batches_created == 2
    last = _trainer(root).last_checkpoint_path()
    assert last.name == "checkpoint_batch_api.hf"
    checkpoint = load(last)
    [record] = checkpoint["batch_api_state"]["batches"]
    assert record["status"] == "submitted"
    assert sim.batches[record["id"]]["status"] == "in_progress"
    assert checkpoint["batch"] == 0  # the position of the last batch checkpoint
    monkeypatch.undo()

    trainer = _trainer(root)  # a new process: a new Trainer and agent
    agent = SentimentClassifier(client, SIMULATOR_MODEL)
    history = trainer.fit(agent, *_loaders(), ckpt_path="last", batch_api=FAST)
    assert sim.batches_created == 2  # 0 new submissions
    stats = trainer.last_batch_run.stats
    assert (stats.batches_submitted, stats.batches_resumed) == (0, 1)
    assert stats.lines_answered == len(MESSAGES[4:])
    assert sim.batches[record["id"]]["status"] == "completed"
    assert without_cost(history[-1]) == without_cost(expected[-1])
    # the training step paid before the interruption and the batch paid once
    assert history[-1]["total_cost"] == pytest.approx(expected[-1]["total_cost"])
    assert _trainer(root).last_checkpoint_path().name == "checkpoint_epoch1.hf"


def test_fit_revert_checks_go_through_the_batch_api_too(
    sim: Simulator, client: OpenAI, tmp_path: Path
) -> None:
    sync = _trainer(tmp_path / "sync", revert_on_regression=True)
    sync_history = sync.fit(SentimentClassifier(client, SIMULATOR_MODEL), *_loaders())
    trainer = _trainer(tmp_path / "batch", revert_on_regression=True)
    history = trainer.fit(
        SentimentClassifier(client, SIMULATOR_MODEL), *_loaders(), batch_api=FAST
    )
    assert sim.batches_created == 2  # the step's revert check and the epoch's pass
    strip = ("total_cost",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in history] == [
        {k: v for k, v in r.items() if k not in strip} for r in sync_history
    ]
    assert not (tmp_path / "batch" / BATCH_STATE_FILE).exists()  # cleared


# -- max_cost -------------------------------------------------------------------------


def _spy_budget(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float, int]]:
    """Record ``(spent, projected, requests)`` at every Batch API budget check."""
    seen: list[tuple[float, float, int]] = []
    check = Trainer._check_batch_budget

    def spy(self: Trainer, projected: float, requests: int, prior: float = 0.0) -> None:
        seen.append((self._cost() + prior, projected, requests))
        check(self, projected, requests, prior)

    monkeypatch.setattr(Trainer, "_check_batch_budget", spy)
    return seen


def test_validate_refuses_a_batch_whose_projected_cost_exceeds_max_cost(
    sim: Simulator, client: OpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = SentimentClassifier(client, SIMULATOR_MODEL)
    seen = _spy_budget(monkeypatch)
    _trainer(tmp_path / "free").validate(agent, _val(), batch_api=FAST)
    [(spent, projected, requests)] = seen
    assert spent == 0 and requests == len(MESSAGES[4:]) and projected > 0
    assert sim.batches_created == 1
    sim.reset_stats()

    root = tmp_path / "tight"
    with pytest.raises(BudgetExceeded, match=r"Batch API batch.*nothing was submitted"):
        _trainer(root, max_cost=projected * 0.99).validate(
            agent, _val(), batch_api=FAST
        )
    assert sim.batches_created == 1  # nothing submitted...
    assert sim.stats.calls_by_endpoint.get("files", 0) == 0  # ...nor uploaded
    assert sim.stats.calls_by_endpoint.get("chat/completions", 0) == 0
    assert not (root / BATCH_STATE_FILE).exists()

    result = _trainer(root, max_cost=projected * 1.01).validate(
        agent, _val(), batch_api=FAST
    )
    assert sim.batches_created == 2 and result["total_cost"] <= projected


def test_fit_stops_before_a_validation_batch_that_would_exceed_max_cost(
    sim: Simulator, client: OpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _spy_budget(monkeypatch)
    _trainer(tmp_path / "free").fit(
        SentimentClassifier(client, SIMULATOR_MODEL), *_loaders(), batch_api=FAST
    )
    [(spent, projected, _)] = seen  # the training step's cost, the batch's projection
    assert spent > 0 and sim.batches_created == 1
    trainer = _trainer(tmp_path / "tight", max_cost=spent + projected / 2)
    history = trainer.fit(
        SentimentClassifier(client, SIMULATOR_MODEL), *_loaders(), batch_api=FAST
    )
    assert sim.batches_created == 1  # the validation batch was never submitted
    assert history == []  # the epoch did not end
    assert trainer.stopped_reason is not None
    assert "Batch API batch" in trainer.stopped_reason
    assert trainer.total_cost == pytest.approx(spent)  # the training step only


def test_projected_cost_prices_the_prompt_and_the_answer_bound_at_batch_prices() -> (
    None
):
    from afnio.models.pricing import get_batch_price

    body = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "x" * 400},  # 100 tokens + 3
            {"role": "user", "content": [{"type": "text", "text": "y" * 40}]},  # 10+3
        ],
    }
    price = get_batch_price("gpt-4o-mini")
    assert price is not None
    default = projected_cost(body, answer_tokens=50)
    assert default == pytest.approx((116 * price.input + 50 * price.output) / 1e6)
    bounded = projected_cost({**body, "max_completion_tokens": 7})
    assert bounded == pytest.approx((116 * price.input + 7 * price.output) / 1e6)
    assert projected_cost({**body, "model": "no-such-model"}) == 0.0


# -- stale batches --------------------------------------------------------------------


def test_a_stale_batch_is_cancelled_and_logged(
    sim: Simulator,
    client: OpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    interrupt_first_poll: list[float],
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = SentimentClassifier(client, SIMULATOR_MODEL)
    sim.batch_polls = 3
    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path).validate(agent, _val(), batch_api=FAST)
    state = json.loads((tmp_path / BATCH_STATE_FILE).read_text())["validate"]
    [old] = state["batches"]
    monkeypatch.undo()
    # the data changed: the submitted batch holds none of the requests made now
    trainer = _trainer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="afnio.models"):
        trainer.validate(agent, _val(MESSAGES[:4]), batch_api=FAST)
    # cancel was called, and the batch waited for until it ended (to account it)
    assert sim.batches[old["id"]]["status"] == "cancelled"
    stats = trainer.last_batch_run.stats
    assert (stats.batches_cancelled, stats.batches_resumed) == (1, 0)
    assert stats.batches_submitted == 1 and sim.batches_created == 2
    assert any(
        old["id"] in r.getMessage() and "cancelled it" in r.getMessage()
        for r in caplog.records
    )


# -- exact cost sums ------------------------------------------------------------------


def test_batch_lines_add_to_the_clients_exact_cost_total_in_any_order(
    sim: Simulator,
) -> None:
    """Batch lines and synchronous answers share the client's exact running total:
    the cost does not depend on the order lines are accounted in (float ``+=``
    gives 0.6000040000000001 one way and 0.600004 the other)."""
    costs = [0.1, 0.2, 0.3]
    usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    totals = []
    for order in (costs, costs[::-1]):
        with OpenAI(base_url=sim.base_url, api_key="sk-test") as c:
            for cost in order:  # a "cost" in a line's usage is never *set*
                batch_module._account(c, {**usage, "cost": {"amount": 99.0}}, cost)
            sync = c.update_usage(usage, SIMULATOR_MODEL)  # then a synchronous one
            assert sync is not None
            got = c.get_usage()
            assert c.calls == 3 and got["total_tokens"] == 4 * 6
            assert got["cost"]["amount"] == float(
                sum(map(Fraction, order)) + Fraction(sync)
            )
            totals.append(got["cost"]["amount"])
    assert totals[0] == totals[1]


# -- the simulator's command line -----------------------------------------------------


def test_serve_batch_polls_option_finishes_a_batch_at_that_poll(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from afnio.testing.__main__ import main

    assert main(["serve", "--port", "0", "--batch-polls", "0"]) == 2
    assert "batch_polls" in capsys.readouterr().err
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "afnio.testing", "serve", "--port", "0", *POLLS],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().rsplit(" ", 1)[-1].strip()
        line = {
            "custom_id": "a",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": SIMULATOR_MODEL,
                "messages": [{"role": "user", "content": "hi"}],
            },
        }
        with openai.OpenAI(base_url=base_url, api_key="x", max_retries=0) as sdk:
            upload = sdk.files.create(
                file=("in.jsonl", json.dumps(line).encode()), purpose="batch"
            )
            batch = sdk.batches.create(
                input_file_id=upload.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
            )
            statuses = [sdk.batches.retrieve(batch.id).status for _ in range(3)]
        assert statuses == ["in_progress", "in_progress", "completed"]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        if proc.stdout is not None:
            proc.stdout.close()
