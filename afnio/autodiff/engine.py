"""The backward engine.

Invariants (the whole contract in two lines):

* a leaf's gradients are **appended** to its ``.grad``, one entry per path and per
  call, never summed; a non-leaf keeps its (combined) gradient only after
  ``retain_grad()``;
* the graph is freed after the pass unless ``retain_graph=True``; going through a
  freed graph again raises before any work is done.

Phases: (1) discover the graph from the roots, counting each node's incoming edges;
(2) a node runs once all its incoming gradients have arrived (several gradients for
one output are combined into one Variable), and **all ready nodes run at once**,
bounded by :func:`afnio.set_max_concurrency`; (3) only when every node has succeeded
are leaf gradients appended, so a failed pass (an LM error, say) changes no ``.grad``
and frees nothing: it can simply be retried.

Nodes with no incoming gradient at all are skipped (no LM call is made for them),
and with ``inputs=`` only nodes that lead to one of the inputs run.

How a node's ``backward`` is called: ``async def`` ones as tasks on afnio's loop; plain
ones directly on the loop (a few microseconds a node), unless the Function declares
``blocking = True`` (then in a worker thread). A plain ``backward`` of a Function that
declares nothing runs in a worker thread on its first call, which tells whether it
makes synchronous afnio calls (``model.chat()``), itself or from threads it waits on;
if so the Function is treated as blocking. A synchronous afnio call made inside a
backward running on the loop raises :class:`_InlineBlocked` before anything is sent;
the engine then re-runs that backward in a worker thread (see ``Function.blocking``).
A backward on the loop that waits for *another thread's* afnio call (a thread pool
running ``model.chat``) holds the loop that call needs: once that call has waited
``afnio._runtime.STALL_WARNING_S`` for one such backward, it raises a
``RuntimeError`` naming the Function and ``blocking = True``, which frees the
backward, and the engine re-runs the backward in a worker thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import inspect
import logging
import os
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from time import monotonic as _monotonic
from typing import Any

from afnio import _runtime as _runtime_module
from afnio._runtime import _runtime, run_async, run_sync
from afnio._variable import Variable
from afnio.autodiff.config import IDENTITY_GRADIENT_DATA
from afnio.autodiff.function import BackwardFunction, _needs_override
from afnio.autodiff.grad_mode import _grad_enabled
from afnio.autodiff.graph import AccumulateGrad, GradientEdge, Node
from afnio.autodiff.grouping import Grouper, NodeSlot
from afnio.autodiff.provenance import (
    Basis,
    _call_samples_of,
    _common_basis,
    _has_sources,
    _merged_basis,
    _merged_source,
    _set_recorded,
    _union,
    bases_of,
    basis_of,
    set_sources,
    sources_of,
)
from afnio.models.phases import lm_phase

__all__ = ["abackward", "backward"]

logger = logging.getLogger("afnio.autodiff")

_executor: ThreadPoolExecutor | None = None

_FREED_MESSAGE = (
    "Trying to backward through the graph a second time: it was freed by the first "
    ".backward() call (node {name}). Pass retain_graph=True to the first "
    ".backward() call if you need to backward through the graph again."
)


def _reset_pool_after_fork() -> None:
    global _executor
    _executor = None  # the parent's threads do not exist in the child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pool_after_fork)


def _thread_pool() -> ThreadPoolExecutor:
    # Threads are created on demand; the concurrency bound limits how many run.
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=256, thread_name_prefix="afnio-bw")
    return _executor


def _as_list(value: Any, name: str) -> list[Any]:
    if isinstance(value, (Variable, GradientEdge)):
        return [value]
    if isinstance(value, str):
        raise TypeError(
            f"`{name}` must be a Variable or a sequence of them, got a str. Wrap the "
            f"text: afnio.Variable({value[:20]!r}, role='feedback')."
        )
    if isinstance(value, Sequence):
        return list(value)
    raise TypeError(
        f"`{name}` must be a Variable or a sequence of Variables, got "
        f"{type(value).__name__}."
    )


def _default_gradient(root: Variable, i: int) -> Variable:
    node = root.grad_fn
    is_evaluator = (
        isinstance(node, BackwardFunction) and node._forward_cls._is_evaluator
    )
    if not is_evaluator and isinstance(root.data, list):
        raise RuntimeError(
            f"A gradient can be created implicitly only for scalar Variables and "
            f"evaluator outputs; element {i} of `variables` is a batch. Pass its "
            "feedback explicitly: .backward(afnio.Variable([...], role='feedback'))."
        )
    return Variable(IDENTITY_GRADIENT_DATA, role=f"feedback to {root.role}")


class _Pass:
    """The state of one backward pass (built in the caller's thread, run on the
    loop)."""

    def __init__(
        self,
        roots: list[Variable],
        grads: list[Variable],
        retain_graph: bool,
        create_graph: bool,
        targets: set[AccumulateGrad] | None,
    ) -> None:
        self.retain_graph = retain_graph
        self.create_graph = create_graph
        self.targets = targets
        self.order: dict[Node, int] = {}
        self.deps: dict[Node, int] = {}
        self.buffers: dict[Node, dict[int, list[tuple[tuple[int, int], Variable]]]] = {}
        self.leaf_grads: list[tuple[tuple[int, int], Variable, Variable]] = []
        self.retained: list[tuple[Variable, Variable]] = []
        self.needed: set[Node] | None = None
        # each running node's incoming gradients, for provenance defaults
        self.incoming: dict[Node, list[Variable | None]] = {}

        for i, (root, grad) in enumerate(zip(roots, grads, strict=True)):
            node = root.grad_fn
            assert node is not None
            self._visit(node)
            slot = self.buffers.setdefault(node, {}).setdefault(root.output_nr, [])
            slot.append(((-1, i), grad))
        self._discover()
        if targets is not None:
            self.needed = self._needed_nodes(targets)

    def _visit(self, node: Node) -> None:
        if node in self.order:
            return
        if isinstance(node, BackwardFunction):
            if node._freed:
                raise RuntimeError(_FREED_MESSAGE.format(name=node.name()))
        elif not isinstance(node, AccumulateGrad):
            raise TypeError(
                f"The backward graph holds a {type(node).__name__}; only Function "
                "nodes and AccumulateGrad are supported."
            )
        self.order[node] = len(self.order)
        self.deps.setdefault(node, 0)

    def _discover(self) -> None:
        # breadth-first, edges in argument order: node indices (and so the order of
        # the gradients a leaf receives) follow the order of the inputs
        queue = collections.deque(self.order)
        seen = set(queue)
        while queue:
            node = queue.popleft()
            for edge in node._next_functions:
                nxt = edge.node
                if nxt is None or isinstance(nxt, AccumulateGrad):
                    continue
                self._visit(nxt)
                self.deps[nxt] += 1
                if nxt not in seen:
                    seen.add(nxt)
                    queue.append(nxt)

    def _needed_nodes(self, targets: set[AccumulateGrad]) -> set[Node]:
        # Kahn order from the roots, then walk it backwards (leaves first).
        deps = dict(self.deps)
        queue = collections.deque(n for n in self.order if deps[n] == 0)
        topo: list[Node] = []
        while queue:
            node = queue.popleft()
            topo.append(node)
            for edge in node._next_functions:
                nxt = edge.node
                if nxt is not None and not isinstance(nxt, AccumulateGrad):
                    deps[nxt] -= 1
                    if deps[nxt] == 0:
                        queue.append(nxt)
        needed: set[Node] = set()
        for node in reversed(topo):
            if any(
                e.node is not None and (e.node in targets or e.node in needed)
                for e in node._next_functions
            ):
                needed.add(node)
        return needed

    # -- per-node work -------------------------------------------------------------

    def needs_for(self, node: BackwardFunction) -> tuple[bool, ...]:
        """``needs_input_grad`` restricted to slots that lead to an ``inputs`` leaf."""
        assert self.targets is not None and self.needed is not None
        out = []
        for need, e in zip(node._needs_input_grad, node._slot_edges, strict=True):
            nxt = node._next_functions[e].node if e is not None else None
            out.append(
                need and nxt is not None and (nxt in self.targets or nxt in self.needed)
            )
        return tuple(out)

    def gather(self, node: BackwardFunction) -> list[Variable | None] | None:
        """The node's gradients, one per output, or None if nothing arrived."""
        buf = self.buffers.pop(node, None)
        if not buf:
            return None
        grads: list[Variable | None] = []
        for i, (role, length) in enumerate(node._output_meta):
            entries = buf.get(i)
            if entries:
                entries.sort(key=lambda e: e[0])
                combined = _combine([g for _, g in entries], role, length)
                ref = node._retained.get(i)
                retained = ref() if ref is not None else None
                if retained is not None:
                    self.retained.append((retained, combined))
                grads.append(combined)
            elif node._materialize_grads:
                empty: Any = [""] * length if length is not None else ""
                grads.append(Variable(empty, role=f"feedback to {role}"))
            else:
                grads.append(None)
        self.incoming[node] = grads
        return grads

    def finish(
        self, node: Node, result: Sequence[Variable | None] | None
    ) -> list[Node]:
        """Route a node's input gradients along its edges; return newly ready nodes."""
        ready: list[Node] = []
        idx = self.order[node]
        slot_edges = node._slot_edges if isinstance(node, BackwardFunction) else ()
        edges = node._next_functions
        incoming = self.incoming.pop(node, None)
        inherited = _single_source(incoming) if result is not None else None
        for slot, edge_i in enumerate(slot_edges):
            if edge_i is None:
                continue
            target, output_nr = edges[edge_i]
            if target is None:
                continue
            g = result[slot] if result is not None else None
            if g is not None and not _has_sources(g):
                _default_sources(
                    g,
                    _target_length(target, output_nr),
                    incoming,
                    inherited,
                    target.variable if isinstance(target, AccumulateGrad) else None,
                )
            if isinstance(target, AccumulateGrad):
                if g is not None and (self.targets is None or target in self.targets):
                    self.leaf_grads.append(((idx, edge_i), target.variable, g))
                continue
            if g is not None:
                buf = self.buffers.setdefault(target, {})
                buf.setdefault(output_nr, []).append(((idx, edge_i), g))
            self.deps[target] -= 1
            if self.deps[target] == 0:
                ready.append(target)
        return ready

    def commit(self) -> None:
        """Apply the pass's effects; called only after every node succeeded."""
        self.leaf_grads.sort(key=lambda e: e[0])
        for _, variable, grad in self.leaf_grads:
            variable._grad.append(grad)
        for variable, grad in self.retained:
            variable._grad.append(grad)
        if not self.retain_graph:
            for node in self.order:
                if isinstance(node, BackwardFunction):
                    node._free()


