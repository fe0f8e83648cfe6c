"""The simulator's RPM/TPM limits (issue 21, item 3): OpenAI's headers, 429 bodies
and retry delays, per-model token buckets, counters, and the CLI flags. Bucket
arithmetic is checked with an explicit clock; the HTTP tests only count."""

from __future__ import annotations

import httpx
import pytest

from afnio.testing import Simulator
from afnio.testing.__main__ import _parser
from afnio.testing.rate_limits import ServerRateLimits, format_duration, request_tokens

CHAT = {"model": "m", "messages": [{"role": "user", "content": "two words"}]}
LIMIT_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
)


def test_durations_are_written_as_openai_writes_them() -> None:
    assert format_duration(0) == "0s"
    assert format_duration(0.012) == "12ms"
    assert format_duration(1.0) == "1s"
    assert format_duration(1.5) == "1.5s"
    assert format_duration(360.0) == "6m0s"
    assert format_duration(3723.25) == "1h2m3.25s"


def test_request_tokens_are_the_prompt_words_plus_the_reserved_completion() -> None:
    assert request_tokens(CHAT) == 2 + 3
    assert request_tokens({**CHAT, "max_completion_tokens": 10}) == 15
    assert request_tokens({"model": "m", "prompt": "one two three"}) == 3
    assert request_tokens({"model": "m", "input": ["a b", "c"]}) == 3


def test_a_bucket_refuses_when_empty_and_refills_over_the_window() -> None:
    limits = ServerRateLimits(requests_per_minute=2, window=10.0)  # 0.2 per second
    assert [limits.admit("m", 1, now=0.0).status for _ in range(3)] == [200, 200, 429]
    refused = limits.admit("m", 1, now=0.0)
    headers = dict(refused.headers)
    assert headers["retry-after-ms"] == "5000" and headers["retry-after"] == "5"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "10s"
    assert limits.admit("m", 1, now=4.9).status == 429  # not yet a whole request
    admitted = limits.admit("m", 1, now=5.0)
    assert admitted.status == 200
    assert dict(admitted.headers)["x-ratelimit-remaining-requests"] == "0"
    assert limits.admit("other-model", 1, now=5.0).status == 200  # per model


def test_a_token_limit_refuses_by_tokens_and_a_too_large_request_is_final() -> None:
    limits = ServerRateLimits(tokens_per_minute=100, window=60.0)
    assert limits.admit("m", 60, now=0.0).status == 200
    short = limits.admit("m", 60, now=0.0)
    assert short.status == 429 and short.error is not None
    assert short.error["error"]["type"] == "tokens"
    assert dict(short.headers)["retry-after-ms"] == "12000"  # 20 tokens at 100/min
    too_large = limits.admit("m", 101, now=100.0)
    assert too_large.status == 429
    assert dict(too_large.headers)["x-should-retry"] == "false"
    assert "retry-after" not in dict(too_large.headers)
    assert too_large.error is not None
    assert "Request too large" in too_large.error["error"]["message"]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"requests_per_minute": 0}, "requests_per_minute"),
        ({"tokens_per_minute": 1.5}, "tokens_per_minute"),
        ({"requests_per_minute": 1, "rate_limit_window": 0}, "rate_limit_window"),
    ],
)
def test_bad_limits_are_refused_naming_the_argument(
    kwargs: dict[str, object], name: str
) -> None:
    with pytest.raises(ValueError, match=name):
        Simulator(**kwargs)  # type: ignore[arg-type]


def test_the_simulator_sends_openai_headers_and_429_bodies_and_counts_them() -> None:
    with (
        Simulator(requests_per_minute=3, rate_limit_window=600.0) as sim,
        httpx.Client(base_url=sim.base_url, timeout=10) as http,
    ):
        answers = [http.post("/chat/completions", json=CHAT) for _ in range(5)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
        for answer in answers:  # on every answer, 429s included
            assert all(name in answer.headers for name in LIMIT_HEADERS)
            assert answer.headers["x-ratelimit-limit-requests"] == "3"
        assert [a.headers["x-ratelimit-remaining-requests"] for a in answers[:3]] == [
            "2",
            "1",
            "0",
        ]
        refused = answers[3]
        assert refused.json()["error"]["type"] == "requests"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.json()["error"]["param"] is None
        assert "Rate limit reached for m" in refused.json()["error"]["message"]
        assert int(refused.headers["retry-after"]) >= 1
        assert float(refused.headers["retry-after-ms"]) > 0
        stats = sim.stats
        assert (stats.calls, stats.served, stats.rate_limited) == (5, 3, 2)
        assert stats.prompt_tokens == 3 * 5  # refused requests are not answered
        # another model has its own buckets; GET /models is never limited
        other = http.post("/chat/completions", json={**CHAT, "model": "other"})
        assert other.status_code == 200
        models = http.get("/models")
        assert models.status_code == 200
        assert "x-ratelimit-limit-requests" not in models.headers


def test_without_limits_no_rate_limit_header_is_sent() -> None:
    # recorded cassettes stay as they were
    with (
        Simulator() as sim,
        httpx.Client(base_url=sim.base_url, timeout=10) as http,
    ):
        answer = http.post("/chat/completions", json=CHAT)
        assert answer.status_code == 200
        assert not [h for h in answer.headers if h.startswith("x-ratelimit")]
        assert sim.stats.rate_limited == 0 and sim.stats.served == 1


def test_token_limits_send_the_token_headers() -> None:
    with (
        Simulator(tokens_per_minute=12, rate_limit_window=600.0) as sim,
        httpx.Client(base_url=sim.base_url, timeout=10) as http,
    ):
        first = http.post("/chat/completions", json=CHAT)  # 5 tokens
        second = http.post("/chat/completions", json=CHAT)
        third = http.post("/chat/completions", json=CHAT)
        assert [first.status_code, second.status_code, third.status_code] == [
            200,
            200,
            429,
        ]
        assert first.headers["x-ratelimit-limit-tokens"] == "12"
        assert first.headers["x-ratelimit-remaining-tokens"] == "7"
        assert third.json()["error"]["type"] == "tokens"
        assert "x-ratelimit-limit-requests" not in first.headers  # only what is set
        assert sim.stats.rate_limited == 1


def test_set_rate_limits_changes_the_limits_and_refills() -> None:
    with (
        Simulator(requests_per_minute=1, rate_limit_window=600.0) as sim,
        httpx.Client(base_url=sim.base_url, timeout=10) as http,
    ):
        assert http.post("/chat/completions", json=CHAT).status_code == 200
        assert http.post("/chat/completions", json=CHAT).status_code == 429
        sim.set_rate_limits(requests_per_minute=5, rate_limit_window=600.0)
        assert sim.rate_limits.requests_per_minute == 5
        assert http.post("/chat/completions", json=CHAT).status_code == 200
        sim.set_rate_limits()  # none
        assert not sim.rate_limits.enabled


def test_the_serve_command_takes_rate_limit_flags() -> None:
    args = _parser().parse_args(
        ["serve", "--rpm", "600", "--tpm", "90000", "--rate-window", "6"]
    )
    assert (args.rpm, args.tpm, args.rate_window) == (600, 90000, 6.0)
    defaults = _parser().parse_args(["serve"])
    assert (defaults.rpm, defaults.tpm, defaults.rate_window) == (None, None, 60.0)
