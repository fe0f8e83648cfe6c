"""Metrics for agents and graphs: which tools were called, and the final answer.

``optimize(agent, trainset, metric)`` calls ``metric(prediction, target)`` on every
row. For a traced agent or graph the *prediction* is the final answer text that also
carries the run's final state (``.state``) and its messages (``.messages``), so a
metric can judge the *trajectory*, the tools the agent called, as well as the answer.

Tool-trajectory metrics in the style of LangChain's AgentEvals
(``create_trajectory_match_evaluator(trajectory_match_mode=...)``), comparing tool
*names* (not arguments) with the row's target:

* :func:`trajectory_match` ``("strict")``: the same calls in the same order;
* ``"unordered"``: the same calls (the same number of each), in any order;
* ``"subset"``: every call made is in the reference (the agent called nothing extra);
* ``"superset"``: every reference call was made (maybe more).

Each returns ``(score, feedback)``: 1.0 or 0.0, and a sentence that becomes the
gradient. A mismatch reads ``Expected tool calls: [<reference>], got [<calls>].``
followed by what differs, the form afnio's backward passes (and the bundled
simulator, :func:`afnio.testing.world.expected_tools`) read as "these tools should
have been called".

:func:`answer_match` compares the final answer with the target instead;
:func:`tool_calls_of`, :func:`final_answer_of` and :func:`expected_tools` are the
pieces, for writing one's own metric.

>>> from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
>>> run = {"messages": [
...     HumanMessage("The lift is broken"),
...     AIMessage("", tool_calls=[{"name": "repairs", "args": {}, "id": "1"}]),
...     ToolMessage("Ticket R-1 opened", tool_call_id="1"),
...     AIMessage("A technician is on the way."),
... ]}
>>> trajectory_match("strict")(run, "repairs")
(1.0, 'The tool calls match the reference: [repairs].')
>>> trajectory_match("strict")(run, "cleaning")
(0.0, 'Expected tool calls: [cleaning], got [repairs]. Missing: [cleaning]; not in the reference: [repairs].')
>>> answer_match()(run, "a technician is on the way.")
(1.0, 'The answer matches the expected answer "a technician is on the way.".')
"""  # noqa: E501

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from langchain_core.messages import AIMessage, BaseMessage

__all__ = [
    "TrajectoryMode",
    "answer_match",
    "expected_tools",
    "final_answer_of",
    "tool_calls_of",
    "trajectory_match",
]

TrajectoryMode = Literal["strict", "unordered", "subset", "superset"]
"""How :func:`trajectory_match` compares the calls made with the reference."""

_MODES: tuple[str, ...] = ("strict", "unordered", "subset", "superset")

_ACCEPTED = (
    "an agent's or graph's traced output (an object with a `.messages` list, or a "
    "`.state` dict holding 'messages'), a state dict with a 'messages' key, a list "
    "of LangChain messages (langchain_core.messages), or a list of OpenAI-style "
    "message dicts ({'role': 'assistant', 'tool_calls': [...]})"
)

