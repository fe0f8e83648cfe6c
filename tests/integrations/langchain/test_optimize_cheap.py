"""``optimize(..., backward=...)`` (issue 23): ``"cheap"`` by default (direct
evaluator feedback, chat-backward calls grouped 8 samples a call per prompt
template), ``"upstream"`` on request (an evaluator-backward LM round, one
chat-backward call per sample), on LangChain programs written as LangChain's docs
write them: an LCEL chain (``ChatPromptTemplate | ChatOpenAI | StrOutputParser``),
a two-step chain, a ``create_agent`` agent with tools. The calls are counted from
the live simulator's recorded requests, classified by the responder that answered
them (``tests/integrations/_cheap_calls.py``)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain_openai", reason="needs the langchain test extra")

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

import afnio
from afnio.autodiff import config
from afnio.testing import SIMULATOR_MODEL, Simulator
from afnio_integrations.langchain import optimize
from benchmarks import two_stage
from benchmarks.common import simulated
from tests._shared_data import SHARED_DATASET, needs_shared_dataset
from tests.integrations._cheap_calls import (
    backward_calls,
    ceil8,
    code_rows,
    failed_per_step,
    kinds,
    run_log,
    steps,
)
from tests.integrations.langchain._chains import exact, sim_chat

CODE_PROMPT = "Classify the code of the message."
"""The LCEL chain's starting system prompt (no rule: every row fails at first)."""

CHEAP_LINE = "backward: cheap (direct evaluator feedback, chat backward in groups of 8)"
UPSTREAM_LINE = (
    "backward: upstream (LM-written evaluator feedback, one chat-backward call per "
    "sample)"
)


@dataclass
class CodeChain:
    """An LCEL chain on a live simulator (afnio's backward client set on it) and
    rows whose codes are all distinct."""

    sim: Simulator
    prompt: ChatPromptTemplate
    chain: Any
    rows: list[tuple[str, str, str]]  # (message, word, code)

    @property
    def trainset(self) -> list[tuple[dict[str, str], str]]:
        return [({"message": m}, c) for m, _, c in self.rows]


@pytest.fixture
def code_chain() -> Iterator[CodeChain]:
    with simulated() as (sim, _):
        prompt = ChatPromptTemplate.from_messages(
            [("system", CODE_PROMPT), ("human", "{message}")]
        )
        chain = prompt | sim_chat(sim) | StrOutputParser()
        yield CodeChain(sim, prompt, chain, code_rows(20, seed=0))


def _optimize(target: CodeChain, tmp_path: Path, **kwargs: Any) -> Any:
    kwargs.setdefault("batch_size", 10)
    kwargs.setdefault("seed", 0)
    _, report = optimize(
        target.chain,
        target.trainset,
        exact,
        epochs=1,
        progress=False,
        model=SIMULATOR_MODEL,
        root_dir=str(tmp_path / "run"),
        **kwargs,
    )
    return report


# -- the LCEL chain ----------------------------------------------------------------


def test_cheap_is_the_default_no_evaluator_call_and_ceil_failed_over_8_chat_calls(
    code_chain: CodeChain, tmp_path: Path
) -> None:
    """Two steps of 10 failed rows each: no evaluator-backward call, 2 grouped
    chat-backward calls per step (5 + 5 samples), one optimizer call per step; the
    improved prompt is written back into the user's chain, the report and the run
    log's header state the mode."""
    report = _optimize(code_chain, tmp_path)  # no backward=: the default
    requests = list(code_chain.sim.requests)
    counted = kinds(requests)
    assert counted["evaluator_backward"] == 0, counted
    assert counted["optimizer"] == 2, counted
    records = run_log(tmp_path / "run")
    failed = failed_per_step(records, "accuracy")
    assert failed == [10, 10]
    for step, n in zip(steps(requests), failed, strict=True):
        calls = backward_calls(step)
        assert len(calls) == ceil8(n) == 2, calls
        assert all(c.kind == "chat_backward_group" for c in calls)
        assert sorted(c.samples for c in calls) == [5, 5]
    assert CHEAP_LINE in str(report).splitlines()
    assert report.backward == afnio.BackwardOptions("direct", 8)
    assert records[0]["backward_options"] == {
        "evaluator_feedback": "direct",
        "chat_samples_per_call": 8,
    }
    # the write-back: the user's own chain now answers every row's code
    new = code_chain.prompt.messages[0].prompt.template
    assert report.prompts_after == {"prompt0.system0": new} != {"x": CODE_PROMPT}
    assert report.score_after == 1.0
    message, _, code = code_chain.rows[3]
    assert code_chain.chain.invoke({"message": message}) == code


