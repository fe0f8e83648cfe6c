"""``afnio.save`` / ``afnio.load``: a zip holding ``data.json`` of tagged JSON, never
pickle (contract: afnio-api.md section 7 and deliberate differences 4, 10, 18)."""

from __future__ import annotations

import copy
import io
import json
import math
import os
import pickle
import random
import re
import sys
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
from afnio.serialization import FORMAT_VERSION
from tests.fixtures_serialization import event_log, plain_funcs

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


def test_function_reference_to_an_imported_module_replaces_the_slot_without_importing(
    roundtrip,
):
    agent = Agent()
    agent.instruction.data = "changed"
    loaded = roundtrip(agent.state_dict())
    fresh = Agent()
    fresh.formatter = plain_funcs.whisper
    fresh.load_state_dict(loaded)  # plain_funcs is already imported: nothing runs
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
    ],
    ids=["alias", "class", "missing-name", "missing-module"],
)  # fmt: skip
def test_loading_a_path_that_is_not_an_importable_function_raises(
    tmp_path, path, message
):
    file = _write_data(tmp_path / "x.hf", {_TAG: "function", "path": path})
    with pytest.raises(SerializationError, match=message) as info:
        afnio.load(file, allow_functions=True)
    assert str(info.value).startswith(f"Cannot import {path!r} at data: ")
