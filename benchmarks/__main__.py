"""``python -m benchmarks run``: one report of afnio's speed and cost, with peers.

For every latency (``--latencies``, default 0.5 and 0.05 s) and batch size
(``--batches``, default 4, 8 and 32) it times one optimization step of the Facility
Support sentiment task (forward, evaluator, backward, optimizer) against the bundled
simulator (``benchmarks/step_latency.py``), in both modes: *core defaults* (the core
API's upstream behaviour: an LM-written evaluator gradient, one chat-backward call per
sample, four LM rounds) and *cheap* (inside ``afnio.backward_options("cheap")``, the
default of ``optimize()`` and ``AfnioTGD``: direct evaluator feedback, chat-backward
calls grouped by prompt template, three LM rounds): wall time, LM calls and prompt
tokens per phase, peak requests in flight, and the ratio to the critical-path bound
(sequential LM rounds x latency). At the largest batch and latency of the run (batch 32
@ 0.5 s by default) both modes are measured again with every LM-written feedback
padded to ``--feedback-words`` words (60; ``Simulator(feedback_words=...)``), so that
the optimizer prompt's growth shows, and the prompt tokens are broken down by call
kind (forward, evaluator backward, chat backward, optimizer; TextGrad's forward,
backward and optimizer; Trace's forward and OptoPrime calls), each request classified
by the simulator's responder that answers it. With ``--peers`` the same step is done by
TextGrad 0.1.8 and Trace (trace-opt 0.1.3.8), each installed from PyPI into its own
venv under ``benchmarks/.venvs/`` (made once) and pointed at a simulator with the same
latency (``benchmarks/peers/*_step.py``); their calls, tokens and peak come from the
simulator's counters (a peer whose venv is missing is listed as not run). The data is
Facility Support's ``dataset.json`` (``$AFNIO_DATA_DIR`` or ``~/.cache/afnio/data``,
else synthesised messages); the report says which. Engine overhead per node and
LangChain tracing overhead (chains; ``create_agent`` agents and LangGraph graphs) are
measured too, and so is the offline replay of a recorded 1,000-call ``Trainer.fit``
(``benchmarks/replay_speed.py``; skipped with ``--no-overheads``). The scale
benchmarks (skipped with ``--no-scale``; they run in the core defaults, four rounds)
measure client CPU per LM call and the step at batches 32, 128 and 512 against its
critical path, a 2,000-sample validation under a simulated 600 RPM limit, a
validation pass through the Batch API against the synchronous one, and resident
memory over a 100-step ``fit``. Writes
``report.md``, ``results.json`` and, with matplotlib (the ``plot`` extra),
``chart.png`` into ``--out`` (default ``benchmarks/results``).

Example: ``python -m benchmarks run --batches 4 8 32 --latencies 0.5 0.05 --peers``
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import re
import subprocess
import sys
import tempfile
import time
import venv
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEERS = {
    "textgrad": ("textgrad==0.1.8", HERE / "peers" / "textgrad_step.py"),
    "trace": ("trace-opt==0.1.3.8", HERE / "peers" / "trace_step.py"),
}
VENVS = HERE / ".venvs"
"""Where each peer gets its venv (made once)."""
MODES = ("upstream", "cheap")
"""afnio's modes, in the report's order (``step_latency.MODE_LABELS`` names them)."""
MODE_LABELS = {"upstream": "core defaults", "cheap": "cheap"}
FEEDBACK_WORDS = 60
"""The padded-feedback measurement's ``Simulator(feedback_words=...)``."""
# the cheap mode's targets at batch 32 @ 500 ms (issue 23)
CHEAP_MAX_PROMPT_TOKENS = 13_000
CHEAP_MAX_CALLS = 36
CHEAP_MAX_WALL_S = 1.95  # 1.3x a three-round critical path of 1.5 s


def _load(name: str) -> Any:
    """A benchmark script as a module (they are plain scripts, not a package API)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def json_default(value: Any) -> Any:
    """``json.dumps``'s fallback for the rows' values: a dataclass (such as an
    ``afnio.BackwardOptions``) as its fields, anything else as its ``str``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def _mode(row: dict[str, Any]) -> str:
    """A row's afnio mode (rows written before the modes existed are upstream)."""
    return row.get("mode", "upstream")


def _label(row: dict[str, Any]) -> str:
    return MODE_LABELS.get(_mode(row), _mode(row))


# -- afnio -----------------------------------------------------------------------------


def _afnio_row(
    step: Any,
    batch: int,
    latency: float,
    mode: str,
    feedback_words: int | None = None,
) -> dict[str, Any]:
    """One measured afnio step as a report row (``step_latency.measure``)."""
    messages, targets, data = step.load_data(batch)
    report = step.measure(
        messages,
        targets,
        latency,
        data=data,
        mode=mode,
        feedback_words=feedback_words,
    )
    row = asdict(report)
    row["library"] = "afnio"
    padded = f", feedback >= {feedback_words} words" if feedback_words else ""
    print(
        f"afnio     batch {batch:3d} latency {latency:.2f}s "
        f"{MODE_LABELS[mode]:>13}{padded}: {report.wall_s:6.2f} s, "
        f"{report.calls} calls, {report.rounds} rounds, {report.prompt_tokens} "
        f"prompt tokens, critical path x{report.ratio:.2f}",
        flush=True,
    )
    return row


