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


# -- issue 23: the two modes, tokens by call kind, padded feedback, the data ---------


def _tokens_consistent(report) -> None:
    """Tokens by kind: each phase's kinds sum to its simulator count, the per-call
    lists to the kinds, and the step's kinds to the step's total."""
    for phase in report.phases:
        assert sum(phase.prompt_tokens_by_kind.values()) == phase.prompt_tokens
        for kind, tokens in phase.call_prompt_tokens.items():
            assert len(tokens) == phase.calls_by_kind[kind]
            assert sum(tokens) == phase.prompt_tokens_by_kind[kind]
    assert report.tokens_match_simulator
    assert sum(report.prompt_tokens_by_kind.values()) == report.prompt_tokens
    assert report.prompt_tokens == sum(p.prompt_tokens for p in report.phases) > 0
    assert sum(report.calls_by_kind.values()) == report.calls


def test_cheap_mode_skips_the_evaluator_backward_round_and_groups_chat_backward(
    step_latency,
):
    from afnio.autodiff.config import CHEAP_SAMPLES_PER_CALL

    messages, targets = step_latency.synthesize(16)
    report = step_latency.measure(messages, targets, 0.02, warmup=False, mode="cheap")
    assert report.wrong_before > CHEAP_SAMPLES_PER_CALL  # more than one group
    assert report.mode == "cheap" and report.evaluator_feedback == "direct"
    assert report.chat_samples_per_call == CHEAP_SAMPLES_PER_CALL
    backward = report.phases[2]
    groups = math.ceil(report.wrong_before / CHEAP_SAMPLES_PER_CALL)
    assert backward.calls_by_kind == {"chat backward": groups}  # no evaluator backward
    assert "evaluator backward" not in report.calls_by_kind
    assert backward.rounds == 1 and report.rounds == 3 and report.retries == 0
    assert report.calls == len(messages) + groups + 1
    assert report.rules_after >= 1  # the grouped feedback still taught the prompt
    _tokens_consistent(report)


def test_upstream_mode_keeps_four_rounds_and_counts_tokens_by_kind(step_latency):
    messages, targets = step_latency.synthesize(6)
    report = step_latency.measure(messages, targets, 0.02, warmup=False)
    assert report.mode == "upstream" and report.evaluator_feedback == "lm"
    assert report.chat_samples_per_call == 1
    assert report.rounds == 4
    assert report.calls_by_kind["chat backward"] == report.wrong_before
    assert set(report.prompt_tokens_by_kind) == {
        "forward",
        "evaluator backward",
        "chat backward",
        "optimizer",
    }
    _tokens_consistent(report)


def test_the_cheap_step_spends_fewer_prompt_tokens_than_the_upstream_one(
    step_latency,
):
    messages, targets = step_latency.synthesize(12)
    up = step_latency.measure(messages, targets, 0.01, warmup=False)
    cheap = step_latency.measure(messages, targets, 0.01, warmup=False, mode="cheap")
    assert cheap.wrong_before == up.wrong_before  # same forward answers
    assert cheap.prompt_tokens_by_kind["forward"] == up.prompt_tokens_by_kind["forward"]
    assert cheap.prompt_tokens < up.prompt_tokens
    assert cheap.calls < up.calls and cheap.rounds == up.rounds - 1


def test_padded_feedback_grows_the_optimizer_prompt_not_the_learning(step_latency):
    messages, targets = step_latency.synthesize(6)
    plain = step_latency.measure(messages, targets, 0.01, warmup=False)
    padded = step_latency.measure(
        messages, targets, 0.01, warmup=False, feedback_words=60
    )
    assert padded.feedback_words == 60 and plain.feedback_words is None
    assert padded.calls_by_kind == plain.calls_by_kind
    assert (
        padded.prompt_tokens_by_kind["optimizer"]
        > plain.prompt_tokens_by_kind["optimizer"]
    )
    assert padded.rules_after == plain.rules_after
    _tokens_consistent(padded)


def test_main_takes_the_mode_and_feedback_words(step_latency, tmp_path, capsys):
    out = tmp_path / "report.json"
    code = step_latency.main(
        [
            "--batch",
            "3",
            "--latency",
            "0.01",
            "--target",
            "1000",
            "--mode",
            "cheap",
            "--feedback-words",
            "20",
            "--cold",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "mode: cheap" in printed and "padded to 20 words" in printed
    assert "prompt tokens by call kind: forward 3 calls" in printed
    assert "= the simulator's counter" in printed
    payload = json.loads(out.read_text())
    assert payload["mode"] == "cheap" and payload["feedback_words"] == 20
    (report,) = payload["reports"]
    assert report["mode"] == "cheap" and report["feedback_words"] == 20
    assert report["prompt_tokens_by_kind"]["forward"] > 0


def test_bad_mode_and_feedback_words_are_refused(step_latency):
    with pytest.raises(ValueError, match="mode must be one of"):
        step_latency.measure(["hi"], ["neutral"], 0.01, warmup=False, mode="fast")
    with pytest.raises(ValueError, match="feedback_words"):
        step_latency.measure(["hi"], ["neutral"], 0.01, warmup=False, feedback_words=0)
    for argv in (["--mode", "fast"], ["--feedback-words", "0"]):
        with pytest.raises(SystemExit):
            step_latency.main(argv)


def _records(n: int) -> list[dict]:
    return [
        {
            "fields": {"input": f"Email {i}: the lobby was spotless."},
            "answer": json.dumps({"sentiment": "positive"}),
        }
        for i in range(n)
    ]


def test_the_data_is_facility_support_where_the_dataset_keeps_it_else_synthesised(
    step_latency, tmp_path, monkeypatch
):
    kept = tmp_path / "FacilitySupport" / "raw" / "dataset.json"
    kept.parent.mkdir(parents=True)
    kept.write_text(json.dumps(_records(2)), encoding="utf-8")
    monkeypatch.setattr(step_latency, "DATASET", kept)
    assert step_latency.default_dataset() == kept
    messages, targets, data = step_latency.load_data(3)
    assert messages[0].startswith("Email 0") and messages[2].startswith("Email 0")
    assert targets == ["positive"] * 3
    assert data == f"Facility Support ({kept}) (first 3 emails)"

    monkeypatch.setattr(step_latency, "DATASET", tmp_path / "none.json")
    assert step_latency.default_dataset() is None
    _, _, data = step_latency.load_data(3)
    assert data.startswith("synthesised")
