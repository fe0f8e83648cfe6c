"""Exact resume and honest cost: a run killed at seeded moments and resumed ends as the
uninterrupted run did; budgets hold across a resume; a failed run still reports what
it spent; a retried step re-sends only the requests that failed."""

from __future__ import annotations

import os
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import afnio
from afnio.errors import SerializationError, StepError
from afnio.models.openai import OpenAI
from afnio.serialization import LoadLimits
from afnio.testing import SIMULATOR_MODEL, Simulator
from afnio.trainer import Trainer
from afnio.utils.data import DataLoader
from benchmarks import resume_kills
from benchmarks.resume_kills import Kill, Messages
from examples.facility_support import SentimentClassifier

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator() as simulator:
        yield simulator


@pytest.fixture(scope="module")
def full(sim: Simulator, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    outcome, kills = resume_kills.run(
        tmp_path_factory.mktemp("full"), sim.base_url, iter(()), 0
    )
    assert kills == []
    return outcome


@pytest.mark.parametrize(
    "kills",
    [
        pytest.param([Kill("request", 3)], id="mid-step (forward requests in flight)"),
        pytest.param([Kill("request", 12)], id="mid-step (backward or optimizer)"),
        pytest.param([Kill("fsync", 1)], id="mid-save (the first checkpoint)"),
        pytest.param([Kill("fsync", 2)], id="mid-save (the last pointer)"),
        pytest.param([Kill("fsync", 6)], id="mid-save (an epoch checkpoint)"),
        pytest.param([Kill("replace", 2)], id="checkpoint saved, pointer not moved"),
        pytest.param([Kill("validation", 2)], id="mid-validation"),
        pytest.param(
            [Kill("epoch_end", 1)], id="between the last batch and the epoch checkpoint"
        ),
        pytest.param(
            [Kill("request", 20), Kill("fsync", 2), Kill("epoch_end", 2)],
            id="three kills in one run",
        ),
    ],
)
def test_a_killed_and_resumed_run_ends_as_the_uninterrupted_one(
    sim: Simulator, full: dict[str, Any], tmp_path: Path, kills: list[Kill]
) -> None:
    outcome, happened = resume_kills.run(tmp_path, sim.base_url, iter(kills), 3)
    assert happened == kills  # every kill fired
    assert resume_kills.differences(full, outcome, len(happened)) == []
    assert outcome["history"][-1]["epoch"] == resume_kills.EPOCHS


def test_seeded_random_kills_resume_exactly(
    sim: Simulator, full: dict[str, Any], tmp_path: Path
) -> None:
    kills = resume_kills.plan(seed=7)
    total = 0
    for run in range(3):
        outcome, happened = resume_kills.run(
            tmp_path / str(run), sim.base_url, kills, 3
        )
        total += len(happened)
        assert resume_kills.differences(full, outcome, len(happened)) == []
    assert total > 0


def test_work_paid_by_a_killed_process_counts_in_the_resumed_cost(
    sim: Simulator, full: dict[str, Any], tmp_path: Path
) -> None:
    # killed at the end of the first epoch, after its validation and before its
    # epoch checkpoint: the resumed run redoes the validation, and the spend log
    # tells what the killed process had paid for it
    outcome, happened = resume_kills.run(
        tmp_path, sim.base_url, iter([Kill("epoch_end", 1)]), 1
    )
    assert happened == [Kill("epoch_end", 1)]
    assert outcome["total_cost"] > full["total_cost"] + 1e-9
    assert resume_kills.differences(full, outcome, 1) == []


# -- in-process runs -------------------------------------------------------------------


def _trainer(root: Path, **kwargs: Any) -> Trainer:
    return Trainer(
        max_epochs=kwargs.pop("max_epochs", 2),
        default_root_dir=root,
        enable_progress_bar=False,
        enable_agent_summary=False,
        **kwargs,
    )


def _loaders() -> tuple[DataLoader, DataLoader]:
    rows = resume_kills.MESSAGES
    train = DataLoader(Messages(rows[:8]), batch_size=4, shuffle=True, seed=3)
    return train, DataLoader(Messages(rows[8:]), batch_size=4)


@pytest.fixture
def client(sim: Simulator) -> Iterator[OpenAI]:
    sim.clear_faults()
    with OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0) as c:
        afnio.set_backward_model_client(c, completion_args={"model": SIMULATOR_MODEL})
        yield c


