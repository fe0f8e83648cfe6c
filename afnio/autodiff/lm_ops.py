"""Differentiable LM calls: :class:`ChatCompletion`.

Forward fills the ``{placeholder}``\\ s of the message Variables from ``inputs`` (safe
substitution: ``{{``/``}}`` are literal braces, nothing else is evaluated), sends one
chat request per sample concurrently (bounded by :func:`afnio.set_max_concurrency`),
and returns the replies. Backward asks the backward model, once per sample that got
feedback (concurrently), for one feedback per Variable of ``messages`` and ``inputs``
that requires grad. With ``afnio.backward_options(chat_samples_per_call=n)`` (n > 1)
the samples that went through the same prompt template (of this node and of the
other nodes of the pass) share calls instead, at most ``n`` per call
(:func:`afnio.autodiff.lm_backward.chat_backward_gradients`).

Batched gradients (difference 13). A Variable shared by every sample (a system prompt)
receives **one** gradient per backward pass whose ``data`` is the list of the non-empty
per-sample feedback texts (a plain ``str`` for an unbatched call); a batched Variable
(list data) receives a gradient aligned with the samples (``""`` where there is none);
a Variable given for one sample (an item of a list of Variables) receives that sample's
feedback. Empty feedback is dropped (difference 15).

Provenance (:mod:`afnio.autodiff.provenance`): in a batched call every feedback text
records the sample ``(s,)`` whose backward call wrote it, also the texts kept for a
shared Variable, numbered in the call's batched inputs and messages (their items'
fingerprints are the texts' basis), and, when the feedback on the replies was
numbered the same way (sample ``s`` of it about ``(s,)``), in that feedback's basis
too (the evaluator's targets); an unbatched call records nothing (the engine may
pass on the sources of its incoming feedback).
"""

from __future__ import annotations

import asyncio
from typing import Any

from afnio._template import render
from afnio._utils import _validate_multi_turn_messages
from afnio._variable import Variable
from afnio.autodiff.function import Function, _flatten_slots
from afnio.autodiff.lm_backward import (
    ChatBackwardItem,
    VariableInfo,
    chat_backward_gradients,
    template_key,
)
from afnio.autodiff.provenance import (
    Basis,
    _join_bases,
    bases_of,
    basis_of,
    set_sources,
    sources_of,
)
from afnio.models.model import ChatCompletionModel

__all__ = ["ChatCompletion"]

OUTPUT_ROLE = "response to the input messages"


class _VarRef:
    """Where a Variable of ``messages``/``inputs`` sits, and which samples it serves."""

    __slots__ = ("location", "only_sample", "var")

    def __init__(self, var: Variable, location: str, only_sample: int | None) -> None:
        self.var = var
        self.location = location
        self.only_sample = only_sample  # an item of a list of Variables: one sample

    def text(self, sample: int) -> str:
        data = self.var.data
        return str(data[sample] if isinstance(data, list) else data)

    def serves(self, sample: int) -> bool:
        return self.only_sample is None or self.only_sample == sample


def _batch_size(messages: list[dict[str, Any]], inputs: dict[str, Any]) -> int | None:
    sizes: dict[str, int] = {}
    for key, value in inputs.items():
        if isinstance(value, list):
            sizes[f"inputs[{key!r}]"] = len(value)
        elif isinstance(value, Variable) and isinstance(value.data, list):
            sizes[f"inputs[{key!r}]"] = len(value.data)
    for i, message in enumerate(messages):
        for j, var in enumerate(message["content"]):
            if isinstance(var.data, list):
                sizes[f"messages[{i}]['content'][{j}]"] = len(var.data)
    if not sizes:
        return None
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise ValueError(f"Batched inputs must have equal lengths; got {detail}.")
    return next(iter(sizes.values()))


def _input_value(value: Any, sample: int) -> str:
    if isinstance(value, list):
        item = value[sample]
        return str(item.data if isinstance(item, Variable) else item)
    if isinstance(value, Variable):
        data = value.data
        return str(data[sample] if isinstance(data, list) else data)
    return str(value)


