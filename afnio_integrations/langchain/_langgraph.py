"""LangChain agents (``create_agent``) and LangGraph graphs: what is trainable in them,
and how a new text goes back into the user's live objects.

:func:`~afnio_integrations.langchain.trace` accepts a compiled LangGraph graph (a
``langchain.agents.create_agent`` agent is one) as well as an LCEL chain. Discovery
(see :mod:`afnio_integrations.langchain._discovery`) then also walks the graph's
nodes: node functions (their closures, the globals they name and the functions those
call), subgraphs, conditional-edge functions and ``ToolNode`` tools. Besides the
prompt templates it finds there, these texts become Parameters (each a
:class:`TextSlot`):

* :class:`AgentSystemSlot`: the system prompt of a ``create_agent`` agent (a string
  or a ``SystemMessage``; the message object the agent sends on every model call);
  role ``"system"``, key ``agent.system`` (``agent<k>.system`` for the k-th agent
  after the first);
* :class:`ToolDescriptionSlot`: a tool's ``description``; role ``"tool"``, key
  ``tool.<name>``, location ``tool:<name>`` in the LM calls offered the tool;
* :class:`ToolArgumentSlot`: the description of one of a tool's arguments (its
  ``args_schema``); role ``"tool_arg"``, key ``tool.<name>.<arg>``, location
  ``tool:<name>:<arg>``; selected with ``select="all"`` or a ``"tool_arg"`` role;
* :class:`MessageSlot`: a ``SystemMessage`` marked with :func:`trainable` (the marker
  for any text discovery cannot see as a template: a message a node sends as it is,
  or the static text a ``dynamic_prompt`` builds on); role ``"system"``, key
  ``message.<name>``.

The default selection for a graph is ``("system", "tool")``: system prompts (of
agents, marked messages and the system templates of prompts in node functions) and
tool descriptions.

**Write-back** changes the objects the graph already holds, so the *same* compiled
agent or graph sends the new texts on its next call: a system message's ``content``
is set in place (the message object stays the one the agent holds), a tool's
``description`` is reassigned, an argument's description is set on its
``args_schema`` (a pydantic model: the field's description, the model rebuilt and
reassigned to the tool, which clears LangChain's cached schema; a dict schema: the
property's ``description``). Messages and descriptions are sent literally, so braces
stay braces. Every text is checked before anything changes (a text must be a
non-empty string).

**Message ids.** A discovered system message without an ``id`` gets one
(``afnio-<hex>``): LangChain never sends a message id to the provider, and it lets the
tracer recognize that message in every model call (a message built anew on each call,
e.g. by a ``dynamic_prompt``, has none; its Parameters are linked when its text
contains their current text, see :mod:`afnio_integrations.langchain._tracing`).
"""

from __future__ import annotations

import re
import threading
import types
import uuid
from abc import ABC, abstractmethod
from typing import Any

from langchain_core.messages import BaseMessage, SystemMessage
from langchain_core.tools import BaseTool

__all__ = [
    "AgentOutput",
    "bound_copies",
    "AgentSystemSlot",
    "MessageSlot",
    "TextSlot",
    "ToolArgumentSlot",
    "ToolDescriptionSlot",
    "is_graph",
    "trainable",
]

_ID_PREFIX = "afnio-"


def is_graph(obj: Any) -> bool:
    """Whether ``obj`` is a compiled LangGraph graph (``create_agent`` returns one);
    ``False`` when LangGraph is not installed."""
    try:
        from langgraph.pregel import Pregel
    except ImportError:  # the agents extra is not installed
        return False
    return isinstance(obj, Pregel)


def _message_text(message: BaseMessage) -> str | None:
    """The text of a message whose content is one text (a string, or a list holding
    exactly one text block); ``None`` for other contents."""
    content = message.content
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            i
            for i, part in enumerate(content)
            if isinstance(part, str)
            or (isinstance(part, dict) and part.get("type") == "text")
        ]
        if len(texts) == 1:
            part = content[texts[0]]
            return part if isinstance(part, str) else str(part.get("text", ""))
    return None


def _set_message_text(message: BaseMessage, text: str) -> None:
    content = message.content
    if isinstance(content, list):
        for i, part in enumerate(content):
            if isinstance(part, str):
                content[i] = text
                return
            if isinstance(part, dict) and part.get("type") == "text":
                part["text"] = text
                return
    message.content = text


def ensure_id(message: BaseMessage) -> str:
    """``message``'s id, giving it one (``afnio-<hex>``) when it has none. LangChain
    does not send message ids to the provider."""
    if not message.id:
        message.id = f"{_ID_PREFIX}{uuid.uuid4().hex[:16]}"
    return str(message.id)


def _checked_text(text: Any, what: str) -> str:
    if not isinstance(text, str):
        raise TypeError(
            f"The new text for {what} must be a str, got {type(text).__name__}."
        )
    if not text.strip():
        raise ValueError(
            f"The new text for {what} is empty: an agent needs a non-empty text "
            "there. Check the optimizer's answer, or load a saved text."
        )
    return text


