"""Responders for the prompts of peer libraries: TextGrad 0.1.8 and Trace's OptoPrime.

Part of the simulator's rule world (:mod:`afnio.testing.world`): a **deterministic
stand-in, not a model**. These responders let the benchmark scripts of
``benchmarks/peers/`` run one real optimization step of TextGrad (``textgrad`` 0.1.8)
and of Trace (``trace-opt`` 0.1.3.8) against the simulator, with answers that follow
each library's output format and carry the same rule-world logic as afnio's own
backward and optimizer answers. They are registered in :data:`world.RESPONDERS` right
after :func:`world.optimizer_responder`, before the DSPy and task responders (a peer's
backward or optimizer prompt quotes the task's system prompt, rules included, so it
must be recognised before the task rules are looked at).

Responders, in order:

1. :func:`textgrad_optimizer_responder`, a TGD update call
   (``textgrad/optimizer/optimizer_prompts.py``). Marker: a ``user`` message holding
   ``<ROLE>``, ``<VARIABLE>`` and TGD's format line ``in the following format:
   <START>{the improved variable}<END>`` (the tags are read from it, so custom
   ``new_variable_tags`` work). The current value is the first ``<VARIABLE>``; when
   TextGrad shortened it (``get_short_value``: the first and last 10 words around
   ``" (...) "``), the full value is taken from an ``<LM_SYSTEM_PROMPT>`` of the
   context that starts and ends with those words (else the short value is kept, as a
   model would). Every rule sentence of the ``<FEEDBACK>`` elements (or of
   ``<CONTEXT>`` when there are none) is applied with :func:`world.improve_value`,
   deduplicated and in sorted order (TextGrad keeps gradients in a ``set``, so their
   order in the prompt changes from run to run; sorting keeps the answer, and the
   new prompt, the same). ``Do not use the character "<c>".`` in ``<CONSTRAINTS>``
   is honoured. Answer: ``<IMPROVED_VARIABLE>new value</IMPROVED_VARIABLE>``.
2. :func:`textgrad_backward_responder`, a TextGrad backward (feedback) call
   (``textgrad/autograd/llm_backward_prompts.py`` and ``string_based_ops.py``).
   Marker: a ``user`` message holding ``<OBJECTIVE_FUNCTION>``, ``<VARIABLE>`` and
   ``<LM_OUTPUT>`` or ``<OUTPUT_OF_FUNCTION>``. The answer is plain text:

   * through a ``StringBasedFunction`` (``<INPUTS_TO_FUNCTION>`` entries
     ``**Name(role: ...)**: value``): the prediction is the input equal to the
     ``<VARIABLE>`` text, the target the input named or described as ground truth /
     correct / target / expected / label / reference; the function output ``0``
     (or ``false``) means wrong, ``1`` (or ``true``) right, anything else is decided
     by :func:`world.judgement_matches`. Wrong: ``The prediction "<p>" is wrong: the
     expected value is "<t>". Change what produces it so that this input leads to
     "<t>".`` (the wording of afnio's evaluator backward); right: ``The <role> is
     correct for this input: no change is needed.``; undecidable: ``The <role>
     should address this evaluation: <output>``.
   * through an ``LLMCall`` (``<LM_SYSTEM_PROMPT>``, ``<LM_INPUT>``, ``<LM_OUTPUT>``):
     the feedback is the text after ``feedback on the LM_OUTPUT:`` in
     ``<OBJECTIVE_FUNCTION>`` (chain template) or the ``<LM_OUTPUT>`` itself (base
     template: the output is an evaluation); the gradient is
     :func:`world.chat_backward_gradients` of that conversation, the variable being
     the system prompt when its text is the ``<LM_SYSTEM_PROMPT>`` (or TextGrad's
     short form of it). So the system prompt gets ``If the message mentions
     "<word>", the <field> is <target>.`` when the feedback names an expected value
     (no rule for the default label ``neutral``), else a short generic critique.
3. :func:`optoprime_responder`, a Trace ``OptoPrime`` update call
   (``opto/optimizers/optoprime.py``). Marker: a ``system`` message holding
   ``#Variables`` and the ``"suggestion"`` output format, and a ``user`` message
   holding ``#Variables`` and ``#Feedback``. The problem instance after ``Now you see
   problem instance:`` is parsed: ``#Code`` lines ``out = fn(k=v, ...)``,
   ``(type) name=value`` entries of ``#Variables``/``#Inputs``/``#Outputs`` and the
   ``#Feedback``. A batched feedback (``ID [i]: ...`` lines, Trace's ``batchify``)
   is matched to the ``i``-th argument of the output's code line, whose input is
   found by following ``#Code`` back to the ``#Inputs``; an unbatched feedback goes
   with all the inputs. Every item naming an expected value (``We expect the output
   of your answer to be "<t>"``, ``the expected value is "<t>"``...) other than the
   default label gives the rule ``If the message mentions "<word>", the <field> is
   <t>.`` (``<word>``: :func:`world.salient_word` of its input), applied in item
   order to the first ``(str)`` variable with :func:`world.improve_value` (honouring
   ``#Constraints``). Answer: the JSON object ``{"reasoning": ..., "answer": "",
   "suggestion": {"<variable>": "<new value>"}}`` (``suggestion`` is ``{}`` when
   nothing changes; the answer never holds ``TERMINATE``).

Example::

    >>> from afnio.testing.world import SimRequest, respond
    >>> user = ("Here is the role of the variable you will improve: <ROLE>system "
    ...     "prompt</ROLE>.\\n\\nThe variable is the text within the following span: "
    ...     "<VARIABLE> Classify. </VARIABLE>\\n\\n<CONTEXT><FEEDBACK>If the message "
    ...     'mentions "awful", the sentiment is negative.</FEEDBACK></CONTEXT>\\n\\n'
    ...     "Send the improved variable in the following format:\\n\\n"
    ...     "<IMPROVED_VARIABLE>{the improved variable}</IMPROVED_VARIABLE>\\n\\n")
    >>> respond(SimRequest.from_messages([{"role": "user", "content": user}]))
    '<IMPROVED_VARIABLE>Classify. If the message mentions "awful", the sentiment is negative.</IMPROVED_VARIABLE>'
"""  # noqa: E501

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from afnio.testing.world import (
    _TARGET_IN_FEEDBACK,
    DEFAULT_FIELD,
    DEFAULT_LABEL,
    RULE_PATTERN,
    Answer,
    ChatBackwardPrompt,
    Element,
    Message,
    PromptVariable,
    SimRequest,
    _json_answer,
    _marked_user_text,
    chat_backward_gradients,
    expand_alternatives,
    find_rules,
    improve_value,
    judgement_matches,
    salient_word,
)

