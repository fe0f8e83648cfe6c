"""Finding the trainable prompt texts of an LCEL chain, without changing its structure.

Discovery walks the runnables the chain holds, depth first, in definition order:

* ``RunnableSequence`` steps and ``RunnableParallel`` branches (also ``.assign``'s
  mapper, ``RunnableAssign``);
* ``RunnableBranch`` conditions, branches and default;
* ``RunnableWithFallbacks``: the runnable and its fallbacks;
* ``RunnableBinding.bound`` (``.bind``, ``.with_config``, ``.with_retry``
  (``RunnableRetry``), ``.with_listeners``, ...) and ``RunnableEach.bound``
  (``.map()``);
* ``RouterRunnable`` routes; configurable runnables (default and alternatives);
* ``RunnableLambda`` (``@chain``) and ``RunnableGenerator`` functions: the runnables
  in their closure, the globals they name, and the functions those reference (a
  nested lambda or helper calling a sub-chain), plus LangChain's own
  ``RunnableLambda.deps`` (attribute chains such as ``self.chain``);
* any other runnable: its fields that hold runnables (directly or in a list, tuple
  or dict), e.g. a custom composite or an output parser's retry chain.

Sub-chains reached any other way (e.g. looked up in a dict at run time) are invisible:
pass them with ``include=``. When a traced call runs an LM on a prompt discovery did
not find, :class:`~afnio_integrations.langchain.AfnioTracingWarning` says so (see
:mod:`afnio_integrations.langchain._traced`).

Every ``ChatPromptTemplate`` (deduplicated by identity) contributes its text-bearing
message templates (``messages[i].prompt.template``), and a plain ``PromptTemplate``
its whole text (role ``human``: a chat model receives it as one user message).
``MessagesPlaceholder`` and literal messages carry no template and are skipped;
multimodal message templates (a list of templates) are skipped too. Other prompt
templates (few-shot templates, ...) are discovered, so their LM calls are traced
without a warning, but hold no trainable text.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from langchain_core.language_models import BaseLanguageModel
from langchain_core.messages import BaseMessage
from langchain_core.prompts import (
    BasePromptTemplate,
    ChatPromptTemplate,
    PromptTemplate,
)
from langchain_core.prompts.chat import (
    AIMessagePromptTemplate,
    ChatMessagePromptTemplate,
    HumanMessagePromptTemplate,
    SystemMessagePromptTemplate,
)
from langchain_core.runnables import (
    Runnable,
    RunnableBranch,
    RunnableGenerator,
    RunnableLambda,
    RunnableParallel,
    RunnableSequence,
    RunnableWithFallbacks,
)
from langchain_core.runnables.base import RunnableBindingBase, RunnableEachBase
from langchain_core.runnables.configurable import (
    DynamicRunnable,
    RunnableConfigurableAlternatives,
)
from langchain_core.runnables.passthrough import RunnableAssign, RunnablePassthrough
from langchain_core.runnables.router import RouterRunnable
from langchain_core.tools import BaseTool

from afnio_integrations.langchain._langgraph import (
    agent_system_message,
    is_graph,
    marked_name,
)

__all__ = ["Discovery", "PromptSlot", "discover", "find_prompt_slots"]

METADATA_KEY = "afnio_prompt_id"

_ROLES: tuple[tuple[type, str], ...] = (
    (SystemMessagePromptTemplate, "system"),
    (HumanMessagePromptTemplate, "human"),
    (AIMessagePromptTemplate, "ai"),
)

_FUNCTION_DEPTH = 4  # how many function hops a lambda's references are followed


@dataclass
class PromptSlot:
    """One message template of a prompt: where its text lives in the user's chain."""

    key: str  # stable name, e.g. "prompt0.system0"
    prompt: ChatPromptTemplate | PromptTemplate
    index: int  # position in prompt.messages; -1 for a plain PromptTemplate
    role: str  # "system", "human", "ai" or a ChatMessagePromptTemplate role

    @property
    def message(self) -> Any:
        return self.prompt if self.index < 0 else self.prompt.messages[self.index]

    @property
    def template(self) -> PromptTemplate:
        return self.prompt if self.index < 0 else self.message.prompt

    @property
    def text(self) -> str:
        return self.template.template


