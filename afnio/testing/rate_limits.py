"""The simulator's rate limits: OpenAI-style RPM/TPM enforcement, per model.

:class:`afnio.testing.Simulator` (``requests_per_minute=``, ``tokens_per_minute=``,
``rate_limit_window=``; ``python -m afnio.testing serve --rpm N --tpm N
--rate-window S``) enforces them with :class:`ServerRateLimits`. The rules:

* **Per model.** Each ``model`` named by a ``POST`` to ``/v1/chat/completions``,
  ``/v1/completions`` or ``/v1/embeddings`` has its own two token buckets, one for
  requests and one for tokens. Other requests (``GET /v1/models``, the Batch API,
  bodies without a ``model``) are never limited.
* **Token buckets.** A bucket holds at most ``limit`` units (the RPM or TPM) and
  starts full; it refills continuously at ``limit / window`` units per second
  (``window`` is 60 s: a true per-minute limit; tests shrink it). A request needs
  1 request unit and :func:`request_tokens` token units, checked when it arrives
  (before any latency). If both buckets hold enough, both are charged and the
  request is answered normally; otherwise it gets a **429** at once and charges
  nothing.
* **Tokens of a request** (:func:`request_tokens`): the simulator's own token count,
  words: for chat, the words of every message plus 3 per message (the
  ``usage.prompt_tokens`` it would report); for completions the words of the
  prompt; for embeddings the words of the inputs; plus ``max_completion_tokens``
  (else ``max_tokens``) when the request sets it, as OpenAI reserves it.
* **Headers** on every answer to a limited request, 429s included (only the
  configured kinds): ``x-ratelimit-limit-requests`` (the RPM),
  ``x-ratelimit-remaining-requests`` (whole requests left in the bucket after this
  one), ``x-ratelimit-reset-requests`` (the time until the bucket is full again, as
  OpenAI writes durations: ``1s``, ``6m0s``, ``12ms``, ``1.5s``), and the same three
  ``-tokens`` headers for the TPM.
* **A 429** has OpenAI's body, ``{"error": {"message": "Rate limit reached for
  <model> ... on requests per min (RPM): Limit L, Used U, Requested R. Please try
  again in <duration>. ...", "type": "requests"|"tokens", "param": null, "code":
  "rate_limit_exceeded"}}`` (``type`` names the bucket that was short, requests
  first), with ``retry-after`` (whole seconds, rounded up) and ``retry-after-ms``:
  the time until the short bucket(s) hold enough. A request needing more tokens
  than the TPM itself can never pass: it gets a 429 ``Request too large`` with
  ``type: "tokens"`` and ``x-should-retry: false`` (no ``retry-after``).

Example::

    >>> limits = ServerRateLimits(requests_per_minute=2, window=60.0)
    >>> limits.admit("m", 10, now=0.0).status, limits.admit("m", 10, now=0.0).status
    (200, 200)
    >>> rejected = limits.admit("m", 10, now=0.0)
    >>> rejected.status, rejected.error["error"]["type"]
    (429, 'requests')
    >>> dict(rejected.headers)["retry-after"]
    '30'
    >>> format_duration(360.0), format_duration(0.012), format_duration(1.5)
    ('6m0s', '12ms', '1.5s')
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Admission",
    "ServerRateLimits",
    "format_duration",
    "request_tokens",
]


def format_duration(seconds: float) -> str:
    """A duration as OpenAI's rate-limit headers write it (Go's ``Duration``
    format, to the millisecond): ``0s``, ``12ms``, ``1s``, ``1.5s``, ``6m0s``,
    ``1h0m0s``.

    >>> [format_duration(s) for s in (0, 0.0004, 0.012, 1, 17.284, 75, 3600)]
    ['0s', '1ms', '12ms', '1s', '17.284s', '1m15s', '1h0m0s']
    """
    ms = math.ceil(max(0.0, seconds) * 1000 - 1e-6)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):  # multimodal content parts, or a list of inputs
        total = 0
        for item in value:
            if isinstance(item, Mapping):
                total += _words(item.get("text"))
            else:
                total += _words(item)
        return total
    return 0


def request_tokens(body: Mapping[str, Any]) -> int:
    """The tokens a request charges to the TPM bucket: its prompt's words (chat: the
    words of every message plus 3 per message; completions: the prompt's words;
    embeddings: the inputs' words) plus ``max_completion_tokens`` (else
    ``max_tokens``) when set.

    >>> request_tokens({"messages": [{"role": "user", "content": "two words"}],
    ...                 "max_tokens": 5})
    10
    """
    messages = body.get("messages")
    if isinstance(messages, list):
        tokens = sum(
            _words(m.get("content")) + 3 for m in messages if isinstance(m, Mapping)
        )
    elif "prompt" in body:
        tokens = _words(body.get("prompt"))
    else:
        tokens = _words(body.get("input"))
    reserved = body.get("max_completion_tokens")
    if reserved is None:
        reserved = body.get("max_tokens")
    if isinstance(reserved, int) and not isinstance(reserved, bool) and reserved > 0:
        tokens += reserved
    return tokens


class _Bucket:
    """A token bucket: ``limit`` units at most, refilled at ``limit / window`` per
    second, starting full."""

    def __init__(self, limit: int, window: float, now: float) -> None:
        self.limit = limit
        self.rate = limit / window
        self.level = float(limit)
        self.stamp = now

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(
                float(self.limit), self.level + (now - self.stamp) * self.rate
            )
            self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until the bucket holds ``amount`` (0 when it does)."""
        return max(0.0, (amount - self.level) / self.rate)

    def reset(self) -> float:
        """Seconds until the bucket is full again."""
        return max(0.0, (self.limit - self.level) / self.rate)

    def headers(self, kind: str) -> list[tuple[str, str]]:
        return [
            (f"x-ratelimit-limit-{kind}", str(self.limit)),
            (f"x-ratelimit-remaining-{kind}", str(max(0, math.floor(self.level)))),
            (f"x-ratelimit-reset-{kind}", format_duration(self.reset())),
        ]


