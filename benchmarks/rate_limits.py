"""Rate limits: a validation pass against a simulated per-model RPM limit.

A ``Trainer.validate`` of ``--samples`` (2,000) Facility-Support-shaped messages (a
``SentimentClassifier``, one LM call per sample, each message made unique so
nothing is answered twice) through ``afnio.models.openai.OpenAI``, against the
bundled simulator in its own process with ``--rpm`` (600) requests per minute per
model and ``--latency`` (0.5 s) per answer. afnio knows nothing of the limit in
advance: it learns it from the ``x-ratelimit-*`` headers, paces its requests, and
retries any 429 after the server's ``retry-after`` (``afnio.models.rate_limit``).

Reported, from the simulator's own counters (read over a pipe) and afnio's:

* ``failed``: samples without an answer (the validation raising counts all of them);
  target 0;
* ``efficiency``: answered requests / what the server's bucket allowed during the
  pass (``limit + rate x elapsed``: it starts full, then refills at ``limit`` per
  window); target >= 0.90. ``rpm`` is the plain answered requests per window;
* ``rate_limited_share``: 429s sent by the simulator / requests it received;
  target <= 0.05.

``--scale s`` shrinks the limit, the window (60 s x s) and the samples by ``s``: the
rate (requests per second), hence the concurrency needed, stays the same and the
pass takes ``s`` times as long (about 140 s at ``s = 1``: the bucket's 600 at once,
then 10 per second).

Run: ``python benchmarks/rate_limits.py [--scale 1] [--samples 2000] [--rpm 600]
[--latency 0.5] [--json PATH]``; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from benchmarks.common import PipedProcess, answer_commands  # noqa: E402

TARGET_EFFICIENCY = 0.90
TARGET_429_SHARE = 0.05
MODEL = "afnio-sim-1"


# -- the simulator's process -----------------------------------------------------------


def serve(latency: float, rpm: int, window: float) -> int:
    """The child: a rate-limited simulator on a free port; prints its base URL,
    then answers ``stats`` (its counters as one JSON line) and ``quit``
    (:func:`benchmarks.common.answer_commands`)."""
    from dataclasses import asdict

    from afnio.testing import Simulator

    with Simulator(
        latency=latency, requests_per_minute=rpm, rate_limit_window=window
    ) as sim:
        answer_commands(sim.base_url, {"stats": lambda _: asdict(sim.stats)})
    return 0


class SimulatorProcess(PipedProcess):
    """The simulator in its own process (:func:`serve`), its counters over a pipe."""

    def __init__(self, latency: float, rpm: int, window: float) -> None:
        super().__init__(
            str(Path(__file__).resolve()),
            "_serve",
            *(str(latency), str(rpm), str(window)),
        )

    def stats(self) -> dict[str, Any]:
        """The simulator's counters (:class:`afnio.testing.SimulatorStats`)."""
        return self.ask("stats")


# -- the pass --------------------------------------------------------------------------


def _rows(samples: int) -> list[tuple[str, str]]:
    from benchmarks.resume_kills import MESSAGES

    rows = []
    for i in range(samples):
        text, label = MESSAGES[i % len(MESSAGES)]
        rows.append((f"{text} (ticket {i})", label))
    return rows


