"""Randomized differential tests of afnio's tracer on LangGraph graphs and agents.

The companion of :mod:`afnio.testing.programs` (random LCEL chains and DSPy
programs) for what ``afnio_integrations.langchain.trace`` accepts since issue 19:
compiled LangGraph ``StateGraph`` graphs and ``langchain.agents.create_agent``
agents. Each seed builds a program whose **ground truth** is known by construction,
runs it traced under uneven latency, and compares the afnio graph the tracer built
with that truth, LM call by LM call.

* :func:`generate_graph` builds a :class:`GraphProgram`: a ``StateGraph`` of two to
  five nodes in layers (two nodes of a layer run in the same superstep: parallel
  fan-out), each node calling a small ``prompt | model | StrOutputParser()`` chain
  (the prompt found through the node function's closure, a prebuilt chain in its
  closure, or a module global of the function) on one or two state keys written by
  earlier nodes (or the input), and writing its own key; plain edges, joins,
  conditional edges (a router function reading the key the node just wrote) and a
  bounded cycle (a node looping on itself, counting in a ``round`` key, within the
  recursion limit). Models answer from a small pool, so equal texts land in
  different keys (the truth is by channel writes, not by value).
* :func:`generate_agent` builds an :class:`AgentProgram`: a ``create_agent`` agent
  with one to four ``@tool`` tools and a system prompt, driven by a scripted chat
  model that makes zero to three turns of (parallel) tool calls before its final
  answer; tools answer from a small pool too.

Both run on :class:`ScriptedChatModel`, a LangChain chat model (no network) that
answers from the program's script, sleeps a random few milliseconds per call (tools
too), and logs every call. A program is called in one of :data:`MODES` (several
samples at once in the batch and async modes).

**Ground truth** (:class:`Truth`), recorded while the program runs, per sample:
every LM call (``"<node>#<k>"``: the k-th call made in that node in the sample's
run) and, for each, the set of *terminals* its afnio node must depend on: walking
its ``grad_fn`` edges back, through every non-LM node, to the first Parameter
(``"param:<marker>"``), upstream LM call (``"call:<id>"``) or, in an agent, tool
result (``"tool:<name>@<id>"``, the result of the tool call that LM call ``<id>``
made; it depends on that call). For a graph:

* an LM call depends on its prompt's system Parameter and on what the node read
  for the prompt's variables: for each key, the last write to it by a node of an
  earlier superstep (LangGraph's channel semantics), never an equal text elsewhere;
* a node's write depends on its LM call, and, when a conditional edge chose the
  node, also on every write of the node that edge leaves from (the tracer's
  documented control link; routers read the key that node wrote, so it is the
  data the decision was made on);
* the traced output (``output_key``, or the whole final state) depends on the last
  write of the key (of each key).

``may`` widens ``must`` by the tracer's documented value rule for opaque functions
(a node function is one): when a node writes a text that a value it was given
(another key of its state) also holds, the tracer cannot tell them apart and links
both. Nothing else may be linked. For an agent the truth is exact: each model call
depends on the agent's system prompt, the description of every tool it was offered,
every earlier model call (its answer is in the conversation) and the result of
every tool call it saw; the output (the final answer) is the last model call.

:func:`check_graph` compares: every LM call the model made has exactly one afnio
node (none missing, none twice), each node's terminals lie between ``must`` and
``may``, and so do the output's.

From a shell: ``python -m afnio.testing.graph_programs --count 300`` runs seeds 0 to
299 of both kinds and prints each failure; ``--seed 17 --kind agent -v`` replays one.
Needs the ``agents`` extra (``langchain``, ``langgraph``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import re
import sys
import threading
import time
import traceback
import types
import warnings
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MODES",
    "AgentProgram",
    "GraphOutcome",
    "GraphProgram",
    "Recorder",
    "ScriptedChatModel",
    "Truth",
    "check_graph",
    "generate",
    "generate_agent",
    "generate_graph",
    "main",
    "run_program",
    "terminals",
]

MODES = ("invoke", "ainvoke", "stream", "batch", "abatch")
"""How a generated program is called: ``invoke``/``stream`` one sample after the
other; ``ainvoke`` gathered on one event loop; ``batch``/``abatch`` all at once."""

SAMPLE_KEY = "afnio_differential_sample"
"""Run metadata naming the sample a call belongs to (the scripted model reads it)."""

_CONSONANTS = "bcdfghjkmnpqrstvwxz"
_POOL = ("positive", "negative", "neutral")  # shared answers: equal texts collide
_MARKER = re.compile(r"\[(mk[a-z]+)\]")


def _token(rng: random.Random, taken: set[str], prefix: str) -> str:
    """A unique token of consonants (never an English word, never a substring of
    another token)."""
    while True:
        token = prefix + "".join(rng.choice(_CONSONANTS) for _ in range(6))
        if not any(token in t or t in token for t in taken):
            taken.add(token)
            return token


# -- the scripted chat model -----------------------------------------------------------


@dataclass
class LoggedCall:
    """One call the scripted model answered."""

    sample: int
    call_id: str
    contents: tuple[str, ...]  # the messages' texts, in order
    output: str
    tool_calls: bool = False  # the answer made tool calls


class Recorder:
    """What a program's run did, per sample: the LM calls (with their ground
    truth), the writes to each state key, the routers' decisions. Thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.calls: list[LoggedCall] = []
        self.counts: Counter[tuple[int, str]] = Counter()
        self.last_call: dict[tuple[int, str], str] = {}
        self.truth: dict[int, Truth] = {}
        # graphs: (sample, key) -> [(step, must, may, text)]
        self.writes: dict[tuple[int, str], list[tuple[int, frozenset, frozenset, str]]]
        self.writes = {}
        # graphs: (sample, node, step) -> {key: (must, may) of that write}
        self.written: dict[
            tuple[int, str, int], dict[str, tuple[frozenset[str], frozenset[str]]]
        ] = {}
        self.decisions: dict[tuple[int, str, int], tuple[str, ...]] = {}
        self.problems: list[str] = []

    def of(self, sample: int) -> Truth:
        with self.lock:
            return self.truth.setdefault(sample, Truth())

    def new_call(self, sample: int, site: str) -> str:
        with self.lock:
            k = self.counts[(sample, site)]
            self.counts[(sample, site)] += 1
            call_id = f"{site}#{k}"
            self.last_call[(sample, site)] = call_id
            return call_id


