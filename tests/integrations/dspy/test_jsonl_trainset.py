"""A streamed trainset (a JsonlDataset of dspy.Example) in DSPy ``AfnioTGD``: read as
the training goes, every epoch again; a valset is required, and a JsonlDataset whose
samples are not examples is refused before any LM call. LM calls go to a live
simulator."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

dspy = pytest.importorskip("dspy", reason="needs the dspy extra")
# LiteLLM drops pooled connections to the live simulator without closing them (see
# conftest.py, which closes what a test left open)
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <socket:pytest.PytestUnraisableExceptionWarning"
)

from afnio.testing import Simulator  # noqa: E402
from afnio.utils.data import JsonlDataset  # noqa: E402
from tests.integrations.dspy.conftest import make_lm  # noqa: E402
from tests.utils.data.test_jsonl_integrations import (  # noqa: E402
    ROWS,
    Counted,
    write_rows,
)


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator() as simulator:
        yield simulator


def test_afnio_tgd_streams_a_jsonl_trainset_of_examples(
    sim: Simulator, tmp_path: Path
) -> None:
    from afnio_integrations.dspy import AfnioTGD

    def example(row: dict[str, Any]) -> Any:
        return dspy.Example(message=row["message"], sentiment=row["label"]).with_inputs(
            "message"
        )

    def match(ex: Any, pred: Any, trace: Any = None) -> bool:
        return ex.sentiment == pred.sentiment

    path = write_rows(tmp_path / "train.jsonl")
    valset = [example({"message": m, "label": t}) for m, t in ROWS[:3]]
    with dspy.context(lm=make_lm(sim)):
        tgd = AfnioTGD(metric=match, epochs=2, batch_size=4, progress=False)
        with pytest.raises(ValueError, match="cannot also serve as the valset"):
            tgd.compile(
                dspy.Predict("message -> sentiment"),
                trainset=JsonlDataset(path, transform=example),
            )
        assert sim.stats.calls == 0
        stream = Counted(JsonlDataset(path, transform=example))
        tgd.compile(
            dspy.Predict("message -> sentiment"), trainset=stream, valset=valset
        )
        assert tgd.report is not None
        assert tgd.report.train_samples == 2 * 12 and tgd.report.steps == 2 * 3
        assert stream.read == 2 * 12
        with pytest.raises(
            TypeError, match=r"not dspy.Example: build it with transform="
        ):
            tgd.compile(
                dspy.Predict("message -> sentiment"),
                trainset=JsonlDataset(path, input="message", target="label"),
                valset=valset,
            )
