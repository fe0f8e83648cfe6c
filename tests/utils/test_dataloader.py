"""DataLoader: collation rules, batch sizes, drop_last, len, shuffling, errors; and
``get_batch_size``."""

from __future__ import annotations

import random
from typing import Any

import pytest

from afnio import Variable
from afnio.utils.data import (
    DataLoader,
    Dataset,
    SequentialSampler,
    WeightedRandomSampler,
    get_batch_size,
)
from afnio.utils.data.dataloader import collate, collate_tuple


class ListDataset(Dataset[Any]):
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __getitem__(self, index: int) -> Any:
        return self.items[index]

    def __len__(self) -> int:
        return len(self.items)


def facility_like(n: int) -> ListDataset:
    """Items shaped like FacilitySupport's: (x, (y1, y2, y3)) of Variables."""
    return ListDataset(
        [
            (
                Variable(f"email {i}", role="input email or message"),
                (
                    Variable(f"u{i}", role="output urgency"),
                    Variable(f"s{i}", role="output sentiment"),
                    Variable(f"c{i}", role="output categories"),
                ),
            )
            for i in range(n)
        ]
    )


def test_dataset_is_abstract() -> None:
    with pytest.raises(NotImplementedError, match="abstract"):
        Dataset()[0]
    with pytest.raises(NotImplementedError, match="abstract"):
        len(Dataset())


# -- collation ---------------------------------------------------------------------


def test_collate_dicts() -> None:
    ds = ListDataset([{"q": f"q{i}", "n": i, "v": Variable(f"v{i}")} for i in range(3)])
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert list(batch) == ["q", "n", "v"]
    assert batch["q"] == ["q0", "q1", "q2"]
    assert batch["n"] == [0, 1, 2]
    assert [v.data for v in batch["v"]] == ["v0", "v1", "v2"]  # raw values kept
    with pytest.raises(ValueError, match="same keys"):
        collate([{"a": 1}, {"b": 2}])


def test_collate_nested_tuples_of_variables() -> None:
    x, (u, s, c) = next(iter(DataLoader(facility_like(5), batch_size=3)))
    assert isinstance(x, Variable) and x.data == ["email 0", "email 1", "email 2"]
    assert x.role == "input email or message"
    assert (u.data, u.role) == (["u0", "u1", "u2"], "output urgency")
    assert (s.data, s.role) == (["s0", "s1", "s2"], "output sentiment")
    assert (c.data, c.role) == (["c0", "c1", "c2"], "output categories")


def test_collate_takes_role_and_requires_grad_from_the_first() -> None:
    items = [
        (Variable("a", role="first", requires_grad=True),),
        (Variable("b", role="second", requires_grad=False),),
    ]
    (v,) = collate_tuple(items)
    assert (v.data, v.role, v.requires_grad) == (["a", "b"], "first", True)
    assert v.is_leaf and v.grad_fn is None


def test_collate_tuples_of_plain_values_and_mixed_groups() -> None:
    items = [("q0", ("f0", "c0"), 0), ("q1", ("f1", "c1"), 1)]
    assert collate_tuple(items) == (["q0", "q1"], (["f0", "f1"], ["c0", "c1"]), [0, 1])
    mixed = [(Variable("a"), "x"), ("b", "y")]
    out = collate_tuple(mixed)
    assert out[0][0].data == "a" and out[0][1] == "b"  # not all Variables: a list
    assert out[1] == ["x", "y"]
    with pytest.raises(ValueError, match="different lengths"):
        collate_tuple([(1, 2), (1,)])


def test_collate_variables() -> None:
    ds = ListDataset([Variable(i, role="number") for i in range(4)])
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert isinstance(batch, Variable)
    assert (batch.data, batch.role) == ([0, 1, 2, 3], "number")
    with pytest.raises(TypeError, match="Cannot batch"):
        collate([Variable("a"), Variable(1)])
    with pytest.raises(TypeError, match="Cannot batch"):
        collate([Variable(["a", "b"]), Variable(["c"])])


def test_collate_anything_else_is_a_list() -> None:
    assert list(DataLoader(["a", "b", "c"], batch_size=2)) == [["a", "b"], ["c"]]
    assert next(iter(DataLoader([[1, 2], [3, 4]], batch_size=2))) == [[1, 2], [3, 4]]
    assert collate([]) == []


def test_batch_size_one_still_yields_list_data() -> None:
    batches = list(DataLoader(facility_like(2)))
    assert len(batches) == 2
    x, (u, _, _) = batches[1]
    assert x.data == ["email 1"] and u.data == ["u1"]
    v = next(iter(DataLoader([Variable("solo")])))
    assert v.data == ["solo"]
    assert list(DataLoader(["a"])) == [["a"]]


# -- batching, len, drop_last ------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "batch_size", "drop_last", "sizes"),
    [
        (10, 3, False, [3, 3, 3, 1]),
        (10, 3, True, [3, 3, 3]),
        (9, 3, False, [3, 3, 3]),
        (9, 3, True, [3, 3, 3]),
        (2, 5, False, [2]),
        (2, 5, True, []),
        (0, 2, False, []),
    ],
)
def test_batch_sizes_drop_last_and_len(
    n: int, batch_size: int, drop_last: bool, sizes: list[int]
) -> None:
    loader = DataLoader(list(range(n)), batch_size=batch_size, drop_last=drop_last)
    batches = list(loader)
    assert [len(b) for b in batches] == sizes
    assert len(loader) == len(sizes)
    if not drop_last:
        assert [x for b in batches for x in b] == list(range(n))


