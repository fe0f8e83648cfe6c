"""Samplers: iterables of dataset indices, one pass (an *epoch*) per ``iter()``.

Every random sampler owns a private :class:`random.Random` created once, at
construction, from its ``seed``; it never reads or reseeds the global :mod:`random`
state. Each ``iter(sampler)`` draws a fresh order from that generator, so:

* two samplers built with the same ``seed`` produce the same sequence of epochs (a
  seeded run is reproducible from start to end);
* successive epochs of one sampler still differ;
* ``seed=None`` seeds the generator from system entropy.

The whole order of an epoch is drawn when ``iter()`` is called, so stopping an epoch
early does not change the following epochs.

Example::

    >>> from afnio.utils.data import RandomSampler
    >>> a = RandomSampler(range(5), seed=0)
    >>> b = RandomSampler(range(5), seed=0)
    >>> [list(a) for _ in range(3)] == [list(b) for _ in range(3)]
    True
    >>> sorted(a)  # without replacement: a permutation of the indices
    [0, 1, 2, 3, 4]
"""

from __future__ import annotations

import math
import numbers
import random
from collections.abc import Iterable, Iterator, Sized
from typing import Any, Generic, TypeVar

__all__ = [
    "RandomSampler",
    "Sampler",
    "SequentialSampler",
    "WeightedRandomSampler",
]

T_co = TypeVar("T_co", covariant=True)


def _make_rng(seed: int | None) -> random.Random:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(
            f"`seed` must be an int or None, got {type(seed).__name__} ({seed!r})."
        )
    return random.Random(seed)


def _check_num_samples(num_samples: Any) -> int:
    if (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, int)
        or num_samples <= 0
    ):
        raise ValueError(
            "`num_samples` should be a positive integer value, but got "
            f"num_samples={num_samples!r}."
        )
    return num_samples


def _rng_state_to_json(rng: random.Random) -> list[Any]:
    version, internal, gauss_next = rng.getstate()
    return [version, list(internal), gauss_next]


def _rng_state_from_json(state: Any) -> tuple[Any, ...]:
    try:
        version, internal, gauss_next = state
        return (int(version), tuple(int(x) for x in internal), gauss_next)
    except (TypeError, ValueError) as e:
        raise ValueError(f"Invalid sampler `rng_state`: {e}") from e


class Sampler(Generic[T_co]):
    """Base class of all samplers.

    A subclass implements ``__iter__`` (yielding dataset indices, or anything the
    dataset's ``__getitem__`` accepts) and usually ``__len__``.

    Args:
        data_source: accepted for compatibility; unused by the base class.

    Example::

        >>> class EvenSampler(Sampler[int]):
        ...     def __init__(self, n: int) -> None:
        ...         self.n = n
        ...     def __iter__(self):
        ...         return iter(range(0, self.n, 2))
        ...     def __len__(self) -> int:
        ...         return (self.n + 1) // 2
        >>> list(EvenSampler(5))
        [0, 2, 4]
    """

    def __init__(self, data_source: Sized | None = None) -> None:
        pass

    def __iter__(self) -> Iterator[T_co]:
        raise NotImplementedError(  # abstract: subclasses yield one epoch
            f"{type(self).__name__} must implement __iter__ (Sampler is abstract)."
        )


class SequentialSampler(Sampler[int]):
    """Yields ``0, 1, ..., len(data_source) - 1``, in order, every epoch.

    Args:
        data_source: anything with a ``len()`` (usually a Dataset).

    Example::

        >>> list(SequentialSampler(["a", "b", "c"]))
        [0, 1, 2]
    """

    def __init__(self, data_source: Sized) -> None:
        if not isinstance(data_source, Sized):
            raise TypeError(
                "`data_source` must have a length (implement __len__), got "
                f"{type(data_source).__name__}."
            )
        self.data_source = data_source

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.data_source)))

    def __len__(self) -> int:
        return len(self.data_source)


