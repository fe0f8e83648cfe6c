"""What a replay test is guarded with, each undone at teardown:

* :class:`NetworkGuard` (replay only): every connection attempt fails
  (pytest-recording's socket guard), is recorded as a problem and raises
  :class:`ReplayNetworkBlocked` naming the fix; LM requests never reach a socket
  (vcrpy answers them).
* :class:`DspyGuard`: DSPy's response cache is replaced by a fresh in-memory one
  (nothing leaks across tests or from ``~/.dspy_cache``; a cache DSPy builds lazily
  during the test is dropped at teardown), and, for a replay test, DSPy's native lm15
  transports, which vcrpy cannot see, refuse to run (a live simulator serves them, so
  the ``afnio_simulator`` fixture keeps them).
* :class:`AfnioGuard` (when afnio is imported): afnio's global concurrency, backward
  model client and response cache are restored; an active response cache is replaced
  by a fresh in-memory one for the test.
"""

from __future__ import annotations

import importlib
import socket
import sys
from typing import TYPE_CHECKING, Any

from afnio_pytest._types import (
    Blocked,
    ReplayNetworkBlocked,
    ReplayUsageError,
    Unrecordable,
)

if TYPE_CHECKING:
    from afnio_pytest._types import ReplayState

__all__ = ["AfnioGuard", "DspyGuard", "NetworkGuard"]

_MISSING = object()

LM15_TRANSPORTS = (
    ("dspy._vendor.lm15.transports._sync", "StdlibTransport"),
    ("dspy._vendor.lm15.transports._async", "StdlibAsyncTransport"),
)
LM15_FIX = 'create it with engine="litellm"'


def _address(sock: Any, address: Any) -> tuple[str, int | None]:
    if isinstance(address, tuple) and address:
        host = address[0]
        port = address[1] if len(address) > 1 else None
        return str(host), port if isinstance(port, int) else None
    if isinstance(address, (bytes, bytearray)):
        return address.decode("utf-8", "replace"), None
    return str(address), None


class NetworkGuard:
    """Blocks every connection (except ``allow_hosts`` regexes) while replaying."""

    def __init__(self, state: ReplayState, allow_hosts: tuple[str, ...] = ()) -> None:
        self._state = state
        self._allow = list(allow_hosts) or None
        self._network: Any = None
        self._resolve: Any = None

    def start(self) -> None:
        from pytest_recording import network

        self._network = network
        network.block(allowed_hosts=self._allow)
        self._wrap()
        self._resolve = socket.getaddrinfo
        socket.getaddrinfo = self._getaddrinfo  # type: ignore[assignment]

    def ensure(self) -> None:
        """Wrap the socket guard again when another one replaced it since
        :meth:`start` (pytest-recording's ``block_network`` fixture, set up after
        afnio's, installs its own under ``--block-network``): a blocked connection
        is recorded as a problem whoever blocks it."""
        if self._network is not None and not getattr(
            socket.socket.connect, "_afnio_guard", False
        ):
            self._wrap()

    def _wrap(self) -> None:
        state = self._state
        for name in ("connect", "connect_ex"):
            guard = getattr(socket.socket, name)

            def wrapped(
                sock: Any, address: Any, *args: Any, _guard: Any = guard, **kw: Any
            ) -> Any:
                try:
                    return _guard(sock, address, *args, **kw)
                except RuntimeError as exc:
                    if not str(exc).startswith("Network is disabled"):
                        raise
                    host, port = _address(sock, address)
                    state.add_problem(Blocked(host, port))
                    where = host if port is None else f"{host}:{port}"
                    raise ReplayNetworkBlocked(
                        f"afnio_replay blocked a connection to {where} during replay: "
                        "only LM requests are replayed; mock this call or allow the "
                        "host with afnio_replay(allow_hosts=[...])"
                    ) from None

            wrapped._afnio_guard = True  # type: ignore[attr-defined]
            setattr(socket.socket, name, wrapped)

    def _getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        """A name lookup is network access too (a DNS query leaves the machine, and
        fails offline before any connect): blocked unless the name is an IP literal,
        ``localhost`` or allowed."""
        name = host.decode() if isinstance(host, (bytes, bytearray)) else host
        if name is None or not isinstance(name, str) or _local_name(name):
            return self._resolve(host, port, *args, **kwargs)
        if self._network.is_host_in_allowed_hosts(name, self._allow):
            return self._resolve(host, port, *args, **kwargs)
        where = f"{name}:{port}" if port else name
        self._state.add_problem(Blocked(name, port if isinstance(port, int) else None))
        raise ReplayNetworkBlocked(
            f"afnio_replay blocked a name lookup of {where} during replay: only LM "
            "requests are replayed; mock this call or allow the host with "
            "afnio_replay(allow_hosts=[...])"
        )

    def stop(self) -> None:
        if self._network is not None:
            socket.getaddrinfo = self._resolve  # type: ignore[assignment]
            self._network.unblock()
            self._network = None


