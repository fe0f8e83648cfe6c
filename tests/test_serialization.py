"""``afnio.save`` / ``afnio.load``: a zip holding ``data.json`` of tagged JSON, never
pickle (contract: afnio-api.md section 7 and deliberate differences 4, 10, 18)."""

from __future__ import annotations

import builtins
import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import pickle
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import afnio
from afnio import Variable
from afnio.cognitive import Module, Parameter
from afnio.cognitive.modules.module import FunctionReference
from afnio.errors import SerializationError
from afnio.models import MODEL_REGISTRY, BaseModel, register_model_class
from afnio.models.usage import add_usage
from afnio.serialization import FORMAT_VERSION, LoadLimits, _host_tag
from tests.fixtures_serialization import event_log, plain_funcs
from tests.fixtures_serialization.hostile_files import CASES as HOSTILE_CASES
from tests.fixtures_serialization.hostile_files import raw_deflate, write_zip

SIDE_EFFECT_MODULE = "tests.fixtures_serialization.side_effect_mod"
SIDE_EFFECT_PATH = f"{SIDE_EFFECT_MODULE}:hooked"
IMPORT_EVENT = f"imported {SIDE_EFFECT_MODULE}"
MODEL_NAME = "SerializationTestModel"
_TAG = "__afnio__"


# -- helpers ---------------------------------------------------------------------------


class SerializationTestModel(BaseModel):
    """A minimal model client: adds token counts; a restore (no ``model_name``) sets
    the cost to the saved amount."""

    def update_usage(self, usage: Any, model_name: str | None = None) -> None:
        add_usage(self._usage, usage)
        if model_name is None and usage.get("cost") is not None:
            self._usage["cost"] = dict(usage["cost"])


@pytest.fixture
def registered_model() -> Iterator[type[SerializationTestModel]]:
    assert MODEL_NAME not in MODEL_REGISTRY
    register_model_class(SerializationTestModel)
    yield SerializationTestModel
    MODEL_REGISTRY.pop(MODEL_NAME, None)


@pytest.fixture
def events() -> Iterator[list[str]]:
    """The fixture modules' event log, empty before and after the test."""
    event_log.EVENTS.clear()
    yield event_log.EVENTS
    event_log.EVENTS.clear()


@pytest.fixture
def unimported_side_effect_module(events: list[str]) -> Iterator[list[str]]:
    """Make sure the side-effect module is not imported (pytest's doctest collection
    may have imported it) and forget it again afterwards."""
    sys.modules.pop(SIDE_EFFECT_MODULE, None)
    yield events
    sys.modules.pop(SIDE_EFFECT_MODULE, None)


class Child(Module):
    def __init__(self) -> None:
        super().__init__()
        self.hint = Parameter("Think step by step.", role="hint")

    def forward(self, x: Any) -> Any:
        return x


class Agent(Module):
    """A module with one slot of every saved kind."""

    def __init__(self, model: BaseModel | None = None) -> None:
        super().__init__()
        self.instruction = Parameter("Answer briefly.", role="instruction")
        self.frozen = Parameter(["a", "b"], role="examples", requires_grad=False)
        self.register_buffer("suffix", Variable("!", role="suffix"))
        self.chat = [
            {"role": "system", "content": [Variable("Be kind.", role="system")]},
            {
                "role": "user",
                "content": [Variable("{q}", role="question"), Variable(3, role="n")],
            },
        ]
        self.register_model("model", model)
        self.config = {"temperature": 0.2, "max_tokens": 64, "stop": ["\n"]}
        self.scorer = sum
        self.formatter = plain_funcs.shout
        self.child = Child()

    def forward(self, x: Any) -> Any:
        return x


def _trained_agent() -> tuple[Agent, SerializationTestModel]:
    """An Agent whose every slot differs from a fresh ``Agent()``."""
    client = SerializationTestModel(provider="test-provider", config={"k": 1})
    client.update_usage(
        {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "total_tokens": 15,
            "prompt_tokens_details": {"cached_tokens": 2, "audio_tokens": 0},
            "cost": {"amount": 0.25, "currency": "USD"},
        }
    )
    agent = Agent(client)
    agent.instruction.data = "Answer in one word."
    agent.instruction.role = "tuned instruction"
    agent.frozen.data = ["c", "d"]
    agent.suffix.data = "?"
    agent.chat[0]["content"][0].data = "Be terse."
    agent.chat[1]["content"][1].data = 4
    agent.config = {"temperature": 0.0, "max_tokens": 8, "stop": ["END"], "seed": 7}
    agent.scorer = max
    agent.formatter = plain_funcs.whisper
    agent.child.hint.data = "Think twice."
    return agent, client


def _var_state(v: Any) -> tuple[type, Any, str, bool]:
    return type(v), v.data, v.role, v.requires_grad


def _save_load(obj: Any, target: str, tmp_path: Path, **load_kwargs: Any) -> Any:
    if target == "path":
        path = tmp_path / "ckpt.hf"
        afnio.save(obj, path)
        return afnio.load(path, **load_kwargs)
    buf = io.BytesIO()
    afnio.save(obj, buf)
    buf.seek(0)
    return afnio.load(buf, **load_kwargs)


@pytest.fixture(params=["path", "bytesio"])
def roundtrip(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Any]:
    """``roundtrip(obj, **load_kwargs)``: save then load, to a path or a BytesIO."""
    return lambda obj, **kw: _save_load(obj, request.param, tmp_path, **kw)


def _write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    return path


def _write_document(path: Path, document: Any) -> Path:
    return _write_zip(path, {"data.json": json.dumps(document).encode("utf-8")})


def _write_data(path: Path, data: Any) -> Path:
    return _write_document(
        path, {"format": "afnio", "version": FORMAT_VERSION, "data": data}
    )


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- the file format -------------------------------------------------------------------


def test_save_writes_a_deflated_zip_with_only_data_json_holding_the_marker(tmp_path):
    path = tmp_path / "ckpt.hf"
    afnio.save({"x": 1}, path)
    with zipfile.ZipFile(path) as zf:
        assert zf.namelist() == ["data.json"]
        assert zf.getinfo("data.json").compress_type == zipfile.ZIP_DEFLATED
        document = json.loads(zf.read("data.json").decode("utf-8"))
    assert document["format"] == "afnio"
    assert document["version"] == FORMAT_VERSION == 1
    assert list(document) == ["format", "version", "data"]


def test_save_to_a_binary_file_object_and_load_from_one(tmp_path):
    path = tmp_path / "ckpt.hf"
    with open(path, "wb") as f:
        afnio.save({"x": [1, 2]}, f)
    with open(path, "rb") as f:
        assert afnio.load(f) == {"x": [1, 2]}


def test_save_accepts_a_str_path(tmp_path):
    path = str(tmp_path / "ckpt.hf")
    afnio.save("text", path)
    assert afnio.load(path) == "text"


# -- round trips -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    ["Hello world", "", 7, -3, 2.5, ["a", "b"], [1, 2, 3], [1.5, 2.0], []],
    ids=["str", "empty-str", "int", "neg-int", "float", "str-list", "int-list",
         "float-list", "empty-list"],
)  # fmt: skip
@pytest.mark.parametrize("requires_grad", [True, False])
def test_variable_roundtrip_keeps_data_role_and_requires_grad(
    roundtrip, data, requires_grad
):
    v = Variable(data, role="a role", requires_grad=requires_grad)
    loaded = roundtrip(v)
    assert _var_state(loaded) == (Variable, data, "a role", requires_grad)
    assert type(loaded.data) is type(data)
    if isinstance(data, list):
        assert [type(x) for x in loaded.data] == [type(x) for x in data]
    assert loaded.is_leaf is True
    assert loaded.grad_fn is None


@pytest.mark.parametrize("requires_grad", [True, False])
def test_parameter_roundtrip_stays_a_parameter_and_keeps_requires_grad(
    roundtrip, requires_grad
):
    p = Parameter("Be brief.", role="system prompt", requires_grad=requires_grad)
    loaded = roundtrip(p)
    assert _var_state(loaded) == (
        Parameter,
        "Be brief.",
        "system prompt",
        requires_grad,
    )


def test_variable_with_a_grad_fn_is_saved_as_a_detached_leaf(roundtrip):
    x = Variable("a", role="x", requires_grad=True)
    y = x + Variable("b", role="y")
    loaded = roundtrip(y)
    assert _var_state(loaded) == (Variable, "ab", y.role, True)
    assert loaded.grad_fn is None
    assert loaded.is_leaf is True