__all__ = [
    "OptoPrimeProblem",
    "optoprime_responder",
    "optoprime_suggestion",
    "textgrad_backward_responder",
    "textgrad_feedback",
    "textgrad_optimizer_responder",
    "textgrad_improved_value",
]

_TGD_FORMAT = re.compile(
    r"in the following format:\s*(?P<start><[^<>\s]+>)\{the improved variable\}"
    r"(?P<end></?[^<>\s]+>)"
)
_SHORT_SEPARATOR = " (...) "
_FUNCTION_INPUT = re.compile(r"\*\*(?P<name>[^*\n]+?)\(role: (?P<role>[^\n]*?)\)\*\*: ")
_TARGET_NAME = re.compile(
    r"ground[ _]truth|correct|target|expected|label|reference", re.IGNORECASE
)
_EXPECTED = re.compile(r'expect(?:ed|s)?\b[^"\n]{0,60}?"(?P<target>[^"\n]+)"', re.I)
_TRUE = {"1", "1.0", "true", "yes", "correct"}
_FALSE = {"0", "0.0", "false", "no", "incorrect", "wrong"}
FEEDBACK_EXCERPT_CHARS = 200
"""How much of an evaluation a generic critique quotes."""


# -- TextGrad: the TGD optimizer ---------------------------------------------------


