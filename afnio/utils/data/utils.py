"""Helpers for batches produced by :class:`~afnio.utils.data.DataLoader`."""

from __future__ import annotations

from typing import Any

from afnio._variable import Variable

__all__ = ["get_batch_size"]

_STRUCTURES = (Variable, dict, tuple, list)


def get_batch_size(batch: Any) -> int:
    """The number of samples in a collated batch.

    Rules:

    * a Variable: ``len(data)`` for a batched (list) Variable, **1 for a scalar
      Variable** (upstream returned the string's length for a scalar ``str``);
    * a dict: the size of its first value (a list or tuple: its length; a Variable:
      as above; anything else: 1);
    * a tuple or list whose first element is a Variable, dict, tuple or list: the
      size of that first element (a collated tuple like ``(x, (y1, y2))``);
    * a tuple or list of plain values (e.g. ``["q0", "q1"]``, the collated form of
      plain samples): its length;
    * anything else: 1.

    Example::

        >>> from afnio import Variable
        >>> get_batch_size((Variable(["a", "b"]), (Variable(["x", "y"]),)))
        2
        >>> get_batch_size({"text": ["a", "b", "c"]})
        3
        >>> get_batch_size(Variable("a scalar"))
        1

    Raises:
        ValueError: if the batch is empty (size 0).
    """
    size = _size(batch)
    if size == 0:
        raise ValueError(f"The batch is empty (size 0): {batch!r:.200}")
    return size


def _variable_size(var: Variable) -> int:
    return len(var.data) if isinstance(var.data, list) else 1


def _size(batch: Any) -> int:
    if isinstance(batch, Variable):
        return _variable_size(batch)
    if isinstance(batch, dict):
        if not batch:
            return 0
        first = next(iter(batch.values()))
        if isinstance(first, (list, tuple)):
            return len(first)
        if isinstance(first, Variable):
            return _variable_size(first)
        return 1
    if isinstance(batch, (tuple, list)):
        if not batch:
            return 0
        if isinstance(batch[0], _STRUCTURES):
            return _size(batch[0])
        return len(batch)
    return 1
