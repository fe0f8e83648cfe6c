"""Shared test fixtures: every test is offline and leaves afnio's global state as it
found it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import afnio


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach a real provider: drop provider variables, set a dummy key."""
    import os

    for name in list(os.environ):
        if name.startswith(("OPENAI_", "LANGSMITH_", "LANGCHAIN_")):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "test-dummy-key")


@pytest.fixture(autouse=True)
def _restore_concurrency() -> Iterator[None]:
    before = afnio.get_max_concurrency()
    yield
    afnio.set_max_concurrency(before)