def _expand_short(value: str, text: str) -> str:
    """The full text that TextGrad's ``get_short_value`` shortened to ``value``,
    searched among the ``<LM_SYSTEM_PROMPT>`` elements of ``text``; ``value`` itself
    when it is not shortened or no element fits."""
    if _SHORT_SEPARATOR not in value:
        return value
    head, tail = value.split(_SHORT_SEPARATOR, 1)
    for element in Element.all("LM_SYSTEM_PROMPT", text):
        full = element.text.strip()
        if full.startswith(head) and full.endswith(tail):
            return full
    return value


def _same_variable(variable: str, text: str) -> bool:
    """Whether ``variable`` (stripped, maybe TextGrad's short form) is ``text``."""
    full = text.strip()
    if variable == full:
        return True
    if _SHORT_SEPARATOR in variable:
        head, tail = variable.split(_SHORT_SEPARATOR, 1)
        return bool(head) and full.startswith(head) and full.endswith(tail)
    return False


def textgrad_improved_value(text: str) -> str:
    """The new value a TGD prompt's ``user`` text asks for (see
    :func:`textgrad_optimizer_responder`), without the tags.

    >>> textgrad_improved_value(
    ...     "<VARIABLE> Be brief. </VARIABLE><CONTEXT>"
    ...     '<FEEDBACK>If the message mentions "wow", the mood is up.</FEEDBACK>'
    ...     '<FEEDBACK>If the message mentions "bad", the mood is down.</FEEDBACK>'
    ...     "</CONTEXT>")
    'Be brief. If the message mentions "bad", the mood is down. If the message mentions "wow", the mood is up.'
    """  # noqa: E501
    variable = Element.first("VARIABLE", text)
    current = _expand_short(variable.text.strip() if variable else "", text)
    context = Element.first("CONTEXT", text)
    scope = context.text if context else text
    feedbacks = [el.text for el in Element.all("FEEDBACK", scope)]
    if not feedbacks and context is not None:
        feedbacks = [context.text]
    sentences: dict[str, str] = {}
    for feedback in feedbacks:
        for line in feedback.splitlines():
            for expanded in expand_alternatives(line):
                for rule in find_rules(expanded):
                    sentence = (
                        f'If the message mentions "{rule.word}", the {rule.field} is '
                        f"{rule.label}."
                    )
                    sentences.setdefault(sentence.casefold(), sentence)
    ordered = [sentences[key] for key in sorted(sentences)]
    constraints = Element.first("CONSTRAINTS", text)
    return improve_value(
        current, "\n".join(ordered), constraints.text if constraints else ""
    )


def textgrad_optimizer_responder(request: SimRequest) -> Answer | None:
    """A TextGrad TGD update call (see the module docstring); ``None`` otherwise."""
    for message in request.messages:
        if message.role != "user":
            continue
        form = _TGD_FORMAT.search(message.text)
        if form is None or Element.first("VARIABLE", message.text) is None:
            continue
        value = textgrad_improved_value(message.text)
        return Answer(
            f"{form['start']}{value}{form['end']}", responder="textgrad_optimizer"
        )
    return None


# -- TextGrad: backward (feedback) calls ---------------------------------------------


def _function_inputs(text: str) -> list[tuple[str, str, str]]:
    """The ``(name, role, value)`` entries of a StringBasedFunction's inputs."""
    matches = list(_FUNCTION_INPUT.finditer(text))
    entries = []
    for k, match in enumerate(matches):
        end = matches[k + 1].start() if k + 1 < len(matches) else len(text)
        entries.append(
            (match["name"].strip(), match["role"].strip(), text[match.end() : end])
        )
    return [(name, role, value.strip()) for name, role, value in entries]


