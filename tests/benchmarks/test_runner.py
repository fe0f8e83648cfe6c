"""``python -m benchmarks run`` writes its report (tiny parameters; no timing
assertion)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.__main__ import main, markdown, targets


def test_run_writes_a_markdown_report_and_json(tmp_path: Path) -> None:
    out = tmp_path / "results"
    code = main(
        [
            "run",
            "--batches",
            "2",
            "3",
            "--latencies",
            "0.01",
            "--no-overheads",
            "--no-estimate",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| afnio | 0.01 | 2 |" in report and "| afnio | 0.01 | 3 |" in report
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [r["batch"] for r in results["afnio"]] == [2, 3]
    assert all(r["calls"] >= r["batch"] for r in results["afnio"])  # forward at least
    assert results["peers"] == []  # peers only with --peers


def _step(library: str, batch: int, wall: float, calls: int, **extra: object) -> dict:
    return {
        "library": library,
        "batch": batch,
        "latency_s": 0.5,
        "wall_s": wall,
        "calls": calls,
        **extra,
    }


def test_targets_are_checked_on_the_runs_rows() -> None:
    def ours(batch: int, wall: float, calls: int, ratio: float, opt: int) -> dict:
        phases = [{"name": "optimizer", "calls": 1, "prompt_tokens": opt}]
        return _step(
            "afnio",
            batch,
            wall,
            calls,
            ratio=ratio,
            phases=phases,
            critical_path_s=2.0,
            peak_in_flight=batch,
        )

    afnio = [ours(4, 2.0, 8, 1.0, 150), ours(32, 2.5, 55, 1.25, 300)]
    textgrad = [_step("textgrad", 32, 50.0, 97, prompt_tokens=1, peak_in_flight=1)]
    estimate = {
        "batch": 8,
        "epochs": 3,
        "measured_calls": 100,
        "estimated_calls": 110,
        "projected_calls": 100,
        "projected_tokens": 1000,
        "measured_tokens": 1000,
        "estimated_tokens": 1250,
    }
    checks = {name: met for name, _, met in targets(afnio, textgrad, [estimate])}
    assert list(checks.values()) == [True, True, True, True, False]  # tokens +25%
    slow = [ours(4, 2.0, 8, 1.0, 150), ours(32, 4.0, 80, 2.0, 600)]
    assert [met for *_, met in targets(slow, textgrad, [])] == [
        False,  # 2.0x the critical path
        False,  # 12.5x faster only
        False,  # 0.82x TextGrad's calls
        False,  # optimizer prompt 4x the batch-4 one
    ]
    report = markdown(afnio, textgrad, {}, [estimate])
    assert "## Targets" in report and "| **no** |" in report
    assert "## Dry-run estimate and pilot projection" in report


def test_the_overhead_measurements_run_and_report_each_kind() -> None:
    from benchmarks.__main__ import overheads

    out = overheads(nodes=50, invokes=5)
    engine = {k: v for k, v in out.items() if k.startswith("engine_")}
    assert engine and all(value > 0 for value in engine.values())
    assert "tracing_ms_per_lm_call" in out  # the langchain extra is a test extra
