"""Randomized differential test of the LangChain and DSPy tracers (issue 17, item 5).

Each seed generates a program (:mod:`afnio.testing.programs`: an LCEL chain for an
even seed, a DSPy module for an odd one) whose ground truth, which prompt can
influence which output of which sample, is known by construction; it runs against the
live simulator under uneven per-request latency, and every Parameter's gradient is
checked against that ground truth.

The default suite runs seeds 0-199 (about 30 s). More seeds::

    AFNIO_TRACING_PROGRAMS=5000 pytest tests/integrations/test_tracing_differential.py
    AFNIO_TRACING_SEED=10000 AFNIO_TRACING_PROGRAMS=2000 pytest ...  # seeds 10000-11999

A failure prints the seed, the program's shape and ground truth, and each misplaced
or missing gradient; ``python -m afnio.testing.programs --seed <seed> -v`` replays it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

pytest.importorskip("langchain_openai", reason="needs the langchain test extra")
pytest.importorskip("dspy", reason="needs the dspy extra")

from afnio.testing.programs import Outcome, TracingBench, generate

DEFAULT_PROGRAMS = 200


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise pytest.UsageError(f"{name} must be an integer, got {value!r}") from None


FIRST_SEED = _env_int("AFNIO_TRACING_SEED", 0)
PROGRAMS = _env_int("AFNIO_TRACING_PROGRAMS", DEFAULT_PROGRAMS)
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
    # every kind of ground truth: collisions widen some paths; passing samples
    assert any(p.allowed != p.paths for p in programs)
    assert any(not s.failing(o) for p in programs for s in p.samples for o in p.outputs)
    assert any(len(p.outputs) == 2 for p in programs)


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
