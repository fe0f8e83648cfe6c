"""Credit assignment through two stages, learned offline on the simulator.

A two-stage program answers the Facility Support sentiment: the first stage names the
customer's *feeling* from the message, the second classifies the sentiment from that
feeling **alone** (it never sees the message). The second prompt already maps the
feelings ``unhappy`` and ``happy`` to ``negative`` and ``positive``; the first prompt
knows no word of the data, so it answers its default (``neutral``) and the program
answers ``neutral`` to everything. Its errors can only be fixed by changing the
**first** prompt: the second stage's feedback must name the feeling its input should
have held, and the first stage's backward must turn that into a rule of its own (the
simulator's relay, see :mod:`afnio.testing.world`).

The same program is written three ways: an afnio Module (two ``ChatCompletion``
calls, trained by the :class:`~afnio.trainer.Trainer`), a traced LangChain chain
(``prompt | llm | StrOutputParser() | ... | prompt | llm | StrOutputParser()``,
trained by :func:`afnio_integrations.langchain.optimize`) and a DSPy program (two
``Predict``, trained by :class:`afnio_integrations.dspy.AfnioTGD`). Each is trained on
``TRAIN_SIZE`` messages the seed picks from the train and val splits (the seed also
drives the sampler) and scored on the fixed held-out set (the 68 messages of the test
split), before and after. Controls (afnio Module and, where the library expresses
them, the chain and the DSPy program): the first prompt frozen, the training labels
shuffled, the intermediate output detached from the graph.

Every run function takes ``backward``: how the backward passes write their feedback
(``"upstream"``: an LM writes the evaluator's feedback, one chat-backward call per
sample; ``"cheap"``: the evaluator writes it, chat-backward calls grouped by prompt
template; see :func:`afnio.backward_options`); ``None`` keeps each program kind's own
default (the afnio Module: the core API's, upstream; the chain's ``optimize()`` and
the DSPy program's ``AfnioTGD``: cheap).

Run: ``python benchmarks/two_stage.py [--kinds module chain dspy] [--seeds 0 1 2]
[--backward default upstream cheap]`` (the Facility Support dataset: ``--dataset
PATH``, by default where ``FacilitySupport`` keeps it,
``$AFNIO_DATA_DIR/FacilitySupport/raw/dataset.json`` (else under
``~/.cache/afnio/data``); the chain needs the ``langchain`` extra and the DSPy program
the ``dspy`` extra). Prints one row per run and the median gain per program kind,
backward option and variant.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO_ROOT))

import afnio  # noqa: E402
from afnio import cognitive as cog  # noqa: E402
from afnio.autodiff.options import (  # noqa: E402
    CHEAP,
    UPSTREAM,
    BackwardOptions,
)
from afnio.models.model import ChatCompletionModel  # noqa: E402
from afnio.optim import TGD  # noqa: E402
from afnio.testing import SIMULATOR_MODEL, calls_by_responder  # noqa: E402
from afnio.trainer import Trainer  # noqa: E402
from afnio.utils.data import DataLoader, Dataset  # noqa: E402
from afnio.utils.datasets import FacilitySupport  # noqa: E402
from benchmarks.common import data_root, parse_dataset_args, simulated  # noqa: E402

FIRST_PROMPT = (
    "Name the customer's feeling in one word: happy, unhappy or neutral. "
    'If the message mentions "furious", the feeling is unhappy.'
)
"""The first stage's starting prompt: its one rule names a word the data never holds,
so it answers its default feeling (``neutral``) to every message."""

SECOND_PROMPT = (
    "Classify the customer's sentiment from the feeling alone: positive, negative "
    'or neutral. If the message mentions "unhappy", the sentiment is negative. '
    'If the message mentions "happy", the sentiment is positive.'
)
"""The second stage's prompt: it already maps the feelings to the right sentiments;
what it lacks is an informative feeling."""

TRAIN_SIZE = 112
"""How many training messages the seed picks from the 132 of the train and val
splits."""

HELDOUT_SPLIT = "test"
"""The fixed held-out set: the 68 messages of Facility Support's test split."""

KINDS = ("module", "chain", "dspy")
VARIANTS = ("real", "frozen_first", "shuffled_labels", "detached")
BACKWARDS = ("default", "upstream", "cheap")
"""The CLI's ``--backward`` choices (``default``: each program kind's own)."""

Backward = BackwardOptions | Literal["upstream", "cheap"] | None
"""A run's ``backward`` argument: a preset name, :class:`~afnio.BackwardOptions`, or
``None`` (the program kind's own default)."""

