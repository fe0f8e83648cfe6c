"""The `afnio demo` command, offline on the bundled sample (live simulator)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("langchain_openai", reason="needs the demo extra")

from afnio.utils.datasets import utils as dataset_utils
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


def test_demo_ends_by_naming_its_run_report_under_out_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo(["--sample", "--out", str(tmp_path), "--epochs", "1"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    run = tmp_path / "run"
    assert last == f"run report: {run / 'report.html'}"
    assert (run / "report.html").is_file()
    assert (run / "report.html").read_text("utf-8").lstrip().startswith("<!")
    records = [
        json.loads(line)
        for line in (run / "run_log.jsonl").read_text("utf-8").splitlines()
    ]
    assert records[0]["type"] == "header"
    assert sum(r["type"] == "step" for r in records) == 2  # 26 messages, batch 16


def _no_dataset_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty data folder: FacilitySupport would have to download its file."""
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("AFNIO_DATA_DIR", str(data))


def test_openai_without_a_key_fails_before_any_download(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _no_dataset_on_disk(tmp_path, monkeypatch)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    attempts: list[str] = []

    def no_download(*args: object, **kwargs: object) -> str:
        attempts.append(repr(args))
        raise AssertionError("the demo tried to download the dataset")

    monkeypatch.setattr(dataset_utils, "download_from_mirrors", no_download)
    monkeypatch.setattr(dataset_utils, "download_url", no_download)
    with pytest.raises(SystemExit) as exit_info:
        demo(["--openai", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert attempts == []  # failed before trying the network
    captured = capsys.readouterr()
    assert "--openai needs OPENAI_API_KEY" in captured.err
    assert captured.out == ""  # no fallback notice, no header
    assert not (tmp_path / "out").exists()


def test_demo_says_it_falls_back_to_the_sample_before_its_header(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _no_dataset_on_disk(tmp_path, monkeypatch)

    def offline(*args: object, **kwargs: object) -> str:
        raise RuntimeError(
            "Error downloading dataset.json\n"
            "  https://mirror.invalid/dataset.json: <urlopen error offline>"
        ) from OSError("<urlopen error offline>")

    monkeypatch.setattr(dataset_utils, "download_from_mirrors", offline)
    assert demo(["--out", str(tmp_path / "out"), "--epochs", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(
        i for i, line in enumerate(lines) if line.startswith("afnio demo: optimizing")
    )
    # the first line says both what failed and what is used instead, on one line
    notice = lines[0]
    assert "could not be downloaded" in notice and "offline" in notice
    assert "the bundled sample (26 + 26 messages) instead" in notice
    assert header == 1, lines[:3]
    assert lines[2] == "data: the bundled sample (26 + 26 messages)"


def test_a_missing_dataset_file_is_an_error_not_a_silent_fallback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(SystemExit) as exit_info:
        demo(["--dataset-file", str(missing), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert f"--dataset-file {missing}: no such file" in captured.err
    assert "afnio demo: optimizing" not in captured.out


@pytest.mark.parametrize("argv", [["demo", "--help"], ["demo", "-h"]])
def test_demo_help_is_plain_text_without_rest_markup(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--openai" in text and "OPENAI_API_KEY" in text and "--sample" in text
    for markup in ("``", ":class:", ":func:", ":mod:", ":meth:", "`"):
        assert markup not in text, markup


def test_cli_dispatch(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli([]) == 2
    assert "demo" in capsys.readouterr().err  # usage on stderr for a missing command
    assert cli(["--help"]) == 0
    assert "afnio demo --help" in capsys.readouterr().out
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
