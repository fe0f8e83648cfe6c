"""``afnio_pytest``'s cassette (``AfnioCassette``), in process, through vcrpy's real
httpx stubs: recorded order, one request more than recorded is a miss, concurrency
(threads and asyncio), the request key's normalisation, and the closest-request diff."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from pathlib import Path

import httpx
import pytest
from vcr.cassette import Cassette
from vcr.errors import CannotOverwriteExistingCassetteException

from afnio_pytest._types import Miss, ReplayEndpoint
from tests.pytest_plugin._cassettes import (
    BASE_URL,
    CHAT,
    answer,
    chat_body,
    new_state,
    open_cassette,
    write_cassette,
)


def _misses(state) -> list[Miss]:
    return [p for p in state.problems if isinstance(p, Miss)]


def test_the_vcrpy_internals_the_cassette_relies_on_exist() -> None:
    cassette = Cassette("unused.yaml")
    for name in ("data", "play_counts", "_loaded_count", "_played_interactions"):
        assert hasattr(cassette, name), name
    for name in ("rewound", "write_protected", "_before_record_request", "_persister"):
        assert hasattr(cassette, name), name
    assert not hasattr(Cassette, "__slots__")


def test_identical_requests_replay_in_recorded_order(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    write_cassette(path, [(CHAT, chat_body("poll"), f"answer-{i}") for i in range(5)])
    state = new_state()
    with open_cassette(path, state), httpx.Client(base_url=BASE_URL) as client:
        got = [
            answer(client.post("/chat/completions", json=chat_body("poll")))
            for _ in range(5)
        ]
    assert got == [f"answer-{i}" for i in range(5)]
    assert state.problems == []


def test_one_request_more_than_recorded_is_an_already_played_miss(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.yaml"
    write_cassette(path, [(CHAT, chat_body("poll"), f"answer-{i}") for i in range(3)])
    state = new_state()
    with open_cassette(path, state), httpx.Client(base_url=BASE_URL) as client:
        for _ in range(3):
            client.post("/chat/completions", json=chat_body("poll"))
        with pytest.raises(CannotOverwriteExistingCassetteException) as raised:
            client.post("/chat/completions", json=chat_body("poll"))
    assert raised.value.reason == "already_played"
    (miss,) = _misses(state)
    assert (miss.reason, miss.recorded, miss.attempts) == ("already_played", 3, 1)


def _sixty_four(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    write_cassette(path, [(CHAT, chat_body("same"), f"answer-{i}") for i in range(64)])
    return path


def _replay_in_64_threads(path: Path) -> tuple[list[str], list[BaseException], object]:
    """64 threads, started together, each sending the same request once; then a 65th
    request, which must be a miss."""
    state = new_state()
    barrier = threading.Barrier(64)
    answers: list[str] = []
    errors: list[BaseException] = []
    with open_cassette(path, state), httpx.Client(base_url=BASE_URL) as client:

        def send() -> None:
            barrier.wait()
            try:
                reply = client.post("/chat/completions", json=chat_body("same"))
                answers.append(answer(reply))
            except BaseException as exc:  # counted by the caller
                errors.append(exc)

        threads = [threading.Thread(target=send) for _ in range(64)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert state.problems == [], state.problems
        with pytest.raises(CannotOverwriteExistingCassetteException):
            client.post("/chat/completions", json=chat_body("same"))
    return answers, errors, state


def test_64_threads_replayed_20_times_never_miss_and_the_65th_does(
    tmp_path: Path,
) -> None:
    path = _sixty_four(tmp_path)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        for _ in range(20):
            answers, errors, state = _replay_in_64_threads(path)
            assert errors == []
            assert sorted(answers) == sorted(f"answer-{i}" for i in range(64))
            assert [m.reason for m in _misses(state)] == ["already_played"]
    finally:
        sys.setswitchinterval(interval)


def test_an_asyncio_gather_of_64_identical_requests_replays_without_a_miss(
    tmp_path: Path,
) -> None:
    path = _sixty_four(tmp_path)

    async def gather(client: httpx.AsyncClient, n: int) -> list[httpx.Response]:
        return await asyncio.gather(
            *[
                client.post("/chat/completions", json=chat_body("same"))
                for _ in range(n)
            ]
        )

    async def run() -> tuple[list[str], BaseException | None]:
        async with httpx.AsyncClient(base_url=BASE_URL) as client:
            replies = await gather(client, 64)
            try:
                await client.post("/chat/completions", json=chat_body("same"))
            except CannotOverwriteExistingCassetteException as exc:
                return [answer(r) for r in replies], exc
            return [answer(r) for r in replies], None

    for _ in range(20):
        state = new_state()
        with open_cassette(path, state):
            answers, extra = asyncio.run(run())
        assert sorted(answers) == sorted(f"answer-{i}" for i in range(64))
        assert extra is not None, "the 65th request must be a miss"
        assert [m.reason for m in _misses(state)] == ["already_played"]


def test_a_query_parameter_is_matched_and_a_credential_one_is_not(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.yaml"
    write_cassette(
        path,
        [
            ("/v1/responses?page=2", chat_body("list"), "page two"),
            ("/v1/responses?page=3", chat_body("list"), "page three"),
        ],
    )
    state = new_state()
    with open_cassette(path, state), httpx.Client(base_url=BASE_URL) as client:
        three = client.post(
            "/responses",
            params={"page": "3", "api_key": "k-1234"},
            json=chat_body("list"),
        )
        two = client.post(
            "/responses", params={"key": "AIza-x", "page": "2"}, json=chat_body("list")
        )
        with pytest.raises(CannotOverwriteExistingCassetteException):
            client.post("/responses", params={"page": "4"}, json=chat_body("list"))
    assert (answer(three), answer(two)) == ("page three", "page two")
    assert [m.reason for m in _misses(state)] == ["no_match"]


def test_ignore_fields_and_the_default_ignored_fields_do_not_break_a_match(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.yaml"
    recorded = chat_body("hi", user="run-1", metadata={"run_id": "r-1", "app": "a"})
    write_cassette(path, [(CHAT, recorded, "hello")] * 2)
    sent = chat_body("hi", user="run-2", metadata={"run_id": "r-2", "app": "a"})

    state = new_state(ignore_fields=("metadata.run_id",))
    with open_cassette(path, state), httpx.Client(base_url=BASE_URL) as client:
        assert answer(client.post("/chat/completions", json=sent)) == "hello"
    assert state.problems == []

    state = new_state()  # run_id is not ignored without the option
    with open_cassette(path, state), httpx.Client(base_url=BASE_URL) as client:
        with pytest.raises(CannotOverwriteExistingCassetteException):
            client.post("/chat/completions", json=sent)
        # the "user" difference alone is ignored by default
        same_run = chat_body("hi", user="run-9", metadata={"run_id": "r-1", "app": "a"})
        assert answer(client.post("/chat/completions", json=same_run)) == "hello"
    assert [m.reason for m in _misses(state)] == ["no_match"]


def test_json_key_order_and_whitespace_do_not_matter(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    write_cassette(path, [(CHAT, chat_body("hi", temperature=0), "hello")])
    reordered = (
        b'{ "temperature" : 0 ,\n  "messages": [ {"content": "hi", "role": "user"} ],'
        b'  "model":"afnio-sim-1" }'
    )
    state = new_state()
    with open_cassette(path, state), httpx.Client(base_url=BASE_URL) as client:
        reply = client.post(
            "/chat/completions",
            content=reordered,
            headers={"content-type": "application/json"},
        )
    assert answer(reply) == "hello" and state.problems == []


def test_a_miss_finds_the_closest_recorded_request_and_shows_a_word_diff(
    tmp_path: Path,
) -> None:
    from afnio_pytest._report import ReportContext, render_report

    path = tmp_path / "c.yaml"
    prompt = "Summarise the text in one sentence, plainly and without any preamble."
    write_cassette(
        path,
        [
            (CHAT, chat_body("Translate this into French."), "a"),
            (CHAT, chat_body(prompt, temperature=0), "b"),
            (CHAT, chat_body("Name three colours."), "c"),
        ],
    )
    state = new_state()
    edited = prompt.replace("one sentence", "two sentences")
    with (
        open_cassette(path, state) as cassette,
        httpx.Client(base_url=BASE_URL) as client,
    ):
        with pytest.raises(CannotOverwriteExistingCassetteException) as raised:
            client.post("/chat/completions", json=chat_body(edited, temperature=0.2))
        stored = [request for request, _ in cassette.data]
    (miss,) = _misses(state)
    assert (miss.reason, miss.closest_index) == ("no_match", 1)
    assert "afnio_body" in str(raised.value)  # vcrpy's own message names the matcher
    report = render_report(
        [miss], ReportContext("tests/test_x.py::test_x", str(path), stored=stored)
    )
    assert "closest recorded request: #2 of 3 (same method and path)" in report
    assert "[-one sentence,-]{+two sentences,+}" in report
    assert "temperature: 0 -> 0.2" in report
    assert "--afnio-record=all" in report


def test_stored_requests_are_keyed_once_not_reparsed_per_lookup(
    tmp_path: Path,
) -> None:
    """The index keys every stored request once at load; a lookup hashes only the live
    request (vcrpy's own lookup re-parses every stored body)."""
    import afnio_pytest._scrub as scrub

    path = tmp_path / "c.yaml"
    write_cassette(path, [(CHAT, chat_body(f"q{i}"), f"a{i}") for i in range(200)])
    state = new_state()
    calls = 0
    original = scrub.body_digest

    def counting(raw: bytes, ignored: object) -> str:
        nonlocal calls
        calls += 1
        return original(raw, ignored)  # type: ignore[arg-type]

    with open_cassette(path, state), httpx.Client(base_url=BASE_URL) as client:
        scrub.body_digest = counting  # type: ignore[assignment]
        try:
            for i in reversed(range(200)):
                reply = client.post("/chat/completions", json=chat_body(f"q{i}"))
                assert answer(reply) == f"a{i}"
        finally:
            scrub.body_digest = original  # type: ignore[assignment]
    assert calls == 200  # one per live request
    assert state.problems == []
    assert json.loads(json.dumps([p.reason for p in _misses(state)])) == []


def test_recording_the_same_requests_in_another_order_writes_the_same_file(
    tmp_path: Path,
) -> None:
    """Concurrent requests arrive in a different order on every run: the cassette
    stores them sorted by request, identical ones (a retried request, a poll) in the
    order they were answered, so a re-recording differs from the recording only
    where the program does."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from afnio.testing import Simulator

    contents = [f"message number {i}" for i in range(12)]
    files = []
    for seed in (0, 1):
        order = random.Random(seed).sample(contents, len(contents))
        path = tmp_path / f"c{seed}.yaml"
        with Simulator(latency=0.2) as sim:
            netloc = f"127.0.0.1:{sim.port}"
            with (
                open_cassette(path, new_state(), "once", simulator_netloc=netloc),
                httpx.Client(base_url=f"http://{netloc}") as client,
            ):
                client.post(CHAT, json=chat_body("first, alone"))
                with ThreadPoolExecutor(len(order)) as pool:  # one concurrent round
                    list(
                        pool.map(lambda c: client.post(CHAT, json=chat_body(c)), order)
                    )
                sim.inject("rate_limit")  # then the same request twice: 429, 200
                first = client.post(CHAT, json=chat_body("poll me"))
                second = client.post(CHAT, json=chat_body("poll me"))
                assert (first.status_code, second.status_code) == (429, 200)
        files.append(path.read_bytes())
    assert files[0] == files[1]
    state = new_state()
    with (
        open_cassette(tmp_path / "c1.yaml", state, "none") as cassette,
        httpx.Client(base_url="http://127.0.0.1:9") as client,
    ):
        endpoint = ReplayEndpoint(
            "replay", BASE_URL, "k", "sim", tmp_path / "c1.yaml", cassette=cassette
        )
        sent = ["message number 7", "poll me", "poll me", "first, alone"]
        replies = [client.post(CHAT, json=chat_body(c)) for c in sent]
        # what the test sent, in its order (the file holds them sorted)
        assert [
            json.loads(r.body)["messages"][0]["content"] for r in endpoint.requests
        ] == sent
    assert [r.status_code for r in replies] == [200, 429, 200, 200]
    assert state.snapshot_problems() == []
