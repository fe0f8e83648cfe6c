"""Recording a DSPy program's predictor calls into an afnio graph, through DSPy
callbacks.

A :class:`CallCollector` is added to ``dspy.context(callbacks=...)`` for one program
call. For every ``Predict`` call it records the messages the LM received
(``on_lm_start``, linked to the owning ``Predict`` call through DSPy's
``ACTIVE_CALL_ID``), the LM's answer (``on_lm_end``) and the parsed Prediction
(``on_module_end``); when the call ends it becomes afnio nodes at once:

    instructions Parameter + linked inputs -> RecordedChatCall (the LM call, no LM call
    repeated) -> StepOutput per output field -> field Variables

Links by value
--------------
DSPy hands the program's code plain values, so the tracer links **by value**. The
*candidates* are the Variables of the program call: its inputs passed as Variables,
each prediction's raw LM answer and output fields, and ``AfnioModule`` outputs.

1. **Equal:** a text is linked to *every* candidate with exactly that text. This is
   an over-approximation: a prediction with an equal value is assumed to have
   contributed (a majority vote over several calls feeds back to each vote equal to
   it, not only to the last one).
2. **Composed:** with no equal candidate, to every predicted output field whose text
   occurs in it as a whole (not inside a longer word): a text the code composed of
   several predictions feeds back to each of them. For a predictor input, only when
   those texts make up the whole input, nothing but separators between them (no
   other letter: ``"; ".join(labels)``, a list of answers as JSON); free text that
   merely holds a label word is not linked.
3. **Upstream left out:** among candidates with the same text, one whose value
   reached another through linked inputs (rules 1 and 2, transitively: it is
   upstream of it) is dropped: it contributed through that one (in a pipeline whose
   two stages both answer ``neutral``, the output feeds back to the second stage,
   and through it to the first).

A **predictor input** is linked by these rules among the candidates **visible** to
its call (an input passed as a Variable is linked as itself); an ``AfnioModule``
input likewise, among those visible to the ``AfnioModule`` call. A **program
output** is linked by them among all the candidates of the call; if nothing equals
it or occurs in it (the code computed it, e.g. a count of votes), to every
prediction and ``AfnioModule`` output that no input took (a prediction by its raw
LM answer), else to the program's input Variables. One link is the output itself;
several are joined by one ``program output`` step whose feedback goes to each.

Visibility
----------
Which candidates can have fed a call is decided from the **call tree** of DSPy
module calls, never from which call happened to finish first. Take the producer's
call and the consumer's call, their nearest common ancestor, and the two children of
it that hold them (the two calls themselves when they are siblings). The producer
is visible only if

* neither call holds the other (a call still running cannot have fed one it made),
* the producer's side **ended before** the consumer's side started, and
* the two sides are not **concurrent siblings**: members of one block never see
  each other, even when one ended before the other started (on a thread another
  member freed, or one after the other: ``dspy.Parallel(num_threads=1)`` runs its
  members in turn on the parent's thread). A block is the members of one
  ``dspy.Parallel`` call (DSPy's ``ParallelExecutor``, recognized on the call stack
  of each member: the function it runs each member with, bound to the parent's
  call); calls a parent starts on other threads by other means form a block per
  thread pool (told apart by the names of its threads, ``<prefix>_<n>`` as
  ``ThreadPoolExecutor`` names them; threads named otherwise count as one pool)
  until the parent starts a call on its own thread.

A sibling started on the parent's thread outside a block (a loop, a pipeline, the
calls after a ``dspy.Parallel`` block) sees what ended before it started; with
``asyncio.gather`` all the gathered calls start before any of them ends, so they do
not see each other. Program inputs passed as Variables are visible to every call.

The set of links and their order never depend on which call finished first. Links
are ordered by the **call order** of the calls that produced them (program inputs
first; within one call, the raw LM answer, then the fields in order). The call order
is the order of the calls in the tree of DSPy module calls, each call placed among
the calls of its parent:

* a call started on its parent's thread (a loop, a pipeline, ``asyncio.gather``) by
  when it started, as the program's code started it;
* a call started on another thread (``dspy.Parallel``'s workers), where which one
  the thread scheduler starts first is chance, by its block (blocks in the order
  they started), then by content: the module's position in the program
  (``named_sub_modules()`` order), then its inputs as JSON; it comes after the
  same-thread calls its parent started before it and before the later ones. Calls
  equal in all of these (same module, same inputs) are ordered by when they
  started.

When the ChatAdapter falls back to the JSONAdapter, the answer that was parsed (the
last one) is recorded. Each LM request also holds one of afnio's request slots
(:func:`afnio._runtime.acquire_request_slot`), so DSPy's calls obey the same
concurrency bound as afnio's.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import re
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import dspy
from dspy.utils.callback import ACTIVE_CALL_ID, BaseCallback

from afnio._runtime import acquire_request_slot, in_runtime_thread
from afnio._variable import Variable
from afnio_integrations._recorded import RecordedChatCall, StepOutput

__all__ = ["CallCollector", "PredictorSlot", "active_collector", "field_text"]

_ACTIVE: contextvars.ContextVar[CallCollector | None] = contextvars.ContextVar(
    "afnio_dspy_collector", default=None
)


def active_collector() -> CallCollector | None:
    """The collector of the traced program call running in this context, if any
    (also found in DSPy's callbacks, which DSPy carries into its own worker threads,
    e.g. ``dspy.Parallel``)."""
    found = _ACTIVE.get()
    if found is None:
        callbacks = dspy.settings.callbacks or []
        found = next(
            (c for c in reversed(callbacks) if isinstance(c, CallCollector)), None
        )
    return found


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def field_text(value: Any) -> str:
    """A field value as text (JSON for structured values, like DSPy's adapters)."""
    if isinstance(value, str):
        return value
    if hasattr(value, "model_dump"):
        return json.dumps(value.model_dump(), default=str)
    if isinstance(value, bool | int | float):
        return str(value)
    try:
        return json.dumps(value, default=str)
    except TypeError:
        return str(value)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part.get("text", "") if isinstance(part, dict) else str(part)
            for part in content
            if not isinstance(part, dict) or part.get("type", "text") == "text"
        )
    return "" if content is None else str(content)