@dataclass
class Truth:
    """The ground truth of one sample's run: each LM call's terminals (``must``:
    its real dataflow; ``may``: ``must`` plus what the documented value rules may
    add), and the output's."""

    must: dict[str, frozenset[str]] = field(default_factory=dict)
    may: dict[str, frozenset[str]] = field(default_factory=dict)
    output_must: frozenset[str] = frozenset()
    output_may: frozenset[str] = frozenset()
    output_text: str | None = None  # the output's text (None: not checked)


def _scripted_model_class() -> type:
    """:class:`ScriptedChatModel` (built on first use: LangChain is optional)."""
    from langchain_core.language_models import BaseChatModel
    from langchain_core.outputs import ChatGeneration, ChatResult
    from langchain_core.utils.function_calling import convert_to_openai_tool

    class _ScriptedChatModel(BaseChatModel):
        """A chat model answering from a script: ``script(sample, messages,
        tools, metadata) -> (AIMessage, call_id, delay)``. Sleeps ``delay``
        seconds (the uneven latency), logs each call in ``recorder``."""

        script: Any
        recorder: Any

        @property
        def _llm_type(self) -> str:
            return "afnio-scripted"

        def _answer(self, messages: list[Any], run_manager: Any, kw: dict) -> Any:
            metadata = dict(getattr(run_manager, "metadata", None) or {})
            sample = int(metadata.get(SAMPLE_KEY, 0))
            message, call_id, delay = self.script(
                sample, messages, kw.get("tools") or [], metadata
            )
            contents = tuple(_message_text(m) for m in messages)
            text = _message_text(message)
            with self.recorder.lock:
                self.recorder.calls.append(
                    LoggedCall(
                        sample,
                        call_id,
                        contents,
                        text,
                        bool(getattr(message, "tool_calls", None)),
                    )
                )
            return message, delay

        def _generate(
            self,
            messages: list[Any],
            stop: Any = None,
            run_manager: Any = None,
            **kwargs: Any,
        ) -> Any:
            message, delay = self._answer(messages, run_manager, kwargs)
            time.sleep(delay)
            return ChatResult(generations=[ChatGeneration(message=message)])

        async def _agenerate(
            self,
            messages: list[Any],
            stop: Any = None,
            run_manager: Any = None,
            **kwargs: Any,
        ) -> Any:
            message, delay = self._answer(messages, run_manager, kwargs)
            await asyncio.sleep(delay)
            return ChatResult(generations=[ChatGeneration(message=message)])

        def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:
            kwargs.pop("tool_choice", None)
            kwargs.pop("parallel_tool_calls", None)
            return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    _ScriptedChatModel.__name__ = "ScriptedChatModel"
    return _ScriptedChatModel


@functools.cache
def _model_class() -> type:
    return _scripted_model_class()


def ScriptedChatModel(script: Callable[..., Any], recorder: Recorder) -> Any:
    """A LangChain chat model answering from ``script`` (see the module docstring)."""
    return _model_class()(script=script, recorder=recorder)


def _message_text(message: Any) -> str:
    """A message's text as the tracer shows it (tool calls as JSON after it)."""
    content = getattr(message, "content", "")
    if isinstance(content, list):
        text = "\n".join(
            p.get("text", "") if isinstance(p, dict) else str(p) for p in content
        )
    else:
        text = str(content or "")
    calls = getattr(message, "tool_calls", None)
    if calls:
        shown = json.dumps(
            [{"name": c.get("name"), "args": c.get("args")} for c in calls],
            default=str,
            ensure_ascii=False,
        )
        return f"{text}\n{shown}" if text else shown
    return text


# -- programs --------------------------------------------------------------------------


@dataclass
class _Program(ABC):
    """What a generated graph or agent program shares (abstract: see
    :class:`GraphProgram` and :class:`AgentProgram`)."""

    seed: int
    kind: str
    shape: str
    mode: str
    samples: int
    markers: dict[str, str]  # marker -> what it marks (node prompt, tool, system)
    recorder: Recorder = field(default_factory=Recorder, repr=False)
    build: Callable[[], Any] = field(repr=False, default=lambda: None)
    output_key: str | None = None
    select: Any = None

    @abstractmethod
    def inputs(self) -> list[Any]:
        """The program's inputs, one per sample."""

    def describe(self) -> str:
        return (
            f"seed {self.seed} ({self.kind}, {self.mode}, {self.samples} "
            f"sample(s)): {self.shape}"
        )


@dataclass
class GraphProgram(_Program):
    """A generated ``StateGraph`` program (see :func:`generate_graph`)."""

    keys: tuple[str, ...] = ()
    questions: tuple[str, ...] = ()

    def inputs(self) -> list[Any]:
        rows = []
        for q in self.questions:
            row = {k: "" for k in self.keys}
            row["q"] = q
            row["round"] = "r"
            rows.append(row)
        return rows


