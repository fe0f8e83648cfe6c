"""The Trainer retries only transient failures; anything else ends the run at once
with a StepError naming its type, the phase and the stage (issue 18, item 3)."""

from __future__ import annotations

import socket
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pydantic
import pytest

import afnio
from afnio.errors import (
    BackwardParseError,
    StepError,
    error_text,
    is_provider_error,
    tag_sample,
)
from afnio.models.openai import OpenAI
from afnio.models.phases import lm_phase
from afnio.optim.tgd import OptimizerStepError
from afnio.testing import SIMULATOR_MODEL, Simulator
from afnio.trainer import Trainer
from afnio.trainer.trainer import _is_service_failure
from afnio.utils.data import DataLoader
from benchmarks.resume_kills import MESSAGES, Messages
from examples.facility_support import SentimentClassifier

REQUEST = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")


def _status(code: int) -> openai.APIStatusError:
    response = httpx.Response(code, request=REQUEST, json={"error": {}})
    return openai.APIStatusError(f"HTTP {code}", response=response, body=None)


def _raised_from(error: BaseException, cause: BaseException) -> BaseException:
    try:
        raise error from cause
    except BaseException as e:
        return e


def _while_handling(error: BaseException, context: BaseException) -> BaseException:
    try:
        try:
            raise context
        except BaseException:
            raise error  # noqa: B904 (an implicit __context__ is the point)
    except BaseException as e:
        return e


@pytest.mark.parametrize(
    "error",
    [
        openai.APIConnectionError(request=REQUEST),
        openai.APITimeoutError(request=REQUEST),
        _status(408),
        _status(409),
        _status(429),
        _status(500),
        _status(503),
        httpx.ConnectError("refused", request=REQUEST),
        ConnectionError("reset"),
        TimeoutError(),
        BackwardParseError("cut JSON"),
        OptimizerStepError("the optimizer's answer was unusable"),
        _raised_from(RuntimeError("wrapped"), ConnectionError("reset")),
        ExceptionGroup("two", [TimeoutError(), _status(502)]),
    ],
    ids=lambda e: type(e).__name__ + str(getattr(e, "status_code", "")),
)
def test_transient_failures_are_retried(error: BaseException) -> None:
    assert _is_service_failure(error)


@pytest.mark.parametrize(
    "error",
    [
        _status(400),
        _status(401),
        _status(403),
        _status(404),
        _status(422),
        KeyError("label"),
        ValueError("the answers do not look right"),
        TypeError("achat() missing 1 required keyword-only argument: 'model'"),
        # TGD wraps whatever its client raised: the cause decides
        _raised_from(OptimizerStepError("TGD could not update"), TypeError("model")),
        _raised_from(RuntimeError("wrapped"), _status(401)),
        # a bug while handling a transient error is still a bug
        _while_handling(KeyError("label"), ConnectionError("reset")),
        ExceptionGroup("mixed", [TimeoutError(), KeyError("label")]),
    ],
    ids=lambda e: type(e).__name__ + str(getattr(e, "status_code", "")),
)
def test_programming_and_client_errors_are_not_retried(error: BaseException) -> None:
    assert not _is_service_failure(error)


def test_error_text_shows_langchain_messages_as_plain_text() -> None:
    message = (
        "Input to ChatPromptTemplate is missing variables {'message'}.  Expected: "
        "['message'] Received: ['text']\nNote: if you intended {message} to be part "
        "of the string and not a variable, please escape it with double curly "
        "braces like: '{{message}}'."
    )
    text = error_text(KeyError(message))
    assert text.startswith("KeyError: Input to ChatPromptTemplate is missing")
    assert "\\n" not in text and "\\'" not in text and '"' not in text
    assert "\nNote: if you intended" in text
    assert error_text(KeyError("label")) == "KeyError: 'label'"  # a bare key
    error = ConnectionError("refused")
    error.add_note("LM client: the backward client X")
    assert (
        error_text(error)
        == "ConnectionError: refused\nLM client: the backward client X"
    )


