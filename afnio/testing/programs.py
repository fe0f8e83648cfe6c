"""Randomized differential tests of afnio's tracers (``afnio_integrations``).

A tracer (``afnio_integrations.langchain.trace``, ``afnio_integrations.dspy.trace``)
turns a user's LangChain LCEL chain or DSPy program into an afnio graph, so that
``loss.backward()`` sends textual feedback to the prompt texts (Parameters) that shaped
each output. This module checks that it does so **faithfully**, on programs it
generates at random from a seed, against the live :class:`~afnio.testing.Simulator`
(loopback only, no cassette):

* :func:`generate` builds a :class:`Program`: an LCEL chain (sequences, parallel
  branches some of which the merge does not use, ``RunnableBranch`` and
  ``RouterRunnable`` routing, lambdas, nested lambdas, ``@chain`` functions,
  ``assign``/``pick``, ``with_fallbacks``, ``with_retry``, ``.bind``,
  ``with_config``, ``.map()``; string or dict inputs; ``batch``/``abatch``/
  ``invoke``/``ainvoke``/``stream``/``astream``) or a DSPy module (one to four
  predictors, ``Predict`` or ``ChainOfThought``, loops, conditionals,
  ``dspy.Parallel``, outputs composed of several predictions; ``batch``, calls, or
  concurrent ``acall``). Every prompt carries a unique marker word, every sample a
  unique lexicon word and unique tokens, every failing output a unique target.
* Its **ground truth** is known by construction: for each sample and each output, the
  set of prompts on that output's path (:attr:`Program.paths`), each of which must get
  feedback about that output, and the set that may (:attr:`Program.allowed`). It
  follows the linking contract of the tracers. LangChain: each batch item's graph
  comes from its own run; an LM call links to the Parameters of the prompt that
  produced its messages and to the upstream outputs feeding the template's
  ``input_variables`` only (an unused branch gets nothing); a non-LM step (a lambda,
  ``pick``) passes feedback to the inputs it computes its output from, and, by the
  contract's text rule (feedback goes to the inputs whose text occurs in the output),
  *may* also pass it to an unused input whose text collides with its output. DSPy: a
  program output or predictor input whose text equals the output of one or more
  predictions links to all of them (a documented over-approximation, which the
  generator provokes and requires), and a text composed of several predictions'
  outputs to each.
* :class:`TracingBench` runs it under **uneven per-request latency** (the simulator
  delays the requests of one chosen sample, or of one chosen prompt, by a few
  milliseconds; see :meth:`~afnio.testing.Simulator.delay_when`), evaluates every
  output against its target with ``exact_match_evaluator``, calls ``backward()`` and
  checks every Parameter's gradient (:class:`Outcome`): each failing sample's path
  got feedback about that sample, and feedback about sample *i* landed only on
  prompts on sample *i*'s path (for the output it is about), nowhere else.

How feedback is attributed: every ChatCompletion backward request the simulator
receives shows the recorded conversation of one LM call, the feedback on its output
and the Variables it asks about (:class:`afnio.testing.world.ChatBackwardPrompt`).
The feedback names the target of the output it comes from (``expected value is
"<t>"``, or quoted further upstream), which identifies the sample and the output; the
conversation's user messages hold the sample's own tokens (its input, its labels),
which identify the run the LM call came from; the Variables' texts hold the prompt
markers. The simulator's answers to these requests (recomputed with
:func:`afnio.testing.world.chat_backward_gradients`) must be exactly the gradients
the Parameters hold.

Example (a seed replays a program exactly)::

    >>> from afnio.testing.programs import generate
    >>> program = generate(7)
    >>> program.seed, program.framework
    (7, 'dspy')
    >>> generate(7).describe() == program.describe()
    True

From a shell: ``python -m afnio.testing.programs --count 5000`` runs seeds 0 to 4999
and prints each failure (seed, shape, misplaced gradient); ``--seed 17 -v`` replays
one. The LangChain and DSPy extras must be installed (``langchain-openai``,
``dspy``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import random
import re
import sys
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from afnio.testing import world
from afnio.testing.simulator import SIMULATOR_MODEL, Simulator

__all__ = [
    "LANGCHAIN_MODES",
    "DSPY_MODES",
    "Outcome",
    "Program",
    "Sample",
    "TracingBench",
    "check",
    "generate",
    "generate_dspy",
    "generate_langchain",
    "main",
]

LANGCHAIN_MODES = ("batch", "abatch", "invoke", "ainvoke", "stream", "astream")
"""How a generated chain is called (``batch`` and ``abatch`` weigh double)."""

DSPY_MODES = ("batch", "call", "acall")
"""How a generated DSPy program is called: ``TracedProgram.batch`` (threads), one
call per sample, or concurrent ``acall`` on one event loop."""

_CONSONANTS = "bcdfghjkmnpqrstvwxz"  # tokens without vowels are never English words
_BACKWARD_TAGS = ("<LM_CONVERSATION", "<FEEDBACK_ON_OUTPUT", "<EVALUATION")
_LEXICON = tuple(w for w in world.SALIENCE_LEXICON if "-" not in w)
_FIELD = "sentiment"  # the field every generated rule names (the simulator's default)


# -- tokens and samples ----------------------------------------------------------------


class _Tokens:
    """Unique random tokens (no token is a substring of another)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.taken: list[str] = []

    def new(self, prefix: str) -> str:
        while True:
            token = prefix + "".join(self.rng.choice(_CONSONANTS) for _ in range(5))
            if not any(token in t or t in token for t in self.taken):
                self.taken.append(token)
                return token


@dataclass(frozen=True)
class Sample:
    """One input of a generated program.

    Attributes:
        index: its position in the batch.
        word: its unique :data:`~afnio.testing.world.SALIENCE_LEXICON` word.
        message: its input text, two parts joined by ``" | "``; the first holds
            ``word`` and a unique token, the second another unique token.
        tokens: every string that identifies it in an LM call's user messages: its
            word, its two tokens and the labels the generated prompts answer for it.
        targets: the target of each output (a unique token for a failing output, the
            output's expected text for a passing one).
        expected: the text each output must have (the generator's model of the
            simulator).
    """

    index: int
    word: str
    message: str
    tokens: frozenset[str]
    targets: Mapping[str, str]
    expected: Mapping[str, str]

    def failing(self, output: str) -> bool:
        """Whether ``output`` fails (its target is not its expected text)."""
        return self.targets[output] != self.expected[output]


_WORD = re.compile(r"[\w-]+")


def _words(text: str) -> frozenset[str]:
    """The whole words of ``text``, casefolded (``-`` joins)."""
    return frozenset(w.casefold() for w in _WORD.findall(text))


def _occurs(token: str, text: str | frozenset[str]) -> bool:
    """``token`` in ``text`` (or in its :func:`_words`) as a whole word,
    case-insensitively (``-`` joins).

    >>> _occurs("great", "So GREAT!"), _occurs("great", "great-grandson")
    (True, False)
    """
    if _WORD.fullmatch(token) is None:  # several words: a whole-word search
        if not isinstance(text, str):
            return False
        pattern = rf"(?<![\w-]){re.escape(token)}(?![\w-])"
        return re.search(pattern, text, re.IGNORECASE) is not None
    return token.casefold() in (_words(text) if isinstance(text, str) else text)


def _rule(key: str, label: str) -> str:
    return f'If the message mentions "{key}", the {_FIELD} is {label}.'


@dataclass
class _SampleDraft:
    """A sample while its program is generated: its word, its two tokens and the
    two labels each prompt answers for it (when the prompt is distinct)."""

    index: int
    word: str
    first: str  # token of the first part
    second: str  # token of the second part
    labels: dict[str, tuple[str, str]] = field(default_factory=dict)  # prompt -> 2

    @property
    def message(self) -> str:
        return f"Note {self.first}: I feel {self.word} today | Also {self.second} came"

    def keys(self, prompt: str) -> list[tuple[str, str]]:
        """The rules a distinct prompt holds for this sample: its word and every
        other prompt's label map to the prompt's first label, its second token to
        the second label (so the two parts of a message get different answers)."""
        first, second = self.labels[prompt]
        rules = [(self.word, first), (self.second, second)]
        for other, (a, b) in sorted(self.labels.items()):
            if other != prompt:
                rules += [(a, first), (b, first)]
        return rules

    def tokens(self) -> frozenset[str]:
        labels = [label for pair in self.labels.values() for label in pair]
        return frozenset([self.word, self.first, self.second, *labels])


