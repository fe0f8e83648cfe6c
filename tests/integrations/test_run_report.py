"""``optimize()`` and ``AfnioTGD`` name the run's HTML report, their run log holds one
step record per optimizer step (parameters named as traced), and ``loggers=`` reaches
the Trainer (issue 22, items 2 and 4). Against the live simulator, like the other
optimize()/AfnioTGD tests; ``examples/facility_support.py`` ends by naming its report
too."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain_openai", reason="needs the langchain test extra")
dspy = pytest.importorskip("dspy", reason="needs the dspy extra")
# LiteLLM drops pooled connections to the live simulator without closing them; the
# garbage collector may report them while the test runs (see dspy/conftest.py)
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <socket:pytest.PytestUnraisableExceptionWarning"
)

from afnio.testing import SIMULATOR_MODEL, Simulator  # noqa: E402
from afnio_integrations.dspy import AfnioTGD  # noqa: E402
from afnio_integrations.langchain import optimize, trace  # noqa: E402
from benchmarks.common import simulated  # noqa: E402
from tests.integrations.dspy.conftest import (  # noqa: E402
    _close_litellm_clients,  # noqa: F401 (autouse: closes LiteLLM's clients)
    make_lm,
)
from tests.integrations.langchain._chains import (  # noqa: E402
    CLASSIFY,
    TRAINSET,
    exact,
    sentiment_chain,
)

RUN_LOG = "run_log.jsonl"


class RecordingLogger:
    """A user's logger: keeps every call it gets (the Logger protocol)."""

    def __init__(self) -> None:
        self.started: list[tuple[Path, dict[str, Any], Any]] = []
        self.steps: list[dict[str, Any]] = []
        self.validations: list[dict[str, Any]] = []
        self.finished: list[dict[str, Any]] = []

    def start(self, run_dir: Path, header: dict[str, Any], state: Any) -> None:
        self.started.append((Path(run_dir), header, state))

    def log_step(self, record: dict[str, Any]) -> None:
        self.steps.append(record)

    def log_validation(self, record: dict[str, Any]) -> None:
        self.validations.append(record)

    def finish(self, record: dict[str, Any]) -> None:
        self.finished.append(record)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": len(self.steps)}


