"""afnio's HTTP transport (``afnio.models._transport``): the SDK's aiohttp client on one
shared pool per endpoint and event loop, closed cleanly; the httpx transport on
request; each request recorded once in a cassette. Live simulator, no cassette."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

import afnio
from afnio import cognitive as cog
from afnio._runtime import run_sync
from afnio.models import _transport
from afnio.models.openai import AsyncOpenAI, OpenAI
from afnio.optim import TGD
from afnio.testing import SIMULATOR_MODEL, Simulator

REPO = Path(__file__).resolve().parents[2]
HI = [{"role": "user", "content": "hello"}]


def _live_connections(sim: Simulator) -> int:
    """Connections the simulator holds open now (its server's own bookkeeping)."""
    server = sim._server
    assert server is not None
    with server.connections_lock:
        return len(server.connections)


def _wait_until(predicate: Any, timeout: float = 5.0) -> bool:
    """Poll ``predicate`` (letting afnio's loop run scheduled work) until true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        run_sync(asyncio.sleep(0.01))
    return bool(predicate())


@pytest.fixture
def sim() -> Any:
    with Simulator() as simulator:
        yield simulator


def test_default_transport_is_the_sdks_aiohttp_client(sim: Simulator) -> None:
    with OpenAI(base_url=sim.base_url, api_key="sk-test") as client:
        assert client.transport == "aiohttp"
        assert isinstance(client.client._client, openai.DefaultAioHttpClient)
        assert client.chat(HI, model=SIMULATOR_MODEL)
        assert (
            "transport" not in client.get_config()
        )  # only an explicit choice is saved


def test_clients_of_one_endpoint_share_one_connection(sim: Simulator) -> None:
    with Simulator() as other:
        a = OpenAI(base_url=sim.base_url, api_key="sk-a")
        b = AsyncOpenAI(base_url=sim.base_url, api_key="sk-b")
        c = OpenAI(base_url=other.base_url, api_key="sk-c")
        try:
            assert _transport.open_pools() == {
                sim.base_url.rstrip("/"): 2,
                other.base_url.rstrip("/"): 1,
            }
            # one after the other: b reuses the connection a opened (keep-alive)
            a.chat(HI, model=SIMULATOR_MODEL)
            b.chat(HI, model=SIMULATOR_MODEL)
            a.chat(HI, model=SIMULATOR_MODEL)
            assert sim.stats.calls == 3
            assert _live_connections(sim) == 1
            assert len(_transport.pool_sessions(sim.base_url)) == 1
            c.chat(HI, model=SIMULATOR_MODEL)
            assert _live_connections(other) == 1
        finally:
            for client in (a, b, c):
                client.close()


def test_httpx_clients_each_open_their_own_connection(sim: Simulator) -> None:
    """The contrast to the shared pool: the SDK's httpx client, one per afnio client."""
    with (
        OpenAI(base_url=sim.base_url, api_key="sk-a", transport="httpx") as a,
        OpenAI(base_url=sim.base_url, api_key="sk-b", transport="httpx") as b,
    ):
        assert a.transport == "httpx"
        assert not isinstance(a.client._client, openai.DefaultAioHttpClient)
        assert a.get_config()["transport"] == "httpx"
        assert sim.base_url.rstrip("/") not in _transport.open_pools()
        a.chat(HI, model=SIMULATOR_MODEL)
        b.chat(HI, model=SIMULATOR_MODEL)
        assert _live_connections(sim) == 2


def test_the_last_client_closed_closes_the_pool(sim: Simulator) -> None:
    key = sim.base_url.rstrip("/")
    a = OpenAI(base_url=sim.base_url, api_key="sk-a", max_retries=0)
    b = OpenAI(base_url=sim.base_url, api_key="sk-b")
    a.chat(HI, model=SIMULATOR_MODEL)
    (session,) = _transport.pool_sessions(sim.base_url)
    a.close()
    a.close()  # a second close returns nothing more
    assert _transport.open_pools()[key] == 1
    assert not session.closed
    assert b.chat(HI, model=SIMULATOR_MODEL)  # b still works on the shared pool
    with pytest.raises(openai.APIConnectionError):
        a.chat(HI, model=SIMULATOR_MODEL)  # a closed client never sends again
    b.close()
    assert key not in _transport.open_pools()
    assert session.closed
    assert _wait_until(lambda: _live_connections(sim) == 0)


def test_a_garbage_collected_client_returns_its_lease(sim: Simulator) -> None:
    key = sim.base_url.rstrip("/")
    client = OpenAI(base_url=sim.base_url, api_key="sk-a")
    client.chat(HI, model=SIMULATOR_MODEL)
    (session,) = _transport.pool_sessions(sim.base_url)
    del client
    gc.collect()
    assert key not in _transport.open_pools()
    assert _wait_until(lambda: session.closed)  # closed on afnio's loop


def test_a_client_that_fails_to_build_returns_its_lease(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(openai.OpenAIError):
        OpenAI(base_url=sim.base_url)  # no API key anywhere
    assert sim.base_url.rstrip("/") not in _transport.open_pools()


def test_another_event_loop_gets_its_own_pool_closed_with_that_loop(
    sim: Simulator,
) -> None:
    """The SDK client (``client.client``) awaited on the caller's own loop: a second
    session, on that loop, closed by ``asyncio.run`` as the loop ends."""
    with OpenAI(base_url=sim.base_url, api_key="sk-a") as client:
        client.chat(HI, model=SIMULATOR_MODEL)  # afnio's loop

        async def on_my_loop() -> str:
            reply = await client.client.chat.completions.create(
                messages=HI, model=SIMULATOR_MODEL
            )
            return reply.choices[0].message.content or ""

        assert asyncio.run(on_my_loop())
        sessions = _transport.pool_sessions(sim.base_url)
        assert len(sessions) == 2
        assert sorted(s.closed for s in sessions) == [False, True]
        assert asyncio.run(on_my_loop())  # a new loop: the ended one is dropped
        assert len(_transport.pool_sessions(sim.base_url)) == 2


def test_transport_from_the_environment(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(_transport.ENV_VAR, "httpx")
    with OpenAI(base_url=sim.base_url, api_key="sk-a") as client:
        assert client.transport == "httpx"
        assert client.chat(HI, model=SIMULATOR_MODEL)
    with OpenAI(base_url=sim.base_url, api_key="sk-a", transport="aiohttp") as client:
        assert client.transport == "aiohttp"  # the argument wins


def test_transport_errors_name_the_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    with pytest.raises(ValueError, match="`transport` must be 'aiohttp' or 'httpx'"):
        OpenAI(api_key="sk-a", transport="requests")  # type: ignore[arg-type]
    monkeypatch.setenv(_transport.ENV_VAR, "curl")
    with pytest.raises(ValueError, match=r"\$AFNIO_HTTP_TRANSPORT must be"):
        OpenAI(api_key="sk-a")
    monkeypatch.delenv(_transport.ENV_VAR)
    with pytest.raises(ValueError, match="`http_client` or `transport`, not both"):
        OpenAI(api_key="sk-a", http_client=httpx.AsyncClient(), transport="httpx")
    custom = OpenAI(api_key="sk-a", http_client=httpx.AsyncClient())
    assert custom.transport == "custom"
    custom.close()
    monkeypatch.setattr(_transport, "aiohttp_available", lambda: False)
    with pytest.raises(ImportError, match=r"pip install 'openai\[aiohttp\]'"):
        OpenAI(api_key="sk-a", transport="aiohttp")
    with OpenAI(api_key="sk-a") as fallback:
        assert fallback.transport == "httpx"  # without the extra: the SDK's httpx


def test_an_environment_proxy_gets_the_sdks_own_aiohttp_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """httpx applies ``HTTPS_PROXY`` only to a client without a transport of its own:
    such a client is not put on the shared pool."""
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    url = "https://proxied.invalid/v1"
    with OpenAI(base_url=url, api_key="sk-a") as client:
        assert client.transport == "aiohttp"
        assert isinstance(client.client._client, openai.DefaultAioHttpClient)
        assert url not in _transport.open_pools()


def test_no_resource_warning_for_closed_forgotten_or_collected_clients() -> None:
    """Every way a client ends (closed, garbage-collected, never closed until exit,
    used from an ``asyncio.run`` loop) leaves no unclosed session or connector."""
    script = textwrap.dedent(
        """
        import asyncio, atexit, gc
        sessions = []
        # registered first, so it runs last: after afnio closed what was left open
        atexit.register(
            lambda: print("closed at exit:", all(s.closed for s in sessions))
        )
        from afnio.models import _transport
        from afnio.models.openai import OpenAI
        from afnio.testing import SIMULATOR_MODEL, Simulator

        HI = [{"role": "user", "content": "hi"}]
        sim = Simulator().start()
        closed = OpenAI(base_url=sim.base_url, api_key="sk-a")
        forgotten = OpenAI(base_url=sim.base_url, api_key="sk-b")
        collected = OpenAI(base_url=sim.base_url, api_key="sk-c")
        for client in (closed, forgotten, collected):
            client.chat(HI, model=SIMULATOR_MODEL)

        async def mine():
            await forgotten.client.chat.completions.create(
                messages=HI, model=SIMULATOR_MODEL
            )

        asyncio.run(mine())
        sessions += _transport.pool_sessions(sim.base_url)
        closed.close()
        del collected
        gc.collect()
        print(len(sessions), flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error::ResourceWarning", "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    # afnio's loop's session and the asyncio.run loop's; the forgotten client's pool
    # was still open at the end of the script, and closed at exit
    assert done.stdout.split() == ["2", "closed", "at", "exit:", "True"]
    for marker in ("Unclosed", "unclosed", "ResourceWarning"):
        assert marker not in done.stderr, done.stderr


# -- cassettes: each request recorded once ---------------------------------------------


def _readme_step(llm: OpenAI) -> tuple[str, int]:
    """The README's program, one step on three messages: the new prompt and score."""
    afnio.set_backward_model_client(llm, completion_args={"model": SIMULATOR_MODEL})
    prompt = cog.Parameter("Classify the sentiment.", role="system prompt")
    chat = [
        {"role": "system", "content": [prompt]},
        {"role": "user", "content": [afnio.Variable("{message}", role="message")]},
    ]
    optimizer = TGD([prompt], model_client=llm, model=SIMULATOR_MODEL)
    messages = ["I love the new cleaning crew.", "The repair was awful.", "Gym open?"]
    prediction = cog.functional.chat_completion(
        llm, chat, inputs={"message": messages}, model=SIMULATOR_MODEL
    )
    score, explanation = cog.functional.exact_match_evaluator(
        prediction, ["positive", "negative", "neutral"]
    )
    explanation.backward()
    optimizer.step()
    return str(prompt.data), int(score.data)


def test_each_request_is_recorded_once_and_replays_offline(tmp_path: Path) -> None:
    vcr = pytest.importorskip("vcr")
    path = tmp_path / "readme_step.yaml"
    recorder = vcr.VCR(record_mode="all", filter_headers=["authorization"])
    with Simulator() as sim:
        base_url = sim.base_url
        with (
            recorder.use_cassette(str(path)) as cassette,
            OpenAI(base_url=base_url, api_key="sk-test", transport="aiohttp") as llm,
        ):
            recorded = _readme_step(llm)
            calls = llm.calls
        served = sim.stats.calls
    interactions = yaml.safe_load(path.read_text(encoding="utf-8"))["interactions"]
    assert served >= 5  # forward x3, backward, optimizer at least
    assert calls == served
    assert len(interactions) == served  # one interaction per LM call, no duplicate
    assert len(cassette) == served
    assert all(i["response"]["status"]["code"] == 200 for i in interactions)

    # offline: the simulator is gone, every request is answered from the cassette
    player = vcr.VCR(record_mode="none")
    with (
        player.use_cassette(str(path)) as replay,
        OpenAI(
            base_url=base_url, api_key="sk-test", transport="aiohttp", max_retries=0
        ) as llm,
    ):
        assert _readme_step(llm) == recorded
    assert replay.play_count == served
    assert replay.all_played