def test_nested_containers_roundtrip_keep_tuples_int_keys_and_key_order(roundtrip):
    obj = {
        "z": 1,
        3: "int key",
        "a": (1, "two", (3.0, None), [4, (5,)]),
        2.5: {"inner": [1, {"deep": (True, False)}]},
        None: "none key",
        (1, "t"): "tuple key",
        "empty": {},
        "empty_list": [],
        "empty_tuple": (),
    }
    loaded = roundtrip(obj)
    assert loaded == obj
    assert type(loaded) is dict
    assert list(loaded) == list(obj)
    assert type(loaded["a"]) is tuple
    assert type(loaded["a"][2]) is tuple
    assert type(loaded["a"][3]) is list
    assert type(loaded["a"][3][1]) is tuple
    assert type(loaded["empty_tuple"]) is tuple
    assert type(loaded[2.5]["inner"][1]["deep"]) is tuple
    assert 3 in loaded and "3" not in loaded
    assert (1, "t") in loaded


def test_top_level_tuple_and_list_roundtrip(roundtrip):
    assert roundtrip((1, [2, (3,)])) == (1, [2, (3,)])
    assert type(roundtrip((1, 2))) is tuple
    loaded = roundtrip([(1,), [2]])
    assert type(loaded) is list
    assert type(loaded[0]) is tuple


@pytest.mark.parametrize(
    "value",
    [None, True, False, 0, 1, -12345678901234567890, 1.5, -0.25, float("inf"),
     float("-inf"), "", "plain", "ünïcödé ✓ 中文", 'quote " and \\ backslash'],
)  # fmt: skip
def test_primitive_values_roundtrip_with_their_exact_type(roundtrip, value):
    loaded = roundtrip(value)
    assert loaded == value
    assert type(loaded) is type(value)


def test_nan_roundtrips_as_a_float_nan(roundtrip):
    loaded = roundtrip({"x": float("nan")})
    assert type(loaded["x"]) is float
    assert math.isnan(loaded["x"])


def test_str_with_a_lone_surrogate_roundtrips(roundtrip):
    # Python strs may hold lone surrogates (e.g. from os.fsdecode); a supported str
    # must not fail to save with a UnicodeEncodeError.
    assert roundtrip({"x": "a\udc80b"}) == {"x": "a\udc80b"}


def test_user_dict_that_looks_like_a_tag_stays_a_plain_dict(roundtrip):
    obj = {"__afnio__": "function", "path": "os:system"}
    loaded = roundtrip(obj, allow_functions=True)
    assert loaded == obj
    assert type(loaded) is dict


def test_variables_nested_in_containers_roundtrip(roundtrip):
    obj = {
        "pair": (Variable("q", role="question"), Parameter("p", role="prompt")),
        "list": [Variable([1, 2], role="batch", requires_grad=True)],
    }
    loaded = roundtrip(obj)
    assert _var_state(loaded["pair"][0]) == (Variable, "q", "question", False)
    assert _var_state(loaded["pair"][1]) == (Parameter, "p", "prompt", True)
    assert _var_state(loaded["list"][0]) == (Variable, [1, 2], "batch", True)


def test_completion_config_dict_roundtrips(roundtrip):
    config = {
        "model": "gpt-4o",
        "temperature": 0.0,
        "max_tokens": 256,
        "top_p": 1,
        "stop": ["\n\n", "END"],
        "seed": None,
        "stream": False,
        "response_format": {"type": "json_object"},
        "logit_bias": {"50256": -100},
    }
    loaded = roundtrip(config)
    assert loaded == config
    assert list(loaded) == list(config)
    assert type(loaded["temperature"]) is float
    assert type(loaded["top_p"]) is int


def test_chat_roundtrips_as_messages_of_variables(roundtrip):
    chat = [
        {"role": "system", "content": [Variable("Be kind.", role="system prompt")]},
        {
            "role": "user",
            "content": [
                Variable("Hi {name}", role="template", requires_grad=True),
                Variable(["Ann", "Bob"], role="names"),
            ],
        },
    ]
    loaded = roundtrip({"chat": chat})["chat"]
    assert [list(m) for m in loaded] == [["role", "content"], ["role", "content"]]
    assert [m["role"] for m in loaded] == ["system", "user"]
    assert [[_var_state(v) for v in m["content"]] for m in loaded] == [
        [(Variable, "Be kind.", "system prompt", False)],
        [
            (Variable, "Hi {name}", "template", True),
            (Variable, ["Ann", "Bob"], "names", False),
        ],
    ]


def test_model_client_is_saved_as_class_type_provider_and_usage(
    roundtrip, registered_model
):
    client = registered_model(provider="test-provider", config={"api_key": "sk-x"})
    client.update_usage({"prompt_tokens": 3, "total_tokens": 3})
    loaded = roundtrip({"client": client})
    assert loaded == {
        "client": {
            "class_type": MODEL_NAME,
            "provider": "test-provider",
            "usage": client.get_usage(),
        }
    }
    assert loaded["client"] == copy.deepcopy(client)
    assert "sk-x" not in repr(loaded)


def test_functions_are_saved_by_import_path_and_load_as_references(roundtrip):
    loaded = roundtrip({"sum": sum, "shout": plain_funcs.shout})
    assert loaded == {
        "sum": FunctionReference("builtins:sum"),
        "shout": FunctionReference("tests.fixtures_serialization.plain_funcs:shout"),
    }
    assert all(type(v) is FunctionReference for v in loaded.values())


def test_functions_load_as_the_real_functions_when_allowed(roundtrip):
    loaded = roundtrip(
        {"sum": sum, "shout": plain_funcs.shout},
        allow_functions=["builtins", "tests.fixtures_serialization.plain_funcs"],
    )
    assert loaded["sum"] is sum
    assert loaded["shout"] is plain_funcs.shout


def test_function_reference_is_saved_again_by_its_path(roundtrip):
    ref = FunctionReference("some.module:func")
    assert roundtrip([ref]) == [ref]


# -- Module state dicts ----------------------------------------------------------------


STATE_KEYS = [
    "instruction",
    "frozen",
    "suffix",
    "chat",
    "model",
    "config",
    "scorer",
    "formatter",
    "child.hint",
]


@pytest.mark.parametrize("keep_vars", [True, False])
def test_module_state_dict_roundtrip_restores_every_slot_into_a_fresh_module(
    roundtrip, registered_model, keep_vars
):
    agent, client = _trained_agent()
    state = agent.state_dict(keep_vars=keep_vars)
    assert list(state) == STATE_KEYS

    loaded = roundtrip(
        state, allow_functions=["builtins", "tests.fixtures_serialization.plain_funcs"]
    )

    assert type(loaded) is OrderedDict
    assert list(loaded) == STATE_KEYS
    assert type(loaded._metadata) is OrderedDict
    assert loaded._metadata == OrderedDict(
        [("", {"version": 1}), ("child", {"version": 1})]
    )
    assert loaded._metadata == state._metadata
    var_type = Parameter if keep_vars else Variable
    assert _var_state(loaded["instruction"]) == (
        var_type,
        "Answer in one word.",
        "tuned instruction",
        keep_vars,
    )
    assert _var_state(loaded["frozen"]) == (var_type, ["c", "d"], "examples", False)
    assert _var_state(loaded["suffix"]) == (Variable, "?", "suffix", False)
    assert _var_state(loaded["child.hint"]) == (
        var_type,
        "Think twice.",
        "hint",
        keep_vars,
    )
    assert [m["role"] for m in loaded["chat"]] == ["system", "user"]
    assert [[v.data for v in m["content"]] for m in loaded["chat"]] == [
        ["Be terse."],
        ["{q}", 4],
    ]
    assert loaded["model"] == {
        "class_type": MODEL_NAME,
        "provider": "test-provider",
        "usage": client.get_usage(),
    }
    assert loaded["config"] == {
        "temperature": 0.0,
        "max_tokens": 8,
        "stop": ["END"],
        "seed": 7,
    }
    assert loaded["scorer"] is max
    assert loaded["formatter"] is plain_funcs.whisper

    fresh_client = registered_model(provider="test-provider")
    fresh = Agent()
    instruction, chat_var = fresh.instruction, fresh.chat[1]["content"][1]
    result = fresh.load_state_dict(loaded, model_clients={"model": fresh_client})

    assert result.missing_keys == []
    assert result.unexpected_keys == []
    assert fresh.instruction is instruction  # copied into the existing slot
    assert fresh.chat[1]["content"][1] is chat_var
    assert _var_state(fresh.instruction) == (
        Parameter,
        "Answer in one word.",
        "tuned instruction",
        True,
    )
    assert _var_state(fresh.frozen) == (Parameter, ["c", "d"], "examples", False)
    assert _var_state(fresh.suffix) == (Variable, "?", "suffix", False)
    assert _var_state(fresh.child.hint) == (Parameter, "Think twice.", "hint", True)
    assert [[_var_state(v) for v in m["content"]] for m in fresh.chat] == [
        [(Variable, "Be terse.", "system", False)],
        [(Variable, "{q}", "question", False), (Variable, 4, "n", False)],
    ]
    assert fresh.model is fresh_client
    assert fresh_client.get_usage() == client.get_usage()
    assert fresh.config == agent.config
    assert fresh.scorer is max
    assert fresh.formatter is plain_funcs.whisper
    assert list(fresh.state_dict()) == STATE_KEYS


