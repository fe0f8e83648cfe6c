"""Memory growth: the client's resident memory over a ``Trainer.fit`` of 100 steps.

A sentiment classifier (a trainable system prompt, ``ChatCompletion``,
``ExactMatchEvaluator``, TGD: the README's program) is fitted for ``--steps`` steps of
``--batch`` samples, streamed from a generated JSON Lines file through
``JsonlDataset`` and the ``DataLoader`` (one epoch: the file holds ``steps x batch``
rows, Facility Support's item shape), with the Trainer's defaults (a checkpoint after
every step). Every LM call goes to the bundled simulator in its own process
(``python -m afnio.testing serve --port 0 --latency L``), so only the client's memory
is measured.

Measured in the client process (Linux ``/proc/self/status`` ``VmRSS``; elsewhere
``ru_maxrss``):

* ``rss_start_mb``: before ``fit`` (after one warm-up LM call: imports, afnio's loop,
  one connection);
* ``rss_warm_mb``: at the start of step ``--warmup`` (the first steps fill caches);
* ``rss_end_mb``: after ``fit``;
* ``growth_mb`` = end - start (the target: below ``TARGET_MB``, 50 MB), and
  ``growth_after_warmup_mb`` = end - warm;
* ``graphs_alive_max``: the most step graphs alive at once during the fit, and
  ``graphs_alive_after``: those alive after it, before any garbage collection (each
  step's loss is held by a weak reference; a step's graph is freed when its loss
  is): 1 and 0 when every graph is freed after its step;
* with ``--gc-off`` the cyclic garbage collector is off during the fit:
  ``cyclic_garbage`` is then the number of objects left in reference cycles
  (``gc.collect()`` after the fit);
* ``calls``: LM calls (afnio's phase ledger), ``wall_s`` and ``cpu_s`` (the client's
  CPU, ``RUSAGE_SELF``).

Run: ``python benchmarks/memory_growth.py [--steps 100] [--batch 8] [--latency 0]
[--warmup 5] [--gc-off] [--json PATH]``; exits 1 when ``growth_mb`` is above the target.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script: afnio from this checkout
    sys.path.insert(0, str(HERE.parent))

import afnio  # noqa: E402
from afnio import cognitive as cog  # noqa: E402
from afnio.models.openai import OpenAI  # noqa: E402
from afnio.optim import TGD  # noqa: E402
from afnio.testing import SALIENCE_LEXICON, SIMULATOR_MODEL  # noqa: E402
from afnio.trainer import Trainer  # noqa: E402
from afnio.utils.data import DataLoader, JsonlDataset  # noqa: E402
from benchmarks.common import served  # noqa: E402

TARGET_MB = 50.0
"""The growth allowed over a fit of 100 steps (issue 21)."""


def rss_mb() -> float:
    """The process's resident memory now, in MB (the peak where there is no
    ``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def write_rows(path: Path, n: int) -> Path:
    """``n`` support messages in Facility Support's shape, one JSON object per line;
    two of every three carry an evaluative word of the simulator's lexicon, so some
    answers are wrong and every step has a backward pass."""
    words = list(SALIENCE_LEXICON)
    labels = ("positive", "negative", "neutral")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            word = words[(i * 7) % len(words)] if i % 3 != 2 else "on time"
            row = {
                "email": f"About the visit to building {i}: the team was {word}.",
                "urgency": "low",
                "sentiment": labels[i % 3],
                "categories": {"cleaning": i % 2 == 0},
            }
            f.write(json.dumps(row) + "\n")
    return path


class Classifier(cog.Module):
    """The README's sentiment classifier; records each step's loss by a weak
    reference, and the resident memory at the start of step ``warmup``."""

    def __init__(self, client: Any, warmup: int) -> None:
        super().__init__()
        self.system_prompt = cog.Parameter(
            "Classify the sentiment of the message.",
            role="system prompt for sentiment classification",
        )
        self.register_buffer(
            "user_template", afnio.Variable("{message}", role="message template")
        )
        self.client = client
        self.chat = cog.ChatCompletion()
        self.exact_match = cog.ExactMatchEvaluator()
        object.__setattr__(self, "warmup", warmup)
        object.__setattr__(self, "losses", [])
        object.__setattr__(self, "alive_max", 0)
        object.__setattr__(self, "rss_warm", None)

    def forward(self, emails: afnio.Variable) -> afnio.Variable:
        messages = [
            {"role": "system", "content": [self.system_prompt]},
            {"role": "user", "content": [self.user_template]},
        ]
        return self.chat(
            self.client,
            messages,
            inputs={"message": emails},
            model=SIMULATOR_MODEL,
            temperature=0,
        )

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        if batch_idx == self.warmup:
            object.__setattr__(self, "rss_warm", rss_mb())
        alive = sum(ref() is not None for ref in self.losses)
        object.__setattr__(self, "alive_max", max(self.alive_max, alive + 1))
        emails, (_urgency, sentiment, _categories) = batch
        score, explanation = self.exact_match(self(emails), sentiment)
        self.losses.append(weakref.ref(explanation))
        return {"loss": (score, explanation)}

    def configure_optimizers(self) -> TGD:
        return TGD(
            [self.system_prompt],
            model_client=self.client,
            model=SIMULATOR_MODEL,
            temperature=0,
        )