def test_max_cost_holds_across_a_resume(client: OpenAI, tmp_path: Path) -> None:
    train, val = _loaders()
    first = _trainer(tmp_path, max_epochs=1)
    first.fit(SentimentClassifier(client, SIMULATOR_MODEL), train, val)
    spent = first.total_cost
    assert first._max_step_cost > 0.0002  # a step costs more than the headroom
    resumed = _trainer(tmp_path, max_epochs=2, max_cost=spent + 0.0002)
    train, val = _loaders()
    resumed.fit(
        SentimentClassifier(client, SIMULATOR_MODEL), train, val, ckpt_path="last"
    )
    assert resumed.stopped_reason is not None  # the first step would not fit
    assert resumed.total_cost <= spent + 0.0002
    assert len(resumed.history) == 1


class _Broken(SentimentClassifier):
    """Fails every training step after its LM calls were made (and paid)."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        out = super().training_step(batch, batch_idx)
        raise KeyError("a bug in the metric")
        return out


def test_a_failed_fit_still_reports_what_it_spent(
    client: OpenAI, tmp_path: Path
) -> None:
    train, _ = _loaders()
    trainer = _trainer(tmp_path, max_epochs=1)
    before = client.get_usage()["cost"]["amount"]
    with pytest.raises(StepError, match="KeyError: a bug in the metric") as info:
        trainer.fit(_Broken(client, SIMULATOR_MODEL), train)
    assert info.value.attempts == 1  # a bug is not retried
    spent = client.get_usage()["cost"]["amount"] - before
    assert spent > 0
    assert trainer.total_cost == pytest.approx(spent)


def test_the_summary_and_the_phase_table_count_the_same_calls(
    client: OpenAI, sim: Simulator, tmp_path: Path
) -> None:
    train, val = _loaders()
    trainer = _trainer(tmp_path, max_epochs=1)
    sim.inject("server_error", times=1)  # one request fails (max_retries=0): unbilled
    trainer.fit(SentimentClassifier(client, SIMULATOR_MODEL), train, val)
    calls = sum(row[3] for row in trainer._meter.per_client())
    assert calls == sum(row.calls for row in trainer.phase_rows())


def test_ckpt_path_last_without_a_checkpoint_says_so(
    client: OpenAI, tmp_path: Path
) -> None:
    train, _ = _loaders()
    with pytest.raises(FileNotFoundError, match="No checkpoint to resume from"):
        _trainer(tmp_path).fit(
            SentimentClassifier(client, SIMULATOR_MODEL), train, ckpt_path="last"
        )


def test_a_killed_save_leaves_the_last_pointer_on_a_complete_checkpoint(
    sim: Simulator, tmp_path: Path
) -> None:
    # fsyncs: batch 0's checkpoint, the pointer to it, batch 1's checkpoint (killed)
    assert resume_kills.attempt(tmp_path, sim.base_url, Kill("fsync", 3)) is None
    last = Trainer(default_root_dir=tmp_path).last_checkpoint_path()
    assert last.name == "checkpoint_batch0.hf"
    assert afnio.load(last)["batch"] == 0


def _one_epoch(forward: Simulator, backward: Simulator, root: Path) -> Trainer:
    """One epoch; the classifier calls ``forward``, the backward LM and the
    optimizer call ``backward``."""
    with (
        OpenAI(base_url=forward.base_url, api_key="sk-test", max_retries=0) as fwd,
        OpenAI(base_url=backward.base_url, api_key="sk-test", max_retries=0) as bwd,
    ):
        afnio.set_backward_model_client(bwd, completion_args={"model": SIMULATOR_MODEL})

        class Classifier(SentimentClassifier):
            def configure_optimizers(self) -> Any:
                from afnio.optim import TGD

                return TGD(self.parameters(), model_client=bwd, model=SIMULATOR_MODEL)

        train, _ = _loaders()
        trainer = _trainer(root, max_epochs=1)
        trainer.fit(Classifier(fwd, SIMULATOR_MODEL), train)
        return trainer


def test_a_retried_step_re_sends_only_the_request_that_failed(tmp_path: Path) -> None:
    with Simulator() as fwd, Simulator() as bwd:
        clean = _one_epoch(fwd, bwd, tmp_path / "clean")
        fwd_calls, bwd_calls = fwd.stats.calls, bwd.stats.calls
        assert bwd_calls > 0
        fwd.reset_stats()
        bwd.reset_stats()
        bwd.inject("server_error", times=1)  # the first backward request fails for good
        retried = _one_epoch(fwd, bwd, tmp_path / "retried")
        assert bwd.stats.faults_served == 1
        # the step ran twice, but its forward calls were paid once: the retry got
        # them from the step memo, and re-sent only the failed backward request
        assert fwd.stats.calls == fwd_calls
        assert bwd.stats.calls == bwd_calls + 1
    assert retried.total_cost == pytest.approx(clean.total_cost)
    assert [r["train_loss"] for r in retried.history] == [
        r["train_loss"] for r in clean.history
    ]


def test_an_unusable_answer_is_asked_again_when_the_step_is_retried(
    tmp_path: Path,
) -> None:
    with Simulator() as fwd, Simulator() as bwd:
        clean = _one_epoch(fwd, bwd, tmp_path / "clean")
        bwd_calls = bwd.stats.calls
        bwd.reset_stats()
        # the first backward request and its 3 retries get cut JSON: the step fails
        # and is retried; the memo must not replay the rejected answers
        bwd.inject("malformed_json", times=4)
        retried = _one_epoch(fwd, bwd, tmp_path / "retried")
        assert bwd.stats.faults_served == 4
        assert bwd.stats.calls == bwd_calls + 4
    assert [r["train_loss"] for r in retried.history] == [
        r["train_loss"] for r in clean.history
    ]


# -- checkpoints that are not what this afnio wrote ------------------------------------


class _WithFunction(SentimentClassifier):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.normalize = textwrap.dedent  # a function slot, saved by import path


def _tampered_checkpoint(client: OpenAI, root: Path, old: str, new: str) -> Path:
    """Train ``_WithFunction`` one epoch under ``root``; its last checkpoint with
    ``old`` replaced by ``new`` in ``data.json``."""
    train, _ = _loaders()
    _trainer(root, max_epochs=1).fit(_WithFunction(client, SIMULATOR_MODEL), train)
    path = Trainer(default_root_dir=root).last_checkpoint_path()
    with zipfile.ZipFile(path) as zf:
        text = zf.read("data.json").decode("utf-8")
    assert old in text
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("data.json", text.replace(old, new))
    return path


def test_fit_refuses_a_checkpoint_whose_function_was_swapped(
    client: OpenAI, sim: Simulator, tmp_path: Path
) -> None:
    last = _tampered_checkpoint(
        client, tmp_path, '"textwrap:dedent"', '"builtins:exec"'
    )
    train, _ = _loaders()
    agent = _WithFunction(client, SIMULATOR_MODEL)
    before = sim.stats.calls
    with pytest.raises(RuntimeError, match="refused 'builtins:exec'"):
        _trainer(tmp_path, max_epochs=2).fit(agent, train, ckpt_path=last)
    assert agent.normalize is textwrap.dedent  # nothing changed
    assert sim.stats.calls == before  # and no LM call was made


def test_fit_imports_functions_only_from_the_modules_it_is_allowed(
    client: OpenAI, tmp_path: Path
) -> None:
    last = _tampered_checkpoint(
        client, tmp_path, '"textwrap:dedent"', '"textwrap:indent"'
    )
    train, _ = _loaders()
    agent = _WithFunction(client, SIMULATOR_MODEL)
    with pytest.raises(RuntimeError, match="refused 'textwrap:indent'"):
        _trainer(tmp_path, max_epochs=1).fit(agent, train, ckpt_path=last)
    _trainer(tmp_path, max_epochs=1).fit(
        agent, train, ckpt_path=last, allow_functions=["textwrap"]
    )
    assert agent.normalize is textwrap.indent


def test_fit_passes_its_load_limits(client: OpenAI, tmp_path: Path) -> None:
    train, _ = _loaders()
    _trainer(tmp_path, max_epochs=1).fit(
        SentimentClassifier(client, SIMULATOR_MODEL), train
    )
    with pytest.raises(SerializationError, match="max_elements"):
        _trainer(tmp_path, max_epochs=2).fit(
            SentimentClassifier(client, SIMULATOR_MODEL),
            train,
            ckpt_path="last",
            load_limits=LoadLimits(max_elements=50),
        )


def test_a_rejected_answer_is_not_replayed_from_the_response_cache(
    tmp_path: Path,
) -> None:
    from afnio.models.cache import disable_cache, enable_cache

    enable_cache(tmp_path / "lm.sqlite")
    try:
        with Simulator() as fwd, Simulator() as bwd:
            bwd.inject("malformed_json", times=4)
            trainer = _one_epoch(fwd, bwd, tmp_path / "run")
            assert bwd.stats.faults_served == 4
        assert trainer.history and trainer.history[0]["train_loss"] is not None
    finally:
        disable_cache()


class _PickyAboutAnswers(SentimentClassifier):
    """Its metric fails once on the answers' content, after the LM calls (a
    ``ValueError``: not transient)."""

    failures = 1

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        out = super().training_step(batch, batch_idx)
        if _PickyAboutAnswers.failures:
            _PickyAboutAnswers.failures -= 1
            raise ValueError("the answers do not look right")
        return out


def test_a_failure_that_is_not_the_lm_service_is_not_retried(
    client: OpenAI, sim: Simulator, tmp_path: Path
) -> None:
    train, _ = _loaders()
    sim.reset_stats()
    _PickyAboutAnswers.failures = 1
    with pytest.raises(StepError, match="ValueError: the answers do not look") as info:
        _trainer(tmp_path / "picky", max_epochs=1).fit(
            _PickyAboutAnswers(client, SIMULATOR_MODEL), train
        )
    assert isinstance(info.value.__cause__, ValueError)
    assert info.value.phase == "training step" and info.value.stage == "forward"
    assert sim.stats.calls == 4  # the failed attempt's 4 forward calls, no retry


def test_service_failures_are_told_from_other_errors() -> None:
    import httpx
    import openai

    from afnio.errors import BackwardParseError
    from afnio.trainer.trainer import _is_service_failure

    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    assert _is_service_failure(openai.APIConnectionError(request=request))
    assert _is_service_failure(httpx.ReadTimeout("slow", request=request))
    assert _is_service_failure(BackwardParseError("cut JSON"))
    assert _is_service_failure(TimeoutError())
    try:
        try:
            raise ConnectionError("reset")
        except ConnectionError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as wrapped:
        assert _is_service_failure(wrapped)
    assert not _is_service_failure(KeyError("label"))
    assert not _is_service_failure(ValueError("the answers do not look right"))


@pytest.mark.parametrize(
    "position",
    [
        {"path": "/dev/zero", "offset": 0},
        {"path": "../../../../etc/passwd", "offset": 0},
        {"path": "fifo", "offset": 0},
        {"path": "spend.log", "offset": "0"},
    ],
    ids=["a device", "outside the run", "not the log's name", "a bad offset"],
)
def test_a_tampered_spend_log_position_reads_nothing(
    tmp_path: Path, position: dict[str, Any]
) -> None:
    from afnio.trainer.trainer import _SpendLog

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "spend.log").write_text("0.5\n")
    assert _SpendLog.spent_after(tmp_path / "ckpt.hf", position) == 0.0
    assert _SpendLog.spent_after(
        tmp_path / "ckpt.hf", {"path": "spend.log", "offset": 0}
    ) == pytest.approx(0.5)


def test_a_spend_log_that_is_a_fifo_never_blocks(tmp_path: Path) -> None:
    from afnio.trainer.trainer import _SpendLog

    os.mkfifo(tmp_path / "spend.log")
    position = {"path": "spend.log", "offset": 0}
    assert _SpendLog.spent_after(tmp_path / "ckpt.hf", position) == 0.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epoch": [1]}, "epoch is"),
        ({"batch": "0"}, "batch is"),
        ({"history": ["row"]}, "history"),
        ({"total_cost": "0.1"}, "total_cost is"),
        ({"epoch_metrics": {"loss": 1.0}}, "epoch_metrics"),
        ({"spend_log": [1]}, "spend_log is"),
    ],
)
def test_a_checkpoint_of_the_wrong_shape_is_a_serialization_error(
    client: OpenAI, tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    train, _ = _loaders()
    _trainer(tmp_path, max_epochs=1).fit(
        SentimentClassifier(client, SIMULATOR_MODEL), train
    )
    last = Trainer(default_root_dir=tmp_path).last_checkpoint_path()
    checkpoint = afnio.load(last)
    checkpoint.update(change)
    afnio.save(checkpoint, last)
    with pytest.raises(SerializationError, match=message):
        _trainer(tmp_path, max_epochs=2).fit(
            SentimentClassifier(client, SIMULATOR_MODEL), train, ckpt_path="last"
        )


def test_a_new_run_never_resumes_an_earlier_runs_last_checkpoint(
    client: OpenAI, tmp_path: Path
) -> None:
    train, _ = _loaders()
    _trainer(tmp_path, max_epochs=1).fit(
        SentimentClassifier(client, SIMULATOR_MODEL), train
    )
    assert (tmp_path / "checkpoints" / "last").exists()

    class Dies(SentimentClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            raise KeyboardInterrupt  # killed before its first checkpoint

    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path, max_epochs=1).fit(Dies(client, SIMULATOR_MODEL), train)
    with pytest.raises(FileNotFoundError, match="No checkpoint to resume from"):
        Trainer(default_root_dir=tmp_path).last_checkpoint_path()
