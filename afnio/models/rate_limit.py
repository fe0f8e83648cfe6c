"""Provider rate limits: adaptive concurrency, header-driven pacing, explicit budgets.

Every LM request of afnio's OpenAI clients (:mod:`afnio.models.openai`) goes through
one limiter per (base URL, model), on afnio's event loop, before it takes one of the
process-wide request slots (:func:`afnio.set_max_concurrency`):

* **429s are absorbed.** A ``429 rate_limit_exceeded`` is retried by afnio itself
  (not by the openai SDK, whose ``max_retries`` still applies to 408/409/5xx,
  timeouts and connection errors, unchanged), after the server's delay:
  ``retry-after-ms``, else ``retry-after`` (seconds, or an HTTP date), else the
  ``x-ratelimit-reset-*`` of the exhausted limit, else an exponential backoff
  (0.5 s doubling to 8 s). Meanwhile every request to that (base URL, model) waits
  too. A request gives up, raising the ``openai.RateLimitError``, only when the time
  since its first 429 plus the next delay would exceed :data:`MAX_RATE_LIMIT_WAIT`
  (600 s; :func:`set_max_rate_limit_wait`), when the server says
  ``x-should-retry: false`` (a request larger than the limit), or when the error is
  ``insufficient_quota`` (billing, not a rate). A retried 429 is never billed: usage
  and cost count each answered request once.
* **Adaptive concurrency (AIMD).** Requests in flight per (base URL, model) are
  bounded by a window that starts at the global bound; a 429 halves it
  (multiplicative decrease, at most once per round of requests; never below
  ``rate x latency + 1`` once the server's rate is known from its headers, since
  pacing keeps to that rate), each answered request adds ``1/window`` (additive
  increase: +1 per window of answers) until it reaches the global bound again.
* **Header-driven pacing.** ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``
  (which the SDK never reads; afnio reads them from every response) describe the
  server's token buckets: afnio keeps a copy of each (the remaining units, the refill
  rate ``(limit - remaining) / reset``), charges it one request and the request's
  estimated tokens (:func:`estimate_tokens`) before sending, and waits when it is
  empty, so that it sends at the server's rate instead of collecting 429s. (A copy
  asking for a wait longer than :data:`MAX_RATE_LIMIT_WAIT` is ignored: the request
  is sent and the server's answer decides.)
* **Explicit budgets.** :func:`set_rate_limit` sets ``requests_per_minute`` and/or
  ``tokens_per_minute`` for a model (at one base URL, or any): token buckets of that
  size, starting full, refilling continuously, that afnio never exceeds, whatever
  the server says. A token budget is charged the estimate before the request and the
  excess of the answer's ``usage.total_tokens`` over it afterwards (never refunded).

:func:`get_rate_limit_stats` gives the counters (answered requests, 429s received,
retries, the current window).

Example::

    >>> import afnio
    >>> afnio.set_rate_limit("gpt-4o-mini", requests_per_minute=500)
    >>> afnio.set_rate_limit("gpt-4o-mini")  # no budget again
    >>> parse_duration("6m0s"), parse_duration("12ms"), parse_duration("1.5s")
    (360.0, 0.012, 1.5)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import email.utils
import math
import os
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from afnio._runtime import _Limiter, get_max_concurrency, request_slot

__all__ = [
    "MAX_RATE_LIMIT_WAIT",
    "RateLimitHeaders",
    "RateLimitStats",
    "estimate_tokens",
    "get_rate_limit_stats",
    "parse_duration",
    "parse_rate_limit_headers",
    "parse_retry_after",
    "reset_rate_limit_stats",
    "send_limited",
    "set_max_rate_limit_wait",
    "set_rate_limit",
]

T = TypeVar("T")

MAX_RATE_LIMIT_WAIT = 600.0
"""The default of :func:`set_max_rate_limit_wait`: seconds a request may spend, from
its first 429, waiting to be retried before the 429 is raised."""

MINUTE = 60.0
"""The seconds of a "minute" of the explicit budgets (tests shrink it)."""

_DECREASE = 0.5  # multiplicative decrease of the window on a 429
_BACKOFF_START, _BACKOFF_MAX = 0.5, 8.0  # when a 429 names no delay

# -- header parsing -------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|us|µs|ns|m|s)")
_UNIT_SECONDS = {
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,
    "ns": 1e-9,
}


def parse_duration(value: str | None) -> float | None:
    """Seconds of a rate-limit reset duration as OpenAI writes them (Go's format:
    ``1s``, ``6m0s``, ``12ms``, ``1h2m3.5s``), or a bare number of seconds; ``None``
    when absent or unreadable.

    >>> [parse_duration(v) for v in ("1s", "6m0s", "12ms", "0.5", "1h0m0s", "soon")]
    [1.0, 360.0, 0.012, 0.5, 3600.0, None]
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pos, seconds = 0, 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                return None
            seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            pos = match.end()
        if pos != len(text) or pos == 0:
            return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def _header(headers: Mapping[str, str] | Any, name: str) -> str | None:
    get = getattr(headers, "get", None)
    if get is None:
        return None
    value = get(name)
    if value is None and isinstance(headers, Mapping):  # a plain dict, any case
        lower = name.lower()
        for key, item in headers.items():
            if isinstance(key, str) and key.lower() == lower:
                return str(item)
    return None if value is None else str(value)