Pair = tuple[str, str]  # (message, sentiment)


# -- data ------------------------------------------------------------------------------


def _pairs(split: FacilitySupport) -> list[Pair]:
    return [
        (str(split[i][0].data), str(split[i][1][1].data)) for i in range(len(split))
    ]


@dataclass(frozen=True)
class Splits:
    """The training messages a seed picked and the fixed held-out set."""

    train: list[Pair]
    heldout: list[Pair]


def load_splits(root: Path, seed: int, size: int = TRAIN_SIZE) -> Splits:
    """``size`` training pairs picked by ``seed`` from the train and val splits, and
    the held-out test split (the same for every seed)."""
    pool = [
        *_pairs(FacilitySupport("train", root=str(root), download=False)),
        *_pairs(FacilitySupport("val", root=str(root), download=False)),
    ]
    heldout = _pairs(FacilitySupport(HELDOUT_SPLIT, root=str(root), download=False))
    return Splits(random.Random(seed).sample(pool, size), heldout)


def shuffle_labels(pairs: Sequence[Pair], seed: int) -> list[Pair]:
    """``pairs`` with their sentiments permuted by ``seed`` (a control)."""
    labels = [label for _, label in pairs]
    random.Random(seed).shuffle(labels)
    return [(message, label) for (message, _), label in zip(pairs, labels, strict=True)]


def calls_by_kind(requests: Sequence[Any]) -> dict[str, int]:
    """How many of the simulator's received request bodies each responder answers
    (:func:`afnio.testing.calls_by_responder`): ``task``/``fallback`` (forward calls),
    ``evaluator_backward``, ``chat_backward`` (one sample), ``chat_backward_group``
    (several samples in one call), ``optimizer``."""
    return dict(calls_by_responder(requests))


def backward_label(backward: Backward) -> str:
    """How a run's ``backward`` is printed: ``default``, ``upstream``, ``cheap`` or
    the options' fields."""
    if backward is None:
        return "default"
    if isinstance(backward, str):
        return backward
    if backward == UPSTREAM:
        return "upstream"
    if backward == CHEAP:
        return "cheap"
    return f"{backward.evaluator_feedback}/{backward.chat_samples_per_call} per call"


@dataclass
class Outcome:
    """One run: held-out accuracy (0 to 1) before and after training, and the
    prompts it ended with."""

    kind: str
    variant: str
    seed: int
    before: float
    after: float
    first_prompt: str
    second_prompt: str
    seconds: float
    backward: str = "default"
    """The backward options the run used (``default``: its kind's own)."""
    calls: dict[str, int] = field(default_factory=dict)
    """The afnio Module's LM calls by kind (:func:`calls_by_kind`; empty for the
    other program kinds)."""

    @property
    def gain(self) -> float:
        return self.after - self.before


# -- the afnio Module ------------------------------------------------------------------


class PairDataset(Dataset):
    """``(message, sentiment)`` pairs as Variables, as FacilitySupport's roles."""

    def __init__(self, pairs: Sequence[Pair]) -> None:
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[afnio.Variable, afnio.Variable]:
        message, sentiment = self.pairs[index]
        return (
            afnio.Variable(message, role="input email or message"),
            afnio.Variable(sentiment, role="output sentiment"),
        )