class TextSlot(ABC):
    """A trainable text of an agent or graph that is not a prompt template: where it
    lives in the user's objects, how it is checked and written back."""

    key: str
    """A stable name (``agent.system``, ``tool.<name>``...), used by
    ``save_prompts``/``load_prompts``."""
    role: str
    """``"system"``, ``"tool"`` or ``"tool_arg"`` (what ``select=`` picks)."""
    location: str
    """Where the text is in an LM call (shown to the backward model)."""

    @property
    @abstractmethod
    def text(self) -> str:
        """The text the user's object holds now."""

    def check(self, text: Any) -> str:
        """``text`` if it can be written back (else a clear error; nothing changes)."""
        return _checked_text(text, f"{self.key!r}")

    @abstractmethod
    def apply(self, text: str) -> None:
        """Write a checked text into the user's object."""

    def describe(self) -> str:
        """What the Parameter is (its role)."""
        return f"{self.role} text of the graph ({self.key})"


class MessageSlot(TextSlot):
    """A system message (an agent's, or one marked with :func:`trainable`): its text
    is set in place, so whoever holds the message sends the new text."""

    def __init__(self, key: str, message: BaseMessage, what: str) -> None:
        self.key = key
        self.role = "system"
        self.location = "system"
        self.message = message
        self.what = what
        ensure_id(message)

    @property
    def message_id(self) -> str:
        return str(self.message.id)

    @property
    def text(self) -> str:
        return _message_text(self.message) or ""

    def apply(self, text: str) -> None:
        _set_message_text(self.message, text)

    def describe(self) -> str:
        return f"{self.what} ({self.key})"


class AgentSystemSlot(MessageSlot):
    """The system prompt of a ``create_agent`` agent: the ``SystemMessage`` its model
    node sends (a string prompt is held as one)."""

    def __init__(self, key: str, message: BaseMessage) -> None:
        super().__init__(key, message, "system prompt of the agent")


def _function_of(definition: dict[str, Any]) -> dict[str, Any]:
    """The part of a bound tool definition holding its ``name``/``description``/
    ``parameters`` (OpenAI's ``{"type": "function", "function": {...}}`` or flat)."""
    function = definition.get("function")
    return function if isinstance(function, dict) else definition


def bound_copies(tool: BaseTool, definitions: list[dict[str, Any]]) -> list[Any]:
    """The definitions of ``tool`` a model binding holds (by name)."""
    return [d for d in definitions if _function_of(d).get("name") == tool.name]


class ToolDescriptionSlot(TextSlot):
    """A tool's ``description`` (reassigned on write-back, which also clears
    LangChain's cached tool schema), and the copies of it that models bound with
    ``bind_tools`` hold."""

    def __init__(self, key: str, tool: BaseTool, copies: list[Any] = ()) -> None:  # type: ignore[assignment]
        self.key = key
        self.role = "tool"
        self.tool = tool
        self.copies = list(copies)
        self.location = f"tool:{tool.name}"

    @property
    def text(self) -> str:
        return str(self.tool.description or "")

    def apply(self, text: str) -> None:
        self.tool.description = text
        for definition in self.copies:
            _function_of(definition)["description"] = text

    def describe(self) -> str:
        return f"description of the {self.tool.name} tool ({self.key})"


def _schema_properties(schema: Any) -> dict[str, Any] | None:
    if isinstance(schema, dict):
        props = schema.get("properties")
        return props if isinstance(props, dict) else None
    return None


def tool_arguments(tool: BaseTool) -> list[str]:
    """The argument names of ``tool`` (from its ``args_schema``), in order."""
    schema = tool.args_schema
    if schema is None:
        return []
    if isinstance(schema, dict):
        return list(_schema_properties(schema) or {})
    fields = getattr(schema, "model_fields", None)
    return list(fields) if isinstance(fields, dict) else []


class ToolArgumentSlot(TextSlot):
    """The description of one argument of a tool, in its ``args_schema`` (one slot
    for every tool sharing that schema: :attr:`tools`), and in the copies of the
    tool's definition that models bound with ``bind_tools`` hold."""

    def __init__(
        self,
        key: str,
        tool: BaseTool,
        argument: str,
        copies: list[Any] = (),  # type: ignore[assignment]
    ) -> None:
        self.key = key
        self.role = "tool_arg"
        self.tool = tool
        self.tools = [tool]
        self.argument = argument
        self.copies = list(copies)
        self.location = f"tool:{tool.name}:{argument}"

    @property
    def text(self) -> str:
        schema = self.tool.args_schema
        props = _schema_properties(schema)
        if props is not None:
            return str((props.get(self.argument) or {}).get("description") or "")
        field = getattr(schema, "model_fields", {}).get(self.argument)
        return str(getattr(field, "description", None) or "")

    def apply(self, text: str) -> None:
        schema = self.tool.args_schema
        props = _schema_properties(schema)
        if props is not None:
            props.setdefault(self.argument, {})["description"] = text
        else:
            schema.model_fields[self.argument].description = text  # type: ignore[union-attr]
            schema.model_rebuild(force=True)  # type: ignore[union-attr]
        # reassigning clears each tool's memoized call schema (BaseTool.__setattr__)
        for tool in self.tools:
            tool.args_schema = schema
        for definition in self.copies:
            params = _function_of(definition).get("parameters")
            props = _schema_properties(params)
            if props is not None and isinstance(props.get(self.argument), dict):
                props[self.argument]["description"] = text

    def describe(self) -> str:
        return (
            f"description of the {self.argument!r} argument of the {self.tool.name} "
            f"tool ({self.key})"
        )