# -- programs --------------------------------------------------------------------------


@dataclass
class Program:
    """A generated program, its inputs and its ground truth.

    Attributes:
        seed: the seed it was generated from (:func:`generate` replays it).
        framework: ``"langchain"`` or ``"dspy"``.
        shape: the program's structure, in words.
        mode: how it is called (:data:`LANGCHAIN_MODES`, :data:`DSPY_MODES`).
        prompts: the marker words of each prompt's Parameters, by prompt name (a
            LangChain prompt has one per selected message template, a DSPy predictor
            one for its instructions).
        samples: the inputs, with their targets and expected outputs.
        outputs: the names of the outputs (``"out"`` for a chain).
        paths: for each sample, for each output, the prompts on that output's path:
            each must get feedback about that output (when it fails).
        allowed: for each sample, for each output, the prompts that may get its
            feedback: ``paths`` plus, for a LangChain non-LM step (a lambda,
            ``pick``) whose unused input's text collides with its output, that
            input's prompts (the contract's text rule allows it). ``paths`` when
            not given.
        delays: the simulator's per-request delays: ``(what, seconds, predicate)``.
        select: the ``select`` argument of the LangChain ``trace``.
        string_inputs: whether a chain takes each message as a plain string (else
            ``{"message": ...}``; a DSPy program always takes ``message=...``).
    """

    seed: int
    framework: str
    shape: str
    mode: str
    prompts: dict[str, tuple[str, ...]]
    samples: list[Sample]
    outputs: tuple[str, ...]
    paths: list[dict[str, frozenset[str]]]
    delays: list[tuple[str, float, Callable[[Mapping[str, Any]], bool]]]
    allowed: list[dict[str, frozenset[str]]] | None = None
    select: str = "system"
    string_inputs: bool = False
    build: Callable[[TracingBench], Any] | None = field(repr=False, default=None)

    def __post_init__(self) -> None:
        if self.allowed is None:
            self.allowed = self.paths

    def may_reach(self, sample: int, output: str) -> frozenset[str]:
        """The prompts that may get feedback about ``output`` of ``sample``."""
        assert self.allowed is not None
        return self.allowed[sample][output]

    def inputs(self) -> list[Any]:
        """The inputs of the samples, as the program takes them."""
        if self.string_inputs:
            return [s.message for s in self.samples]
        return [{"message": s.message} for s in self.samples]

    def describe(self) -> str:
        """The program in words: shape, mode, inputs, delays and ground truth."""
        lines = [
            f"seed {self.seed}: {self.framework} program, mode {self.mode}"
            + (f", select={self.select!r}" if self.framework == "langchain" else ""),
            f"  shape: {self.shape}",
            "  prompts: "
            + ", ".join(f"{n} [{' '.join(m)}]" for n, m in self.prompts.items()),
            "  delays: "
            + (", ".join(f"{what} +{s * 1000:.0f} ms" for what, s, _ in self.delays)),
        ]
        for sample, paths in zip(self.samples, self.paths, strict=True):
            outs = "; ".join(
                f"{o}: expected {sample.expected[o]!r}, target "
                f"{sample.targets[o]!r}, path {_names(paths[o])}"
                + (
                    f" (may reach {_names(may)})"
                    if (may := self.may_reach(sample.index, o)) != paths[o]
                    else ""
                )
                + ("" if sample.failing(o) else " (passes)")
                for o in self.outputs
            )
            lines.append(f"  sample {sample.index} ({sample.message!r}): {outs}")
        return "\n".join(lines)


def _names(names: frozenset[str] | set[str]) -> str:
    return "{" + ", ".join(sorted(names)) + "}"


def generate(seed: int, framework: str | None = None) -> Program:
    """The program of ``seed``: an LCEL chain for an even seed, a DSPy program for an
    odd one (unless ``framework`` is ``"langchain"`` or ``"dspy"``). Deterministic:
    the same seed always gives the same program."""
    if framework is None:
        framework = "langchain" if seed % 2 == 0 else "dspy"
    if framework == "langchain":
        return generate_langchain(seed)
    if framework == "dspy":
        return generate_dspy(seed)
    raise ValueError(f"framework must be 'langchain' or 'dspy', got {framework!r}")


def _sample_delays(
    rng: random.Random, drafts: Sequence[_SampleDraft], markers: Mapping[str, str]
) -> list[tuple[str, float, Callable[[Mapping[str, Any]], bool]]]:
    """Uneven latency: the forward requests of one sample (most often the first, so
    that it finishes last), and sometimes those of one prompt, wait a few ms."""
    delays = []
    slow = drafts[0] if rng.random() < 0.6 else rng.choice(list(drafts))
    seconds = rng.choice((0.003, 0.006, 0.012))
    delays.append(
        (f"sample {slow.index}", seconds, _user_text_has(slow.tokens() - {slow.word}))
    )
    if markers and rng.random() < 0.4:
        name = rng.choice(sorted(markers))
        delays.append(
            (f"prompt {name}", rng.choice((0.004, 0.01)), _system_has(markers[name]))
        )
    return delays