def _conversation(messages: Any, prompt: Any) -> list[dict[str, str]]:
    if messages:
        return [
            {
                "role": str(m.get("role", "user")),
                "content": _content_text(m.get("content")),
            }
            for m in messages
            if isinstance(m, Mapping)
        ]
    return [{"role": "user", "content": _content_text(prompt)}]


def _output_text(outputs: Any) -> str:
    first = outputs[0] if isinstance(outputs, list) and outputs else outputs
    if isinstance(first, dict):
        return str(first.get("text") or json.dumps(first, default=str))
    text = getattr(first, "text", None)  # an lm15 Response
    if isinstance(text, str):
        return text
    return "" if first is None else str(first)


@dataclass
class PredictorSlot:
    """One predictor of a traced program: its name, the Predict object and the
    Parameters that hold its instructions (and, optionally, output-field
    descriptions)."""

    name: str
    predictor: Any
    instructions: Variable
    descriptions: dict[str, Variable] = field(default_factory=dict)


_LinkKey = tuple[Any, ...]
"""The order of a produced Variable among the links: ``(group, call path, start,
index)``, compared as a tuple (see the module docstring)."""


def _stable_text(value: Any) -> str:
    """``value`` as canonical JSON (sorted keys; other objects as :func:`field_text`),
    the content that orders calls started on other threads."""
    try:
        return json.dumps(value, default=field_text, sort_keys=True)
    except (TypeError, ValueError):
        return str(value)


_POOL_THREAD = re.compile(r"^(.+)_\d+$")