_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""OpenAI's (and Anthropic's) function-name alphabet: the names a target may spell."""

_NO_TOOL = frozenset(
    {"", "none", "no tool", "no tools", "no tool call", "no tool calls", "[]"}
)
"""Targets (casefolded, spaces collapsed) that mean: no tool should be called."""

_ASSISTANT_ROLES = frozenset({"assistant", "ai", "aimessagechunk"})

_MAX_SHOWN = 500
"""Characters of the agent's answer quoted in :func:`answer_match`'s feedback."""


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _messages_of(prediction: Any) -> list[Any]:
    """The messages a prediction holds (see :data:`_ACCEPTED`)."""
    if isinstance(prediction, BaseMessage):
        return [prediction]
    messages = getattr(prediction, "messages", None)
    if isinstance(messages, (list, tuple)) and not isinstance(prediction, Mapping):
        return list(messages)
    state = getattr(prediction, "state", None)
    if isinstance(state, Mapping) and not isinstance(prediction, Mapping):
        prediction = state
    if isinstance(prediction, Mapping):
        if "messages" in prediction:
            messages = prediction["messages"]
            if not isinstance(messages, (list, tuple)):
                raise TypeError(
                    "prediction['messages'] must be a list of messages, not "
                    f"{type(messages).__name__} ({_short(messages)})."
                )
            return list(messages)
        if "role" in prediction or "type" in prediction:
            return [prediction]  # one message dict
        raise TypeError(
            "prediction is a dict without a 'messages' key (keys: "
            f"{_short(sorted(map(str, prediction)))}); it must be {_ACCEPTED}."
        )
    if isinstance(prediction, (list, tuple)):
        return list(prediction)
    hint = (
        " A plain str has no trajectory: give the metric the traced agent's output "
        "(optimize() does) or the state the agent returned."
        if isinstance(prediction, str)
        else ""
    )
    raise TypeError(
        f"prediction must be {_ACCEPTED}; got {type(prediction).__name__} "
        f"({_short(prediction)}).{hint}"
    )


def _is_assistant(message: Any, where: str) -> bool:
    """Whether a message (LangChain or dict) was written by the model."""
    if isinstance(message, BaseMessage):
        return isinstance(message, AIMessage)
    if isinstance(message, Mapping):
        role = message.get("role", message.get("type"))
        if not isinstance(role, str):
            raise TypeError(
                f"{where} is a message dict without a 'role' (or LangChain 'type'): "
                f"{_short(message)}. Give it 'role': 'assistant', 'user', 'tool'..."
            )
        return role.casefold() in _ASSISTANT_ROLES
    raise TypeError(
        f"{where} must be a LangChain message or a message dict "
        f"({{'role': ..., 'content': ...}}), not {type(message).__name__} "
        f"({_short(message)})."
    )


def _tool_name(call: Any, where: str) -> str:
    """A tool call's name: OpenAI's ``{"function": {"name"}}`` shape or LangChain's
    ``{"name", "args"}`` (also as objects with those attributes)."""
    function = (
        call.get("function")
        if isinstance(call, Mapping)
        else getattr(call, "function", None)
    )
    if function is not None:
        name = (
            function.get("name")
            if isinstance(function, Mapping)
            else getattr(function, "name", None)
        )
    else:
        name = (
            call.get("name")
            if isinstance(call, Mapping)
            else getattr(call, "name", None)
        )
    if not isinstance(name, str):
        raise TypeError(
            f"{where} has no tool name: expected {{'name': ..., 'args': ...}} "
            "(LangChain) or {'function': {'name': ..., 'arguments': ...}} (OpenAI), "
            f"got {_short(call)}."
        )
    return name


def _ignored(ignore: str | Iterable[str]) -> frozenset[str]:
    if isinstance(ignore, str):
        return frozenset({ignore})
    try:
        names = frozenset(ignore)
    except TypeError:
        raise TypeError(
            f"ignore must be a tool name or an iterable of tool names, not "
            f"{type(ignore).__name__} ({_short(ignore)})."
        ) from None
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"ignore must hold tool names (str); got {_short(bad[0])}.")
    return names


def tool_calls_of(prediction: Any, *, ignore: str | Iterable[str] = ()) -> list[str]:
    """The names of the tools called, in order, over all assistant messages.

    Args:
        prediction: an agent's or graph's traced output (anything with a
            ``.messages`` list, or a ``.state`` dict holding ``"messages"``), a state
            dict with ``"messages"``, or a list of messages: LangChain messages
            (``AIMessage.tool_calls``) or OpenAI-style dicts (an assistant message's
            ``tool_calls[i]["function"]["name"]``, or LangChain's dict shape
            ``{"name", "args"}``).
        ignore: tool names left out, e.g. the tool a ``create_agent`` agent calls
            to return its structured ``response_format`` (a ``ToolStrategy``'s tool
            is named after the schema). One name or several.

    Calls in several messages, and parallel calls in one message, are listed in the
    order the messages hold them. Only ``tool_calls`` count: LangChain's
    ``invalid_tool_calls`` (arguments that could not be parsed) do not. A state
    holding a whole thread (a checkpointer's earlier turns) lists the calls of every
    turn.

    Raises:
        TypeError: ``prediction`` (or one of its messages, or tool calls) has a shape
            not listed above.

    >>> from langchain_core.messages import AIMessage
    >>> tool_calls_of([AIMessage("", tool_calls=[
    ...     {"name": "lookup", "args": {}, "id": "1"},
    ...     {"name": "refund", "args": {}, "id": "2"}])])
    ['lookup', 'refund']
    >>> tool_calls_of({"messages": [
    ...     {"role": "user", "content": "Broken lift"},
    ...     {"role": "assistant", "tool_calls": [
    ...         {"id": "c", "type": "function",
    ...          "function": {"name": "repairs", "arguments": "{}"}}]},
    ...     {"role": "assistant", "tool_calls": [{"name": "Answer", "args": {}}]}]},
    ...     ignore="Answer")
    ['repairs']
    """
    skip = _ignored(ignore)
    names: list[str] = []
    for i, message in enumerate(_messages_of(prediction)):
        where = f"prediction message {i}"
        if not _is_assistant(message, where):
            continue
        calls = (
            message.get("tool_calls")
            if isinstance(message, Mapping)
            else getattr(message, "tool_calls", None)
        )
        if not calls:
            continue
        if not isinstance(calls, (list, tuple)):
            raise TypeError(
                f"{where}'s tool_calls must be a list, not {type(calls).__name__}."
            )
        for j, call in enumerate(calls):
            name = _tool_name(call, f"{where}, tool call {j}")
            if name not in skip:
                names.append(name)
    return names


def expected_tools(target: Any) -> list[str]:
    """The tool names a target names, in order (duplicates kept).

    A target is a list or tuple of names, or a string: names separated by commas,
    ``and`` or spaces, optionally in ``[...]`` (a Python or JSON list's text, quoted
    names included, is read too). ``""``, ``"none"``, ``"no tool"`` (``"no tools"``,
    ``"no tool calls"``) and ``"[]"`` mean that no tool should be called. In a string
    a name is spelled in OpenAI's function-name alphabet (letters, digits, ``_``,
    ``-``); a list's names are taken as they are.

    Raises:
        TypeError: ``target`` is neither a str nor a list/tuple of str.
        ValueError: a name is empty, or a string holds something that is not a name.

    >>> expected_tools("repairs")
    ['repairs']
    >>> expected_tools("[lookup_order, refund]"), expected_tools("lookup and refund")
    (['lookup_order', 'refund'], ['lookup', 'refund'])
    >>> expected_tools("['a', 'b']"), expected_tools(("a", "a"))
    (['a', 'b'], ['a', 'a'])
    >>> expected_tools("none"), expected_tools("[]"), expected_tools([])
    ([], [], [])
    """
    if isinstance(target, (list, tuple)):
        names = []
        for i, name in enumerate(target):
            if not isinstance(name, str):
                raise TypeError(
                    f"target[{i}] must be a tool name (str), not "
                    f"{type(name).__name__} ({_short(name)})."
                )
            if not name.strip():
                raise ValueError(f"target[{i}] is an empty tool name.")
            names.append(name.strip())
        return names
    if not isinstance(target, str):
        raise TypeError(
            "target must be a tool name, names separated by commas or 'and' "
            "(e.g. 'lookup, refund'), 'none' for no tool call, or a list/tuple of "
            f"names; got {type(target).__name__} ({_short(target)})."
        )
    text = " ".join(target.split())
    if text.casefold() in _NO_TOOL:
        return []
    inner = text
    for opening, closing in ("[]", "()"):
        if inner.startswith(opening) and inner.endswith(closing):
            inner = inner[1:-1].strip()
            break
    names = []
    for token in re.split(r"[,\s]+", inner):
        token = token.strip("'\"`")
        if not token or token.casefold() == "and":
            continue
        if not _TOOL_NAME.fullmatch(token):
            raise ValueError(
                f"target {target!r} holds {token!r}, which is not a tool name "
                "(letters, digits, '_' and '-', at most 64). Separate names with "
                "commas or 'and', or pass a list of names."
            )
        names.append(token)
    return names


def _listed(names: Sequence[str]) -> str:
    return "[" + ", ".join(names) + "]"


def _missing(wanted: Sequence[str], have: Sequence[str]) -> list[str]:
    """The calls of ``wanted`` that ``have`` lacks, counted (a multiset difference),
    in ``wanted``'s order."""
    left = Counter(have)
    out = []
    for name in wanted:
        if left[name] > 0:
            left[name] -= 1
        else:
            out.append(name)
    return out


