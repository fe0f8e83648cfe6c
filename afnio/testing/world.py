"""The simulator's *rule world*: pure functions that compute an answer from a request.

This is a **deterministic stand-in, not a model**. Nothing here understands language:
an answer is computed from explicit rules written in the prompt, so a test (or a
benchmark) knows in advance exactly what "the model" will say. No HTTP happens in this
module; :mod:`afnio.testing.simulator` parses the wire format and calls :func:`respond`.

Rule grammar
------------
A task prompt may hold, anywhere in its messages (system or user), rules of the exact
form::

    If the message mentions "<word>", the <field> is <label>.

one sentence each, e.g. ``If the message mentions "refund", the sentiment is
negative.`` The label may be several words; it runs up to the first period. The answer
is the label of the **first** rule (in message order) whose quoted word occurs in the
*user content* as a whole word, case-insensitively. The user content is the text of
all ``user`` messages with every rule sentence removed, so a rule never matches itself.

A rule may instead read ``If the message begins with "<word>", the <field> is
<label>.``: it matches when ``<word>`` is the user content's *lead word*
(:func:`lead_word`: its first content word, a leading ``Label:`` and the
:data:`STOPWORDS` skipped, a negated word skipped).

The task
--------
The simulator reads the task from the request, the same way for every task:

* the *field*: that of the first rule; else the first ``enum`` property of a
  ``json_schema`` response format (a backward call does not see the response format:
  there, the first non-free-text property of the JSON object the call answered, see
  :func:`output_field`); else the task phrase of the instructions (``classify the
  <field>``, ``route ... to the right <field>``, ``which <field>``, ``is this ...
  <field>?``..., see :func:`prompt_field`); for DSPy, the ``sentiment`` output field,
  else the first output field other than ``reasoning``; else, when labels are known,
  the generic :data:`GENERIC_FIELD` (``label``); else ``sentiment`` (the feedback then
  says so);
* the *labels*: the field's schema ``enum`` (in a backward call, an ``enum`` shown in
  the conversation, :func:`shown_enum`), a DSPy ``Literal``, else the list the
  instructions give (``: low, medium or high``, ``Categories: a, b, c``, ``Answer
  yes or no``, a bullet list; see :func:`listed_labels`);
* the *default label*, answered when no rule matches (see :func:`task_default`):
  ``neutral`` when it is a label or no label set is known, else the first label in
  the order given (``low`` for ``low, medium or high``). A prompt without rules but
  with a label set is answered its default label; one with neither gets ``neutral``.
  A DSPy ``bool``/``int``/``float`` output gets ``False``/``0``/``0.0``, and never a
  value outside its type or ``Literal`` choices (see :func:`dspy_typed`).

The *rule word* of a failed sample (see :func:`rule_word`) never depends on its
label: for an affect field (:data:`AFFECT_FIELDS`: sentiment, feeling, mood,
tone...) a ``mentions`` rule for the alphabetically first :data:`SALIENCE_LEXICON`
word of the input (the simulator's knowledge of evaluative words; no rule for the
default label ``neutral``, the absence of evaluation); for any other field a ``begins
with`` rule for the input's lead word (for every label; headers such as ``Subject:``
or a template's ``Customer message:`` line are skipped, see :func:`lead_word`). When
no rule can be written (no such word in the input, the default label of an affect
field), the system prompt's gradient says so and why (``No rule can be written:
...``); a prompt that names no field or (outside affect fields) no labels gets a note
saying so.

Responders
----------
An answer is computed by an ordered list of *responders* (:data:`RESPONDERS`): each
takes the parsed :class:`SimRequest` and returns an :class:`Answer` or ``None``; the
first answer wins. afnio's own prompts are recognised by markers (the tags of
:mod:`afnio.autodiff.prompts`) before any task rule is looked at, so a backward prompt
that quotes a rule sentence still gets gradients. In order:

1. :func:`judge_responder`, an LM-as-judge call. Marker: ``response_format`` is
   ``json_schema`` named ``afnio_judgement``. It compares the first
   ``<PREDICTION ...>...</PREDICTION>`` with the first ``<TARGET ...>...</TARGET>``
   of the messages (strip + casefold; parsed values when both are JSON) and answers
   ``{"score": true|false, "explanation": "The prediction "<p>" matches the target
   "<t>"."}`` (or ``does not match``; without both elements: false, ``No <PREDICTION>
   and <TARGET> to compare.``).
2. :func:`chat_backward_group_responder`, a grouped ChatCompletion backward call
   (the chat-backward requests of several samples that went through the same
   prompt template, sent as one). Marker: a user message holding ``<LM_CALLS ...>``,
   ``<VARIABLES ...>`` and ``<FEEDBACK_ON_OUTPUT>`` with at least one
   ``<LM_CALL>``; it comes before the single-call responder, whose marker a grouped
   prompt also holds. Each ``<LM_CALL>`` is answered exactly as the single-call
   responder (3, below) answers the prompt that call stands for: its
   ``<LM_CONVERSATION>`` with every ``<MESSAGE role="r" shared="i"></MESSAGE>``
   replaced by message ``i`` of ``<SHARED_MESSAGES>``, its ``<LM_OUTPUT>``, its
   ``<FEEDBACK_ON_OUTPUT>``, and the ``<VARIABLES>`` with the call's ``<VALUE
   variable="i">`` texts (a pointer to a shared message or to one of the call's
   messages stands for that message's content, shown as the single-call prompt
   shows it; see :class:`ChatBackwardGroupPrompt`). The answer is ``{"gradients":
   [...]}``, the calls' gradients concatenated call by call; a call's gradients
   never depend on the other calls of its group.
3. :func:`chat_backward_responder`, a ChatCompletion backward call. Marker: a user
   message holding ``<LM_CONVERSATION>``, ``<FEEDBACK_ON_OUTPUT>`` and
   ``<VARIABLES ...>``. It answers ``{"gradients": [...]}``, one string per
   ``<VARIABLE>``: the first trainable ``system`` variable gets a new *rule* for the
   target, the ``expected value is "<t>"`` quoted in the feedback, naming the task's
   field (above; the conversation's first rule, the ``<LM_OUTPUT>``'s JSON field, the
   instructions, DSPy's output field) and the sample's rule word (above): ``If the
   message mentions "<word>", the <field> is <target>.`` for an affect field, ``If
   the message begins with "<word>", the <field> is <target>.`` otherwise; when no
   rule can be written, ``The <role> should lead to "<target>" for inputs like this
   one. No rule can be written: <reason>``; a *computed input* (a variable with
   ``trainable="false"`` in a ``user``/``human`` message or an ``input:<key>``: the
   output of an upstream step) gets the *relay* ``The <role> should contain "<v>":
   the expected value is "<v>", since the rule for "<v>" gives the <field>
   "<target>".`` when the conversation's rules (a DSPy predictor's: those of its
   instructions naming the field) map a value to the target (see
   :func:`relay_value`; never for the default label); the other variables get
   ``The <role> should lead to "<target>" for this input.``; blank feedback gives
   ``""`` for every variable.
4. :func:`evaluator_backward_responder`, an evaluator backward call. Marker: a user
   message holding ``<EVALUATION ...>``, ``<SAMPLE>`` and ``<VARIABLES ...>``. It
   answers ``{"gradients": [...]}``, one string per variable for each ``<SAMPLE>``,
   sample by sample: the ``location="prediction"`` variable gets ``The
   prediction "<p>" is wrong: the expected value is "<t>". Change what produces it so
   that this input leads to "<t>".``, any other ``The <role> should lead to the
   expected value "<t>" for this input.``
5. :func:`optimizer_responder`, a TGD optimizer call. Marker: a user message holding
   ``<CURRENT_VALUE>`` and ``<FEEDBACK ...>``. It answers ``{"improved_value": ...}``:
   the current value with every rule proposed in the feedback applied (condensed
   ``{"a" | "b"}`` alternatives expanded; a rule for a word already ruled replaces that
   sentence in place, a new one is appended, never twice), honouring the checkable
   constraint ``Do not use the character "<c>".``
6. The peer libraries' prompts (:mod:`afnio.testing.peers`): TextGrad's TGD
   update call (:func:`~afnio.testing.peers.textgrad_optimizer_responder`: the
   current value with the rules of its ``<FEEDBACK>`` applied, between
   ``<IMPROVED_VARIABLE>`` tags), TextGrad's backward calls
   (:func:`~afnio.testing.peers.textgrad_backward_responder`: a string-based
   function's verdict as ``the expected value is "<t>"``, an ``LLMCall``'s as the
   rule :func:`chat_backward_gradients` would give) and Trace's OptoPrime call
   (:func:`~afnio.testing.peers.optoprime_responder`: ``{"reasoning", "answer",
   "suggestion"}`` with the rules its ``#Feedback`` calls for).
7. :func:`dspy_responder`, a prompt rendered by DSPy's ChatAdapter or JSONAdapter
   (a system message declaring ``Your output fields are:`` and ending with DSPy's
   objective line): every output field answered from the rules in the
   instructions, as ``[[ ## field ## ]]`` blocks ending with
   ``[[ ## completed ## ]]``, or as a JSON object when JSON is asked for.
8. :func:`task_responder`, any prompt holding rules (the grammar above).
9. :func:`fallback_responder`, always the default label.

Together they close afnio's loop without a model: the judge (or a deterministic
evaluator) fails a sample, the evaluator backward names the expected value, the chat
backward turns it into a rule for the system prompt, and a prompt that holds that
rule makes the task responder answer the expected value. The JSON answers render the
same object under every ``response_format`` (plain text included). Element texts may
span lines and hold quotes and braces; an element's text runs to its first closing
tag.

Padded feedback: with ``feedback_words`` (``Simulator(feedback_words=N)``, ``serve
--feedback-words N``; :func:`answer`'s keyword), every non-empty feedback string of
an LM-written feedback answer (:data:`FEEDBACK_RESPONDERS`: the grouped and single
chat backward, the evaluator backward, TextGrad's backward) is followed by the
neutral :data:`FEEDBACK_FILLER` sentence until it holds at least ``N`` words (see
:func:`pad_feedback`). The filler holds no quote, rule, target or tool name, so every
rule read from the feedback, and so every optimizer edit, is the same; the feedback
and the optimizer prompt quoting it grow. Optimizer answers and judge verdicts are
never padded.

Two stages
----------
When a call reads the output of an earlier call (a pipeline, a chain, a multi-stage
DSPy program), the same rules assign the credit the way a capable model would:

* *Forward*, each stage answers by the rules of its own prompt, for whatever field
  they name (``If the message mentions "late", the feeling is unhappy.``), matched
  against its own user content only (for DSPy, its own input fields): a later stage
  sees the message only through the earlier stage's output. An intermediate stage
  whose rules do not match answers its default label (``neutral``), an
  uninformative value; a DSPy free-text output field that no rule names passes the
  input through.
* *Backward, downstream*: the evaluator's feedback names the target ``t`` of the
  last stage; its chat backward gives its own system prompt a rule from its own input
  when that input holds a lexicon word (as for a single stage), and gives the
  computed input the relay: the value ``v`` that this stage's rules map to ``t``,
  named as that input's expected value.
* *Backward, upstream*: the feedback reaching the earlier call's output (through any
  parser or lambda step in between, which only prefixes it) now holds ``the expected
  value is "v"``, so that call's chat backward writes, for its own system prompt,
  the rule for *its* field and the rule word of *its* input (the message), ``If the
  message mentions "<word>", the <its field> is v.`` for an affect field: the rule
  that makes it produce the value the next stage needs. Longer chains relay the same
  way, stage by stage.
* *Grouped backward*: a grouped chat-backward prompt (responder 2) answers each of
  its calls exactly as that call's own single-call prompt, so a group of second-stage
  calls relays to each call's computed input, and a group of first-stage calls
  writes each call's own rule, as above; the groups change the number of calls, not
  the credit.

So an error that only the first prompt can fix (the second stage already maps every
value it needs, the first answers an uninformative default) is fixed by training:
``benchmarks/two_stage.py`` measures it with an afnio Module, a traced LangChain chain
and a DSPy program.

Tool calling
------------
A request with OpenAI function ``tools`` is answered with ``tool_calls`` when the
rules route its *message* to tools (see :func:`choose_tool_calls`). The message is
the last ``user`` message, rule sentences removed (:func:`tool_message`); the
assistant tool calls and ``tool`` results after it are this message's *turn*. Rules:

* in the prompt (``system``, ``developer`` or ``user`` messages),
  ``If the message mentions "<word>", call <tool>.`` or ``If the message begins
  with "<word>", call <tool>.`` (:data:`TOOL_RULE_PATTERN`; several tools: ``call a,
  b and c.``; ``call no tool.`` answers without a call);
* in a tool's own ``description``, ``Use this tool when the message mentions
  "<word>".`` or ``Use this tool when the message begins with "<word>".``
  (:data:`TOOL_DESCRIPTION_RULE_PATTERN`).

Words match as for label rules (a whole word; the :func:`lead_word`), except that a
``mentions`` rule ignores a *negated* occurrence (the first content word after a
:data:`NEGATORS` word or ``...n't``: ``no leak`` does not mention a leak). The
prompt's matching rules decide when there are any, else the descriptions' rules.
Among them, the rule whose word occurs *earliest* in the message decides
(:func:`rule_position`; a ``begins with`` rule counts at its lead word's place, so
that it and a ``mentions`` rule for the same word decide together, as do all rules
at the same place): its tools are called, in parallel when it lists several (``call
a and b.``), in rule order; a deciding ``call no tool`` means none. Tools already
called in this turn are never called again, so an agent loop ends. ``tool_choice``
(default ``auto``): ``auto`` calls the routed tools, or answers in text when none is
routed; ``none`` always answers in text; ``required`` (``any``) calls the routed
tools, or, when nothing is routed (no rule matches, a matching ``call no tool``,
every routed tool already called), the *last* tool not called yet in this turn (else
the last tool): one rule for every client, which lets LangChain's structured-output
tool (appended last) answer directly; a named function is always called.
``parallel_tool_calls: false`` calls the first routed tool only (the next request
calls the next one). An empty ``tools`` list, ``tool_choice`` or
``parallel_tool_calls`` without ``tools``, and the deprecated ``functions`` /
``function_call`` are refused (HTTP 400), as the API does.

Arguments (:func:`tool_arguments`) fill every property of the tool's ``parameters``
schema: a property named like the label rules' field gets the label, a top-level
``default`` its default, a string the message, an ``enum`` its first value, numbers
``0``, booleans ``false``, arrays ``[]``. A request that calls no tool gets the
*final answer* (:func:`final_answer`): the label world's answer as without tools,
except that when only the fallback would answer and the turn has tool results, the
text of the last tool result.

Backward and optimizer (see :func:`tool_backward_gradients`): when the feedback
names the tools that should have been called (:func:`expected_tools`: ``expected a
call to <tool>``, ``expected tool calls: [<a>, <b>]``, ``Expected tool calls: [],
got [<b>]``, ``should have called <tool>``, ``called <b>, expected <a>``,
``Expected: [<a>]. Got: [<b>].``, ``expected no tool call``, ``should not have
called any tool``...) *and* the backward prompt shows tool calling
(:func:`shown_tools`: the ``<LM_OUTPUT>`` holds tool calls, a variable is a
``tool:<name>`` location, or the conversation shows tool results, calls or
definitions naming the tool; when it lists the offered tools, every expected name
must be one of them), it is read before the label target; otherwise the feedback is
label feedback. The chat backward then writes a rule for the word and kind of the
rule that decided the wrong call (:func:`deciding_rule`, so that the optimizer
replaces it in place), or, when no rule decided, a ``mentions`` rule for the
message's first word tied to the expected tool and to no other offered tool
(:func:`tool_topic_word`: a word naming it or occurring in its description, and
naming or describing none of the other tools; words compared by
:data:`STEM_LETTERS`, hyphenated and camelCase words split, a possessive ``'s``
dropped), else a ``begins with`` rule for its lead word (as for a non-affect
field): ``If the message <kind> "<word>", call <tool>.`` for the first trainable
system prompt, ``Use this tool when the message <kind> "<word>".`` for the trainable
description of an expected tool (a variable whose ``location`` is ``tool:<name>``,
or whose role names the tool's description; when a deciding rule is corrected in
place, the description gets a ``mentions`` rule for the topic word only, or no
rule: the reused word may be any tool's), ``Do not use this tool when the message
<kind> "<word>".``
for that of a tool called (the ``<LM_OUTPUT>``'s calls, or routed by its
description) but not expected, and ``The <role> should lead to a call to <tool> for
this input.`` for any other variable. The optimizer (:func:`improve_value`) replaces
the tool rule for the same word and kind in place, adds a description rule once, and
removes the description rules for the word a ``Do not use this tool ...`` sentence
names, whatever their kind. Conflicting tool edits in one feedback (rules for the
same word and kind calling different tools; adding and removing a description rule
for the same word) are settled by a vote: only the one proposed most often is
applied (``(xN)`` counts; a condensed line's alternatives take their own
``"a" (xN)`` counts when given, else share its count evenly; counted exactly; ties:
the first).

Rendering
---------
:func:`render_content` turns an answer into message content the way a real model
honours ``response_format``: no format gives the plain label; ``json_object`` gives a
JSON object ``{"<field>": "<label>"}`` (``{"answer": "<label>"}`` without a field);
``json_schema`` gives an instance valid for the schema (see :func:`schema_instance`).

Example::

    >>> from afnio.testing.world import SimRequest, respond
    >>> rules = 'If the message mentions "refund", the sentiment is negative.'
    >>> req = SimRequest.from_messages(
    ...     [{"role": "system", "content": rules},
    ...      {"role": "user", "content": "I want a REFUND now"}]
    ... )
    >>> respond(req)
    'negative'
    >>> respond(SimRequest.from_messages([{"role": "user", "content": "Hello"}]))
    'neutral'
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

__all__ = [
    "TOOL_CHOICES",
    "TOOL_DESCRIPTION_REMOVAL_PATTERN",
    "TOOL_DESCRIPTION_RULE_PATTERN",
    "TOOL_NAME",
    "TOOL_RULE_PATTERN",
    "ToolCall",
    "ToolChoice",
    "ToolRequestError",
    "ToolRule",
    "ShownTools",
    "ToolSpec",
    "called_tools",
    "choose_tool_calls",
    "deciding_rule",
    "expected_tools",
    "final_answer",
    "find_tool_rules",
    "parse_tool_choice",
    "parse_tools",
    "shown_tools",
    "strip_rules",
    "tool_arguments",
    "tool_backward_gradients",
    "tool_description_sentence",
    "tool_message",
    "tool_of_variable",
    "tool_results",
    "tool_routing",
    "rule_position",
    "tool_topic_word",
    "tool_vocabulary",
    "STEM_LETTERS",
    "tool_rule_sentence",
    "AFFECT_FIELDS",
    "DEFAULT_FIELD",
    "DEFAULT_LABEL",
    "DSPY_COMPLETED",
    "FREE_TEXT_FIELDS",
    "GENERIC_FIELD",
    "HEADER_LABELS",
    "HEADER_LINE_WORDS",
    "GRADIENTS_SCHEMA_NAME",
    "JUDGE_SCHEMA_NAME",
    "NEGATORS",
    "NON_FIELD_WORDS",
    "RESPONDERS",
    "RULE_PATTERN",
    "SALIENCE_LEXICON",
    "STOPWORDS",
    "TASK_VERBS",
    "Answer",
    "ChatBackwardGroupPrompt",
    "ChatBackwardPrompt",
    "DSPyField",
    "DSPyPrompt",
    "Element",
    "EvaluatorBackwardPrompt",
    "Message",
    "PromptVariable",
    "Responder",
    "Rule",
    "RuleWord",
    "SimRequest",
    "FEEDBACK_FILLER",
    "FEEDBACK_RESPONDERS",
    "SINGLE_CALL_VARIABLE_POINTER",
    "answer",
    "chat_backward_gradients",
    "chat_backward_group_gradients",
    "chat_backward_group_responder",
    "chat_backward_responder",
    "dspy_responder",
    "dspy_typed",
    "dspy_values",
    "embed",
    "evaluator_backward_gradients",
    "evaluator_backward_responder",
    "fallback_responder",
    "find_rules",
    "instructions_text",
    "is_affect_field",
    "judge_responder",
    "judgement_matches",
    "lead_word",
    "listed_labels",
    "message_text",
    "output_field",
    "prompt_field",
    "relay_value",
    "pad_feedback",
    "padded_answer",
    "render_content",
    "respond",
    "rule_sentence",
    "rule_word",
    "salient_word",
    "schema_instance",
    "shown_enum",
    "task_default",
    "task_labels",
    "task_responder",
    "user_content",
]

DEFAULT_LABEL = "neutral"
"""The label answered when no rule matches (the majority class of sentiment tasks)."""

SALIENCE_LEXICON: tuple[str, ...] = (
    "angry",
    "annoyed",
    "awful",
    "complaint",
    "delighted",
    "disappointed",
    "disappointing",
    "dissatisfied",
    "excellent",
    "exceptional",
    "fantastic",
    "frustrated",
    "frustrating",
    "frustration",
    "grateful",
    "great",
    "impressed",
    "love",
    "outstanding",
    "poor",
    "terrible",
    "thrilled",
    "top-notch",
    "unacceptable",
    "unsatisfactory",
    "upset",
    "wonderful",
    "worst",
)
"""Sorted words that carry strong sentiment; the chat-backward responder picks the word
of a new rule from it (see :func:`salient_word`).

    >>> list(SALIENCE_LEXICON) == sorted(SALIENCE_LEXICON)
    True
"""

RULE_PATTERN = re.compile(
    r"If\s+the\s+message\s+(?P<kind>mentions|begins\s+with)\s+"
    r'"(?P<word>[^"\n]+)",\s+'
    r"the\s+(?P<field>[^.\n]+?)\s+is\s+(?P<label>[^.\n]+?)\s*\."
)
"""The rule sentence: ``If the message mentions "<word>", the <field> is <label>.``
or ``If the message begins with "<word>", the <field> is <label>.``"""

AFFECT_FIELDS: tuple[str, ...] = (
    "attitude",
    "emotion",
    "feeling",
    "mood",
    "opinion",
    "polarity",
    "sentiment",
    "tone",
)
"""The fields :data:`SALIENCE_LEXICON` is knowledge for (compared case- and
separator-insensitively): for them the chat backward writes ``mentions`` rules for
evaluative words; for any other field it writes ``begins with`` rules for the
input's lead word (see :func:`lead_word`)."""

