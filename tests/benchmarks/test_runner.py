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
    for mode in ("core defaults", "cheap"):  # both modes, every batch
        assert f"| afnio | {mode} | 0.01 | 2 |" in report
        assert f"| afnio | {mode} | 0.01 | 3 |" in report
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [(r["batch"], r["mode"]) for r in results["afnio"]] == [
        (2, "upstream"),
        (2, "cheap"),
        (3, "upstream"),
        (3, "cheap"),
    ]
    assert all(r["calls"] >= r["batch"] for r in results["afnio"])  # forward at least
    for r in results["afnio"]:  # the backward's rounds: 2 in core defaults, 1 cheap
        assert (
            r["rounds"] == (4 if r["mode"] == "upstream" else 3)
            or not r["wrong_before"]
        )
        assert sum(r["prompt_tokens_by_kind"].values()) == r["prompt_tokens"]
    assert results["peers"] == []  # peers only with --peers
    # the padded measurement: both modes at the largest batch and latency of the run
    padded = results["padded"]
    assert [(r["batch"], r["mode"], r["feedback_words"]) for r in padded] == [
        (3, "upstream", 60),
        (3, "cheap", 60),
    ]
    assert "## Padded feedback: every LM-written feedback at least 60 words" in report
    assert "| core defaults | padded to 60 words |" in report
    assert "| cheap | as answered |" in report
    assert "## Prompt tokens by call kind (batch 3 @ 0.01 s)" in report
    assert "Data: " in report


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
        )  # no mode, no rounds: a row written before the modes (core defaults)

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
    assert "| core defaults | 8 x 3 | 100 / 1000 |" in report  # a row without mode


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


# -- issue 23: the cheap mode's targets, the by-kind and padded tables, the peers ------


def _afnio_row(
    mode: str,
    *,
    calls: int,
    rounds: int,
    wall: float,
    tokens: dict[str, int],
    chat_calls: int,
    failed: int = 19,
    feedback_words: int | None = None,
) -> dict:
    kinds = {"forward": 32, "chat backward": chat_calls, "optimizer": 1}
    if mode == "upstream":
        kinds["evaluator backward"] = 3
    return _step(
        "afnio",
        32,
        wall,
        calls,
        mode=mode,
        ratio=wall / (rounds * 0.5),
        rounds=rounds,
        critical_path_s=rounds * 0.5,
        peak_in_flight=32,
        phases=[
            {"name": "optimizer", "calls": 1, "prompt_tokens": tokens["optimizer"]}
        ],
        wrong_before=failed,
        chat_samples_per_call=8 if mode == "cheap" else 1,
        calls_by_kind=kinds,
        prompt_tokens_by_kind=tokens,
        prompt_tokens=sum(tokens.values()),
        feedback_words=feedback_words,
        data="Facility Support (first 32 emails)",
    )


UPSTREAM_TOKENS = {
    "forward": 6989,
    "evaluator backward": 5156,
    "chat backward": 7629,
    "optimizer": 253,
}


def _upstream() -> dict:
    return _afnio_row(
        "upstream",
        calls=55,
        rounds=4,
        wall=2.24,
        tokens=UPSTREAM_TOKENS,
        chat_calls=19,
    )


def _cheap(**changes) -> dict:
    args = {
        "calls": 36,
        "rounds": 3,
        "wall": 1.70,
        "tokens": {"forward": 6989, "chat backward": 4000, "optimizer": 300},
        "chat_calls": 3,
    }
    return _afnio_row("cheap", **{**args, **changes})


def _trace(step_tokens: int = 15159) -> dict:
    return _step(
        "trace",
        32,
        16.75,
        33,
        prompt_tokens=step_tokens + 4,
        peak_in_flight=1,
        calls_by_kind={"forward": 32, "optimizer": 1},
        prompt_tokens_by_kind={"forward": 6989, "optimizer": step_tokens - 6989},
        step_prompt_tokens=step_tokens,
    )