# -- the marker ------------------------------------------------------------------------

_MARKED: dict[int, tuple[BaseMessage, str]] = {}
_MARKED_LOCK = threading.Lock()
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def trainable(text: str | SystemMessage, name: str | None = None) -> SystemMessage:
    """Mark a system text as trainable wherever a traced graph uses it.

    Discovery finds prompt templates and agents' system prompts by itself; use this
    for a text it cannot see as one: a ``SystemMessage`` a node function sends as it
    is (``llm.invoke([SYSTEM, HumanMessage(q)])``), or the static text a
    ``dynamic_prompt`` builds on. A string becomes a ``SystemMessage``; a
    ``SystemMessage`` is marked and returned as it is. Keep the returned message
    where your node function can reach it (a global, a closure, or
    ``trace(graph, include=[message])``): it becomes a Parameter (key
    ``message.<name>``), and write-back sets its ``content`` in place. A system
    message built on each call that *contains* its text (``f"{BASE.content} ..."``)
    links the Parameter too.

    Example::

        ROUTER = trainable("Route the request to the right team.", name="router")

        def route(state):
            return {"route": llm.invoke([ROUTER, HumanMessage(state["q"])]).content}

    Raises:
        TypeError: if ``text`` is neither a ``str`` nor a ``SystemMessage``.
        ValueError: if ``name`` is not made of letters, digits, ``_``, ``.``, ``-``.
    """
    if isinstance(text, str):
        message = SystemMessage(content=text)
    elif isinstance(text, SystemMessage):
        message = text
    else:
        raise TypeError(
            "`text` must be a str or a langchain_core SystemMessage, got "
            f"{type(text).__name__}."
        )
    if _message_text(message) is None:
        raise ValueError(
            "`text` must hold one text (a string content, or one text block), not "
            f"{message.content!r}."
        )
    if not (_message_text(message) or "").strip():
        raise ValueError(
            "`text` is empty: mark the system text the node sends (an empty text "
            "gives the optimizer nothing to improve)."
        )
    if name is not None and not _NAME.match(name):
        raise ValueError(
            f"`name` {name!r} must be made of letters, digits, '_', '.' or '-' "
            "(it names the Parameter, e.g. 'router')."
        )
    ensure_id(message)
    with _MARKED_LOCK:
        _MARKED[id(message)] = (message, name or "")
    return message


def marked_name(obj: Any) -> str | None:
    """The name :func:`trainable` gave ``obj`` (``""`` when unnamed); ``None`` when
    ``obj`` is not marked."""
    with _MARKED_LOCK:
        found = _MARKED.get(id(obj))
    return found[1] if found is not None and found[0] is obj else None


# -- agents ---------------------------------------------------------------------------


def agent_system_message(func: Any) -> tuple[types.CellType, Any] | None:
    """For the model node function of a ``create_agent`` agent: the closure cell
    holding its system message, and the message (``None`` when it has none)."""
    func = getattr(func, "__func__", func)
    code = getattr(func, "__code__", None)
    closure = getattr(func, "__closure__", None)
    if code is None or not closure or "system_message" not in code.co_freevars:
        return None
    if not str(getattr(func, "__module__", "")).startswith("langchain.agents"):
        return None
    cell = closure[code.co_freevars.index("system_message")]
    try:
        return cell, cell.cell_contents
    except ValueError:  # an empty cell
        return None


def graph_input(graph: Any, inputs: Any) -> Any:
    """A trainset row's inputs as ``graph`` takes them: a ``str`` for a graph with a
    ``messages`` channel (an agent) becomes ``{"messages": [{"role": "user",
    "content": ...}]}``; anything else is passed as it is."""
    if isinstance(inputs, str) and "messages" in dict(getattr(graph, "channels", {})):
        return {"messages": [{"role": "user", "content": inputs}]}
    return inputs


# -- what a metric sees ----------------------------------------------------------------


class AgentOutput(str):
    """The output of a traced agent or graph as a metric sees it: the final answer's
    text (a ``str``, so answer metrics work unchanged), with the final ``state`` the
    graph returned and its ``messages`` (the trajectory: every model answer with its
    tool calls, every tool result).

    >>> out = AgentOutput("done", {"messages": []})
    >>> out == "done", out.messages
    (True, [])
    """

    state: Any
    messages: list[Any]

    def __new__(cls, text: str, state: Any = None) -> AgentOutput:
        obj = super().__new__(cls, text)
        obj.state = state
        messages = state.get("messages") if isinstance(state, dict) else None
        obj.messages = list(messages) if isinstance(messages, list) else []
        return obj
