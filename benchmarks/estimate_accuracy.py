"""How close the dry-run estimate and the pilot projection come to real runs.

On the Facility Support sentiment task against the bundled simulator (no latency):
a pilot ``fit`` at batch 16 for 1 epoch tunes the estimate's assumptions
(``Assumptions.from_rows``) and gives a profile (``RunProfile.from_rows``); then each
other configuration (default batch 8 x 3 epochs and batch 4 x 2 epochs) is estimated
before it runs (``trainer.estimate``, which makes no LM call) and projected, and
measured. Each backward mode is measured on its own (``--modes``, default both):
``upstream`` (the core defaults: LM-written evaluator feedback, one chat-backward
call per failed sample) and ``cheap`` (direct evaluator feedback, chat-backward
calls grouped, at most 8 samples a call); the pilot, the estimate and the measured
fits of a mode all run inside ``afnio.backward_options(mode)``. Prints calls and
tokens, estimated, projected and measured, per mode, and exits 1 if any estimate or
projection is off by more than ``--target`` (default 20%).

Run: ``python benchmarks/estimate_accuracy.py [--dataset PATH] [--modes MODE ...]``
(the Facility Support ``dataset.json``; by default where ``FacilitySupport`` keeps it,
``$AFNIO_DATA_DIR/FacilitySupport/raw/dataset.json``, else under
``~/.cache/afnio/data``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO_ROOT))

from afnio.autodiff.options import backward_options  # noqa: E402
from afnio.models.phases import LEDGER, PhaseRow  # noqa: E402
from afnio.testing import SIMULATOR_MODEL  # noqa: E402
from afnio.trainer import Trainer  # noqa: E402
from afnio.trainer.estimate import Assumptions, GraphShape, estimate  # noqa: E402
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
    shape: GraphShape | None = None  # the agent's, before the fit

    @property
    def failure_rate(self) -> float:
        """The share of training samples that failed, over the whole run."""
        return 1 - sum(h["train_accuracy"] for h in self.history) / len(self.history)

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
    mode: str = "upstream",
) -> FitRun:
    """``fit`` the example classifier on ``root``'s data against a new simulator;
    with ``estimate_kwargs``, ``trainer.estimate`` first (it must make no request).
    Everything runs inside ``afnio.backward_options(mode)``."""
    with backward_options(mode):
        return _fit(root, out, batch, epochs, validate_first, estimate_kwargs)


def _fit(
    root: Path,
    out: Path,
    batch: int,
    epochs: int,
    validate_first: bool,
    estimate_kwargs: dict[str, Any] | None,
) -> FitRun:
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
        shape = GraphShape.of_module(agent, [train[i] for i in range(len(train))])
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
            shape,
        )


MODES = ("upstream", "cheap")
"""The backward modes measured (``afnio.backward_options`` presets)."""


def measure(
    configs: list[tuple[int, int]],
    dataset: Path = DATASET,
    mode: str = "upstream",
) -> list[dict[str, Any]]:
    """Pilot at batch 16 x 1 epoch, then estimate, project and measure ``configs``
    (``(batch, epochs)`` pairs), all in backward ``mode`` (``"upstream"`` or
    ``"cheap"``). One row per configuration."""
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        root = data_root(out, dataset)
        pilot = fit(root, out, batch=16, epochs=1, mode=mode)
        shape = GraphShape.of_module(SentimentClassifier(None, SIMULATOR_MODEL))
        failure_rate = 1 - pilot.history[0]["train_accuracy"]
        assumptions = Assumptions.from_rows(
            pilot.rows,
            shape=shape,
            train_samples=pilot.n_train,
            failure_rate=failure_rate,
            final_parameters=[pilot.prompt_after],
            tokenizer=words,
            backward=mode,
        )
        profile = RunProfile.from_rows(
            pilot.rows,
            train_samples=pilot.n_train,
            val_samples=pilot.n_val,
            steps=math.ceil(pilot.n_train / 16),
            failure_rate=failure_rate,
            batch_size=16,
            backward=mode,
            tokenizer=words,
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
                mode=mode,
            )
            projected = project(
                profile,
                n_train=run.n_train,
                n_val=run.n_val,
                epochs=epochs,
                batch_size=batch,
                validate_first=False,
            )
            # the same estimate at the run's own failure rate: what is left is the
            # error of the step model (the mode's calls and prompts), not of the
            # failure-rate assumption (a pilot's first epoch fails more than later
            # epochs)
            at_rate = estimate(
                run.shape,
                n_train=run.n_train,
                n_val=run.n_val,
                epochs=epochs,
                batch_size=batch,
                assumptions=dataclasses.replace(
                    assumptions, failure_rate=run.failure_rate
                ),
                tokenizer=words,
                backward=mode,
            ).by_phase.get("backward")
            rows.append(
                {
                    "mode": mode,
                    "assumed": run.estimate.backward,
                    "batch": batch,
                    "epochs": epochs,
                    "measured_calls": run.calls,
                    "measured_tokens": run.tokens,
                    "measured_cost": sum(r.cost for r in run.rows),
                    "estimated_calls": run.estimate.calls,
                    "estimated_tokens": run.estimate.prompt_tokens
                    + run.estimate.completion_tokens,
                    "estimated_cost": run.estimate.cost,
                    "projected_calls": projected.calls,
                    "projected_tokens": projected.prompt_tokens
                    + projected.completion_tokens,
                    # the backward phase alone (what the mode changes)
                    **_backward_figures(run.rows, run.estimate, projected),
                    "run_failure_rate": run.failure_rate,
                    "at_rate_backward_calls": at_rate.calls if at_rate else 0,
                    "at_rate_backward_tokens": (
                        at_rate.prompt_tokens + at_rate.completion_tokens
                        if at_rate
                        else 0
                    ),
                }
            )
        return rows


def _backward_figures(
    rows: list[PhaseRow], estimate: Any, projected: Any
) -> dict[str, int]:
    """The backward phase's calls and tokens, measured, estimated and projected."""
    measured = [r for r in rows if r.phase == "backward"]
    figures = {
        "measured_backward_calls": sum(r.calls for r in measured),
        "measured_backward_tokens": sum(
            r.prompt_tokens + r.completion_tokens for r in measured
        ),
    }
    for kind, run in (("estimated", estimate), ("projected", projected)):
        phase = run.by_phase.get("backward")
        figures[f"{kind}_backward_calls"] = phase.calls if phase else 0
        figures[f"{kind}_backward_tokens"] = (
            phase.prompt_tokens + phase.completion_tokens if phase else 0
        )
    return figures