def records(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The run log's records (of one ``type``)."""
    lines = (Path(run_dir) / RUN_LOG).read_text("utf-8").splitlines()
    found = [json.loads(line) for line in lines if line.strip()]
    return [r for r in found if kind is None or r["type"] == kind]


@pytest.fixture
def sim() -> Iterator[Simulator]:
    """The live simulator, afnio's backward client set on it."""
    with simulated() as (running, _):
        yield running


def traced_names(chain: Any) -> dict[str, str]:
    """The run log's name of each traced prompt (the agent holds the traced chain
    as ``traced``), by its key in ``report.prompts_before``."""
    traced = trace(chain)
    by_param = {id(p): f"traced.{name}" for name, p in traced.named_parameters()}
    return {slot.key: by_param[id(p)] for slot, p in traced._slot_list}


# -- LangChain: optimize() -------------------------------------------------------------


def test_optimize_report_names_an_html_report_that_outlives_the_call(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # root_dir=None: here
    _, report = optimize(
        sentiment_chain(sim),
        TRAINSET,
        exact,
        epochs=1,
        batch_size=4,
        progress=False,
        model=SIMULATOR_MODEL,
    )
    assert report.run_dir is not None and report.report_path is not None
    run_dir, path = Path(report.run_dir), Path(report.report_path)
    assert run_dir.parent == tmp_path and run_dir.name.startswith("afnio-optimize-")
    assert path == run_dir / "report.html" and path.is_file()
    assert path.read_text("utf-8").lstrip().lower().startswith("<!doctype html")
    assert (run_dir / RUN_LOG).is_file()
    assert str(report).splitlines()[-1] == f"run report: {path}"


def test_optimize_run_log_has_one_step_record_per_step_named_as_the_traced_prompts(
    sim: Simulator, tmp_path: Path
) -> None:
    chain = sentiment_chain(sim)
    names = traced_names(chain)
    assert names == {"prompt0.system0": "traced.prompt_0"}
    _, report = optimize(
        chain,
        TRAINSET,  # 8 rows: 2 steps an epoch
        exact,
        epochs=2,
        batch_size=4,
        root_dir=str(tmp_path),
        progress=False,
        model=SIMULATOR_MODEL,
    )
    assert report.run_dir == str(tmp_path)
    assert report.report_path == str(tmp_path / "report.html")
    header = records(tmp_path, "header")[0]
    assert [p["name"] for p in header["parameters"]] == ["traced.prompt_0"]
    assert "(prompt0.system0)" in header["parameters"][0]["role"]
    steps = records(tmp_path, "step")
    assert report.steps == 4
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert [(s["epoch"], s["batch"]) for s in steps] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for s in steps:
        assert [p["name"] for p in s["params"]] == ["traced.prompt_0"]
    # the texts are the traced prompt's: before the first step, after the last change
    assert steps[0]["params"][0]["before"] == CLASSIFY
    assert report.prompts_before == {"prompt0.system0": CLASSIFY}
    changed = [p for s in steps for p in s["params"] if p["after"] is not None]
    assert changed and changed[-1]["after"] == report.prompts_after["prompt0.system0"]
    assert records(tmp_path, "end")[-1]["status"] == "completed"


def test_optimize_sends_every_record_to_the_users_loggers(
    sim: Simulator, tmp_path: Path
) -> None:
    recorder = RecordingLogger()
    _, report = optimize(
        sentiment_chain(sim),
        TRAINSET,
        exact,
        epochs=2,
        batch_size=4,
        root_dir=str(tmp_path),
        loggers=[recorder],
        progress=False,
        model=SIMULATOR_MODEL,
    )
    assert len(recorder.started) == 1
    run_dir, header, state = recorder.started[0]
    assert run_dir == tmp_path and state is None  # a fresh fit
    assert header == records(tmp_path, "header")[0]
    # the user's logger got the run log's own records (a run log is always written)
    assert recorder.steps == records(tmp_path, "step")
    assert [s["step"] for s in recorder.steps] == [1, 2, 3, 4]
    kinds = [v["kind"] for v in recorder.validations]
    assert kinds == ["initial", "epoch", "epoch"]
    assert recorder.validations == records(tmp_path, "validation")
    assert [f["status"] for f in recorder.finished] == ["completed"]
    assert Path(report.report_path or "").is_file()


class NotALogger:
    def log_step(self, record: dict[str, Any]) -> None: ...


@pytest.mark.parametrize(
    ("loggers", "message"),
    [
        ("mlflow", r"`loggers` must be a list of loggers, got str"),
        ([RecordingLogger(), NotALogger()], r"`loggers\[1\]` is NotALogger.*lacks "),
        ([object()], r"`loggers\[0\]` is object"),
    ],
    ids=["a str", "an item without the methods", "an object"],
)
def test_a_bad_loggers_argument_raises_a_clear_type_error_before_any_lm_call(
    sim: Simulator, loggers: Any, message: str
) -> None:
    with pytest.raises(TypeError, match=message) as caught:
        optimize(
            sentiment_chain(sim),
            TRAINSET,
            exact,
            loggers=loggers,
            progress=False,
            model=SIMULATOR_MODEL,
        )
    assert "loggers=[" in str(caught.value)  # says how to pass them
    with pytest.raises(TypeError, match=message):
        AfnioTGD(metric=sentiment_match, loggers=loggers)
    assert sim.stats.calls == 0


def test_one_logger_without_a_list_is_accepted_as_the_trainer_accepts_it() -> None:
    from afnio_integrations._training import check_loggers

    one = RecordingLogger()
    assert check_loggers(one) == [one]
    assert check_loggers((one,)) == [one]
    assert check_loggers(None) is None


def test_a_budget_stop_still_writes_the_report(sim: Simulator, tmp_path: Path) -> None:
    _, report = optimize(
        sentiment_chain(sim),
        TRAINSET,
        exact,
        epochs=5,
        batch_size=2,
        max_cost=0.003,
        root_dir=str(tmp_path),
        progress=False,
        model=SIMULATOR_MODEL,
    )
    assert report.stopped_reason and "max_cost" in report.stopped_reason
    assert report.report_path == str(tmp_path / "report.html")
    assert Path(report.report_path).is_file()
    assert records(tmp_path, "end")[-1]["status"] == "budget"


def test_a_report_that_cannot_be_written_warns_and_keeps_the_result(
    sim: Simulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import afnio.report

    def broken(run_dir: Any, out: Any = None) -> Path:
        raise OSError("disk full")

    monkeypatch.setattr(afnio.report, "write_report", broken)
    with caplog.at_level(logging.WARNING, logger="afnio.integrations"):
        _, report = optimize(
            sentiment_chain(sim),
            TRAINSET,
            exact,
            epochs=1,
            batch_size=4,
            root_dir=str(tmp_path),
            progress=False,
            model=SIMULATOR_MODEL,
        )
    assert report.report_path is None and report.run_dir == str(tmp_path)
    assert report.score_after is not None  # the optimization result is kept
    assert report.prompts_after != report.prompts_before
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("disk full" in w and f"afnio report {tmp_path}" in w for w in warned)
    assert "run report:" not in str(report)


class FailingMetric:
    """A metric that raises once :attr:`armed` (from the first call with
    ``armed=True`` given)."""

    __name__ = "failing_metric"

    def __init__(self, armed: bool = False) -> None:
        self.armed = armed

    def __call__(self, prediction: str, target: str) -> int:
        if self.armed:
            raise KeyError("no such label")
        return exact(prediction, target)


class ArmsAfterFirstStep(RecordingLogger):
    """A logger that arms ``metric`` once the first step record reached it."""

    def __init__(self, metric: FailingMetric) -> None:
        super().__init__()
        self.metric = metric

    def log_step(self, record: dict[str, Any]) -> None:
        super().log_step(record)
        self.metric.armed = True


def test_a_run_that_fails_after_a_step_names_its_report_on_the_exception(
    sim: Simulator, tmp_path: Path
) -> None:
    metric = FailingMetric()
    with pytest.raises(Exception, match="no such label") as caught:
        optimize(
            sentiment_chain(sim),
            TRAINSET,  # 8 rows: the second step fails
            metric,
            epochs=1,
            batch_size=4,
            root_dir=str(tmp_path),
            loggers=[ArmsAfterFirstStep(metric)],
            progress=False,
            model=SIMULATOR_MODEL,
        )
    notes = getattr(caught.value, "__notes__", [])
    path = tmp_path / "report.html"
    assert f"run report (the steps before the failure): {path}" in notes
    assert path.is_file()
    assert [s["step"] for s in records(tmp_path, "step")] == [1]
    assert records(tmp_path, "end")[-1]["status"] == "failed"


def test_a_run_that_fails_before_any_step_writes_no_report(
    sim: Simulator, tmp_path: Path
) -> None:
    with pytest.raises(Exception, match="no such label") as caught:
        optimize(
            sentiment_chain(sim),
            TRAINSET,
            FailingMetric(armed=True),  # fails in the first validation
            epochs=1,
            batch_size=4,
            root_dir=str(tmp_path),
            progress=False,
            model=SIMULATOR_MODEL,
        )
    assert not (tmp_path / "report.html").exists()
    assert not any("run report" in n for n in getattr(caught.value, "__notes__", []))


# -- DSPy: AfnioTGD --------------------------------------------------------------------


def sentiment_match(example: Any, pred: Any, trace: Any = None) -> bool:
    return example.sentiment == pred.sentiment


DSPY_TRAIN = [
    dspy.Example(message=m, sentiment=s).with_inputs("message")
    for m, s in [
        ("I am frustrated with the heating.", "negative"),
        ("I love the new lobby!", "positive"),
        ("My badge works.", "neutral"),
        ("The service was excellent.", "positive"),
    ]
]


def test_afnio_tgd_report_run_log_and_loggers(tmp_path: Path) -> None:
    recorder = RecordingLogger()
    with Simulator() as sim, dspy.context(lm=make_lm(sim)):
        student = dspy.Predict("message -> sentiment")
        tgd = AfnioTGD(
            metric=sentiment_match,
            epochs=2,
            batch_size=2,
            progress=False,
            root_dir=str(tmp_path),
            loggers=[recorder],
        )
        optimized = tgd.compile(student, trainset=DSPY_TRAIN)
    report = tgd.report
    assert report is not None
    assert report.run_dir == str(tmp_path)
    assert report.report_path == str(tmp_path / "report.html")
    assert Path(report.report_path).is_file()
    assert str(report).splitlines()[-1] == f"run report: {report.report_path}"
    steps = records(tmp_path, "step")
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and report.steps == 4
    # the traced program's instructions, as the agent holds them (``traced``)
    for s in steps:
        assert [p["name"] for p in s["params"]] == ["traced.self_instructions"]
    assert steps[0]["params"][0]["before"] == student.signature.instructions
    changed = [p for s in steps for p in s["params"] if p["after"] is not None]
    assert changed and changed[-1]["after"] == optimized.signature.instructions
    assert recorder.steps == steps
    assert [f["status"] for f in recorder.finished] == ["completed"]


def test_afnio_tgd_without_root_dir_names_a_report_that_outlives_compile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with Simulator() as sim, dspy.context(lm=make_lm(sim)):
        tgd = AfnioTGD(metric=sentiment_match, epochs=1, batch_size=4, progress=False)
        tgd.compile(dspy.Predict("message -> sentiment"), trainset=DSPY_TRAIN)
    report = tgd.report
    assert report is not None and report.report_path is not None
    path = Path(report.report_path)
    assert path.is_file() and path.parent.parent == tmp_path
    assert path.parent.name.startswith("afnio-optimize-")


# -- examples/facility_support.py ------------------------------------------------------


def test_the_facility_support_example_ends_by_naming_its_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from examples.facility_support import main

    root = tmp_path / "run"
    assert main(["--sample", "--epochs", "1", "--root-dir", str(root)]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"run report: {root / 'report.html'}"
    assert (root / "report.html").is_file()
    kinds = [r.get("kind") for r in records(root, "validation")]
    assert kinds[-1] == "test"  # the test after fit is in the run log


def test_a_custom_run_log_file_name_still_gets_its_report(
    sim: Simulator, tmp_path: Path
) -> None:
    from afnio.trainer.loggers import JsonlLogger

    _, report = optimize(
        sentiment_chain(sim),
        TRAINSET,
        exact,
        epochs=1,
        batch_size=4,
        root_dir=str(tmp_path),
        loggers=[JsonlLogger("custom.jsonl")],
        progress=False,
        model=SIMULATOR_MODEL,
    )
    assert (tmp_path / "custom.jsonl").is_file()
    assert report.report_path == str(tmp_path / "report.html")
    assert Path(report.report_path).is_file()
    # the traced batch's feedback is credited to the rows it is about
    lines = (tmp_path / "custom.jsonl").read_text("utf-8").splitlines()
    steps = [r for r in map(json.loads, lines) if r["type"] == "step"]
    credited = 0
    for step in steps:
        for param in step["params"]:
            for item in param["feedback"]:
                if '"' not in item["text"]:
                    continue
                word = item["text"].split('"')[1].lower()
                for i in item["samples"] or []:
                    assert i in step["samples"]["indices"]
                    assert word in TRAINSET[i][0]["message"].lower(), (item, i)
                    credited += 1
    assert credited > 0
