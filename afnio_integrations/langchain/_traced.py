"""``trace(chain)``: an afnio Module around a user's LCEL chain (left untouched).

**Run identity.** Every call gets its own root run id: ``invoke``, ``ainvoke``,
``stream`` and ``astream`` pass ``config["run_id"]`` (the caller's own ``run_id``
when it gives one, else a fresh one), and ``batch``/``abatch`` pass one config per
item (``chain.batch(inputs, config=[...])``), each with a distinct ``run_id``. The
graph of each call, and of each batch item, is built from the root run with that id
(and from the runs that carry its id in their metadata, :data:`CALL_KEY`), never by
comparing inputs or by the order in which runs finished; each call also has its own
collector, so calls of one :class:`TracedChain` from several threads never cross.
How a call's run tree becomes its graph (which prompt fed which chat call, which
inputs are linked) is :mod:`afnio_integrations.langchain._tracing`.

**Undiscovered prompts.** When a traced call runs an LM on a prompt that discovery
(:mod:`afnio_integrations.langchain._discovery`) did not find, that call has no
Parameter and its prompt can never improve. The Module then emits
:class:`~afnio_integrations.langchain.AfnioTracingWarning`, once per
:class:`TracedChain` and call site (the path of runs to the LM call), naming the site
and asking to pass the sub-chain with ``trace(chain, include=[...])``. A prompt that
was discovered but has no message chosen by ``select=`` is not reported. A run the
tracer could not place with certainty
(:class:`~afnio_integrations.langchain._tracing.AmbiguousRun`, e.g. two
``with_fallbacks`` run concurrently on the same input) is warned about the same
way. The warnings name the user's call (``traced(x)``, ``traced.invoke(x)``,
``traced.batch(...)``) as their location.

**Prompt ids.** Every discovered prompt carries an afnio id in its metadata, so its
runs are recognized. An id belongs to one prompt object in the whole process (a weak
map from ids to prompts): a copy that kept the id (``prompt.partial(...)``,
``copy.deepcopy``) gets its own id when a later ``trace`` finds it, and the owner
keeps its id, so tracing another chain never breaks a chain traced before.

**Streams.** ``stream``/``astream`` return the whole output: the chunks added up
with ``+`` as LangChain adds them (strings, message chunks, the dict chunks of a
``RunnableParallel``), else what the root run recorded as its output.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

from langchain_core.callbacks import BaseCallbackManager
from langchain_core.prompts import BasePromptTemplate

from afnio._variable import Variable
from afnio.cognitive.modules.module import Module
from afnio.cognitive.parameter import Parameter
from afnio_integrations._recorded import StackSamples
from afnio_integrations._usage import ProgramUsage
from afnio_integrations._warnings import AfnioTracingWarning
from afnio_integrations.langchain._discovery import (
    METADATA_KEY,
    Discovery,
    PromptSlot,
    Selector,
    _keeper,
    _Walker,
    check_roles,
    discover,
    slots_of,
)
from afnio_integrations.langchain._langgraph import (
    AgentSystemSlot,
    MessageSlot,
    TextSlot,
    ToolArgumentSlot,
    ToolDescriptionSlot,
    bound_copies,
    is_graph,
    tool_arguments,
)
from afnio_integrations.langchain._langgraph import _message_text as message_text
from afnio_integrations.langchain._runnable import AfnioRunnable
from afnio_integrations.langchain._tracing import (
    CALL_KEY,
    PromptIndex,
    RunCollector,
    TracedCall,
    build_graph,
)
from afnio_integrations.langchain._writeback import apply_template, checked_template

__all__ = ["TracedChain", "trace"]

Config = dict[str, Any]


_UNJOINED = object()


def _joined(chunks: list[Any]) -> Any:
    """A streamed result: the chunks added up with ``+``, as LangChain combines them
    (strings concatenate, message chunks merge, the ``AddableDict`` chunks of a
    ``RunnableParallel`` merge key by key); :data:`_UNJOINED` when there are none
    or they do not add (then the root run's recorded output is the result).

    >>> _joined(["neu", "tral"]), _joined([{"a": 1}, {"b": 2}]) is _UNJOINED
    ('neutral', True)
    """
    if not chunks:
        return _UNJOINED
    total = chunks[0]
    for chunk in chunks[1:]:
        try:
            total = total + chunk
        except (TypeError, ValueError):
            return _UNJOINED
    return total


# The prompt object that owns each afnio prompt id, across every TracedChain of the
# process (weakly: a prompt no longer used frees its id). A copy of a traced prompt
# (``prompt.partial(...)``, ``copy.deepcopy``) keeps the id in its metadata; when a
# later discovery finds it, the copy gets an id of its own and the owner keeps its
# id, so the Modules that traced the owner still recognize its runs.
_OWNERS: weakref.WeakValueDictionary[str, BasePromptTemplate] = (
    weakref.WeakValueDictionary()
)
_OWNERS_LOCK = threading.Lock()


def _token_of(prompt: BasePromptTemplate) -> str:
    """``prompt``'s afnio id: the one in its metadata when it owns it (or nobody
    does), else a fresh one written into its metadata."""
    with _OWNERS_LOCK:
        token = (prompt.metadata or {}).get(METADATA_KEY)
        owner = _OWNERS.get(token) if isinstance(token, str) else None
        if not isinstance(token, str) or (owner is not None and owner is not prompt):
            token = uuid4().hex
            prompt.metadata = {**(prompt.metadata or {}), METADATA_KEY: token}
        _OWNERS[token] = prompt
        return token


_INTERNAL_DIRS = frozenset(  # this package, and afnio's Module (its __call__)
    os.path.dirname(os.path.abspath(path))
    for path in (__file__, inspect.getfile(Module))
)


def _user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by the caller of this function
    name the first frame outside this package and afnio's Module machinery: the
    user's ``traced(x)``, ``traced.invoke(x)``, ``traced.batch(...)`` (or the
    coroutine awaiting ``traced.ainvoke(x)``)."""
    frame = sys._getframe(1)  # the function that calls warnings.warn: level 1
    level = 1
    while frame.f_back is not None and (
        os.path.dirname(os.path.abspath(frame.f_code.co_filename)) in _INTERNAL_DIRS
    ):
        frame = frame.f_back
        level += 1
    return level