def parse_retry_after(
    headers: Mapping[str, str] | Any, now: float | None = None
) -> float | None:
    """The server's delay in seconds: ``retry-after-ms``, else ``retry-after`` as
    seconds (floats allowed) or as an HTTP date (relative to ``now``, a Unix time,
    by default the current time); ``None`` when absent or unreadable. Never negative.

    >>> parse_retry_after({"retry-after-ms": "250", "retry-after": "9"})
    0.25
    >>> parse_retry_after({"retry-after": "1.5"})
    1.5
    >>> parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:05 GMT"},
    ...                   now=1445412480.0)
    5.0
    """
    ms = _header(headers, "retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000
            if math.isfinite(value):
                return max(0.0, value)
        except ValueError:
            pass
    text = _header(headers, "retry-after")
    if text is None:
        return None
    try:
        value = float(text)
        return max(0.0, value) if math.isfinite(value) else None
    except ValueError:
        pass
    try:
        date = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if date is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, date.timestamp() - current)


@dataclass(frozen=True)
class RateLimitHeaders:
    """The rate-limit headers of one response (``None`` where absent or unreadable):
    ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` (resets in seconds),
    the delay of ``retry-after-ms``/``retry-after`` (seconds), and
    ``x-should-retry`` (``True``/``False``)."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens: float | None = None
    retry_after: float | None = None
    should_retry: bool | None = None


def _int_header(headers: Any, name: str) -> int | None:
    value = _header(headers, name)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if math.isfinite(number) and number >= 0 else None


def parse_rate_limit_headers(headers: Mapping[str, str] | Any) -> RateLimitHeaders:
    """Read a response's rate-limit headers (any mapping, ``httpx.Headers`` too).

    >>> h = parse_rate_limit_headers({"x-ratelimit-limit-requests": "60",
    ...     "x-ratelimit-remaining-requests": "59", "x-ratelimit-reset-requests": "1s",
    ...     "retry-after": "2"})
    >>> h.limit_requests, h.remaining_requests, h.reset_requests, h.retry_after
    (60, 59, 1.0, 2.0)
    """
    flag = _header(headers, "x-should-retry")
    return RateLimitHeaders(
        limit_requests=_int_header(headers, "x-ratelimit-limit-requests"),
        remaining_requests=_int_header(headers, "x-ratelimit-remaining-requests"),
        reset_requests=parse_duration(_header(headers, "x-ratelimit-reset-requests")),
        limit_tokens=_int_header(headers, "x-ratelimit-limit-tokens"),
        remaining_tokens=_int_header(headers, "x-ratelimit-remaining-tokens"),
        reset_tokens=parse_duration(_header(headers, "x-ratelimit-reset-tokens")),
        retry_after=parse_retry_after(headers),
        should_retry=None if flag is None else flag.strip().lower() == "true",
    )


# -- token estimates -----------------------------------------------------------------


def _text_units(value: Any) -> int:
    """Tokens of a text by a rough upper estimate: the larger of its words (bounded
    above by its separators + 1, counted without splitting) and its characters / 4."""
    if isinstance(value, str):
        if not value:
            return 0
        separators = value.count(" ") + value.count("\n") + value.count("\t")
        return max(separators + 1, math.ceil(len(value) / 4))
    if isinstance(value, list):
        total = 0
        for item in value:
            if isinstance(item, Mapping):
                total += _text_units(item.get("text"))
            else:
                total += _text_units(item)
        return total
    return 0


def estimate_tokens(payload: Mapping[str, Any]) -> int:
    """The tokens a request is charged before it is sent: each text's larger of its
    words (at most its spaces, tabs and newlines + 1) and its characters / 4 (an upper
    estimate of common tokenizers, and of the simulator's word count), plus 3 per
    chat message, plus ``max_completion_tokens`` (else ``max_tokens``) when set.

    >>> estimate_tokens({"messages": [{"role": "user", "content": "Hello there"}]})
    6
    """
    messages = payload.get("messages")
    if isinstance(messages, list):
        tokens = sum(
            _text_units(m.get("content")) + 3
            for m in messages
            if isinstance(m, Mapping)
        )
    elif "prompt" in payload:
        tokens = _text_units(payload.get("prompt"))
    else:
        tokens = _text_units(payload.get("input"))
    reserved = payload.get("max_completion_tokens")
    if reserved is None:
        reserved = payload.get("max_tokens")
    if isinstance(reserved, int) and not isinstance(reserved, bool) and reserved > 0:
        tokens += reserved
    return max(1, tokens)


# -- buckets -------------------------------------------------------------------------


class _Bucket:
    """A token bucket on the monotonic clock: at most ``capacity`` units, refilled at
    ``rate`` units per second; its level may go below zero (a charge after the fact)."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        self.capacity = capacity
        self.rate = rate
        self.level = capacity
        self.stamp = now

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until the bucket holds ``amount`` (capped at its capacity)."""
        need = min(amount, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate


class _Mirror:
    """afnio's copy of one of the server's buckets, learned from ``x-ratelimit-*``.

    ``sent`` counts the units afnio has sent; a response reports the server's
    remaining units when that request arrived, so the level now is ``remaining +
    rate x (now - sent_at) - (units sent after it)``, not counting the units of the
    requests refused since (``refunds``: their position in ``sent``, their units).
    Only the response of the latest request sent so far updates it (``latest``): an
    older one, answered late, knows less."""

    __slots__ = ("bucket", "latest", "refunds", "sent")

    def __init__(self) -> None:
        self.bucket: _Bucket | None = None
        self.sent = 0.0
        self.latest = -1.0
        self.refunds: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=4096
        )

    def refund(self, mark: float, units: float) -> None:
        """A request sent at position ``mark`` was refused: it charged nothing."""
        if units:
            self.refunds.append((mark, units))

    def learn(
        self,
        limit: int | None,
        remaining: int | None,
        reset: float | None,
        sent_at: float,
        mark: float,
        own: float,
        now: float,
    ) -> None:
        if limit is None or remaining is None or limit <= 0 or mark < self.latest:
            return
        self.latest = mark
        bucket = self.bucket
        rate = bucket.rate if bucket is not None else limit / 60.0
        used = limit - remaining
        # the remaining count is rounded down: (used - 1) is a lower bound of the
        # units the bucket misses, so the rate is never overestimated
        if reset is not None and reset > 0 and used >= max(2, limit / 10):
            rate = (used - 1) / reset
        after = self.sent - mark - own
        after -= sum(units for at, units in self.refunds if at > mark)
        level = min(float(limit), remaining + rate * max(0.0, now - sent_at) - after)
        level -= 1.0  # a margin for requests that arrived out of order
        if bucket is None:
            bucket = self.bucket = _Bucket(float(limit), rate, now)
        bucket.capacity, bucket.rate = float(limit), rate
        bucket.level, bucket.stamp = level, now


@dataclass(frozen=True)
class RateLimitStats:
    """Counters of one (base URL, model), or summed over several, since the limiter
    was created or :func:`reset_rate_limit_stats`.

    Attributes:
        requests: requests answered (each counted once, however many 429s it met).
        rate_limited: 429 rate-limit answers received.
        retries: 429s retried by afnio.
        gave_up: 429s raised (see :data:`MAX_RATE_LIMIT_WAIT`).
        waited_s: seconds requests spent waiting for pacing, budgets and 429 delays.
        concurrency: the current window of requests in flight (the lowest of the
            summed limiters).
        limit_requests, limit_tokens: the server's last ``x-ratelimit-limit-*``.
    """

    requests: int = 0
    rate_limited: int = 0
    retries: int = 0
    gave_up: int = 0
    waited_s: float = 0.0
    concurrency: int = 0
    limit_requests: int | None = None
    limit_tokens: int | None = None


# -- budgets -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Budget:
    requests_per_minute: float | None
    tokens_per_minute: float | None


_config_lock = threading.Lock()
_budgets: dict[tuple[str | None, str], _Budget] = {}
_budget_version = 0
_max_wait = MAX_RATE_LIMIT_WAIT


def _normalise_url(base_url: Any) -> str:
    return str(base_url).rstrip("/")


def _check_budget(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"`{name}` must be a positive number or None, got "
            f"{type(value).__name__}: {value!r}."
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"`{name}` must be a positive number (per minute) or None to remove the "
            f"budget, got {value!r}."
        )
    return float(value)


def set_rate_limit(
    model: str,
    *,
    requests_per_minute: float | None = None,
    tokens_per_minute: float | None = None,
    base_url: str | None = None,
) -> None:
    """Set an explicit budget for ``model``: afnio never sends it more than
    ``requests_per_minute`` requests or ``tokens_per_minute`` tokens (estimated
    before the request, corrected by the answer's usage) per minute, whatever the
    server allows. Token buckets: the full budget is available at once, then refills
    continuously. Both ``None`` removes the budget.

    Args:
        model: the model name, as passed to ``chat(..., model=...)``.
        requests_per_minute: a positive number, or ``None`` for no request budget.
        tokens_per_minute: a positive number, or ``None`` for no token budget.
        base_url: the endpoint it applies to (e.g. ``"https://api.openai.com/v1"``);
            ``None`` (the default): every endpoint without a budget of its own.

    Raises:
        TypeError, ValueError: for a bad argument, naming it.

    Example::

        >>> import afnio
        >>> afnio.set_rate_limit("gpt-4o", requests_per_minute=500,
        ...                      tokens_per_minute=30_000)
        >>> afnio.set_rate_limit("gpt-4o")
    """
    if not isinstance(model, str) or not model:
        raise ValueError(
            "`model` must be a non-empty model name, e.g. 'gpt-4o-mini', got "
            f"{model!r}."
        )
    rpm = _check_budget("requests_per_minute", requests_per_minute)
    tpm = _check_budget("tokens_per_minute", tokens_per_minute)
    if base_url is not None and not isinstance(base_url, str):
        raise TypeError(
            f"`base_url` must be a str or None, got {type(base_url).__name__}."
        )
    key = (None if base_url is None else _normalise_url(base_url), model)
    global _budget_version
    with _config_lock:
        if rpm is None and tpm is None:
            _budgets.pop(key, None)
        else:
            _budgets[key] = _Budget(rpm, tpm)
        _budget_version += 1


def set_max_rate_limit_wait(seconds: float) -> None:
    """Set how long a request may keep being retried after its first 429 (default
    :data:`MAX_RATE_LIMIT_WAIT`, 600 s); past it the ``openai.RateLimitError`` is
    raised.

    Raises:
        ValueError: unless ``seconds`` is a number >= 0.
    """
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not seconds >= 0
        or not math.isfinite(seconds)
    ):
        raise ValueError(f"`seconds` must be a finite number >= 0, got {seconds!r}.")
    global _max_wait
    _max_wait = float(seconds)


def _budget_for(url: str, model: str) -> _Budget | None:
    with _config_lock:
        return _budgets.get((url, model)) or _budgets.get((None, model))


# -- the limiter of one (base URL, model) --------------------------------------------


class _KeyLimiter:
    """The limiter of one (base URL, model); used only on afnio's loop."""

    def __init__(self, url: str, model: str) -> None:
        self.url = url
        self.model = model
        self.window: float | None = None  # None: the global bound
        self.slots = _Limiter(get_max_concurrency())
        self.pace_lock = asyncio.Lock()
        self.changed = asyncio.Event()  # set when a response updates the buckets
        self.blocked_until = 0.0
        self.last_decrease = -math.inf
        self.backoff = 0  # consecutive 429s without a delay
        self.latency: float | None = None  # moving average of answered requests
        self.requests_mirror = _Mirror()
        self.tokens_mirror = _Mirror()
        self.budget_version = -1
        self.budget_requests: _Bucket | None = None
        self.budget_tokens: _Bucket | None = None
        self.reset_stats()

    def reset_stats(self) -> None:
        self.answered = 0
        self.rate_limited = 0
        self.retries = 0
        self.gave_up = 0
        self.waited = 0.0
        self.limit_requests: int | None = None
        self.limit_tokens: int | None = None

    # the window (AIMD) ---------------------------------------------------------------

    def _apply_window(self) -> None:
        bound = get_max_concurrency()
        limit = bound if self.window is None else max(1, min(bound, int(self.window)))
        if limit != self.slots.limit:
            self.slots.set_limit(limit)

    def on_success(self, seconds: float) -> None:
        self.latency = (
            seconds if self.latency is None else (0.8 * self.latency + 0.2 * seconds)
        )
        if self.window is not None:
            self.window += 1.0 / self.window
            if self.window >= get_max_concurrency():
                self.window = None
        self.backoff = 0

    def on_rate_limited(self, sent_at: float, now: float) -> None:
        if sent_at < self.last_decrease:
            return  # sent before the last decrease: that round is already counted
        current = self.slots.limit if self.window is None else self.window
        base = min(current, max(1, self.slots.active))
        # never below what the server's known rate needs at the observed latency
        # (pacing, not the window, keeps to that rate)
        floor = 1.0
        bucket = self.requests_mirror.bucket
        if bucket is not None and self.latency is not None:
            floor = max(1.0, math.ceil(bucket.rate * self.latency) + 1.0)
        self.window = max(floor, base * _DECREASE)
        self.last_decrease = now
        self._apply_window()

    # budgets -------------------------------------------------------------------------

    def _refresh_budget(self, now: float) -> None:
        if self.budget_version == _budget_version:
            return
        self.budget_version = _budget_version
        budget = _budget_for(self.url, self.model)
        rpm = budget.requests_per_minute if budget else None
        tpm = budget.tokens_per_minute if budget else None
        self.budget_requests = _rebuild(self.budget_requests, rpm, now)
        self.budget_tokens = _rebuild(self.budget_tokens, tpm, now)

    def _wait(self, tokens: float, now: float) -> float:
        wait = self.blocked_until - now
        for bucket, amount in (
            (self.budget_requests, 1.0),
            (self.budget_tokens, tokens),
        ):
            if bucket is not None:
                bucket.refill(now)
                wait = max(wait, bucket.wait_for(amount))
        mirrored = 0.0
        for bucket, amount in (
            (self.requests_mirror.bucket, 1.0),
            (self.tokens_mirror.bucket, tokens),
        ):
            if bucket is not None:
                bucket.refill(now)
                mirrored = max(mirrored, bucket.wait_for(amount))
        # a copy that asks for more than a 429 may cost is not trusted: the request
        # is sent, and the server's answer decides (MAX_RATE_LIMIT_WAIT)
        return max(wait, mirrored) if mirrored <= _max_wait else wait

    def _idle(self, now: float) -> bool:
        return (
            self.blocked_until <= now
            and self.budget_requests is None
            and self.budget_tokens is None
            and self.requests_mirror.bucket is None
            and self.tokens_mirror.bucket is None
        )

    async def pace(self, payload: Mapping[str, Any]) -> float:
        """Wait until the budgets, the server's buckets and any 429 delay let one
        request through, then charge it; returns the tokens charged."""
        now = time.monotonic()
        self._refresh_budget(now)
        # estimated for every request: the copy of a token bucket learned later
        # must know what was sent before
        tokens = float(estimate_tokens(payload))
        if not self.pace_lock.locked() and self._idle(now):
            return tokens
        async with self.pace_lock:  # FIFO: one request at a time waits for units
            while True:
                now = time.monotonic()
                wait = self._wait(tokens, now)
                if wait <= 0:
                    break
                # sleep until the wait is over, or a response updates the state
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), wait)
                self.waited += time.monotonic() - now
            for bucket, amount in (
                (self.budget_requests, 1.0),
                (self.budget_tokens, tokens),
                (self.requests_mirror.bucket, 1.0),
                (self.tokens_mirror.bucket, tokens),
            ):
                if bucket is not None:
                    bucket.level -= amount
            return tokens

    def learn(
        self,
        headers: RateLimitHeaders,
        sent_at: float,
        marks: tuple[float, float],
        tokens: float,
    ) -> None:
        """Update the copies of the server's buckets from a response's headers."""
        now = time.monotonic()
        self.changed.set()
        if headers.limit_requests is not None:
            self.limit_requests = headers.limit_requests
        if headers.limit_tokens is not None:
            self.limit_tokens = headers.limit_tokens
        self.requests_mirror.learn(
            headers.limit_requests,
            headers.remaining_requests,
            headers.reset_requests,
            sent_at,
            marks[0],
            1.0,
            now,
        )
        self.tokens_mirror.learn(
            headers.limit_tokens,
            headers.remaining_tokens,
            headers.reset_tokens,
            sent_at,
            marks[1],
            tokens,
            now,
        )

    def delay_after_429(self, headers: RateLimitHeaders, error_type: Any) -> float:
        """The delay before retrying: the server's, else the reset of the exhausted
        limit, else an exponential backoff."""
        if headers.retry_after is not None:
            self.backoff = 0
            return headers.retry_after
        reset = (
            headers.reset_tokens if error_type == "tokens" else headers.reset_requests
        )
        if reset is not None:
            self.backoff = 0
            return reset
        delay = min(_BACKOFF_START * 2.0**self.backoff, _BACKOFF_MAX)
        self.backoff += 1
        return delay * (1 - 0.25 * random.random())

    def stats(self) -> RateLimitStats:
        return RateLimitStats(
            requests=self.answered,
            rate_limited=self.rate_limited,
            retries=self.retries,
            gave_up=self.gave_up,
            waited_s=self.waited,
            concurrency=self.slots.limit,
            limit_requests=self.limit_requests,
            limit_tokens=self.limit_tokens,
        )


