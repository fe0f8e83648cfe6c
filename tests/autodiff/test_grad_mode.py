"""Grad mode: no_grad, set_grad_enabled and is_grad_enabled, per thread and task."""

from __future__ import annotations

import asyncio
import threading

import pytest

import afnio
from afnio import Variable


def _op() -> Variable:
    return Variable("x", requires_grad=True) + Variable("y")


def test_default_is_enabled_and_ops_record() -> None:
    assert afnio.is_grad_enabled() is True
    out = _op()
    assert out.requires_grad and out.grad_fn is not None and not out.is_leaf


def test_no_grad_context_manager_makes_outputs_plain_leaves() -> None:
    with afnio.no_grad():
        assert afnio.is_grad_enabled() is False
        out = _op()
    assert afnio.is_grad_enabled() is True
    assert out.requires_grad is False
    assert out.grad_fn is None
    assert out.is_leaf is True


def test_no_grad_decorator_with_and_without_parentheses() -> None:
    @afnio.no_grad
    def bare() -> bool:
        return afnio.is_grad_enabled()

    @afnio.no_grad()
    def called() -> bool:
        return afnio.is_grad_enabled()

    assert bare() is False
    assert called() is False
    assert bare.__name__ == "bare"
    assert afnio.is_grad_enabled() is True


def test_no_grad_decorates_async_functions() -> None:
    @afnio.no_grad
    async def handler() -> bool:
        await asyncio.sleep(0)
        return afnio.is_grad_enabled()

    assert asyncio.run(handler()) is False
    assert afnio.is_grad_enabled() is True


def test_no_grad_restores_after_exception() -> None:
    with pytest.raises(ValueError), afnio.no_grad():
        raise ValueError("boom")
    assert afnio.is_grad_enabled() is True


def test_nested_no_grad_and_set_grad_enabled() -> None:
    with afnio.no_grad():
        with afnio.set_grad_enabled(True):
            assert afnio.is_grad_enabled() is True
            assert _op().requires_grad is True
        assert afnio.is_grad_enabled() is False
    assert afnio.is_grad_enabled() is True


def test_set_grad_enabled_as_a_plain_call() -> None:
    afnio.set_grad_enabled(False)
    try:
        assert afnio.is_grad_enabled() is False
        assert _op().requires_grad is False
    finally:
        afnio.set_grad_enabled(True)
    assert afnio.is_grad_enabled() is True


def test_set_grad_enabled_as_decorator() -> None:
    @afnio.set_grad_enabled(False)
    def f() -> bool:
        return afnio.is_grad_enabled()

    assert afnio.is_grad_enabled() is True  # decorating does not switch the mode
    assert f() is False
    assert afnio.is_grad_enabled() is True


def test_set_grad_enabled_rejects_non_bool() -> None:
    with pytest.raises(TypeError, match="expects a bool"):
        afnio.set_grad_enabled("no")  # type: ignore[arg-type]


def test_no_grad_in_one_thread_does_not_leak_into_another() -> None:
    seen: dict[str, bool] = {}
    inside = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with afnio.no_grad():
            seen["holder"] = afnio.is_grad_enabled()
            inside.set()
            release.wait(5)

    def other() -> None:
        inside.wait(5)
        seen["other"] = afnio.is_grad_enabled()
        seen["other_op"] = _op().requires_grad
        release.set()

    threads = [threading.Thread(target=holder), threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert seen == {"holder": False, "other": True, "other_op": True}


def test_no_grad_in_one_task_does_not_leak_into_a_concurrent_task() -> None:
    async def main() -> tuple[bool, bool, bool]:
        in_no_grad = asyncio.Event()
        done = asyncio.Event()

        async def quiet() -> bool:
            with afnio.no_grad():
                in_no_grad.set()
                await done.wait()
                return afnio.is_grad_enabled()

        async def loud() -> tuple[bool, bool]:
            await in_no_grad.wait()
            result = (afnio.is_grad_enabled(), _op().requires_grad)
            done.set()
            return result

        q, (enabled, recorded) = await asyncio.gather(quiet(), loud())
        return q, enabled, recorded

    assert asyncio.run(main()) == (False, True, True)


def test_parameter_creation_is_unaffected_by_no_grad() -> None:
    with afnio.no_grad():
        p = afnio.cognitive.Parameter("xyz")
    assert p.requires_grad is True


def test_one_no_grad_instance_shared_by_concurrent_tasks() -> None:
    shared = afnio.no_grad()

    async def main() -> list[bool]:
        first_in = asyncio.Event()
        second_out = asyncio.Event()

        async def first() -> bool:
            with shared:
                first_in.set()
                await second_out.wait()
            return afnio.is_grad_enabled()

        async def second() -> bool:
            await first_in.wait()
            with afnio.no_grad(), shared:
                pass
            second_out.set()
            return afnio.is_grad_enabled()

        return list(await asyncio.gather(first(), second()))

    assert asyncio.run(main()) == [True, True]
