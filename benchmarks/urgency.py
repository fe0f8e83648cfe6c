"""The simulator on a task of the user's own: Facility Support **urgency**, learned
offline with :func:`afnio_integrations.langchain.optimize` (the README demo's loop).

An ordinary LangChain chain (``ChatPromptTemplate | ChatOpenAI | StrOutputParser``)
classifies the urgency of a support email with the prompt :data:`START_PROMPT`
(``Classify the urgency of the message: low, medium or high.``). The simulator reads
the task from that prompt (the field ``urgency``, the labels ``low``/``medium``/
``high``, the default ``low``: see :mod:`afnio.testing.world`), so before training the
chain answers ``low`` to everything. Training writes ``begins with`` rules: the lead
word of each failed email (chosen without looking at its label) mapped to the label
the feedback names.

Each seed trains on the 66 emails of the train split (the seed drives the sampler)
with the 66 of the val split as optimize()'s valset, and is scored on the fixed
held-out set: the 68 emails of the test split, before and after. Control: the same
runs with the training labels permuted by the seed.

``optimize()`` runs with its default backward options (``cheap``: the evaluator
writes its feedback, chat-backward calls grouped) unless ``backward`` (the CLI's
``--backward upstream``) says otherwise.

Run: ``python benchmarks/urgency.py [--seeds 0 1 2] [--backward cheap upstream]
[--dataset PATH]`` (needs the
``langchain`` extra and the Facility Support dataset: by default where
:class:`FacilitySupport` keeps it, ``$AFNIO_DATA_DIR/FacilitySupport/raw/dataset.json``,
else under ``~/.cache/afnio/data``). Prints one row per run and the
median gains.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO_ROOT))

from afnio.testing import SIMULATOR_MODEL  # noqa: E402
from afnio.utils.datasets import FacilitySupport  # noqa: E402
from benchmarks.common import data_root, parse_dataset_args, simulated  # noqa: E402

START_PROMPT = "Classify the urgency of the message: low, medium or high."
"""The chain's starting system prompt: it names the field and the label set."""

HELDOUT_SPLIT = "test"
"""The fixed held-out set: the 68 emails of Facility Support's test split."""

Pair = tuple[str, str]  # (message, urgency)


def urgency_pairs(root: Path, split: str) -> list[Pair]:
    """The ``(email, urgency)`` pairs of a Facility Support split."""
    data = FacilitySupport(split, root=str(root), download=False)
    return [(str(data[i][0].data), str(data[i][1][0].data)) for i in range(len(data))]


def shuffle_labels(pairs: Sequence[Pair], seed: int) -> list[Pair]:
    """``pairs`` with their labels permuted by ``seed`` (the control)."""
    labels = [label for _, label in pairs]
    random.Random(seed).shuffle(labels)
    return [(m, label) for (m, _), label in zip(pairs, labels, strict=True)]


def exact_match(prediction: str, target: str) -> int:
    """1 when the chain's answer is the label (case and spaces ignored)."""
    return int(prediction.strip().lower() == target.strip().lower())


@dataclass
class Outcome:
    """One run: held-out accuracy (0 to 1) before and after, and the final prompt."""

    seed: int
    shuffled: bool
    before: float
    after: float
    prompt: str
    seconds: float

    @property
    def gain(self) -> float:
        return self.after - self.before


def _accuracy(chain: Any, pairs: Sequence[Pair]) -> float:
    answers = chain.batch([{"message": m} for m, _ in pairs])
    hits = sum(exact_match(a, t) for a, (_, t) in zip(answers, pairs, strict=True))
    return hits / len(pairs)