def _target_length(target: Node, output_nr: int) -> int | None:
    """The number of samples of the Variable a gradient is routed to (None for a
    scalar one)."""
    if isinstance(target, AccumulateGrad):
        data = target.variable.data
        return len(data) if isinstance(data, list) else None
    meta = getattr(target, "_output_meta", None)
    if meta is not None and 0 <= output_nr < len(meta):
        return meta[output_nr][1]
    return None


def _single_source(
    incoming: list[Variable | None] | None,
) -> tuple[tuple[int, ...], Basis] | None:
    """The sources (and their basis) of a node's incoming feedback when it is a
    single non-empty text with known sources (what every gradient the node derives
    from it is about)."""
    if not incoming:
        return None
    found: list[tuple[tuple[int, ...] | None, Basis]] = []
    for g in incoming:
        if g is None:
            continue
        items = g.data if isinstance(g.data, list) else [g.data]
        for item, src, basis in zip(items, sources_of(g), bases_of(g), strict=True):
            if item != "":
                found.append((src, basis))
    if len(found) != 1 or found[0][0] is None:
        return None
    return found[0]  # type: ignore[return-value]


def _default_sources(
    g: Variable,
    length: int | None,
    incoming: list[Variable | None] | None,
    inherited: tuple[tuple[int, ...], Basis] | None,
    leaf: Variable | None = None,
) -> None:
    """Provenance for a gradient its Function did not annotate: the incoming
    feedback passed on unchanged keeps its sources; one aligned with a batched
    Variable is, item by item, about that sample (numbered in that Variable's items
    when it is a leaf, ``leaf``; else in an unknown basis); any other one inherits
    the sources of the node's single incoming feedback text, if known."""
    data = g.data
    given = [x for x in incoming or () if x is not None]
    if len(given) == 1 and _has_sources(given[0]) and given[0].data == data:
        _set_recorded(
            g, sources_of(given[0]), _call_samples_of(given[0]), bases_of(given[0])
        )
    elif length is not None and isinstance(data, list) and len(data) == length:
        basis = basis_of(leaf) if leaf is not None else None
        set_sources(g, [(s,) for s in range(length)], basis=basis)
    elif inherited is not None:
        n = len(data) if isinstance(data, list) else 1
        set_sources(g, [inherited[0]] * n, basis=inherited[1])


