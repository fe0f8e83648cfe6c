"""The simulator's answers to the prompts of TextGrad 0.1.8 and Trace's OptoPrime
(``afnio.testing.peers``), on prompts rendered from the peers' real templates.

The templates are copied verbatim as string constants (neither library is a
dependency of afnio); each block names the file of the installed package it comes
from. The prompts are assembled the way the libraries assemble them.
"""

from __future__ import annotations

import json
import re
from textwrap import dedent

import pytest

from afnio.testing import world
from afnio.testing.peers import OptoPrimeProblem, textgrad_improved_value

# -- TextGrad 0.1.8 ------------------------------------------------------------------

# textgrad/autograd/llm_backward_prompts.py
GLOSSARY_TEXT_BACKWARD = """
### Glossary of tags that will be sent to you:
# - <LM_SYSTEM_PROMPT>: The system prompt for the language model.
# - <LM_INPUT>: The input to the language model.
# - <LM_OUTPUT>: The output of the language model.
# - <OBJECTIVE_FUNCTION>: The objective of the optimization task.
# - <VARIABLE>: Specifies the span of the variable.
# - <ROLE>: The role description of the variable."""
BACKWARD_SYSTEM_PROMPT = (
    "You are part of an optimization system that improves a given text (i.e. the "
    "variable). You are the gradient (feedback) engine. Your only responsibility is "
    "to give intelligent and creative feedback and constructive criticism to "
    "variables, given an objective specified in <OBJECTIVE_FUNCTION> "
    "</OBJECTIVE_FUNCTION> tags. The variables may be solutions to problems, prompts "
    "to language models, code, or any other text-based variable. Pay attention to "
    "the role description of the variable, and the context in which it is used. You "
    "should assume that the variable will be used in a similar context in the "
    "future. Only provide strategies, explanations, and methods to change in the "
    "variable. DO NOT propose a new version of the variable, that will be the job of "
    "the optimizer. Your only job is to send feedback and criticism (compute "
    "'gradients'). For instance, feedback can be in the form of 'Since language "
    "models have the X failure mode...', 'Adding X can fix this error because...', "
    "'Removing X can improve the objective function because...', 'Changing X to Y "
    "would fix the mistake ...', that gets at the downstream objective.\n"
    "If a variable is already working well (e.g. the objective function is perfect, "
    "an evaluation shows the response is accurate), you should not give feedback.\n"
    f"{GLOSSARY_TEXT_BACKWARD}"
)
CONVERSATION_TEMPLATE = (
    "<LM_SYSTEM_PROMPT> {system_prompt} </LM_SYSTEM_PROMPT>\n\n"
    "<LM_INPUT> {prompt} </LM_INPUT>\n\n"
    "<LM_OUTPUT> {response_value} </LM_OUTPUT>\n\n"
)
CONVERSATION_START_INSTRUCTION_CHAIN = (
    "You will give feedback to a variable with the following role: <ROLE> "
    "{variable_desc} </ROLE>. Here is a conversation with a language model (LM):\n\n"
    "{conversation}"
)
OBJECTIVE_INSTRUCTION_CHAIN = (
    "This conversation is part of a larger system. The <LM_OUTPUT> was later used as "
    "{response_desc}.\n\n"
    "<OBJECTIVE_FUNCTION>Your goal is to give feedback to the variable to address "
    "the following feedback on the LM_OUTPUT: {response_gradient} "
    "</OBJECTIVE_FUNCTION>\n\n"
)
CONVERSATION_START_INSTRUCTION_BASE = (
    "You will give feedback to a variable with the following role: <ROLE> "
    "{variable_desc} </ROLE>. Here is an evaluation of the variable using a language "
    "model:\n\n{conversation}"
)
OBJECTIVE_INSTRUCTION_BASE = (
    "<OBJECTIVE_FUNCTION>Your goal is to give feedback and criticism to the variable "
    "given the above evaluation output. Our only goal is to improve the above "
    "metric, and nothing else. </OBJECTIVE_FUNCTION>\n\n"
)
EVALUATE_VARIABLE_INSTRUCTION = (
    "We are interested in giving feedback to the {variable_desc} "
    "for this conversation. Specifically, give feedback to the following span "
    "of text:\n\n<VARIABLE> "
    "{variable_short} </VARIABLE>\n\n"
    "Given the above history, describe how the {variable_desc} "
    "could be improved to improve the <OBJECTIVE_FUNCTION>. Be very creative, "
    "critical, and intelligent.\n\n"
)

