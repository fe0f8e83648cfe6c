"""One ``JsonlDataset`` object read by several loaders at once (review item 9 of
issue 21).

The train and validation DataLoaders of a ``fit`` may share one dataset object, and
a validation pass (after an epoch, or a ``revert_on_regression`` check in the middle
of one) then starts an epoch of the dataset while the training epoch is still going.
Each loader keeps its own position: ``loader.state_dict()`` is the position of that
loader's epoch, whatever the other loaders did since, so a fit interrupted after a
revert check and resumed from its checkpoint sees exactly the batches of an
uninterrupted fit. The ground truth is known by construction: without shuffling
(``buffer_size=1``) every training epoch is rows 0, 1, 2, ... in batches of 4 and
every validation pass is the whole file; with shuffling, the uninterrupted run's
batches (each epoch a permutation of the rows).

No LM call anywhere: the agent only records the sample ids it sees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import afnio
from afnio.errors import StepError
from afnio.models.batch import ReplayLoader
from afnio.trainer import Trainer
from afnio.utils.data import DataLoader, JsonlDataset
from tests.trainer._batch_helpers import quiet_trainer
from tests.utils.data.test_jsonl_trainer import Interrupted, Recorder, write_rows

ROWS = 22  # training batches of 4: 4, 4, 4, 4, 4, 2 (six per epoch)
BATCHES = [list(range(i, min(i + 4, ROWS))) for i in range(0, ROWS, 4)]


def ids(batch: tuple) -> list[int]:
    x, _ = batch
    return [int(text.split()[1]) for text in x.data]


def rest(loader: DataLoader) -> list[list[int]]:
    """The batches left in the loader's current epoch (``iter(loader)`` would start
    a new one: a DataLoader is its own iterator)."""
    out = []
    while True:
        try:
            out.append(ids(next(loader)))
        except StopIteration:
            return out


def shared(path: Path, buffer_size: int) -> tuple[DataLoader, DataLoader]:
    """A train loader (batches of 4) and a validation loader (batches of 11) over
    ONE dataset object."""
    ds = JsonlDataset(
        path, input="text", target="label", buffer_size=buffer_size, seed=11
    )
    return DataLoader(ds, batch_size=4), DataLoader(ds, batch_size=11)


def fit_trainer(root: Path, epochs: int = 2, revert: bool = True) -> Trainer:
    return quiet_trainer(root, max_epochs=epochs, revert_on_regression=revert)


@pytest.fixture
def rows(tmp_path: Path) -> Path:
    return write_rows(tmp_path / "rows.jsonl", ROWS)


# -- the loaders ---------------------------------------------------------------------


def test_each_loader_over_a_shared_dataset_reports_its_own_position(
    rows: Path,
) -> None:
    train, val = shared(rows, buffer_size=1)
    iter(train)
    assert [ids(next(train)) for _ in range(2)] == BATCHES[:2]
    # a whole validation pass over the same dataset in the middle of the epoch
    assert [ids(b) for b in val] == [list(range(11)), list(range(11, 22))]
    saved_train = json.loads(json.dumps(train.state_dict()))
    saved_val = json.loads(json.dumps(val.state_dict()))
    assert saved_train["batches"] == 2
    assert saved_train["dataset"]["position"]["row"] == 8  # 8 rows read, not 22
    assert saved_val["dataset"]["position"] is None  # its pass is over
    # the training epoch is not disturbed by the pass: it goes on with row 8
    assert rest(train) == BATCHES[2:]

    # a new process: a fresh dataset and loaders, restored from the saved states
    train2, val2 = shared(rows, buffer_size=1)
    train2.load_state_dict(saved_train)
    val2.load_state_dict(saved_val)
    assert [ids(b) for b in train2] == BATCHES[2:]
    assert [ids(b) for b in val2] == [list(range(11)), list(range(11, 22))]


def test_a_loader_that_has_not_iterated_yet_reports_no_position(rows: Path) -> None:
    train, val = shared(rows, buffer_size=1)
    next(iter(train))
    state = val.state_dict()  # the train loader's epoch is not the val loader's
    assert state["dataset"]["position"] is None and state["batches"] == 0
    val2 = shared(rows, buffer_size=1)[1]
    val2.load_state_dict(state)
    assert [ids(b) for b in val2] == [list(range(11)), list(range(11, 22))]


def test_shared_loaders_restore_exactly_with_shuffling(rows: Path) -> None:
    """The epochs of a shuffling dataset are numbered in the order loaders start
    them; a restore continues both loaders' epochs and the numbering."""

    def run(cut: int | None) -> list[list[int]]:
        train, val = shared(rows, buffer_size=7)
        seen: list[list[int]] = []
        iter(train)
        for _ in range(3):
            seen.append(ids(next(train)))
            seen.extend(ids(b) for b in val)
        if cut is not None:  # stop here, restore in fresh objects
            state_t, state_v = train.state_dict(), val.state_dict()
            train, val = shared(rows, buffer_size=7)
            train.load_state_dict(json.loads(json.dumps(state_t)))
            val.load_state_dict(json.loads(json.dumps(state_v)))
            iter(train)
        seen.extend(rest(train))  # the rest of the training epoch
        seen.extend(ids(b) for b in val)
        seen.extend(ids(b) for b in train)  # a new training epoch
        return seen

    reference = run(None)
    assert run(0) == reference
    train_epoch = reference[0:1] + reference[3:4] + reference[6:7] + reference[9:12]
    assert sorted(i for b in train_epoch for i in b) == list(range(ROWS))