STOPWORDS: frozenset[str] = frozenset(
    """a about above after again against all also am an and any are as at be because
    been before being below between both but by can cannot could dear did do does doing
    down during each either few for from further had has have having he hello her here
    hers herself hey hi him himself his how i if in into is it its itself just let me
    more most my myself neither no nor not now of off on once only or other our ours
    ourselves out over own please same she should so some such than that the their
    theirs them themselves then there these they this those through to too under until
    up very was we were what when where which while who whom why will with would yes
    yet you your yours yourself yourselves""".split()  # noqa: SIM905
)
"""English function words (and greetings) that are never a lead word (see
:func:`lead_word`); a fixed list, the same for every task."""

NEGATORS: frozenset[str] = frozenset({"no", "not", "never", "nothing", "without"})
"""Words after which the next content word is negated (as are words ending in
``n't``): a negated word is never a lead word."""


@dataclass(frozen=True)
class Message:
    """One chat message, reduced to its role and its text."""

    role: str
    text: str


@dataclass(frozen=True)
class SimRequest:
    """A parsed generation request (chat or legacy completion), independent of HTTP.

    Attributes:
        messages: the conversation; a legacy completion prompt is one ``user`` message.
        model: the requested model name (any name is accepted).
        response_format: the request's ``response_format`` dict, or ``None``.
        endpoint: ``"chat/completions"`` or ``"completions"``.
        body: the raw JSON body (empty when built by hand).
    """

    messages: tuple[Message, ...]
    model: str = ""
    response_format: Mapping[str, Any] | None = None
    endpoint: str = "chat/completions"
    body: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_messages(
        cls,
        messages: Sequence[Mapping[str, Any]],
        *,
        model: str = "",
        response_format: Mapping[str, Any] | None = None,
    ) -> SimRequest:
        """Build a request from OpenAI-style message dicts.

        >>> SimRequest.from_messages([{"role": "user", "content": "hi"}]).messages
        (Message(role='user', text='hi'),)
        """
        return cls(
            messages=tuple(
                Message(str(m.get("role", "")), message_text(m.get("content")))
                for m in messages
            ),
            model=model,
            response_format=response_format,
        )

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> SimRequest:
        """Build a chat request from a parsed ``/v1/chat/completions`` JSON body, as
        the simulator does (the body is kept, so ``tools``, ``tool_choice`` and the
        messages' ``tool_calls`` can be read).

        >>> SimRequest.from_body({"model": "m", "messages": [
        ...     {"role": "tool", "tool_call_id": "c", "content": "ok"}]}).messages
        (Message(role='tool', text='ok'),)
        """
        messages = body.get("messages")
        fmt = body.get("response_format")
        model = body.get("model")
        return cls(
            messages=tuple(
                Message(str(m.get("role", "")), message_text(m.get("content")))
                for m in (messages if isinstance(messages, list) else [])
                if isinstance(m, Mapping)
            ),
            model=model if isinstance(model, str) else "",
            response_format=fmt if isinstance(fmt, Mapping) else None,
            body=body,
        )

    @property
    def json_schema(self) -> dict[str, Any] | None:
        """The JSON schema of a ``json_schema`` response format, else ``None``."""
        fmt = self.response_format
        if not fmt or fmt.get("type") != "json_schema":
            return None
        spec = fmt.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        return dict(schema) if isinstance(schema, Mapping) else {}


@dataclass(frozen=True)
class Rule:
    """One parsed rule sentence.

    >>> rule = find_rules('If the message mentions "late", the tone is very upset.')[0]
    >>> rule.word, rule.field, rule.label
    ('late', 'tone', 'very upset')
    """

    word: str
    field: str
    label: str
    sentence: str
    kind: str = "mentions"

    def matches(self, text: str) -> bool:
        """Whether the rule applies to ``text``: a ``mentions`` rule when its word
        occurs in ``text`` as a whole word (any case); a ``begins with`` rule when its
        word is the :func:`lead_word` of ``text`` (any case).

        >>> rule = find_rules('If the message mentions "Bad", the x is y.')[0]
        >>> rule.matches("so bad!"), rule.matches("badly")
        (True, False)
        >>> lead = find_rules('If the message begins with "outage", the x is y.')[0]
        >>> lead.matches("Subject: OUTAGE in Paris"), lead.matches("Power outage")
        (True, False)
        """
        if self.kind == "begins with":
            return lead_word(text) == self.word.strip().casefold()
        pattern = rf"(?<!\w){re.escape(self.word.strip())}(?!\w)"
        return re.search(pattern, text, re.IGNORECASE) is not None

    def text(self) -> str:
        """The rule as a sentence of the grammar (normalised spacing)."""
        return rule_sentence(self.kind, self.word, self.field, self.label)


def rule_sentence(kind: str, word: str, field: str, label: str) -> str:
    """A rule sentence: ``If the message <kind> "<word>", the <field> is <label>.``

    >>> rule_sentence("begins with", "inquiry", "urgency", "low")
    'If the message begins with "inquiry", the urgency is low.'
    """
    return f'If the message {kind} "{word}", the {field} is {label}.'


_WORD = re.compile(r"[^\W\d_]+(?:['\u2019-][^\W\d_]+)*")

HEADER_LABELS: frozenset[str] = frozenset(
    """body comment content customer date description email e-mail fw fwd from input
    mail message note query question re request sent subject text ticket title to
    user""".split()  # noqa: SIM905
)
"""The header labels of a message (``Subject:``, ``Re:``, ``Fwd:``, ``Message:``,
``Ticket:``...) that :func:`lead_word` skips when a text begins with ``<label>:``:
generic words of e-mail and form headers, the same for every task. Any other
``Word:`` stays a content word (``URGENT: server down`` leads with ``urgent``).

    >>> "subject" in HEADER_LABELS, "urgent" in HEADER_LABELS
    (True, False)
"""

HEADER_LINE_WORDS = 8
"""A leading line of at most this many words that ends with ``:`` and holds
nothing else is a header (``Customer message:``, ``Here is what the customer
wrote:``), skipped by :func:`lead_word`."""

_HEADER_LABEL = re.compile(r"\A\s*(?P<label>[^\W\d_]+(?:-[^\W\d_]+)?)\s*:(?!//)")
_HEADER_LINE = re.compile(r"\A\s*(?P<line>[^\n:]*):[ \t]*\n")


def _skip_headers(text: str) -> str:
    """``text`` without its leading header lines and header labels (see
    :func:`lead_word`)."""
    while True:
        line = _HEADER_LINE.match(text)
        if line is not None and 0 < len(line["line"].split()) <= HEADER_LINE_WORDS:
            text = text[line.end() :]
            continue
        label = _HEADER_LABEL.match(text)
        if label is not None and label["label"].casefold() in HEADER_LABELS:
            text = text[label.end() :]
            continue
        return text


def lead_word(text: str) -> str | None:
    """The *lead word* of ``text``: its first content word, casefolded. The beginning
    of a text (a subject line, a title, the first words of a ticket) says what the text
    is, whatever the language or the task. Rules, in order:

    * rule sentences are removed;
    * headers are skipped, repeatedly: a leading line of at most
      :data:`HEADER_LINE_WORDS` words that ends with ``:`` and holds nothing else
      (``Customer message:``, the preamble of a prompt template), and a leading
      ``<label>:`` whose label is one of :data:`HEADER_LABELS` (``Subject:``,
      ``Re:``, ``Fwd:``, ``Ticket:``); any other ``Word:`` is content
      (``URGENT: server down`` leads with ``urgent``);
    * words are runs of letters (any script; inner ``'``/``-`` kept); a word of
      :data:`STOPWORDS` or of one letter is no content word;
    * a content word right after a negator (:data:`NEGATORS`, ``...n't``) is skipped
      (``Not urgent: ...`` does not lead with ``urgent``).

    ``None`` when ``text`` holds no content word. Labels play no part.

    >>> lead_word("Subject: Urgent HVAC repair"), lead_word("Olá, preciso de ajuda")
    ('urgent', 'olá')
    >>> lead_word("URGENT: server down"), lead_word("Customer message:\\nRefund me")
    ('urgent', 'refund')
    >>> lead_word("Not urgent: the printer jams"), lead_word("Hi! I am so... ok?")
    ('printer', 'ok')
    >>> lead_word("Hello, is it me?") is None
    True
    """
    text = _skip_headers(RULE_PATTERN.sub(" ", text))
    for _, word, negated in _scan_words(text):
        if not negated:
            return word
    return None


def _scan_words(text: str) -> Iterator[tuple[re.Match[str], str, bool]]:
    """The content words of ``text`` (:data:`STOPWORDS` and one-letter words left
    out), each with its casefolded form and whether a negator negates it: it is the
    first content word after a :data:`NEGATORS` word or a ``...n't`` (stopwords in
    between do not end the negation)."""
    negated = False
    for match in _WORD.finditer(text):
        word = match[0].casefold().replace("\u2019", "'")
        if word in NEGATORS or word.endswith("n't"):
            negated = True
            continue
        if word in STOPWORDS or len(word) < 2:
            continue
        yield match, word, negated
        negated = False


def is_affect_field(field: str | None) -> bool:
    """Whether ``field`` is one of :data:`AFFECT_FIELDS` (or unknown, ``None``).

    >>> is_affect_field("Sentiment"), is_affect_field("urgency")
    (True, False)
    """
    return field is None or _norm(field) in AFFECT_FIELDS


@dataclass(frozen=True)
class Answer:
    """What a responder decided to say.

    Attributes:
        label: the answer as plain text (the whole content without response_format).
        field: the name of the answered field (e.g. ``"sentiment"``), if any; a JSON
            answer puts ``label`` under this key.
        values: explicit values for named JSON properties (the judge and backward
            answers put their whole object here);
            they take precedence over ``label`` for those properties.
        responder: the name of the responder that produced the answer.
    """

    label: str
    field: str | None = None
    values: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    responder: str = ""


Responder = Callable[[SimRequest], Answer | None]
"""A responder: takes the parsed request, returns an :class:`Answer` or ``None``."""


def message_text(content: Any) -> str:
    """The text of a message ``content``: a string, or a list of parts whose ``text``
    entries are joined by newlines; ``None`` gives ``""``.

    >>> message_text([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])
    'a\\nb'
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                texts.append(part["text"])
        return "\n".join(texts)
    return str(content)


def find_rules(text: str) -> list[Rule]:
    """The rule sentences in ``text``, in order.

    >>> [r.label for r in find_rules(
    ...     'If the message mentions "a", the k is x. '
    ...     'If the message mentions "b", the k is y z.')]
    ['x', 'y z']
    """
    return [
        Rule(
            word=m["word"].strip(),
            field=" ".join(m["field"].split()),
            label=" ".join(m["label"].split()),
            sentence=m.group(0),
            kind=" ".join(m["kind"].split()),
        )
        for m in RULE_PATTERN.finditer(text)
    ]


TASK_VERBS: tuple[str, ...] = (
    "assess",
    "categorise",
    "categorize",
    "choose",
    "classify",
    "decide",
    "detect",
    "determine",
    "estimate",
    "give",
    "identify",
    "judge",
    "label",
    "name",
    "predict",
    "rate",
    "route",
    "tag",
    "triage",
)
"""The verbs of a task phrase ``<verb> the <field>`` (see :func:`prompt_field`)."""

NON_FIELD_WORDS: frozenset[str] = frozenset(
    """above below body comment content conversation customer customers document
    e-mail email following given incoming input inquiry item mail message messages
    next post query question request review sentence support text texts this
    ticket tickets tweet user users""".split()  # noqa: SIM905
)
"""Words a task phrase names as the *object* of the task, never its field
(``Classify the following message``, ``Triage the support ticket``): what the
text is, not what is asked about it. Generic words, the same for every task."""

_FIELD_WORD = r"(?P<field>[^\W\d_]+(?:-[^\W\d_]+)*)"
_TASK_VERB = re.compile(
    r"\b(?:" + "|".join(TASK_VERBS) + r")\s+the\s+"
    r"(?:[^\W\d_]+(?:'s|\u2019s)\s+)?" + _FIELD_WORD,
    re.IGNORECASE,
)
_FIELD_PHRASES: tuple[re.Pattern[str], ...] = (
    _TASK_VERB,
    # "Route the ticket to the right team", "Assign it to the correct queue"
    re.compile(
        r"\bto\s+the\s+(?:right|correct|appropriate|proper|relevant)\s+" + _FIELD_WORD,
        re.IGNORECASE,
    ),
    # "Which language is the text in?", "What is the priority of ...?"
    re.compile(r"\b(?:which|what\s+is\s+the)\s+" + _FIELD_WORD, re.IGNORECASE),
    # "Is this message spam?", "Is the ticket urgent?"
    re.compile(
        r"\bis\s+(?:this|the|it)\s+(?:[^\W\d_]+\s+){0,3}?" + _FIELD_WORD + r"\s*\?",
        re.IGNORECASE,
    ),
)
_LIST_ITEM = r'(?:"[^"\n]{1,40}"|[\w-]+)'
_LABEL_LIST = re.compile(
    r":\s*(?P<list>"
    + _LIST_ITEM
    + r"(?:\s*,\s*"
    + _LIST_ITEM
    + r")*,?\s+or\s+"
    + _LIST_ITEM
    + r")\s*(?:[.;\n)]|$)"
)
_LABEL_INTRO = re.compile(
    r"(?:\b(?:categories|labels|classes|options|choices|values|tags)\s*:|"
    r"\bone\s+of(?:\s+the\s+following)?(?:\s+[\w-]+)?\s*:?|"
    r"\b(?:answer|respond|reply|output|return)(?:\s+(?:with|only))?"
    r"(?:\s+(?:either|only|exactly))?(?:\s+one\s+of)?\s*:?)\s*"
    r"(?P<list>"
    + _LIST_ITEM
    + r"(?:\s*,\s*(?:or\s+|and\s+)?"
    + _LIST_ITEM
    + r"|\s*,?\s+(?:or|and)\s+"
    + _LIST_ITEM
    + r")+)",
    re.IGNORECASE,
)
_BULLET = re.compile(
    r'^[ \t]*(?:[-*\u2022]|\d+[.)])[ \t]+"?(?P<item>[\w-]+)"?[ \t]*'
    r"(?:(?:[:(\u2013\u2014]|\s-\s).*)?$",
    re.MULTILINE,
)


def prompt_field(text: str) -> str | None:
    """The field a prompt asks for, read from its instructions (rule sentences
    removed), lowercased: the first word found by these phrases, in order, that is
    not one of :data:`NON_FIELD_WORDS` (the object of the task, ``message``,
    ``following``...):

    * ``<verb> the <field>`` with a verb of :data:`TASK_VERBS` (``classify``,
      ``categorize``, ``route``, ``triage``, ``detect``...; a possessive is skipped);
    * ``to the right|correct|appropriate|proper|relevant <field>``;
    * ``which <field>`` and ``what is the <field>``;
    * ``is this|the|it ... <field>?`` (at most three words in between).

    ``None`` when there is none.

    >>> prompt_field("Classify the urgency of the ticket."), prompt_field("Hi")
    ('urgency', None)
    >>> prompt_field("Name the customer's feeling in one word.")
    'feeling'
    >>> prompt_field("Route the ticket to the right team.")
    'team'
    >>> prompt_field("Which language is the text in?")
    'language'
    >>> prompt_field("Is this message spam?")
    'spam'
    >>> prompt_field("Classify the following message.") is None
    True
    """
    text = RULE_PATTERN.sub(" ", text)
    found: list[tuple[int, str]] = []
    for pattern in _FIELD_PHRASES:
        for match in pattern.finditer(text):
            word = match["field"].lower()
            if word not in NON_FIELD_WORDS and word not in STOPWORDS:
                found.append((match.start("field"), word))
                break
        if found:
            return found[0][1]
    return None


def _list_words(text: str) -> tuple[str, ...]:
    return tuple(
        item.strip('"').strip()
        for item in re.findall(_LIST_ITEM, text)
        if item.strip('"').casefold() not in ("or", "and")
    )


def listed_labels(text: str) -> tuple[str, ...]:
    """The labels a prompt lists (rule sentences removed), in the order given; the
    first form found wins:

    * after a colon, ``: a, b or c`` (``: high or low``);
    * after ``Categories:``, ``Labels:``, ``Classes:``, ``Options:``, ``Choices:``,
      ``one of`` (``one of the following:``) or ``Answer``/``Respond``/``Reply``/
      ``Output``/``Return`` (``with``, ``only``, ``either``), a list of at least two
      items separated by commas, ``or`` or ``and`` (``a, b, c``, ``yes or no``);
    * a bullet list (``-``, ``*``, ``•``, ``1.``) of at least two lines, each one
      label, optionally followed by ``:``, `` - `` or ``(`` and a description.

    Items are words (``-`` kept) or double-quoted texts; ``()`` when the prompt lists
    none.

    >>> listed_labels("Classify the urgency: low, medium or high.")
    ('low', 'medium', 'high')
    >>> listed_labels('Answer with one word: "yes" or "no"'), listed_labels("Hi.")
    (('yes', 'no'), ())
    >>> listed_labels("Categories: billing, technical, account")
    ('billing', 'technical', 'account')
    >>> listed_labels("Is this spam? Answer yes or no.")
    ('yes', 'no')
    >>> listed_labels("Pick a team:\\n- billing: payments\\n- technical\\n- account")
    ('billing', 'technical', 'account')
    """
    text = RULE_PATTERN.sub(" ", text)
    match = _LABEL_LIST.search(text)
    if match is not None:
        return _list_words(match["list"])
    match = _LABEL_INTRO.search(text)
    if match is not None:
        words = _list_words(match["list"])
        if len(words) >= 2:
            return words
    lines = text.splitlines()
    run: list[str] = []
    for line in lines:
        bullet = _BULLET.match(line)
        if bullet is not None:
            run.append(bullet["item"])
            continue
        if len(run) >= 2:
            break
        run = []
    return tuple(run) if len(run) >= 2 else ()


def task_default(labels: Sequence[str]) -> str:
    """The label a task answers when no rule matches: :data:`DEFAULT_LABEL`
    (``neutral``) when it is one of ``labels`` or when no label set is known, else the
    first label.

    >>> task_default(["low", "medium", "high"]), task_default(["positive", "neutral"])
    ('low', 'neutral')
    >>> task_default([])
    'neutral'
    """
    if not labels or DEFAULT_LABEL in labels:
        return DEFAULT_LABEL
    return str(labels[0])


def user_content(request: SimRequest) -> str:
    """The text of all ``user`` messages with every rule sentence removed.

    >>> text = 'If the message mentions "x", the k is v. Hi'
    >>> user_content(SimRequest.from_messages([{"role": "user", "content": text}]))
    ' Hi'
    """
    return "\n".join(
        RULE_PATTERN.sub("", m.text) for m in request.messages if m.role == "user"
    )


def _norm(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def _resolve(schema: Any, root: Mapping[str, Any], depth: int = 0) -> dict[str, Any]:
    """Follow ``$ref`` (local JSON pointers) and pick the first ``anyOf``/``oneOf``/
    ``allOf`` option until a concrete schema is reached."""
    if not isinstance(schema, Mapping) or depth > 32:
        return {}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        target: Any = root
        for part in ref.lstrip("#").strip("/").split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, Mapping) else None
        return _resolve(target, root, depth + 1)
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options and "type" not in schema:
            return _resolve(options[0], root, depth + 1)
    return dict(schema)


def _find_property(
    schema: Mapping[str, Any], name: str, root: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The (resolved) schema of the first property named like ``name``, searching
    nested objects breadth-first."""
    root = schema if root is None else root
    queue = [_resolve(schema, root)]
    seen = 0
    while queue and seen < 256:
        node = queue.pop(0)
        seen += 1
        props = node.get("properties")
        if not isinstance(props, Mapping):
            continue
        for key, sub in props.items():
            if _norm(key) == _norm(name):
                return _resolve(sub, root)
        queue.extend(_resolve(sub, root) for sub in props.values())
    return None


def schema_instance(
    schema: Mapping[str, Any],
    label: str,
    values: Mapping[str, Any] | None = None,
    root: Mapping[str, Any] | None = None,
) -> Any:
    """A JSON instance valid for ``schema``, filled with ``label`` where text goes.

    Objects get all their properties, in schema order; a property whose name matches
    a key of ``values`` (case- and separator-insensitively) gets that value; ``enum``
    gives the label when it is one of the values, else the first value; ``const`` its
    value;
    ``string`` the label; ``integer``/``number`` 0; ``boolean`` false; ``array`` ``[]``
    (or ``minItems`` items); ``null`` null. ``$ref``/``$defs`` are resolved and
    ``anyOf``/``oneOf``/``allOf`` take their first option.

    >>> schema_instance({"type": "object", "properties": {
    ...     "why": {"type": "string"}, "ok": {"type": "boolean"},
    ...     "mood": {"enum": ["happy", "sad"]}}}, "sad")
    {'why': 'sad', 'ok': False, 'mood': 'sad'}
    """
    root = schema if root is None else root
    values = {_norm(k): v for k, v in (values or {}).items()}
    return _instance(schema, label, values, root, None, 0)


def _instance(
    schema: Any,
    label: str,
    values: Mapping[str, Any],
    root: Mapping[str, Any],
    name: str | None,
    depth: int,
) -> Any:
    node = _resolve(schema, root)
    text: Any = label
    if name is not None and _norm(name) in values:
        text = values[_norm(name)]
        if not isinstance(text, str):
            return text
    if "const" in node:
        return node["const"]
    enum = node.get("enum")
    if isinstance(enum, list) and enum:
        return text if text in enum else enum[0]
    kind = node.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), kind[0] if kind else None)
    if kind is None and isinstance(node.get("properties"), Mapping):
        kind = "object"
    if kind == "object":
        props = node.get("properties")
        if not isinstance(props, Mapping) or depth > 16:
            return {}
        return {
            key: _instance(sub, label, values, root, key, depth + 1)
            for key, sub in props.items()
        }
    if kind == "array":
        count = node.get("minItems", 0)
        count = count if isinstance(count, int) and 0 < count <= 16 else 0
        item = node.get("items", {})
        return [_instance(item, label, values, root, None, depth + 1)] * count
    if kind == "integer" or kind == "number":
        return 0
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return text