def test_state_dict_function_references_load_into_slots_holding_the_same_function(
    roundtrip,
):
    agent = Agent()
    agent.instruction.data = "changed"
    loaded = roundtrip(agent.state_dict())  # no allow_functions
    assert loaded["scorer"] == FunctionReference("builtins:sum")
    assert loaded["formatter"] == FunctionReference(
        "tests.fixtures_serialization.plain_funcs:shout"
    )

    fresh = Agent()
    result = fresh.load_state_dict(loaded)

    assert result.missing_keys == []
    assert result.unexpected_keys == []
    assert fresh.scorer is sum
    assert fresh.formatter is plain_funcs.shout
    assert fresh.instruction.data == "changed"


def test_function_reference_to_another_imported_function_is_refused(
    roundtrip,
):
    # plain_funcs is imported, so importing whisper would run nothing; the slot still
    # refuses it: the file may not choose which function the module calls
    agent = Agent()
    agent.instruction.data = "changed"
    loaded = roundtrip(agent.state_dict())
    fresh = Agent()
    fresh.formatter = plain_funcs.whisper
    with pytest.raises(RuntimeError, match="allow_functions") as info:
        fresh.load_state_dict(loaded)
    assert (
        f'function "formatter": refused {SHOUT_PATH!r} from the state dict (the slot '
        f"holds {WHISPER_PATH!r})"
    ) in str(info.value)
    assert fresh.formatter is plain_funcs.whisper
    assert fresh.instruction.data == "Answer briefly."

    fresh.load_state_dict(loaded, allow_functions=["tests.fixtures_serialization"])
    assert fresh.formatter is plain_funcs.shout
    assert fresh.instruction.data == "changed"


def test_function_reference_to_an_unimported_module_raises_and_changes_nothing(
    roundtrip,
):
    agent = Agent()
    agent.instruction.data = "changed"
    state = agent.state_dict()
    state["formatter"] = FunctionReference("afnio_never_imported_module:fn")
    fresh = Agent()
    fresh.formatter = plain_funcs.whisper
    with pytest.raises(RuntimeError, match="allow_functions") as info:
        fresh.load_state_dict(state)
    assert "afnio_never_imported_module:fn" in str(info.value)
    assert '"formatter"' in str(info.value)
    assert "afnio_never_imported_module" not in sys.modules
    assert fresh.formatter is plain_funcs.whisper
    assert fresh.instruction.data == "Answer briefly."


def test_model_slot_without_its_live_client_raises_naming_the_key(
    roundtrip, registered_model
):
    agent, _ = _trained_agent()
    loaded = roundtrip(agent.state_dict(), allow_functions=True)
    fresh = Agent()
    with pytest.raises(RuntimeError, match="model_clients") as info:
        fresh.load_state_dict(loaded)
    assert f"Missing model client for 'model' of expected type '{MODEL_NAME}'" in str(
        info.value
    )
    assert fresh.model is None
    assert fresh.instruction.data == "Answer briefly."


def test_model_registered_under_a_custom_name_roundtrips_through_a_checkpoint(
    roundtrip,
):
    # `name` exists to avoid clashes between classes with the same __name__; the
    # checkpoint must then name the class by its registered name, or load fails.
    class Clashing(BaseModel):
        def update_usage(self, usage: Any, model_name: str | None = None) -> None:
            add_usage(self._usage, usage)

    register_model_class(Clashing, name="SerializationCustomName")
    try:
        module = Module()
        module.register_model("model", Clashing(provider="p"))
        module.model.update_usage({"prompt_tokens": 2})
        loaded = roundtrip(module.state_dict())

        fresh_client = Clashing(provider="p")
        fresh = Module()
        fresh.register_model("model", None)
        fresh.load_state_dict(loaded, model_clients={"model": fresh_client})

        assert fresh.model is fresh_client
        assert fresh_client.get_usage()["prompt_tokens"] == 2
    finally:
        MODEL_REGISTRY.pop("SerializationCustomName", None)
        MODEL_REGISTRY.pop("Clashing", None)


def test_load_without_assign_keeps_a_trainable_parameter_trainable(roundtrip):
    agent = Agent()
    agent.instruction.data = "tuned"
    state = agent.state_dict(keep_vars=False)
    assert state["instruction"].requires_grad is False  # the stored copy is detached

    fresh = Agent()
    fresh.load_state_dict(roundtrip(state))

    assert _var_state(fresh.instruction) == (Parameter, "tuned", "instruction", True)
    assert fresh.instruction.is_leaf is True


def test_load_without_assign_keeps_a_frozen_parameter_frozen(roundtrip):
    agent = Agent()
    agent.instruction.data = "tuned"
    state = agent.state_dict(keep_vars=True)
    assert state["instruction"].requires_grad is True

    fresh = Agent()
    fresh.instruction.requires_grad_(False)
    fresh.load_state_dict(roundtrip(state))

    assert _var_state(fresh.instruction) == (Parameter, "tuned", "instruction", False)


# -- atomic save -----------------------------------------------------------------------


def test_save_to_a_path_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "ckpt.hf"
    afnio.save({"x": Variable("a")}, path)
    afnio.save({"x": Variable("b")}, path)  # overwrite
    assert _listing(tmp_path) == ["ckpt.hf"]
    assert afnio.load(path)["x"].data == "b"


def test_saved_file_gets_the_permissions_of_a_normally_created_file(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = tmp_path / "ckpt.hf"
    afnio.save(1, path)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_saving_never_changes_the_process_umask(tmp_path, monkeypatch):
    # os.umask(0) would briefly give files created by other threads no umask
    def forbidden(mask: int) -> int:
        raise AssertionError("save() changed the process umask")

    monkeypatch.setattr(os, "umask", forbidden)
    afnio.save(1, tmp_path / "new.hf")
    assert afnio.load(tmp_path / "new.hf") == 1


def test_an_existing_file_keeps_its_mode(tmp_path):
    path = tmp_path / "ckpt.hf"
    afnio.save(1, path)
    path.chmod(0o640)
    afnio.save(2, path)
    assert path.stat().st_mode & 0o777 == 0o640


def test_keys_crafted_to_share_one_hash_are_refused_quickly(tmp_path):
    # ints i * (2**61 - 1) all hash to 0: 85,000 of them (a 1 MB file) took 37 s
    # to load as one dict
    keys = [i * (2**61 - 1) for i in range(1, 20_001)]
    path = _write_data(
        tmp_path / "flood.hf", {_TAG: "dict", "items": [[k, 0] for k in keys]}
    )
    start = time.monotonic()
    with pytest.raises(SerializationError, match="share one hash"):
        afnio.load(path)
    assert time.monotonic() - start < 5  # generous: refused at the 9th key


def test_ordinary_int_keys_load(tmp_path):
    data = {_TAG: "dict", "items": [[i, str(i)] for i in range(50_000)]}
    loaded = afnio.load(_write_data(tmp_path / "ints.hf", data))
    assert len(loaded) == 50_000 and loaded[49_999] == "49999"


def _nested_function() -> Callable[[], int]:
    def inner() -> int:
        return 1

    return inner


UNSUPPORTED = [
    pytest.param({"x": {1, 2}}, "obj['x']", "set", id="set"),
    pytest.param({"x": [1, lambda: 0]}, "obj['x'][1]", "function", id="lambda"),
    pytest.param({"a": {"b": object()}}, "obj['a']['b']", "object", id="object"),
    pytest.param(object(), "obj", "object", id="top-level"),
    pytest.param((1, frozenset()), "obj[1]", "frozenset", id="in-tuple"),
    pytest.param({"f": _nested_function()}, "obj['f']", "function", id="closure"),
    pytest.param({"m": [].append}, "obj['m']", "builtin_function_or_method",
                 id="bound-method"),
    pytest.param({"b": b"bytes"}, "obj['b']", "bytes", id="bytes"),
    pytest.param({"cls": Variable}, "obj['cls']", "type", id="class"),
]  # fmt: skip


@pytest.mark.parametrize(("obj", "where", "type_name"), UNSUPPORTED)
def test_saving_an_unsupported_value_raises_naming_where_and_keeps_the_old_file(
    tmp_path, obj, where, type_name
):
    path = tmp_path / "ckpt.hf"
    afnio.save({"old": 1}, path)
    before = path.read_bytes()

    with pytest.raises(SerializationError) as info:
        afnio.save(obj, path)

    assert f"cannot store {where}: a {type_name}." in str(info.value)
    assert path.read_bytes() == before
    assert _listing(tmp_path) == ["ckpt.hf"]
    assert afnio.load(path) == {"old": 1}


def test_saving_an_unsupported_value_writes_nothing_to_a_file_object():
    buf = io.BytesIO()
    with pytest.raises(SerializationError, match=r"obj\['x'\]"):
        afnio.save({"x": {1}}, buf)
    assert buf.getvalue() == b""


def test_saving_an_unsupported_value_to_a_new_path_creates_no_file(tmp_path):
    with pytest.raises(SerializationError):
        afnio.save({"x": {1}}, tmp_path / "ckpt.hf")
    assert _listing(tmp_path) == []


# -- hostile and corrupt files ---------------------------------------------------------


def test_exploit_fixture_really_runs_code_when_unpickled(tmp_path, events):
    # control: the payload used below is live, so "it did not run" means something
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(plain_funcs.Exploit(str(marker))))
    assert events == [f"payload ran: {marker}"]
    assert marker.read_text(encoding="utf-8") == "pwned"