class _ModuleWalker(_Walker):
    """Discovery's walk, also noting the afnio Modules of the ``AfnioRunnable`` steps
    it passes (in walk order, each once)."""

    def __init__(self) -> None:
        super().__init__()
        self.modules: list[Module] = []

    def walk(self, obj: Any, depth: int = 0) -> None:
        if isinstance(obj, AfnioRunnable) and all(
            obj.module is not m for m in self.modules
        ):
            self.modules.append(obj.module)
        super().walk(obj, depth)


def afnio_modules(chain: Any, include: Sequence[Any] = ()) -> list[Module]:
    """The afnio Modules held by the ``AfnioRunnable`` steps of ``chain`` (and of
    ``include``), found where discovery finds prompts (composites, bindings, the
    functions of ``RunnableLambda`` steps...)."""
    walker = _ModuleWalker()
    for runnable in (chain, *include):
        walker.walk(runnable)
    return walker.modules


BATCH_INDEX_ATTRIBUTE = "afnio_batch_index"
"""The attribute :meth:`TracedChain.batch` sets on the error it raises: the index of
the input whose run raised it."""


def _wrapped(chain: Any, sequences: bool = True) -> Any:
    """What ``chain`` wraps through bindings (``.with_retry()``,
    ``.with_config()``...) and, with ``sequences``, as the last step of a sequence
    (``step | graph``)."""
    seen: set[int] = set()
    while id(chain) not in seen:
        seen.add(id(chain))
        inner = getattr(chain, "bound", None) or (
            getattr(chain, "last", None) if sequences else None
        )
        if inner is None:
            break
        chain = inner
    return chain


GRAPH_SELECT: tuple[str, ...] = ("system", "tool")
"""The default ``select=`` for an agent or graph: system prompts and tool
descriptions."""