def test_a_step_error_names_the_row_a_tagged_error_came_from() -> None:
    cause = tag_sample(KeyError("neutral"), dataset="trainset", index=2, stage="metric")
    error = StepError(cause, phase="validation", stage="forward", batch_index=0)
    assert (error.phase, error.stage) == ("validation", "metric")
    assert (error.dataset, error.sample_index, error.attempts) == ("trainset", 2, 1)
    assert str(error).startswith(
        "The validation failed in the metric on trainset[2] (batch 0): "
        "KeyError: 'neutral'"
    )
    assert "Not retried" in str(error)
    assert isinstance(error, RuntimeError)  # upstream raised a RuntimeError


# -- the Trainer ----------------------------------------------------------------------


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator() as simulator:
        yield simulator


@pytest.fixture
def client(sim: Simulator) -> Iterator[OpenAI]:
    with OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as c:
        afnio.set_backward_model_client(c, completion_args={"model": SIMULATOR_MODEL})
        yield c


def _train() -> DataLoader:
    return DataLoader(Messages(MESSAGES[:4]), batch_size=4)


def _trainer(root: Path) -> Trainer:
    return Trainer(
        max_epochs=1,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_agent_summary=False,
        enable_checkpointing=False,
    )


class _BuggyMetric(SentimentClassifier):
    """Its metric raises a KeyError after the step's LM calls; counts the steps."""

    runs = 0

    def _step(self, batch: Any) -> dict[str, Any]:
        out = super()._step(batch)
        _BuggyMetric.runs += 1
        return {**out, "f1": {}["neutral"]}


def test_a_bug_in_a_training_step_fails_at_once_with_its_type_and_phase(
    client: OpenAI, sim: Simulator, tmp_path: Path
) -> None:
    _BuggyMetric.runs = 0
    sim.reset_stats()
    with pytest.raises(StepError) as info:
        _trainer(tmp_path).fit(_BuggyMetric(client, SIMULATOR_MODEL), _train())
    error = info.value
    assert _BuggyMetric.runs == 1 and error.attempts == 1  # not retried
    assert sim.stats.calls == 4  # the batch's 4 forward calls, once
    assert isinstance(error.__cause__, KeyError)
    assert (error.phase, error.stage, error.batch_index) == (
        "training step",
        "forward",
        0,
    )
    assert "KeyError: 'neutral'" in str(error)


def test_a_bug_in_validation_fails_at_once(
    client: OpenAI, sim: Simulator, tmp_path: Path
) -> None:
    _BuggyMetric.runs = 0
    sim.reset_stats()
    with pytest.raises(StepError, match="The validation failed") as info:
        _trainer(tmp_path).validate(_BuggyMetric(client, SIMULATOR_MODEL), _train())
    assert _BuggyMetric.runs == 1 and sim.stats.calls == 4
    assert info.value.phase == "validation"


class _Flaky(SentimentClassifier):
    failures = 0
    runs = 0

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        _Flaky.runs += 1
        if _Flaky.failures > 0:
            _Flaky.failures -= 1
            raise openai.APIConnectionError(request=REQUEST)
        return super().training_step(batch, batch_idx)


def test_a_transient_failure_is_still_retried(client: OpenAI, tmp_path: Path) -> None:
    _Flaky.failures, _Flaky.runs = 2, 0
    history = _trainer(tmp_path).fit(_Flaky(client, SIMULATOR_MODEL), _train())
    assert _Flaky.runs == 3 and len(history) == 1
    _Flaky.failures, _Flaky.runs = 100, 0
    with pytest.raises(StepError, match="failed after 3 attempts") as info:
        _trainer(tmp_path).fit(_Flaky(client, SIMULATOR_MODEL), _train())
    assert _Flaky.runs == 3  # 3 attempts of the forward pass, not 3 x 3
    assert info.value.transient and info.value.attempts == 3


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_connection_error_of_the_backward_client_names_it_and_its_url(
    sim: Simulator, tmp_path: Path
) -> None:
    port = _closed_port()
    with (
        OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as forward,
        OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test", max_retries=0
        ) as down,
    ):
        afnio.set_backward_model_client(
            down, completion_args={"model": SIMULATOR_MODEL}
        )
        with pytest.raises(StepError) as info:
            _trainer(tmp_path).fit(
                SentimentClassifier(forward, SIMULATOR_MODEL), _train()
            )
    error = info.value
    assert error.transient and error.attempts == 3
    assert (error.phase, error.stage) == ("training step", "backward")
    assert isinstance(error.__cause__, openai.APIConnectionError)
    assert (
        f"LM client: afnio's backward client OpenAI(base_url='http://127.0.0.1:{port}/v1/'"
        in str(error)
    )


