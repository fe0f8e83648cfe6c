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
            "--no-scale",
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


def _scale(cpu_512: float, ratio_512: float, failed: int, share: float) -> dict:
    cpu = [
        {
            "batch": batch,
            "transport": "aiohttp",
            "calls": calls,
            "rounds": 4,
            "cpu_ms_per_call": cpu_ms,
            "wall_s": 2.0 * ratio,
            "critical_path_s": 2.0,
            "ratio": ratio,
        }
        for batch, calls, cpu_ms, ratio in (
            (128, 198, 1.5, 1.2),
            (512, 772, cpu_512, ratio_512),
        )
    ]
    rate = {
        "samples": 2000,
        "rpm_limit": 600,
        "failed": failed,
        "answered": 2000 - failed,
        "elapsed_s": 141.0,
        "efficiency": 0.99,
        "rate_limited": int(share * 2000),
        "received": 2000,
        "rate_limited_share": share,
        "billed_prompt_tokens": 10,
        "served_prompt_tokens": 10,
    }
    batch = {
        "samples": 2000,
        "lm_calls": 2000,
        "batches": 1,
        "val_accuracy": 0.7,
        "wall_s": 3.0,
    }
    memory = {
        "steps": 100,
        "batch": 8,
        "calls": 1272,
        "rss_start_mb": 89.0,
        "rss_end_mb": 91.0,
        "growth_mb": 2.0,
        "graphs_alive_max": 1,
        "graphs_alive_after": 0,
    }
    return {
        "client_cpu": cpu,
        "rate_limits": [rate],
        "batch_api": [
            {**batch, "mode": "sync", "cost_usd": 0.02},
            {
                **batch,
                "mode": "batch_api",
                "cost_usd": 0.01,
                "cost_ratio": 0.5,
                "same_accuracy": True,
            },
        ],
        "memory_growth": [memory],
    }


def test_the_scale_targets_are_checked_on_the_run_s_own_rows() -> None:
    from benchmarks.__main__ import markdown, scale_targets

    extra = {"engine_default_us_per_node": 8.0}
    good = scale_targets(_scale(2.0, 2.5, 0, 0.02), extra)
    assert len(good) == 9 and all(met for *_, met in good)
    bad = {
        name: met for name, _, met in scale_targets(_scale(6.0, 3.5, 3, 0.08), extra)
    }
    assert [name for name, met in bad.items() if not met] == [
        "client CPU per LM call at batch 512: at most 5 ms",
        "batch 512 @ 500 ms (simulator in its own process): wall within 3.0x of "
        "the critical path",
        "2000-sample validation at 600 RPM: 0 failed samples",
        "2000-sample validation at 600 RPM: 429s on at most 5% of requests",
    ]
    report = markdown([], [], extra, [], _scale(2.0, 2.5, 0, 0.02))
    for section in ("large batches", "rate limit", "Batch API", "memory"):
        assert "## Scale: " in report and section in report
    assert "| openai | 512 | aiohttp | 772 | 4 | 2.00 |" in report
