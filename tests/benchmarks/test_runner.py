"""``python -m benchmarks run`` writes its report (tiny parameters; no timing
assertion)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.__main__ import main


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