def _matches(mode: str, reference: Sequence[str], calls: Sequence[str]) -> bool:
    if mode == "strict":
        return list(calls) == list(reference)
    if mode == "unordered":
        return Counter(calls) == Counter(reference)
    if mode == "subset":
        return not _missing(calls, reference)  # nothing made beyond the reference
    return not _missing(reference, calls)  # superset: every reference call made


def trajectory_match(
    mode: TrajectoryMode = "strict", *, ignore: str | Iterable[str] = ()
) -> Callable[[Any, Any], tuple[float, str]]:
    """A metric comparing the tools an agent called with the target's tool names.

    The modes follow AgentEvals' ``trajectory_match_mode`` (on tool names; the
    arguments are not compared). Calls are counted: a tool called twice is two
    calls.

    * ``"strict"``: the same calls in the same order;
    * ``"unordered"``: the same calls, in any order;
    * ``"subset"``: every call made is one of the reference's (nothing extra; fewer
      is fine, none too);
    * ``"superset"``: every reference call was made (more is fine).

    Args:
        mode: one of the above.
        ignore: tool names left out of both the calls and the reference (see
            :func:`tool_calls_of`), e.g. a structured-output tool.

    Returns:
        ``metric(prediction, target) -> (score, feedback)``, named
        ``trajectory_match_<mode>``: ``prediction`` as :func:`tool_calls_of` takes
        it, ``target`` as :func:`expected_tools` reads it; score 1.0 or 0.0. On a
        mismatch the feedback starts ``Expected tool calls: [<reference>], got
        [<calls>].`` (``[]`` for none) and says what is missing or extra; on a match
        it says so: ``The tool calls match the reference: [<calls>].`` (strict,
        unordered), ``The tool calls [<calls>] are all in the reference
        [<reference>].`` (subset), ``The tool calls [<calls>] include every call in
        the reference [<reference>].`` (superset).

    Raises:
        ValueError: an unknown ``mode``.
        TypeError: ``ignore`` is not names; the metric itself raises
            :func:`tool_calls_of`'s and :func:`expected_tools`' errors.

    >>> calls = {"messages": [{"role": "assistant", "tool_calls": [
    ...     {"name": "lookup", "args": {}}, {"name": "refund", "args": {}}]}]}
    >>> unordered = trajectory_match("unordered")
    >>> unordered.__name__, unordered(calls, "refund, lookup")[0]
    ('trajectory_match_unordered', 1.0)
    >>> trajectory_match("superset")(calls, "lookup")[0]
    1.0
    >>> trajectory_match("subset")(calls, "lookup")
    (0.0, 'Expected tool calls: [lookup], got [lookup, refund]. Only calls in the reference may be made; not in the reference: [refund].')
    """  # noqa: E501
    if mode not in _MODES:
        raise ValueError(
            f"mode must be one of {', '.join(repr(m) for m in _MODES)}; got "
            f"{_short(mode)}."
        )
    skip = _ignored(ignore)

    def metric(prediction: Any, target: Any) -> tuple[float, str]:
        calls = tool_calls_of(prediction, ignore=skip)
        reference = [n for n in expected_tools(target) if n not in skip]
        if _matches(mode, reference, calls):
            return 1.0, _agreement(mode, reference, calls)
        return 0.0, _mismatch(mode, reference, calls)

    metric.__name__ = metric.__qualname__ = f"trajectory_match_{mode}"
    metric.__doc__ = (
        f"Score 1.0 when the tools called match the target's ({mode} match), else "
        "0.0, with feedback naming the expected tool calls."
    )
    metric.mode = mode  # type: ignore[attr-defined]
    metric.ignore = skip  # type: ignore[attr-defined]
    return metric


