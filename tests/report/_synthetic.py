"""A synthetic run log (schema ``afnio.run_log/1``) for the report tests.

:func:`write_synthetic_run` writes ``run_log.jsonl`` the way the Trainer does: through
:class:`afnio.trainer.run_log.RunLogWriter` (so every record passes
``prepare_record``: masking and the 20 KB step budget), including a resume from a
"checkpoint" after a kill that tore the last line.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from afnio.trainer.run_log import RunLogWriter

__all__ = ["PARAMS", "WORDS", "write_synthetic_run"]

_VOCABULARY = (
    "the message customer ticket sentiment positive negative neutral urgency high "
    "low medium classify label answer reply carefully politely always never only "
    "return json object field category billing access maintenance safety cleaning "
    "facility request complaint praise if when mentions says asks explicitly "
    "implicitly tone angry calm happy upset delay broken leak door light heat "
    "cooling elevator parking badge wifi schedule weekend urgent routine must "
    "should consider ignore sarcasm emoji greeting signature quote examples rules"
)
WORDS = tuple(_VOCABULARY.split())

PARAMS = (
    ("system_prompt", "the system prompt of the classifier", 120),
    ("instructions", "how to decide the label", 80),
    ("output_format", "the answer format", 40),
)


def _sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + "."


def _text(rng: random.Random, words: int) -> str:
    out: list[str] = []
    while sum(len(s.split()) for s in out) < words:
        out.append(_sentence(rng, rng.randint(6, 16)))
    return " ".join(out)


def _edit(rng: random.Random, text: str) -> str:
    """``text`` with 1-3 random word edits (insert, delete, replace)."""
    words = text.split(" ")
    for _ in range(rng.randint(1, 3)):
        where = rng.randrange(len(words))
        kind = rng.choice(("insert", "delete", "replace"))
        if kind == "insert":
            words.insert(where, rng.choice(WORDS))
        elif kind == "delete" and len(words) > 5:
            del words[where]
        else:
            words[where] = rng.choice(WORDS)
    return " ".join(words)


def _feedback(
    rng: random.Random, indices: list[int], items: int, chars: int
) -> list[dict[str, Any]]:
    out = []
    for n in range(items):
        text = ""
        while len(text) < chars:
            text += _sentence(rng, rng.randint(8, 20)) + " "
        text = f"Sample feedback {n}: " + text[:chars].strip()
        picked = sorted(rng.sample(range(len(indices)), k=min(3, len(indices))))
        item: dict[str, Any] = {
            "text": text,
            "samples": [indices[p] for p in picked],
            "call_samples": [indices[p] for p in range(4)] if n % 2 else None,
            "count": 1 + (n == 0),
        }
        out.append(item)
    return out


def write_synthetic_run(
    run_dir: Path,
    *,
    steps: int = 500,
    feedback_chars_per_step: int = 20_000,
    steps_per_epoch: int = 50,
    validation: bool = True,
    finished: bool = True,
    resume_at: int | None = 250,
    feedback_shown: bool = True,
    seed: int = 7,
) -> Path:
    """Write a synthetic ``run_dir/run_log.jsonl``: ``steps`` optimizer steps over the
    3 parameters of :data:`PARAMS`, each changing every step (a few steps fail for
    the last parameter, every 50th step gets no feedback), about
    ``feedback_chars_per_step`` characters of feedback per step, a validation per
    epoch (unless ``validation`` is false), a kill + resume at ``resume_at`` and an
    ``end`` record plus a test validation (unless ``finished`` is false). Without
    ``feedback_shown`` the records leave that field empty, so the run log keeps
    the most feedback items its 20 KB step budget allows. Returns the run log's
    path."""
    rng = random.Random(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    values = {name: _text(rng, words) for name, _role, words in PARAMS}
    header = {
        "schema": "afnio.run_log/1",
        "afnio": "0.1.0",
        "started": "2026-12-06T10:00:00+00:00",
        "max_epochs": max(1, steps // steps_per_epoch),
        "batch_size": 8,
        "train_size": 8 * steps_per_epoch,
        "val_size": 40,
        "optimizer": {
            "class": "TGD",
            "momentum": 0,
            "on_error": "skip",
            "models": ["gpt-4.1-mini"],
            "constraints": None,
        },
        "parameters": [
            {"name": name, "role": role, "value": values[name]}
            for name, role, _words in PARAMS
        ],
    }
    writer = RunLogWriter()
    writer.start(run_dir, header, None)
    total = 0.0
    score = 0.3
    items_per_param = 3
    chars = feedback_chars_per_step // (items_per_param * len(PARAMS))
    if validation:
        writer.log_validation(
            {
                "type": "validation",
                "step": 0,
                "epoch": 0,
                "kind": "initial",
                "metrics": {"score": score},
                "cost": {"total_usd": 0.0, "pass_usd": 0.01, "by_phase": []},
                "ts": "2026-12-06T10:00:01+00:00",
            }
        )
    saved: dict[str, Any] | None = None
    step = 1
    resumed = False
    while step <= steps:
        epoch, batch = (step - 1) // steps_per_epoch, (step - 1) % steps_per_epoch
        indices = sorted(rng.sample(range(8 * steps_per_epoch), 8))
        silent = step % 50 == 0
        params = []
        for k, (name, _role, _words) in enumerate(PARAMS):
            before = values[name]
            entry: dict[str, Any] = {
                "name": name,
                "before": before,
                "after": None,
                "status": "no_feedback",
                "answer": None,
                "feedback": [],
                "feedback_shown": "",
            }
            if not silent:
                feedback = _feedback(rng, indices, items_per_param, chars)
                entry["feedback"] = feedback
                if feedback_shown:
                    shown = "\n".join(f["text"] for f in feedback)
                    entry["feedback_shown"] = shown[:4000]
                if k == len(PARAMS) - 1 and step % 17 == 0:
                    entry["status"] = "failed"
                    entry["answer"] = {
                        "error": "the optimizer's answer has no 'improved_value' "
                        "field (after 3 attempts)",
                        "attempts": 3,
                        "raw_answer": '{"improved": "..."}',
                    }
                else:
                    after = _edit(rng, before)
                    values[name] = after
                    entry.update(
                        after=after,
                        status="updated",
                        answer={"error": None, "attempts": 1},
                    )
            params.append(entry)
        score = min(1.0, score + rng.uniform(-0.02, 0.03))
        by_phase = [
            {
                "phase": phase,
                "model": "gpt-4.1-mini",
                "calls": calls,
                "prompt_tokens": 900 * calls,
                "completion_tokens": 120 * calls,
                "cost": round(cost * rng.uniform(0.8, 1.2), 6),
            }
            for phase, calls, cost in (
                ("forward", 8, 0.004),
                ("evaluation", 3, 0.002),
                ("optimizer", 3, 0.003),
            )
        ]
        step_usd = sum(row["cost"] for row in by_phase)
        total += step_usd
        writer.log_step(
            {
                "type": "step",
                "step": step,
                "epoch": epoch,
                "batch": batch,
                "samples": {
                    "dataset": "train",
                    "indices": indices,
                    "indexed_by": "dataset",
                },
                "metrics": {"score": round(score, 4)},
                "reverted": None,
                "params": params,
                "cost": {
                    "total_usd": round(total, 6),
                    "step_usd": round(step_usd, 6),
                    "by_phase": by_phase,
                },
                "ts": "2026-12-06T10:00:02+00:00",
            }
        )
        if validation and step % steps_per_epoch == 0:
            writer.log_validation(
                {
                    "type": "validation",
                    "step": step,
                    "epoch": epoch,
                    "kind": "epoch",
                    "metrics": {"score": round(min(1.0, score + 0.02), 4)},
                    "cost": {"total_usd": total, "pass_usd": 0.02, "by_phase": []},
                    "ts": "2026-12-06T10:00:03+00:00",
                }
            )
        if resume_at is not None and step == resume_at - 5 and not resumed:
            saved = {"step": step, "values": dict(values), "total": total}
            state = writer.state_dict()
            saved["state"] = state
        if resume_at is not None and step == resume_at and not resumed:
            # killed mid-line: the redo starts from the checkpoint of step resume_at-5
            writer.close()
            with open(run_dir / "run_log.jsonl", "ab") as f:
                f.write(b'{"type":"step","step":')
            assert saved is not None
            values = dict(saved["values"])
            total = saved["total"]
            writer = RunLogWriter()
            resumed_header = dict(header)
            resumed_header["resume"] = {
                "from_checkpoint": "checkpoints/epoch_4/checkpoint_batch44.hf",
                "epoch": epoch,
                "batch": batch - 5,
                "step": saved["step"],
            }
            writer.start(run_dir, resumed_header, saved["state"])
            resumed = True
            step = saved["step"] + 1
            continue
        step += 1
    if finished:
        writer.finish(
            {
                "type": "end",
                "ts": "2026-12-06T11:00:00+00:00",
                "status": "completed",
                "stopped_reason": f"completed {header['max_epochs']} epochs",
                "total_cost": round(total, 6),
                "steps": steps,
                "final": [{"name": n, "value": v} for n, v in values.items()],
            }
        )
        if validation:
            writer.log_validation(
                {
                    "type": "validation",
                    "step": steps,
                    "epoch": max(0, (steps - 1) // steps_per_epoch),
                    "kind": "test",
                    "metrics": {"score": round(score, 4)},
                    "cost": {"total_usd": total, "pass_usd": 0.02, "by_phase": []},
                    "ts": "2026-12-06T11:00:01+00:00",
                }
            )
    writer.close()
    return run_dir / "run_log.jsonl"