def measure(
    samples: int = 2000,
    rpm: int = 600,
    window: float = 60.0,
    latency: float = 0.5,
    batch_size: int = 200,
    concurrency: int = 64,
) -> dict[str, Any]:
    """One validation pass of ``samples`` against ``rpm`` requests per ``window``
    seconds; returns the row (see the module docstring)."""
    import afnio
    from afnio.models.openai import OpenAI
    from afnio.models.rate_limit import get_rate_limit_stats, reset_rate_limit_stats
    from afnio.trainer import Trainer
    from afnio.utils.data import DataLoader
    from benchmarks.resume_kills import Messages
    from examples.facility_support import SentimentClassifier

    previous = afnio.get_max_concurrency()
    afnio.set_max_concurrency(concurrency)
    sim = SimulatorProcess(latency, rpm, window)
    error = None
    try:
        with (
            OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as client,
            tempfile.TemporaryDirectory() as root,
        ):
            reset_rate_limit_stats()
            trainer = Trainer(
                max_epochs=1,
                default_root_dir=root,
                enable_progress_bar=False,
                enable_agent_summary=False,
                enable_checkpointing=False,
            )
            loader = DataLoader(Messages(_rows(samples)), batch_size=batch_size)
            agent = SentimentClassifier(client, MODEL)
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            try:
                metrics = trainer.validate(agent, loader)
            except Exception as e:  # every sample failed
                metrics, error = {}, f"{type(e).__name__}: {e}"
            elapsed = time.perf_counter() - start
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            answered = client.calls
            usage = client.get_usage()
        counters = sim.stats()
        limiter = get_rate_limit_stats(MODEL)
    finally:
        sim.close()
        afnio.set_max_concurrency(previous)
    received = counters["calls"]
    allowed = rpm + rpm / window * elapsed
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "samples": samples,
        "rpm_limit": rpm,
        "window_s": window,
        "latency_s": latency,
        "elapsed_s": round(elapsed, 2),
        "failed": samples - answered if error is None else samples,
        "error": error,
        "answered": answered,
        "served": counters["served"],
        "rate_limited": counters["rate_limited"],
        "received": received,
        "rate_limited_share": round(counters["rate_limited"] / max(1, received), 4),
        "rpm": round(counters["served"] / elapsed * window, 1),
        "efficiency": round(counters["served"] / allowed, 4),
        "client_429s_seen": limiter.rate_limited,
        "client_retries": limiter.retries,
        # a retried 429 is not billed: afnio's usage equals the served answers'
        "billed_prompt_tokens": usage.get("prompt_tokens", 0),
        "served_prompt_tokens": counters["prompt_tokens"],
        "val_accuracy": metrics.get("val_accuracy"),
        "client_cpu_ms_per_call": round(cpu * 1000 / max(1, answered), 2),
    }


def run(scale: float = 1.0, latency: float = 0.5) -> list[dict[str, Any]]:
    """The benchmark's rows for ``python -m benchmarks run``: one pass at ``scale``
    (2,000 samples and 600 RPM at 1.0)."""
    return [_scaled(scale, latency, 2000, 600)]


def _scaled(scale: float, latency: float, samples: int, rpm: int) -> dict[str, Any]:
    if not 0 < scale <= 1:
        raise ValueError(f"`scale` must be in (0, 1], got {scale!r}")
    n = max(20, round(samples * scale))
    limit = max(2, round(rpm * scale))
    window = 60.0 * limit / rpm  # the same rate per second
    row = measure(
        samples=n,
        rpm=limit,
        window=window,
        latency=latency,
        batch_size=max(10, round(200 * scale)),
    )
    row["scale"] = scale
    row["meets_targets"] = (
        row["failed"] == 0
        and row["efficiency"] >= TARGET_EFFICIENCY
        and row["rate_limited_share"] <= TARGET_429_SHARE
    )
    return row


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_serve"]:
        return serve(float(argv[1]), int(argv[2]), float(argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    row = _scaled(args.scale, args.latency, args.samples, args.rpm)
    print(
        f"rate limits: {row['samples']} samples at {row['rpm_limit']} requests per "
        f"{row['window_s']:g} s, latency {row['latency_s']} s: {row['elapsed_s']} s, "
        f"failed {row['failed']}, efficiency {row['efficiency']:.1%} (target >= "
        f"{TARGET_EFFICIENCY:.0%}), 429s {row['rate_limited']} of "
        f"{row['received']} requests = {row['rate_limited_share']:.1%} (target <= "
        f"{TARGET_429_SHARE:.0%}), {row['rpm']} answered per window"
    )
    if args.json:
        args.json.write_text(json.dumps([row], indent=2) + "\n")
    return 0 if row["meets_targets"] else 1


if __name__ == "__main__":
    sys.exit(main())
