"""Samplers: private generators (reproducible runs, fresh epochs, global ``random``
untouched), weights honoured with and without replacement, argument errors."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from afnio.utils.data import (
    RandomSampler,
    Sampler,
    SequentialSampler,
    WeightedRandomSampler,
)


def epochs(sampler: Sampler, n: int = 3) -> list[list[int]]:
    return [list(sampler) for _ in range(n)]


# -- base and sequential -----------------------------------------------------------


def test_base_sampler_is_abstract() -> None:
    with pytest.raises(NotImplementedError, match="abstract"):
        iter(Sampler())


def test_sequential_sampler() -> None:
    s = SequentialSampler(["a", "b", "c"])
    assert epochs(s, 2) == [[0, 1, 2], [0, 1, 2]]
    assert len(s) == 3
    assert list(SequentialSampler([])) == []
    with pytest.raises(TypeError, match="data_source"):
        SequentialSampler(iter([1, 2]))  # type: ignore[arg-type]


# -- RandomSampler -----------------------------------------------------------------


def test_random_sampler_same_seed_same_epochs() -> None:
    a = RandomSampler(range(20), seed=123)
    b = RandomSampler(range(20), seed=123)
    assert epochs(a) == epochs(b)
    c = RandomSampler(range(20), seed=124)
    d = RandomSampler(range(20), seed=123)
    assert epochs(c) != epochs(d)


def test_random_sampler_fresh_order_each_epoch() -> None:
    s = RandomSampler(range(20), seed=0)
    e1, e2, e3 = epochs(s)
    assert sorted(e1) == sorted(e2) == sorted(e3) == list(range(20))
    assert e1 != e2 and e2 != e3 and e1 != e3


def test_random_sampler_unseeded_differs_between_instances() -> None:
    # seeded from system entropy: two 30-item permutations collide with p = 1/30!
    assert list(RandomSampler(range(30))) != list(RandomSampler(range(30)))


def test_random_sampler_never_touches_global_random() -> None:
    random.seed(2024)
    before = random.getstate()
    for seed in (None, 0, 7):
        s = RandomSampler(range(10), seed=seed)
        epochs(s)
        epochs(RandomSampler(range(10), replacement=True, num_samples=15, seed=seed))
        w = WeightedRandomSampler([1, 2, 3], 3, replacement=False, seed=seed)
        epochs(w)
        epochs(WeightedRandomSampler([1, 2, 3], 8, seed=seed))
    assert random.getstate() == before


def test_random_sampler_ignores_global_seed() -> None:
    random.seed(1)
    a = epochs(RandomSampler(range(10), seed=5))
    random.seed(2)
    b = epochs(RandomSampler(range(10), seed=5))
    assert a == b


def test_random_sampler_order_drawn_at_iter_time() -> None:
    # stopping an epoch early does not change the next epochs
    a = RandomSampler(range(10), seed=3)
    b = RandomSampler(range(10), seed=3)
    it = iter(a)
    next(it)
    list(b)
    assert list(a) == list(b)


def test_random_sampler_num_samples_without_replacement() -> None:
    s = RandomSampler(range(3), num_samples=7, seed=0)
    order = list(s)
    assert len(s) == len(order) == 7
    assert sorted(order[:3]) == sorted(order[3:6]) == [0, 1, 2]
    assert set(Counter(order).values()) <= {2, 3}
    short = list(RandomSampler(range(10), num_samples=4, seed=0))
    assert len(short) == len(set(short)) == 4


def test_random_sampler_with_replacement() -> None:
    s = RandomSampler(range(5), replacement=True, num_samples=200, seed=0)
    order = list(s)
    assert len(order) == 200 and set(order) == set(range(5))
    assert len(RandomSampler(range(5), replacement=True, seed=0)) == 5


def test_random_sampler_num_samples_follows_dataset_length() -> None:
    data = [1, 2, 3]
    s = RandomSampler(data, seed=0)
    assert len(s) == 3
    data.append(4)
    assert len(s) == 4 and sorted(s) == [0, 1, 2, 3]
    assert list(RandomSampler([], seed=0)) == []
    with pytest.raises(ValueError, match="empty"):
        iter(RandomSampler([], num_samples=2, seed=0))


@pytest.mark.parametrize("num_samples", [0, -1, 2.0, "3", True])
def test_random_sampler_bad_num_samples(num_samples: object) -> None:
    with pytest.raises(ValueError, match="num_samples"):
        RandomSampler(range(3), num_samples=num_samples)  # type: ignore[arg-type]


def test_random_sampler_bad_arguments() -> None:
    with pytest.raises(TypeError, match="replacement"):
        RandomSampler(range(3), replacement=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed"):
        RandomSampler(range(3), seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="data_source"):
        RandomSampler(object())  # type: ignore[arg-type]


def test_sampler_state_dict_resumes_the_sequence() -> None:
    a = RandomSampler(range(12), seed=9)
    list(a)
    state = json.loads(json.dumps(a.state_dict()))  # JSON-serialisable
    expected = epochs(a, 2)
    b = RandomSampler(range(12), seed=None)
    b.load_state_dict(state)
    assert epochs(b, 2) == expected

    w = WeightedRandomSampler([1, 2, 3, 4], 3, replacement=False, seed=1)
    state = json.loads(json.dumps(w.state_dict()))
    expected = epochs(w, 2)
    w2 = WeightedRandomSampler([1, 2, 3, 4], 3, replacement=False)
    w2.load_state_dict(state)
    assert epochs(w2, 2) == expected
    with pytest.raises(ValueError, match="rng_state"):
        w2.load_state_dict({"rng_state": "nonsense"})


# -- WeightedRandomSampler ---------------------------------------------------------


@pytest.mark.parametrize("replacement", [True, False])
def test_weighted_same_seed_same_epochs_and_fresh_epochs(replacement: bool) -> None:
    a = WeightedRandomSampler([1, 2, 3, 4, 5, 6], 4, replacement=replacement, seed=11)
    b = WeightedRandomSampler([1, 2, 3, 4, 5, 6], 4, replacement=replacement, seed=11)
    ea, eb = epochs(a, 5), epochs(b, 5)
    assert ea == eb
    assert len({tuple(e) for e in ea}) > 1  # epochs differ
    assert all(len(e) == 4 for e in ea)
    assert len(a) == 4


def test_weighted_with_replacement_honours_weights() -> None:
    s = WeightedRandomSampler([1, 1, 8], num_samples=5000, seed=0)
    counts = Counter(s)
    # expected 4000 (p = 0.8, sd ~ 28): the bounds are ~ +-5 sd
    assert 3860 <= counts[2] <= 4140
    assert 360 <= counts[0] <= 640 and 360 <= counts[1] <= 640


def test_weighted_without_replacement_honours_weights() -> None:
    # k = 1: the drawn index follows the weights exactly (uniform would give 1/3)
    s = WeightedRandomSampler([1, 1, 8], num_samples=1, replacement=False, seed=0)
    firsts = Counter(next(iter(s)) for _ in range(2000))
    assert 1500 <= firsts[2] <= 1700  # expected 1600, sd ~ 18
    assert firsts[0] > 100 and firsts[1] > 100


def test_weighted_without_replacement_is_successive_draws() -> None:
    # k = 2 from [1, 1, 8]: distinct indices; the second position is index 2 when
    # the first draw missed it (p = 0.2) and the second hit it among the rest (8/9):
    # p = 0.2 * 8/9 ~ 0.178 (sd ~ 0.007 over 3000 epochs); {0, 1} has p = 2/90
    s = WeightedRandomSampler([1, 1, 8], num_samples=2, replacement=False, seed=1)
    runs = epochs(s, 3000)
    assert all(len(set(r)) == 2 for r in runs)
    second_is_2 = sum(r[1] == 2 for r in runs) / len(runs)
    assert 0.145 <= second_is_2 <= 0.21
    without_2 = sum(2 not in r for r in runs) / len(runs)
    assert without_2 < 0.05
    # all indices, in a weighted order
    full = WeightedRandomSampler([1, 2, 3, 4], 4, replacement=False, seed=2)
    assert all(sorted(e) == [0, 1, 2, 3] for e in epochs(full, 20))


def test_weighted_zero_weights_never_drawn() -> None:
    s = WeightedRandomSampler([0, 3, 0, 1], num_samples=500, seed=0)
    assert set(s) == {1, 3}
    s = WeightedRandomSampler([0, 3, 0, 1], num_samples=2, replacement=False, seed=0)
    assert all(sorted(e) == [1, 3] for e in epochs(s, 20))
    # tiny weights do not underflow into ties
    tiny = WeightedRandomSampler([1e-300, 1.0], 2, replacement=False, seed=0)
    assert Counter(next(iter(tiny)) for _ in range(200))[1] == 200


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"weights": [1, -1], "num_samples": 1}, ValueError, "non-negative"),
        ({"weights": [0, 0], "num_samples": 1}, ValueError, "sum to zero"),
        ({"weights": [], "num_samples": 1}, ValueError, "empty"),
        ({"weights": [1, float("nan")], "num_samples": 1}, ValueError, "finite"),
        ({"weights": [1, float("inf")], "num_samples": 1}, ValueError, "finite"),
        ({"weights": [1, "2"], "num_samples": 1}, TypeError, r"weights\[1\]"),
        ({"weights": "12", "num_samples": 1}, TypeError, "weights"),
        ({"weights": 3, "num_samples": 1}, TypeError, "weights"),
        ({"weights": [1, 2], "num_samples": 0}, ValueError, "num_samples"),
        ({"weights": [1, 2], "num_samples": -2}, ValueError, "num_samples"),
        ({"weights": [1, 2], "num_samples": 1.0}, ValueError, "num_samples"),
        ({"weights": [1, 2], "num_samples": True}, ValueError, "num_samples"),
        (
            {"weights": [1, 2], "num_samples": 1, "replacement": "no"},
            ValueError,
            "replacement",
        ),
        (
            {"weights": [1, 2], "num_samples": 3, "replacement": False},
            ValueError,
            r"num_samples.*number of weights",
        ),
        (
            {"weights": [1, 0, 2], "num_samples": 3, "replacement": False},
            ValueError,
            r"num_samples.*positive weights",
        ),
        ({"weights": [1, 2], "num_samples": 1, "seed": "x"}, TypeError, "seed"),
    ],
)
def test_weighted_argument_errors(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        WeightedRandomSampler(**kwargs)  # type: ignore[arg-type]


def test_weighted_accepts_any_numbers() -> None:
    s = WeightedRandomSampler((1, 2.5, 0), 3, seed=0)
    assert s.weights == [1.0, 2.5, 0.0]
    # more draws than weights is fine with replacement
    assert len(list(WeightedRandomSampler([1], 5, seed=0))) == 5