def measure(
    steps: int = 100,
    batch: int = 8,
    latency: float = 0.0,
    warmup: int = 5,
    *,
    gc_off: bool = False,
) -> dict[str, Any]:
    """One fit of ``steps`` steps; its memory figures (see the module docstring).
    ``gc_off``: the cyclic garbage collector is off during the fit, so the graphs
    alive are those reference counting did not free, and ``cyclic_garbage`` counts
    the objects in reference cycles the fit left (collected after it)."""
    with tempfile.TemporaryDirectory(prefix="afnio-memory-") as folder:
        root = Path(folder)
        path = write_rows(root / "train.jsonl", steps * batch)
        with (
            served(latency) as base_url,
            OpenAI(base_url=base_url, api_key="sk-test") as client,
        ):
            afnio.set_backward_model_client(
                client, completion_args={"model": SIMULATOR_MODEL}
            )
            client.chat(  # warm-up: imports, afnio's loop, one connection
                [{"role": "user", "content": "hello"}], model=SIMULATOR_MODEL
            )
            agent = Classifier(client, min(warmup, steps - 1))
            dataset = JsonlDataset(
                path,
                input="email",
                target=("urgency", "sentiment", "categories"),
                roles={"email": "input email or message"},
            )
            trainer = Trainer(
                max_epochs=1,
                default_root_dir=root / "run",
                enable_progress_bar=False,
                enable_agent_summary=False,
                enable_run_summary=False,
            )
            gc.collect()
            start = rss_mb()
            cpu = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            if gc_off:
                gc.disable()
            try:
                trainer.fit(agent, DataLoader(dataset, batch_size=batch))
            finally:
                gc.enable()
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_SELF)
            end = rss_mb()
            # before any collection: what reference counting alone freed
            alive_after = sum(ref() is not None for ref in agent.losses)
            cyclic = gc.collect()
            calls = sum(row.calls for row in trainer.phase_rows())
    warm = agent.rss_warm if agent.rss_warm is not None else start
    return {
        "benchmark": "memory_growth",
        "steps": len(agent.losses),
        "batch": batch,
        "latency_s": latency,
        "rss_start_mb": round(start, 1),
        "rss_warm_mb": round(warm, 1),
        "rss_end_mb": round(end, 1),
        "growth_mb": round(end - start, 1),
        "growth_after_warmup_mb": round(end - warm, 1),
        "target_mb": TARGET_MB,
        "met": end - start < TARGET_MB,
        "graphs_alive_max": agent.alive_max,
        "graphs_alive_after": alive_after,
        "gc_off": gc_off,
        "cyclic_garbage": cyclic if gc_off else None,
        "calls": calls,
        "wall_s": round(wall, 2),
        "cpu_s": round(
            (after.ru_utime + after.ru_stime) - (cpu.ru_utime + cpu.ru_stime), 2
        ),
    }


def run(
    steps: int = 100, batch: int = 8, latency: float = 0.0, warmup: int = 5
) -> list[dict[str, Any]]:
    """The benchmark's rows (one: see :func:`measure`)."""
    return [measure(steps, batch, latency, warmup)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--gc-off", action="store_true", help="no gc during the fit")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    rows = [
        measure(args.steps, args.batch, args.latency, args.warmup, gc_off=args.gc_off)
    ]
    for row in rows:
        print(
            f"fit of {row['steps']} steps (batch {row['batch']}, {row['calls']} LM "
            f"calls, {row['wall_s']} s wall, {row['cpu_s']} s CPU): resident memory "
            f"{row['rss_start_mb']} -> {row['rss_end_mb']} MB, growth "
            f"{row['growth_mb']} MB ({row['growth_after_warmup_mb']} MB after step "
            f"{args.warmup}; target < {row['target_mb']:.0f} MB); step graphs alive: "
            f"at most {row['graphs_alive_max']} during, {row['graphs_alive_after']} "
            "after"
            + (
                f"; objects in reference cycles: {row['cyclic_garbage']}"
                if row["gc_off"]
                else ""
            )
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0 if all(row["met"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
