"""``afnio_pytest``'s scrubbing: no credential the test holds (in the URL, the headers
or the body) reaches a saved cassette, volatile response headers are dropped, only LM
hosts are recorded, and the save-time guard refuses a cassette that would still hold a
credential."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from vcr.request import Request
from vcr.serializers import yamlserializer

from afnio.testing import SIMULATOR_MODEL, Simulator
from afnio_pytest._cassette import AtomicPersister
from afnio_pytest._scrub import (
    request_key,
    scrub_live_request,
    scrub_request,
    scrub_response,
)
from afnio_pytest._types import CassetteSecretError, ReplayOptions, ReplayState
from tests.pytest_plugin._cassettes import new_state, open_cassette

FAKES = (
    "sk-FAKEKEY1-abcdefgh",  # the API key (Authorization: Bearer ...)
    "FAKEKEY2-xapikeyhdr",  # x-api-key header
    "FAKEKEY3-queryapikey",  # ?api_key=
    "FAKEKEY4-querykeyval",  # ?key=
    "FAKEKEY5-userinfo-pw",  # https://user:<pw>@host
)


def test_scrub_request_drops_headers_userinfo_and_credential_query_parameters() -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    request = Request(
        "POST",
        f"http://me:{FAKES[4]}@127.0.0.1:5123/v1/chat/completions"
        f"?key={FAKES[3]}&api-version=1&api_key={FAKES[2]}&sig=s1",
        body,
        {
            "Authorization": f"Bearer {FAKES[0]}",
            "x-api-key": FAKES[1],
            "Content-Type": "application/json",
        },
    )
    found: set[str] = set()
    scrubbed = scrub_request(request, collect=found)
    assert scrubbed.uri == "http://simulator.invalid/v1/chat/completions?api-version=1"
    assert dict(scrubbed.headers) == {
        "content-type": "application/json"
    }  # names in lower case
    assert scrubbed.body == body.encode()  # nothing to mask: byte for byte
    assert set(FAKES) <= found


def test_a_credential_in_a_json_body_is_masked_and_a_held_one_redacted() -> None:
    body = json.dumps(
        {
            "model": "m",
            "api_key": "plain-value-1",
            "messages": [{"role": "user", "content": f"my key is {FAKES[1]}"}],
        }
    )
    request = Request("POST", "https://api.openai.com/v1/chat/completions", body, {})
    scrubbed = scrub_request(request, held=[FAKES[1]])
    data = json.loads(scrubbed.body)
    assert data["api_key"] == "<redacted>"
    assert data["messages"][0]["content"] == "my key is <redacted>"
    assert scrubbed.uri.startswith("https://api.openai.com/")  # other hosts kept


def test_only_lm_hosts_are_recorded() -> None:
    state = new_state(lm_hosts=("gateway.corp.example", "*.llm.example"))
    state.endpoint_netloc = "127.0.0.1:9"
    state.phase = "live"

    def kept(uri: str) -> bool:
        return scrub_live_request(Request("POST", uri, b"{}", {}), state) is not None

    assert kept("http://127.0.0.1:9/v1/chat/completions")
    assert kept("https://api.openai.com/v1/chat/completions")
    assert kept("https://my-res.openai.azure.com/openai/deployments/d/chat")
    assert kept("https://gateway.corp.example/v1/chat/completions")
    assert kept("https://eu.llm.example/v1/chat/completions")
    assert not kept("https://api.smith.langchain.com/runs")
    assert not kept("http://127.0.0.1:5432/")
    assert not kept("https://example.com/v1/chat/completions")


def test_volatile_response_headers_are_dropped() -> None:
    response = {
        "status": {"code": 429, "message": "Too Many Requests"},
        "headers": {
            "Content-Type": ["application/json"],
            "retry-after": ["1"],
            "x-should-retry": ["true"],
            "date": ["Mon"],
            "set-cookie": ["session=abc"],
            "x-request-id": ["req-1"],
            "openai-organization": ["org-1"],
            "x-ratelimit-remaining-requests": ["9"],
        },
        "body": {"string": b"{}"},
    }
    assert set(scrub_response(response)["headers"]) == {
        "content-type",  # names in lower case
        "retry-after",
        "x-should-retry",
    }


def test_the_key_ignores_host_headers_and_credential_query_parameters() -> None:
    body = json.dumps({"b": 1, "a": [1, 2]})
    one = Request("POST", "http://simulator.invalid/v1/x?page=2", body, {"a": "1"})
    two = Request(
        "post", f"https://api.openai.com/v1/x?key={FAKES[3]}&page=2", body, {}
    )
    assert request_key(one) == request_key(two)
    three = Request("POST", "http://simulator.invalid/v1/x?page=3", body, {})
    assert request_key(one) != request_key(three)


def test_recording_keeps_every_credential_out_of_the_saved_cassette(
    tmp_path: Path,
) -> None:
    """A live recording against the simulator: the key in the Authorization header,
    an x-api-key header, credential query parameters and user info in the URL, and a
    header value echoed in the prompt, none of them in the file."""
    path = tmp_path / "c.yaml"
    state = new_state()
    with Simulator() as sim:
        netloc = f"127.0.0.1:{sim.port}"
        with (
            open_cassette(path, state, "once", simulator_netloc=netloc),
            httpx.Client(
                base_url=f"http://me:{FAKES[4]}@{netloc}/v1",
                headers={"Authorization": f"Bearer {FAKES[0]}", "x-api-key": FAKES[1]},
                params={"api_key": FAKES[2], "key": FAKES[3], "api-version": "1"},
            ) as client,
        ):
            reply = client.post(
                "/chat/completions",
                json={
                    "model": SIMULATOR_MODEL,
                    "messages": [{"role": "user", "content": f"echo {FAKES[1]}"}],
                },
            )
            assert reply.status_code == 200
    text = path.read_text(encoding="utf-8")
    assert "api-version=1" in text and "simulator.invalid" in text
    assert "echo <redacted>" in text  # the echoed header value, redacted in the body
    for fake in FAKES:
        assert fake not in text
        assert fake[:8] not in text and fake[-8:] not in text
    assert "authorization" not in text.lower() and "x-api-key" not in text.lower()


def test_the_save_guard_refuses_a_cassette_holding_a_held_secret(
    tmp_path: Path,
) -> None:
    state = ReplayState("t", ReplayOptions(), "once", None)
    state.add_secret("held-secret-value-123")
    request = Request("POST", "http://simulator.invalid/v1/chat/completions", b"{}", {})
    response = {
        "status": {"code": 200, "message": "OK"},
        "headers": {},
        "body": {"string": "the answer quotes held-secret-value-123"},
    }
    path = tmp_path / "c.yaml"
    data = {"requests": [request], "responses": [response]}
    with pytest.raises(CassetteSecretError) as raised:
        AtomicPersister.bound(state).save_cassette(str(path), data, yamlserializer)
    message = str(raised.value)
    assert "interaction 1" in message and "held-secret" not in message
    assert not path.exists() and not list(tmp_path.iterdir())
    # the unbound persister still refuses anything that looks like a key
    response["body"]["string"] = "Bearer abcdefghijkl"
    with pytest.raises(CassetteSecretError):
        AtomicPersister.save_cassette(str(path), data, yamlserializer)
    assert not path.exists()
    response["body"]["string"] = "nothing secret here"
    AtomicPersister.bound(state).save_cassette(str(path), data, yamlserializer)
    assert path.exists() and not list(tmp_path.glob(".*.tmp"))