def test_upstream_reproduces_the_per_sample_call_pattern(
    code_chain: CodeChain, tmp_path: Path
) -> None:
    """``backward="upstream"``: an evaluator-backward call per 8 failed rows and
    one chat-backward call per failed row, as before issue 23."""
    report = _optimize(code_chain, tmp_path, backward="upstream")
    requests = list(code_chain.sim.requests)
    counted = kinds(requests)
    assert counted["chat_backward_group"] == 0, counted
    failed = failed_per_step(run_log(tmp_path / "run"), "accuracy")
    assert failed == [10, 10]
    for step, n in zip(steps(requests), failed, strict=True):
        per_step = kinds(step)
        per_sample = math.ceil(n / config.EVALUATOR_SAMPLES_PER_CALL)
        assert per_step["evaluator_backward"] == per_sample == 2, per_step
        assert per_step["chat_backward"] == n, per_step
    assert UPSTREAM_LINE in str(report).splitlines()
    assert run_log(tmp_path / "run")[0]["backward_options"] == {
        "evaluator_feedback": "lm",
        "chat_samples_per_call": 1,
    }
    assert report.score_after == 1.0  # the same learning


def test_a_backward_options_object_is_used_as_given(
    code_chain: CodeChain, tmp_path: Path
) -> None:
    """``backward=afnio.BackwardOptions("lm", 4)``: LM-written evaluator feedback,
    chat-backward groups of at most 4 (10 failed rows: 3 calls per step)."""
    options = afnio.BackwardOptions(evaluator_feedback="lm", chat_samples_per_call=4)
    report = _optimize(code_chain, tmp_path, backward=options)
    for step in steps(list(code_chain.sim.requests)):
        calls = backward_calls(step)
        assert sorted(c.samples for c in calls) == [3, 3, 4]
        assert kinds(step)["evaluator_backward"] == 2
    assert (
        "backward: custom (LM-written evaluator feedback, chat backward in groups "
        "of 4)" in str(report)
    )


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("fast", ValueError),
        ("CHEAP", ValueError),
        (8, TypeError),
        ({"evaluator_feedback": "direct"}, TypeError),
    ],
)
def test_an_invalid_backward_is_refused_before_any_lm_call(
    value: Any, error: type[Exception], code_chain: CodeChain, tmp_path: Path
) -> None:
    with pytest.raises(error, match=r"`backward` must be \"cheap\", \"upstream\""):
        _optimize(code_chain, tmp_path, backward=value)
    assert code_chain.sim.stats.calls == 0
    assert not (tmp_path / "run").exists()


# -- grouping keeps the samples apart ---------------------------------------------


@pytest.mark.parametrize("seed", [1, 2])
def test_grouped_feedback_names_each_samples_own_expected_value(
    seed: int, tmp_path: Path
) -> None:
    """20 rows, every code distinct, in a shuffled order, one batch: the run log's
    feedback to the prompt holds one text per row, credited to that row alone
    (its provenance), naming the row's own word and code and no other row's code;
    the grouped calls covered the samples they were sent with."""
    rows = code_rows(20, seed=seed)
    with simulated() as (sim, _):
        prompt = ChatPromptTemplate.from_messages(
            [("system", CODE_PROMPT), ("human", "{message}")]
        )
        target = CodeChain(
            sim, prompt, prompt | sim_chat(sim) | StrOutputParser(), rows
        )
        _optimize(target, tmp_path, batch_size=20, seed=seed)
        assert sorted(c.samples for c in backward_calls(list(sim.requests))) == [
            6,
            7,
            7,
        ]
    (step,) = [r for r in run_log(tmp_path / "run") if r["type"] == "step"]
    (param,) = step["params"]
    seen = []
    for item in param["feedback"]:
        (s,) = item["samples"]  # one row per text
        seen.append(s)
        _, word, code = rows[s]
        rule = f'If the message begins with "{word}", the code is {code}.'
        assert item["text"].startswith(rule), (s, item)
        others = [c for i, (_, _, c) in enumerate(rows) if i != s]
        assert not any(f"is {c}." in item["text"] for c in others), (s, item)
        if item["call_samples"] is not None:  # the group its call covered
            assert s in item["call_samples"] and len(item["call_samples"]) > 1
    assert sorted(seen) == list(range(20))


# -- a two-step chain ----------------------------------------------------------------


def _first(text: str) -> str:
    return text.split(" If ", 1)[0]


