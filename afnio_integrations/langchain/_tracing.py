"""Tracing an LCEL chain into an afnio graph, through LangChain callbacks.

Each call runs the **user's own chain** with a tracer in ``config["callbacks"]``
(nothing is wrapped or rebuilt). The tracer records LangChain's run tree; from it
every chat-model (or LLM) call becomes a :class:`RecordedChatCall` node whose output is
the recorded text (no LM call is repeated), and ``loss.backward()`` asks the backward
model for feedback on every input of every LM call, with the exact messages the model
saw.

**The linking contract.** Values flow along the run tree, never by searching for
equal text elsewhere in the call:

* *Which run fed a run*: the previous step of its ``RunnableSequence``; for the first
  step, and for the children of ``RunnableParallel``, ``RunnableBranch``,
  ``RunnableWithFallbacks``, retries, ``.assign``/``.pick`` and the other wrappers,
  the input of the parent (an element of it for ``.map()``); inside an opaque step
  (a ``RunnableLambda``/``@chain`` function, a custom runnable) a sub-call's input
  is whichever of the step's input and its earlier, finished sub-calls' outputs
  equals it (under the same key first; when values from different sources are equal
  to it, or none is, it is computed from them by the rule for non-LM steps below).
* *Which prompt produced a chat call*: the prompt run that fed that model run in
  the tree (through the wrappers above and any step that returns its input
  unchanged), not an earlier prompt run that happened to render the same messages.
* *Template links*: a chat call's gradient goes to (a) the selected Parameters of the
  prompt that produced its messages and (b) the upstream afnio Variables feeding
  that prompt's ``input_variables`` (and ``optional_variables``, e.g. an optional
  ``MessagesPlaceholder``) only. Partial variables (even when the input also has a
  key of that name, which LangChain would then render), and inputs the template
  does not use, are not linked.
* *Parsers, lambdas and other non-LM steps*: feedback on the step's output goes to
  those of its inputs whose text occurs in its output (an input with empty text
  never counts as occurring); if none occurs, to all of its inputs. A dict input
  (e.g. after ``RunnableParallel`` or ``.assign``) is several inputs, one per key (a
  list: one per element); a constant input (the chain's own input) counts like any
  other but has nothing to link. A dict output is several outputs, one per key, each
  linked by the same rule. A step that runs sub-calls (a ``@chain`` function) also
  counts their outputs as its inputs, and when its output equals a sub-call's output
  it is that output. An output linked to exactly one Variable with the same text is
  that Variable (no node in between); otherwise a :class:`StepOutput` node names the
  step (parsers always get one).
* *Messages made without a prompt* (a string or messages a step built): the chat
  call's gradient goes to the Variables they were derived from, located as
  ``input:<key>`` when they came from a key of a dict (``input`` otherwise).
* *Branch conditions*: a ``RunnableBranch``'s output is also linked to the LM calls
  its conditions made (every condition that ran, e.g. a routing chain ``prompt |
  llm | parser | check``), so feedback on the output also reaches the routing
  prompts: the conditions chose the branch that produced it. This over-approximates
  where the branch that ran was not the problem. When the branch chose a prompt, the
  routing LM calls are inputs (location :data:`ROUTING`) of the chat call it fed.
  What a condition reads without an LM call (a lambda on an upstream output) is not
  linked.
* *Undiscovered prompts*: a chat call fed by a prompt the chain's discovery did not
  find (see :mod:`~afnio_integrations.langchain._discovery`) is reported in
  :attr:`TracedCall.undiscovered`; the Module warns about it (see
  :mod:`~afnio_integrations.langchain._traced`).

LangChain stores a non-dict input as ``{"input": value}`` and a non-dict output as
``{"output": value}``; a dict with exactly that one key is read as the bare value.
Texts: a string is itself; a message, its content; a prompt value, its messages'
contents (one per line); a dict or list, its JSON (keys sorted).

Two LangChain quirks are worked around. ``RunnableWithFallbacks.invoke`` passes its
own config to its runnables, so their runs are recorded as its siblings (or, at the
root, as separate root runs; every root run carrying the call's metadata,
:data:`CALL_KEY`, is a child of the call's root): a sibling is its child when it
started after it and finished within its span, with the same tags and the same
input (plus the error under ``exception_key``). Another fallbacks run is never
adopted, and a run that two fallbacks runs could hold (run concurrently on the same
input) is left where it is. And a ``RunnableBinding`` (``.bind``, ``.with_config``,
...) merges its config with the enclosing run's, so when its caller passes a config
explicitly (a ``RunnableBranch`` branch, a step of a batched sequence under
``.map()``) its run is recorded under an outer run, with the tag its real parent
gave it: it moves back under the run that gave that tag whose neighbouring values
match it best (see ``_Graph._rehome``); when runs with different values match it
equally well, it is left where it is. A run left where it is for either reason is
reported in :attr:`TracedCall.ambiguous`, and the Module warns about it.

Values are computed once each, in the order the runs finished (what a run's value
depends on finished before it, so it is already known): a function looping over
many sub-calls needs no recursion along the loop.
"""

from __future__ import annotations

import bisect
import copy
import heapq
import json
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from langchain_core.messages import BaseMessage
from langchain_core.prompt_values import PromptValue
from langchain_core.tracers.base import BaseTracer
from langchain_core.tracers.schemas import Run
from pydantic import BaseModel

from afnio._variable import Variable
from afnio_integrations._recorded import RecordedChatCall, StepOutput
from afnio_integrations.langchain._discovery import METADATA_KEY

__all__ = [
    "CALL_KEY",
    "AmbiguousRun",
    "PromptIndex",
    "RecordedChatCall",
    "RunCollector",
    "StepOutput",
    "TracedCall",
    "UndiscoveredCall",
    "build_graph",
    "text_of",
]

OUTPUT_ROLE = "response of a LangChain chat model"

ROUTING = "routing condition"
"""The location of a branch condition's LM call among the inputs of an LM call fed by
a prompt that the branch chose."""

CALL_KEY = "afnio_trace_call"
"""Run metadata naming the traced call (batch item) a run belongs to: its root run
id."""

_MODEL_TYPES = ("chat_model", "llm")
_STEP_TAG = re.compile(r"^seq:step:(\d+)$")
_KEY_TAG = "map:key:"
_SITE_TAGS = ("seq:step:", "map:key:", "branch:", "condition:")
_WRAPPER_NAMES = (
    "RunnableAssign",
    "RunnableBranch",
    "RunnableParallel",
    "RunnablePassthrough",
    "RunnablePick",
    "RunnableRetry",
    "RunnableSequence",
    "RunnableWithFallbacks",
)


class RunCollector(BaseTracer):
    """Collects the root runs of traced calls (``original+chat`` schema, inline)."""

    run_inline = True

    def __init__(self) -> None:
        super().__init__(_schema_format="original+chat")
        self._roots: list[Run] = []
        self._roots_lock = threading.Lock()

    def _persist_run(self, run: Run) -> None:
        with self._roots_lock:
            self._roots.append(run)

    def on_chain_error(
        self,
        error: BaseException,
        *,
        inputs: dict[str, Any] | None = None,
        run_id: UUID,
        **kwargs: Any,
    ) -> Run:
        """A chain run's error; a LangGraph handoff to the parent graph
        (``ParentCommand``) keeps its ``Command``, whose ``update`` the parent applies
        as that node's writes."""
        command = error.args[0] if type(error).__name__ == "ParentCommand" else None
        run = self.run_map.get(str(run_id))
        if command is not None and run is not None:
            run.extra = {**(run.extra or {}), HANDOFF_KEY: command}
        return super().on_chain_error(error, inputs=inputs, run_id=run_id, **kwargs)

    def _create_chat_model_run(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        run_id: UUID,
        *args: Any,
        **kwargs: Any,
    ) -> Run:
        """A chat run recording its messages as (shallow) copies of the message
        objects, not serialized: LangChain's ``dumpd`` of every message of every
        call made tracing an agent cost time in proportion to its conversation on
        each call (quadratic over a long tool loop)."""
        run = super()._create_chat_model_run(
            serialized, [[] for _ in messages], run_id, *args, **kwargs
        )
        run.inputs = {"messages": [[_snapshot(m) for m in batch] for batch in messages]}
        return run

    @property
    def roots(self) -> list[Run]:
        """The root runs recorded so far, in the order they finished."""
        with self._roots_lock:
            return list(self._roots)

    def call(self, run_id: UUID) -> tuple[Run, list[Run]]:
        """The root run of the call started with ``run_id``, and the other root runs
        it caused (runs carrying its :data:`CALL_KEY` metadata that LangChain recorded
        without a parent).

        Raises:
            RuntimeError: if no root run has that id (the chain did not run with the
                tracer's config).
        """
        roots = self.roots
        root = next((r for r in roots if r.id == run_id), None)
        if root is None:
            raise RuntimeError(
                f"The traced call {run_id} recorded no root run: the chain must be "
                "run with the config afnio passes (its callbacks and run_id)."
            )
        key = str(run_id)
        strays = [
            r for r in roots if r is not root and _metadata(r).get(CALL_KEY) == key
        ]
        return root, strays


