"""OpenAI (and any OpenAI-compatible endpoint) model clients, on the official SDK.

:class:`OpenAI` and :class:`AsyncOpenAI` offer the same methods: ``chat``/``achat``,
``complete``/``acomplete`` and ``embed``/``aembed``. Every request runs on afnio's
event loop, holding one of the process-wide LM-request slots
(:func:`afnio.set_max_concurrency`), goes through the optional response cache, and
adds its token usage and cost to the client's usage dict. Provider rate limits are
afnio's (:mod:`afnio.models.rate_limit`): per (base URL, model), 429s are retried
after the server's delay, concurrency adapts, ``x-ratelimit-*`` headers pace the
requests, and :func:`afnio.set_rate_limit` sets explicit budgets. Retries with
exponential backoff on 5xx, timeouts and connection errors are the SDK's
(``max_retries``, default 2); ``timeout`` is the SDK's too. Any ``base_url`` works
(or the SDK's ``OPENAI_BASE_URL``), e.g. the bundled simulator (``afnio.testing``).

Example::

    >>> from afnio.models.openai import AsyncOpenAI
    >>> client = AsyncOpenAI(api_key="sk-test", base_url="http://127.0.0.1:8000/v1")
    >>> client.get_provider()
    'openai'

    # reply = client.chat(messages=[{"role": "user", "content": "Hi"}], model="gpt-4o")
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from afnio._runtime import run_async
from afnio._secrets import REDACTED, mask_secrets, mask_url
from afnio.errors import note_client
from afnio.models._transport import (
    Transport,
    discard_http_client,
    pooled_http_client,
    resolve_transport,
)
from afnio.models.batch import BatchCollector, active_collector
from afnio.models.cache import account_fingerprint, cache_key, get_cache
from afnio.models.model import ChatCompletionModel, EmbeddingModel, TextCompletionModel
from afnio.models.model_registry import register_model_class
from afnio.models.phases import LEDGER, current_phase
from afnio.models.pricing import cost_of
from afnio.models.rate_limit import sdk_client_class, send_limited
from afnio.models.step_memo import memoized
from afnio.models.usage import add_usage

if TYPE_CHECKING:  # the SDK is imported when a client is built, not with afnio
    import httpx
    import openai
    from openai import NotGiven

__all__ = ["AsyncOpenAI", "OpenAI"]

DEFAULT_MAX_RETRIES = 2
"""The openai SDK's ``DEFAULT_MAX_RETRIES`` (kept here so that ``import afnio`` does
not import the SDK; a test checks they agree)."""


class _NotGivenType:
    """The default of ``timeout``: the SDK's own default applies."""

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN: Any = _NotGivenType()


def _sdk_base_url(base_url: str | httpx.URL | None) -> str:
    """The base URL the SDK will use: ``base_url``, else ``$OPENAI_BASE_URL``, else
    OpenAI's (as ``openai.AsyncOpenAI`` resolves it)."""
    if base_url is None:
        base_url = os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
    return str(base_url)


def _usage_dict(usage: Any) -> dict[str, Any]:
    if usage is None:
        return {}
    if hasattr(usage, "model_dump"):
        return usage.model_dump()
    return dict(usage)


