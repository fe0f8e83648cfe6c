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
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Hashable, Mapping, Sequence
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
    """One backward-node slot of the concurrency bound, which a node task may lend
    back while it waits (never released twice).

    ``_call_node`` takes it (:meth:`take`), sets it for the task
    (:meth:`install`) and finally calls :meth:`give_back`, which releases it only
    if it is still held."""

    __slots__ = ("_limiter", "held", "lent")

    def __init__(self, limiter: Any) -> None:
        self._limiter = limiter
        self.held = False
        self.lent = 0

    async def take(self) -> None:
        """Acquire the slot (waits for a free one)."""
        await self._limiter.acquire()
        self.held = True

    def give_back(self) -> None:
        """Release the slot if it is held (else do nothing)."""
        if self.held:
            self.held = False
            self._limiter.release()

    def lend(self) -> None:
        """The task starts waiting: release the slot (the first lender does)."""
        self.lent += 1
        if self.lent == 1:
            self.give_back()

    async def reclaim(self) -> None:
        """The task stops waiting: re-take the slot (the last lender does)."""
        self.lent -= 1
        if self.lent == 0 and not self.held:
            await self.take()

    def install(self) -> contextvars.Token[NodeSlot | None]:
        """Make this the current task's node slot."""
        return _NODE_SLOT.set(self)


@dataclass
class _Submission:
    node: Any
    index: int  # the node's position in the pass order
    seq: int  # submission order (ties)
    name: str
    items: Sequence[ChatBackwardItem]
    per_call: int
    futures: list[asyncio.Future[list[str]]] = field(default_factory=list)


class Grouper:
    """The chat-backward grouper of one backward pass (see the module docstring).

    Args:
        order: the pass's node order (node -> position).
        running: how many node tasks of the pass are running (started and not yet
            routed by the engine).
    """

    def __init__(self, order: Mapping[Any, int], running: Callable[[], int]) -> None:
        self._order = order
        self._running = running
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

    def waiting(self) -> int:
        """How many distinct nodes wait with unsent items."""
        return len({id(s.node) for s in self._pending})

    async def submit(
        self, node: Any, items: Sequence[ChatBackwardItem], per_call: int
    ) -> list[list[str]]:
        """Queue ``items`` of ``node`` and wait for their feedback (one list of
        stripped texts per item). The node's slot is lent back while it waits."""
        from afnio.autodiff.lm_backward import _node_name

        if self._closed:
            raise RuntimeError("the backward pass of this grouper has ended.")
        loop = asyncio.get_running_loop()
        sub = _Submission(
            node=node,
            index=self._order.get(node, len(self._order)),
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
        reclaim = slot is not None
        try:
            self.check()
            return list(await asyncio.gather(*sub.futures))
        except asyncio.CancelledError:
            reclaim = False  # the task ends: `_call_node` gives back what is held
            raise
        finally:
            if sub in self._pending:  # cancelled before it was sent
                self._pending.remove(sub)
            if slot is not None:
                if reclaim:
                    await slot.reclaim()
                else:
                    slot.lent -= 1

    def check(self) -> None:
        """Flush when every running node task of the pass waits for unsent items."""
        if self._pending and self.waiting() >= self._running():
            self.flush()

    def flush(self) -> None:
        """Send every pending item now: grouped by key, in pass order, each group
        one task."""
        pending = sorted(self._pending, key=lambda s: (s.index, s.seq))
        self._pending = []
        entries: list[tuple[Hashable, tuple[_Submission, int]]] = []
        for sub in pending:
            for i, item in enumerate(sub.items):
                entries.append(((sub.per_call, item.key), (sub, i)))
        by_spc: dict[int, list[int]] = {}
        for pos, ((per_call, _), _) in enumerate(entries):
            by_spc.setdefault(per_call, []).append(pos)
        for per_call, positions in by_spc.items():
            subset = [entries[p] for p in positions]
            for group in group_items(subset, per_call):
                members = [subset[g][1] for g in group]
                task = asyncio.get_running_loop().create_task(self._send(members))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                self.calls += 1

    @staticmethod
    async def _send(members: list[tuple[_Submission, int]]) -> None:
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
            return
        for (sub, i), texts in zip(members, answers, strict=True):
            if not sub.futures[i].done():
                sub.futures[i].set_result(texts)

    async def aclose(self) -> None:
        """End the pass: cancel any group still in flight."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
