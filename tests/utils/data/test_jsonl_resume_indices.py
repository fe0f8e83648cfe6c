"""``DataLoader.last_indices`` over a shuffled ``JsonlDataset`` stay exact across a
saved and restored position (issue 22, review finding 4).

A stream read through a shuffle buffer yields rows out of order; the loader's
``last_indices`` are the rows' numbers. A restored position holds the rows that were
in the buffer when it was saved: their row numbers are in the state (format 2), so
the batches after a restore carry the row numbers an uninterrupted run gives, for a
loader of its own dataset and for loaders sharing one dataset. A state of the
earlier format (version 1, ``[line, text]`` buffer entries) still loads: its row
numbers are recovered when no blank line precedes the saved position, else only the
batches holding such a row are ``None``.

The ground truth is the uninterrupted loader; every batch is also checked against
its rows' texts (``"row <n>"``)."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest

from afnio.utils.data import DataLoader, JsonlDataset

Batch = tuple[list[int] | None, list[int]]
"""A batch seen: the loader's ``last_indices`` and the row ids of its texts."""


def write_rows(path: Path, n: int, rng: random.Random, blanks: float) -> Path:
    """``n`` rows ``{"text": "row <r>", "label": r}``, with blank lines (which are
    not rows) before a row with probability ``blanks``."""
    with open(path, "w", encoding="utf-8") as f:
        for r in range(n):
            if rng.random() < blanks:
                f.write("\n" if rng.random() < 0.5 else "  \n")
            f.write(json.dumps({"text": f"row {r}", "label": r}) + "\n")
    return path


def dataset(path: Path, buffer_size: int, shards: int = 1, shard: int = 0) -> Any:
    return JsonlDataset(
        path,
        input="text",
        target="label",
        buffer_size=buffer_size,
        seed=7,
        num_shards=shards,
        shard_index=shard,
    )


def take(loader: DataLoader) -> Batch:
    """The next batch of ``loader`` (StopIteration at the end of its epoch)."""
    x, y = next(loader)
    ids = [int(text.split()[1]) for text in x.data]
    assert y.data == ids  # the label is the row number too
    return loader.last_indices, ids


def epochs(loader: DataLoader, n: int) -> list[Batch]:
    """``n`` epochs of ``loader``, batch after batch."""
    out: list[Batch] = []
    for _ in range(n):
        iter(loader)
        while True:
            try:
                out.append(take(loader))
            except StopIteration:
                break
    return out


def rest(loader: DataLoader, epochs_after: int) -> list[Batch]:
    """The rest of the loader's current epoch, then ``epochs_after`` more."""
    out: list[Batch] = []
    while True:
        try:
            out.append(take(loader))
        except StopIteration:
            break
    return out + epochs(loader, epochs_after)


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    """A state as a checkpoint keeps it (JSON)."""
    return json.loads(json.dumps(state))


CASES = [pytest.param(seed, id=f"case{seed}") for seed in range(12)]


@pytest.mark.parametrize("seed", CASES)
def test_a_restored_loader_gives_the_uninterrupted_last_indices(
    tmp_path: Path, seed: int
) -> None:
    """Random file (blank lines or not), buffer size, batch size, shard and
    drop_last; the state saved after a random batch of two epochs."""
    rng = random.Random(seed)
    n = rng.randint(9, 40)
    path = write_rows(tmp_path / "rows.jsonl", n, rng, blanks=rng.choice([0.0, 0.3]))
    buffer_size = rng.randint(2, 12)
    batch_size = rng.randint(1, 5)
    shards = rng.choice([1, 1, 2, 3])
    shard = rng.randrange(shards)
    drop_last = rng.random() < 0.3

    def loader() -> DataLoader:
        return DataLoader(
            dataset(path, buffer_size, shards, shard),
            batch_size=batch_size,
            drop_last=drop_last,
        )

    full = epochs(loader(), 2)
    assert all(rows == ids for rows, ids in full)  # exact without a restore
    per_epoch = len(full) // 2
    assert per_epoch > 0
    # save after a random batch of epoch 1 or 2 (0 batches: between epochs)
    cut = rng.randint(0, len(full) - 1)
    first = loader()
    done = epochs(first, 1) if cut >= per_epoch else []
    iter(first)
    while len(done) < cut:
        done.append(take(first))
    assert done == full[:cut]
    state = roundtrip(first.state_dict())
    position = state["dataset"]["position"]
    if position is not None:  # new states know every buffered row's number
        assert all(
            isinstance(entry[2], int) and entry[1].startswith("{")
            for entry in position["buffer"]
        )
    resumed = loader()
    resumed.load_state_dict(state)
    iter(resumed)
    after = rest(resumed, 1 if cut < per_epoch else 0)
    assert done + after == full


