"""DataLoader.last_indices: the dataset indices (or stream row numbers) of the samples
of the batch last yielded, in batch order."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from afnio import Variable
from afnio.utils.data import DataLoader, IterableDataset, JsonlDataset
from afnio.utils.data.sampler import RandomSampler


def _samples(n: int) -> list[tuple[Variable, Variable]]:
    return [
        (Variable(f"q{i}", role="question"), Variable(f"a{i}", role="answer"))
        for i in range(n)
    ]


@pytest.mark.parametrize("seed", range(4))
def test_last_indices_follow_a_shuffled_sampler(seed: int) -> None:
    rng = random.Random(seed)
    n, batch_size = rng.randint(5, 23), rng.randint(1, 6)
    data = _samples(n)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, seed=seed)
    assert loader.last_indices is None
    for _epoch in range(2):
        seen: list[int] = []
        for x, y in loader:
            indices = loader.last_indices
            assert x.data == [f"q{i}" for i in indices]
            assert y.data == [f"a{i}" for i in indices]
            seen.extend(indices)
        assert sorted(seen) == list(range(n))
    assert seen != list(range(n)) or n < 3  # shuffled, not the sequential order


def test_last_indices_follow_a_custom_sampler_and_drop_last() -> None:
    data = _samples(10)
    order = [7, 3, 3, 9, 0, 5, 1]
    loader = DataLoader(data, batch_size=3, sampler=order, drop_last=True)
    got = []
    for x, _ in loader:
        got.append(loader.last_indices)
        assert x.data == [f"q{i}" for i in loader.last_indices]
    assert got == [[7, 3, 3], [9, 0, 5]]
    assert loader.last_indices == [9, 0, 5]  # the end of the epoch keeps the last


def test_last_indices_with_a_seeded_random_sampler_match_next_calls() -> None:
    data = list(range(100, 117))
    loader = DataLoader(data, batch_size=4, sampler=RandomSampler(data, seed=3))
    it = iter(loader)
    batch = next(it)
    assert batch == [data[i] for i in loader.last_indices]


def _write_rows(path: Path, n: int, rng: random.Random) -> None:
    with open(path, "w") as f:
        for r in range(n):
            if rng.random() < 0.3:
                f.write("\n")  # blank lines are not rows
            f.write(json.dumps({"text": f"row {r}", "label": r}) + "\n")


@pytest.mark.parametrize("buffer_size", [1, 4])
@pytest.mark.parametrize("shards", [1, 3])
def test_streamed_batches_give_the_row_numbers_of_their_samples(
    tmp_path: Path, buffer_size: int, shards: int
) -> None:
    rng = random.Random(buffer_size * 10 + shards)
    path = tmp_path / "rows.jsonl"
    n = 20
    _write_rows(path, n, rng)
    shard = shards - 1
    ds = JsonlDataset(
        path,
        input="text",
        target="label",
        buffer_size=buffer_size,
        seed=5,
        num_shards=shards,
        shard_index=shard,
    )
    loader = DataLoader(ds, batch_size=3)
    seen: list[int] = []
    for x, y in loader:
        rows = loader.last_indices
        assert x.data == [f"row {r}" for r in rows]
        assert y.data == rows
        seen.extend(rows)
    assert sorted(seen) == [r for r in range(n) if r % shards == shard]


def test_a_stream_that_does_not_tell_its_rows_gives_none() -> None:
    class Numbers(IterableDataset):
        def __iter__(self) -> Iterator[int]:
            return iter(range(5))

    loader = DataLoader(Numbers(), batch_size=2)
    batches = list(loader)
    assert batches == [[0, 1], [2, 3], [4]]
    assert loader.last_indices is None