@dataclass
class AgentProgram(_Program):
    """A generated ``create_agent`` program (see :func:`generate_agent`)."""

    questions: tuple[str, ...] = ()

    def inputs(self) -> list[Any]:
        return [{"messages": [{"role": "user", "content": q}]} for q in self.questions]


def _current_step() -> tuple[int, int, str]:
    """The running node's (sample, superstep, node name), from its config."""
    from langgraph.config import get_config

    metadata = get_config().get("metadata") or {}
    return (
        int(metadata.get(SAMPLE_KEY, 0)),
        int(metadata["langgraph_step"]),
        str(metadata["langgraph_node"]),
    )


def _read(
    recorder: Recorder, sample: int, step: int, key: str
) -> tuple[frozenset[str], frozenset[str]]:
    """The terminals of what a node at superstep ``step`` read as ``key``: the last
    write to it by a node of an earlier superstep (the input: nothing)."""
    with recorder.lock:
        earlier = [w for w in recorder.writes.get((sample, key), []) if w[0] < step]
    if not earlier:
        return frozenset(), frozenset()
    _, must, may, _ = earlier[-1]
    return must, may


class _NodeHook:
    """Records, in a graph node, the ground truth of its LM call and its writes."""

    def __init__(
        self,
        recorder: Recorder,
        marker: str,
        key: str,
        reads: tuple[str, ...],
        sources: tuple[str, ...],
        counts_rounds: bool,
    ) -> None:
        self.recorder = recorder
        self.marker = marker
        self.key = key
        self.reads = reads
        self.sources = sources  # nodes with a conditional edge that may choose it
        self.counts_rounds = counts_rounds

    def __call__(self, state: dict[str, Any], answer: str) -> dict[str, Any]:
        rec = self.recorder
        sample, step, node = _current_step()
        truth = rec.of(sample)
        with rec.lock:
            call = rec.last_call[(sample, node)]
        must: set[str] = {f"param:{self.marker}"}
        may: set[str] = set(must)
        for key in self.reads:
            read_must, read_may = _read(rec, sample, step, key)
            must |= read_must
            may |= read_may
        with rec.lock:
            truth.must[call] = frozenset(must)
            truth.may[call] = frozenset(may)
        # the write: the call, and the deciders' writes when a conditional edge
        # chose this node (the tracer's documented control link)
        w_must: set[str] = {f"call:{call}"}
        w_may: set[str] = set(w_must)
        for source in self.sources:
            with rec.lock:
                chose = rec.decisions.get((sample, source, step - 1), ())
                decided = dict(rec.written.get((sample, source, step - 1), {}))
            if node in chose:
                for d_must, d_may in decided.values():
                    w_must |= d_must
                    w_may |= d_may
        control = (frozenset(w_must - {f"call:{call}"}), frozenset(w_may - w_must))
        for key, value in state.items():
            if isinstance(value, str) and value and value == answer:
                w_may |= _read(rec, sample, step, key)[1]
        update = {self.key: answer}
        with rec.lock:
            rec.writes.setdefault((sample, self.key), []).append(
                (step, frozenset(w_must), frozenset(w_may), answer)
            )
            rec.written.setdefault((sample, node, step), {})[self.key] = (
                frozenset(w_must),
                frozenset(w_may),
            )
        if self.counts_rounds:
            rounds = str(state.get("round", "r")) + "I"
            update["round"] = rounds
            with rec.lock:
                # a counter computed from the old one (a constant): no terminals,
                # but the deciders' writes when a conditional edge chose the node
                c_must, c_may = control[0], control[0] | control[1]
                rec.writes.setdefault((sample, "round"), []).append(
                    (step, c_must, c_may, rounds)
                )
                rec.written[(sample, node, step)]["round"] = (c_must, c_may)
        return update


def _closure_node(prompt: Any, llm: Any, hook: _NodeHook, whole: bool) -> Callable:
    """A node function holding its prompt in its closure."""
    from langchain_core.output_parsers import StrOutputParser

    reads = hook.reads

    def node(state: dict[str, Any]) -> dict[str, Any]:
        chain = prompt | llm | StrOutputParser()
        given = state if whole else {k: state[k] for k in reads}
        return hook(state, chain.invoke(given))

    return node


def _chain_node(chain: Any, hook: _NodeHook, whole: bool) -> Callable:
    """A node function holding a prebuilt chain in its closure."""
    reads = hook.reads

    def node(state: dict[str, Any]) -> dict[str, Any]:
        given = state if whole else {k: state[k] for k in reads}
        return hook(state, chain.invoke(given))

    return node


def _global_node_template(state: dict[str, Any]) -> dict[str, Any]:
    """Cloned with its own globals: ``PROMPT``, ``LLM``, ``PARSER``, ``HOOK``."""
    chain = PROMPT | LLM | PARSER()  # type: ignore[name-defined] # noqa: F821
    return HOOK(state, chain.invoke(state))  # type: ignore[name-defined] # noqa: F821


def _global_node(prompt: Any, llm: Any, hook: _NodeHook, name: str) -> Callable:
    """A node function finding its prompt through a module global."""
    from langchain_core.output_parsers import StrOutputParser

    namespace = {
        "__name__": f"afnio_generated_{name}",
        "__builtins__": __builtins__,
        "PROMPT": prompt,
        "LLM": llm,
        "PARSER": StrOutputParser,
        "HOOK": hook,
    }
    code = _global_node_template.__code__
    return types.FunctionType(code, namespace, name)


