"""cognitive.Module: registration, iteration, modes, repr, state_dict and loading."""

from __future__ import annotations

import copy
from typing import Any

import pytest

import afnio
from afnio import Variable
from afnio import cognitive as cog
from afnio.cognitive.modules.module import FunctionReference
from afnio.models import MODEL_REGISTRY, BaseModel, register_model_class
from afnio.models.usage import add_usage


def metric(pred: str, target: str) -> int:
    return int(pred == target)


def other_metric(pred: str, target: str) -> int:
    return 0


class FakeClient(BaseModel):
    def __init__(self, usage: dict[str, Any] | None = None) -> None:
        super().__init__(provider="fake", config={"base_url": "http://x"}, usage=usage)

    def update_usage(self, usage: Any, model_name: str | None = None) -> None:
        add_usage(self._usage, usage)
        if model_name is None and "cost" in usage:
            self._usage["cost"]["amount"] = usage["cost"]["amount"]


@pytest.fixture(autouse=True)
def _registered_fake() -> Any:
    register_model_class(FakeClient)
    yield
    MODEL_REGISTRY.pop("FakeClient", None)


class Inner(cog.Module):
    def __init__(self) -> None:
        super().__init__()
        self.instruction = cog.Parameter("Be kind.", role="instruction")
        self.register_buffer("counter", Variable(0, role="counter"))
        self.register_buffer("scratch", Variable("tmp"), persistent=False)

    def forward(self, x: Variable) -> Variable:
        return self.instruction + x


class Agent(cog.Module):
    def __init__(self) -> None:
        super().__init__()
        self.system = cog.Parameter("You classify.", role="system prompt")
        self.inner = Inner()
        self.chat = [
            {"role": "system", "content": [self.system]},
            {"role": "user", "content": [Variable("Msg: {message}", role="template")]},
        ]
        self.client = FakeClient()
        self.args = {"temperature": 0, "seed": 42}
        self.score_fn = metric
        self.reducer = sum
        self.label = "plain attribute"

    def forward(self, x: Variable) -> Variable:
        return self.inner(x)


# -- registration -------------------------------------------------------------------


def test_setattr_routes_each_kind_to_its_store() -> None:
    a = Agent()
    assert list(a._parameters) == ["system"]
    assert list(a._modules) == ["inner"]
    assert list(a._chats) == ["chat"]
    assert list(a._models) == ["client"]
    assert list(a._completion_configs) == ["args"]
    assert list(a._functions) == ["score_fn", "reducer"]
    assert a.__dict__["label"] == "plain attribute"
    assert a.system.data == "You classify." and a.reducer is sum


def test_empty_lists_and_non_str_keyed_dicts_stay_plain_attributes() -> None:
    m = cog.Module()
    m.items = []
    m.cache = {1: "one"}
    assert m.items == [] and m.cache == {1: "one"}
    assert m.state_dict() == {}


def test_plain_variable_attribute_is_not_registered() -> None:
    m = cog.Module()
    m.v = Variable("x")
    assert "v" not in m._buffers and "v" not in m.state_dict()
    m.register_buffer("b", Variable("y"))
    m.b = Variable("z")
    assert m._buffers["b"].data == "z"
    with pytest.raises(TypeError, match="buffer 'b'"):
        m.b = "text"


def test_reassigning_moves_a_name_between_stores() -> None:
    m = cog.Module()
    m.x = {"temperature": 1}
    assert "x" in m._completion_configs
    m.x = FakeClient()
    assert "x" in m._models and "x" not in m._completion_configs
    m.x = 3
    assert "x" not in m._models and m.x == 3
    m.x = [{"role": "user", "content": [Variable("hi")]}]
    assert "x" in m._chats and "x" not in m.__dict__


def test_none_keeps_a_slot() -> None:
    a = Agent()
    a.system = None
    a.client = None
    a.args = None
    assert "system" in a._parameters and a.system is None
    assert a._models["client"] is None and a._completion_configs["args"] is None
    assert "system" not in a.state_dict() and "client" not in a.state_dict()


def test_parameter_slot_rejects_other_values() -> None:
    a = Agent()
    with pytest.raises(TypeError, match="parameter 'system'"):
        a.system = Variable("not a parameter")