def test_a_replayed_validation_pass_leaves_the_training_epoch_alone(
    rows: Path,
) -> None:
    """A Batch API pass rewinds its loader before every round (ReplayLoader); over a
    shared dataset the training loader's position must not move."""
    train, val = shared(rows, buffer_size=7)
    iter(train)
    first = ids(next(train))
    replay = ReplayLoader(val)
    rounds = [[ids(b) for b in replay] for _ in range(3)]
    assert rounds[0] == rounds[1] == rounds[2]
    state = json.loads(json.dumps(train.state_dict()))
    left = rest(train)
    assert sorted(i for b in [first, *left] for i in b) == list(range(ROWS))
    restored = shared(rows, buffer_size=7)[0]
    restored.load_state_dict(state)
    assert [ids(b) for b in restored] == left


def test_a_state_whose_epoch_was_not_started_yet_is_refused(rows: Path) -> None:
    train = shared(rows, buffer_size=1)[0]
    next(iter(train))
    state = train.state_dict()["dataset"]
    assert state["position"]["epoch"] == 0 and state["next_epoch"] == 1
    fresh = JsonlDataset(rows, input="text", target="label", seed=11)
    with pytest.raises(ValueError, match="Invalid JsonlDataset position"):
        fresh.restore({**state, "next_epoch": 0})  # epoch 0 not started by then
    # an epoch started before others (several readers) is a valid position
    later = {**state, "next_epoch": 5}
    assert fresh.restore(later) == state["position"]
    assert fresh.state_at(None)["next_epoch"] == 5


# -- a fit ---------------------------------------------------------------------------


def expected_unshuffled(epochs: int) -> tuple[list, list]:
    """What a fit with revert checks over the unshuffled file sees, by construction:
    every training epoch is the file's batches in order; a validation pass (one
    after each step, one after each epoch) is the whole file in batches of 11."""
    seen = [(idx, batch) for _ in range(epochs) for idx, batch in enumerate(BATCHES)]
    passes = (len(BATCHES) + 1) * epochs
    evaluated = [list(range(11)), list(range(11, 22))] * passes
    return seen, evaluated


@pytest.mark.parametrize(
    "fail_at",
    [
        pytest.param(2, id="mid-epoch 1"),
        pytest.param(6, id="at the epoch boundary"),
        pytest.param(9, id="mid-epoch 2"),
    ],
)
def test_a_fit_over_one_shared_dataset_resumes_with_the_file_order(
    rows: Path, tmp_path: Path, fail_at: int
) -> None:
    seen, evaluated = expected_unshuffled(epochs=2)
    reference = Recorder()
    fit_trainer(tmp_path / "ref").fit(reference, *shared(rows, buffer_size=1))
    assert reference.seen == seen and reference.evaluated == evaluated

    first = Recorder(fail_at=fail_at)
    with pytest.raises(StepError) as info:
        fit_trainer(tmp_path / "run").fit(first, *shared(rows, buffer_size=1))
    assert isinstance(info.value.__cause__, Interrupted)
    assert first.seen == seen[:fail_at]

    resumed = Recorder()  # a new process: new agent, dataset and loaders
    fit_trainer(tmp_path / "run").fit(
        resumed, *shared(rows, buffer_size=1), ckpt_path="last"
    )
    assert first.seen + resumed.seen == seen


@pytest.mark.parametrize(
    "fail_at",
    [
        pytest.param(3, id="mid-epoch 1"),
        pytest.param(6, id="at the epoch boundary"),
        pytest.param(10, id="mid-epoch 2"),
    ],
)
def test_a_fit_over_one_shuffled_shared_dataset_resumes_exactly(
    rows: Path, tmp_path: Path, fail_at: int
) -> None:
    reference = Recorder()
    expected = fit_trainer(tmp_path / "ref").fit(reference, *shared(rows, 7))
    for first in (0, 6):  # each training epoch: every row once
        epoch = [i for _, batch in reference.seen[first : first + 6] for i in batch]
        assert sorted(epoch) == list(range(ROWS))

    first = Recorder(fail_at=fail_at)
    with pytest.raises(StepError):
        fit_trainer(tmp_path / "run").fit(first, *shared(rows, 7))
    resumed = Recorder()
    history = fit_trainer(tmp_path / "run").fit(
        resumed, *shared(rows, 7), ckpt_path="last"
    )
    assert first.seen + resumed.seen == reference.seen
    # the validations after the checkpoint are the uninterrupted run's too
    assert resumed.evaluated == reference.evaluated[-len(resumed.evaluated) :]
    assert history == expected


def test_the_checkpoint_holds_each_loaders_own_position(
    rows: Path, tmp_path: Path
) -> None:
    fit_trainer(tmp_path / "run", epochs=1).fit(Recorder(), *shared(rows, 1))
    checkpoint = afnio.load(
        tmp_path / "run" / "checkpoints" / "epoch_1" / "checkpoint_batch1.hf"
    )
    # two training batches done (8 rows), the revert check's pass over
    train = checkpoint["data_state"]["dataset"]
    val = checkpoint["val_data_state"]["dataset"]
    assert train["position"]["row"] == 8 and train["position"]["epoch"] == 0
    assert val["position"] is None
    # epochs started: the training one and the two revert checks' passes
    assert train["next_epoch"] == val["next_epoch"] == 3


def test_fit_refuses_one_dataloader_for_training_and_validation(
    rows: Path, tmp_path: Path
) -> None:
    loader = shared(rows, buffer_size=1)[0]
    with pytest.raises(ValueError, match=r"val_dataloader.*same DataLoader"):
        fit_trainer(tmp_path / "run").fit(Recorder(), loader, loader)