def test_the_cheap_mode_targets_are_checked_on_its_batch_32_row() -> None:
    checks = targets([_upstream(), _cheap()], [_trace()], [])
    cheap = [(name, value, met) for name, value, met in checks if "cheap" in name]
    assert [met for *_, met in cheap] == [True] * 6
    assert [value for _, value, _ in cheap] == [
        "11,289",
        "3 (19 failed, 8 per call: at most 3)",
        "36",
        "1.70 s",
        "3",
        "11,289 vs trace 15,159",
    ]
    core = {name: met for name, _, met in checks if name.startswith("core defaults")}
    assert core == {
        "core defaults, batch 32 @ 500 ms: 4 LM rounds (evaluator backward and "
        "chat backward each a round)": True
    }

    bad = _cheap(
        calls=41,
        rounds=4,
        wall=2.1,
        tokens={"forward": 6989, "chat backward": 9000, "optimizer": 300},
        chat_calls=5,
    )
    missed = {
        name.split(": ", 1)[1]
        for name, _, met in targets([_upstream(), bad], [_trace()], [])
        if not met
    }
    assert missed == {
        "prompt tokens per step at most 13,000",
        "chat-backward calls at most ceil(failed / samples_per_call)",
        "LM calls at most 36",
        "wall at most 1.95 s (1.3x a three-round critical path)",
        "3 LM rounds (no evaluator-backward round)",
        "fewer prompt tokens per step than every peer",
    }
    # the existing targets still read the core-defaults row, not the cheap one
    three = {**_upstream(), "rounds": 3}
    assert not dict((n, m) for n, _, m in targets([three, _cheap()], [], []))[
        "core defaults, batch 32 @ 500 ms: 4 LM rounds (evaluator backward and "
        "chat backward each a round)"
    ]


def test_the_report_shows_tokens_by_kind_and_the_padded_table() -> None:
    ours = [_upstream(), _cheap()]
    padded = [
        _afnio_row(
            "upstream",
            calls=55,
            rounds=4,
            wall=2.3,
            tokens={**UPSTREAM_TOKENS, "optimizer": 2530},
            chat_calls=19,
            feedback_words=60,
        ),
        _cheap(
            tokens={"forward": 6989, "chat backward": 4000, "optimizer": 600},
            feedback_words=60,
        ),
    ]
    report = markdown(
        ours,
        [_trace()],
        {},
        [],
        None,
        padded,
        {"textgrad": "no venv under benchmarks/.venvs/textgrad"},
    )
    assert "## Prompt tokens by call kind (batch 32 @ 0.5 s)" in report
    assert (
        "| afnio | core defaults | 6,989 (32) | 5,156 (3) | 7,629 (19) | - | "
        "253 (1) | 20,027 | 55 |" in report
    )
    assert (
        "| afnio | cheap | 6,989 (32) | - | 4,000 (3) | - | 300 (1) | 11,289 | 36 |"
        in report
    )
    assert "| trace | - | 6,989 (32) | - | - | - | 8,170 (1) | 15,159 | 33 |" in report
    assert "| textgrad | not run (no venv under benchmarks/.venvs/textgrad) |" in report
    assert "## Padded feedback: every LM-written feedback at least 60 words" in report
    assert "| core defaults | padded to 60 words | 55 | 4 | 2.30 |" in report
    assert report.count("(10.00x) |") == 1  # the core optimizer prompt, 253 -> 2,530
    assert "| cheap | padded to 60 words | 36 | 3 | 1.70 |" in report
    assert "600 (2.00x) |" in report
    assert "| afnio | cheap | 0.5 | 32 | 1.70 |" in report
    assert "Data: Facility Support." in report  # the source, not the batch
    # the ratios compare a peer with both modes, tokens without its warm-up
    assert (
        "| trace | 0.5 | 32 | 7.5x | 0.60x | 9.9x | 0.92x | 0.76x / 1.34x |" in report
    )


