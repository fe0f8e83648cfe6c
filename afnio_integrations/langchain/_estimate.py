"""``estimate(chain, trainset)``: what :func:`optimize` would spend, before any LM call.

The graph shape comes from the chain itself (the prompts :func:`find_prompt_slots`
discovers, one LM call per prompt, the selected messages as the trainable texts),
the sample sizes from ``trainset``; :func:`afnio.trainer.estimate.estimate` does the
counting (see there for the model and its assumptions), in the backward mode
``optimize`` would run in (``backward=``, ``"cheap"`` by default as for
``optimize``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from langchain_core.language_models import BaseChatModel, BaseLanguageModel

from afnio.autodiff.options import BackwardOptions, resolve_backward_options
from afnio.trainer.estimate import (
    Assumptions,
    GraphShape,
    RunEstimate,
    Tokenizer,
    approx_tokens,
)
from afnio.trainer.estimate import estimate as _estimate
from afnio.utils.data import IterableDataset
from afnio_integrations._rows import Row, chain_rows
from afnio_integrations.langchain._discovery import (
    Selector,
    _closure_and_globals,
    _prompts,
    discover,
    find_prompt_slots,
)
from afnio_integrations.langchain._langgraph import graph_input, is_graph
from afnio_integrations.langchain._traced import TracedChain, _text_slots, _wrapped

__all__ = ["estimate"]

SAMPLED_ROWS = 500
"""Rows of a streamed trainset read for the input sizes (its length is ``len()``)."""


def _streamed_sample(
    chain: Any,
    trainset: IterableDataset,
    valset: Iterable[Any] | None,
    batch_size: int,
    input_keys: Sequence[str] | None,
    label_key: str | None,
) -> tuple[int, list[Row], list[Row]]:
    """A streamed trainset's length, its first rows (checked as :func:`optimize`
    checks them; the stream's position restored after) and the valset's rows."""
    from afnio_integrations.langchain._optimize import _streamed_rows

    stream, val = _streamed_rows(
        chain, trainset, valset, batch_size, input_keys, label_key
    )
    try:
        n_train = len(trainset)
    except TypeError as e:
        raise TypeError(
            f"`trainset` is a stream without a length, and estimate() needs the "
            f"number of rows: {e}"
        ) from e
    state = trainset.state_dict() if hasattr(trainset, "state_dict") else None
    rows: list[Row] = []
    try:
        for index, _ in stream:
            rows.append(stream.rows[index])
            if len(rows) == SAMPLED_ROWS:
                break
    finally:
        if state is not None:
            trainset.load_state_dict(state)  # type: ignore[attr-defined]
    return n_train, rows, val


def _input_text(inputs: Any) -> str:
    if isinstance(inputs, Mapping):
        return "\n".join(str(v) for v in inputs.values())
    return str(inputs)


def _model_name(chain: Any) -> str | None:
    """The model name of the first chat model in the chain's graph, if it has one."""
    for node in chain.get_graph().nodes.values():
        if isinstance(node.data, (BaseChatModel, BaseLanguageModel)):
            for attr in ("model_name", "model"):
                name = getattr(node.data, attr, None)
                if isinstance(name, str) and name:
                    return name
    return None


def _graph_model_name(graph: Any) -> str | None:
    """The model name of the first chat model a graph's node functions use (an
    agent's model), if any."""
    for node in dict(getattr(graph, "nodes", {}) or {}).values():
        func = getattr(getattr(node, "bound", None), "func", None)
        for value in _closure_and_globals(func) if func is not None else ():
            if isinstance(value, BaseLanguageModel):
                for attr in ("model_name", "model"):
                    name = getattr(value, attr, None)
                    if isinstance(name, str) and name:
                        return name
    return None


def _prompt_texts(prompt: Any) -> list[str]:
    messages = getattr(prompt, "messages", None)
    if messages is None:
        return [prompt.template]
    texts = []
    for message in messages:
        template = getattr(getattr(message, "prompt", None), "template", None)
        if isinstance(template, str):
            texts.append(template)
        else:  # a literal message
            content = getattr(message, "content", None)
            if isinstance(content, str):
                texts.append(content)
    return texts