def _agreement(mode: str, reference: Sequence[str], calls: Sequence[str]) -> str:
    """The feedback on a match (it names no tool as expected)."""
    if mode == "subset":
        return (
            f"The tool calls {_listed(calls)} are all in the reference "
            f"{_listed(reference)}."
        )
    if mode == "superset":
        return (
            f"The tool calls {_listed(calls)} include every call in the reference "
            f"{_listed(reference)}."
        )
    return f"The tool calls match the reference: {_listed(calls)}."


def _mismatch(mode: str, reference: Sequence[str], calls: Sequence[str]) -> str:
    """The feedback on a mismatch; it starts with the reference, in the form
    ``Expected tool calls: [a, b], got [c].``"""
    head = f"Expected tool calls: {_listed(reference)}, got {_listed(calls)}."
    missing = _missing(reference, calls)
    extra = _missing(calls, reference)
    if mode == "subset":
        return (
            f"{head} Only calls in the reference may be made; not in the reference: "
            f"{_listed(extra)}."
        )
    if mode == "superset":
        return f"{head} Every call in the reference must be made; missing: " + (
            f"{_listed(missing)}."
        )
    if not missing and not extra:  # strict, same calls in another order
        return f"{head} The same calls, in a different order than the reference."
    parts = []
    if missing:
        parts.append(f"Missing: {_listed(missing)}")
    if extra:
        parts.append(f"not in the reference: {_listed(extra)}")
    detail = "; ".join(parts)
    return f"{head} {detail[0].upper()}{detail[1:]}."


