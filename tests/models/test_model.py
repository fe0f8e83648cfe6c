"""``afnio.models.BaseModel``, the usage dict helpers and the model class registry
(contract: afnio-api.md section 5)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest

from afnio.models import (
    MODEL_REGISTRY,
    BaseModel,
    get_model_class,
    register_model_class,
)
from afnio.models.usage import add_usage, clear_usage_values, default_usage

CONTRACT_USAGE = {
    "completion_tokens": 0,
    "prompt_tokens": 0,
    "total_tokens": 0,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
    "cost": {"amount": 0.0, "currency": "USD"},
}


class CountingModel(BaseModel):
    """A concrete client: adds token counts, and the cost of a call at 0.5/token."""

    def update_usage(self, usage: Any, model_name: str | None = None) -> None:
        add_usage(self._usage, usage)
        if model_name is not None:
            self._usage["cost"]["amount"] += 0.5 * usage.get("total_tokens", 0)


@pytest.fixture
def registry() -> Iterator[dict[str, type[BaseModel]]]:
    """MODEL_REGISTRY, restored to its entries before the test afterwards."""
    before = dict(MODEL_REGISTRY)
    yield MODEL_REGISTRY
    MODEL_REGISTRY.clear()
    MODEL_REGISTRY.update(before)


def _used_model() -> CountingModel:
    model = CountingModel(provider="acme", config={"model": "m-1", "timeout": 5})
    model.update_usage(
        {
            "prompt_tokens": 10,
            "completion_tokens": 4,
            "total_tokens": 14,
            "prompt_tokens_details": {"cached_tokens": 3, "audio_tokens": None},
            "completion_tokens_details": {"reasoning_tokens": 2},
        },
        model_name="m-1",
    )
    return model


# -- BaseModel -------------------------------------------------------------------------


def test_base_model_is_abstract():
    with pytest.raises(TypeError):
        BaseModel()  # type: ignore[abstract]


def test_subclass_without_update_usage_is_abstract():
    class Incomplete(BaseModel):
        pass

    with pytest.raises(TypeError, match="update_usage"):
        Incomplete()  # type: ignore[abstract]


def test_initial_usage_is_the_contract_dict():
    model = CountingModel()
    assert model.get_usage() == CONTRACT_USAGE
    assert list(model.get_usage()) == list(CONTRACT_USAGE)
    assert type(model.get_usage()["cost"]["amount"]) is float


def test_default_usage_returns_a_fresh_contract_dict_each_time():
    first = default_usage()
    assert first == CONTRACT_USAGE
    first["prompt_tokens_details"]["cached_tokens"] = 9
    assert default_usage() == CONTRACT_USAGE


def test_defaults_are_no_provider_and_empty_config():
    model = CountingModel()
    assert model.get_provider() is None
    assert model.provider is None
    assert model.get_config() == {}


def test_get_provider_and_get_config_return_the_constructor_values():
    config = {"model": "m-1", "base_url": "http://localhost"}
    model = CountingModel(provider="acme", config=config)
    assert model.get_provider() == "acme"
    assert model.get_config() == {"model": "m-1", "base_url": "http://localhost"}


def test_get_config_returns_a_copy():
    config = {"model": "m-1"}
    model = CountingModel(config=config)
    model.get_config()["model"] = "changed"
    config["model"] = "changed too"
    assert model.get_config() == {"model": "m-1"}


def test_model_id_is_set():
    model = CountingModel()
    assert model.model_id == id(model)


def test_starting_usage_is_copied_and_gets_a_cost_entry():
    usage = {"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": 1}}
    model = CountingModel(usage=usage)
    usage["prompt_tokens_details"]["cached_tokens"] = 99
    assert model.get_usage() == {
        "prompt_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 1},
        "cost": {"amount": 0.0, "currency": "USD"},
    }


def test_starting_usage_keeps_its_own_cost():
    usage = {"total_tokens": 2, "cost": {"amount": 1.25, "currency": "USD"}}
    model = CountingModel(usage=usage)
    assert model.get_usage() == usage


def test_update_usage_adds_counts_and_cost():
    model = _used_model()
    assert model.get_usage() == {
        "completion_tokens": 4,
        "prompt_tokens": 10,
        "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 3, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 2,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
        "cost": {"amount": 7.0, "currency": "USD"},
    }


def test_get_usage_returns_a_copy():
    model = _used_model()
    expected = model.get_usage()
    usage = model.get_usage()
    usage["prompt_tokens"] = 1000
    usage["cost"] = {"amount": 99.0, "currency": "EUR"}
    del usage["total_tokens"]
    assert model.get_usage() == expected
    assert model.get_usage() is not model.get_usage()


def test_clear_usage_resets_every_count_to_the_contract_dict():
    model = _used_model()
    model.clear_usage()
    assert model.get_usage() == CONTRACT_USAGE
    assert type(model.get_usage()["cost"]["amount"]) is float
    assert type(model.get_usage()["prompt_tokens"]) is int


def test_clear_usage_keeps_extra_keys_and_zeroes_them():
    model = CountingModel(usage={"custom": {"images": 3, "seconds": 1.5}, "flag": True})
    model.clear_usage()
    assert model.get_usage() == {
        "custom": {"images": 0, "seconds": 0.0},
        "flag": True,
        "cost": {"amount": 0.0, "currency": "USD"},
    }


def test_clear_usage_values_works_in_place_on_nested_dicts():
    usage = {"a": 3, "b": {"c": 2.5, "d": "text"}}
    clear_usage_values(usage)
    assert usage == {"a": 0, "b": {"c": 0.0, "d": "text"}}


def test_deepcopy_returns_the_checkpoint_dict():
    model = _used_model()
    copied = copy.deepcopy(model)
    assert copied == {
        "class_type": "CountingModel",
        "provider": "acme",
        "usage": model.get_usage(),
    }
    assert list(copied) == ["class_type", "provider", "usage"]


def test_deepcopy_usage_is_independent_and_holds_no_config():
    model = _used_model()
    copied = copy.deepcopy(model)
    copied["usage"]["prompt_tokens_details"]["cached_tokens"] = 1000
    assert model.get_usage()["prompt_tokens_details"]["cached_tokens"] == 3
    assert "m-1" not in repr(copied)


# -- add_usage -------------------------------------------------------------------------


def test_add_usage_adds_nested_counts_in_place():
    target = default_usage()
    add_usage(
        target, {"prompt_tokens": 3, "prompt_tokens_details": {"cached_tokens": 1}}
    )
    add_usage(
        target,
        {
            "prompt_tokens": 2,
            "total_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 2, "audio_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 5},
        },
    )
    expected = default_usage()
    expected["prompt_tokens"] = 5
    expected["total_tokens"] = 7
    expected["prompt_tokens_details"] = {"cached_tokens": 3, "audio_tokens": 4}
    expected["completion_tokens_details"]["reasoning_tokens"] = 5
    assert target == expected


def test_add_usage_skips_none_values():
    target = {"prompt_tokens": 1, "details": {"cached_tokens": 2}}
    add_usage(
        target,
        {"prompt_tokens": None, "details": None, "total_tokens": None},
    )
    assert target == {"prompt_tokens": 1, "details": {"cached_tokens": 2}}
    add_usage(target, {"details": {"cached_tokens": None, "audio_tokens": 1}})
    assert target == {
        "prompt_tokens": 1,
        "details": {"cached_tokens": 2, "audio_tokens": 1},
    }


def test_add_usage_never_touches_cost():
    target = default_usage()
    target["cost"]["amount"] = 1.5
    add_usage(target, {"cost": {"amount": 10.0, "currency": "EUR"}, "total_tokens": 1})
    assert target["cost"] == {"amount": 1.5, "currency": "USD"}
    assert target["total_tokens"] == 1
    fresh: dict[str, Any] = {}
    add_usage(fresh, {"cost": {"amount": 2.0}})
    assert fresh == {}


def test_add_usage_creates_missing_keys_and_adds_floats():
    target: dict[str, Any] = {}
    add_usage(target, {"a": 1, "b": {"c": 0.5}})
    add_usage(target, {"a": 2, "b": {"c": 0.25}})
    assert target == {"a": 3, "b": {"c": 0.75}}


def test_add_usage_ignores_non_numeric_values():
    target = {"a": 1}
    add_usage(target, {"a": 1, "model": "m-1", "flag": True})
    assert target == {"a": 2}


# -- the registry ----------------------------------------------------------------------


def test_register_model_class_is_a_decorator_returning_the_class(registry):
    @register_model_class
    class DecoratedTestModel(CountingModel):
        pass

    assert isinstance(DecoratedTestModel, type)
    assert registry["DecoratedTestModel"] is DecoratedTestModel
    assert get_model_class("DecoratedTestModel") is DecoratedTestModel


def test_register_model_class_under_an_explicit_name(registry):
    assert (
        register_model_class(CountingModel, name="RegistryTestAlias") is CountingModel
    )
    assert get_model_class("RegistryTestAlias") is CountingModel
    assert "CountingModel" not in registry


def test_registering_the_same_class_twice_is_allowed(registry):
    register_model_class(CountingModel)
    register_model_class(CountingModel)
    assert registry["CountingModel"] is CountingModel


def test_registering_a_different_class_under_a_taken_name_raises(registry):
    register_model_class(CountingModel)

    class CountingModel2(CountingModel):
        pass

    with pytest.raises(ValueError, match="'CountingModel'") as info:
        register_model_class(CountingModel2, name="CountingModel")
    assert "pass another `name`" in str(info.value)
    assert registry["CountingModel"] is CountingModel


@pytest.mark.parametrize(
    "cls",
    [object, dict, CountingModel(), "CountingModel", None],
    ids=["object", "dict", "instance", "str", "none"],
)
def test_registering_a_non_base_model_raises_type_error(registry, cls):
    before = dict(registry)
    with pytest.raises(TypeError, match="BaseModel subclass"):
        register_model_class(cls)
    assert registry == before


def test_get_model_class_of_an_unknown_name_raises_listing_the_registered(registry):
    register_model_class(CountingModel, name="RegistryTestB")
    register_model_class(CountingModel, name="RegistryTestA")

    with pytest.raises(KeyError) as info:
        get_model_class("NoSuchModel")

    message = info.value.args[0]
    assert "'NoSuchModel'" in message
    known = ", ".join(sorted(registry))
    assert f"(registered: {known})" in message
    assert "RegistryTestA, RegistryTestB" in known
