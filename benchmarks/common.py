"""What the benchmarks share (not a benchmark itself):

* the Facility Support dataset as they find it: the default location of its
  ``dataset.json``, the ``--dataset`` option, the message when it is missing, and a
  temporary root laid out as :class:`~afnio.utils.datasets.FacilitySupport` expects
  (``two_stage.py``, ``urgency.py``, ``estimate_accuracy.py``);
* a live simulator with an afnio client on it set as the backward model client
  (also used by the tests);
* the simulator in its own process, so that a benchmark's process measures only the
  client: :func:`served` (``python -m afnio.testing serve``), and
  :class:`PipedProcess` with :func:`answer_commands`, a child that prints its base
  URL and then answers commands on a stdin/stdout pipe with its counters
  (``client_cpu.py``, ``rate_limits.py``, ``batch_api.py``, ``memory_growth.py``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TextIO

import afnio
from afnio.models.openai import OpenAI
from afnio.testing import SIMULATOR_MODEL, Simulator
from afnio.utils.datasets.utils import default_data_root

__all__ = [
    "DATASET",
    "PipedProcess",
    "answer_commands",
    "backward_client",
    "data_root",
    "dataset_missing",
    "parse_dataset_args",
    "served",
    "simulated",
]

ROOT = Path(__file__).resolve().parent.parent
"""The checkout: the working directory of the simulator processes."""

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


# -- the simulator in its own process --------------------------------------------------


def _stop(proc: subprocess.Popen[str], timeout: float = 10.0) -> None:
    """Wait ``timeout`` seconds for ``proc`` to exit, then kill it; close its pipes."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            with suppress(OSError):  # a write buffered for a child that exited
                pipe.close()


@contextmanager
def served(latency: float, *extra_args: str) -> Iterator[str]:
    """``python -m afnio.testing serve --port 0 --latency L [extra_args...]`` in its
    own process; yields its base URL, stops it (SIGTERM, then SIGKILL after 10 s) on
    exit. ``extra_args``: more of the CLI's options (``"--rpm", "600"``)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "afnio.testing",
            "serve",
            "--port",
            "0",
            "--latency",
            str(latency),
            *extra_args,
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(ROOT),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "serving at " not in line:
            raise RuntimeError(f"the simulator did not start: {line.strip()!r}")
        yield line.split("serving at ", 1)[1].strip()
    finally:
        if proc.poll() is None:
            proc.terminate()
        _stop(proc)


class PipedProcess:
    """A child Python process on a pipe: started as ``python *args`` (from the
    checkout), its first stdout line is its base URL (:attr:`base_url`), then it
    answers each command written to its stdin with one JSON line (:meth:`ask`); the
    child's side is :func:`answer_commands`. :meth:`close` (or leaving the ``with``
    block) sends ``quit``."""

    def __init__(self, *args: str) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=str(ROOT),
        )
        try:
            self.base_url = self._readline()
        except BaseException:
            self.close()
            raise

    def _readline(self) -> str:
        out: TextIO | None = self._proc.stdout
        assert out is not None
        line = out.readline()
        if not line:
            raise RuntimeError(
                f"the simulator process exited (status {self._proc.poll()})"
            )
        return line.strip()

    def ask(self, command: str) -> dict[str, Any]:
        """Send ``command`` (one line); its answer, one JSON object."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        return json.loads(self._readline())

    def close(self) -> None:
        """Send ``quit`` and wait for the process (killed after 10 s)."""
        if self._proc.poll() is None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write("quit\n")
                self._proc.stdin.flush()
            except OSError:
                self._proc.kill()
        _stop(self._proc)

    def __enter__(self) -> PipedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def answer_commands(
    base_url: str,
    handlers: Mapping[str, Callable[[str], Mapping[str, Any]]],
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> None:
    """The child's side of :class:`PipedProcess`: print ``base_url``, then answer
    each stdin line ``COMMAND [ARG]`` with ``handlers[COMMAND](ARG)`` as one JSON
    line (an ``error`` object for an unknown command) until ``quit`` or the end of
    the input."""
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    print(base_url, file=stdout, flush=True)
    for line in stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "quit":
            break
        handler = handlers.get(command)
        answer = (
            {"error": f"unknown command {line.strip()!r}"}
            if handler is None
            else handler(arg)
        )
        print(json.dumps(answer), file=stdout, flush=True)