def _combine(grads: list[Variable], role: str, length: int | None) -> Variable:
    """Combine several gradients that reached the same output into one.

    A scalar output gets the list of the non-empty feedback texts (a single text
    stays a str); a batched output gets, per sample, its non-empty texts joined by a
    blank line (a scalar feedback applies to every sample). The sources of each text
    (:mod:`afnio.autodiff.provenance`) follow it: a kept text keeps its own, a joined
    one gets the union of its parts' (unknown if one part is unknown)."""
    if len(grads) == 1:
        return grads[0]
    if length is None:
        texts: list[Any] = []
        sources: list[tuple[int, ...] | None] = []
        calls: list[tuple[int, ...] | None] = []
        bases: list[Basis] = []
        for g in grads:
            items = g.data if isinstance(g.data, list) else [g.data]
            for item, src, call, basis in zip(
                items, sources_of(g), _call_samples_of(g), bases_of(g), strict=True
            ):
                if item != "":
                    texts.append(str(item))
                    sources.append(src)
                    calls.append(call)
                    bases.append(basis)
        data: Any = texts[0] if len(texts) == 1 else (texts or "")
        combined = Variable(data, role=grads[0].role or f"feedback to {role}")
        if texts:
            _set_recorded(combined, sources, calls, bases)
        return combined
    columns: list[list[str]] = [[] for _ in range(length)]
    column_sources: list[list[tuple[int, ...] | None]] = [[] for _ in range(length)]
    column_bases: list[list[Basis]] = [[] for _ in range(length)]
    for g in grads:
        aligned = isinstance(g.data, list) and len(g.data) == length
        g_sources = sources_of(g)
        g_bases = bases_of(g)
        merged = None if aligned else _merged_source(g)
        merged_basis = None if aligned else _merged_basis(g)
        for s in range(length):
            text = g.data[s] if aligned else g.data
            if text != "":
                columns[s].append(str(text))
                column_sources[s].append(g_sources[s] if aligned else merged)
                column_bases[s].append(g_bases[s] if aligned else merged_basis)
    data = ["\n\n".join(col) for col in columns]
    combined = Variable(data, role=grads[0].role or f"feedback to {role}")
    _set_recorded(
        combined,
        [_union(srcs) for srcs in column_sources],
        None,
        [_common_basis(b) for b in column_bases],
    )
    return combined


