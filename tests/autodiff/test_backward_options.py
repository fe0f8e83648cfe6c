"""afnio.BackwardOptions / afnio.backward_options: validation, presets, nesting, and
how the active options reach the nodes of a backward pass (issue 23)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, ClassVar

import pytest

import afnio
from afnio import Variable
from afnio.autodiff import config
from afnio.autodiff.function import Function
from afnio.autodiff.options import (
    CHEAP,
    UPSTREAM,
    BackwardOptions,
    backward_options,
    get_backward_options,
    resolve_backward_options,
)


def test_defaults_are_upstream_and_the_cheap_preset_is_direct_and_grouped() -> None:
    assert get_backward_options() == UPSTREAM == BackwardOptions()
    assert UPSTREAM.evaluator_feedback == "lm"
    assert UPSTREAM.chat_samples_per_call == config.CHAT_BACKWARD_SAMPLES_PER_CALL == 1
    assert BackwardOptions("direct", config.CHEAP_SAMPLES_PER_CALL) == CHEAP
    assert config.CHEAP_SAMPLES_PER_CALL == 8
    assert afnio.BackwardOptions is BackwardOptions
    assert afnio.backward_options is backward_options
    assert afnio.get_backward_options is get_backward_options
    assert afnio.autodiff.backward_options is backward_options


def test_options_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        UPSTREAM.chat_samples_per_call = 4  # type: ignore[misc]


@pytest.mark.parametrize("bad", ["llm", "LM", "", None, 1])
def test_a_bad_evaluator_feedback_is_rejected_naming_the_argument(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"`evaluator_feedback` must be \"lm\"") as e:
        BackwardOptions(evaluator_feedback=bad)
    assert '"direct"' in str(e.value)


@pytest.mark.parametrize("bad", [0, -3])
def test_chat_samples_per_call_below_one_is_a_value_error(bad: int) -> None:
    with pytest.raises(ValueError, match=r"`chat_samples_per_call` must be >= 1"):
        BackwardOptions(chat_samples_per_call=bad)


@pytest.mark.parametrize("bad", [True, False, 2.0, "8", None])
def test_chat_samples_per_call_must_be_an_int_not_a_bool(bad: Any) -> None:
    with pytest.raises(TypeError, match=r"`chat_samples_per_call` must be an int"):
        BackwardOptions(chat_samples_per_call=bad)


def test_backward_options_sets_nests_and_restores() -> None:
    with backward_options("cheap") as outer:
        assert outer is CHEAP and get_backward_options() is CHEAP
        with backward_options(chat_samples_per_call=3) as inner:
            # keyword overrides start from the active options
            assert inner == BackwardOptions("direct", 3)
            assert get_backward_options() == inner
            with backward_options("upstream", evaluator_feedback="direct") as third:
                assert third == BackwardOptions("direct", 1)
            assert get_backward_options() == inner
        assert get_backward_options() is CHEAP
    assert get_backward_options() is UPSTREAM
    options = BackwardOptions("lm", 5)
    with backward_options(options) as given:
        assert given is options
    with pytest.raises(RuntimeError, match="boom"), backward_options("cheap"):
        raise RuntimeError("boom")
    assert get_backward_options() is UPSTREAM


def test_bad_arguments_of_backward_options_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r'`options` must be "cheap", "upstream"'):
        backward_options("fast").__enter__()  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`options` must be"):
        backward_options(8).__enter__()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`chat_samples_per_call` must be >= 1"):
        backward_options(chat_samples_per_call=0).__enter__()
    with pytest.raises(ValueError, match=r"`evaluator_feedback` must be"):
        backward_options(evaluator_feedback="judge").__enter__()  # type: ignore[arg-type]
    assert get_backward_options() is UPSTREAM


def test_resolve_backward_options() -> None:
    assert resolve_backward_options("cheap") is CHEAP
    assert resolve_backward_options("upstream") is UPSTREAM
    options = BackwardOptions("direct", 2)
    assert resolve_backward_options(options) is options
    assert resolve_backward_options(None) is UPSTREAM
    with backward_options(options):
        assert resolve_backward_options(None) is options
    with pytest.raises(ValueError, match=r"`backward` must be \"cheap\""):
        resolve_backward_options("Cheap")
    with pytest.raises(TypeError, match=r"`backward` must be"):
        resolve_backward_options(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`my_arg` must be"):
        resolve_backward_options("x", name="my_arg")


class _RecordAsync(Function):
    seen: ClassVar[list[BackwardOptions]] = []

    @staticmethod
    def forward(ctx: Any, x: Variable) -> Variable:
        return Variable(x.data + "!", role="out")

    @staticmethod
    async def backward(ctx: Any, grad: Variable) -> tuple[Variable | None]:
        _RecordAsync.seen.append(get_backward_options())
        return (Variable("g", role="feedback"),)


class _RecordThread(Function):
    blocking = True
    seen: ClassVar[list[BackwardOptions]] = []

    @staticmethod
    def forward(ctx: Any, x: Variable) -> Variable:
        return Variable(x.data + "?", role="out")

    @staticmethod
    def backward(ctx: Any, grad: Variable) -> tuple[Variable | None]:
        _RecordThread.seen.append(get_backward_options())
        return (Variable("g", role="feedback"),)


def test_the_active_options_reach_every_node_of_a_backward_pass() -> None:
    _RecordAsync.seen.clear()
    _RecordThread.seen.clear()
    x = Variable("a", role="x", requires_grad=True)
    y = _RecordThread.apply(_RecordAsync.apply(x))
    with backward_options("cheap", chat_samples_per_call=5):
        y.backward(Variable("feedback"), retain_graph=True)
    y.backward(Variable("feedback"))  # outside the block: upstream again
    expected = [BackwardOptions("direct", 5), UPSTREAM]
    assert _RecordAsync.seen == expected  # on afnio's loop
    assert _RecordThread.seen == expected  # in a worker thread


def test_the_active_options_reach_abackward_from_another_event_loop() -> None:
    _RecordAsync.seen.clear()
    x = Variable("a", role="x", requires_grad=True)
    y = _RecordAsync.apply(x)

    async def main() -> None:
        with backward_options(evaluator_feedback="direct"):
            await afnio.autodiff.abackward(y, Variable("feedback"))

    asyncio.run(main())
    assert _RecordAsync.seen == [BackwardOptions("direct", 1)]