@needs_shared_dataset("the two-step chain's rows")
def test_a_two_step_chain_gets_ceil_items_over_8_calls_per_prompt_per_step(
    tmp_path: Path,
) -> None:
    """``prompt | llm | parser | (lambda) | prompt | llm | parser``: per step, each
    prompt template's chat-backward samples go in ceil(samples / 8) calls; the second
    prompt's samples are the step's failed rows, the first prompt's at most those;
    no evaluator-backward call."""
    splits = two_stage.load_splits(two_stage.data_root(tmp_path, SHARED_DATASET), 0)
    train = [({"message": m}, t) for m, t in splits.train[:32]]
    with simulated() as (sim, _):
        chain = two_stage.build_chain(sim_chat(sim))
        optimize(
            chain,
            train,
            two_stage.exact,
            epochs=1,
            batch_size=16,
            progress=False,
            model=SIMULATOR_MODEL,
            root_dir=str(tmp_path / "run"),
        )
        requests = list(sim.requests)
    assert kinds(requests)["evaluator_backward"] == 0
    failed = [n for n in failed_per_step(run_log(tmp_path / "run"), "accuracy") if n]
    parts = steps(requests)
    assert len(parts) == len(failed) >= 1
    first, second = _first(two_stage.FIRST_PROMPT), _first(two_stage.SECOND_PROMPT)
    for part, n in zip(parts, failed, strict=True):
        calls = backward_calls(part)
        by_prompt = {
            marker: [c for c in calls if c.mentions(marker)]
            for marker in (first, second)
        }
        assert sum(map(len, by_prompt.values())) == len(calls)
        for marker, mine in by_prompt.items():
            samples = sum(c.samples for c in mine)
            assert len(mine) == ceil8(samples), (marker, mine)
            assert all(c.samples <= 8 for c in mine)
        assert sum(c.samples for c in by_prompt[second]) == n
        assert sum(c.samples for c in by_prompt[first]) <= n


@needs_shared_dataset("the two-stage learning experiment")
def test_a_traced_two_stage_chain_learns_its_first_prompt_in_cheap_mode(
    tmp_path: Path,
) -> None:
    """The two-stage result of the tracing issue, with ``backward="cheap"``
    explicitly: the first prompt learns an ``unhappy`` rule (for its own field,
    the feeling) that only the second stage's feedback can teach, the second
    prompt is unchanged, the held-out median gain is at least 15 points."""
    root = two_stage.data_root(tmp_path, SHARED_DATASET)
    runs = []
    for seed in (0, 1, 2):
        splits = two_stage.load_splits(root, seed)
        with simulated() as (sim, _):
            chain = two_stage.build_chain(sim_chat(sim))
            _, report = optimize(
                chain,
                [({"message": m}, t) for m, t in splits.train],
                two_stage.exact,
                valset=[({"message": m}, t) for m, t in splits.heldout],
                epochs=1,
                batch_size=16,
                seed=seed,
                progress=False,
                model=SIMULATOR_MODEL,
                backward="cheap",
                root_dir=str(tmp_path / f"seed{seed}"),
            )
            assert kinds(list(sim.requests))["evaluator_backward"] == 0
        texts = list(report.prompts_after.values())

        def after(start: str, texts: list[str] = texts) -> str:
            return next((t for t in texts if t.startswith(_first(start))), start)

        runs.append(
            two_stage.Outcome(
                "chain",
                "real",
                seed,
                float(report.score_before or 0.0),
                float(report.score_after or 0.0),
                after(two_stage.FIRST_PROMPT),
                after(two_stage.SECOND_PROMPT),
                0.0,
            )
        )
    print({o.seed: f"{o.before:.3f}->{o.after:.3f}" for o in runs})
    assert two_stage.learning_problems(runs, min_gain=0.15) == []
    assert statistics.median(o.gain for o in runs) >= 0.15


# -- a create_agent agent with tools ----------------------------------------------


@needs_shared_dataset("the support agent's rows")
def test_an_agent_groups_its_chat_backward_calls_and_upstream_does_not(
    tmp_path: Path,
) -> None:
    """A ``create_agent`` support agent with three tools, one step of 16 rows,
    ``trajectory_match`` (a metric with its own feedback: no evaluator-backward call
    in either mode): cheap sends the step's chat-backward samples (one per LM call
    that got feedback) in ceil(samples / 8) calls, upstream one call per sample;
    both ask about the same samples."""
    pytest.importorskip("langgraph", reason="needs the agents extra")
    from langchain.agents import create_agent

    from afnio_integrations.langchain import trajectory_match
    from tests.integrations.langchain import _facility_tools as facility

    rows = facility.training_split(0, 16, facility.load_rows())
    items = {}
    for mode in ("cheap", "upstream"):
        with simulated() as (sim, _):
            agent = create_agent(
                sim_chat(sim, temperature=0),
                tools=facility.make_tools(),
                system_prompt=facility.INITIAL_SYSTEM_PROMPT,
            )
            optimize(
                agent,
                [(row.message, row.tool) for row in rows],
                trajectory_match("strict"),
                epochs=1,
                batch_size=16,
                progress=False,
                model=SIMULATOR_MODEL,
                backward=mode,
                root_dir=str(tmp_path / mode),
            )
            requests = list(sim.requests)
        counted = kinds(requests)
        assert counted["evaluator_backward"] == 0 and counted["optimizer"] >= 1
        calls = backward_calls(requests)
        items[mode] = sum(c.samples for c in calls)
        print(mode, dict(counted), [c.samples for c in calls])
        if mode == "cheap":
            assert len(calls) == ceil8(items[mode]) and len(calls) >= 1, calls
            assert all(c.samples <= 8 for c in calls)
        else:
            assert all(c.kind == "chat_backward" for c in calls)
    assert items["cheap"] == items["upstream"] >= 2, items