def _check_result(node: BackwardFunction, result: Any) -> tuple[Variable | None, ...]:
    if not isinstance(result, (tuple, list)):
        result = (result,)
    expected = len(node._slot_edges)
    extra = result[expected:]
    if len(result) < expected or any(r is not None for r in extra):
        raise RuntimeError(
            f"function {node.name()} returned an incorrect number of gradients "
            f"(expected {expected}, got {len(result)}): backward must return one "
            "value per forward input (None for inputs without a gradient)."
        )
    for i, g in enumerate(result[:expected]):
        if g is not None and not isinstance(g, Variable):
            raise TypeError(
                f"function {node.name()} returned a {type(g).__name__} as gradient "
                f"{i}; expected a Variable or None."
            )
    return tuple(result[:expected])


_INLINE, _ASYNC, _THREAD, _PROBE = "inline", "async", "thread", "probe"
_KINDS: weakref.WeakKeyDictionary[type, str] = weakref.WeakKeyDictionary()

# how many backward calls ran each way (``rerun``: inline calls that made a
# synchronous afnio call, or kept another thread's afnio call waiting past the stall
# threshold (also counted in ``stalled``), and were run again in a worker thread);
# for tests and benchmarks, never reset by the engine
_counts: dict[str, int] = {
    _INLINE: 0,
    _ASYNC: 0,
    _THREAD: 0,
    _PROBE: 0,
    "rerun": 0,
    "stalled": 0,
}


def _declared_blocking(cls: type) -> bool | None:
    """``Function.blocking`` (or the deprecated ``run_backward_inline``)."""
    blocking = cls.blocking  # type: ignore[attr-defined]
    if blocking is None:
        inline = cls.run_backward_inline  # type: ignore[attr-defined]
        if inline is not None:
            return not inline
        return None
    return bool(blocking)