def test_loading_a_raw_pickle_raises_and_runs_nothing(tmp_path, events):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.hf"
    path.write_bytes(pickle.dumps(plain_funcs.Exploit(str(marker))))

    with pytest.raises(SerializationError, match="not a zip archive") as info:
        afnio.load(path)

    assert "never unpickles" in str(info.value)
    assert events == []
    assert not marker.exists()


@pytest.mark.parametrize(
    "members",
    [["data.pkl"], ["archive/data.pkl"], ["data.json", "data.pkl"]],
    ids=["data.pkl", "nested-pkl", "json-and-pkl"],
)
def test_loading_a_zip_holding_a_pickle_raises_and_runs_nothing(
    tmp_path, events, members
):
    marker = tmp_path / "marker"
    evil = pickle.dumps(plain_funcs.Exploit(str(marker)))
    blobs = {
        name: (evil if name.endswith(".pkl") else json.dumps({}).encode())
        for name in members
    }
    path = _write_zip(tmp_path / "evil.hf", blobs)

    with pytest.raises(SerializationError, match="pickle") as info:
        afnio.load(path)

    assert "never unpickles" in str(info.value)
    assert events == []
    assert not marker.exists()


def test_loading_a_zip_with_data_json_and_another_member_raises(tmp_path):
    good = io.BytesIO()
    afnio.save({"x": 1}, good)
    with zipfile.ZipFile(good) as zf:
        payload = zf.read("data.json")
    path = _write_zip(tmp_path / "x.hf", {"data.json": payload, "extra.py": b"1"})

    with pytest.raises(SerializationError) as info:
        afnio.load(path)

    assert "expected a zip holding only 'data.json'" in str(info.value)
    assert "'extra.py'" in str(info.value)


def test_loading_an_empty_zip_raises(tmp_path):
    path = _write_zip(tmp_path / "x.hf", {})
    with pytest.raises(SerializationError, match="not an afnio checkpoint"):
        afnio.load(path)


@pytest.mark.parametrize(
    "blob", [b"{not json", b'{"format": "afnio",', b"\xff\xfe\x00"],
    ids=["syntax", "truncated", "not-utf8"],
)  # fmt: skip
def test_loading_invalid_json_raises(tmp_path, blob):
    path = _write_zip(tmp_path / "x.hf", {"data.json": blob})
    with pytest.raises(SerializationError, match="invalid JSON"):
        afnio.load(path)


def test_loading_absurdly_deep_json_raises(tmp_path):
    depth = 100_000
    blob = '{"format": "afnio", "version": 1, "data": ' + "[" * depth + "]" * depth
    path = _write_zip(tmp_path / "x.hf", {"data.json": (blob + "}").encode()})
    with pytest.raises(SerializationError, match="Corrupted afnio checkpoint"):
        afnio.load(path)


@pytest.mark.parametrize(
    "document",
    [
        {"version": 1, "data": 1},
        {"format": "torch", "version": 1, "data": 1},
        {"format": "afnio", "version": 1},
        [1, 2],
        "afnio",
        None,
    ],
    ids=["no-format", "other-format", "no-data", "list", "str", "null"],
)
def test_loading_json_without_the_format_marker_raises(tmp_path, document):
    path = _write_document(tmp_path / "x.hf", document)
    with pytest.raises(SerializationError, match="format marker is missing"):
        afnio.load(path)


def test_loading_a_newer_format_version_raises(tmp_path):
    path = _write_document(
        tmp_path / "x.hf",
        {"format": "afnio", "version": FORMAT_VERSION + 1, "data": 1},
    )
    with pytest.raises(SerializationError) as info:
        afnio.load(path)
    assert str(info.value) == (
        f"Checkpoint format version {FORMAT_VERSION + 1} is newer than this afnio "
        f"supports ({FORMAT_VERSION}); upgrade afnio."
    )


@pytest.mark.parametrize("version", [None, "1", 1.0], ids=["missing", "str", "float"])
def test_loading_an_invalid_format_version_raises(tmp_path, version):
    document = {"format": "afnio", "data": 1}
    if version is not None:
        document["version"] = version
    path = _write_document(tmp_path / "x.hf", document)
    with pytest.raises(SerializationError, match="format version"):
        afnio.load(path)


@pytest.mark.parametrize(
    ("data", "tag", "where"),
    [
        ({_TAG: "pickle", "data": "gASV"}, "pickle", "data"),
        ([1, {_TAG: "bogus"}], "bogus", "data[1]"),
        ({_TAG: "tuple", "items": [{_TAG: "set", "items": []}]}, "set", "data[0]"),
        ({_TAG: "dict", "items": [["k", {_TAG: "eval"}]]}, "eval", "data['k']"),
    ],
    ids=["top-level", "in-list", "in-tuple", "in-dict"],
)
def test_loading_an_unknown_tag_raises_naming_it_and_where(tmp_path, data, tag, where):
    path = _write_data(tmp_path / "x.hf", data)
    with pytest.raises(SerializationError) as info:
        afnio.load(path)
    assert str(info.value) == f"Unknown value tag {tag!r} at {where}."


@pytest.mark.parametrize(
    "fields",
    [
        {"data": [["nested"]], "role": "r", "requires_grad": False},
        {"data": ["a", 1], "role": "r", "requires_grad": False},
        {"data": {"k": "v"}, "role": "r", "requires_grad": False},
        {"data": None, "role": "r", "requires_grad": False},
        {"data": "x", "role": 5, "requires_grad": False},
        {"role": "r", "requires_grad": False},
        {"data": "x", "requires_grad": False},
    ],
    ids=["nested-list", "mixed-list", "dict", "null", "bad-role", "no-data",
         "no-role"],
)  # fmt: skip
@pytest.mark.parametrize("tag", ["variable", "parameter"])
def test_loading_a_variable_with_invalid_fields_raises(tmp_path, tag, fields):
    path = _write_data(
        tmp_path / "x.hf",
        {_TAG: "dict", "items": [["v", {_TAG: tag, **fields}]]},
    )
    with pytest.raises(SerializationError) as info:
        afnio.load(path)
    assert str(info.value).startswith(f"Invalid {tag} at data['v']: ")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"a": 1}, "Unexpected JSON value at data"),
        ({_TAG: 5}, "Unexpected JSON value at data"),
        ({_TAG: "dict"}, "Invalid container at data: no item list."),
        ({_TAG: "tuple", "items": "ab"}, "Invalid container at data: no item list."),
        ({_TAG: "dict", "items": [[1]]}, "Invalid dict item at data"),
        ({_TAG: "dict", "items": [[[1, 2], "v"]]}, "Unhashable dict key at data."),
        ({_TAG: "function", "path": "os.system"}, "Invalid function path at data"),
        ({_TAG: "function"}, "Invalid function path at data"),
    ],
    ids=["untagged-object", "non-str-tag", "dict-no-items", "tuple-str-items",
         "short-pair", "list-key", "path-no-colon", "path-missing"],
)  # fmt: skip
def test_loading_malformed_values_raises(tmp_path, data, message):
    path = _write_data(tmp_path / "x.hf", data)
    with pytest.raises(SerializationError, match="^" + re.escape(message)):
        afnio.load(path)


@pytest.mark.parametrize(
    "metadata", [5, "ab", [1], None], ids=["int", "str", "list", "null"]
)
def test_loading_a_state_dict_with_invalid_metadata_raises(tmp_path, metadata):
    data = {_TAG: "state_dict", "items": [["k", 1]], "metadata": metadata}
    path = _write_data(tmp_path / "x.hf", data)
    with pytest.raises(SerializationError, match="metadata") as info:
        afnio.load(path)
    assert "at data" in str(info.value)


