"""``DataLoader``: iterates over a dataset in batches, collating each batch.

Collation (how the samples of one batch are combined):

* dicts become one dict ``{key: [value of each sample]}`` (values kept as they are);
* tuples are transposed position by position: a position holding Variables becomes
  **one batched Variable** ``Variable([v.data, ...], role=first.role,
  requires_grad=first.requires_grad)``, a position holding tuples is collated the
  same way (recursively), and any other position becomes a list; the result is a
  tuple;
* Variables become one batched Variable (as above);
* anything else stays a list of samples.

Even ``batch_size=1`` gives batched (list) data: ``Variable(["x"])``, not
``Variable("x")``.

Example::

    >>> from afnio import Variable
    >>> from afnio.utils.data import DataLoader
    >>> samples = [
    ...     (Variable(f"q{i}", role="question"), (Variable(f"a{i}", role="answer"),))
    ...     for i in range(5)
    ... ]
    >>> loader = DataLoader(samples, batch_size=2)
    >>> len(loader)
    3
    >>> x, (y,) = next(iter(loader))
    >>> x.data, x.role, y.data
    (['q0', 'q1'], 'question', ['a0', 'a1'])
    >>> [len(x.data) for x, _ in loader]
    [2, 2, 1]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from afnio._variable import Variable
from afnio.utils.data.dataset import Dataset
from afnio.utils.data.sampler import RandomSampler, Sampler, SequentialSampler

__all__ = ["DataLoader", "collate", "collate_tuple"]

T_co = TypeVar("T_co", covariant=True)


def _batch_variables(group: Sequence[Variable], where: str) -> Variable:
    first = group[0]
    try:
        return Variable(
            [v.data for v in group], role=first.role, requires_grad=first.requires_grad
        )
    except TypeError as e:
        raise TypeError(
            f"Cannot batch the Variables of {where} into one Variable (their data "
            f"must all be scalars of one kind, strings or numbers): {e}"
        ) from e


def collate_tuple(items: Sequence[tuple[Any, ...]], where: str = "the batch") -> tuple:
    """Collate a batch of tuples position by position (see the module docstring).

    Example::

        >>> from afnio import Variable
        >>> out = collate_tuple([(Variable("a"), 1), (Variable("b"), 2)])
        >>> out[0].data, out[1]
        (['a', 'b'], [1, 2])

    Raises:
        ValueError: if the tuples have different lengths.
    """
    lengths = {len(item) for item in items}
    if len(lengths) > 1:
        raise ValueError(
            f"Cannot collate tuples of different lengths {sorted(lengths)} in {where}."
        )
    collated: list[Any] = []
    for pos, group in enumerate(zip(*items, strict=True)):
        here = f"position {pos} of {where}"
        if all(isinstance(x, Variable) for x in group):
            collated.append(_batch_variables(group, here))
        elif all(isinstance(x, tuple) for x in group):
            collated.append(collate_tuple(group, here))
        else:
            collated.append(list(group))
    return tuple(collated)


def collate(batch: list[Any]) -> Any:
    """Combine a list of samples into one batch (the DataLoader's collation).

    Example::

        >>> collate([{"q": "a", "n": 1}, {"q": "b", "n": 2}])
        {'q': ['a', 'b'], 'n': [1, 2]}
        >>> collate(["x", "y"])
        ['x', 'y']
    """
    if not batch:
        return batch
    if all(isinstance(item, dict) for item in batch):
        keys = list(batch[0])
        for i, item in enumerate(batch):
            if set(item) != set(keys):
                raise ValueError(
                    "All dict samples of a batch must have the same keys: sample 0 "
                    f"has {sorted(map(str, keys))}, sample {i} has "
                    f"{sorted(map(str, item))}."
                )
        return {key: [item[key] for item in batch] for key in keys}
    if all(isinstance(item, tuple) for item in batch):
        return collate_tuple(batch)
    if all(isinstance(item, Variable) for item in batch):
        return _batch_variables(batch, "the batch")
    return list(batch)


class DataLoader(Generic[T_co]):
    """Iterates over ``dataset`` in batches of ``batch_size`` samples.

    Args:
        dataset: a map-style dataset (``dataset[i]`` and ``len(dataset)``), e.g. a
            :class:`~afnio.utils.data.Dataset` or a list.
        batch_size: samples per batch (a positive int).
        shuffle: a new random order every epoch if ``True`` (a
            :class:`~afnio.utils.data.RandomSampler`).
        sampler: the order of the indices (any iterable of indices, e.g. a
            :class:`~afnio.utils.data.Sampler`); mutually exclusive with
            ``shuffle=True``. Defaults to sequential order.
        drop_last: drop the last batch if it is smaller than ``batch_size``.
        seed: the seed of the RandomSampler created when ``shuffle=True`` (ignored
            otherwise). The same seed gives the same sequence of epochs, each epoch in
            a new order.

    Iterating gives batches collated as described in :mod:`afnio.utils.data.dataloader`.
    ``iter(loader)`` starts a new epoch and returns the loader itself.
    ``len(loader)`` is ``ceil(len(dataset) / batch_size)`` (floor with ``drop_last``);
    like upstream, it does not account for a sampler's ``num_samples``.

    Raises:
        ValueError: if ``shuffle`` is not a bool, ``sampler`` is given with
            ``shuffle=True``, or ``batch_size`` is not positive.
        TypeError: if ``batch_size`` is not an int, ``drop_last`` is not a bool, or
            ``sampler`` is not iterable.

    Example::

        >>> loader = DataLoader(list("abcde"), batch_size=2, shuffle=True, seed=0)
        >>> epoch1, epoch2 = list(loader), list(loader)
        >>> sorted(sum(epoch1, [])) == list("abcde")
        True
    """

    def __init__(
        self,
        dataset: Dataset[T_co] | Sequence[T_co],
        batch_size: int = 1,
        shuffle: bool = False,
        sampler: Sampler[Any] | Iterable[Any] | None = None,
        drop_last: bool = False,
        seed: int | None = None,
    ) -> None:
        if not isinstance(shuffle, bool):
            raise ValueError(f"`shuffle` must be a bool, got shuffle={shuffle!r}.")
        if sampler is not None and shuffle:
            raise ValueError("sampler option is mutually exclusive with shuffle")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise TypeError(
                f"`batch_size` must be an int, got {type(batch_size).__name__} "
                f"({batch_size!r})."
            )
        if batch_size <= 0:
            raise ValueError(
                f"`batch_size` must be a positive int, got batch_size={batch_size}."
            )
        if not isinstance(drop_last, bool):
            raise TypeError(f"`drop_last` must be a bool, got drop_last={drop_last!r}.")
        if sampler is not None and not isinstance(sampler, Iterable):
            raise TypeError(
                "`sampler` must be an iterable of indices (e.g. a Sampler), got "
                f"{type(sampler).__name__}."
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.drop_last = drop_last
        self.seed = seed
        if sampler is None:
            sampler = (
                RandomSampler(dataset, seed=seed)
                if shuffle
                else SequentialSampler(dataset)
            )
        self.sampler = sampler
        self.index_sampler = sampler  # upstream's name
        self._sampler_iter: Iterator[Any] | None = None

    def __iter__(self) -> DataLoader[T_co]:
        self._sampler_iter = iter(self.sampler)  # a new epoch
        return self

    def __next__(self) -> Any:
        if self._sampler_iter is None:  # next() without iter(): start an epoch
            self._sampler_iter = iter(self.sampler)
        batch: list[Any] = []
        for _ in range(self.batch_size):
            try:
                index = next(self._sampler_iter)
            except StopIteration:
                if not batch or self.drop_last:
                    raise
                break
            batch.append(self.dataset[index])
        return collate(batch)

    def __len__(self) -> int:
        n = len(self.dataset)
        if self.drop_last:
            return n // self.batch_size
        return math.ceil(n / self.batch_size)