class TwoStageSentiment(cog.Module):
    """The feeling of the message (first call), then the sentiment of the feeling
    (second call, fed only by the first call's output); scored by exact match.

    Args:
        client, model: the forward LM and its model name.
        first, second: the two system prompts.
        freeze_first: the first prompt is not trained (a control).
        detach: the second call reads a copy of the first call's output, outside the
            graph (a control: no gradient reaches the first prompt).
    """

    def __init__(
        self,
        client: ChatCompletionModel | None,
        model: str,
        first: str = FIRST_PROMPT,
        second: str = SECOND_PROMPT,
        *,
        freeze_first: bool = False,
        detach: bool = False,
    ) -> None:
        super().__init__()
        self.first_prompt = cog.Parameter(
            first,
            role="system prompt that names the customer's feeling",
            requires_grad=not freeze_first,
        )
        self.second_prompt = cog.Parameter(
            second, role="system prompt that classifies the sentiment of a feeling"
        )
        self.register_buffer(
            "message_template", afnio.Variable("{message}", role="message template")
        )
        self.register_buffer(
            "feeling_template", afnio.Variable("{feeling}", role="feeling template")
        )
        self.client = client
        self.detach = detach
        self.completion_args = {"model": model, "temperature": 0}
        self.first = cog.ChatCompletion()
        self.second = cog.ChatCompletion()
        self.exact_match = cog.ExactMatchEvaluator()

    def forward(self, emails: afnio.Variable) -> afnio.Variable:
        feeling = self.first(
            self.client,
            [
                {"role": "system", "content": [self.first_prompt]},
                {"role": "user", "content": [self.message_template]},
            ],
            inputs={"message": emails},
            **self.completion_args,
        )
        if self.detach:
            feeling = feeling.detach()
        return self.second(
            self.client,
            [
                {"role": "system", "content": [self.second_prompt]},
                {"role": "user", "content": [self.feeling_template]},
            ],
            inputs={"feeling": feeling},
            **self.completion_args,
        )

    def _step(self, batch: Any) -> dict[str, Any]:
        emails, sentiment = batch
        score, explanation = self.exact_match(self(emails), sentiment)
        return {
            "loss": (score, explanation),
            "accuracy": score.data / len(sentiment.data),
        }

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._step(batch)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._step(batch)

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._step(batch)

    def configure_optimizers(self) -> TGD:
        trained = [
            p for p in (self.first_prompt, self.second_prompt) if p.requires_grad
        ]
        return TGD(trained, model_client=self.client, **self.completion_args)


def run_module(
    splits: Splits,
    seed: int,
    variant: str,
    out: Path,
    epochs: int,
    batch: int,
    before: float | None = None,
    *,
    backward: Backward = None,
) -> Outcome:
    """Train the afnio Module with the Trainer; held-out accuracy before and after
    (``before``: the accuracy before, already measured; every variant starts from
    the same program, so one measurement serves all runs). ``backward``: the
    backward options of the fit and the evaluations (``None``: the active ones, by
    default the core API's, upstream)."""
    start = time.perf_counter()
    train = splits.train
    if variant == "shuffled_labels":
        train = shuffle_labels(train, seed)
    with simulated() as (sim, client), afnio.backward_options(backward):
        agent = TwoStageSentiment(
            client,
            SIMULATOR_MODEL,
            freeze_first=variant == "frozen_first",
            detach=variant == "detached",
        )
        trainer = Trainer(
            max_epochs=epochs,
            default_root_dir=out / f"module-{variant}-seed{seed}",
            enable_progress_bar=False,
            enable_agent_summary=False,
            enable_checkpointing=False,
        )
        heldout = DataLoader(
            PairDataset(splits.heldout), batch_size=len(splits.heldout)
        )
        if before is None:
            before = trainer.test(agent, heldout)["test_accuracy"]
        loader = DataLoader(
            PairDataset(train), batch_size=batch, shuffle=True, seed=seed
        )
        trainer.fit(agent, loader)
        after = trainer.test(agent, heldout)["test_accuracy"]
        return Outcome(
            "module",
            variant,
            seed,
            before,
            after,
            str(agent.first_prompt.data),
            str(agent.second_prompt.data),
            time.perf_counter() - start,
            backward_label(backward),
            calls_by_kind(sim.requests),
        )


# -- the LangChain chain ---------------------------------------------------------------


def build_chain(
    llm: Any, first: str = FIRST_PROMPT, second: str = SECOND_PROMPT
) -> Any:
    """The two-stage chain as LangChain's docs write chains: the first prompt's
    answer (a string) becomes the ``feeling`` of the second prompt."""
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate

    feeling_prompt = ChatPromptTemplate.from_messages(
        [("system", first), ("human", "{message}")]
    )
    sentiment_prompt = ChatPromptTemplate.from_messages(
        [("system", second), ("human", "{feeling}")]
    )
    return (
        feeling_prompt
        | llm
        | StrOutputParser()
        | (lambda feeling: {"feeling": feeling})
        | sentiment_prompt
        | llm
        | StrOutputParser()
    )


def exact(prediction: str, target: str) -> int:
    """The chain's metric: 1 when the answer is the label."""
    return int(prediction.strip() == target)