def _router(
    recorder: Recorder,
    source: str,
    key: str,
    table: dict[str, str],
    default: str,
    loop: tuple[str, int] | None,
) -> Callable:
    """A conditional edge's function: reads the key its node wrote (and the
    ``round`` counter, for a loop); records what it chose."""

    def route(state: dict[str, Any]) -> str:
        sample, step, _ = _current_step()
        if loop is not None and str(state.get("round", "r")).count("I") < loop[1]:
            chosen = loop[0]
        else:
            chosen = table.get(str(state.get(key, "")), default)
        with recorder.lock:
            recorder.decisions[(sample, source, step)] = (chosen,)
        return chosen

    route.__name__ = f"route_{source}"
    return route


def generate_graph(seed: int) -> GraphProgram:
    """A random ``StateGraph`` program (see the module docstring)."""
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate

    rng = random.Random(f"graph-{seed}")
    taken: set[str] = set()
    recorder = Recorder()
    n = rng.randint(2, 5)
    names = [f"n{i}" for i in range(n)]
    # layers: 1 or 2 nodes each (2: the same superstep, parallel fan-out)
    layers: list[list[str]] = []
    i = 0
    while i < n:
        width = 2 if i + 1 < n and rng.random() < 0.45 else 1
        layers.append(names[i : i + width])
        i += width
    layer_of = {name: k for k, layer in enumerate(layers) for name in layer}
    keys = {name: f"k_{name}" for name in names}
    markers: dict[str, str] = {}
    marker_of: dict[str, str] = {}
    for name in names:
        marker = _token(rng, taken, "mk")
        markers[marker] = f"prompt of node {name}"
        marker_of[name] = marker
    # which node loops (a bounded cycle on itself)
    looping = rng.choice(names) if rng.random() < 0.5 else None
    loops = rng.randint(1, 2)
    # edges
    shape: list[str] = []
    edges: list[tuple[str, str]] = []  # plain
    joins: list[tuple[list[str], str]] = []
    conditionals: dict[str, tuple[dict[str, str], str, list[str]]] = {}
    for name in layers[0]:
        edges.append(("__start__", name))
    for k in range(len(layers) - 1):
        here, there = layers[k], layers[k + 1]
        if (len(there) == 2 and rng.random() < 0.7) or rng.random() < 0.25:
            # a conditional edge from one node choosing one of two (or: the next
            # node, or the end)
            source = rng.choice(here)
            if source == looping:
                looping = None
            choices = list(there) if len(there) == 2 else [there[0], "__end__"]
            conditionals[source] = ({}, "", choices)
            for other in here:
                if other != source:
                    edges.append((other, rng.choice(there)))
        else:
            for target in there:
                preds = [p for p in here if rng.random() < 0.7] or [rng.choice(here)]
                if len(preds) == 2 and rng.random() < 0.5:
                    joins.append((preds, target))
                else:
                    edges.extend((p, target) for p in preds)
            for p in here:  # every node leads on
                if not any(a == p for a, _ in edges) and not any(
                    p in ps for ps, _ in joins
                ):
                    edges.append((p, rng.choice(there)))
    for name in layers[-1]:
        if name not in conditionals:
            edges.append((name, "__end__"))
    # reads: one or two keys written by earlier layers (or the input q)
    reads: dict[str, tuple[str, ...]] = {}
    for name in names:
        earlier = [keys[m] for m in names if layer_of[m] < layer_of[name]]
        if name == looping:
            earlier.append(keys[name])  # its own previous answer
        pool = ["q", *earlier]
        count = min(len(pool), rng.choice((1, 2)))
        chosen = rng.sample(pool, count)
        if earlier and not any(c != "q" for c in chosen) and rng.random() < 0.7:
            chosen[-1] = rng.choice(earlier)
        reads[name] = tuple(dict.fromkeys(chosen))
    # answers: per (node, call) from a small shared pool or a unique token
    answer_rng_seed = rng.random()
    unique_rate = rng.choice((0.2, 0.5))

    def script(
        sample: int, messages: list[Any], tools: list[Any], metadata: dict
    ) -> tuple[Any, str, float]:
        from langchain_core.messages import AIMessage

        node = str(metadata.get("langgraph_node", "?"))
        call_id = recorder.new_call(sample, node)
        r = random.Random(f"{answer_rng_seed}-{sample}-{call_id}")
        contents = tuple(_message_text(m) for m in messages)
        with recorder.lock:  # (conversation, answer) unique per node and sample
            used = {
                c.output
                for c in recorder.calls
                if c.sample == sample
                and c.call_id.split("#")[0] == node
                and c.contents == contents
            }
        if r.random() < unique_rate:
            text = f"tok{r.choice(_CONSONANTS)}{sample}{call_id.replace('#', 'x')}"
        else:
            text = r.choice(_POOL)
        if text in used:
            text = f"tok{sample}{call_id.replace('#', 'x')}"
        return AIMessage(text), call_id, r.uniform(0, 0.012)

    llm = ScriptedChatModel(script, recorder)
    styles: dict[str, str] = {}
    sources_of: dict[str, list[str]] = {}
    for source, (_, _, choices) in conditionals.items():
        for c in choices:
            if c != "__end__":
                sources_of.setdefault(c, []).append(source)
    if looping is not None:
        sources_of.setdefault(looping, []).append(looping)
        after = [t for s, t in edges if s == looping]
        exit_to = after[0] if after else "__end__"
        edges = [(s, t) for s, t in edges if s != looping]
        if exit_to != "__end__":
            sources_of.setdefault(exit_to, []).append(looping)
    for name in names:
        styles[name] = rng.choice(("closure", "chain", "global", "closure-whole"))
    samples = rng.choice((1, 2, 3))
    questions = tuple(
        f"Note {_token(rng, taken, 'q')} about {_token(rng, taken, 'w')}"
        for _ in range(samples)
    )
    mode = rng.choice(MODES)
    output_key = rng.choice([keys[m] for m in layers[-1]] + [None])
    # routers' tables (decided now, so the program is a pure function of the seed)
    tables = {
        source: (
            {p: rng.choice(choices) for p in _POOL},
            rng.choice(choices),
        )
        for source, (_, _, choices) in conditionals.items()
    }
    shape.append(
        "layers "
        + " | ".join(
            "+".join(f"{m}[{styles[m]} reads {','.join(reads[m])}]" for m in layer)
            for layer in layers
        )
    )
    if conditionals:
        shape.append(
            "conditional "
            + ", ".join(f"{s}->{{{'/'.join(c[2])}}}" for s, c in conditionals.items())
        )
    if joins:
        shape.append("joins " + ", ".join(f"{ps}->{t}" for ps, t in joins))
    if looping is not None:
        shape.append(f"cycle {looping} x{loops}")
    shape.append(f"output {output_key or 'whole state'}")

    def build() -> Any:
        from typing import TypedDict

        from langgraph.graph import END, START, StateGraph

        state_type = TypedDict(  # type: ignore[misc]
            "GeneratedState",
            {"q": str, "round": str, **{keys[m]: str for m in names}},
            total=False,
        )
        graph = StateGraph(state_type)
        for name in names:
            prompt = ChatPromptTemplate.from_messages(
                [
                    ("system", f"[{marker_of[name]}] Answer for node {name}."),
                    ("human", " / ".join("{" + r + "}" for r in reads[name])),
                ]
            )
            hook = _NodeHook(
                recorder,
                marker_of[name],
                keys[name],
                reads[name],
                tuple(sources_of.get(name, ())),
                counts_rounds=name == looping,
            )
            style = styles[name]
            if style == "closure":
                fn = _closure_node(prompt, llm, hook, whole=False)
            elif style == "closure-whole":
                fn = _closure_node(prompt, llm, hook, whole=True)
            elif style == "chain":
                chain = prompt | llm | StrOutputParser()
                fn = _chain_node(chain, hook, whole=rng.random() < 0.5)
            else:
                fn = _global_node(prompt, llm, hook, f"node_{name}")
            graph.add_node(name, fn)
        fix = {"__start__": START, "__end__": END}
        for a, b in dict.fromkeys(edges):
            graph.add_edge(fix.get(a, a), fix.get(b, b))
        for preds, target in joins:
            graph.add_edge(preds, target)
        for source, (_, _, choices) in conditionals.items():
            table, default = tables[source]
            route = _router(recorder, source, keys[source], table, default, None)
            graph.add_conditional_edges(source, route, choices)
        if looping is not None:
            after_loop = exit_target
            route = _router(
                recorder, looping, keys[looping], {}, after_loop, (looping, loops)
            )
            graph.add_conditional_edges(
                looping, route, [looping, fix.get(after_loop, after_loop)]
            )
        return graph.compile()

    exit_target = "__end__"
    if looping is not None:
        exit_target = exit_to  # type: ignore[possibly-undefined]
    build_rng_state = rng.getstate()

    def build_fresh() -> Any:
        rng.setstate(build_rng_state)
        return build()

    program = GraphProgram(
        seed=seed,
        kind="graph",
        shape="; ".join(shape),
        mode=mode,
        samples=samples,
        markers=markers,
        recorder=recorder,
        build=build_fresh,
        output_key=output_key,
        keys=tuple(keys[m] for m in names),
        questions=questions,
    )
    return program