def _backward_kind(cls: type) -> str:
    """How the engine calls a Function's backward (cached per class)."""
    kind = _KINDS.get(cls)
    if kind is None:
        if inspect.iscoroutinefunction(cls.backward):  # type: ignore[attr-defined]
            kind = _ASYNC
        elif (declared := _declared_blocking(cls)) is None:
            kind = _PROBE  # its first call tells (see _call_node)
        else:
            kind = _THREAD if declared else _INLINE
        _KINDS[cls] = kind
    return kind


def _classify(cls: type, blocking: bool) -> None:
    """Record what a probe call saw: blocking is final; inline only if no other call
    of the Function was found blocking meanwhile."""
    if blocking:
        _KINDS[cls] = _THREAD
    elif _KINDS.get(cls) == _PROBE:
        _KINDS[cls] = _INLINE


class _InlineBlocked(BaseException):
    """Raised by a synchronous afnio call (``run_sync``) made inside a plain backward
    that runs on afnio's loop, where waiting would deadlock. The engine catches it
    and re-runs that backward in a worker thread. A ``BaseException`` so that the
    user's ``except Exception`` does not swallow it (the engine re-runs the node even
    if it is swallowed)."""


class _InlineGuard:
    """Installed as ``_runtime.inline_guard`` while one inline backward runs.

    ``current`` is ``(node, start time)`` of that backward: one tuple, written in one
    step by the loop thread, so other threads read a consistent pair, and its
    identity tells one inline call from the next. ``stalled`` is the ``current`` of
    the call that kept another thread's afnio call waiting past the stall threshold
    (set by that thread, through :meth:`mark_stalled`)."""

    __slots__ = ("blocked", "current", "lock", "stalled", "warned")

    def __init__(self) -> None:
        self.lock = threading.Lock()  # marking stalled vs ending the call
        self.blocked: str | None = None
        self.current: tuple[BackwardFunction, float] | None = None
        self.stalled: tuple[BackwardFunction, float] | None = None
        self.warned: tuple[BackwardFunction, float] | None = None

    def held(self) -> tuple[tuple[BackwardFunction, float], float] | None:
        """``(token, start time)`` of the inline backward holding the loop, if any
        (called from other threads)."""
        current = self.current
        return None if current is None else (current, current[1])

    def mark_stalled(self, token: Any) -> tuple[str, str] | None:
        """Called from another thread whose afnio call has waited past the stall
        threshold while the inline backward ``token`` held the loop all that time:
        mark that backward for a re-run in a worker thread and return its Function's
        and node's names, for the error the call raises (None if that backward has
        already ended)."""
        with self.lock:  # not after the loop ended that backward (it would miss it)
            if self.current is not token:
                return None
            self.stalled = token
        node = token[0]
        return node._forward_cls.__qualname__, node.name()

    def warn_held(self, token: Any, seconds: float) -> None:
        """Called from another thread whose afnio call, already started, has
        waited while the inline backward ``token`` held the loop for ``seconds``
        (twice the stall threshold): such a call cannot be stopped (it may be the
        very work that runs this backward), so if the backward waits for that
        thread they wait on each other. Say so, naming the fix, once per call."""
        if self.current is not token or self.warned is token:
            return
        self.warned = token
        node = token[0]
        name = node._forward_cls.__qualname__
        logger.warning(
            "%s.backward (node %s) has held afnio's event loop for %.0f s, running "
            "on the loop, while an afnio call already started in another thread "
            "waits for that loop. If the backward waits for that thread, neither "
            "can go on: set `blocking = True` on %s so that its backward runs in a "
            "worker thread.",
            name,
            node.name(),
            seconds,
            name,
        )

    def __call__(self, what: str) -> None:
        self.blocked = what
        raise _InlineBlocked(
            f"{what}() was called inside a backward running on afnio's event loop; "
            "afnio re-runs that backward in a worker thread."
        )


_GUARD = _InlineGuard()


def _offload(cls: type, node: Node, what: str) -> None:
    _KINDS[cls] = _THREAD
    _counts["rerun"] += 1
    name = cls.__qualname__
    logger.warning(
        "%s.backward (node %s) made a synchronous afnio call (%s) while running on "
        "afnio's event loop, where it would deadlock: afnio stopped that call before "
        "it was sent, re-ran this backward in a worker thread, and runs %s.backward "
        "in worker threads from now on. Set `blocking = True` on %s to declare it "
        "(then it never starts on the loop and code before the call does not run "
        "twice).",
        name,
        node.name(),
        what,
        name,
        name,
    )