def _check_inputs(inputs: Any) -> dict[str, Any]:
    if inputs is None:
        return {}
    if not isinstance(inputs, dict):
        raise TypeError(
            f"`inputs` must be a dict or None, got {type(inputs).__name__}."
        )
    for key, value in inputs.items():
        if not isinstance(key, str):
            raise TypeError(f"`inputs` keys must be strings, got {key!r}.")
        if isinstance(value, list):
            if not value:
                raise ValueError(f"`inputs[{key!r}]` is an empty list.")
            kinds = {Variable if isinstance(v, Variable) else type(v) for v in value}
            if not kinds <= {str, Variable}:
                raise TypeError(
                    f"`inputs[{key!r}]` must hold only strings or Variables, got "
                    f"{sorted(k.__name__ for k in kinds)}."
                )
            for v in value:
                if isinstance(v, Variable) and isinstance(v.data, list):
                    raise TypeError(
                        f"`inputs[{key!r}]` is a list of Variables: each must hold one "
                        "sample (scalar data), not a list."
                    )
        elif not isinstance(value, (str, int, float, Variable)):
            raise TypeError(
                f"`inputs[{key!r}]` must be a str, a list of str, a Variable or a list "
                f"of Variables, got {type(value).__name__}."
            )
    return inputs


class ChatCompletion(Function):
    """A chat completion as a differentiable operation (see the module docstring).

    ``ChatCompletion.apply(forward_model_client, messages, inputs=None,
    **completion_args)``: ``messages`` is ``[{"role": str, "content": [Variable,
    ...]}, ...]`` (a message's content Variables are joined with newlines), ``inputs``
    maps placeholder names to a ``str``, a list of ``str``, a ``Variable`` or a list of
    ``Variable``\\ s; ``completion_args`` go to the client (``model=`` included).

    Example::

        >>> import afnio
        >>> from afnio.autodiff.lm_ops import ChatCompletion
        >>> from afnio.models.openai import OpenAI
        >>> from afnio.testing import Simulator
        >>> system = afnio.Variable("Answer with the sentiment.", role="instruction",
        ...                         requires_grad=True)
        >>> user = afnio.Variable("Message: {message}", role="user template")
        >>> with Simulator() as sim, OpenAI(base_url=sim.base_url, api_key="k") as llm:
        ...     reply = ChatCompletion.apply(
        ...         llm,
        ...         [{"role": "system", "content": [system]},
        ...          {"role": "user", "content": [user]}],
        ...         inputs={"message": ["Thanks!", "Where is my parcel?"]},
        ...         model="afnio-sim-1",
        ...     )
        >>> reply.data, reply.requires_grad
        (['neutral', 'neutral'], True)
    """

    @staticmethod
    async def forward(
        ctx: Any,
        forward_model_client: ChatCompletionModel | None,
        messages: list[dict[str, Any]],
        inputs: dict[str, Any] | None = None,
        **completion_args: Any,
    ) -> Variable:
        client = forward_model_client
        if client is None:
            from afnio._model_client import get_backward_model_client

            try:
                client = get_backward_model_client().client
            except RuntimeError:
                raise TypeError(
                    "`forward_model_client` is None and no backward model client is "
                    "set: pass a ChatCompletionModel (e.g. afnio.models.openai.OpenAI)."
                ) from None
        if not isinstance(client, ChatCompletionModel):
            raise TypeError(
                "`forward_model_client` must be a ChatCompletionModel, got "
                f"{type(client).__name__}."
            )
        _validate_multi_turn_messages(messages)
        inputs = _check_inputs(inputs)
        n = _batch_size(messages, inputs)
        samples = range(n if n is not None else 1)

        rendered: list[list[dict[str, str]]] = []
        for s in samples:
            values = {key: _input_value(value, s) for key, value in inputs.items()}
            rendered.append(
                [
                    {
                        "role": m["role"],
                        "content": "\n".join(
                            render(
                                str(v.data[s] if isinstance(v.data, list) else v.data),
                                values,
                            )
                            for v in m["content"]
                        ),
                    }
                    for m in messages
                ]
            )
        replies = await asyncio.gather(
            *(client.achat(sample, **completion_args) for sample in rendered)
        )

        # the Variables in slot order (messages in order, content in order, then
        # inputs in key order, list items in order): backward returns one per slot
        refs: list[_VarRef] = []
        for m in messages:
            refs.extend(_VarRef(v, m["role"], None) for v in m["content"])
        for key, value in inputs.items():
            if isinstance(value, Variable):
                refs.append(_VarRef(value, f"input:{key}", None))
            elif isinstance(value, list):
                refs.extend(
                    _VarRef(v, f"input:{key}", j)
                    for j, v in enumerate(value)
                    if isinstance(v, Variable)
                )
        slots = _flatten_slots((client, messages, inputs or None, completion_args))
        positions = [i for i, slot in enumerate(slots) if isinstance(slot, Variable)]
        assert len(positions) == len(refs)
        ctx.refs = refs
        ctx.positions = positions
        ctx.rendered = rendered
        ctx.replies = list(replies)
        ctx.batched = n is not None
        # what the sample positions of the feedback are numbered in (provenance)
        ctx.basis = (
            basis_of(
                *(
                    r.var
                    for r in refs
                    if r.only_sample is None
                    and isinstance(r.var.data, list)
                    and len(r.var.data) == n
                ),
                *(  # plain lists of values given as inputs
                    value
                    for value in inputs.values()
                    if isinstance(value, list)
                    and len(value) == n
                    and not any(isinstance(v, Variable) for v in value)
                ),
            )
            if n is not None
            else None
        )
        return Variable(
            list(replies) if n is not None else replies[0], role=OUTPUT_ROLE
        )

    @staticmethod
    async def backward(ctx: Any, grad_output: Variable) -> tuple[Variable | None, ...]:
        needs = ctx.needs_input_grad
        wanted = [k for k, pos in enumerate(ctx.positions) if needs[pos]]
        n = len(ctx.rendered)
        feedback = _per_sample_feedback(grad_output.data, n, ctx.batched)
        per_var: dict[int, list[str]] = {k: [""] * n for k in wanted}

        # one chat-backward item per sample that got feedback and serves a variable
        # asked for; sent one call per sample, or grouped by template (see
        # afnio.autodiff.lm_backward.chat_backward_gradients)
        sent: list[tuple[int, list[int]]] = []
        items: list[ChatBackwardItem] = []
        for s in range(n):
            asked = [k for k in wanted if ctx.refs[k].serves(s)]
            if not asked or not feedback[s].strip():
                continue  # no feedback for this sample, or nothing to improve
            infos = [
                VariableInfo(
                    role=ctx.refs[k].var.role,
                    location=ctx.refs[k].location,
                    trainable=ctx.refs[k].var.is_leaf and ctx.refs[k].var.requires_grad,
                    text=ctx.refs[k].text(s),
                )
                for k in asked
            ]
            key = template_key(
                OUTPUT_ROLE, [(ctx.refs[k].var, ctx.refs[k].location) for k in asked]
            )
            items.append(
                ChatBackwardItem(
                    ctx.rendered[s],
                    OUTPUT_ROLE,
                    ctx.replies[s],
                    feedback[s],
                    infos,
                    key,
                )
            )
            sent.append((s, asked))
        answers = await chat_backward_gradients(ctx, items)
        for (s, asked), texts in zip(sent, answers, strict=True):
            for k, text in zip(asked, texts, strict=True):
                per_var[k][s] = text

        result: list[Variable | None] = [None] * len(needs)
        basis = (
            _join_bases(getattr(ctx, "basis", None), _aligned_basis(grad_output, n))
            if ctx.batched
            else None
        )
        for k in wanted:
            ref = ctx.refs[k]
            texts = per_var[k]
            role = f"feedback to {ref.var.role}"
            if ref.only_sample is not None:
                text = texts[ref.only_sample]
                grad = Variable(text, role=role) if text else None
                if grad is not None and ctx.batched:
                    set_sources(grad, [(ref.only_sample,)], basis=basis)
            elif isinstance(ref.var.data, list):
                grad = Variable(texts, role=role) if any(texts) else None
                if grad is not None:
                    set_sources(grad, [(s,) for s in range(len(texts))], basis=basis)
            elif ctx.batched:
                kept = [s for s, t in enumerate(texts) if t]
                grad = Variable([texts[s] for s in kept], role=role) if kept else None
                if grad is not None:
                    set_sources(grad, [(s,) for s in kept], basis=basis)
            else:
                grad = Variable(texts[0], role=role) if texts[0] else None
            result[ctx.positions[k]] = grad
        return tuple(result)


def _aligned_basis(grad: Variable, n: int) -> Basis:
    """The basis of ``grad`` (the feedback on the replies) when it numbers the
    samples as this call does: one item per sample, item ``s`` about ``(s,)``, all
    in one basis; else ``None``."""
    data = grad.data
    if not isinstance(data, list) or len(data) != n:
        return None
    found: Basis = None
    for s, (item, src, basis) in enumerate(
        zip(data, sources_of(grad), bases_of(grad), strict=True)
    ):
        if item == "":
            continue
        if src != (s,) or basis is None or (found is not None and basis != found):
            return None
        found = basis
    return found


def _per_sample_feedback(data: Any, n: int, batched: bool) -> list[str]:
    """The feedback text for each sample from the gradient of the output."""
    if isinstance(data, list):
        if batched and len(data) == n:
            return [str(d) for d in data]
        text = "\n".join(str(d) for d in data if d != "")
        return [text] * n
    return [str(data)] * n