def _snapshot(message: BaseMessage) -> BaseMessage:
    """A copy of ``message`` that later in-place edits of its content or tool calls
    (a list) do not reach."""
    update: dict[str, Any] = {}
    if isinstance(message.content, list):
        update["content"] = copy.deepcopy(message.content)
    calls = getattr(message, "tool_calls", None)
    if calls:
        update["tool_calls"] = copy.deepcopy(calls)
    return message.model_copy(update=update)


# -- texts -----------------------------------------------------------------------------


def _metadata(run: Run) -> dict[str, Any]:
    return dict((run.extra or {}).get("metadata") or {})


def _content_text(content: Any) -> str:
    if isinstance(content, list):
        return "\n".join(
            part.get("text", "") if isinstance(part, dict) else str(part)
            for part in content
        )
    return str(content)


def _message_role(message: Any) -> str:
    kind = getattr(message, "type", None)
    if kind is None and isinstance(message, dict):
        ident = message.get("id", [""])[-1]
        kind = {
            "SystemMessage": "system",
            "HumanMessage": "human",
            "AIMessage": "ai",
            "AIMessageChunk": "ai",
            "ToolMessage": "tool",
        }.get(ident, "chat")
        return {"human": "user", "ai": "assistant"}.get(kind, kind)
    kind = str(kind).removesuffix("MessageChunk").lower()  # a chunk's type
    return {"human": "user", "ai": "assistant"}.get(kind, kind)


def _message_field(message: Any, name: str) -> Any:
    """A field of a message, recorded (``dumpd``: under ``kwargs``) or live."""
    if isinstance(message, dict):
        return (message.get("kwargs") or {}).get(name)
    return getattr(message, name, None)


def _message_text(message: Any) -> str:
    """A message's text; an assistant message's tool calls (JSON) follow its text."""
    text = _content_text(_message_field(message, "content") or "")
    calls = _message_field(message, "tool_calls")
    if calls:
        shown = json.dumps(
            [{"name": c.get("name"), "args": c.get("args")} for c in calls],
            default=str,
            ensure_ascii=False,
        )
        return f"{text}\n{shown}" if text else shown
    return text


def conversation_of(model_run: Run) -> list[dict[str, str]]:
    """The messages a chat-model run received (an LLM run: its prompt, as one user
    message)."""
    inputs = model_run.inputs or {}
    if "messages" not in inputs and inputs.get("prompts"):
        return [{"role": "user", "content": str(inputs["prompts"][0])}]
    batches = inputs.get("messages") or [[]]
    return [{"role": _message_role(m), "content": _message_text(m)} for m in batches[0]]


def recorded_messages(model_run: Run) -> list[Any]:
    """The messages a chat-model run received, as recorded."""
    batches = (model_run.inputs or {}).get("messages") or [[]]
    return list(batches[0]) if batches else []


def offered_tools(model_run: Run) -> list[dict[str, Any]]:
    """The tools a chat-model run offered the model (OpenAI's shape)."""
    params = (model_run.extra or {}).get("invocation_params") or {}
    tools = params.get("tools")
    return [t for t in tools if isinstance(t, dict)] if isinstance(tools, list) else []


def _tool_name(tool: Mapping[str, Any]) -> str | None:
    function = tool.get("function")
    name = function.get("name") if isinstance(function, dict) else tool.get("name")
    return name if isinstance(name, str) else None


def backward_conversation(model_run: Run) -> list[dict[str, str]]:
    """What the backward model is shown of a chat call: its messages, and, when the
    call offered tools, their definitions (JSON) first."""
    conversation = conversation_of(model_run)
    tools = offered_tools(model_run)
    if tools:
        shown = json.dumps(tools, default=str, ensure_ascii=False)
        conversation = [{"role": "tools", "content": shown}, *conversation]
    return conversation


def _made_tool_calls(model_run: Run) -> list[dict[str, Any]]:
    generations = (model_run.outputs or {}).get("generations") or [[{}]]
    first = generations[0][0] if generations and generations[0] else {}
    message = first.get("message", {}) if isinstance(first, dict) else {}
    calls = _message_field(message, "tool_calls") if message else None
    return [c for c in calls or () if isinstance(c, dict)]


def output_of(model_run: Run) -> str:
    """The text a chat-model run produced (aggregated when streamed)."""
    generations = (model_run.outputs or {}).get("generations") or [[{}]]
    first = generations[0][0] if generations and generations[0] else {}
    text = first.get("text") if isinstance(first, dict) else None
    if text:
        return str(text)
    message = first.get("message", {}) if isinstance(first, dict) else {}
    kwargs = message.get("kwargs", {}) if isinstance(message, dict) else {}
    tool_calls = kwargs.get("tool_calls") or kwargs.get("additional_kwargs", {}).get(
        "tool_calls"
    )
    if tool_calls:  # structured output through tool calling
        return json.dumps(tool_calls, default=str)
    return str(kwargs.get("content", ""))


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and bool(value)
        and all(isinstance(v, BaseMessage) for v in value)
    )


def text_of(value: Any) -> str:
    """The text of a value flowing through a chain (see the module docstring).

    >>> text_of("hi"), text_of({"b": 1, "a": "x"}), text_of(None)
    ('hi', '{"a": "x", "b": 1}', '')
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, BaseMessage):
        tool_calls = getattr(value, "tool_calls", None)
        if tool_calls and not value.content:
            return json.dumps(tool_calls, default=str)
        return _content_text(value.content)
    if isinstance(value, PromptValue):
        return "\n".join(_content_text(m.content) for m in value.to_messages())
    if _is_messages(value):
        return "\n".join(_content_text(m.content) for m in value)
    if isinstance(value, BaseModel):
        return json.dumps(value.model_dump(), default=_json_default, ensure_ascii=False)
    try:
        return json.dumps(
            value, default=_json_default, ensure_ascii=False, sort_keys=True
        )
    except TypeError:  # keys that do not sort
        return json.dumps(value, default=_json_default, ensure_ascii=False)
    except ValueError:  # a circular structure
        return str(value)


def _json_default(value: Any) -> str:
    """How :func:`text_of` shows a value JSON cannot: a message (e.g. in a graph's
    state) as its text, anything else as ``str``."""
    if isinstance(value, (BaseMessage, PromptValue)):
        return text_of(value)
    return str(value)


def _parts_of(payload: Any) -> dict[str, Any] | None:
    """A dict's items (a list's elements) as named parts; ``None`` for a single
    value."""
    if isinstance(payload, dict):
        return {str(k): v for k, v in payload.items()}
    if isinstance(payload, (list, tuple)) and payload and not _is_messages(payload):
        return {str(i): v for i, v in enumerate(payload)}
    return None


def _bare(recorded: Mapping[str, Any] | None, key: str) -> Any:
    """A recorded input/output dict, unwrapped when LangChain wrapped a bare value."""
    recorded = dict(recorded or {})
    return recorded[key] if set(recorded) == {key} else recorded


# -- values ----------------------------------------------------------------------------


@dataclass(eq=False)
class _Rendered:
    """A prompt run's output: the run, its afnio id, and the Variables feeding the
    template's variables (location ``input:<name>``)."""

    run: Run
    token: str | None
    sources: list[tuple[str, Variable]]


@dataclass(eq=False)
class _Value:
    """The afnio view of a value in the chain: its text, and the Variable holding it
    (none for a constant), or its parts (a dict or list), or the prompt it is."""

    text: str
    var: Variable | None = None
    parts: dict[str, _Value] | None = None
    prompt: _Rendered | None = None
    aliases: tuple[str, ...] = ()

    def matches(self, text: str) -> bool:
        return self.text == text or text in self.aliases

    def walk(self) -> Iterator[_Value]:
        """This value, then its parts (depth first)."""
        yield self
        for part in (self.parts or {}).values():
            yield from part.walk()


def _const(payload: Any) -> _Value:
    parts = _parts_of(payload)
    return _Value(
        text_of(payload),
        parts=None if parts is None else {k: _const(v) for k, v in parts.items()},
    )


def _inputs(value: _Value) -> list[tuple[str, _Value]]:
    """A value as a step's inputs: one per key of a dict (element of a list), else
    itself (key ``""``)."""
    if value.parts:
        return list(value.parts.items())
    return [("", value)]


def _texts_in(value: _Value) -> set[str]:
    """Every text (and alias) of ``value`` and its parts."""
    return {t for v in value.walk() for t in (v.text, *v.aliases)}


def _key_within(value: _Value, containers: Iterable[_Value]) -> str | None:
    """The key under which ``value`` itself is a part of one of ``containers`` (the
    innermost; ``None`` when it is none's part)."""
    for container in containers:
        stack = [container]
        while stack:
            current = stack.pop()
            for key, part in (current.parts or {}).items():
                if part is value:
                    return key
                stack.append(part)
    return None


def _source(value: _Value) -> int | None:
    """What a value's afnio links come from (``None`` for a constant)."""
    if value.var is not None:
        return id(value.var)
    if value.prompt is not None:
        return id(value)
    parts = value.parts or {}
    if any(_source(part) is not None for part in parts.values()):
        return id(value)
    return None


def _unique(variables: Iterable[Variable]) -> list[Variable]:
    seen: dict[int, Variable] = {}
    for var in variables:
        seen.setdefault(id(var), var)
    return list(seen.values())


# -- the graph -------------------------------------------------------------------------