def render_content(answer: Answer, response_format: Mapping[str, Any] | None) -> str:
    """The message content for ``answer`` under ``response_format``.

    >>> a = Answer("negative", field="sentiment")
    >>> render_content(a, None)
    'negative'
    >>> render_content(a, {"type": "json_object"})
    '{"sentiment": "negative"}'
    >>> render_content(a, {"type": "json_schema", "json_schema": {"name": "x",
    ...     "schema": {"type": "object", "properties": {
    ...         "sentiment": {"enum": ["positive", "negative"]},
    ...         "score": {"type": "number"}}}}})
    '{"sentiment": "negative", "score": 0}'
    """
    kind = response_format.get("type") if response_format else None
    values = dict(answer.values)
    if answer.field is not None:
        values.setdefault(answer.field, answer.label)
    if kind == "json_object":
        obj = values or {"answer": answer.label}
        return json.dumps(obj, ensure_ascii=False)
    if kind == "json_schema":
        spec = (response_format or {}).get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        instance = schema_instance(
            schema if isinstance(schema, Mapping) else {}, answer.label, values
        )
        return json.dumps(instance, ensure_ascii=False)
    return answer.label


def instructions_text(messages: Sequence[Message]) -> str:
    """The instructions of a conversation: its non-``user`` messages (system,
    developer, assistant), or, when it has none, its ``user`` messages."""
    texts = [m.text for m in messages if m.role != "user"]
    return "\n".join(texts or [m.text for m in messages])


def task_labels(field_name: str | None, request: SimRequest) -> tuple[str, ...]:
    """The label set of the task: the ``enum`` of ``field_name``'s property in the
    request's JSON schema, else the labels listed in the instructions (see
    :func:`listed_labels`), else ``()``."""
    schema = request.json_schema
    if schema and field_name is not None:
        prop = _find_property(schema, field_name)
        enum = prop.get("enum") if prop else None
        if isinstance(enum, list) and enum:
            return tuple(str(v) for v in enum)
    return listed_labels(instructions_text(request.messages))


def _default_label(field_name: str | None, request: SimRequest) -> str:
    return task_default(task_labels(field_name, request))


def _schema_field(request: SimRequest) -> str | None:
    """The first property of the request's JSON schema that has an ``enum``."""
    schema = request.json_schema
    if not schema:
        return None
    props = _resolve(schema, schema).get("properties")
    if not isinstance(props, Mapping):
        return None
    for key, sub in props.items():
        if isinstance(_resolve(sub, schema).get("enum"), list):
            return str(key)
    return None


def task_responder(request: SimRequest) -> Answer | None:
    """Answer a task prompt (see the module docstring): the label of the first rule
    that matches the user content, else the task's default label (see
    :func:`task_default`: ``neutral`` when it is a label or no label set is known,
    else the first label of the field's schema ``enum`` or of the labels the
    instructions list). A prompt without rules is answered only when it names a
    label set (then with its default label, under the field of its schema or its
    instructions); ``None`` otherwise.

    >>> req = SimRequest.from_messages([
    ...     {"role": "system", "content":
    ...      'If the message mentions "late", the topic is shipping. '
    ...      'If the message mentions "charged", the topic is billing.'},
    ...     {"role": "user", "content": "Charged twice and it came late."}])
    >>> task_responder(req)
    Answer(label='shipping', field='topic', values={}, responder='task')
    >>> task_responder(SimRequest.from_messages([
    ...     {"role": "system", "content": "Rate the urgency: low, medium or high."},
    ...     {"role": "user", "content": "The lift is down."}])).label
    'low'
    """
    rules = [rule for m in request.messages for rule in find_rules(m.text)]
    if not rules:
        instructions = instructions_text(request.messages)
        field_name = _schema_field(request) or prompt_field(instructions)
        labels = task_labels(field_name, request)
        if not labels:
            return None
        return Answer(task_default(labels), field=field_name, responder="task")
    text = user_content(request)
    for rule in rules:
        if rule.matches(text):
            return Answer(rule.label, field=rule.field, responder="task")
    field_name = rules[0].field
    return Answer(
        _default_label(field_name, request), field=field_name, responder="task"
    )


def fallback_responder(request: SimRequest) -> Answer:
    """Always answers :data:`DEFAULT_LABEL` (``neutral``), with no field.

    >>> fallback_responder(SimRequest(messages=()))
    Answer(label='neutral', field=None, values={}, responder='fallback')
    """
    return Answer(DEFAULT_LABEL, responder="fallback")


# -- afnio's own prompts: the judge and the two backward calls ------------------------

JUDGE_SCHEMA_NAME = "afnio_judgement"
"""The ``json_schema`` name of an LM judge call (``afnio.autodiff.prompts``)."""

GRADIENTS_SCHEMA_NAME = "afnio_gradients"
"""The ``json_schema`` name of every backward call (``afnio.autodiff.prompts``)."""

DEFAULT_FIELD = "sentiment"
"""The field a feedback rule names when the conversation holds no rule."""

FEEDBACK_EXCERPT_CHARS = 200
"""How much of the feedback a no-target gradient quotes."""

# An opening tag's attributes: quoted values may hold ``>``; a stray quote falls back
# to "anything up to the next ``>``".
_ATTRS = r"""(?P<attrs>(?:"[^"]*"|[^>"])*|[^>]*)>"""
_ATTR = re.compile(r"""([\w:.-]+)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""")
_TARGET_IN_FEEDBACK = re.compile(
    r'expected (?:value|[a-z_][\w ]{0,30}?)(?: is|:)? "([^"]+)"', re.IGNORECASE
)


def _opening(tag: str) -> str:
    return rf"<{tag}(?=[\s>/])"


def _has_tag(text: str, tag: str) -> bool:
    """Whether ``text`` holds the opening tag ``<tag ...>`` (any attributes)."""
    return re.search(_opening(tag) + _ATTRS, text) is not None


@dataclass(frozen=True)
class Element:
    """One ``<TAG attr="...">text</TAG>`` element found in a prompt.

    >>> Element.first("TARGET", 'x <TARGET kind="label">\\n yes \\n</TARGET>')
    Element(attrs={'kind': 'label'}, text='\\n yes \\n', end=39)
    """

    attrs: Mapping[str, str]
    text: str
    end: int

    @staticmethod
    def _pattern(tag: str, innermost: bool) -> re.Pattern[str]:
        body = (
            rf"(?:(?!{_opening(tag)}).)*?" if innermost else r".*?"
        )  # innermost: the text holds no other opening of the same tag
        return re.compile(
            _opening(tag) + _ATTRS + rf"(?P<text>{body})</{tag}\s*>", re.DOTALL
        )

    @classmethod
    def _make(cls, match: re.Match[str]) -> Element:
        attrs: dict[str, str] = {}
        for m in _ATTR.finditer(match["attrs"] or ""):
            value = next((v for v in m.groups()[1:] if v is not None), "")
            attrs.setdefault(m[1], value)
        return cls(attrs, match["text"], match.end())

    @classmethod
    def first(
        cls, tag: str, text: str, start: int = 0, *, innermost: bool = False
    ) -> Element | None:
        """The first ``tag`` element of ``text`` at or after ``start``, or ``None``.
        With ``innermost``, an opening followed by another opening of the same tag
        before its closing is skipped (so a prose mention such as ``"compare the
        <TARGET> ..."`` does not swallow the real element)."""
        match = cls._pattern(tag, innermost).search(text, start)
        return None if match is None else cls._make(match)

    @classmethod
    def all(cls, tag: str, text: str) -> list[Element]:
        """Every ``tag`` element of ``text``, in order (the text of each runs to the
        first closing tag)."""
        return [cls._make(m) for m in cls._pattern(tag, False).finditer(text)]

    def attr(self, name: str, default: str = "") -> str:
        """The value of attribute ``name`` (stripped), or ``default``."""
        return self.attrs.get(name, default).strip() or default


@dataclass(frozen=True)
class PromptVariable:
    """One ``<VARIABLE index role location trainable>text</VARIABLE>`` element."""

    index: str
    role: str
    location: str
    trainable: bool
    text: str


def _variables(text: str, start: int = 0) -> list[PromptVariable]:
    """The ``<VARIABLE>`` elements inside the first ``<VARIABLES ...>`` block at or
    after ``start`` (the block runs to the last ``</VARIABLES>``); the ``count``
    attribute is ignored: the parsed elements decide."""
    opening = re.compile(_opening("VARIABLES") + _ATTRS).search(text, start)
    if opening is None:
        return []
    close = text.rfind("</VARIABLES")
    block = text[opening.end() : close if close >= opening.end() else len(text)]
    return [
        PromptVariable(
            index=el.attr("index"),
            role=" ".join(el.attr("role", "variable").split()),
            location=el.attr("location"),
            trainable=el.attr("trainable").casefold() == "true",
            text=el.text,
        )
        for el in Element.all("VARIABLE", block)
    ]


def _marked_user_text(request: SimRequest, tags: Sequence[str]) -> str | None:
    """The first ``user`` message holding an opening of every tag of ``tags``."""
    for message in request.messages:
        if message.role == "user" and all(_has_tag(message.text, t) for t in tags):
            return message.text
    return None


_NOT_NEGATED = (
    r"(?<!\bnot )(?<!\bnever )(?<!\bno )(?<!n't )(?<!n\u2019t )(?<!\bless than )"
)
"""Lookbehinds: the word is not right after a negator (see :func:`salient_word`)."""


_DOTTED_I = {0x130: "i", 0x131: "i"}
"""The two characters that ``re.IGNORECASE`` matches with ``i`` and whose casefold is
not ``i`` (every other character matching a lexicon letter casefolds to it)."""


def salient_word(text: str) -> str | None:
    """The first word of :data:`SALIENCE_LEXICON` (alphabetical order) that occurs in
    ``text`` as a whole word, case-insensitively; a hyphen joined to letters counts
    as part of the word (``top-notch`` matches ``Top-Notch``, ``great`` does not
    match ``great-grandson``). An occurrence right after a negator (``not``,
    ``never``, ``no``, ``...n't``, ``less than``) does not count: a negated word does
    not carry its sentiment.

    >>> salient_word("Frustrated and upset"), salient_word("a TOP-NOTCH job")
    ('frustrated', 'top-notch')
    >>> salient_word("top notch"), salient_word("great-grandson")
    (None, None)
    >>> salient_word("I'm not impressed: unacceptable"), salient_word("not only great")
    ('unacceptable', 'great')
    """
    folded = text.translate(_DOTTED_I).casefold()
    for word in sorted(SALIENCE_LEXICON):
        if word not in folded:  # a cheap necessary condition (the regexes are slow)
            continue
        word_pattern = rf"(?<![\w])(?<!\w-){re.escape(word)}(?![\w])(?!-\w)"
        pattern = _NOT_NEGATED + word_pattern
        if re.search(pattern, text, re.IGNORECASE):
            return word
    return None


def _json_answer(obj: Mapping[str, Any], responder: str) -> Answer:
    """An answer whose plain text is ``obj`` as JSON and whose JSON properties are
    the items of ``obj`` (so every ``response_format`` renders the same object)."""
    return Answer(
        json.dumps(obj, ensure_ascii=False), values=dict(obj), responder=responder
    )


def _gradients_answer(gradients: Sequence[str], responder: str) -> Answer:
    return _json_answer({"gradients": list(gradients)}, responder)


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def _json_value(text: str) -> tuple[bool, Any]:
    """``(True, value)`` when ``text`` is JSON (``NaN``/``Infinity`` are not)."""
    try:
        return True, json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return False, None


def _folded(value: Any) -> Any:
    """A JSON value with strings (and keys) casefolded and types kept apart (so
    ``true`` never equals ``1``, while ``1`` equals ``1.0``)."""
    if isinstance(value, str):
        return ("str", value.casefold())
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("num", value)
    if isinstance(value, list):
        return ("list", tuple(_folded(v) for v in value))
    if isinstance(value, dict):
        return ("obj", frozenset((k.casefold(), _folded(v)) for k, v in value.items()))
    return ("null", None)


def judgement_matches(prediction: str, target: str) -> bool:
    """How the judge compares: when both texts are JSON, their parsed values (strings
    casefolded, ``true`` is not ``1``); otherwise the texts after strip + casefold.

    >>> judgement_matches(" Positive ", "positive"), judgement_matches("1.0", "1")
    (True, True)
    >>> judgement_matches('{"a": [1, "X"]}', '{ "a":[1,"x"] }')
    True
    >>> judgement_matches("true", "1"), judgement_matches("cat", "dog")
    (False, False)
    """
    p, t = prediction.strip(), target.strip()
    p_is_json, p_value = _json_value(p)
    t_is_json, t_value = _json_value(t)
    if p_is_json and t_is_json:
        return _folded(p_value) == _folded(t_value)
    return p.casefold() == t.casefold()


def judge_responder(request: SimRequest) -> Answer | None:
    """Answer an LM-as-judge call.

    Marker: ``response_format`` is ``json_schema`` named ``afnio_judgement``
    (:data:`JUDGE_SCHEMA_NAME`). The prediction and the target are the texts of the
    first ``<PREDICTION ...>...</PREDICTION>`` and ``<TARGET ...>...</TARGET>``
    elements of the messages (searched message by message, in order; a convention of
    the simulator, followed by afnio's judge prompts), stripped.

    Answer: ``{"score": true|false, "explanation": "..."}`` where ``score`` tells
    whether they match (see :func:`judgement_matches`) and the explanation is
    ``The prediction "<p>" matches the target "<t>".`` or ``The prediction "<p>" does
    not match the target "<t>".``; without either element, ``score`` is false and the
    explanation is ``No <PREDICTION> and <TARGET> to compare.``

    >>> fmt = {"type": "json_schema", "json_schema": {"name": "afnio_judgement"}}
    >>> req = SimRequest.from_messages([{"role": "user", "content":
    ...     "<PREDICTION>Paris</PREDICTION><TARGET> paris </TARGET>"}],
    ...     response_format=fmt)
    >>> verdict = judge_responder(req).values
    >>> verdict["score"], verdict["explanation"]
    (True, 'The prediction "Paris" matches the target "paris".')
    """
    fmt = request.response_format
    if not fmt or fmt.get("type") != "json_schema":
        return None
    spec = fmt.get("json_schema")
    if not isinstance(spec, Mapping) or spec.get("name") != JUDGE_SCHEMA_NAME:
        return None
    found: dict[str, str] = {}
    for tag in ("PREDICTION", "TARGET"):
        for message in request.messages:
            element = Element.first(tag, message.text, innermost=True)
            if element is not None:
                found[tag] = element.text.strip()
                break
    if len(found) < 2:
        verdict = {
            "score": False,
            "explanation": "No <PREDICTION> and <TARGET> to compare.",
        }
        return _json_answer(verdict, "judge")
    p, t = found["PREDICTION"], found["TARGET"]
    score = judgement_matches(p, t)
    relation = "matches" if score else "does not match"
    explanation = f'The prediction "{p}" {relation} the target "{t}".'
    return _json_answer({"score": score, "explanation": explanation}, "judge")


@dataclass(frozen=True)
class ChatBackwardPrompt:
    """What the chat-backward responder reads from ``CHAT_BACKWARD_USER``."""

    messages: tuple[Message, ...]
    feedback: str
    variables: tuple[PromptVariable, ...]
    output: str = ""

    @classmethod
    def parse(cls, text: str) -> ChatBackwardPrompt:
        """Parse the ``<MESSAGE role>`` elements of ``<LM_CONVERSATION>``, the
        ``<LM_OUTPUT>`` (the prediction the call made) and ``<FEEDBACK_ON_OUTPUT>``
        after it and the ``<VARIABLE>`` elements of the ``<VARIABLES>`` block after
        that."""
        conversation = Element.first("LM_CONVERSATION", text)
        messages = tuple(
            Message(el.attr("role"), el.text)
            for el in Element.all("MESSAGE", conversation.text if conversation else "")
        )
        position = conversation.end if conversation else 0
        output = Element.first("LM_OUTPUT", text, position)
        feedback = Element.first("FEEDBACK_ON_OUTPUT", text, position)
        if feedback is not None:
            position = feedback.end
        return cls(
            messages=messages,
            feedback=feedback.text if feedback else "",
            variables=tuple(_variables(text, position)),
            output=output.text.strip() if output else "",
        )


FREE_TEXT_FIELDS: frozenset[str] = frozenset(
    """analysis comment comments description explanation justification note notes
    rationale reason reasoning summary thought thoughts""".split()  # noqa: SIM905
)
"""JSON properties that hold free text (an explanation, a summary), never the label
of a task: :func:`output_field` passes over them."""

GENERIC_FIELD = "label"
"""The field a rule names when the prompt lists labels but names no field (no rule,
no JSON output field, no task phrase): a neutral name, so that the rules are
``begins with`` rules, as for any labelled task (see :func:`rule_word`)."""


def output_field(output: str) -> str | None:
    """The field a prediction shown to the backward reveals: when ``output`` is a
    JSON object (a structured output, ``{"priority": "low"}``), its first property
    whose value is a string, a number or a boolean and whose name is not one of
    :data:`FREE_TEXT_FIELDS`; else ``None``.

    >>> output_field('{"summary": "The VPN is down", "priority": "low"}')
    'priority'
    >>> output_field("low") is None, output_field('{"reason": "x"}') is None
    (True, True)
    """
    is_json, value = _json_value(output.strip())
    if not is_json or not isinstance(value, dict):
        return None
    for key, item in value.items():
        if _norm(key) in FREE_TEXT_FIELDS or item is None:
            continue
        if isinstance(item, str | bool | int | float):
            return str(key)
    return None


def shown_enum(text: str, field: str) -> tuple[str, ...]:
    """The ``enum`` of the property ``field`` in a JSON schema shown in ``text`` (a
    schema a prompt or a conversation quotes), else ``()``.

    >>> shown_enum('{"properties": {"priority": {"enum": ["low", "high"]}}}',
    ...     "priority")
    ('low', 'high')
    """
    pattern = r'"' + re.escape(field) + r'"\s*:\s*\{[^{}]*?"enum"\s*:\s*(\[[^\]]*\])'
    match = re.search(pattern, text)
    if match is None:
        return ()
    is_json, values = _json_value(match[1])
    if not is_json or not isinstance(values, list):
        return ()
    return tuple(str(v) for v in values)


def relay_value(rules: Sequence[Rule], field: str, target: str) -> str | None:
    """The value an input of a call should have held for the call to answer
    ``target`` for ``field``: the word of the first rule of ``rules`` that names
    ``field`` (case- and separator-insensitively) with the label ``target`` (any case)
    and that is also the first rule matching a text holding that word alone (so an
    earlier rule cannot take over); ``None`` when no rule qualifies.

    >>> rules = find_rules(
    ...     'If the message mentions "unhappy", the sentiment is negative. '
    ...     'If the message mentions "happy", the sentiment is positive. '
    ...     'If the message mentions "pleased", the mood is positive.')
    >>> relay_value(rules, "sentiment", "Positive"), relay_value(rules, "mood", "x")
    ('happy', None)
    >>> shadowed = find_rules('If the message mentions "late", the tone is upset. '
    ...     'If the message mentions "late", the tone is calm.')
    >>> relay_value(shadowed, "tone", "calm") is None
    True
    """
    wanted = target.strip().casefold()
    for rule in rules:
        if _norm(rule.field) != _norm(field) or rule.label.casefold() != wanted:
            continue
        first = next((r for r in rules if r.matches(rule.word)), None)
        if first is not None and first.label.casefold() == wanted:
            return rule.word
    return None


def _is_computed_input(variable: PromptVariable) -> bool:
    """A variable the call reads as input and that an upstream step computed: not
    trainable (not a leaf being optimized) and placed in a ``user`` (LangChain:
    ``human``) message or an input (``input:<key>``), where the rules look for their
    words."""
    location = variable.location.casefold()
    return not variable.trainable and (
        location in ("user", "human") or location.startswith("input:")
    )