@dataclass
class Discovery:
    """What :func:`discover` found: every prompt template (in discovery order) and
    the run names of the ``RunnableWithFallbacks`` it passed (the tracer needs them
    to place the fallbacks' runs, see :mod:`afnio_integrations.langchain._tracing`).
    """

    prompts: list[BasePromptTemplate] = field(default_factory=list)
    fallback_names: set[str] = field(default_factory=set)
    messages: list[tuple[BaseMessage, str, str]] = field(default_factory=list)
    """Trainable system messages outside templates, in discovery order: (message,
    kind, name), kind ``"agent"`` (a ``create_agent`` system prompt) or
    ``"marked"`` (:func:`~afnio_integrations.langchain.trainable`)."""
    tools: list[BaseTool] = field(default_factory=list)
    """The tools the graph's nodes hold (``ToolNode``, an agent's tools)."""
    conditions: set[str] = field(default_factory=set)
    """Run names of the graphs' conditional-edge functions."""
    bound_tools: list[dict[str, Any]] = field(default_factory=list)
    """Tool definitions a model binding holds (``llm.bind_tools(tools)`` copies
    each tool's definition when it is called): write-back updates them too."""
    graphs: int = 0
    """How many compiled LangGraph graphs were walked."""

    @property
    def editable(self) -> list[ChatPromptTemplate | PromptTemplate]:
        """The prompts whose texts can be optimized (chat and plain templates)."""
        return [
            p
            for p in self.prompts
            if isinstance(p, (ChatPromptTemplate, PromptTemplate))
        ]


def _role(message: Any) -> str | None:
    if isinstance(message, ChatMessagePromptTemplate):
        return str(message.role)
    for cls, role in _ROLES:
        if isinstance(message, cls):
            return role
    return None


def _code_names(code: types.CodeType) -> Iterator[str]:
    """The global names a code object (and the functions defined in it) uses."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_names(const)


def _closure_and_globals(func: Any) -> list[Any]:
    """Every value a function uses: its closure cells' contents, its default
    argument values (``def node(state, prompt=prompt)``, the way a function made in a
    loop keeps its own value) and the globals it names."""
    found: list[Any] = []
    func = getattr(func, "__func__", func)  # a bound method
    if isinstance(func, types.BuiltinFunctionType) or not callable(func):
        return found
    for cell in getattr(func, "__closure__", None) or ():
        try:
            found.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    if isinstance(func, types.FunctionType):
        found.extend(func.__defaults__ or ())
        found.extend((func.__kwdefaults__ or {}).values())
    code = getattr(func, "__code__", None)
    names = getattr(func, "__globals__", None)
    if isinstance(code, types.CodeType) and isinstance(names, dict):
        found.extend(
            names[name] for name in dict.fromkeys(_code_names(code)) if name in names
        )
    return found


def _function_references(func: Any) -> list[Any]:
    """What a function uses: its closure cells and the globals it names (runnables,
    and functions that may call runnables)."""
    return [
        value
        for value in _closure_and_globals(func)
        if isinstance(value, (Runnable, types.FunctionType, types.MethodType))
        or is_graph(value)
    ]


class _Walker:
    def __init__(self) -> None:
        self.found = Discovery()
        self._seen_prompts: set[int] = set()
        self._visited: set[int] = set()
        self._seen_messages: set[int] = set()

    def _message(self, message: BaseMessage, kind: str, name: str = "") -> None:
        if id(message) not in self._seen_messages:
            self._seen_messages.add(id(message))
            self.found.messages.append((message, kind, name))

    def _marked_in(self, value: Any, depth: int = 0) -> None:
        """Marked messages (:func:`trainable`) and tools in a value a function uses
        (directly, or in a list, tuple or dict)."""
        if isinstance(value, BaseMessage):
            name = marked_name(value)
            if name is not None:
                self._message(value, "marked", name)
        elif isinstance(value, BaseTool):
            self.walk(value)
        elif depth < 2 and isinstance(value, (list, tuple)):
            for item in value:
                self._marked_in(item, depth + 1)
        elif depth < 2 and isinstance(value, dict):
            for item in value.values():
                self._marked_in(item, depth + 1)

    def _graph(self, graph: Any) -> None:
        """A compiled LangGraph graph: its nodes' runnables (node functions,
        subgraphs, ``ToolNode``s) and its conditional edges' functions."""
        self.found.graphs += 1
        for name, node in dict(getattr(graph, "nodes", {}) or {}).items():
            if name.startswith("__"):
                continue
            bound = getattr(node, "bound", None)
            if bound is not None:
                self.walk(bound)
        builder = getattr(graph, "builder", None)
        for branches in dict(getattr(builder, "branches", {}) or {}).values():
            for name, spec in dict(branches).items():
                self.found.conditions.add(str(name))
                path = getattr(spec, "path", None)
                if path is not None:
                    self.walk(path)

    def walk(self, obj: Any, depth: int = 0) -> None:
        if isinstance(obj, BasePromptTemplate):
            if id(obj) not in self._seen_prompts:
                self._seen_prompts.add(id(obj))
                self.found.prompts.append(obj)
                for message in getattr(obj, "messages", None) or ():
                    self._marked_in(message)
            return
        if isinstance(obj, BaseMessage):
            self._marked_in(obj)
            return
        if id(obj) in self._visited:
            return
        self._visited.add(id(obj))
        if isinstance(obj, (types.FunctionType, types.MethodType)):
            if isinstance(obj, types.MethodType) and isinstance(obj.__self__, Runnable):
                self.walk(obj.__self__)
            system = agent_system_message(obj)
            if system is not None and isinstance(system[1], BaseMessage):
                self._message(system[1], "agent")
            for value in _closure_and_globals(obj):
                self._marked_in(value)
            if depth < _FUNCTION_DEPTH:
                for ref in _function_references(obj):
                    self.walk(ref, depth + 1)
            return
        if is_graph(obj):
            self._graph(obj)
            return
        if isinstance(obj, BaseTool) and all(t is not obj for t in self.found.tools):
            self.found.tools.append(obj)
        if not isinstance(obj, Runnable) or isinstance(obj, BaseLanguageModel):
            return  # a model holds no prompt (its fields are clients and settings)
        if isinstance(obj, RunnableWithFallbacks):
            self.found.fallback_names.add(obj.get_name())
        if isinstance(obj, RunnableBindingBase):
            bound_tools = (obj.kwargs or {}).get("tools")
            for definition in bound_tools if isinstance(bound_tools, list) else ():
                if isinstance(definition, dict) and all(
                    d is not definition for d in self.found.bound_tools
                ):
                    self.found.bound_tools.append(definition)
        if isinstance(obj, RunnableBindingBase) and isinstance(
            obj.bound, RunnableWithFallbacks
        ):
            name = (obj.config or {}).get("run_name")
            if name:
                self.found.fallback_names.add(str(name))
        for child in _held(obj):
            self.walk(child, depth if isinstance(child, Runnable) else 0)