@dataclass
class PromptIndex:
    """What the Module knows of the chain's prompts, by their ``afnio_prompt_id``."""

    parameters: Mapping[str, Sequence[tuple[str, Variable]]]
    """The selected Parameters of each discovered prompt, with their locations."""
    prompts: Mapping[str, Any]
    """Every discovered prompt template."""
    fallback_names: frozenset[str] = frozenset()
    """Run names of the chain's ``RunnableWithFallbacks``."""
    messages: Mapping[str, Sequence[tuple[str, Variable]]] = field(default_factory=dict)
    """The Parameters of trainable system messages (an agent's system prompt, a
    marked message), by message id."""
    tools: Mapping[str, Sequence[Sequence[tuple[str, Variable]]]] = field(
        default_factory=dict
    )
    """The Parameters of each tool (its description first, then its arguments), by
    tool name: one group per tool object of that name."""
    texts: Sequence[tuple[str, Variable]] = ()
    """Message Parameters linked to a system message that *contains* their text
    (one built anew on each call, e.g. by a ``dynamic_prompt``)."""
    conditions: frozenset[str] = frozenset()
    """Run names of the graphs' conditional-edge functions."""
    known_messages: frozenset[str] = frozenset()
    """Ids of every discovered system message, selected or not."""
    known_texts: tuple[str, ...] = ()
    """Texts of every discovered system message, selected or not (a system message
    built on the call from one of them was discovered, not overlooked)."""
    output_key: str | None = None
    """For a graph: the state key whose value is the traced output (see
    :meth:`_Graph.output`)."""
    graph: bool = False
    """The program is a LangGraph graph (or wraps one, e.g. ``.with_retry()``): its
    output is read from its final state (see :meth:`_Graph._graph_answer`)."""


@dataclass(frozen=True)
class UndiscoveredCall:
    """An LM call fed by a prompt the chain's discovery did not find."""

    site: str  # the path of runs from the call's root to the LM call
    prompt: str  # the prompt run's name and the start of what it rendered


@dataclass(frozen=True)
class AmbiguousRun:
    """A run LangChain recorded away from its real parent that afnio could not place
    with certainty: it is left where it was recorded, so the feedback through it may
    miss its prompts or reach other ones."""

    site: str  # the path of runs from the call's root to the run
    reason: str  # why it could not be placed


@dataclass
class TracedCall:
    """The afnio graph of one traced call."""

    output: Variable
    model_runs: list[Run] = field(default_factory=list)
    undiscovered: list[UndiscoveredCall] = field(default_factory=list)
    ambiguous: list[AmbiguousRun] = field(default_factory=list)
    untrained: list[UndiscoveredCall] = field(default_factory=list)
    """Model calls of a graph whose system message is linked to no Parameter (e.g. a
    ``dynamic_prompt`` built from texts that are neither discovered nor marked)."""


def _in_text(run: Run) -> str:
    """The text of what a run received (a model run: its messages, one per line)."""
    if run.run_type in _MODEL_TYPES:
        return "\n".join(m["content"] for m in conversation_of(run))
    return text_of(_bare(run.inputs, "input"))


def _out_text(run: Run) -> str:
    """The text of what a run produced."""
    if run.run_type in _MODEL_TYPES:
        return output_of(run)
    return text_of(_bare(run.outputs, "output"))


_STRUCTURAL_TAGS = ("seq:step:", "map:key:", "branch:", "condition:", "retry:attempt:")


def _structural(run: Run) -> list[str]:
    """The tags a parent gives its child run (its position: a step, a key...)."""
    return [t for t in run.tags or () if t.startswith(_STRUCTURAL_TAGS)]


def _tag_kind(tag: str) -> str:
    return next(k for k in _STRUCTURAL_TAGS if tag.startswith(k))


def _spans(outer: Run, inner: Run) -> bool:
    """``outer`` ran during the whole of ``inner``."""
    return (
        outer.end_time is not None
        and inner.end_time is not None
        and outer.start_time <= inner.start_time
        and inner.end_time <= outer.end_time
    )


def _step_of(run: Run) -> int | None:
    for tag in run.tags or ():
        match = _STEP_TAG.match(tag)
        if match:
            return int(match[1])
    return None


def _key_of(run: Run) -> str | None:
    for tag in run.tags or ():
        if tag.startswith(_KEY_TAG):
            return tag[len(_KEY_TAG) :]
    return None


def _same_input(holder: Run, run: Run) -> bool:
    """``run`` received what ``holder`` received (plus, for a fallback given
    ``exception_key``, the error of the runnable before it)."""
    if _in_text(holder) == _in_text(run):
        return True
    given = _bare(holder.inputs, "input")
    got = _bare(run.inputs, "input")
    if not (isinstance(given, dict) and isinstance(got, dict)):
        return False
    extra = set(got) - set(given)
    return (
        len(extra) == 1
        and isinstance(got[next(iter(extra))], BaseException)
        and all(k in got and text_of(got[k]) == text_of(v) for k, v in given.items())
    )


_GRAPH_STEP = re.compile(r"^graph:step:(\d+)$")
_AI_ID = re.compile(r"^lc_run--(?P<run>[0-9a-fA-F-]{36})(?:-\d+)?$")


def _graph_step(run: Run) -> int | None:
    """The superstep of a LangGraph node run (its ``graph:step:<n>`` tag)."""
    for tag in run.tags or ():
        match = _GRAPH_STEP.match(tag)
        if match:
            return int(match[1])
    return None


def _in_graph(run: Run) -> bool:
    return "langgraph_node" in _metadata(run)


def _updates_of(payload: Any) -> dict[str, Any]:
    """What a LangGraph node wrote: its returned dict, or the ``update`` of the
    ``Command``(s) it returned (a list of them, or of dicts, merged in order)."""
    items = payload if isinstance(payload, (list, tuple)) else [payload]
    writes: dict[str, Any] = {}
    for item in items:
        update = getattr(item, "update", item) if not isinstance(item, dict) else item
        if isinstance(update, dict):
            writes.update({str(k): v for k, v in update.items()})
        elif isinstance(update, (list, tuple)):
            writes.update(
                {
                    str(p[0]): p[1]
                    for p in update
                    if isinstance(p, tuple) and len(p) == 2
                }
            )
    return writes


HANDOFF_KEY = "afnio_handoff"
"""Run ``extra`` key holding the ``Command`` a LangGraph node handed to its parent
graph (``Command(graph=Command.PARENT, ...)``, raised as ``ParentCommand``)."""


def _handoff(run: Run) -> Any:
    """The ``Command`` a node run handed off to its parent graph, if it did."""
    return (run.extra or {}).get(HANDOFF_KEY)


def _chosen(payload: Any) -> set[str]:
    """The node names a conditional edge's function returned (a name, a list of
    names, ``Send`` objects)."""
    items = payload if isinstance(payload, (list, tuple)) else [payload]
    names = set()
    for item in items:
        node = getattr(item, "node", item)
        if isinstance(node, str):
            names.add(node)
    return names


def _is_condition(run: Run) -> bool:
    return any(tag.startswith("condition:") for tag in run.tags or ())


def _succeeded(run: Run) -> bool:
    return run.error is None and run.outputs is not None