def _offload_stalled(cls: type, node: Node) -> None:
    _KINDS[cls] = _THREAD
    _counts["rerun"] += 1
    _counts["stalled"] += 1
    name = cls.__qualname__
    logger.warning(
        "%s.backward (node %s) held afnio's event loop for over %g s "
        "(afnio._runtime.STALL_WARNING_S) while an afnio call from another thread "
        "waited for that loop; if the backward waited for that thread, neither "
        "could go on. afnio stopped that call with a RuntimeError, re-ran this "
        "backward in a worker thread, and runs %s.backward in worker threads from "
        "now on. Set `blocking = True` on %s to declare it (then it never starts "
        "on the loop, nothing waits for the stall threshold, and code in the "
        "backward does not run twice).",
        name,
        node.name(),
        _runtime_module.STALL_WARNING_S,
        name,
        name,
    )


class _Record:
    """Counts the synchronous afnio calls of one backward call in a worker thread."""

    __slots__ = ("sync_calls",)

    def __init__(self) -> None:
        self.sync_calls = 0


def _apply_in_thread(node: BackwardFunction, grads: list[Any], record: _Record) -> Any:
    local = _runtime.sync_calls.local
    local.record = record  # this thread's synchronous afnio calls count there
    try:
        return node.apply(*grads)
    finally:
        local.record = None


async def _call_node(
    node: BackwardFunction,
    grads: list[Variable | None],
    create_graph: bool,
    kind: str,
    needs: tuple[bool, ...] | None,
) -> Any:
    # this task's own context: seen by the node's backward (and its worker thread)
    _grad_enabled.set(create_graph)
    if needs is not None:
        _needs_override.set((node, needs))
    # the node bound (we are on afnio's loop); a node waiting for its grouped
    # chat-backward items lends its slot back meanwhile (afnio.autodiff.grouping)
    slot = NodeSlot(_runtime.nodes, node)
    await slot.take()
    slot.install()
    try:
        if kind == _ASYNC:
            return await node.apply(*grads)
        ctx = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        record = _Record()
        calls = _runtime.sync_calls
        before = calls.unattributed
        finished = False
        try:
            result = await loop.run_in_executor(
                _thread_pool(), ctx.run, _apply_in_thread, node, grads, record
            )
            finished = True
            return result
        except asyncio.CancelledError:
            raise
        except BaseException:
            finished = True
            raise
        finally:
            if kind == _PROBE and finished:
                # its own synchronous afnio calls, or any from threads afnio did not
                # start (a pool it waits on): those would deadlock on the loop
                _classify(
                    node._forward_cls,
                    record.sync_calls > 0 or calls.unattributed != before,
                )
    finally:
        slot.close()  # releases it if still held; nothing re-takes it after


def _run_inline(
    node: BackwardFunction,
    grads: list[Variable | None],
    create_graph: bool,
    needs: tuple[bool, ...] | None,
) -> tuple[bool, Any]:
    """Call a plain backward on the loop: ``(True, result)``, or ``(False, None)``
    when it made a synchronous afnio call, or kept another thread's afnio call
    waiting past the stall threshold, and must run in a worker thread."""
    token = _grad_enabled.set(create_graph)
    ntoken = _needs_override.set(None if needs is None else (node, needs))
    guard = _GUARD
    guard.blocked = None
    current = guard.current = (node, _monotonic())
    _runtime.inline_guard = guard
    try:
        result = node.apply(*grads)
    except BaseException as e:
        if guard.blocked is None and guard.stalled is not current:
            _annotate(e, node)
            raise
    finally:
        _runtime.inline_guard = None
        with guard.lock:
            guard.current = None
        if guard.warned is not None:
            guard.warned = None  # holds no node past its call
        _needs_override.reset(ntoken)
        _grad_enabled.reset(token)
    if guard.stalled is current:
        # it kept another thread's afnio call waiting past the stall threshold, and
        # that call raised: re-run it (even if it swallowed the error, its result
        # may lack what that call would have given)
        guard.stalled = None
        _offload_stalled(node._forward_cls, node)
        return False, None
    if guard.blocked is not None:  # even if its backward swallowed _InlineBlocked
        _offload(node._forward_cls, node, guard.blocked)
        return False, None
    return True, result


