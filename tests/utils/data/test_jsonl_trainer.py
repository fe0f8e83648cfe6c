"""A JsonlDataset through the Trainer: fit/validate/test/predict stream batches, every
epoch re-reads the file, and a fit interrupted mid-epoch and resumed from its
checkpoint sees exactly the batches (by sample id) of an uninterrupted fit, without
reading the rows done before the checkpoint again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from afnio import Variable
from afnio.cognitive import Module, Parameter
from afnio.errors import StepError
from afnio.trainer import Trainer
from afnio.utils.data import DataLoader, JsonlDataset


class Interrupted(Exception):
    """Stands for a crash in the middle of a fit."""


class Recorder(Module):
    """An agent without LM calls: records the sample ids of every batch it sees and
    raises :class:`Interrupted` before its ``fail_at``-th training step."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.prompt = Parameter("Be brief.", role="system prompt", requires_grad=True)
        object.__setattr__(self, "fail_at", fail_at)
        object.__setattr__(self, "seen", [])
        object.__setattr__(self, "evaluated", [])

    def configure_optimizers(self) -> Any:
        return None

    @staticmethod
    def _ids(batch: Any) -> list[int]:
        x, _ = batch
        return [int(text.split()[1]) for text in x.data]

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.fail_at is not None and len(self.seen) == self.fail_at:
            raise Interrupted(f"interrupted before training step {self.fail_at}")
        self.seen.append((batch_idx, self._ids(batch)))
        score = float(sum(self._ids(batch)))
        return Variable(score, role="score"), Variable("ok", role="explanation")

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        self.evaluated.append(self._ids(batch))
        return Variable(1.0, role="score"), Variable("ok", role="explanation")

    test_step = validation_step

    def forward(self, x: Variable) -> Variable:
        return Variable([t.upper() for t in x.data], role="prediction")


def write_rows(path: Path, n: int) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"row {i}", "label": str(i % 2)}) + "\n")
    return path


def loader(path: Path, batch_size: int = 4, buffer_size: int = 7) -> DataLoader:
    ds = JsonlDataset(
        path, input="text", target="label", buffer_size=buffer_size, seed=11
    )
    return DataLoader(ds, batch_size=batch_size)


def trainer(root: Path, epochs: int = 3) -> Trainer:
    return Trainer(
        max_epochs=epochs,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_agent_summary=False,
        enable_run_summary=False,
    )


@pytest.fixture
def rows(tmp_path: Path) -> Path:
    return write_rows(tmp_path / "train.jsonl", 22)  # 6 batches of 4: the last of 2


def test_fit_streams_batches_and_each_epoch_rereads_the_file(
    rows: Path, tmp_path: Path
) -> None:
    agent = Recorder()
    history = trainer(tmp_path / "run").fit(agent, loader(rows), loader(rows, 11, 1))
    assert [row["epoch"] for row in history] == [1, 2, 3]
    epochs = [
        [i for _, ids in agent.seen[first : first + 6] for i in ids]
        for first in (0, 6, 12)
    ]
    for order in epochs:  # every epoch: every row once, in a shuffled order
        assert sorted(order) == list(range(22))
    assert len({tuple(order) for order in epochs}) == 3
    assert [idx for idx, _ in agent.seen] == list(range(6)) * 3
    assert agent.evaluated == [list(range(11)), list(range(11, 22))] * 3


@pytest.mark.parametrize(
    "fail_at",
    [
        pytest.param(3, id="mid-epoch 1"),
        pytest.param(6, id="at an epoch boundary"),
        pytest.param(11, id="before the last batch of epoch 2"),
        pytest.param(13, id="mid-epoch 3"),
    ],
)
def test_an_interrupted_fit_resumes_with_exactly_the_uninterrupted_batches(
    rows: Path, tmp_path: Path, fail_at: int
) -> None:
    reference = Recorder()
    expected = trainer(tmp_path / "ref").fit(reference, loader(rows))

    first = Recorder(fail_at=fail_at)
    with pytest.raises(StepError) as info:
        trainer(tmp_path / "run").fit(first, loader(rows))
    assert isinstance(info.value.__cause__, Interrupted)
    assert first.seen == reference.seen[:fail_at]

    resumed = Recorder()  # a new process: new agent, loader and dataset
    history = trainer(tmp_path / "run").fit(resumed, loader(rows), ckpt_path="last")
    assert first.seen + resumed.seen == reference.seen  # batch by batch, by sample id
    assert history == expected