# textgrad/autograd/string_based_ops.py
CONVERSATION_TEMPLATE_STRING = (
    "Function purpose: {function_purpose}\n\n"
    "<INPUTS_TO_FUNCTION> {inputs_string} </INPUTS_TO_FUNCTION>\n\n"
    "<OUTPUT_OF_FUNCTION> {response_value} </OUTPUT_OF_FUNCTION>\n\n"
)
CONVERSATION_START_INSTRUCTION_STRING_FN_BASE = (
    "You will give feedback to a variable with the following role: <ROLE> "
    "{variable_desc} </ROLE>. Here is an evaluation of the variable using a "
    "string-based function:\n\n{conversation}"
)
OBJECTIVE_INSTRUCTION_BASE_FN = (
    "<OBJECTIVE_FUNCTION>Your goal is to give feedback and criticism to the variable "
    "given the above evaluation output. Our only goal is to improve the above "
    "metric, and nothing else. </OBJECTIVE_FUNCTION>\n\n"
)

# textgrad/optimizer/optimizer_prompts.py
GLOSSARY_TEXT = """
### Glossary of tags that will be sent to you:
# - <LM_SYSTEM_PROMPT>: The system prompt for the language model.
# - <LM_INPUT>: The input to the language model.
# - <LM_OUTPUT>: The output of the language model.
# - <FEEDBACK>: The feedback to the variable.
# - <CONVERSATION>: The conversation history.
# - <FOCUS>: The focus of the optimization.
# - <ROLE>: The role description of the variable."""
OPTIMIZER_SYSTEM_PROMPT = (
    "You are part of an optimization system that improves text (i.e., variable). "
    "You will be asked to creatively and critically improve prompts, solutions to "
    "problems, code, or any other text-based variable. "
    "You will receive some feedback, and use the feedback to improve the variable. "
    "The feedback may be noisy, identify what is important and what is correct. "
    "Pay attention to the role description of the variable, and the context in "
    "which it is used. This is very important: You MUST give your response by "
    "sending the improved variable between {new_variable_start_tag} {{improved "
    "variable}} {new_variable_end_tag} tags. "
    "The text you send between the tags will directly replace the variable.\n\n"
    f"{GLOSSARY_TEXT}"
)
TGD_PROMPT_PREFIX = (
    "Here is the role of the variable you will improve: <ROLE>{variable_desc}</ROLE>."
    "\n\nThe variable is the text within the following span: <VARIABLE> "
    "{variable_short} </VARIABLE>\n\n"
    "Here is the context and feedback we got for the variable:\n\n"
    "<CONTEXT>{variable_grad}</CONTEXT>\n\n"
    "Improve the variable ({variable_desc}) using the feedback provided in <FEEDBACK> "
    "tags.\n"
)
TGD_PROMPT_SUFFIX = (
    "Send the improved variable "
    "in the following format:\n\n{new_variable_start_tag}{{the improved variable}}"
    "{new_variable_end_tag}\n\n"
    "Send ONLY the improved variable between the <IMPROVED_VARIABLE> tags, and "
    "nothing else."
)
CONSTRAINT_PROMPT_ADDITION = (
    "You must follow the following constraints:\n\n"
    "<CONSTRAINTS>{constraint_text}</CONSTRAINTS>\n\n"
)
GRADIENT_TEMPLATE = (
    "Here is a conversation:\n\n<CONVERSATION>{context}</CONVERSATION>\n\n"
    "This conversation is potentially part of a larger system. The output is used as "
    "{response_desc}\n\n"
    "Here is the feedback we got for {variable_desc} in the conversation:\n\n"
    "<FEEDBACK>{feedback}</FEEDBACK>\n\n"
)

