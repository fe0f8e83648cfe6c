"""``Dataset``: the base class of map-style datasets (indexable, with a length);
``IterableDataset``: the base class of iterable (streaming) datasets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

__all__ = ["Dataset", "IterableDataset"]

T_co = TypeVar("T_co", covariant=True)


class Dataset(Generic[T_co]):
    """A map-style dataset: ``dataset[i]`` returns the sample of index ``i`` and
    ``len(dataset)`` the number of samples.

    Subclasses implement ``__getitem__`` and ``__len__``. A sample is usually a
    Variable, a tuple (possibly nested) of Variables, or a dict; see
    :class:`~afnio.utils.data.DataLoader` for how samples are batched.

    Example::

        >>> from afnio import Variable
        >>> class Questions(Dataset):
        ...     def __init__(self, pairs):
        ...         self.pairs = pairs
        ...     def __getitem__(self, i):
        ...         q, a = self.pairs[i]
        ...         return Variable(q, role="question"), Variable(a, role="answer")
        ...     def __len__(self):
        ...         return len(self.pairs)
        >>> ds = Questions([("2+2?", "4"), ("Capital of Italy?", "Rome")])
        >>> len(ds), ds[1][1].data
        (2, 'Rome')
    """

    def __getitem__(self, index: int) -> T_co:
        raise NotImplementedError(  # abstract: subclasses return the sample
            f"{type(self).__name__} must implement __getitem__ (Dataset is abstract)."
        )

    def __len__(self) -> int:
        raise NotImplementedError(  # abstract: subclasses return the length
            f"{type(self).__name__} must implement __len__ (Dataset is abstract)."
        )


class IterableDataset(Dataset[T_co]):
    """An iterable (streaming) dataset: ``iter(dataset)`` yields the samples of one
    pass (an *epoch*), in the dataset's own order; there are no indices.

    Use it for data read as a stream (a file larger than memory, a generator): the
    :class:`~afnio.utils.data.DataLoader` batches the samples as they come, so only
    one batch is in memory. ``shuffle=`` and ``sampler=`` of the DataLoader cannot
    apply (there is nothing to index): the dataset orders its samples itself, e.g.
    :class:`~afnio.utils.data.JsonlDataset`'s shuffle buffer.

    Subclasses implement ``__iter__``; ``__len__`` is optional (the number of samples
    of an epoch, used for ``len(loader)`` and progress bars). To resume a
    :class:`~afnio.trainer.Trainer` run exactly in the middle of an epoch, a subclass
    also implements ``state_dict()`` (its position, JSON-serialisable, taken between
    samples) and ``load_state_dict(state)`` (the next ``iter()`` continues from
    there); without them the Trainer resumes by replaying the epoch from its start.

    Example::

        >>> from afnio import Variable
        >>> class Numbers(IterableDataset):
        ...     def __init__(self, n):
        ...         self.n = n
        ...     def __iter__(self):
        ...         return (Variable(str(i), role="number") for i in range(self.n))
        >>> [v.data for v in Numbers(3)]
        ['0', '1', '2']
    """

    def __iter__(self) -> Iterator[T_co]:
        raise NotImplementedError(  # abstract: subclasses yield one epoch
            f"{type(self).__name__} must implement __iter__ (IterableDataset is "
            "abstract)."
        )

    def __getitem__(self, index: int) -> T_co:
        raise TypeError(
            f"{type(self).__name__} is an IterableDataset: its samples have no index; "
            "iterate over it (or over a DataLoader of it) instead."
        )

    def __len__(self) -> int:
        raise TypeError(
            f"{type(self).__name__} is an IterableDataset without a length: define "
            "__len__ (the samples of one epoch) if it is known."
        )
