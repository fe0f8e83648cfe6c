"""Shared by the LangChain tests that run on the live simulator (loopback): the
sentiment messages, the sentiment chain (``prompt | ChatOpenAI | StrOutputParser``),
a ``ChatOpenAI`` on the simulator, and a script run where afnio cannot be imported.
(The simulator with afnio's backward client set on it: ``benchmarks.common``'s
``simulated()`` and ``backward_client(sim)``.)

Import it after ``pytest.importorskip("langchain_openai")``: it needs the langchain
test extra.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain_openai", reason="needs the langchain test extra")

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI

from afnio.testing import SIMULATOR_MODEL, Simulator
from benchmarks.resume_kills import MESSAGES as _BENCHMARK_MESSAGES

__all__ = [
    "CLASSIFY",
    "MESSAGES",
    "TRAINSET",
    "WITHOUT_AFNIO",
    "exact",
    "run_without_afnio",
    "sentiment_chain",
    "sentiment_prompt",
    "sim_chat",
]

CLASSIFY = "Classify the sentiment of the message."
"""The sentiment chain's starting system prompt."""

MESSAGES: list[tuple[str, str]] = _BENCHMARK_MESSAGES[:8]
"""``(message, sentiment)``: the first 8 messages of ``benchmarks/resume_kills.py``."""

TRAINSET = [({"message": m}, t) for m, t in MESSAGES]
""":data:`MESSAGES` as ``optimize()`` rows: ``({"message": ...}, sentiment)``."""


def exact(prediction: str, target: str) -> int:
    """1 when the chain's answer is the target (white space aside), else 0."""
    return int(prediction.strip() == target)


def sim_chat(sim: Simulator, *, api_key: str = "k", **kwargs: Any) -> ChatOpenAI:
    """A ``ChatOpenAI`` on the simulator (its model, no retries); ``kwargs`` go to
    ``ChatOpenAI``."""
    return ChatOpenAI(
        model=SIMULATOR_MODEL,
        base_url=sim.base_url,
        api_key=api_key,
        max_retries=0,
        **kwargs,
    )


def sentiment_prompt() -> ChatPromptTemplate:
    """The system prompt :data:`CLASSIFY` and the human message ``{message}``."""
    return ChatPromptTemplate.from_messages(
        [("system", CLASSIFY), ("human", "{message}")]
    )


def sentiment_chain(sim: Simulator) -> Any:
    """``sentiment_prompt() | sim_chat(sim) | StrOutputParser()``."""
    return sentiment_prompt() | sim_chat(sim) | StrOutputParser()


WITHOUT_AFNIO = """
import importlib.abc, sys

class NoAfnio(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("afnio", "afnio_integrations"):
            raise ImportError(f"{name} must not be needed by this script")
        return None

sys.meta_path.insert(0, NoAfnio())
"""
"""The start of a script in which importing ``afnio`` or ``afnio_integrations`` (even
indirectly, through a loaded chain) raises ``ImportError``."""


def run_without_afnio(script: str, path: Path, api_key: str) -> Any:
    """Run :data:`WITHOUT_AFNIO` followed by ``script`` in a fresh interpreter, with
    ``path`` as its argument and ``OPENAI_API_KEY=api_key``; it must exit 0 (else the
    test fails with its stderr). Returns the JSON its last line of output holds."""
    file = path.with_name(f"{path.stem}_run.py")
    file.write_text(WITHOUT_AFNIO + script, "utf-8")
    result = subprocess.run(
        [sys.executable, str(file), str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "OPENAI_API_KEY": api_key},
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])