@pytest.mark.parametrize("buffer_size", [3, 8])
@pytest.mark.parametrize("cut", [1, 2, 4])
def test_a_dataset_restored_directly_gives_the_uninterrupted_last_indices(
    tmp_path: Path, buffer_size: int, cut: int
) -> None:
    """``JsonlDataset.load_state_dict`` (not the loader's): the loader's next epoch
    is the rest of the saved one."""
    path = write_rows(tmp_path / "rows.jsonl", 20, random.Random(cut), 0.2)
    full = epochs(DataLoader(dataset(path, buffer_size), batch_size=3), 1)
    ds = dataset(path, buffer_size)
    first = DataLoader(ds, batch_size=3)
    iter(first)
    done = [take(first) for _ in range(cut)]
    saved = roundtrip(ds.state_dict())
    fresh = dataset(path, buffer_size)
    fresh.load_state_dict(saved)
    resumed = DataLoader(fresh, batch_size=3)
    assert done + epochs(resumed, 1) == full


@pytest.mark.parametrize("seed", range(6))
def test_loaders_sharing_a_dataset_each_restore_exact_last_indices(
    tmp_path: Path, seed: int
) -> None:
    """A train and a val loader over ONE dataset object, interleaved (a validation
    pass in the middle of a training epoch), saved at a random point and restored
    into a fresh pair: each gives the uninterrupted pair's batches and indices."""
    rng = random.Random(100 + seed)
    path = write_rows(tmp_path / "rows.jsonl", rng.randint(12, 30), rng, 0.25)
    buffer_size, train_bs, val_bs = rng.randint(2, 9), rng.randint(2, 4), 5

    def pair() -> tuple[DataLoader, DataLoader]:
        ds = dataset(path, buffer_size)
        return DataLoader(ds, batch_size=train_bs), DataLoader(ds, batch_size=val_bs)

    # the schedule: a train epoch, interrupted by a whole validation pass after
    # `pause` batches and a half-done one after `pause + 1`, then the rest
    ref_train, ref_val = pair()
    iter(ref_train)
    pause = rng.randint(0, 2)
    ref = [take(ref_train) for _ in range(pause)]
    ref_passes = [epochs(ref_val, 1)]
    ref.append(take(ref_train))
    iter(ref_val)
    ref_val_head = [take(ref_val)]
    train_rest, val_rest = rest(ref_train, 0), rest(ref_val, 0)

    train, val = pair()
    iter(train)
    got = [take(train) for _ in range(pause)]
    assert epochs(val, 1) == ref_passes[0]
    got.append(take(train))
    iter(val)
    assert [take(val)] == ref_val_head
    assert got == ref
    train_state, val_state = roundtrip(train.state_dict()), roundtrip(val.state_dict())
    new_train, new_val = pair()
    new_train.load_state_dict(train_state)
    new_val.load_state_dict(val_state)
    # the val loader goes first: it must not move the training position
    iter(new_val)
    assert rest(new_val, 0) == val_rest
    iter(new_train)
    assert rest(new_train, 0) == train_rest
    assert all(rows == ids for rows, ids in train_rest + val_rest)


def test_a_restored_loader_saved_again_before_iterating_keeps_the_row_numbers(
    tmp_path: Path,
) -> None:
    path = write_rows(tmp_path / "rows.jsonl", 20, random.Random(3), 0.3)

    def loader() -> DataLoader:
        return DataLoader(dataset(path, 6), batch_size=3)

    full = epochs(loader(), 1)
    first = loader()
    iter(first)
    done = [take(first), take(first)]
    middle = loader()
    middle.load_state_dict(roundtrip(first.state_dict()))
    again = roundtrip(middle.state_dict())  # restored, not iterated yet
    assert again == roundtrip(first.state_dict())
    last = loader()
    last.load_state_dict(again)
    iter(last)
    assert done + rest(last, 0) == full


def test_a_loader_restored_after_a_short_last_batch_and_saved_again_ends_that_epoch(
    tmp_path: Path,
) -> None:
    """Saved after an epoch's last, short batch (the stream already stands before
    the next epoch): a restored loader saved again before iterating keeps
    ``exhausted``, so the loader restored from that state ends the saved epoch
    first, as the original would, then gives the next epoch's exact indices."""
    path = write_rows(tmp_path / "rows.jsonl", 10, random.Random(5), 0.2)

    def loader() -> DataLoader:
        return DataLoader(dataset(path, 4), batch_size=4)  # 4, 4, 2

    full = epochs(loader(), 2)
    first = loader()
    iter(first)
    done = [take(first) for _ in range(3)]
    saved = roundtrip(first.state_dict())
    assert saved["exhausted"] is True and saved["batches"] == 3
    middle = loader()
    middle.load_state_dict(saved)
    again = roundtrip(middle.state_dict())
    assert again == saved
    last = loader()
    last.load_state_dict(again)
    iter(last)
    assert rest(last, 1) == full[3:]
    assert done == full[:3]