ROLE = "system prompt to the language model"
OUTPUT_ROLE = (
    "response from the language model"  # textgrad VARIABLE_OUTPUT_DEFAULT_ROLE
)
PROMPT = "Classify the sentiment of the message."
AWFUL = 'If the message mentions "awful", the sentiment is negative.'
LOVE = 'If the message mentions "love", the sentiment is positive.'


def _short(value: str, n: int = 10) -> str:
    """textgrad.Variable.get_short_value."""
    words = value.split(" ")
    if len(words) <= 2 * n:
        return value
    return " ".join(words[:n]) + " (...) " + " ".join(words[-n:])


def _req(system: str, user: str) -> world.SimRequest:
    return world.SimRequest.from_messages(
        [{"role": "system", "content": system}, {"role": "user", "content": user}]
    )


def _function_backward(prediction: str, truth: str, output: int) -> world.SimRequest:
    """StringBasedFunction._construct_string_fn_base_backward_prompt."""
    inputs = (
        f"**Prediction(role: {OUTPUT_ROLE})**: {prediction}\n\n"
        f"**Ground truth answer(role: correct answer for the query)**: {truth}"
    )
    info = {
        "function_purpose": "The runtime of string-based function that checks if "
        "the prediction is correct.",
        "inputs_string": inputs,
        "response_value": str(output),
        "variable_desc": OUTPUT_ROLE,
        "variable_short": prediction,
    }
    conversation = CONVERSATION_TEMPLATE_STRING.format(**info)
    user = CONVERSATION_START_INSTRUCTION_STRING_FN_BASE.format(
        conversation=conversation, **info
    )
    user += OBJECTIVE_INSTRUCTION_BASE_FN + EVALUATE_VARIABLE_INSTRUCTION.format(**info)
    return _req(BACKWARD_SYSTEM_PROMPT, user)


def _llm_backward(
    system_prompt: str,
    message: str,
    output: str,
    gradient: str | None,
    variable: str | None = None,
) -> world.SimRequest:
    """LLMCall._construct_llm_{chain,base}_backward_prompt (chain when the output
    has a gradient)."""
    variable = system_prompt if variable is None else variable
    info = {
        "response_desc": OUTPUT_ROLE,
        "response_value": output,
        "response_gradient": gradient or "",
        "prompt": message,
        "system_prompt": system_prompt,
        "variable_desc": ROLE,
        "variable_short": _short(variable),
    }
    conversation = CONVERSATION_TEMPLATE.format(**info)
    if gradient is None:
        user = CONVERSATION_START_INSTRUCTION_BASE.format(
            conversation=conversation, **info
        )
        user += OBJECTIVE_INSTRUCTION_BASE
    else:
        user = CONVERSATION_START_INSTRUCTION_CHAIN.format(
            conversation=conversation, **info
        )
        user += OBJECTIVE_INSTRUCTION_CHAIN.format(**info)
    user += EVALUATE_VARIABLE_INSTRUCTION.format(**info)
    return _req(BACKWARD_SYSTEM_PROMPT, user)


def _tgd(
    value: str,
    gradients: list[tuple[str, str]],
    constraints: list[str] | None = None,
    tags: tuple[str, str] = ("<IMPROVED_VARIABLE>", "</IMPROVED_VARIABLE>"),
) -> world.SimRequest:
    """TextualGradientDescent._update_prompt: ``gradients`` are (input, feedback)."""
    grads = "\n".join(
        GRADIENT_TEMPLATE.format(
            context=CONVERSATION_TEMPLATE.format(
                system_prompt=value, prompt=message, response_value="neutral"
            ),
            response_desc=OUTPUT_ROLE,
            variable_desc=ROLE,
            feedback=feedback,
        )
        for message, feedback in gradients
    )
    info = {
        "variable_desc": ROLE,
        "variable_short": _short(value),
        "variable_grad": grads,
        "new_variable_start_tag": tags[0],
        "new_variable_end_tag": tags[1],
        "constraint_text": "\n".join(
            f"Constraint {i + 1}: {c}" for i, c in enumerate(constraints or [])
        ),
    }
    user = TGD_PROMPT_PREFIX.format(**info)
    if constraints:
        user += CONSTRAINT_PROMPT_ADDITION.format(**info)
    user += TGD_PROMPT_SUFFIX.format(**info)
    system = OPTIMIZER_SYSTEM_PROMPT.format(
        new_variable_start_tag=tags[0], new_variable_end_tag=tags[1]
    )
    return _req(system, user)


