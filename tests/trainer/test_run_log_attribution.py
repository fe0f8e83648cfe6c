"""Feedback is credited to a dataset sample only when that is certain (issue 22,
review finding 1): a ``training_step`` that scores a subset, a reordering or an
expansion of the loader's batch must never get feedback credited to the wrong
sample (``null`` is acceptable, a wrong index never)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from afnio import Variable
from afnio.autodiff.provenance import FeedbackItem, basis_of, match_positions
from afnio.models.openai import OpenAI
from afnio.testing import SIMULATOR_MODEL
from afnio.trainer import Trainer
from afnio.trainer.run_log import feedback_entries
from afnio.trainer.trainer import _batch_columns
from afnio.utils.data import DataLoader
from benchmarks.resume_kills import MESSAGES, Messages
from examples.facility_support import SentimentClassifier
from tests.trainer import _run_log_helpers

LABELS = ["positive", "negative", "neutral"]


def _transform(rng: random.Random, n: int) -> tuple[str, list[int]]:
    """A random way a training_step may pick the samples it scores: the loader
    positions it scores, in its order."""
    kind = rng.choice(["subset", "permutation", "duplication", "identity"])
    if kind == "subset":
        picked = sorted(rng.sample(range(n), rng.randint(1, n)))
    elif kind == "permutation":
        picked = rng.sample(range(n), n)
    elif kind == "duplication":
        picked = [i for i in range(n) for _ in range(2)]
        rng.shuffle(picked)
    else:
        picked = list(range(n))
    return kind, picked


@pytest.mark.parametrize("seed", range(40))
def test_random_subsets_reorders_and_duplicates_never_credit_a_wrong_sample(
    seed: int,
) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    indices = rng.sample(range(100), n)  # the loader's dataset indices
    texts = [f"message {i} {rng.random():.6f}" for i in indices]  # unique inputs
    labels = [rng.choice(LABELS) for _ in range(n)]  # repeated targets
    batch = (Variable(texts, role="input"), Variable(labels, role="target"))
    columns = _batch_columns(batch, n)
    for _ in range(5):
        kind, picked = _transform(rng, n)
        if kind == "identity":  # the batch's own columns, passed as they are
            scored_inputs, scored_labels = batch[0].data, batch[1].data
        else:
            scored_inputs = [texts[i] for i in picked]
            scored_labels = [labels[i] for i in picked]
        # what an evaluator (targets only) or a chat (its inputs) records
        bases = {
            "targets": basis_of(scored_labels),
            "inputs": basis_of(scored_inputs),
            "both": basis_of(scored_inputs, scored_labels),
        }
        for name, basis in bases.items():
            k = rng.randint(1, min(3, len(picked)))
            positions = sorted(rng.sample(range(len(picked)), k))
            items = [FeedbackItem(f"fb {p}", (p,), None, basis) for p in positions]
            entries = feedback_entries(items, indices, columns)
            for entry, p in zip(entries, positions, strict=True):
                truth = indices[picked[p]]
                assert entry["samples"] in (None, [truth]), (kind, name, picked)
                unique_inputs = name != "targets" and kind != "duplication"
                if unique_inputs or kind == "identity":  # certain: mapped
                    assert entry["samples"] == [truth], (kind, name, picked)
                if kind == "duplication":
                    assert entry["samples"] is None


def test_positions_in_an_unmatched_or_ambiguous_basis_are_unknown() -> None:
    batch = (Variable(["a", "b", "c"], role="x"), Variable(["p", "p", "q"], role="y"))
    columns = _batch_columns(batch, 3)
    cases = [
        (None, (0,)),  # nothing recorded what the positions are numbered in
        (basis_of(["z", "a"]), (1,)),  # a text that is not in the batch
        (basis_of(["p", "q"]), (0,)),  # a subset of repeated values
        (basis_of(["a", "b", "c"]), (3,)),  # outside the basis
    ]
    for basis, positions in cases:
        (entry,) = feedback_entries(
            [FeedbackItem("t", positions, None, basis)], [7, 8, 9], columns
        )
        assert entry["samples"] is None and entry["unknown"] == 1, basis


def test_out_of_range_positions_are_never_written_as_dataset_indices() -> None:
    # the review's case: positions 2, 3 of an expanded batch of 2 samples
    (entry,) = feedback_entries([FeedbackItem("t", (3,), (2, 3))], [10, 11])
    assert entry["samples"] is None and entry["call_samples"] is None


def test_a_group_with_an_unknown_occurrence_credits_no_sample() -> None:
    items = [FeedbackItem("same", None, None), FeedbackItem("same", (1,), None)]
    (entry,) = feedback_entries(items, [10, 11])
    assert entry["samples"] is None
    assert entry["count"] == 2 and entry["unknown"] == 1


sim, client = _run_log_helpers.sim, _run_log_helpers.client  # the fixtures


class _Rearranged(SentimentClassifier):
    """Scores a seeded random subset / permutation / duplication of each batch."""

    def __init__(self, *args: Any, seed: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rng = random.Random(seed)
        self.kinds: list[str] = []

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        emails, (_u, sentiment, _c) = batch
        kind, picked = _transform(self.rng, len(emails.data))
        self.kinds.append(kind)
        sub_e = Variable([emails.data[i] for i in picked], role=emails.role)
        sub_t = Variable([sentiment.data[i] for i in picked], role=sentiment.role)
        score, explanation = self.exact_match(self(sub_e), sub_t)
        return {"loss": (score, explanation)}


def test_a_training_step_scoring_rearranged_batches_credits_no_wrong_sample(
    client: OpenAI, tmp_path: Path
) -> None:
    right = 0
    for seed in range(3):
        agent = _Rearranged(client, SIMULATOR_MODEL, seed=seed)
        loader = DataLoader(Messages(MESSAGES), batch_size=6, shuffle=True, seed=seed)
        root = tmp_path / str(seed)
        trainer = Trainer(
            max_epochs=2,
            default_root_dir=root,
            enable_progress_bar=False,
            enable_agent_summary=False,
            enable_run_summary=False,
            loggers=[],
        )
        trainer.fit(agent, loader)
        lines = (root / "run_log.jsonl").read_text("utf-8").splitlines()
        steps = [r for r in map(json.loads, lines) if r["type"] == "step"]
        assert len(steps) == 4
        for step in steps:
            for item in step["params"][0]["feedback"]:
                # the simulator quotes the word of the email it criticizes
                word = item["text"].split('"')[1].lower()
                for i in item["samples"] or []:
                    assert i in step["samples"]["indices"]
                    assert word in MESSAGES[i][0].lower(), (item, i)
                    right += 1
    assert right > 0  # subsets and reorders of unique emails are still credited


def test_a_column_of_other_rows_beside_a_reformatted_own_column_proves_nothing() -> (
    None
):
    emails = ["alpha one", "beta two", "gamma three", "delta four"]
    columns = basis_of(emails)
    own = [f"Customer wrote: {e}" for e in emails]  # unique, in no batch column
    neighbours = [emails[(i + 1) % 4] for i in range(4)]  # other rows' texts
    basis = (*basis_of(own), *basis_of(neighbours))
    # by value alone the neighbour column would credit sample 0's feedback to row 1
    assert match_positions([0], basis_of(neighbours), columns) == [1]
    assert match_positions([0], basis, columns) is None
    # the loader's own column object beside it is proof: identity wins
    assert match_positions([0], (*basis_of(emails), *basis), columns) == [0]


class _Neighbour(SentimentClassifier):
    """Each sample sees its own message reformatted and the batch's NEXT message as
    context: the context column matches the batch by value, shifted by one."""

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        emails, (_u, sentiment, _c) = batch
        n = len(emails.data)
        mine = Variable([f"Customer wrote: {m}" for m in emails.data], role="message")
        other = Variable(
            [emails.data[(i + 1) % n] for i in range(n)], role="earlier message"
        )
        template = Variable(
            "{message}\n(for context only, an earlier message: {other})", role="t"
        )
        reply = self.chat(
            self.client,
            [
                {"role": "system", "content": [self.system_prompt]},
                {"role": "user", "content": [template]},
            ],
            inputs={"message": mine, "other": other},
            **self.completion_args,
        )
        targets = Variable([s.lower() for s in sentiment.data], role="labels")
        score, explanation = self.exact_match(reply, targets)
        return {"loss": (score, explanation)}


def test_context_from_other_rows_never_credits_feedback_to_them(
    client: OpenAI, tmp_path: Path
) -> None:
    agent = _Neighbour(client, SIMULATOR_MODEL)
    loader = DataLoader(Messages(MESSAGES), batch_size=6, shuffle=True, seed=3)
    trainer = Trainer(
        max_epochs=1,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_agent_summary=False,
        enable_run_summary=False,
        loggers=[],
    )
    trainer.fit(agent, loader)
    lines = (tmp_path / "run_log.jsonl").read_text("utf-8").splitlines()
    steps = [r for r in map(json.loads, lines) if r["type"] == "step"]
    feedback = [f for s in steps for p in s["params"] for f in p["feedback"]]
    assert feedback  # the step had feedback to credit
    for item in feedback:
        word = item["text"].split('"')[1].lower()
        for i in item["samples"] or []:
            assert word in MESSAGES[i][0].lower(), (item, i)