class _Graph:
    def __init__(self, root: Run, strays: Sequence[Run], index: PromptIndex) -> None:
        self.root = root
        self.index = index
        self.kids: dict[UUID, list[Run]] = {}
        self.parent: dict[UUID, Run | None] = {root.id: None}
        self.by_id: dict[UUID, Run] = {}
        self._built = False
        self.ambiguous: list[AmbiguousRun] = []
        self._add(root)
        for stray in strays:
            self._add(stray)
            self.kids[root.id].append(stray)
            self.parent[stray.id] = root
        # children in start order (a stable sort keeps LangChain's order, which is
        # the order they started in, for runs started in the same microsecond)
        for children in self.kids.values():
            children.sort(key=lambda r: r.start_time)
        for run_id in list(self.kids):
            self._adopt_fallback_runs(run_id)
        for children in self.kids.values():
            children.sort(key=lambda r: r.start_time)
        self._rehomed: set[UUID] = set()
        for run in self.runs():  # from the root down
            self._rehome(run.id)
        for children in self.kids.values():
            children.sort(key=lambda r: r.start_time)
        self._out: dict[UUID, _Value] = {}
        self._in: dict[UUID, _Value] = {}
        self._each: dict[UUID, dict[UUID, int]] = {}
        self._finished: dict[UUID, tuple[list[Run], dict[UUID, int]]] = {}
        self._done_values: dict[UUID, list[_Value]] = {}
        self._done_texts: dict[UUID, set[str]] = {}
        self._in_texts: dict[UUID, set[str]] = {}
        self._kinds: dict[UUID, str] = {}
        self._feed_keys: dict[UUID, str] = {}
        self._step_table: dict[UUID, dict[int, Run]] = {}
        self._built = True  # the tree is final: its tables can be kept
        self.model_runs: list[Run] = []
        self._undiscovered: list[tuple[str, UndiscoveredCall]] = []
        self.untrained: list[tuple[str, UndiscoveredCall]] = []
        self._writes_of: dict[UUID, dict[str, _Value]] = {}
        self._node_lists: dict[UUID, list[Run]] = {}
        # per graph run and key: how many of its nodes were scanned, and the steps
        # and values of those that wrote the key
        self._writers: dict[
            tuple[UUID, str], tuple[list[int], list[int], list[_Value]]
        ] = {}
        self._node_steps: dict[UUID, dict[int, list[Run]]] = {}
        self._tool_messages: dict[str, Run] | None = None
        self._call_owners: dict[str, list[Run]] | None = None
        # messages a node wrote, by the id LangGraph's reducer gave them
        self._written_ids: dict[str, _Value] = {}

    # -- the tree --------------------------------------------------------------------

    def _add(self, run: Run) -> None:
        stack = [run]
        while stack:
            current = stack.pop()
            self.by_id[current.id] = current
            self.kids[current.id] = list(current.child_runs)
            for child in current.child_runs:
                self.parent[child.id] = current
                stack.append(child)

    def _move(self, run: Run, parent: Run) -> None:
        old = self.parent.get(run.id)
        if old is not None:
            self.kids[old.id].remove(run)
        self.kids[parent.id].append(run)
        self.parent[run.id] = parent

    def _rehome(self, parent_id: UUID) -> None:
        """Runs LangChain recorded above their parent move back under it.

        A ``RunnableBinding`` (``.bind``, ``.with_config``, ``.with_retry``'s
        attempts, ...) merges its config with the *ambient* one (the config of the
        nearest enclosing run that set it), so when its caller passed a config
        explicitly (a ``RunnableBranch`` branch, a step of a batched sequence under
        ``.map()``, ...) its run is recorded under that enclosing run, with the
        structural tag its real parent gave it (``seq:step:<k>``, ``branch:<n>``,
        ``map:key:<k>``) added to the ambient tags. Such a run (two structural tags,
        or one that does not fit where it is) moves to the run below its recorded
        parent that spans its time and lacks a child with that tag (of these, the
        one whose recorded neighbouring values match it; they are interchangeable
        otherwise); failing that, when it repeats the tag of a sibling that spans
        its time, to the innermost chain run of that sibling spanning it."""
        holder_run = self.by_id.get(parent_id)
        if holder_run is not None and _graph_step(holder_run) is not None:
            return  # a LangGraph node: its sub-calls are where they ran
        for run in list(self.kids[parent_id]):
            if run.id in self._rehomed or run.end_time is None:
                continue
            if not _structural(run):  # a sub-call of a function: nothing to place
                continue
            siblings = [c for c in self.kids[parent_id] if c is not run]
            own = self._misplaced_tag(run, siblings)
            if own is None:
                continue
            holder, sure = self._holder(parent_id, run, own)
            if not sure:
                continue
            if holder is None:
                twin = next(
                    (
                        c
                        for c in siblings
                        if own in (c.tags or ())
                        and _spans(c, run)
                        and not self._is_fallbacks(c)
                    ),
                    None,
                )
                if twin is not None:
                    holder = max(
                        (
                            d
                            for d in [twin, *self._descendants(twin.id, exclude=run)]
                            if d.run_type == "chain" and _spans(d, run)
                        ),
                        key=lambda d: d.start_time,
                    )
            if holder is not None:
                self._rehomed.add(run.id)
                self._move(run, holder)

    def _misplaced_tag(self, run: Run, siblings: list[Run]) -> str | None:
        """The structural tag ``run``'s real parent gave it, when it is recorded
        elsewhere (``None`` when it fits where it is)."""
        tags = _structural(run)
        if not tags:
            return None
        if len(tags) > 1:  # the ambient position's tag, and its own
            taken = {t for c in siblings for t in _structural(c)}
            own = [t for t in tags if t not in taken]
            return own[0] if len(own) == 1 else None
        tag = tags[0]
        kinds = {_tag_kind(t) for c in siblings for t in _structural(c)}
        if any(tag in (c.tags or ()) and _spans(c, run) for c in siblings) and not any(
            self._is_fallbacks(c) for c in siblings
        ):
            return tag  # it repeats the position of a sibling around it
        kind = _tag_kind(tag)
        if kind == "seq:step:":
            k = _step_of(run) or 0
            steps = {_step_of(c) for c in siblings}
            fits = all(_step_of(c) is not None for c in siblings) and bool(
                {k - 1, k + 1} & steps
            )
            return None if fits else tag
        if kind in ("branch:", "condition:"):
            return None if kinds & {"branch:", "condition:"} or not siblings else tag
        if kind == "map:key:":
            return None if "map:key:" in kinds or not siblings else tag
        return None

    def _holder(self, parent_id: UUID, run: Run, tag: str) -> tuple[Run | None, bool]:
        """The run below ``parent_id`` that ``run`` (tagged ``tag`` by it) came
        from: of the chain runs spanning it that lack a child with that tag, the one
        whose recorded neighbouring values (the steps around the position, or its
        input) match it best. When several match equally well but their values
        differ (so they are not interchangeable), it is reported in
        :attr:`ambiguous` and stays where it is. Returns the holder (``None``: no
        candidate) and whether it is certain."""
        kind = _tag_kind(tag)
        scored: list[tuple[int, tuple[str, ...], Run]] = []
        for holder in self._descendants(parent_id, exclude=run):
            if holder.run_type != "chain" or not _spans(holder, run):
                continue
            children = [c for c in self.kids[holder.id] if c is not run]
            if any(tag in (c.tags or ()) for c in children):
                continue
            held = {_tag_kind(t) for c in children for t in _structural(c)}
            score = 0
            if kind == "seq:step:":
                steps = self._steps(holder)
                k = _step_of(run) or 0
                if not ({k - 1, k + 1} & set(steps)):
                    continue
                before = (
                    _out_text(steps[k - 1])
                    if k - 1 in steps
                    else _in_text(holder)  # the first step gets the holder's input
                    if k == 1
                    else None
                )
                after = _in_text(steps[k + 1]) if k + 1 in steps else None
                score = int(before == _in_text(run)) + int(after == _out_text(run))
                view: tuple[str, ...] = (str(before), str(after))
            elif kind in ("branch:", "condition:", "map:key:"):
                wanted = (
                    {"branch:", "condition:"} if kind != "map:key:" else {"map:key:"}
                )
                if not held & wanted:
                    continue
                view = (_in_text(holder),)
                score = int(view[0] == _in_text(run))
            else:
                continue
            scored.append((score, view, holder))
        if not scored:
            return None, True
        top = max(score for score, _, _ in scored)
        best = [(view, holder) for score, view, holder in scored if score == top]
        if len({view for view, _ in best}) > 1:
            self._ambiguous(
                run,
                f"could belong to any of {len(best)} runs that LangChain recorded "
                "it beside (a .bind/.with_config/.with_retry step run by a "
                "composite)",
            )
            return None, False
        return best[0][1], True

    def _descendants(self, run_id: UUID, exclude: Run) -> Iterator[Run]:
        stack = [c for c in reversed(self.kids[run_id]) if c is not exclude]
        while stack:
            run = stack.pop()
            yield run
            stack.extend(reversed(self.kids[run.id]))

    def _is_fallbacks(self, run: Run) -> bool:
        return run.name in self.index.fallback_names or run.name.startswith(
            "RunnableWithFallbacks"
        )

    def _adopt_fallback_runs(self, parent_id: UUID) -> None:
        """Runs recorded as siblings of a ``RunnableWithFallbacks`` run become its
        children: those that started after it and finished within its span, with its
        tags and its input (a fallback given ``exception_key`` also receives the
        error under that key). A fallbacks run is never adopted (two fallbacks
        running concurrently under one parent look alike otherwise), and a run that
        several fallbacks runs could hold (the same input, overlapping spans) stays
        where it is, reported in :attr:`ambiguous`."""
        siblings = self.kids[parent_id]
        holders = [s for s in siblings if self._is_fallbacks(s) and s.end_time]
        if not holders:
            return
        rank = {r.id: i for i, r in enumerate(siblings)}
        for run in list(siblings):
            if run.end_time is None or self._is_fallbacks(run):
                continue
            inside = [
                f
                for f in holders
                if rank[f.id] < rank[run.id]
                and sorted(f.tags or []) == sorted(run.tags or [])
                and run.end_time <= f.end_time  # type: ignore[operator]
                and _same_input(f, run)
            ]
            if len(inside) > 1:
                self._ambiguous(
                    run,
                    f"could belong to any of {len(inside)} with_fallbacks runs "
                    "that received the same input at the same time",
                )
            elif inside:
                siblings.remove(run)
                self.kids[inside[0].id].append(run)
                self.parent[run.id] = inside[0]

    def _ambiguous(self, run: Run, reason: str) -> None:
        self.ambiguous.append(AmbiguousRun(self._site(run), reason))

    def runs(self) -> list[Run]:
        out, stack = [], [self.root]
        while stack:
            run = stack.pop()
            out.append(run)
            stack.extend(reversed(self.kids[run.id]))
        return out

    def _kind(self, run: Run) -> str:
        """What ``run`` is to the tracer (the tree no longer changes once built)."""
        kind = self._kinds.get(run.id)
        if kind is None:
            kind = self._kinds[run.id] = self._classify(run)
        return kind

    def _classify(self, run: Run) -> str:
        if run.run_type in _MODEL_TYPES:
            return "model"
        if run.run_type in ("prompt", "parser"):
            return run.run_type
        if run.run_type == "tool":
            return "tool"
        if _graph_step(run) is not None:
            return "node"
        children = self.kids[run.id]
        if any(_graph_step(c) is not None for c in children):
            return "graph"
        if self._is_fallbacks(run):
            return "wrapper"
        if any(_step_of(c) is not None for c in children):
            return "sequence"
        if any(_key_of(c) is not None for c in children):
            return "parallel"
        if run.name.startswith("RunnableEach"):
            return "each"
        if run.name.startswith(_WRAPPER_NAMES):
            return "wrapper"
        tags = [t for c in children for t in c.tags or ()]
        if any(t.startswith(("branch:", "condition:", "retry:")) for t in tags):
            return "wrapper"
        if children and all(c.name == run.name for c in children):
            return "wrapper"  # a retry runs under the name of what it retries
        return "step"

    def _steps(self, run: Run) -> dict[int, Run]:
        """``run``'s children by sequence step (the first to start of each)."""
        steps = self._step_table.get(run.id) if self._built else None
        if steps is None:
            steps = {}
            for child in self.kids[run.id]:  # sorted by start
                k = _step_of(child)
                if k is not None:
                    steps.setdefault(k, child)
            if self._built:
                self._step_table[run.id] = steps
        return steps

    def _results(self, run: Run) -> list[Run]:
        """The children that produced a value, the latest to finish first."""
        done = [c for c in self.kids[run.id] if _succeeded(c) and not _is_condition(c)]
        return sorted(done, key=lambda c: c.end_time or c.start_time, reverse=True)

    def _earlier_values(self, parent: Run, run: Run) -> list[_Value]:
        """The outputs of ``parent``'s children that produced a value and finished
        before ``run`` started (and started before it), latest to finish first (a
        new list; each output computed once)."""
        table = self._finished.get(parent.id)
        if table is None:
            table = self._finished[parent.id] = self._finished_before(parent)
        done, counts = table
        count = counts.get(run.id, 0)
        values = self._done_values.setdefault(parent.id, [])
        texts = self._done_texts.setdefault(parent.id, set())
        for child in done[len(values) : count]:
            value = self.out(child)
            values.append(value)
            texts |= _texts_in(value)
        return values[:count][::-1]

    def _input_texts(self, run: Run) -> set[str]:
        """:func:`_texts_in` ``run``'s input (kept)."""
        texts = self._in_texts.get(run.id)
        if texts is None:
            texts = self._in_texts[run.id] = _texts_in(self.inp(run))
        return texts

    def _finished_before(self, parent: Run) -> tuple[list[Run], dict[UUID, int]]:
        """One pass over ``parent``'s children in start order: the results (see
        :meth:`_results`) in the order they finished, and for each child how many of
        them (a prefix) finished before it started. Start times only grow along the
        children, so what finished before one child finished before the next too.
        Equal end times keep the earlier-started child first once reversed, as
        :meth:`_results` orders them."""
        children = self.kids[parent.id]
        pending: list[tuple[Any, int, Run]] = []  # by end time, later start first
        done: list[Run] = []
        counts: dict[UUID, int] = {}
        for i, child in enumerate(children):
            while pending and pending[0][0] <= child.start_time:
                done.append(heapq.heappop(pending)[2])
            counts[child.id] = len(done)
            if (
                _succeeded(child)
                and not _is_condition(child)
                and child.end_time is not None
            ):
                heapq.heappush(pending, (child.end_time, -i, child))
        return done, counts

    # -- values ----------------------------------------------------------------------

    def variables(self, value: _Value) -> list[Variable]:
        """The Variables a value carries (a prompt consumed by a non-LM step becomes
        a step output of its Parameters and inputs)."""
        if value.var is not None:
            return [value.var]
        if value.prompt is not None:
            rendered = value.prompt
            sources = _unique(
                [p for _, p in self.index.parameters.get(rendered.token or "", ())]
                + [v for _, v in rendered.sources]
            )
            if sources:
                value.var = StepOutput.apply(
                    sources if len(sources) > 1 else sources[0],
                    value.text,
                    rendered.run.name,
                )
            return [value.var] if value.var is not None else []
        return _unique(
            v for part in (value.parts or {}).values() for v in self.variables(part)
        )

    def _computed(
        self,
        payload: Any,
        inputs: list[tuple[str, _Value]],
        step: str,
        wrap: bool = False,
    ) -> _Value:
        """A value a non-LM step computed from ``inputs``: linked to the inputs whose
        text occurs in it, else to all of them (per key for a dict or list)."""
        parts = _parts_of(payload)
        if parts is not None:
            return _Value(
                text_of(payload),
                parts={
                    k: self._computed(v, inputs, step, wrap) for k, v in parts.items()
                },
            )
        text = text_of(payload)
        occurring = [v for _, v in inputs if v.text and v.text in text]
        chosen = occurring or [v for _, v in inputs]
        carrying = [v for v in chosen if self.variables(v)]
        if not carrying:
            return _Value(text)
        if not wrap and len(carrying) == 1 and carrying[0].matches(text):
            return carrying[0]
        sources = _unique(v for value in carrying for v in self.variables(value))
        var = StepOutput.apply(sources if len(sources) > 1 else sources[0], text, step)
        return _Value(text, var=var)

    def _derive(
        self,
        payload: Any,
        candidates: list[_Value],
        step: str,
        key: str | None = None,
        opaque: bool = False,
        texts: Sequence[set[str]] | None = None,
    ) -> _Value:
        """The value ``payload`` is, given the values it was made from (in order of
        preference): the same key of one of them with the same text, else one of
        them (or a part of one) with the same text, else (a dict) part by part, else
        computed from them by the rule for non-LM steps. ``opaque``: they are what a
        function had at hand, so when values from different sources have that text,
        the rule for non-LM steps decides (all of them are linked). ``texts``: when
        given, sets holding (at least) every text and alias of the candidates and
        their parts: a text in none of them matches no candidate (no search)."""
        text = text_of(payload)
        searched = texts is None or any(text in known for known in texts)
        if searched and key is not None:  # the same key of a dict it was made from
            for candidate in candidates:
                part = (candidate.parts or {}).get(key)
                if part is not None and part.matches(text):
                    return part
        found = [
            v
            for c in (candidates if searched else ())
            for v in (c.walk() if c.parts else (c,))
            if v.matches(text)
        ]
        if found:
            sources = {_source(v): v for v in found if _source(v) is not None}
            if not opaque or not sources:
                return found[0]
            if len(sources) == 1:
                return next(iter(sources.values()))
        parts = _parts_of(payload)
        if parts is not None:
            return _Value(
                text,
                parts={
                    k: self._derive(v, candidates, step, k, opaque, texts)
                    for k, v in parts.items()
                },
            )
        inputs = [item for candidate in candidates for item in _inputs(candidate)]
        return self._computed(payload, inputs, step)

    def inp(self, run: Run) -> _Value:
        """The value ``run`` received."""
        if run.id in self._in:
            return self._in[run.id]
        if run.run_type in _MODEL_TYPES:  # the messages it received, as one text
            payload: Any = _in_text(run)
        else:
            payload = _bare(run.inputs, "input")
        parent = self.parent.get(run.id)
        if parent is None:
            value = _const(payload)
        elif self._kind(parent) == "graph":
            value = self._node_input(parent, run)
        else:
            candidates, opaque, texts = self._candidates(run, parent)
            value = self._derive(
                payload, candidates, parent.name, opaque=opaque, texts=texts
            )
            if run.run_type in _MODEL_TYPES and value.prompt is None:
                key = _key_within(value, candidates)
                if key is not None:
                    self._feed_keys[run.id] = key
        self._in[run.id] = value
        return value

    def _candidates(
        self, run: Run, parent: Run
    ) -> tuple[list[_Value], bool, tuple[set[str], ...] | None]:
        """What ``run``'s input was made from (see the module docstring): the
        values, whether they are what an opaque function had at hand, and the texts
        they hold (when known)."""
        kind = self._kind(parent)
        step = _step_of(run)
        previous = self._steps(parent).get(step - 1) if step else None
        if kind == "sequence" and previous is not None:
            return [self.out(previous)], False, None
        if kind == "each":
            return [self._element(parent, run)], False, None
        if kind in ("sequence", "parallel", "wrapper"):
            return [self.inp(parent)], False, None
        # an opaque step (a function, a graph node) computed its sub-call's input
        candidates = self._earlier_values(parent, run)
        candidates.append(self.inp(parent))
        texts = (self._done_texts[parent.id], self._input_texts(parent))
        return candidates, kind in ("step", "node"), texts

    # -- LangGraph -------------------------------------------------------------------

    def _nodes(self, graph: Run) -> list[Run]:
        """A graph run's node runs, by superstep (then start; kept)."""
        nodes = self._node_lists.get(graph.id)
        if nodes is None:
            steps = {c.id: _graph_step(c) for c in self.kids[graph.id]}
            nodes = sorted(
                (c for c in self.kids[graph.id] if steps[c.id] is not None),
                key=lambda n: (steps[n.id] or 0, n.start_time),
            )
            self._node_lists[graph.id] = nodes
        return nodes

    def _written(self, graph: Run, key: str, step: int | None) -> list[_Value]:
        """What the nodes of ``graph`` before superstep ``step`` (``None``: all)
        wrote to ``key``, in order. An index per key, extended as later steps are
        asked for: only nodes of earlier steps (which finished before) are read."""
        index = self._writers.get((graph.id, key))
        if index is None:
            index = self._writers[(graph.id, key)] = ([0], [], [])
        scanned, steps, values = index
        nodes = self._nodes(graph)
        while scanned[0] < len(nodes):
            node = nodes[scanned[0]]
            at = _graph_step(node) or 0
            if step is not None and at >= step:
                break
            scanned[0] += 1
            wrote = _succeeded(node) or _handoff(node) is not None
            if wrote and key in (written := self._writes(node)):
                steps.append(at)
                values.append(written[key])
        return values if step is None else values[: bisect.bisect_left(steps, step)]

    def _at_step(self, graph: Run, step: int) -> list[Run]:
        """The node runs of ``graph`` at superstep ``step``."""
        table = self._node_steps.get(graph.id)
        if table is None:
            table = self._node_steps[graph.id] = {}
            for node in self._nodes(graph):
                table.setdefault(_graph_step(node) or 0, []).append(node)
        return table.get(step, [])

    def _message_value(self, message: Any, written: bool = True) -> _Value | None:
        """The value a message of a graph's state is, by its id: an assistant
        message is the output of the chat-model run that made it (LangChain names it
        ``lc_run--<run id>``), a tool message the output of the tool run that
        returned it."""
        mid = _message_field(message, "id")
        if not isinstance(mid, str):
            return None
        match = _AI_ID.match(mid)
        if match is not None:
            try:
                made_by = self.by_id.get(UUID(match["run"]))
            except ValueError:
                made_by = None
            if made_by is not None and made_by.run_type in _MODEL_TYPES:
                made = self.out(made_by)
                # a node may replace a message by its id (add_messages) with
                # another text: then it is not that call's answer any more
                if made.matches(text_of(message)) or not _succeeded(made_by):
                    return made
                return self._written_id(mid, message) if written else None
        if self._tool_messages is None:
            self._tool_messages = {}
            for run in self.runs():
                output = (
                    _bare(run.outputs, "output") if run.run_type == "tool" else None
                )
                tool_mid = _message_field(output, "id") if output is not None else None
                if isinstance(tool_mid, str):
                    self._tool_messages[tool_mid] = run
        tool_run = self._tool_messages.get(mid)
        if tool_run is not None:
            result = self.out(tool_run)
            if result.matches(text_of(message)):
                return result
        return self._written_id(mid, message) if written else None

    def _written_id(self, mid: str, message: Any) -> _Value | None:
        """The value a node wrote as the message ``mid`` (when its text is the
        message's)."""
        value = self._written_ids.get(mid)
        return value if value is not None and value.matches(text_of(message)) else None

    def _state_element(self, element: Any, pool: list[_Value]) -> _Value:
        """A state list's element: the message it is (by id), else the latest value
        in ``pool`` with its text (each taken once: ``pool`` loses it), else a
        constant."""
        found = self._message_value(element)
        if found is not None:
            return found
        text = text_of(element)
        for i in range(len(pool) - 1, -1, -1):
            if pool[i].matches(text):
                return pool.pop(i)
        return _const(element)

    def _state_value(self, graph: Run, step: int | None, key: str, read: Any) -> _Value:
        """What a node of ``graph`` at superstep ``step`` (``None``: the final
        state) read as ``key``: by LangGraph's channel writes, the value the last
        node before that step wrote to it; for a list (a reducer such as
        ``add_messages`` or ``operator.add``), element by element, each element the
        value its writer wrote (messages by id); for another reduced value, computed
        from every write (the rule for non-LM steps)."""
        initial = (self.inp(graph).parts or {}).get(key)
        writers = self._written(graph, key, step)
        text = text_of(read)
        if isinstance(read, (list, tuple)) and read:
            pool: list[_Value] = []
            for value in [*([initial] if initial is not None else []), *writers]:
                pool.extend(value.parts.values() if value.parts else [value])
            if len(pool) == len(read) and all(
                v.matches(text_of(e)) for v, e in zip(pool, read, strict=True)
            ):  # a list reducer (operator.add): the writes, in order
                return _Value(text, parts={str(i): v for i, v in enumerate(pool)})
            return _Value(
                text,
                parts={
                    str(i): self._state_element(e, pool) for i, e in enumerate(read)
                },
            )
        if writers:
            if writers[-1].matches(text):
                return writers[-1]
            sources = [*([initial] if initial is not None else []), *writers]
            return self._computed(read, [(key, v) for v in sources], f"state {key}")
        if initial is not None and initial.matches(text):
            return initial
        return _const(read)

    def _node_input(self, graph: Run, node: Run) -> _Value:
        """A node's input: the state it read (key by key, see :meth:`_state_value`),
        or what a ``Send`` gave it (e.g. a ``ToolNode``'s tool calls: linked to the
        model call that made them)."""
        payload = _bare(node.inputs, "input")
        step = _graph_step(node)
        pushed = "__pregel_push" in (_metadata(node).get("langgraph_triggers") or ())
        if isinstance(payload, dict) and pushed and step is not None:
            # a Send's argument: made by a conditional edge from what the nodes of
            # the step before wrote (LangGraph records no more than the value)
            sources = [
                self.out(source)
                for source in self._at_step(graph, step - 1)
                if _succeeded(source)
            ]
            return self._derive(
                payload, [*sources, self.inp(graph)], node.name, opaque=True
            )
        if isinstance(payload, dict):
            parts = {
                str(k): self._state_value(graph, step, str(k), v)
                for k, v in payload.items()
            }
            return _Value(text_of(payload), parts=parts)
        owners = [
            self.out(owner)
            for call in (payload if isinstance(payload, list) else [payload])
            if isinstance(call, dict)
            and (owner := self._call_owner(call.get("id"), node)) is not None
        ]
        return self._derive(payload, [*owners, self.inp(graph)], node.name)

    def _call_owner(self, call_id: Any, before: Run) -> Run | None:
        """The chat-model run whose answer made the tool call ``call_id`` that
        ``before`` ran: of the runs that made a call with that id (a server may
        reuse ids across turns), the latest to end before ``before`` started."""
        if not isinstance(call_id, str):
            return None
        if self._call_owners is None:
            owners: dict[str, list[Run]] = {}
            for run in self.runs():
                if run.run_type in _MODEL_TYPES:
                    for call in _made_tool_calls(run):
                        if call.get("id"):
                            owners.setdefault(str(call["id"]), []).append(run)
            self._call_owners = owners
        ended = [
            run
            for run in self._call_owners.get(call_id, ())
            if run.end_time is not None and run.end_time <= before.start_time
        ]
        return max(ended, key=lambda r: r.end_time) if ended else None

    def _deciders(self, node: Run) -> list[Variable]:
        """The Variables that decided, through a conditional edge, that ``node``
        runs: what the node that the edge leaves from wrote, and the LM calls the
        edge's function made."""
        graph = self.parent.get(node.id)
        step = _graph_step(node)
        if graph is None or step is None:
            return []
        found: list[Variable] = []
        for source in self._at_step(graph, step - 1):
            if not _succeeded(source):
                continue
            for condition in self.kids[source.id]:
                if condition.name not in self.index.conditions or not _succeeded(
                    condition
                ):
                    continue
                if node.name not in _chosen(_bare(condition.outputs, "output")):
                    continue
                for value in self._writes(source).values():
                    found.extend(self.variables(value))
                found.extend(
                    var
                    for model in self._descendants(condition.id, exclude=condition)
                    if model.run_type in _MODEL_TYPES
                    and (var := self.out(model).var) is not None
                )
        return _unique(found)

    def _writes(self, node: Run) -> dict[str, _Value]:
        """What a node wrote, key by key: messages by id, other values derived from
        what the node computed (its sub-calls' outputs, its input); when a
        conditional edge chose the node, linked to what decided it too."""
        if node.id in self._writes_of:
            return self._writes_of[node.id]
        command = _handoff(node)
        if command is not None:
            # a handoff (Command(graph=PARENT, update=...)) from a subgraph: the node
            # failed with it, and what it wrote is computed from what ran inside
            updates = _updates_of(command)
            inside = [
                r
                for r in self._descendants(node.id, exclude=node)
                if _succeeded(r) and r.name not in self.index.conditions
            ]
            inside.sort(key=lambda r: r.end_time or r.start_time, reverse=True)
            candidates = [*(self.out(r) for r in inside), self.inp(node)]
        else:
            updates = _updates_of(_bare(node.outputs, "output"))
            results = [
                c for c in self._results(node) if c.name not in self.index.conditions
            ]
            candidates = [*(self.out(c) for c in results), self.inp(node)]
        writes: dict[str, _Value] = {}
        for key, value in updates.items():
            if isinstance(value, (list, tuple)) and value:
                parts = {}
                for i, element in enumerate(value):
                    found = self._message_value(element, written=False)
                    parts[str(i)] = found or self._derive(
                        element, candidates, node.name, opaque=True
                    )
                    mid = _message_field(element, "id")
                    if isinstance(mid, str) and not isinstance(element, dict):
                        # add_messages gives the written message its id in place
                        self._written_ids[mid] = parts[str(i)]
                writes[key] = _Value(text_of(value), parts=parts)
            else:
                writes[key] = self._written_value(node, key, value, candidates)
        deciding = self._deciders(node)
        if deciding:
            writes = {
                k: self._linked(v, deciding, node.name) for k, v in writes.items()
            }
        self._writes_of[node.id] = writes
        return writes

    def _written_value(
        self, node: Run, key: str, value: Any, candidates: list[_Value]
    ) -> _Value:
        """What ``node`` wrote to ``key`` (not a list). When one of its sub-calls
        produced that text: that output if the node did not read the same text
        under ``key``, or read it from an earlier visit of its own (a node in a
        cycle rewriting its key with the same text wrote its new value); when it
        also read that text from another node, both (the rule for non-LM steps: it
        may have passed the value through). Otherwise, the same key of what it read
        first (see :meth:`_derive`)."""
        text = text_of(value)
        own = [c for c in candidates[:-1] if any(v.matches(text) for v in c.walk())]
        if not own:
            return self._derive(value, candidates, node.name, key=key, opaque=True)
        read = (self.inp(node).parts or {}).get(key)
        if read is None or not read.matches(text) or self._own_write(node, key, read):
            return self._derive(value, own, node.name, opaque=True)
        return self._derive(value, [*own, read], node.name, opaque=True)

    def _own_write(self, node: Run, key: str, value: _Value) -> bool:
        """``value`` is what an earlier visit of ``node`` (a run of the same node
        in the same graph) wrote to ``key``."""
        graph = self.parent.get(node.id)
        if graph is None:
            return False
        return any(
            earlier is not node
            and earlier.name == node.name
            and (_graph_step(earlier) or 0) < (_graph_step(node) or 0)
            and self._writes_of.get(earlier.id, {}).get(key) is value
            for earlier in self._nodes(graph)
        )

    def _tool(self, run: Run) -> _Value:
        """A tool's result: computed from the model call that asked for it (by the
        tool call's id), so feedback on it reaches that call."""
        payload = _bare(run.outputs, "output")
        text = text_of(payload)
        owner = self._call_owner(_message_field(payload, "tool_call_id"), run)
        source = self.out(owner).var if owner is not None else None
        # a tool that runs its own chain: its result is also computed from those
        # sub-calls (the rule for non-LM steps: those whose text occurs in it)
        results = [self.out(c) for c in self._results(run)]
        inner = [v for v in results if v.text and v.text in text] or results
        sources = _unique(
            [*([source] if source is not None else []), *self._vars_of(inner)]
        )
        if not sources:
            return self._computed(payload, _inputs(self.inp(run)), run.name)
        var = StepOutput.apply(
            sources if len(sources) > 1 else sources[0],
            text,
            f"{run.name} tool",
            f"result of the {run.name} tool",
        )
        return _Value(text, var=var)

    def _vars_of(self, values: Iterable[_Value]) -> list[Variable]:
        return [var for value in values for var in self.variables(value)]

    def _each_positions(self, run: Run) -> dict[UUID, int]:
        """``.map()``: which element each child run processed (by the element's and
        the output's text, the earliest child first)."""
        if run.id in self._each:
            return self._each[run.id]
        elements = _parts_of(_bare(run.inputs, "input")) or {}
        outputs = _parts_of(_bare(run.outputs, "output")) or {}
        positions: dict[UUID, int] = {}
        free = list(range(len(elements)))
        children = [c for c in self.kids[run.id] if _succeeded(c)]
        for strict in (True, False):
            for child in children:
                if child.id in positions:
                    continue
                given = text_of(_bare(child.inputs, "input"))
                made = text_of(_bare(child.outputs, "output"))
                for i in free:
                    if text_of(elements[str(i)]) == given and (
                        not strict or text_of(outputs.get(str(i))) == made
                    ):
                        positions[child.id] = i
                        free.remove(i)
                        break
        self._each[run.id] = positions
        return positions

    def _element(self, parent: Run, run: Run) -> _Value:
        whole = self.inp(parent)
        position = self._each_positions(parent).get(run.id)
        if position is not None and whole.parts and str(position) in whole.parts:
            return whole.parts[str(position)]
        return whole

    def out(self, run: Run) -> _Value:
        """The value ``run`` produced."""
        if run.id not in self._out:
            self._out[run.id] = self._routed(run, self._produce(run))
        return self._out[run.id]

    def _routed(self, run: Run, value: _Value) -> _Value:
        """A ``RunnableBranch``'s output, also linked to the LM calls its conditions
        made (they chose the branch that produced it)."""
        if not _succeeded(run) or run.run_type in _MODEL_TYPES:
            return value
        deciding = _unique(
            var
            for condition in self.kids[run.id]
            if _is_condition(condition)
            for model in self._descendants(condition.id, exclude=condition)
            if model.run_type in _MODEL_TYPES
            and (var := self.out(model).var) is not None
        )
        return self._linked(value, deciding, run.name) if deciding else value

    def _linked(self, value: _Value, extra: list[Variable], step: str) -> _Value:
        """``value``, its feedback also going to ``extra`` (a prompt: as more of its
        sources; a dict or list: part by part)."""
        if value.prompt is not None:
            rendered = value.prompt
            sources = [*rendered.sources, *((ROUTING, var) for var in extra)]
            return _Value(
                value.text,
                prompt=_Rendered(rendered.run, rendered.token, sources),
                aliases=value.aliases,
            )
        if value.parts:
            parts = {k: self._linked(p, extra, step) for k, p in value.parts.items()}
            return _Value(value.text, parts=parts, aliases=value.aliases)
        sources = _unique([*self.variables(value), *extra])
        var = StepOutput.apply(
            sources if len(sources) > 1 else sources[0], value.text, step
        )
        return _Value(value.text, var=var, aliases=value.aliases)

    def _produce(self, run: Run) -> _Value:
        kind = self._kind(run)
        if kind == "model":
            return self._model(run)
        if not _succeeded(run):
            return _Value("")
        if kind == "prompt":
            return self._prompt(run)
        if kind == "tool":
            return self._tool(run)
        if kind == "node":
            writes = self._writes(run)
            return _Value(
                text_of(_updates_of(_bare(run.outputs, "output"))), parts=writes
            )
        if kind == "graph":
            final = _bare(run.outputs, "output")
            if isinstance(final, dict):
                parts = {
                    str(k): self._state_value(run, None, str(k), v)
                    for k, v in final.items()
                }
                return _Value(text_of(final), parts=parts)
        payload = _bare(run.outputs, "output")
        text = text_of(payload)
        if kind == "sequence":
            steps = self._steps(run)
            last = self.out(steps[max(steps)])
            if last.matches(text):
                return last
            return self._derive(payload, [last, self.inp(run)], run.name)
        if kind == "parallel" and isinstance(payload, dict):
            branches = {_key_of(c): c for c in self.kids[run.id] if _succeeded(c)}
            parts = {}
            for k, v in _parts_of(payload).items():  # type: ignore[union-attr]
                branch = branches.get(k)
                parts[k] = (
                    self.out(branch)
                    if branch is not None
                    else self._derive(v, [self.inp(run)], run.name, key=k)
                )
            return _Value(text, parts=parts)
        if kind == "each":
            positions = self._each_positions(run)
            outputs = _parts_of(payload) or {}
            by_position = {
                i: c
                for c in self.kids[run.id]
                if (i := positions.get(c.id)) is not None
            }
            if outputs and all(int(k) in by_position for k in outputs):
                return _Value(
                    text, parts={k: self.out(by_position[int(k)]) for k in outputs}
                )
        picked = self._picked(run, payload)
        if picked is not None:
            return picked
        results = self._results(run)
        if kind in ("wrapper", "each", "parallel"):
            candidates = [self.out(c) for c in results]
            return self._derive(payload, [*candidates, self.inp(run)], run.name)
        if kind == "step":  # a function returning what a sub-call returned
            for child in results:
                if self.out(child).matches(text):
                    return self.out(child)
        inputs = _inputs(self.inp(run))
        for child in results:
            inputs.extend(_inputs(self.out(child)))
        return self._computed(payload, inputs, run.name, wrap=kind == "parser")

    def _picked(self, run: Run, payload: Any) -> _Value | None:
        """``.pick("key")``'s output: that part of its input (its run is named
        ``RunnablePick<key>``; a dict output is matched key by key anyway)."""
        name = run.name
        if isinstance(payload, dict) or not (
            name.startswith("RunnablePick<") and name.endswith(">")
        ):
            return None
        key = name[len("RunnablePick<") : -1]
        part = (self.inp(run).parts or {}).get(key)
        return part if part is not None and part.matches(text_of(payload)) else None

    def _template_variables(self, run: Run, token: str | None) -> list[str] | None:
        kwargs = (run.serialized or {}).get("kwargs") or {}
        names = kwargs.get("input_variables")
        if isinstance(names, list):
            return [*map(str, names), *map(str, kwargs.get("optional_variables") or ())]
        prompt = self.index.prompts.get(token or "")
        if prompt is not None:
            return [*prompt.input_variables, *getattr(prompt, "optional_variables", ())]
        return None

    def _prompt(self, run: Run) -> _Value:
        token = _metadata(run).get(METADATA_KEY)
        output = _bare(run.outputs, "output")
        text = text_of(output)
        aliases = (output.to_string(),) if isinstance(output, PromptValue) else ()
        source = self.inp(run)
        names = self._template_variables(run, token)
        sources: list[tuple[str, Variable]] = []
        if names is None:  # an unknown template: the rule for non-LM steps
            items = _inputs(source)
            occurring = [(k, v) for k, v in items if v.text and v.text in text]
            for k, value in occurring or items:
                sources.extend(
                    (f"input:{k}" if k else "input", var)
                    for var in self.variables(value)
                )
        elif source.parts is not None:
            for k, part in source.parts.items():
                if k in names:
                    sources.extend((f"input:{k}", var) for var in self.variables(part))
        elif len(names) == 1:
            sources.extend((f"input:{names[0]}", var) for var in self.variables(source))
        rendered = _Rendered(run, token if isinstance(token, str) else None, sources)
        return _Value(text, prompt=rendered, aliases=aliases)

    def _site(self, run: Run) -> str:
        labels = []
        current: Run | None = run
        while current is not None:
            tag = next(
                (t for t in current.tags or () if t.startswith(_SITE_TAGS)), None
            )
            labels.append(f"{current.name} ({tag})" if tag else current.name)
            current = self.parent.get(current.id)
        return " > ".join(reversed(labels))

    def _model(self, run: Run) -> _Value:
        self.model_runs.append(run)
        feed = self.inp(run)
        variables: list[Variable] = []
        locations: list[str] = []

        def link(var: Variable, location: str) -> None:
            if all(var is not v for v in variables):
                variables.append(var)
                locations.append(location)

        if feed.prompt is not None:
            token = feed.prompt.token
            for location, param in self.index.parameters.get(token or "", ()):
                link(param, location)
            for location, var in feed.prompt.sources:
                link(var, location)
            if token not in self.index.prompts:
                first = feed.text.strip().splitlines()[0] if feed.text.strip() else ""
                excerpt = first if len(first) <= 60 else first[:57] + "..."
                found = UndiscoveredCall(
                    self._site(run), f'{feed.prompt.run.name} ("{excerpt}")'
                )
                self._undiscovered.append((run.dotted_order or "", found))
        graph_messages = feed.prompt is None and _in_graph(run)
        for location, var in self._message_links(run, graph_messages):
            link(var, location)
        for tool in offered_tools(run):  # the descriptions that offered each tool
            for location, param in self._tool_parameters(tool):
                link(param, location)
        if feed.prompt is None and not graph_messages:
            # messages made without a prompt: located by the key they came from
            key = self._feed_keys.get(run.id)
            for k, value in _inputs(feed):
                name = k or key
                for var in self.variables(value):
                    link(var, f"input:{name}" if name else "input")
        if (
            graph_messages
            and not offered_tools(run)
            and all(_message_role(m) != "system" for m in recorded_messages(run))
            and not any(v.is_leaf and v.requires_grad for v in variables)
        ):  # e.g. a middleware's own call (a summarizer) sending a plain prompt
            first = next(iter(conversation_of(run)), {}).get("content", "")
            head = first.strip().splitlines()[0] if first.strip() else ""
            excerpt = head if len(head) <= 60 else head[:57] + "..."
            self.untrained.append(
                (
                    run.dotted_order or "",
                    UndiscoveredCall(
                        self._site(run), f'prompt with no system message ("{excerpt}")'
                    ),
                )
            )
        if not _succeeded(run):
            return _Value("")
        var = RecordedChatCall.apply(
            backward_conversation(run),
            output_of(run),
            variables,
            locations,
            OUTPUT_ROLE,
        )
        return _Value(str(var.data), var=var)

    def _tool_parameters(self, tool: Mapping[str, Any]) -> list[tuple[str, Variable]]:
        """The Parameters of an offered tool: of the tool objects with its name, the
        one whose description (its Parameter's current text) is the one offered
        (all of them when that does not tell them apart)."""
        name = _tool_name(tool) or ""
        groups = list(self.index.tools.get(name, ()))
        if len(groups) > 1:
            function = tool.get("function")
            offered = (function if isinstance(function, dict) else tool).get(
                "description"
            )
            same = [
                group
                for group in groups
                if group
                and group[0][0] == f"tool:{name}"
                and str(group[0][1].data) == offered
            ]
            groups = same if len(same) == 1 else groups
        return [pair for group in groups for pair in group]

    def _message_links(self, run: Run, graph: bool) -> list[tuple[str, Variable]]:
        """The Variables behind a chat call's messages, by message: a trainable
        system message by its id (else the message Parameters whose text it
        contains); in a LangGraph node called on messages (no prompt), also an
        assistant message (the model call that made it) and a tool result (the tool
        run that returned it) by id, and every other message derived from what the
        node had at hand (its state, its earlier sub-calls)."""
        links: list[tuple[str, Variable]] = []
        system_seen = system_linked = False
        system_text = ""
        candidates: tuple[list[_Value], bool, tuple[set[str], ...] | None] | None = None
        for message in recorded_messages(run):
            role = _message_role(message)
            mid = _message_field(message, "id")
            text = _message_text(message)
            if role == "system":
                system_seen = True
                system_text = system_text or text
                params = list(self.index.messages.get(mid or "", ()))
                if not params:  # a message built on the call from their texts
                    params = [
                        (location, param)
                        for location, param in self.index.texts
                        if str(param.data).strip() and str(param.data) in text
                    ]
                system_linked = (
                    system_linked
                    or bool(params)
                    or mid in self.index.known_messages
                    or any(t.strip() and t in text for t in self.index.known_texts)
                )
                links.extend(params)
                if params or not graph:
                    continue
            if not graph:
                continue
            found = self._message_value(message)
            if found is None:
                parent = self.parent.get(run.id)
                if parent is None:
                    continue
                if candidates is None:
                    candidates = self._candidates(run, parent)
                values, opaque, _ = candidates
                found = self._derive(text, values, parent.name, opaque=opaque)
            where = {
                "assistant": "earlier answer of the model (its tool calls)",
                "tool": f"result of the {_message_field(message, 'name')} tool",
            }.get(role, f"{role} message")
            links.extend((where, var) for var in self.variables(found))
        if graph and system_seen and not system_linked:
            first = system_text.strip().splitlines()[0] if system_text.strip() else ""
            excerpt = first if len(first) <= 60 else first[:57] + "..."
            self.untrained.append(
                (
                    run.dotted_order or "",
                    UndiscoveredCall(self._site(run), f'system message ("{excerpt}")'),
                )
            )
        return links

    def _finish_order(self) -> list[Run]:
        """Every run, children before their parent, in the order they finished."""
        post: list[Run] = []
        stack: list[tuple[Run, bool]] = [(self.root, False)]
        while stack:
            run, expanded = stack.pop()
            if expanded:
                post.append(run)
                continue
            stack.append((run, True))
            stack.extend((c, False) for c in reversed(self.kids[run.id]))
        last = max((r.end_time for r in post if r.end_time is not None), default=None)
        return sorted(  # stable: a parent stays after a child that ended with it
            post, key=lambda r: r.end_time or last or r.start_time
        )

    def output(self, result: Any) -> Variable:
        # Values are computed in the order the runs finished: what a run's value
        # depends on (its children, the earlier steps and sub-calls that fed it)
        # finished before it, so it is already known and each value is computed
        # once, without recursing along a long sequence or loop of sub-calls. Every
        # LM call gets its node (and is counted).
        for run in self._finish_order():
            self.out(run)
        value = self.out(self.root)
        final = text_of(result)
        graph = self.index.graph or self._kind(self.root) == "graph"
        if graph and isinstance(result, dict) and value.parts is not None:
            value, final = self._graph_answer(value, result)
        if value.prompt is None and value.var is not None and value.matches(final):
            return value.var
        variables = self.variables(value)
        if not variables:
            return Variable(final, role="output of the chain")
        if len(variables) == 1 and str(variables[0].data) == final:
            return variables[0]
        return StepOutput.apply(
            variables if len(variables) > 1 else variables[0], final, "chain output"
        )

    def _graph_answer(
        self, state: _Value, result: dict[str, Any]
    ) -> tuple[_Value, str]:
        """The output of a graph call: the state key :attr:`PromptIndex.output_key`
        names; by default ``structured_response`` when the state has it (an agent
        with a ``response_format``), else the last of its ``messages`` (an agent's
        final answer), else the whole state."""
        key = self.index.output_key
        if key is None:
            key = next(
                (k for k in ("structured_response", "messages") if k in result), None
            )
        if key is None:
            return state, text_of(result)
        if key not in result:
            raise KeyError(
                f"output_key={key!r} is not a key of the graph's final state (its "
                f"keys: {sorted(map(str, result))}); pass one of them to trace()."
            )
        part = (state.parts or {}).get(key) or _const(result[key])
        value = result[key]
        if key == "messages" and isinstance(value, list) and value:
            last = str(len(value) - 1)
            return (part.parts or {}).get(last) or _const(value[-1]), text_of(value[-1])
        return part, text_of(value)


def build_graph(
    root: Run, strays: Sequence[Run], result: Any, index: PromptIndex
) -> TracedCall:
    """The afnio graph of one traced call: ``root`` is its root run, ``strays`` other
    root runs it caused, ``result`` what the chain returned."""
    graph = _Graph(root, strays, index)
    output = graph.output(result)
    model_runs = sorted(graph.model_runs, key=lambda r: r.dotted_order or "")
    undiscovered = [found for _, found in sorted(graph._undiscovered, key=_first)]
    untrained = [found for _, found in sorted(graph.untrained, key=_first)]
    return TracedCall(output, model_runs, undiscovered, graph.ambiguous, untrained)


def _first(pair: tuple[str, Any]) -> str:
    return pair[0]