def run(
    train: Sequence[Pair],
    val: Sequence[Pair],
    heldout: Sequence[Pair],
    seed: int,
    *,
    shuffled: bool = False,
    epochs: int = 3,
    batch_size: int = 16,
    backward: str | None = None,
) -> Outcome:
    """Optimize the urgency chain on ``train`` (labels permuted when ``shuffled``)
    against the simulator and score it on ``heldout`` before and after;
    ``backward``: ``optimize()``'s ``backward`` (``None``: its default, cheap)."""
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_openai import ChatOpenAI

    from afnio_integrations.langchain import optimize

    start = time.perf_counter()
    if shuffled:
        train = shuffle_labels(train, seed)
    with simulated() as (sim, _):
        llm = ChatOpenAI(
            model=SIMULATOR_MODEL,
            base_url=sim.base_url,
            api_key="sk-test",
            temperature=0,
            max_retries=0,
        )
        prompt = ChatPromptTemplate.from_messages(
            [("system", START_PROMPT), ("human", "{message}")]
        )
        chain = prompt | llm | StrOutputParser()
        before = _accuracy(chain, heldout)
        with tempfile.TemporaryDirectory() as out:
            chain, report = optimize(
                chain,
                [({"message": m}, t) for m, t in train],
                exact_match,
                valset=[({"message": m}, t) for m, t in val],
                epochs=epochs,
                batch_size=batch_size,
                seed=seed,
                progress=False,
                model=SIMULATOR_MODEL,
                root_dir=out,
                **({} if backward is None else {"backward": backward}),
            )
        after = _accuracy(chain, heldout)
        final = next(iter(report.prompts_after.values()), START_PROMPT)
    return Outcome(
        seed, shuffled, before, after, str(final), time.perf_counter() - start
    )


def measure(
    root: Path,
    seeds: Sequence[int] = (0, 1, 2),
    *,
    shuffled: bool = False,
    backward: str | None = None,
) -> list[Outcome]:
    """One :func:`run` per seed on the Facility Support splits under ``root``
    (``backward``: see :func:`run`)."""
    train, val = urgency_pairs(root, "train"), urgency_pairs(root, "val")
    heldout = urgency_pairs(root, HELDOUT_SPLIT)
    outcomes = []
    for seed in seeds:
        with contextlib.redirect_stdout(io.StringIO()):
            outcomes.append(
                run(train, val, heldout, seed, shuffled=shuffled, backward=backward)
            )
    return outcomes


def learning_problems(
    real: Sequence[Outcome],
    control: Sequence[Outcome] = (),
    min_gain: float = 0.15,
) -> list[str]:
    """Why the runs do not show the simulator learning the task; empty when they
    do: a median held-out gain of at least ``min_gain``, every final prompt holding a
    ``begins with`` rule for the urgency, and the control runs (shuffled labels)
    gaining less than half of the real median gain."""
    report = ", ".join(f"{o.before:.3f}->{o.after:.3f}" for o in real)
    problems = []
    gain = statistics.median(o.gain for o in real)
    if gain < min_gain:
        problems.append(f"median gain {gain:+.3f} below {min_gain:.2f}: {report}")
    for o in real:
        if "begins with" not in o.prompt or "the urgency is" not in o.prompt:
            problems.append(f"seed {o.seed}: no urgency rule in {o.prompt!r}")
    if control:
        control_gain = statistics.median(o.gain for o in control)
        if control_gain >= gain / 2:
            problems.append(
                f"shuffled labels gain {control_gain:+.3f}, not below half of "
                f"{gain:+.3f}"
            )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--backward",
        nargs="+",
        choices=("cheap", "upstream"),
        default=["cheap"],
        help="optimize()'s backward options (several: the runs once per option): "
        "cheap (its default) or upstream",
    )
    args = parse_dataset_args(parser, argv)
    if args is None:
        return 2
    failed = False
    for mode in args.backward:
        with tempfile.TemporaryDirectory() as folder:
            root = data_root(Path(folder), args.dataset)
            real = measure(root, args.seeds, backward=mode)
            control = measure(root, args.seeds, shuffled=True, backward=mode)
        for o in [*real, *control]:
            kind = "shuffled" if o.shuffled else "real"
            print(
                f"urgency {mode:8s} {kind:8s} seed {o.seed}: held-out "
                f"{o.before:.3f} -> {o.after:.3f} ({o.gain * 100:+.1f} points, "
                f"{o.seconds:.1f} s)"
            )
        print()
        print(
            f"{mode}: median gain: real "
            f"{statistics.median(o.gain for o in real) * 100:+.1f} points, shuffled "
            f"labels {statistics.median(o.gain for o in control) * 100:+.1f} points"
        )
        print(f"{mode}: final prompt (seed {real[0].seed}): {real[0].prompt}")
        problems = learning_problems(real, control)
        for problem in problems:
            print(f"{mode}: problem: {problem}")
        failed = failed or bool(problems)
        print()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
