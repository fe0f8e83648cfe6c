"""Kill a training run at seeded moments, resume it each time, and compare it with the
same run uninterrupted.

A run is ``Trainer.fit`` of the sentiment classifier of ``examples/facility_support.py``
on twelve messages (8 train in batches of 4, 4 validation), 3 epochs, against the
bundled simulator started in this process. Each attempt runs in a forked child that
resumes with ``fit(ckpt_path="last")`` when a checkpoint exists and SIGKILLs itself at
its chosen moment (no ``finally`` block, no flush: a real kill):

* ``request k``: when its k-th LM request leaves (mid-step, or mid-validation, with
  other requests in flight);
* ``replace k``: at its k-th ``os.replace`` (a checkpoint written but not yet renamed,
  the ``last`` pointer not yet moved, or ``metrics.jsonl``, which is written after the
  last batch of an epoch and before the epoch checkpoint);
* ``fsync k``: at its k-th ``os.fsync`` (mid-save: the temporary file written, not
  renamed);
* ``validation k``: when its k-th LM request made by a validation pass leaves
  (mid-validation);
* ``epoch_end k``: at the k-th end of an epoch, after its last batch checkpoint, its
  validation and its history row, before the epoch checkpoint.

The resumed run must end with the uninterrupted run's history (every key and value;
``total_cost`` within the spend of the interrupted units of work) and parameters, and
its run log (``run_log.jsonl``) must be the uninterrupted run's once the ``resume``
records and the timestamps are removed: costs may differ only in one record per kill
(the interrupted step or validation), and the cumulative ``total_usd`` by at most
the spend of the interrupted units of work (:func:`run_log_differences`).

Run: ``python benchmarks/resume_kills.py --kills 50`` (prints each kill and a summary;
exits 1 on any difference).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402

import afnio  # noqa: E402
from afnio import Variable  # noqa: E402
from afnio.models.openai import OpenAI  # noqa: E402
from afnio.testing import SIMULATOR_MODEL, Simulator  # noqa: E402
from afnio.trainer import Trainer  # noqa: E402
from afnio.utils.data import DataLoader, Dataset  # noqa: E402
from examples.facility_support import SentimentClassifier  # noqa: E402

MESSAGES = [
    ("The new cleaning crew is wonderful.", "positive"),
    ("The heater broke again, this is awful.", "negative"),
    ("Please confirm the Tuesday visit.", "neutral"),
    ("I love how quickly you fixed the lift.", "positive"),
    ("Terrible response time, I am upset.", "negative"),
    ("Where can I find the invoice?", "neutral"),
    ("Fantastic work on the garden.", "positive"),
    ("The worst service we have had.", "negative"),
    ("Can you send the schedule?", "neutral"),
    ("We are grateful for the quick repair.", "positive"),
    ("Unacceptable delays again.", "negative"),
    ("Is the gym open on Sunday?", "neutral"),
]
EPOCHS = 3
KINDS = ("request", "replace", "fsync", "validation", "epoch_end")


class Messages(Dataset):
    """Facility-support-shaped items: (message, (urgency, sentiment, categories))."""

    def __init__(self, rows: list[tuple[str, str]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Any:
        text, label = self.rows[i]
        return (
            Variable(text, role="input email or message"),
            (
                Variable("low", role="output urgency"),
                Variable(label, role="output sentiment"),
                Variable("{}", role="output categories"),
            ),
        )


@dataclass(frozen=True)
class Kill:
    """Die at the ``at``-th event of ``kind`` (counted from the child's start)."""

    kind: str
    at: int

    def __str__(self) -> str:
        return f"{self.kind} {self.at}"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(kill: Kill) -> httpx.AsyncClient:
    """Install the kill in this (child) process; returns the HTTP client to use."""
    seen = {"n": 0}
    validating = {"now": False}

    def tick() -> None:
        seen["n"] += 1
        if seen["n"] == kill.at:
            _die()

    async def on_request(request: httpx.Request) -> None:
        if kill.kind == "request" or (kill.kind == "validation" and validating["now"]):
            tick()

    evaluate, write_metrics = Trainer._evaluate, Trainer._write_metrics

    def patched_evaluate(self: Trainer, *args: Any, **kwargs: Any) -> Any:
        validating["now"] = True
        try:
            return evaluate(self, *args, **kwargs)
        finally:
            validating["now"] = False

    def patched_write_metrics(self: Trainer) -> None:
        if kill.kind == "epoch_end":
            tick()
        write_metrics(self)

    Trainer._evaluate = patched_evaluate  # type: ignore[method-assign]
    Trainer._write_metrics = patched_write_metrics  # type: ignore[method-assign]

    if kill.kind in ("replace", "fsync"):
        original = getattr(os, kill.kind)

        def patched(*args: Any, **kwargs: Any) -> Any:
            tick()
            return original(*args, **kwargs)

        setattr(os, kill.kind, patched)
    return httpx.AsyncClient(event_hooks={"request": [on_request]})


def _fit(root: Path, base_url: str, kill: Kill | None, result: Path) -> None:
    """One attempt (in a child): resume from the last checkpoint if any, train, write
    the outcome to ``result``."""
    http = _arm(kill) if kill is not None else httpx.AsyncClient()
    client = OpenAI(
        base_url=base_url, api_key="sk-test", max_retries=0, http_client=http
    )
    afnio.set_backward_model_client(client, completion_args={"model": SIMULATOR_MODEL})
    agent = SentimentClassifier(client, SIMULATOR_MODEL)
    train = DataLoader(Messages(MESSAGES[:8]), batch_size=4, shuffle=True, seed=3)
    val = DataLoader(Messages(MESSAGES[8:]), batch_size=4)
    trainer = Trainer(
        max_epochs=EPOCHS,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_agent_summary=False,
    )
    resume = "last" if (root / "checkpoints" / "last").exists() else None
    trainer.fit(agent, train, val, ckpt_path=resume)
    run_log = trainer.run_log_path.read_text("utf-8").splitlines()
    result.write_text(
        json.dumps(
            {
                "history": trainer.history,
                "run_log": [json.loads(line) for line in run_log],
                "prompt": agent.system_prompt.data,
                "total_cost": trainer.total_cost,
                "max_step_cost": trainer._max_step_cost,
                "max_eval_cost": trainer._max_eval_cost,
            }
        ),
        "utf-8",
    )


def attempt(root: Path, base_url: str, kill: Kill | None) -> dict[str, Any] | None:
    """Run one attempt in a forked child; its outcome, or ``None`` if it was killed."""
    result = root / "result.json"
    result.unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 1)
                _fit(root, base_url, kill, result)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        if os.WTERMSIG(status) != signal.SIGKILL:
            raise RuntimeError(f"the child died of signal {os.WTERMSIG(status)}")
        return None
    if os.WEXITSTATUS(status) != 0:
        raise RuntimeError(f"the attempt with kill {kill} failed (see stderr)")
    return json.loads(result.read_text("utf-8"))