class _OpenAIClient(TextCompletionModel, ChatCompletionModel, EmbeddingModel):
    """Shared implementation of :class:`OpenAI` and :class:`AsyncOpenAI`."""

    def __init__(
        self,
        api_key: str | None = None,
        organization: str | None = None,
        project: str | None = None,
        base_url: str | httpx.URL | None = None,
        websocket_base_url: str | httpx.URL | None = None,
        timeout: float | httpx.Timeout | NotGiven | None = NOT_GIVEN,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: Mapping[str, str] | None = None,
        default_query: Mapping[str, object] | None = None,
        http_client: httpx.AsyncClient | None = None,
        transport: Transport | None = None,
    ) -> None:
        # imported here, on the caller's thread (import afnio stays light)
        import httpx
        import openai

        if http_client is not None and not isinstance(http_client, httpx.AsyncClient):
            raise TypeError(
                "`http_client` must be an httpx.AsyncClient: afnio runs every request "
                "on its own event loop (the sync API waits for it)."
            )
        if http_client is not None and transport is not None:
            raise ValueError(
                "Pass `http_client` or `transport`, not both: `transport` picks the "
                "HTTP client afnio builds when none is given."
            )
        # the transport afnio builds (None: the caller's http_client)
        self._transport: str | None = (
            None if http_client is not None else resolve_transport(transport)
        )
        if (
            isinstance(max_retries, bool)
            or not isinstance(max_retries, int)
            or max_retries < 0
        ):
            raise ValueError(f"`max_retries` must be an int >= 0, got {max_retries!r}.")
        # Readable cassettes: never ask for zstd, which recorders cannot decode.
        headers = {"Accept-Encoding": "gzip, deflate", **(default_headers or {})}
        if self._transport == "aiohttp":
            # the SDK's DefaultAioHttpClient on the endpoint's shared aiohttp pool
            # (afnio.models._transport), leased by this client until it is closed
            http_client = pooled_http_client(_sdk_base_url(base_url), self)
        try:
            # openai.AsyncOpenAI, whose 429s afnio's limiter retries (rate_limit)
            self._aclient = sdk_client_class()(
                api_key=api_key,
                organization=organization,
                project=project,
                base_url=base_url,
                websocket_base_url=websocket_base_url,
                timeout=openai.NOT_GIVEN if timeout is NOT_GIVEN else timeout,
                max_retries=max_retries,
                default_headers=headers,
                default_query=default_query,
                http_client=http_client,
            )
        except BaseException:
            if self._transport == "aiohttp" and http_client is not None:
                discard_http_client(http_client)  # give the pool lease back
            raise
        config: dict[str, Any] = {
            "organization": organization,
            "project": project,
            "base_url": mask_url(str(self._aclient.base_url)),
            "websocket_base_url": mask_url(str(websocket_base_url))
            if websocket_base_url
            else None,
            "timeout": timeout if isinstance(timeout, (int, float)) else None,
            "max_retries": max_retries,
            "transport": transport,
            # credentials (Authorization, api-key, ?key=, sk-...) are masked
            "default_headers": mask_secrets(dict(default_headers), header=True)
            if default_headers
            else None,
            "default_query": mask_secrets(dict(default_query), query=True)
            if default_query
            else None,
        }
        config = {k: v for k, v in config.items() if v is not None}
        json.dumps(config)  # the config must stay JSON-serialisable (no secrets in it)
        self._usage_lock = threading.Lock()
        super().__init__(provider="openai", config=config)
        # The SDK imports its resources lazily, on first use; load them now, in the
        # caller's thread, so the first request does not stall afnio's event loop.
        _ = (
            self._aclient.chat.completions,
            self._aclient.completions,
            self._aclient.embeddings,
        )
        # What :attr:`OpenAI._client` (a synchronous SDK client, built on first
        # access) is built from: this client's resolved settings (key and base URL
        # from the env), without ``http_client`` (which is async).
        sdk = self._aclient
        self._sync_args: dict[str, Any] = {
            "api_key": sdk.api_key,
            "organization": sdk.organization,
            "project": sdk.project,
            "base_url": sdk.base_url,
            "websocket_base_url": websocket_base_url,
            "timeout": sdk.timeout,
            "max_retries": max_retries,
            "default_headers": dict(headers),
            "default_query": default_query,
        }
        self._sync_client: openai.OpenAI | None = None
        self._sync_lock = threading.Lock()

    @property
    def client(self) -> openai.AsyncOpenAI:
        """The underlying ``openai.AsyncOpenAI`` SDK client."""
        return self._aclient

    @property
    def transport(self) -> str:
        """The HTTP transport of this client's requests: ``"aiohttp"`` (the SDK's
        ``DefaultAioHttpClient`` on the endpoint's shared pool, the default),
        ``"httpx"`` (the SDK's default httpx client), or ``"custom"`` (the
        ``http_client`` passed in). See :mod:`afnio.models._transport`."""
        return self._transport or "custom"

    def __repr__(self) -> str:
        """Class and endpoint; no part of the API key (nor of a URL password or a
        credential query parameter) is shown."""
        key = REDACTED if self._aclient.api_key else None
        url = mask_url(str(self._aclient.base_url))
        return f"{type(self).__name__}(base_url={url!r}, api_key={key!r})"

    # -- lifecycle -------------------------------------------------------------------

    def _close_sync_client(self) -> None:
        """Close the synchronous SDK client, if :attr:`OpenAI._client` built one."""
        with self._sync_lock:
            sync, self._sync_client = self._sync_client, None
        if sync is not None:
            sync.close()

    async def aclose(self) -> None:
        """Close the HTTP connections (the client can't be used afterwards)."""
        self._close_sync_client()
        await run_async(self._aclient.close())

    def close(self) -> None:
        """Synchronous :meth:`aclose`."""
        from afnio._runtime import run_sync

        self._close_sync_client()
        run_sync(self._aclient.close())

    def __enter__(self) -> _OpenAIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> _OpenAIClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- usage -----------------------------------------------------------------------

    def update_usage(self, usage: Any, model_name: str | None = None) -> float | None:
        """Add a response's token counts; with ``model_name`` also add its cost from
        the pricing table (and return it), without (a checkpoint restore) set the
        saved cost."""
        data = _usage_dict(usage)
        added = None
        with self._usage_lock:
            add_usage(self._usage, data)
            cost = self._usage.setdefault("cost", {"amount": 0.0, "currency": "USD"})
            if model_name is not None:
                added = cost_of(data, model_name, self.provider or "openai")
                cost["amount"] = self._cost_total.add(added, cost["amount"])
            elif isinstance(data.get("cost"), Mapping) and "amount" in data["cost"]:
                cost["amount"] = float(data["cost"]["amount"])
        return added

    # -- the request path ------------------------------------------------------------

    async def _request(
        self,
        kind: str,
        payload: dict[str, Any],
        send: Callable[[dict[str, Any]], Awaitable[tuple[Any, Any]]],
    ) -> Any:
        """Run one request on afnio's loop: the step memo, the cache, then a request
        slot, then usage.

        A retried unit of work gets the answers it already paid for from the step
        memo (:mod:`afnio.models.step_memo`). The cache key covers the kind, the base
        URL, the request and the account (:meth:`_cache_account`): clients of
        different accounts never share answers, and rotating a key starts a fresh
        cache. ``calls`` counts answered (billed) requests, as the phase ledger
        does; a request that failed after the SDK's retries counts in neither."""

        async def call() -> Any:
            # the (base URL, model) rate limiter, then a request slot; 429s are
            # retried there and never billed (afnio.models.rate_limit)
            try:
                value, usage = await send_limited(self._aclient.base_url, payload, send)
            except Exception as e:  # say which client failed, and where to
                note_client(e, f"afnio's {current_phase()} client {self!r}")
                raise
            self.calls += 1
            data = _usage_dict(usage)  # dumped once, for the usage and the ledger
            cost = None
            if usage is not None:
                cost = self.update_usage(data, payload.get("model"))
            LEDGER.record(payload.get("model"), data, cost or 0.0)
            return value

        async def cached() -> Any:
            cache = get_cache()
            if cache is None:
                return await call()
            key = self._response_cache_key(kind, payload)
            return await cache.get_or_call(key, call, kind=kind)

        return await memoized(self, kind, payload, cached)

    def _response_cache_key(self, kind: str, payload: Mapping[str, Any]) -> str:
        """The response cache's key of a request: the kind, the base URL, the
        account (:meth:`_cache_account`) and the whole request (every parameter).
        One rule for synchronous calls and chat calls made through the Batch API, so
        that either finds the other's answers."""
        return cache_key(
            {
                "kind": kind,
                "base_url": str(self._aclient.base_url),
                "account": self._cache_account(),
                "request": payload,
            }
        )

    async def _batch_chat(
        self, collector: BatchCollector, payload: dict[str, Any]
    ) -> str:
        """A chat call made while a pass runs through the Batch API, on afnio's loop.

        With the response cache on (:func:`afnio.models.enable_cache`), it is asked
        first, with the key of a synchronous call (:meth:`_response_cache_key`): an
        answer it holds is returned at once, as for a synchronous cache hit (no
        request, not collected, so never batched or paid; no usage, no cost, no
        ``calls``). Otherwise the batch's answer when it is known (mapped back from
        a batch, and accounted there at the batch price) is stored in the cache, so
        a later pass, synchronous or through the Batch API, finds it. Otherwise the
        call is collected for the next batch
        (:class:`~afnio.models.batch.BatchDeferred`).

        Each request counts in the cache's stats once per pass, not once per round
        (every round runs the whole pass again): a hit when the cache answered it,
        a miss when its batch answer was stored (one paid request).

        The lookup waits for the cache (a file is read in its reader thread) without
        yielding to the loop: the calls of a unit of work run concurrently
        (``asyncio.gather``), and the first one collected stops the unit, so a call
        still awaiting its lookup then would be collected late, after its round's
        batch was sent, and paid in a batch of its own.
        """
        cache = get_cache()
        if cache is None:
            return collector.answer(self, payload)
        collector.register(self)  # a saved batch of this client resumes with it
        key = self._response_cache_key("chat", payload)
        counted = _CACHE_COUNTED.setdefault(collector, set())
        found, value = cache.get(key, "chat")  # not counted; see above
        if found:
            if key not in counted:
                counted.add(key)
                cache.hits += 1
            return value
        answer = collector.answer(self, payload)  # BatchDeferred: collected
        if key in counted:  # an identical call of this pass is storing it
            return answer

        async def paid() -> str:  # accounted at map-back (afnio.models.batch)
            return answer

        counted.add(key)
        # a miss (the paid request), kept and written as a synchronous answer is
        return await cache.get_or_call(key, paid, kind="chat")

    def _cache_account(self) -> str:
        """The account of this client's requests, hashed (for the cache key): API
        key, organization, project, and the credential-bearing default headers and
        query parameters (:func:`afnio.models.cache.account_fingerprint`)."""
        sdk = self._aclient
        return account_fingerprint(
            api_key=sdk.api_key,
            organization=sdk.organization,
            project=sdk.project,
            headers=sdk.default_headers,
            query=sdk.default_query,
        )

    @staticmethod
    def _check_model(model: Any) -> str:
        if not isinstance(model, str) or not model:
            raise ValueError(
                "`model` is required: pass the model name, e.g. model='gpt-4o-mini'."
            )
        return model

    async def achat(  # type: ignore[override]
        self, messages: list[dict[str, Any]], *, model: str, **kwargs: Any
    ) -> str:
        """Chat completion: return ``choices[0].message.content``.

        Args:
            messages: ``[{"role": ..., "content": ...}, ...]``.
            model: the model name.
            **kwargs: any Chat Completions parameter (``temperature``, ``seed``,
                ``response_format``, ``max_completion_tokens``, ``reasoning_effort``,
                ``timeout``, ``extra_body``, ...).

        While a pass runs through the Batch API (:mod:`afnio.models.batch`), the
        call is answered from the response cache (if on), else from the batch
        results (then stored in the cache), else collected for the next batch.

        Raises:
            ValueError: for ``n > 1`` or ``stream=True``.
        """
        if kwargs.get("n") not in (None, 1):
            raise ValueError("n > 1 is not supported for chat completions.")
        if kwargs.get("stream"):
            raise ValueError(
                "stream=True is not supported: chat() returns the whole reply."
            )
        payload = {"messages": messages, "model": self._check_model(model), **kwargs}
        collector = active_collector()
        if collector is not None:  # a pass through the Batch API (afnio.models.batch)
            return await run_async(self._batch_chat(collector, payload))

        async def send(body: dict[str, Any]) -> tuple[str, Any]:
            response = await self._aclient.chat.completions.create(**body)
            return response.choices[0].message.content or "", response.usage

        return await run_async(self._request("chat", payload, send))

    async def acomplete(  # type: ignore[override]
        self, prompt: str, *, model: str, **kwargs: Any
    ) -> str:
        """Text completion (the ``/completions`` endpoint): ``choices[0].text``."""
        if kwargs.get("n") not in (None, 1):
            raise ValueError("n > 1 is not supported for completions.")
        if kwargs.get("stream"):
            raise ValueError("stream=True is not supported: complete() returns text.")
        payload = {"prompt": prompt, "model": self._check_model(model), **kwargs}

        async def send(body: dict[str, Any]) -> tuple[str, Any]:
            response = await self._aclient.completions.create(**body)
            return response.choices[0].text, response.usage

        return await run_async(self._request("complete", payload, send))

    async def aembed(  # type: ignore[override]
        self, input: list[str], *, model: str, **kwargs: Any
    ) -> list[list[float]]:
        """Embeddings: one vector per text of ``input``, in order."""
        if isinstance(input, str):
            input = [input]
        payload = {"input": list(input), "model": self._check_model(model), **kwargs}

        async def send(body: dict[str, Any]) -> tuple[list[list[float]], Any]:
            response = await self._aclient.embeddings.create(**body)
            data = sorted(response.data, key=lambda d: d.index)
            return [list(d.embedding) for d in data], response.usage

        return await run_async(self._request("embed", payload, send))

    def chat(  # type: ignore[override]
        self, messages: list[dict[str, Any]], *, model: str, **kwargs: Any
    ) -> str:
        """Synchronous :meth:`achat` (works inside a running event loop too)."""
        return super().chat(messages, model=model, **kwargs)

    def complete(self, prompt: str, *, model: str, **kwargs: Any) -> str:  # type: ignore[override]
        """Synchronous :meth:`acomplete`."""
        return super().complete(prompt, model=model, **kwargs)

    def embed(  # type: ignore[override]
        self, input: list[str], *, model: str, **kwargs: Any
    ) -> list[list[float]]:
        """Synchronous :meth:`aembed`."""
        return super().embed(input, model=model, **kwargs)


