"""MLflowLogger against a local SQLite tracking store (no server): params, per-step
metrics and cost, parameter texts as artifacts, final prompts in the prompt registry,
resume, and a failing store that never stops training."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

mlflow = pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402

from afnio._template import render  # noqa: E402
from afnio.testing import SIMULATOR_MODEL  # noqa: E402
from afnio.trainer import Trainer  # noqa: E402
from afnio.trainer.mlflow_logger import MLflowLogger  # noqa: E402
from afnio.utils.data import DataLoader  # noqa: E402
from benchmarks.common import simulated  # noqa: E402
from benchmarks.resume_kills import MESSAGES, Messages  # noqa: E402
from examples.facility_support import SentimentClassifier  # noqa: E402

SYSTEM_0 = "Classify the sentiment of {message}."
SYSTEM_1 = 'Classify the sentiment of {message}. Answer {{"label": "positive"}}.'
SYSTEM_3 = (
    'Classify the sentiment of {message}; "awful" means negative. '
    'Answer {{"label": "<label>"}}.'
)
STYLE = "Be terse."
SECRET = "sk-proj-abcdefghijklmnopqrstuvwx1234567890"


class Store:
    """One SQLite tracking store per module (its first connection migrates, ~3 s)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.artifacts = root / "artifacts"
        self.client = MlflowClient(tracking_uri=self.uri)

    def logger(self, **kwargs: Any) -> MLflowLogger:
        kwargs.setdefault("experiment", "afnio-tests")
        return MLflowLogger(
            tracking_uri=self.uri, artifact_location=str(self.artifacts), **kwargs
        )

    def artifacts_of(self, run_id: str, path: str | None = None) -> list[str]:
        found = []
        for item in self.client.list_artifacts(run_id, path):
            found += (
                self.artifacts_of(run_id, item.path) if item.is_dir else [item.path]
            )
        return sorted(found)

    def text(self, run_id: str, path: str) -> str:
        return mlflow.artifacts.load_text(
            f"{self.client.get_run(run_id).info.artifact_uri}/{path}"
        )

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store(tmp_path_factory.mktemp("mlflow"))


def _header() -> dict[str, Any]:
    return {
        "type": "header",
        "schema": "afnio.run_log/1",
        "afnio": "0.1.0",
        "started": "2025-01-01T00:00:00.000+00:00",
        "max_epochs": 1,
        "batch_size": 2,
        "train_size": 6,
        "val_size": 2,
        "optimizer": {
            "class": "TGD",
            "momentum": 0,
            "on_error": "raise",
            "models": ["afnio-sim-1"],
            "constraints": "Keep {message}. " + "x" * 7000,
            "completion_args": {"api_key": SECRET},
        },
        "parameters": [
            {"name": "system_prompt", "role": "system prompt", "value": SYSTEM_0},
            {"name": "style", "role": "style", "value": STYLE},
        ],
    }


def _phase(phase: str, calls: int, cost: float) -> dict[str, Any]:
    return {
        "phase": phase,
        "model": "afnio-sim-1",
        "calls": calls,
        "prompt_tokens": 100 * calls,
        "completion_tokens": 10 * calls,
        "cost": cost,
    }


def _step(step: int, before: str, after: str | None, total: float) -> dict[str, Any]:
    status = "updated" if after is not None else "no_feedback"
    return {
        "type": "step",
        "step": step,
        "epoch": 1,
        "batch": step - 1,
        "samples": {"dataset": "train", "indices": [0, 1], "indexed_by": "dataset"},
        "metrics": {"accuracy": step / 4},
        "reverted": None,
        "params": [
            {
                "name": "system_prompt",
                "before": before,
                "after": after,
                "status": status,
                "answer": {"error": None, "attempts": 1},
                "feedback": [
                    {"text": "Say negative for awful.", "samples": [1], "count": 1}
                ],
                "feedback_shown": "Say negative for awful.",
            },
            {
                "name": "style",
                "before": STYLE,
                "after": None,
                "status": "no_feedback",
                "answer": None,
                "feedback": [],
                "feedback_shown": "",
            },
        ],
        "cost": {
            "total_usd": total,
            "step_usd": 0.003,
            "by_phase": [
                _phase("forward", 2, 0.001),
                _phase("backward", 2, 0.0015),
                _phase("optimizer", 1, 0.0005),
            ],
        },
        "ts": "2025-01-01T00:00:01.000+00:00",
    }


