"""Constants of the autodiff engine."""

__all__ = [
    "BACKWARD_PASS_MAX_RETRIES",
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
