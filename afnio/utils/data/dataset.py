"""``Dataset``: the base class of map-style datasets (indexable, with a length)."""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["Dataset"]

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