def test_a_401_of_the_backward_client_is_not_retried(
    sim: Simulator, tmp_path: Path
) -> None:
    requests: list[httpx.Request] = []

    def unauthorized(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(401, json={"error": {"message": "Incorrect API key"}})

    transport = httpx.AsyncClient(transport=httpx.MockTransport(unauthorized))
    with (
        OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as forward,
        OpenAI(
            base_url="http://auth.invalid/v1", api_key="sk-bad", http_client=transport
        ) as backward,
    ):
        afnio.set_backward_model_client(
            backward, completion_args={"model": SIMULATOR_MODEL}
        )
        with pytest.raises(StepError, match="AuthenticationError") as info:
            _trainer(tmp_path).fit(
                SentimentClassifier(forward, SIMULATOR_MODEL), _train()
            )
    assert len(requests) == 1  # not retried (neither by the SDK nor by the Trainer)
    assert info.value.stage == "backward" and not info.value.transient
    assert "afnio's backward client OpenAI(base_url='http://auth.invalid/v1/'" in str(
        info.value
    )


def test_afnio_clients_name_themselves_on_a_connection_error() -> None:
    port = _closed_port()
    url = f"http://127.0.0.1:{port}/v1"
    with (
        OpenAI(base_url=url, api_key="sk-secret-123", max_retries=0) as down,
        pytest.raises(openai.APIConnectionError) as info,
        lm_phase("optimizer"),
    ):
        down.chat([{"role": "user", "content": "hi"}], model=SIMULATOR_MODEL)
    notes = getattr(info.value, "__notes__", [])
    assert notes == [
        f"LM client: afnio's optimizer client OpenAI(base_url='{url}/', "
        "api_key='<redacted>')"
    ]


# -- unusable answers of LM libraries, and other libraries' HTTP errors ---------------


class _Answer(pydantic.BaseModel):
    sentiment: str


def _validation_error_in(module: str) -> pydantic.ValidationError:
    """A pydantic ValidationError of a malformed answer, raised by code of
    ``module`` (as the openai SDK's structured output raises it)."""
    scope: dict[str, Any] = {"__name__": module, "Answer": _Answer}
    code = "def parse(text):\n    return Answer.model_validate_json(text)\n"
    exec(compile(code, f"<{module}>", "exec"), scope)
    try:
        scope["parse"]('{"sentiment"')
    except pydantic.ValidationError as e:
        return e
    raise AssertionError("the answer parsed")


def _foreign(
    module: str, name: str, base: type[BaseException] = Exception, **attrs: Any
) -> BaseException:
    """An exception of class ``module.name`` (a library that need not be
    installed), with ``attrs``."""
    cls = type(name, (base,), {"__module__": module})
    error = cls("failed")
    for key, value in attrs.items():
        setattr(error, key, value)
    return error


class _Response:
    def __init__(self, status_code: int) -> None:
        self.status_code = status_code


@pytest.mark.parametrize(
    "error",
    [
        _foreign("langchain_core.exceptions", "OutputParserException", ValueError),
        _foreign("dspy.utils.exceptions", "AdapterParseError", ValueError),
        _validation_error_in("openai.lib._parsing._completions"),
        _validation_error_in("langchain_core.output_parsers.pydantic"),
        _raised_from(
            _foreign("langchain_core.exceptions", "OutputParserException", ValueError),
            _validation_error_in("x"),
        ),
        _foreign("somesdk.errors", "ServiceError", status_code=503),
        _foreign("somesdk.errors", "Throttled", code=429),
        _foreign("somesdk.errors", "Conflict", status=409),
        _foreign("somesdk.errors", "HTTPFailure", response=_Response(502)),
        _foreign("requests.exceptions", "HTTPError", OSError, response=_Response(503)),
    ],
    ids=[
        "OutputParserException",
        "AdapterParseError",
        "ValidationError in openai",
        "ValidationError in a langchain parser",
        "a parser error raised from a ValidationError",
        "status_code 503",
        "code 429",
        "status 409",
        "response.status_code 502",
        "requests HTTPError 503",
    ],
)
def test_unusable_answers_and_other_libraries_transient_errors_are_retried(
    error: BaseException,
) -> None:
    assert _is_service_failure(error)


@pytest.mark.parametrize(
    "error",
    [
        _validation_error_in(__name__),  # the user's own model, in a metric
        _validation_error_in("myapp.metrics"),
        _foreign("somesdk.errors", "NotFound", status_code=404),
        _foreign("somesdk.errors", "Denied", code=401),
        _foreign("requests.exceptions", "HTTPError", OSError, response=_Response(400)),
        ValueError("bad row"),  # a programming error with no status
        _foreign("builtins", "Weird", ValueError, code=503),  # a bug, whatever attrs
    ],
    ids=[
        "ValidationError of the user's code",
        "ValidationError of an app module",
        "status_code 404",
        "code 401",
        "requests HTTPError 400",
        "ValueError",
        "a ValueError with a code",
    ],
)
def test_client_errors_and_the_users_validation_errors_are_not_retried(
    error: BaseException,
) -> None:
    assert not _is_service_failure(error)


def _module(name: str, **classes: type[BaseException]) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, cls in classes.items():
        cls.__module__ = name
        setattr(module, key, cls)
    return module


def test_requests_and_aiohttp_connection_errors_are_retried_without_importing_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the libraries as the Trainer finds them, in sys.modules (their hierarchies:
    # neither subclasses the builtin ConnectionError)
    class RequestException(OSError): ...

    class RequestsConnectionError(RequestException): ...

    class Timeout(RequestException): ...

    class ReadTimeout(Timeout): ...

    class ClientError(Exception): ...

    class ClientConnectionError(ClientError): ...

    class ServerDisconnectedError(ClientConnectionError): ...

    class ServerTimeoutError(ClientError): ...  # (simplified)

    errors = [
        RequestsConnectionError("reset"),
        ReadTimeout("slow"),
        ServerDisconnectedError("closed"),
        ClientConnectionError("refused"),
        ServerTimeoutError("slow"),
    ]
    assert not any(_is_service_failure(e) for e in errors)  # libraries not loaded
    monkeypatch.setitem(
        sys.modules,
        "requests.exceptions",
        _module(
            "requests.exceptions",
            RequestException=RequestException,
            ConnectionError=RequestsConnectionError,
            Timeout=Timeout,
        ),
    )
    monkeypatch.setitem(
        sys.modules,
        "aiohttp",
        _module(
            "aiohttp",
            ClientError=ClientError,
            ClientConnectionError=ClientConnectionError,
            ServerDisconnectedError=ServerDisconnectedError,
            ServerTimeoutError=ServerTimeoutError,
        ),
    )
    assert all(_is_service_failure(e) for e in errors)
    assert all(is_provider_error(e) for e in errors)  # the client gets named
    assert not _is_service_failure(RequestException("invalid URL"))


def test_a_step_error_says_attempts_and_shortens_a_long_list_of_rows() -> None:
    cause = tag_sample(KeyError("k"), dataset="trainset", index=range(24))
    error = StepError(cause, phase="validation", stage="forward", batch_index=0)
    assert "on one of trainset[0, 1, 2, 3, 4, ... (24 rows)] (batch 0)" in str(error)
    assert error.samples == tuple(range(24))  # the attribute keeps them all
    few = StepError(
        tag_sample(KeyError("k"), dataset="trainset", index=[3, 4]),
        phase="validation",
    )
    assert "on one of trainset[3, 4]" in str(few)
    transient = StepError(TimeoutError(), phase="test", attempts=3, transient=True)
    assert str(transient).startswith("The test failed after 3 attempts: TimeoutError")