def _parallel_codes() -> tuple[Any, Any]:
    """The code of the function DSPy's ``ParallelExecutor`` runs each item with (it
    binds the caller's ``ACTIVE_CALL_ID``) and of its caller (``safe_func``, which
    holds that function); ``None`` where this DSPy version has no such code."""
    try:
        from dspy.utils import callback_context
        from dspy.utils.parallelizer import ParallelExecutor

        bound = callback_context._bind_active_call_id(lambda: None).__code__
        safe = ParallelExecutor(num_threads=1)._wrap_function(lambda x: x).__code__
    except Exception:  # another DSPy: blocks are told apart by threads only
        return None, None
    if "parent_call_id" not in bound.co_freevars:
        return None, None
    return bound, safe


_BOUND_CODE, _SAFE_CODE = _parallel_codes()


def _parallel_block(parent_id: str | None) -> Any:
    """The block (an object: the function DSPy's ``ParallelExecutor`` runs each item
    with, one per ``dspy.Parallel`` call) the module call starting now is a member
    of, when its innermost ``ParallelExecutor`` item on the call stack was started
    by the call ``parent_id``, its parent; else ``None``."""
    if _BOUND_CODE is None:
        return None
    frame = sys._getframe(2)
    while frame is not None and frame.f_code is not _BOUND_CODE:
        frame = frame.f_back
    if frame is None:
        return None
    scope = frame.f_locals
    if scope.get("parent_call_id") != parent_id:
        return None  # a member's own sub-call (e.g. ChainOfThought's Predict)
    caller = frame.f_back
    if caller is not None and caller.f_code is _SAFE_CODE:
        held = caller.f_locals.get("user_function")
        if held is not None:  # one per ParallelExecutor.execute call
            return held
    return scope.get("fn")


def _pool_of(thread: threading.Thread) -> str:
    """The thread pool a thread belongs to, by its name (``<prefix>_<n>``, as
    ``ThreadPoolExecutor`` names its threads); ``""`` for a thread named otherwise
    (all such threads count as one pool)."""
    found = _POOL_THREAD.match(thread.name)
    return found[1] if found else ""


@dataclass(eq=False)
class _Node:
    """A DSPy module call in the call tree: its path (see :meth:`CallCollector.
    on_module_start`), its parent, the thread it started on, when it started and
    ended (ticks of the collector's clock), how many calls it started on its own
    thread, and its block when it has one (a ``dspy.Parallel`` member, or a call
    started on another thread than its parent's; see the module docstring,
    "Visibility")."""

    path: tuple[Any, ...]
    thread: int
    start: int
    parent: _Node | None = None
    block: tuple[Any, ...] | None = None  # see CallCollector.on_module_start
    end: int | None = None
    children: int = 0
    blocks: dict[tuple[Any, ...], int] = field(default_factory=dict)  # -> ordinal
    added: int = 0  # Variables added from this call (``AfnioModule`` outputs)
    inputs: set[int] = field(default_factory=set)  # producers its inputs came from

    def ancestry(self) -> list[_Node]:
        """This node, its parent, ... up to the root."""
        chain: list[_Node] = []
        node: _Node | None = self
        while node is not None:
            chain.append(node)
            node = node.parent
        return chain


def _sees(producer: _Node, consumer: _Node) -> bool:
    """Whether the call of ``producer`` can have fed the call of ``consumer`` (see
    the module docstring, "Visibility"): neither holds the other, and below their
    nearest common ancestor the producer's side ended before the consumer's side
    started and the two are not concurrent siblings of one block."""
    chain = producer.ancestry()
    index = {id(n): k for k, n in enumerate(chain)}
    below = consumer  # the consumer's side
    for node in consumer.ancestry():
        k = index.get(id(node))
        if k is not None:
            if node is producer or node is consumer:
                return False
            side = chain[k - 1]  # the producer's side
            if side.end is None or side.end > below.start:
                return False
            return side.block is None or side.block != below.block
        below = node
    return False  # in another tree (cannot happen: one root)


@dataclass
class _Call:
    predictor: Any
    inputs: dict[str, Any]
    node: _Node  # the consumer: its inputs are linked among what it sees
    conversation: list[dict[str, str]] | None = None
    output: str | None = None