def _function_feedback(role: str, variable: str, text: str) -> str:
    inputs = _function_inputs(Element.first("INPUTS_TO_FUNCTION", text).text)
    output_el = Element.first("OUTPUT_OF_FUNCTION", text)
    output = output_el.text.strip() if output_el else ""
    prediction = next((e for e in inputs if e[2] == variable), None)
    if prediction is None:
        prediction = next(
            (e for e in inputs if re.search("predict|response", e[0] + e[1], re.I)),
            None,
        )
    target = next(
        (
            e
            for e in inputs
            if e is not prediction and _TARGET_NAME.search(f"{e[0]} {e[1]}")
        ),
        None,
    )
    if target is None:  # a chain call: the upstream feedback may name it
        objective = Element.first("OBJECTIVE_FUNCTION", text)
        found = _EXPECTED.search(objective.text if objective else "")
        target_value = found["target"] if found else None
    else:
        target_value = target[2]
    verdict = output.casefold()
    if verdict in _TRUE:
        wrong: bool | None = False
    elif verdict in _FALSE:
        wrong = True
    elif prediction is not None and target_value is not None:
        wrong = not judgement_matches(prediction[2], target_value)
    else:
        wrong = None
    if wrong is False:
        return f"The {role} is correct for this input: no change is needed."
    if wrong and target_value is not None:
        if prediction is not None and prediction[2] == variable:
            return (
                f'The prediction "{variable}" is wrong: the expected value is '
                f'"{target_value}". Change what produces it so that this input leads '
                f'to "{target_value}".'
            )
        return (
            f'The {role} should lead to the expected value "{target_value}" for this '
            "input."
        )
    excerpt = output[:FEEDBACK_EXCERPT_CHARS].strip()
    return f"The {role} should address this evaluation: {excerpt}"


def _llm_feedback(role: str, variable: str, text: str) -> str:
    system = Element.first("LM_SYSTEM_PROMPT", text)
    lm_input = Element.first("LM_INPUT", text)
    lm_output = Element.first("LM_OUTPUT", text)
    objective = Element.first("OBJECTIVE_FUNCTION", text)
    objective_text = objective.text if objective else ""
    marker = "feedback on the LM_OUTPUT:"
    if marker in objective_text:  # chain template: the output's own feedback
        feedback = objective_text.split(marker, 1)[1]
    else:  # base template: the output is the evaluation
        feedback = lm_output.text if lm_output else objective_text
    system_text = system.text if system else ""
    input_text = lm_input.text if lm_input else ""
    if _same_variable(variable, system_text):
        location = "system"
    elif _same_variable(variable, input_text):
        location = "input"
    else:
        location = "other"
    prompt = ChatBackwardPrompt(
        messages=(Message("system", system_text), Message("user", input_text)),
        feedback=feedback,
        variables=(PromptVariable("0", role, location, True, variable),),
    )
    return chat_backward_gradients(prompt)[0]


def textgrad_feedback(text: str) -> str:
    """The feedback for a TextGrad backward prompt's ``user`` text (see
    :func:`textgrad_backward_responder`).

    >>> textgrad_feedback(
    ...     "<ROLE> system prompt </ROLE> <LM_SYSTEM_PROMPT> Classify. "
    ...     "</LM_SYSTEM_PROMPT> <LM_INPUT> Awful service! </LM_INPUT> <LM_OUTPUT> "
    ...     "neutral </LM_OUTPUT> <OBJECTIVE_FUNCTION>Your goal is to give feedback "
    ...     "to the variable to address the following feedback on the LM_OUTPUT: "
    ...     'The prediction "neutral" is wrong: the expected value is "negative". '
    ...     "</OBJECTIVE_FUNCTION> <VARIABLE> Classify. </VARIABLE>")
    ... # doctest: +ELLIPSIS
    'If the message mentions "awful", the sentiment is negative. The prompt names no...'
    """
    role_el = Element.first("ROLE", text)
    role = " ".join(role_el.text.split()) if role_el else "variable"
    variables = Element.all("VARIABLE", text)
    variable = variables[-1].text.strip() if variables else ""
    if Element.first("INPUTS_TO_FUNCTION", text) is not None:
        return _function_feedback(role, variable, text)
    return _llm_feedback(role, variable, text)


