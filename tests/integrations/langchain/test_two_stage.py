"""Credit assignment through two stages as a traced LangChain chain (issue 17, item
6): ``prompt | llm | StrOutputParser() | (lambda: {"feeling": ...}) | prompt | llm |
StrOutputParser()``, optimized by ``optimize`` on the simulator, learns a first
prompt that only the second stage's feedback can teach (see
``benchmarks/two_stage.py`` and ``tests/trainer/test_two_stage.py``, which runs the
controls on the same program as an afnio Module)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("langchain_openai", reason="needs the langchain test extra")

from benchmarks import two_stage
from tests._shared_data import SHARED_DATASET, needs_shared_dataset

pytestmark = needs_shared_dataset("the two-stage learning experiment")


def test_a_traced_two_stage_chain_learns_its_first_prompt(tmp_path: Path) -> None:
    root = two_stage.data_root(tmp_path, SHARED_DATASET)
    runs = [two_stage.run("chain", "real", seed, root, tmp_path) for seed in (0, 1, 2)]
    assert two_stage.learning_problems(runs, min_gain=0.15) == []