def estimate(
    chain: Any,
    trainset: Iterable[Any],
    *,
    valset: Iterable[Any] | None = None,
    input_keys: Sequence[str] | None = None,
    label_key: str | None = None,
    epochs: int = 3,
    batch_size: int = 16,
    select: Selector | None = None,
    include: Iterable[Any] = (),
    metric_feedback: bool = False,
    revert_on_regression: bool = False,
    forward_calls: int | None = None,
    assumptions: Assumptions | None = None,
    models: str | Mapping[str, str] | None = None,
    tokenizer: Tokenizer = approx_tokens,
    backward: BackwardOptions | Literal["cheap", "upstream"] = "cheap",
) -> RunEstimate:
    """Estimate the LM calls, tokens and cost of :func:`optimize` with the same
    ``chain``, ``trainset``, ``valset``, ``epochs``, ``batch_size`` and ``select``,
    without calling any LM (the first validation included, as ``optimize`` makes it).

    Args:
        trainset, valset, input_keys, label_key: as for :func:`optimize` (the same
            row shapes, checked the same way). For a streamed trainset (an
            IterableDataset with a length, e.g. a ``JsonlDataset``) the number of
            rows is its ``len()`` (a ``JsonlDataset`` counts its lines) and the
            input sizes come from its first ``SAMPLED_ROWS`` (500) rows.
        metric_feedback: ``True`` if the metric returns ``(score, feedback)`` (its
            text is the gradient: no evaluator-backward call).
        revert_on_regression: as for ``optimize`` (a validation after every step).
        forward_calls: LM calls the chain makes per input (default: one per prompt
            template found, plus two per ``create_agent`` agent: one tool turn and
            the answer; set it for a chain that calls a prompt in a loop, or an
            agent that makes more tool turns).
        assumptions: see :class:`afnio.trainer.estimate.Assumptions` (failure rate,
            text lengths); e.g. ``failure_rate=1 - score`` of a first evaluation.
        models: one model for every phase or ``{phase: model}``; by default the
            chain's own chat model (by its ``model_name``) for ``forward`` and none
            for the others (listed as unpriced).
        backward: the backward options ``optimize`` will run with, as for
            ``optimize`` (default ``"cheap"``: direct evaluator feedback, no
            evaluator-backward call; chat-backward calls grouped per prompt, at most
            8 samples a call; ``"upstream"``: LM-written evaluator feedback, one
            chat-backward call per failed sample and prompt). The estimate's
            ``backward`` says which it assumed.

    Example::

        run = estimate(chain, trainset, models={"forward": "gpt-4o-mini",
                                                 "backward": "gpt-5"})
        print(run)  # estimated: ... LM calls, ... tokens, $...
    """
    options = resolve_backward_options(backward)
    if isinstance(trainset, IterableDataset):  # graph inputs mapped as they are read
        n_train, train, val = _streamed_sample(
            chain, trainset, valset, batch_size, input_keys, label_key
        )
    else:
        train, val = chain_rows(
            chain, trainset, valset, input_keys=input_keys, label_key=label_key
        )
        n_train = len(train)
        # a str row is the user's message to an agent (or to a binding around it)
        if is_graph(_wrapped(chain, sequences=False)):
            train = [
                (graph_input(_wrapped(chain, sequences=False), i), t) for i, t in train
            ]
    include = tuple(include)
    prompts: dict[int, Any] = {}
    for runnable in (chain, *include):
        for prompt in _prompts(runnable):
            prompts.setdefault(id(prompt), prompt)
    prompt_texts = [t for p in prompts.values() for t in _prompt_texts(p)]
    graph = is_graph(_wrapped(chain))
    if graph:
        # an agent or graph: its trainable texts as trace() finds them (no LM call);
        # an agent sends its system prompt and tool descriptions on each model call
        found = discover(chain, include)
        traced = TracedChain(chain, select, include)
        texts = [str(param.data) for param in traced.parameters()]
        prompt_texts += [slot.text for slot in _text_slots(found) if slot.text]
        agents = sum(1 for _, kind, _ in found.messages if kind == "agent")
        default_calls = max(1, len(prompts) + 2 * agents)
    else:
        slots = find_prompt_slots(
            chain, "system" if select is None else select, include
        )
        if not slots:
            raise ValueError(
                f"no prompt message of the chain matches select={select!r}: there "
                "is nothing to optimize (try select='all')."
            )
        texts = [slot.text for slot in slots]
        default_calls = max(1, len(prompts))
    calls = forward_calls if forward_calls is not None else default_calls
    # each model call its own template: an agent's answer call also shows
    # its tool turn (a variable the tool-turn call lacks), so their
    # chat-backward requests do not share grouped calls
    shape = GraphShape(
        forward_calls=calls,
        prompt_texts=tuple(prompt_texts),
        parameters=tuple(texts),
        inputs=tuple(_input_text(inputs) for inputs, _ in train),
        evaluator_feedback=not metric_feedback,
    )
    if models is None:
        name = _graph_model_name(_wrapped(chain)) if graph else _model_name(chain)
        models = {"forward": name} if name else None
    return _estimate(
        shape,
        n_train=n_train,
        n_val=len(val),
        epochs=epochs,
        batch_size=batch_size,
        validate_first=True,
        validate_every_step=revert_on_regression,
        assumptions=assumptions,
        models=models,
        tokenizer=tokenizer,
        backward=options,
    )