def textgrad_backward_responder(request: SimRequest) -> Answer | None:
    """A TextGrad backward call through an ``LLMCall`` or a ``StringBasedFunction``
    (see the module docstring); ``None`` otherwise."""
    for tags in (
        ("OBJECTIVE_FUNCTION", "VARIABLE", "OUTPUT_OF_FUNCTION"),
        ("OBJECTIVE_FUNCTION", "VARIABLE", "LM_OUTPUT"),
    ):
        text = _marked_user_text(request, tags)
        if text is not None and _TGD_FORMAT.search(text) is None:
            return Answer(textgrad_feedback(text), responder="textgrad_backward")
    return None


# -- Trace: OptoPrime -------------------------------------------------------------

_SECTIONS = (
    "Instruction",
    "Code",
    "Documentation",
    "Variables",
    "Constraints",
    "Inputs",
    "Others",
    "Outputs",
    "Feedback",
)
_SECTION_LINE = re.compile(
    r"^#(?P<name>" + "|".join(_SECTIONS) + r")[ \t]*$", re.MULTILINE
)
_ENTRY = re.compile(r"^\((?P<type>[^()\n]*)\) (?P<name>[^=:\s]+)[=:]", re.MULTILINE)
_CODE_LINE = re.compile(r"^(?P<out>\S+) = (?P<fn>[^(\s]+)\((?P<args>.*)\)\s*$")
_FEEDBACK_ID = re.compile(r"^ID \[(?P<id>\d+)\]: ", re.MULTILINE)
_OPTOPRIME_START = "Now you see problem instance:"
_OPTOPRIME_ENDS = (
    "\nBelow are some variables and their feedbacks you received in the past.",
    "\nYour response:",
)


@dataclass(frozen=True)
class OptoPrimeProblem:
    """What the OptoPrime responder reads from a problem instance: the sections'
    texts, the ``(type, name, value)`` entries of the value sections and the code
    lines as ``{out: [argument names]}`` (in order)."""

    sections: dict[str, str]
    variables: list[tuple[str, str, str]]
    inputs: dict[str, str]
    outputs: list[tuple[str, str, str]]
    code: dict[str, list[str]]

    @classmethod
    def parse(cls, text: str) -> OptoPrimeProblem:
        """Parse the problem instance of an OptoPrime ``user`` prompt."""
        if _OPTOPRIME_START in text:
            text = text.rsplit(_OPTOPRIME_START, 1)[1]
        for end in _OPTOPRIME_ENDS:
            text = text.split(end, 1)[0]
        matches = list(_SECTION_LINE.finditer(text))
        sections: dict[str, str] = {}
        for k, match in enumerate(matches):
            end = matches[k + 1].start() if k + 1 < len(matches) else len(text)
            body = text[match.end() : end]
            body = re.sub(r"\n=+\s*$", "", body.rstrip())  # the closing rule
            sections.setdefault(match["name"], body.strip("\n"))
        code: dict[str, list[str]] = {}
        for line in sections.get("Code", "").splitlines():
            found = _CODE_LINE.match(line.strip())
            if found is None:
                continue
            args = [
                part.partition("=")[2].strip() or part.strip()
                for part in found["args"].split(", ")
                if part.strip()
            ]
            code[found["out"]] = args
        return cls(
            sections=sections,
            variables=_entries(sections.get("Variables", "")),
            inputs={n: v for _, n, v in _entries(sections.get("Inputs", ""))},
            outputs=_entries(sections.get("Outputs", "")),
            code=code,
        )

    def lineage(self, name: str, seen: frozenset[str] = frozenset()) -> list[str]:
        """The ``#Inputs`` values that ``name`` was computed from, in code order."""
        if name in self.inputs:
            return [self.inputs[name]]
        if name in seen:
            return []
        values: list[str] = []
        for argument in self.code.get(name, []):
            for value in self.lineage(argument, seen | {name}):
                if value not in values:
                    values.append(value)
        return values

    def feedback_items(self) -> list[tuple[str, str]]:
        """``(input text, feedback)`` per feedback item: ``ID [i]`` items go with
        the ``i``-th argument of the output's code line; a single feedback with
        all the inputs."""
        feedback = self.sections.get("Feedback", "")
        ids = list(_FEEDBACK_ID.finditer(feedback))
        output = self.outputs[0][1] if self.outputs else ""
        arguments = self.code.get(output, [])
        if not ids:
            return [("\n".join(self.inputs.values()), feedback)]
        items = []
        for k, match in enumerate(ids):
            end = ids[k + 1].start() if k + 1 < len(ids) else len(feedback)
            index = int(match["id"])
            source = self.lineage(arguments[index]) if index < len(arguments) else []
            items.append(("\n".join(source), feedback[match.end() : end].strip()))
        return items