def _new_value(reply: str, tags: tuple[str, str] = ("<IMPROVED_VARIABLE>",)) -> str:
    """How TextualGradientDescent.step parses the answer."""
    end = "</" + tags[0][1:]
    return reply.split(tags[0])[1].split(end)[0].strip()


class TestTextGradBackward:
    def test_wrong_prediction_names_the_expected_value(self) -> None:
        req = _function_backward("neutral", "negative", 0)
        assert world.answer(req).responder == "textgrad_backward"
        assert world.respond(req) == (
            'The prediction "neutral" is wrong: the expected value is "negative". '
            'Change what produces it so that this input leads to "negative".'
        )

    def test_right_prediction_needs_no_change(self) -> None:
        reply = world.respond(_function_backward("negative", "Negative", 1))
        assert reply == (
            f"The {OUTPUT_ROLE} is correct for this input: no change is needed."
        )

    def test_function_output_decides_over_the_texts(self) -> None:
        # the function's verdict is what the metric said, whatever the strings
        assert "is wrong" in world.respond(
            _function_backward("negative", "negative", 0)
        )

    def test_chain_gives_the_system_prompt_a_rule(self) -> None:
        feedback = world.respond(_function_backward("neutral", "negative", 0))
        req = _llm_backward(PROMPT, "This is awful.", "neutral", feedback)
        assert world.answer(req).responder == "textgrad_backward"
        assert world.respond(req) == AWFUL

    def test_rule_uses_the_field_of_the_prompt(self) -> None:
        prompt = 'If the message mentions "late", the mood is sad.'
        feedback = 'The prediction "x" is wrong: the expected value is "angry".'
        reply = world.respond(_llm_backward(prompt, "Awful!", "x", feedback))
        assert reply == 'If the message mentions "awful", the mood is angry.'

    def test_default_label_gets_no_rule(self) -> None:
        feedback = world.respond(_function_backward("negative", "neutral", 0))
        reply = world.respond(_llm_backward(PROMPT, "Awful!", "negative", feedback))
        assert reply == (
            f'The {ROLE} should lead to "neutral" for inputs like this one. No rule '
            'can be written: "neutral" is the default label (what the task answers '
            "when no rule matches), so no word is evidence for it."
        )

    def test_correct_sample_gets_a_generic_critique(self) -> None:
        feedback = world.respond(_function_backward("negative", "negative", 1))
        reply = world.respond(_llm_backward(PROMPT, "Awful!", "negative", feedback))
        assert reply.startswith(f"The {ROLE} should address this feedback: ")
        assert not world.find_rules(reply)

    def test_shortened_system_prompt_is_recognised(self) -> None:
        long_prompt = " ".join(["Read", "the", "message", "carefully."] * 8)
        feedback = (
            'The prediction "neutral" is wrong: the expected value is "negative".'
        )
        reply = world.respond(_llm_backward(long_prompt, "Awful.", "x", feedback))
        # the prompt names no field: the rule names the sentiment, and says so
        assert reply == AWFUL + (
            " The prompt names no field (no rule, no JSON object in the output, no "
            '"classify the <field>" phrase), so the rule names the sentiment.'
        )

    def test_base_template_reads_the_evaluation(self) -> None:
        evaluation = 'Wrong. The expected value is "positive".'
        req = _llm_backward(PROMPT, "I love it", evaluation, None)
        assert world.respond(req) == LOVE

    def test_forward_call_is_still_a_task_call(self) -> None:
        req = _req(f"{PROMPT} {AWFUL}", "An awful day.")
        assert world.answer(req).responder == "task"
        assert world.respond(req) == "negative"