def run_chain(
    splits: Splits,
    seed: int,
    variant: str,
    out: Path,
    epochs: int,
    batch: int,
    *,
    backward: Backward = None,
) -> Outcome:
    """Optimize the chain with :func:`afnio_integrations.langchain.optimize` (the
    held-out set as its valset); ``frozen_first`` selects the second prompt's system
    message only. ``backward``: ``optimize()``'s ``backward`` (``None``: its
    default, cheap)."""
    from langchain_openai import ChatOpenAI

    from afnio_integrations.langchain import optimize

    if variant == "detached":
        raise ValueError("a traced chain has no detached variant (see the module doc)")
    start = time.perf_counter()
    train = splits.train
    if variant == "shuffled_labels":
        train = shuffle_labels(train, seed)
    with simulated() as (sim, _):
        llm = ChatOpenAI(
            model=SIMULATOR_MODEL, base_url=sim.base_url, api_key="k", max_retries=0
        )
        chain = build_chain(llm)
        select: Any = "system"
        if variant == "frozen_first":

            def select(slot: Any) -> bool:
                return slot.role == "system" and slot.text == SECOND_PROMPT

        _, report = optimize(
            chain,
            [({"message": m}, t) for m, t in train],
            exact,
            valset=[({"message": m}, t) for m, t in splits.heldout],
            epochs=epochs,
            batch_size=batch,
            seed=seed,
            select=select,
            progress=False,
            model=SIMULATOR_MODEL,
            **({} if backward is None else {"backward": backward}),
        )
        texts = report.prompts_after.values()  # the frozen one is not among them

        def after(start: str) -> str:  # the text that began as ``start``
            head = start.split(" If ", 1)[0]  # the instructions before the rules
            return next((t for t in texts if t.startswith(head)), start)

        first, second = after(FIRST_PROMPT), after(SECOND_PROMPT)
        return Outcome(
            "chain",
            variant,
            seed,
            float(report.score_before or 0.0),
            float(report.score_after or 0.0),
            first,
            second,
            time.perf_counter() - start,
            backward_label(backward),
        )


# -- the DSPy program ------------------------------------------------------------------


def build_program() -> Any:
    """Two ``dspy.Predict``: ``message -> feeling`` then ``feeling -> sentiment``
    (the second reads the first's output field only)."""
    import dspy

    class TwoStage(dspy.Module):
        def __init__(self) -> None:
            super().__init__()
            self.feel = dspy.Predict(dspy.Signature("message -> feeling", FIRST_PROMPT))
            self.classify = dspy.Predict(
                dspy.Signature("feeling -> sentiment", SECOND_PROMPT)
            )

        def forward(self, message: str) -> Any:
            feeling = self.feel(message=message).feeling
            return self.classify(feeling=feeling)

    return TwoStage()


def sentiment_match(example: Any, pred: Any, trace: Any = None) -> bool:
    """The DSPy program's metric."""
    return bool(example.sentiment == pred.sentiment)


