"""A streamed trainset (a JsonlDataset) in LangChain ``optimize()``: read as the
training goes (one batch at a time), each row checked when it is read (a bad row names
``trainset[i]``, a bad line names the file's line), every epoch again; a valset is
required. LM calls go to a live simulator. (DSPy ``AfnioTGD``:
tests/integrations/dspy/test_jsonl_trainset.py.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import afnio
from afnio.models.openai import OpenAI
from afnio.testing import SIMULATOR_MODEL, Simulator
from afnio.utils.data import IterableDataset, JsonlDataset, JsonlRowError

ROWS = [
    ("The heater broke again, this is awful.", "negative"),
    ("I love how quickly you fixed the lift.", "positive"),
    ("Please confirm the Tuesday visit.", "neutral"),
    ("Terrible response time, I am upset.", "negative"),
] * 3  # 12 rows
CLASSIFY = "Classify the sentiment of the message."


def write_rows(path: Path, rows: list[tuple[str, str]] = ROWS) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for message, label in rows:
            f.write(json.dumps({"message": message, "label": label}) + "\n")
    return path


class Counted(IterableDataset):
    """A JsonlDataset's rows, counting those read so far."""

    def __init__(self, source: JsonlDataset) -> None:
        self.source = source
        self.read = 0

    def __iter__(self) -> Iterator[Any]:
        for row in self.source:
            self.read += 1
            yield row


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with (
        Simulator() as simulator,
        OpenAI(base_url=simulator.base_url, api_key="sk-test", max_retries=0) as bw,
    ):
        afnio.set_backward_model_client(bw, completion_args={"model": SIMULATOR_MODEL})
        yield simulator


# -- LangChain optimize() --------------------------------------------------------------


def chain(sim: Simulator) -> Any:
    pytest.importorskip("langchain_openai", reason="needs the langchain test extra")
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_openai import ChatOpenAI

    prompt = ChatPromptTemplate.from_messages(
        [("system", CLASSIFY), ("human", "{message}")]
    )
    llm = ChatOpenAI(
        model=SIMULATOR_MODEL, base_url=sim.base_url, api_key="k", max_retries=0
    )
    return prompt | llm | StrOutputParser()


def test_optimize_streams_a_jsonl_trainset_one_batch_at_a_time(
    sim: Simulator, tmp_path: Path
) -> None:
    from afnio_integrations.langchain import optimize

    stream = Counted(JsonlDataset(write_rows(tmp_path / "train.jsonl")))
    read_at_metric: list[int] = []

    def exact(prediction: str, target: str) -> int:
        read_at_metric.append(stream.read)
        return int(prediction.strip() == target)

    valset = [{"message": m, "label": t} for m, t in ROWS[:4]]
    _, report = optimize(
        chain(sim),
        stream,
        exact,
        valset=valset,
        label_key="label",
        epochs=2,
        batch_size=4,
        progress=False,
    )
    assert report.score_after > report.score_before
    assert report.train_samples == 2 * 12 and report.steps == 2 * 3
    # rows read when the metric ran: none at the first validation, then one batch
    # (4 rows) more at each step (and at the validation after each epoch), never
    # the whole file ahead
    assert list(dict.fromkeys(read_at_metric)) == [0, 4, 8, 12, 16, 20, 24]
    assert stream.read == 2 * 12  # every epoch reads the file again


def test_optimize_names_a_bad_streamed_row_and_a_bad_line(
    sim: Simulator, tmp_path: Path
) -> None:
    from afnio_integrations.langchain import optimize

    def exact(prediction: str, target: str) -> int:
        return int(prediction.strip() == target)

    path = write_rows(tmp_path / "train.jsonl")
    lines = path.read_text().splitlines()
    lines[5] = json.dumps({"message": "no label here"})
    path.write_text("\n".join(lines) + "\n")
    valset = [{"message": m, "label": t} for m, t in ROWS[:2]]
    kwargs: dict[str, Any] = {
        "valset": valset,
        "label_key": "label",
        "epochs": 1,
        "batch_size": 4,
        "progress": False,
    }
    with pytest.raises(ValueError, match=r"trainset\[5\]"):
        optimize(chain(sim), JsonlDataset(path), exact, **kwargs)
    lines[5] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(JsonlRowError, match=r"train\.jsonl, line 6: invalid JSON"):
        optimize(chain(sim), JsonlDataset(path), exact, **kwargs)


def test_optimize_refuses_a_streamed_trainset_without_valset_or_of_variables(
    sim: Simulator, tmp_path: Path
) -> None:
    from afnio_integrations.langchain import optimize

    path = write_rows(tmp_path / "train.jsonl")
    with pytest.raises(ValueError, match="cannot also serve as the valset"):
        optimize(chain(sim), JsonlDataset(path), len, label_key="label")
    valset = [{"message": "hi", "label": "neutral"}]
    with pytest.raises(TypeError, match=r"built with input=/target=.*label_key="):
        optimize(
            chain(sim),
            JsonlDataset(path, input="message", target="label"),
            len,
            valset=valset,
            label_key="label",
            progress=False,
        )
    assert sim.stats.calls == 0  # refused before any LM call


def test_a_stream_of_variables_is_refused_naming_its_first_row(
    sim: Simulator, tmp_path: Path
) -> None:
    from afnio_integrations.langchain import optimize

    class Pairs(IterableDataset):  # another dataset built for an afnio Module
        def __iter__(self) -> Iterator[Any]:
            return iter([(afnio.Variable("hi"), afnio.Variable("neutral"))])

    valset = [{"message": "hi", "label": "neutral"}]
    with pytest.raises(TypeError, match=r"trainset\[0\]` is made of afnio Variables"):
        optimize(
            chain(sim),
            Pairs(),
            lambda p, t: int(p == t),
            valset=valset,
            label_key="label",
            progress=False,
        )


def test_estimate_of_a_streamed_trainset_matches_the_list_one(
    sim: Simulator, tmp_path: Path
) -> None:
    from afnio_integrations.langchain import estimate

    path = write_rows(tmp_path / "train.jsonl")
    rows = [{"message": m, "label": t} for m, t in ROWS]
    valset = rows[:4]
    kwargs: dict[str, Any] = {"valset": valset, "label_key": "label", "epochs": 2}
    dataset = JsonlDataset(path, buffer_size=5, seed=1)
    fresh = JsonlDataset(path, buffer_size=5, seed=1)
    streamed = estimate(chain(sim), dataset, **kwargs)
    listed = estimate(chain(sim), rows, **kwargs)
    assert streamed == listed
    # the rows sampled for the sizes did not move the stream: the next epoch is
    # the one a fresh dataset reads first
    assert [r["message"] for r in dataset] == [r["message"] for r in fresh]
    assert sim.stats.calls == 0
