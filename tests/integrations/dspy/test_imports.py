"""The public surface of afnio_integrations.dspy is pinned."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("dspy", reason="needs the dspy extra")

EXPECTED_ALL = [
    "AfnioModule",
    "AfnioTGD",
    "DSPyLM",
    "MetricEvaluator",
    "ProgramUsage",
    "TracedPrediction",
    "TracedProgram",
    "call_metric",
    "trace",
]


def test_all_is_pinned() -> None:
    import afnio_integrations.dspy as ad

    assert sorted(ad.__all__) == EXPECTED_ALL
    for name in ad.__all__:
        assert hasattr(ad, name)


def test_importing_keeps_litellm_from_downloading_its_cost_map() -> None:
    import afnio_integrations.dspy  # noqa: F401

    assert os.environ.get("LITELLM_LOCAL_MODEL_COST_MAP") == "True"