def test_loading_corrupted_compressed_data_raises(tmp_path):
    buf = io.BytesIO()
    afnio.save({"text": "x" * 2000}, buf)
    raw = bytearray(buf.getvalue())
    start = 30 + len("data.json")  # the local header, then the deflated stream
    for i in range(start, start + 16):
        raw[i] ^= 0xFF
    path = tmp_path / "x.hf"
    path.write_bytes(bytes(raw))
    with pytest.raises(SerializationError):
        afnio.load(path)


@pytest.mark.parametrize("size", [0, 1, 512, 4096])
def test_loading_random_bytes_raises(tmp_path, size):
    path = tmp_path / "x.hf"
    path.write_bytes(random.Random(size).randbytes(size))
    with pytest.raises(SerializationError, match="not an afnio checkpoint"):
        afnio.load(path)


def test_loading_a_truncated_checkpoint_raises(tmp_path):
    path = tmp_path / "x.hf"
    afnio.save({"text": "hello"}, path)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(SerializationError, match="not an afnio checkpoint"):
        afnio.load(path)


def test_serialization_error_is_also_a_value_error():
    assert issubclass(SerializationError, ValueError)
    assert issubclass(SerializationError, afnio.errors.AfnioError)


# -- functions and allow_functions -----------------------------------------------------


@pytest.fixture
def side_effect_file(tmp_path: Path) -> Path:
    """A checkpoint naming a function of the side-effect module (written without
    importing it)."""
    path = tmp_path / "fn.hf"
    afnio.save({"fn": FunctionReference(SIDE_EFFECT_PATH)}, path)
    return path


def test_loading_a_function_without_opt_in_returns_a_reference_and_imports_nothing(
    side_effect_file, unimported_side_effect_module
):
    loaded = afnio.load(side_effect_file)

    assert loaded == {"fn": FunctionReference(SIDE_EFFECT_PATH)}
    assert type(loaded["fn"]) is FunctionReference
    assert loaded["fn"].path == SIDE_EFFECT_PATH
    assert SIDE_EFFECT_MODULE not in sys.modules
    assert unimported_side_effect_module == []


@pytest.mark.parametrize(
    "allow",
    [
        [SIDE_EFFECT_MODULE],
        (SIDE_EFFECT_MODULE,),
        ["tests.fixtures_serialization"],
        ["tests"],
        ["some.other", SIDE_EFFECT_MODULE],
        True,
    ],
    ids=["exact", "tuple", "parent-package", "top-package", "among-others", "all"],
)
def test_loading_a_function_with_opt_in_imports_it(
    side_effect_file, unimported_side_effect_module, allow
):
    loaded = afnio.load(side_effect_file, allow_functions=allow)

    module = sys.modules[SIDE_EFFECT_MODULE]
    assert loaded["fn"] is module.hooked
    assert loaded["fn"]([1, 2, 3]) == 3
    assert unimported_side_effect_module == [IMPORT_EVENT]


@pytest.mark.parametrize(
    "allow",
    [
        False,
        [],
        ["some.other"],
        ["tests.fixtures"],
        [f"{SIDE_EFFECT_MODULE}.sub"],
        ["tests.fixtures_serialization.plain_funcs"],
    ],
    ids=["false", "empty", "other", "name-prefix-only", "submodule", "sibling"],
)
def test_loading_a_function_from_a_module_not_allowed_returns_a_reference(
    side_effect_file, unimported_side_effect_module, allow
):
    loaded = afnio.load(side_effect_file, allow_functions=allow)

    assert loaded == {"fn": FunctionReference(SIDE_EFFECT_PATH)}
    assert type(loaded["fn"]) is FunctionReference
    assert SIDE_EFFECT_MODULE not in sys.modules
    assert unimported_side_effect_module == []


def test_allow_functions_as_a_str_raises_type_error(
    side_effect_file, unimported_side_effect_module
):
    with pytest.raises(TypeError, match="allow_functions"):
        afnio.load(side_effect_file, allow_functions=SIDE_EFFECT_MODULE)
    assert SIDE_EFFECT_MODULE not in sys.modules
    assert unimported_side_effect_module == []


def test_function_reference_resolve_imports_the_function(
    unimported_side_effect_module,
):
    func = FunctionReference(SIDE_EFFECT_PATH).resolve()
    assert func is sys.modules[SIDE_EFFECT_MODULE].hooked
    assert unimported_side_effect_module == [IMPORT_EVENT]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("os:system", "does not name an importable function"),
        ("tests.fixtures_serialization.plain_funcs:Exploit",
         "does not name an importable function"),
        ("tests.fixtures_serialization.plain_funcs:missing",
         "does not name an importable function"),
        ("no_such_module_for_afnio_tests:f", "No module named"),
        (":sum", "is not a 'module:function' path"),
        (".plain_funcs:shout", "is not a 'module:function' path"),
        ("builtins:", "is not a 'module:function' path"),
        ("builtins:sum.__call__", "is not a 'module:function' path"),
    ],
    ids=["alias", "class", "missing-name", "missing-module", "no-module",
         "relative", "no-name", "dotted-name"],
)  # fmt: skip
def test_loading_a_path_that_is_not_an_importable_function_raises(
    tmp_path, path, message
):
    file = _write_data(tmp_path / "x.hf", {_TAG: "function", "path": path})
    with pytest.raises(SerializationError, match=message) as info:
        afnio.load(file, allow_functions=True)
    assert str(info.value).startswith(f"Cannot import {path!r} at data: ")


# -- functions from checkpoints into Module slots (issue 16, item 1) -----------------

SHOUT_PATH = "tests.fixtures_serialization.plain_funcs:shout"
WHISPER_PATH = "tests.fixtures_serialization.plain_funcs:whisper"


def _rewrite_data_json(path: Path, old: str, new: str) -> None:
    """Edit a checkpoint's data.json as an attacker would (the zip stays valid)."""
    with zipfile.ZipFile(path) as zf:
        text = zf.read("data.json").decode("utf-8")
    assert text.count(old) == 1
    _write_zip(path, {"data.json": text.replace(old, new).encode("utf-8")})


@pytest.mark.parametrize(
    "evil", ["builtins:exec", "builtins:eval", f"{os.system.__module__}:system"]
)
@pytest.mark.parametrize("strict", [True, False])
def test_a_tampered_checkpoint_cannot_put_another_function_into_a_slot(
    tmp_path, evil, strict
):
    # the issue's attack: the modules are imported, so the old rule let them in
    agent = Agent()
    agent.instruction.data = "changed"
    path = tmp_path / "ckpt.hf"
    afnio.save(agent.state_dict(), path)
    _rewrite_data_json(path, json.dumps(SHOUT_PATH), json.dumps(evil))
    loaded = afnio.load(path)
    assert loaded["formatter"] == FunctionReference(evil)

    fresh = Agent()
    with pytest.raises(RuntimeError) as info:
        fresh.load_state_dict(loaded, strict=strict)

    message = str(info.value)
    assert message.startswith("Error(s) in loading state_dict for Agent:\n\t")
    assert f'function "formatter": refused {evil!r} from the state dict' in message
    assert f"(the slot holds {SHOUT_PATH!r})" in message
    assert "allow_functions=True" in message
    assert fresh.formatter is plain_funcs.shout  # nothing changed
    assert fresh.instruction.data == "Answer briefly."
    assert fresh.formatter("a") == "A"


@pytest.mark.parametrize(
    "path", ["builtins:exec", "builtins:getattr", "builtins:open", SHOUT_PATH]
)
def test_a_function_reference_into_an_empty_slot_is_refused(path):
    module = Module()
    module.register_function("fn", None)
    with pytest.raises(RuntimeError, match=rf"refused {path!r} .*slot is empty"):
        module.load_state_dict({"fn": FunctionReference(path)})
    assert module.fn is None


@pytest.mark.parametrize("name", ["sum", "max", "min", "len", "any", "all", "sorted"])
def test_a_pure_builtin_reference_fills_an_empty_slot(name):
    # an evaluator fills reduction_fn in forward: a fresh one resuming holds None
    module = Module()
    module.register_function("reduction_fn", None)
    module.load_state_dict({"reduction_fn": FunctionReference(f"builtins:{name}")})
    assert module.reduction_fn is getattr(builtins, name)


def test_a_pure_builtin_reference_does_not_replace_another_function():
    agent = Agent()
    state = agent.state_dict()
    state["formatter"] = FunctionReference("builtins:len")
    with pytest.raises(RuntimeError, match="refused 'builtins:len'"):
        agent.load_state_dict(state)
    assert agent.formatter is plain_funcs.shout