def chat_backward_gradients(prompt: ChatBackwardPrompt) -> list[str]:
    """The gradients the simulator writes for a ChatCompletion backward prompt (see
    :func:`chat_backward_responder`).

    Two stages: the second call maps feelings to sentiments; its input (the first
    call's output) should have held the feeling that leads to the target, and the
    first call's backward turns that into a rule for its own prompt.

    >>> second = ChatBackwardPrompt(
    ...     messages=(Message("system",
    ...         'If the message mentions "unhappy", the sentiment is negative.'),
    ...               Message("user", "neutral")),
    ...     feedback='The prediction "neutral" is wrong: the expected value is '
    ...              '"negative".',
    ...     variables=(PromptVariable("1", "second prompt", "system", True, "..."),
    ...                PromptVariable("2", "feeling", "input:feeling", False,
    ...                               "neutral")))
    >>> relay = chat_backward_gradients(second)
    >>> relay  # doctest: +NORMALIZE_WHITESPACE
    ['The second prompt should lead to "negative" for inputs like this one. No rule
     can be written: the input holds no evaluative word (SALIENCE_LEXICON) that the
     rule for the sentiment could name.',
     'The feeling should contain "unhappy": the expected value is "unhappy", since
     the rule for "unhappy" gives the sentiment "negative".']
    >>> first = ChatBackwardPrompt(
    ...     messages=(Message("system",
    ...         'If the message mentions "furious", the feeling is unhappy.'),
    ...               Message("user", "I am frustrated: the lift is broken.")),
    ...     feedback=relay[1],
    ...     variables=(PromptVariable("1", "first prompt", "system", True, "..."),))
    >>> chat_backward_gradients(first)
    ['If the message mentions "frustrated", the feeling is unhappy.']
    """
    feedback = prompt.feedback.strip()
    if not feedback:
        return ["" for _ in prompt.variables]
    tools = expected_tools(feedback)
    if tools is not None:  # tool routing (see the "Tool calling" section)
        shown = shown_tools(prompt, tools)
        if shown.accepts(tools):
            return tool_backward_gradients(prompt, tools, shown)
    confirmed = confirmed_tools(feedback)
    if confirmed is not None:  # a right tool call: confirm the rule that made it
        shown = shown_tools(prompt, confirmed)
        if shown.accepts(confirmed):
            return tool_confirmation_gradients(prompt, confirmed, shown)
    found = _TARGET_IN_FEEDBACK.search(feedback)
    target = found[1] if found else None
    conversation = "\n".join(m.text for m in prompt.messages)
    rules = find_rules(conversation)
    instructions = instructions_text(prompt.messages)
    from_output = output_field(prompt.output)
    named = rules[0].field if rules else (from_output or prompt_field(instructions))
    labels = listed_labels(instructions)
    if not labels and named is not None:
        labels = shown_enum(conversation, named)
    field_name = named or (GENERIC_FIELD if labels else DEFAULT_FIELD)
    text = "\n".join(
        RULE_PATTERN.sub("", m.text) for m in prompt.messages if m.role == "user"
    )
    dspy_prompt = DSPyPrompt.parse(prompt.messages)
    label_field: DSPyField | None = None
    if dspy_prompt is not None:  # the rule names a field this predictor outputs
        label_field = dspy_prompt.label_field()
        named = label_field.name if label_field else None
        field_name = named or DEFAULT_FIELD
        labels = tuple(str(c) for c in label_field.choices) if label_field else ()
        text = dspy_prompt.input_text
        rules = [  # a predictor answers a field by the rules naming that field
            rule
            for rule in find_rules(dspy_prompt.instructions)
            if _norm(rule.field) == _norm(field_name)
        ]
    choice = rule_word(text, field_name, target)
    # An input computed upstream should have held the value this call's own rules
    # map to the target: naming it as *its* expected value lets the upstream call's
    # backward write the rule that produces it (credit assignment across stages).
    default = target is not None and target.strip().casefold() == DEFAULT_LABEL
    relayed = (
        None if target is None or default else relay_value(rules, field_name, target)
    )
    notes = []
    if named is None:
        notes.append(
            f"The prompt names no field (no rule, no JSON object in the output, no "
            f'"classify the <field>" phrase), so the rule names the {field_name}.'
        )
    if dspy_prompt is not None and label_field is not None and not labels:
        if label_field.type in _DSPY_CONSTANTS:
            notes.append(
                f"The {field_name} is a {label_field.type} output field, so inputs "
                f"that no rule matches get {_dspy_default(label_field)!r}."
            )
        elif not is_affect_field(field_name) and not rules:
            notes.append(
                f"The signature lists no labels for the {field_name} (no Literal "
                f'type), so inputs that no rule matches get "{DEFAULT_LABEL}".'
            )
    elif not labels and not is_affect_field(field_name) and not rules:
        notes.append(
            f"The prompt lists no labels for the {field_name} (no list in the "
            f"instructions, no schema enum in the conversation), so inputs that no "
            f"rule matches get the first value of the response schema's enum for "
            f'the {field_name} when the request has one, else "{DEFAULT_LABEL}".'
        )
    excerpt = feedback[:FEEDBACK_EXCERPT_CHARS].strip()
    gradients = []
    rule_given = False
    for variable in prompt.variables:
        role = variable.role
        if not rule_given and variable.trainable and variable.location == "system":
            rule_given = True
            if target is not None and choice.word is not None:
                gradient = rule_sentence(choice.kind, choice.word, field_name, target)
            elif target is not None:
                gradient = (
                    f'The {role} should lead to "{target}" for inputs like this one.'
                    f" No rule can be written: {choice.reason}"
                )
            else:
                gradient = f"The {role} should address this feedback: {excerpt}"
            gradients.append(" ".join([gradient, *notes]))
        elif relayed is not None and _is_computed_input(variable):
            gradients.append(
                f'The {role} should contain "{relayed}": the expected value is '
                f'"{relayed}", since the rule for "{relayed}" gives the {field_name} '
                f'"{target}".'
            )
        elif target is not None:
            gradients.append(f'The {role} should lead to "{target}" for this input.')
        else:
            gradients.append(f"The {role} should address this feedback: {excerpt}")
    return gradients


@dataclass(frozen=True)
class RuleWord:
    """The word (and kind) of the rule a chat backward writes for one failed sample,
    or, when none can be written, why (``word`` is ``None``)."""

    word: str | None
    kind: str
    reason: str = ""


def rule_word(text: str, field: str | None, target: str | None = None) -> RuleWord:
    """The word of the rule written for a failed sample whose input is ``text``,
    for the task's ``field``. The choice never depends on the target label, except
    that an affect field writes no rule for the default label:

    * an affect field (:func:`is_affect_field`: ``sentiment``, ``feeling``...): a
      ``mentions`` rule for :func:`salient_word` (the alphabetically first
      evaluative word of :data:`SALIENCE_LEXICON`, not negated); no rule when the
      input holds none, nor when the target is the default label ``neutral`` (the
      absence of evaluation: no word is evidence for it);
    * any other field: a ``begins with`` rule for the input's :func:`lead_word` (for
      every label, the default included: what a text is, an "Inquiry" or an
      "Urgent" request, is evidence for any label); no rule when the input holds no
      content word.

    >>> rule_word("Subject: Urgent repair needed", "urgency")
    RuleWord(word='urgent', kind='begins with', reason='')
    >>> rule_word("I am frustrated", "sentiment", "negative").word
    'frustrated'
    >>> print(rule_word("Hello there!", "urgency").reason)
    the input holds no content word (every word is a stopword or negated).
    """
    if is_affect_field(field):
        if target is not None and target.strip().casefold() == DEFAULT_LABEL:
            return RuleWord(
                None,
                "mentions",
                f'"{DEFAULT_LABEL}" is the default label (what the task answers when '
                "no rule matches), so no word is evidence for it.",
            )
        word = salient_word(text)
        if word is None:
            return RuleWord(
                None,
                "mentions",
                f"the input holds no evaluative word (SALIENCE_LEXICON) that the "
                f"rule for the {field or DEFAULT_FIELD} could name.",
            )
        return RuleWord(word, "mentions")
    word = lead_word(text)
    if word is None:
        return RuleWord(
            None,
            "begins with",
            "the input holds no content word (every word is a stopword or negated).",
        )
    return RuleWord(word, "begins with")


def chat_backward_responder(request: SimRequest) -> Answer | None:
    """Answer a ChatCompletion backward call (afnio's ``CHAT_BACKWARD_USER``).

    Marker: a ``user`` message holding ``<LM_CONVERSATION>``, ``<FEEDBACK_ON_OUTPUT>``
    and ``<VARIABLES ...>`` (openings may carry attributes). From it are read:

    * the *target*: the first ``expected value is "<t>"`` (or ``expected value
      "<t>"``) in the feedback, as the evaluator-backward answer writes it; a metric's
      own feedback may name the field instead of ``value`` (``The expected sentiment
      is "<t>"``, ``Expected sentiment: "<t>"``), in any case;
    * the *input*: the ``user`` ``<MESSAGE>`` texts of the conversation, rule
      sentences removed;
    * the *field*: that of the first rule in the conversation, else ``sentiment``;
    * the *word*: see :func:`salient_word` (on the input); none when the target is
      the default label :data:`DEFAULT_LABEL` (no evidence to write a rule for).

    Answer: ``{"gradients": [...]}``, one string per ``<VARIABLE>`` element, in order
    (the ``count`` attribute is not trusted). The first variable with
    ``trainable="true"`` and ``location="system"`` gets the rule ``If the message
    mentions "<word>", the <field> is <target>.``; with a target but no word,
    ``The <role> should lead to "<target>" for inputs like this one.``. A computed
    input (``trainable="false"``, location ``user``, ``human`` or ``input:<key>``: what
    an upstream step produced) gets the relay ``The <role> should contain "<v>": the
    expected value is "<v>", since the rule for "<v>" gives the <field> "<target>".``
    when :func:`relay_value` finds ``v`` among the conversation's rules for the field
    (a DSPy predictor's: its instructions' rules naming the field) and the target is
    not the default label. Every other variable gets ``The <role> should lead to
    "<target>" for this input.``. Without a target, any variable gets ``The <role>
    should address this feedback: <the first 200 characters of the stripped
    feedback>``. An empty (or blank) feedback gives ``""`` for every variable.
    """
    text = _marked_user_text(
        request, ("LM_CONVERSATION", "FEEDBACK_ON_OUTPUT", "VARIABLES")
    )
    if text is None:
        return None
    prompt = ChatBackwardPrompt.parse(text)
    return _gradients_answer(chat_backward_gradients(prompt), "chat_backward")


SINGLE_CALL_VARIABLE_POINTER = (
    '(the whole content of <MESSAGE> {index} of <LM_CONVERSATION>, role "{role}")'
)
"""How a single-call backward prompt shows a variable whose text is the whole content
of a message of its conversation (``afnio.autodiff.prompts.VARIABLE_IN_MESSAGE``),
when that pointer is shorter than the text: the grouped responder rebuilds each
call's single-call prompt with it (see :class:`ChatBackwardGroupPrompt`)."""

_SHARED_POINTER = re.compile(
    r'\(the whole content of shared <MESSAGE> (?P<index>\d+), role "[^"]*"\)'
)
_VALUE_POINTER = re.compile(
    r"\(the whole content of this call's <MESSAGE> (?P<index>\d+), role \"[^\"]*\"\)"
)
_VALUE_ELEMENT = re.compile(
    r"\s*" + _opening("VALUE") + _ATTRS + r"(?P<text>.*?)</VALUE\s*>", re.DOTALL
)
_CALL_OPENING = re.compile(r"^" + _opening("LM_CALL") + _ATTRS, re.MULTILINE)


def _single_call_text(text: str, messages: Sequence[Message]) -> str:
    """``text`` as the single-call prompt shows a variable: the
    :data:`SINGLE_CALL_VARIABLE_POINTER` to the first non-blank message whose whole
    content it is, when that pointer is shorter; else ``text`` itself."""
    for index, message in enumerate(messages, start=1):
        if message.text.strip() and message.text == text:
            pointer = SINGLE_CALL_VARIABLE_POINTER.format(
                index=index, role=message.role
            )
            return pointer if len(pointer) < len(text) else text
    return text


@dataclass(frozen=True)
class ChatBackwardGroupPrompt:
    """What the grouped chat-backward responder reads from a grouped prompt
    (``CHAT_BACKWARD_GROUP_USER``): the shared messages (by index), the variables as
    listed once, and, per ``<LM_CALL>``, the single-call prompt it stands for."""

    shared: Mapping[str, Message]
    variables: tuple[PromptVariable, ...]
    calls: tuple[ChatBackwardPrompt, ...]

    @classmethod
    def parse(cls, text: str) -> ChatBackwardGroupPrompt:
        """Parse ``<SHARED_MESSAGES>`` (``<MESSAGE index role>`` elements), the
        ``<VARIABLE>`` elements of ``<VARIABLES>`` and each ``<LM_CALL>``: its
        ``<LM_CONVERSATION>`` (a ``<MESSAGE role shared="i">`` pointer stands for
        shared message ``i``), its ``<LM_OUTPUT>``, its ``<FEEDBACK_ON_OUTPUT>`` (both
        searched after the conversation, as in a single-call prompt) and the
        ``<VALUE variable="i">`` elements right after the feedback.

        The blocks are split where the template joins them (``</SHARED_MESSAGES>``
        then ``<VARIABLES``; ``</VARIABLES>`` then ``<LM_CALLS``), so a text inside a
        shared message or a variable is not read as markup.

        Each call's :class:`ChatBackwardPrompt` is the one its single-call prompt
        would parse to: its messages, its output (stripped), its feedback, and the
        variables with the call's ``<VALUE>`` texts; a pointer to a shared message
        (``(the whole content of shared <MESSAGE> i, ...)``) or to one of the call's
        messages (``(the whole content of this call's <MESSAGE> i, ...)``) is
        replaced by that message's content, which is then shown as the single-call
        prompt shows it (:data:`SINGLE_CALL_VARIABLE_POINTER` when it is the whole
        content of a message and the pointer is shorter).
        """
        shared_end = re.compile(
            r"</SHARED_MESSAGES>\s*" + _opening("VARIABLES") + _ATTRS
        ).search(text)
        shared_start = re.compile(_opening("SHARED_MESSAGES") + _ATTRS).search(text)
        shared: dict[str, Message] = {}
        if shared_end is not None:
            start = shared_start.end() if shared_start is not None else 0
            block = (
                text[start : shared_end.start()] if start <= shared_end.start() else ""
            )
            for element in Element.all("MESSAGE", block):
                shared.setdefault(
                    element.attr("index"), Message(element.attr("role"), element.text)
                )
        junction = re.compile(r"</VARIABLES>\s*" + _opening("LM_CALLS") + _ATTRS)
        split = junction.search(text, shared_end.start() if shared_end else 0)
        if split is not None:
            head = text[: split.start() + len("</VARIABLES>")]
            body = text[split.end() :]
        else:
            calls_at = re.compile(_opening("LM_CALLS") + _ATTRS).search(text)
            head = text
            body = text[calls_at.end() :] if calls_at is not None else ""
        variables = tuple(
            _variables(head, shared_end.start() if shared_end is not None else 0)
        )
        calls = []
        position = 0
        while (opening := _CALL_OPENING.search(body, position)) is not None:
            call, position = cls._call(body, opening.end(), shared, variables)
            calls.append(call)
        return cls(shared=shared, variables=variables, calls=tuple(calls))

    @staticmethod
    def _call(
        body: str,
        start: int,
        shared: Mapping[str, Message],
        variables: Sequence[PromptVariable],
    ) -> tuple[ChatBackwardPrompt, int]:
        """The single-call prompt of the ``<LM_CALL>`` whose opening ends at
        ``start``, and the position after it."""
        conversation = Element.first("LM_CONVERSATION", body, start)
        messages = []
        for element in Element.all(
            "MESSAGE", conversation.text if conversation else ""
        ):
            index = element.attrs.get("shared")
            if index is not None and index.strip() in shared:
                source = shared[index.strip()]
                messages.append(Message(element.attr("role", source.role), source.text))
            else:
                messages.append(Message(element.attr("role"), element.text))
        position = conversation.end if conversation else start
        output = Element.first("LM_OUTPUT", body, position)
        feedback = Element.first("FEEDBACK_ON_OUTPUT", body, position)
        if feedback is not None:
            position = feedback.end
        values: dict[str, str] = {}
        while (value := _VALUE_ELEMENT.match(body, position)) is not None:
            attrs = Element._make(value)
            values.setdefault(attrs.attr("variable"), attrs.text)
            position = value.end()
        shown = []
        for number, variable in enumerate(variables, start=1):
            key = variable.index or str(number)
            text = values.get(key, variable.text)
            pointer = _VALUE_POINTER.fullmatch(text.strip())
            if pointer is not None and 0 < int(pointer["index"]) <= len(messages):
                text = messages[int(pointer["index"]) - 1].text
            pointer = _SHARED_POINTER.fullmatch(text.strip())
            if pointer is not None and pointer["index"] in shared:
                text = shared[pointer["index"]].text
            text = _single_call_text(text, messages)
            shown.append(dataclasses.replace(variable, text=text))
        prompt = ChatBackwardPrompt(
            messages=tuple(messages),
            feedback=feedback.text if feedback else "",
            variables=tuple(shown),
            output=output.text.strip() if output else "",
        )
        return prompt, position


def chat_backward_group_gradients(prompt: ChatBackwardGroupPrompt) -> list[str]:
    """The gradients the simulator writes for a grouped ChatCompletion backward
    prompt (see :func:`chat_backward_group_responder`): for each call, in order,
    :func:`chat_backward_gradients` of the single-call prompt it stands for."""
    return [text for call in prompt.calls for text in chat_backward_gradients(call)]


def chat_backward_group_responder(request: SimRequest) -> Answer | None:
    """Answer a grouped ChatCompletion backward call (afnio's
    ``CHAT_BACKWARD_GROUP_USER``: the chat-backward requests of several samples that
    went through the same prompt template, in one call).

    Marker: a ``user`` message holding ``<LM_CALLS ...>``, ``<VARIABLES ...>`` and
    ``<FEEDBACK_ON_OUTPUT>`` in which at least one ``<LM_CALL>`` is found (else the
    next responder is asked). It is consulted before :func:`chat_backward_responder`,
    whose marker a grouped prompt also holds.

    Rule: each ``<LM_CALL>`` is answered exactly as :func:`chat_backward_responder`
    answers the single-call prompt that call stands for (see
    :meth:`ChatBackwardGroupPrompt.parse`): its conversation with every
    ``<MESSAGE role="r" shared="i"></MESSAGE>`` replaced by shared message ``i``, its
    ``<LM_OUTPUT>``, its ``<FEEDBACK_ON_OUTPUT>`` and the ``<VARIABLES>`` with the
    call's ``<VALUE variable="i">`` texts. Answer: ``{"gradients": [...]}``, the
    calls' gradients concatenated, call by call (the first call's variables in
    order, then the next call's). So every rule of the single call holds per call
    (rules, relays to computed inputs, tool routing, blank feedback), and a call's
    answer never depends on the other calls of its group.

    >>> shared = ('<MESSAGE index="1" role="system">If the message mentions "happy", '
    ...     'the mood is positive.</MESSAGE>')
    >>> def call(k, message, target):
    ...     return (f'<LM_CALL index="{k}">\\n<LM_CONVERSATION>\\n'
    ...         '<MESSAGE role="system" shared="1"></MESSAGE>\\n'
    ...         f'<MESSAGE role="user">{message}</MESSAGE>\\n</LM_CONVERSATION>\\n'
    ...         '<LM_OUTPUT role="assistant">neutral</LM_OUTPUT>\\n'
    ...         f'<FEEDBACK_ON_OUTPUT>The expected value is "{target}".'
    ...         '</FEEDBACK_ON_OUTPUT>\\n</LM_CALL>')
    >>> user = (f'<SHARED_MESSAGES count="1">\\n{shared}\\n</SHARED_MESSAGES>\\n'
    ...     '<VARIABLES count="1">\\n<VARIABLE index="1" role="prompt" '
    ...     'location="system" trainable="true">(the whole content of shared '
    ...     '<MESSAGE> 1, role "system")</VARIABLE>\\n</VARIABLES>\\n'
    ...     '<LM_CALLS count="2">\\n' + call(1, "Awful food", "negative") + "\\n"
    ...     + call(2, "I love it", "positive") + "\\n</LM_CALLS>")
    >>> request = SimRequest.from_messages([{"role": "user", "content": user}])
    >>> for gradient in json.loads(respond(request))["gradients"]:
    ...     print(gradient)
    If the message mentions "awful", the mood is negative.
    If the message mentions "love", the mood is positive.
    """
    text = _marked_user_text(request, ("LM_CALLS", "VARIABLES", "FEEDBACK_ON_OUTPUT"))
    if text is None:
        return None
    prompt = ChatBackwardGroupPrompt.parse(text)
    if not prompt.calls:
        return None
    return _gradients_answer(
        chat_backward_group_gradients(prompt), "chat_backward_group"
    )


@dataclass(frozen=True)
class EvaluatorSample:
    """One ``<SAMPLE>`` of an evaluator backward prompt (texts stripped)."""

    input: str
    prediction: str
    target: str


@dataclass(frozen=True)
class EvaluatorBackwardPrompt:
    """What the evaluator-backward responder reads from ``EVALUATOR_BACKWARD_USER``:
    the variables (listed once) and the failed samples of the group, in order."""

    samples: tuple[EvaluatorSample, ...]
    variables: tuple[PromptVariable, ...]

    @classmethod
    def parse(cls, text: str) -> EvaluatorBackwardPrompt:
        """Parse the ``<VARIABLE>`` elements of the ``<VARIABLES>`` block and, after
        each ``<SAMPLE ...>`` opening, its ``<INPUT>``, ``<PREDICTION ...>`` and
        ``<TARGET>`` (each after the previous one; so an explanation that mentions
        ``<TARGET>`` in prose is not read as a sample)."""
        # the template puts the <SAMPLES> block right after the variables: split
        # there, so that a text inside a variable or a sample is not read as markup
        junction = re.compile(r"</VARIABLES>\s*" + _opening("SAMPLES") + _ATTRS)
        split = junction.search(text)
        head, body = (
            (text[: split.start()], text[split.end() :]) if split else ("", text)
        )
        variables = _variables(head) if split else _variables(text)
        samples = []
        for opening in re.compile(r"^" + _opening("SAMPLE") + _ATTRS, re.M).finditer(
            body
        ):
            position = opening.end()
            values: dict[str, str] = {}
            for tag in ("INPUT", "PREDICTION", "TARGET"):
                element = Element.first(tag, body, position)
                if element is not None:
                    values[tag] = element.text.strip()
                    position = element.end
            samples.append(
                EvaluatorSample(
                    input=values.get("INPUT", ""),
                    prediction=values.get("PREDICTION", ""),
                    target=values.get("TARGET", ""),
                )
            )
        return cls(samples=tuple(samples), variables=tuple(variables))


def evaluator_backward_gradients(prompt: EvaluatorBackwardPrompt) -> list[str]:
    """The gradients the simulator writes for an evaluator backward prompt (see
    :func:`evaluator_backward_responder`): one per variable for each sample, sample
    by sample."""
    return [
        f'The prediction "{sample.prediction}" is wrong: the expected value is '
        f'"{sample.target}". Change what produces it so that this input leads to '
        f'"{sample.target}".'
        if variable.location == "prediction"
        else f'The {variable.role} should lead to the expected value "{sample.target}" '
        "for this input."
        for sample in prompt.samples
        for variable in prompt.variables
    ]


def evaluator_backward_responder(request: SimRequest) -> Answer | None:
    """Answer an evaluator backward call (afnio's ``EVALUATOR_BACKWARD_USER``).

    Marker: a ``user`` message holding ``<EVALUATION ...>``, ``<SAMPLE>`` and
    ``<VARIABLES ...>``. Each sample's ``<INPUT>``, ``<PREDICTION ...>`` (``p``) and
    ``<TARGET>`` (``t``) are read, stripped.

    Answer: ``{"gradients": [...]}``, for each sample in order one string per
    ``<VARIABLE>`` element, in order: a variable with ``location="prediction"`` gets
    ``The prediction "<p>" is wrong: the expected value is "<t>". Change what
    produces it so that this input leads to "<t>".``; any other ``The <role> should
    lead to the expected value "<t>" for this input.``
    """
    text = _marked_user_text(request, ("EVALUATION", "SAMPLE", "VARIABLES"))
    if text is None:
        return None
    prompt = EvaluatorBackwardPrompt.parse(text)
    return _gradients_answer(evaluator_backward_gradients(prompt), "evaluator_backward")


