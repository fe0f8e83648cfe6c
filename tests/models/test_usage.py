"""Cost totals do not depend on the order concurrent LM calls answer in.

Float addition is not associative, so a total summed in completion order differs in
its last bits from run to run (and between a recorded run and its replay). Every
accumulator of costs (a model client's usage, a traced program's usage, the phase
ledger) keeps the total exactly and rounds once."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest

from afnio.models.phases import PhaseLedger
from afnio.models.usage import ExactSum


def _costs(seed: int, n: int = 200) -> list[float]:
    """Per-call costs shaped like real ones: tokens times a per-token price."""
    rng = random.Random(seed)
    prices = (0.15e-6, 0.6e-6, 2.5e-6, 10e-6)
    return [rng.randint(1, 4000) * rng.choice(prices) for _ in range(n)]


def _float_total(amounts: list[float]) -> float:
    total = 0.0
    for amount in amounts:
        total += amount
    return total


def _exact_total(amounts: list[float]) -> float:
    exact, value = ExactSum(), 0.0
    for amount in amounts:
        value = exact.add(amount, value)
    return value


@pytest.mark.parametrize("seed", range(5))
def test_exact_sum_is_the_same_in_every_order_where_float_sums_differ(
    seed: int,
) -> None:
    costs = _costs(seed)
    rng = random.Random(seed)
    orders = [costs] + [rng.sample(costs, len(costs)) for _ in range(30)]
    # the premise: plain float sums of these costs vary with the order
    assert len({_float_total(order) for order in orders}) > 1
    exact = {_exact_total(order) for order in orders}
    assert exact == {float(sum(map(Fraction, costs)))}


def test_exact_sum_restarts_from_a_value_set_elsewhere() -> None:
    exact = ExactSum()
    value = exact.add(0.1, 0.0)
    value = exact.add(0.2, value)
    # the usage dict was cleared (or restored from a checkpoint) meanwhile
    assert exact.add(0.25, 0.0) == 0.25
    assert exact.add(0.25, 2.0) == 2.25
    assert exact.add(0.5, 2.25) == 2.75


def test_exact_sum_of_a_non_finite_amount_is_the_float_sum() -> None:
    exact = ExactSum()
    assert exact.add(float("inf"), 1.0) == float("inf")
    assert exact.add(1.0, 0.0) == 1.0  # and starts again from a finite value


@pytest.mark.parametrize("seed", range(3))
def test_ledger_totals_are_bit_identical_in_any_order(seed: int) -> None:
    costs = _costs(seed)
    rng = random.Random(seed)
    snapshots = []
    rows = []
    for _ in range(10):
        ledger = PhaseLedger()
        for cost in rng.sample(costs, len(costs)):
            ledger.record("gpt-4o", {"prompt_tokens": 3}, cost, phase="forward")
        snapshots.append(ledger.snapshot())
        rows.append(ledger.since())
    assert all(s == snapshots[0] for s in snapshots)
    assert all(r == rows[0] for r in rows)
    assert snapshots[0][("forward", "gpt-4o")][3] == float(sum(map(Fraction, costs)))


def test_ledger_since_a_snapshot_is_the_same_in_any_order_within_a_step() -> None:
    first, second = _costs(1, 50), _costs(2, 50)
    rng = random.Random(0)
    deltas = set()
    for _ in range(10):
        ledger = PhaseLedger()
        for cost in rng.sample(first, len(first)):
            ledger.record("m", None, cost, phase="backward")
        before = ledger.snapshot()
        for cost in rng.sample(second, len(second)):
            ledger.record("m", None, cost, phase="backward")
        (row,) = ledger.since(before)
        deltas.add(row.cost)
    assert len(deltas) == 1


def test_openai_client_cost_is_the_same_in_any_order() -> None:
    pytest.importorskip("openai")
    from afnio.models.openai import OpenAI

    usages = [
        {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        for p, c in zip(
            random.Random(3).choices(range(1, 3000), k=120),
            random.Random(4).choices(range(1, 500), k=120),
            strict=True,
        )
    ]
    rng = random.Random(5)
    amounts = set()
    for _ in range(8):
        client = OpenAI(api_key="sk-test", base_url="http://127.0.0.1:9/v1")
        for usage in rng.sample(usages, len(usages)):
            client.update_usage(usage, "gpt-4o-mini")
        amounts.add(client.get_usage()["cost"]["amount"])
        client.clear_usage()
        assert client.get_usage()["cost"]["amount"] == 0.0
        client.update_usage(usages[0], "gpt-4o-mini")  # counts again from zero
        assert client.get_usage()["cost"]["amount"] > 0.0
        client.close()
    assert len(amounts) == 1


def test_program_usage_cost_is_the_same_in_any_order() -> None:
    from afnio_integrations._usage import ProgramUsage

    usages = [{"prompt_tokens": n, "completion_tokens": n // 3} for n in range(1, 90)]
    rng = random.Random(6)
    amounts = set()
    for _ in range(8):
        usage = ProgramUsage("program")
        for one in rng.sample(usages, len(usages)):
            usage.add({"openai/gpt-4o": one})
        amounts.add(usage.get_usage()["cost"]["amount"])
    assert len(amounts) == 1