_CACHE_COUNTED: weakref.WeakKeyDictionary[BatchCollector, set[str]] = (
    weakref.WeakKeyDictionary()
)
"""The cache keys already counted in the cache's stats during a Batch API pass
(its collector), so that a request counts once per pass, not once per round."""


@register_model_class
class OpenAI(_OpenAIClient):
    """An OpenAI client (use the sync methods, ``chat``/``complete``/``embed``; the
    async ones work too).

    Args:
        api_key: defaults to ``OPENAI_API_KEY``; constructing without any raises
            ``openai.OpenAIError``.
        base_url: any OpenAI-compatible endpoint; defaults to ``OPENAI_BASE_URL`` or
            OpenAI's.
        timeout, max_retries, default_headers, default_query, organization,
            project, websocket_base_url: as for the SDK.
        http_client: an ``httpx.AsyncClient`` (requests run on afnio's loop).
        transport: without ``http_client``, the HTTP client afnio builds:
            ``"aiohttp"`` (the SDK's ``DefaultAioHttpClient`` on one connection pool
            shared by every afnio client of this base URL; the default) or
            ``"httpx"`` (the SDK's default httpx client, one per afnio client); by
            default ``$AFNIO_HTTP_TRANSPORT``, else ``"aiohttp"``. See
            :mod:`afnio.models._transport`.

    As upstream's, it exposes a synchronous SDK client, ``openai.OpenAI``, as
    ``_client`` (built on first access, with the same key, base URL, timeout,
    retries, headers and query; not with ``http_client``, which is async). afnio's
    own requests (``chat`` as well as ``achat``) all go through the async SDK client
    (:attr:`client`) on afnio's event loop, so they run concurrently under
    :func:`afnio.set_max_concurrency` and share the cache and usage accounting.
    """

    @property
    def _client(self) -> openai.OpenAI:
        """The synchronous ``openai.OpenAI`` SDK client (upstream's ``_client``),
        built on first access from this client's settings."""
        with self._sync_lock:
            if self._sync_client is None:
                import openai

                self._sync_client = openai.OpenAI(**self._sync_args)
            return self._sync_client


@register_model_class
class AsyncOpenAI(_OpenAIClient):
    """An OpenAI client meant for ``await achat(...)``/``acomplete``/``aembed`` (the
    sync methods work too). Arguments as for :class:`OpenAI`."""
