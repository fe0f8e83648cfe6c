"""JsonlDataset: lazy reading into (input, target) Variables, shuffling by buffer,
sharding, rows checked as they are read (errors naming the line), the position saved
and restored exactly, and the DataLoader over an IterableDataset."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path
from typing import Any

import pytest

from afnio import Variable
from afnio.utils.data import (
    DataLoader,
    IterableDataset,
    JsonlDataset,
    JsonlRowError,
)


def write_rows(path: Path, n: int, *, blank_every: int = 0) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            if blank_every and i and i % blank_every == 0:
                f.write("\n")
            row = {
                "id": i,
                "email": f"email {i}",
                "urgency": ["low", "medium", "high"][i % 3],
                "sentiment": "neutral",
                "categories": {"billing": i % 2 == 0},
            }
            f.write(json.dumps(row) + "\n")
    return path


def ids(samples: Any) -> list[int]:
    """The row ids of samples whose input is ``email <id>``."""
    out = []
    for sample in samples:
        x = sample[0] if isinstance(sample, tuple) else sample
        out.append(int(x.data.split()[1]))
    return out


@pytest.fixture
def rows20(tmp_path: Path) -> Path:
    return write_rows(tmp_path / "rows.jsonl", 20)


# -- samples ---------------------------------------------------------------------------


def test_rows_become_samples_shaped_like_facility_support(rows20: Path) -> None:
    ds = JsonlDataset(
        rows20,
        input="email",
        target=("urgency", "sentiment", "categories"),
        roles={"email": "input email or message"},
    )
    x, (urgency, sentiment, categories) = next(iter(ds))
    assert isinstance(x, Variable) and x.data == "email 0"
    assert x.role == "input email or message"
    assert (urgency.data, urgency.role) == ("low", "output urgency")
    assert sentiment.role == "output sentiment"
    assert json.loads(categories.data) == {"billing": True}  # an object: JSON text
    assert ids(ds) == list(range(20))


def test_without_input_a_sample_is_the_row_and_transform_maps_rows(
    rows20: Path,
) -> None:
    assert next(iter(JsonlDataset(rows20)))["id"] == 0
    ds = JsonlDataset(rows20, transform=lambda row: row["id"] * 10)
    assert list(islice(ds, 3)) == [0, 10, 20]


def test_the_dataloader_batches_a_stream_into_batched_variables(rows20: Path) -> None:
    ds = JsonlDataset(rows20, input="email", target=("urgency", "sentiment"))
    loader = DataLoader(ds, batch_size=8)
    batches = list(loader)
    assert [len(x.data) for x, _ in batches] == [8, 8, 4]
    x, (urgency, _) = batches[0]
    assert x.data[:2] == ["email 0", "email 1"] and urgency.role == "output urgency"
    assert len(loader) == 3
    assert [len(x.data) for x, _ in DataLoader(ds, batch_size=8, drop_last=True)] == [
        8,
        8,
    ]
    assert loader.sampler is None


def test_each_epoch_reads_the_file_again(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "rows.jsonl", 6)
    loader = DataLoader(JsonlDataset(path, input="email"), batch_size=4)
    assert [x.data for x in loader] == [
        [f"email {i}" for i in range(4)],
        ["email 4", "email 5"],
    ]
    write_rows(path, 3)  # the next epoch sees the file as it is now
    assert [x.data for x in loader] == [["email 0", "email 1", "email 2"]]


def test_shuffle_and_sampler_are_refused_for_an_iterable_dataset(rows20: Path) -> None:
    ds = JsonlDataset(rows20, input="email")
    with pytest.raises(ValueError, match=r"shuffle=True cannot apply.*buffer_size"):
        DataLoader(ds, shuffle=True)
    with pytest.raises(ValueError, match="a sampler cannot apply"):
        DataLoader(ds, sampler=[0, 1])


def test_an_iterable_dataset_without_length_has_a_loader_without_length() -> None:
    class Numbers(IterableDataset):
        def __iter__(self) -> Any:
            return iter(range(5))

    loader = DataLoader(Numbers(), batch_size=2)
    assert list(loader) == [[0, 1], [2, 3], [4]]
    with pytest.raises(TypeError, match="without a length"):
        len(loader)
    with pytest.raises(TypeError, match="no index"):
        Numbers()[0]
    with pytest.raises(TypeError, match="no state_dict"):
        loader.state_dict()


# -- shuffling and sharding ------------------------------------------------------------


def test_buffer_shuffling_is_a_seeded_permutation_new_each_epoch(rows20: Path) -> None:
    a = JsonlDataset(rows20, input="email", buffer_size=5, seed=1)
    b = JsonlDataset(rows20, input="email", buffer_size=5, seed=1)
    epochs_a = [ids(a) for _ in range(3)]
    assert epochs_a == [ids(b) for _ in range(3)]  # same seed, same epochs
    for order in epochs_a:
        assert sorted(order) == list(range(20))
        assert order != list(range(20))
    assert epochs_a[0] != epochs_a[1]  # each epoch in a new order
    other = JsonlDataset(rows20, input="email", buffer_size=5, seed=2)
    assert ids(other) != epochs_a[0]


def test_a_row_moves_up_by_less_than_the_buffer_size(rows20: Path) -> None:
    ds = JsonlDataset(rows20, input="email", buffer_size=4, seed=0)
    for _ in range(5):
        for position, row in enumerate(ids(ds)):
            # the sample at `position` is drawn once `position + 4` rows were read
            assert row <= position + 3


def test_shards_are_disjoint_and_cover_the_file(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "rows.jsonl", 23, blank_every=5)
    shards = [
        JsonlDataset(path, input="email", num_shards=3, shard_index=i, buffer_size=4)
        for i in range(3)
    ]
    seen = [ids(s) for s in shards]
    assert sorted(i for shard in seen for i in shard) == list(range(23))
    assert sorted(seen[1]) == list(
        range(1, 23, 3)
    )  # rows 1, 4, 7, ... (blanks skipped)
    assert [len(s) for s in shards] == [8, 8, 7]
    with pytest.raises(ValueError, match="shard_index"):
        JsonlDataset(path, num_shards=2, shard_index=2)


# -- rows checked as they are read -----------------------------------------------------


@pytest.mark.parametrize(
    ("line", "fields", "message"),
    [
        (b'{"email": "x", "label": ', None, r"line 3: invalid JSON: Expecting value"),
        (
            b'["email", "label"]',
            None,
            r"line 3: the row is an array, expected an object",
        ),
        (
            b'{"label": "a"}',
            None,
            r"line 3: missing field 'email' \(the row has fields 'label'\)",
        ),
        (
            b'{"email": "x", "label": ["a"]}',
            {"label": str},
            r"line 3: field 'label' is an array \(\['a'\]\), expected a string",
        ),
        (b'{"email": null, "label": "a"}', None, r"line 3: field 'email' is null"),
        (
            b'{"email": "x", "label": true}',
            {"label": (int, float)},
            r"field 'label' is a boolean .*expected an integer or a number",
        ),
        (b'{"email": "\xff", "label": "a"}', None, r"line 3: not valid UTF-8"),
    ],
    ids=[
        "invalid JSON",
        "not an object",
        "missing field",
        "wrong type",
        "null",
        "bool is no number",
        "not UTF-8",
    ],
)
def test_a_bad_row_raises_an_error_naming_the_file_and_line(
    tmp_path: Path, line: bytes, fields: Any, message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    number = fields is not None and fields["label"] == (int, float)
    label = b"1" if number else b'"x"'  # a good row's label
    path.write_bytes(
        b'{"email": "a", "label": ' + label + b"}\n\n" + line + b"\n"
        b'{"email": "b", "label": ' + label + b"}\n"
    )
    ds = JsonlDataset(path, input="email", target="label", fields=fields)
    it = iter(ds)
    assert next(it)[0].data == "a"  # read lazily: the rows before the bad one come
    with pytest.raises(JsonlRowError, match=message) as info:
        next(it)
    assert info.value.line == 3 and str(path) in str(info.value)


def test_a_shard_checks_only_its_own_rows(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"email": "a"}\nnot json\n{"email": "c"}\n')
    assert [x.data for x in JsonlDataset(path, input="email", num_shards=2)] == [
        "a",
        "c",
    ]
    with pytest.raises(JsonlRowError, match="line 2"):
        list(JsonlDataset(path, input="email", num_shards=2, shard_index=1))


def test_bad_arguments_are_refused_at_construction(rows20: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no file"):
        JsonlDataset(rows20.with_name("missing.jsonl"))
    with pytest.raises(TypeError, match="either `transform`"):
        JsonlDataset(rows20, input="email", transform=dict)
    with pytest.raises(ValueError, match="`target` needs `input`"):
        JsonlDataset(rows20, target="urgency")
    with pytest.raises(ValueError, match="buffer_size"):
        JsonlDataset(rows20, buffer_size=0)
    with pytest.raises(TypeError, match="fields\\['label'\\]"):
        JsonlDataset(rows20, fields={"label": set})


# -- the position, saved and restored --------------------------------------------------


@pytest.mark.parametrize("buffer_size", [1, 6])
@pytest.mark.parametrize("cut", [0, 1, 7, 19, 20])
def test_a_restored_state_continues_exactly(
    rows20: Path, buffer_size: int, cut: int
) -> None:
    def make() -> JsonlDataset:
        return JsonlDataset(rows20, input="email", buffer_size=buffer_size, seed=5)

    reference = make()
    expected = [ids(reference) for _ in range(3)]
    first = make()
    ids(first)  # epoch 0
    it = iter(first)  # epoch 1, interrupted after `cut` samples
    head = ids(islice(it, cut))
    state = json.loads(json.dumps(first.state_dict()))  # JSON-serialisable
    assert len(state["position"]["buffer"]) <= buffer_size
    second = make()
    second.load_state_dict(state)
    assert head + ids(second) == expected[1]
    assert ids(second) == expected[2]  # and the next epoch is the one it would be


def test_a_state_between_epochs_starts_the_next_epoch(rows20: Path) -> None:
    a = JsonlDataset(rows20, input="email", buffer_size=6)  # seed from entropy
    first = ids(a)
    b = JsonlDataset(rows20, input="email", buffer_size=6)
    b.load_state_dict(a.state_dict())  # adopts a's seed
    assert ids(b) == ids(a) and ids(b) != first


def test_a_restore_does_not_read_the_rows_before_the_position(
    rows20: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = JsonlDataset(rows20, input="email", buffer_size=3, seed=0)
    it = iter(ds)
    ids(islice(it, 15))
    state = ds.state_dict()
    parsed: list[int] = []
    original = JsonlDataset._parse

    def counting(self: JsonlDataset, raw: bytes, line: int) -> Any:
        parsed.append(line)
        return original(self, raw, line)

    monkeypatch.setattr(JsonlDataset, "_parse", counting)
    resumed = JsonlDataset(rows20, input="email", buffer_size=3, seed=0)
    resumed.load_state_dict(state)
    assert len(ids(resumed)) == 5
    # 18 lines were read: the 3 buffered rows come from the state, then only the 2
    # unread lines are read (not the 15 rows done)
    assert len(parsed) == 5 and sorted(parsed)[-2:] == [19, 20]
    assert len(set(parsed)) == 5


def test_a_state_of_another_setup_or_a_changed_file_is_refused(rows20: Path) -> None:
    ds = JsonlDataset(rows20, input="email", buffer_size=4, seed=1)
    next(iter(ds))
    state = ds.state_dict()
    with pytest.raises(ValueError, match=r"buffer_size=4.*buffer_size=8"):
        JsonlDataset(rows20, buffer_size=8, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"seed=1.*seed=2"):
        JsonlDataset(rows20, buffer_size=4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="Not a JsonlDataset state"):
        ds.load_state_dict({"rng_state": []})
    with open(rows20, "a") as f:
        f.write('{"email": "email 99"}\n')
    with pytest.raises(ValueError, match="changed since"):
        JsonlDataset(rows20, buffer_size=4, seed=1).load_state_dict(state)


def test_the_loader_state_is_the_position_after_the_last_batch(rows20: Path) -> None:
    def loader() -> DataLoader:
        return DataLoader(
            JsonlDataset(rows20, input="email", buffer_size=5, seed=3), batch_size=3
        )

    full = [ids_of_batch(b) for b in loader()]
    a = loader()
    it = iter(a)
    head = [ids_of_batch(next(it)) for _ in range(2)]
    state = a.state_dict()
    assert state["batches"] == 2
    b = loader()
    b.load_state_dict(json.loads(json.dumps(state)))
    assert head + [ids_of_batch(x) for x in b] == full


def ids_of_batch(batch: Variable) -> list[int]:
    return [int(text.split()[1]) for text in batch.data]