def _text_slots(found: Discovery, skipped: list[str] | None = None) -> list[TextSlot]:
    """The trainable texts of an agent or graph that are not prompt templates (see
    :mod:`afnio_integrations.langchain._langgraph`), in discovery order, each with a
    unique key. A system message whose content is not one text (several content
    blocks) is left out (its description goes to ``skipped``); so is a tool
    argument without a description (nothing to improve: describe it to train it).
    Tools sharing one ``args_schema`` share one Parameter per argument."""
    slots: list[TextSlot] = []
    agents = 0
    unnamed = 0
    for message, kind, name in found.messages:
        if message_text(message) is None:
            if skipped is not None:
                what = "the agent's system prompt" if kind == "agent" else "a message"
                skipped.append(f"{what} ({len(message.content)} content blocks)")
            continue
        if kind == "agent":
            key = "agent.system" if agents == 0 else f"agent{agents}.system"
            agents += 1
            slots.append(AgentSystemSlot(key, message))
        else:
            if not name:
                name = str(unnamed)
                unnamed += 1
            slots.append(MessageSlot(f"message.{name}", message, "marked system text"))
    shared: dict[tuple[int, str], ToolArgumentSlot] = {}
    for tool in found.tools:
        copies = bound_copies(tool, found.bound_tools)
        slots.append(ToolDescriptionSlot(f"tool.{tool.name}", tool, copies))
        for arg in tool_arguments(tool):
            same = shared.get((id(tool.args_schema), arg))
            if same is not None:  # the schema another tool uses too
                same.tools.append(tool)
                same.copies.extend(copies)
                continue
            slot = ToolArgumentSlot(f"tool.{tool.name}.{arg}", tool, arg, copies)
            if slot.text.strip():
                shared[(id(tool.args_schema), arg)] = slot
                slots.append(slot)
    seen: dict[str, int] = {}
    for slot in slots:  # two tools (or marked texts) of the same name
        n = seen.get(slot.key, 0)
        seen[slot.key] = n + 1
        if n:
            slot.key = f"{slot.key}#{n}"
    return slots


def _raise_first_failure(results: Sequence[Any]) -> None:
    """Raise the error of the first input (in input order) whose run failed, marked
    with that input's index (``error.afnio_batch_index``); LangChain's own ``batch``
    re-raises an error without saying which input it came from."""
    for index, result in enumerate(results):
        if isinstance(result, Exception):
            with contextlib.suppress(AttributeError):  # an exception with __slots__
                setattr(result, BATCH_INDEX_ATTRIBUTE, index)
            raise result


