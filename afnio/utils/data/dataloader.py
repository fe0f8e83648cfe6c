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
import numbers
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from afnio._variable import Variable
from afnio.utils.data.dataset import Dataset, IterableDataset
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


def _int_indices(indices: list[Any]) -> list[int] | None:
    """``indices`` as ints, or None if one is not an int (or unknown)."""
    if any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in indices):
        return None
    return [int(i) for i in indices]


class DataLoader(Generic[T_co]):
    """Iterates over ``dataset`` in batches of ``batch_size`` samples.

    Args:
        dataset: a map-style dataset (``dataset[i]`` and ``len(dataset)``), e.g. a
            :class:`~afnio.utils.data.Dataset` or a list; or an
            :class:`~afnio.utils.data.IterableDataset` (a stream, e.g.
            :class:`~afnio.utils.data.JsonlDataset`), whose samples are batched as
            they come, in the dataset's own order.
        batch_size: samples per batch (a positive int).
        shuffle: a new random order every epoch if ``True`` (a
            :class:`~afnio.utils.data.RandomSampler`). Not for an IterableDataset,
            which orders its samples itself (e.g. ``JsonlDataset(buffer_size=...)``).
        sampler: the order of the indices (any iterable of indices, e.g. a
            :class:`~afnio.utils.data.Sampler`); mutually exclusive with
            ``shuffle=True``. Defaults to sequential order. Not for an
            IterableDataset (``loader.sampler`` is then ``None``).
        drop_last: drop the last batch if it is smaller than ``batch_size``.
        seed: the seed of the RandomSampler created when ``shuffle=True`` (ignored
            otherwise). The same seed gives the same sequence of epochs, each epoch in
            a new order.

    Iterating gives batches collated as described in :mod:`afnio.utils.data.dataloader`.
    ``iter(loader)`` starts a new epoch and returns the loader itself.
    ``len(loader)`` is ``ceil(len(dataset) / batch_size)`` (floor with ``drop_last``);
    like upstream, it does not account for a sampler's ``num_samples``. Over an
    IterableDataset without ``__len__``, ``len(loader)`` raises ``TypeError``.

    ``loader.last_indices`` is the list of the dataset indices of the samples of the
    batch last yielded, in batch order (what the sampler gave, a shuffled one
    included): in-batch position ``i`` is sample ``dataset[last_indices[i]]``. Over an
    IterableDataset it holds the samples' row numbers when the dataset's iterator
    tells them (its ``last_row`` attribute after each sample, as
    :class:`~afnio.utils.data.JsonlDataset`'s does: the 0-based index of the row among
    the file's non-blank lines), else ``None``; ``None`` too before the first batch
    (and after :meth:`load_state_dict`, until the next batch) or when an index is
    not an int. A restored stream keeps them exact: ``JsonlDataset``'s state holds
    the row number of each row in its shuffle buffer, so the batches after a resume
    have the ``last_indices`` of an uninterrupted run.

    Over an IterableDataset that has ``state_dict``/``load_state_dict`` (such as
    ``JsonlDataset``), :meth:`state_dict` is the stream's position after the last
    batch yielded; the :class:`~afnio.trainer.Trainer` saves it in its checkpoints
    and restores it with :meth:`load_state_dict`, so a resumed ``fit`` continues
    with exactly the next batch. Several loaders may read one such dataset object
    (e.g. the train and val loaders of a ``fit``) when it tracks a position per
    reader, as ``JsonlDataset`` does (``restore(state)``, ``iterate_from(position)``
    and ``state_at(position)``, its iterators having ``position()``): each loader's
    state is then its own epoch's position, whatever the other loaders read since.

    Raises:
        ValueError: if ``shuffle`` is not a bool, ``sampler`` is given with
            ``shuffle=True``, ``shuffle=True`` or a ``sampler`` is given with an
            IterableDataset, or ``batch_size`` is not positive.
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
        self.iterable = isinstance(dataset, IterableDataset)
        if self.iterable and (shuffle or sampler is not None):
            option = "shuffle=True" if shuffle else "a sampler"
            raise ValueError(
                f"DataLoader: {option} cannot apply to {type(dataset).__name__}, an "
                "IterableDataset (its samples have no indices): let the dataset "
                "order them, e.g. JsonlDataset(path, ..., buffer_size=1000, seed=0) "
                "shuffles by buffer."
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.drop_last = drop_last
        self.seed = seed
        if sampler is None and not self.iterable:
            sampler = (
                RandomSampler(dataset, seed=seed)
                if shuffle
                else SequentialSampler(dataset)
            )
        self.sampler = sampler
        self.index_sampler = sampler  # upstream's name
        self._sampler_iter: Iterator[Any] | None = None
        self._batches = 0  # batches yielded in this epoch (an IterableDataset's)
        self._restored_batches = 0  # the count of a restored state, for its epoch
        # the stream ran out while the last (short) batch was built: the epoch is
        # over although the loader has not yet said so (its next batch is the end)
        self._exhausted = False
        self._restored_exhausted = False
        # a dataset several loaders can read, each at its own position (see the
        # class docstring): this loader's epoch is its own iterator's, and a
        # restored position is kept here until this loader's next iter()
        self._own_position = self.iterable and all(
            callable(getattr(dataset, name, None))
            for name in ("restore", "iterate_from", "state_at")
        )
        self._stream: Any = None  # this loader's iterator of the dataset
        self.last_indices: list[int] | None = None  # of the batch last yielded
        self._restored = False  # a restored position waits for the next iter()
        self._restored_position: Any = None
        # a restored state (batch count, exhausted) waits for the next iter()
        self._restored_pending = False

    def __iter__(self) -> DataLoader[T_co]:
        self._batches, self._restored_batches = self._restored_batches, 0
        self._exhausted, self._restored_exhausted = self._restored_exhausted, False
        restored, self._restored = self._restored, False
        self._restored_pending = False
        self._stream = None
        if self.iterable and self._exhausted:
            # restored after the epoch's last, short batch: nothing is left of it
            # (the dataset already stands before its next epoch)
            self._sampler_iter = iter(())
        elif self.iterable and restored:  # the rest of this loader's saved epoch
            self._stream = self.dataset.iterate_from(self._restored_position)  # type: ignore[attr-defined]
            self._sampler_iter = self._stream
        elif self.iterable:  # a new epoch (or one the dataset itself restored)
            self._sampler_iter = iter(self.dataset)  # type: ignore[call-overload]
            self._stream = self._sampler_iter
        else:
            self._sampler_iter = iter(self.sampler)  # a new epoch
        self._restored_position = None
        return self

    def __next__(self) -> Any:
        if self._sampler_iter is None:  # next() without iter(): start an epoch
            self.__iter__()
        if self.iterable:
            return self._next_streamed()
        batch: list[Any] = []
        indices: list[Any] = []
        for _ in range(self.batch_size):
            try:
                index = next(self._sampler_iter)
            except StopIteration:
                if not batch or self.drop_last:
                    raise
                break
            batch.append(self.dataset[index])
            indices.append(index)
        collated = collate(batch)
        self.last_indices = _int_indices(indices)
        return collated

    def _next_streamed(self) -> Any:
        """The next batch of an IterableDataset: ``batch_size`` samples as they
        come (fewer at the end of the epoch unless ``drop_last``)."""
        assert self._sampler_iter is not None
        batch: list[Any] = []
        rows: list[Any] = []
        for _ in range(self.batch_size):
            try:
                batch.append(next(self._sampler_iter))
                rows.append(getattr(self._sampler_iter, "last_row", None))
            except StopIteration:
                if not batch or self.drop_last:
                    # the epoch is over: the next one (what state_dict() now
                    # describes) starts with no batch done
                    self._batches = 0
                    self._exhausted = False
                    raise
                # the last batch, short: the stream is done (its state now says
                # "before the next epoch") but this epoch ends at the next call
                self._exhausted = True
                break
        self._batches += 1
        collated = collate(batch)
        self.last_indices = _int_indices(rows)
        return collated

    def _check_resumable(self) -> Any:
        dataset = self.dataset
        if not self.iterable:
            raise TypeError(
                "DataLoader.state_dict() is for an IterableDataset's position; a "
                "map-style loader resumes through its sampler's state_dict()."
            )
        if not (hasattr(dataset, "state_dict") and hasattr(dataset, "load_state_dict")):
            raise TypeError(
                f"{type(dataset).__name__} has no state_dict()/load_state_dict(): its "
                "position in an epoch cannot be saved (define both to resume exactly)."
            )
        return dataset

    def state_dict(self) -> dict[str, Any]:
        """The position of the stream after the last batch yielded (an
        IterableDataset with ``state_dict``, e.g. ``JsonlDataset``):
        ``{"dataset": <the dataset's state>, "batches": <batches of this epoch>,
        "exhausted": <the stream ran out building the last batch>}`` (after the
        epoch's last batch, when it was short, the dataset already stands before
        its next epoch: ``exhausted`` makes the restored loader end the saved epoch
        first, as the original one would). Right after :meth:`load_state_dict`
        (before the next ``iter()``), it is the loaded state.

        Raises:
            TypeError: a map-style dataset, or a dataset without ``state_dict``.
        """
        dataset = self._check_resumable()
        if self._own_position:  # this loader's own position, not the dataset's
            if self._restored:
                position = self._restored_position
            elif self._stream is not None and hasattr(self._stream, "position"):
                position = self._stream.position()
            else:  # no epoch begun (or the restored one is over): between epochs
                position = None
            dataset_state = dataset.state_at(position)
        else:
            dataset_state = dataset.state_dict()
        if self._restored_pending:  # restored, not iterated since: the loaded state
            return {
                "dataset": dataset_state,
                "batches": self._restored_batches,
                "exhausted": self._restored_exhausted,
            }
        return {
            "dataset": dataset_state,
            "batches": self._batches,
            "exhausted": self._exhausted,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: the next ``iter(loader)`` continues from the
        saved position (the rest of that epoch, or the next epoch).

        Raises:
            TypeError: as :meth:`state_dict`.
            ValueError: ``state`` is not a loader state (or the dataset refuses it).
        """
        dataset = self._check_resumable()
        if not isinstance(state, dict) or "dataset" not in state:
            raise ValueError(f"Not a DataLoader state: {state!r:.120}.")
        if self._own_position:
            # checked now; the dataset's shared parts (seed, epoch numbering) are
            # restored now, this loader's position at its next iter()
            self._restored_position = dataset.restore(state["dataset"])
            self._restored = True
        else:
            dataset.load_state_dict(state["dataset"])
        batches = state.get("batches", 0)
        self._restored_batches = batches if isinstance(batches, int) else 0
        self._restored_exhausted = state.get("exhausted") is True
        self._restored_pending = True
        self._sampler_iter = None
        self.last_indices = None  # no batch yielded from the restored position yet

    def __len__(self) -> int:
        n = len(self.dataset)
        if self.drop_last:
            return n // self.batch_size
        return math.ceil(n / self.batch_size)