IMPROVED_VARIABLE_SCHEMA_NAME = "afnio_improved_variable"
"""The JSON schema name of afnio's TGD optimizer answers (``afnio.optim.prompts``)."""

_ALTERNATIVE = r'"[^"\n]*"(?:\s*\(x\d+\))?'
_ALTERNATIVES = re.compile(
    r"\{\s*(" + _ALTERNATIVE + r"(?:\s*\|\s*" + _ALTERNATIVE + r")+)\s*\}"
)
_FORBIDDEN_CHARACTER = re.compile(r'Do not use the character "(.)"')


def expand_alternatives(line: str) -> list[str]:
    """The feedback texts a condensed line stands for: ``{"a" | "b"}`` becomes one
    text per alternative (several groups: every combination).

    >>> expand_alternatives('If the message mentions {"a" | "b"}, the x is y.')
    ['If the message mentions "a", the x is y.', 'If the message mentions "b", the x is y.']
    """  # noqa: E501
    return [text for text, _ in _weighted_alternatives(line, Fraction(1))]


def _weighted_alternatives(line: str, total: Fraction) -> list[tuple[str, Fraction]]:
    """The texts of :func:`expand_alternatives` with their share of ``total``
    proposals: an alternative with its own count (``{"a" (x3) | "b"}``) gets that
    count (within ``total``), the others share the rest evenly, exactly
    (:class:`~fractions.Fraction`); several groups multiply the shares."""
    match = _ALTERNATIVES.search(line)
    if match is None:
        return [(line, total)]
    options = re.findall(r'("[^"\n]*")(?:\s*\(x(\d+)\))?', match[1])
    own = {i: Fraction(int(n)) for i, (_, n) in enumerate(options) if n}
    rest = [i for i in range(len(options)) if i not in own]
    left = max(Fraction(0), total - sum(own.values()))
    head, tail = line[: match.start()], line[match.end() :]
    weighted: list[tuple[str, Fraction]] = []
    for i, (option, _) in enumerate(options):
        share = own[i] if i in own else left / len(rest)
        weighted.extend(_weighted_alternatives(head + option + tail, share))
    return weighted


_COUNT_SUFFIX = re.compile(r"\(x(?P<n>\d+)\)\s*$")


def _line_count(line: str) -> int:
    """How many samples proposed a feedback line: its ``(xN)`` suffix (TGD's
    rendering of repeated feedback, see :func:`afnio.optim.tgd.render_feedback`),
    else 1."""
    match = _COUNT_SUFFIX.search(line)
    return max(1, int(match["n"])) if match is not None else 1


def _conflict_key(edit: Rule | ToolRule | tuple[str, str]) -> tuple[str, ...] | None:
    """The edits that conflict share a key: a prompt's tool rules for the same word
    and kind (whatever tools they call), and a description rule and a removal for
    the same word. Label rules have no key (the last one proposed wins, in place)."""
    if isinstance(edit, tuple):
        return ("description", edit[1].casefold())
    if isinstance(edit, ToolRule):
        if edit.source == "description":
            return ("description", edit.word.casefold())
        return ("prompt", edit.kind, edit.word.casefold())
    return None


def _edit_choice(edit: Rule | ToolRule | tuple[str, str]) -> str:
    """What an edit asks for, within its conflict key (see :func:`_conflict_key`)."""
    if isinstance(edit, tuple):
        return "remove"
    if isinstance(edit, ToolRule) and edit.source == "description":
        return "add"
    return edit.text()


def improve_value(current: str, feedback: str, constraints: str = "") -> str:
    """The optimizer's answer: ``current`` with every rule proposed in ``feedback``
    applied, in order. A rule for a word already ruled replaces that sentence in
    place; a new one is appended; a rule never appears twice. Checkable constraints
    are honoured: ``Do not use the character "<c>".`` removes ``<c>``.

    Tool routing (see :func:`choose_tool_calls`) is edited the same way: a prompt's
    tool rule (``If the message begins with "<w>", call <tool>.``) replaces the tool
    rule for the same word and kind, a tool description's rule (``Use this tool when
    the message begins with "<w>".``) is added once, and ``Do not use this tool when
    the message begins with "<w>".`` removes every description rule for that word,
    whatever its kind (``mentions`` or ``begins with``). Label rules and tool rules
    for the same word never replace each other.

    Prompt tool rules are *voted* over the batch, as a model reading a batch's
    feedback writes the rules that many samples ask for and that tell the tools
    apart: the proposals for the same word and kind (whatever tools they call,
    the confirmations of :func:`tool_confirmation_gradients` included) are tallied,
    and the most proposed tools (ties: the first proposed) are written, at their
    first place, only when they hold a clear majority, at least
    :data:`RULE_MAJORITY` (3/4) of those proposals; otherwise the word does not tell
    the tools apart and an existing rule for it is removed. In a feedback on at
    least :data:`RULE_SUPPORT_FEEDBACKS` (10) samples, a rule also needs
    :data:`RULE_SUPPORT` (2) samples asking for it (one sample among many is an
    anecdote; an existing rule then stays as it is). Adding and removing a
    description rule for the same word are voted too (the more proposed wins; ties:
    the first). A feedback line counts as many proposals as its ``(xN)`` suffix
    says (TGD's rendering of repeated feedback), a line without a suffix 1; a line
    is read sentence by sentence, each sentence weighed with the line's count.
    Among the alternatives of a condensed sentence, one with its own count
    (``{"a" (x3) | "b"} ... (x4)``) gets that count, the others share the rest
    evenly (``{"a" | "b"} ... (x4)``: 2 each, an estimate). Counts are exact
    (:class:`~fractions.Fraction`). Label rules are applied in order, the last one
    for a word winning, as before.

    >>> improve_value("Classify.", '- If the message mentions "bad", the mood is low.')
    'Classify. If the message mentions "bad", the mood is low.'
    >>> improve_value('Route. If the message begins with "leak", call cleaning.',
    ...     'If the message begins with "leak", call repairs.')
    'Route. If the message begins with "leak", call repairs.'
    >>> improve_value('Mops floors. Use this tool when the message begins with "leak".',
    ...     'Do not use this tool when the message begins with "leak".')
    'Mops floors.'
    >>> votes = ('- If the message mentions "hvac", call repairs. (x3)\\n'
    ...     '- If the message mentions "hvac", call cleaning.')
    >>> improve_value("Route.", votes)
    'Route. If the message mentions "hvac", call repairs.'
    >>> improve_value("Route.", votes.replace("cleaning.", "cleaning. (x2)"))
    'Route.'
    """
    proposals: list[tuple[Rule | ToolRule | tuple[str, str], Fraction]] = []
    samples = Fraction(0)  # feedbacks proposing a prompt tool rule
    for line in feedback.splitlines():
        count = Fraction(_line_count(line))
        edits = [
            (edit, weight)
            for sentence in _sentences(_COUNT_SUFFIX.sub("", line))
            for text, weight in _weighted_alternatives(sentence, count)
            for edit in _feedback_edits(text)
        ]
        if any(_conflict_key(edit) is not None for edit, _ in edits):
            samples += count  # a feedback that proposes a tool edit
        proposals.extend(edits)
    votes: dict[tuple[str, ...], dict[str, Fraction]] = {}
    for edit, weight in proposals:
        key = _conflict_key(edit)
        if key is not None:
            tally = votes.setdefault(key, {})
            choice = _edit_choice(edit)
            tally[choice] = tally.get(choice, Fraction(0)) + weight
    winners = {
        key: max(tally, key=lambda c: (tally[c], -list(tally).index(c)))
        for key, tally in votes.items()
    }
    support = RULE_SUPPORT if samples >= RULE_SUPPORT_FEEDBACKS else 1
    value = current
    for edit, _ in proposals:
        key = _conflict_key(edit)
        if (
            key is not None
            and key[0] == "description"
            and _edit_choice(edit) == "add"
            and votes[key]["add"] < support
        ):
            continue  # one sample among many: an anecdote, not a pattern
        if key is not None and key[0] == "prompt":
            tally = votes[key]
            weight = tally[winners[key]]
            if weight < RULE_MAJORITY * sum(tally.values()):
                # no clear majority: the word does not tell the tools apart; an
                # existing rule goes when enough samples speak against it
                against = sum(
                    w for c, w in tally.items() if c != _existing_choice(value, edit)
                )
                if against >= support:
                    value = _remove_tool_rule(value, edit)
                continue
            if weight < support:
                continue  # one sample among many: an anecdote, not a pattern
        if key is None or _edit_choice(edit) == winners[key]:
            value = _apply_edit(value, edit)
    for character in _FORBIDDEN_CHARACTER.findall(constraints):
        value = value.replace(character, "")
    return value


RULE_MAJORITY = Fraction(3, 4)
"""A prompt's tool rule for a word is written (or kept) only when at least this share
of the feedback proposing a rule for that word (and kind) asks for the same tools,
confirmations of the rule included (see :func:`tool_confirmation_gradients`); below
it the word does not tell the tools apart and its rule is removed."""

RULE_SUPPORT = 2
"""In a feedback on at least :data:`RULE_SUPPORT_FEEDBACKS` samples, a prompt's tool
rule needs at least this many samples asking for it."""

RULE_SUPPORT_FEEDBACKS = 10
"""See :data:`RULE_SUPPORT`: smaller feedbacks write a rule one sample asks for."""

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\-])")
_QUOTED_OR_GROUP = re.compile(r'"[^"\n]*"|\{[^}\n]*\}')


def _sentences(line: str) -> list[str]:
    """The sentences of a feedback line (split after ``.``/``!``/``?`` before a
    capital, never inside a quoted word or a ``{...}`` group), so that each rule
    sentence is weighed on its own (see :func:`_weighted_alternatives`: a line of
    several condensed sentences would otherwise stand for every combination of
    their alternatives).

    >>> _sentences('If the message mentions "St. Louis", call a. Use B.')
    ['If the message mentions "St. Louis", call a.', 'Use B.']
    """
    protected = [(m.start(), m.end()) for m in _QUOTED_OR_GROUP.finditer(line)]
    parts: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(line):
        if any(a <= match.start() < b for a, b in protected):
            continue
        parts.append(line[start : match.start()])
        start = match.end()
    parts.append(line[start:])
    return [part for part in parts if part.strip()]


def _existing_choice(value: str, edit: Rule | ToolRule | tuple[str, str]) -> str | None:
    """The text of ``value``'s prompt tool rule for the word and kind of ``edit``
    (its vote choice, see :func:`_edit_choice`), or ``None``."""
    if not isinstance(edit, ToolRule):
        return None
    for rule in find_tool_rules(value):
        if rule.word.casefold() == edit.word.casefold() and rule.kind == edit.kind:
            return rule.text()
    return None


def _remove_tool_rule(value: str, edit: Rule | ToolRule | tuple[str, str]) -> str:
    """``value`` without the prompt's tool rule for the word and kind of ``edit``."""
    if not isinstance(edit, ToolRule):
        return value
    for rule in find_tool_rules(value):
        if rule.word.casefold() == edit.word.casefold() and rule.kind == edit.kind:
            value = re.sub(r"[ \t]*" + re.escape(rule.sentence), "", value, count=1)
    return value.strip()


def _feedback_edits(text: str) -> list[Rule | ToolRule | tuple[str, str]]:
    """The edits a feedback text proposes, in text order: label rules
    (:class:`Rule`), tool rules (:class:`ToolRule`, of a prompt or a description)
    and removals of a description rule (``(kind, word)``)."""
    found: list[tuple[int, Rule | ToolRule | tuple[str, str]]] = []
    found.extend(
        (m.start(), r)
        for m, r in zip(RULE_PATTERN.finditer(text), find_rules(text), strict=True)
    )
    found.extend(
        (m.start(), r)
        for m, r in zip(
            TOOL_RULE_PATTERN.finditer(text), find_tool_rules(text), strict=True
        )
    )
    found.extend(
        (m.start(), r)
        for m, r in zip(
            TOOL_DESCRIPTION_RULE_PATTERN.finditer(text),
            ToolSpec("_", text).rules(),
            strict=True,
        )
    )
    found.extend(
        (m.start(), (" ".join(m["kind"].split()), m["word"].strip()))
        for m in TOOL_DESCRIPTION_REMOVAL_PATTERN.finditer(text)
    )
    found.sort(key=lambda item: item[0])
    return [edit for _, edit in found]


def _apply_edit(value: str, edit: Rule | ToolRule | tuple[str, str]) -> str:
    """``value`` with one edit of :func:`_feedback_edits` applied."""
    if isinstance(edit, tuple):
        _, word = edit  # a removal names the word; the rule's kind may differ
        for rule in ToolSpec("_", value).rules():
            if rule.word.casefold() == word.casefold():
                value = re.sub(r"[ \t]*" + re.escape(rule.sentence), "", value, count=1)
        return value.strip()
    sentence = edit.text()
    if isinstance(edit, Rule):
        existing: list[Rule | ToolRule] = list(find_rules(value))
    elif edit.source == "description":
        existing = list(ToolSpec("_", value).rules())
    else:
        existing = list(find_tool_rules(value))
    same_word = [
        r
        for r in existing
        if r.word.casefold() == edit.word.casefold() and r.kind == edit.kind
    ]
    if same_word:
        return value.replace(same_word[0].sentence, sentence, 1)
    if sentence not in value:
        return f"{value.rstrip()} {sentence}".strip()
    return value


def optimizer_responder(request: SimRequest) -> Answer | None:
    """A TGD optimizer call. Marker: a user message holding ``<CURRENT_VALUE>`` and
    ``<FEEDBACK ...>``. Answers ``{"improved_value": ...}``: the current value with
    the rules of the feedback applied and the checkable constraints honoured (see
    :func:`improve_value`)."""
    text = _marked_user_text(request, ("CURRENT_VALUE", "FEEDBACK"))
    if text is None:
        return None
    current = Element.first("CURRENT_VALUE", text)
    feedback = Element.first("FEEDBACK", text)
    constraints = Element.first("CONSTRAINTS", text)
    value = improve_value(
        current.text if current else "",
        feedback.text if feedback else "",
        constraints.text if constraints else "",
    )
    return _json_answer({"improved_value": value}, "optimizer")


# -- DSPy's adapter formats ------------------------------------------------------------

DSPY_COMPLETED = "[[ ## completed ## ]]"
"""The marker that ends a DSPy ChatAdapter answer."""

_DSPY_OBJECTIVE = "In adhering to this structure, your objective is:"
_DSPY_FIELD_LINE = re.compile(
    r"^\d+\.\s+`(?P<name>[^`]+)`\s+\((?P<type>[^\n]*?)\):", re.MULTILINE
)
_DSPY_DIRECTIVE = re.compile(
    r"\n\s*Respond with (?:the corresponding output fields|a JSON)"
)
_QUOTED = re.compile(r"'([^']*)'|\"([^\"]*)\"")


@dataclass(frozen=True)
class DSPyField:
    """One field a DSPy prompt declares: its name, its type as DSPy renders it
    (``str``, ``bool``, ``Literal['a', 'b']``...) and the choices of a ``Literal``."""

    name: str
    type: str
    choices: tuple[Any, ...] = ()


@dataclass(frozen=True)
class DSPyPrompt:
    """What the simulator reads from a prompt rendered by DSPy's ``ChatAdapter`` or
    ``JSONAdapter`` (DSPy 3.x): the declared fields, the instructions, the current
    input values (from the last ``user`` message; earlier turns are demos) and whether
    the answer must be a JSON object."""

    inputs: tuple[DSPyField, ...]
    outputs: tuple[DSPyField, ...]
    instructions: str
    values: Mapping[str, str]
    json_answer: bool

    @classmethod
    def parse(cls, messages: Sequence[Message]) -> DSPyPrompt | None:
        """Parse a DSPy conversation; ``None`` when it is not one (its first message
        must be a system message that declares output fields and ends with DSPy's
        objective line).

        >>> system = ("Your input fields are:\\n1. `message` (str): \\n"
        ...     "Your output fields are:\\n1. `mood` (Literal['up', 'down']): \\n"
        ...     "All interactions will be structured in the following way...\\n"
        ...     "In adhering to this structure, your objective is: \\n    Be nice.")
        >>> user = ("[[ ## message ## ]]\\nGreat!\\n\\nRespond with the corresponding "
        ...     "output fields, starting with the field `[[ ## mood ## ]]`.")
        >>> p = DSPyPrompt.parse([Message("system", system), Message("user", user)])
        >>> p.outputs[0].choices, p.instructions, dict(p.values), p.json_answer
        (('up', 'down'), 'Be nice.', {'message': 'Great!'}, False)
        """
        if not messages or messages[0].role != "system":
            return None
        system = messages[0].text
        if "Your output fields are:" not in system or _DSPY_OBJECTIVE not in system:
            return None
        head, _, instructions = system.partition(_DSPY_OBJECTIVE)
        inputs, outputs = _dspy_fields(head, "input"), _dspy_fields(head, "output")
        user = next((m.text for m in reversed(messages) if m.role == "user"), "")
        return cls(
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            instructions=instructions.strip(),
            values=_dspy_values(user, [f.name for f in inputs]),
            json_answer="Outputs will be a JSON object" in head,
        )

    @property
    def input_text(self) -> str:
        """The input values, one per line, rule sentences removed."""
        return "\n".join(RULE_PATTERN.sub("", v) for v in self.values.values())

    def label_field(self) -> DSPyField | None:
        """The field a new rule names: ``sentiment`` when declared, else the first
        output field other than ``reasoning``."""
        candidates = [f for f in self.outputs if f.name != "reasoning"]
        named = [f for f in candidates if _norm(f.name) == DEFAULT_FIELD]
        return (named or candidates or [None])[0]


def _literal_choices(type_text: str) -> tuple[Any, ...]:
    """The values of a ``Literal[...]`` type as DSPy renders it (strings, numbers,
    booleans); ``()`` for any other type."""
    if not (type_text.startswith("Literal[") and type_text.endswith("]")):
        return ()
    try:
        values = ast.literal_eval(f"[{type_text[len('Literal[') : -1]}]")
    except (ValueError, SyntaxError):
        return tuple(a or b for a, b in _QUOTED.findall(type_text))
    return tuple(values)


def _dspy_fields(head: str, kind: str) -> list[DSPyField]:
    """The fields of the ``Your <kind> fields are:`` section; a description may span
    several lines and hold parentheses and colons."""
    parts = head.split(f"Your {kind} fields are:", 1)
    if len(parts) < 2:
        return []
    section = parts[1]
    for closing in ("Your output fields are:", "All interactions will be structured"):
        section = section.split(closing, 1)[0]
    return [
        DSPyField(m["name"], m["type"].strip(), _literal_choices(m["type"].strip()))
        for m in _DSPY_FIELD_LINE.finditer(section)
    ]


def _dspy_values(user: str, names: Sequence[str]) -> dict[str, str]:
    """The ``[[ ## name ## ]]`` blocks of a user message for the declared input
    names only (so a value may itself hold ``[[ ## x ## ]]``), the closing directive
    removed."""
    if not names:
        return {}
    alternatives = "|".join(re.escape(n) for n in names)
    matches = list(re.finditer(r"\[\[ ## (" + alternatives + r") ## \]\]", user))
    values: dict[str, str] = {}
    for k, match in enumerate(matches):
        end = matches[k + 1].start() if k + 1 < len(matches) else len(user)
        text = user[match.end() : end]
        directive = _DSPY_DIRECTIVE.search(text)
        if directive is not None:
            text = text[: directive.start()]
        values.setdefault(match[1], text.strip())
    return values


_DSPY_CONSTANTS: dict[str, Any] = {"bool": False, "int": 0, "float": 0.0}


def _dspy_default(field: DSPyField) -> Any:
    """The value of ``field`` when no rule gives one: ``neutral`` when it is a
    choice of a ``Literal``, else its first choice; ``False``/``0``/``0.0`` for a
    ``bool``/``int``/``float``; ``neutral`` for any other type."""
    if field.choices:
        return DEFAULT_LABEL if DEFAULT_LABEL in field.choices else field.choices[0]
    return _DSPY_CONSTANTS.get(field.type, DEFAULT_LABEL)


_TRUE_WORDS = frozenset({"true", "yes", "1"})
_FALSE_WORDS = frozenset({"false", "no", "0"})


def dspy_typed(field: DSPyField, label: str) -> tuple[bool, Any]:
    """``(True, value)`` when a rule's ``label`` is a value of ``field``'s type (a
    ``Literal`` choice, any case; ``true``/``yes``/``1`` or ``false``/``no``/``0``
    for a ``bool``; a number for an ``int``/``float``; any text otherwise), else
    ``(False, None)``: the simulator never answers a value DSPy would reject.

    >>> bool_field = DSPyField("is_spam", "bool")
    >>> dspy_typed(bool_field, "True"), dspy_typed(bool_field, "maybe")
    ((True, True), (False, None))
    >>> dspy_typed(DSPyField("x", "Literal['a', 'b']", ("a", "b")), "B")
    (True, 'b')
    """
    text = label.strip()
    if field.choices:
        hit = next(
            (c for c in field.choices if str(c).casefold() == text.casefold()), None
        )
        return (True, hit) if hit is not None else (False, None)
    if field.type == "bool":
        word = text.casefold()
        if word in _TRUE_WORDS or word in _FALSE_WORDS:
            return True, word in _TRUE_WORDS
        return False, None
    if field.type in ("int", "float"):
        try:
            number = float(text)
        except ValueError:
            return False, None
        if field.type == "int":
            return (True, int(number)) if number.is_integer() else (False, None)
        return (True, number) if math.isfinite(number) else (False, None)
    return True, label


