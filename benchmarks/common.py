"""What the benchmarks share (not a benchmark itself):

* the Facility Support dataset as they find it: the default location of its
  ``dataset.json``, the ``--dataset`` option, the message when it is missing, and a
  temporary root laid out as :class:`~afnio.utils.datasets.FacilitySupport` expects
  (``two_stage.py``, ``urgency.py``, ``estimate_accuracy.py``);
* a live simulator with an afnio client on it set as the backward model client
  (also used by the tests).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import afnio
from afnio.models.openai import OpenAI
from afnio.testing import SIMULATOR_MODEL, Simulator
from afnio.utils.datasets.utils import default_data_root

__all__ = [
    "DATASET",
    "backward_client",
    "data_root",
    "dataset_missing",
    "parse_dataset_args",
    "simulated",
]

DATASET = Path(default_data_root()) / "FacilitySupport" / "raw" / "dataset.json"
"""Where :class:`FacilitySupport` keeps its file (``$AFNIO_DATA_DIR``, else
``~/.cache/afnio/data``): the default of ``--dataset``."""


def data_root(folder: Path, dataset: Path = DATASET) -> Path:
    """A root laid out as :class:`FacilitySupport` expects, holding a copy of
    ``dataset``."""
    root = folder / "data"
    raw = root / "FacilitySupport" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    shutil.copy(dataset, raw / "dataset.json")
    return root


def dataset_missing(path: Path) -> str:
    """The message for a missing Facility Support file: where it was looked for and
    the ``--dataset`` option."""
    return (
        f"no Facility Support dataset at {path}: pass --dataset path/to/dataset.json, "
        'or download it first with: python -c "from afnio.utils.datasets import '
        "FacilitySupport; FacilitySupport('train')\" (into $AFNIO_DATA_DIR, else "
        "~/.cache/afnio/data)"
    )


def parse_dataset_args(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> argparse.Namespace | None:
    """Add ``--dataset`` (default :data:`DATASET`) to ``parser`` and parse ``argv``.

    Returns the parsed arguments, or ``None`` after printing :func:`dataset_missing`
    to stderr when ``--dataset`` names no file (the caller exits with status 2).
    """
    parser.add_argument(
        "--dataset",
        type=Path,
        default=DATASET,
        help="Facility Support's dataset.json (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if not args.dataset.is_file():
        print(dataset_missing(args.dataset), file=sys.stderr)
        return None
    return args


@contextmanager
def backward_client(sim: Simulator) -> Iterator[OpenAI]:
    """An afnio client on ``sim`` (no retries), set as the backward model client with
    the simulator's model; closed on exit."""
    with OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as client:
        afnio.set_backward_model_client(
            client, completion_args={"model": SIMULATOR_MODEL}
        )
        yield client


@contextmanager
def simulated() -> Iterator[tuple[Simulator, OpenAI]]:
    """A latency-free simulator, an afnio client on it set as the backward client
    (:func:`backward_client`)."""
    with Simulator() as sim, backward_client(sim) as client:
        yield sim, client
