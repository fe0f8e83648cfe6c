"""The pricing table and cost computation."""

from __future__ import annotations

import pytest

from afnio.models import get_model_price, register_model_price
from afnio.models.pricing import ModelPrice, calculate_cost, cost_of


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", ModelPrice(2.5, 10.0, 1.25)),
        ("gpt-4o-2024-08-06", ModelPrice(2.5, 10.0, 1.25)),  # dated snapshot
        ("gpt-4o-2024-05-13", ModelPrice(5.0, 15.0, None)),  # its own price
        ("gpt-5", ModelPrice(1.25, 10.0, 0.125)),
        ("gpt-5-mini", ModelPrice(0.25, 2.0, 0.025)),
        ("gpt-5-nano", ModelPrice(0.05, 0.4, 0.005)),
        ("o1-mini", ModelPrice(1.1, 4.4, 0.55)),
        ("afnio-sim-1", ModelPrice(0.5, 1.5, 0.05)),
    ],
)
def test_known_prices(model: str, expected: ModelPrice) -> None:
    assert get_model_price(model) == expected


def test_unknown_model_has_no_price() -> None:
    assert get_model_price("no-such-model") is None
    assert cost_of({"prompt_tokens": 10}, "no-such-model-2") == 0.0


def test_cost_formula_with_cached_tokens() -> None:
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 200,
        "prompt_tokens_details": {"cached_tokens": 400},
    }
    price = ModelPrice(input=2.0, output=8.0, cached=0.5)
    assert calculate_cost(usage, price) == pytest.approx(
        (600 * 2 + 400 * 0.5 + 200 * 8) / 1e6
    )
    no_cached_price = ModelPrice(input=2.0, output=8.0)
    assert calculate_cost(usage, no_cached_price) == pytest.approx(
        (1000 * 2 + 200 * 8) / 1e6
    )


def test_register_model_price_adds_and_overrides() -> None:
    register_model_price("my-finetune-x", input=3.0, output=12.0, cached=1.0)
    assert get_model_price("my-finetune-x") == ModelPrice(3.0, 12.0, 1.0)
    register_model_price("my-finetune-x", input=1.0, output=2.0)
    assert get_model_price("my-finetune-x") == ModelPrice(1.0, 2.0, None)
    with pytest.raises(ValueError, match="`input` must be a price >= 0"):
        register_model_price("bad", input=-1.0, output=1.0)
