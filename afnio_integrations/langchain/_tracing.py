"""Tracing an LCEL chain into an afnio graph, through LangChain callbacks.

Each call runs the **user's own chain** with a tracer in ``config["callbacks"]``
(nothing is wrapped or rebuilt). From the recorded run tree, every chat-model call
becomes an afnio node whose inputs are the Parameters of the prompt that produced its
messages and the outputs of earlier calls that fed that prompt; its output is the
recorded text (no LM call is repeated). ``loss.backward()`` then asks the backward model
for feedback on every Parameter through every LM call, with the exact messages the
model saw.
"""

from __future__ import annotations

import json
from typing import Any

from langchain_core.tracers.base import BaseTracer
from langchain_core.tracers.schemas import Run

from afnio._template import render
from afnio._variable import Variable
from afnio.autodiff.function import Function
from afnio.autodiff.lm_backward import (
    VariableInfo,
    format_conversation,
    format_variables,
    request_gradients,
)
from afnio.autodiff.prompts import CHAT_BACKWARD_SYSTEM, CHAT_BACKWARD_USER

__all__ = ["RecordedChatCall", "RunCollector", "StepOutput"]

OUTPUT_ROLE = "response of a LangChain chat model"


class RunCollector(BaseTracer):
    """Collects the root runs of traced calls (``original+chat`` schema, inline)."""

    run_inline = True

    def __init__(self) -> None:
        super().__init__(_schema_format="original+chat")
        self.roots: list[Run] = []

    def _persist_run(self, run: Run) -> None:
        self.roots.append(run)


def _message_role(message: Any) -> str:
    kind = getattr(message, "type", None)
    if kind is None and isinstance(message, dict):
        ident = message.get("id", [""])[-1]
        kind = {
            "SystemMessage": "system",
            "HumanMessage": "human",
            "AIMessage": "ai",
        }.get(ident, "chat")
        return {"human": "user", "ai": "assistant"}.get(kind, kind)
    return {"human": "user", "ai": "assistant"}.get(str(kind), str(kind))


def _message_text(message: Any) -> str:
    if isinstance(message, dict):
        content = message.get("kwargs", {}).get("content", "")
    else:
        content = getattr(message, "content", "")
    if isinstance(content, list):
        return "\n".join(
            part.get("text", "") if isinstance(part, dict) else str(part)
            for part in content
        )
    return str(content)


def conversation_of(chat_run: Run) -> list[dict[str, str]]:
    """The messages a chat-model run received."""
    batches = chat_run.inputs.get("messages") or [[]]
    return [{"role": _message_role(m), "content": _message_text(m)} for m in batches[0]]


def output_of(chat_run: Run) -> str:
    """The text a chat-model run produced (aggregated when streamed)."""
    generations = (chat_run.outputs or {}).get("generations") or [[{}]]
    first = generations[0][0] if generations and generations[0] else {}
    text = first.get("text") if isinstance(first, dict) else None
    if text:
        return str(text)
    message = first.get("message", {}) if isinstance(first, dict) else {}
    kwargs = message.get("kwargs", {}) if isinstance(message, dict) else {}
    tool_calls = kwargs.get("tool_calls") or kwargs.get("additional_kwargs", {}).get(
        "tool_calls"
    )
    if tool_calls:  # structured output through tool calling
        return json.dumps(tool_calls, default=str)
    return str(kwargs.get("content", ""))


class RecordedChatCall(Function):
    """A chat-model call recorded by the tracer: forward returns the recorded text;
    backward asks the backward model for feedback on each input Variable, showing the
    exact conversation the model received."""

    @staticmethod
    def forward(
        ctx: Any,
        conversation: list[dict[str, str]],
        output: str,
        variables: list[Variable],
        locations: list[str],
    ) -> Variable:
        ctx.conversation = conversation
        ctx.output = output
        ctx.variables = list(variables)
        ctx.locations = list(locations)
        return Variable(output, role=OUTPUT_ROLE)

    @staticmethod
    async def backward(ctx: Any, grad: Variable) -> tuple[Variable | None, ...]:
        needs = (
            ctx.needs_input_grad
        )  # slots: conversation, output, *variables, locations
        result: list[Variable | None] = [None] * len(needs)
        data = grad.data
        feedback = (
            "\n".join(str(d) for d in data if d)
            if isinstance(data, list)
            else str(data)
        )
        asked = [k for k in range(len(ctx.variables)) if needs[2 + k]]
        if not asked or not feedback.strip():
            return tuple(result)
        infos = [
            VariableInfo(
                role=ctx.variables[k].role,
                location=ctx.locations[k],
                trainable=ctx.variables[k].is_leaf and ctx.variables[k].requires_grad,
                text=str(ctx.variables[k].data),
            )
            for k in asked
        ]
        user = render(
            CHAT_BACKWARD_USER,
            {
                "conversation": format_conversation(ctx.conversation),
                "output_role": OUTPUT_ROLE,
                "output": ctx.output,
                "feedback": feedback,
                "count": len(infos),
                "variables": format_variables(infos),
            },
        )
        texts = await request_gradients(
            ctx.name(), CHAT_BACKWARD_SYSTEM, user, len(infos)
        )
        for k, text in zip(asked, texts, strict=True):
            if text.strip():
                var = ctx.variables[k]
                result[2 + k] = Variable(text.strip(), role=f"feedback to {var.role}")
        return tuple(result)


class StepOutput(Function):
    """A non-differentiable step (a parser, a lambda, the chain's final output): its
    feedback goes to its input, saying which step stood in between."""

    run_backward_inline = True

    @staticmethod
    def forward(ctx: Any, source: Variable, data: str, step: str) -> Variable:
        ctx.step = step
        ctx.source_role = source.role
        return Variable(data, role=f"output of the {step} step")

    @staticmethod
    def backward(ctx: Any, grad: Variable) -> tuple[Variable | None, ...]:
        data = grad.data

        def wrap(text: Any) -> str:
            text = str(text)
            if not text:
                return ""
            return (
                f"(feedback on the output of the {ctx.step} step, computed from "
                f"this {ctx.source_role}) {text}"
            )

        new = [wrap(d) for d in data] if isinstance(data, list) else wrap(data)
        return Variable(new, role=f"feedback to {ctx.source_role}"), None, None
