"""Grouped chat backward across the nodes of one backward pass.

With ``chat_samples_per_call = n > 1`` (:class:`afnio.autodiff.options.
BackwardOptions`) every chat-backward item of a pass (one per sample that got
feedback, :class:`~afnio.autodiff.lm_backward.ChatBackwardItem`) goes to the pass's
:class:`Grouper`, which sends the items with the same key (the same prompt template)
together, at most ``n`` per call.

Flush rule (deterministic, never timing-based): the grouper holds the unsent items; it
sends all of them when every running node task of the pass is waiting for unsent
items. It checks on every submission and each time the engine is about to wait (after
it has routed the finished nodes and started the newly ready ones). A node whose
items are in flight counts as busy, so items that one finished group releases (the
next stage's nodes) wait for the other groups in flight: the groups, and so the
request bodies, never depend on which HTTP answer came first. The items sent are
grouped by key (keys in order of first appearance), ordered by the submitting node's
position in the pass's node order and then by item order, and split with
:func:`~afnio.autodiff.lm_backward.split_evenly`; each group is one task (one call),
all of them at once. An error in a group goes to every member (it names the group's
nodes).

A node task waiting for its items gives its node slot back (``afnio.
set_max_concurrency`` bounds running nodes), so that more nodes can join the groups,
and re-takes it before returning (:class:`NodeSlot`).

A submission belongs to the node task it runs in (the engine's ``_call_node`` sets
the task's :class:`NodeSlot`, which names its node; a ``blocking`` node's
``run_sync`` carries it along), whatever ``node`` argument it passes: that node's
position orders its items, and a node counts as waiting once however many of its
submissions wait. The ``node`` argument only names the items in errors (and stands
for the node where no node task is known).

The contract for a custom ``Function`` that calls
:func:`~afnio.autodiff.lm_backward.chat_backward_gradients` in its ``backward``:
submit all the items of the node in **one** call and await it, doing nothing else
meanwhile (as ``ChatCompletion`` and the recorded calls do). A node that submits
while it still does other work (a sub-task that submits later, an LM call of its
own) counts as waiting as soon as one submission waits, so the grouper may send
before its other items arrive: its groups, and so the request bodies (and recorded
cassettes), may then depend on timing. Several submissions of one node still work
(each gets its own feedback; the node slot is lent and re-taken so that the
concurrency bound is never exceeded and never leaks).

When the pass ends (an error in another node, or cancellation), items not yet sent
are failed with a ``RuntimeError`` (so a ``blocking`` node's thread waiting in
``run_sync`` returns) and groups in flight are cancelled.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from afnio.autodiff.lm_backward import ChatBackwardItem, group_items, send_group

__all__ = ["Grouper", "NodeSlot", "current_grouper", "current_node_slot"]

_GROUPER: contextvars.ContextVar[Grouper | None] = contextvars.ContextVar(
    "afnio_backward_grouper", default=None
)
_NODE_SLOT: contextvars.ContextVar[NodeSlot | None] = contextvars.ContextVar(
    "afnio_backward_node_slot", default=None
)


def current_grouper() -> Grouper | None:
    """The grouper of the backward pass this code runs in (``None`` outside one)."""
    return _GROUPER.get()


def current_node_slot() -> NodeSlot | None:
    """The node slot of the backward node task this code runs in, if any."""
    return _NODE_SLOT.get()


class NodeSlot:
    """One backward node task's slot of the concurrency bound, which the task lends
    back while it waits in the grouper.

    ``_call_node`` creates it for its node, takes it (:meth:`take`), sets it for
    the task (:meth:`install`) and finally calls :meth:`close`. A wait in the
    grouper calls :meth:`lend` when it starts and :meth:`reclaim` (or
    :meth:`abandon`, when cancelled) when it ends.

    Accounting (what keeps the bound exact): the limiter is acquired only in
    :meth:`take` and released only in :meth:`give_back`, which releases only a held
    slot, so acquisitions and releases alternate and the slot never holds more than
    one unit. :meth:`reclaim` re-takes the slot under a lock (one re-take at a time)
    and only while no wait is going on (``lent == 0``) and the node task has not
    ended; if a new wait began while it re-took it, it gives it back again (that
    wait's own reclaim re-takes it). After :meth:`close` nothing re-takes it, so a
    submission that outlives its node task (a ``blocking`` node's ``run_sync``)
    cannot hold a unit."""

    __slots__ = ("_limiter", "_lock", "closed", "held", "lent", "node")

    def __init__(self, limiter: Any, node: Any = None) -> None:
        self._limiter = limiter
        self._lock: asyncio.Lock | None = None
        self.node = node
        self.held = False
        self.lent = 0
        self.closed = False

    async def take(self) -> None:
        """Acquire the slot (waits for a free one); gives it straight back if the
        node task ended meanwhile."""
        await self._limiter.acquire()
        self.held = True
        if self.closed:
            self.give_back()

    def give_back(self) -> None:
        """Release the slot if it is held (else do nothing)."""
        if self.held:
            self.held = False
            self._limiter.release()

    def lend(self) -> None:
        """A wait starts: release the slot (the first of overlapping waits does)."""
        self.lent += 1
        if self.lent == 1:
            self.give_back()

    async def reclaim(self) -> None:
        """A wait ends: re-take the slot when it was the last wait (see the class
        docstring)."""
        self.lent -= 1
        if self.lent > 0 or self.held or self.closed:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.lent == 0 and not self.held and not self.closed:
                await self.take()
                if self.lent > 0:  # a new wait began while we re-took it
                    self.give_back()  # its own reclaim re-takes the slot

    def abandon(self) -> None:
        """A wait ends by cancellation: count it off without re-taking the slot (the
        task is being cancelled; a node task that goes on re-takes it at its next
        wait's end, and never holds more than one unit)."""
        self.lent -= 1

    def close(self) -> None:
        """The node task ends: release the slot if held; nothing re-takes it after."""
        self.closed = True
        self.give_back()

    def install(self) -> contextvars.Token[NodeSlot | None]:
        """Make this the current task's node slot."""
        return _NODE_SLOT.set(self)


@dataclass
class _Submission:
    node: Any  # the submitting node (the node task's node, else the argument)
    index: int  # the node's position in the pass order
    seq: int  # submission order (ties)
    name: str
    items: Sequence[ChatBackwardItem]
    per_call: int
    futures: list[asyncio.Future[list[str]]] = field(default_factory=list)


class Grouper:
    """The chat-backward grouper of one backward pass (see the module docstring).

    Create it in the pass's own task: the group tasks run in (a copy of) the context
    it was created in, never in the context of whichever node triggered a flush.

    Args:
        order: the pass's node order (node -> position).
        running: the node tasks of the pass that are running (started and not yet
            routed by the engine): their nodes.
    """

    def __init__(
        self, order: Mapping[Any, int], running: Callable[[], Collection[Any]]
    ) -> None:
        self._order = order
        self._running = running
        self._context = contextvars.copy_context()
        self._pending: list[_Submission] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._seq = 0
        self._closed = False
        self.calls = 0  # group calls sent (for tests and statistics)

    def install(self) -> contextvars.Token[Grouper | None]:
        """Make this the grouper of the current context (the engine does it before
        creating the node tasks, which copy the context)."""
        return _GROUPER.set(self)

    @staticmethod
    def uninstall(token: contextvars.Token[Grouper | None]) -> None:
        _GROUPER.reset(token)

    def _submitter(self, node: Any) -> Any:
        """The node a submission belongs to: the node of the node task it runs in
        (when that node is one of this pass's), else ``node``."""
        slot = _NODE_SLOT.get()
        if slot is not None and slot.node is not None and slot.node in self._order:
            return slot.node
        return node

    def waiting(self) -> int:
        """How many distinct nodes wait with unsent items (once per node)."""
        return len({id(s.node) for s in self._pending})

    def _all_waiting(self) -> bool:
        waiting = {id(s.node) for s in self._pending}
        return all(id(n) in waiting for n in self._running())

    async def submit(
        self, node: Any, items: Sequence[ChatBackwardItem], per_call: int
    ) -> list[list[str]]:
        """Queue ``items`` of ``node`` and wait for their feedback (one list of
        stripped texts per item). The node's slot is lent back while it waits.

        Raises:
            RuntimeError: the pass has ended, or ended before the items were sent.
        """
        from afnio.autodiff.lm_backward import _node_name

        if self._closed:
            raise RuntimeError("the backward pass of this grouper has ended.")
        loop = asyncio.get_running_loop()
        submitter = self._submitter(node)
        sub = _Submission(
            node=submitter,
            index=self._order.get(submitter, len(self._order)),
            seq=self._seq,
            name=_node_name(node),
            items=list(items),
            per_call=per_call,
            futures=[loop.create_future() for _ in items],
        )
        self._seq += 1
        self._pending.append(sub)
        slot = _NODE_SLOT.get()
        if slot is not None:
            slot.lend()
        cancelled = False
        try:
            self.check()
            return list(await asyncio.gather(*sub.futures))
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            if sub in self._pending:  # cancelled before it was sent
                self._pending.remove(sub)
            if slot is not None:
                if cancelled:
                    slot.abandon()
                else:
                    await slot.reclaim()

    def check(self) -> None:
        """Flush when every running node task of the pass waits for unsent items."""
        if self._pending and self._all_waiting():
            self.flush()

    def flush(self) -> None:
        """Send every pending item now: grouped by key, in pass order, each group
        one task (run in the pass's context)."""
        pending = sorted(self._pending, key=lambda s: (s.index, s.seq))
        self._pending = []
        entries: list[tuple[Hashable, tuple[_Submission, int]]] = []
        for sub in pending:
            for i, item in enumerate(sub.items):
                entries.append(((sub.per_call, item.key), (sub, i)))
        by_spc: dict[int, list[int]] = {}
        for pos, ((per_call, _), _) in enumerate(entries):
            by_spc.setdefault(per_call, []).append(pos)
        loop = asyncio.get_running_loop()
        for per_call, positions in by_spc.items():
            subset = [entries[p] for p in positions]
            for group in group_items(subset, per_call):
                members = [subset[g][1] for g in group]
                task = loop.create_task(
                    self._send(members), context=self._context.copy()
                )
                self._tasks.add(task)
                task.add_done_callback(self._group_done)
                self.calls += 1

    def _group_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # a BaseException re-raised there: its members have it

    @staticmethod
    async def _send(members: list[tuple[_Submission, int]]) -> None:
        """One group call; its answers (or its error) go to the members' futures.

        An ``Exception`` goes to every member (the same object: one error of one
        call, its traceback starting in the call). A ``BaseException`` that is not
        an ``Exception`` (``KeyboardInterrupt``, ``SystemExit``) goes to every
        member too, so that the pass ends with it, and is re-raised from the group
        task. Cancelling the group cancels the members."""
        names = [sub.name for sub, _ in members]
        items = [sub.items[i] for sub, i in members]
        try:
            answers = await send_group(names, items)
        except asyncio.CancelledError:
            for sub, i in members:
                if not sub.futures[i].done():
                    sub.futures[i].cancel()
            raise
        except BaseException as e:
            for sub, i in members:
                if not sub.futures[i].done():
                    sub.futures[i].set_exception(e)
            if isinstance(e, Exception):
                return
            raise
        for (sub, i), texts in zip(members, answers, strict=True):
            if not sub.futures[i].done():
                sub.futures[i].set_result(texts)

    async def aclose(self) -> None:
        """End the pass: fail the items not yet sent (a ``RuntimeError``: whoever
        waits for them, such as a ``blocking`` node's thread in ``run_sync``, gets
        it) and cancel any group still in flight."""
        self._closed = True
        pending, self._pending = self._pending, []
        for sub in pending:
            for future in sub.futures:
                if not future.done():
                    future.set_exception(
                        RuntimeError(
                            "The backward pass ended (another node failed, or the "
                            "pass was cancelled) before the chat-backward group of "
                            f"node {sub.name} was sent; its feedback was not asked "
                            "for."
                        )
                    )
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
