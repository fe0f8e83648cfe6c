"""Graph nodes for LM calls that another library already made.

A traced LangChain chain or DSPy program runs with its own LM client; afnio records
what happened and builds the graph from it, so no LM call is repeated:

* :class:`RecordedChatCall`: one chat call, with the exact conversation the model saw
  and the text it answered; backward asks the backward model for feedback on the
  Variables that shaped the conversation (prompt Parameters, earlier outputs).
* :class:`StepOutput`: a step that transforms an output without an LM (a parser, a
  field of a structured answer, a lambda); feedback passes to its input, naming the
  step.
* :class:`StackSamples`: per-sample outputs of a batch as one batched Variable.
* :class:`JoinFields`: several Variables shown as one text (``name: value`` lines);
  feedback on the whole goes to each part.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

from afnio._variable import Variable
from afnio.autodiff.function import Function
from afnio.autodiff.lm_backward import (
    ChatBackwardItem,
    VariableInfo,
    chat_backward_gradients,
    template_key,
)
from afnio.autodiff.provenance import (
    _join_bases,
    bases_of,
    basis_of,
    set_sources,
    sources_of,
)

__all__ = [
    "JoinFields",
    "RecordedChatCall",
    "StackSamples",
    "StepOutput",
    "batch_rows",
]

_BATCH_ROWS: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "afnio_integrations_batch_rows", default=None
)


@contextlib.contextmanager
def batch_rows(rows: Any) -> Iterator[None]:
    """While the block runs, a :class:`StackSamples` of ``len(rows)`` samples stacks
    them in the order of ``rows`` (the loader batch's row column, a list or a
    Variable with list data): its feedback is numbered in ``rows`` (provenance), so
    the Trainer can credit it to the batch's samples."""
    token = _BATCH_ROWS.set(rows)
    try:
        yield
    finally:
        _BATCH_ROWS.reset(token)


DEFAULT_OUTPUT_ROLE = "response of a chat model"


def _padded(ctx: Any, grads: list[Variable | None]) -> tuple[Variable | None, ...]:
    """``grads`` followed by ``None`` for the remaining (non-Variable) slots."""
    return (*grads, *[None] * (len(ctx.needs_input_grad) - len(grads)))


def _conversation_of(var: Variable) -> list[dict[str, str]]:
    """The conversation of the nearest recorded LM call that produced ``var`` (``[]``
    when none did)."""
    start = var.grad_fn
    queue, seen = ([start] if start is not None else []), set()
    while queue:
        node = queue.pop(0)
        if id(node) in seen:
            continue
        seen.add(id(node))
        rendered = getattr(node, "rendered", None)
        if isinstance(rendered, list) and len(rendered) == 1:
            return list(rendered[0])
        queue.extend(
            edge.node
            for edge in getattr(node, "next_functions", ())
            if edge.node is not None
        )
    return []


def _feedback_text(data: Any) -> str:
    if isinstance(data, list):
        return "\n".join(str(d) for d in data if d)
    return str(data)


class RecordedChatCall(Function):
    """A chat call recorded by a tracer: forward returns the recorded text; backward
    asks the backward model for feedback on each input Variable, showing the exact
    conversation the model received (one backward LM call per recorded call that got
    feedback; with ``afnio.backward_options(chat_samples_per_call=n)``, n > 1, the
    recorded calls of one backward pass with the same template share calls)."""

    @staticmethod
    def forward(
        ctx: Any,
        conversation: list[dict[str, str]],
        output: str,
        variables: list[Variable],
        locations: list[str],
        output_role: str = DEFAULT_OUTPUT_ROLE,
    ) -> Variable:
        ctx.conversation = conversation
        ctx.rendered = [conversation]  # how evaluators find the input of a sample
        ctx.output = output
        ctx.output_role = output_role
        ctx.variables = list(variables)
        ctx.locations = list(locations)
        return Variable(output, role=output_role)

    @staticmethod
    async def backward(ctx: Any, grad: Variable) -> tuple[Variable | None, ...]:
        # slots: conversation, output, *variables, locations, output_role
        needs = ctx.needs_input_grad
        result: list[Variable | None] = [None] * len(needs)
        feedback = _feedback_text(grad.data)
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
        key = template_key(
            ctx.output_role, [(ctx.variables[k], ctx.locations[k]) for k in asked]
        )
        item = ChatBackwardItem(
            ctx.conversation, ctx.output_role, ctx.output, feedback, infos, key
        )
        # one call per recorded call, or grouped with the pass's other calls of the
        # same template (afnio.backward_options(chat_samples_per_call=n))
        (texts,) = await chat_backward_gradients(ctx, [item])
        for k, text in zip(asked, texts, strict=True):
            if text:
                var = ctx.variables[k]
                result[2 + k] = Variable(text, role=f"feedback to {var.role}")
        return tuple(result)


