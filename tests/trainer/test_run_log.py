"""The run log (``run_log.jsonl``, schema ``afnio.run_log/1``): one record per
optimizer step with each parameter before and after, its feedback and the samples it
came from, the optimizer's answer and the cost by phase; validation records; the
truncation budget; no credentials; loggers that fail never stop a run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

import afnio
from afnio._secrets import find_secrets
from afnio.autodiff.provenance import FeedbackItem
from afnio.errors import StepError
from afnio.models.openai import OpenAI
from afnio.testing import SIMULATOR_MODEL
from afnio.trainer import Trainer
from afnio.trainer import trainer as trainer_module
from afnio.trainer.loggers import CSVLogger, JsonlLogger
from afnio.trainer.run_log import (
    RUN_LOG_FILE,
    SCHEMA,
    STEP_BUDGET,
    RunLogWriter,
    feedback_entries,
    prepare_record,
    step_overhead,
)
from afnio.utils.data import DataLoader
from benchmarks.resume_kills import MESSAGES, Messages
from examples.facility_support import SentimentClassifier
from tests.trainer import _run_log_helpers

SECRET = "sk-proj-RunLogSecret0123456789"


sim, client = _run_log_helpers.sim, _run_log_helpers.client  # the fixtures


def _trainer(root: Path, **kwargs: Any) -> Trainer:
    return Trainer(
        max_epochs=kwargs.pop("max_epochs", 2),
        default_root_dir=root,
        enable_progress_bar=False,
        enable_agent_summary=False,
        enable_run_summary=False,
        **kwargs,
    )


def _loaders(batch_size: int = 4) -> tuple[DataLoader, DataLoader]:
    train = DataLoader(
        Messages(MESSAGES[:8]), batch_size=batch_size, shuffle=True, seed=3
    )
    return train, DataLoader(Messages(MESSAGES[8:]), batch_size=4)


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def _of(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r["type"] == kind]


def test_each_optimizer_step_writes_one_record_with_before_after_and_feedback(
    client: OpenAI, tmp_path: Path
) -> None:
    agent = SentimentClassifier(client, SIMULATOR_MODEL)
    start = agent.system_prompt.data
    train, val = _loaders()
    trainer = _trainer(tmp_path)
    trainer.fit(agent, train, val)

    assert trainer.run_log_path == tmp_path / RUN_LOG_FILE
    records = _records(trainer.run_log_path)
    assert all(next(iter(r)) == "type" for r in records)  # "type" first
    header, end = records[0], records[-1]
    assert header["type"] == "header" and header["schema"] == SCHEMA
    assert header["parameters"] == [
        {
            "name": "system_prompt",
            "role": "system prompt for sentiment classification",
            "value": start,
        }
    ]
    assert (header["batch_size"], header["train_size"], header["val_size"]) == (4, 8, 4)
    assert header["optimizer"]["class"] == "TGD"
    assert header["optimizer"]["models"] == [SIMULATOR_MODEL]

    steps = _of(records, "step")
    assert [(s["step"], s["epoch"], s["batch"]) for s in steps] == [
        (1, 1, 0),
        (2, 1, 1),
        (3, 2, 0),
        (4, 2, 1),
    ]
    value = start
    changed = 0
    for step in steps:
        (param,) = step["params"]
        assert param["name"] == "system_prompt"
        assert param["before"] == value  # each step starts where the last ended
        assert step["samples"]["indexed_by"] == "dataset"
        indices = step["samples"]["indices"]
        assert sorted(indices) == sorted(set(indices)) and len(indices) == 4
        assert set(indices) <= set(range(8))
        assert step["metrics"].keys() == {"loss", "accuracy"}
        if param["status"] == "updated":
            changed += 1
            assert param["after"] not in (None, param["before"])
            assert param["answer"] == {"error": None, "attempts": 1}
            assert param["feedback"], "an update comes from feedback"
            value = param["after"]
        else:
            assert param["after"] is None
        for item in param["feedback"]:
            assert item["text"] in param["feedback_shown"]
            assert item["count"] >= 1
            # the simulator's rule names a word of the message it is about
            word = item["text"].split('"')[1].lower()
            assert item["samples"], item
            assert set(item["samples"]) <= set(indices)
            assert all(word in MESSAGES[i][0].lower() for i in item["samples"])
    assert changed >= 1
    assert value == agent.system_prompt.data
    assert end["type"] == "end" and end["status"] == "completed"
    assert end["steps"] == 4
    assert end["final"] == [{"name": "system_prompt", "value": value}]
    assert end["total_cost"] == pytest.approx(trainer.total_cost)


class _GroupedJudge(SentimentClassifier):
    """Scored by exact match whose feedback calls cover three failed samples each."""

    def _step(self, batch: Any) -> dict[str, Any]:
        emails, (_urgency, sentiment, _categories) = batch
        score, explanation = self.exact_match(
            self(emails), sentiment, samples_per_call=3
        )
        return {"loss": (score, explanation)}


def test_feedback_lists_sample_indices_also_for_grouped_evaluator_calls(
    client: OpenAI, tmp_path: Path
) -> None:
    agent = _GroupedJudge(client, SIMULATOR_MODEL)
    train = DataLoader(Messages(MESSAGES), batch_size=6, shuffle=True, seed=5)
    trainer = _trainer(tmp_path, max_epochs=1, loggers=[])
    trainer.fit(agent, train)
    steps = _of(_records(trainer.run_log_path), "step")
    assert len(steps) == 2
    items = [item for s in steps for item in s["params"][0]["feedback"]]
    assert len(items) >= 3  # groups of 3 failures were asked in one call
    for step in steps:
        indices = step["samples"]["indices"]
        for item in step["params"][0]["feedback"]:
            assert item["samples"] and set(item["samples"]) <= set(indices)
            word = item["text"].split('"')[1].lower()
            assert all(word in MESSAGES[i][0].lower() for i in item["samples"])


def test_grouped_feedback_maps_positions_and_call_groups_to_dataset_indices() -> None:
    items = [
        FeedbackItem("Say A.", (0,), (0, 1, 2)),
        FeedbackItem("Say A.", (2,), (0, 1, 2)),
        FeedbackItem("Say B.", (1,), None),
        FeedbackItem("Say C.", None, None),
    ]
    assert feedback_entries(items, [10, 11, 12]) == [
        {
            "text": "Say A.",
            "samples": [10, 12],
            "call_samples": [10, 11, 12],
            "count": 2,
        },
        {"text": "Say B.", "samples": [11], "call_samples": None, "count": 1},
        {
            "text": "Say C.",
            "samples": None,
            "call_samples": None,
            "count": 1,
            "unknown": 1,
        },
    ]
    # no dataset indices: the in-batch positions stay
    assert feedback_entries(items[:1], None)[0]["samples"] == [0]


def test_validation_records_carry_scores_and_initial_validation_is_step_zero(
    client: OpenAI, tmp_path: Path
) -> None:
    agent = SentimentClassifier(client, SIMULATOR_MODEL)
    train, val = _loaders()
    trainer = _trainer(tmp_path)
    first = trainer.validate(agent, val)
    trainer.fit(agent, train, val)
    tested = trainer.test(agent, val)
    records = _records(trainer.run_log_path)
    validations = _of(records, "validation")
    assert [(v["kind"], v["step"], v["epoch"]) for v in validations] == [
        ("initial", 0, 0),
        ("epoch", 2, 1),
        ("epoch", 4, 2),
        ("test", 4, 2),
    ]
    assert records[1] == validations[0]  # right after the header
    assert validations[0]["metrics"] == {
        "loss": first["val_loss"],
        "accuracy": first["val_accuracy"],
    }
    for record, row in zip(validations[1:3], trainer.history, strict=True):
        assert record["metrics"] == {
            "loss": row["val_loss"],
            "accuracy": row["val_accuracy"],
        }
    assert validations[3]["metrics"]["accuracy"] == tested["test_accuracy"]
    assert records[-1] == validations[3]  # appended after the end record
    assert records[-2]["type"] == "end"
    # the cumulative total counts the initial validation, then the fit
    initial = validations[0]["cost"]
    assert initial["total_usd"] == pytest.approx(initial["pass_usd"])
    assert validations[2]["cost"]["total_usd"] == pytest.approx(
        initial["pass_usd"] + trainer.history[-1]["total_cost"]
    )


def test_cost_by_phase_per_step_sums_to_the_run_total(
    client: OpenAI, tmp_path: Path
) -> None:
    agent = SentimentClassifier(client, SIMULATOR_MODEL)
    train, val = _loaders()
    trainer = _trainer(tmp_path, revert_on_regression=True)
    trainer.fit(agent, train, val)
    records = _records(trainer.run_log_path)
    kinds = {v["kind"] for v in _of(records, "validation")}
    assert kinds == {"epoch", "revert_check"}
    assert all(s["reverted"] in (0, 1) for s in _of(records, "step"))
    summed: dict[tuple[str, str], list[float]] = {}
    for record in records:
        if record["type"] not in ("step", "validation"):
            continue
        cost = record["cost"]
        own = cost["step_usd"] if record["type"] == "step" else cost["pass_usd"]
        assert own == pytest.approx(sum(r["cost"] for r in cost["by_phase"]))
        for row in cost["by_phase"]:
            key = (row["phase"], row["model"])
            acc = summed.setdefault(key, [0, 0, 0, 0.0])
            acc[0] += row["calls"]
            acc[1] += row["prompt_tokens"]
            acc[2] += row["completion_tokens"]
            acc[3] += row["cost"]
    expected = {
        (r.phase, r.model): [r.calls, r.prompt_tokens, r.completion_tokens, r.cost]
        for r in trainer.phase_rows()
    }
    assert {"forward", "backward", "optimizer"} <= {phase for phase, _ in expected}
    assert summed.keys() == expected.keys()
    for key, want in expected.items():
        assert summed[key][:3] == want[:3], key
        assert summed[key][3] == pytest.approx(want[3]), key
    assert math.fsum(row[3] for row in summed.values()) == pytest.approx(
        trainer.total_cost
    )
    assert records[-2]["cost"]["total_usd"] == pytest.approx(trainer.total_cost)


def _huge_step(params: int = 3) -> dict[str, Any]:
    return {
        "type": "step",
        "step": 1,
        "epoch": 1,
        "batch": 0,
        "samples": {
            "dataset": "train",
            "indices": list(range(1000)),
            "indexed_by": "dataset",
        },
        "metrics": {"loss": 1.0, "note": "m" * 5000},
        "reverted": None,
        "params": [
            {
                "name": f"p{i}",
                "before": "B" * 100_000,
                "after": "A" * 100_000,
                "status": "failed",
                "answer": {
                    "error": "e" * 5000,
                    "attempts": 3,
                    "raw_answer": "r" * 9000,
                },
                "feedback": [
                    {
                        "text": f"feedback {j} " + "x" * 9000,
                        "samples": list(range(j, j + 500)),
                        "call_samples": list(range(600)),
                        "count": 1 + (j % 4),
                    }
                    for j in range(40)
                ],
                "feedback_shown": "s" * 50_000,
            }
            for i in range(params)
        ],
        "cost": {"total_usd": 1.0, "step_usd": 0.5, "by_phase": []},
        "ts": "2026-01-01T00:00:00+00:00",
    }


def test_step_record_stays_under_20kb_beyond_parameter_texts_and_lists_cuts(
    tmp_path: Path,
) -> None:
    record = _huge_step()
    prepared = prepare_record(record)
    assert step_overhead(prepared) <= STEP_BUDGET
    assert record["params"][0]["feedback_shown"] == "s" * 50_000  # not changed
    cut = prepared["truncated"]
    for i, param in enumerate(prepared["params"]):
        # the parameter texts are never cut
        assert param["before"] == "B" * 100_000 and param["after"] == "A" * 100_000
        assert cut[f"params[{i}].feedback_shown"] == 50_000
        assert param["feedback_shown"].endswith("chars]")
        assert cut[f"params[{i}].answer.error"] == 5000
        assert cut[f"params[{i}].answer.raw_answer"] == 9000
        assert cut[f"params[{i}].feedback"] == 40
        kept = param["feedback"]
        assert param["feedback_dropped"] == 40 - len(kept)
        counts = [item["count"] for item in kept]
        assert counts == sorted(counts, reverse=True)  # the least repeated dropped
        for item in kept:
            assert len(item["text"]) <= 2000 and "…[+" in item["text"]
            assert len(item["samples"]) <= 200 and item["samples_more"] == 300
    assert cut["samples.indices"] == 1000
    assert prepared["samples"]["indices_more"] == 800
    assert prepare_record(prepared) == prepared  # preparing again changes nothing

    # the writer applies the same rules to what it is handed
    writer = RunLogWriter()
    writer.start(tmp_path, {"schema": SCHEMA}, None)
    writer.log_step(record)
    writer.close()
    line = (tmp_path / RUN_LOG_FILE).read_text("utf-8").splitlines()[1]
    texts = 2 * 3 * (100_000 + 2)  # three befores and afters, with their quotes
    assert len(line.encode("utf-8")) - texts <= STEP_BUDGET


def test_a_small_step_record_is_written_as_it_is() -> None:
    record = _huge_step(params=1)
    param = record["params"][0]
    param["feedback"] = param["feedback"][:2]
    for item in param["feedback"]:
        item["text"], item["samples"], item["call_samples"] = "short", [1], None
    param["feedback_shown"], param["answer"] = "- short (x2)", None
    record["samples"]["indices"] = [1, 2]
    record["metrics"] = {"loss": 1.0}
    prepared = prepare_record(record)
    assert "truncated" not in prepared
    assert prepared["params"][0]["feedback"] == sorted(
        record["params"][0]["feedback"], key=lambda f: -f["count"]
    )


def test_a_huge_injected_feedback_is_cut_in_the_log_of_a_fit(
    client: OpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def huge(param: Any) -> list[FeedbackItem]:
        return [FeedbackItem(f"{i} " + "y" * 30_000, (0,), None) for i in range(10)]

    monkeypatch.setattr(trainer_module, "_feedback_items", huge)
    trainer = _trainer(tmp_path, max_epochs=1, loggers=[])
    trainer.fit(SentimentClassifier(client, SIMULATOR_MODEL), _loaders()[0])
    lines = trainer.run_log_path.read_text("utf-8").splitlines()
    steps = [json.loads(line) for line in lines if '"type":"step"' in line]
    assert len(steps) == 2
    for step in steps:
        assert step_overhead(step) <= STEP_BUDGET
        assert step["truncated"]["params[0].feedback[0].text"] == 30_002
        assert step["params"][0]["feedback_dropped"] > 0


def test_run_log_never_holds_an_api_key(
    client: OpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Leaky(SentimentClassifier):
        def configure_optimizers(self) -> Any:
            from afnio.optim import TGD

            return TGD(
                [self.system_prompt],
                model_client=self.client,
                constraints=[f"never say {SECRET}"],
                **{
                    **self.completion_args,
                    "extra_headers": {"Authorization": f"Bearer {SECRET}"},
                },
            )

    real = trainer_module._feedback_items

    def leaky_feedback(param: Any) -> list[Any]:
        return [
            *real(param),
            FeedbackItem(f"The key {SECRET} is in the prompt.", (1,), None),
            FeedbackItem('{"api_key": "hunter2-abcdef"}', (2,), None),
        ]

    monkeypatch.setattr(trainer_module, "_feedback_items", leaky_feedback)
    agent = Leaky(client, SIMULATOR_MODEL, prompt=f"Classify. Key: {SECRET}")
    agent.completion_args["extra_headers"] = {"x-api-key": SECRET}
    train, val = _loaders()
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(agent, train, val)
    for path in (trainer.run_log_path, tmp_path / "metrics_steps.csv"):
        text = path.read_text("utf-8")
        assert SECRET not in text and "hunter2" not in text
        assert find_secrets(text) == []
    records = _records(trainer.run_log_path)
    feedback = [
        i["text"] for s in _of(records, "step") for i in s["params"][0]["feedback"]
    ]
    # the rest of a feedback text is kept, the key masked
    assert "The key <redacted> is in the prompt." in feedback
    assert "<redacted>" in records[0]["parameters"][0]["value"]


def test_run_log_writer_uses_no_fsync_or_replace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the run log must not fsync or rename")

    for name in ("fsync", "replace", "rename"):
        monkeypatch.setattr(os, name, forbidden)
    for target in (RunLogWriter(), CSVLogger()):
        target.start(tmp_path, {"schema": SCHEMA}, None)
        step = {"type": "step", "step": 1, "metrics": {"loss": 1}, "params": []}
        target.log_step(step)
        state = target.state_dict()
        target.log_validation({"type": "validation", "kind": "epoch", "metrics": {}})
        target.finish({"type": "end", "status": "completed"})
        target.start(tmp_path, {"resume": {"epoch": 1}}, state)  # truncates
        target.log_step(step)
        target.finish({"type": "end", "status": "completed"})
    records = _records(tmp_path / RUN_LOG_FILE)
    assert [r["type"] for r in records] == ["header", "step", "resume", "step", "end"]
    assert records[2]["exact"] is True


def test_a_logger_that_raises_does_not_fail_fit(
    client: OpenAI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def start(self, run_dir: Path, header: dict, state: dict | None) -> None:
            pass

        def log_step(self, record: dict) -> None:
            raise ConnectionError("tracking server down")

        def log_validation(self, record: dict) -> None:
            raise RuntimeError("no")

        def finish(self, record: dict) -> None:
            raise RuntimeError("no")

        def state_dict(self) -> dict:
            raise RuntimeError("no state")

    train, val = _loaders()
    trainer = _trainer(tmp_path, loggers=[Broken()])
    with caplog.at_level("WARNING", logger="afnio.trainer"):
        history = trainer.fit(SentimentClassifier(client, SIMULATOR_MODEL), train, val)
    assert len(history) == 2
    assert "tracking server down" in caplog.text
    assert isinstance(trainer.loggers[0], RunLogWriter)  # put first
    assert _records(trainer.run_log_path)[-1]["status"] == "completed"


def test_loggers_default_to_the_run_log_and_csv_and_refuse_non_loggers(
    tmp_path: Path,
) -> None:
    assert [type(lg) for lg in Trainer().loggers] == [RunLogWriter, CSVLogger]
    assert [type(lg) for lg in Trainer(loggers=[]).loggers] == [RunLogWriter]
    csv = CSVLogger()
    assert Trainer(loggers=[csv]).loggers[1] is csv
    own = JsonlLogger("steps.jsonl")
    trainer = Trainer(default_root_dir=tmp_path, loggers=[own])
    assert trainer.loggers == [own]
    assert trainer.run_log_path == tmp_path / "steps.jsonl"
    with pytest.raises(TypeError, match="`loggers` must hold loggers"):
        Trainer(loggers=["mlflow"])
    with pytest.raises(ValueError, match="`filename` must be a plain file name"):
        RunLogWriter("../x.jsonl")


def test_a_fresh_fit_starts_the_log_anew(client: OpenAI, tmp_path: Path) -> None:
    for _ in range(2):
        trainer = _trainer(tmp_path, max_epochs=1, loggers=[])
        trainer.fit(SentimentClassifier(client, SIMULATOR_MODEL), _loaders()[0])
    records = _records(trainer.run_log_path)
    assert [r["type"] for r in records].count("header") == 1
    assert [s["step"] for s in _of(records, "step")] == [1, 2]


def test_a_resume_from_a_checkpoint_without_log_state_keeps_the_log(
    client: OpenAI, tmp_path: Path
) -> None:
    first = _trainer(tmp_path, max_epochs=1, loggers=[])
    first.fit(SentimentClassifier(client, SIMULATOR_MODEL), _loaders()[0])
    last = first.last_checkpoint_path()
    old = afnio.load(last)
    del old["loggers_state"], old["run_log"]  # as written before the run log
    afnio.save(old, last)
    resumed = _trainer(tmp_path, max_epochs=2, loggers=[])
    resumed.fit(
        SentimentClassifier(client, SIMULATOR_MODEL), _loaders()[0], ckpt_path="last"
    )
    records = _records(resumed.run_log_path)
    types = [r["type"] for r in records]
    assert types == ["header", "step", "step", "end", "resume", "step", "step", "end"]
    assert records[4]["exact"] is False and records[4]["epoch"] == 1
    assert [s["step"] for s in _of(records, "step")] == [1, 2, 3, 4]


def test_budget_stop_failure_and_interrupt_end_the_log(
    client: OpenAI, tmp_path: Path
) -> None:
    trainer = _trainer(tmp_path / "budget", max_cost=0.0)
    trainer.fit(SentimentClassifier(client, SIMULATOR_MODEL), _loaders()[0])
    end = _records(trainer.run_log_path)[-1]
    assert end["status"] == "budget" and end["stopped_reason"] == trainer.stopped_reason

    class Failing(SentimentClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            if batch_idx == 1:
                raise KeyError("a bug in the metric")
            return super().training_step(batch, batch_idx)

    trainer = _trainer(tmp_path / "failed")
    with pytest.raises(StepError):
        trainer.fit(Failing(client, SIMULATOR_MODEL), _loaders()[0])
    records = _records(trainer.run_log_path)
    assert [r["type"] for r in records] == ["header", "step", "end"]
    assert records[-1]["status"] == "failed"
    assert "a bug in the metric" in records[-1]["error"]

    class Interrupted(SentimentClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            raise KeyboardInterrupt

    trainer = _trainer(tmp_path / "interrupted")
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(Interrupted(client, SIMULATOR_MODEL), _loaders()[0])
    assert _records(trainer.run_log_path)[-1]["status"] == "interrupted"


def test_a_run_without_checkpoints_still_writes_its_log(
    client: OpenAI, tmp_path: Path
) -> None:
    trainer = _trainer(tmp_path, max_epochs=1, enable_checkpointing=False)
    trainer.fit(SentimentClassifier(client, SIMULATOR_MODEL), _loaders()[0])
    assert [r["type"] for r in _records(trainer.run_log_path)] == [
        "header",
        "step",
        "step",
        "end",
    ]
    assert not (tmp_path / "checkpoints").exists()


def test_the_truncated_map_keeps_the_step_within_budget_for_any_feedback_count() -> (
    None
):
    for n in (1, 2, 10, 50, 200, 600, 1000, 2000):
        record = _huge_step(params=1)
        record["params"][0]["feedback"] = [
            {
                "text": f"{i} " + "x" * 2_500,
                "samples": [i],
                "call_samples": None,
                "count": 1,
            }
            for i in range(n)
        ]
        prepared = prepare_record(record)
        assert step_overhead(prepared) <= STEP_BUDGET, n
        param = prepared["params"][0]
        kept = len(param["feedback"])
        assert kept + param.get("feedback_dropped", 0) == n
        assert kept >= min(n, 3)  # the map does not crowd out all feedback
        cut = prepared["truncated"]
        for key in cut:  # no entry names a dropped item
            if key.startswith("params[0].feedback[") and "[*]" not in key:
                j = int(key.split("feedback[")[1].split("]")[0])
                assert j < kept, (n, key)


def test_a_lone_surrogate_never_drops_a_record(tmp_path: Path) -> None:
    writer = RunLogWriter()
    writer.start(tmp_path, {"schema": SCHEMA}, None)
    record = _huge_step(params=1)
    record["params"][0]["feedback"] = [
        {"text": "bad \ud800 text", "samples": [0], "call_samples": None, "count": 1}
    ]
    record["params"][0]["before"] = "pair \ud83d\ude00 and lone \udfff"
    writer.log_step(record)
    writer.finish({"type": "end", "status": "completed"})
    lines = _records(tmp_path / RUN_LOG_FILE)
    assert [r["type"] for r in lines] == ["header", "step", "end"]
    step = lines[1]
    assert step["params"][0]["feedback"][0]["text"] == "bad \ufffd text"
    assert step["params"][0]["before"] == "pair \U0001f600 and lone \ufffd"


def test_credentials_in_urls_and_env_assignments_are_masked_in_the_log() -> None:
    record = {
        "type": "end",
        "status": "failed",
        "error": "ConnectError at https://alice:hunter2secret@api.example.com/v1 "
        "with OPENAI_API_KEY=abc123def456ghi789jkl set",
    }
    prepared = prepare_record(record)
    text = json.dumps(prepared)
    assert "hunter2secret" not in text and "abc123def456ghi789jkl" not in text
    assert "https://alice:<redacted>@api.example.com/v1" in prepared["error"]
    assert "OPENAI_API_KEY=<redacted>" in prepared["error"]
    assert find_secrets(text) == []


def test_the_end_record_holds_the_texts_after_a_reverted_step(
    client: OpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scores = iter([1.0])

    def validation(self: Trainer, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"loss": next(scores, 0.0)}  # every check after the first regresses

    monkeypatch.setattr(Trainer, "_fit_validation", validation)
    agent = SentimentClassifier(client, SIMULATOR_MODEL)
    initial = agent.system_prompt.data
    train, val = _loaders()
    trainer = _trainer(tmp_path, max_epochs=1, revert_on_regression=True)
    trainer.fit(agent, train, val)
    records = _records(trainer.run_log_path)
    steps = _of(records, "step")
    assert [s["reverted"] for s in steps] == [0, 1]
    (end,) = _of(records, "end")
    final = end["final"][0]["value"]
    assert final == agent.system_prompt.data  # the restored text
    last = steps[-1]["params"][0]
    assert final == last["before"]  # the reverted step's proposal is not final
    first = steps[0]["params"][0]
    assert final == (first["after"] if first["after"] is not None else initial)


def test_an_optimizer_using_last_step_as_a_counter_is_left_alone(
    client: OpenAI, tmp_path: Path
) -> None:
    class Counting:
        """A custom optimizer around TGD whose last_step is an int counter."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.last_step = 0

        def step(self, *args: Any, **kwargs: Any) -> Any:
            self.last_step += 1  # a TypeError if the Trainer set it to []
            return self.inner.step(*args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    class Agent(SentimentClassifier):
        def configure_optimizers(self) -> Any:
            self.counting = Counting(super().configure_optimizers())
            return self.counting

    agent = Agent(client, SIMULATOR_MODEL)
    trainer = _trainer(tmp_path, max_epochs=1, loggers=[])
    trainer.fit(agent, _loaders()[0])
    assert agent.counting.last_step == 2
    steps = _of(_records(trainer.run_log_path), "step")
    assert len(steps) == 2 and all(s["params"][0]["answer"] is None for s in steps)


def test_a_step_record_that_cannot_be_built_only_warns(
    client: OpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("not iterable")

    monkeypatch.setattr(trainer_module, "feedback_entries", broken)
    trainer = _trainer(tmp_path, max_epochs=1, loggers=[])
    with caplog.at_level("WARNING"):
        trainer.fit(SentimentClassifier(client, SIMULATOR_MODEL), _loaders()[0])
    assert "not iterable" in caplog.text
    records = _records(trainer.run_log_path)
    assert _of(records, "step") == []
    assert _of(records, "end")[0]["status"] == "completed"
    assert _of(records, "end")[0]["steps"] == 2