class RandomSampler(Sampler[int]):
    """Yields random indices of ``data_source``, a fresh order every epoch.

    Args:
        data_source: anything with a ``len()`` (usually a Dataset).
        replacement: draw with replacement (indices may repeat) if ``True``.
        num_samples: how many indices per epoch; defaults to ``len(data_source)``
            (read at each epoch, so it follows the dataset's size). Without
            replacement, more than ``len(data_source)`` gives whole permutations
            followed by a partial one.
        seed: seed of this sampler's private generator. The same seed gives the same
            sequence of epochs; ``None`` seeds from system entropy. The global
            :mod:`random` state is never used.

    Raises:
        TypeError: if ``replacement`` is not a bool, ``seed`` is not an int or None,
            or ``data_source`` has no length.
        ValueError: if ``num_samples`` is given and is not a positive int.

    Example::

        >>> s = RandomSampler(range(4), replacement=True, num_samples=10, seed=1)
        >>> len(s), len(list(s)), set(s) <= {0, 1, 2, 3}
        (10, 10, True)
    """

    def __init__(
        self,
        data_source: Sized,
        replacement: bool = False,
        num_samples: int | None = None,
        seed: int | None = None,
    ) -> None:
        if not isinstance(data_source, Sized):
            raise TypeError(
                "`data_source` must have a length (implement __len__), got "
                f"{type(data_source).__name__}."
            )
        if not isinstance(replacement, bool):
            raise TypeError(
                "`replacement` should be a boolean value, but got "
                f"replacement={replacement!r}."
            )
        if num_samples is not None:
            _check_num_samples(num_samples)
        self.data_source = data_source
        self.replacement = replacement
        self._num_samples = num_samples
        self.seed = seed
        self._rng = _make_rng(seed)

    @property
    def num_samples(self) -> int:
        """Indices per epoch: the given ``num_samples`` or ``len(data_source)``."""
        if self._num_samples is None:
            return len(self.data_source)
        return self._num_samples

    def __iter__(self) -> Iterator[int]:
        n = len(self.data_source)
        k = self.num_samples
        if k == 0:
            return iter([])
        if n == 0:
            raise ValueError(
                f"RandomSampler cannot draw num_samples={k} indices from an empty "
                "data_source."
            )
        rng = self._rng
        if self.replacement:
            order = rng.choices(range(n), k=k)
        else:
            order = []
            for _ in range(k // n):
                order.extend(rng.sample(range(n), n))
            order.extend(rng.sample(range(n), k % n))
        return iter(order)

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict[str, Any]:
        """The generator state (JSON-serialisable), to resume the same sequence of
        epochs later with :meth:`load_state_dict`."""
        return {"rng_state": _rng_state_to_json(self._rng)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`."""
        self._rng.setstate(_rng_state_from_json(state_dict["rng_state"]))


class WeightedRandomSampler(Sampler[int]):
    """Yields ``num_samples`` indices of ``weights``, index ``i`` drawn with
    probability proportional to ``weights[i]``; a fresh draw every epoch.

    With ``replacement=True`` each index is drawn independently. With
    ``replacement=False`` the indices are distinct and drawn as by successive weighted
    draws, each removing the picked index (the order is meaningful: the first index
    follows the weights exactly, the second follows them among the rest, ...).
    Zero-weight indices are never drawn. (Upstream afnio ignored the weights without
    replacement; here they are honoured.)

    Args:
        weights: a non-empty sequence of finite, non-negative numbers, not all zero
            (they need not sum to 1).
        num_samples: how many indices per epoch (a positive int).
        replacement: draw with replacement (default) or without.
        seed: seed of this sampler's private generator. The same seed gives the same
            sequence of epochs; ``None`` seeds from system entropy. The global
            :mod:`random` state is never used.

    Raises:
        TypeError: if ``weights`` is not a sequence of numbers, or ``seed`` is not an
            int or None.
        ValueError: for an empty ``weights``, a negative or non-finite weight, weights
            summing to zero, a non-positive or non-int ``num_samples``, a non-bool
            ``replacement``, or, without replacement, ``num_samples`` above the number
            of positive weights.

    Example::

        >>> s = WeightedRandomSampler([0.0, 1.0, 3.0], num_samples=5, seed=0)
        >>> 0 in list(s)
        False
        >>> sorted(WeightedRandomSampler([1, 1, 8], 3, replacement=False, seed=0))
        [0, 1, 2]
    """

    def __init__(
        self,
        weights: Iterable[float],
        num_samples: int,
        replacement: bool = True,
        seed: int | None = None,
    ) -> None:
        _check_num_samples(num_samples)
        if not isinstance(replacement, bool):
            raise ValueError(
                "`replacement` should be a boolean value, but got "
                f"replacement={replacement!r}."
            )
        self.weights = self._check_weights(weights)
        if not replacement:
            positive = sum(1 for w in self.weights if w > 0)
            if num_samples > len(self.weights):
                raise ValueError(
                    f"`num_samples` ({num_samples}) cannot exceed the number of "
                    f"weights ({len(self.weights)}) when replacement=False."
                )
            if num_samples > positive:
                raise ValueError(
                    f"`num_samples` ({num_samples}) cannot exceed the number of "
                    f"positive weights ({positive}) when replacement=False: "
                    "zero-weight indices are never drawn."
                )
        self.num_samples = num_samples
        self.replacement = replacement
        self.seed = seed
        self._rng = _make_rng(seed)

    @staticmethod
    def _check_weights(weights: Any) -> list[float]:
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Iterable):
            raise TypeError(
                "`weights` must be a sequence of numbers, got "
                f"{type(weights).__name__}."
            )
        values: list[float] = []
        for i, w in enumerate(weights):
            if not isinstance(w, numbers.Real):
                raise TypeError(
                    f"`weights` must hold only numbers; weights[{i}] is "
                    f"{type(w).__name__} ({w!r})."
                )
            w = float(w)
            if not math.isfinite(w):
                raise ValueError(f"`weights` must be finite; weights[{i}] is {w}.")
            if w < 0:
                raise ValueError(
                    f"`weights` must be non-negative; weights[{i}] is {w}."
                )
            values.append(w)
        if not values:
            raise ValueError("`weights` must not be empty.")
        if sum(values) <= 0:
            raise ValueError("`weights` must not sum to zero.")
        return values

    def __iter__(self) -> Iterator[int]:
        rng = self._rng
        n = len(self.weights)
        if self.replacement:
            return iter(rng.choices(range(n), weights=self.weights, k=self.num_samples))
        # Efraimidis-Spirakis: key_i = u_i ** (1 / w_i), the k largest keys win, in
        # decreasing key order; that is the distribution of successive weighted draws
        # without replacement. Computed as log(u_i) / w_i (same order, no underflow).
        keys: list[tuple[float, int]] = []
        for i, w in enumerate(self.weights):
            u = 1.0 - rng.random()  # in (0, 1]
            if w > 0:
                keys.append((math.log(u) / w, i))
        keys.sort(key=lambda pair: pair[0], reverse=True)
        return iter([i for _, i in keys[: self.num_samples]])

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict[str, Any]:
        """The generator state (JSON-serialisable), to resume the same sequence of
        epochs later with :meth:`load_state_dict`."""
        return {"rng_state": _rng_state_to_json(self._rng)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`."""
        self._rng.setstate(_rng_state_from_json(state_dict["rng_state"]))
