"""Grad mode: whether Functions record the graph.

The flag lives in a :class:`contextvars.ContextVar`, so it is correct per thread and per
asyncio task: ``no_grad()`` in one task never leaks into another running concurrently.
A new thread starts with grad mode enabled.

Example::

    >>> import afnio
    >>> x = afnio.Variable("a", requires_grad=True)
    >>> with afnio.no_grad():
    ...     y = x + afnio.Variable("b")
    >>> y.requires_grad
    False
    >>> afnio.is_grad_enabled()
    True
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["is_grad_enabled", "no_grad", "set_grad_enabled"]

F = TypeVar("F", bound=Callable[..., Any])

_grad_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "afnio_grad_enabled", default=True
)


def is_grad_enabled() -> bool:
    """Return True if operations on Variables currently record the graph."""
    return _grad_enabled.get()


class _GradModeContext:
    """Base of :class:`no_grad` and :class:`set_grad_enabled`: context manager and
    decorator (for plain and ``async`` functions)."""

    _mode: bool

    def __init__(self) -> None:
        # the modes to restore, per context: one instance may be entered by
        # several tasks or threads at once
        self._saved: contextvars.ContextVar[tuple[bool, ...]] = contextvars.ContextVar(
            "afnio_grad_mode_saved", default=()
        )

    def __enter__(self) -> None:
        self._saved.set((*self._saved.get(), _grad_enabled.get()))
        _grad_enabled.set(self._mode)

    def __exit__(self, *exc: object) -> None:
        saved = self._saved.get()
        self._saved.set(saved[:-1])
        _grad_enabled.set(saved[-1])

    def _clone(self) -> _GradModeContext:
        return set_grad_enabled._make(self._mode)

    def __call__(self, func: F) -> F:
        if not callable(func):
            raise TypeError(
                f"{type(self).__name__} can decorate a function, got "
                f"{type(func).__name__}."
            )
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with self._clone():
                    return await func(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self._clone():
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


class no_grad(_GradModeContext):
    """Disable graph recording: a context manager and a decorator.

    Works as ``with no_grad():``, ``@no_grad()`` and bare ``@no_grad``, on plain and
    ``async`` functions. Inside it, Function outputs have ``requires_grad=False``,
    ``grad_fn=None`` and are leaves. Creating a ``Parameter`` is unaffected.

    Example::

        >>> import afnio
        >>> @afnio.no_grad
        ... def evaluate(x):
        ...     return x + x
        >>> evaluate(afnio.Variable("a", requires_grad=True)).requires_grad
        False
    """

    _mode = False

    def __new__(cls, orig_func: Callable[..., Any] | None = None) -> Any:
        self = super().__new__(cls)
        if orig_func is None:
            return self
        self.__init__()
        return self(orig_func)

    def __init__(self, orig_func: Callable[..., Any] | None = None) -> None:
        super().__init__()


class set_grad_enabled(_GradModeContext):
    """Set grad mode on or off: as a call it sets the mode at once, as a context
    manager it restores the previous mode on exit; also a decorator.

    Args:
        mode: True to record the graph, False not to.

    Example::

        >>> import afnio
        >>> with afnio.set_grad_enabled(False):
        ...     afnio.is_grad_enabled()
        False
        >>> _ = afnio.set_grad_enabled(False)  # a plain call switches at once
        >>> afnio.is_grad_enabled()
        False
        >>> _ = afnio.set_grad_enabled(True)
        >>> afnio.is_grad_enabled()
        True
    """

    def __init__(self, mode: bool) -> None:
        if not isinstance(mode, bool):
            raise TypeError(
                f"set_grad_enabled(mode) expects a bool, got {type(mode).__name__}."
            )
        super().__init__()
        self._mode = mode
        # like torch: the call itself switches the mode; __exit__ restores it
        self._prev: bool | None = _grad_enabled.get()
        _grad_enabled.set(mode)

    def __enter__(self) -> None:
        # the mode was already set in __init__; keep the remembered previous mode
        pass

    def __exit__(self, *exc: object) -> None:
        if self._prev is not None:
            _grad_enabled.set(self._prev)
            self._prev = None

    @classmethod
    def _make(cls, mode: bool) -> _GradModeContext:
        ctx = _GradModeContext.__new__(_GradModeContext)
        _GradModeContext.__init__(ctx)
        ctx._mode = mode
        return ctx

    def __call__(self, func: F) -> F:
        # used as a decorator: undo the switch made by __init__, apply per call
        if self._prev is not None:
            _grad_enabled.set(self._prev)
            self._prev = None
        return super().__call__(func)
