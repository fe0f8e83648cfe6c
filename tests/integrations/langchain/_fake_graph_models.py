"""A scripted LangChain chat model (no network) and helpers that read, from the afnio
graph of a traced call, which Parameters and which upstream LM calls each recorded
chat call depends on (used by ``test_trace_graph_review.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool

from afnio import Variable
from afnio_integrations._recorded import RecordedChatCall
from afnio_integrations.langchain import TracedChain

Answer = Callable[[list[BaseMessage], list[dict[str, Any]]], "AIMessage | str"]
"""What the scripted model answers: ``answer(messages, offered_tools)``."""


class ScriptedChatModel(BaseChatModel):
    """A chat model answering with ``answer(messages, tools)`` (an ``AIMessage`` or
    a text); ``tools`` are the OpenAI tool definitions the call offered."""

    answer: Any

    @property
    def _llm_type(self) -> str:
        return "scripted-fake"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: Any = None,
        **kwargs: Any,
    ) -> ChatResult:
        out = self.answer(messages, kwargs.get("tools") or [])
        if isinstance(out, str):
            out = AIMessage(content=out)
        return ChatResult(generations=[ChatGeneration(message=out)])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: Any = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._generate(messages, stop, run_manager, **kwargs)

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:  # type: ignore[override]
        """Bind the tools as OpenAI tool definitions (as ``ChatOpenAI`` does)."""
        kwargs.pop("tool_choice", None)
        kwargs.pop("parallel_tool_calls", None)
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)


@dataclass(frozen=True)
class CallRef:
    """An LM call, named by its system text and its output text."""

    system: str
    output: str


@dataclass(frozen=True)
class LinkedCall:
    """A recorded chat call and what its inputs are linked to in the afnio graph:
    the keys of the Parameters and the upstream LM calls reached without passing
    through another LM call."""

    ref: CallRef
    conversation: list[dict[str, Any]]
    parameters: frozenset[str]
    calls: frozenset[CallRef]


def _edges(node: Any) -> list[Any]:
    return [e.node for e in getattr(node, "next_functions", ()) if e.node is not None]


def _is_call(node: Any) -> bool:
    cls = getattr(node, "_forward_cls", None)
    return isinstance(cls, type) and issubclass(cls, RecordedChatCall)


def _ref(node: Any) -> CallRef:
    system = [m for m in node.conversation if m["role"] == "system"]
    return CallRef(str(system[0]["content"]) if system else "", str(node.output))


def _names(traced: TracedChain) -> dict[int, str]:
    return {
        id(p): key for key, p in zip(traced.prompts(), traced.parameters(), strict=True)
    }


def _reached(
    starts: Iterable[Any], names: dict[int, str]
) -> tuple[set[str], set[CallRef]]:
    """The Parameters (by key; other leaves by text) and the LM calls reached from
    the grad_fn nodes ``starts``, stopping at each LM call."""
    params: set[str] = set()
    calls: set[CallRef] = set()
    stack, seen = list(starts), set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)
        if var is not None and not hasattr(node, "_forward_cls"):
            params.add(names.get(id(var), f"<leaf {str(var.data)[:30]!r}>"))
        elif _is_call(node):
            calls.add(_ref(node))
        else:
            stack.extend(_edges(node))
    return params, calls


def _call_nodes(output: Variable) -> Iterator[Any]:
    stack = [output.grad_fn] if output.grad_fn is not None else []
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if _is_call(node):
            yield node
        stack.extend(_edges(node))


def linked_calls(output: Variable, traced: TracedChain) -> list[LinkedCall]:
    """Every LM call the traced ``output`` depends on, with what it is linked to."""
    names = _names(traced)
    found = []
    for node in _call_nodes(output):
        params, calls = _reached(_edges(node), names)
        found.append(
            LinkedCall(
                _ref(node), list(node.conversation), frozenset(params), frozenset(calls)
            )
        )
    return found


def output_links(
    output: Variable, traced: TracedChain
) -> tuple[set[str], set[CallRef]]:
    """The Parameters and LM calls the traced output itself is linked to."""
    return _reached([output.grad_fn] if output.grad_fn else [], _names(traced))


def reached_parameters(output: Variable, traced: TracedChain) -> set[str]:
    """The keys of every Parameter feedback on ``output`` can reach."""
    names = _names(traced)
    keys: set[str] = set()
    stack = [output.grad_fn] if output.grad_fn is not None else []
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)
        if var is not None and id(var) in names:
            keys.add(names[id(var)])
        stack.extend(_edges(node))
    return keys


def call_with(calls: list[LinkedCall], system_prefix: str) -> list[LinkedCall]:
    """The calls whose system text starts with ``system_prefix``."""
    return [c for c in calls if c.ref.system.startswith(system_prefix)]