class TestTextGradOptimizer:
    def test_rules_of_the_feedback_are_applied(self) -> None:
        req = _tgd(
            PROMPT,
            [
                ("Awful.", AWFUL),
                ("Fine.", f"The {ROLE} should address this feedback: ok"),
                ("Love it.", LOVE),
            ],
        )
        assert world.answer(req).responder == "textgrad_optimizer"
        reply = world.respond(req)
        assert reply.startswith("<IMPROVED_VARIABLE>")
        assert _new_value(reply) == f"{PROMPT} {AWFUL} {LOVE}"

    def test_answer_does_not_depend_on_the_order_of_the_gradients(self) -> None:
        grads = [("Love it.", LOVE), ("Awful.", AWFUL)]
        one = world.respond(_tgd(PROMPT, grads))
        assert one == world.respond(_tgd(PROMPT, grads[::-1]))

    def test_no_rule_keeps_the_value(self) -> None:
        reply = world.respond(_tgd(PROMPT, [("Fine.", "Looks right.")]))
        assert _new_value(reply) == PROMPT

    def test_shortened_value_is_restored_from_the_context(self) -> None:
        long_prompt = " ".join(f"Step {i} of the careful reading." for i in range(6))
        assert "(...)" in _short(long_prompt)
        reply = world.respond(_tgd(long_prompt, [("Awful.", AWFUL)]))
        assert _new_value(reply) == f"{long_prompt} {AWFUL}"

    def test_constraint_is_honoured(self) -> None:
        req = _tgd("Classify!", [("Awful.", AWFUL)], ['Do not use the character "!".'])
        assert _new_value(world.respond(req)) == f"Classify {AWFUL}"

    def test_custom_tags(self) -> None:
        tags = ("<NEW>", "</NEW>")
        reply = world.respond(_tgd(PROMPT, [("Awful.", AWFUL)], tags=tags))
        assert reply == f"<NEW>{PROMPT} {AWFUL}</NEW>"

    def test_existing_rule_for_the_word_is_replaced(self) -> None:
        old = 'If the message mentions "awful", the sentiment is positive.'
        reply = world.respond(_tgd(f"{PROMPT} {old}", [("Awful.", AWFUL)]))
        assert _new_value(reply) == f"{PROMPT} {AWFUL}"

    def test_helper_reads_a_context_without_feedback_tags(self) -> None:
        text = f"<VARIABLE> {PROMPT} </VARIABLE> <CONTEXT>{LOVE}</CONTEXT>"
        assert textgrad_improved_value(text) == f"{PROMPT} {LOVE}"


# -- Trace (trace-opt 0.1.3.8): OptoPrime ----------------------------------------------

