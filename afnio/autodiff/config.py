"""Constants of the autodiff engine."""

__all__ = [
    "BACKWARD_PASS_MAX_RETRIES",
    "CHAT_BACKWARD_SAMPLES_PER_CALL",
    "CHEAP_SAMPLES_PER_CALL",
    "EVALUATOR_SAMPLES_PER_CALL",
    "IDENTITY_GRADIENT_DATA",
]

BACKWARD_PASS_MAX_RETRIES = 3
"""How many times an LM-made gradient is re-asked when its answer cannot be parsed."""

IDENTITY_GRADIENT_DATA = ""
"""The data of the implicit root gradient (``x.backward()`` with no ``gradient``)."""

EVALUATOR_SAMPLES_PER_CALL = 8
"""How many failed samples one evaluator backward call gives feedback on.

A batch's failed samples are split into groups of at most this many, one backward LM
call per group, all groups at once (under the concurrency bound). Larger groups make
fewer calls and send the instructions once for more samples; smaller groups give
shorter answers (lower latency per call on a real model). ``1`` is one call per failed
sample. An evaluator's ``samples_per_call=`` keyword overrides it for that call.
"""

CHAT_BACKWARD_SAMPLES_PER_CALL = 1
"""The default of :attr:`afnio.BackwardOptions.chat_samples_per_call`: how many
samples' chat-backward feedback one call asks for.

``1`` (upstream's behaviour) sends one chat-backward call per sample that got
feedback. With ``n > 1`` the samples of a backward pass that went through the same
prompt template share a call (at most ``n`` per call, split as evenly as possible, the
calls sent at once): the shared system prompt and instructions are sent once per
call instead of once per sample. Set it for a block with
``afnio.backward_options(chat_samples_per_call=n)``.
"""

CHEAP_SAMPLES_PER_CALL = 8
"""``chat_samples_per_call`` of the ``"cheap"`` preset (:data:`afnio.autodiff.options.
CHEAP`, the default of ``optimize()`` and ``AfnioTGD``)."""