def run_dspy(
    splits: Splits,
    seed: int,
    variant: str,
    out: Path,
    epochs: int,
    batch: int,
    *,
    backward: Backward = None,
) -> Outcome:
    """Compile the DSPy program with :class:`afnio_integrations.dspy.AfnioTGD` (the
    held-out set as its valset). ``backward``: ``AfnioTGD``'s ``backward``
    (``None``: its default, cheap)."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import dspy

    from afnio_integrations.dspy import AfnioTGD

    if variant not in ("real", "shuffled_labels"):
        raise ValueError(f"the DSPy program has no {variant} variant")
    start = time.perf_counter()
    train = splits.train
    if variant == "shuffled_labels":
        train = shuffle_labels(train, seed)

    def examples(pairs: Sequence[Pair]) -> list[Any]:
        return [
            dspy.Example(message=m, sentiment=t).with_inputs("message")
            for m, t in pairs
        ]

    with simulated() as (sim, _):
        lm = dspy.LM(
            f"openai/{SIMULATOR_MODEL}",
            api_base=sim.base_url,
            api_key="sk-test",
            engine="litellm",
            cache=False,
            num_retries=0,
            temperature=0,
        )
        with dspy.context(lm=lm, adapter=None):
            tgd = AfnioTGD(
                metric=sentiment_match,
                epochs=epochs,
                batch_size=batch,
                seed=seed,
                progress=False,
                root_dir=str(out / f"dspy-{variant}-seed{seed}"),
                **({} if backward is None else {"backward": backward}),
            )
            optimized = tgd.compile(
                build_program(),
                trainset=examples(train),
                valset=examples(splits.heldout),
            )
        report = tgd.report
        assert report is not None
        return Outcome(
            "dspy",
            variant,
            seed,
            float(report.score_before or 0.0),
            float(report.score_after or 0.0),
            optimized.feel.signature.instructions,
            optimized.classify.signature.instructions,
            time.perf_counter() - start,
            backward_label(backward),
        )


RUNNERS = {"module": run_module, "chain": run_chain, "dspy": run_dspy}
SUPPORTED = {
    "module": VARIANTS,
    "chain": ("real", "frozen_first", "shuffled_labels"),
    "dspy": ("real", "shuffled_labels"),
}
"""The variants each program kind expresses: a traced chain and a DSPy program link
the second stage's input to the first stage's output by value, so they have no
detached variant; AfnioTGD trains every predictor, so the DSPy program has no frozen
one."""


def run(
    kind: str,
    variant: str,
    seed: int,
    root: Path,
    out: Path,
    epochs: int = 1,
    batch: int = 16,
    *,
    backward: Backward = None,
) -> Outcome:
    """One run of ``kind`` (``module``, ``chain`` or ``dspy``) and ``variant``, with
    ``backward`` (``None``: the kind's own default, see the module doc)."""
    if variant not in SUPPORTED[kind]:
        raise ValueError(f"{kind} has no {variant} variant; it has {SUPPORTED[kind]}")
    return RUNNERS[kind](
        load_splits(root, seed), seed, variant, out, epochs, batch, backward=backward
    )


def learning_problems(runs: Sequence[Outcome], min_gain: float = 0.15) -> list[str]:
    """Why real runs (one program kind, several seeds) do not show the first prompt
    learning what the second stage needs; empty when they do: a median held-out gain
    of at least ``min_gain``, a start below 0.6, the first prompt given an
    ``unhappy`` rule and the second prompt unchanged."""
    report = ", ".join(f"{o.before:.3f}->{o.after:.3f}" for o in runs)
    problems = []
    if statistics.median(o.gain for o in runs) < min_gain:
        problems.append(f"median gain below {min_gain:.0%}: {report}")
    for o in runs:
        if o.before >= 0.6:
            problems.append(f"seed {o.seed} starts at {o.before:.3f}")
        if "the feeling is unhappy." not in o.first_prompt:
            problems.append(f"seed {o.seed}: first prompt {o.first_prompt!r}")
        if o.second_prompt != SECOND_PROMPT:
            problems.append(f"seed {o.seed}: second prompt {o.second_prompt!r}")
    return problems


def median_gain(
    outcomes: Sequence[Outcome], kind: str, variant: str, backward: str | None = None
) -> float:
    """The median held-out gain of the runs of ``kind`` and ``variant`` (and, when
    given, of the backward label ``backward``, see :func:`backward_label`)."""
    gains = [
        o.gain
        for o in outcomes
        if o.kind == kind
        and o.variant == variant
        and (backward is None or o.backward == backward)
    ]
    return statistics.median(gains)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--backward",
        nargs="+",
        choices=BACKWARDS,
        default=["default"],
        help="the backward options of every run (several: each run once per "
        "option): upstream (LM-written evaluator feedback, one chat-backward call "
        "per sample), cheap (direct evaluator feedback, grouped chat backward) or "
        "default (each program kind's own: the Module upstream, the chain and the "
        "DSPy program cheap)",
    )
    args = parse_dataset_args(parser, argv)
    if args is None:
        return 2
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        root = data_root(out, args.dataset)
        for kind in args.kinds:
            for mode in args.backward:
                backward = None if mode == "default" else mode
                for variant in args.variants:
                    if variant not in SUPPORTED[kind]:
                        continue
                    for seed in args.seeds:
                        with contextlib.redirect_stdout(io.StringIO()):  # tables
                            o = run(
                                kind,
                                variant,
                                seed,
                                root,
                                out,
                                args.epochs,
                                args.batch_size,
                                backward=backward,
                            )
                        outcomes.append(o)
                        print(
                            f"{kind:6s} {mode:8s} {variant:15s} seed {seed}: held-out "
                            f"{o.before:.3f} -> {o.after:.3f} "
                            f"({o.gain * 100:+.1f} points, {o.seconds:.1f} s)",
                            flush=True,
                        )
    print()
    for kind in args.kinds:
        for mode in args.backward:
            for variant in args.variants:
                if any(
                    o.kind == kind and o.variant == variant and o.backward == mode
                    for o in outcomes
                ):
                    gain = median_gain(outcomes, kind, variant, mode) * 100
                    print(
                        f"{kind:6s} {mode:8s} {variant:15s} median gain "
                        f"{gain:+.1f} points"
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