def _tool_function(name: str, doc: str, result: str, delay: float) -> Callable:
    """A tool's function: sleeps ``delay`` seconds, answers ``result``."""

    def run_tool(query: str) -> str:
        time.sleep(delay)
        return result

    run_tool.__name__ = name
    run_tool.__doc__ = doc
    return run_tool


def generate_agent(seed: int) -> AgentProgram:
    """A random ``create_agent`` program (see the module docstring)."""
    rng = random.Random(f"agent-{seed}")
    taken: set[str] = set()
    recorder = Recorder()
    n_tools = rng.randint(1, 4)
    tool_names = [f"t_{_token(rng, taken, 'x')}" for _ in range(n_tools)]
    markers: dict[str, str] = {}
    system_marker = _token(rng, taken, "mk")
    markers[system_marker] = "agent system prompt"
    tool_marker: dict[str, str] = {}
    arg_marker: dict[str, str] = {}
    with_args = rng.random() < 0.3  # select="all": argument descriptions too
    for name in tool_names:
        tool_marker[name] = _token(rng, taken, "mk")
        markers[tool_marker[name]] = f"description of {name}"
        if with_args:
            arg_marker[name] = _token(rng, taken, "mk")
            markers[arg_marker[name]] = f"argument of {name}"
    results = {
        name: rng.choice((*_POOL, f"res{_token(rng, taken, 'z')}"))
        for name in tool_names
    }
    tool_delays = {name: rng.uniform(0, 0.01) for name in tool_names}
    samples = rng.choice((1, 2, 3))
    questions = tuple(
        f"Note {_token(rng, taken, 'q')} about {_token(rng, taken, 'w')}"
        for _ in range(samples)
    )
    # each sample's script: turns of distinct tools (parallel calls), then answers
    turns: list[list[list[str]]] = []
    for _ in range(samples):
        count = rng.choice((0, 1, 1, 2, 3))
        turns.append(
            [
                rng.sample(tool_names, rng.randint(1, min(2, n_tools)))
                for _ in range(count)
            ]
        )
    finals = [rng.choice((*_POOL, f"ans{_token(rng, taken, 'y')}")) for _ in turns]
    delays = [[rng.uniform(0, 0.012) for _ in range(len(t) + 1)] for t in turns]
    offered = {f"param:{tool_marker[n]}" for n in tool_names}
    if with_args:
        offered |= {f"param:{arg_marker[n]}" for n in tool_names}

    def script(
        sample: int, messages: list[Any], tools: list[Any], metadata: dict
    ) -> tuple[Any, str, float]:
        from langchain_core.messages import AIMessage

        call_id = recorder.new_call(sample, "model")
        j = int(call_id.split("#")[1])
        plan = turns[sample]
        must = {f"param:{system_marker}", *offered}
        for i in range(j):
            must.add(f"call:model#{i}")
            if i < len(plan):
                must |= {f"tool:{t}@model#{i}" for t in plan[i]}
        truth = recorder.of(sample)
        with recorder.lock:
            truth.must[call_id] = truth.may[call_id] = frozenset(must)
            if j >= len(plan):
                truth.output_must = truth.output_may = frozenset({f"call:{call_id}"})
                truth.output_text = finals[sample]
        delay = delays[sample][min(j, len(plan))]
        if j < len(plan):
            calls = [
                {
                    "name": t,
                    "args": {"query": questions[sample]},
                    "id": f"call_{seed}_{sample}_{j}_{i}",
                    "type": "tool_call",
                }
                for i, t in enumerate(plan[j])
            ]
            return AIMessage("", tool_calls=calls), call_id, delay
        return AIMessage(finals[sample]), call_id, delay

    shape = (
        f"agent with tools {tool_names} (results {list(results.values())})"
        f"{' and argument descriptions' if with_args else ''}; turns "
        + "; ".join(
            f"sample {s}: {' then '.join('+'.join(t) for t in plan) or 'no tool'}"
            f" -> {finals[s]}"
            for s, plan in enumerate(turns)
        )
    )

    def build() -> Any:
        from langchain.agents import create_agent
        from langchain_core.tools import tool

        tools = []
        for name in tool_names:
            doc = f"[{tool_marker[name]}] Look the query up in {name}."
            if with_args:
                doc += f"\n\nArgs:\n    query: [{arg_marker[name]}] what to look up."
            fn = _tool_function(name, doc, results[name], tool_delays[name])
            tools.append(tool(name, parse_docstring=with_args)(fn))
        llm = ScriptedChatModel(script, recorder)
        return create_agent(
            llm, tools=tools, system_prompt=f"[{system_marker}] Use the tools."
        )

    return AgentProgram(
        seed=seed,
        kind="agent",
        shape=shape,
        mode=rng.choice(MODES),
        samples=samples,
        markers=markers,
        recorder=recorder,
        build=build,
        select="all" if with_args else None,
        questions=questions,
    )