# opto/optimizers/optoprime.py (OptoPrime.representation_prompt)
REPRESENTATION_PROMPT = dedent(
    """
    You're tasked to solve a coding/algorithm problem. You will see the instruction, the code, the documentation of each function used in the code, and the feedback about the execution result.

    Specifically, a problem will be composed of the following parts:
    - #Instruction: the instruction which describes the things you need to do or the question you should answer.
    - #Code: the code defined in the problem.
    - #Documentation: the documentation of each function used in #Code. The explanation might be incomplete and just contain high-level description. You can use the values in #Others to help infer how those functions work.
    - #Variables: the input variables that you can change.
    - #Constraints: the constraints or descriptions of the variables in #Variables.
    - #Inputs: the values of other inputs to the code, which are not changeable.
    - #Others: the intermediate values created through the code execution.
    - #Outputs: the result of the code output.
    - #Feedback: the feedback about the code's execution result.

    In #Variables, #Inputs, #Outputs, and #Others, the format is:

    <data_type> <variable_name> = <value>

    If <type> is (code), it means <value> is the source code of a python code, which may include docstring and definitions.
    """  # noqa: E501
)
# opto/optimizers/optoprime.py (OptoPrime.output_format_prompt)
OUTPUT_FORMAT_PROMPT = dedent(
    """
    Output_format: Your output should be in the following json format, satisfying the json syntax:

    {{
    "reasoning": <Your reasoning>,
    "answer": <Your answer>,
    "suggestion": {{
        <variable_1>: <suggested_value_1>,
        <variable_2>: <suggested_value_2>,
    }}
    }}

    In "reasoning", explain the problem: 1. what the #Instruction means 2. what the #Feedback on #Output means to #Variables considering how #Variables are used in #Code and other values in #Documentation, #Inputs, #Others. 3. Reasoning about the suggested changes in #Variables (if needed) and the expected result.

    If #Instruction asks for an answer, write it down in "answer".

    If you need to suggest a change in the values of #Variables, write down the suggested values in "suggestion". Remember you can change only the values in #Variables, not others. When <type> of a variable is (code), you should write the new definition in the format of python code without syntax errors, and you should not change the function name or the function signature.

    If no changes or answer are needed, just output TERMINATE.
    """  # noqa: E501
)
# opto/optimizers/optoprime.py (OptoPrime.user_prompt_template, final_prompt)
USER_PROMPT_TEMPLATE = dedent(
    """
    Now you see problem instance:

    ================================
    {problem_instance}
    ================================

    """
)
FINAL_PROMPT = dedent(
    """
    Your response:
    """
)
# opto/optimizers/optoprime.py (ProblemInstance.problem_template)
PROBLEM_TEMPLATE = dedent(
    """
    #Instruction
    {instruction}

    #Code
    {code}

    #Documentation
    {documentation}

    #Variables
    {variables}

    #Constraints
    {constraints}

    #Inputs
    {inputs}

    #Others
    {others}

    #Outputs
    {outputs}

    #Feedback
    {feedback}
    """
)
DEFAULT_OBJECTIVE = (  # OptoPrime.default_objective
    "You need to change the <value> of the variables in #Variables to improve the "
    "output in accordance to #Feedback."
)
# the feedback strings of examples/bbh/run_prompt_bigbench_trace.py
CORRECT = "The answer is correct! No need to change anything."
WRONG = (
    'The answer is wrong. We expect the output of your answer to be "{label}". Please '
    "modify the prompt and relevant parts of the program to help LLM produce the right "
    "answer."
)


def _optoprime(
    prompt: str,
    samples: list[tuple[str, str, str]],
    batched: bool = True,
    constraint: str = "",
) -> world.SimRequest:
    """OptoPrime.construct_prompt for ``batchify(*[classify(prompt, m) ...])``;
    ``samples`` are (message, output, expected label)."""
    code = [
        f"classify{i} = classify(system_prompt=system_prompt0, message=message{i})"
        for i in range(len(samples))
    ]
    feedbacks = [
        CORRECT if out == label else WRONG.format(label=label)
        for _, out, label in samples
    ]
    if batched:
        args = ", ".join(f"args_{i}=classify{i}" for i in range(len(samples)))
        code.append(f"batchify0 = batchify({args})")
        outputs = "(str) batchify0=" + "".join(
            f"ID {[i]}: {out}\n" for i, (_, out, _) in enumerate(samples)
        )
        others = "\n".join(
            f"(str) classify{i}={out}" for i, (_, out, _) in enumerate(samples)
        )
        feedback = "".join(f"ID {[i]}: {f}\n" for i, f in enumerate(feedbacks))
    else:
        outputs = f"(str) classify0={samples[0][1]}"
        others = ""
        feedback = feedbacks[0]
    # Trace lists the inputs in graph order, not by index: reverse them
    inputs = "\n".join(
        f"(str) message{i}={m}" for i, (m, _, _) in reversed(list(enumerate(samples)))
    )
    problem = PROBLEM_TEMPLATE.format(
        instruction=DEFAULT_OBJECTIVE,
        code="\n".join(code),
        documentation="[classify] Call the LM.\n[batchify] Concatenate the items.",
        variables=f"(str) system_prompt0={prompt}",
        constraints=f"(str) system_prompt0: {constraint}" if constraint else "",
        inputs=inputs,
        others=others,
        outputs=outputs,
        feedback=feedback,
    )
    user = USER_PROMPT_TEMPLATE.format(problem_instance=problem) + FINAL_PROMPT
    return world.SimRequest.from_messages(
        [
            {"role": "system", "content": REPRESENTATION_PROMPT + OUTPUT_FORMAT_PROMPT},
            {"role": "user", "content": user},
        ],
        response_format={"type": "json_object"},
    )


