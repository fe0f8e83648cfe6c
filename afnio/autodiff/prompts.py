"""The prompts afnio sends to the backward model: named, versioned templates.

Every template uses ``{name}`` placeholders only and is filled by
:func:`afnio._template.render`, so user text inside a prompt is never evaluated and its
braces stay literal. Changing a template changes request bodies, so the HTTP cassettes
that recorded it must be re-recorded in the same commit; ``PROMPTS_VERSION`` says which
wording a recording used.

Markers. The tags below are part of the wording on purpose: they let a reader (and the
bundled simulator, ``afnio.testing``) tell afnio's requests apart:

* a ChatCompletion backward call holds ``<LM_CONVERSATION>``, ``<FEEDBACK_ON_OUTPUT>``
  and ``<VARIABLES ...>``;
* a grouped chat backward call (several samples that went through the same prompt
  template, :data:`CHAT_BACKWARD_GROUP_SYSTEM`) holds ``<LM_CALLS ...>``,
  ``<SHARED_MESSAGES ...>`` and ``<VARIABLES ...>``: one ``<LM_CALL index="k">`` per
  sample (with ``<LM_CONVERSATION>``, ``<LM_OUTPUT ...>``, ``<FEEDBACK_ON_OUTPUT>`` and
  optionally ``<VALUE variable="i">``); a message every call received is listed once
  in ``<SHARED_MESSAGES>`` and a call shows ``<MESSAGE role="..." shared="i">`` for it;
* an evaluator backward call holds ``<EVALUATION ...>``, ``<VARIABLES ...>`` and
  ``<SAMPLES ...>``: one ``<SAMPLE index="k">`` per failed sample of its group (with
  ``<INPUT>``, ``<PREDICTION ...>``, ``<TARGET>``, ``<SCORE>``, optionally
  ``<EXPLANATION>`` and ``<VALUE variable="i">``);
* an LM judge call asks for the JSON schema named ``afnio_judgement``;
* every backward answer is the JSON schema named ``afnio_gradients``:
  ``{"gradients": [one string per variable, in order]}`` (for a group: the first
  sample's variables in order, then the next sample's).

Direct evaluator feedback (``afnio.backward_options(evaluator_feedback="direct")``)
sends nothing: a deterministic evaluator writes :data:`DIRECT_EVALUATOR_FEEDBACK`
(plus :data:`DIRECT_EVALUATOR_DETAIL`) itself.

Each ``<VARIABLE>`` carries ``index``, ``role``, ``location`` (the chat role of the
message it is in, or ``input:<key>``) and ``trainable`` (``true`` for a leaf that
requires grad: a prompt being optimized).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CHAT_BACKWARD_GROUP_SYSTEM",
    "CHAT_BACKWARD_GROUP_USER",
    "CHAT_BACKWARD_SYSTEM",
    "CHAT_BACKWARD_USER",
    "DIRECT_EVALUATOR_DETAIL",
    "DIRECT_EVALUATOR_FEEDBACK",
    "EVALUATOR_BACKWARD_SYSTEM",
    "EVALUATOR_BACKWARD_USER",
    "EVALUATOR_SAMPLE_ELEMENT",
    "EVALUATOR_SAMPLE_EXPLANATION",
    "EVALUATOR_SAMPLE_VALUE",
    "GRADIENTS_SCHEMA_NAME",
    "JUDGE_SCHEMA_NAME",
    "LM_CALL_ELEMENT",
    "LM_CALL_VALUE",
    "METRIC_FEEDBACK_THEN_DIRECT",
    "PREDICTION_PLACEHOLDER",
    "PROMPTS_VERSION",
    "RETRY_USER",
    "SHARED_MESSAGE_ELEMENT",
    "SHARED_MESSAGE_POINTER",
    "VALUE_IN_MESSAGE",
    "VARIABLE_IN_MESSAGE",
    "VARIABLE_IN_SHARED_MESSAGE",
    "VARIABLE_PER_CALL",
    "gradients_response_format",
    "judge_response_format",
]

PROMPTS_VERSION = 3
"""3: direct evaluator feedback (DIRECT_EVALUATOR_FEEDBACK) and grouped chat-backward
calls (CHAT_BACKWARD_GROUP_*); the earlier templates are unchanged.

