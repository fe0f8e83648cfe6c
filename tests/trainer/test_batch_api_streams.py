"""Batch API passes over loaders whose order changes from one epoch to the next
(issue 21, items 4 and 5 together).

A pass through the Batch API runs in rounds: the pass runs, its chat calls are
collected and sent as a batch, and it runs again with the answers. Every round must
see the same samples in the same order, yet each iteration of a shuffling
``JsonlDataset`` stream (or of a ``RandomSampler``) is a new epoch in a new order.
The Trainer rewinds the loader to the start of the pass's epoch before every round
(:class:`afnio.models.batch.ReplayLoader`), and a ``fit`` keeps the validation
stream's position in its checkpoints (``val_data_state``), so that:

* every round of a pass sees exactly the batches of the first (recorded here batch by
  batch), the pass needs one batch per round of dependent calls and no more (even
  when a request depends on which samples share a batch), and its metrics and
  predictions equal the synchronous pass's;
* after the pass the loader stands where a synchronous pass leaves it (its next
  epoch is the synchronous run's next epoch);
* a ``fit`` over a streaming train loader and a streaming validation loader gives
  the synchronous fit's history, and one interrupted while its second validation
  batch is polled resumes from ``checkpoint_batch_api.hf`` with no new batch and the
  same history.

Everything runs on the live simulator: behaviour is proved by counters and by the
batches each round saw."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import afnio
from afnio.models import batch as batch_module
from afnio.models.batch import BatchFailed, BatchOptions, ReplayLoader
from afnio.models.openai import OpenAI
from afnio.serialization import load
from afnio.testing import SIMULATOR_MODEL, Simulator
from afnio.trainer import Trainer
from afnio.utils.data import DataLoader, JsonlDataset
from benchmarks.resume_kills import MESSAGES, Messages
from examples.facility_support import SentimentClassifier
from tests.trainer import _batch_helpers
from tests.trainer._batch_helpers import FAST, SecondStage, quiet_trainer, without_cost
from tests.trainer._batch_helpers import RULES as BASE_RULES

RULES = (
    f"{BASE_RULES} "
    'If the message mentions "grateful", the sentiment is positive. '
    'If the message mentions "delays", the sentiment is negative.'
)
TARGETS = ("urgency", "sentiment", "categories")
BATCH = 5  # 12 rows: batches of 5, 5 and 2, so the mean of the batch means
# depends on which samples share a batch


sim, client = _batch_helpers.sim, _batch_helpers.backward_client  # the fixtures


def _write_rows(path: Path, messages: list[tuple[str, str]]) -> Path:
    """``messages`` as JSONL rows (FacilitySupport's fields) in ``path``."""
    with open(path, "w", encoding="utf-8") as f:
        for text, label in messages:
            row = {"email": text, "urgency": "low", "sentiment": label}
            f.write(json.dumps({**row, "categories": "{}"}) + "\n")
    return path


@pytest.fixture
def rows(tmp_path: Path) -> Path:
    """The 12 support messages as JSONL rows (FacilitySupport's fields)."""
    return _write_rows(tmp_path / "messages.jsonl", MESSAGES)


def _stream(path: Path, seed: int = 3, buffer_size: int = 4) -> DataLoader:
    dataset = JsonlDataset(
        path,
        input="email",
        target=TARGETS,
        roles={"email": "input email or message"},
        buffer_size=buffer_size,
        seed=seed,
    )
    return DataLoader(dataset, batch_size=BATCH)


def _trainer(root: Path, **kwargs: Any) -> Trainer:
    return quiet_trainer(root, **{"enable_checkpointing": False, **kwargs})


def _batches(loader: Any) -> list[list[str]]:
    """One epoch of ``loader``: the messages of each batch."""
    return [list(emails.data) for emails, _ in loader]


def _strip(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [without_cost(row) for row in history]


class _Recording(SentimentClassifier):
    """The sentiment classifier (one LM call per sample) recording the messages of
    every batch each run of a pass sees, in order (``seen``: one entry per batch,
    rounds of a Batch API pass included)."""

    def __init__(self, client: OpenAI) -> None:
        super().__init__(client, SIMULATOR_MODEL, RULES)
        object.__setattr__(self, "seen", [])

    def forward(self, emails: afnio.Variable) -> afnio.Variable:
        self.seen.append(list(emails.data))
        return super().forward(emails)


class _PerBatchPrompt(_Recording):
    """One LM call per batch, its prompt holding every message of the batch: the
    requests depend on which samples share a batch (a batch-level program)."""

    def forward(self, emails: afnio.Variable) -> afnio.Variable:
        self.seen.append(list(emails.data))
        joined = afnio.Variable("\n".join(emails.data), role="input email or message")
        answer = SentimentClassifier.forward(self, joined)
        return afnio.Variable([answer.data] * len(emails.data), role="answers")


class _TwoStage(SecondStage, _Recording):
    """A second LM call that depends on the first one's answer (two rounds), as in
    tests/trainer/test_batch_api.py."""


def _requests(sim: Simulator, batch_ids: list[str]) -> list[int]:
    """The number of requests in each of these batches."""
    return [sim.batches[b]["request_counts"]["total"] for b in batch_ids]


def _runs(seen: list[list[str]], batches_per_run: int) -> list[list[list[str]]]:
    """``seen`` cut into the runs of a pass (every run goes over every batch)."""
    assert len(seen) % batches_per_run == 0
    return [seen[i : i + batches_per_run] for i in range(0, len(seen), batches_per_run)]


# -- the loader view ------------------------------------------------------------------


def test_replay_loader_gives_the_first_epoch_again_and_leaves_the_next_one(
    rows: Path,
) -> None:
    plain, replayed = _stream(rows), _stream(rows)
    first, second = _batches(plain), _batches(plain)
    assert first != second  # a shuffling stream: each epoch in a new order
    view = ReplayLoader(replayed)
    assert view.rewinds and len(view) == 3
    assert [_batches(view) for _ in range(3)] == [first] * 3
    # after the rounds the stream stands where one epoch leaves it
    assert _batches(replayed) == second
    assert replayed.state_dict()["batches"] == 0  # between epochs: none done


def test_replay_loader_rewinds_a_shuffling_sampler_too() -> None:
    plain = DataLoader(Messages(MESSAGES), batch_size=BATCH, shuffle=True, seed=1)
    replayed = DataLoader(Messages(MESSAGES), batch_size=BATCH, shuffle=True, seed=1)
    first, second = _batches(plain), _batches(plain)
    assert first != second
    view = ReplayLoader(replayed)
    assert [_batches(view) for _ in range(3)] == [first] * 3
    assert _batches(replayed) == second
    listed = ReplayLoader([1, 2, 3])  # a list gives the same items anyway
    assert not listed.rewinds and list(listed) == list(listed) == [1, 2, 3]


# -- standalone passes ----------------------------------------------------------------


def test_validate_over_a_shuffled_stream_equals_the_synchronous_pass_in_one_batch(
    sim: Simulator, client: OpenAI, rows: Path, tmp_path: Path
) -> None:
    sync_agent, sync_loader = _Recording(client), _stream(rows)
    expected = _trainer(tmp_path / "sync").validate(sync_agent, sync_loader)
    sim.reset_stats()

    agent, loader = _Recording(client), _stream(rows)
    trainer = _trainer(tmp_path / "batch")
    result = trainer.validate(agent, loader, batch_api=FAST)
    assert sim.batches_created == 1
    stats = trainer.last_batch_run.stats
    assert (stats.rounds, stats.batches_submitted) == (1, 1)
    assert (stats.batches_cancelled, stats.lines_failed) == (0, 0)
    assert stats.lines_answered == len(MESSAGES)
    assert sim.stats.calls_by_endpoint.get("chat/completions", 0) == 0
    # the collecting round and the final one saw the synchronous batches
    assert _runs(agent.seen, 3) == [sync_agent.seen] * 2
    assert without_cost(result) == without_cost(expected)
    # the next epoch is the synchronous run's next epoch
    assert _batches(loader) == _batches(sync_loader)


def test_predict_over_a_shuffled_stream_returns_the_synchronous_outputs_in_order(
    sim: Simulator, client: OpenAI, rows: Path, tmp_path: Path
) -> None:
    sync_agent = _PerBatchPrompt(client)
    expected = _trainer(tmp_path / "sync").predict(sync_agent, _stream(rows))
    agent = _PerBatchPrompt(client)
    trainer = _trainer(tmp_path / "batch")
    outputs = trainer.predict(agent, _stream(rows), batch_api=FAST)
    assert [o.data for o in outputs] == [o.data for o in expected]
    assert sim.batches_created == 1
    assert trainer.last_batch_run.stats.lines_answered == 3  # one call per batch
    assert _runs(agent.seen, 3) == [sync_agent.seen] * 2


def test_a_batch_level_program_over_a_shuffled_stream_needs_one_batch(
    sim: Simulator, client: OpenAI, rows: Path, tmp_path: Path
) -> None:
    """Its requests depend on which messages share a batch: a round over another
    grouping would collect other requests (a batch paid for nothing) every round
    and never converge."""
    sync_agent = _PerBatchPrompt(client)
    expected = _trainer(tmp_path / "sync").validate(sync_agent, _stream(rows))
    agent = _PerBatchPrompt(client)
    trainer = _trainer(tmp_path / "batch")
    options = BatchOptions(poll_interval=0, max_rounds=4)
    result = trainer.validate(agent, _stream(rows), batch_api=options)
    assert sim.batches_created == 1
    stats = trainer.last_batch_run.stats
    assert (stats.rounds, stats.batches_submitted, stats.batches_cancelled) == (1, 1, 0)
    assert stats.lines_answered == 3
    assert result["val_loss"] == expected["val_loss"]
    assert result["val_accuracy"] == expected["val_accuracy"]


def test_a_batch_level_program_over_a_shuffling_sampler_needs_one_batch(
    sim: Simulator, client: OpenAI, tmp_path: Path
) -> None:
    def shuffled() -> DataLoader:
        return DataLoader(Messages(MESSAGES), batch_size=BATCH, shuffle=True, seed=2)

    sync_loader = shuffled()
    expected = _trainer(tmp_path / "sync").validate(
        _PerBatchPrompt(client), sync_loader
    )
    agent, loader = _PerBatchPrompt(client), shuffled()
    trainer = _trainer(tmp_path / "batch")
    result = trainer.validate(
        agent, loader, batch_api=BatchOptions(poll_interval=0, max_rounds=4)
    )
    assert sim.batches_created == 1
    assert trainer.last_batch_run.stats.batches_submitted == 1
    assert result["val_accuracy"] == expected["val_accuracy"]
    assert _batches(loader) == _batches(sync_loader)  # the sampler moved once


def test_a_two_round_program_over_a_shuffled_stream_takes_two_batches(
    sim: Simulator, client: OpenAI, rows: Path, tmp_path: Path
) -> None:
    sync_agent, sync_loader = _TwoStage(client), _stream(rows)
    expected = _trainer(tmp_path / "sync").validate(sync_agent, sync_loader)
    agent, loader = _TwoStage(client), _stream(rows)
    trainer = _trainer(tmp_path / "batch")
    result = trainer.validate(agent, loader, batch_api=FAST)
    assert sim.batches_created == 2
    stats = trainer.last_batch_run.stats
    assert (stats.rounds, stats.batches_submitted, stats.batches_cancelled) == (2, 2, 0)
    assert stats.lines_failed == 0
    # every message in the first batch, the 3 labels it answered in the second
    assert _requests(sim, stats.batch_ids) == [len(MESSAGES), 3]
    # three runs of the pass (two collecting rounds and the final one), each over
    # the synchronous batches
    assert _runs(agent.seen, 3) == [sync_agent.seen] * 3
    assert without_cost(result) == without_cost(expected)
    assert _batches(loader) == _batches(sync_loader)


def test_a_two_round_batch_level_program_over_a_shuffled_stream_converges(
    sim: Simulator, client: OpenAI, rows: Path, tmp_path: Path
) -> None:
    class TwoStagePerBatch(_TwoStage):
        def forward(self, emails: afnio.Variable) -> afnio.Variable:
            self.seen.append(list(emails.data))
            joined = afnio.Variable("\n".join(emails.data), role="messages")
            first = SentimentClassifier.forward(self, joined)
            answer = self.second_stage(first)
            return afnio.Variable([answer.data] * len(emails.data), role="answers")

    sync_agent = TwoStagePerBatch(client)
    expected = _trainer(tmp_path / "sync").validate(sync_agent, _stream(rows))
    agent = TwoStagePerBatch(client)
    trainer = _trainer(tmp_path / "batch")
    options = BatchOptions(poll_interval=0, max_rounds=4)
    try:
        result = trainer.validate(agent, _stream(rows), batch_api=options)
    except BatchFailed as e:  # the old behaviour: a new grouping every round
        pytest.fail(f"the pass did not converge: {e}")
    assert sim.batches_created == 2
    first, second = _requests(sim, trainer.last_batch_run.stats.batch_ids)
    assert first == 3 and 1 <= second <= 3  # one request per batch and stage
    assert _runs(agent.seen, 3) == [sync_agent.seen] * 3
    assert result["val_accuracy"] == expected["val_accuracy"]


# -- fit ------------------------------------------------------------------------------


def _fit_loaders(train_rows: Path, val_rows: Path) -> tuple[DataLoader, DataLoader]:
    return _stream(train_rows, seed=5, buffer_size=3), _stream(val_rows, seed=7)


@pytest.fixture
def train_rows(tmp_path: Path) -> Path:
    return _write_rows(tmp_path / "train.jsonl", MESSAGES[:8])


def _fit_reference(
    client: OpenAI, root: Path, train_rows: Path, val_rows: Path
) -> tuple[_Recording, list[dict[str, Any]]]:
    """An uninterrupted synchronous fit of 2 epochs: its agent and history."""
    agent = _Recording(client)
    history = _trainer(root, max_epochs=2).fit(
        agent, *_fit_loaders(train_rows, val_rows)
    )
    return agent, history


class _Crash(Exception):
    pass


def _fit_until_crash(
    agent: _Recording, root: Path, train_rows: Path, val_rows: Path
) -> None:
    """A checkpointed fit of 2 epochs in ``root`` that ``agent`` stops with
    :class:`_Crash`."""
    with pytest.raises(Exception) as info:
        _trainer(root, max_epochs=2, enable_checkpointing=True).fit(
            agent, *_fit_loaders(train_rows, val_rows)
        )
    assert isinstance(info.value.__cause__ or info.value, _Crash)


def _resume(
    client: OpenAI, root: Path, train_rows: Path, val_rows: Path
) -> tuple[_Recording, list[dict[str, Any]]]:
    """The fit in ``root`` resumed from its last checkpoint by a new agent: the
    agent and the history."""
    agent = _Recording(client)
    history = _trainer(root, max_epochs=2, enable_checkpointing=True).fit(
        agent, *_fit_loaders(train_rows, val_rows), ckpt_path="last"
    )
    return agent, history


def test_fit_over_streams_through_the_batch_api_equals_the_synchronous_fit(
    sim: Simulator, client: OpenAI, rows: Path, train_rows: Path, tmp_path: Path
) -> None:
    sync_agent, expected = _fit_reference(client, tmp_path / "sync", train_rows, rows)
    sync_seen = list(sync_agent.seen)
    sim.reset_stats()

    agent = _Recording(client)
    trainer = _trainer(tmp_path / "batch", max_epochs=2, enable_checkpointing=True)
    history = trainer.fit(agent, *_fit_loaders(train_rows, rows), batch_api=FAST)
    assert sim.batches_created == 2  # one validation batch per epoch
    assert trainer.last_batch_run.stats.batches_cancelled == 0
    assert _strip(history) == _strip(expected)
    # epoch by epoch: 2 training batches, then the validation (3 batches; twice
    # through the Batch API: the collecting round and the final one)
    sync_epochs = [sync_seen[0:5], sync_seen[5:10]]
    epochs = [agent.seen[0:8], agent.seen[8:16]]
    assert len(agent.seen) == 16
    for got, want in zip(epochs, sync_epochs, strict=True):
        train, val = want[:2], want[2:]
        assert got == train + val + val
    # the two validations read two different epochs of the stream, as synchronously
    assert sync_epochs[0][2:] != sync_epochs[1][2:]


def test_a_fit_interrupted_while_its_second_validation_is_polled_resumes_exactly(
    sim: Simulator,
    client: OpenAI,
    rows: Path,
    train_rows: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reference, expected = _fit_reference(client, tmp_path / "sync", train_rows, rows)
    second_validation = reference.seen[7:10]  # epoch 2: 2 training batches, then 3

    sleeps: list[float] = []

    def interrupt_second_batch(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:  # Ctrl-C while the second validation batch is polled
            raise KeyboardInterrupt

    monkeypatch.setattr(batch_module, "_sleep", interrupt_second_batch)
    sim.batch_polls = 2  # each batch is still in progress at its first poll
    root = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _trainer(root, max_epochs=2, enable_checkpointing=True).fit(
            _Recording(client), *_fit_loaders(train_rows, rows), batch_api=FAST
        )
    assert sim.batches_created == 2 and len(sleeps) == 2
    monkeypatch.undo()

    last = _trainer(root).last_checkpoint_path()
    assert last.parent.name == "epoch_2" and last.name == "checkpoint_batch_api.hf"
    checkpoint = load(last)
    [running] = checkpoint["batch_api_state"]["batches"]  # this validation's
    assert running["status"] == "submitted"
    assert sim.batches[running["id"]]["status"] == "in_progress"
    # written at the position of the epoch's last training batch: the train
    # stream after it and the validation stream between its two passes
    batch_checkpoint = load(last.parent / "checkpoint_batch1.hf")
    assert checkpoint["batch"] == 1
    assert checkpoint["data_state"] == batch_checkpoint["data_state"]
    assert checkpoint["val_data_state"] == batch_checkpoint["val_data_state"]
    assert checkpoint["val_data_state"]["dataset"]["next_epoch"] == 1
    assert checkpoint["val_data_state"]["dataset"]["position"] is None

    agent = _Recording(client)  # a new process: new agent, loaders and datasets
    trainer = _trainer(root, max_epochs=2, enable_checkpointing=True)
    history = trainer.fit(
        agent, *_fit_loaders(train_rows, rows), ckpt_path="last", batch_api=FAST
    )
    assert sim.batches_created == 2  # 0 new submissions
    stats = trainer.last_batch_run.stats
    assert (stats.batches_submitted, stats.batches_resumed) == (0, 1)
    assert stats.batches_cancelled == 0 and stats.lines_answered == len(MESSAGES)
    # no training redone; both runs of the validation (the round that found its
    # answers in the polled batch, the final one) read the reference's epoch
    assert agent.seen == second_validation * 2
    assert _strip(history) == _strip(expected)
    assert _trainer(root).last_checkpoint_path().name == "checkpoint_epoch2.hf"


def test_a_synchronous_fit_resumed_validates_on_the_uninterrupted_epochs(
    client: OpenAI, rows: Path, train_rows: Path, tmp_path: Path
) -> None:
    """The validation stream's position is in every checkpoint: a run resumed in its
    second epoch validates on the stream's second epoch, not its first."""
    reference, expected = _fit_reference(client, tmp_path / "ref", train_rows, rows)

    class Crashing(_Recording):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if len(self.seen) == 6:  # epoch 2, its second training batch
                raise _Crash
            return super().training_step(batch, batch_idx)

    root = tmp_path / "run"
    _fit_until_crash(Crashing(client), root, train_rows, rows)
    agent, history = _resume(client, root, train_rows, rows)
    assert agent.seen == reference.seen[6:]  # the last training batch, then val
    assert _strip(history) == _strip(expected)


def test_a_loader_restored_after_a_short_last_batch_ends_that_epoch_first(
    rows: Path,
) -> None:
    """After the epoch's last batch, when it is short, the stream already stands
    before its next epoch; the loader's state says the epoch is not over yet, so a
    loader restored from it ends the saved epoch (no batch) before the next one."""
    original = _stream(rows)
    epoch = iter(original)
    [next(epoch) for _ in range(3)]  # 5, 5 and the last, short batch of 2
    state = json.loads(json.dumps(original.state_dict()))
    assert state["exhausted"] is True and state["batches"] == 3
    assert state["dataset"]["position"] is None  # the stream: before epoch 1
    with pytest.raises(StopIteration):
        next(epoch)  # the original epoch ends here
    following = _batches(original)
    restored = _stream(rows)
    restored.load_state_dict(state)
    assert list(restored) == []  # the rest of the saved epoch: nothing
    assert _batches(restored) == following


def test_a_synchronous_fit_that_crashed_validating_resumes_without_training_again(
    client: OpenAI, rows: Path, train_rows: Path, tmp_path: Path
) -> None:
    """The crash comes after the epoch's last (short) training batch was
    checkpointed: the resumed run validates, and does not train that epoch again."""
    reference, expected = _fit_reference(client, tmp_path / "ref", train_rows, rows)

    class Crashing(_Recording):
        def validation_step(self, batch: Any, batch_idx: int) -> Any:
            if len(self.seen) == 7:  # epoch 2, its validation
                raise _Crash
            return super().validation_step(batch, batch_idx)

    root = tmp_path / "run"
    _fit_until_crash(Crashing(client), root, train_rows, rows)
    assert _trainer(root).last_checkpoint_path().name == "checkpoint_batch1.hf"
    agent, history = _resume(client, root, train_rows, rows)
    assert agent.seen == reference.seen[7:]  # the validation of epoch 2 only
    assert _strip(history) == _strip(expected)
