"""The public surface of afnio_integrations.dspy is pinned."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("dspy", reason="needs the dspy extra")

EXPECTED_ALL = [
    "AfnioModule",
    "AfnioTGD",
    "AfnioTracingWarning",
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
    env = {k: v for k, v in os.environ.items() if k != "LITELLM_LOCAL_MODEL_COST_MAP"}
    code = (
        "import os, sys; import afnio_integrations.dspy; "
        "print(os.environ.get('LITELLM_LOCAL_MODEL_COST_MAP'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "True"