def test_an_evaluator_checkpoint_resumes_into_a_fresh_evaluator(tmp_path):
    from afnio import cognitive as cog

    evaluator = cog.DeterministicEvaluator()
    evaluator.reduction_fn = sum  # what its forward does
    evaluator.eval_fn = plain_funcs.shout
    path = tmp_path / "ckpt.hf"
    afnio.save(evaluator.state_dict(), path)
    fresh = cog.DeterministicEvaluator()
    with pytest.raises(RuntimeError) as info:  # a user function needs the opt-in
        fresh.load_state_dict(afnio.load(path))
    assert f'function "eval_fn": refused {SHOUT_PATH!r}' in str(info.value)
    assert "reduction_fn" not in str(info.value)
    fresh.load_state_dict(afnio.load(path), allow_functions=["tests"])
    assert (fresh.reduction_fn, fresh.eval_fn) == (sum, plain_funcs.shout)


@pytest.mark.parametrize(
    "allow",
    [True, ["tests"], ["tests.fixtures_serialization"], (WHISPER_PATH.split(":")[0],)],
    ids=["all", "top-package", "package", "module"],
)
def test_allow_functions_lets_load_state_dict_import_the_reference(allow):
    state = Agent().state_dict()
    state["formatter"] = FunctionReference(WHISPER_PATH)
    fresh = Agent()
    result = fresh.load_state_dict(state, allow_functions=allow)
    assert result.missing_keys == result.unexpected_keys == []
    assert fresh.formatter is plain_funcs.whisper


@pytest.mark.parametrize(
    "allow",
    [False, [], ["builtins"], ["tests.fixtures"], [f"{WHISPER_PATH.split(':')[0]}.x"]],
    ids=["false", "empty", "other", "name-prefix-only", "submodule"],
)
def test_allow_functions_outside_the_list_still_refuses(allow):
    state = Agent().state_dict()
    state["formatter"] = FunctionReference(WHISPER_PATH)
    fresh = Agent()
    with pytest.raises(RuntimeError, match=f"refused {WHISPER_PATH!r}"):
        fresh.load_state_dict(state, allow_functions=allow)
    assert fresh.formatter is plain_funcs.shout


def test_allow_functions_imports_an_unimported_module_only_when_allowed(
    unimported_side_effect_module,
):
    state = Agent().state_dict()
    state["formatter"] = FunctionReference(SIDE_EFFECT_PATH)
    fresh = Agent()
    with pytest.raises(RuntimeError, match="refused"):
        fresh.load_state_dict(state)
    assert SIDE_EFFECT_MODULE not in sys.modules
    assert unimported_side_effect_module == []

    fresh.load_state_dict(state, allow_functions=[SIDE_EFFECT_MODULE])
    assert fresh.formatter is sys.modules[SIDE_EFFECT_MODULE].hooked
    assert unimported_side_effect_module == [IMPORT_EVENT]


def test_allow_functions_reports_a_reference_that_cannot_be_imported():
    state = Agent().state_dict()
    state["instruction"] = Parameter("changed", role="instruction")
    state["formatter"] = FunctionReference("afnio_no_such_module_anywhere:fn")
    fresh = Agent()
    with pytest.raises(RuntimeError) as info:
        fresh.load_state_dict(state, allow_functions=True)
    assert (
        "function \"formatter\": cannot import 'afnio_no_such_module_anywhere:fn': "
        "ModuleNotFoundError"
    ) in str(info.value)
    assert fresh.formatter is plain_funcs.shout
    assert fresh.instruction.data == "Answer briefly."


@pytest.mark.parametrize(
    ("allow", "message"),
    [("builtins", r"got str; use \['builtins'\]"), (1, "got int"),
     ([None], "got None"), ([""], "got ''")],
    ids=["str", "int", "none-item", "empty-name"],
)  # fmt: skip
def test_load_state_dict_allow_functions_of_the_wrong_type_raises(allow, message):
    with pytest.raises(TypeError, match="`allow_functions` must") as info:
        Agent().load_state_dict(Agent().state_dict(), allow_functions=allow)
    assert re.search(message, str(info.value))


def test_real_functions_in_an_in_memory_state_dict_load_as_before():
    state = Agent().state_dict()
    state["formatter"] = plain_funcs.whisper
    state["scorer"] = max
    fresh = Agent()
    fresh.load_state_dict(state)
    assert fresh.formatter is plain_funcs.whisper
    assert fresh.scorer is max


def test_functions_loaded_with_allow_functions_go_into_any_slot(tmp_path):
    agent = Agent()
    agent.formatter = plain_funcs.whisper
    path = tmp_path / "ckpt.hf"
    afnio.save(agent.state_dict(), path)
    fresh = Agent()
    fresh.load_state_dict(afnio.load(path, allow_functions=["tests"]))
    assert fresh.formatter is plain_funcs.whisper


# -- bounded loading (issue 16, item 2) -----------------------------------------------


def _zipped_text(path: Path, text: str | bytes) -> Path:
    blob = text.encode("utf-8") if isinstance(text, str) else text
    return _write_zip(path, {"data.json": blob})


def _document_text(data_json: str) -> str:
    return '{"format": "afnio", "version": 1, "data": ' + data_json + "}"


def test_load_limits_defaults_and_validation():
    limits = LoadLimits()
    assert (
        limits.max_bytes,
        limits.max_elements,
        limits.max_string_length,
        limits.max_depth,
    ) == (16 * 2**20, 1_500_000, 4 * 2**20, 200)
    with pytest.raises(TypeError, match=r"LoadLimits.max_bytes must be an int"):
        LoadLimits(max_bytes=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"LoadLimits.max_depth must be an int"):
        LoadLimits(max_depth=True)
    with pytest.raises(ValueError, match=r"LoadLimits.max_elements must be a positive"):
        LoadLimits(max_elements=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        limits.max_bytes = 1  # type: ignore[misc]


def test_load_rejects_limits_of_the_wrong_type(tmp_path):
    path = tmp_path / "ckpt.hf"
    afnio.save(1, path)
    with pytest.raises(TypeError, match=r"`limits` must be an afnio\.serialization"):
        afnio.load(path, limits={"max_bytes": 10})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("obj", "limits", "limit"),
    [
        ({"x": "a" * 5000}, LoadLimits(max_bytes=4096), "max_bytes"),
        (list(range(100)), LoadLimits(max_elements=50), "max_elements"),
        ({"k": [{"a": 1}] * 20}, LoadLimits(max_elements=100), "max_elements"),
        (["ab", "c" * 101], LoadLimits(max_string_length=100), "max_string_length"),
        (Variable("v" * 101), LoadLimits(max_string_length=100), "max_string_length"),
        ([[[[[1]]]]], LoadLimits(max_depth=4), "max_depth"),
        ({"a": {"b": 1}}, LoadLimits(max_depth=5), "max_depth"),
    ],
    ids=["bytes", "elements", "elements-objects", "string", "variable-string",
         "depth-lists", "depth-dicts"],
)  # fmt: skip
def test_a_file_past_a_limit_raises_naming_it_and_loads_when_raised(
    roundtrip, obj, limits, limit
):
    with pytest.raises(SerializationError) as info:
        roundtrip(obj, limits=limits)
    assert f"LoadLimits.{limit}" in str(info.value)
    assert f"limits=LoadLimits({limit}=...)" in str(info.value)
    raised = dataclasses.replace(limits, **{limit: getattr(limits, limit) * 10})
    loaded = roundtrip(obj, limits=raised)
    assert type(loaded) is type(obj)


def test_max_depth_counts_nesting_in_the_saved_value():
    assert _save_load([[[[1]]]], "bytesio", Path(), limits=LoadLimits(max_depth=4))
    # a dict takes three levels: the tagged object, its items, a pair
    nested = {"a": {"b": 1}}
    assert _save_load(nested, "bytesio", Path(), limits=LoadLimits(max_depth=6))


def test_the_default_depth_limit_is_checked_before_python_recursion(tmp_path):
    depth = 300  # json parses it; the decoder refuses it without a RecursionError
    path = _zipped_text(tmp_path / "x.hf", _document_text("[" * depth + "]" * depth))
    with pytest.raises(SerializationError, match=r"LoadLimits.max_depth \(200\)"):
        afnio.load(path)


@pytest.mark.parametrize(
    ("declared", "match"),
    [(1000, "CRC"), (300_000, "holds 200,000 bytes, its header says 300,000")],
    ids=["smaller", "larger"],
)
def test_a_zip_header_lying_about_the_size_raises(tmp_path, declared, match):
    text = _document_text('"' + "a" * (200_000 - 45) + '"')
    assert len(text) == 200_000
    deflated, crc, size = raw_deflate([(text.encode(), 1)])
    path = write_zip(tmp_path / "x.hf", deflated, crc, size, declared_size=declared)
    with pytest.raises(SerializationError, match=match):
        afnio.load(path)


