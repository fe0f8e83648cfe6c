"""Finding the trainable prompt texts of an LCEL chain, without changing its structure.

The chain's graph (``chain.get_graph()``) holds the actual runnable instances; every
``ChatPromptTemplate`` (deduplicated by identity) contributes its text-bearing message
templates (``messages[i].prompt.template``), and a plain ``PromptTemplate`` its whole
text (role ``human``: a chat model receives it as one user message).
``MessagesPlaceholder`` and literal messages carry no template and are skipped;
multimodal message templates (a list of templates) are skipped too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from langchain_core.prompts import ChatPromptTemplate, PromptTemplate
from langchain_core.prompts.chat import (
    AIMessagePromptTemplate,
    ChatMessagePromptTemplate,
    HumanMessagePromptTemplate,
    SystemMessagePromptTemplate,
)
from langchain_core.runnables import Runnable, RunnableLambda

__all__ = ["PromptSlot", "find_prompt_slots"]

METADATA_KEY = "afnio_prompt_id"

_ROLES: tuple[tuple[type, str], ...] = (
    (SystemMessagePromptTemplate, "system"),
    (HumanMessagePromptTemplate, "human"),
    (AIMessagePromptTemplate, "ai"),
)


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


def _role(message: Any) -> str | None:
    if isinstance(message, ChatMessagePromptTemplate):
        return str(message.role)
    for cls, role in _ROLES:
        if isinstance(message, cls):
            return role
    return None


def _referenced_runnables(func: Any) -> list[Runnable]:
    """Runnables a lambda's function uses: its closure cells and the globals it
    names (how a sub-chain called inside a ``RunnableLambda`` is found)."""
    found: list[Runnable] = []
    for cell in getattr(func, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, Runnable):
            found.append(value)
    code = getattr(func, "__code__", None)
    if code is not None:
        names = getattr(func, "__globals__", {})
        found.extend(
            v for name in code.co_names if isinstance(v := names.get(name), Runnable)
        )
    return found


def _prompts(
    chain: Any, visited: set[int] | None = None
) -> list[ChatPromptTemplate | PromptTemplate]:
    if isinstance(chain, (ChatPromptTemplate, PromptTemplate)):
        return [chain]
    visited = set() if visited is None else visited
    if id(chain) in visited:
        return []
    visited.add(id(chain))
    seen: dict[int, ChatPromptTemplate | PromptTemplate] = {}
    for node in chain.get_graph().nodes.values():
        data = node.data
        if isinstance(data, (ChatPromptTemplate, PromptTemplate)):
            seen.setdefault(id(data), data)
        elif isinstance(data, RunnableLambda):
            for func in (data.func, getattr(data, "afunc", None)):
                for runnable in _referenced_runnables(func):
                    for prompt in _prompts(runnable, visited):
                        seen.setdefault(id(prompt), prompt)
    return list(seen.values())


Selector = str | Iterable[str] | Callable[[PromptSlot], bool]


def find_prompt_slots(
    chain: Any, select: Selector = "system", include: Iterable[Any] = ()
) -> list[PromptSlot]:
    """The message templates of ``chain`` chosen by ``select``: a role (``"system"``,
    ``"human"``, ``"ai"``), several roles, ``"all"``, or a predicate on a slot.

    Sub-chains called inside a ``RunnableLambda`` are found through the function's
    closure and the globals it names; ``include`` lists more runnables (or prompts) to
    search, for sub-chains reached any other way."""
    if isinstance(select, str):
        roles = None if select == "all" else {select}
        keep: Callable[[PromptSlot], bool] = lambda s: roles is None or s.role in roles  # noqa: E731
    elif callable(select):
        keep = select
    else:
        wanted = set(select)
        keep = lambda s: s.role in wanted  # noqa: E731
    slots: list[PromptSlot] = []
    prompts: dict[int, ChatPromptTemplate | PromptTemplate] = {}
    for runnable in (chain, *include):
        for prompt in _prompts(runnable):
            prompts.setdefault(id(prompt), prompt)
    for p, prompt in enumerate(prompts.values()):
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
