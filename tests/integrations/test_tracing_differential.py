"""Randomized differential test of the LangChain and DSPy tracers (issue 17, item 5).

Each seed generates a program (:mod:`afnio.testing.programs`: an LCEL chain for an
even seed, a DSPy module for an odd one) whose ground truth is known by construction:
for each output of each sample, the LM calls of its real dataflow (each must get its
feedback) and those the tracers' value rules may add where texts collide (nothing
else may get it). It runs against the live simulator under uneven per-request
latency, and every Parameter's gradient, and the number of LM calls of each prompt
that got feedback, is checked against that ground truth.

The default suite runs seeds 0-199 (about 35 s on two cores). More seeds::

    AFNIO_TRACING_PROGRAMS=5000 pytest tests/integrations/test_tracing_differential.py
    AFNIO_TRACING_SEED=10000 AFNIO_TRACING_PROGRAMS=2000 pytest ...  # seeds 10000-11999

A failure prints the seed, the program's shape and ground truth, and each misplaced
or missing gradient; ``python -m afnio.testing.programs --seed <seed> -v`` replays it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

pytest.importorskip("langchain_openai", reason="needs the langchain test extra")
pytest.importorskip("dspy", reason="needs the dspy extra")

from afnio.testing.programs import Outcome, TracingBench, generate
from tests._helpers import env_int

DEFAULT_PROGRAMS = 200


FIRST_SEED = env_int("AFNIO_TRACING_SEED", 0)
PROGRAMS = env_int("AFNIO_TRACING_PROGRAMS", DEFAULT_PROGRAMS)
SEEDS = range(FIRST_SEED, FIRST_SEED + PROGRAMS)


@pytest.fixture(scope="module")
def bench() -> Iterator[TracingBench]:
    with TracingBench() as running:
        yield running


@pytest.mark.parametrize("seed", SEEDS, ids=lambda seed: f"seed{seed}")
def test_every_gradient_lands_on_the_prompts_of_its_sample_path(
    bench: TracingBench, seed: int
) -> None:
    outcome: Outcome = bench.run(generate(seed))
    assert outcome.ok, "\n" + outcome.report()


def test_the_generator_is_deterministic_and_covers_the_shapes() -> None:
    """Same seed, same program; the default seeds cover every shape and mode the
    module documents (so a shrinking generator cannot go unnoticed)."""
    assert generate(12).describe() == generate(12).describe()
    assert generate(13).describe() == generate(13).describe()
    programs = [generate(seed) for seed in range(DEFAULT_PROGRAMS)]
    shapes = " ".join(p.shape for p in programs)
    for piece in (
        "failing before its LM call",
        "failing after its LM call",
        "message output",
        "(dict output)",
        "] on 1 thread",
        "] on 2 threads",
        "parallel[y = ",  # a block member taking an earlier prediction, first
        "parallel[y1 = ",  # a second block taking the first block's predictions
        "branch[",
        "router[",
        "parallel(",
        "assign(",
        "pick(",
        "join(",
        "merge ",
        "map(",
        "with_fallbacks(",
        "with_retry()",
        "config(",
        "lambda(",
        "nested(",
        "chain(",
        "llm.bind",
        "|upper",
        "|wrap",
        "str input via chain",
        "str input via parallel",
        "dict input",
        "answers neutral",
        "ChainOfThought(",
        "Predict(",
        "parallel[",
        "if ",
        "', '.join(",
        "label=",
    ):
        assert piece in shapes, piece
    # a block member taking an earlier prediction after a fellow member, on fewer
    # threads than members (it starts when a fellow member has ended)
    assert re.search(r"parallel\[[^\]]*; y = [^\]]*\] on \d thread", shapes)
    modes = {(p.framework, p.mode) for p in programs}
    assert {m for f, m in modes if f == "langchain"} == {
        "batch",
        "abatch",
        "invoke",
        "ainvoke",
        "stream",
        "astream",
    }
    assert {m for f, m in modes if f == "dspy"} == {"batch", "call", "acall"}
    # every kind of ground truth: collisions widen some paths (DSPy too); an LM
    # call of a prompt called twice on a path; passing samples
    assert any(p.allowed != p.paths for p in programs if p.framework == "langchain")
    assert any(p.allowed != p.paths for p in programs if p.framework == "dspy")
    assert any(
        most > 1
        for p in programs
        for i in range(len(p.samples))
        for _, most in p.call_bounds(i).values()
    )
    assert any(not s.failing(o) for p in programs for s in p.samples for o in p.outputs)
    assert any(len(p.outputs) == 2 for p in programs)


def test_lm_conditions_are_generated_only_on_request() -> None:
    """A ``RunnableBranch`` whose condition makes an LM call is left out by default
    (whether that call gets feedback is the tracer's decision): the option adds it,
    with that call in the ground truth as asked, and changes nothing else."""
    plain = [generate(seed) for seed in range(0, 400, 2)]
    assert not any("lm condition" in p.shape for p in plain)
    assert generate(12, lm_conditions=None).describe() == plain[6].describe()
    for option in ("none", "may", "must"):
        asked = [generate(seed, lm_conditions=option) for seed in range(0, 400, 2)]
        conditioned = [p for p in asked if "lm condition" in p.shape]
        assert conditioned and all(
            f"(feedback {option})" in p.shape
            for p in asked
            if "lm condition" in p.shape
        )
        assert all(
            f"--lm-conditions {option}" in Outcome(p, [], 0).report()
            for p in conditioned
        )
    with pytest.raises(ValueError, match="lm_conditions"):
        generate(0, lm_conditions="sometimes")


def test_the_check_counts_the_lm_calls_that_got_feedback(bench: TracingBench) -> None:
    """A prompt's LM calls that got feedback about a sample are counted: one more
    than its dataflow and the value rules allow (a failed ``with_retry`` attempt's
    call linked too: the same conversation, the same feedback) is reported."""
    from afnio.testing.programs import _chat_backward, check

    program = generate(166)
    assert "with_retry() failing once after its LM call" in program.shape
    bench.simulator.reset_stats()
    bench.use_backward_model()
    run = bench._run_langchain(program)
    requests = list(bench.simulator.requests)
    assert check(program, run.parameters, requests, run.texts) == []
    (marker,) = program.prompts["a"]  # the retried prompt
    asked = [b for b in requests if _chat_backward(b) and marker in str(b)]
    again = check(program, run.parameters, [*requests, asked[0]], run.texts)
    assert any(
        f"prompt a [{marker}]: 2 of its LM calls got feedback" in p
        and "at most 1 may" in p
        for p in again
    ), again


def test_an_lm_call_whose_prompt_is_not_discoverable_is_warned_about(
    bench: TracingBench,
) -> None:
    """A prompt built inside a lambda at call time cannot be discovered: the traced
    call warns (``AfnioTracingWarning``), and the discovered prompt still gets its
    feedback."""
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnableLambda, RunnableParallel

    from afnio import functional as F
    from afnio_integrations.langchain import AfnioTracingWarning, trace

    llm = bench.chat_model()
    found = (
        ChatPromptTemplate.from_messages(
            [("system", "[mkfound] Label the note."), ("human", "{message}")]
        )
        | llm
        | StrOutputParser()
    )

    def hidden(inp: dict[str, str]) -> str:  # its prompt exists only at call time
        prompt = ChatPromptTemplate.from_messages(
            [("system", "[mkhidden] Label the note."), ("human", "{message}")]
        )
        return (prompt | llm | StrOutputParser()).invoke(inp)

    def first(inp: dict[str, str]) -> str:
        return inp["x"]

    chain = RunnableParallel(x=found, y=RunnableLambda(hidden)) | RunnableLambda(first)
    traced = trace(chain)
    assert [p.data for p in traced.parameters()] == ["[mkfound] Label the note."]
    bench.use_backward_model()
    with pytest.warns(AfnioTracingWarning, match="did not discover"):
        prediction = traced.invoke({"message": "I feel great today"})
    _, explanation = F.exact_match_evaluator(prediction, "tgqqq")
    explanation.backward()
    (param,) = traced.parameters()
    assert param.grad and all("tgqqq" in g.data for g in param.grad)
