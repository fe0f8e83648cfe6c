"""The backward client built from a ``"provider/model"`` path is upstream's: an
:class:`afnio.models.openai.OpenAI` exposing the sync ``openai.OpenAI`` SDK client as
``_client``, with the given ``client_args``; its calls still run concurrently
(issue 18, item 9)."""

from __future__ import annotations

import asyncio

import openai

import afnio
from afnio import Variable
from afnio.autodiff.lm_ops import ChatCompletion
from afnio.models.openai import OpenAI
from afnio.testing import SIMULATOR_MODEL, Simulator

KEY = "sk-backward-secret-0123456789"
URL = "http://127.0.0.1:9/v1"


def test_backward_client_from_a_path_is_upstreams_sync_openai() -> None:
    client_args = {"api_key": KEY, "organization": "test-org", "base_url": URL}
    completion_args = {"model": "gpt-4o", "temperature": 0.5}
    afnio.set_backward_model_client(
        "openai/gpt-4o", client_args=client_args, completion_args=completion_args
    )
    backward = afnio.get_backward_model_client()
    assert backward._provider == "openai" and backward._model == "gpt-4o"
    assert backward._client_args == client_args
    assert backward._completion_args == completion_args
    assert isinstance(backward._client, OpenAI)  # upstream's own assertion
    assert backward.client is backward._client
    assert isinstance(backward._client._client, openai.OpenAI)  # the sync SDK client
    backward._client.close()


def test_client_args_reach_the_sync_and_the_async_sdk_clients() -> None:
    afnio.set_backward_model_client(
        "openai/gpt-4o",
        client_args={
            "api_key": KEY,
            "organization": "test-org",
            "project": "test-project",
            "base_url": URL,
            "timeout": 7.0,
            "max_retries": 1,
            "default_headers": {"X-Team": "nlp"},
        },
    )
    afnio_client = afnio.get_backward_model_client()._client
    sync, async_ = afnio_client._client, afnio_client.client
    assert isinstance(sync, openai.OpenAI)
    assert isinstance(async_, openai.AsyncOpenAI)
    for sdk in (sync, async_):
        assert str(sdk.base_url) == URL + "/"
        assert sdk.api_key == KEY
        assert sdk.organization == "test-org" and sdk.project == "test-project"
        assert sdk.timeout == 7.0 and sdk.max_retries == 1
        assert sdk.default_headers["X-Team"] == "nlp"
    assert afnio_client._client is sync  # built once
    afnio_client.close()
    assert sync.is_closed()


def test_a_reset_with_other_args_builds_a_new_openai_client() -> None:
    afnio.set_backward_model_client(
        "openai/gpt-4o", client_args={"api_key": "key1", "base_url": URL}
    )
    first = afnio.get_backward_model_client()._client
    afnio.set_backward_model_client(
        "openai/gpt-3.5-turbo",
        client_args={"api_key": "key2", "base_url": URL},
        completion_args={"model": "gpt-3.5-turbo"},
    )
    backward = afnio.get_backward_model_client()
    assert isinstance(backward._client, OpenAI) and backward._client is not first
    assert backward._client_args["api_key"] == "key2"
    assert backward._client._client.api_key == "key2"
    first.close()
    backward._client.close()


def test_no_key_in_the_reprs_of_the_backward_client() -> None:
    afnio.set_backward_model_client(
        "openai/gpt-4o", client_args={"api_key": KEY, "base_url": URL}
    )
    backward = afnio.get_backward_model_client()
    for obj in (backward, backward._client, backward._client._client):
        assert "secret" not in repr(obj) and KEY not in str(obj)
    assert "sk-" not in str(backward._client.get_config())
    backward._client.close()


# -- live simulator (loopback only, no cassette) -----------------------------------


def test_calls_through_a_path_built_backward_client_run_concurrently() -> None:
    with Simulator(latency=0.2) as sim:
        afnio.set_backward_model_client(
            f"openai/{SIMULATOR_MODEL}",
            client_args={"base_url": sim.base_url, "api_key": KEY, "max_retries": 0},
        )
        backward = afnio.get_backward_model_client()
        backward.chat([{"role": "user", "content": "warm-up"}])  # connections open
        sim.reset_stats()

        async def eight() -> list[str]:
            return await asyncio.gather(
                *(
                    backward.achat([{"role": "user", "content": f"hi {i}"}])
                    for i in range(8)
                )
            )

        assert len(asyncio.run(eight())) == 8
        assert sim.stats.peak_in_flight == 8
        assert backward.get_usage()["total_tokens"] > 0
        assert backward.chat([{"role": "user", "content": "hello"}])  # sync works too
        backward._client.close()


def test_a_batched_backward_pass_through_it_runs_its_calls_concurrently() -> None:
    afnio.set_max_concurrency(16)
    with Simulator() as sim:
        afnio.set_backward_model_client(
            f"openai/{SIMULATOR_MODEL}",
            client_args={"base_url": sim.base_url, "api_key": KEY, "max_retries": 0},
        )
        backward = afnio.get_backward_model_client()
        system = Variable(
            "Classify the sentiment of the customer message as positive, neutral or "
            "negative.",
            role="system prompt",
            requires_grad=True,
        )
        messages = [
            {"role": "system", "content": [system]},
            {"role": "user", "content": [Variable("Customer message: {message}")]},
        ]
        batch = Variable([f"Message {i} is awful." for i in range(8)], role="messages")
        reply = ChatCompletion.apply(
            backward.client, messages, inputs={"message": batch}, model=SIMULATOR_MODEL
        )
        sim.latency = 0.2
        sim.reset_stats()
        feedback = (
            'The prediction "neutral" is wrong: the expected value is "negative".'
        )
        reply.backward(Variable([feedback] * 8))
        assert sim.stats.calls == 8
        assert sim.stats.peak_in_flight == 8
        assert len(system.grad[0].data) == 8
        backward._client.close()