def _rebuild(
    bucket: _Bucket | None, per_minute: float | None, now: float
) -> _Bucket | None:
    if per_minute is None:
        return None
    rate = per_minute / MINUTE
    if bucket is None:
        return _Bucket(per_minute, rate, now)
    bucket.refill(now)
    bucket.capacity, bucket.rate = per_minute, rate
    bucket.level = min(bucket.level, per_minute)
    return bucket


_limiters: dict[tuple[str, str], _KeyLimiter] = {}


def _after_fork() -> None:
    _limiters.clear()  # their asyncio objects belonged to the parent's loop


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _limiter(url: str, model: str) -> _KeyLimiter:
    key = (url, model)
    limiter = _limiters.get(key)
    if limiter is None:
        limiter = _limiters[key] = _KeyLimiter(url, model)
    return limiter


def get_rate_limit_stats(
    model: str | None = None, base_url: str | None = None
) -> RateLimitStats:
    """The limiter counters of ``model`` at ``base_url``, summed over every model
    and/or endpoint left ``None`` (see :class:`RateLimitStats`)."""
    url = None if base_url is None else _normalise_url(base_url)
    chosen = [
        limiter
        for (u, m), limiter in list(_limiters.items())
        if (model is None or m == model) and (url is None or u == url)
    ]
    if not chosen:
        return RateLimitStats()
    parts = [limiter.stats() for limiter in chosen]
    return RateLimitStats(
        requests=sum(p.requests for p in parts),
        rate_limited=sum(p.rate_limited for p in parts),
        retries=sum(p.retries for p in parts),
        gave_up=sum(p.gave_up for p in parts),
        waited_s=sum(p.waited_s for p in parts),
        concurrency=min(p.concurrency for p in parts),
        limit_requests=parts[-1].limit_requests,
        limit_tokens=parts[-1].limit_tokens,
    )