def _held(obj: Runnable) -> Iterator[Any]:
    """The runnables (and functions) a runnable holds, in definition order."""
    if isinstance(obj, RunnableSequence):
        yield from obj.steps
    elif isinstance(obj, RunnableParallel):
        yield from obj.steps__.values()
    elif isinstance(obj, RunnableBranch):
        for condition, branch in obj.branches:
            yield condition
            yield branch
        yield obj.default
    elif isinstance(obj, RunnableWithFallbacks):
        yield obj.runnable
        yield from obj.fallbacks
    elif isinstance(obj, (RunnableBindingBase, RunnableEachBase)):
        yield obj.bound
    elif isinstance(obj, RouterRunnable):
        yield from obj.runnables.values()
    elif isinstance(obj, RunnableAssign):
        yield obj.mapper
    elif isinstance(obj, RunnableConfigurableAlternatives):
        yield obj.default
        yield from (v for v in obj.alternatives.values() if isinstance(v, Runnable))
    elif isinstance(obj, DynamicRunnable):
        yield obj.default
    elif isinstance(obj, (RunnableLambda, RunnablePassthrough)):
        for name in ("func", "afunc"):
            func = getattr(obj, name, None)
            if func is not None:
                yield func
        if isinstance(obj, RunnableLambda):
            # attribute chains, e.g. self.chain.invoke (from the source; best effort)
            with contextlib.suppress(Exception):
                yield from obj.deps
    elif isinstance(obj, RunnableGenerator):
        for name in ("_transform", "_atransform"):
            func = getattr(obj, name, None)
            if func is not None:
                yield func
    else:  # another runnable: its functions (a LangGraph node), the runnables
        # its fields hold
        for name in ("func", "afunc"):
            func = getattr(obj, name, None)
            if isinstance(func, (types.FunctionType, types.MethodType)):
                yield func
        for value in dict(getattr(obj, "__dict__", {})).values():
            yield from _runnables_in(value)


