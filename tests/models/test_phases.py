"""LM calls by phase: the ledger, and every phase of a step attributed correctly."""

from __future__ import annotations

import pickle

import pytest

import afnio
from afnio import cognitive as cog
from afnio.models.openai import OpenAI
from afnio.models.phases import LEDGER, PHASES, PhaseLedger, current_phase, lm_phase
from afnio.optim import TGD
from afnio.testing import SIMULATOR_MODEL, Simulator


def test_the_ledger_sums_by_phase_and_model_since_a_snapshot() -> None:
    ledger = PhaseLedger()
    ledger.record("m1", {"prompt_tokens": 10, "completion_tokens": 2}, 0.5)
    start = ledger.snapshot()
    with lm_phase("backward"):
        ledger.record("m1", {"prompt_tokens": 7, "completion_tokens": 1}, 0.25)
        ledger.record("m1", {"prompt_tokens": 3}, 0.25)
    ledger.record("m2", None, calls=2, phase="optimizer")
    rows = ledger.since(start)
    assert [(r.phase, r.model, r.calls) for r in rows] == [
        ("backward", "m1", 2),
        ("optimizer", "m2", 2),
    ]
    assert (rows[0].prompt_tokens, rows[0].completion_tokens, rows[0].cost) == (
        10,
        1,
        0.5,
    )
    assert ledger.since()[0].phase == "forward"


def test_lm_phase_checks_its_name_and_restores_the_previous_phase() -> None:
    with pytest.raises(ValueError, match="`phase` must be one of"), lm_phase("x"):
        pass
    with lm_phase("evaluator"), lm_phase("optimizer"):
        assert current_phase() == "optimizer"
    assert current_phase() == "forward"
    assert PHASES == ("forward", "evaluator", "backward", "optimizer")


def test_a_step_records_forward_evaluator_backward_and_optimizer_calls() -> None:
    start = LEDGER.snapshot()
    with Simulator() as sim, OpenAI(base_url=sim.base_url, api_key="sk-test") as llm:
        afnio.set_backward_model_client(llm, completion_args={"model": SIMULATOR_MODEL})
        instruction = cog.Parameter("Classify the sentiment.", role="system prompt")
        messages = [
            {"role": "system", "content": [instruction]},
            {"role": "user", "content": [afnio.Variable("{message}", role="input")]},
        ]
        prediction = cog.functional.chat_completion(
            llm,
            messages,
            inputs={"message": ["All good.", "I am disappointed.", "So frustrated!"]},
            model=SIMULATOR_MODEL,
        )
        judge = [
            {
                "role": "user",
                "content": [
                    afnio.Variable(
                        "<PREDICTION>{prediction}</PREDICTION><TARGET>{target}</TARGET>",
                        role="judge prompt",
                    )
                ],
            }
        ]
        _, explanation = cog.functional.lm_judge_evaluator(
            llm,
            judge,
            prediction,
            ["neutral", "negative", "negative"],
            model=SIMULATOR_MODEL,
        )
        explanation.backward()
        TGD([instruction], model_client=llm, model=SIMULATOR_MODEL).step()
        rows = {r.phase: r for r in LEDGER.since(start)}
        assert rows["forward"].calls == 3
        assert rows["evaluator"].calls == 3
        # one call for the judge's feedback on the 2 failed samples (one group),
        # then the chat's, per failed sample
        assert rows["backward"].calls == 1 + 2
        assert rows["optimizer"].calls == 1
        assert sum(r.calls for r in rows.values()) == sim.stats.calls
        assert all(r.model == SIMULATOR_MODEL and r.cost > 0 for r in rows.values())


def test_since_a_snapshot_has_no_row_when_nothing_was_recorded_since() -> None:
    # 0.1 + 0.2 + 0.3 is not a float: the snapshot's total is rounded, and its
    # rounding residue once showed up as a row of 0 calls in every later `since`
    ledger = PhaseLedger()
    for cost in (0.1, 0.2, 0.3):
        ledger.record("m", {"prompt_tokens": 1}, cost, phase="evaluator")
    start = ledger.snapshot()
    assert ledger.since(start) == []
    ledger.record("m", None, 0.7, phase="evaluator")
    (row,) = ledger.since(start)
    assert (row.phase, row.calls, row.cost) == ("evaluator", 1, 0.7)


def test_since_a_snapshot_copied_as_plain_floats_has_no_rounding_row() -> None:
    ledger = PhaseLedger()
    for cost in (0.1, 0.2, 0.3):
        ledger.record("m", None, cost)
    copied = {
        key: tuple(float(x) for x in row) for key, row in ledger.snapshot().items()
    }
    assert ledger.since(copied) == []
    assert pickle.loads(pickle.dumps(ledger.snapshot())) == ledger.snapshot()
    assert ledger.since(pickle.loads(pickle.dumps(ledger.snapshot()))) == []


def test_a_global_ledger_total_left_by_earlier_work_adds_no_row_to_a_later_run() -> (
    None
):
    from afnio_integrations._usage import ProgramUsage

    usage = ProgramUsage("earlier program")
    for n in range(1, 30):  # leaves forward totals that a float cannot hold
        usage.add({"openai/gpt-4o": {"prompt_tokens": n, "completion_tokens": n}})
    start = LEDGER.snapshot()
    assert [r for r in LEDGER.since(start) if r.model == "gpt-4o"] == []