def generate(seed: int, kind: str | None = None) -> GraphProgram | AgentProgram:
    """The program of ``seed``: a graph for an even seed, an agent for an odd one
    (unless ``kind`` is ``"graph"`` or ``"agent"``)."""
    if kind is None:
        kind = "graph" if seed % 2 == 0 else "agent"
    if kind == "graph":
        return generate_graph(seed)
    if kind == "agent":
        return generate_agent(seed)
    raise ValueError(f"kind must be 'graph', 'agent' or None, got {kind!r}")


# -- reading the afnio graph -----------------------------------------------------------


def _is_call(node: Any) -> bool:
    from afnio_integrations._recorded import RecordedChatCall

    cls = getattr(node, "_forward_cls", None)
    return isinstance(cls, type) and issubclass(cls, RecordedChatCall)


def _tool_step(node: Any) -> str | None:
    """The tool name of a tool result's node (a ``StepOutput`` named
    ``"<tool> tool"``)."""
    step = getattr(node, "step", None)
    if isinstance(step, str) and step.endswith(" tool"):
        return step[: -len(" tool")]
    return None


def _edges(node: Any) -> list[Any]:
    return [e.node for e in getattr(node, "next_functions", ()) if e.node is not None]


def _contents(node: Any) -> tuple[str, ...]:
    return tuple(m["content"] for m in node.conversation if m.get("role") != "tools")


def _is_tool_call_output(text: str) -> bool:
    try:
        data = json.loads(text)
    except (ValueError, TypeError):
        return False
    return isinstance(data, list) and all(
        isinstance(d, dict) and "id" in d and "name" in d for d in data
    )


def _call_key(contents: tuple[str, ...], output: str, tool_calls: bool) -> tuple:
    return (contents, "<tool calls>" if tool_calls else output)


class _Identify:
    """Names afnio's LM call nodes after the model's log (a node is the call with
    its conversation and answer)."""

    def __init__(self, log: Sequence[LoggedCall]) -> None:
        self.by_key: dict[tuple, list[LoggedCall]] = {}
        for call in log:
            key = _call_key(call.contents, call.output, call.tool_calls)
            self.by_key.setdefault(key, []).append(call)

    def key(self, node: Any) -> tuple:
        return _call_key(
            _contents(node), node.output, _is_tool_call_output(node.output)
        )

    def name(self, node: Any, sample: int | None) -> str | None:
        found = [
            c
            for c in self.by_key.get(self.key(node), ())
            if sample is None or c.sample == sample
        ]
        names = {(c.sample, c.call_id) for c in found}
        return next(iter(names))[1] if len(names) == 1 else None