def _runnables_in(value: Any, depth: int = 0) -> Iterator[Runnable]:
    if isinstance(value, Runnable):
        yield value
    elif depth < 2 and isinstance(value, (list, tuple)):
        for item in value:
            yield from _runnables_in(item, depth + 1)
    elif depth < 2 and isinstance(value, dict):
        for item in value.values():
            yield from _runnables_in(item, depth + 1)


def discover(chain: Any, include: Iterable[Any] = ()) -> Discovery:
    """Every prompt template ``chain`` holds (and ``include`` holds: more runnables
    or prompts to search), in discovery order, deduplicated by identity."""
    walker = _Walker()
    for runnable in (chain, *include):
        walker.walk(runnable)
    return walker.found


def _prompts(chain: Any) -> list[ChatPromptTemplate | PromptTemplate]:
    """The editable prompts of ``chain`` (chat and plain templates)."""
    return discover(chain).editable


Selector = str | Iterable[str] | Callable[[PromptSlot], bool]


ROLES = ("system", "human", "ai", "tool", "tool_arg")
"""The roles ``select=`` names: prompt messages (``system``, ``human``, ``ai``; a
``ChatMessagePromptTemplate``'s own role too) and, in an agent or graph, tool
descriptions (``tool``) and tool argument descriptions (``tool_arg``)."""


def _keeper(select: Selector) -> Callable[[PromptSlot], bool]:
    """The predicate ``select`` stands for. A predicate receives every slot: a
    :class:`PromptSlot`, or in an agent or graph a
    :class:`~afnio_integrations.langchain._langgraph.TextSlot` (both have ``key``
    and ``role``)."""
    if callable(select) and not isinstance(select, str):
        return select
    wanted = {select} if isinstance(select, str) else set(select)
    if not all(isinstance(role, str) for role in wanted):
        raise TypeError(
            f"`select` must be a role, roles, 'all' or a predicate, got {select!r}."
        )
    if "all" in wanted:
        return lambda s: True
    return lambda s: s.role in wanted


def check_roles(select: Selector, present: Iterable[str]) -> None:
    """Refuse a ``select`` naming a role that is neither one of :data:`ROLES` nor
    the role of a discovered message (a ``ChatMessagePromptTemplate``'s own role):
    a typo would otherwise select nothing of that kind, silently.

    Raises:
        ValueError: naming the unknown roles and the known ones.
    """
    if callable(select) and not isinstance(select, str):
        return
    wanted = {select} if isinstance(select, str) else set(select)
    known = {*ROLES, *present, "all"}
    unknown = sorted(str(r) for r in wanted - known)
    if unknown:
        raise ValueError(
            f"`select` names unknown roles {unknown}: use {', '.join(ROLES)}, "
            "'all', or a predicate on a slot."
        )


def slots_of(
    prompts: Iterable[ChatPromptTemplate | PromptTemplate], select: Selector
) -> list[PromptSlot]:
    """The message templates of ``prompts`` (numbered in order) chosen by
    ``select``."""
    keep = _keeper(select)
    slots: list[PromptSlot] = []
    for p, prompt in enumerate(prompts):
        if isinstance(prompt, PromptTemplate):
            # a plain template: its whole text is one human message
            slot = PromptSlot(f"prompt{p}.human0", prompt, -1, "human")
            if keep(slot):
                slots.append(slot)
            continue
        counts: dict[str, int] = {}
        for i, message in enumerate(prompt.messages):
            role = _role(message)
            if role is None or not isinstance(
                getattr(message, "prompt", None), PromptTemplate
            ):
                continue  # placeholder, literal message or multimodal template
            n = counts.get(role, 0)
            counts[role] = n + 1
            slot = PromptSlot(f"prompt{p}.{role}{n}", prompt, i, role)
            if keep(slot):
                slots.append(slot)
    return slots


def find_prompt_slots(
    chain: Any, select: Selector = "system", include: Iterable[Any] = ()
) -> list[PromptSlot]:
    """The message templates of ``chain`` chosen by ``select``: a role (``"system"``,
    ``"human"``, ``"ai"``), several roles, ``"all"``, or a predicate on a slot.

    Sub-chains held by LangChain's composites (sequences, parallels, branches,
    fallbacks, bindings, retries, ``.map()``, routers, ``.assign``) and those called
    inside a ``RunnableLambda`` (found through the function's closure and the globals
    it names) are searched; ``include`` lists more runnables (or prompts) to search,
    for sub-chains reached any other way."""
    return slots_of(discover(chain, include).editable, select)
