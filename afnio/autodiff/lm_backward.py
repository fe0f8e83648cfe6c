"""Asking the backward model for textual gradients (shared by every LM-backed node).

One call sends a system and a user prompt (see :mod:`afnio.autodiff.prompts`) with the
JSON-schema ``response_format`` ``afnio_gradients`` and expects one feedback string per
variable. An unusable answer (not JSON, wrong shape, wrong count) is shown back to the
model with the error, up to ``BACKWARD_PASS_MAX_RETRIES`` times; then a
:class:`~afnio.errors.BackwardParseError` (or :class:`~afnio.errors.GradientCountError`)
names the node. A raw answer never becomes a gradient.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pydantic

from afnio._template import render
from afnio.autodiff import config
from afnio.autodiff.prompts import (
    CHAT_BACKWARD_USER,
    MESSAGE_ELEMENT,
    RETRY_USER,
    VARIABLE_ELEMENT,
    VARIABLE_IN_MESSAGE,
    gradients_response_format,
)
from afnio.errors import BackwardParseError, GradientCountError
from afnio.models.step_memo import reject_answer

__all__ = [
    "VariableInfo",
    "chat_backward_user",
    "format_conversation",
    "format_variables",
    "request_gradients",
]


class _GradientsAnswer(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    gradients: list[str]


@dataclass(frozen=True)
class VariableInfo:
    """How a variable is shown to the backward model."""

    role: str
    location: str  # the chat role of its message, "input:<key>", or "prediction"
    trainable: bool
    text: str


def format_conversation(messages: list[dict[str, str]]) -> str:
    """One ``<MESSAGE>`` element per rendered message."""
    return "\n".join(
        render(MESSAGE_ELEMENT, {"role": m["role"], "content": m["content"]})
        for m in messages
    )


def format_variables(variables: list[VariableInfo]) -> str:
    """One ``<VARIABLE>`` element per variable, numbered from 1."""
    return "\n".join(
        render(
            VARIABLE_ELEMENT,
            {
                "index": i,
                "role": v.role,
                "location": v.location,
                "trainable": "true" if v.trainable else "false",
                "text": v.text,
            },
        )
        for i, v in enumerate(variables, start=1)
    )


def chat_backward_user(
    conversation: list[dict[str, str]],
    output_role: str,
    output: str,
    feedback: str,
    variables: list[VariableInfo],
) -> str:
    """The user prompt of a ChatCompletion backward call (``CHAT_BACKWARD_USER``).

    A variable whose text is the whole content of a message of the conversation
    (a system prompt) is not repeated: its ``<VARIABLE>`` points at that message
    (unless the text is shorter than the pointer)."""
    where: dict[str, tuple[int, str]] = {}
    for i, message in enumerate(conversation, start=1):
        if message["content"].strip():
            where.setdefault(message["content"], (i, message["role"]))
    shown = []
    for v in variables:
        if v.text in where:
            index, role = where[v.text]
            pointer = render(VARIABLE_IN_MESSAGE, {"index": index, "role": role})
            if len(pointer) < len(v.text):  # a short text is cheaper as it is
                v = VariableInfo(v.role, v.location, v.trainable, pointer)
        shown.append(v)
    return render(
        CHAT_BACKWARD_USER,
        {
            "conversation": format_conversation(conversation),
            "output_role": output_role,
            "output": output,
            "feedback": feedback,
            "count": len(shown),
            "variables": format_variables(shown),
        },
    )


def _parse(answer: str, count: int) -> list[str]:
    try:
        data = json.loads(answer)
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"the answer is not valid JSON ({e.msg})") from None
    try:
        gradients = _GradientsAnswer.model_validate(data).gradients
    except pydantic.ValidationError as e:
        raise ValueError(
            'the answer must be {"gradients": [string, ...]}: '
            + "; ".join(err["msg"] for err in e.errors())
        ) from None
    if len(gradients) != count:
        raise _CountMismatch(
            f"it holds {len(gradients)} feedback strings, but {count} are asked for "
            "(one per variable, for each sample listed)"
        )
    return gradients


class _CountMismatch(ValueError):
    pass


async def request_gradients(
    node: str, system: str, user: str, count: int, **completion_args: Any
) -> list[str]:
    """Ask the backward model for ``count`` feedback strings.

    Args:
        node: the node's name, for errors (``"ChatCompletionBackward0"``).
        system, user: the rendered prompts.
        count: how many variables the prompt lists.
        **completion_args: overrides of the backward client's completion args.

    Raises:
        GradientCountError: the count stayed wrong after the retries.
        BackwardParseError: the answer stayed unusable after the retries.
    """
    from afnio._model_client import get_backward_model_client

    client = get_backward_model_client()
    messages: list[dict[str, str]] = [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
    ]
    retries = config.BACKWARD_PASS_MAX_RETRIES
    answer = ""
    error: ValueError | None = None
    for _ in range(retries + 1):
        answer = await client.achat(
            messages, response_format=gradients_response_format(), **completion_args
        )
        try:
            return _parse(answer, count)
        except ValueError as e:
            error = e
            reject_answer(answer)  # a retried step must not replay it
            messages = [
                *messages,
                {"role": "assistant", "content": answer},
                {
                    "role": "user",
                    "content": render(RETRY_USER, {"error": str(e), "count": count}),
                },
            ]
    cls = (
        GradientCountError if isinstance(error, _CountMismatch) else BackwardParseError
    )
    raise cls(
        f"{node}: the backward model's answer could not be used after {retries} "
        f"retries: {error}. Last answer: {answer[:300]!r}. Check the backward model "
        "(afnio.set_backward_model_client) supports JSON-schema answers.",
        node=node,
    )