def run(
    root: Path, base_url: str, kills: Iterator[Kill], most: int
) -> tuple[dict[str, Any], list[Kill]]:
    """Attempt with the next kill until an attempt completes (at most ``most`` kills,
    or until ``kills`` runs out, then a last attempt without one); returns the outcome
    and the kills that happened."""
    happened: list[Kill] = []
    while len(happened) < most:
        kill = next(kills, None)
        if kill is None:
            break
        outcome = attempt(root, base_url, kill)
        if outcome is not None:
            return outcome, happened
        happened.append(kill)
    outcome = attempt(root, base_url, None)
    assert outcome is not None
    return outcome, happened


def differences(full: dict[str, Any], resumed: dict[str, Any], kills: int) -> list[str]:
    """How the resumed outcome differs from the uninterrupted one (empty: none).
    ``total_cost`` may exceed the full run's by the spend of one interrupted unit of
    work (a step, or a validation pass) per kill."""
    problems = []
    if resumed["prompt"] != full["prompt"]:
        problems.append("the trained prompt differs")
    if len(resumed["history"]) != len(full["history"]):
        problems.append("the history has another number of rows")
    for got, want in zip(resumed["history"], full["history"], strict=False):
        a = {k: v for k, v in got.items() if k != "total_cost"}
        b = {k: v for k, v in want.items() if k != "total_cost"}
        if a != b:
            problems.append(f"epoch {want.get('epoch')}: {a} != {b}")
    unit = max(full["max_step_cost"], 4 * full["max_eval_cost"])
    extra = resumed["total_cost"] - full["total_cost"]
    if extra < -1e-9 or extra > kills * unit + 1e-9:
        problems.append(
            f"total_cost {resumed['total_cost']:.6f} vs {full['total_cost']:.6f} "
            f"(allowed: + up to {kills} x {unit:.6f})"
        )
    return problems