@dataclass(frozen=True)
class Admission:
    """The decision on one request: ``status`` 200 (admitted and charged) or 429;
    the ``headers`` to send either way; for a 429, the OpenAI ``error`` body."""

    status: int
    headers: tuple[tuple[str, str], ...]
    error: dict[str, Any] | None = None


def _check_limit(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int or None, got {value!r}.")
    return value


class ServerRateLimits:
    """RPM/TPM token buckets per model (the rules are in the module docstring).
    Thread-safe: the simulator's handler threads call :meth:`admit` concurrently.

    Args:
        requests_per_minute: the RPM per model, or ``None`` for no request limit.
        tokens_per_minute: the TPM per model, or ``None`` for no token limit.
        window: the seconds a full bucket takes to refill (60: per minute).

    Raises:
        ValueError: for a limit that is not a positive int, or a ``window`` that is
            not a positive finite number.
    """

    def __init__(
        self,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        window: float = 60.0,
    ) -> None:
        self.requests_per_minute = _check_limit(
            "requests_per_minute", requests_per_minute
        )
        self.tokens_per_minute = _check_limit("tokens_per_minute", tokens_per_minute)
        if (
            isinstance(window, bool)
            or not isinstance(window, (int, float))
            or not math.isfinite(window)
            or window <= 0
        ):
            raise ValueError(
                f"`rate_limit_window` must be a positive number of seconds, got "
                f"{window!r}."
            )
        self.window = float(window)
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[_Bucket | None, _Bucket | None]] = {}

    @property
    def enabled(self) -> bool:
        """Whether any limit is set."""
        return (
            self.requests_per_minute is not None or self.tokens_per_minute is not None
        )

    def _buckets_of(
        self, model: str, now: float
    ) -> tuple[_Bucket | None, _Bucket | None]:
        pair = self._buckets.get(model)
        if pair is None:
            pair = (
                _Bucket(self.requests_per_minute, self.window, now)
                if self.requests_per_minute is not None
                else None,
                _Bucket(self.tokens_per_minute, self.window, now)
                if self.tokens_per_minute is not None
                else None,
            )
            self._buckets[model] = pair
        return pair

    def admit(self, model: str, tokens: int, now: float | None = None) -> Admission:
        """Charge one request of ``tokens`` tokens to ``model``'s buckets, or refuse
        it (a 429 admission, nothing charged)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            requests, token_bucket = self._buckets_of(model, now)
            for bucket in (requests, token_bucket):
                if bucket is not None:
                    bucket.refill(now)
            too_large = token_bucket is not None and tokens > token_bucket.limit
            short: list[tuple[str, _Bucket, float]] = []
            if requests is not None and requests.level < 1:
                short.append(("requests", requests, 1))
            if token_bucket is not None and token_bucket.level < tokens:
                short.append(("tokens", token_bucket, tokens))
            if not short and not too_large:
                if requests is not None:
                    requests.level -= 1
                if token_bucket is not None:
                    token_bucket.level -= tokens
            headers: list[tuple[str, str]] = []
            if requests is not None:
                headers += requests.headers("requests")
            if token_bucket is not None:
                headers += token_bucket.headers("tokens")
            if too_large:
                assert token_bucket is not None
                message = (
                    f"Request too large for {model} in organization org-afnio-sim on "
                    f"tokens per min (TPM): Limit {token_bucket.limit}, Requested "
                    f"{tokens}. The input or output tokens must be reduced in order "
                    "to run successfully (simulated by afnio.testing)."
                )
                headers.append(("x-should-retry", "false"))
                return Admission(429, tuple(headers), _error(message, "tokens"))
            if not short:
                return Admission(200, tuple(headers))
            wait = max(bucket.wait_for(need) for _, bucket, need in short)
            kind, bucket, need = short[0]
            unit = "RPM" if kind == "requests" else "TPM"
            used = bucket.limit - max(0, math.floor(bucket.level))
            message = (
                f"Rate limit reached for {model} in organization org-afnio-sim on "
                f"{kind} per min ({unit}): Limit {bucket.limit}, Used {used}, "
                f"Requested {int(need)}. Please try again in {format_duration(wait)}. "
                "Visit https://platform.openai.com/account/rate-limits to learn "
                "more (simulated by afnio.testing)."
            )
            wait_ms = max(1, math.ceil(wait * 1000))
            headers += [
                ("retry-after", str(max(1, math.ceil(wait)))),
                ("retry-after-ms", str(wait_ms)),
            ]
            return Admission(429, tuple(headers), _error(message, kind))

    def reset(self) -> None:
        """Refill every bucket (forget all models)."""
        with self._lock:
            self._buckets.clear()


def _error(message: str, kind: str) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": kind,
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
