"""A validation pass through the provider's Batch API against the synchronous pass.

The Facility Support sentiment classifier (``examples/facility_support.py``) validates
``--samples`` support messages (the 12 of ``benchmarks/resume_kills.py``, numbered so
that every request differs) in batches of ``--batch-size``, against the bundled
simulator in its own process (``python -m afnio.testing serve --latency L``), twice:

* ``sync``: ``Trainer.validate(agent, loader)``, every chat call a request, with
  ``set_max_concurrency(--concurrency)``;
* ``batch_api``: ``Trainer.validate(agent, loader, batch_api=BatchOptions(
  poll_interval=--poll))``: one upload, one batch, polls, one download.

Each row: mode, samples, LM calls billed, batches submitted and rounds, cost (USD, the
simulator model's table price; the batch rate is the table's ``batch_discount``),
``val_accuracy``, wall seconds and the client process's CPU seconds (``RUSAGE_SELF``).
The batch pass must cost ``batch_discount`` (0.5) of the synchronous one, with the
same accuracy.

Run: ``python benchmarks/batch_api.py --samples 512 --latency 0.5``
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

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import afnio  # noqa: E402
from afnio.models.batch import BatchOptions  # noqa: E402
from afnio.models.openai import OpenAI  # noqa: E402
from afnio.testing import SIMULATOR_MODEL  # noqa: E402
from afnio.trainer import Trainer  # noqa: E402
from afnio.utils.data import DataLoader  # noqa: E402
from benchmarks.common import served  # noqa: E402
from benchmarks.resume_kills import MESSAGES, Messages  # noqa: E402
from examples.facility_support import SentimentClassifier  # noqa: E402

PROMPT = (
    "Classify the sentiment of the message. "
    'If the message mentions "wonderful", the sentiment is positive. '
    'If the message mentions "awful", the sentiment is negative. '
    'If the message mentions "love", the sentiment is positive. '
    'If the message mentions "worst", the sentiment is negative.'
)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _loader(samples: int, batch_size: int) -> DataLoader:
    rows = [
        (f"{text} (ticket {i})", label)
        for i, (text, label) in enumerate(
            MESSAGES[i % len(MESSAGES)] for i in range(samples)
        )
    ]
    return DataLoader(Messages(rows), batch_size=batch_size)


def _pass(
    base_url: str,
    mode: str,
    samples: int,
    batch_size: int,
    poll: float,
) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory() as root,
        OpenAI(base_url=base_url, api_key="sk-bench", max_retries=2) as client,
    ):
        agent = SentimentClassifier(client, SIMULATOR_MODEL, PROMPT)
        trainer = Trainer(
            default_root_dir=root,
            enable_progress_bar=False,
            enable_agent_summary=False,
            enable_run_summary=False,
            enable_checkpointing=False,
        )
        loader = _loader(samples, batch_size)
        cpu, start = _cpu(), time.perf_counter()
        if mode == "sync":
            result = trainer.validate(agent, loader)
        else:
            result = trainer.validate(
                agent, loader, batch_api=BatchOptions(poll_interval=poll)
            )
        wall, cpu = time.perf_counter() - start, _cpu() - cpu
        stats = trainer.last_batch_run.stats if mode != "sync" else None
        return {
            "benchmark": "batch_api",
            "mode": mode,
            "samples": samples,
            "lm_calls": client.calls,
            "batches": stats.batches_submitted if stats else 0,
            "rounds": stats.rounds if stats else 0,
            "cost_usd": result["total_cost"],
            "val_accuracy": result["val_accuracy"],
            "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3),
        }


def run(
    samples: int = 512,
    latency: float = 0.5,
    batch_size: int = 32,
    concurrency: int = 64,
    poll: float = 0.5,
) -> list[dict[str, Any]]:
    """Both passes on one simulator process; returns the two rows, the batch row
    with ``cost_ratio`` (batch / sync) and ``same_accuracy``."""
    afnio.set_max_concurrency(concurrency)
    with served(latency) as base_url:
        sync = _pass(base_url, "sync", samples, batch_size, poll)
        batch = _pass(base_url, "batch_api", samples, batch_size, poll)
    batch["cost_ratio"] = batch["cost_usd"] / sync["cost_usd"]
    batch["same_accuracy"] = batch["val_accuracy"] == sync["val_accuracy"]
    return [sync, batch]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--poll", type=float, default=0.5, help="poll interval, s")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    rows = run(args.samples, args.latency, args.batch_size, args.concurrency, args.poll)
    for row in rows:
        print(
            f"{row['mode']:9s} {row['samples']} samples: {row['lm_calls']} LM calls, "
            f"{row['batches']} batches, ${row['cost_usd']:.6f}, accuracy "
            f"{row['val_accuracy']:.3f}, wall {row['wall_s']:.2f} s, "
            f"CPU {row['cpu_s']:.2f} s"
        )
    ratio = rows[1]["cost_ratio"]
    ok = abs(ratio - 0.5) < 1e-9 and rows[1]["same_accuracy"]
    print(
        f"batch / sync cost = {ratio:.4f} (target 0.5, same accuracy): "
        f"{'PASS' if ok else 'FAIL'}"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
