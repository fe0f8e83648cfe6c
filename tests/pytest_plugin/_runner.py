"""Run pytest on a throwaway project in a subprocess, in a clean environment (no
provider variables, no inherited pytest options), as a user's CI would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# one definition of the clean environment, shared with the benchmark
from benchmarks.replay_speed import clean_env, write_files

PYTEST_INI = "[pytest]\naddopts = -p no:cacheprovider\n"


def write_project(root: Path, files: dict[str, str]) -> Path:
    """A project folder: ``pytest.ini`` plus ``files`` (path: dedented text)."""
    root.mkdir(parents=True, exist_ok=True)
    return write_files(root, {"pytest.ini": PYTEST_INI, **files})


def run_pytest(
    project: Path, *args: str, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    """``python -m pytest *args`` in ``project``; stdout and stderr captured."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", *args],
        cwd=project,
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def output(run: subprocess.CompletedProcess[str]) -> str:
    """Everything a run printed."""
    return run.stdout + run.stderr
