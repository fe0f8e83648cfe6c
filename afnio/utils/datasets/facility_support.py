"""Meta's Facility Support Analyzer dataset: 200 facility-support emails labelled
with urgency, sentiment and ten service categories."""

from __future__ import annotations

import json
import random
from typing import Any

from afnio._variable import Variable
from afnio.utils.data.dataset import Dataset
from afnio.utils.datasets.utils import _choices, dataset_folder, ensure_file

__all__ = ["FacilitySupport"]

_SPLITS = {"train": "Train", "val": "Validation", "test": "Test"}


class FacilitySupport(Dataset[tuple[Variable, tuple[Variable, Variable, Variable]]]):
    """The Facility Support Analyzer dataset (from Meta's llama-prompt-ops, MIT).

    The 200 emails are shuffled with ``random.Random(0)`` and split into ``train``
    (66), ``val`` (66) and ``test`` (68). Each item is::

        (Variable(email, role="input email or message"),
         (Variable(urgency, role="output urgency"),          # low | medium | high
          Variable(sentiment, role="output sentiment"),      # negative|neutral|positive
          Variable(categories_json, role="output categories")))

    where ``categories_json`` is ``json.dumps`` of the ten boolean category flags.

    The file lives at ``{root}/FacilitySupport/raw/dataset.json``. If it is there
    with the published MD5 nothing is downloaded.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        root: the data folder; defaults to ``$AFNIO_DATA_DIR``, else
            ``~/.cache/afnio/data``.
        download: download the file if it is missing (or fails verification).
        verify: check the file's MD5; ``verify=False`` uses a present file as is.

    Raises:
        ValueError: for an unknown ``split``.
        RuntimeError: if the file is missing or corrupted and ``download`` is
            False, or if every download mirror fails.

    Example::

        >>> from afnio.utils.data import DataLoader
        >>> train = FacilitySupport("train")  # doctest: +SKIP
        >>> email, (urgency, sentiment, categories) = train[0]  # doctest: +SKIP
        >>> batch = next(iter(DataLoader(train, batch_size=4)))  # doctest: +SKIP
        >>> len(batch[0].data), batch[1][0].role  # doctest: +SKIP
        (4, 'output urgency')
    """

    mirrors = (
        "https://raw.githubusercontent.com/meta-llama/llama-prompt-ops/refs/heads/"
        "main/use-cases/facility-support-analyzer/",
        "https://raw.githubusercontent.com/meta-llama/prompt-ops/refs/heads/"
        "main/use-cases/facility-support-analyzer/",
    )
    resources = (("dataset.json", "530dc66b1b07c9b15b19f08891e9bfa0"),)

    def __init__(
        self,
        split: str,
        root: str | None = None,
        download: bool = True,
        *,
        verify: bool = True,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(
                f"Invalid split {split!r}: choose one of {_choices(_SPLITS)}."
            )
        self.split = split
        self.root, self.raw_folder = dataset_folder(root, type(self).__name__)
        filename, md5 = self.resources[0]
        path = ensure_file(
            self.raw_folder,
            filename,
            md5,
            self.mirrors,
            download=download,
            verify=verify,
            dataset=type(self).__name__,
        )
        self._items = self._load(path, split)

    @staticmethod
    def _load(path: Any, split: str) -> list[tuple[str, str, str, str]]:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
        items: list[tuple[str, str, str, str]] = []
        for i, record in enumerate(records):
            try:
                answer = json.loads(record["answer"])
                items.append(
                    (
                        record["fields"]["input"],
                        answer["urgency"],
                        answer["sentiment"],
                        json.dumps(answer["categories"]),
                    )
                )
            except (KeyError, TypeError, ValueError) as e:
                raise RuntimeError(
                    f"FacilitySupport: malformed record {i} in {path}: {e!r}"
                ) from e
        random.Random(0).shuffle(items)
        cut = int(0.33 * len(items))
        if split == "train":
            return items[:cut]
        if split == "val":
            return items[cut : 2 * cut]
        return items[2 * cut :]

    def __getitem__(
        self, index: int
    ) -> tuple[Variable, tuple[Variable, Variable, Variable]]:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(
                f"FacilitySupport indices must be integers, got {type(index).__name__}."
            )
        if not -len(self._items) <= index < len(self._items):
            raise IndexError(
                f"Index {index} out of range for FacilitySupport split {self.split!r} "
                f"of {len(self._items)} items."
            )
        email, urgency, sentiment, categories = self._items[index]
        return (
            Variable(email, role="input email or message"),
            (
                Variable(urgency, role="output urgency"),
                Variable(sentiment, role="output sentiment"),
                Variable(categories, role="output categories"),
            ),
        )

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        lines = [
            f"Number of datapoints: {len(self)}",
            f"Root location: {self.root}",
            f"Split: {_SPLITS[self.split]}",
        ]
        return "\n".join(
            [f"Dataset {type(self).__name__}"] + ["    " + x for x in lines]
        )