def _claim(p: _Pass) -> list[BackwardFunction]:
    """Claim the graph for this pass (on afnio's loop, so one pass at a time): a pass
    that frees the graph needs it to itself, and nobody may use a freed graph."""
    nodes = [n for n in p.order if isinstance(n, BackwardFunction)]
    for n in nodes:
        if n._freed:
            raise RuntimeError(_FREED_MESSAGE.format(name=n.name()))
        if n._passes < 0 or (n._passes > 0 and not p.retain_graph):
            raise RuntimeError(
                f"Another backward pass through this graph (node {n.name()}) is still "
                "running, and one of them frees the graph. Await the first one, or "
                "pass retain_graph=True to both."
            )
    for n in nodes:
        n._passes = n._passes + 1 if p.retain_graph else -1
    return nodes


async def _execute(p: _Pass) -> None:
    claimed = _claim(p)
    try:
        with lm_phase("backward"):  # the LM calls of the pass are feedback calls
            await _run_pass(p)
    finally:
        for n in claimed:
            n._passes = n._passes - 1 if n._passes > 0 else 0


async def _run_pass(p: _Pass) -> None:
    loop = asyncio.get_running_loop()
    ready = collections.deque(n for n in p.order if p.deps[n] == 0)
    running: dict[asyncio.Task[Any], BackwardFunction] = {}
    completed: collections.deque[asyncio.Task[Any]] = collections.deque()
    wakeup: list[asyncio.Future[None]] = []

    def on_done(task: asyncio.Task[Any]) -> None:
        completed.append(task)
        if wakeup and not wakeup[0].done():
            wakeup[0].set_result(None)

    def route(node: BackwardFunction, result: Any) -> None:
        try:
            checked = _check_result(node, result)
        except BaseException as e:
            _annotate(e, node)
            raise
        ready.extend(p.finish(node, checked))

    # the pass's chat-backward grouper, seen by the node tasks (they copy this
    # context when created; its group tasks run in this one); a node task counts
    # as running until it is routed
    grouper = Grouper(p.order, running.values)
    token = grouper.install()
    try:
        while ready or running:
            while ready:
                node = ready.popleft()
                assert isinstance(node, BackwardFunction)
                if p.needed is not None and node not in p.needed:
                    p.buffers.pop(node, None)
                    ready.extend(p.finish(node, None))  # leads to no input: skip
                    continue
                grads = p.gather(node)
                if grads is None:
                    ready.extend(p.finish(node, None))  # no gradient: no LM call
                    continue
                needs = p.needs_for(node) if p.needed is not None else None
                kind = _backward_kind(node._forward_cls)
                _counts[kind] += 1
                if kind == _INLINE:
                    ran, result = _run_inline(node, grads, p.create_graph, needs)
                    if ran:
                        route(node, result)
                        continue
                    kind = _THREAD  # it made a synchronous afnio call: re-run it
                task = loop.create_task(
                    _call_node(node, grads, p.create_graph, kind, needs)
                )
                task.add_done_callback(on_done)
                running[task] = node
            grouper.check()  # every running node waits for unsent items: send them
            if running and not completed:
                wakeup[:] = [loop.create_future()]
                await wakeup[0]
            batch = sorted(completed, key=lambda t: p.order[running[t]])
            completed.clear()
            for task in batch:
                node = running.pop(task)
                try:
                    result = task.result()
                except BaseException as e:
                    _annotate(e, node)
                    raise
                route(node, result)
    except BaseException:
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        raise
    finally:
        Grouper.uninstall(token)
        await grouper.aclose()  # fails unsent items, cancels groups in flight
    p.commit()


def _annotate(error: BaseException, node: Node) -> None:
    if isinstance(error, Exception):
        error.add_note(f"(raised during backward by node {node.name()})")


