"""The TREC question classification dataset (Li & Roth, 2002): questions labelled
with 6 coarse and 50 fine answer types."""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from typing import ClassVar

from afnio.utils.data.dataset import Dataset
from afnio.utils.datasets.utils import _choices, dataset_folder, ensure_file

__all__ = ["TREC", "parse_trec_lines"]

_SPLITS = {"train": "Train", "val": "Validation", "test": "Test"}
_TASKS = {"coarse": "Classify Coarse Labels", "fine": "Classify Fine Labels"}

Item = tuple[str, tuple[str, str]]


def parse_trec_lines(lines: Iterable[bytes]) -> list[Item]:
    """Parse raw lines of a TREC ``.label`` file into ``(text, (fine, coarse))``.

    Each line is ``FINE_LABEL text``, e.g. ``DESC:manner How did serfdom develop ?``;
    the coarse label is the part before ``:``. The byte ``0xF0`` (present in the
    upstream files) becomes a space; blank lines are skipped.

    Example::

        >>> parse_trec_lines([b"LOC:city What is the capital of\\xf0Peru ?\\n"])
        [('What is the capital of Peru ?', ('LOC:city', 'LOC'))]
    """
    items: list[Item] = []
    for raw in lines:
        raw = raw.replace(b"\xf0", b" ").strip()
        if not raw:
            continue
        try:
            line = raw.decode()
        except UnicodeDecodeError:
            line = raw.decode("latin-1")
        fine, _, text = line.partition(" ")
        items.append((text, (fine, fine.split(":", 1)[0])))
    return items


class TREC(Dataset[Item]):
    """The TREC question classification dataset.

    Items are **plain strings**: ``(question, (fine_label, coarse_label))``, e.g.
    ``("How did serfdom develop in and then leave Russia ?", ("DESC:manner",
    "DESC"))``. ``task`` chooses the label used to stratify the validation split and
    shown by ``repr``; both labels are always returned.

    * ``train``/``val``: ``train_5500.label`` (5452 lines, 5382 after removing
      duplicates), split per ``task`` label (stratified, in first-seen label order):
      each label's questions are shuffled with a private ``random.Random(42)``
      (upstream reseeded the global ``random`` with 42; the result is the same and
      the global state is left alone) and the first ``int(n * (1 -
      validation_split))`` of each label go to ``train``, the rest to ``val``.
    * ``test``: ``TREC_10.label`` (500 questions, in file order, not deduplicated).

    Files live in ``{root}/TREC/raw/``. **Verification:** by default a file is used
    only if it has the published MD5; otherwise it is downloaded (if ``download``)
    and a download is always verified. ``verify=False`` uses a present file as is,
    whatever its content: this is how local copies are used (the tests use small
    fixture files in the upstream format, with verification handled explicitly by
    passing ``verify=False``).

    Args:
        task: ``"coarse"`` or ``"fine"``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        validation_split: the fraction of each label's training questions held out
            for ``val``, in ``[0, 1)``; ``split="val"`` needs it above 0.
        root: the data folder; defaults to ``$AFNIO_DATA_DIR``, else
            ``~/.cache/afnio/data``.
        download: download a missing (or unverified) file.
        verify: check the files' MD5 (see above).

    Raises:
        ValueError: for an unknown ``task`` or ``split``, a ``validation_split``
            outside ``[0, 1)``, ``split="val"`` with ``validation_split=0``, or a
            split that would be empty.
        RuntimeError: if a file is missing or fails verification and ``download``
            is False, or every download mirror fails.

    Example::

        >>> train = TREC("coarse", "train", validation_split=0.2)  # doctest: +SKIP
        >>> question, (fine, coarse) = train[0]  # doctest: +SKIP
    """

    mirrors: ClassVar[tuple[str, ...]] = ("https://cogcomp.seas.upenn.edu/Data/QA/QC/",)
    resources: ClassVar[dict[str, tuple[str, str]]] = {
        "train": ("train_5500.label", "073462e3fcefaae31e00edb1f18d2d02"),
        "test": ("TREC_10.label", "323a3554401d86e650717e2d2f942589"),
    }

    def __init__(
        self,
        task: str,
        split: str,
        validation_split: float = 0.0,
        root: str | None = None,
        download: bool = True,
        *,
        verify: bool = True,
    ) -> None:
        if task not in _TASKS:
            raise ValueError(
                f"Invalid task {task!r}: choose one of {_choices(_TASKS)}."
            )
        if split not in _SPLITS:
            raise ValueError(
                f"Invalid split {split!r}: choose one of {_choices(_SPLITS)}."
            )
        if (
            isinstance(validation_split, bool)
            or not isinstance(validation_split, (int, float))
            or not 0.0 <= validation_split < 1.0
        ):
            raise ValueError(
                "`validation_split` must be a number in [0, 1), got "
                f"{validation_split!r}."
            )
        if split == "val" and validation_split == 0:
            raise ValueError(
                "split='val' needs validation_split > 0 (the validation set is held "
                "out of the training file)."
            )
        self.task = task
        self.split = split
        self.validation_split = float(validation_split)
        self.root, self.raw_folder = dataset_folder(root, type(self).__name__)

        filename, md5 = self.resources["test" if split == "test" else "train"]
        path = ensure_file(
            self.raw_folder,
            filename,
            md5,
            self.mirrors,
            download=download,
            verify=verify,
            dataset=type(self).__name__,
        )
        with open(path, "rb") as f:
            items = parse_trec_lines(f)
        if split == "test":
            self._items = items
        else:
            self._items = self._split(list(dict.fromkeys(items)), path)

    def _split(self, items: list[Item], path: os.PathLike[str]) -> list[Item]:
        label_index = 1 if self.task == "coarse" else 0
        groups: dict[str, list[Item]] = {}
        for item in items:
            groups.setdefault(item[1][label_index], []).append(item)
        rng = random.Random(42)
        train: list[Item] = []
        val: list[Item] = []
        for group in groups.values():
            rng.shuffle(group)
            cut = int(len(group) * (1 - self.validation_split))
            train.extend(group[:cut])
            val.extend(group[cut:])
        if not train:
            raise ValueError(
                f"TREC: the training split of {path} is empty with "
                f"validation_split={self.validation_split}; lower it."
            )
        if self.validation_split > 0 and not val:
            raise ValueError(
                f"TREC: the validation split of {path} is empty with "
                f"validation_split={self.validation_split}; raise it."
            )
        return train if self.split == "train" else val

    def __getitem__(self, index: int) -> Item:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(
                f"TREC indices must be integers, got {type(index).__name__}."
            )
        if not -len(self._items) <= index < len(self._items):
            raise IndexError(
                f"Index {index} out of range for TREC split {self.split!r} of "
                f"{len(self._items)} items."
            )
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        lines = [
            f"Number of datapoints: {len(self)}",
            f"Root location: {self.root}",
            f"Split: {_SPLITS[self.split]}",
            f"Task: {_TASKS[self.task]}",
        ]
        return "\n".join(
            [f"Dataset {type(self).__name__}"] + ["    " + x for x in lines]
        )