def _suggestion(req: world.SimRequest) -> dict[str, str]:
    reply = world.respond(req)
    assert "TERMINATE" not in reply  # OptoPrime would skip the update
    return json.loads(reply)["suggestion"]  # OptoPrime.extract_llm_suggestion


class TestOptoPrime:
    MESSAGES = (
        "Subject: Leak\n\nHello,\n\nWe are grateful for your help.\n\nBest,\nAna",
        "Subject: Outage\n\nThis is unacceptable.\n\n(str) not an entry\nBob",
        "Subject: Question\n\nWhat are your hours?",
    )

    def test_batched_feedback_gives_rules_per_sample(self) -> None:
        m0, m1, m2 = self.MESSAGES
        req = _optoprime(
            PROMPT,
            [(m0, "neutral", "positive"), (m1, "neutral", "negative"), (m2, "a", "a")],
        )
        assert world.answer(req).responder == "optoprime"
        new = _suggestion(req)["system_prompt0"]
        assert new == (
            f'{PROMPT} If the message mentions "grateful", the sentiment is positive. '
            'If the message mentions "unacceptable", the sentiment is negative.'
        )

    def test_answer_is_the_documented_object(self) -> None:
        req = _optoprime(PROMPT, [(self.MESSAGES[0], "neutral", "positive")])
        answer = json.loads(world.respond(req))
        assert list(answer) == ["reasoning", "answer", "suggestion"]
        assert "grateful" in answer["reasoning"]

    def test_unbatched_feedback_uses_all_inputs(self) -> None:
        req = _optoprime(
            PROMPT, [(self.MESSAGES[1], "neutral", "negative")], batched=False
        )
        assert _suggestion(req) == {
            "system_prompt0": f'{PROMPT} If the message mentions "unacceptable", the '
            "sentiment is negative."
        }

    def test_all_correct_changes_nothing(self) -> None:
        req = _optoprime(PROMPT, [(m, "neutral", "neutral") for m in self.MESSAGES])
        assert _suggestion(req) == {}

    def test_default_label_or_no_salient_word_gives_no_rule(self) -> None:
        m0, _, m2 = self.MESSAGES
        req = _optoprime(
            PROMPT, [(m0, "positive", "neutral"), (m2, "neutral", "negative")]
        )
        assert _suggestion(req) == {}

    def test_constraint_is_honoured(self) -> None:
        req = _optoprime(
            "Classify!",
            [(self.MESSAGES[0], "neutral", "positive")],
            constraint='Do not use the character "!".',
        )
        assert _suggestion(req)["system_prompt0"].startswith("Classify If")

    def test_problem_parsing(self) -> None:
        req = _optoprime(PROMPT, [(m, "neutral", "neutral") for m in self.MESSAGES[:2]])
        problem = OptoPrimeProblem.parse(req.messages[1].text)
        assert problem.variables == [("str", "system_prompt0", PROMPT)]
        assert problem.inputs["message1"] == self.MESSAGES[1]  # an "(str) " line inside
        assert problem.code["batchify0"] == ["classify0", "classify1"]
        assert problem.lineage("classify1") == [self.MESSAGES[1]]

    @pytest.mark.parametrize(
        "user", ["#Variables\n(str) a=b\n\n#Feedback\nok", "Now you see problem"]
    )
    def test_needs_the_optoprime_system_prompt(self, user: str) -> None:
        req = _req("You are a helpful assistant.", user)
        assert world.answer(req).responder != "optoprime"


def test_markers_do_not_overlap() -> None:
    """Each peer prompt is answered by its own responder, never another's."""
    cases = {
        "textgrad_optimizer": _tgd(PROMPT, [("Awful.", AWFUL)]),
        "textgrad_backward": _llm_backward(PROMPT, "Awful.", "x", "bad"),
        "optoprime": _optoprime(PROMPT, [("Awful.", "neutral", "negative")]),
    }
    for expected, req in cases.items():
        assert world.answer(req).responder == expected
    assert re.search(r"<IMPROVED_VARIABLE>", world.respond(cases["textgrad_optimizer"]))