def _prepare(
    variables: Variable | Sequence[Variable],
    grad_variables: Variable | Sequence[Variable | None] | None,
    retain_graph: bool | None,
    create_graph: bool,
    inputs: Variable | GradientEdge | Sequence[Variable | GradientEdge] | None,
) -> _Pass:
    roots = _as_list(variables, "variables")
    if not roots:
        raise ValueError("`variables` is empty: pass at least one Variable.")
    for i, root in enumerate(roots):
        if not isinstance(root, Variable):
            raise TypeError(
                f"element {i} of `variables` is a {type(root).__name__}, not a "
                "Variable."
            )
        if root.grad_fn is None:
            raise RuntimeError(
                f"element {i} of variables does not require grad and does not have a "
                "grad_fn"
            )
    if grad_variables is None:
        grad_list: list[Any] = [None] * len(roots)
    else:
        grad_list = _as_list(grad_variables, "grad_variables")
        if len(grad_list) != len(roots):
            raise ValueError(
                f"`grad_variables` has {len(grad_list)} gradients for {len(roots)} "
                "variables; pass one per variable (None for an implicit one)."
            )
    grads: list[Variable] = []
    for i, (root, g) in enumerate(zip(roots, grad_list, strict=True)):
        if g is None:
            g = _default_gradient(root, i)
        elif not isinstance(g, Variable):
            raise TypeError(
                f"element {i} of `grad_variables` is a {type(g).__name__}; expected a "
                "Variable or None."
            )
        grads.append(g)

    targets: set[AccumulateGrad] | None = None
    if inputs is not None:
        items = _as_list(inputs, "inputs")
        if not items:
            raise RuntimeError("`inputs` argument to backward() cannot be empty.")
        targets = set()
        for i, item in enumerate(items):
            if isinstance(item, GradientEdge):
                if not isinstance(item.node, AccumulateGrad):
                    raise RuntimeError(
                        f"element {i} of `inputs` is a GradientEdge to "
                        f"{item.node}; only edges to leaves (AccumulateGrad) can be "
                        "accumulated into."
                    )
                targets.add(item.node)
            elif isinstance(item, Variable):
                if not item.is_leaf or not item.requires_grad:
                    raise RuntimeError(
                        f"element {i} of `inputs` must be a leaf Variable that "
                        "requires grad (non-leaf Variables cannot be inputs)."
                    )
                targets.add(item._get_grad_accumulator())
            else:
                raise TypeError(
                    f"element {i} of `inputs` is a {type(item).__name__}; expected a "
                    "Variable or a GradientEdge."
                )
    if retain_graph is None:
        retain_graph = create_graph
    return _Pass(roots, grads, bool(retain_graph), bool(create_graph), targets)


def backward(
    variables: Variable | Sequence[Variable],
    grad_variables: Variable | Sequence[Variable | None] | None = None,
    retain_graph: bool | None = None,
    create_graph: bool = False,
    inputs: Variable | GradientEdge | Sequence[Variable | GradientEdge] | None = None,
) -> None:
    """Compute textual gradients of ``variables`` and append them to the leaves.

    Args:
        variables: the root Variable(s) to differentiate.
        grad_variables: the feedback on each root (a Variable, a sequence, or
            ``None``). ``None`` uses the empty feedback ``""`` and is allowed for
            scalar roots and for evaluator outputs.
        retain_graph: keep the graph for another backward pass (default:
            ``create_graph``).
        create_graph: run backward functions with grad mode on, so that the
            gradients themselves are recorded in a graph.
        inputs: leaves (or GradientEdges to them) to accumulate into. Only these get
            gradients, and only nodes that lead to them run.

    Ready nodes run concurrently on afnio's event loop, at most
    :func:`afnio.get_max_concurrency` at a time (a plain ``backward`` is called
    directly on the loop unless its Function sets ``blocking = True``, see
    :class:`~afnio.autodiff.Function`). The call blocks until the pass is
    done; it also works inside a running event loop (use :func:`abackward` to
    ``await`` it instead). If any node fails, no ``.grad`` changes and the graph is
    kept, so the call can be retried.

    Example::

        >>> import afnio
        >>> a = afnio.Variable("x", role="a", requires_grad=True)
        >>> b = a + afnio.Variable("y", role="b")
        >>> afnio.autodiff.backward(b, afnio.Variable("shorter"))
        >>> len(a.grad)
        1
    """
    p = _prepare(variables, grad_variables, retain_graph, create_graph, inputs)
    run_sync(_execute(p))


async def abackward(
    variables: Variable | Sequence[Variable],
    grad_variables: Variable | Sequence[Variable | None] | None = None,
    retain_graph: bool | None = None,
    create_graph: bool = False,
    inputs: Variable | GradientEdge | Sequence[Variable | GradientEdge] | None = None,
) -> None:
    """Async :func:`backward`: awaits the pass without blocking the caller's loop."""
    p = _prepare(variables, grad_variables, retain_graph, create_graph, inputs)
    await run_async(_execute(p))