def test_register_errors() -> None:
    m = cog.Module()
    with pytest.raises(TypeError, match="should be a string"):
        m.register_parameter(3, None)  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="cannot contain"):
        m.register_buffer("a.b", None)
    with pytest.raises(KeyError, match="cannot be an empty string"):
        m.register_chat("", None)
    m.plain = 1
    with pytest.raises(KeyError, match=r"Attribute 'plain' already exists\."):
        m.register_parameter("plain", cog.Parameter("x"))
    with pytest.raises(KeyError, match=r"Attribute 'forward' already exists\."):
        m.register_module("forward", cog.Module())
    with pytest.raises(TypeError, match="Parameter or None required"):
        m.register_parameter("p", Variable("x"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Variable or None required"):
        m.register_buffer("b", "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="BaseModel or None required"):
        m.register_model("c", object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dict or None required"):
        m.register_completion_config("c", [1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="keys must be strings"):
        m.register_completion_config("c", {1: 2})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="not a Module subclass"):
        m.register_module("c", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="missing"):
        m.register_chat("c", [{"role": "user"}])


def test_register_parameter_rejects_non_leaf() -> None:
    m = cog.Module()
    x = cog.Parameter("x")
    y = x + Variable("y")
    y.__class__ = cog.Parameter  # a computed value dressed as a Parameter
    with pytest.raises(ValueError, match="non-leaf"):
        m.register_parameter("y", y)


def test_register_function_accepts_importable_top_level_functions_only() -> None:
    m = cog.Module()
    m.register_function("f", metric)
    m.register_function("g", sum)
    with pytest.raises(TypeError, match="lambdas, closures and methods"):
        m.register_function("h", lambda a, b: 0)

    def nested(a: str, b: str) -> int:
        return 0

    with pytest.raises(TypeError, match="importable top-level"):
        m.register_function("h", nested)
    with pytest.raises(TypeError, match="importable top-level"):
        m.register_function("h", "abc".upper)
    # through setattr a lambda is just a plain (unsaved) attribute
    m.h = lambda a: a
    assert "h" not in m._functions and "h" in m.__dict__


def test_assigning_before_init_raises() -> None:
    class Broken(cog.Module):
        def __init__(self) -> None:
            self.p = cog.Parameter("x")

    with pytest.raises(AttributeError, match=r"before Module\.__init__"):
        Broken()


def test_getattr_delattr_and_dir() -> None:
    a = Agent()
    assert "system" in dir(a) and "chat" in dir(a)
    del a.args
    assert "args" not in a._completion_configs
    with pytest.raises(AttributeError, match="no attribute 'args'"):
        _ = a.args
    del a.label
    assert not hasattr(a, "label")


# -- iteration ----------------------------------------------------------------------


def test_named_members_use_dotted_prefixes_and_deduplicate() -> None:
    a = Agent()
    a.shared = a.inner  # the same child twice
    names = [n for n, _ in a.named_parameters()]
    assert names == ["system", "inner.instruction"]
    assert [n for n, _ in a.named_parameters(prefix="agent")] == [
        "agent.system",
        "agent.inner.instruction",
    ]
    assert [n for n, _ in a.named_parameters(recurse=False)] == ["system"]
    assert [n for n, _ in a.named_buffers()] == ["inner.counter", "inner.scratch"]
    assert [n for n, _ in a.named_chats()] == ["chat"]
    assert [n for n, _ in a.named_models()] == ["client"]
    assert [n for n, _ in a.named_completion_configs()] == ["args"]
    assert [n for n, _ in a.named_functions()] == ["score_fn", "reducer"]
    assert [n for n, _ in a.named_modules()] == ["", "inner"]
    assert [n for n, _ in a.named_modules(remove_duplicate=False)] == [
        "",
        "inner",
        "shared",
    ]
    assert [n for n, _ in a.named_children()] == ["inner"]
    assert list(a.children()) == [a.inner]
    assert len(list(a.modules())) == 2
    assert len(list(a.parameters())) == 2
    assert list(a.chats()) == [a.chat]
    assert list(a.models()) == [a.client]
    assert list(a.functions()) == [metric, sum]
    assert list(a.completion_configs()) == [a.args]
    assert len(list(a.buffers())) == 2


def test_same_parameter_in_two_places_is_listed_once() -> None:
    a = Agent()
    a.inner.instruction = a.system
    assert [n for n, _ in a.named_parameters()] == ["system"]
    all_names = [n for n, _ in a.named_parameters(remove_duplicate=False)]
    assert all_names == ["system", "inner.instruction"]


# -- modes and grads ----------------------------------------------------------------


def test_train_and_eval_recurse_and_validate() -> None:
    a = Agent()
    assert a.eval() is a
    assert a.training is False and a.inner.training is False
    a.train()
    assert a.inner.training is True
    with pytest.raises(ValueError, match="boolean"):
        a.train("yes")  # type: ignore[arg-type]


def test_requires_grad_and_empty_grad_cover_parameters_and_chats() -> None:
    a = Agent()
    template = a.chat[1]["content"][0]
    a.requires_grad_(False)
    assert not a.system.requires_grad and not template.requires_grad
    a.requires_grad_()
    assert a.inner.instruction.requires_grad and template.requires_grad
    grads = a.system.grad
    a.system.append_grad(Variable("fb"))
    template.append_grad(Variable("fb"))
    a.empty_grad()
    assert a.system.grad == [] and template.grad == []
    assert a.system.grad is grads  # cleared in place


# -- repr ---------------------------------------------------------------------------


def test_repr_is_torch_style_with_extra_repr() -> None:
    class Leaf(cog.Module):
        def extra_repr(self) -> str:
            return "size=3"

    class Tree(cog.Module):
        def __init__(self) -> None:
            super().__init__()
            self.left = Leaf()
            self.right = cog.Split()

    assert repr(Leaf()) == "Leaf(size=3)"
    assert repr(Tree()) == "Tree(\n  (left): Leaf(size=3)\n  (right): Split()\n)"
    assert repr(cog.Module()) == "Module()"


# -- trainer protocol ---------------------------------------------------------------


def test_trainer_protocol_defaults() -> None:
    m = cog.Module()
    assert m.automatic_optimization is True
    for method in ("training_step", "validation_step", "test_step"):
        with pytest.raises(NotImplementedError, match=method):
            getattr(m, method)(None, 0)
    with pytest.raises(NotImplementedError, match="configure_optimizers"):
        m.configure_optimizers()
    with pytest.raises(AttributeError, match="No optimizer set"):
        m.optimizers()
    m._optimizers = "opt"
    assert m.optimizers() == "opt"
    with pytest.raises(NotImplementedError, match='missing the required "forward"'):
        m(Variable("x"))


# -- state_dict ---------------------------------------------------------------------


def test_state_dict_keys_values_and_metadata() -> None:
    a = Agent()
    sd = a.state_dict()
    assert list(sd) == [
        "system",
        "chat",
        "client",
        "args",
        "score_fn",
        "reducer",
        "inner.instruction",
        "inner.counter",
    ]
    assert sd._metadata == {"": {"version": 1}, "inner": {"version": 1}}
    assert sd["system"] is not a.system and sd["system"].requires_grad is False
    assert sd["chat"][0]["content"][0].data == "You classify."
    assert sd["client"] == {
        "class_type": "FakeClient",
        "provider": "fake",
        "usage": a.client.get_usage(),
    }
    assert sd["args"] is a.args and sd["score_fn"] is metric and sd["reducer"] is sum
    kept = a.state_dict(keep_vars=True)
    assert kept["system"] is a.system
    assert kept["chat"][0]["content"][0] is a.system


def test_extra_state_round_trip() -> None:
    class WithExtra(cog.Module):
        def __init__(self) -> None:
            super().__init__()
            self.step = 0

        def get_extra_state(self) -> Any:
            return {"step": self.step}

        def set_extra_state(self, state: Any) -> None:
            self.step = state["step"]

    m = WithExtra()
    m.step = 7
    sd = m.state_dict()
    assert sd["_extra_state"] == {"step": 7}
    fresh = WithExtra()
    fresh.load_state_dict(sd)
    assert fresh.step == 7
    with pytest.raises(RuntimeError, match="override get_extra_state"):
        cog.Module().get_extra_state()


def _trained(a: Agent) -> None:
    a.system.data = "You classify sentiment."
    a.system.role = "tuned system prompt"
    a.inner.instruction.data = "Be very kind."
    a.chat[1]["content"][0].data = "Message: {message}"
    a.inner.counter.data = 5
    a.args = {"temperature": 0.5}
    a.score_fn = other_metric
    a.client.update_usage({"prompt_tokens": 10, "total_tokens": 10})


def test_load_state_dict_round_trip_without_assign_copies_into_slots() -> None:
    a = Agent()
    _trained(a)
    sd = a.state_dict()
    b = Agent()
    slot = b.system
    client = FakeClient()
    result = b.load_state_dict(sd, model_clients={"client": client})
    assert repr(result) == "<All keys matched successfully>"
    assert b.system is slot and b.system.data == "You classify sentiment."
    assert b.system.role == "tuned system prompt"
    assert b.system.requires_grad is True  # difference 4: the slot keeps its flag
    assert b.chat[0]["content"][0] is b.system  # the chat still shares the Parameter
    assert b.chat[1]["content"][0].data == "Message: {message}"
    assert b.inner.instruction.data == "Be very kind."
    assert b.inner.counter.data == 5
    assert b.args == {"temperature": 0.5}
    assert b.score_fn is other_metric
    assert b.client is client and client.get_usage()["prompt_tokens"] == 10


def test_frozen_slot_stays_frozen_after_loading() -> None:
    a = Agent()
    b = Agent()
    b.system.requires_grad_(False)
    b.load_state_dict(
        a.state_dict(keep_vars=True), model_clients={"client": FakeClient()}
    )
    assert b.system.requires_grad is False


def test_assign_sets_the_saved_objects() -> None:
    a = Agent()
    sd = a.state_dict(keep_vars=True)
    b = Agent()
    b.load_state_dict(sd, assign=True, model_clients={"client": FakeClient()})
    assert b.system is a.system
    plain = a.state_dict()
    c = Agent()
    c.load_state_dict(plain, assign=True, model_clients={"client": FakeClient()})
    assert isinstance(c.system, cog.Parameter) and c.system.requires_grad is True
    assert c.system is not plain["system"]


def test_strict_reports_every_missing_and_unexpected_key_and_changes_nothing() -> None:
    a = Agent()
    sd = dict(a.state_dict())
    del sd["system"]
    del sd["inner.counter"]
    sd["extra.key"] = Variable("x")
    b = Agent()
    b.inner.instruction.data = "untouched"
    with pytest.raises(RuntimeError) as info:
        b.load_state_dict(sd, model_clients={"client": FakeClient()})
    message = str(info.value)
    assert message.startswith("Error(s) in loading state_dict for Agent:")
    assert 'Missing key(s) in state_dict: "system", "inner.counter".' in message
    assert 'Unexpected key(s) in state_dict: "extra.key".' in message
    assert b.inner.instruction.data == "untouched"
    result = b.load_state_dict(sd, strict=False, model_clients={"client": FakeClient()})
    assert result.missing_keys == ["system", "inner.counter"]
    assert result.unexpected_keys == ["extra.key"]
    assert b.inner.instruction.data == "Be kind."


def test_shape_mismatches_are_errors_even_when_not_strict() -> None:
    a = Agent()
    a.inner.counter.data = [1, 2]
    b = Agent()
    with pytest.raises(RuntimeError, match=r'size mismatch for "inner\.counter"'):
        b.load_state_dict(
            a.state_dict(), strict=False, model_clients={"client": FakeClient()}
        )


def test_chat_structure_is_checked() -> None:
    a = Agent()
    a.chat[1]["role"] = "assistant"
    with pytest.raises(RuntimeError, match="role 'assistant' in the checkpoint"):
        Agent().load_state_dict(a.state_dict(), model_clients={"client": FakeClient()})
    a = Agent()
    a.chat.append({"role": "user", "content": [Variable("more")]})
    with pytest.raises(RuntimeError, match="3 messages"):
        Agent().load_state_dict(a.state_dict(), model_clients={"client": FakeClient()})


def test_model_slot_needs_the_live_client_by_key() -> None:
    a = Agent()
    sd = a.state_dict()
    with pytest.raises(
        RuntimeError,
        match="Missing model client for 'client' of expected type 'FakeClient'",
    ):
        Agent().load_state_dict(sd)
    with pytest.raises(RuntimeError, match="Missing model client"):
        Agent().load_state_dict(sd, model_clients={"client": object()})  # type: ignore[dict-item]
    sd["client"] = {"class_type": "Unknown", "provider": "x", "usage": {}}
    with pytest.raises(RuntimeError, match="unknown class_type 'Unknown'"):
        Agent().load_state_dict(sd, model_clients={"client": FakeClient()})


def test_model_usage_and_cost_are_restored() -> None:
    a = Agent()
    a.client.update_usage(
        {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    )
    a.client._usage["cost"]["amount"] = 0.25
    client = FakeClient()
    b = Agent()
    b.load_state_dict(copy.deepcopy(a.state_dict()), model_clients={"client": client})
    usage = client.get_usage()
    assert (usage["prompt_tokens"], usage["total_tokens"]) == (3, 7)
    assert usage["cost"] == {"amount": 0.25, "currency": "USD"}


def test_function_reference_loads_into_a_slot_with_the_same_function() -> None:
    a = Agent()
    sd = a.state_dict()
    sd["score_fn"] = FunctionReference(f"{__name__}:metric")
    b = Agent()
    b.load_state_dict(sd, model_clients={"client": FakeClient()})
    assert b.score_fn is metric
    # another function, although its module is imported: refused unless allowed
    sd["score_fn"] = FunctionReference(f"{__name__}:other_metric")
    other = Agent()
    with pytest.raises(RuntimeError, match="allow_functions=True") as info:
        other.load_state_dict(sd, model_clients={"client": FakeClient()})
    assert f"function \"score_fn\": refused '{__name__}:other_metric'" in str(
        info.value
    )
    assert other.score_fn is metric
    other.load_state_dict(
        sd, model_clients={"client": FakeClient()}, allow_functions=[__name__]
    )
    assert other.score_fn is other_metric
    sd["score_fn"] = FunctionReference("afnio_not_imported_anywhere:metric")
    with pytest.raises(RuntimeError, match="allow_functions=True"):
        Agent().load_state_dict(sd, model_clients={"client": FakeClient()})


def test_load_state_dict_rejects_non_mappings() -> None:
    with pytest.raises(TypeError, match="dict-like"):
        Agent().load_state_dict([1, 2])  # type: ignore[arg-type]


def test_none_slot_receives_a_value() -> None:
    class Lazy(cog.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_parameter("p", None)
            self.register_chat("c", None)

    src = Lazy()
    src.p = cog.Parameter("x", role="r")
    src.c = [{"role": "user", "content": [Variable("hi")]}]
    dst = Lazy()
    assert dst.load_state_dict(src.state_dict()).missing_keys == []
    assert (
        isinstance(dst.p, cog.Parameter) and dst.p.data == "x" and dst.p.requires_grad
    )
    assert dst.c[0]["content"][0].data == "hi"
    assert Lazy().load_state_dict({}).missing_keys == []


# -- module wrappers ----------------------------------------------------------------


def test_module_wrappers_apply_the_ops() -> None:
    x = Variable("a b", role="text", requires_grad=True)
    parts = cog.Split()(x, sep=" ", maxsplit=1)
    joined = cog.Add()(parts[1], parts[0])
    total = cog.Sum()([joined, Variable("!")])
    assert total.data == "<ITEM>ba</ITEM><ITEM>!</ITEM>"
    total.backward(Variable("G"))
    assert len(x.grad) == 1


def test_split_module_keeps_sep_and_maxsplit_as_buffers() -> None:
    split = cog.Split()
    assert split.state_dict() == {}
    split(Variable("a,b,c"), ",", 1)
    sd = split.state_dict()
    assert (sd["sep"].data, sd["maxsplit"].data) == (",", 1)
    other = cog.Split()
    other.load_state_dict(sd)
    assert other.sep.data == "," and other.maxsplit.data == 1
    with pytest.raises(TypeError, match="`x` must be a Variable"):
        cog.Add()("a", Variable("b"))


def test_module_is_reachable_from_the_top_level() -> None:
    assert afnio.cognitive.Module is cog.Module