def test_len_ignores_sampler_num_samples() -> None:
    # upstream contract: len is computed from the dataset
    sampler = WeightedRandomSampler([1] * 10, num_samples=4, seed=0)
    loader = DataLoader(list(range(10)), batch_size=2, sampler=sampler)
    assert len(loader) == 5
    assert [len(b) for b in loader] == [2, 2]


def test_iter_returns_self_and_restarts_an_epoch() -> None:
    loader = DataLoader(list(range(5)), batch_size=2)
    assert iter(loader) is loader
    assert next(loader) == [0, 1]
    assert next(iter(loader)) == [0, 1]  # a new epoch
    assert list(loader) == [[0, 1], [2, 3], [4]]
    with pytest.raises(StopIteration):
        next(loader)
    fresh = DataLoader(list(range(3)), batch_size=2)
    assert next(fresh) == [0, 1]  # next() without iter() starts an epoch


def test_custom_sampler_and_seed_ignored_without_shuffle() -> None:
    loader = DataLoader(list("abcd"), batch_size=2, sampler=[3, 1, 0])
    assert list(loader) == [["d", "b"], ["a"]]
    assert list(DataLoader(list("abc"), seed=5)) == [["a"], ["b"], ["c"]]
    loader = DataLoader(list("abc"))
    assert isinstance(loader.sampler, SequentialSampler)
    assert loader.index_sampler is loader.sampler


# -- shuffling ---------------------------------------------------------------------


def flatten(loader: DataLoader) -> list[Any]:
    return [x for batch in loader for x in batch]


def test_shuffle_with_seed_is_reproducible_and_fresh_each_epoch() -> None:
    data = list(range(30))
    a = DataLoader(data, batch_size=4, shuffle=True, seed=42)
    b = DataLoader(data, batch_size=4, shuffle=True, seed=42)
    ea = [flatten(a) for _ in range(3)]
    eb = [flatten(b) for _ in range(3)]
    assert ea == eb
    assert all(sorted(e) == data for e in ea)
    assert ea[0] != ea[1] != ea[2]
    assert ea[0] != data


def test_shuffle_leaves_global_random_alone() -> None:
    random.seed(0)
    before = random.getstate()
    loader = DataLoader(list(range(10)), shuffle=True, seed=1)
    flatten(loader)
    flatten(DataLoader(list(range(10)), shuffle=True))
    assert random.getstate() == before


def test_shuffled_facility_like_batches_keep_inputs_and_targets_aligned() -> None:
    loader = DataLoader(facility_like(10), batch_size=4, shuffle=True, seed=3)
    for x, (u, s, c) in loader:
        for email, u_, s_, c_ in zip(x.data, u.data, s.data, c.data, strict=True):
            i = email.split()[-1]
            assert (u_, s_, c_) == (f"u{i}", f"s{i}", f"c{i}")


# -- errors ------------------------------------------------------------------------


def test_sampler_and_shuffle_are_mutually_exclusive() -> None:
    with pytest.raises(
        ValueError, match=r"^sampler option is mutually exclusive with shuffle$"
    ):
        DataLoader([1, 2], shuffle=True, sampler=[0, 1])
    DataLoader([1, 2], shuffle=False, sampler=[0, 1])  # fine


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"shuffle": 1}, ValueError, "shuffle"),
        ({"shuffle": "yes"}, ValueError, "shuffle"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": -1}, ValueError, "batch_size"),
        ({"batch_size": 2.0}, TypeError, "batch_size"),
        ({"batch_size": None}, TypeError, "batch_size"),
        ({"drop_last": "no"}, TypeError, "drop_last"),
        ({"sampler": 5}, TypeError, "sampler"),
    ],
)
def test_argument_errors(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        DataLoader([1, 2, 3], **kwargs)


# -- get_batch_size ----------------------------------------------------------------


def test_get_batch_size() -> None:
    x, y = next(iter(DataLoader(facility_like(5), batch_size=3)))
    assert get_batch_size((x, y)) == 3
    assert get_batch_size(x) == 3
    assert get_batch_size(Variable("a scalar string")) == 1  # difference 7
    assert get_batch_size(Variable(3.5)) == 1
    assert get_batch_size({"q": ["a", "b"], "n": [1, 2]}) == 2
    assert get_batch_size({"q": ("a", "b", "c")}) == 3
    assert get_batch_size({"v": Variable(["a", "b"])}) == 2
    assert get_batch_size({"v": Variable("a")}) == 1
    assert get_batch_size({"n": 7}) == 1
    # plain (TREC-like) samples: (["q0", "q1"], (["f0", "f1"], ["c0", "c1"]))
    trec_like = [("q0", ("f0", "c0")), ("q1", ("f1", "c1"))]
    assert get_batch_size(next(iter(DataLoader(trec_like, batch_size=2)))) == 2
    assert get_batch_size(["a", "b", "c"]) == 3
    assert get_batch_size([Variable(["a", "b"]), Variable(["c", "d"])]) == 2
    assert get_batch_size(5) == 1


@pytest.mark.parametrize("batch", [Variable([]), [], (), {}, {"q": []}, ([], [])])
def test_get_batch_size_empty(batch: Any) -> None:
    with pytest.raises(ValueError, match="empty"):
        get_batch_size(batch)
