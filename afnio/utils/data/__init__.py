"""Datasets, data loaders and samplers, modelled on ``torch.utils.data``.

* :class:`Dataset`: the base class of map-style datasets;
* :class:`IterableDataset`: the base class of iterable (streaming) datasets, and
  :class:`JsonlDataset`, one over a JSON Lines file larger than memory (validated
  rows, shuffling by buffer, sharding, an exact resume); :class:`JsonlRowError` is
  what a bad line raises;
* :class:`DataLoader`: batches a dataset, collating samples into batched Variables;
* :class:`SequentialSampler`, :class:`RandomSampler`, :class:`WeightedRandomSampler`:
  the order of the indices. Random samplers own a private ``random.Random(seed)``:
  a seed makes a whole run reproducible, each epoch still gets a fresh order, and the
  global :mod:`random` state is never touched.

``get_batch_size(batch)`` (the number of samples in a collated batch) is available
here too, outside ``__all__``.

Example::

    >>> from afnio import Variable
    >>> from afnio.utils.data import DataLoader, WeightedRandomSampler
    >>> samples = [Variable(t, role="message") for t in ["hi", "hello", "hey"]]
    >>> sampler = WeightedRandomSampler([1, 1, 2], num_samples=4, seed=0)
    >>> batch = next(iter(DataLoader(samples, batch_size=4, sampler=sampler)))
    >>> batch.role, len(batch.data), get_batch_size(batch)
    ('message', 4, 4)
"""

from afnio.utils.data.dataloader import DataLoader
from afnio.utils.data.dataset import Dataset, IterableDataset
from afnio.utils.data.jsonl import JsonlDataset, JsonlRowError
from afnio.utils.data.sampler import (
    RandomSampler,
    Sampler,
    SequentialSampler,
    WeightedRandomSampler,
)
from afnio.utils.data.utils import get_batch_size as get_batch_size

__all__ = [
    "DataLoader",
    "Dataset",
    "IterableDataset",
    "JsonlDataset",
    "JsonlRowError",
    "RandomSampler",
    "Sampler",
    "SequentialSampler",
    "WeightedRandomSampler",
]