class StepOutput(Function):
    """A non-differentiable step (a parser, a field of a structured answer, a
    lambda, a program's final output): its feedback goes to its input (or to each of
    its inputs, when ``source`` is a list: an output composed of several), saying
    which step stood in between."""

    run_backward_inline = True

    @staticmethod
    def forward(
        ctx: Any,
        source: Variable | list[Variable],
        data: str,
        step: str,
        role: str | None = None,
    ) -> Variable:
        sources = source if isinstance(source, list) else [source]
        ctx.step = step
        ctx.source_roles = [s.role for s in sources]
        return Variable(data, role=role or f"output of the {step} step")

    @staticmethod
    def backward(ctx: Any, grad: Variable) -> tuple[Variable | None, ...]:
        data = grad.data

        def wrap(text: Any, source_role: str) -> str:
            text = str(text)
            if not text:
                return ""
            return (
                f"(feedback on the output of the {ctx.step} step, computed from "
                f"this {source_role}) {text}"
            )

        grads: list[Variable | None] = []
        for source_role in ctx.source_roles:
            new = (
                [wrap(d, source_role) for d in data]
                if isinstance(data, list)
                else wrap(data, source_role)
            )
            grads.append(Variable(new, role=f"feedback to {source_role}"))
        return _padded(ctx, grads)


class StackSamples(Function):
    """Per-sample outputs of a batch, as one batched Variable (backward splits the
    per-sample feedback)."""

    run_backward_inline = True

    @staticmethod
    def forward(ctx: Any, samples: list[Variable], role: str = "outputs") -> Variable:
        ctx.n = len(samples)
        rows = _BATCH_ROWS.get()
        data = rows.data if isinstance(rows, Variable) else rows
        # the samples are the batch's rows, in order (see batch_rows)
        ctx.basis = (
            basis_of(data) if isinstance(data, list) and len(data) == ctx.n else None
        )
        # one conversation per sample: what an evaluator shows as each input
        ctx.rendered = [_conversation_of(s) for s in samples]
        return Variable([str(s.data) for s in samples], role=role)

    @staticmethod
    def backward(ctx: Any, grad: Variable) -> tuple[Variable | None, ...]:
        data = grad.data
        aligned = isinstance(data, list) and len(data) == ctx.n
        per = data if aligned else [data] * ctx.n
        known = sources_of(grad)
        bases = bases_of(grad)
        grads: list[Variable | None] = []
        for s, t in enumerate(per):
            g = Variable(str(t), role="feedback to the output") if t else None
            if g is not None and aligned:
                # the feedback on sample s of the batch (provenance of the text,
                # in the numbering it recorded; else in an unknown one)
                basis = getattr(ctx, "basis", None)
                if known[s] is None or (known[s] == (s,) and basis is not None):
                    # sample s of the stack: numbered in the batch's rows, and in
                    # the incoming feedback's basis when that numbers it as s too
                    joined = _join_bases(basis, bases[s] if known[s] else None)
                    set_sources(g, [(s,)], basis=joined)
                else:
                    set_sources(g, [known[s]], basis=bases[s])
            grads.append(g)
        return _padded(ctx, grads)


class JoinFields(Function):
    """Named Variables (all scalars, or all batches of the same length) shown as one
    text per sample, ``name: value`` per line; feedback on the text goes to every
    part."""

    run_backward_inline = True

    @staticmethod
    def forward(
        ctx: Any, parts: list[Variable], names: list[str], role: str = "fields"
    ) -> Variable:
        ctx.roles = [p.role for p in parts]
        batched = [isinstance(p.data, list) for p in parts]
        if any(batched) and not all(batched):
            raise ValueError("`parts` must be all scalars or all batches.")
        if all(batched) and parts:
            n = len(parts[0].data)
            pairs = list(zip(names, parts, strict=True))
            rows = ["\n".join(f"{k}: {p.data[s]}" for k, p in pairs) for s in range(n)]
            return Variable(rows, role=role)
        text = "\n".join(f"{k}: {p.data}" for k, p in zip(names, parts, strict=True))
        return Variable(text, role=role)

    @staticmethod
    def backward(ctx: Any, grad: Variable) -> tuple[Variable | None, ...]:
        return _padded(
            ctx, [Variable(grad.data, role=f"feedback to {r}") for r in ctx.roles]
        )