def backward_errors(row: dict[str, Any]) -> dict[str, float]:
    """Relative errors of the estimate and the projection on the backward phase
    alone (the part of a step the backward mode changes)."""
    return {
        f"{kind}_backward_{what}": row[f"{kind}_backward_{what}"]
        / max(1, row[f"measured_backward_{what}"])
        - 1
        for kind in ("estimated", "projected")
        for what in ("calls", "tokens")
    }


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
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=list(MODES),
        help="backward modes to measure (default: both)",
    )
    args = parse_dataset_args(parser, argv)
    if args is None:
        return 2
    worst = 0.0
    rows = [
        r for mode in args.modes for r in measure([(8, 3), (4, 2)], args.dataset, mode)
    ]
    for row in rows:
        err = errors(row)
        worst = max(worst, *map(abs, err.values()))
        print(
            f"{row['mode']}: batch {row['batch']} x {row['epochs']} epochs: measured "
            f"{row['measured_calls']} calls / {row['measured_tokens']} tokens; "
            f"estimated {row['estimated_calls']} / {row['estimated_tokens']} "
            f"({err['estimated_calls']:+.1%} / {err['estimated_tokens']:+.1%}); "
            f"projected {row['projected_calls']} / {row['projected_tokens']} "
            f"({err['projected_calls']:+.1%} / {err['projected_tokens']:+.1%}); "
            f"cost measured ${row['measured_cost']:.4f}, estimated "
            f"${row['estimated_cost']:.4f} "
            f"({row['estimated_cost'] / row['measured_cost'] - 1:+.1%})"
        )
        back = backward_errors(row)
        at_rate = {
            what: row[f"at_rate_backward_{what}"]
            / max(1, row[f"measured_backward_{what}"])
            - 1
            for what in ("calls", "tokens")
        }
        print(
            f"  backward phase: measured {row['measured_backward_calls']} calls / "
            f"{row['measured_backward_tokens']} tokens; estimated "
            f"{row['estimated_backward_calls']} / {row['estimated_backward_tokens']} "
            f"({back['estimated_backward_calls']:+.1%} / "
            f"{back['estimated_backward_tokens']:+.1%}); projected "
            f"{row['projected_backward_calls']} / "
            f"{row['projected_backward_tokens']} "
            f"({back['projected_backward_calls']:+.1%} / "
            f"{back['projected_backward_tokens']:+.1%}); estimated at the run's "
            f"own failure rate ({row['run_failure_rate']:.0%}) "
            f"{row['at_rate_backward_calls']} / {row['at_rate_backward_tokens']} "
            f"({at_rate['calls']:+.1%} / {at_rate['tokens']:+.1%})"
        )
    for mode in args.modes:
        mine = [errors(r) for r in rows if r["mode"] == mode]
        print(
            f"{mode}: largest error {max(abs(v) for e in mine for v in e.values()):.1%}"
        )
    verdict = "PASS" if worst <= args.target else "FAIL"
    print(f"largest error {worst:.1%} (target <= {args.target:.0%}): {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
