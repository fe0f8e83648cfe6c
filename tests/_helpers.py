"""Small helpers several test modules share."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

__all__ = ["env_int", "load_script"]


def env_int(name: str, default: int) -> int:
    """The integer environment variable ``name`` (``default`` when unset or empty).

    Raises:
        pytest.UsageError: if it is set to something that is not an integer.
    """
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise pytest.UsageError(f"{name} must be an integer, got {value!r}") from None


def load_script(path: Path, name: str) -> Iterator[ModuleType]:
    """Import the script at ``path`` as the module ``name`` for as long as the
    generator runs (for a fixture: ``yield from load_script(...)``); it is registered
    in ``sys.modules`` meanwhile, as dataclasses look their module up."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