def _text(content: Any) -> str:
    """A message content's text: a str, or the text blocks of a list of blocks."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, Mapping) and block.get("type") == "text":
                parts.append(str(block.get("text", "")))
        return "".join(parts)
    return str(content)


def final_answer_of(prediction: Any) -> str:
    """The final answer: the text of the last assistant message (``""`` when there
    is none); a str prediction is its own answer (so is a traced agent's output,
    whose text is the final answer).

    Args:
        prediction: a str, or any shape :func:`tool_calls_of` takes.

    Raises:
        TypeError: ``prediction`` has none of those shapes.

    >>> from langchain_core.messages import AIMessage, HumanMessage
    >>> final_answer_of([HumanMessage("hi"), AIMessage("Hello!")])
    'Hello!'
    >>> final_answer_of({"messages": [{"role": "assistant", "content": [
    ...     {"type": "text", "text": "Done."}]}]}), final_answer_of("Done.")
    ('Done.', 'Done.')
    """
    if isinstance(prediction, str):
        return str(prediction)
    messages = _messages_of(prediction)
    for i in range(len(messages) - 1, -1, -1):
        message = messages[i]
        if _is_assistant(message, f"prediction message {i}"):
            content = (
                message.get("content")
                if isinstance(message, Mapping)
                else getattr(message, "content", None)
            )
            return _text(content)
    return ""


def _normalized(text: str) -> str:
    return " ".join(text.split()).casefold()


def answer_match(
    normalize: bool | Callable[[str], str] = True,
) -> Callable[[Any, Any], tuple[float, str]]:
    """A metric comparing the final answer (:func:`final_answer_of`) with the target.

    Args:
        normalize: ``True`` compares casefolded texts, stripped and with runs of
            whitespace as one space; ``False`` compares them exactly; a function
            ``str -> str`` is applied to both sides.

    Returns:
        ``metric(prediction, target) -> (score, feedback)``, named
        ``answer_match``: 1.0 when the answer equals the target (or one of a
        list/tuple of acceptable answers), else 0.0 with ``Expected the answer
        "<target>", got "<answer>".`` (the answer cut at 500 characters).

    Raises:
        TypeError: ``normalize`` is neither a bool nor callable; the metric raises
            :func:`final_answer_of`'s errors, and a ``TypeError`` for a target that
            is not a str (or a non-empty list/tuple of str).

    >>> metric = answer_match()
    >>> metric("  Repairs ", "repairs")
    (1.0, 'The answer matches the expected answer "repairs".')
    >>> metric("cleaning", ["repairs", "maintenance"])
    (0.0, 'Expected the answer "repairs" (or "maintenance"), got "cleaning".')
    """
    if normalize is True:
        norm: Callable[[str], str] = _normalized
    elif normalize is False:

        def norm(text: str) -> str:
            return text
    elif callable(normalize):
        norm = normalize
    else:
        raise TypeError(
            "normalize must be True, False or a function str -> str; got "
            f"{type(normalize).__name__} ({_short(normalize)})."
        )

    def metric(prediction: Any, target: Any) -> tuple[float, str]:
        answer = final_answer_of(prediction)
        targets = _answer_targets(target)
        got = norm(answer)
        for wanted in targets:
            if norm(wanted) == got:
                return 1.0, f'The answer matches the expected answer "{wanted}".'
        shown = answer if len(answer) <= _MAX_SHOWN else answer[:_MAX_SHOWN] + "..."
        others = "".join(f' (or "{t}")' for t in targets[1:])
        return 0.0, f'Expected the answer "{targets[0]}"{others}, got "{shown}".'

    metric.__name__ = metric.__qualname__ = "answer_match"
    metric.__doc__ = (
        "Score 1.0 when the final answer equals the target, else 0.0, with feedback "
        "naming the expected answer."
    )
    return metric


def _answer_targets(target: Any) -> list[str]:
    if isinstance(target, str):
        return [target]
    if isinstance(target, (list, tuple)) and target:
        for i, t in enumerate(target):
            if not isinstance(t, str):
                raise TypeError(
                    f"target[{i}] must be an acceptable answer (str), not "
                    f"{type(t).__name__} ({_short(t)})."
                )
        return [str(t) for t in target]
    raise TypeError(
        "target must be the expected answer (str) or a non-empty list/tuple of "
        f"acceptable answers; got {type(target).__name__} ({_short(target)})."
    )