def _validation(step: int, kind: str, accuracy: float) -> dict[str, Any]:
    return {
        "type": "validation",
        "step": step,
        "epoch": 0 if step == 0 else 1,
        "kind": kind,
        "metrics": {"accuracy": accuracy},
        "cost": {
            "total_usd": 0.001 + 0.003 * step,
            "pass_usd": 0.001,
            "by_phase": [_phase("forward", 2, 0.001)],
        },
        "ts": "2025-01-01T00:00:02.000+00:00",
    }


def _end(status: str = "completed", final: str = SYSTEM_3) -> dict[str, Any]:
    return {
        "type": "end",
        "ts": "2025-01-01T00:00:09.000+00:00",
        "status": status,
        "stopped_reason": None if status == "completed" else f"stopped: {status}",
        "total_cost": 0.0115,
        "steps": 3,
        "final": [
            {"name": "system_prompt", "value": final},
            {"name": "style", "value": STYLE},
        ],
    }


def _feed(logger: MLflowLogger, tmp_path: Path, status: str = "completed") -> str:
    """A 3-step run: initial validation, steps 1 (changes), 2 (no change), 3 (changes),
    the epoch's validation, the end."""
    logger.start(tmp_path, _header(), None)
    logger.log_validation(_validation(0, "initial", 0.25))
    logger.log_step(_step(1, SYSTEM_0, SYSTEM_1, 0.004))
    logger.log_step(_step(2, SYSTEM_1, None, 0.007))
    logger.log_step(_step(3, SYSTEM_1, SYSTEM_3, 0.010))
    logger.log_validation(_validation(3, "epoch", 0.75))
    logger.finish(_end(status))
    assert logger.run_id is not None
    return logger.run_id


def test_mlflow_logger_logs_params_step_metrics_cost_and_texts_to_sqlite(
    store: Store, tmp_path: Path
) -> None:
    run_id = _feed(store.logger(run_name="three-steps"), tmp_path)
    run = store.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "three-steps"
    params = run.data.params
    assert params["optimizer"] == "TGD"
    assert params["max_epochs"] == "1" and params["batch_size"] == "2"
    assert params["parameter.system_prompt.role"] == "system prompt"
    assert params["optimizer.models"] == '["afnio-sim-1"]'
    assert len(params["optimizer.constraints"]) == 6000  # cut to MLflow's limit
    assert SECRET not in str(params)
    assert params["optimizer.completion_args.api_key"] == "<redacted>"

    assert store.history(run_id, "train_accuracy") == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert store.history(run_id, "val_accuracy") == [(0, 0.25), (3, 0.75)]
    assert [s for s, _ in store.history(run_id, "step_cost_usd")] == [1, 2, 3]
    assert store.history(run_id, "cost_backward_usd")[0] == (1, 0.0015)
    assert store.history(run_id, "cost_evaluator_usd")[0] == (1, 0.0)  # no call
    assert store.history(run_id, "val_cost_usd") == [(0, 0.001), (3, 0.001)]
    assert store.history(run_id, "step_calls")[0] == (1, 5.0)
    assert store.history(run_id, "params_updated") == [(1, 1.0), (2, 0.0), (3, 1.0)]
    assert (3, 0.010) in store.history(run_id, "cost_usd")
    assert run.data.metrics["cost_usd"] == pytest.approx(0.0115)  # the end's total

    artifacts = store.artifacts_of(run_id)
    assert artifacts == [
        "final/style.txt",
        "final/system_prompt.txt",
        "parameters/style/step_00000.txt",  # unchanged: only its initial text
        "parameters/system_prompt/step_00000.txt",
        "parameters/system_prompt/step_00001.txt",
        "parameters/system_prompt/step_00003.txt",  # step 2 changed nothing
    ]
    assert store.text(run_id, "parameters/system_prompt/step_00000.txt") == SYSTEM_0
    assert store.text(run_id, "parameters/system_prompt/step_00003.txt") == SYSTEM_3
    assert store.text(run_id, "final/system_prompt.txt") == SYSTEM_3
    assert run.data.tags["afnio.run_dir"] == str(tmp_path.resolve())
    experiment = store.client.get_experiment(run.info.experiment_id)
    assert Path(experiment.artifact_location.removeprefix("file://")) == store.artifacts


