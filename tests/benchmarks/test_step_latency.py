"""``benchmarks/step_latency.py`` runs end to end with tiny parameters (no timing
assertion: at 20 ms per call the fixed overheads dominate, so only the report's
structure is checked)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from afnio.autodiff.config import EVALUATOR_SAMPLES_PER_CALL
from tests._helpers import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "step_latency.py"


@pytest.fixture(scope="module")
def step_latency():
    yield from load_script(SCRIPT, "step_latency_bench")


def test_main_prints_a_report_and_writes_json(step_latency, tmp_path, capsys):
    out = tmp_path / "report.json"
    code = step_latency.main(
        ["--batch", "4", "--latency", "0.02", "--target", "1000", "--json", str(out)]
    )
    assert code == 0  # a generous target: the verdict logic, not the timing
    printed = capsys.readouterr().out
    for text in ("phase", "forward", "evaluator", "backward", "optimizer", "total"):
        assert text in printed
    assert "afnio max concurrency: 16" in printed
    assert "wall / critical path = " in printed and "PASS" in printed

    payload = json.loads(out.read_text())
    assert payload["passed"] is True and payload["target"] == 1000
    (report,) = payload["reports"]
    assert [p["name"] for p in report["phases"]] == list(step_latency.PHASES)
    forward, evaluator, backward, optimizer = report["phases"]
    assert forward["calls"] == 4 and forward["rounds"] == 1
    assert forward["calls_by_kind"] == {"forward": 4}
    assert evaluator["calls"] == 0 and evaluator["rounds"] == 0
    assert report["calls"] == sum(p["calls"] for p in report["phases"])
    assert report["rounds"] == sum(p["rounds"] for p in report["phases"])
    assert report["critical_path_s"] == pytest.approx(report["rounds"] * 0.02)
    assert math.isfinite(report["ratio"]) and report["ratio"] > 0
    if report["wrong_before"]:
        assert backward["rounds"] == 2 and optimizer["rounds"] == 1
    assert report["peak_in_flight"] <= report["max_concurrency"]


def test_synthesized_data_gives_the_backward_pass_work(step_latency):
    messages, targets = step_latency.synthesize(4)
    assert len(set(targets)) > 1
    report = step_latency.measure(messages, targets, 0.02, warmup=False)
    assert report.wrong_before > 0
    backward = report.phases[2]
    groups = -(-report.wrong_before // EVALUATOR_SAMPLES_PER_CALL)
    assert backward.calls_by_kind == {
        "evaluator backward": groups,  # the failed samples in groups, one call each
        "chat backward": report.wrong_before,
    }
    assert report.rounds == 4 and report.retries == 0  # fwd, eval bwd, chat bwd, TGD
    assert report.rules_after >= 1  # the step taught the prompt something
    assert math.isfinite(report.ratio)


def test_arguments_are_validated(step_latency):
    with pytest.raises(SystemExit):
        step_latency.main(["--latency", "0"])
