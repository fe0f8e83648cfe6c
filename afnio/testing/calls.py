"""Classify the requests the simulator received by the kind of LM call they are.

Every request is answered by one of the simulator's responders
(:data:`afnio.testing.world.RESPONDERS`); the responder that answers a request tells
what the request was, so tests and benchmarks count calls by it:

* :func:`responder_of` names the responder (``task``, ``chat_backward``,
  ``chat_backward_group``, ``evaluator_backward``, ``optimizer``, ``judge``, ``dspy``,
  ``textgrad_backward``, ...) and :func:`calls_by_responder` counts by that name;
* :func:`call_kind` folds the responders into kinds of call (:data:`CALL_KINDS`):
  ``forward``, ``evaluator backward``, ``chat backward`` (one sample or a grouped
  call), ``optimizer``, ``judge``, and a peer's ``backward`` (TextGrad's); afnio's
  TGD, TextGrad's TGD and Trace's OptoPrime are all ``optimizer``, and any other
  responder (the task, DSPy or fallback responder) answers a ``forward`` call.
  :func:`calls_by_kind` counts by kind.

Example::

    >>> from afnio.testing import calls_by_kind, call_kind
    >>> hello = {"model": "m", "messages": [{"role": "user", "content": "Hello"}]}
    >>> responder_of(hello), call_kind(hello)
    ('fallback', 'forward')
    >>> calls_by_kind([hello, hello])
    {'forward': 2}
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from afnio.testing import world

__all__ = [
    "CALL_KINDS",
    "KIND_OF_RESPONDER",
    "call_kind",
    "calls_by_kind",
    "calls_by_responder",
    "kind_of_responder",
    "responder_of",
]

KIND_OF_RESPONDER: Mapping[str, str] = {
    # afnio's own calls
    "evaluator_backward": "evaluator backward",
    "chat_backward": "chat backward",
    "chat_backward_group": "chat backward",  # a grouped chat-backward call
    "optimizer": "optimizer",
    "judge": "judge",
    # the peers' calls (see afnio.testing.peers)
    "textgrad_backward": "backward",
    "textgrad_optimizer": "optimizer",
    "optoprime": "optimizer",
}
"""The kind of call each responder answers; a responder not listed (``task``,
``dspy``, ``fallback``, ``tool_result``) answers a ``forward`` call."""

CALL_KINDS: tuple[str, ...] = (
    "forward",
    "evaluator backward",
    "chat backward",
    "backward",
    "optimizer",
    "judge",
)
"""Every kind :func:`call_kind` returns, in the order :func:`calls_by_kind` lists
them (``backward``: a peer's backward call, TextGrad's)."""


def responder_of(body: Mapping[str, Any]) -> str:
    """The name of the simulator's responder that answers the chat request ``body``
    (a parsed ``/v1/chat/completions`` JSON body, as in ``Simulator.requests``),
    computed as the simulator computes it (:func:`afnio.testing.world.answer`).

    >>> responder_of({"messages": [{"role": "user", "content": "hi"}]})
    'fallback'
    """
    return world.answer(world.SimRequest.from_body(body)).responder


def kind_of_responder(responder: str) -> str:
    """The kind of call (one of :data:`CALL_KINDS`) the responder named
    ``responder`` answers (:data:`KIND_OF_RESPONDER`, else ``forward``).

    >>> kind_of_responder("chat_backward_group"), kind_of_responder("task")
    ('chat backward', 'forward')
    """
    return KIND_OF_RESPONDER.get(responder, "forward")


def call_kind(body: Mapping[str, Any]) -> str:
    """The kind of LM call (one of :data:`CALL_KINDS`) the chat request ``body`` is,
    told by the responder that answers it.

    >>> call_kind({"messages": [{"role": "user", "content": "hi"}]})
    'forward'
    """
    return kind_of_responder(responder_of(body))


def calls_by_responder(bodies: Iterable[Mapping[str, Any]]) -> Counter[str]:
    """How many of the chat requests ``bodies`` each responder answers, in the
    order the responders first answer.

    >>> calls_by_responder([{"messages": [{"role": "user", "content": "hi"}]}])
    Counter({'fallback': 1})
    """
    return Counter(responder_of(body) for body in bodies)


def calls_by_kind(bodies: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """How many of the chat requests ``bodies`` are of each kind of call, in the
    order of :data:`CALL_KINDS`, kinds without a call left out.

    >>> calls_by_kind([])
    {}
    """
    counts = Counter(call_kind(body) for body in bodies)
    return {kind: counts[kind] for kind in CALL_KINDS if counts[kind]}