2: one evaluator backward call covers a group of failed samples (was one per
sample); an LM judge's own per-sample explanation is shown; a chat-backward variable
that is a whole message is not repeated (:data:`VARIABLE_IN_MESSAGE`)."""

GRADIENTS_SCHEMA_NAME = "afnio_gradients"
JUDGE_SCHEMA_NAME = "afnio_judgement"

CHAT_BACKWARD_SYSTEM = """\
You are the gradient engine of afnio, an optimization system that improves the text \
variables of a language-model program.
You are shown one call of a language model: the conversation it received \
(<LM_CONVERSATION>), the output it produced (<LM_OUTPUT>), and feedback on that output \
(<FEEDBACK_ON_OUTPUT>). The conversation was built from the variables listed in \
<VARIABLES>.
For each variable, in order, write specific, actionable feedback: what should change \
in that variable, and why, so that the output meets the feedback. Give strategies \
and reasons; do not write a new version of the variable. Use an empty string for a \
variable that needs no change.
Answer with a JSON object only: {"gradients": [one feedback string per variable, in \
order]}."""
"""System prompt of a ChatCompletion backward call (one call per sample)."""

CHAT_BACKWARD_USER = """\
<LM_CONVERSATION>
{conversation}
</LM_CONVERSATION>
<LM_OUTPUT role="{output_role}">{output}</LM_OUTPUT>
<FEEDBACK_ON_OUTPUT>{feedback}</FEEDBACK_ON_OUTPUT>
<VARIABLES count="{count}">
{variables}
</VARIABLES>
Return exactly {count} feedback strings, one per variable, in order."""
"""User prompt of a ChatCompletion backward call. ``conversation`` is one
``<MESSAGE role="...">`` element per rendered message; ``variables`` one
``<VARIABLE ...>`` element per variable that needs a gradient."""

EVALUATOR_BACKWARD_SYSTEM = """\
You are the gradient engine of afnio, an optimization system that improves the text \
variables of a language-model program.
An evaluator compared predictions with their targets (<EVALUATION>). You are shown \
the samples that did not get the best score, each in a <SAMPLE> element: the input \
that led to the prediction (<INPUT>), the prediction (<PREDICTION>), the target \
(<TARGET>), the sample's score (<SCORE>) and, when the evaluator wrote one, its \
explanation (<EXPLANATION>).
For each sample, in order, and for each variable listed in <VARIABLES>, in order, \
write specific, actionable feedback on how that variable should change so that the \
prediction matches the target for inputs like that sample's. A variable with \
location="prediction" stands for each sample's <PREDICTION>; a <VALUE variable="i"> \
element in a sample is that sample's text of variable i. Give strategies and \
reasons; do not write a new version of the variable. Use an empty string for a \
variable that needs no change.
Answer with a JSON object only: {"gradients": [one feedback string per sample and \
variable: the first sample's variables in order, then the next sample's]}."""
"""System prompt of an evaluator backward call (one call per group of at most
``config.EVALUATOR_SAMPLES_PER_CALL`` failed samples; groups are sent concurrently)."""

EVALUATOR_BACKWARD_USER = """\
<EVALUATION purpose="{purpose}">{explanation}</EVALUATION>
<FEEDBACK_ON_EVALUATION>{feedback}</FEEDBACK_ON_EVALUATION>
<VARIABLES count="{variable_count}">
{variables}
</VARIABLES>
<SAMPLES count="{sample_count}">
{samples}
</SAMPLES>
Return exactly {count} feedback strings: {variable_count} per sample, for \
{sample_count} samples, in order."""
"""User prompt of an evaluator backward call. ``variables`` is one ``<VARIABLE ...>``
element per variable that needs a gradient (listed once); ``samples`` one
:data:`EVALUATOR_SAMPLE_ELEMENT` per failed sample of the group."""

EVALUATOR_SAMPLE_ELEMENT = """\
<SAMPLE index="{index}">
<INPUT>{input}</INPUT>
<PREDICTION role="{prediction_role}">{prediction}</PREDICTION>
<TARGET>{target}</TARGET>
<SCORE>{score}</SCORE>{details}
</SAMPLE>"""
"""One failed sample of an evaluator backward call; ``details`` holds its
``<EXPLANATION>`` (an LM judge's own explanation of the sample) and one
``<VALUE variable="i">`` per batched variable other than the prediction (empty when
there are none)."""

EVALUATOR_SAMPLE_EXPLANATION = "\n<EXPLANATION>{explanation}</EXPLANATION>"
EVALUATOR_SAMPLE_VALUE = '\n<VALUE variable="{index}">{text}</VALUE>'
PREDICTION_PLACEHOLDER = "(each sample's <PREDICTION>)"
"""The text of the ``location="prediction"`` variable in ``<VARIABLES>``: its value
differs per sample and is already shown there."""

RETRY_USER = """\
Your answer could not be used: {error}
Answer again with a JSON object only, of the form {"gradients": [...]}, holding \
exactly {count} strings."""
"""Sent after an unusable backward answer (up to ``BACKWARD_PASS_MAX_RETRIES`` times),
together with that answer, so the model can correct it."""

MESSAGE_ELEMENT = '<MESSAGE role="{role}">{content}</MESSAGE>'
VARIABLE_IN_MESSAGE = (
    '(the whole content of <MESSAGE> {index} of <LM_CONVERSATION>, role "{role}")'
)
"""The text of a ``<VARIABLE>`` in a ChatCompletion backward call whose value is the
whole content of a message of the conversation (a system prompt, say): shown once."""
VARIABLE_ELEMENT = (
    '<VARIABLE index="{index}" role="{role}" location="{location}" '
    'trainable="{trainable}">{text}</VARIABLE>'
)


# -- version 3: direct evaluator feedback and grouped chat backward --------------------

DIRECT_EVALUATOR_FEEDBACK = (
    'The metric "{metric}" gave the prediction "{prediction}" the score '
    '{score}; the expected value is "{target}".'
)
"""The feedback a deterministic evaluator writes itself on a failed sample in direct
mode (``evaluator_feedback="direct"``): no LM call."""

DIRECT_EVALUATOR_DETAIL = " {detail}"
"""Appended to :data:`DIRECT_EVALUATOR_FEEDBACK` (stripped, only when not blank): in
a deterministic evaluator (``afnio.autodiff.evaluator.direct_feedback_texts``), the
feedback that reached the evaluation's explanation output (for a per-sample
explanation, the sample's own), which is usually none; for a metric that writes its
own textual feedback (the LangChain ``optimize()`` metric returning ``(score,
feedback)``, a DSPy metric's ``feedback``), that text, followed by the feedback on
the explanation when there is some."""

METRIC_FEEDBACK_THEN_DIRECT = "{feedback} {direct}"
"""Direct mode, a sample whose metric wrote its own textual feedback and whose target
is not a plain value (several lines, a double quote, a JSON or Python object or
list): the metric's text (``feedback``) first, then :data:`DIRECT_EVALUATOR_FEEDBACK`
(``direct``), so that the first expected value a reader finds is the one the metric
names, not the quoted target (see ``afnio_integrations._metric_feedback``)."""

CHAT_BACKWARD_GROUP_SYSTEM = """\
You are the gradient engine of afnio, an optimization system that improves the text \
variables of a language-model program.
You are shown several calls of a language model that used the same prompt template, \
one per <LM_CALL>: the conversation it received (<LM_CONVERSATION>), the output it \
produced (<LM_OUTPUT>) and feedback on that output (<FEEDBACK_ON_OUTPUT>). Messages \
that every call received are shown once, in <SHARED_MESSAGES>; a call's <MESSAGE \
shared="i"> stands for shared message i. The conversations were built from the \
variables listed in <VARIABLES>; a variable whose text differs between calls has it \
in each call's <VALUE variable="i">.
For each call, in order, and for each variable, in order, write specific, actionable \
feedback on that call alone: what should change in that variable, and why, so that \
the call's output meets its feedback. Give strategies and reasons; do not write a new \
version of the variable. Use an empty string for a variable that needs no change.
Answer with a JSON object only: {"gradients": [one feedback string per call and \
variable: the first call's variables in order, then the next call's]}."""
"""System prompt of a grouped chat-backward call: the samples of a backward pass that
went through the same prompt template, at most ``chat_samples_per_call`` per call (a
group of one is sent with :data:`CHAT_BACKWARD_SYSTEM` instead)."""

CHAT_BACKWARD_GROUP_USER = """\
<SHARED_MESSAGES count="{shared_count}">
{shared}
</SHARED_MESSAGES>
<VARIABLES count="{variable_count}">
{variables}
</VARIABLES>
<LM_CALLS count="{call_count}">
{calls}
</LM_CALLS>
Return exactly {count} feedback strings: {variable_count} per call, for \
{call_count} calls, in order."""
"""User prompt of a grouped chat-backward call: the shared messages once, the
variables once, one :data:`LM_CALL_ELEMENT` per call."""

SHARED_MESSAGE_ELEMENT = '<MESSAGE index="{index}" role="{role}">{content}</MESSAGE>'
"""A message every call of the group received (same role, same content, same
position ``index``, counted from 1), listed once."""

SHARED_MESSAGE_POINTER = '<MESSAGE role="{role}" shared="{index}"></MESSAGE>'
"""A call's stand-in for shared message ``index``."""

LM_CALL_ELEMENT = """\
<LM_CALL index="{index}">
<LM_CONVERSATION>
{conversation}
</LM_CONVERSATION>
<LM_OUTPUT role="{output_role}">{output}</LM_OUTPUT>
<FEEDBACK_ON_OUTPUT>{feedback}</FEEDBACK_ON_OUTPUT>{values}
</LM_CALL>"""
"""One call of a grouped chat-backward call; ``values`` holds one
:data:`LM_CALL_VALUE` per variable whose text differs between calls."""

LM_CALL_VALUE = '\n<VALUE variable="{index}">{text}</VALUE>'
VARIABLE_IN_SHARED_MESSAGE = (
    '(the whole content of shared <MESSAGE> {index}, role "{role}")'
)
VARIABLE_PER_CALL = (
    '(differs per call: see each <LM_CALL>\'s <VALUE variable="{index}">)'
)
VALUE_IN_MESSAGE = (
    '(the whole content of this call\'s <MESSAGE> {index}, role "{role}")'
)


def gradients_response_format() -> dict[str, Any]:
    """The ``response_format`` of every backward call: a JSON object with a list of
    feedback strings."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": GRADIENTS_SCHEMA_NAME,
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {
                    "gradients": {"type": "array", "items": {"type": "string"}}
                },
                "required": ["gradients"],
                "additionalProperties": False,
            },
        },
    }


def judge_response_format() -> dict[str, Any]:
    """The ``response_format`` of an LM judge call: ``{"score", "explanation"}``."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": JUDGE_SCHEMA_NAME,
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {
                    "score": {"anyOf": [{"type": "boolean"}, {"type": "number"}]},
                    "explanation": {"type": "string"},
                },
                "required": ["score", "explanation"],
                "additionalProperties": False,
            },
        },
    }