def terminals(
    starts: Sequence[Any],
    name_of: Callable[[Any], str | None],
    marker_of: Callable[[Any], str],
) -> frozenset[str]:
    """The terminals the grad_fn nodes ``starts`` lead to: walking the edges,
    through every non-LM node, to Parameters (``param:<marker>``), LM calls
    (``call:<id>``) and tool results (``tool:<name>@<id>``)."""
    found: set[str] = set()
    stack = list(starts)
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None and not hasattr(node, "_forward_cls"):
            found.add(f"param:{marker_of(variable)}")
        elif _is_call(node):
            found.add(f"call:{name_of(node) or '?'}")
        elif (tool := _tool_step(node)) is not None:
            makers = [n for n in _edges(node) if _is_call(n)]
            maker = name_of(makers[0]) if len(makers) == 1 else None
            found.add(f"tool:{tool}@{maker or '?'}")
        else:
            stack.extend(_edges(node))
    return frozenset(found)


def _marker(variable: Any) -> str:
    match = _MARKER.search(str(variable.data))
    return match[1] if match else f"<unmarked {str(variable.data)[:40]!r}>"


# -- checking --------------------------------------------------------------------------


def _names(items: frozenset[str] | set[str]) -> str:
    return "{" + ", ".join(sorted(items)) + "}"


def check_graph(
    program: GraphProgram | AgentProgram,
    outputs: Sequence[Any],
    created: Sequence[Any],
) -> list[str]:
    """Problems with the traced graph of ``program``: ``outputs`` are the traced
    output Variables (one per sample, ``None`` for one outside the graph),
    ``created`` every LM call node the tracer made (see the module docstring)."""
    rec = program.recorder
    problems: list[str] = []
    ident = _Identify(rec.calls)
    logged = Counter(_call_key(c.contents, c.output, c.tool_calls) for c in rec.calls)
    made = Counter(ident.key(node) for node in created)
    for key in sorted(set(logged) | set(made), key=str):
        if made[key] < logged[key]:
            problems.append(
                f"an LM call has no afnio node ({logged[key]} made, {made[key]} "
                f"traced): {_excerpt(key)}"
            )
        elif made[key] > logged[key]:
            problems.append(
                f"an LM call has {made[key]} afnio nodes ({logged[key]} made): "
                f"{_excerpt(key)}"
            )
    checked: set[tuple[int, str]] = set()

    def verify(node: Any, sample: int | None) -> None:
        name = ident.name(node, sample)
        if name is None:
            if sample is not None:
                problems.append(
                    f"sample {sample}: an afnio LM call node matches no single LM "
                    f"call of the model's log: {_excerpt(ident.key(node))}"
                )
            return
        if sample is None:
            owners = {c.sample for c in ident.by_key[ident.key(node)]}
            sample = next(iter(owners))
        if (sample, name) in checked:
            return
        checked.add((sample, name))
        truth = rec.of(sample)
        if name not in truth.must:
            problems.append(f"sample {sample}: {name} has no ground truth recorded")
            return

        def label(n: Any) -> str | None:
            return ident.name(n, sample)

        got = terminals(_edges(node), label, _marker)
        must, may = truth.must[name], truth.may[name]
        if not must <= got or not got <= may:
            problems.append(
                f"sample {sample}: LM call {name} depends on {_names(got)}; the "
                f"truth is {_names(must)}"
                + (f" (may add {_names(may - must)})" if may != must else "")
                + (f"; missing {_names(must - got)}" if must - got else "")
                + (f"; not allowed {_names(got - may)}" if got - may else "")
            )

    for sample, var in enumerate(outputs):
        truth = rec.of(sample)
        node = getattr(var, "grad_fn", None) if var is not None else None

        def label(n: Any, sample: int = sample) -> str | None:
            return ident.name(n, sample)

        got = terminals([node] if node is not None else [], label, _marker)
        text = None if var is None else str(var.data)
        if truth.output_text is not None and text != truth.output_text:
            problems.append(
                f"sample {sample}: the output's text is {_excerpt(text)}, the "
                f"program's output is {truth.output_text!r}"
            )
        if not truth.output_must <= got or not got <= truth.output_may:
            problems.append(
                f"sample {sample}: the output depends on {_names(got)}; the truth is "
                f"{_names(truth.output_must)}"
                + (
                    f" (may add {_names(truth.output_may - truth.output_must)})"
                    if truth.output_may != truth.output_must
                    else ""
                )
            )
        stack = [node] if node is not None else []
        seen: set[int] = set()
        while stack:  # every LM call node reachable from the output
            current = stack.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            if _is_call(current):
                verify(current, sample)
            stack.extend(_edges(current))
    for node in created:  # the others (unreachable from the outputs)
        verify(node, None)
    for sample in range(program.samples):
        missing = set(rec.of(sample).must) - {n for s, n in checked if s == sample}
        for name in sorted(missing):
            if not any(c.sample == sample and c.call_id == name for c in rec.calls):
                continue
            key = next(
                _call_key(c.contents, c.output, c.tool_calls)
                for c in rec.calls
                if c.sample == sample and c.call_id == name
            )
            if len({c.sample for c in ident.by_key.get(key, ())}) == 1:
                problems.append(
                    f"sample {sample}: LM call {name} was not checked (no afnio node "
                    "reached it)"
                )
    return problems + rec.problems


