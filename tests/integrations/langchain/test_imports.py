"""The public surface of afnio_integrations.langchain is pinned."""

from __future__ import annotations

import pytest

pytest.importorskip("langchain_core", reason="needs the langchain extra")

EXPECTED_ALL = [
    "AfnioRunnable",
    "AfnioTracingWarning",
    "AgentOutput",
    "ChainLoadError",
    "ChainSaveError",
    "LangChainChatModel",
    "OptimizeReport",
    "PlaceholderMismatchError",
    "PromptSlot",
    "TracedChain",
    "TrajectoryMode",
    "answer_match",
    "estimate",
    "expected_tools",
    "final_answer_of",
    "find_prompt_slots",
    "heal_braces",
    "load_chain",
    "optimize",
    "save_chain",
    "tool_calls_of",
    "trace",
    "trainable",
    "trajectory_match",
]


def test_all_is_pinned() -> None:
    import afnio_integrations.langchain as lc

    assert sorted(lc.__all__) == EXPECTED_ALL
    for name in lc.__all__:
        assert hasattr(lc, name)