def reset_rate_limit_stats() -> None:
    """Zero the counters of every limiter (their learned state stays)."""
    for limiter in list(_limiters.values()):
        limiter.reset_stats()


# -- the SDK hook and the request path -----------------------------------------------


class _Capture:
    """Where the SDK subclass leaves the headers of the response being processed."""

    __slots__ = ("headers",)

    def __init__(self) -> None:
        self.headers: Any = None


_CAPTURE: contextvars.ContextVar[_Capture | None] = contextvars.ContextVar(
    "afnio_rate_limit_capture", default=None
)

_sdk_class: type | None = None


def sdk_client_class() -> type:
    """``openai.AsyncOpenAI`` with two changes that apply only to requests sent by
    :func:`send_limited`: a 429 is handed to afnio instead of being retried by the
    SDK, and each response's headers are kept for the limiter (the SDK reads no
    ``x-ratelimit-*``). Everything else is the SDK's own behaviour."""
    global _sdk_class
    if _sdk_class is None:
        import openai

        class AsyncOpenAI(openai.AsyncOpenAI):
            def _should_retry(self, response: Any) -> bool:
                if response.status_code == 429 and _CAPTURE.get() is not None:
                    return False  # afnio's limiter retries it (send_limited)
                return super()._should_retry(response)

            async def _process_response(self, **kwargs: Any) -> Any:
                capture = _CAPTURE.get()
                if capture is not None:
                    response = kwargs.get("response")
                    capture.headers = getattr(response, "headers", None)
                return await super()._process_response(**kwargs)

        AsyncOpenAI.__module__ = __name__
        AsyncOpenAI.__qualname__ = "AsyncOpenAI"
        _sdk_class = AsyncOpenAI
    return _sdk_class


