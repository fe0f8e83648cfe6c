"""Step latency: one training step of a sentiment classifier against the simulator.

One step is four phases, each timed on its own:

* ``forward``: a batched ``ChatCompletion`` (one LM call per message, concurrently)
  whose system prompt is the trainable ``Parameter("Classify the sentiment of the
  message.")``;
* ``evaluator``: ``ExactMatchEvaluator`` against the targets (no LM call);
* ``backward``: ``explanation.backward()``: one evaluator-backward call per group of
  at most ``EVALUATOR_SAMPLES_PER_CALL`` (8) wrong samples, all groups at once, then
  one chat-backward call per sample with feedback;
* ``optimizer``: ``TGD([prompt]).step()``: one call for the one parameter.

Two modes (``--mode``), the two sets of :class:`afnio.BackwardOptions`:

* ``upstream`` (default; the report calls it *core defaults*): what the core API does
  unless told otherwise, as above: four LM rounds;
* ``cheap``: the whole step runs inside ``afnio.backward_options("cheap")`` (the
  default of ``optimize()`` and ``AfnioTGD``): the exact-match evaluator writes each
  failed sample's feedback itself (no evaluator-backward call, no LM round) and the
  chat-backward calls of the samples are grouped, at most
  ``CHEAP_SAMPLES_PER_CALL`` (8) samples a call, the groups concurrent: three LM
  rounds, ``ceil(failed / 8)`` chat-backward calls.

``--feedback-words N`` starts the simulator with ``Simulator(feedback_words=N)``: every
LM-written feedback string of a backward answer is padded to at least N words with a
neutral filler (the learning is unchanged), so that the optimizer prompt's growth with
longer feedback shows.

Prompt tokens and calls are counted *by call kind* (forward, evaluator backward, chat
backward, optimizer, judge) from the requests the simulator received, each classified
by the simulator's responder that answers it (``afnio.testing.call_kind``; a grouped
chat-backward call is answered by ``chat_backward_group``); a request's prompt tokens
are counted as the simulator counts them (the words of every message plus 3 per
message), and their sum is checked against the simulator's own counter.

Every LM call goes to the bundled simulator (``afnio.testing.Simulator``, which
sleeps ``--latency`` seconds before each answer) through
``afnio.models.openai.AsyncOpenAI``, for the forward, backward and optimizer
clients alike. The simulator's counters (``sim.stats``, reset between phases) give
the calls and the peak number of requests in flight per phase.

An LM *round* is a set of calls that can all be in flight at once; rounds follow one
another on the critical path: forward (1), evaluator backward (1, if a sample is
wrong), chat backward (1, if there is feedback), optimizer (1), plus one per retry
(an answer shown back to the model, or an HTTP retry after an injected fault). The
ideal step takes ``rounds x latency``; the script reports ``wall / critical path``
and exits 1 if it is above ``--target``.

afnio's concurrency bound is raised to ``max(16, batch)`` so that it never throttles a
round. Before the timed step, one untimed request warms the client up (afnio's event
loop, the openai SDK's lazily imported resources, one connection); its duration is
printed. ``--cold`` times the step without it.

Data: the first ``--batch`` emails of the Facility Support ``dataset.json`` with their
``sentiment``: ``--dataset PATH``, by default where ``FacilitySupport`` keeps it
(``$AFNIO_DATA_DIR``, else ``~/.cache/afnio/data``, then
``FacilitySupport/raw/dataset.json``; ``FacilitySupport("train")`` downloads it there).
Without that file, synthesised
messages built around words of ``afnio.testing.SALIENCE_LEXICON`` (mixed targets, so
that some samples are wrong); a ``--dataset`` that does not exist is an error. The
report says which data it used. No network.

Run: ``python benchmarks/step_latency.py [--batch 32] [--latency 0.5] [--repeat 1]
[--target 1.5] [--cold] [--mode upstream|cheap] [--feedback-words N] [--dataset PATH]
[--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import Counter
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import afnio
from afnio import cognitive as cog
from afnio._runtime import reset_concurrency_stats
from afnio.models.openai import AsyncOpenAI
from afnio.optim import TGD
from afnio.testing import (
    SALIENCE_LEXICON,
    SIMULATOR_MODEL,
    Simulator,
    call_kind,
    responder_of,  # noqa: F401 - the peers' measurements read it from this module
    world,
)
from afnio.utils.datasets.utils import default_data_root

REPO_ROOT = Path(__file__).resolve().parents[1]
# where FacilitySupport keeps its file ($AFNIO_DATA_DIR, else ~/.cache/afnio/data)
DATASET = Path(default_data_root()) / "FacilitySupport" / "raw" / "dataset.json"
INITIAL_PROMPT = "Classify the sentiment of the message."
PHASES = ("forward", "evaluator", "backward", "optimizer")

# The kinds of afnio's LM calls (afnio.testing.call_kind: told apart by the
# simulator's responder that answers them), in the reports' order.
KIND_ORDER = ("forward", "evaluator backward", "chat backward", "optimizer", "judge")

MODES = ("upstream", "cheap")
MODE_LABELS = {"upstream": "core defaults", "cheap": "cheap"}
"""How the reports name the modes: ``upstream`` is what the core API does by default."""

POSITIVE_WORDS = frozenset(
    {
        "delighted",
        "excellent",
        "exceptional",
        "fantastic",
        "grateful",
        "great",
        "impressed",
        "love",
        "outstanding",
        "thrilled",
        "top-notch",
        "wonderful",
    }
)


# -- data ------------------------------------------------------------------------------


def load_dataset(path: Path, batch: int) -> tuple[list[str], list[str]]:
    """The first ``batch`` emails of the facility-support file and their sentiment
    (cycling through the file if it has fewer samples)."""
    records = json.loads(path.read_text(encoding="utf-8"))
    if not records:
        raise ValueError(f"{path} holds no samples")
    messages, targets = [], []
    for i in range(batch):
        record = records[i % len(records)]
        fields = record.get("fields", record)
        answer = record["answer"]
        if isinstance(answer, str):
            answer = json.loads(answer)
        messages.append(str(fields["input"]))
        targets.append(str(answer["sentiment"]))
    return messages, targets


def synthesize(batch: int) -> tuple[list[str], list[str]]:
    """Messages around words of ``SALIENCE_LEXICON``: two of every three carry one
    strong word (target positive or negative), the third none (target neutral).
    Before training the simulator answers ``neutral`` to all, so about two thirds
    are wrong and the backward pass has work."""
    words = list(SALIENCE_LEXICON)
    messages, targets = [], []
    for i in range(batch):
        if i % 3 == 2:
            messages.append(
                f"Hello, could you confirm the cleaning schedule for building {i}? "
                "We would like to plan the week around it."
            )
            targets.append("neutral")
            continue
        word = words[(i * 7) % len(words)]
        messages.append(
            f"About the visit to building {i} last Tuesday: the team was {word}, "
            "and I wanted you to know."
        )
        targets.append("positive" if word in POSITIVE_WORDS else "negative")
    return messages, targets


def default_dataset() -> Path | None:
    """The Facility Support file the benchmark uses without ``--dataset``: where
    ``FacilitySupport`` keeps it (:data:`DATASET`); ``None`` if it is not there."""
    return DATASET if DATASET.is_file() else None


def load_data(
    batch: int, dataset: Path | None = None
) -> tuple[list[str], list[str], str]:
    """``(messages, targets, description)`` from ``dataset`` (default:
    :func:`default_dataset`) if present, else synthesised. The description says which
    data it is (and the file).

    Raises:
        FileNotFoundError: an explicit ``dataset`` that does not exist.
    """
    path = (default_dataset() or DATASET) if dataset is None else Path(dataset)
    if path.is_file():
        messages, targets = load_dataset(path, batch)
        where = f"Facility Support ({path})" if dataset is None else str(path)
        return messages, targets, f"{where} (first {batch} emails)"
    if dataset is not None:
        raise FileNotFoundError(
            f"--dataset {path}: no such file (pass the path of Facility Support's "
            "dataset.json)"
        )
    messages, targets = synthesize(batch)
    return messages, targets, f"synthesised from SALIENCE_LEXICON ({batch} messages)"


# -- measurement -----------------------------------------------------------------------


@dataclass
class Phase:
    """One phase of the step: its wall time and the LM calls it made."""

    name: str
    wall_s: float
    calls: int
    peak_in_flight: int
    faults_served: int
    calls_by_kind: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    retries: int = 0  # extra sequential rounds caused by retries
    rounds: int = 0
    critical_path_s: float = 0.0
    ratio: float | None = None
    # the prompt tokens of each kind's calls (summed, and call by call in arrival
    # order), counted from the requests as the simulator counts them
    prompt_tokens_by_kind: dict[str, int] = field(default_factory=dict)
    call_prompt_tokens: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class StepReport:
    """Everything one measured step produced (JSON-serialisable with ``asdict``)."""

    batch: int
    latency_s: float
    data: str
    target_distribution: dict[str, int]
    max_concurrency: int
    warmup_s: float | None
    phases: list[Phase]
    correct_before: int
    wrong_before: int
    rules_after: int
    limiter_peak: int
    wall_s: float
    calls: int
    peak_in_flight: int
    rounds: int
    retries: int
    critical_path_s: float
    ratio: float
    # issue 23 (new fields only: older JSON readers keep working)
    mode: str = "upstream"
    evaluator_feedback: str = "lm"
    chat_samples_per_call: int = 1
    feedback_words: int | None = None
    prompt_tokens: int = 0
    calls_by_kind: dict[str, int] = field(default_factory=dict)
    prompt_tokens_by_kind: dict[str, int] = field(default_factory=dict)
    tokens_match_simulator: bool = True


def _request(body: dict[str, Any]) -> world.SimRequest:
    return world.SimRequest.from_messages(
        body.get("messages") or [], response_format=body.get("response_format")
    )


def request_prompt_tokens(body: dict[str, Any]) -> int:
    """The prompt tokens of one chat request as the simulator counts them: the words
    of every message plus 3 per message."""
    return sum(len(m.text.split()) + 3 for m in _request(body).messages)


def _retry_depth(body: dict[str, Any]) -> int:
    """How many times this request's chain was retried: afnio shows an unusable
    answer back as an ``assistant`` message (none of its first requests has one)."""
    return sum(1 for m in body.get("messages") or [] if m.get("role") == "assistant")


def _analyse(
    name: str, wall: float, stats: Any, bodies: list[dict[str, Any]], latency: float
) -> Phase:
    kinds: Counter[str] = Counter()
    depth: Counter[str] = Counter()
    tokens: dict[str, list[int]] = {}
    for body in bodies:
        kind = call_kind(body)
        kinds[kind] += 1
        depth[kind] = max(depth[kind], _retry_depth(body))
        tokens.setdefault(kind, []).append(request_prompt_tokens(body))
    # each kind of call is one round (its calls are independent of each other), plus
    # one per retry along the longest chain; each injected fault served is at most
    # one HTTP retry of some request (an upper bound on the rounds it adds)
    retries = sum(depth.values()) + stats.faults_served
    rounds = len(kinds) + retries
    critical = rounds * latency
    return Phase(
        name=name,
        wall_s=wall,
        calls=stats.calls,
        peak_in_flight=stats.peak_in_flight,
        faults_served=stats.faults_served,
        calls_by_kind={k: kinds[k] for k in KIND_ORDER if kinds[k]},
        prompt_tokens=stats.prompt_tokens,
        retries=retries,
        rounds=rounds,
        critical_path_s=critical,
        ratio=wall / critical if critical > 0 else None,
        prompt_tokens_by_kind={k: sum(tokens[k]) for k in KIND_ORDER if k in tokens},
        call_prompt_tokens={k: tokens[k] for k in KIND_ORDER if k in tokens},
    )


def _options(mode: str) -> AbstractContextManager[Any]:
    """The context the step runs in: ``afnio.backward_options(mode)`` (``upstream``
    is the core defaults, opened explicitly so that an enclosing context cannot change
    them). An afnio without backward options only has the upstream mode."""
    if hasattr(afnio, "backward_options"):
        return afnio.backward_options(mode)
    if mode == "upstream":
        return nullcontext()
    raise RuntimeError(
        f"mode {mode!r} needs afnio.backward_options (this afnio has none); use "
        "mode='upstream'"
    )


def measure(
    messages: list[str],
    targets: list[str],
    latency: float,
    *,
    warmup: bool = True,
    data: str = "",
    mode: Literal["upstream", "cheap"] = "upstream",
    feedback_words: int | None = None,
) -> StepReport:
    """Run one training step against a fresh simulator and return its report.

    Args:
        messages: the batch's customer messages.
        targets: their expected sentiment labels.
        latency: the simulator's seconds per LM call.
        warmup: send one untimed request first (the client's lazy set-up).
        data: what the data is, for the report.
        mode: ``"upstream"`` (the core API's defaults: LM-written evaluator feedback,
            one chat-backward call per sample) or ``"cheap"`` (the step inside
            ``afnio.backward_options("cheap")``).
        feedback_words: pad every LM-written feedback to at least this many words
            (``Simulator(feedback_words=...)``); ``None`` pads nothing.

    Raises:
        ValueError: an unknown ``mode`` or a ``feedback_words`` below 1.
    """
    if mode not in MODES:
        raise ValueError(
            f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}"
        )
    if feedback_words is not None and feedback_words < 1:
        raise ValueError(f"feedback_words must be None or >= 1, got {feedback_words!r}")
    batch = len(messages)
    previous_bound = afnio.get_max_concurrency()
    bound = max(16, batch)
    afnio.set_max_concurrency(bound)
    sim_args: dict[str, Any] = {"latency": latency}
    if feedback_words is not None:
        sim_args["feedback_words"] = feedback_words
    try:
        with (
            _options(mode),
            Simulator(**sim_args) as sim,
            AsyncOpenAI(base_url=sim.base_url, api_key="sk-sim", max_retries=2) as llm,
        ):
            options = (
                afnio.get_backward_options()
                if hasattr(afnio, "get_backward_options")
                else None
            )
            afnio.set_backward_model_client(
                llm, completion_args={"model": SIMULATOR_MODEL}
            )
            prompt = cog.Parameter(INITIAL_PROMPT, role="system prompt")
            chat = [
                {"role": "system", "content": [prompt]},
                {
                    "role": "user",
                    "content": [afnio.Variable("{message}", role="message template")],
                },
            ]
            model = cog.ChatCompletion()
            evaluate = cog.ExactMatchEvaluator()
            optimizer = TGD([prompt], model_client=llm, model=SIMULATOR_MODEL)
            batch_in = afnio.Variable(messages, role="customer message")

            warmup_s = None
            if warmup:
                t0 = time.perf_counter()
                llm.chat([{"role": "user", "content": "ping"}], model=SIMULATOR_MODEL)
                warmup_s = time.perf_counter() - t0
            sim.reset_stats()
            reset_concurrency_stats()

            raw: list[tuple[str, float, Any, list[dict[str, Any]]]] = []

            def close_phase(name: str, started: float) -> None:
                wall = time.perf_counter() - started
                # the requests first: a snapshot of the counters then holds them all
                requests = sim.requests
                raw.append((name, wall, sim.stats, requests))
                sim.reset_stats()

            step_start = time.perf_counter()
            t = time.perf_counter()
            prediction = model(
                llm, chat, inputs={"message": batch_in}, model=SIMULATOR_MODEL
            )
            close_phase("forward", t)
            t = time.perf_counter()
            score, explanation = evaluate(prediction, targets)
            close_phase("evaluator", t)
            t = time.perf_counter()
            explanation.backward()
            close_phase("backward", t)
            t = time.perf_counter()
            optimizer.step()
            close_phase("optimizer", t)
            wall = time.perf_counter() - step_start
            limiter_peak = afnio.get_concurrency_stats().requests.peak
            new_prompt = str(prompt.data)
    finally:
        afnio.set_max_concurrency(previous_bound)

    phases = [_analyse(n, w, s, b, latency) for n, w, s, b in raw]
    rounds = sum(p.rounds for p in phases)
    critical = rounds * latency
    correct = int(score.data)
    calls_by_kind: Counter[str] = Counter()
    tokens_by_kind: Counter[str] = Counter()
    for p in phases:
        calls_by_kind.update(p.calls_by_kind)
        tokens_by_kind.update(p.prompt_tokens_by_kind)
    prompt_tokens = sum(p.prompt_tokens for p in phases)
    return StepReport(
        batch=batch,
        latency_s=latency,
        data=data,
        target_distribution=dict(Counter(targets).most_common()),
        max_concurrency=bound,
        warmup_s=warmup_s,
        phases=phases,
        correct_before=correct,
        wrong_before=batch - correct,
        rules_after=len(world.find_rules(new_prompt)),
        limiter_peak=limiter_peak,
        wall_s=wall,
        calls=sum(p.calls for p in phases),
        peak_in_flight=max(p.peak_in_flight for p in phases),
        rounds=rounds,
        retries=sum(p.retries for p in phases),
        critical_path_s=critical,
        ratio=wall / critical if critical > 0 else math.inf,
        mode=mode,
        evaluator_feedback=options.evaluator_feedback if options else "lm",
        chat_samples_per_call=options.chat_samples_per_call if options else 1,
        feedback_words=feedback_words,
        prompt_tokens=prompt_tokens,
        calls_by_kind={k: calls_by_kind[k] for k in KIND_ORDER if calls_by_kind[k]},
        prompt_tokens_by_kind={
            k: tokens_by_kind[k] for k in KIND_ORDER if k in tokens_by_kind
        },
        tokens_match_simulator=sum(tokens_by_kind.values()) == prompt_tokens,
    )


# -- output ----------------------------------------------------------------------------


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_report(report: StepReport) -> str:
    """A readable table of one step."""
    targets = ", ".join(f"{n} {k}" for k, n in report.target_distribution.items())
    warm = (
        f"untimed warm-up request before the step: {report.warmup_s:.3f} s "
        "(one simulated latency included)"
        if report.warmup_s is not None
        else "no warm-up (--cold): the step includes the client's first request"
    )
    padded = (
        f"; LM-written feedback padded to {report.feedback_words} words"
        if report.feedback_words
        else ""
    )
    lines = [
        f"step latency: batch {report.batch}, simulator latency "
        f"{report.latency_s:.3f} s per call",
        f"mode: {report.mode} ({MODE_LABELS.get(report.mode, report.mode)}: "
        f"evaluator feedback {report.evaluator_feedback}, "
        f"{report.chat_samples_per_call} sample(s) per chat-backward call){padded}",
        f"data: {report.data}; targets: {targets}",
        f"afnio max concurrency: {report.max_concurrency} (= max(16, batch), so "
        "afnio's bound never throttles a round); afnio request-limiter peak: "
        f"{report.limiter_peak}",
        warm,
        "",
        f"{'phase':<22}{'wall (s)':>9}{'LM calls':>10}{'peak in flight':>16}"
        f"{'rounds':>8}{'rounds x lat (s)':>18}{'wall/ideal':>12}"
        f"{'prompt tokens':>15}",
    ]
    rule = "-" * len(lines[-1])
    lines.append(rule)
    for p in report.phases:
        lines.append(
            f"{p.name:<22}{p.wall_s:>9.3f}{p.calls:>10}{p.peak_in_flight:>16}"
            f"{p.rounds:>8}{p.critical_path_s:>18.3f}{_ratio(p.ratio):>12}"
            f"{p.prompt_tokens:>15}"
        )
        if len(p.calls_by_kind) > 1 or (
            p.calls_by_kind and next(iter(p.calls_by_kind)) != p.name
        ):
            for kind, n in p.calls_by_kind.items():
                tokens = p.prompt_tokens_by_kind.get(kind, 0)
                lines.append(f"  {kind:<20}{'':>9}{n:>10}{'':>54}{tokens:>15}")
    lines.append(rule)
    lines.append(
        f"{'total':<22}{report.wall_s:>9.3f}{report.calls:>10}"
        f"{report.peak_in_flight:>16}{report.rounds:>8}"
        f"{report.critical_path_s:>18.3f}{_ratio(report.ratio):>12}"
        f"{report.prompt_tokens:>15}"
    )
    by_kind = ", ".join(
        f"{kind} {report.calls_by_kind.get(kind, 0)} calls / {tokens}"
        for kind, tokens in report.prompt_tokens_by_kind.items()
    )
    check = (
        "= the simulator's counter"
        if report.tokens_match_simulator
        else "(does NOT match the simulator's counter)"
    )
    lines += [
        "",
        f"before the step: {report.correct_before}/{report.batch} correct, "
        f"{report.wrong_before} wrong; retries: {report.retries}; "
        f"system prompt after the step: {report.rules_after} rule(s)",
        f"critical path: {report.rounds} LM rounds x {report.latency_s:.3f} s = "
        f"{report.critical_path_s:.3f} s; wall / critical path = "
        f"{_ratio(report.ratio)}",
        f"prompt tokens by call kind: {by_kind or 'none'}; total "
        f"{report.prompt_tokens} {check}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="samples (default 32)")
    parser.add_argument(
        "--latency",
        type=float,
        default=0.5,
        help="simulated seconds per LM call (default 0.5)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="steps to run, best counts (default 1)"
    )
    parser.add_argument(
        "--target",
        type=float,
        default=1.5,
        help="maximum wall / critical path (default 1.5)",
    )
    parser.add_argument(
        "--cold", action="store_true", help="no untimed warm-up request before a step"
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="upstream",
        help="upstream: the core API's defaults (LM-written evaluator feedback, one "
        "chat-backward call per sample); cheap: the step inside "
        "afnio.backward_options('cheap') (default upstream)",
    )
    parser.add_argument(
        "--feedback-words",
        type=int,
        default=None,
        metavar="N",
        help="pad every LM-written feedback to at least N words "
        "(Simulator(feedback_words=N)); default: no padding",
    )
    parser.add_argument(
        "--dataset",
        type=Path,
        default=None,
        help="Facility Support's dataset.json (default: "
        "$AFNIO_DATA_DIR/FacilitySupport/raw/dataset.json, else "
        "synthesised messages)",
    )
    parser.add_argument("--json", type=Path, help="also write the reports as JSON")
    args = parser.parse_args(argv)
    if args.dataset is not None and not args.dataset.is_file():
        parser.error(
            f"--dataset {args.dataset}: no such file (pass the path of Facility "
            "Support's dataset.json)"
        )
    if args.batch < 1:
        parser.error("--batch must be >= 1")
    if not args.latency > 0:
        parser.error("--latency must be > 0 (the critical path is rounds x latency)")
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.feedback_words is not None and args.feedback_words < 1:
        parser.error("--feedback-words must be >= 1 (omit it for no padding)")

    messages, targets, data = load_data(args.batch, args.dataset)
    if args.dataset is None and default_dataset() is None:
        print(
            f"no Facility Support dataset at {DATASET}: using "
            "synthesised messages (--dataset path/to/dataset.json uses a copy)"
        )
    reports = []
    for i in range(args.repeat):
        report = measure(
            messages,
            targets,
            args.latency,
            warmup=not args.cold,
            data=data,
            mode=args.mode,
            feedback_words=args.feedback_words,
        )
        reports.append(report)
        if args.repeat > 1:
            print(f"=== step {i + 1} of {args.repeat} ===")
        print(format_report(report))
        print()
    best = min(reports, key=lambda r: r.ratio)
    if args.repeat > 1:
        ratios = [r.ratio for r in reports]
        print(
            f"ratios: {', '.join(f'{r:.2f}' for r in ratios)} (median "
            f"{statistics.median(ratios):.2f}); the best counts"
        )
    passed = best.ratio <= args.target
    print(
        f"wall / critical path = {best.ratio:.2f} (target <= {args.target:.2f}): "
        f"{'PASS' if passed else 'FAIL'}"
    )
    if args.json:
        payload = {
            "target": args.target,
            "mode": args.mode,
            "feedback_words": args.feedback_words,
            "passed": passed,
            "reports": [asdict(r) for r in reports],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