class TracedChain(Module):
    """An afnio Module whose Parameters are prompt texts of a LangChain chain.

    Calling it runs the user's chain (with a tracer callback) and returns the output
    as a Variable wired into an afnio graph; after an optimizer step,
    :meth:`write_back` puts the Parameters' texts into the user's own templates.
    """

    def __init__(
        self,
        chain: Any,
        select: Selector | None = None,
        include: Sequence[Any] = (),
        output_key: str | None = None,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "chain", chain)
        graph = is_graph(chain) or is_graph(_wrapped(chain))
        if select is None:
            select = GRAPH_SELECT if graph else "system"
        if output_key is not None and not graph:
            raise ValueError(
                "`output_key` names a state key of a LangGraph graph or agent; "
                f"{type(chain).__name__} is not one. Leave it out for a chain."
            )
        if output_key is not None:
            channels = dict(getattr(_wrapped(chain), "channels", {}) or {})
            if channels and output_key not in channels:
                keys = sorted(
                    k for k in channels if ":" not in k and not k.startswith("__")
                )
                raise ValueError(
                    f"output_key={output_key!r} is not a key of the graph's state "
                    f"(its keys: {keys})."
                )
        found = discover(chain, include)
        skipped: list[str] = []
        every_text = _text_slots(found, skipped)
        check_roles(
            select,
            [slot.role for slot in slots_of(found.editable, "all")]
            + [slot.role for slot in every_text],
        )
        prompt_slots = slots_of(found.editable, select)
        keep = _keeper(select)
        text_slots = [slot for slot in every_text if keep(slot)]  # type: ignore[arg-type]
        for what in skipped:
            warnings.warn(
                f"The traced graph's {what} is not one text, so it is not trainable "
                "(afnio trains a system message holding one text or one text "
                "block). Join its blocks into one to train it.",
                AfnioTracingWarning,
                stacklevel=_user_stacklevel(),
            )
        slots: list[PromptSlot | TextSlot] = [*prompt_slots, *text_slots]
        if not slots:
            if graph or found.graphs:
                raise ValueError(
                    f"No trainable text was found with select={select!r}: the "
                    "graph's nodes hold no agent system prompt, tool, prompt "
                    "template or marked message with such a role. Mark a text with "
                    "afnio_integrations.langchain.trainable(...), or pass what "
                    "holds it with include=[...]."
                )
            raise ValueError(
                "No prompt template text was found to optimize with select="
                f"{select!r}: the chain needs a ChatPromptTemplate with such messages."
            )
        # every discovered prompt carries an afnio id in its metadata, so its runs
        # are recognized (a copy of a prompt that owns its id gets its own id)
        prompts: dict[str, BasePromptTemplate] = {}
        token_of: dict[int, str] = {}
        for prompt in found.prompts:
            token = _token_of(prompt)
            prompts[token] = prompt
            token_of[id(prompt)] = token
        self._slot_list: list[tuple[PromptSlot | TextSlot, Parameter]] = []
        parameters: dict[str, list[tuple[str, Parameter]]] = {}
        messages: dict[str, list[tuple[str, Parameter]]] = {}
        # per tool name, one group of (location, Parameter) per tool object (two
        # tools may share a name; the description the call offered tells them apart)
        tools: dict[str, dict[int, list[tuple[str, Parameter]]]] = {}
        texts: list[tuple[str, Parameter]] = []
        for k, slot in enumerate(slots):
            if isinstance(slot, PromptSlot):
                role = f"{slot.role} prompt of the chain ({slot.key})"
            else:
                role = slot.describe()
            param = Parameter(slot.text, role=role)
            self.register_parameter(f"prompt_{k}", param)
            self._slot_list.append((slot, param))
            if isinstance(slot, PromptSlot):
                parameters.setdefault(token_of[id(slot.prompt)], []).append(
                    (slot.role, param)
                )
            elif isinstance(slot, MessageSlot):
                messages.setdefault(slot.message_id, []).append((slot.location, param))
                texts.append((slot.location, param))
            elif isinstance(slot, ToolDescriptionSlot):
                tools.setdefault(slot.tool.name, {}).setdefault(
                    id(slot.tool), []
                ).insert(0, (slot.location, param))
            elif isinstance(slot, ToolArgumentSlot):
                for tool in slot.tools:
                    tools.setdefault(tool.name, {}).setdefault(id(tool), []).append(
                        (f"tool:{tool.name}:{slot.argument}", param)
                    )
        object.__setattr__(self, "is_graph", graph)
        object.__setattr__(
            self,
            "_index",
            PromptIndex(
                parameters,
                prompts,
                frozenset(found.fallback_names),
                messages=messages,
                tools={name: list(groups.values()) for name, groups in tools.items()},
                texts=texts,
                conditions=frozenset(found.conditions),
                graph=graph,
                known_messages=frozenset(
                    s.message_id for s in every_text if isinstance(s, MessageSlot)
                ),
                known_texts=tuple(
                    s.text for s in every_text if isinstance(s, MessageSlot)
                ),
                output_key=output_key,
            ),
        )
        object.__setattr__(self, "_local", threading.local())
        object.__setattr__(self, "_warned", set())
        object.__setattr__(self, "_warn_lock", threading.Lock())
        object.__setattr__(self, "usage", ProgramUsage("LangChain chain LMs"))
        # afnio Modules inside the chain (AfnioRunnable): their clients' calls are
        # not traced as the chain's own (LangChainChatModel keeps them out of the
        # tracer), so they are metered as clients (llm_clients)
        object.__setattr__(self, "_afnio_modules", afnio_modules(chain, include))

    @property
    def last_results(self) -> list[Any]:
        """What the program returned on this thread's last call (``invoke``: one
        item; ``batch``: one per input, in input order): e.g. an agent's final
        state, which :func:`~afnio_integrations.langchain.optimize` gives the
        metric."""
        return list(getattr(self._local, "results", []))

    def extra_repr(self) -> str:
        return ", ".join(slot.key for slot, _ in self._slot_list)

    # -- calling -----------------------------------------------------------------------

    def _sync(self) -> None:
        """Make the chain use the Parameters' current texts (after an optimizer step,
        the next call already runs with the new prompts)."""
        if any(str(param.data) != slot.text for slot, param in self._slot_list):
            self.write_back()

    @staticmethod
    def _config(
        config: Config | None, collector: RunCollector, run_id: UUID | None = None
    ) -> tuple[Config, UUID]:
        """``config`` with the collector among its callbacks and a root run id (the
        caller's own, unless ``run_id`` is given) also recorded in its metadata."""
        config = dict(config or {})
        given = config.get("run_id")
        chosen = run_id or (given if isinstance(given, UUID) else uuid4())
        config["run_id"] = chosen
        config["metadata"] = {**(config.get("metadata") or {}), CALL_KEY: str(chosen)}
        callbacks = config.get("callbacks")
        if isinstance(callbacks, BaseCallbackManager):
            manager = callbacks.copy()
            manager.add_handler(collector, inherit=True)
            config["callbacks"] = manager
        else:
            config["callbacks"] = [*(callbacks or []), collector]
        return config, chosen

    def _configs(
        self,
        config: Config | Sequence[Config] | None,
        n: int,
        collector: RunCollector,
    ) -> tuple[list[Config], list[UUID]]:
        """One config per batch item, each with its own root run id."""
        if config is None or isinstance(config, dict):
            given = [dict(config or {}, run_id=None) for _ in range(n)]
        else:
            given = [dict(c or {}) for c in config]
            if len(given) != n:
                raise ValueError(
                    f"`config` has {len(given)} configs for {n} inputs: pass one "
                    "config, or one per input."
                )
        configs, ids = [], []
        for item in given:
            own = item.get("run_id")
            fresh = None if isinstance(own, UUID) and own not in ids else uuid4()
            cfg, run_id = self._config(item, collector, fresh)
            configs.append(cfg)
            ids.append(run_id)
        return configs, ids

    def _graph(self, collector: RunCollector, run_id: UUID, result: Any) -> TracedCall:
        root, strays = collector.call(run_id)
        traced = build_graph(root, strays, result, self._index)
        for run in traced.model_runs:
            self._account(run)
        return traced

    def _finish(
        self, collector: RunCollector, ids: list[UUID], results: list[Any]
    ) -> list[Variable]:
        # what the program returned, in input order (a metric of an agent or graph
        # sees the final state, see optimize), for the calling thread
        self._local.results = list(results)
        calls = [
            self._graph(collector, run_id, result)
            for run_id, result in zip(ids, results, strict=True)
        ]
        self._warn_undiscovered(calls)
        return [call.output for call in calls]

    def _warn_once(self, key: str) -> bool:
        """Whether the warning ``key`` is new for this Module (then it is noted)."""
        with self._warn_lock:
            if key in self._warned:
                return False
            self._warned.add(key)
            return True

    def _warn_undiscovered(self, calls: list[TracedCall]) -> None:
        """Warn once per call site about LM calls on undiscovered prompts and runs
        that could not be placed (see the module docstring)."""
        for call in calls:
            for found in call.undiscovered:
                if not self._warn_once(found.site):
                    continue
                warnings.warn(
                    f"An LM call of the traced chain, at {found.site}, got its "
                    f"messages from a prompt afnio did not discover: {found.prompt}. "
                    "It has no Parameter, so it gets no feedback and is never "
                    "optimized. Pass the sub-chain that holds this prompt with "
                    "trace(chain, include=[sub_chain]).",
                    AfnioTracingWarning,
                    stacklevel=_user_stacklevel(),
                )
            for unset in call.untrained:
                if not self._warn_once(f"untrained: {unset.site}"):
                    continue
                warnings.warn(
                    f"An LM call of the traced graph, at {unset.site}, sent a "
                    f"{unset.prompt} that holds no trainable text: it was built on "
                    "the call (e.g. by a dynamic_prompt or another middleware) from "
                    "texts afnio did not discover, so it gets no feedback and is "
                    "never optimized. Mark the static text it is built from with "
                    "afnio_integrations.langchain.trainable(...) and build the "
                    "prompt from that message's content (or send that message as "
                    "the call's system message).",
                    AfnioTracingWarning,
                    stacklevel=_user_stacklevel(),
                )
            for unsure in call.ambiguous:
                if not self._warn_once(f"ambiguous: {unsure.site}"):
                    continue
                warnings.warn(
                    f"A run of the traced chain, at {unsure.site}, {unsure.reason}: "
                    "afnio left it where LangChain recorded it, so the feedback "
                    "through it may miss its prompts or reach other ones. Run "
                    "such composites one after the other, or give them different "
                    "inputs, to trace them exactly.",
                    AfnioTracingWarning,
                    stacklevel=_user_stacklevel(),
                )

    def forward(self, inputs: Any, config: Config | None = None) -> Variable:
        return self.invoke(inputs, config)

    def invoke(self, inputs: Any, config: Config | None = None) -> Variable:
        """Run the chain on ``inputs``; the output as a Variable in the afnio graph."""
        self._sync()
        collector = RunCollector()
        cfg, run_id = self._config(config, collector)
        result = self.chain.invoke(inputs, config=cfg)
        return self._finish(collector, [run_id], [result])[0]

    async def ainvoke(self, inputs: Any, config: Config | None = None) -> Variable:
        """Async :meth:`invoke`."""
        self._sync()
        collector = RunCollector()
        cfg, run_id = self._config(config, collector)
        result = await self.chain.ainvoke(inputs, config=cfg)
        return self._finish(collector, [run_id], [result])[0]

    def _batched(self, outputs: list[Variable]) -> Variable:
        return StackSamples.apply(outputs, "outputs of the chain")

    def batch(
        self, inputs: Sequence[Any], config: Config | Sequence[Config] | None = None
    ) -> Variable:
        """Run the chain on every input (concurrently, as ``chain.batch`` does); one
        batched Variable, aligned with ``inputs``. ``config`` is one config for all
        items or one per item; each item runs with its own root ``run_id`` (an
        item's own ``run_id`` is kept when the configs are given per item). When
        runs fail, every item still runs, then the first failed item's error (in
        input order) is raised with its index as ``error.afnio_batch_index``."""
        inputs = list(inputs)
        self._sync()
        collector = RunCollector()
        configs, ids = self._configs(config, len(inputs), collector)
        results = self.chain.batch(inputs, config=configs, return_exceptions=True)
        _raise_first_failure(results)
        return self._batched(self._finish(collector, ids, results))

    async def abatch(
        self, inputs: Sequence[Any], config: Config | Sequence[Config] | None = None
    ) -> Variable:
        """Async :meth:`batch`."""
        inputs = list(inputs)
        self._sync()
        collector = RunCollector()
        configs, ids = self._configs(config, len(inputs), collector)
        results = await self.chain.abatch(
            inputs, config=configs, return_exceptions=True
        )
        _raise_first_failure(results)
        return self._batched(self._finish(collector, ids, results))

    def _streamed(
        self, collector: RunCollector, run_id: UUID, chunks: list[Any]
    ) -> Any:
        """The whole output of a streamed call: its chunks added up (see
        :func:`_joined`), else what its root run recorded as its output. A graph
        streams updates (or values, or messages) whatever ``stream_mode``; its
        output is always its final state, as its root run recorded it."""
        result = _UNJOINED if self.is_graph else _joined(chunks)
        if result is _UNJOINED:
            root, _ = collector.call(run_id)
            recorded = dict(root.outputs or {})
            result = recorded["output"] if set(recorded) == {"output"} else recorded
        return result

    def stream(self, inputs: Any, config: Config | None = None) -> Variable:
        """Stream the chain; the whole output (its chunks added up, as LangChain
        adds them) as a Variable."""
        self._sync()
        collector = RunCollector()
        cfg, run_id = self._config(config, collector)
        chunks = list(self.chain.stream(inputs, config=cfg))
        result = self._streamed(collector, run_id, chunks)
        return self._finish(collector, [run_id], [result])[0]

    async def astream(self, inputs: Any, config: Config | None = None) -> Variable:
        """Async :meth:`stream`."""
        self._sync()
        collector = RunCollector()
        cfg, run_id = self._config(config, collector)
        chunks = [chunk async for chunk in self.chain.astream(inputs, config=cfg)]
        result = self._streamed(collector, run_id, chunks)
        return self._finish(collector, [run_id], [result])[0]

    # -- usage -------------------------------------------------------------------------

    def _account(self, run: Any) -> None:
        """Count the chain's own LM call: tokens and cost from the run's usage."""
        llm_output = (run.outputs or {}).get("llm_output") or {}
        usage = llm_output.get("token_usage") or {}
        self.usage.record(llm_output.get("model_name") or "unknown", usage)

    def llm_clients(self) -> list[Any]:
        """Everything that meters this chain's LM calls, for a Trainer's
        ``llm_clients=`` (``optimize`` passes it): :attr:`usage` (the chain's own
        LM calls, traced) and the model clients of the afnio Modules inside the chain
        (``AfnioRunnable`` steps, found like prompts), whose calls are afnio's own and
        are metered by the clients themselves, never by the tracer. A client listed
        here that is also the backward or optimizer client is counted once (the
        Trainer deduplicates clients by identity)."""
        clients: list[Any] = [self.usage]
        for module in self._afnio_modules:
            for client in module.models():
                if all(client is not c for c in clients):
                    clients.append(client)
        return clients

    @property
    def lm_calls(self) -> int:
        """The chain's own LM calls traced so far."""
        return self.usage.calls

    @property
    def lm_tokens(self) -> int:
        """Their tokens."""
        return int(self.usage.get_usage().get("total_tokens", 0))

    @property
    def lm_cost(self) -> float:
        """Their cost in USD (afnio's price table)."""
        return float(self.usage.get_usage()["cost"]["amount"])

    # -- write-back and export ---------------------------------------------------------

    def write_back(self) -> None:
        """Put every Parameter's text into the user's own template objects. All texts
        are checked first (a text that drops or adds a placeholder raises
        ``PlaceholderMismatchError``, an empty system prompt or tool description a
        ``ValueError``); nothing changes unless all are valid. A text of an agent or
        graph (system message, tool or argument description) that did not change is
        left as it is (an argument without a description keeps having none)."""
        staged: list[tuple[PromptSlot | TextSlot, Any]] = [
            (
                slot,
                checked_template(slot, str(param.data))
                if isinstance(slot, PromptSlot)
                else slot.check(param.data),
            )
            for slot, param in self._slot_list
            if isinstance(slot, PromptSlot) or param.data != slot.text
        ]
        for slot, checked in staged:
            if isinstance(slot, PromptSlot):
                apply_template(slot, checked)
            else:
                slot.apply(checked)

    def prompts(self) -> dict[str, str]:
        """The current texts by slot key (e.g. ``"prompt0.system0"``)."""
        return {slot.key: str(param.data) for slot, param in self._slot_list}

    def save_prompts(self, path: str | Path) -> None:
        """Save :meth:`prompts` as JSON (to re-apply to a freshly built chain)."""
        Path(path).write_text(
            json.dumps(self.prompts(), indent=2, ensure_ascii=False), "utf-8"
        )

    def load_prompts(self, path: str | Path) -> None:
        """Load texts saved by :meth:`save_prompts` into the Parameters and write them
        back into the chain."""
        texts = json.loads(Path(path).read_text("utf-8"))
        unknown = sorted(set(texts) - {slot.key for slot, _ in self._slot_list})
        if unknown:
            raise KeyError(
                f"Unknown prompt slots {unknown}; this chain has "
                f"{sorted(self.prompts())}."
            )
        before = {slot.key: str(param.data) for slot, param in self._slot_list}
        for slot, param in self._slot_list:
            if slot.key in texts:
                param.data = texts[slot.key]
        try:
            self.write_back()
        except Exception:
            for slot, param in self._slot_list:
                param.data = before[slot.key]
            raise

    def save_chain(self, path: str | Path) -> tuple[type, ...]:
        """Save the chain, its current texts written in, as LangChain JSON: the same
        as ``save_chain(self, path)`` (see
        :func:`afnio_integrations.langchain.save_chain`; load it with
        :func:`~afnio_integrations.langchain.load_chain`)."""
        from afnio_integrations.langchain._saving import save_chain

        self._not_for_graphs("save_chain")
        return save_chain(self, path)

    def _not_for_graphs(self, what: str) -> None:
        if self.is_graph:
            raise TypeError(
                f"{what}() saves an LCEL chain as LangChain JSON; an agent or "
                "LangGraph graph is code and cannot be serialized that way. Keep "
                "its texts with save_prompts(path) and apply them to a freshly "
                "built graph with trace(graph).load_prompts(path)."
            )

    def export(self) -> Any:
        """A copy of the user's chain with the current texts written in and no afnio
        metadata: a plain LangChain chain that needs no afnio at run time. Prompts,
        parsers and composites are deep copies; each model (``ChatOpenAI``...) is a
        shallow copy (``model_copy()``): its own settings, sharing the original's
        HTTP clients, whose locks cannot be copied. Functions of ``RunnableLambda``
        steps are shared. To keep the chain across processes, use
        :meth:`save_chain`."""
        from afnio_integrations.langchain._saving import copy_chain

        self._not_for_graphs("export")
        self.write_back()
        exported = copy_chain(self.chain)
        originals = {id(p) for p in self._index.prompts.values()}
        for prompt in discover(exported).prompts:
            if id(prompt) in originals:  # shared, not copied (e.g. held by a function)
                continue
            if prompt.metadata and METADATA_KEY in prompt.metadata:
                prompt.metadata = {
                    k: v for k, v in prompt.metadata.items() if k != METADATA_KEY
                } or None
        return exported