def test_a_peer_without_its_venv_is_reported_as_not_run(tmp_path, monkeypatch):
    import benchmarks.__main__ as runner

    monkeypatch.setattr(runner, "VENVS", tmp_path / ".venvs")  # no venv there
    not_run: dict[str, str] = {}
    assert runner.peer_steps([2], [0.01], install=False, not_run=not_run) == []
    assert set(not_run) == set(runner.PEERS)
    assert all(why.startswith("no venv under") for why in not_run.values())
    report = markdown([_upstream(), _cheap()], [], {}, [], None, [], not_run)
    for name in runner.PEERS:
        assert f"| {name} | - | - | - | not run (no venv under" in report
        assert f"| {name} | not run (no venv under" in report
    assert "fewer prompt tokens per step than every peer" not in report


FAKE_PEER = '''
"""A peer step for the runner's test: a warm-up request, then one forward call per
sample (system prompt + message) and one TextGrad-style update call."""
import argparse, json, urllib.request

parser = argparse.ArgumentParser()
for name in ("--base-url", "--model", "--batch", "--data"):
    parser.add_argument(name)
args = parser.parse_args()

def chat(messages):
    request = urllib.request.Request(
        args.base_url + "/chat/completions",
        data=json.dumps({"model": args.model, "messages": messages}).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer sk"},
    )
    with urllib.request.urlopen(request) as response:
        return json.load(response)

chat([{"role": "user", "content": "Hello"}])  # warm-up
items = json.load(open(args.data))[: int(args.batch)]
for item in items:
    chat([{"role": "system", "content": "Classify the sentiment of the message."},
          {"role": "user", "content": item["message"]}])
print(json.dumps({"library": "fake", "wall_s": 0.1,
                  "lm_calls": {"forward": len(items), "backward": 0, "optimizer": 0}}))
'''


def test_peer_requests_are_classified_by_kind_without_the_warm_up(
    tmp_path, monkeypatch
):
    import sys

    import benchmarks.__main__ as runner

    script = tmp_path / "fake_step.py"
    script.write_text(FAKE_PEER, encoding="utf-8")
    monkeypatch.setattr(runner, "PEERS", {"fake": ("fake==1", script)})
    monkeypatch.setattr(runner, "_peer_python", lambda name, install: sys.executable)
    (row,) = runner.peer_steps([3], [0.01], install=False)
    assert row["warmup_excluded"] is True
    assert row["calls"] == 3 and row["calls_by_kind"] == {"forward": 3}
    # the simulator's count holds the warm-up ("Hello": 1 word + 3); the step's not
    assert row["step_prompt_tokens"] == row["prompt_tokens"] - 4
    assert row["prompt_tokens_by_kind"] == {"forward": row["step_prompt_tokens"]}


def test_peer_calls_are_kinds_of_the_responder_that_answers_them() -> None:
    from types import SimpleNamespace

    from benchmarks.__main__ import peer_calls_by_kind

    step = SimpleNamespace(
        responder_of=lambda body: body["responder"],
        request_prompt_tokens=lambda body: body["tokens"],
    )
    bodies = [
        {"responder": "task", "tokens": 10},
        {"responder": "fallback", "tokens": 5},
        {"responder": "textgrad_backward", "tokens": 100},
        {"responder": "textgrad_optimizer", "tokens": 40},
        {"responder": "optoprime", "tokens": 60},
    ]
    calls, tokens = peer_calls_by_kind(step, bodies)
    assert calls == {"forward": 2, "backward": 1, "optimizer": 2}
    assert tokens == {"forward": 15, "backward": 100, "optimizer": 100}


def test_results_json_holds_dataclass_values_of_the_rows() -> None:
    import afnio
    from benchmarks.__main__ import json_default

    row = {"mode": "cheap", "assumed": afnio.BackwardOptions("direct", 8)}
    assert json.loads(json.dumps(row, default=json_default))["assumed"] == {
        "evaluator_feedback": "direct",
        "chat_samples_per_call": 8,
    }
    assert json.dumps({"path": Path("a")}, default=json_default) == '{"path": "a"}'
