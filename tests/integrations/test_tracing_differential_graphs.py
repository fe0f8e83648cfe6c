"""Randomized differential test of the tracer on LangGraph graphs and agents (issue
19: "the randomized differential test of the tracing issue covers agents and graphs
too (tool loops, conditional edges, cycles, under uneven latency)").

Each seed generates a program (:mod:`afnio.testing.graph_programs`: a ``StateGraph``
for an even seed, a ``create_agent`` agent for an odd one) on a scripted chat model
(no network) with a random latency per model and tool call, and records its ground
truth as it runs: for every LM call, the Parameters, upstream LM calls and tool
results it depends on. The traced afnio graph must have one node per LM call, and
each node's ``grad_fn`` dependencies (and the output's) must equal that truth (within
the documented value rule's allowance, see the module).

The default suite runs seeds 0-149 (about 15 s on two cores). More seeds::

    AFNIO_GRAPH_PROGRAMS=2000 pytest \
        tests/integrations/test_tracing_differential_graphs.py
    AFNIO_GRAPH_SEED=10000 AFNIO_GRAPH_PROGRAMS=500 pytest ...  # seeds 10000-10499

Outside the default seeds, a failing seed fails (no known-bug allowance);
``python -m afnio.testing.graph_programs --seed <seed> -v`` replays it.
"""

from __future__ import annotations

import pytest

pytest.importorskip("langgraph", reason="needs the agents extra")
pytest.importorskip("langchain.agents", reason="needs the agents extra")

from afnio.testing.graph_programs import (
    check_graph,
    generate,
    generate_agent,
    generate_graph,
    run_program,
)
from tests._helpers import env_int

DEFAULT_PROGRAMS = 150

# Known tracer bugs the default seeds expose, by seed (strict xfail: a fixed bug turns
# its seeds red, so the entry is removed with the fix). None today: the two found when
# this test was written (a node in a cycle rewriting its key with the same text; a
# one-chunk stream of a graph) are fixed.
KNOWN_BUGS: dict[int, str] = {}


FIRST_SEED = env_int("AFNIO_GRAPH_SEED", 0)
PROGRAMS = env_int("AFNIO_GRAPH_PROGRAMS", DEFAULT_PROGRAMS)


def _seed_param(seed: int) -> object:
    reason = KNOWN_BUGS.get(seed) if FIRST_SEED == 0 else None
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(seed, id=f"seed{seed}", marks=marks)


@pytest.mark.parametrize(
    "seed", [_seed_param(s) for s in range(FIRST_SEED, FIRST_SEED + PROGRAMS)]
)
def test_every_lm_call_of_a_graph_or_agent_links_exactly_its_true_dependencies(
    seed: int,
) -> None:
    outcome = run_program(generate(seed))
    assert outcome.ok, "\n" + outcome.report()


def test_the_generators_are_deterministic_and_cover_the_shapes() -> None:
    """Same seed, same program; the default seeds cover every shape and mode the
    module documents (so a shrinking generator cannot go unnoticed)."""
    assert generate_graph(12).describe() == generate_graph(12).describe()
    assert generate_agent(13).describe() == generate_agent(13).describe()
    graphs = [generate(seed) for seed in range(0, DEFAULT_PROGRAMS, 2)]
    agents = [generate(seed) for seed in range(1, DEFAULT_PROGRAMS, 2)]
    assert {p.kind for p in graphs} == {"graph"}
    assert {p.kind for p in agents} == {"agent"}
    shapes = " ".join(p.shape for p in graphs)
    for piece in (
        "[closure reads",  # the prompt in the node function's closure
        "[closure-whole reads",  # ... called on the whole state
        "[chain reads",  # a prebuilt chain in the closure
        "[global reads",  # the prompt as a module global of the function
        ",k_n",  # a node reading two keys
        "+n",  # two nodes in one superstep (parallel fan-out)
        "joins ",  # add_edge([a, b], c)
        "conditional ",  # a router choosing one of two nodes
        "/__end__}",  # a router choosing the next node or the end
        "cycle ",  # a bounded loop on a round counter
        "output k_n",
        "output whole state",
    ):
        assert piece in shapes, piece
    assert any(
        "cycle n" in p.shape and f"reads k_{p.shape.split('cycle ')[1][:2]}" in p.shape
        for p in graphs
    ), "a looping node reading its own previous answer"
    shapes = " ".join(p.shape for p in agents)
    for piece in ("no tool", " then ", "+t_", "argument descriptions"):
        assert piece in shapes, piece
    for programs in (graphs, agents):
        assert {p.mode for p in programs} == {
            "invoke",
            "ainvoke",
            "stream",
            "batch",
            "abatch",
        }
        assert {p.samples for p in programs} == {1, 2, 3}


def test_equal_texts_land_in_different_keys_and_the_truth_follows_the_writes() -> None:
    """The collisions the test exists for happen: in some run, two different nodes
    write the same text to different keys, and an LM call reading one of them has
    only that key's writer in its truth."""
    found = False
    for seed in range(0, 40, 2):
        program = generate(seed)
        outcome = run_program(program)
        rec = program.recorder
        for sample in range(program.samples):
            last = {
                key: writes[-1]
                for (s, key), writes in rec.writes.items()
                if s == sample and key != "round"
            }
            texts = [w[3] for w in last.values()]
            if len(texts) != len(set(texts)):
                found = True
        if found and outcome.ok:
            break
    assert found


def test_the_check_reports_a_wrong_or_missing_link() -> None:
    """The comparison can fail: a truth with one more dependency, or a traced graph
    missing an LM call node, is reported."""
    from afnio.testing import graph_programs as gp

    program = generate(3)
    captured: dict[str, object] = {}
    original = gp.check_graph

    def keep(program_, outputs, created):  # type: ignore[no-untyped-def]
        captured.update(outputs=list(outputs), created=list(created))
        return original(program_, outputs, created)

    gp.check_graph = keep  # type: ignore[assignment]
    try:
        assert run_program(program).ok
    finally:
        gp.check_graph = original  # type: ignore[assignment]
    outputs, created = captured["outputs"], captured["created"]
    assert check_graph(program, outputs, created) == []  # type: ignore[arg-type]
    truth = program.recorder.of(0)
    name = sorted(truth.must)[-1]
    truth.must[name] = truth.must[name] | {"call:model#99"}
    problems = check_graph(program, outputs, created)  # type: ignore[arg-type]
    assert any(f"LM call {name} depends on" in p and "missing" in p for p in problems)
    truth.must[name] = truth.must[name] - {"call:model#99"}
    fewer = list(created)[1:]  # type: ignore[call-overload]
    problems = check_graph(program, outputs, fewer)  # type: ignore[arg-type]
    assert any("has no afnio node" in p for p in problems), problems