def _is_rate_limit(error: BaseException) -> bool:
    return getattr(error, "status_code", None) == 429 and hasattr(error, "response")


def _usage_total(usage: Any) -> float | None:
    if usage is None:
        return None
    total = (
        usage.get("total_tokens")
        if isinstance(usage, Mapping)
        else getattr(usage, "total_tokens", None)
    )
    return float(total) if isinstance(total, (int, float)) else None


async def send_limited(
    base_url: Any,
    payload: Mapping[str, Any],
    send: Callable[[Any], Awaitable[T]],
) -> T:
    """Send one request under its (base URL, model) limiter: wait for a window slot,
    for pacing and budgets, then for one of the global request slots; retry it on a
    429 (see the module docstring). Runs on afnio's loop.

    Returns:
        what ``send(payload)`` returns, from the one attempt that was answered.

    Raises:
        whatever ``send`` raises other than a retried 429, and the last 429 when
        afnio gives up on it.
    """
    model = payload.get("model")
    key = _limiter(_normalise_url(base_url), model if isinstance(model, str) else "")
    key._apply_window()
    first_429: float | None = None
    attempts = 0  # this request's 429s
    await key.slots.acquire()
    try:
        while True:
            tokens = await key.pace(payload)
            marks = (key.requests_mirror.sent, key.tokens_mirror.sent)
            capture = _Capture()
            async with request_slot():
                sent_at = time.monotonic()
                key.requests_mirror.sent += 1.0
                key.tokens_mirror.sent += tokens
                reset = _CAPTURE.set(capture)
                try:
                    result = await send(payload)
                except Exception as error:
                    if not _is_rate_limit(error):
                        raise
                    rate_error = error
                else:
                    rate_error = None
                finally:
                    _CAPTURE.reset(reset)
            now = time.monotonic()
            if rate_error is None:
                if capture.headers is not None and _has_limits(capture.headers):
                    headers = parse_rate_limit_headers(capture.headers)
                    key.learn(headers, sent_at, marks, tokens)
                key.on_success(now - sent_at)
                key.answered += 1
                _charge_usage(key, result, tokens)
                return result
            key.rate_limited += 1
            response = getattr(rate_error, "response", None)
            headers = parse_rate_limit_headers(getattr(response, "headers", {}) or {})
            key.learn(headers, sent_at, marks, tokens)
            key.requests_mirror.refund(marks[0], 1.0)
            key.tokens_mirror.refund(marks[1], tokens)
            key.on_rate_limited(sent_at, now)
            if first_429 is None:
                first_429 = now
            attempts += 1
            delay = key.delay_after_429(
                headers, getattr(rate_error, "type", None) or _error_type(rate_error)
            )
            if attempts > 1:  # never hammer a server that keeps saying "now"
                delay = max(delay, min(0.1 * 2.0 ** (attempts - 2), _BACKOFF_MAX))
            if (
                getattr(rate_error, "code", None) == "insufficient_quota"
                or headers.should_retry is False
                or (now - first_429) + delay > _max_wait
            ):
                key.gave_up += 1
                raise rate_error
            key.blocked_until = max(key.blocked_until, now + delay)
            key.changed.set()
            key.retries += 1
    finally:
        key.slots.release()


def _has_limits(headers: Any) -> bool:
    return (
        _header(headers, "x-ratelimit-limit-requests") is not None
        or _header(headers, "x-ratelimit-limit-tokens") is not None
    )


def _error_type(error: BaseException) -> Any:
    body = getattr(error, "body", None)
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping):
            return inner.get("type")
    return None


def _charge_usage(key: _KeyLimiter, result: Any, estimate: float) -> None:
    """Charge a token budget the excess of the answer's usage over the estimate."""
    if key.budget_tokens is None or not isinstance(result, tuple) or len(result) != 2:
        return
    total = _usage_total(result[1])
    if total is not None and total > estimate:
        key.budget_tokens.level -= total - estimate