@dataclass
class _Entry:
    """A Variable produced (or seeded) during the program call, with its text, its
    link order, what it is and which producer made it: a program input, a
    prediction (its raw answer and its fields) or an ``AfnioModule`` output."""

    text: str
    var: Variable
    key: _LinkKey
    kind: Literal["seed", "completion", "field", "added"]
    producer: int = -1
    node: _Node | None = None  # the producer's call (``None``: a program input)
    tick: int = 0  # the collector's clock when it was recorded


class CallCollector(BaseCallback):
    """Builds the afnio graph of one program call (see the module docstring).

    Args:
        slots: the traced predictors, by ``id`` of their Predict object and of its
            signature class (unique per traced predictor).
        seed: (text, Variable) pairs the program's inputs may be linked to.
        on_lm_call: called with the model name after every LM call.
        positions: the position of each of the program's modules, by ``id`` (the
            ``named_sub_modules()`` order): orders the calls started on other
            threads.
    """

    def __init__(
        self,
        slots: Mapping[int, PredictorSlot],
        seed: list[tuple[str, Variable]] | None = None,
        on_lm_call: Callable[[str | None], None] | None = None,
        positions: Mapping[int, int] | None = None,
    ) -> None:
        self.slots = slots
        self.positions = dict(positions or {})
        self.calls = 0
        self.errors: list[BaseException] = []
        # predictors called but not traced (created at run time): key -> name
        self.untraced: dict[tuple[str, ...], str] = {}
        self._on_lm_call = on_lm_call
        self._entries: list[_Entry] = [
            _Entry(text, var, (0, (), k, 0), "seed", k)
            for k, (text, var) in enumerate(seed or [])
        ]
        self._producers = len(self._entries)
        self._consumed: set[int] = set()  # producers whose output a later call took
        # producer -> the producers its inputs were linked to
        self._inputs: dict[int, frozenset[int]] = {}
        self._parents: dict[str, str | None] = {}
        self._clock = 0  # ticks at every module call's start and end
        # the program is called on the thread that creates the collector
        self._root = _Node((), threading.get_ident(), 0)
        self._nodes: dict[str, _Node] = {}
        self._predicts: dict[str, _Call] = {}
        self._held: dict[int, Any] = {}  # the objects that identify blocks
        self._lm_owner: dict[str, str | None] = {}
        self._lm_model: dict[str, str] = {}
        self._releases: dict[str, Callable[[], None]] = {}
        self._lock = threading.RLock()

    # -- DSPy hooks ----------------------------------------------------------------

    def on_module_start(
        self, call_id: str, instance: Any, inputs: dict[str, Any]
    ) -> None:
        """Place the call in the call tree. Its path is its parent's path plus one
        step: ``(n, 1, ())`` for the n-th call its parent started on the parent's own
        thread; ``(n, 0, b, content)`` for a call started on another thread after n
        such calls, in the parent's b-th block (``content``: the module's position,
        class name and inputs). Its block (see the module docstring): ``("parallel",
        id)`` for a member of a ``dspy.Parallel`` call (on any thread), ``("pool", n,
        pool)`` for another call started on another thread, else ``None``."""
        parent_id = ACTIVE_CALL_ID.get()
        current = threading.current_thread()
        thread = current.ident or threading.get_ident()
        content: tuple[Any, ...] = ()
        member = _parallel_block(parent_id)
        with self._lock:
            parent = self._nodes.get(parent_id or "", self._root)
        if thread != parent.thread:  # computed outside the lock: inputs may be big
            position = self.positions.get(id(instance), len(self.positions))
            content = (position, type(instance).__name__, _stable_text(inputs))
        with self._lock:
            self._parents[call_id] = parent_id
            block: tuple[Any, ...] | None = None
            if member is not None:
                self._held.setdefault(id(member), member)  # its id stays its own
                block = ("parallel", id(member))
            elif thread != parent.thread:
                block = ("pool", parent.children, _pool_of(current))
            if thread == parent.thread:
                step: tuple[Any, ...] = (parent.children, 1, ())
                parent.children += 1
            else:
                assert block is not None
                ordinal = parent.blocks.setdefault(block, len(parent.blocks))
                step = (parent.children, 0, ordinal, content)
            self._clock += 1
            node = _Node((*parent.path, step), thread, self._clock, parent, block)
            self._nodes[call_id] = node
            if isinstance(instance, dspy.Predict):
                kwargs = dict(inputs.get("kwargs") or {})
                self._predicts[call_id] = _Call(instance, kwargs, node)

    def on_module_end(
        self, call_id: str, outputs: Any | None, exception: Exception | None = None
    ) -> None:
        with self._lock:
            call = self._predicts.pop(call_id, None)
        try:
            if call is not None and exception is None and outputs is not None:
                self._record(call, outputs)
        except Exception as e:  # DSPy would only log it: re-raised after the call
            self.errors.append(e)
        finally:
            with self._lock:  # after its outputs are recorded
                node = self._nodes.get(call_id)
                if node is not None and node.end is None:
                    self._clock += 1
                    node.end = self._clock

    def _child(self, call_id: str) -> None:
        with self._lock:
            self._parents[call_id] = ACTIVE_CALL_ID.get()

    def on_adapter_format_start(
        self, call_id: str, instance: Any, inputs: dict[str, Any]
    ) -> None:
        self._child(call_id)

    def on_adapter_parse_start(
        self, call_id: str, instance: Any, inputs: dict[str, Any]
    ) -> None:
        self._child(call_id)

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        owner = self._owner(ACTIVE_CALL_ID.get())
        with self._lock:
            self._lm_owner[call_id] = owner
            self._lm_model[call_id] = str(getattr(instance, "model", "") or "unknown")
            if owner is not None:
                self._predicts[owner].conversation = _conversation(
                    inputs.get("messages"), inputs.get("prompt")
                )
        # An async program's LM call starts on its event loop: blocking there could
        # deadlock, so such calls are not held to the bound.
        if not in_runtime_thread() and not _in_event_loop():
            release = acquire_request_slot()
            with self._lock:
                self._releases[call_id] = release

    def on_lm_end(
        self, call_id: str, outputs: Any | None, exception: Exception | None = None
    ) -> None:
        with self._lock:
            release = self._releases.pop(call_id, None)
            owner = self._lm_owner.pop(call_id, None)
            model = self._lm_model.pop(call_id, None)
            self.calls += 1
            if exception is None and owner in self._predicts:
                self._predicts[owner].output = _output_text(outputs)
        if release is not None:
            release()
        if self._on_lm_call is not None:
            self._on_lm_call(model)

    def release_all(self) -> None:
        """Give back every request slot still held (a call that never ended)."""
        with self._lock:
            releases, self._releases = list(self._releases.values()), {}
        for release in releases:
            release()

    # -- the graph -----------------------------------------------------------------

    def _owner(self, call_id: str | None) -> str | None:
        """The nearest enclosing Predict call of ``call_id``."""
        with self._lock:
            seen = 0
            while call_id is not None and seen < 10_000:
                if call_id in self._predicts:
                    return call_id
                call_id = self._parents.get(call_id)
                seen += 1
        return None

    def activate(self) -> contextvars.Token[CallCollector | None]:
        """Make this collector the active one in the current context."""
        return _ACTIVE.set(self)

    @staticmethod
    def deactivate(token: contextvars.Token[CallCollector | None]) -> None:
        _ACTIVE.reset(token)

    def add(self, text: str, var: Variable) -> None:
        """Record a Variable produced during the call by the module call running now
        (an ``AfnioModule``): later inputs and the program output link to it."""
        with self._lock:
            node = self._current()
            key = (1, node.path, node.start, node.added)
            node.added += 1
            self._new_producer([_Entry(text, var, key, "added")], node)

    def _current(self) -> _Node:
        """The node of the DSPy module call running in this context."""
        with self._lock:
            return self._nodes.get(ACTIVE_CALL_ID.get() or "", self._root)

    def _new_producer(self, entries: list[_Entry], node: _Node) -> None:
        """Record ``entries`` as the outputs of one new producer, the call of
        ``node``."""
        with self._lock:
            producer = self._producers
            self._producers += 1
            self._inputs[producer] = frozenset(node.inputs)
            for entry in entries:
                entry.producer = producer
                entry.node = node
                entry.tick = self._clock
            self._entries.extend(entries)

    def _visible(self, consumer: _Node | None) -> list[_Entry]:
        """The entries the call of ``consumer`` can have taken as inputs (see the
        module docstring, "Visibility"); every entry for ``None`` (the program
        output, made when every call has ended)."""
        with self._lock:
            entries = list(self._entries)
        if consumer is None:
            return entries
        seen: dict[int, bool] = {}
        out = []
        for entry in entries:
            if entry.node is None:  # a program input
                out.append(entry)
                continue
            if entry.producer not in seen:
                if entry.node is self._root:  # added outside any module call
                    seen[entry.producer] = entry.tick < consumer.start
                else:
                    seen[entry.producer] = _sees(entry.node, consumer)
            if seen[entry.producer]:
                out.append(entry)
        return out

    def _upstream(self, producers: set[int]) -> set[int]:
        """Every producer whose output reached the inputs of one of ``producers``,
        through links of inputs (transitively)."""
        with self._lock:
            stack = [
                p for producer in producers for p in self._inputs.get(producer, ())
            ]
            reached: set[int] = set()
            while stack:
                producer = stack.pop()
                if producer not in reached:
                    reached.add(producer)
                    stack.extend(self._inputs.get(producer, ()))
        return reached

    def _ordered(self, entries: list[_Entry]) -> list[_Entry]:
        """``entries`` in link order, each Variable once, without those upstream of
        another entry with the same text (they contributed through it)."""
        texts: dict[str, set[int]] = {}
        for entry in entries:
            texts.setdefault(entry.text, set()).add(entry.producer)
        upstream = {
            text: self._upstream(producers) for text, producers in texts.items()
        }
        out: list[_Entry] = []
        seen: set[int] = set()
        for entry in sorted(entries, key=lambda e: e.key):
            if id(entry.var) not in seen and entry.producer not in upstream[entry.text]:
                seen.add(id(entry.var))
                out.append(entry)
        return out

    def _equal(self, text: str, consumer: _Node | None) -> list[_Entry]:
        return self._ordered([e for e in self._visible(consumer) if e.text == text])

    def _composing(
        self, text: str, consumer: _Node | None, whole: bool
    ) -> list[_Entry]:
        found: list[_Entry] = []
        occurs: dict[str, str | None] = {}  # piece -> its pattern, if it occurs
        for entry in self._visible(consumer):
            piece = entry.text
            if entry.kind != "field" or not piece.strip() or piece not in text:
                continue
            if piece not in occurs:
                pattern = rf"(?<!\w){re.escape(piece)}(?!\w)"
                occurs[piece] = pattern if re.search(pattern, text) else None
            if occurs[piece] is not None:
                found.append(entry)
        if whole and found:  # nothing but separators may remain: no letter
            patterns = sorted((p for p in occurs.values() if p), key=len, reverse=True)
            rest = re.sub("|".join(patterns), "", text)
            if re.search(r"[^\W\d_]", rest):
                return []
        return self._ordered(found)

    def find(self, text: str) -> list[Variable]:
        """Every Variable produced (or seeded) with exactly ``text``, in link order,
        but those upstream of another one (see the module docstring)."""
        return [e.var for e in self._equal(text, None)]

    def composed_of(self, text: str, whole: bool = False) -> list[Variable]:
        """The predicted field Variables whose text occurs in ``text`` as a whole
        (not inside a longer word): a text composed of several predictions, in link
        order, as :meth:`find` gives them. With ``whole=True``, none unless they
        make up all of ``text`` (what remains between them holds no letter)."""
        return [e.var for e in self._composing(text, None, whole)]

    def link_input(self, text: str) -> list[Variable]:
        """The Variables an input with ``text`` of the module call running now (an
        ``AfnioModule``) is linked to, among those visible to that call (see the
        module docstring): every equal one, else the predictions it is made of (see
        :meth:`find`, :meth:`composed_of` with ``whole=True``)."""
        return self._link(text, self._current())

    def _link(self, text: str, node: _Node) -> list[Variable]:
        """:meth:`link_input` for the call of ``node``: the linked producers count as
        consumed (see :meth:`frontier`) and as the call's inputs."""
        entries = self._equal(text, node) or self._composing(text, node, True)
        with self._lock:
            for entry in entries:
                self._consumed.add(entry.producer)
                node.inputs.add(entry.producer)
        return [e.var for e in entries]

    def frontier(self) -> list[Variable]:
        """The output of every producer whose output no input took (a prediction's
        raw LM answer, an ``AfnioModule`` output), in link order; the seeded program
        inputs when nothing was produced."""
        with self._lock:
            entries = list(self._entries)
            consumed = set(self._consumed)
        last = [
            e
            for e in entries
            if e.kind in ("completion", "added") and e.producer not in consumed
        ]
        if not any(e.kind != "seed" for e in entries):
            last = [e for e in entries if e.kind == "seed"]
        return [e.var for e in self._ordered(last)]

    def _record(self, call: _Call, outputs: Any) -> None:
        slot = self.slots.get(id(call.predictor)) or self.slots.get(
            id(call.predictor.signature)  # a copy made by the program (BestOfN...)
        )
        variables: list[Variable] = []
        locations: list[str] = []
        if slot is not None:
            variables.append(slot.instructions)
            locations.append("system")
            for var in slot.descriptions.values():
                variables.append(var)
                locations.append("system")
        linked = {id(v) for v in variables}
        for key, value in call.inputs.items():
            found = (
                [value]
                if isinstance(value, Variable)
                else self._link(field_text(value), call.node)
            )
            for var in found:
                if id(var) not in linked:
                    linked.add(id(var))
                    variables.append(var)
                    locations.append(f"input:{key}")
        if slot is not None:
            name = slot.name
        else:  # created at run time: no Parameter (the traced program warns)
            name = _untraced_name(call.predictor)
            with self._lock:
                self.untraced.setdefault(_untraced_key(call.predictor), name)
        conversation = call.conversation or [
            {"role": "user", "content": field_text(call.inputs)}
        ]
        fields = dict(outputs.items()) if hasattr(outputs, "items") else {}
        output = call.output
        if output is None:  # no LM answer seen (a custom LM without callbacks)
            output = "\n".join(f"{k}: {field_text(v)}" for k, v in fields.items())
        completion = RecordedChatCall.apply(
            conversation,
            output,
            variables,
            locations,
            f"response of the LM of DSPy predictor {name}",
        )
        base = (1, call.node.path, call.node.start)
        entries = [_Entry(output, completion, (*base, 0), "completion")]
        for k, (key, value) in enumerate(fields.items(), start=1):
            text = field_text(value)
            var = StepOutput.apply(
                completion,
                text,
                f"parse of the `{key}` field",
                f"`{key}` field predicted by DSPy predictor {name}",
            )
            entries.append(_Entry(text, var, (*base, k), "field"))
        self._new_producer(entries, call.node)


def _untraced_key(predictor: Any) -> tuple[str, ...]:
    """What tells untraced predictors apart: class, signature and instructions."""
    signature = getattr(predictor, "signature", None)
    return (
        type(predictor).__name__,
        str(getattr(signature, "signature", "")),
        str(getattr(signature, "instructions", "")),
    )


def _untraced_name(predictor: Any) -> str:
    """An untraced predictor in words: ``Predict(question -> answer)``, with the
    start of its instructions."""
    kind, fields, instructions = _untraced_key(predictor)
    head = " ".join(instructions.split())
    head = head if len(head) <= 60 else head[:57] + "..."
    return f"{kind}({fields})" + (f" instructed {head!r}" if head else "")