def test_a_resume_reads_only_the_rows_after_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = write_rows(tmp_path / "train.jsonl", 60)
    with pytest.raises(StepError):
        trainer(tmp_path / "run", epochs=1).fit(Recorder(fail_at=4), loader(rows))
    lines: list[int] = []
    original = JsonlDataset._parse

    def counting(self: JsonlDataset, raw: bytes, line: int) -> Any:
        lines.append(line)
        return original(self, raw, line)

    monkeypatch.setattr(JsonlDataset, "_parse", counting)
    resumed = Recorder()
    trainer(tmp_path / "run", epochs=1).fit(resumed, loader(rows), ckpt_path="last")
    assert sum(len(ids) for _, ids in resumed.seen) == 60 - 16
    # 16 samples were done and 16 + 6 rows read before the checkpoint: the 6
    # buffered rows come back from it, then only lines 23 to 60 are read
    assert len(lines) == 6 + 38 and sorted(lines)[6:] == list(range(23, 61))


def test_a_checkpoint_holds_the_stream_position(rows: Path, tmp_path: Path) -> None:
    import afnio

    run = trainer(tmp_path / "run", epochs=1)
    run.fit(Recorder(), loader(rows))
    checkpoint = afnio.load(
        tmp_path / "run" / "checkpoints" / "epoch_1" / "checkpoint_batch1.hf"
    )
    position = checkpoint["data_state"]["dataset"]["position"]
    assert checkpoint["data_state"]["batches"] == 2
    # 8 samples done; the buffer (7) is refilled before each draw: 8 + 6 rows read
    assert position["epoch"] == 0 and position["row"] == 8 + 6
    assert len(position["buffer"]) == 6 and len(position["rng"]) == 3
    end = afnio.load(tmp_path / "run" / "checkpoints" / "checkpoint_epoch1.hf")
    assert end["data_state"]["dataset"]["position"] is None
    assert end["data_state"]["dataset"]["next_epoch"] == 1


def test_a_streaming_checkpoint_refuses_a_map_style_loader_and_back(
    rows: Path, tmp_path: Path
) -> None:
    with pytest.raises(StepError):
        trainer(tmp_path / "run").fit(Recorder(fail_at=2), loader(rows))
    samples = [(Variable(f"row {i}"), Variable("0")) for i in range(8)]
    with pytest.raises(ValueError, match="position of a streaming train_dataloader"):
        trainer(tmp_path / "run").fit(
            Recorder(), DataLoader(samples, batch_size=4), ckpt_path="last"
        )
    with pytest.raises(StepError):
        trainer(tmp_path / "map").fit(
            Recorder(fail_at=1), DataLoader(samples, batch_size=4)
        )
    with pytest.raises(ValueError, match="holds no stream position"):
        trainer(tmp_path / "map").fit(Recorder(), loader(rows), ckpt_path="last")


def test_validate_test_and_predict_stream_a_jsonl_file(
    rows: Path, tmp_path: Path
) -> None:
    agent = Recorder()
    run = trainer(tmp_path / "run")
    assert run.validate(agent, loader(rows, 10, 1))["val_loss"] == 1.0
    assert run.test(agent, loader(rows, 10, 1))["test_loss"] == 1.0
    assert agent.evaluated == [list(range(10)), list(range(10, 20)), [20, 21]] * 2
    outputs = run.predict(agent, loader(rows, 10, 1))
    assert [len(out.data) for out in outputs] == [10, 10, 2]
    assert outputs[0].data[0] == "ROW 0"


def test_fit_over_a_stream_of_unknown_length_runs(tmp_path: Path) -> None:
    from afnio.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self) -> Any:
            return ((Variable(f"row {i}"), Variable("0")) for i in range(5))

    agent = Recorder()
    trainer(tmp_path / "run", epochs=2).fit(agent, DataLoader(Stream(), batch_size=2))
    assert [ids for _, ids in agent.seen] == [[0, 1], [2, 3], [4]] * 2


def test_trainer_estimate_of_a_stream_matches_the_in_memory_loader(
    tmp_path: Path,
) -> None:
    from afnio.testing import SIMULATOR_MODEL
    from examples.facility_support import SentimentClassifier

    path = tmp_path / "rows.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(30):
            row = {"email": f"email {i} " + "word " * i, "urgency": "low"}
            f.write(
                json.dumps({**row, "sentiment": "neutral", "categories": {}}) + "\n"
            )
    targets = ("urgency", "sentiment", "categories")
    dataset = JsonlDataset(path, input="email", target=targets, buffer_size=4, seed=0)
    in_memory = list(JsonlDataset(path, input="email", target=targets))
    agent = SentimentClassifier(None, SIMULATOR_MODEL)  # no client: no LM call
    run = Trainer(max_epochs=2)
    streamed = run.estimate(agent, DataLoader(dataset, batch_size=8), models="gpt-5")
    listed = run.estimate(agent, DataLoader(in_memory, batch_size=8), models="gpt-5")
    assert streamed == listed
    # the samples read for the shape did not move the stream
    fresh = JsonlDataset(path, input="email", target=targets, buffer_size=4, seed=0)
    assert [x.data for x, _ in dataset] == [x.data for x, _ in fresh]