def dspy_values(prompt: DSPyPrompt) -> dict[str, Any]:
    """The value of every output field (see :func:`dspy_responder`).

    >>> system = ("Your input fields are:\\n1. `message` (str): \\n"
    ...     "Your output fields are:\\n1. `reasoning` (str): \\n2. `summary` (str): "
    ...     "\\n3. `sentiment` (str): \\n4. `urgent` (bool): \\n"
    ...     "In adhering to this structure, your objective is: "
    ...     'If the message mentions "awful", the sentiment is negative.')
    >>> user = ("[[ ## message ## ]]\\nAn awful day.\\n\\nRespond with the "
    ...     "corresponding output fields, starting with ...")
    >>> prompt = DSPyPrompt.parse([Message("system", system), Message("user", user)])
    >>> dspy_values(prompt)  # doctest: +NORMALIZE_WHITESPACE
    {'reasoning': 'The rule for "awful" applies: the sentiment is negative.',
     'summary': 'An awful day.', 'sentiment': 'negative', 'urgent': False}
    """
    rules = find_rules(prompt.instructions)
    text = prompt.input_text
    matched = next((rule for rule in rules if rule.matches(text)), None)
    values: dict[str, Any] = {}
    for field in prompt.outputs:
        own = [rule for rule in rules if _norm(rule.field) == _norm(field.name)]
        hit = next((rule for rule in own if rule.matches(text)), None)
        typed = dspy_typed(field, hit.label) if hit is not None else (False, None)
        if typed[0]:
            values[field.name] = typed[1]
        elif own or field.choices or _norm(field.name) == DEFAULT_FIELD:
            values[field.name] = _dspy_default(field)
        elif field.name == "reasoning":
            values[field.name] = (
                f'The rule for "{matched.word}" applies: the {matched.field} is '
                f"{matched.label}."
                if matched is not None
                else "No rule of the instructions applies to this input."
            )
        elif field.type in _DSPY_CONSTANTS:
            values[field.name] = _DSPY_CONSTANTS[field.type]
        elif field.type.startswith(("list", "dict")):
            values[field.name] = [] if field.type.startswith("list") else {}
        else:  # free text (a summary, a rewrite): the input, passed through
            values[field.name] = text.strip()
    return values


def _dspy_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value)
    return json.dumps(value)


def dspy_responder(request: SimRequest) -> Answer | None:
    """Answer a prompt rendered by DSPy's ``ChatAdapter`` or ``JSONAdapter`` as a
    model that follows the format would.

    Marker: the first message is a system message that declares ``Your output fields
    are:`` and ends with ``In adhering to this structure, your objective is:``
    followed by the instructions. The rules of the grammar above are read from the
    instructions only, and matched against the input values of the last ``user``
    message (earlier turns are demos). Each output field gets, in order:

    * the label of the first matching rule naming that field; when rules name the
      field but none matches, or when the field is ``sentiment`` or a ``Literal``,
      the default label (``neutral``, or the first choice when it is not one);
    * ``reasoning`` (ChainOfThought): ``The rule for "<word>" applies: the <field>
      is <label>.`` or ``No rule of the instructions applies to this input.``;
    * ``bool``/``int``/``float``/``list``/``dict`` fields: ``False``/``0``/``0.0``/
      ``[]``/``{}``;
    * any other field (a summary, a rewrite): the input values, passed through.

    The answer is ``[[ ## field ## ]]`` blocks ending with ``[[ ## completed ## ]]``
    (ChatAdapter), or a JSON object of the fields when the request asks for JSON
    (``response_format``, or the JSONAdapter's system message).
    """
    prompt = DSPyPrompt.parse(request.messages)
    if prompt is None:
        return None
    values = dspy_values(prompt)
    if prompt.json_answer or request.response_format:
        return _json_answer(values, "dspy")
    blocks = [f"[[ ## {name} ## ]]\n{_dspy_text(v)}" for name, v in values.items()]
    return Answer("\n\n".join([*blocks, DSPY_COMPLETED]), responder="dspy")


from afnio.testing.peers import (  # noqa: E402  (peers builds on the helpers above)
    optoprime_responder,
    textgrad_backward_responder,
    textgrad_optimizer_responder,
)

RESPONDERS: list[Responder] = [
    judge_responder,
    chat_backward_group_responder,
    chat_backward_responder,
    evaluator_backward_responder,
    optimizer_responder,
    textgrad_optimizer_responder,
    textgrad_backward_responder,
    optoprime_responder,
    dspy_responder,
    task_responder,
    fallback_responder,
]
"""The responders consulted in order; the first non-``None`` answer wins."""


FEEDBACK_FILLER = (
    "This note restates the point above in other words and adds nothing new to it."
)
"""The neutral sentence that pads LM-written feedback (see :func:`pad_feedback`): no
double quote, no brace, no rule sentence, no target, no tool name and no lexicon
word, so no rule parser of the simulator reads anything in it."""

FEEDBACK_RESPONDERS: frozenset[str] = frozenset(
    {"chat_backward", "chat_backward_group", "evaluator_backward", "textgrad_backward"}
)
"""The responders whose answers are LM-written feedback (padded by
``Simulator(feedback_words=N)``): afnio's chat backward (one call or a group) and
evaluator backward, and TextGrad's backward calls. The optimizers' answers (afnio's
TGD, TextGrad's TGD, Trace's OptoPrime) and the judge's verdicts are not feedback."""


def pad_feedback(text: str, words: int) -> str:
    """``text`` followed by as many :data:`FEEDBACK_FILLER` sentences as it takes
    to hold at least ``words`` words (whitespace-separated, as the simulator counts
    tokens); an empty (or blank) text, or one long enough, is returned unchanged.

    >>> padded = pad_feedback('The expected value is "x".', 30)
    >>> len(padded.split()), padded.count(FEEDBACK_FILLER)
    (35, 2)
    >>> pad_feedback("", 20), pad_feedback("a b c", 2)
    ('', 'a b c')
    """
    if not text.strip():
        return text
    count = len(text.split())
    parts = [text.rstrip()]
    filler = len(FEEDBACK_FILLER.split())
    while count < words:
        parts.append(FEEDBACK_FILLER)
        count += filler
    return " ".join(parts) if len(parts) > 1 else text


def padded_answer(result: Answer, words: int | None) -> Answer:
    """``result`` with every non-empty feedback string padded to at least ``words``
    words (:func:`pad_feedback`) when its responder is one of
    :data:`FEEDBACK_RESPONDERS`: each string of a ``{"gradients": [...]}`` answer,
    or the plain text of TextGrad's feedback; any other answer, or ``words`` of
    ``None``, unchanged."""
    if words is None or result.responder not in FEEDBACK_RESPONDERS:
        return result
    gradients = result.values.get("gradients")
    if isinstance(gradients, list):
        padded = [
            pad_feedback(g, words) if isinstance(g, str) else g for g in gradients
        ]
        return _gradients_answer(padded, result.responder)
    return dataclasses.replace(result, label=pad_feedback(result.label, words))


def answer(
    request: SimRequest,
    responders: Sequence[Responder] | None = None,
    *,
    feedback_words: int | None = None,
) -> Answer:
    """The first answer of ``responders`` (default :data:`RESPONDERS`); with
    ``feedback_words``, LM-written feedback is padded to at least that many words
    (see :func:`padded_answer`). Every route of the simulator (a chat or legacy
    completion, streamed or not, a Batch API line) gets its answer here.

    >>> answer(SimRequest.from_messages([{"role": "user", "content": "hi"}])).label
    'neutral'
    """
    for responder in RESPONDERS if responders is None else responders:
        result = responder(request)
        if result is not None:
            return padded_answer(result, feedback_words)
    return fallback_responder(request)


def respond(request: SimRequest) -> str:
    """The message content the simulator sends back for ``request``."""
    return render_content(answer(request), request.response_format)


def embed(text: str, dimensions: int = 64) -> list[float]:
    """A deterministic embedding: the hashed bag of the lowercase words of ``text``.

    Each word adds ``+1`` or ``-1`` (a second hash decides the sign) to one of
    ``dimensions`` buckets (chosen by a stable hash, not Python's salted ``hash``); the
    vector is then L2-normalised. Identical texts give identical vectors and texts that
    share words usually have a positive cosine. A text without word characters is
    hashed whole, so every non-empty text gets a unit vector.

    >>> v = embed("The cat sat", 8)
    >>> len(v), round(sum(x * x for x in v), 6), v == embed("the CAT sat!", 8)
    (8, 1.0, True)
    """
    if dimensions < 1:
        raise ValueError("dimensions must be at least 1")
    words = re.findall(r"\w+(?:[-']\w+)*", text.lower()) or ([text] if text else [])
    vector = [0.0] * dimensions
    for word in words:
        digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
        value = int.from_bytes(digest, "big")
        sign = 1.0 if value >> 63 == 0 else -1.0
        vector[value % dimensions] += sign
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm else vector


# -- tool calling ----------------------------------------------------------------------

TOOL_NAME = r"[A-Za-z0-9_-]{1,64}"
"""OpenAI's function-name alphabet (``^[a-zA-Z0-9_-]{1,64}$``)."""

_TOOL_LIST = (
    r"(?P<tools>no\s+tool|" + TOOL_NAME + r"(?:(?:\s*,\s*(?:and\s+)?|\s+and\s+)"
    r"(?!no\s+tool)" + TOOL_NAME + r")*)"
)
TOOL_RULE_PATTERN = re.compile(
    r"If\s+the\s+message\s+(?P<kind>mentions|begins\s+with)\s+"
    r'"(?P<word>[^"\n]+)",\s+call\s+' + _TOOL_LIST + r"\s*\."
)
"""A tool-routing rule of a prompt: ``If the message mentions "<word>", call
<tool>.`` or ``If the message begins with "<word>", call <tool>.``; several tools are
separated by commas or ``and`` (``call a, b and c.``: parallel calls); ``call no
tool.`` means: answer without calling a tool."""

TOOL_DESCRIPTION_RULE_PATTERN = re.compile(
    r"(?<!not )(?<!never )Use\s+this\s+tool\s+when\s+the\s+message\s+"
    r'(?P<kind>mentions|begins\s+with)\s+"(?P<word>[^"\n]+)"\s*\.'
)
"""A routing rule inside a tool's own description: ``Use this tool when the message
mentions "<word>".`` or ``Use this tool when the message begins with "<word>".``"""

TOOL_DESCRIPTION_REMOVAL_PATTERN = re.compile(
    r"Do\s+not\s+use\s+this\s+tool\s+when\s+the\s+message\s+"
    r'(?P<kind>mentions|begins\s+with)\s+"(?P<word>[^"\n]+)"\s*\.'
)
"""A feedback sentence that removes a description rule: ``Do not use this tool when
the message begins with "<word>".`` (see :func:`improve_value`)."""

TOOL_CHOICES: tuple[str, ...] = ("auto", "none", "required")
"""The string values of ``tool_choice`` (LangChain's ``"any"`` is read as
``"required"``); an object ``{"type": "function", "function": {"name": ...}}`` forces
one tool."""

_ANY_RULE = re.compile(
    "|".join(
        f"(?:{p.pattern})"
        for p in (RULE_PATTERN, TOOL_RULE_PATTERN, TOOL_DESCRIPTION_RULE_PATTERN)
    )
    .replace("?P<kind>", "?:")
    .replace("?P<word>", "?:")
    .replace("?P<field>", "?:")
    .replace("?P<label>", "?:")
    .replace("?P<tools>", "?:")
)


class ToolRequestError(ValueError):
    """A request whose ``tools`` or ``tool_choice`` a real API would refuse (HTTP
    400); ``param`` names the offending parameter."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolSpec:
    """One function tool of a request: its name, description and JSON-schema
    ``parameters``."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def rules(self) -> list[ToolRule]:
        """The routing rules of the description (see
        :data:`TOOL_DESCRIPTION_RULE_PATTERN`), each calling this tool."""
        return [
            ToolRule(
                word=m["word"].strip(),
                kind=" ".join(m["kind"].split()),
                tools=(self.name,),
                sentence=m.group(0),
                source="description",
            )
            for m in TOOL_DESCRIPTION_RULE_PATTERN.finditer(self.description)
        ]


@dataclass(frozen=True)
class ToolRule:
    """One parsed tool-routing rule: from a prompt (``source="prompt"``) or from a
    tool's description (``source="description"``). ``tools`` is ``()`` for ``call no
    tool``.

    >>> rule = find_tool_rules('If the message begins with "leak", call repairs.')[0]
    >>> rule.word, rule.kind, rule.tools, rule.matches("Leak in room 4")
    ('leak', 'begins with', ('repairs',), True)
    """

    word: str
    kind: str
    tools: tuple[str, ...]
    sentence: str
    source: str = "prompt"

    def matches(self, text: str) -> bool:
        """Whether the rule applies to ``text`` (as :meth:`Rule.matches`: a whole
        word for ``mentions``, the :func:`lead_word` for ``begins with``)."""
        return Rule(self.word, "", "", self.sentence, self.kind).matches(text)

    def text(self) -> str:
        """The rule as a sentence of its grammar (normalised spacing)."""
        if self.source == "description":
            return tool_description_sentence(self.kind, self.word)
        return tool_rule_sentence(self.kind, self.word, self.tools)


@dataclass(frozen=True)
class ToolCall:
    """One call the simulated model makes: ``arguments`` is a JSON object string."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolChoice:
    """A parsed ``tool_choice``: ``mode`` is ``auto``, ``none``, ``required`` or
    ``function`` (then ``name`` is the forced tool)."""

    mode: str = "auto"
    name: str | None = None


def tool_rule_sentence(kind: str, word: str, tools: Sequence[str]) -> str:
    """A prompt's tool-routing rule: ``If the message <kind> "<word>", call
    <tools>.`` (``no tool`` when ``tools`` is empty; ``a, b and c`` for several).

    >>> tool_rule_sentence("begins with", "leak", ["repairs"])
    'If the message begins with "leak", call repairs.'
    >>> tool_rule_sentence("mentions", "x", ["a", "b", "c"]), tool_rule_sentence(
    ...     "mentions", "hi", [])
    ('If the message mentions "x", call a, b and c.', 'If the message mentions "hi", call no tool.')
    """  # noqa: E501
    names = list(tools)
    if not names:
        listed = "no tool"
    elif len(names) == 1:
        listed = names[0]
    else:
        listed = ", ".join(names[:-1]) + " and " + names[-1]
    return f'If the message {kind} "{word}", call {listed}.'


def tool_description_sentence(kind: str, word: str) -> str:
    """A tool description's routing rule: ``Use this tool when the message <kind>
    "<word>".``

    >>> tool_description_sentence("begins with", "mop")
    'Use this tool when the message begins with "mop".'
    """
    return f'Use this tool when the message {kind} "{word}".'


def _tool_names(listed: str) -> tuple[str, ...]:
    if re.fullmatch(r"no\s+tool", listed.strip()):
        return ()
    return tuple(
        name
        for name in re.findall(TOOL_NAME, listed)
        if name != "and"  # the separator
    )


def find_tool_rules(text: str) -> list[ToolRule]:
    """The tool-routing rules of a prompt text (see :data:`TOOL_RULE_PATTERN`), in
    order.

    >>> [r.tools for r in find_tool_rules(
    ...     'If the message mentions "bill", call billing and refunds. '
    ...     'If the message mentions "hi", call no tool.')]
    [('billing', 'refunds'), ()]
    """
    return [
        ToolRule(
            word=m["word"].strip(),
            kind=" ".join(m["kind"].split()),
            tools=_tool_names(m["tools"]),
            sentence=m.group(0),
        )
        for m in TOOL_RULE_PATTERN.finditer(text)
    ]


def strip_rules(text: str) -> str:
    """``text`` without any rule sentence (label rules, tool rules and tool
    description rules): the part of a message that rules are matched against.

    >>> strip_rules('If the message mentions "x", call a. Hello')
    ' Hello'
    """
    return _ANY_RULE.sub("", text)


def parse_tools(body: Mapping[str, Any]) -> tuple[ToolSpec, ...]:
    """The function tools of a request body (``tools``), in order; ``()`` without
    any (absent or ``null``). Raises :class:`ToolRequestError`, as the API answers
    400, for a malformed list (not a list, an empty list, an entry that is not
    ``{"type": "function", "function": {"name": ...}}``, a name outside
    ``[A-Za-z0-9_-]{1,64}``, a name given twice) and for the deprecated
    ``functions``/``function_call`` parameters (use ``tools``/``tool_choice``).

    >>> parse_tools({"tools": [{"type": "function", "function": {"name": "f",
    ...     "description": "Does f.", "parameters": {"type": "object"}}}]})
    (ToolSpec(name='f', description='Does f.', parameters={'type': 'object'}),)
    """
    for legacy in ("functions", "function_call"):
        if body.get(legacy) is not None:
            raise ToolRequestError(
                f"Unsupported parameter: '{legacy}' (the deprecated function-calling "
                'API). Use \'tools\' (a list of {"type": "function", "function": '
                "{...}}) and 'tool_choice' instead.",
                legacy,
            )
    raw = body.get("tools")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ToolRequestError("Invalid 'tools': expected an array of tools.", "tools")
    if not raw:
        raise ToolRequestError(
            "Invalid 'tools': empty array. Expected an array with minimum length 1; "
            "leave 'tools' out to send no tools.",
            "tools",
        )
    specs: list[ToolSpec] = []
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise ToolRequestError(
                f"Invalid '{where}': expected an object with 'type': 'function' "
                "(the simulator supports function tools only).",
                f"{where}.type",
            )
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise ToolRequestError(
                f"Missing required parameter: '{where}.function'.", f"{where}.function"
            )
        name = function.get("name")
        if not isinstance(name, str) or re.fullmatch(TOOL_NAME, name) is None:
            raise ToolRequestError(
                f"Invalid '{where}.function.name': expected a string of 1 to 64 "
                f"letters, digits, underscores or dashes, got {name!r}.",
                f"{where}.function.name",
            )
        if any(spec.name == name for spec in specs):
            raise ToolRequestError(
                f"Invalid 'tools': the function name {name!r} is given twice.",
                f"{where}.function.name",
            )
        description = function.get("description")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise ToolRequestError(
                f"Invalid '{where}.function.parameters': expected a JSON schema "
                "object.",
                f"{where}.function.parameters",
            )
        specs.append(
            ToolSpec(
                name=name,
                description=description if isinstance(description, str) else "",
                parameters=dict(parameters or {}),
            )
        )
    return tuple(specs)


def parse_tool_choice(body: Mapping[str, Any], tools: Sequence[ToolSpec]) -> ToolChoice:
    """The request's ``tool_choice`` (default ``auto``): ``"auto"``, ``"none"``,
    ``"required"`` (``"any"`` too), or ``{"type": "function", "function": {"name":
    ...}}`` (``{"type": "function", "name": ...}`` too) naming one of ``tools``.
    Raises :class:`ToolRequestError` for any other value, and for any
    ``tool_choice`` without tools (as the API does).

    >>> spec = ToolSpec("lookup")
    >>> parse_tool_choice({}, [spec]), parse_tool_choice(
    ...     {"tool_choice": {"type": "function", "function": {"name": "lookup"}}},
    ...     [spec])
    (ToolChoice(mode='auto', name=None), ToolChoice(mode='function', name='lookup'))
    """
    raw = body.get("tool_choice")
    if raw is None:
        return ToolChoice()
    if not tools:
        raise ToolRequestError(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when "
            "'tools' are specified.",
            "tool_choice",
        )
    if isinstance(raw, str):
        mode = "required" if raw == "any" else raw
        if mode not in TOOL_CHOICES:
            raise ToolRequestError(
                f"Invalid value for 'tool_choice': {raw!r}. Expected 'none', 'auto', "
                "'required' or an object naming a function.",
                "tool_choice",
            )
        return ToolChoice(mode)
    name = None
    if isinstance(raw, Mapping) and raw.get("type") == "function":
        function = raw.get("function")
        name = (
            function.get("name") if isinstance(function, Mapping) else raw.get("name")
        )
    if not isinstance(name, str):
        raise ToolRequestError(
            "Invalid 'tool_choice': expected 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": "<tool>"}}.',
            "tool_choice",
        )
    if all(spec.name != name for spec in tools):
        raise ToolRequestError(
            f"Invalid 'tool_choice': the function {name!r} is not one of the "
            f"request's tools ({', '.join(s.name for s in tools) or 'none given'}).",
            "tool_choice.function.name",
        )
    return ToolChoice("function", name)


def _raw_messages(request: SimRequest) -> list[Mapping[str, Any]]:
    raw = request.body.get("messages") if request.body else None
    if isinstance(raw, list):
        return [m for m in raw if isinstance(m, Mapping)]
    return [{"role": m.role, "content": m.text} for m in request.messages]


_USER_ROLES = ("user", "human")


def tool_message(messages: Sequence[Message]) -> str:
    """The *message* that tool rules are matched against: the text of the last
    ``user`` (LangChain: ``human``) message, every rule sentence removed (see
    :func:`strip_rules`); ``""`` without one. The agent loop's later messages
    (assistant tool calls, tool results) are not part of it.

    >>> tool_message([Message("user", "old"), Message("assistant", "x"),
    ...     Message("user", 'Leak! If the message mentions "leak", call fix.')])
    'Leak! '
    """
    last = next((m for m in reversed(messages) if m.role in _USER_ROLES), None)
    return strip_rules(last.text) if last is not None else ""


def _current_turn(raw: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The messages after the last user message (the agent loop of this message)."""
    last = max(
        (i for i, m in enumerate(raw) if m.get("role") in _USER_ROLES), default=-1
    )
    return list(raw[last + 1 :])


def called_tools(request: SimRequest) -> tuple[str, ...]:
    """The tools already called for the current message: the names in the
    ``tool_calls`` of the assistant messages after the last user message, in
    order, without repeats.

    >>> body = {"messages": [{"role": "user", "content": "hi"},
    ...     {"role": "assistant", "content": None, "tool_calls": [{"id": "c1",
    ...      "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
    ...     {"role": "tool", "tool_call_id": "c1", "content": "done"}]}
    >>> called_tools(SimRequest.from_body(body))
    ('f',)
    """
    names: list[str] = []
    for message in _current_turn(_raw_messages(request)):
        calls = (
            message.get("tool_calls") if message.get("role") == "assistant" else None
        )
        for call in calls if isinstance(calls, list) else ():
            function = call.get("function") if isinstance(call, Mapping) else None
            name = function.get("name") if isinstance(function, Mapping) else None
            if isinstance(name, str) and name not in names:
                names.append(name)
    return tuple(names)


def tool_results(request: SimRequest) -> tuple[str, ...]:
    """The texts of the ``tool`` messages after the last user message, in order."""
    return tuple(
        message_text(m.get("content"))
        for m in _current_turn(_raw_messages(request))
        if m.get("role") == "tool"
    )