def afnio_steps(
    batches: list[int],
    latencies: list[float],
    modes: tuple[str, ...] = MODES,
) -> list[dict[str, Any]]:
    """One step per latency, batch and mode (``modes``: ``"upstream"``, the core
    defaults, and ``"cheap"``)."""
    step = _load("step_latency")
    return [
        _afnio_row(step, batch, latency, mode)
        for latency in latencies
        for batch in batches
        for mode in modes
    ]


def padded_steps(
    batch: int,
    latency: float,
    feedback_words: int = FEEDBACK_WORDS,
    modes: tuple[str, ...] = MODES,
) -> list[dict[str, Any]]:
    """The step in each mode with every LM-written feedback padded to at least
    ``feedback_words`` words (``Simulator(feedback_words=...)``)."""
    step = _load("step_latency")
    return [_afnio_row(step, batch, latency, mode, feedback_words) for mode in modes]


# -- peers -----------------------------------------------------------------------------


def _peer_python(name: str, install: bool) -> Path | None:
    requirement, _ = PEERS[name]
    env_dir = VENVS / name
    python = env_dir / "bin" / "python"
    done = env_dir / ".installed"  # written last: an interrupted install is redone
    if done.exists():
        return python
    if not install:
        return None
    print(f"installing {requirement} into {env_dir} (once)", flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", requirement], check=True
    )
    done.write_text(requirement + "\n", encoding="utf-8")
    return python


def _data_file(batch: int) -> Path:
    step = _load("step_latency")
    messages, targets, _ = step.load_data(batch)
    path = Path(tempfile.mkdtemp(prefix="afnio-bench-")) / "data.json"
    rows = [
        {"message": m, "sentiment": t} for m, t in zip(messages, targets, strict=True)
    ]
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def peer_calls_by_kind(
    step: Any, bodies: list[dict[str, Any]]
) -> tuple[dict[str, int], dict[str, int]]:
    """``(calls, prompt tokens)`` by kind (``forward``, ``backward``, ``optimizer``) of
    a peer's requests, each classified by the simulator's responder that answers it
    (``step.responder_of``, folded into a kind by
    :func:`afnio.testing.calls.kind_of_responder`: TextGrad's backward calls are
    ``backward``, TextGrad's TGD and Trace's OptoPrime ``optimizer``, the task or
    fallback responder answers a forward call) and its tokens counted as the
    simulator counts them."""
    from afnio.testing.calls import CALL_KINDS, kind_of_responder

    calls: dict[str, int] = {}
    tokens: dict[str, int] = {}
    for body in bodies:
        kind = kind_of_responder(step.responder_of(body))
        calls[kind] = calls.get(kind, 0) + 1
        tokens[kind] = tokens.get(kind, 0) + step.request_prompt_tokens(body)
    return (
        {k: calls[k] for k in CALL_KINDS if k in calls},
        {k: tokens[k] for k in CALL_KINDS if k in tokens},
    )