def trace(
    chain: Any,
    select: Selector | None = None,
    include: Sequence[Any] = (),
    output_key: str | None = None,
) -> TracedChain:
    """Trace a LangChain chain, agent or LangGraph graph: an afnio Module whose
    Parameters are the program's texts chosen by ``select`` (a role, roles,
    ``"all"``, or a predicate on a slot; by default ``"system"`` for a chain, and
    ``("system", "tool")`` for an agent or graph: system prompts and tool
    descriptions; ``"tool_arg"`` adds tools' argument descriptions). Prompts held by
    LangChain's composites and by the functions of ``RunnableLambda``/``@chain``
    steps are found (see :func:`find_prompt_slots`), and in a graph those of its node
    functions, subgraphs and conditional edges, an agent's system prompt and its
    tools (see :mod:`afnio_integrations.langchain._langgraph`); ``include`` lists
    sub-chains (or :func:`trainable` messages) reached any other way (e.g. looked up
    in a dict at run time). Their calls are traced like the rest; an LM call on a
    prompt that was not found emits an
    :class:`~afnio_integrations.langchain.AfnioTracingWarning` naming it.

    For a graph, the traced output is the final state's ``output_key``: by default
    ``structured_response`` when the state has one, else the last of its
    ``messages`` (an agent's final answer), else the whole state.

    Example::

        traced = trace(prompt | ChatOpenAI(model="gpt-4o-mini") | StrOutputParser())
        prediction = traced.invoke({"message": "The heater is broken again."})
        score, explanation = F.exact_match_evaluator(prediction, "negative")
        explanation.backward()
        TGD(traced.parameters(), model_client=client).step()
        traced.write_back()          # the user's chain now sends the improved prompt
    """
    return TracedChain(chain, select, include, output_key)