def _lead_offset(text: str) -> int | None:
    """The offset in ``text`` of its :func:`lead_word` (rule sentences blanked, so
    that offsets stay those of ``text``), ``None`` without one."""
    blanked = _ANY_RULE.sub(lambda m: " " * len(m[0]), text)
    body = _skip_headers(blanked)
    skipped = len(blanked) - len(body)
    lead = lead_word(text)
    if lead is None:
        return None
    for match in _WORD.finditer(body):
        if match[0].casefold().replace("\u2019", "'") == lead:
            negated = _negated_offsets(body)
            if match.start() not in negated:
                return skipped + match.start()
    return None


def rule_position(rule: ToolRule | Rule, text: str) -> int | None:
    """Where ``rule`` occurs in the message ``text``, for tool routing: ``None`` when
    it does not match; for a ``begins with`` rule that matches (see
    :meth:`ToolRule.matches`), the offset of the :func:`lead_word` (so that it decides
    together with a ``mentions`` rule for the same word); for a ``mentions`` rule, the
    offset of the first whole-word occurrence of its word (any case) that is not
    *negated* (the first content word after a :data:`NEGATORS` word or a ``...n't``,
    as :func:`lead_word` reads it: ``no leak`` does not mention a leak), ``None`` when
    every occurrence is negated.

    >>> rule = find_tool_rules('If the message mentions "leak", call repairs.')[0]
    >>> rule_position(rule, "Cleaning after a leak"), rule_position(rule, "Dry")
    (17, None)
    >>> rule_position(rule, "No leak, just dust") is None
    True
    >>> lead = find_tool_rules('If the message begins with "urgent", call fix.')[0]
    >>> rule_position(lead, "Subject: Urgent - dust")
    9
    """
    if rule.kind == "begins with":
        return _lead_offset(text) if rule.matches(text) else None
    pattern = rf"(?<!\w){re.escape(rule.word.strip())}(?!\w)"
    negated = _negated_offsets(text)
    for found in re.finditer(pattern, text, re.IGNORECASE):
        if found.start() not in negated:
            return found.start()
    return None


def tool_routing(
    request: SimRequest, tools: Sequence[ToolSpec]
) -> tuple[tuple[str, ...], tuple[ToolRule, ...]]:
    """The tools the rules route the current message to, and the rules that decided
    (``()`` when none matched).

    The prompt's tool rules (:func:`find_tool_rules` over the ``system``,
    ``developer`` and ``user`` messages, in message order) come first; only when
    none of them matches :func:`tool_message` are the tools' own descriptions read
    (:meth:`ToolSpec.rules`, in tool order). Among the matching rules of that
    source, the rule whose word occurs *earliest* in the message decides (see
    :func:`rule_position`: a ``begins with`` rule counts as the message's start; a
    message is routed by what it speaks of first, its main topic); rules that
    occur at the same place (the same word) decide together, in rule order. The
    answer is the tools of the deciding rules (in order, without repeats: a rule
    listing several tools, ``call a and b.``, makes parallel calls); when the first
    deciding rule is ``call no tool``, no tool, and that rule alone decided. Names
    that are not among ``tools`` are ignored. The chat backward reuses the word and
    kind of a deciding rule that routed wrongly (see :func:`tool_backward_gradients`),
    so that the optimizer replaces that rule in place.

    >>> request = SimRequest.from_messages([{"role": "system", "content":
    ...     'If the message mentions "dust", call cleaning. '
    ...     'If the message mentions "leak", call fix.'},
    ...     {"role": "user", "content": "A leak in room 4, and dust"}])
    >>> names, rules = tool_routing(request, [ToolSpec("cleaning"), ToolSpec("fix")])
    >>> names, [(r.kind, r.word) for r in rules]
    (('fix',), [('mentions', 'leak')])
    """
    text = tool_message(request.messages)
    available = {spec.name for spec in tools}
    prompt_rules = [
        rule
        for m in request.messages
        if m.role in ("system", "developer", *_USER_ROLES)
        for rule in find_tool_rules(m.text)
    ]
    for candidates in (prompt_rules, [r for s in tools for r in s.rules()]):
        placed = [(rule_position(rule, text), rule) for rule in candidates]
        matched = [(at, rule) for at, rule in placed if at is not None]
        if not matched:
            continue
        first = min(at for at, _ in matched)
        deciding = [rule for at, rule in matched if at == first]
        if not deciding[0].tools:
            return (), (deciding[0],)
        names: list[str] = []
        for rule in deciding:
            names.extend(n for n in rule.tools if n in available and n not in names)
        return tuple(names), tuple(deciding)
    return (), ()


def tool_arguments(spec: ToolSpec, request: SimRequest) -> str:
    """The JSON ``arguments`` of a call of ``spec`` (see :func:`schema_instance`):
    every property of the ``parameters`` schema, in order (so every required field
    is present); a property named like the field of the label rules' answer (see
    :func:`answer`) gets that label; else a top-level property with a ``default``
    gets its default; else a string gets the current message (:func:`tool_message`,
    stripped), an ``enum`` its first value (or that label when allowed), numbers
    ``0``, booleans ``false``, arrays ``[]`` (or ``minItems`` items), objects their
    properties recursively. A tool without parameters gets ``{}``.

    >>> spec = ToolSpec("lookup", parameters={"type": "object", "properties": {
    ...     "query": {"type": "string"}, "kind": {"enum": ["order", "refund"]},
    ...     "limit": {"type": "integer", "default": 10}}, "required": ["query"]})
    >>> tool_arguments(spec, SimRequest.from_messages(
    ...     [{"role": "user", "content": " Where is my order? "}]))
    '{"query": "Where is my order?", "kind": "order", "limit": 10}'
    """
    schema = spec.parameters
    if not isinstance(schema.get("properties"), Mapping):
        return "{}"
    values = {
        str(key): sub["default"]
        for key, sub in schema["properties"].items()
        if isinstance(sub, Mapping) and "default" in sub
    }
    labelled = answer(request)
    if labelled.field:
        values[labelled.field] = labelled.label
    instance = schema_instance(schema, tool_message(request.messages).strip(), values)
    return json.dumps(
        instance if isinstance(instance, dict) else {}, ensure_ascii=False
    )


def _call_id(seed: str, index: int) -> str:
    digest = hashlib.sha256(f"{seed}\n{index}".encode()).hexdigest()
    return f"call_{digest[:24]}"


def choose_tool_calls(request: SimRequest, seed: str = "") -> tuple[ToolCall, ...]:
    """The tool calls the simulated model makes for ``request`` (``()``: it answers
    in text, see :func:`final_answer`). ``seed`` makes the call ids (``call_<hash>``)
    unique per request (the simulator passes the hash of the request body).

    * No ``tools``, or ``tool_choice`` ``"none"``: no call.
    * A named function (``tool_choice={"type": "function", ...}``): that tool,
      always (a forced choice is honoured even when already called).
    * Otherwise the rules route the message (see :func:`tool_routing`); tools
      already called for this message (:func:`called_tools`) are left out, so an
      agent loop ends: after the tool results, the model answers.

      - ``auto`` (the default): the routed tools; none routed: no call.
      - ``required``: the routed tools; none routed (no rule matches, a matching
        ``call no tool``, or every routed tool already called): the *last* tool not
        called yet for this message, else the last tool. One rule for every client:
        a router that must call a tool calls its last one, and LangChain's
        structured-output tool (appended last, e.g. by ``create_agent(...,
        response_format=...)``) answers directly instead of a spurious call first.
    * Several tools are called in parallel (one message, several ``tool_calls``)
      unless ``parallel_tool_calls`` is ``false``: then the first only (the next
      request calls the next one).

    Each call's arguments come from :func:`tool_arguments`.
    """
    tools = parse_tools(request.body)
    if not tools:
        return ()
    choice = parse_tool_choice(request.body, tools)
    if choice.mode == "none":
        return ()
    by_name = {spec.name: spec for spec in tools}
    if choice.mode == "function":
        names: tuple[str, ...] = (str(choice.name),)
    else:
        done = called_tools(request)
        routed, _ = tool_routing(request, tools)
        names = tuple(n for n in routed if n not in done)
        if not names and choice.mode == "required":
            fresh = [s.name for s in tools if s.name not in done]
            names = (fresh[-1] if fresh else tools[-1].name,)
    if request.body.get("parallel_tool_calls") is False:
        names = names[:1]
    return tuple(
        ToolCall(_call_id(seed, i), name, tool_arguments(by_name[name], request))
        for i, name in enumerate(names)
    )


def final_answer(request: SimRequest, *, feedback_words: int | None = None) -> Answer:
    """The text answer of a request that offers tools but calls none: the answer of
    the responders (:func:`answer`: the label rules, as without tools); when only
    the fallback answers (no rule, no label set) and the current message has tool
    results, the text of the last tool result instead.

    >>> body = {"tools": [{"type": "function", "function": {"name": "f"}}],
    ...     "messages": [{"role": "user", "content": "hi"},
    ...     {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
    ...      "function": {"name": "f", "arguments": "{}"}}]},
    ...     {"role": "tool", "tool_call_id": "c", "content": "Order 7 ships today."}]}
    >>> final_answer(SimRequest.from_body(body)).label
    'Order 7 ships today.'
    """
    result = answer(request, feedback_words=feedback_words)
    results = tool_results(request)
    if result.responder == "fallback" and results:
        return Answer(results[-1], responder="tool_result")
    return result


_NAME_ITEM = r"[\"'`]?(?:" + TOOL_NAME + r")[\"'`]?"
_QUOTED_NAME = r"[\"'`](?:" + TOOL_NAME + r")[\"'`]"
_BRACKETED = rf"\[\s*(?:{_NAME_ITEM}(?:\s*,\s*{_NAME_ITEM})*)?\s*\]"
_NAMES = (
    r"(?P<names>"
    # a bracketed list: [a, b]; [] is no tool
    + _BRACKETED
    # a list that ends with "and": a, b and c
    + rf"|{_NAME_ITEM}(?:\s*,\s*{_NAME_ITEM})*,?\s+and\s+{_NAME_ITEM}"
    # quoted names separated by commas: "a", "b"
    + rf"|{_QUOTED_NAME}(?:\s*,\s*{_QUOTED_NAME})+"
    # one name
    + rf"|{_NAME_ITEM})"
)
_NOT_A_NAME = (
    r"(?!(?:it|them|this|that|these|those|out|attention|for|on|up|back|off|in)\b)"
)
"""Words after ``call`` that make it the verb of a label sentence (``call it
billing``, ``call out``, ``call attention to``), not the call of a tool."""
_NAME_END = (
    r"(?=\s*(?:tools?\b|instead\b|first\b|here\b|too\b|rather\b|but\b|"
    r"[.,;:!?)\]]|$))"
)
"""What may follow a bare tool name in ``should call <tool>``: the end of the phrase
(punctuation, ``tool``, ``instead``, ``but``...), never another word of a
sentence."""
_EXPECTED_NO_TOOL = re.compile(
    # "Expected no tool call", "expected no tools", "Expected no calls."
    r"\bexpected\s+no\s+tools?(?:\s+calls?)?\b"
    r"|\bexpected\s+no\s+calls?(?=\s*(?:[.,;:!?)]|$|but\b|got\b|were\b|was\b))"
    # "The agent should not have called any tool", "shouldn't call any tools"
    r"|\bshould\s*(?:not|n[\u2019']t)\s+(?:have\s+)?call(?:ed)?\s+any\s+tools?\b"
    # "No tool should have been called", "no tools should be called"
    r"|\bno\s+tools?\s+should\s+(?:have\s+been|be)\s+called\b",
    re.IGNORECASE,
)
_EXPECTED_TOOL_FORMS: tuple[re.Pattern[str], ...] = (
    # "expected a call to lookup_order", "Expected calls to `a` and `b`"
    re.compile(
        r"\bexpected\s+(?:a\s+|the\s+)?(?:tool\s+)?calls?\s+to\s+(?:the\s+)?"
        r"(?:tools?\s+)?" + _NAMES,
        re.IGNORECASE,
    ),
    # "The expected tool is "a"", "Expected tool calls: [a, b]", "Expected tool
    # calls: [], got [x]", "expected tools ['a'] but got ['b']"
    re.compile(
        r"\bexpected\s+tools?(?:\s+calls?)?(?:\s+(?:is|are|was|were)|\s*:)\s*" + _NAMES,
        re.IGNORECASE,
    ),
    re.compile(
        r"\bexpected\s+tools?(?:\s+calls?)?\s*(?P<names>" + _BRACKETED + ")",
        re.IGNORECASE,
    ),
    # "should have called refunds", "it should call a and b." (a name, then the end
    # of the phrase: "should call it billing" is no tool call)
    re.compile(
        r"\bshould\s+(?:have\s+)?call(?:ed)?\s+(?:the\s+)?(?:tools?\s+)?"
        + _NOT_A_NAME
        + _NAMES
        + _NAME_END,
        re.IGNORECASE,
    ),
    # "Wrong tool: called cleaning, expected repairs."
    re.compile(
        r"\bcalled\s+" + _NAME_ITEM + r"(?:\s*,\s*|\s+(?:and|but)\s+)(?:but\s+)?"
        r"expected\s+(?:the\s+)?(?:tools?\s+)?" + _NOT_A_NAME + _NAMES + _NAME_END,
        re.IGNORECASE,
    ),
    # "Expected: [repairs]. Got: [cleaning]." (a bracketed list only)
    re.compile(r"\bexpected\s*:\s*(?P<names>" + _BRACKETED + ")", re.IGNORECASE),
)


def expected_tools(feedback: str) -> tuple[str, ...] | None:
    """The tools a feedback says should have been called, or ``None`` when it names
    no tool call. The forms read (any case; names bare, quoted or in backticks,
    several separated by commas or ``and``, optionally in ``[...]``; ``[]`` is no
    tool):

    * ``expected a call to <tool>`` (also ``expected calls to <a> and <b>``,
      ``expected a tool call to <tool>``);
    * ``expected tool is <tool>``, ``expected tool: <tool>``, ``expected tool
      calls: [<a>, <b>]``, ``expected tools [<a>] but got [<b>]``, ``Expected tool
      calls: [], got [<b>]`` (no tool);
    * ``should have called <tool>`` / ``should call <tool>``, the name ending the
      phrase (``should call it billing``, ``should call attention to`` are not
      tool calls);
    * ``called <b>, expected <a>`` (``Wrong tool: called cleaning, expected
      repairs.``);
    * ``Expected: [<a>]. Got: [<b>].`` (a bracketed list only);
    * no tool: ``expected no tool call`` (``expected no tools``, ``Expected no
      calls.`` ending the phrase), ``should not have called any tool``, ``no tool
      should have been called``.

    The first form found in the text wins. These forms are generic enough to occur
    in label feedback, so the chat backward reads them only when its prompt shows
    tool calling (see :func:`shown_tools`).

    >>> expected_tools('Wrong tool: expected a call to "repairs", got cleaning.')
    ('repairs',)
    >>> expected_tools("Expected tool calls: [lookup, refund]")
    ('lookup', 'refund')
    >>> expected_tools("Expected no tool call."), expected_tools("expected value")
    ((), None)
    >>> expected_tools("Expected tool calls: [], got ['cleaning']")
    ()
    >>> expected_tools("You should call it billing."), expected_tools(
    ...     "Wrong tool: called cleaning, expected repairs.")
    (None, ('repairs',))
    """
    found: list[tuple[int, tuple[str, ...]]] = []
    none = _EXPECTED_NO_TOOL.search(feedback)
    if none is not None:
        found.append((none.start(), ()))
    for pattern in _EXPECTED_TOOL_FORMS:
        match = pattern.search(feedback)
        if match is not None:
            names = tuple(
                n
                for n in re.findall(TOOL_NAME, match["names"])
                if n.casefold() != "and"
            )
            found.append((match.start(), names))
    return min(found)[1] if found else None


_CONFIRMED_TOOLS = re.compile(
    r"\b(?:tool\s+)?calls?\s+match(?:es)?\s+the\s+(?:reference|expected(?:\s+tool)?"
    r"\s+calls?)\s*:?\s*(?P<names>\[[^\]\n]*\])",
    re.IGNORECASE,
)


def confirmed_tools(feedback: str) -> tuple[str, ...] | None:
    """The tools a feedback says were rightly called, or ``None`` when it says no
    such thing. The form read (any case, names in ``[...]``, ``[]`` for no call):
    ``The tool calls match the reference: [<a>, <b>]`` (also ``... match the
    expected calls: [...]``), the agreement of
    :func:`~afnio_integrations.langchain.trajectory_match` in ``"strict"`` and
    ``"unordered"`` mode. A feedback that names an expected call
    (:func:`expected_tools`) is not a confirmation.

    >>> confirmed_tools("The tool calls match the reference: [repairs].")
    ('repairs',)
    >>> confirmed_tools("The tool calls match the reference: [].")
    ()
    >>> confirmed_tools("Correct.") is None
    True
    """
    if expected_tools(feedback) is not None:
        return None
    match = _CONFIRMED_TOOLS.search(feedback)
    if match is None:
        return None
    return tuple(
        n for n in re.findall(TOOL_NAME, match["names"]) if n.casefold() != "and"
    )


def _called_in_output(output: str) -> tuple[str, ...]:
    """The tools an ``<LM_OUTPUT>`` shows being called: a JSON list (or an object
    with ``tool_calls``) of calls in OpenAI's shape (``{"function": {"name"}}``) or
    LangChain's (``{"name", "args"}``)."""
    is_json, value = _json_value(output.strip())
    if not is_json:
        return ()
    if isinstance(value, dict):
        value = value.get("tool_calls", [])
    names: list[str] = []
    for call in value if isinstance(value, list) else ():
        if not isinstance(call, dict):
            continue
        function = call.get("function")
        name = function.get("name") if isinstance(function, dict) else call.get("name")
        if isinstance(name, str) and name not in names:
            names.append(name)
    return tuple(names)


_TOOL_LOCATION = re.compile(
    r"^tools?(?:[ _-]?description)?\s*:\s*(?P<name>" + TOOL_NAME + r")\s*$",
    re.IGNORECASE,
)


def tool_of_variable(variable: PromptVariable, names: Sequence[str]) -> str | None:
    """The tool whose *description* ``variable`` is, or ``None``: a ``location`` of
    ``tool:<name>`` (also ``tools:<name>``, ``tool_description:<name>``); else a
    ``role`` that says ``description`` and names one of ``names`` as a whole word
    (and does not speak of an argument or parameter). Any longer location
    (``tool:<name>:<argument>``) is not a tool description.

    >>> v = PromptVariable("2", "tool description", "tool:refunds", True, "...")
    >>> tool_of_variable(v, []), tool_of_variable(
    ...     PromptVariable("3", "description of the repairs tool", "", True, ""),
    ...     ["repairs"])
    ('refunds', 'repairs')
    """
    match = _TOOL_LOCATION.match(variable.location.strip())
    if match is not None:
        return match["name"]
    role = variable.role.casefold()
    if "description" not in role or re.search(
        r"\b(?:argument|parameter|arg)s?\b", role
    ):
        return None
    for name in names:
        if re.search(rf"(?<![\w-]){re.escape(name.casefold())}(?![\w-])", role):
            return name
    return None


def _called_phrase(tools: Sequence[str]) -> str:
    if not tools:
        return "no tool call"
    calls = [f"a call to {t}" for t in tools]
    return calls[0] if len(calls) == 1 else ", ".join(calls[:-1]) + " and " + calls[-1]


def _tool_items(value: Any) -> list[Mapping[str, Any]]:
    """The objects of a JSON value that may be tools or tool calls: a list's items,
    an object's ``tools``/``tool_calls`` items, or the object itself."""
    if isinstance(value, list):
        return [v for v in value if isinstance(v, Mapping)]
    if isinstance(value, Mapping):
        nested = [
            v
            for key in ("tools", "tool_calls")
            if isinstance(value.get(key), list)
            for v in value[key]
            if isinstance(v, Mapping)
        ]
        return nested or [value]
    return []


@dataclass(frozen=True)
class ShownTools:
    """What a chat-backward prompt shows of tool calling (see :func:`shown_tools`).

    ``called``: the tools its ``<LM_OUTPUT>`` calls; ``offered``: the tools listed in
    the conversation as tool definitions (the request's ``tools``), with their
    descriptions; ``named``: every tool name shown (offered, called in the output or
    in an assistant message, a tool-description variable); ``evidence``: whether
    the prompt shows tool calling at all."""

    called: tuple[str, ...] = ()
    offered: tuple[ToolSpec, ...] = ()
    named: tuple[str, ...] = ()
    evidence: bool = False

    def accepts(self, expected: Sequence[str]) -> bool:
        """Whether feedback naming ``expected`` (``()``: no tool) is about this
        prompt's tool calls: the prompt shows tool calling, and, when it lists the
        offered tools, every expected name is one of them."""
        if not self.evidence:
            return False
        offered = {spec.name for spec in self.offered}
        return not offered or all(name in offered for name in expected)


def shown_tools(prompt: ChatBackwardPrompt, expected: Sequence[str] = ()) -> ShownTools:
    """What ``prompt`` shows of tool calling. The prompt shows tool calling when

    * its ``<LM_OUTPUT>`` holds tool calls (a JSON list, or an object with
      ``tool_calls``, of calls in OpenAI's shape ``{"function": {"name"}}`` or
      LangChain's ``{"name", "args"}``);
    * a variable is a tool's description or argument (a ``location`` of
      ``tool:<name>``, ``tools:<name>``, ``tool_description:<name>``, optionally
      ``:<argument>``), or a variable's role names one of the ``expected`` tools as
      the tool it describes (``description of the repairs tool``);
    * a message of the conversation is a ``tool`` result, or its text is JSON
      holding tool calls or tool definitions (``[{"type": "function", "function":
      {"name", "description", "parameters"}}]``, LangChain's ``{"name",
      "description", "parameters"}``, or an object with a ``tools`` list) that list
      one of the ``expected`` tools (or any, when no tool is expected).

    >>> prompt = ChatBackwardPrompt(messages=(Message("user", "Leak"),),
    ...     feedback="", variables=(), output='[{"name": "cleaning", "args": {}}]')
    >>> shown_tools(prompt).called, shown_tools(prompt).evidence
    (('cleaning',), True)
    """
    called = _called_in_output(prompt.output)
    named: list[str] = list(called)
    offered: list[ToolSpec] = []
    evidence = bool(called)
    for message in prompt.messages:
        if message.role == "tool":
            evidence = True
        is_json, value = _json_value(message.text.strip())
        for item in _tool_items(value) if is_json else ():
            function = item.get("function")
            spec = function if isinstance(function, Mapping) else item
            name = spec.get("name")
            if not isinstance(name, str) or re.fullmatch(TOOL_NAME, name) is None:
                continue
            if name not in named:
                named.append(name)
            if "args" in spec or "arguments" in spec:  # a call
                evidence = evidence or not expected or name in expected
            elif "parameters" in spec or "description" in spec:  # a definition
                description = spec.get("description")
                offered.append(
                    ToolSpec(name, description if isinstance(description, str) else "")
                )
    if offered and (not expected or any(s.name in expected for s in offered)):
        evidence = True
    for variable in prompt.variables:
        location = variable.location.strip()
        located = re.match(
            r"^tools?(?:[ _-]?description)?\s*:\s*(?P<name>" + TOOL_NAME + r")",
            location,
            re.IGNORECASE,
        )
        name = located["name"] if located else tool_of_variable(variable, expected)
        if name is not None:
            evidence = True
            if name not in named:
                named.append(name)
    return ShownTools(called, tuple(offered), tuple(named), evidence)