def _excerpt(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- running ---------------------------------------------------------------------------


@contextmanager
def _capturing_calls() -> Iterator[list[Any]]:
    """Every LM call node the tracer makes while in the block (the tracer's
    ``RecordedChatCall`` is swapped for a subclass that keeps them)."""
    from afnio_integrations.langchain import _tracing

    original = _tracing.RecordedChatCall
    created: list[Any] = []
    lock = threading.Lock()

    class Capturing(original):  # type: ignore[misc, valid-type]
        @classmethod
        def apply(cls, *args: Any, **kwargs: Any) -> Any:
            var = super().apply(*args, **kwargs)
            if var.grad_fn is not None:
                with lock:
                    created.append(var.grad_fn)
            return var

    Capturing.__name__ = original.__name__
    _tracing.RecordedChatCall = Capturing
    try:
        yield created
    finally:
        _tracing.RecordedChatCall = original


@dataclass
class GraphOutcome:
    """The result of running one program: its problems (none: the tracer built
    exactly the graph of the ground truth)."""

    program: GraphProgram | AgentProgram
    problems: list[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self) -> str:
        lines = [self.program.describe()]
        lines += [f"  - {p}" for p in self.problems]
        lines.append(
            f"  replay: python -m afnio.testing.graph_programs --seed "
            f"{self.program.seed} --kind {self.program.kind} -v"
        )
        return "\n".join(lines)


def _per_sample(out: Any, n: int) -> list[Any]:
    """A batched output Variable as one start per sample (``None``: no grad)."""
    node = getattr(out, "grad_fn", None)
    if node is None:
        return [
            type("Sample", (), {"grad_fn": None, "data": t})() for t in list(out.data)
        ]
    edges = list(node.next_functions)[:n]
    texts = list(out.data)
    return [
        type("Sample", (), {"grad_fn": e.node, "data": texts[i]})()
        for i, e in enumerate(edges)
    ]


def run_program(program: GraphProgram | AgentProgram) -> GraphOutcome:
    """Trace ``program``, call it in its mode, check the graph against its truth."""
    from afnio_integrations.langchain import trace

    start = time.perf_counter()
    problems: list[str] = []
    outputs: list[Any] = []
    created: list[Any] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with _capturing_calls() as created:
                traced = trace(
                    program.build(),
                    select=program.select,
                    output_key=program.output_key,
                )
                outputs = _call(traced, program)
        except Exception as error:  # the run itself failed: report it
            trace_text = "".join(traceback.format_exception(error)[-6:])
            problems.append(f"the run raised {error!r}\n{trace_text}")
    for record in caught:
        if any(c.__name__ == "AfnioTracingWarning" for c in record.category.__mro__):
            problems.append(f"the tracer warned: {record.message}")
    if not problems:
        if program.kind == "graph":
            _graph_output_truth(program)  # type: ignore[arg-type]
        problems += check_graph(program, outputs, created)
    return GraphOutcome(program, problems, time.perf_counter() - start)


def _graph_output_truth(program: GraphProgram) -> None:
    """The output's truth: the last write of ``output_key`` (of every key, for the
    whole state)."""
    rec = program.recorder
    keys = [program.output_key] if program.output_key else [*program.keys, "round"]
    for sample in range(program.samples):
        must: set[str] = set()
        may: set[str] = set()
        for key in keys:
            writes = rec.writes.get((sample, key), [])
            if writes:
                must |= writes[-1][1]
                may |= writes[-1][2]
        truth = rec.of(sample)
        truth.output_must, truth.output_may = frozenset(must), frozenset(may)
        if program.output_key:
            writes = rec.writes.get((sample, program.output_key), [])
            truth.output_text = writes[-1][3] if writes else ""


def _call(traced: Any, program: GraphProgram | AgentProgram) -> list[Any]:
    inputs = program.inputs()
    configs = [{"metadata": {SAMPLE_KEY: i}} for i in range(len(inputs))]
    mode = program.mode
    if mode == "invoke":
        return [
            traced.invoke(x, config=c) for x, c in zip(inputs, configs, strict=True)
        ]
    if mode == "stream":
        return [
            traced.stream(x, config=c) for x, c in zip(inputs, configs, strict=True)
        ]
    if mode == "batch":
        return _per_sample(traced.batch(inputs, config=configs), len(inputs))
    if mode == "abatch":
        out = asyncio.run(traced.abatch(inputs, config=configs))
        return _per_sample(out, len(inputs))

    async def gather() -> list[Any]:
        calls = (
            traced.ainvoke(x, config=c) for x, c in zip(inputs, configs, strict=True)
        )
        return list(await asyncio.gather(*calls))

    return asyncio.run(gather())


# -- command line ----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run generated programs and print each failure; exit status 1 when any
    failed."""
    parser = argparse.ArgumentParser(
        prog="python -m afnio.testing.graph_programs",
        description="Randomized differential test of afnio's tracer on LangGraph "
        "graphs and create_agent agents.",
    )
    parser.add_argument("--count", type=int, default=100, help="programs to run")
    parser.add_argument("--start", type=int, default=0, help="the first seed")
    parser.add_argument("--seed", type=int, help="run this one seed (replay)")
    parser.add_argument("--kind", choices=("graph", "agent"))
    parser.add_argument("-v", "--verbose", action="store_true", help="show each run")
    args = parser.parse_args(argv)
    seeds = (
        [args.seed]
        if args.seed is not None
        else range(args.start, args.start + args.count)
    )
    failures = 0
    start = time.perf_counter()
    for seed in seeds:
        outcome = run_program(generate(seed, args.kind))
        if not outcome.ok:
            failures += 1
            print(outcome.report(), flush=True)
        elif args.verbose:
            print(outcome.program.describe() + f"\n  ok in {outcome.seconds:.2f} s")
    elapsed = time.perf_counter() - start
    print(f"{len(seeds)} programs, {failures} failed, {elapsed:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