def test_a_member_beyond_max_bytes_is_refused_before_inflating(tmp_path):
    # the header says 1 GiB: refused at once (the stream is a few bytes)
    deflated, crc, _ = raw_deflate([(b"{}", 1)])
    path = write_zip(tmp_path / "x.hf", deflated, crc, 2, declared_size=1 << 30)
    with pytest.raises(SerializationError, match="inflates to 1,073,741,824 bytes"):
        afnio.load(path)


def test_text_wider_than_latin1_counts_its_memory_width(tmp_path):
    limits = LoadLimits(max_bytes=4000)
    latin1 = _zipped_text(tmp_path / "l.hf", _document_text('"' + "é" * 1900 + '"'))
    assert afnio.load(latin1, limits=limits) == "é" * 1900  # 3,840 bytes of UTF-8
    # one emoji makes Python store every character of the text in 4 bytes
    wide = _zipped_text(tmp_path / "w.hf", _document_text('"😀' + "a" * 3000 + '"'))
    with zipfile.ZipFile(wide) as zf:
        assert zf.getinfo("data.json").file_size < 4000
    with pytest.raises(SerializationError, match=r"characters beyond Latin-1"):
        afnio.load(wide, limits=limits)
    assert afnio.load(wide, limits=LoadLimits(max_bytes=4 * 4000)) == "😀" + "a" * 3000


def test_other_zip_compression_methods_are_refused(tmp_path):
    path = tmp_path / "x.hf"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_BZIP2) as zf:
        zf.writestr("data.json", _document_text("1"))
    with pytest.raises(SerializationError, match="compression method 12"):
        afnio.load(path)


def test_stored_members_load(tmp_path):
    path = tmp_path / "x.hf"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("data.json", _document_text("[1, 2]"))
    assert afnio.load(path) == [1, 2]