def _forward_messages(body: Mapping[str, Any], role: str) -> str | None:
    """The text of the ``role`` messages of a forward (not afnio's backward)
    request, or ``None`` for a backward request."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return ""
    texts = [
        world.message_text(m.get("content"))
        for m in messages
        if isinstance(m, Mapping) and m.get("role") == role
    ]
    joined = "\n".join(texts)
    if role == "user" and any(tag in joined for tag in _BACKWARD_TAGS):
        return None
    return joined


def _user_text_has(tokens: frozenset[str]) -> Callable[[Mapping[str, Any]], bool]:
    def predicate(body: Mapping[str, Any]) -> bool:
        text = _forward_messages(body, "user")
        if not text:
            return False
        words = _words(text)
        return any(_occurs(t, words) for t in tokens)

    return predicate


def _system_has(marker: str) -> Callable[[Mapping[str, Any]], bool]:
    def predicate(body: Mapping[str, Any]) -> bool:
        if _forward_messages(body, "user") is None:
            return False
        return marker in (_forward_messages(body, "system") or "")

    return predicate


def _finish(
    rng: random.Random,
    tokens: _Tokens,
    drafts: Sequence[_SampleDraft],
    outputs: tuple[str, ...],
    expected: list[dict[str, str]],
) -> list[Sample]:
    """Targets: a unique token for a failing output; one output in six (never all
    of them) passes."""
    plan = [[rng.random() < 1 / 6 for _ in outputs] for _ in drafts]
    if all(all(row) for row in plan):
        plan[0][0] = False
    samples = []
    for draft, passes, exp in zip(drafts, plan, expected, strict=True):
        targets = {
            o: exp[o] if ok else tokens.new("tg")
            for o, ok in zip(outputs, passes, strict=True)
        }
        samples.append(
            Sample(draft.index, draft.word, draft.message, draft.tokens(), targets, exp)
        )
    return samples


# -- LangChain: stages -----------------------------------------------------------------


class Value(NamedTuple):
    """A text and the prompts on its path: those that must get its feedback (its
    dataflow) and those that may (``must`` plus what the contract's value-based
    rules may add when texts collide)."""

    text: str
    must: frozenset[str] = frozenset()
    may: frozenset[str] = frozenset()


def _input(text: str) -> Value:
    """A text no LM call computed (a program input): no path."""
    return Value(text)


def _step(inputs: Sequence[Value], used: Sequence[Value], output: str) -> Value:
    """A non-LM step (a lambda, ``pick``) computing ``output`` from ``used`` among
    its ``inputs``: its feedback must reach the prompts of ``used``; by the contract
    (feedback goes to the inputs whose text occurs in the output, else to all of
    them) it may also reach those of an unused input whose text occurs in the output
    (a collision), compared case-insensitively to allow either reading."""
    computed = [v for v in inputs if v.may]
    hit = [v for v in computed if v.text and v.text.casefold() in output.casefold()]
    return Value(
        output,
        frozenset().union(*(v.must for v in used)),
        frozenset().union(*(v.may for v in (*used, *(hit or computed)))),
    )


@dataclass
class _Build:
    """What the stages need to build a chain: the bench's chat model and a per-run
    memory for the gates of ``with_retry``."""

    llm: Any
    seen: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Stage:
    """A piece of a generated LCEL chain: builds the runnable and models its output
    (text and path) from its input, by construction."""

    def build(self, ctx: _Build) -> Any:
        raise NotImplementedError

    def model(self, inp: Mapping[str, Value], sample: _SampleDraft) -> Value:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def units(self) -> Iterator[_Unit]:
        return iter(())


@dataclass
class _Unit(_Stage):
    """``ChatPromptTemplate | chat model | StrOutputParser``: one LM call."""

    name: str
    marker: str
    variables: tuple[str, ...] = ("message",)
    human_marker: str | None = None
    distinct: bool = True
    bind: bool = False
    system: str = ""  # set once the samples are known

    def human(self) -> str:
        head = f"[{self.human_marker}] " if self.human_marker else ""
        return head + "\n".join(f"{v}: {{{v}}}" for v in self.variables)

    def build(self, ctx: _Build) -> Any:
        from langchain_core.output_parsers import StrOutputParser
        from langchain_core.prompts import ChatPromptTemplate

        prompt = ChatPromptTemplate.from_messages(
            [("system", self.system), ("human", self.human())]
        )
        llm = ctx.llm.bind(stop=["ZZZZ"]) if self.bind else ctx.llm
        return prompt | llm | StrOutputParser()

    def model(self, inp: Mapping[str, Value], sample: _SampleDraft) -> Value:
        human = self.human().format(**{v: inp[v].text for v in self.variables})
        request = world.SimRequest.from_messages(
            [
                {"role": "system", "content": self.system},
                {"role": "user", "content": human},
            ]
        )
        used = [inp[v] for v in self.variables]
        return Value(
            world.respond(request),
            frozenset({self.name}).union(*(v.must for v in used)),
            frozenset({self.name}).union(*(v.may for v in used)),
        )

    def describe(self) -> str:
        extra = "" if self.distinct else ", answers neutral"
        bound = ", llm.bind" if self.bind else ""
        return f"{self.name}({', '.join(self.variables)}{bound}{extra})"

    def units(self) -> Iterator[_Unit]:
        yield self


def _word_in(words: frozenset[str]) -> Callable[[Any], bool]:
    def condition(inp: Any) -> bool:
        return any(_occurs(w, inp["message"]) for w in words)

    return condition


@dataclass
class _Route(_Stage):
    """``RunnableBranch`` or ``RouterRunnable``: each sample takes the option whose
    words its message holds (else the last option)."""

    kind: str  # "branch" or "router"
    options: list[tuple[frozenset[str], _Stage]]  # the last one is the default

    def _choose(self, message: str) -> int:
        for k, (words, _) in enumerate(self.options[:-1]):
            if any(_occurs(w, message) for w in words):
                return k
        return len(self.options) - 1

    def build(self, ctx: _Build) -> Any:
        from langchain_core.runnables import (
            RouterRunnable,
            RunnableBranch,
            RunnableLambda,
        )

        built = [stage.build(ctx) for _, stage in self.options]
        if self.kind == "branch":
            pairs = [
                (_word_in(words), r)
                for (words, _), r in zip(self.options[:-1], built[:-1], strict=True)
            ]
            return RunnableBranch(*pairs, built[-1])
        choose = self._choose

        def route(inp: dict[str, Any]) -> dict[str, Any]:
            return {"key": f"r{choose(inp['message'])}", "input": inp}

        runnables = {f"r{k}": r for k, r in enumerate(built)}
        return RunnableLambda(route) | RouterRunnable(runnables)

    def model(self, inp: Mapping[str, Value], sample: _SampleDraft) -> Value:
        return self.options[self._choose(inp["message"].text)][1].model(inp, sample)

    def describe(self) -> str:
        opts = [
            f"{'/'.join(sorted(words))} -> {stage.describe()}"
            for words, stage in self.options[:-1]
        ]
        opts.append(f"else -> {self.options[-1][1].describe()}")
        return f"{self.kind}[{'; '.join(opts)}]"

    def units(self) -> Iterator[_Unit]:
        for _, stage in self.options:
            yield from stage.units()


def _transform(kind: str) -> Callable[[str], str]:
    if kind == "upper":

        def upper(text: str) -> str:
            return text.upper()

        return upper

    def wrap(text: str) -> str:
        return f"<{text}>"

    return wrap


@dataclass
class _Wrap(_Stage):
    """A composite around a stage: ``with_config``, ``with_retry`` (the first
    attempt of chosen samples fails before any LM call), ``with_fallbacks`` (the
    primary fails before any LM call for chosen samples), a lambda or a nested
    lambda calling it, or an ``@chain`` function calling it."""

    kind: str  # config, retry, fallbacks, lambda, nested, chain
    inner: _Stage
    fail_words: frozenset[str] = frozenset()
    fallback: _Stage | None = None

    def build(self, ctx: _Build) -> Any:
        from langchain_core.runnables import RunnableLambda, chain

        inner = self.inner.build(ctx)
        if self.kind == "config":
            return inner.with_config(run_name="configured", tags=["afnio-generated"])
        if self.kind == "retry":
            words = self.fail_words

            def flaky(inp: dict[str, Any]) -> dict[str, Any]:
                key = inp["message"]
                with ctx.lock:
                    first = key not in ctx.seen
                    ctx.seen.add(key)
                if first and any(_occurs(w, key) for w in words):
                    raise RuntimeError("a transient failure (generated)")
                return inp

            return (RunnableLambda(flaky) | inner).with_retry(
                stop_after_attempt=2, wait_exponential_jitter=False
            )
        if self.kind == "fallbacks":
            assert self.fallback is not None
            words = self.fail_words

            def gate(inp: dict[str, Any]) -> dict[str, Any]:
                if any(_occurs(w, inp["message"]) for w in words):
                    raise ValueError("the primary refuses this input (generated)")
                return inp

            return (RunnableLambda(gate) | inner).with_fallbacks(
                [self.fallback.build(ctx)]
            )
        if self.kind == "lambda":
            return _calling_lambda(inner)
        if self.kind == "nested":
            return _calling_lambda(_calling_lambda(inner))

        @chain
        def generated_chain(inp: dict[str, Any]) -> str:
            return inner.invoke(inp)

        return generated_chain

    def model(self, inp: Mapping[str, Value], sample: _SampleDraft) -> Value:
        if self.kind == "fallbacks" and any(
            _occurs(w, inp["message"].text) for w in self.fail_words
        ):
            assert self.fallback is not None
            return self.fallback.model(inp, sample)
        return self.inner.model(inp, sample)

    def describe(self) -> str:
        if self.kind == "fallbacks":
            assert self.fallback is not None
            return (
                f"{self.inner.describe()}.with_fallbacks([{self.fallback.describe()}])"
                f" failing for {'/'.join(sorted(self.fail_words)) or 'none'}"
            )
        if self.kind == "retry":
            return (
                f"{self.inner.describe()}.with_retry() failing once for "
                f"{'/'.join(sorted(self.fail_words)) or 'none'}"
            )
        return f"{self.kind}({self.inner.describe()})"

    def units(self) -> Iterator[_Unit]:
        yield from self.inner.units()
        if self.fallback is not None:
            yield from self.fallback.units()


def _calling_lambda(runnable: Any) -> Any:
    """A ``RunnableLambda`` whose function calls ``runnable`` (held in its closure,
    where the tracer's discovery looks)."""
    from langchain_core.runnables import RunnableLambda

    def call_inner(inp: Any) -> Any:
        return runnable.invoke(inp)

    return RunnableLambda(call_inner)


@dataclass
class _Each(_Stage):
    """``split | unit.map() | join``: the unit runs once per part of the message."""

    unit: _Unit

    def build(self, ctx: _Build) -> Any:
        from langchain_core.runnables import RunnableLambda

        def split(inp: dict[str, Any]) -> list[str]:
            return inp["message"].split(" | ")

        def join(texts: list[str]) -> str:
            return ", ".join(texts)

        return RunnableLambda(split) | self.unit.build(ctx).map() | RunnableLambda(join)

    def model(self, inp: Mapping[str, Value], sample: _SampleDraft) -> Value:
        parts = [
            self.unit.model({"message": _input(part)}, sample)
            for part in inp["message"].text.split(" | ")
        ]
        return _step(parts, parts, ", ".join(v.text for v in parts))

    def describe(self) -> str:
        return f"map({self.unit.describe()}) over the parts, joined"

    def units(self) -> Iterator[_Unit]:
        yield self.unit


@dataclass
class _Fan(_Stage):
    """Parallel branches (``RunnableParallel`` with the message passed along, or
    ``RunnablePassthrough.assign``), each optionally transformed by a lambda, then a
    merge: an LM call whose template uses some of them, ``pick`` of one, or a lambda
    joining some of them."""

    branches: dict[str, _Stage]
    transforms: dict[str, str]  # branch -> "upper" | "wrap"
    how: str  # "parallel" or "assign"
    merge: str  # "unit", "pick" or "join"
    merge_unit: _Unit | None = None
    used: tuple[str, ...] = ()  # for pick (one) and join

    def build(self, ctx: _Build) -> Any:
        from langchain_core.runnables import (
            RunnableLambda,
            RunnableParallel,
            RunnablePassthrough,
        )

        steps = {}
        for key, stage in self.branches.items():
            runnable = stage.build(ctx)
            if key in self.transforms:
                runnable = runnable | RunnableLambda(_transform(self.transforms[key]))
            steps[key] = runnable
        if self.how == "assign":
            fan = RunnablePassthrough.assign(**steps)
        else:

            def message(inp: dict[str, Any]) -> str:
                return inp["message"]

            fan = RunnableParallel(**steps, message=RunnableLambda(message))
        if self.merge == "pick":
            return fan.pick(self.used[0])
        if self.merge == "join":
            used = self.used

            def join(inp: dict[str, Any]) -> str:
                return " + ".join(inp[k] for k in used)

            return fan | RunnableLambda(join)
        assert self.merge_unit is not None
        return fan | self.merge_unit.build(ctx)

    def model(self, inp: Mapping[str, Value], sample: _SampleDraft) -> Value:
        env: dict[str, Value] = {"message": inp["message"]}
        for key, stage in self.branches.items():
            value = stage.model(inp, sample)
            if key in self.transforms:
                value = value._replace(
                    text=_transform(self.transforms[key])(value.text)
                )
            env[key] = value
        if self.merge == "unit":
            assert self.merge_unit is not None
            return self.merge_unit.model(env, sample)
        used = [env[k] for k in self.used]
        text = (
            used[0].text if self.merge == "pick" else " + ".join(v.text for v in used)
        )
        return _step(list(env.values()), used, text)

    def describe(self) -> str:
        branches = ", ".join(
            f"{k}={s.describe()}"
            + (f"|{self.transforms[k]}" if k in self.transforms else "")
            for k, s in self.branches.items()
        )
        head = "assign" if self.how == "assign" else "parallel"
        if self.merge == "unit":
            assert self.merge_unit is not None
            tail = f"merge {self.merge_unit.describe()}"
        else:
            tail = f"{self.merge}({', '.join(self.used)})"
        return f"{head}({branches}, message) | {tail}"

    def units(self) -> Iterator[_Unit]:
        for stage in self.branches.values():
            yield from stage.units()
        if self.merge_unit is not None:
            yield self.merge_unit


# -- LangChain: the generator ----------------------------------------------------------


class _LcelGenerator:
    """Random stages with at most two LM calls on any path (so that the feedback
    reaching the first call still names its target) and at most six prompts."""

    MAX_PROMPTS = 6

    def __init__(self, rng: random.Random, tokens: _Tokens, streaming: bool) -> None:
        self.rng = rng
        self.tokens = tokens
        self.streaming = streaming  # with_retry does not retry a stream
        self.count = 0
        self.collide = rng.random() < 0.25  # every LM call answers "neutral"
        self.bind_some = rng.random() < 0.2

    def left(self) -> int:
        return self.MAX_PROMPTS - self.count

    def unit(self, variables: tuple[str, ...] = ("message",)) -> _Unit:
        name = "abcdefghij"[self.count]
        self.count += 1
        return _Unit(
            name,
            self.tokens.new("mk"),
            variables,
            distinct=not self.collide and self.rng.random() < 0.75,
            bind=self.bind_some and self.rng.random() < 0.5,
        )

    def words(self, words: Sequence[str]) -> frozenset[str]:
        """A random subset of the samples' words (routing and failing conditions)."""
        return frozenset(w for w in words if self.rng.random() < 0.5)

    def leaf(self, words: Sequence[str], reserve: int = 0) -> _Stage:
        """A stage with one LM call on each path, leaving ``reserve`` prompts."""
        rng = self.rng
        budget = self.left() - reserve
        roll = rng.random()
        if budget >= 2 and roll < 0.2:
            n = min(budget, rng.choice((2, 2, 3)))
            options = [(self.words(words), self.unit()) for _ in range(n)]
            options[-1] = (frozenset(), options[-1][1])
            return _Route(rng.choice(("branch", "router")), list(options))
        if roll < 0.45:
            kinds = ["config", "retry", "lambda", "nested", "chain"]
            if budget >= 2:
                kinds.append("fallbacks")
            kind = rng.choice(kinds)
            inner = self.unit()
            fallback = self.unit() if kind == "fallbacks" else None
            fail = frozenset()
            if kind == "fallbacks" or (kind == "retry" and not self.streaming):
                fail = self.words(words)
            return _Wrap(kind, inner, fail, fallback)
        if roll < 0.55:
            return _Each(self.unit())
        return self.unit()

    def fan(self, words: Sequence[str], reserve: int = 0) -> _Fan:
        rng = self.rng
        merge = rng.choice(("unit", "unit", "unit", "pick", "join"))
        need = 1 if merge == "unit" else 0
        n = max(1, min(self.left() - reserve - need, rng.choice((1, 2, 2, 3))))
        branches: dict[str, _Stage] = {}
        for k, key in enumerate(("x", "y", "z")[:n]):
            branches[key] = self.leaf(words, reserve + need + (n - k - 1))
        transforms = {
            k: rng.choice(("upper", "wrap")) for k in branches if rng.random() < 0.25
        }
        keys = list(branches)
        if merge == "pick":
            used: tuple[str, ...] = (rng.choice(keys),)
        else:
            used = tuple(k for k in keys if rng.random() < 0.6) or (rng.choice(keys),)
        merge_unit = None
        if merge == "unit":
            with_message = rng.random() < 0.3
            merge_unit = self.unit(used + (("message",) if with_message else ()))
        how = rng.choice(("parallel", "assign"))
        return _Fan(branches, transforms, how, merge, merge_unit, used)

    def body(self, words: Sequence[str]) -> _Stage:
        roll = self.rng.random()
        if roll < 0.3:
            return self.leaf(words)
        if roll < 0.85:
            return self.fan(words)
        first = self.fan(words, 1) if self.rng.random() < 0.5 else self.leaf(words, 2)
        second = self.leaf(words) if isinstance(first, _Fan) else self.fan(words)
        return _Route(
            self.rng.choice(("branch", "router")),
            [(self.words(words), first), (frozenset(), second)],
        )


def _chain_of_text(inner: Any) -> Any:
    """An ``@chain`` function taking the message as a plain string."""
    from langchain_core.runnables import chain

    @chain
    def program_of_text(text: str) -> Any:
        return inner.invoke({"message": text})

    return program_of_text


def _drafts(
    rng: random.Random, tokens: _Tokens, words: Sequence[str], names: Sequence[str]
) -> list[_SampleDraft]:
    drafts = [
        _SampleDraft(i, word, tokens.new("sx"), tokens.new("sy"))
        for i, word in enumerate(words)
    ]
    for draft in drafts:
        for name in names:
            draft.labels[name] = (tokens.new("lb"), tokens.new("lc"))
    return drafts


def generate_langchain(seed: int) -> Program:
    """A random LCEL program (see the module docstring), by seed."""
    rng = random.Random(seed)
    tokens = _Tokens(rng)
    mode = rng.choice((*LANGCHAIN_MODES, "batch", "abatch"))
    gen = _LcelGenerator(rng, tokens, streaming=mode in ("stream", "astream"))
    words = rng.sample(_LEXICON, rng.randint(2, 4))
    body = gen.body(words)
    final = rng.choice((None, None, None, "upper", "wrap"))
    units = list(body.units())
    select = "all" if rng.random() < 0.2 else "system"
    if select == "all":
        for unit in units:
            unit.human_marker = tokens.new("mh")
    drafts = _drafts(rng, tokens, words, [u.name for u in units])
    for unit in units:
        rules = [_rule(k, v) for d in drafts for k, v in d.keys(unit.name)]
        head = f"[{unit.marker}] Label the note."
        unit.system = " ".join([head, *rules]) if unit.distinct else head
    adapter = None
    if rng.random() < 0.65:  # a plain string input
        # a sequence at the root batches step by step (its runs end in input
        # order); an @chain function at the root runs each input on its own
        choices = ["parallel", "lambda", "chain", "chain"] + (
            ["direct"] if isinstance(body, _Unit) else []
        )
        adapter = rng.choice(choices)

    expected: list[dict[str, str]] = []
    paths: list[dict[str, frozenset[str]]] = []
    allowed: list[dict[str, frozenset[str]]] = []
    for draft in drafts:
        value = body.model({"message": _input(draft.message)}, draft)
        text = value.text if final is None else _transform(final)(value.text)
        expected.append({"out": text})
        paths.append({"out": value.must})
        allowed.append({"out": value.may})
    samples = _finish(rng, tokens, drafts, ("out",), expected)
    delays = _sample_delays(rng, drafts, {u.name: u.marker for u in units})

    def build(bench: TracingBench) -> Any:
        from langchain_core.runnables import RunnableLambda, RunnablePassthrough

        chain = body.build(_Build(bench.chat_model()))
        if final is not None:
            chain = chain | RunnableLambda(_transform(final))
        if adapter == "parallel":
            chain = {"message": RunnablePassthrough()} | chain
        elif adapter == "lambda":

            def as_dict(text: str) -> dict[str, str]:
                return {"message": text}

            chain = RunnableLambda(as_dict) | chain
        elif adapter == "chain":
            chain = _chain_of_text(chain)
        return chain

    shape = body.describe() + (f" | {final}" if final else "")
    shape = (f"str input via {adapter}: " if adapter else "dict input: ") + shape
    prompts = {
        u.name: (u.marker,) + ((u.human_marker,) if u.human_marker else ())
        for u in units
    }
    return Program(
        seed=seed,
        framework="langchain",
        shape=shape,
        mode=mode,
        prompts=prompts,
        samples=samples,
        outputs=("out",),
        paths=paths,
        allowed=allowed,
        delays=delays,
        select=select,
        string_inputs=adapter is not None,
        build=build,
    )


# -- DSPy ------------------------------------------------------------------------------

_PROGRAM_INPUTS = ("message", "part0", "part1")


@dataclass
class _Predictor:
    """One generated predictor: ``<inputs> -> sentiment`` (``Predict`` or
    ``ChainOfThought``), its instructions holding its marker and, when distinct,
    a rule per sample and key."""

    name: str
    marker: str
    inputs: tuple[str, ...]
    cot: bool
    distinct: bool
    instructions: str = ""

    def build(self) -> Any:
        import dspy

        signature = dspy.Signature(
            f"{', '.join(self.inputs)} -> {_FIELD}", self.instructions
        )
        return dspy.ChainOfThought(signature) if self.cot else dspy.Predict(signature)

    def model(self, values: Mapping[str, str]) -> str:
        """What the simulator answers for these input values."""
        outputs = (world.DSPyField("reasoning", "str"),) if self.cot else ()
        prompt = world.DSPyPrompt(
            inputs=tuple(world.DSPyField(n, "str") for n in self.inputs),
            outputs=(*outputs, world.DSPyField(_FIELD, "str")),
            instructions=self.instructions,
            values=dict(values),
            json_answer=False,
        )
        return str(world.dspy_values(prompt)[_FIELD])

    def describe(self) -> str:
        kind = "ChainOfThought" if self.cot else "Predict"
        extra = "" if self.distinct else ", answers neutral"
        return f"{self.name}={kind}({', '.join(self.inputs)} -> {_FIELD}{extra})"


@dataclass(frozen=True)
class _Call:
    """``env[out] = <pred>(**{field: env[source]}).sentiment``."""

    out: str
    pred: str
    args: tuple[tuple[str, str], ...]

    def describe(self) -> str:
        args = ", ".join(f"{f}={src}" for f, src in self.args)
        return f"{self.out} = {self.pred}({args})"


@dataclass(frozen=True)
class _If:
    """``then`` when the message holds one of ``words``, else ``orelse`` (both
    write the same variable)."""

    words: frozenset[str]
    then: _Call
    orelse: _Call

    def chosen(self, message: str) -> _Call:
        return (
            self.then if any(_occurs(w, message) for w in self.words) else self.orelse
        )

    def describe(self) -> str:
        words = "/".join(sorted(self.words)) or "nothing"
        return f"if {words}: {self.then.describe()} else: {self.orelse.describe()}"


@dataclass(frozen=True)
class _Loop:
    """``env[out] = ", ".join(<pred>(field=part).sentiment for part in parts)``."""

    out: str
    pred: str
    field: str

    def calls(self) -> list[_Call]:
        return [
            _Call(self.out, self.pred, ((self.field, p),)) for p in ("part0", "part1")
        ]

    def describe(self) -> str:
        return f"{self.out} = ', '.join({self.pred}({self.field}=part) for each part)"


@dataclass(frozen=True)
class _Par:
    """Calls run concurrently (``dspy.Parallel``, or ``asyncio.gather`` in
    ``aforward``)."""

    calls: tuple[_Call, ...]

    def describe(self) -> str:
        return f"parallel[{'; '.join(c.describe() for c in self.calls)}]"


_Step = _Call | _If | _Loop | _Par


def _env(message: str) -> dict[str, str]:
    first, second = message.split(" | ")
    return {"message": message, "part0": first, "part1": second}


def _output_text(env: Mapping[str, str], sources: tuple[str, ...]) -> str:
    return " + ".join(env[v] for v in sources)


@functools.cache
def _module_class() -> type:
    """The DSPy module class of generated programs (built on first use: DSPy is an
    optional dependency)."""
    import dspy

    class GeneratedProgram(dspy.Module):  # type: ignore[misc]
        """Runs a generated plan with its predictors (attributes ``a``, ``b``...)."""

        def __init__(
            self,
            predictors: Mapping[str, Any],
            steps: tuple[_Step, ...],
            outputs: tuple[tuple[str, tuple[str, ...]], ...],
        ) -> None:
            super().__init__()
            for name, predictor in predictors.items():
                setattr(self, name, predictor)
            self.steps = steps
            self.outputs = outputs

        def _call(self, call: _Call, env: Mapping[str, str]) -> str:
            kwargs = {f: env[src] for f, src in call.args}
            return str(getattr(self, call.pred)(**kwargs)[_FIELD])

        async def _acall(self, call: _Call, env: Mapping[str, str]) -> str:
            kwargs = {f: env[src] for f, src in call.args}
            prediction = await getattr(self, call.pred).acall(**kwargs)
            return str(prediction[_FIELD])

        def _result(self, env: Mapping[str, str]) -> Any:
            return dspy.Prediction(
                **{name: _output_text(env, src) for name, src in self.outputs}
            )

        def forward(self, message: str) -> Any:
            env = _env(message)
            for step in self.steps:
                if isinstance(step, _Call):
                    env[step.out] = self._call(step, env)
                elif isinstance(step, _If):
                    call = step.chosen(message)
                    env[call.out] = self._call(call, env)
                elif isinstance(step, _Loop):
                    texts = [self._call(c, env) for c in step.calls()]
                    env[step.out] = ", ".join(texts)
                else:
                    pairs = [
                        (getattr(self, c.pred), {f: env[src] for f, src in c.args})
                        for c in step.calls
                    ]
                    parallel = dspy.Parallel(
                        num_threads=len(pairs), disable_progress_bar=True
                    )
                    for call, prediction in zip(
                        step.calls, parallel(pairs), strict=True
                    ):
                        env[call.out] = str(prediction[_FIELD])
            return self._result(env)

        async def aforward(self, message: str) -> Any:
            env = _env(message)
            for step in self.steps:
                if isinstance(step, _Call):
                    env[step.out] = await self._acall(step, env)
                elif isinstance(step, _If):
                    call = step.chosen(message)
                    env[call.out] = await self._acall(call, env)
                elif isinstance(step, _Loop):
                    texts = [await self._acall(c, env) for c in step.calls()]
                    env[step.out] = ", ".join(texts)
                else:
                    texts = await asyncio.gather(
                        *(self._acall(c, env) for c in step.calls)
                    )
                    for call, text in zip(step.calls, texts, strict=True):
                        env[call.out] = text
            return self._result(env)

    return GeneratedProgram


def _dspy_model(
    predictors: Mapping[str, _Predictor],
    steps: Sequence[_Step],
    outputs: Sequence[tuple[str, tuple[str, ...]]],
    message: str,
) -> tuple[dict[str, str], dict[str, frozenset[str]]]:
    """Each output's text and path, by the contract: a predictor input (computed
    upstream) or a program output equal to the output of several predictions links
    to all of them (among those finished before the call started); an output
    composed of several predictions' outputs links to each."""
    env = _env(message)
    made: list[tuple[str, frozenset[str]]] = []  # every prediction: text, path

    def call(
        c: _Call, visible: Sequence[tuple[str, frozenset[str]]]
    ) -> tuple[str, frozenset[str]]:
        values = {f: env[src] for f, src in c.args}
        text = predictors[c.pred].model(values)
        path = frozenset({c.pred})
        for f, src in c.args:
            if src not in _PROGRAM_INPUTS:
                path = path.union(*(p for t, p in visible if t == values[f]))
        return text, path

    for step in steps:
        visible = list(made)
        if isinstance(step, _Call | _If):
            c = step if isinstance(step, _Call) else step.chosen(message)
            made.append(call(c, visible))
            env[c.out] = made[-1][0]
        elif isinstance(step, _Loop):
            results = [call(c, visible) for c in step.calls()]
            made.extend(results)
            env[step.out] = ", ".join(t for t, _ in results)
        else:
            results = [call(c, visible) for c in step.calls]
            made.extend(results)
            for c, (text, _) in zip(step.calls, results, strict=True):
                env[c.out] = text
    texts, paths = {}, {}
    for name, sources in outputs:
        text = _output_text(env, sources)
        equal = [p for t, p in made if t == text]
        composed = [p for t, p in made if t.strip() and _occurs(t, text)]
        texts[name] = text
        paths[name] = frozenset().union(*(equal or composed))
    return texts, paths


def generate_dspy(seed: int) -> Program:
    """A random DSPy program (see the module docstring), by seed."""
    rng = random.Random(seed)
    tokens = _Tokens(rng)
    mode = rng.choice((*DSPY_MODES, "batch"))
    words = rng.sample(_LEXICON, rng.randint(2, 4))
    collide = rng.random() < 0.3
    predictors: dict[str, _Predictor] = {}

    def predictor(inputs: tuple[str, ...]) -> str:
        name = "abcd"[len(predictors)]
        predictors[name] = _Predictor(
            name,
            tokens.new("mk"),
            inputs,
            cot=rng.random() < 0.3,
            distinct=not collide and rng.random() < 0.7,
        )
        return name

    def on_message(out: str) -> _Call:
        return _Call(out, predictor(("message",)), (("message", "message"),))

    kind = rng.choice(("single", "cond", "loop", "parallel", "two"))
    steps: list[_Step] = []
    produced: list[str] = []
    if kind == "single":
        steps.append(on_message("x1"))
        produced = ["x1"]
    elif kind == "cond":
        subset = frozenset(w for w in words if rng.random() < 0.5)
        steps.append(_If(subset, on_message("x1"), on_message("x1")))
        produced = ["x1"]
    elif kind == "loop":
        steps.append(_Loop("x1", predictor(("note",)), "note"))
    elif kind == "parallel":
        n = rng.choice((2, 2, 3))
        steps.append(_Par(tuple(on_message(f"x{k + 1}") for k in range(n))))
        produced = [f"x{k + 1}" for k in range(n)]
    else:
        steps += [on_message("x1"), on_message("x2")]
        produced = ["x1", "x2"]
    outputs: list[tuple[str, tuple[str, ...]]] = []
    if produced and rng.random() < 0.5:  # a second stage, fed by a prediction
        source = rng.choice(produced)
        inputs = ("label", "message") if rng.random() < 0.3 else ("label",)
        args = (("label", source),) + (
            (("message", "message"),) if len(inputs) > 1 else ()
        )
        steps.append(_Call("y", predictor(inputs), args))
        outputs.append(("answer", ("y",)))
    elif kind == "loop":
        outputs.append(("answer", ("x1",)))
    else:
        count = 2 if len(produced) > 1 and rng.random() < 0.3 else 1
        outputs.append(("answer", tuple(rng.sample(produced, count))))
    rest = [v for v in produced if all(v not in src for _, src in outputs)]
    if rest and rng.random() < 0.35:
        outputs.append(("extra", (rng.choice(rest),)))

    drafts = _drafts(rng, tokens, words, list(predictors))
    for p in predictors.values():
        rules = [_rule(k, v) for d in drafts for k, v in d.keys(p.name)]
        head = f"[{p.marker}] Label the note."
        p.instructions = " ".join([head, *rules]) if p.distinct else head
    names = tuple(name for name, _ in outputs)
    expected, paths = [], []
    for draft in drafts:
        texts, path = _dspy_model(predictors, steps, outputs, draft.message)
        expected.append(texts)
        paths.append(path)
    samples = _finish(rng, tokens, drafts, names, expected)
    delays = _sample_delays(
        rng, drafts, {p.name: p.marker for p in predictors.values()}
    )
    frozen_steps, frozen_outputs = tuple(steps), tuple(outputs)

    def build(bench: TracingBench) -> Any:
        built = {name: p.build() for name, p in predictors.items()}
        return _module_class()(built, frozen_steps, frozen_outputs)

    plan = "; ".join(step.describe() for step in steps)
    returns = ", ".join(f"{n}={' + '.join(src)}" for n, src in outputs)
    shape = (
        f"{' '.join(p.describe() for p in predictors.values())}: {plan}; "
        f"return {returns}"
    )
    return Program(
        seed=seed,
        framework="dspy",
        shape=shape,
        mode=mode,
        prompts={p.name: (p.marker,) for p in predictors.values()},
        samples=samples,
        outputs=names,
        paths=paths,
        delays=delays,
        build=build,
    )


def _dspy() -> Any:
    """``import dspy``, with LiteLLM reading its local cost map (no network)."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import dspy

    return dspy


# -- running and checking --------------------------------------------------------------


@dataclass
class Outcome:
    """The result of running one program: the problems found (empty when every
    gradient is where the ground truth says) and the time it took."""

    program: Program
    problems: list[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self) -> str:
        """The program, its problems and how to replay it."""
        lines = [self.program.describe()]
        lines += [f"  PROBLEM: {p}" for p in self.problems]
        seed, framework = self.program.seed, self.program.framework
        default = "langchain" if seed % 2 == 0 else "dspy"
        extra = "" if framework == default else f" --framework {framework}"
        command = f"python -m afnio.testing.programs --seed {seed}{extra} -v"
        lines.append(f"  replay: {command}")
        return "\n".join(lines)


def _excerpt(text: str, size: int = 220) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= size else text[: size - 3] + "...")


def _feedback_texts(param: Any) -> list[str]:
    texts = []
    for grad in param.grad or []:
        data = grad.data
        for text in data if isinstance(data, list) else [data]:
            if str(text).strip():
                texts.append(str(text).strip())
    return texts


@functools.cache
def _pointer_pattern() -> re.Pattern[str]:
    from afnio.autodiff.prompts import VARIABLE_IN_MESSAGE

    pattern = re.escape(VARIABLE_IN_MESSAGE)
    pattern = pattern.replace(re.escape("{index}"), r"(\d+)")
    return re.compile(pattern.replace(re.escape("{role}"), r'[^"]*'))


def _variable_text(prompt: world.ChatBackwardPrompt, text: str) -> str:
    """A ``<VARIABLE>``'s text; one that is a whole message of the conversation is
    shown as a pointer to it (``VARIABLE_IN_MESSAGE``): that message's text."""
    found = _pointer_pattern().fullmatch(text.strip())
    if found is not None and 0 < int(found[1]) <= len(prompt.messages):
        return prompt.messages[int(found[1]) - 1].text
    return text


def _chat_backward(body: Any) -> tuple[world.ChatBackwardPrompt, list[str]] | None:
    """A ChatCompletion backward request, parsed, with the simulator's answer."""
    if not isinstance(body, Mapping) or not isinstance(body.get("messages"), list):
        return None
    for message in body["messages"]:
        if not isinstance(message, Mapping) or message.get("role") != "user":
            continue
        text = world.message_text(message.get("content"))
        if all(tag in text for tag in _BACKWARD_TAGS[:2]) and "<VARIABLES" in text:
            prompt = world.ChatBackwardPrompt.parse(text)
            return prompt, world.chat_backward_gradients(prompt)
    return None


def check(
    program: Program,
    parameters: Mapping[str, Any],
    requests: Sequence[Any],
    texts: Mapping[str, Sequence[str]],
) -> list[str]:
    """The problems of one run (empty when the tracing was faithful).

    Args:
        program: the generated program and its ground truth.
        parameters: the traced program's Parameters by name, after ``backward()``.
        requests: the JSON bodies the simulator received during the run.
        texts: each output's text per sample, as the traced program returned them.
    """
    problems: list[str] = []
    owner = {m: name for name, markers in program.prompts.items() for m in markers}
    samples = program.samples

    # every generated prompt has exactly one Parameter per marker, and nothing else
    marker_of: dict[str, str] = {}
    for pname, param in parameters.items():
        found = [m for m in owner if m in str(param.data)]
        if len(found) == 1:
            marker_of[pname] = found[0]
        else:
            problems.append(
                f"Parameter {pname} holds {len(found)} generated prompt markers: "
                f"{_excerpt(str(param.data), 100)}"
            )
    for name, markers in program.prompts.items():
        for marker in markers:
            if marker not in marker_of.values():
                problems.append(
                    f"prompt {name} [{marker}] has no Parameter: the tracer did not "
                    "discover it"
                )

    # the outputs are the program's own (the generator's model of the simulator)
    for i, sample in enumerate(samples):
        for o in program.outputs:
            actual = texts[o][i] if i < len(texts[o]) else None
            if actual != sample.expected[o]:
                problems.append(
                    f"sample {i}'s output {o} is {actual!r}, not {sample.expected[o]!r}"
                )

    # each backward request: which sample it is about, which run it shows, where
    # its gradients go
    answered: list[tuple[str, int | None, str]] = []  # marker, sample, gradient
    for body in requests:
        parsed = _chat_backward(body)
        if parsed is None:
            continue
        prompt, gradients = parsed
        named = {
            (i, o)
            for i, s in enumerate(samples)
            for o in program.outputs
            if s.failing(o) and s.targets[o] in prompt.feedback
        }
        about = sorted({i for i, _ in named})
        user = "\n".join(m.text for m in prompt.messages if m.role in ("user", "human"))
        system = "\n".join(m.text for m in prompt.messages if m.role == "system")
        words = _words(user)
        runs = sorted(
            i for i, s in enumerate(samples) if any(_occurs(t, words) for t in s.tokens)
        )
        made_by = sorted({owner[m] for m in owner if m in system})
        for var, gradient in zip(prompt.variables, gradients, strict=True):
            markers = [m for m in owner if m in _variable_text(prompt, var.text)]
            if not var.trainable or not gradient.strip() or not markers:
                continue
            marker = markers[0]
            name = owner[marker]
            what = f"prompt {name} [{marker}]"
            answered.append((marker, about[0] if len(about) == 1 else None, gradient))
            if len(about) != 1:
                problems.append(
                    f"{what} got feedback naming the targets of samples {about} "
                    f"(exactly one expected): {_excerpt(prompt.feedback)}"
                )
            if set(runs) - set(about):
                problems.append(
                    f"{what}: the LM call of sample(s) {runs} (its conversation) got "
                    f"the feedback about sample(s) {about}: the runs and the samples "
                    f"are mismatched; feedback {_excerpt(prompt.feedback)}"
                )
            if name not in made_by:
                problems.append(
                    f"{what} is linked to an LM call made with the messages of "
                    f"prompt(s) {made_by}"
                )
            for i, o in sorted(named):
                if name not in program.may_reach(i, o):
                    problems.append(
                        f"{what} got feedback about sample {i}'s output {o}, whose "
                        f"path is {_names(program.may_reach(i, o))}: "
                        f"{_excerpt(gradient)}"
                    )

    # each failing sample's path got feedback about that sample
    got = {(m, i) for m, i, _ in answered}
    for i, sample in enumerate(samples):
        on_path = set().union(
            *(program.paths[i][o] for o in program.outputs if sample.failing(o))
        )
        for name in sorted(on_path):
            for marker in program.prompts[name]:
                if (marker, i) not in got:
                    problems.append(
                        f"prompt {name} [{marker}] is on the path of sample {i} "
                        f"but got no feedback about sample {i}"
                    )

    # the Parameters hold exactly the simulator's answers, and what they quote agrees
    for pname, param in parameters.items():
        marker = marker_of.get(pname)
        if marker is None:
            continue
        actual = Counter(_feedback_texts(param))
        wanted = Counter(g.strip() for m, _, g in answered if m == marker)
        if actual != wanted:
            extra = list((actual - wanted).elements())[:2]
            missing = list((wanted - actual).elements())[:2]
            problems.append(
                f"the gradients of prompt {owner[marker]} [{marker}] are not the "
                f"answers to the backward requests that asked about it: unexplained "
                f"{[_excerpt(t, 120) for t in extra]}, missing "
                f"{[_excerpt(t, 120) for t in missing]}"
            )
        for text in actual:
            quoted = {
                i
                for i, s in enumerate(samples)
                if any(s.targets[o] in text for o in program.outputs if s.failing(o))
                or f'mentions "{s.word}"' in text
            }
            for i in sorted(quoted):
                path = set().union(*(program.may_reach(i, o) for o in program.outputs))
                if owner[marker] not in path:
                    problems.append(
                        f"prompt {owner[marker]} [{marker}] holds a gradient about "
                        f"sample {i}, whose paths are {_names(path)}: {_excerpt(text)}"
                    )
    return list(dict.fromkeys(problems))  # each problem once, in order


def _is_tracing_warning(record: warnings.WarningMessage) -> bool:
    return any(cls.__name__ == "AfnioTracingWarning" for cls in record.category.__mro__)


@dataclass
class _Run:
    """What one run produced: the Parameters after ``backward()``, each output's
    texts per sample, and the problems found while running."""

    parameters: dict[str, Any]
    texts: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class TracingBench:
    """A live simulator with what generated programs need: afnio's backward model
    client, a LangChain chat model and a DSPy LM on it (built on first use), and one
    event loop for the async modes. A context manager; :meth:`run` runs a program.

    It sets afnio's backward model client (a process-wide setting) before each run.
    """

    def __init__(self) -> None:
        self.simulator = Simulator()
        self._backward: Any = None
        self._chat: Any = None
        self._http: Any = None  # the chat model's sync and async HTTP clients
        self._ahttp: Any = None
        self._lm: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __enter__(self) -> TracingBench:
        self.simulator.start()
        from afnio.models.openai import OpenAI

        self._backward = OpenAI(
            base_url=self.simulator.base_url, api_key="sk-test", max_retries=0
        )
        self._loop = asyncio.new_event_loop()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the clients and the loop, stop the simulator (idempotent)."""
        if self._http is not None:
            self._http.close()
        if self._loop is not None:
            if self._ahttp is not None:
                self._loop.run_until_complete(self._ahttp.aclose())
            self._loop.close()
            self._loop = None
        self._http = self._ahttp = None
        if self._backward is not None:
            self._backward.close()
            self._backward = None
        self._chat = self._lm = None
        self.simulator.stop()

    def chat_model(self) -> Any:
        """A ``ChatOpenAI`` on the simulator (one per bench; its HTTP clients are
        the bench's)."""
        if self._chat is None:
            import httpx
            from langchain_openai import ChatOpenAI

            self._http, self._ahttp = httpx.Client(), httpx.AsyncClient()
            self._chat = ChatOpenAI(
                model=SIMULATOR_MODEL,
                base_url=self.simulator.base_url,
                api_key="sk-test",  # type: ignore[arg-type]
                max_retries=0,
                http_client=self._http,
                http_async_client=self._ahttp,
            )
        return self._chat

    def dspy_lm(self) -> Any:
        """A ``dspy.LM`` on the simulator (DSPy's default engine, no cache)."""
        if self._lm is None:
            dspy = _dspy()
            self._lm = dspy.LM(
                f"openai/{SIMULATOR_MODEL}",
                api_base=self.simulator.base_url,
                api_key="sk-test",
                cache=False,
                num_retries=0,
                temperature=0,
            )
        return self._lm

    def use_backward_model(self) -> None:
        """Make the simulator afnio's backward model (a process-wide setting)."""
        import afnio

        afnio.set_backward_model_client(
            self._backward, completion_args={"model": SIMULATOR_MODEL}
        )

    def _await(self, awaitable: Any) -> Any:
        assert self._loop is not None, "use the bench as a context manager"
        return self._loop.run_until_complete(awaitable)

    def run(self, program: Program) -> Outcome:
        """Run ``program`` under its delays, evaluate, ``backward()``, and check."""
        start = time.perf_counter()
        sim = self.simulator
        sim.clear_delays()
        sim.reset_stats()
        for _, seconds, predicate in program.delays:
            sim.delay_when(predicate, seconds)
        self.use_backward_model()
        problems: list[str] = []
        result: _Run | None = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if program.framework == "langchain":
                    result = self._run_langchain(program)
                else:
                    result = self._run_dspy(program)
            except Exception as error:
                trace = "".join(traceback.format_exception(error)[-6:])
                problems.append(f"the run raised {error!r}\n{trace}")
        sim.clear_delays()
        for record in caught:
            if _is_tracing_warning(record):
                problems.append(
                    f"the tracer warned {record.category.__name__}: {record.message}"
                )
            else:  # not ours: let the caller's filters decide
                warnings.warn_explicit(
                    record.message, record.category, record.filename, record.lineno
                )
        if result is not None:
            problems += result.problems
            problems += check(program, result.parameters, sim.requests, result.texts)
        return Outcome(program, problems, time.perf_counter() - start)

    def _evaluate(
        self, program: Program, parameters: Any, outputs: Mapping[str, Any]
    ) -> _Run:
        """Exact-match each output (a batched Variable, or one Variable per sample)
        against its targets, then ``backward()`` once from every failing one."""
        from afnio import functional as F
        from afnio.autodiff import backward

        roots = []
        run = _Run(dict(parameters))
        for o in program.outputs:
            targets = [s.targets[o] for s in program.samples]
            value = outputs[o]
            failing = [s.failing(o) for s in program.samples]
            if not isinstance(value, list):  # batched
                run.texts[o] = [str(t) for t in value.data]
                pairs = [(value, targets)] if any(failing) else []
                what = f"the batched output {o}"
            else:
                run.texts[o] = [str(v.data) for v in value]
                rows = zip(value, targets, failing, strict=True)
                pairs = [(v, t) for v, t, f in rows if f]
                what = f"output {o} of a failing sample"
            for var, target in pairs:
                if not var.requires_grad:
                    run.problems.append(
                        f"{what} is not connected to any Parameter (the traced "
                        f"program returned a Variable outside the graph): "
                        f"{_excerpt(str(var.data), 80)}"
                    )
                    continue
                roots.append(F.exact_match_evaluator(var, target)[1])
        if roots:
            backward(roots)
        return run

    def _run_langchain(self, program: Program) -> _Run:
        from afnio_integrations.langchain import trace

        assert program.build is not None
        traced = trace(program.build(self), select=program.select)
        inputs = program.inputs()
        mode = program.mode
        out: Any
        if mode == "batch":
            out = traced.batch(inputs)
        elif mode == "abatch":
            out = self._await(traced.abatch(inputs))
        elif mode in ("invoke", "stream"):
            call = traced.invoke if mode == "invoke" else traced.stream
            out = [call(x) for x in inputs]
        else:
            acall = traced.ainvoke if mode == "ainvoke" else traced.astream

            async def gather() -> list[Any]:
                return list(await asyncio.gather(*(acall(x) for x in inputs)))

            out = self._await(gather())
        return self._evaluate(program, traced.named_parameters(), {"out": out})

    def _run_dspy(self, program: Program) -> _Run:
        from afnio_integrations.dspy import trace

        dspy = _dspy()
        assert program.build is not None
        traced = trace(program.build(self))
        rows = program.inputs()
        with dspy.context(lm=self.dspy_lm(), adapter=None):
            if program.mode == "batch":
                prediction = traced.batch(rows)
                outputs = {o: prediction[o] for o in program.outputs}
            else:
                if program.mode == "call":
                    predictions = [traced(**row) for row in rows]
                else:

                    async def gather() -> list[Any]:
                        calls = (traced.acall(**row) for row in rows)
                        return list(await asyncio.gather(*calls))

                    predictions = self._await(gather())
                outputs = {o: [p[o] for p in predictions] for o in program.outputs}
            return self._evaluate(program, traced.named_parameters(), outputs)


# -- command line ----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run generated programs and print each failure; the exit status is 1 when any
    program failed."""
    parser = argparse.ArgumentParser(
        prog="python -m afnio.testing.programs",
        description="Randomized differential test of afnio's LangChain and DSPy "
        "tracers against the simulator.",
    )
    parser.add_argument("--count", type=int, default=200, help="programs to run")
    parser.add_argument("--start", type=int, default=0, help="the first seed")
    parser.add_argument("--seed", type=int, help="run this one seed (replay)")
    parser.add_argument("--framework", choices=("langchain", "dspy"))
    parser.add_argument("-v", "--verbose", action="store_true", help="show each run")
    args = parser.parse_args(argv)
    seeds = (
        [args.seed]
        if args.seed is not None
        else range(args.start, args.start + args.count)
    )
    failures = 0
    start = time.perf_counter()
    with TracingBench() as bench:
        for seed in seeds:
            outcome = bench.run(generate(seed, args.framework))
            if not outcome.ok:
                failures += 1
                print(outcome.report(), flush=True)
            elif args.verbose:
                print(outcome.program.describe() + f"\n  ok in {outcome.seconds:.2f} s")
    elapsed = time.perf_counter() - start
    total = len(seeds)
    print(
        f"{total} programs, {failures} failed, {elapsed:.1f} s "
        f"({total / elapsed:.1f} programs/s)"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
