"""The `afnio demo` command, offline on the bundled sample (live simulator)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("langchain_openai", reason="needs the demo extra")

from afnio_integrations.cli import main as cli
from afnio_integrations.demo import main as demo


def test_demo_on_the_bundled_sample_improves_and_saves_the_prompt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo(["--sample", "--out", str(tmp_path), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "SIMULATOR" in out and "deterministic stand-in" in out
    assert "validation accuracy: 30.8% -> 100.0%" in out
    assert "old system prompt: Classify the sentiment of the message." in out
    saved = json.loads((tmp_path / "prompts.json").read_text())
    assert "If the message mentions" in saved["prompt0.system0"]
    assert f"new system prompt: {saved['prompt0.system0']}" in out


def test_demo_falls_back_to_the_sample_when_the_dataset_cannot_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.json"
    assert (
        demo(["--dataset-file", str(missing), "--out", str(tmp_path), "--epochs", "1"])
        == 0
    )
    out = capsys.readouterr().out
    assert "Could not load the Facility Support dataset" in out
    assert "the bundled sample (26 + 26 messages)" in out


def test_cli_dispatch(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli([]) == 2
    assert cli(["--help"]) == 0
    assert cli(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


SHARED = (
    Path(__file__).resolve().parents[2].parent / "shared" / "data" / "facility-support"
)


@pytest.mark.skipif(
    not (SHARED / "dataset.json").exists(),
    reason="../shared/data is not available (a fresh clone): needs Facility Support",
)
def test_optimize_on_facility_support_reaches_75_percent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--dataset-file", str(SHARED / "dataset.json"), "--out", str(tmp_path)]
    assert demo(args) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("validation accuracy:"))
    before, after = (float(v.strip(" %")) for v in line.split(":")[1].split("->"))
    assert before < 62.0 and after >= 75.0, line