def _local_name(name: str) -> bool:
    """An IP literal or ``localhost``: resolving it sends nothing."""
    import ipaddress

    if name.lower() in ("localhost", "localhost.localdomain", ""):
        return True
    try:
        ipaddress.ip_address(name.strip("[]").split("%")[0])
    except ValueError:
        return False
    return True


class DspyGuard:
    """Isolates DSPy's response cache and, given a replay state, refuses its lm15
    engine (see the module docstring).

    Args:
        state: the replay test's state: lm15 transports then record an
            :class:`~afnio_pytest._types.Unrecordable` problem and raise. ``None``
            (a live simulator, which lm15's raw sockets reach like any client) only
            isolates the cache.

    When DSPy is not imported at :meth:`start`, its cache is built lazily during
    the test (from ``DSPY_CACHEDIR``, which the fixtures point at a temporary
    folder); :meth:`stop` drops that cache so later tests build their own.
    """

    def __init__(self, state: ReplayState | None) -> None:
        self._state = state
        self._dspy: Any = None
        self._old_cache: Any = _MISSING
        self._imported_before = False
        self._patched: list[tuple[type, Any]] = []

    def start(self) -> None:
        dspy = sys.modules.get("dspy")
        self._imported_before = dspy is not None
        if dspy is None:
            return
        try:
            from dspy.clients.cache import Cache

            fresh = Cache(
                enable_disk_cache=False, enable_memory_cache=True, disk_cache_dir=None
            )
        except Exception as exc:
            raise ReplayUsageError(
                "cannot isolate DSPy's response cache in this DSPy version: create "
                "your dspy.LM with cache=False"
            ) from exc
        lock = getattr(dspy, "_cache_lock", None)
        if lock is not None:
            with lock:
                self._old_cache = dspy.__dict__.get("cache", _MISSING)
                dspy.cache = fresh
        else:
            self._old_cache = dspy.__dict__.get("cache", _MISSING)
            dspy.cache = fresh
        self._dspy = dspy
        if self._state is not None:
            self._patch_lm15(self._state)

    def _patch_lm15(self, state: ReplayState) -> None:

        def refuse(*args: Any, **kwargs: Any) -> Any:
            state.add_problem(
                Unrecordable(
                    "dspy.LM(...) used DSPy's native lm15 engine, which vcrpy cannot "
                    "record or replay",
                    LM15_FIX,
                )
            )
            raise ReplayUsageError(
                "dspy.LM(...) is using DSPy's native lm15 engine (raw sockets vcrpy "
                f"cannot see): {LM15_FIX}"
            )

        for module_name, class_name in LM15_TRANSPORTS:
            try:
                cls = getattr(importlib.import_module(module_name), class_name)
            except (ImportError, AttributeError):
                continue  # a DSPy without lm15: nothing to refuse
            original = cls.__dict__.get("stream", _MISSING)
            cls.stream = refuse
            self._patched.append((cls, original))

    def stop(self) -> None:
        for cls, original in reversed(self._patched):
            if original is _MISSING:
                del cls.stream
            else:
                cls.stream = original
        self._patched.clear()
        dspy, self._dspy = self._dspy, None
        if dspy is None:
            imported = sys.modules.get("dspy")
            lock = getattr(imported, "_cache_lock", None)
            if lock is not None and not self._imported_before:
                # imported during the test: the cache it built lazily lives in the
                # test's DSPY_CACHEDIR; drop it (DSPy builds its default again on
                # the next read). A DSPy that builds its cache at import keeps it.
                with lock:
                    imported.__dict__.pop("cache", None)
            return
        if self._old_cache is _MISSING:
            dspy.__dict__.pop("cache", None)  # DSPy builds its default lazily again
        else:
            dspy.cache = self._old_cache


class AfnioGuard:
    """Snapshots afnio's global state and restores it (a no-op when afnio is not
    imported)."""

    def __init__(self) -> None:
        self._saved: tuple[Any, ...] | None = None
        self._fresh: Any = None

    def start(self) -> None:
        if "afnio" not in sys.modules:
            return
        import afnio
        from afnio import _model_client
        from afnio.models import cache

        self._saved = (
            afnio.get_max_concurrency(),
            _model_client._singleton,
            cache._active,
        )
        if cache._active is not None:
            # a fresh in-memory cache: no answer leaks in from (or out to) the user's
            # cache, and enable_cache() inside the test closes this one, not theirs
            self._fresh = cache._active = cache.ResponseCache(None)

    def stop(self) -> None:
        if self._saved is None:
            return
        import afnio
        from afnio import _model_client
        from afnio.models import cache

        concurrency, singleton, active = self._saved
        self._saved = None
        afnio.set_max_concurrency(concurrency)
        _model_client._singleton = singleton
        current = cache._active
        cache._active = active
        if current is not None and current is not active:
            current.close()
        self._fresh = None
