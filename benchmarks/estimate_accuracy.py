"""How close the dry-run estimate and the pilot projection come to real runs.

On the Facility Support sentiment task against the bundled simulator (no latency):
a pilot ``fit`` at batch 16 for 1 epoch tunes the estimate's assumptions
(``Assumptions.from_rows``) and gives a profile (``RunProfile.from_rows``); then each
other configuration (default batch 8 x 3 epochs and batch 4 x 2 epochs) is estimated
before it runs (``trainer.estimate``, which makes no LM call) and projected, and
measured. Prints calls and tokens, estimated, projected and measured, and exits 1 if
any estimate or projection is off by more than ``--target`` (default 20%).

Run: ``python benchmarks/estimate_accuracy.py [--dataset PATH]`` (the Facility
Support ``dataset.json``; by default where ``FacilitySupport`` keeps it,
``$AFNIO_DATA_DIR/FacilitySupport/raw/dataset.json``, else under
``~/.cache/afnio/data``).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO_ROOT))

from afnio.models.phases import LEDGER, PhaseRow  # noqa: E402
from afnio.testing import SIMULATOR_MODEL  # noqa: E402
from afnio.trainer import Trainer  # noqa: E402
from afnio.trainer.estimate import Assumptions, GraphShape  # noqa: E402
from afnio.trainer.projection import RunProfile, project  # noqa: E402
from afnio.utils.data import DataLoader  # noqa: E402
from afnio.utils.datasets import FacilitySupport  # noqa: E402
from benchmarks.common import DATASET, data_root, parse_dataset_args, simulated  # noqa: E402
from examples.facility_support import START_PROMPT, SentimentClassifier  # noqa: E402


def words(text: str) -> int:
    """The simulator's token count (words)."""
    return len(text.split())


@dataclass
class FitRun:
    """One measured ``fit`` (and what ``trainer.estimate`` said before it)."""

    rows: list[PhaseRow]
    n_train: int
    n_val: int
    history: list[dict[str, Any]]
    estimate: Any
    prompt_after: str

    @property
    def calls(self) -> int:
        return sum(r.calls for r in self.rows)

    @property
    def tokens(self) -> int:
        return sum(r.prompt_tokens + r.completion_tokens for r in self.rows)


def fit(
    root: Path,
    out: Path,
    batch: int,
    epochs: int,
    validate_first: bool = False,
    estimate_kwargs: dict[str, Any] | None = None,
) -> FitRun:
    """``fit`` the example classifier on ``root``'s data against a new simulator;
    with ``estimate_kwargs``, ``trainer.estimate`` first (it must make no request)."""
    train = FacilitySupport("train", root=root, download=False)
    val = FacilitySupport("val", root=root, download=False)
    with simulated() as (sim, client):
        agent = SentimentClassifier(client, SIMULATOR_MODEL, START_PROMPT)
        trainer = Trainer(
            max_epochs=epochs,
            default_root_dir=out / f"b{batch}e{epochs}",
            enable_progress_bar=False,
            enable_agent_summary=False,
            enable_run_summary=False,  # the benchmark prints its own figures
            enable_checkpointing=False,
        )
        train_loader = DataLoader(train, batch_size=batch, shuffle=True, seed=0)
        val_loader = DataLoader(val, batch_size=len(val))
        estimate = None
        if estimate_kwargs is not None:
            estimate = trainer.estimate(
                agent, train_loader, val_loader, **estimate_kwargs
            )
            if sim.stats.calls:
                raise AssertionError("trainer.estimate made an LM request")
        start = LEDGER.snapshot()
        if validate_first:
            trainer.validate(agent, val_loader)
        history = trainer.fit(agent, train_loader, val_loader)
        return FitRun(
            LEDGER.since(start),
            len(train),
            len(val),
            history,
            estimate,
            agent.system_prompt.data,
        )


def measure(
    configs: list[tuple[int, int]], dataset: Path = DATASET
) -> list[dict[str, Any]]:
    """Pilot at batch 16 x 1 epoch, then estimate, project and measure ``configs``
    (``(batch, epochs)`` pairs). One row per configuration."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        root = data_root(out, dataset)
        pilot = fit(root, out, batch=16, epochs=1)
        shape = GraphShape.of_module(SentimentClassifier(None, SIMULATOR_MODEL))
        assumptions = Assumptions.from_rows(
            pilot.rows,
            shape=shape,
            train_samples=pilot.n_train,
            failure_rate=1 - pilot.history[0]["train_accuracy"],
            final_parameters=[pilot.prompt_after],
            tokenizer=words,
        )
        profile = RunProfile.from_rows(
            pilot.rows,
            train_samples=pilot.n_train,
            val_samples=pilot.n_val,
            steps=math.ceil(pilot.n_train / 16),
        )
        rows = []
        for batch, epochs in configs:
            run = fit(
                root,
                out,
                batch,
                epochs,
                estimate_kwargs={
                    "assumptions": assumptions,
                    "tokenizer": words,
                    "models": SIMULATOR_MODEL,
                },
            )
            projected = project(
                profile,
                n_train=run.n_train,
                n_val=run.n_val,
                epochs=epochs,
                batch_size=batch,
                validate_first=False,
            )
            estimate = run.estimate
            rows.append(
                {
                    "batch": batch,
                    "epochs": epochs,
                    "measured_calls": run.calls,
                    "measured_tokens": run.tokens,
                    "measured_cost": sum(r.cost for r in run.rows),
                    "estimated_calls": estimate.calls,
                    "estimated_tokens": estimate.prompt_tokens
                    + estimate.completion_tokens,
                    "estimated_cost": estimate.cost,
                    "projected_calls": projected.calls,
                    "projected_tokens": projected.prompt_tokens
                    + projected.completion_tokens,
                }
            )
        return rows


def errors(row: dict[str, Any]) -> dict[str, float]:
    """Relative errors of the estimate and the projection."""
    return {
        f"{kind}_{what}": row[f"{kind}_{what}"] / row[f"measured_{what}"] - 1
        for kind in ("estimated", "projected")
        for what in ("calls", "tokens")
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.2, help="max |error|")
    args = parse_dataset_args(parser, argv)
    if args is None:
        return 2
    worst = 0.0
    for row in measure([(8, 3), (4, 2)], args.dataset):
        err = errors(row)
        worst = max(worst, *map(abs, err.values()))
        print(
            f"batch {row['batch']} x {row['epochs']} epochs: measured "
            f"{row['measured_calls']} calls / {row['measured_tokens']} tokens; "
            f"estimated {row['estimated_calls']} / {row['estimated_tokens']} "
            f"({err['estimated_calls']:+.1%} / {err['estimated_tokens']:+.1%}); "
            f"projected {row['projected_calls']} / {row['projected_tokens']} "
            f"({err['projected_calls']:+.1%} / {err['projected_tokens']:+.1%}); "
            f"cost measured ${row['measured_cost']:.4f}, estimated "
            f"${row['estimated_cost']:.4f} "
            f"({row['estimated_cost'] / row['measured_cost'] - 1:+.1%})"
        )
    verdict = "PASS" if worst <= args.target else "FAIL"
    print(f"largest error {worst:.1%} (target <= {args.target:.0%}): {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