def _large_trainer_checkpoint() -> dict[str, Any]:
    """A Trainer batch checkpoint of a 2,000-sample, 10-epoch run, inflated far past
    today's (about 15 KB): per-batch metrics for batch size 1 (20,000 rows) and an
    optimizer momentum of 3 steps holding a feedback Variable per sample."""
    rng = random.Random(0)
    words = ["the", "lift", "broke", "again,", "please", "fix", "it;", "thanks"]

    def prose(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n // 5))

    agent = Agent()
    agent.instruction.data = prose(4000)
    epochs = [
        {"epoch": e, "train_loss": 0.51, "train_accuracy": 0.8, "val_loss": 0.4,
         "val_accuracy": 0.85, "total_cost": 1.25 * e}
        for e in range(1, 11)
    ]  # fmt: skip
    batches = [
        {"epoch": e, "batch": b, "loss": 0.123456789, "accuracy": 1.0,
         "cost": 0.000123456, "reverted": 0}
        for e in range(1, 11)
        for b in range(2000)
    ]  # fmt: skip
    momentum = [
        (
            Parameter(prose(4000), role="system prompt"),
            [Variable(prose(300), role="feedback") for _ in range(2000)],
        )
        for _ in range(3)
    ]
    return {
        "epoch": 10,
        "batch": 1999,
        "sampler_state": {"rng_state": [3, list(range(625)), None]},
        "agent_state_dict": agent.state_dict(keep_vars=True),
        "optimizer_state_dict": {
            "state": {0: {"momentum_buffer": momentum}},
            "param_groups": [{"params": [0], "momentum": 3, "lr": None}],
        },
        "history": epochs,
        "batch_metrics": batches,
        "total_cost": 12.5,
    }


def test_default_limits_admit_a_large_trainer_checkpoint_with_room_to_spare():
    from afnio.serialization import _count_elements

    buf = io.BytesIO()
    afnio.save(_large_trainer_checkpoint(), buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        raw = zf.read("data.json")
    limits = LoadLimits()
    assert len(raw) < limits.max_bytes / 3  # about 5.4 MB
    assert _count_elements(raw) < limits.max_elements * 0.6  # about 745,000
    buf.seek(0)
    loaded = afnio.load(buf)
    assert len(loaded["batch_metrics"]) == 20_000
    assert loaded["optimizer_state_dict"]["state"][0]["momentum_buffer"][2][1][5].role


@pytest.fixture(scope="module")
def memory_probe_results(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, dict[str, Any]]:
    """Every hostile file loaded in a child process whose address space may grow by
    200 MB at most (RLIMIT_AS), with the time it took."""
    directory = tmp_path_factory.mktemp("hostile")
    paths = {
        name: str(build(directory / f"{name}.hf", LoadLimits()))
        for name, (build, _) in HOSTILE_CASES.items()
    }
    for path in paths.values():
        assert os.path.getsize(path) <= 1_100_000  # "a file of at most 1 MB"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fixtures_serialization.memory_probe",
         str(PEAK_BUDGET), *paths.values()],
        capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    by_path = {r["path"]: r for r in map(json.loads, proc.stdout.splitlines())}
    return {name: by_path[path] for name, path in paths.items()}


PEAK_BUDGET = 200_000_000  # bytes of extra address space a load may take


@pytest.mark.skipif(
    sys.platform != "linux", reason="measures with RLIMIT_AS and /proc (Linux)"
)
@pytest.mark.parametrize("case", list(HOSTILE_CASES))
def test_a_hostile_file_loads_or_fails_within_200_mb_and_seconds(
    memory_probe_results, case
):
    result = memory_probe_results[case]
    expected = HOSTILE_CASES[case][1]
    assert result["outcome"] == expected, result
    if expected == "SerializationError":
        assert result["message"], result
    assert result["peak_extra_vm"] < PEAK_BUDGET, result
    assert result["seconds"] < 30, result  # generous: a few seconds at most


# -- malformed files raise SerializationError (issue 16, item 3) ----------------------


def test_a_100000_digit_integer_raises_serialization_error(tmp_path):
    path = _zipped_text(tmp_path / "x.hf", _document_text("7" * 100_000))
    with pytest.raises(SerializationError, match="invalid JSON"):
        afnio.load(path)


@pytest.mark.parametrize("target", ["path", "bytesio"])
def test_a_zip_whose_offsets_point_before_the_file_raises(tmp_path, target):
    # the end record says the central directory starts 1,000 bytes later than it
    # does: zipfile then seeks 1,000 bytes before the file's start
    buf = io.BytesIO()
    afnio.save({"x": 1}, buf)
    blob = bytearray(buf.getvalue())
    end = blob.rindex(b"PK\x05\x06")
    (offset,) = struct.unpack_from("<L", blob, end + 16)
    struct.pack_into("<L", blob, end + 16, offset + 1000)
    if target == "path":
        source: Any = tmp_path / "x.hf"
        source.write_bytes(bytes(blob))
    else:
        source = io.BytesIO(bytes(blob))
    with pytest.raises(SerializationError, match="Corrupted afnio checkpoint"):
        afnio.load(source)


def test_a_zip_member_name_that_is_not_utf8_raises(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("dat\u00e9.json", b"{}")  # flagged as UTF-8
    path = tmp_path / "x.hf"
    path.write_bytes(buf.getvalue().replace("\u00e9".encode(), b"\xff\xfe"))
    with pytest.raises(SerializationError, match="not an afnio checkpoint"):
        afnio.load(path)


def test_a_directory_raises_serialization_error(tmp_path):
    with pytest.raises(SerializationError, match="is a directory, not a checkpoint"):
        afnio.load(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_raises_at_once_and_never_blocks(tmp_path):
    fifo = tmp_path / "ckpt.hf"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            afnio.load(fifo)
            outcome.append(None)
        except BaseException as e:  # reported below
            outcome.append(e)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():  # blocked opening the FIFO: release it, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=10)
        pytest.fail("afnio.load blocked on a FIFO")
    assert isinstance(outcome[0], SerializationError), outcome
    assert "is a FIFO, not a checkpoint file" in str(outcome[0])


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_a_device_raises_serialization_error(device):
    with pytest.raises(SerializationError, match="is a device"):
        afnio.load(device)


def test_a_missing_file_raises_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        afnio.load(tmp_path / "missing.hf")


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="needs file permissions that apply (not root)",
)
def test_an_unreadable_file_raises_permission_error(tmp_path):
    path = tmp_path / "ckpt.hf"
    afnio.save(1, path)
    path.chmod(0)
    try:
        with pytest.raises(PermissionError):
            afnio.load(path)
    finally:
        path.chmod(0o600)


class _Unseekable(io.RawIOBase):
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


@pytest.mark.parametrize(
    ("f", "match"),
    [(123, "`f` must be a path or a binary file object"),
     (io.StringIO("x"), "must be a binary file object"),
     (_Unseekable(), "must be a seekable file object")],
    ids=["int", "text-file", "unseekable"],
)  # fmt: skip
def test_load_from_a_wrong_argument_raises_type_error(f, match):
    with pytest.raises(TypeError, match=match):
        afnio.load(f)


def _fuzz_checkpoint() -> bytes:
    """A real checkpoint: a Module state dict (parameters, a chat, a function slot,
    a completion config) inside nested dicts, tuples and lists."""
    agent = Agent()
    agent.instruction.data = "Answer with one word."
    state = {
        "agent_state_dict": agent.state_dict(),
        "optimizer_state_dict": {
            "state": {0: {"momentum_buffer": [(agent.instruction, [Variable("fb")])]}},
            "param_groups": [{"params": [0], "momentum": 1, "lr": None}],
        },
        "history": [{"epoch": 1, "train_loss": 0.5, "ratio": float("inf")}],
        "misc": (1, 2.5, None, True, "é✓", [1.0, -2], {(1, "a"): {"deep": [[[]]]}}),
    }
    buf = io.BytesIO()
    afnio.save(state, buf)
    return buf.getvalue()


_JSON_INSERTS = [
    b"7" * 5000, b"1e999999", b"-0", b"NaN", b"-Infinity", b"[" * 2000,
    b"{" * 50, b'"\\ud800"', b'"\\u00"', b"\xff", b"\xc3", b"\x00", b'"\\x"',
    b'{"__afnio__":"tuple","items":[[1,2]]}', b'{"__afnio__":"function","path":1}',
    b'{"__afnio__":"function","path":"os:system"}',
    b'{"__afnio__":"variable","data":[10000000000000000000000,1.5]',
    b'{"__afnio__":"parameter","data":[[1]],"role":"r","requires_grad":true}',
    b'{"__afnio__":"state_dict","items":[],"metadata":[]}',
    b'{"__afnio__":"model","class_type":[1],"usage":{}}', b'"' + b"a" * 3000 + b'"',
    b"1" + b"0" * 400 + b".5", b"1.5e-99999", b'"\\"\\\\"',
]  # fmt: skip
_TAGS = [b"dict", b"state_dict", b"tuple", b"variable", b"parameter", b"model",
         b"function", b"bogus", b""]  # fmt: skip


def _mutate_json(text: bytes, rng: random.Random) -> bytes:
    data = bytearray(text)
    for _ in range(rng.randint(1, 3)):
        pos = rng.randrange(len(data))
        kind = rng.randrange(6)
        if kind == 0:
            del data[pos : pos + rng.randint(1, 8)]
        elif kind == 1:
            data[pos:pos] = data[pos : pos + rng.randint(1, 40)]
        elif kind == 2:
            data[pos] = rng.choice(b'[]{},:"\\0123456789eE.-+ tfnaul_')
        elif kind == 3:
            data[pos:pos] = rng.choice(_JSON_INSERTS)
        elif kind == 4:
            tags = [m.start(1) for m in re.finditer(rb'"__afnio__": "(\w*)"', data)]
            if tags:
                start = rng.choice(tags)
                end = data.index(b'"', start)
                data[start:end] = rng.choice(_TAGS)
        else:
            data[pos : pos + rng.randint(1, 4)] = rng.randbytes(rng.randint(0, 4))
    return bytes(data)


def _mutate_zip(blob: bytes, rng: random.Random) -> bytes:
    data = bytearray(blob)
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del data[rng.randrange(len(data)) :]
    elif kind == 2:
        pos = rng.randrange(len(data))
        data[pos : pos + 4] = rng.randbytes(4)
    else:  # a header field (sizes, offsets, counts) set to an extreme value
        pos = rng.choice([m.start() for m in re.finditer(b"PK", data)])
        field = pos + rng.randrange(4, 30)
        data[field : field + 4] = rng.choice([b"\xff" * 4, b"\x00" * 4, b"\x7f\xff"])
    return bytes(data)


def _outcome(source: Path | bytes, allow_functions: Any = False) -> str:
    f = source if isinstance(source, Path) else io.BytesIO(source)
    try:
        loaded = afnio.load(f, allow_functions=allow_functions)
    except SerializationError:
        return "refused"
    state = loaded.get("agent_state_dict") if isinstance(loaded, dict) else None
    if isinstance(state, dict):  # what a trainer resuming from it would do next
        with contextlib.suppress(RuntimeError):
            Agent().load_state_dict(state)
    return "loaded"


@pytest.mark.timeout(60)
def test_fuzzed_checkpoints_load_or_raise_serialization_error(tmp_path):
    rng = random.Random(16)
    blob = _fuzz_checkpoint()
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        text = zf.read("data.json")
    outcomes: list[str] = []
    for i in range(2500):  # damaged archives
        damaged = _mutate_zip(blob, rng)
        if i % 10 == 0:  # a path, too: seeks then hit a real file
            path = tmp_path / "zip.hf"
            path.write_bytes(damaged)
            outcomes.append(_outcome(path))
        else:
            outcomes.append(_outcome(damaged))
    for i in range(2500):  # intact archives of damaged JSON: the decoder's turn
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("data.json", _mutate_json(text, rng))
        # damaged function paths, imported: only from modules of no consequence
        allow = ["builtins", "tests.fixtures_serialization"] if i % 4 == 0 else False
        outcomes.append(_outcome(buf.getvalue(), allow))
    # both kinds of outcome happen, so the mutations reach past the first check
    assert outcomes.count("loaded") > 150
    assert outcomes.count("refused") > 2000
    assert Agent().formatter is plain_funcs.shout


# -- temporary files of killed saves (issue 16, item 7) -------------------------------


def _temp_name(target: str, pid: int, host: str | None = None) -> str:
    return f".{target}.afnio.{host or _host_tag()}.{pid}.ab12cd_9.tmp"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_file_names_carry_the_host_and_process(tmp_path, monkeypatch):
    seen: list[str] = []
    real_replace = os.replace

    def spy(src: Any, dst: Any) -> None:
        seen.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    afnio.save(1, tmp_path / "ckpt.hf")
    assert len(seen) == 1
    assert re.fullmatch(
        rf"\.ckpt\.hf\.afnio\.{re.escape(_host_tag())}\.{os.getpid()}\.[a-z0-9_]{{8}}"
        r"\.tmp",
        seen[0],
    )


@pytest.mark.skipif(os.name != "posix", reason="probes processes with os.kill")
def test_a_killed_save_leaves_a_temp_file_that_the_next_save_removes(tmp_path):
    target = tmp_path / "ckpt.hf"
    script = (
        "import os, signal, sys, afnio\n"
        "def die(fd):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.fsync = die  # killed after writing its temporary file, before the rename\n"
        "afnio.save({'x': 'lost'}, sys.argv[1])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(target)],
        cwd=Path(__file__).resolve().parent.parent,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1
    assert f".{_host_tag()}." in leftovers[0]

    live = _temp_name("ckpt.hf", os.getpid())  # ours: a save in progress
    unrelated = [".ckpt.hf.tmp", ".other.hf.12345.abcdefgh.tmp", "notes.txt"]
    for name in [live, *unrelated]:
        (tmp_path / name).write_text("x")
    afnio.save({"x": "kept"}, target)

    assert afnio.load(target) == {"x": "kept"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ckpt.hf", live, *unrelated]
    )


@pytest.mark.skipif(os.name != "posix", reason="probes processes with os.kill")
def test_the_next_save_removes_only_temps_of_processes_that_no_longer_run(tmp_path):
    dead = _dead_pid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "dead-same-target": (_temp_name("ckpt.hf", dead), False),
            "dead-other-target": (_temp_name("other.hf", dead), False),
            "alive-other-process": (_temp_name("ckpt.hf", sleeper.pid), True),
            "alive-init": (_temp_name("ckpt.hf", 1), True),
            "dead-other-host": (_temp_name("ckpt.hf", dead, "another-host"), True),
        }
        for name, _ in names.values():
            (tmp_path / name).write_text("partial")
        (tmp_path / "sub").mkdir()
        nested = tmp_path / "sub" / _temp_name("ckpt.hf", dead)
        nested.write_text("partial")  # another folder: not this save's business
        afnio.save(1, tmp_path / "ckpt.hf")
    finally:
        sleeper.kill()
        sleeper.wait()
    remaining = {p.name for p in tmp_path.iterdir()}
    for case, (name, kept) in names.items():
        assert (name in remaining) is kept, case
    assert nested.exists()


def test_saving_to_a_file_object_removes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stale = tmp_path / _temp_name("ckpt.hf", _dead_pid())
    stale.write_text("partial")
    afnio.save(1, io.BytesIO())
    assert stale.exists()