_TIMES = ("ts", "started")
_COSTS = ("cost", "total_cost")


def run_log_differences(
    full: dict[str, Any], resumed: dict[str, Any], kills: int
) -> list[str]:
    """How the resumed run's log differs from the uninterrupted one's (empty: none).

    ``resume`` records and the timestamps (``ts``, ``started``) are left out; every
    other field must be equal, except costs: the ``cost`` of at most one record per
    kill (the step or validation that was interrupted and done again) may differ,
    and the cumulative ``total_usd``/``total_cost`` may exceed the full run's by
    the spend of one interrupted unit of work per kill (as ``total_cost`` in
    :func:`differences`)."""

    def records(outcome: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {k: v for k, v in r.items() if k not in _TIMES}
            for r in outcome["run_log"]
            if r.get("type") != "resume"
        ]

    def totals(record: dict[str, Any]) -> float | None:
        cost = record.get("cost")
        if isinstance(cost, dict):
            return cost.get("total_usd")
        return record.get("total_cost")

    problems = []
    want, got = records(full), records(resumed)
    if [r.get("type") for r in got] != [r.get("type") for r in want]:
        problems.append(
            f"the run log has records {[r.get('type') for r in got]}, the "
            f"uninterrupted one {[r.get('type') for r in want]}"
        )
    unit = max(full["max_step_cost"], 4 * full["max_eval_cost"])
    cost_changed = 0
    for n, (a, b) in enumerate(zip(got, want, strict=False)):
        plain_a = {k: v for k, v in a.items() if k not in _COSTS}
        plain_b = {k: v for k, v in b.items() if k not in _COSTS}
        if plain_a != plain_b:
            problems.append(f"run-log record {n} ({b.get('type')}) differs")
            continue
        part_a = {k: v for k, v in (a.get("cost") or {}).items() if k != "total_usd"}
        part_b = {k: v for k, v in (b.get("cost") or {}).items() if k != "total_usd"}
        cost_changed += part_a != part_b
        ta, tb = totals(a), totals(b)
        if (ta is None) != (tb is None) or (
            ta is not None and not -1e-9 <= ta - tb <= kills * unit + 1e-9
        ):
            problems.append(
                f"run-log record {n} ({b.get('type')}): total {ta} vs {tb} "
                f"(allowed: + up to {kills} x {unit:.6f})"
            )
    if cost_changed > kills:
        problems.append(
            f"the costs of {cost_changed} run-log records differ ({kills} kills)"
        )
    return problems


def plan(seed: int) -> Iterator[Kill]:
    """Seeded kills of every kind, at moments spread over a run."""
    rng = random.Random(seed)
    # per epoch: about 20 requests, 7 renames and fsyncs (2 batch checkpoints and
    # their pointers, metrics.jsonl, the epoch checkpoint and its pointer)
    limits = {
        "request": 60,
        "replace": 21,
        "fsync": 21,
        "validation": 8,
        "epoch_end": 3,
    }
    while True:
        kind = rng.choice(KINDS)
        yield Kill(kind, rng.randint(1, limits[kind]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50, help="kills in all")
    parser.add_argument("--per-run", type=int, default=5, help="kills per resumed run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    kills = plan(args.seed)
    total, failed, runs = 0, 0, 0
    with Simulator() as sim, tempfile.TemporaryDirectory() as tmp:
        full, _ = run(Path(tmp) / "full", sim.base_url, kills, 0)
        while total < args.kills:
            runs += 1
            most = min(args.per_run, args.kills - total)
            outcome, happened = run(Path(tmp) / f"run{runs}", sim.base_url, kills, most)
            total += len(happened)
            problems = differences(full, outcome, len(happened))
            problems += run_log_differences(full, outcome, len(happened))
            failed += bool(problems)
            extra = outcome["total_cost"] - full["total_cost"]
            print(
                f"run {runs}: kills {', '.join(map(str, happened)) or '-'}: "
                + ("; ".join(problems) if problems else "identical")
                + f" (cost +${extra:.6f}, {extra / full['total_cost']:+.1%})"
            )
    print(
        f"{total} kills in {runs} runs: {runs - failed} runs identical to the "
        f"uninterrupted run (history, parameters and run log; cost within the "
        f"interrupted units of work), {failed} different."
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