def _entries(text: str) -> list[tuple[str, str, str]]:
    """The ``(type, name, value)`` entries of ``(type) name=value`` lines (a value
    runs to the next entry)."""
    matches = list(_ENTRY.finditer(text))
    entries = []
    for k, match in enumerate(matches):
        end = matches[k + 1].start() if k + 1 < len(matches) else len(text)
        entries.append((match["type"], match["name"], text[match.end() : end].strip()))
    return entries


def optoprime_suggestion(problem: OptoPrimeProblem) -> dict[str, object]:
    """The answer object for a parsed problem (see :func:`optoprime_responder`).

    >>> problem = OptoPrimeProblem.parse(
    ...     "#Code\\nclassify0 = classify(system_prompt=p0, message=m0)\\n"
    ...     "batchify0 = batchify(args_0=classify0)\\n\\n#Variables\\n"
    ...     "(str) p0=Classify.\\n\\n#Inputs\\n(str) m0=Awful!\\n\\n#Outputs\\n"
    ...     "(str) batchify0=ID [0]: neutral\\n\\n#Feedback\\nID [0]: The answer is "
    ...     'wrong. We expect the output of your answer to be "negative".')
    >>> optoprime_suggestion(problem)["suggestion"]
    {'p0': 'Classify. If the message mentions "awful", the sentiment is negative.'}
    """
    variable = next((v for v in problem.variables if v[0] == "str"), None)
    if variable is None:
        return {
            "reasoning": "No text variable to change in #Variables.",
            "answer": "",
            "suggestion": {},
        }
    _, name, current = variable
    rules = find_rules(current)
    field = rules[0].field if rules else DEFAULT_FIELD
    items = problem.feedback_items()
    proposed: list[str] = []
    wrong = 0
    for source, feedback in items:
        found = _EXPECTED.search(feedback) or _TARGET_IN_FEEDBACK.search(feedback)
        if found is None:
            continue
        wrong += 1
        target = found[1].strip()
        if target.casefold() == DEFAULT_LABEL:
            continue
        word = salient_word(RULE_PATTERN.sub("", source))
        if word is not None:
            sentence = f'If the message mentions "{word}", the {field} is {target}.'
            if sentence not in proposed:
                proposed.append(sentence)
    new = improve_value(
        current, "\n".join(proposed), problem.sections.get("Constraints", "")
    )
    if new != current:
        reasoning = (
            f"The feedback expects another output for {wrong} of {len(items)} "
            f"input(s); {name} gets the rule(s): {' '.join(proposed)}"
        )
        suggestion = {name: new}
    else:
        reasoning = (
            f"The feedback expects another output for {wrong} of {len(items)} "
            f"input(s), but no new rule follows from it; {name} stays as it is."
        )
        suggestion = {}
    return {"reasoning": reasoning, "answer": "", "suggestion": suggestion}


def _has_message(
    messages: Sequence[Message], role: str, needles: Sequence[str]
) -> str | None:
    for message in messages:
        if message.role == role and all(n in message.text for n in needles):
            return message.text
    return None


def optoprime_responder(request: SimRequest) -> Answer | None:
    """A Trace OptoPrime update call (see the module docstring); ``None``
    otherwise."""
    if (
        _has_message(request.messages, "system", ("#Variables", '"suggestion":'))
        is None
    ):
        return None
    text = _has_message(request.messages, "user", ("#Variables", "#Feedback"))
    if text is None:
        return None
    return _json_answer(optoprime_suggestion(OptoPrimeProblem.parse(text)), "optoprime")