def _description_specs(
    prompt: ChatBackwardPrompt, shown: ShownTools
) -> tuple[ToolSpec, ...]:
    """The tools of ``prompt`` with the descriptions it shows (a tool-description
    variable's text over the conversation's definition), for re-running the
    routing of the call (see :func:`tool_routing`)."""
    specs = {spec.name: spec for spec in shown.offered}
    for name in shown.named:
        specs.setdefault(name, ToolSpec(name))
    for variable in prompt.variables:
        name = tool_of_variable(variable, list(specs))
        if name is not None:
            specs[name] = ToolSpec(name, variable.text)
    return tuple(specs.values())


def deciding_rule(
    prompt: ChatBackwardPrompt, expected: Sequence[str], shown: ShownTools
) -> ToolRule | None:
    """The rule that decided the wrong call shown in ``prompt``, or ``None``: the
    routing is re-run on the prompt's conversation and the tools it shows (see
    :func:`tool_routing`); among the deciding rules, the first whose tools differ
    from ``expected`` (a ``call no tool`` when a tool is expected, a rule calling a
    tool that is not expected or missing one that is).

    >>> prompt = ChatBackwardPrompt(
    ...     messages=(Message("system", 'If the message mentions "leak", call '
    ...                       'cleaning.'), Message("user", "A leak, again")),
    ...     feedback="", variables=(), output='[{"name": "cleaning", "args": {}}]')
    >>> rule = deciding_rule(prompt, ["repairs"], shown_tools(prompt, ["repairs"]))
    >>> rule.kind, rule.word
    ('mentions', 'leak')
    """
    request = SimRequest.from_messages(
        [{"role": m.role, "content": m.text} for m in prompt.messages]
    )
    _, rules = tool_routing(request, _description_specs(prompt, shown))
    wanted = set(expected)
    return next((rule for rule in rules if set(rule.tools) != wanted), None)


def _proposed_words(
    prompt: ChatBackwardPrompt,
    shown: ShownTools,
    tools: Sequence[str],
    decided: ToolRule | None,
) -> tuple[str | None, list[str]]:
    """The topic word of the prompt's message for ``tools`` (:func:`tool_topic_word`,
    ``None`` without one) and the words a backward proposes rules for: that topic
    word, then the :func:`lead_line_words`, one per stem, the ``decided`` rule's word
    left out."""
    message = tool_message(prompt.messages)
    specs = _description_specs(prompt, shown)
    wanted = [next((s for s in specs if s.name == n), ToolSpec(n)) for n in tools]
    others = [s for s in specs if s.name not in tools]
    topic = tool_topic_word(message, wanted, others) if wanted else None
    words: list[str] = []
    stems = {_stem(decided.word)} if decided is not None else set()
    for word in [*([topic] if topic else []), *lead_line_words(message)]:
        if _stem(word) not in stems:
            stems.add(_stem(word))
            words.append(word)
    return topic, words


def tool_confirmation_gradients(
    prompt: ChatBackwardPrompt, confirmed: Sequence[str], shown: ShownTools
) -> list[str]:
    """The gradients of a ChatCompletion backward call whose feedback says its tool
    calls were right (:func:`confirmed_tools`): each rule that decided the call is
    *confirmed*, written again as it stands, so that the optimizer weighs the
    samples a rule routes rightly against those asking to correct it (see
    :func:`improve_value`: a vote, the rule text unchanged when the confirmations
    win); and, like a wrong call's backward, the words the message is about are
    proposed for the confirmed tools, so that every sample, right or wrong, votes on
    the words of its lead line. The routing is re-run on the prompt's conversation
    and the tools it shows (:func:`tool_routing`). A call that answered in text
    after the tool results (:func:`_answered_after_tools`) relays the confirmation
    to its non-trainable inputs (``The tool calls match the reference: [...]``), so
    that it reaches the call that chose the tools.

    * when a rule decided the call, the first trainable ``system`` variable gets the
      deciding prompt rule (``If the message <kind> "<word>", call <tools>.``), then
      ``mentions`` rules for the topic word and the lead-line words (as
      :func:`tool_backward_gradients` proposes them);
    * the trainable description of a confirmed tool gets the rule of its own that
      decided, else ``Use this tool when the message mentions "<topic word>".``
      when the message has a topic word for the confirmed tools (a vote to keep or
      add it, weighed against removals);
    * every other variable ``The <role> led to <the call> for this input.`` (no
      edit).

    >>> prompt = ChatBackwardPrompt(
    ...     messages=(Message("system", 'If the message mentions "leak", call '
    ...                       'repairs.'), Message("user", "A leak, again")),
    ...     feedback="The tool calls match the reference: [repairs].",
    ...     variables=(PromptVariable("1", "system prompt", "system", True, "..."),),
    ...     output='[{"name": "repairs", "args": {}}]')
    >>> tool_confirmation_gradients(prompt, ["repairs"], shown_tools(prompt))
    ['If the message mentions "leak", call repairs.']
    """
    request = SimRequest.from_messages(
        [{"role": m.role, "content": m.text} for m in prompt.messages]
    )
    _, rules = tool_routing(request, _description_specs(prompt, shown))
    if _answered_after_tools(prompt, shown):  # the call that chose carries it
        relay = f"The tool calls match the reference: {_listed_tools(confirmed)}."
        return [
            f"The {variable.role} led to {_called_phrase(confirmed)} for this input."
            if variable.trainable
            else relay
            for variable in prompt.variables
        ]
    wanted = set(confirmed)
    deciding = [rule for rule in rules if set(rule.tools) <= wanted]
    known = [*confirmed, *(n for n in shown.named if n not in confirmed)]
    phrase = _called_phrase(confirmed).replace("a call", "the call", 1)
    gradients: list[str] = []
    rule_given = False
    for variable in prompt.variables:
        tool = tool_of_variable(variable, known) if variable.trainable else None
        own = next(
            (
                r
                for r in deciding
                if r.source == "description" and tool is not None and tool in r.tools
            ),
            None,
        )
        prompt_rule = next((r for r in deciding if r.source == "prompt"), None)
        if not rule_given and variable.trainable and variable.location == "system":
            rule_given = True
            if deciding:
                _, words = _proposed_words(prompt, shown, confirmed, prompt_rule)
                rules = [prompt_rule.text()] if prompt_rule is not None else []
                rules.extend(
                    tool_rule_sentence("mentions", w, confirmed) for w in words
                )
                gradients.append(" ".join(rules))
                continue
        elif own is not None and tool in wanted:
            gradients.append(own.text())
            continue
        elif tool is not None and tool in wanted and deciding:
            topic, _ = _proposed_words(prompt, shown, confirmed, None)
            if topic is not None:  # a vote for the description's own word
                gradients.append(tool_description_sentence("mentions", topic))
                continue
        gradients.append(f"The {variable.role} led to {phrase} for this input.")
    return gradients


STEM_LETTERS = 5
"""Words are compared by their first ``STEM_LETTERS`` letters (casefolded, a plural
``s`` dropped; a shorter word whole), a crude stemmer that is the same for every
task: ``repair``/``repairs``/``repairing``, ``clean``/``cleaning``,
``maintain``/``maintenance``, ``leak``/``leaks`` meet (see :func:`tool_vocabulary`)."""


def _stem(word: str) -> str:
    """``word``'s stem: casefolded, a possessive ``'s`` dropped, a plural ``s``
    dropped (not ``ss``), then its first :data:`STEM_LETTERS` letters.

    >>> _stem("HVAC's"), _stem("Repairs"), _stem("glass")
    ('hvac', 'repai', 'glass')
    """
    word = word.casefold().replace("\u2019", "'")
    if word.endswith("'s"):
        word = word[:-2]
    word = word.rstrip("'")
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        word = word[:-1]
    return word[:STEM_LETTERS]


_WORD_PART = re.compile(r"[^\W\d_]+(?:['\u2019][^\W\d_]+)*")
_CAMEL = re.compile(r"(?<=[^\W\d_])(?=[A-Z][a-z])|(?<=[a-z])(?=[A-Z])")


def _word_parts(word: str) -> list[tuple[str, int]]:
    """The parts of one word of :data:`_WORD` with their offsets in it: split at
    hyphens (``HVAC-related``: ``HVAC``, ``related``) and at camelCase humps
    (``lookupOrder``: ``lookup``, ``Order``), a possessive ``'s`` dropped (``HVAC's``:
    ``HVAC``)."""
    parts: list[tuple[str, int]] = []
    for match in _WORD_PART.finditer(word):
        at = match.start()
        for piece in _CAMEL.split(match[0]):
            text = re.sub(r"['\u2019]s$", "", piece, flags=re.IGNORECASE)
            if text:
                parts.append((text, at))
            at += len(piece)
    return parts


def _negated_offsets(text: str) -> frozenset[int]:
    """The offsets (in ``text``) of the words that a negator negates, as
    :func:`lead_word` reads them: the first content word after a :data:`NEGATORS`
    word or a ``...n't`` (stopwords in between do not end the negation)."""
    return frozenset(
        match.start() + at
        for match, _, negated in _scan_words(text)
        if negated
        for _, at in _word_parts(match[0])
    )


def _content_words(text: str) -> list[tuple[str, int]]:
    """The content words of ``text`` with their offsets, as :func:`lead_word` reads
    them (headers skipped, :data:`STOPWORDS` and one-letter words left out, a word
    right after a negator left out), in order; a hyphenated or camelCase word gives
    its parts, a possessive ``'s`` dropped (see :func:`_word_parts`), casefolded.

    >>> _content_words("Subject: our HVAC-related issue, not urgent")
    [('hvac', 13), ('related', 18), ('issue', 26)]
    """
    body = _skip_headers(text)
    skipped = len(text) - len(body)
    words: list[tuple[str, int]] = []
    for match, _, negated in _scan_words(body):
        if negated:
            continue
        words.extend(
            (part.casefold(), skipped + match.start() + at)
            for part, at in _word_parts(match[0])
            if part.casefold() not in STOPWORDS and len(part) >= 2
        )
    return words


def tool_vocabulary(specs: Sequence[ToolSpec]) -> frozenset[str]:
    """The stems (:data:`STEM_LETTERS`) of the words that name or describe the tools
    ``specs``: each tool's name (split at ``_``, ``-`` and camelCase humps) and its
    description without rule sentences (:func:`strip_rules`), hyphenated words split
    and possessives dropped (see :func:`_word_parts`); words of at least three
    letters that are not :data:`STOPWORDS`.

    >>> sorted(tool_vocabulary([ToolSpec("book_repair", "Fixes HVAC and leaks. "
    ...     'Use this tool when the message mentions "urgent".')]))
    ['book', 'fixe', 'hvac', 'leak', 'repai']
    >>> sorted(tool_vocabulary([ToolSpec("lookupOrder", "The shop's order-history.")]))
    ['histo', 'looku', 'order', 'shop']
    """
    stems: set[str] = set()
    for spec in specs:
        text = re.sub(r"[_-]+", " ", spec.name) + " " + strip_rules(spec.description)
        for match in _WORD.finditer(text):
            for part, _ in _word_parts(match[0]):
                word = part.casefold()
                if len(word) >= 3 and word not in STOPWORDS:
                    stems.add(_stem(word))
    return frozenset(stems)


def tool_topic_word(
    text: str, specs: Sequence[ToolSpec], others: Sequence[ToolSpec] = ()
) -> str | None:
    """The first content word of the message ``text`` (rule sentences removed, read
    as :func:`lead_word` reads it, hyphenated words split, see :func:`_content_words`)
    that names one of the tools ``specs`` or occurs in its description (see
    :func:`tool_vocabulary`) and does *not* name or describe any of the ``others``
    (the other offered tools), casefolded; ``None`` when no word does. A model asked
    to route a message to a tool names the message's word that ties it to that tool
    and to no other (``HVAC`` for a tool that repairs HVAC), not whatever word the
    message begins with, nor a word every tool shares (``order`` when lookup, refund
    and escalation tools all speak of orders).

    >>> repairs = ToolSpec("repairs", "Book a technician: HVAC, plumbing, leaks.")
    >>> tool_topic_word("Subject: Urgent - our HVAC failed", [repairs])
    'hvac'
    >>> tool_topic_word("Please repair the door", [repairs])
    'repair'
    >>> tool_topic_word("Thanks for the visit", [repairs]) is None
    True
    >>> refund = ToolSpec("refund", "Refund an order.")
    >>> lookup = ToolSpec("lookup_order", "Look up an order.")
    >>> tool_topic_word("My order: I want a refund", [refund], [lookup])
    'refund'
    """
    vocabulary = tool_vocabulary(specs) - tool_vocabulary(others)
    for word, _ in _content_words(strip_rules(text)):
        if len(word) >= 3 and _stem(word) in vocabulary:
            return word
    return None


LEAD_LINE_WORDS = 8
"""At most this many words of a message's lead line are proposed as routing words
(see :func:`lead_line_words`)."""


def lead_line_words(text: str) -> list[str]:
    """The words of the *lead line* of ``text`` that a rule may name: its first line
    holding a content word, rule sentences removed and headers skipped as
    :func:`lead_word` reads them (an e-mail's subject, a ticket's title, a one-line
    message: the line that says what the text is about); its content words (see
    :func:`_content_words`) of at least three letters, one per stem
    (:func:`_stem`), in order, at most :data:`LEAD_LINE_WORDS`. Casefolded.

    >>> lead_line_words("Subject: Urgent HVAC Repair Needed\\n\\nDear team, ...")
    ['urgent', 'hvac', 'repair', 'needed']
    >>> lead_line_words("Hello!\\nThe sink leaks, not the pipes.")
    ['sink', 'leaks']
    """
    body = _skip_headers(strip_rules(text))
    for line in body.splitlines():
        words: list[str] = []
        stems: set[str] = set()
        for word, _ in _content_words(line):
            if len(word) >= 3 and _stem(word) not in stems:
                stems.add(_stem(word))
                words.append(word)
        if words:
            return words[:LEAD_LINE_WORDS]
    return []


def _listed_tools(names: Sequence[str]) -> str:
    """``[a, b]``: tool names as :func:`expected_tools` and :func:`confirmed_tools`
    read them."""
    return "[" + ", ".join(names) + "]"


def _current_turn_messages(messages: Sequence[Message]) -> Sequence[Message]:
    """The messages after the last ``user`` (``human``) message."""
    last_user = max(
        (i for i, m in enumerate(messages) if m.role in _USER_ROLES), default=-1
    )
    return messages[last_user + 1 :]


def _answered_after_tools(prompt: ChatBackwardPrompt, shown: ShownTools) -> bool:
    """Whether the call of ``prompt`` answered in text after this turn's tool
    results *as its rules say*: its output calls no tool, the conversation holds a
    ``tool`` message after the last user message, and the rules route no tool that
    was not called yet. Such a call did not choose the tools: the call that did
    carries the routing feedback (one vote per sample, see :func:`improve_value`)."""
    if shown.called:
        return False
    turn = _current_turn_messages(prompt.messages)
    if not any(m.role == "tool" for m in turn):
        return False
    raw = [{"role": m.role, "content": m.text} for m in prompt.messages]
    routed, _ = tool_routing(
        SimRequest.from_messages(raw), _description_specs(prompt, shown)
    )
    done = set(_called_in_conversation(turn))
    return all(name in done for name in routed)


def _called_in_conversation(messages: Sequence[Message]) -> list[str]:
    """The tools the assistant messages of ``messages`` call, as the backward prompt
    shows them: the message's text is JSON tool calls, or ends with them after some
    text (``Let me check.\\n[{"name": ...}]``, LangChain's rendering of a message
    with both)."""
    names: list[str] = []
    for message in messages:
        if message.role not in ("assistant", "ai"):
            continue
        text = message.text.strip()
        found = _called_in_output(text)
        for at in (m.start() for m in re.finditer(r"\n\s*[\[{]", text)):
            if found:
                break
            found = _called_in_output(text[at:])
        names.extend(name for name in found if name not in names)
    return names


def tool_backward_gradients(
    prompt: ChatBackwardPrompt,
    expected: Sequence[str],
    shown: ShownTools | None = None,
) -> list[str]:
    """The gradients of a ChatCompletion backward call whose feedback names the
    tools that should have been called (see :func:`expected_tools`; ``()``: none)
    and whose prompt shows tool calling (``shown``, see :func:`shown_tools`).

    A call that answered in text after this turn's tool results, as its rules say
    (:func:`_answered_after_tools`), did not choose the tools: every variable gets
    ``The <role> should lead to <the calls> for this input.`` (no rule); the call
    that chose them carries the feedback.

    Otherwise the rules proposed, all for the expected tools (``call no tool`` when
    none is expected):

    * when a rule decided the wrong call (:func:`deciding_rule`: the routing re-run
      on the prompt), that rule's own word and kind, to correct it in place (the
      optimizer weighs the correction against the samples that confirm the rule,
      see :func:`tool_confirmation_gradients` and :func:`improve_value`);
    * a ``mentions`` rule for the message's *topic word* for the expected tools
      (:func:`tool_topic_word`: its first word that names an expected tool or occurs
      in that tool's description, as the prompt shows it, and names or describes
      none of the other tools shown);
    * a ``mentions`` rule for each word of the message's lead line
      (:func:`lead_line_words`: what the message says it is about), one per stem,
      the words above left out. A model asked why a message should go to a tool
      names the words that say what the message is about; which of them matter is
      for the optimizer to weigh over the batch (only words that many samples tie
      to the same tools become rules).

    The first trainable ``system`` variable gets these rules, in that order, as
    sentences ``If the message <kind> "<word>", call <tools>.``; without any,
    ``The <role> should lead to <the calls> for inputs like this one. No rule can be
    written: <reason>``. A trainable tool description (:func:`tool_of_variable`) of
    an expected tool gets ``Use this tool when the message mentions "<word>".`` for
    the topic word, else (no rule decided) the first lead-line word; that of a tool
    that was called (the ``<LM_OUTPUT>``'s calls) or routed by its description but
    not expected ``Do not use this tool when the message <kind> "<word>".`` (the
    deciding rule's word, else the first proposed word); every other variable
    ``The <role> should lead to a call to <tool> for this input.`` (``... to no
    tool call ...``).

    >>> prompt = ChatBackwardPrompt(
    ...     messages=(Message("system", "Route the message."),
    ...               Message("user", "Leak under the sink")),
    ...     feedback="Expected a call to repairs, got cleaning.",
    ...     variables=(PromptVariable("1", "system prompt", "system", True, "..."),
    ...                PromptVariable("2", "tool description", "tool:repairs", True,
    ...                               "Fixes things.")),
    ...     output='[{"name": "cleaning", "args": {}}]')
    >>> tool_backward_gradients(prompt, ["repairs"])  # doctest: +NORMALIZE_WHITESPACE
    ['If the message mentions "leak", call repairs. If the message mentions "sink",
      call repairs.',
     'Use this tool when the message mentions "leak".']
    """
    shown = shown_tools(prompt, expected) if shown is None else shown
    phrase = _called_phrase(expected)
    if _answered_after_tools(prompt, shown):
        turn = _current_turn_messages(prompt.messages)
        relay = (
            f"Expected tool calls: {_listed_tools(expected)}, got "
            f"{_listed_tools(_called_in_conversation(turn))}."
        )
        return [
            f"The {variable.role} should lead to {phrase} for this input."
            if variable.trainable
            else relay
            for variable in prompt.variables
        ]
    decided = deciding_rule(prompt, expected, shown)
    topic, words = _proposed_words(prompt, shown, expected, decided)
    rules = (
        [tool_rule_sentence(decided.kind, decided.word, expected)] if decided else []
    )
    rules.extend(tool_rule_sentence("mentions", word, expected) for word in words)
    # a description names only a word of its own: the topic word, or (when no rule
    # decided) the first word proposed; never a reused deciding rule's word, which
    # may be any tool's (a prompt rule corrected in place settles it there)
    own = (
        topic
        if topic is not None
        else (words[0] if words and decided is None else None)
    )
    removal = (
        RuleWord(decided.word, decided.kind)
        if decided is not None
        else RuleWord(words[0], "mentions")
        if words
        else RuleWord(None, "mentions")
    )
    called = list(shown.called)
    if decided is not None and decided.source == "description":
        called.extend(n for n in decided.tools if n not in called)
    known = [*expected, *(n for n in shown.named if n not in expected)]
    gradients: list[str] = []
    rule_given = False
    for variable in prompt.variables:
        role = variable.role
        tool = tool_of_variable(variable, known) if variable.trainable else None
        if not rule_given and variable.trainable and variable.location == "system":
            rule_given = True
            if rules:
                gradients.append(" ".join(rules))
            else:
                gradients.append(
                    f"The {role} should lead to {phrase} for inputs like this one. "
                    "No rule can be written: the input holds no content word of "
                    "three letters or more (not a stopword, not negated)."
                )
        elif tool is not None and own is not None and tool in expected:
            gradients.append(tool_description_sentence("mentions", own))
        elif tool is not None and removal.word is not None and tool in called:
            gradients.append(
                f"Do not use this tool when the message {removal.kind} "
                f'"{removal.word}".'
            )
        else:
            gradients.append(f"The {role} should lead to {phrase} for this input.")
    return gradients