def test_final_prompts_become_registry_versions_loadable_by_uri(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logger = store.logger(prompt_prefix="registry-test")
    run_id = _feed(logger, tmp_path)
    assert logger.registered_prompts == {
        "system_prompt": "prompts:/registry-test.system_prompt/1",
        "style": "prompts:/registry-test.style/1",
    }
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    prompt = mlflow.genai.load_prompt("prompts:/registry-test.system_prompt/1")
    assert prompt.template == (
        'Classify the sentiment of {{message}}; "awful" means negative. '
        'Answer {"label": "<label>"}.'
    )
    values = {"message": "The lift is {broken}."}
    assert prompt.format(**values) == render(SYSTEM_3, values)
    assert prompt.tags["afnio.parameter"] == "system_prompt"
    assert prompt.tags["afnio.run_id"] == run_id
    assert run_id in prompt.commit_message
    tags = store.client.get_run(run_id).data.tags
    assert (
        tags["afnio.prompt.system_prompt"] == "prompts:/registry-test.system_prompt/1"
    )
    assert "registry-test.system_prompt" in tags["mlflow.linkedPrompts"]

    # a second run's final prompt becomes version 2 of the same prompt
    _feed(store.logger(prompt_prefix="registry-test"), tmp_path)
    assert mlflow.genai.load_prompt("prompts:/registry-test.system_prompt/2").format(
        **values
    ) == render(SYSTEM_3, values)


def test_a_text_mlflow_would_misread_is_not_registered_but_kept_as_an_artifact(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    final = "Write {{{{message}}}} literally, then {message}."
    logger = store.logger(prompt_prefix="misread-test")
    logger.start(tmp_path, _header(), None)
    with caplog.at_level(logging.WARNING, logger="afnio.trainer"):
        logger.finish(_end(final=final))
    warned = [r.getMessage() for r in caplog.records]
    assert any(
        "'system_prompt' is not registered" in m and "{{{{message}}}}" in m
        for m in warned
    ), warned
    assert logger.registered_prompts == {"style": "prompts:/misread-test.style/1"}
    assert store.text(logger.run_id, "final/system_prompt.txt") == final
    assert store.client.get_run(logger.run_id).info.status == "FINISHED"


@pytest.mark.parametrize(
    ("status", "mlflow_status"), [("failed", "FAILED"), ("interrupted", "KILLED")]
)
def test_a_failed_or_interrupted_run_ends_so_and_registers_no_prompt(
    store: Store, tmp_path: Path, status: str, mlflow_status: str
) -> None:
    logger = store.logger(prompt_prefix=f"{status}-test")
    run_id = _feed(logger, tmp_path, status=status)
    run = store.client.get_run(run_id)
    assert run.info.status == mlflow_status
    assert run.data.tags["afnio.status"] == status
    assert run.data.tags["afnio.stopped_reason"] == f"stopped: {status}"
    assert logger.registered_prompts == {}


def test_a_resumed_fit_continues_the_same_mlflow_run(
    store: Store, tmp_path: Path
) -> None:
    first = store.logger(prompt_prefix="resume-test")
    first.start(tmp_path, _header(), None)
    first.log_step(_step(1, SYSTEM_0, SYSTEM_1, 0.004))
    state = first.state_dict()  # what the step's checkpoint stores
    assert state == {"run_id": first.run_id}
    first.finish(_end("interrupted"))
    assert store.client.get_run(first.run_id).info.status == "KILLED"

    second = store.logger(prompt_prefix="resume-test")
    header = {**_header(), "resume": {"from_checkpoint": "x.hf", "step": 1}}
    second.start(tmp_path, header, state)
    assert second.run_id == first.run_id
    assert store.client.get_run(second.run_id).info.status == "RUNNING"
    second.log_step(_step(2, SYSTEM_1, SYSTEM_3, 0.007))
    second.finish(_end())
    run = store.client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["afnio.resumes"] == "1"
    assert store.history(first.run_id, "train_accuracy") == [(1, 0.25), (2, 0.5)]
    assert "parameters/system_prompt/step_00002.txt" in store.artifacts_of(
        run.info.run_id
    )
    assert second.registered_prompts["system_prompt"].endswith("/1")


def test_a_resumed_fit_does_not_log_the_redone_steps_metrics_twice(
    store: Store, tmp_path: Path
) -> None:
    first = store.logger(register_prompts=False)
    first.start(tmp_path, _header(), None)
    first.log_validation(_validation(0, "initial", 0.25))
    first.log_step(_step(1, SYSTEM_0, SYSTEM_1, 0.004))
    state = first.state_dict()  # the checkpoint after step 1
    first.log_step(_step(2, SYSTEM_1, None, 0.007))
    first.log_step(_step(3, SYSTEM_1, SYSTEM_3, 0.010))  # then the process is killed

    second = store.logger(register_prompts=False)
    header = {**_header(), "resume": {"from_checkpoint": "x.hf", "step": 1}}
    header["parameters"][0]["value"] = SYSTEM_1
    second.start(tmp_path, header, state)
    assert second.run_id == first.run_id
    redone = _step(2, SYSTEM_1, None, 0.008)
    redone["metrics"] = {"accuracy": 0.4}  # the redo scored differently
    second.log_step(redone)
    second.log_step(_step(3, SYSTEM_1, SYSTEM_3, 0.011))
    second.log_step(_step(4, SYSTEM_3, None, 0.014))
    second.log_validation(_validation(4, "epoch", 0.75))
    second.finish(_end())

    run_id = first.run_id
    # one point per step: the redone steps 2 and 3 keep the points first logged
    assert store.history(run_id, "train_accuracy") == [
        (1, 0.25),
        (2, 0.5),
        (3, 0.75),
        (4, 1.0),
    ]
    assert [s for s, _ in store.history(run_id, "step_cost_usd")] == [1, 2, 3, 4]
    assert store.history(run_id, "val_accuracy") == [(0, 0.25), (4, 0.75)]
    tags = store.client.get_run(run_id).data.tags
    assert "up to step 3" in tags["afnio.resume.1"]


def test_default_prompt_names_follow_the_experiment_so_projects_do_not_collide(
    store: Store, tmp_path: Path
) -> None:
    support = store.logger(experiment="Support bot v2")
    assert support.prompt_prefix == "Support_bot_v2"
    _feed(support, tmp_path)
    sales = store.logger(experiment="sales.bot")
    _feed(sales, tmp_path)
    assert support.registered_prompts["system_prompt"] == (
        "prompts:/Support_bot_v2.system_prompt/1"
    )
    assert sales.registered_prompts["system_prompt"] == (
        "prompts:/sales.bot.system_prompt/1"
    )
    assert store.logger(prompt_prefix="shared").prompt_prefix == "shared"


def test_a_reverted_step_keeps_the_restored_text_and_registers_the_end_final(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rejected = "Be very long and rude about {message}."
    logger = store.logger(prompt_prefix="reverted-test")
    logger.start(tmp_path, _header(), None)
    logger.log_step(_step(1, SYSTEM_0, SYSTEM_1, 0.004))
    step = _step(2, SYSTEM_1, rejected, 0.007)
    step["reverted"] = 1  # the revert check rejected the step: back at SYSTEM_1
    logger.log_step(step)
    logger.finish(_end(final=SYSTEM_1))
    run_id = logger.run_id
    texts = [
        p
        for p in store.artifacts_of(run_id)
        if p.startswith("parameters/system_prompt/")
    ]
    assert texts == [
        "parameters/system_prompt/step_00000.txt",
        "parameters/system_prompt/step_00001.txt",
        "parameters/system_prompt/step_00002_reverted.txt",
    ]
    assert store.text(run_id, texts[-1]) == rejected
    assert store.text(run_id, "final/system_prompt.txt") == SYSTEM_1
    assert store.history(run_id, "reverted") == [(2, 1.0)]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    prompt = mlflow.genai.load_prompt(logger.registered_prompts["system_prompt"])
    values = {"message": "awful"}
    assert prompt.format(**values) == render(SYSTEM_1, values)


def test_resuming_a_deleted_mlflow_run_starts_a_new_one(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = store.logger(register_prompts=False)
    first.start(tmp_path, _header(), None)
    store.client.delete_run(first.run_id)
    second = store.logger(register_prompts=False)
    with caplog.at_level(logging.WARNING, logger="afnio.trainer"):
        second.start(tmp_path, _header(), first.state_dict())
    assert "cannot resume MLflow run" in caplog.text
    assert second.run_id not in (None, first.run_id)
    second.finish(_end())
    assert store.client.get_run(second.run_id).info.status == "FINISHED"


def test_log_records_stores_every_record_as_json(store: Store, tmp_path: Path) -> None:
    run_id = _feed(store.logger(log_records=True, register_prompts=False), tmp_path)
    records = [p for p in store.artifacts_of(run_id) if p.startswith("records/")]
    assert records == [
        "records/end.json",
        "records/header.json",
        "records/step_00001.json",
        "records/step_00002.json",
        "records/step_00003.json",
        "records/validation_epoch_step_00003.json",
        "records/validation_initial_step_00000.json",
    ]
    assert SECRET not in store.text(run_id, "records/header.json")


def test_tracking_uri_none_uses_mlflow_tracking_uri_from_the_environment(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    logger = MLflowLogger(
        experiment="afnio-env-test",
        register_prompts=False,
        artifact_location=str(tmp_path / "artifacts"),
    )
    logger.start(tmp_path, _header(), None)
    logger.finish(_end())
    run = store.client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(tmp_path / "artifacts")


def test_missing_mlflow_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    with pytest.raises(ImportError, match=r"pip install .*\[mlflow\]"):
        MLflowLogger()


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="prompt_prefix"):
        MLflowLogger(prompt_prefix="my prompts")
    with pytest.raises(TypeError, match="tracking_uri"):
        MLflowLogger(tracking_uri=Path("mlflow.db"))  # type: ignore[arg-type]


def test_a_bad_tracking_uri_warns_and_never_raises_out_of_the_logger(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logger = MLflowLogger(tracking_uri="no-such-scheme://nowhere")
    with caplog.at_level(logging.WARNING, logger="afnio.trainer"):
        logger.start(tmp_path, _header(), None)
        logger.log_step(_step(1, SYSTEM_0, SYSTEM_1, 0.004))
        logger.log_validation(_validation(1, "epoch", 0.5))
        logger.finish(_end())
    assert logger.state_dict() == {"run_id": None}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "MLflowLogger.start failed" in messages[0]


def test_a_call_the_store_rejects_warns_and_the_next_call_tries_again(
    store: Store,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.exceptions import MlflowException

    logger = store.logger(register_prompts=False)
    logger.start(tmp_path, _header(), None)

    def rejected(*args: Any, **kwargs: Any) -> None:
        raise MlflowException("Invalid value for metric", error_code="BAD_REQUEST")

    monkeypatch.setattr(logger._client, "log_batch", rejected)
    with caplog.at_level(logging.WARNING, logger="afnio.trainer"):
        logger.log_step(_step(1, SYSTEM_0, SYSTEM_1, 0.004))
    assert "MLflowLogger.log_step failed (MlflowException" in caplog.text
    assert not logger.disabled
    monkeypatch.undo()
    logger.log_step(_step(2, SYSTEM_1, None, 0.007))
    logger.finish(_end())
    assert store.history(logger.run_id, "train_accuracy") == [(2, 0.5)]


def test_a_store_unreachable_mid_run_turns_the_logger_off_for_the_rest_of_the_fit(
    store: Store,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    logger = store.logger(register_prompts=False)
    logger.start(tmp_path, _header(), None)
    calls: list[str] = []

    def down(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> None:
            calls.append(name)
            raise ConnectionError("tracking server down")

        return call

    for name in ("log_batch", "log_text", "set_tag", "set_terminated", "log_dict"):
        monkeypatch.setattr(logger._client, name, down(name))
    with caplog.at_level(logging.WARNING, logger="afnio.trainer"):
        logger.log_step(_step(1, SYSTEM_0, SYSTEM_1, 0.004))
        logger.log_step(_step(2, SYSTEM_1, SYSTEM_3, 0.007))
        logger.log_validation(_validation(2, "epoch", 0.5))
        logger.finish(_end())
    assert calls == ["log_batch"]  # the first failure; nothing tried after it
    assert logger.disabled
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1, warned
    assert "off for the rest of this fit" in warned[0]
    assert "log_run_log" in warned[0] and str(tmp_path) in warned[0]
    assert logger.state_dict() == {"run_id": logger.run_id}  # a resume may reuse it


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def _count_http_requests(
    monkeypatch: pytest.MonkeyPatch, seen_env: list[dict[str, str | None]]
) -> Iterator[list[str]]:
    """Count the HTTP requests MLflow makes (one per request, retries inside it) and
    record the MLFLOW_HTTP_REQUEST_* settings each one ran with."""
    import requests

    urls: list[str] = []
    real = requests.Session.request

    def request(self: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        urls.append(url)
        seen_env.append(
            {
                key: os.environ.get(key)
                for key in (
                    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                    "MLFLOW_HTTP_REQUEST_TIMEOUT",
                )
            }
        )
        return real(self, method, url, *args, **kwargs)

    monkeypatch.setattr(requests.Session, "request", request)
    yield urls


def test_an_unreachable_tracking_server_gives_up_quickly_and_is_not_tried_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")  # the user's own
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    logger = MLflowLogger(tracking_uri=f"http://127.0.0.1:{_free_port()}")
    seen_env: list[dict[str, str | None]] = []
    with (
        _count_http_requests(monkeypatch, seen_env) as urls,
        caplog.at_level(logging.WARNING, logger="afnio.trainer"),
    ):
        began = time.monotonic()
        logger.start(tmp_path, _header(), None)
        assert time.monotonic() - began < 60  # MLflow's defaults: about 4 minutes
        tried = len(urls)
        logger.log_validation(_validation(0, "initial", 0.25))
        logger.log_step(_step(1, SYSTEM_0, SYSTEM_1, 0.004))
        logger.finish(_end())
    assert tried >= 1 and len(urls) == tried  # nothing tried after the failure
    assert logger.disabled and logger.run_id is None
    assert seen_env[0] == {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    }
    # the user's environment is as it was
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "7"
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ
    warned = [r.getMessage() for r in caplog.records if r.name == "afnio.trainer"]
    assert len(warned) == 1 and "cannot be reached" in warned[0], warned


def test_a_server_that_never_answers_is_given_up_after_request_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as server:  # accepts connections, never answers
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        logger = MLflowLogger(
            tracking_uri=f"http://127.0.0.1:{port}", request_timeout=1, max_retries=0
        )
        began = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="afnio.trainer"):
            logger.start(tmp_path, _header(), None)
        assert time.monotonic() - began < 30  # MLflow's defaults: 120 s per try
    assert logger.disabled
    assert "cannot be reached" in caplog.text


def test_request_timeout_and_max_retries_are_checked() -> None:
    with pytest.raises(ValueError, match="request_timeout"):
        MLflowLogger(request_timeout=0)
    with pytest.raises(ValueError, match="max_retries"):
        MLflowLogger(max_retries=11)
    with pytest.raises(ValueError, match="max_retries"):
        MLflowLogger(max_retries=1.5)  # type: ignore[arg-type]
    assert MLflowLogger(request_timeout=2.5).request_timeout == 3


def test_the_run_log_of_a_fit_without_mlflow_can_be_logged_later(
    store: Store, tmp_path: Path
) -> None:
    records = [
        _header(),
        _validation(0, "initial", 0.25),
        _step(1, SYSTEM_0, SYSTEM_1, 0.004),
        _step(2, SYSTEM_1, SYSTEM_3, 0.007),
        _end(),
        _validation(2, "test", 0.5),
    ]
    run_log = tmp_path / "run_log.jsonl"
    lines = [json.dumps(r) for r in records]
    run_log.write_text("\n".join(lines) + "\n" + '{"type": "st', encoding="utf-8")
    run_id = store.logger(register_prompts=False).log_run_log(tmp_path)
    assert run_id is not None
    run = store.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert store.history(run_id, "train_accuracy") == [(1, 0.25), (2, 0.5)]
    assert store.history(run_id, "test_accuracy") == [(2, 0.5)]
    assert store.text(run_id, "final/system_prompt.txt") == SYSTEM_3
    with pytest.raises(FileNotFoundError, match=r"run_log\.jsonl"):
        store.logger().log_run_log(tmp_path / "nowhere")


def _fit(
    root: Path, logger: MLflowLogger, epochs: int, ckpt: Path | None = None
) -> str:
    """Fit the example classifier on the simulator; test it after; its final prompt."""
    with simulated() as (_, client):
        agent = SentimentClassifier(client, SIMULATOR_MODEL)
        train = DataLoader(Messages(MESSAGES[:8]), batch_size=4, shuffle=True, seed=3)
        val = DataLoader(Messages(MESSAGES[8:]), batch_size=4)
        trainer = Trainer(
            max_epochs=epochs,
            default_root_dir=root,
            enable_progress_bar=False,
            enable_agent_summary=False,
            loggers=[logger],
        )
        trainer.fit(agent, train, val, ckpt_path=ckpt)
        trainer.test(agent, val)
        return agent.system_prompt.data


def test_trainer_fit_tracks_the_run_in_mlflow_and_a_resumed_fit_continues_it(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = store.logger(prompt_prefix="fit-test")
    _fit(tmp_path, first, epochs=1)
    run_id = first.run_id
    assert run_id is not None
    assert store.client.get_run(run_id).info.status == "FINISHED"
    ckpt = tmp_path / "checkpoints" / "checkpoint_epoch1.hf"
    resumed = store.logger(prompt_prefix="fit-test")
    final = _fit(tmp_path, resumed, epochs=2, ckpt=ckpt)

    assert resumed.run_id == run_id  # the checkpoint held the MLflow run id
    run = store.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["afnio.resumes"] == "1"
    assert run.data.params["optimizer"] == "TGD"
    assert [s for s, _ in store.history(run_id, "train_accuracy")] == [1, 2, 3, 4]
    assert [s for s, _ in store.history(run_id, "val_accuracy")] == [2, 4]
    assert store.history(run_id, "test_accuracy")  # trainer.test() after fit
    costs = [v for _, v in store.history(run_id, "cost_usd")]
    assert costs == sorted(costs) and costs[-1] > 0
    texts = [
        p
        for p in store.artifacts_of(run_id)
        if p.startswith("parameters/system_prompt/")
    ]
    assert texts[0] == "parameters/system_prompt/step_00000.txt" and len(texts) > 1
    assert store.text(run_id, texts[-1]) == final
    assert store.text(run_id, "final/system_prompt.txt") == final

    # each completed fit registered its final prompt: the resumed one is version 2
    assert resumed.registered_prompts == {
        "system_prompt": "prompts:/fit-test.system_prompt/2"
    }
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    prompt = mlflow.genai.load_prompt("prompts:/fit-test.system_prompt/2")
    values = {"message": "The lift is awful."}
    assert prompt.format(**values) == render(final, values)
