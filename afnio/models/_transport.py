"""The HTTP transport of afnio's OpenAI clients: one shared aiohttp pool per endpoint.

By default an :class:`~afnio.models.openai.OpenAI` (or ``AsyncOpenAI``) client built
without ``http_client`` sends its requests through the openai SDK's
``DefaultAioHttpClient`` (the ``openai[aiohttp]`` extra): the SDK's httpx client
API on an aiohttp transport. Its CPU cost per request stays flat with hundreds of
requests in flight, where httpx's own connection pool scans every connection on every
request (issue 21; ``benchmarks/client_cpu.py``: one README step at batch 512 with 256
in flight costs the client 7-9 ms of CPU per LM call over httpx, about 2 ms here).

Every afnio client of one base URL shares **one** tuned aiohttp connection pool per
event loop (afnio sends all its requests from its own loop, :mod:`afnio._runtime`, so
in practice one pool per endpoint): connections opened by the forward client are
reused by the backward and optimizer clients. Each afnio client holds a *lease* on
the pool; closing the client (``close()``, ``aclose()``, ``with``) returns the lease,
and the last lease closes the pool's connections. A client that is never closed
returns its lease when it is garbage-collected, and pools still open when the
interpreter exits are closed then, so no ``ResourceWarning: Unclosed connector``.

Choosing the transport: ``OpenAI(..., transport="httpx")`` per client, or the
environment variable ``AFNIO_HTTP_TRANSPORT=httpx`` for every client built without a
``transport`` argument (also those afnio builds for you, as from
``afnio.set_backward_model_client("openai/gpt-4o-mini")``). ``"httpx"`` is the
SDK's default httpx client (one per afnio client, as before issue 21). Without the
aiohttp extra installed, the default falls back to ``"httpx"``. A client built while
the environment names an HTTP(S) proxy gets the SDK's aiohttp client of its own (httpx
applies environment proxies only to a client without a transport of its own).

Cassettes: vcrpy records the aiohttp requests (``aiohttp.ClientSession._request``),
each once; the shared pool's transports are plain ``httpx.AsyncBaseTransport``
subclasses, which vcrpy's httpx patches do not touch.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.util
import os
import threading
import weakref
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # imported when a client is built, not with afnio
    import httpx

__all__ = [
    "ENV_VAR",
    "TRANSPORTS",
    "Transport",
    "aiohttp_available",
    "discard_http_client",
    "open_pools",
    "pool_sessions",
    "pooled_http_client",
    "resolve_transport",
]

Transport = Literal["aiohttp", "httpx"]
TRANSPORTS: tuple[str, ...] = ("aiohttp", "httpx")
"""The values of ``transport`` (and of :data:`ENV_VAR`)."""

ENV_VAR = "AFNIO_HTTP_TRANSPORT"
"""The environment variable naming the default transport of clients built without a
``transport`` argument."""

KEEPALIVE_S = 30.0
"""How long an idle pooled connection is kept open. The SDK's 5 s would close every
connection between the rounds of a long step (a slow optimizer call), and reopen
them all for the next forward pass."""

_CLOSE_TIMEOUT_S = 5.0


def aiohttp_available() -> bool:
    """Whether the openai SDK's aiohttp transport is installed
    (``pip install 'openai[aiohttp]'``: ``aiohttp`` and ``httpx-aiohttp``)."""
    return (
        importlib.util.find_spec("aiohttp") is not None
        and importlib.util.find_spec("httpx_aiohttp") is not None
    )


def resolve_transport(transport: str | None) -> Transport:
    """The transport a client uses: ``transport`` if given, else
    ``$AFNIO_HTTP_TRANSPORT``, else ``"aiohttp"`` when installed, else ``"httpx"``.

    Raises:
        ValueError: ``transport`` (or the environment variable) is neither
            ``"aiohttp"`` nor ``"httpx"``.
        ImportError: ``"aiohttp"`` was asked for and the extra is not installed.
    """
    source = "`transport`"
    if transport is None:
        value = os.environ.get(ENV_VAR, "").strip().lower()
        if not value:
            return "aiohttp" if aiohttp_available() else "httpx"
        transport, source = value, f"${ENV_VAR}"
    if transport not in TRANSPORTS:
        raise ValueError(f"{source} must be 'aiohttp' or 'httpx', got {transport!r}.")
    if transport == "aiohttp" and not aiohttp_available():
        raise ImportError(
            f"{source} is 'aiohttp' but the openai SDK's aiohttp extra is not "
            "installed: pip install 'openai[aiohttp]', or use transport='httpx'."
        )
    return transport  # type: ignore[return-value]


# -- the shared pools ----------------------------------------------------------------

_lock = threading.Lock()
_pools: dict[str, _SharedPool] = {}
_ssl_context: Any = None
_abandoned: list[Any] = []  # a forked child's copies of its parent's sessions


def _shared_ssl_context() -> Any:
    """One SSL context (certifi's CAs, as httpx builds it) for every pool: loading
    the CA bundle takes milliseconds."""
    global _ssl_context
    with _lock:
        if _ssl_context is None:
            import httpx

            _ssl_context = httpx.create_ssl_context()
        return _ssl_context


def _new_session() -> Any:
    """A tuned ``aiohttp.ClientSession`` on the running loop: no connection limit of
    its own (afnio's :func:`afnio.set_max_concurrency` bounds the requests in
    flight), none per host, idle connections kept :data:`KEEPALIVE_S`, no cookie jar
    (the SDK's httpx layer keeps cookies; aiohttp's would parse them again)."""
    import aiohttp

    connector = aiohttp.TCPConnector(
        limit=0,
        limit_per_host=0,
        keepalive_timeout=KEEPALIVE_S,
        ssl=_shared_ssl_context(),
    )
    return aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar()
    )


async def _closer(transport: Any) -> AsyncIterator[None]:
    """Holds one loop's pool open; closing this generator closes the pool, on its
    loop. Started on that loop, so the loop tracks it: ``asyncio.run`` (and any
    loop's ``shutdown_asyncgens``) closes it before the loop closes, and a loop
    never has a session left open on it."""
    try:
        yield
    finally:
        await transport.aclose()


class _LoopPool:
    """One event loop's part of a :class:`_SharedPool`."""

    __slots__ = ("closer", "transport")

    def __init__(self, transport: Any, closer: AsyncGenerator[None, None]) -> None:
        self.transport = transport
        self.closer = closer


def _close_on(loop: asyncio.AbstractEventLoop, part: _LoopPool, wait: bool) -> None:
    """Close ``part`` from outside ``loop``'s thread: on ``loop`` if it runs
    (waiting at most a few seconds if ``wait``); a closed loop closed it already
    (``shutdown_asyncgens``), and one that never runs again has no I/O to wait for,
    so its connector is just marked closed."""
    session = part.transport.client
    if not hasattr(session, "closed") or session.closed:
        return  # never opened (no request yet), or closed already
    if loop.is_running() and not loop.is_closed():
        future = asyncio.run_coroutine_threadsafe(part.closer.aclose(), loop)
        if wait:
            # a loop going away (or already gone) leaves nothing to close
            with contextlib.suppress(Exception):
                future.result(_CLOSE_TIMEOUT_S)
        return
    connector = session.connector
    if connector is not None:
        with contextlib.suppress(RuntimeError):  # RuntimeError: its loop is closed
            connector._close()


class _SharedPool:
    """The connection pools of one base URL: one ``AiohttpTransport`` (with its
    ``ClientSession``) per event loop, opened on that loop's first request.

    ``by_loop`` changes only on the loop that sends (``transport_for``) or when the
    last lease is returned (no request in flight then)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.leases = 0
        self.pid = os.getpid()
        self.by_loop: dict[asyncio.AbstractEventLoop, _LoopPool] = {}

    async def transport_for(self, loop: asyncio.AbstractEventLoop) -> Any:
        """The running ``loop``'s transport (made on its first request)."""
        part = self.by_loop.get(loop)
        if part is not None:
            return part.transport
        from httpx_aiohttp import AiohttpTransport

        for old in [o for o in list(self.by_loop) if o.is_closed()]:
            self.by_loop.pop(old, None)  # an ended asyncio.run closed its session
        # the session itself is built on this loop by get_client, on first use
        transport = AiohttpTransport(verify=_shared_ssl_context(), client=_new_session)
        closer = _closer(transport)
        self.by_loop[loop] = _LoopPool(transport, closer)
        await closer.__anext__()  # the loop now tracks it (see _closer)
        return transport

    async def close_async(self) -> None:
        """Close every loop's pool: this loop's awaited, the others' scheduled."""
        current = asyncio.get_running_loop()
        parts, self.by_loop = list(self.by_loop.items()), {}
        for loop, part in parts:
            if loop is current:
                await part.closer.aclose()
            else:
                _close_on(loop, part, wait=False)

    def close_sync(self, wait: bool) -> None:
        """Close every loop's pool from a thread that runs none of them."""
        parts, self.by_loop = list(self.by_loop.items()), {}
        for loop, part in parts:
            _close_on(loop, part, wait)


def _forget_after_fork() -> None:
    """In a forked child: the parent's connections are not ours to use or close;
    keep them referenced (no warnings from their finalizers) and start afresh."""
    global _lock
    _lock = threading.Lock()
    for pool in _pools.values():
        _abandoned.append(pool.by_loop)
        pool.by_loop = {}
        pool.pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def _release(pool: _SharedPool) -> bool:
    """Drop one lease; True if it was the last (the pool is then unregistered and
    its caller closes it)."""
    with _lock:
        pool.leases -= 1
        if pool.leases > 0:
            return False
        if _pools.get(pool.key) is pool:
            del _pools[pool.key]
        return True


def _httpx_base() -> type:
    import httpx

    return httpx.AsyncBaseTransport


class _Lease:
    """One afnio client's hold on a :class:`_SharedPool`, as an httpx transport:
    requests go to the running loop's pool; ``aclose`` (the SDK's ``close()``)
    returns the lease, once."""

    def __init__(self, pool: _SharedPool) -> None:
        self._pool = pool
        self._released = False
        self._release_lock = threading.Lock()

    def _take(self) -> bool:
        with self._release_lock:
            if self._released:
                return False
            self._released = True
            return True

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        transport = await self._pool.transport_for(asyncio.get_running_loop())
        return await transport.handle_async_request(request)

    async def aclose(self) -> None:
        if self._take() and _release(self._pool):
            await self._pool.close_async()

    def release_sync(self) -> None:
        """Return the lease from any thread (a garbage-collected client): the last
        one schedules the pool's closing on its loops."""
        if self._take() and _release(self._pool):
            self._pool.close_sync(wait=False)


_lease_class: type | None = None


def _lease(pool: _SharedPool) -> Any:
    """A :class:`_Lease` that is also an ``httpx.AsyncBaseTransport`` (httpx is
    imported when the first client is built, not with afnio)."""
    global _lease_class
    if _lease_class is None:
        _lease_class = type("_Lease", (_Lease, _httpx_base()), {})
    return _lease_class(pool)


def _environment_proxies() -> bool:
    """Whether the environment names an HTTP(S) proxy (``HTTPS_PROXY``,
    ``HTTP_PROXY``, ``ALL_PROXY``, as httpx reads them)."""
    import urllib.request

    proxies = urllib.request.getproxies()
    return any(proxies.get(scheme) for scheme in ("http", "https", "all"))


def pooled_http_client(base_url: str, owner: object) -> httpx.AsyncClient:
    """The SDK's ``DefaultAioHttpClient`` (its timeout and redirect settings) on the
    shared aiohttp pool of ``base_url``, leased for ``owner`` (an afnio client):
    closing the returned client, or ``owner`` being garbage-collected, returns the
    lease; the last lease closes the pool. With an HTTP(S) proxy in the environment,
    a ``DefaultAioHttpClient`` of its own (which applies the proxy)."""
    from openai import DefaultAioHttpClient

    if _environment_proxies():
        # httpx reads HTTP(S)_PROXY / NO_PROXY only for a client without a transport
        # of its own: give such a client the SDK's, unshared (closed with it)
        return DefaultAioHttpClient()
    key = str(base_url).rstrip("/")
    with _lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = _SharedPool(key)
        pool.leases += 1
    lease = _lease(pool)
    try:
        client = DefaultAioHttpClient(transport=lease)
    except BaseException:
        lease.release_sync()
        raise
    finalizer = weakref.finalize(owner, lease.release_sync)
    # at exit, _close_all_at_exit closes what is still open, waiting for it (a
    # finalizer would only schedule the closing on a loop about to stop)
    finalizer.atexit = False
    return client


def discard_http_client(client: Any) -> None:
    """Give back the pool lease of a :func:`pooled_http_client` that will never be
    used (its afnio client failed to build); other clients are left alone."""
    lease = getattr(client, "_transport", None)
    if isinstance(lease, _Lease):
        lease.release_sync()


def open_pools() -> dict[str, int]:
    """The shared pools open now: ``{base URL: afnio clients holding it}`` (for tests
    and diagnostics)."""
    with _lock:
        return {key: pool.leases for key, pool in _pools.items()}


def pool_sessions(base_url: str) -> list[Any]:
    """The ``aiohttp.ClientSession`` objects of ``base_url``'s pool, one per event loop
    that sent a request (none before the first; for tests)."""
    with _lock:
        pool = _pools.get(str(base_url).rstrip("/"))
        if pool is None:
            return []
        return [
            p.transport.client
            for p in pool.by_loop.values()
            if hasattr(p.transport.client, "closed")  # opened by a first request
        ]


@atexit.register
def _close_all_at_exit() -> None:
    """Close the pools of clients still open at exit (afnio's loop thread, a daemon,
    still runs while ``atexit`` handlers do)."""
    with _lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        if pool.pid == os.getpid():
            pool.close_sync(wait=True)