def peer_steps(
    batches: list[int],
    latencies: list[float],
    install: bool,
    not_run: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The peers' steps (``benchmarks/peers/*_step.py``, each in its own venv). A peer
    without its venv (and ``install`` false) or its script is skipped; ``not_run``,
    when given, gets its name and why."""
    from afnio.testing import SIMULATOR_MODEL, Simulator

    step = _load("step_latency")
    rows = []
    for name, (_, script) in PEERS.items():
        python = _peer_python(name, install) if script.exists() else None
        if python is None:
            if script.exists():
                why = f"no venv under {VENVS / name}"
            else:
                why = f"no {script.name}"
            print(f"{name}: not run ({why})", flush=True)
            if not_run is not None:
                not_run[name] = why
            continue
        for latency in latencies:
            for batch in batches:
                data = _data_file(batch)
                with Simulator(latency=latency) as sim:
                    started = time.perf_counter()
                    done = subprocess.run(
                        [
                            str(python),
                            str(script),
                            "--base-url",
                            sim.base_url,
                            "--model",
                            SIMULATOR_MODEL,
                            "--batch",
                            str(batch),
                            "--data",
                            str(data),
                        ],
                        capture_output=True,
                        text=True,
                        timeout=3600,
                    )
                    process_s = time.perf_counter() - started
                    bodies = sim.requests
                    stats = sim.stats
                if done.returncode != 0:
                    print(f"{name} batch {batch}: failed\n{done.stderr[-2000:]}")
                    if not_run is not None:
                        not_run[name] = f"failed at batch {batch}"
                    continue
                result = json.loads(done.stdout.strip().splitlines()[-1])
                # the script's own count excludes its untimed warm-up request, the
                # first one the simulator received
                counted = sum((result.get("lm_calls") or {}).values())
                warmup = bool(counted) and len(bodies) == counted + 1
                calls_by_kind, tokens_by_kind = peer_calls_by_kind(
                    step, bodies[1:] if warmup else bodies
                )
                result.update(
                    library=name,
                    batch=batch,
                    latency_s=latency,
                    calls=counted or stats.calls,
                    prompt_tokens=stats.prompt_tokens,
                    peak_in_flight=stats.peak_in_flight,
                    process_s=process_s,
                    calls_by_kind=calls_by_kind,
                    prompt_tokens_by_kind=tokens_by_kind,
                    # the step's own prompt tokens (without the warm-up request)
                    step_prompt_tokens=sum(tokens_by_kind.values()),
                    warmup_excluded=warmup,
                )
                rows.append(result)
                print(
                    f"{name:9s} batch {batch:3d} latency {latency:.2f}s: "
                    f"{result['wall_s']:6.2f} s, {result['calls']} calls",
                    flush=True,
                )
    return rows


# -- overheads -------------------------------------------------------------------------


def overheads(nodes: int = 5000, invokes: int = 200) -> dict[str, float]:
    """The engine's overhead per node (chains of ``nodes`` custom Functions) and the
    LangChain tracer's per LM call (``invokes`` invokes of a 3-step chain), best of
    three each; with the agents extra, the worst case of ``agent_tracing_overhead.py``
    (about ``invokes`` model calls a case; shorter graph cycles when ``invokes`` is
    under 100)."""
    engine = _load("engine_overhead")
    out: dict[str, float] = {}
    for kind, fn in engine.KINDS.items():
        engine.measure(fn, 200)  # warm up
        out[f"engine_{kind}_us_per_node"] = min(
            engine.measure(fn, nodes)[1] for _ in range(3)
        )
    try:
        tracing = _load("tracing_overhead")
    except ImportError:  # the langchain extra is not installed
        return out
    tracing.measure(tracing._chain, 20, 1)  # warm up imports and caches
    runs = [tracing.measure(tracing._chain, invokes, 1) for _ in range(3)]
    out["tracing_ms_per_lm_call"] = min((t - p) / 1000 for p, t in runs)
    try:  # create_agent agents and LangGraph graphs (agent_tracing_overhead.py)
        agent = _load("agent_tracing_overhead")
    except ImportError:  # the agents extra (langchain, langgraph) is not installed
        return out
    loops = agent.GRAPH_CALLS if invokes >= 100 else agent.QUICK_GRAPH_CALLS
    cases = agent.run_all(invokes, 3, loops, agent.TARGET_MS)
    out["agent_tracing_ms_per_model_call"] = max(c.added_us for c in cases) / 1000
    return out


def replay_figures() -> dict[str, float]:
    """A user project's recorded ``Trainer.fit`` (at least 1,000 LM calls) replayed
    offline through the ``afnio_pytest`` plugin (``benchmarks/replay_speed.py``):
    the calls and the replayed fit's wall time; none without the pytest extra."""
    if importlib.util.find_spec("pytest_recording") is None:
        print("replay check skipped: needs the pytest extra (pytest-recording)")
        return {}
    replay = _load("replay_speed")
    with tempfile.TemporaryDirectory(prefix="afnio-replay-") as tmp:
        result = replay.measure(Path(tmp))
    print(replay.summary(result), flush=True)
    return {
        "replayed_fit_lm_calls": float(result.interactions),
        "replayed_fit_s": result.replay_fit_s,
    }


def estimate_rows(modes: tuple[str, ...] = MODES) -> list[dict[str, Any]]:
    """The dry-run estimate and the pilot projection against measured runs
    (``benchmarks/estimate_accuracy.py``), in each backward mode; none without the
    dataset (where the step looks for it)."""
    accuracy = _load("estimate_accuracy")
    dataset = accuracy.DATASET if accuracy.DATASET.is_file() else None
    if dataset is None:
        print("estimate check skipped: the Facility Support dataset is missing")
        return []
    rows = [
        row
        for mode in modes
        for row in accuracy.measure([(8, 3), (4, 2)], dataset=dataset, mode=mode)
    ]
    for row in rows:
        err = accuracy.errors(row)
        print(
            f"estimate  {_label(row):>13} batch {row['batch']} x {row['epochs']} "
            "epochs: "
            f"{err['estimated_calls']:+.1%} calls, {err['estimated_tokens']:+.1%} "
            "tokens",
            flush=True,
        )
    return rows


# -- scale -----------------------------------------------------------------------------


def scale_rows(
    batches: list[int],
    rate_limit_scale: float,
    batch_api_samples: int,
    memory_steps: int = 100,
) -> dict[str, list[dict[str, Any]]]:
    """The scale benchmarks, each against a simulator in its own process: client CPU
    per LM call and the step against its critical path at large batches
    (``client_cpu.py``), a validation under a simulated 600 RPM limit
    (``rate_limits.py``), a validation pass through the Batch API against the
    synchronous one (``batch_api.py``) and resident memory over a 100-step ``fit``
    (``memory_growth.py``)."""
    out: dict[str, list[dict[str, Any]]] = {}
    client_cpu = _load("client_cpu")
    out["client_cpu"] = client_cpu.run(batches=tuple(batches), latency=0.5)
    # the adapters' own HTTP stacks (LangChain's ChatOpenAI, DSPy's LM), largest batch
    for client in ("langchain", "dspy"):
        try:
            out["client_cpu"] += client_cpu.run(
                batches=(max(batches),), latency=0.5, client=client
            )
        except ImportError as e:  # the integration's extra is not installed
            print(f"client {client}: skipped ({e})", flush=True)
    for r in out["client_cpu"]:
        print(
            f"client {r['client']:9s} batch {r['batch']:3d}: "
            f"{r['cpu_ms_per_call']:.2f} ms CPU per LM call, {r['wall_s']:.2f} s, "
            f"critical path x{r['ratio']:.2f}",
            flush=True,
        )
    out["rate_limits"] = _load("rate_limits").run(scale=rate_limit_scale)
    for r in out["rate_limits"]:
        print(
            f"rate-limited validation: {r['samples']} samples at {r['rpm_limit']} "
            f"RPM: {r['failed']} failed, {r['efficiency']:.1%} of the limit, 429s on "
            f"{r['rate_limited_share']:.1%} of requests ({r['elapsed_s']:.0f} s)",
            flush=True,
        )
    out["batch_api"] = _load("batch_api").run(samples=batch_api_samples, latency=0.5)
    for r in out["batch_api"]:
        print(
            f"validation {r['mode']:9s}: {r['lm_calls']} LM calls, "
            f"${r['cost_usd']:.6f}, accuracy {r['val_accuracy']:.3f}",
            flush=True,
        )
    out["memory_growth"] = _load("memory_growth").run(steps=memory_steps)
    for r in out["memory_growth"]:
        print(
            f"memory over a {r['steps']}-step fit: {r['rss_start_mb']:.1f} -> "
            f"{r['rss_end_mb']:.1f} MB (growth {r['growth_mb']:.1f} MB)",
            flush=True,
        )
    return out


def scale_targets(
    scale: dict[str, list[dict[str, Any]]], extra: dict[str, float]
) -> list[tuple[str, str, bool]]:
    """The scale targets, checked on this run's rows."""
    out = []
    cpu = {
        r["batch"]: r
        for r in scale.get("client_cpu", [])
        if r.get("client", "openai") == "openai"
    }
    if 512 in cpu:
        r = cpu[512]
        out.append(
            (
                "client CPU per LM call at batch 512: at most 5 ms",
                f"{r['cpu_ms_per_call']:.2f} ms",
                r["cpu_ms_per_call"] <= 5.0,
            )
        )
    for batch, bound in ((128, 1.5), (512, 3.0)):
        if batch in cpu:
            r = cpu[batch]
            out.append(
                (
                    f"batch {batch} @ 500 ms (simulator in its own process): wall "
                    f"within {bound}x of the critical path",
                    f"{r['ratio']:.2f}x ({r['wall_s']:.2f} s vs "
                    f"{r['critical_path_s']:.1f} s)",
                    r["ratio"] <= bound,
                )
            )
    if "engine_default_us_per_node" in extra:
        value = extra["engine_default_us_per_node"]
        out.append(
            (
                "a plain custom backward (declares nothing): at most 50 us per node",
                f"{value:.1f} us",
                value <= 50,
            )
        )
    for r in scale.get("rate_limits", []):
        where = f"{r['samples']}-sample validation at {r['rpm_limit']} RPM"
        out += [
            (f"{where}: 0 failed samples", str(r["failed"]), r["failed"] == 0),
            (
                f"{where}: at least 90% of the limit's throughput",
                f"{r['efficiency']:.1%}",
                r["efficiency"] >= 0.9,
            ),
            (
                f"{where}: 429s on at most 5% of requests",
                f"{r['rate_limited_share']:.1%}",
                r["rate_limited_share"] <= 0.05,
            ),
        ]
    rows = {r["mode"]: r for r in scale.get("batch_api", [])}
    if {"sync", "batch_api"} <= rows.keys():
        sync, batch = rows["sync"], rows["batch_api"]
        out.append(
            (
                "Batch API validation pass: half the synchronous cost (the table's "
                "batch discount), same accuracy and LM calls",
                f"{batch['cost_ratio']:.4f}x (${batch['cost_usd']:.6f} vs "
                f"${sync['cost_usd']:.6f})",
                abs(batch["cost_ratio"] - 0.5) < 1e-9
                and batch["same_accuracy"]
                and batch["lm_calls"] == sync["lm_calls"],
            )
        )
    for r in scale.get("memory_growth", []):
        out.append(
            (
                f"resident memory growth over a {r['steps']}-step fit: under 50 MB",
                f"{r['growth_mb']:.1f} MB",
                r["growth_mb"] < 50,
            )
        )
    return out


def scale_markdown(scale: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The report's scale section."""
    lines = []
    if scale.get("client_cpu"):
        lines += [
            "",
            "## Scale: one step at large batches (simulator in its own process)",
            "",
            "The README step with `set_max_concurrency(256)`; client CPU is the "
            "benchmark process's `RUSAGE_SELF` over the step, after a warm-up call.",
            "",
            "| client | batch | transport | LM calls | rounds | CPU / LM call (ms) "
            "| wall (s) | critical path (s) | ratio |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r.get('client', 'openai')} | {r['batch']} | {r['transport']} | "
            f"{r['calls']} | {r['rounds']} | "
            f"{r['cpu_ms_per_call']:.2f} | {r['wall_s']:.2f} | "
            f"{r['critical_path_s']:.1f} | {r['ratio']:.2f} |"
            for r in scale["client_cpu"]
        ]
    for r in scale.get("rate_limits", []):
        lines += [
            "",
            "## Scale: validation under a provider rate limit",
            "",
            f"{r['samples']} samples through `Trainer.validate` against a simulated "
            f"{r['rpm_limit']} RPM limit (afnio is told nothing; it reads the "
            f"headers): {r['failed']} failed, {r['answered']} answered in "
            f"{r['elapsed_s']:.1f} s, {r['efficiency']:.1%} of the limit's "
            f"throughput, {r['rate_limited']} 429s of {r['received']} requests "
            f"({r['rate_limited_share']:.1%}); billed prompt tokens "
            f"{r['billed_prompt_tokens']} = served {r['served_prompt_tokens']}.",
        ]
    if scale.get("batch_api"):
        lines += [
            "",
            "## Scale: a validation pass through the Batch API",
            "",
            "| pass | samples | LM calls | batches | cost (USD) | accuracy "
            "| wall (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['mode']} | {r['samples']} | {r['lm_calls']} | {r['batches']} | "
            f"{r['cost_usd']:.6f} | {r['val_accuracy']:.3f} | {r['wall_s']:.2f} |"
            for r in scale["batch_api"]
        ]
        lines.append(
            "\nThe simulator completes a batch at its first poll; a provider takes "
            "minutes to hours. The cost and the calls are the point."
        )
    for r in scale.get("memory_growth", []):
        lines += [
            "",
            "## Scale: memory over a long fit",
            "",
            f"{r['steps']} steps at batch {r['batch']} ({r['calls']} LM calls): "
            f"resident memory {r['rss_start_mb']:.1f} -> {r['rss_end_mb']:.1f} MB "
            f"(growth {r['growth_mb']:.1f} MB); step graphs alive at most "
            f"{r['graphs_alive_max']}, {r['graphs_alive_after']} after the fit.",
        ]
    return lines


# -- the report ------------------------------------------------------------------------


def _phase(row: dict[str, Any], name: str, key: str) -> Any:
    return next((p[key] for p in row.get("phases", []) if p["name"] == name), 0)


def targets(
    ours: list[dict[str, Any]],
    peers: list[dict[str, Any]],
    estimates: list[dict[str, Any]],
) -> list[tuple[str, str, bool]]:
    """The speed and cost targets, checked on this run's rows: ``(target, measured,
    met)`` for each one the run has the rows for."""

    def row(
        rows: list[dict[str, Any]], library: str, batch: int, mode: str = "upstream"
    ) -> Any:
        return next(
            (
                r
                for r in rows
                if r["library"] == library
                and r["batch"] == batch
                and r["latency_s"] == 0.5
                and (library != "afnio" or _mode(r) == mode)
            ),
            None,
        )

    out = []
    a32, a4 = row(ours, "afnio", 32), row(ours, "afnio", 4)
    c32 = row(ours, "afnio", 32, "cheap")
    tg32 = row(peers, "textgrad", 32)
    if a32 is not None:
        out.append(
            (
                "batch 32 @ 500 ms: wall within 1.5x of the critical path",
                f"{a32['ratio']:.2f}x",
                a32["ratio"] <= 1.5,
            )
        )
    if a32 is not None and tg32 is not None:
        speedup = tg32["wall_s"] / a32["wall_s"]
        out.append(
            (
                "batch 32 @ 500 ms: at least 15x faster than TextGrad",
                f"{speedup:.1f}x ({a32['wall_s']:.2f} s vs {tg32['wall_s']:.2f} s)",
                speedup >= 15,
            )
        )
        share = a32["calls"] / tg32["calls"]
        out.append(
            (
                "LM calls per step at batch 32: at most 0.7x TextGrad's",
                f"{share:.2f}x ({a32['calls']} vs {tg32['calls']})",
                share <= 0.7,
            )
        )
    if a32 is not None and a4 is not None:
        t32 = _phase(a32, "optimizer", "prompt_tokens")
        t4 = _phase(a4, "optimizer", "prompt_tokens")
        out.append(
            (
                "optimizer prompt tokens at batch 32: at most 3x those at batch 4",
                f"{t32 / max(1, t4):.2f}x ({t32} vs {t4})",
                t32 <= 3 * t4,
            )
        )
    if a32 is not None and "rounds" in a32:
        out.append(
            (
                "core defaults, batch 32 @ 500 ms: 4 LM rounds (evaluator backward "
                "and chat backward each a round)",
                str(a32["rounds"]),
                a32["rounds"] == 4,
            )
        )
    if c32 is not None:
        out += cheap_targets(c32, [row(peers, name, 32) for name in PEERS])
    for e in estimates:
        worst = max(
            abs(e[f"estimated_{w}"] / e[f"measured_{w}"] - 1)
            for w in ("calls", "tokens")
        )
        out.append(
            (
                f"dry-run estimate of fit at batch {e['batch']} x {e['epochs']} "
                f"epochs, {_label(e)} (tuned on batch 16 x 1): within 20% in calls "
                "and tokens",
                f"{worst:.1%}",
                worst <= 0.2,
            )
        )
    return out


def _step_tokens(row: dict[str, Any]) -> int:
    """A row's prompt tokens for the step alone (a peer's without its warm-up)."""
    if "step_prompt_tokens" in row:
        return row["step_prompt_tokens"]
    if row.get("prompt_tokens_by_kind"):
        return sum(row["prompt_tokens_by_kind"].values())
    return row.get("prompt_tokens", 0)


def cheap_targets(
    row: dict[str, Any], peers: list[dict[str, Any] | None]
) -> list[tuple[str, str, bool]]:
    """The cheap mode's targets, checked on its batch-32 @ 500 ms ``row`` (and the
    peers' rows at the same batch and latency, ``None`` for a peer not run)."""
    from afnio.autodiff import config

    where = "cheap mode, batch 32 @ 500 ms"
    tokens = _step_tokens(row)
    failed = row.get("wrong_before", 0)
    per_call = row.get("chat_samples_per_call") or config.CHEAP_SAMPLES_PER_CALL
    bound = math.ceil(failed / per_call)
    chat = (row.get("calls_by_kind") or {}).get("chat backward", 0)
    out = [
        (
            f"{where}: prompt tokens per step at most {CHEAP_MAX_PROMPT_TOKENS:,}",
            f"{tokens:,}",
            tokens <= CHEAP_MAX_PROMPT_TOKENS,
        ),
        (
            f"{where}: chat-backward calls at most ceil(failed / samples_per_call)",
            f"{chat} ({failed} failed, {per_call} per call: at most {bound})",
            chat <= bound,
        ),
        (
            f"{where}: LM calls at most {CHEAP_MAX_CALLS}",
            str(row["calls"]),
            row["calls"] <= CHEAP_MAX_CALLS,
        ),
        (
            f"{where}: wall at most {CHEAP_MAX_WALL_S} s (1.3x a three-round "
            "critical path)",
            f"{row['wall_s']:.2f} s",
            row["wall_s"] <= CHEAP_MAX_WALL_S,
        ),
        (
            f"{where}: 3 LM rounds (no evaluator-backward round)",
            str(row.get("rounds")),
            row.get("rounds") == 3,
        ),
    ]
    ran = [p for p in peers if p is not None]
    if ran:
        theirs = ", ".join(f"{p['library']} {_step_tokens(p):,}" for p in ran)
        out.append(
            (
                f"{where}: fewer prompt tokens per step than every peer",
                f"{tokens:,} vs {theirs}",
                all(tokens < _step_tokens(p) for p in ran),
            )
        )
    return out


def _cell(row: dict[str, Any], kind: str) -> str:
    """``tokens (calls)`` of one kind of call, ``-`` if the library has none."""
    tokens = (row.get("prompt_tokens_by_kind") or {}).get(kind)
    calls = (row.get("calls_by_kind") or {}).get(kind, 0)
    if tokens is None and not calls:
        return "-"
    return f"{tokens or 0:,} ({calls})"


def focus_of(rows: list[dict[str, Any]]) -> tuple[int, float] | None:
    """The ``(batch, latency)`` of the by-kind and padded tables: the largest batch
    and latency of afnio's rows (32 @ 0.5 s by default)."""
    if not rows:
        return None
    return max(r["batch"] for r in rows), max(r["latency_s"] for r in rows)


def tokens_by_kind_markdown(
    ours: list[dict[str, Any]],
    peers: list[dict[str, Any]],
    not_run: dict[str, str] | None = None,
) -> list[str]:
    """The table of prompt tokens by call kind at :func:`focus_of` (afnio in both
    modes, and the peers; a peer not run is listed as such)."""
    focus = focus_of(ours)
    if focus is None:
        return []
    batch, latency = focus

    def at(r: dict[str, Any]) -> bool:
        return r["batch"] == batch and r["latency_s"] == latency

    lines = [
        "",
        f"## Prompt tokens by call kind (batch {batch} @ {latency} s)",
        "",
        "Each request the simulator received is classified by the simulator's "
        "responder that answers it (`afnio.testing.world.answer`): the task or "
        "fallback responder answers a forward call; a grouped chat-backward call "
        "counts as chat backward; TextGrad's backward calls and its TGD update, "
        "Trace's OptoPrime call (its backward makes no LM call). Tokens as the "
        "simulator counts them (words + 3 per message), the peers' untimed warm-up "
        "request left out. Cells: tokens (calls).",
        "",
        "| library | mode | forward | evaluator backward | chat backward | backward "
        "| optimizer | total | LM calls |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in [r for r in ours if at(r)] + [r for r in peers if at(r)]:
        library = r["library"]
        mode = _label(r) if library == "afnio" else "-"
        cells = " | ".join(
            _cell(r, k)
            for k in ("forward", "evaluator backward", "chat backward", "backward")
        )
        lines.append(
            f"| {library} | {mode} | {cells} | {_cell(r, 'optimizer')} | "
            f"{_step_tokens(r):,} | {r['calls']} |"
        )
    for name, why in (not_run or {}).items():
        lines.append(f"| {name} | not run ({why}) | - | - | - | - | - | - | - |")
    return lines


def padded_markdown(
    ours: list[dict[str, Any]], padded: list[dict[str, Any]]
) -> list[str]:
    """The padded-feedback table: each mode's padded step beside its unpadded one
    (same batch and latency), with the optimizer prompt's growth."""
    if not padded:
        return []
    words = padded[0].get("feedback_words")
    batch, latency = padded[0]["batch"], padded[0]["latency_s"]
    lines = [
        "",
        f"## Padded feedback: every LM-written feedback at least {words} words "
        f"(batch {batch} @ {latency} s)",
        "",
        f"`Simulator(feedback_words={words})` pads every non-empty feedback string of "
        "a backward answer (evaluator backward, chat backward, grouped chat "
        "backward) with a neutral filler sentence: the learning is unchanged, the "
        "optimizer prompt grows (simulator tokens are words). Direct evaluator "
        "feedback is not LM-written, so it is not padded.",
        "",
        "| mode | feedback | LM calls | rounds | wall (s) | prompt tokens "
        "(fwd / evaluator bwd / chat bwd / opt) | total | optimizer prompt |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in padded:
        base = next(
            (
                o
                for o in ours
                if o["batch"] == batch
                and o["latency_s"] == latency
                and _mode(o) == _mode(r)
                and not o.get("feedback_words")
            ),
            None,
        )
        for row, label in ((base, "as answered"), (r, f"padded to {words} words")):
            if row is None:
                continue
            by_kind = row.get("prompt_tokens_by_kind") or {}
            split = " / ".join(
                f"{by_kind.get(k, 0):,}"
                for k in ("forward", "evaluator backward", "chat backward", "optimizer")
            )
            opt = by_kind.get("optimizer", 0)
            growth = ""
            if row is r and base is not None:
                before = (base.get("prompt_tokens_by_kind") or {}).get("optimizer", 0)
                growth = f" ({opt / max(1, before):.2f}x)"
            lines.append(
                f"| {_label(row)} | {label} | {row['calls']} | {row['rounds']} | "
                f"{row['wall_s']:.2f} | {split} | {_step_tokens(row):,} | "
                f"{opt:,}{growth} |"
            )
    return lines


def markdown(
    ours: list[dict[str, Any]],
    peers: list[dict[str, Any]],
    extra: dict[str, float],
    estimates: list[dict[str, Any]] | None = None,
    scale: dict[str, list[dict[str, Any]]] | None = None,
    padded: list[dict[str, Any]] | None = None,
    not_run: dict[str, str] | None = None,
) -> str:
    # which data the steps used (one entry per source, whatever the batch)
    data = sorted(
        {
            re.sub(r" \((first )?\d+ (emails|messages)\)$", "", r["data"])
            for r in [*ours, *(padded or [])]
            if r.get("data")
        }
    )
    lines = [
        "# afnio benchmark report",
        "",
        f"Machine: {sys.platform}, Python {sys.version.split()[0]}; every LM call "
        "goes to the bundled simulator (`afnio.testing`) over HTTP.",
        "",
        "## One optimization step (Facility Support sentiment)",
        "",
    ]
    if data:
        lines += [f"Data: {'; '.join(data)}.", ""]
    lines += [
        "Modes: *core defaults* is what the core API does unless told otherwise (an "
        "LM-written evaluator gradient, one chat-backward call per sample: four LM "
        'rounds); *cheap* runs the step inside `afnio.backward_options("cheap")`, '
        "the default of `optimize()` and `AfnioTGD` (the evaluator writes each "
        "failed sample's feedback itself, chat-backward calls grouped by prompt "
        "template, at most `CHEAP_SAMPLES_PER_CALL` samples a call: three LM rounds).",
        "",
        "| library | mode | latency | batch | wall (s) | critical path (s) | ratio "
        "| calls (fwd/bwd/opt) | prompt tokens (fwd/bwd/opt) | peak in flight |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ours:
        calls = "/".join(
            str(_phase(r, p, "calls")) for p in ("forward", "backward", "optimizer")
        )
        tokens = "/".join(
            str(_phase(r, p, "prompt_tokens"))
            for p in ("forward", "backward", "optimizer")
        )
        lines.append(
            f"| afnio | {_label(r)} | {r['latency_s']} | {r['batch']} | "
            f"{r['wall_s']:.2f} | {r['critical_path_s']:.2f} | {r['ratio']:.2f} | "
            f"{r['calls']} ({calls}) | {tokens} | {r['peak_in_flight']} |"
        )
    for r in peers:
        lines.append(
            f"| {r['library']} | - | {r['latency_s']} | {r['batch']} | "
            f"{r['wall_s']:.2f} | - | - | {r['calls']} | {r['prompt_tokens']} (all) "
            f"| {r['peak_in_flight']} |"
        )
    for name, why in (not_run or {}).items():
        lines.append(f"| {name} | - | - | - | not run ({why}) | - | - | - | - | - |")
    if peers:
        lines += ["", "## Ratios (peer / afnio, same latency and batch)", ""]
        lines += [
            "| peer | latency | batch | wall | LM calls | wall vs cheap "
            "| LM calls vs cheap | prompt tokens vs core defaults / cheap |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in peers:

            def mine(mode: str, r: dict[str, Any] = r) -> Any:
                return next(
                    (
                        o
                        for o in ours
                        if o["batch"] == r["batch"]
                        and o["latency_s"] == r["latency_s"]
                        and _mode(o) == mode
                    ),
                    None,
                )

            ours_row, cheap = mine("upstream"), mine("cheap")
            if ours_row is None:
                continue
            vs_cheap = (
                f"{r['wall_s'] / cheap['wall_s']:.1f}x | "
                f"{r['calls'] / max(1, cheap['calls']):.2f}x"
                if cheap is not None
                else "- | -"
            )
            tokens = f"{_step_tokens(r) / max(1, _step_tokens(ours_row)):.2f}x"
            if cheap is not None:
                tokens += f" / {_step_tokens(r) / max(1, _step_tokens(cheap)):.2f}x"
            lines.append(
                f"| {r['library']} | {r['latency_s']} | {r['batch']} | "
                f"{r['wall_s'] / ours_row['wall_s']:.1f}x | "
                f"{r['calls'] / max(1, ours_row['calls']):.2f}x | {vs_cheap} | "
                f"{tokens} |"
            )
    lines += tokens_by_kind_markdown(ours, peers, not_run)
    lines += padded_markdown(ours, padded or [])
    if estimates:
        lines += [
            "",
            "## Dry-run estimate and pilot projection of `fit`",
            "",
            "Tuned on a pilot at batch 16 x 1 epoch; each configuration estimated "
            "before it ran (`trainer.estimate`, no LM call) and projected from the "
            "pilot's rates (`project`), then measured (simulator tokens are words).",
            "",
            "| mode | batch x epochs | measured calls / tokens | estimated "
            "| projected |",
            "|---|---|---|---|---|",
        ]
        for e in estimates:
            err = {
                f"{k}_{w}": e[f"{k}_{w}"] / e[f"measured_{w}"] - 1
                for k in ("estimated", "projected")
                for w in ("calls", "tokens")
            }
            lines.append(
                f"| {_label(e)} | {e['batch']} x {e['epochs']} | "
                f"{e['measured_calls']} / "
                f"{e['measured_tokens']} | {e['estimated_calls']} / "
                f"{e['estimated_tokens']} ({err['estimated_calls']:+.1%} / "
                f"{err['estimated_tokens']:+.1%}) | {e['projected_calls']} / "
                f"{e['projected_tokens']} ({err['projected_calls']:+.1%} / "
                f"{err['projected_tokens']:+.1%}) |"
            )
    lines += scale_markdown(scale or {})
    checks = targets(ours, peers, estimates or []) + scale_targets(scale or {}, extra)
    if checks:
        lines += ["", "## Targets", "", "| target | this run | met |", "|---|---|---|"]
        lines += [
            f"| {name} | {value} | {'yes' if met else '**no**'} |"
            for name, value, met in checks
        ]
    if extra:
        lines += ["", "## Overheads", ""]
        lines += [f"* {k}: {v:.2f}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def chart(ours: list[dict[str, Any]], peers: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    series = [("afnio", mode) for mode in MODES]
    series += [(name, None) for name in sorted({r["library"] for r in peers})]
    for library, mode in series:
        rows = [
            r
            for r in [*ours, *peers]
            if r["library"] == library and (mode is None or _mode(r) == mode)
        ]
        name = library if mode is None else f"{library} ({MODE_LABELS[mode]})"
        for latency in sorted({r["latency_s"] for r in rows}):
            points = sorted(
                (r["batch"], r["wall_s"]) for r in rows if r["latency_s"] == latency
            )
            ax.plot(
                *zip(*points, strict=True), marker="o", label=f"{name} @ {latency}s"
            )
    ax.set_xlabel("batch size")
    ax.set_ylabel("one step, wall time (s)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the benchmarks and write the report")
    run.add_argument("--batches", type=int, nargs="+", default=[4, 8, 32])
    run.add_argument("--latencies", type=float, nargs="+", default=[0.5, 0.05])
    run.add_argument("--peers", action="store_true", help="also TextGrad and Trace")
    run.add_argument("--no-install", action="store_true", help="never create venvs")
    run.add_argument("--no-overheads", action="store_true")
    run.add_argument(
        "--no-estimate", action="store_true", help="skip the dry-run estimate check"
    )
    run.add_argument(
        "--no-scale", action="store_true", help="skip the scale benchmarks"
    )
    run.add_argument("--scale-batches", type=int, nargs="+", default=[32, 128, 512])
    run.add_argument(
        "--rate-limit-scale",
        type=float,
        default=1.0,
        help="1.0: 2,000 samples at 600 RPM (about 140 s); 0.1: 200 at 60 per 6 s",
    )
    run.add_argument("--batch-api-samples", type=int, default=2000)
    run.add_argument("--memory-steps", type=int, default=100)
    run.add_argument(
        "--feedback-words",
        type=int,
        default=FEEDBACK_WORDS,
        metavar="N",
        help="the padded-feedback measurement pads every LM-written feedback to N "
        f"words (default {FEEDBACK_WORDS}; 0 skips it)",
    )
    run.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if args.feedback_words < 0:
        parser.error("--feedback-words must be >= 0 (0 skips the padded measurement)")
    ours = afnio_steps(args.batches, args.latencies)
    focus = focus_of(ours)
    padded = (
        padded_steps(*focus, args.feedback_words)
        if args.feedback_words and focus is not None
        else []
    )
    not_run: dict[str, str] = {}
    peers = (
        peer_steps(args.batches, args.latencies, not args.no_install, not_run)
        if args.peers
        else []
    )
    extra = {} if args.no_overheads else {**overheads(), **replay_figures()}
    estimates = [] if args.no_estimate else estimate_rows()
    scale = (
        {}
        if args.no_scale
        else scale_rows(
            args.scale_batches,
            args.rate_limit_scale,
            args.batch_api_samples,
            args.memory_steps,
        )
    )
    args.out.mkdir(parents=True, exist_ok=True)
    checks = targets(ours, peers, estimates) + scale_targets(scale, extra)
    payload = {
        "afnio": ours,
        "peers": peers,
        "overheads": extra,
        "estimates": estimates,
        "scale": scale,
        "padded": padded,
        "peers_not_run": not_run,
        "targets": [{"target": t, "measured": v, "met": m} for t, v, m in checks],
    }
    # the report first: a figure the JSON cannot hold must not lose the run
    (args.out / "report.md").write_text(
        markdown(ours, peers, extra, estimates, scale, padded, not_run),
        encoding="utf-8",
    )
    (args.out / "results.json").write_text(
        json.dumps(payload, indent=2, default=json_default), encoding="utf-8"
    )
    drew = chart(ours, peers, args.out / "chart.png")
    print(f"wrote {args.out / 'report.md'}" + (" and chart.png" if drew else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
