"""The public surface of afnio_integrations.langchain is pinned."""

from __future__ import annotations

import pytest

pytest.importorskip("langchain_core", reason="needs the langchain extra")

EXPECTED_ALL = [
    "AfnioRunnable",
    "AfnioTracingWarning",
    "ChainLoadError",
    "ChainSaveError",
    "LangChainChatModel",
    "OptimizeReport",
    "PlaceholderMismatchError",
    "PromptSlot",
    "TracedChain",
    "estimate",
    "find_prompt_slots",
    "heal_braces",
    "load_chain",
    "optimize",
    "save_chain",
    "trace",
]


def test_all_is_pinned() -> None:
    import afnio_integrations.langchain as lc

    assert sorted(lc.__all__) == EXPECTED_ALL
    for name in lc.__all__:
        assert hasattr(lc, name)
