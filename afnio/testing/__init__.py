"""``afnio.testing``: a bundled OpenAI-compatible HTTP simulator for tests.

The simulator is a **deterministic stand-in, not a model**: it speaks the OpenAI wire
format on 127.0.0.1 and answers by explicit rules written in the prompt, so any program
configured only by ``OPENAI_BASE_URL`` runs against it and every answer is known in
advance. afnio's own tests use it to record HTTP cassettes and to measure concurrency.

Rule grammar (see :mod:`afnio.testing.world`): a prompt may hold sentences of the exact
form ``If the message mentions "<word>", the <field> is <label>.``; the answer is the
label of the first rule whose word occurs as a whole word (any case) in the user
messages (rule sentences excluded; ``begins with`` rules match the input's lead word),
else the task's default label: ``neutral`` when it is one of the task's labels (the
schema ``enum``, or a ``: a, b or c`` list in the prompt) or no label set is known,
else the first label. The backward answers write rules for the field the prompt names
(``Classify the urgency ...``), with a word chosen from the failed input without
looking at its label, and say why when no rule can be written.

afnio's own prompts are recognised first, by the markers of
:mod:`afnio.autodiff.prompts`: an LM judge call (the ``afnio_judgement`` JSON schema)
is answered ``{"score", "explanation"}`` by comparing its ``<PREDICTION>`` and
``<TARGET>`` elements; ChatCompletion and evaluator backward calls are answered
``{"gradients": [...]}``, one string per ``<VARIABLE>``, the first trainable system
prompt being given the rule that would have produced the expected value, and a computed
input (the output of an earlier call) the value the call's own rules map to it, so that
credit reaches an earlier stage's prompt too (the *relay*). Requests can be delayed by
rules (:meth:`Simulator.delay_when`); requests with OpenAI ``tools`` get ``tool_calls``
chosen by rules such as ``If the message begins with "<word>", call <tool>.`` (in the
prompt) or ``Use this tool when the message mentions "<word>".`` (in a tool's
description), then a final answer after the tool results (see "Tool calling" in
:mod:`afnio.testing.world`), and :mod:`afnio.testing.programs` generates
programs with known ground truth to check that tracing links every gradient right.

Example::

    >>> import openai
    >>> from afnio.testing import SIMULATOR_MODEL, Fault, Simulator
    >>> with Simulator() as sim:
    ...     client = openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0)
    ...     sim.inject(Fault.RATE_LIMIT)
    ...     try:
    ...         client.chat.completions.create(
    ...             model=SIMULATOR_MODEL, messages=[{"role": "user", "content": "hi"}])
    ...     except openai.RateLimitError:
    ...         print("rate limited")
    ...     reply = client.chat.completions.create(
    ...         model=SIMULATOR_MODEL, messages=[{"role": "user", "content": "hi"}])
    ...     client.close()
    rate limited
    >>> reply.choices[0].message.content, sim.stats.calls, sim.stats.faults_served
    ('neutral', 2, 1)

The requests a simulator received (``Simulator.requests``) are counted by the kind
of LM call they are with :func:`calls_by_kind` (:func:`call_kind` for one request:
``forward``, ``evaluator backward``, ``chat backward``, ``optimizer``, ``judge``, or
a peer's ``backward``), or by the responder that answered them with
:func:`calls_by_responder` (:func:`responder_of`); see :mod:`afnio.testing.calls`.

From a shell: ``python -m afnio.testing serve --port 8000`` prints
``afnio simulator serving at http://127.0.0.1:8000/v1`` and serves until interrupted.
"""

from afnio.testing.calls import (
    CALL_KINDS,
    call_kind,
    calls_by_kind,
    calls_by_responder,
    responder_of,
)
from afnio.testing.simulator import SIMULATOR_MODEL, Fault, Simulator, SimulatorStats
from afnio.testing.world import SALIENCE_LEXICON

__all__ = [
    "CALL_KINDS",
    "SALIENCE_LEXICON",
    "SIMULATOR_MODEL",
    "Fault",
    "Simulator",
    "SimulatorStats",
    "call_kind",
    "calls_by_kind",
    "calls_by_responder",
    "responder_of",
]