def _as_format_1(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` as the earlier format saved it: version 1, ``[line, text]``."""
    old = copy.deepcopy(state)
    old["dataset"]["version"] = 1
    position = old["dataset"]["position"]
    position["buffer"] = [entry[:2] for entry in position["buffer"]]
    return old


def test_a_format_1_state_recovers_the_row_numbers_when_no_line_was_blank(
    tmp_path: Path,
) -> None:
    path = write_rows(tmp_path / "rows.jsonl", 20, random.Random(0), blanks=0.0)
    full = epochs(DataLoader(dataset(path, 8), batch_size=3), 1)
    first = DataLoader(dataset(path, 8), batch_size=3)
    iter(first)
    done = [take(first), take(first)]
    resumed = DataLoader(dataset(path, 8), batch_size=3)
    resumed.load_state_dict(_as_format_1(roundtrip(first.state_dict())))
    iter(resumed)
    assert done + rest(resumed, 0) == full


def test_a_format_1_state_after_a_blank_line_leaves_only_its_rows_batches_none(
    tmp_path: Path,
) -> None:
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps({"text": f"row {r}", "label": r}) for r in range(20)]
    path.write_text("\n".join([*lines[:1], "", *lines[1:]]) + "\n", "utf-8")
    full = epochs(DataLoader(dataset(path, 4), batch_size=2), 1)
    first = DataLoader(dataset(path, 4), batch_size=2)
    iter(first)
    done = [take(first)]
    resumed = DataLoader(dataset(path, 4), batch_size=2)
    resumed.load_state_dict(_as_format_1(roundtrip(first.state_dict())))
    iter(resumed)
    after = rest(resumed, 0)
    buffered = {
        json.loads(entry[1])["label"]
        for entry in first.state_dict()["dataset"]["position"]["buffer"]
    }
    # the same samples in the same order; a batch is None exactly when it holds a
    # row that was in the saved buffer (its number is unknown), else exact
    assert [ids for _, ids in done + after] == [ids for _, ids in full]
    for (rows, ids), (want, _) in zip(after, full[1:], strict=True):
        assert rows == (None if buffered & set(ids) else want)
    assert any(rows is None for rows, _ in after)
    assert any(rows is not None for rows, _ in after)
    # and a state saved again from it says "unknown" for those rows, not a guess
    again = DataLoader(dataset(path, 4), batch_size=2)
    again.load_state_dict(_as_format_1(roundtrip(first.state_dict())))
    iter(again)
    take(again)
    saved = again.state_dict()["dataset"]
    assert saved["version"] == 2
    for _line, text, row in saved["position"]["buffer"]:
        label = json.loads(text)["label"]
        assert row == (None if label in buffered else label)


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param([1], id="too short"),
        pytest.param([1, '{"text": "row 0", "label": 0}', 0, 9], id="too long"),
        pytest.param(["1", '{"text": "row 0", "label": 0}', 0], id="line not int"),
        pytest.param([1, 5, 0], id="text not str"),
        pytest.param([1, '{"text": "row 0", "label": 0}', "0"], id="row not int"),
        pytest.param([1, '{"text": "row 0", "label": 0}', True], id="row a bool"),
    ],
)
def test_a_state_with_a_malformed_buffer_entry_is_refused(
    tmp_path: Path, entry: list[Any]
) -> None:
    path = write_rows(tmp_path / "rows.jsonl", 10, random.Random(0), 0.0)
    ds = dataset(path, 4)
    next(iter(ds))
    state = roundtrip(ds.state_dict())
    state["position"]["buffer"][0] = entry
    with pytest.raises(ValueError, match="Invalid JsonlDataset position"):
        dataset(path, 4).load_state_dict(state)


def test_a_state_of_an_unknown_version_is_refused(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "rows.jsonl", 10, random.Random(0), 0.0)
    ds = dataset(path, 4)
    state = ds.state_dict()
    for version in (0, 3, True, "2"):
        with pytest.raises(ValueError, match="version 1 or 2"):
            dataset(path, 4).load_state_dict({**state, "version": version})
