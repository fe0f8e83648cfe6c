"""`afnio report`: the self-contained HTML page of a run log, its word diff, its size
budget and its command line (no browser here: see test_report_browser.py)."""

from __future__ import annotations

import copy
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from afnio.report import MAX_BYTES, load_run_log, write_report
from afnio.report._data import build_data
from afnio.report._diff import FOLD_KEEP, FOLD_OVER, replay, tokenize, word_diff
from afnio.report.cli import main as report_cli
from afnio.trainer.run_log import STEP_BUDGET, step_overhead
from afnio_integrations.cli import USAGE
from afnio_integrations.cli import main as afnio_cli
from tests.report._synthetic import write_synthetic_run

_DATA = re.compile(
    r'<script type="application/json" id="afnio-data">(.*?)</script>', re.S
)


def page_data(page: str) -> dict[str, Any]:
    """The JSON data embedded in a report page."""
    found = _DATA.search(page)
    assert found is not None, "no afnio-data block in the page"
    return json.loads(found.group(1))


def write_log(run_dir: Path, records: list[dict[str, Any]], tail: str = "") -> Path:
    """A hand-written run log: ``records`` one per line, then ``tail`` (a torn line)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run_log.jsonl"
    lines = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(lines + tail, encoding="utf-8")
    return path


def header(**params: str) -> dict[str, Any]:
    return {
        "type": "header",
        "schema": "afnio.run_log/1",
        "afnio": "0.1.0",
        "started": "2026-12-06T10:00:00+00:00",
        "max_epochs": 1,
        "batch_size": 2,
        "train_size": 4,
        "val_size": None,
        "optimizer": {"class": "TGD", "momentum": 0, "on_error": "skip"},
        "parameters": [
            {"name": name, "role": "prompt", "value": value}
            for name, value in params.items()
        ],
    }


def step(number: int, *params: dict[str, Any], cost: float = 0.01) -> dict[str, Any]:
    return {
        "type": "step",
        "step": number,
        "epoch": 0,
        "batch": number - 1,
        "samples": {"dataset": "train", "indices": [0, 1], "indexed_by": "dataset"},
        "metrics": {"accuracy": 0.5},
        "reverted": None,
        "params": list(params),
        "cost": {
            "total_usd": cost * number,
            "step_usd": cost,
            "by_phase": [{"phase": "forward", "model": "m", "cost": cost}],
        },
        "ts": "2026-12-06T10:00:01+00:00",
    }


def change(
    name: str, before: str, after: str | None, *feedback: str, status: str = ""
) -> dict[str, Any]:
    return {
        "name": name,
        "before": before,
        "after": after,
        "status": status or ("updated" if after is not None else "no_feedback"),
        "answer": None,
        "feedback": [
            {"text": text, "samples": [i], "call_samples": None, "count": 1}
            for i, text in enumerate(feedback)
        ],
        "feedback_shown": "",
    }


# -- the page ------------------------------------------------------------------


def test_report_is_one_self_contained_file_with_no_network_references(
    tmp_path: Path,
) -> None:
    write_synthetic_run(tmp_path / "run", steps=30, steps_per_epoch=10, resume_at=12)
    path = write_report(tmp_path / "run")
    assert path == tmp_path / "run" / "report.html"
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "report.html",
        "run_log.jsonl",
    ]  # one file, nothing beside it
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>")
    assert "http" not in page.lower()  # no URL of any scheme to a server
    targets = re.findall(
        r"""\b(?:src|href|action|srcset)\s*=\s*["']?([^"'\s>]*)""", page
    )
    assert targets and all(t.startswith("#") for t in targets), targets
    assert "<link" not in page and "@import" not in page and "url(" not in page
    scripts = re.findall(r"<script\b[^>]*>", page)
    assert scripts == ['<script type="application/json" id="afnio-data">', "<script>"]
    assert page.count("<style>") == 1
    data = page_data(page)
    assert len(data["steps"]) == 30 and len(data["params"]) == 3


def test_run_texts_cannot_break_out_of_the_data_block(tmp_path: Path) -> None:
    evil = '</script><script>alert(1)</script><!-- <img src="x"> & \u2028'
    write_log(
        tmp_path,
        [
            header(prompt="Say hi."),
            step(1, change("prompt", "Say hi.", f"Say hi. {evil}", f"feedback {evil}")),
        ],
    )
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert page.count("</script>") == 2  # only the page's own two script elements
    assert "<img" not in page and "alert(1)</script>" not in page
    data = page_data(page)
    assert f"Say hi. {evil}" in data["strings"]
    assert data["steps"][0]["changes"][0]["feedback"][0]["text"] == f"feedback {evil}"


def test_report_data_has_scores_costs_feedback_samples_and_failures(
    tmp_path: Path,
) -> None:
    write_synthetic_run(
        tmp_path,
        steps=60,
        steps_per_epoch=20,
        resume_at=None,
        feedback_chars_per_step=6_000,
    )
    data = page_data(write_report(tmp_path).read_text(encoding="utf-8"))
    steps = data["steps"]
    assert [s["step"] for s in steps] == list(range(1, 61))
    assert data["phases"] == ["forward", "evaluation", "optimizer"]
    assert all(set(s["phases"]) == set(data["phases"]) for s in steps)
    assert [(v["step"], v["kind"]) for v in data["validations"]] == [
        (0, "initial"),
        (20, "epoch"),
        (40, "epoch"),
        (60, "epoch"),
        (60, "test"),
    ]
    first = steps[0]["changes"][0]
    assert first["status"] == "updated"
    assert (
        data["strings"][first["before"]]
        == data["strings"][data["params"][0]["initial"]]
    )
    assert any(op[0] in "+-" for op in first["diff"])
    item = first["feedback"][0]
    assert item["text"].startswith("Sample feedback")
    assert set(item["samples"]) <= set(steps[0]["samples"])  # dataset indices
    assert steps[0]["indexed_by"] == "dataset"
    assert any("group" in f for f in first["feedback"])  # one call, several samples
    failed = steps[16]["changes"][2]  # step 17: the last parameter fails
    assert failed["status"] == "failed" and "after" not in failed
    assert "improved_value" in failed["error"] and failed["attempts"] == 3
    quiet = steps[49]["changes"]  # step 50: no feedback at all
    assert {c["status"] for c in quiet} == {"no_feedback"}
    assert all("diff" not in c for c in quiet)
    assert data["meta"]["status"] == "completed" and data["notes"] == []
    assert data["meta"]["total_cost"] == pytest.approx(steps[-1]["total"])


def test_parameter_texts_are_stored_once_and_steps_refer_to_them(
    tmp_path: Path,
) -> None:
    write_synthetic_run(tmp_path, steps=40, steps_per_epoch=20, resume_at=None)
    page = write_report(tmp_path).read_text(encoding="utf-8")
    data = page_data(page)
    strings = data["strings"]
    assert len(strings) == len(set(strings))
    for s in data["steps"]:
        for c in s["changes"]:
            if "after" in c:
                # the step's after text is the next step's before: one entry, two refs
                assert isinstance(c["after"], int) and isinstance(c["before"], int)
    finals = [strings[p["final"]] for p in data["params"]]
    raw = _DATA.search(page).group(1)
    for text in finals:
        assert raw.count(json.dumps(text, ensure_ascii=False)[1:-1]) == 1


def test_run_without_validation_unfinished_with_a_torn_last_line(
    tmp_path: Path,
) -> None:
    log = write_synthetic_run(
        tmp_path, steps=20, validation=False, finished=False, resume_at=None
    )
    with open(log, "ab") as f:
        f.write(b'{"type":"step","step":21,"epoch"')  # killed mid-line
    records = load_run_log(log)
    assert [r["type"] for r in records][:2] == ["header", "step"]
    assert records[-1]["step"] == 20  # the torn line is skipped
    data = page_data(write_report(tmp_path).read_text(encoding="utf-8"))
    assert len(data["steps"]) == 20 and data["validations"] == []
    assert data["meta"]["status"] == "unfinished"
    notes = " ".join(data["notes"])
    assert "no end record" in notes and "incomplete" in notes


def test_resumed_run_shows_each_step_once_and_marks_the_resume(tmp_path: Path) -> None:
    log = write_synthetic_run(tmp_path, steps=40, steps_per_epoch=20, resume_at=30)
    kinds = [r["type"] for r in load_run_log(log)]
    assert kinds.count("resume") == 1
    data = page_data(write_report(tmp_path).read_text(encoding="utf-8"))
    assert [s["step"] for s in data["steps"]] == list(range(1, 41))
    assert data["resumes"] == [
        {
            "after": 25,
            "ts": data["resumes"][0]["ts"],
            "epoch": 1,
            "batch": 4,
            "exact": True,
        }
    ]


def test_steps_written_twice_after_an_inexact_resume_keep_the_last(
    tmp_path: Path,
) -> None:
    write_log(
        tmp_path,
        [
            header(p="a"),
            step(1, change("p", "a", "a b", "add b")),
            {"type": "resume", "ts": "t", "epoch": 0, "batch": 0, "exact": False},
            step(1, change("p", "a", "a c", "add c")),
            {"type": "end", "status": "completed", "total_cost": 0.01},
        ],
    )
    data = page_data(write_report(tmp_path).read_text(encoding="utf-8"))
    assert len(data["steps"]) == 1
    assert data["strings"][data["steps"][0]["changes"][0]["after"]] == "a c"
    assert data["resumes"][0]["exact"] is False
    assert "written twice" in data["notes"][0]


def test_load_run_log_rejects_another_schema_and_a_damaged_middle_line(
    tmp_path: Path,
) -> None:
    other = dict(header(p="a"), schema="afnio.run_log/2")
    path = write_log(tmp_path / "a", [other])
    with pytest.raises(ValueError, match=r"run_log\.jsonl.*afnio\.run_log/2"):
        load_run_log(path)
    path = write_log(
        tmp_path / "b", [header(p="a")], tail="{oops\n" + json.dumps(step(1)) + "\n"
    )
    with pytest.raises(
        ValueError, match=r"run_log\.jsonl: line 2 is not a JSON record"
    ):
        load_run_log(path)
    path = write_log(tmp_path / "c", [step(1)])
    with pytest.raises(ValueError, match="no header record"):
        load_run_log(path)


# -- reverted steps ------------------------------------------------------------


def reverted(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` (a step) as the Trainer writes it when revert_on_regression undid
    it: the proposal stays in ``after``, the record says ``"reverted": 1``."""
    return dict(record, reverted=1)


def test_a_reverted_step_shows_its_proposal_as_undone_and_keeps_the_before_text(
    tmp_path: Path,
) -> None:
    write_log(
        tmp_path,
        [
            header(p="Be brief."),
            step(1, change("p", "Be brief.", "Be brief and kind.", "add kind")),
            reverted(
                step(2, change("p", "Be brief and kind.", "Be long and rude.", "x"))
            ),
            # the next step starts from the restored text; no "before" here: the
            # report carries the text over from the step before
            step(3, {"name": "p", "status": "no_feedback", "feedback": []}),
        ],
    )
    data = page_data(write_report(tmp_path).read_text(encoding="utf-8"))
    strings = data["strings"]
    undone = data["steps"][1]["changes"][0]
    assert data["steps"][1]["reverted"] is True
    assert undone["status"] == "reverted" and undone["reverted"] is True
    assert undone["proposed"] == "updated"
    assert strings[undone["after"]] == "Be long and rude."  # the proposal stays visible
    assert any(op == ["+", "long"] for op in undone["diff"])
    kept = data["steps"][0]["changes"][0]
    assert kept["status"] == "updated" and "reverted" not in kept
    assert strings[data["steps"][2]["changes"][0]["before"]] == "Be brief and kind."
    card = data["params"][0]
    assert strings[card["final"]] == "Be brief and kind."  # no end record: replayed
    assert "rude" not in json.dumps(card["diff"])


def test_the_end_record_final_text_is_the_parameter_card_final_text(
    tmp_path: Path,
) -> None:
    write_log(
        tmp_path,
        [
            header(p="Be brief.", q="Say hi."),
            reverted(step(1, change("p", "Be brief.", "Be very long and rude.", "x"))),
            {
                "type": "end",
                "status": "completed",
                "steps": 1,
                "total_cost": 0.01,
                # q changed outside the logged steps (say, a resume): end is the truth
                "final": [
                    {"name": "p", "value": "Be brief."},
                    {"name": "q", "value": "Say hello."},
                ],
            },
        ],
    )
    data = page_data(write_report(tmp_path).read_text(encoding="utf-8"))
    strings = data["strings"]
    p, q = data["params"]
    assert strings[p["final"]] == "Be brief." and "diff" not in p
    assert strings[q["final"]] == "Say hello."
    assert ["+", "hello"] in q["diff"] and ["-", "hi"] in q["diff"]
    assert data["steps"][0]["changes"][0]["status"] == "reverted"


def test_a_reverted_step_without_a_text_change_stays_as_it_was(tmp_path: Path) -> None:
    write_log(
        tmp_path,
        [
            header(p="a"),
            reverted(
                step(1, change("p", "a", None, status="failed"), change("p", "a", "a"))
            ),
        ],
    )
    data = page_data(write_report(tmp_path).read_text(encoding="utf-8"))
    statuses = [c["status"] for c in data["steps"][0]["changes"]]
    assert statuses == ["failed", "unchanged"]
    assert not any(c.get("reverted") for c in data["steps"][0]["changes"])
    assert data["steps"][0]["reverted"] is True


# -- odd run logs ----------------------------------------------------------------


def strict_page_data(page: str) -> dict[str, Any]:
    """The embedded data, parsed the way a browser's JSON.parse does: NaN and
    Infinity are not JSON."""
    found = _DATA.search(page)
    assert found is not None, "no afnio-data block in the page"

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} in the embedded JSON: JSON.parse rejects it")

    return json.loads(found.group(1), parse_constant=refuse)


def test_nan_and_infinity_in_the_run_log_become_null_in_the_page(
    tmp_path: Path,
) -> None:
    nan, inf = float("nan"), float("inf")
    first = step(1, change("p", "a", "b", "t"))
    first.update(epoch=nan, batch=inf, metrics={"loss": nan, "x": inf, "ok": 0.5})
    first["cost"] = {
        "step_usd": nan,
        "total_usd": 1,
        "by_phase": [{"phase": "forward", "cost": nan}],
    }
    first["params"][0]["feedback"][0]["count"] = nan
    records = [
        dict(header(p="a"), max_epochs=inf),
        first,
        {"type": "validation", "step": 1, "epoch": nan, "metrics": {"loss": -inf}},
        {"type": "resume", "step": nan, "epoch": inf, "batch": nan},
        {"type": "end", "status": "completed", "total_cost": nan},
    ]
    (tmp_path / "run_log.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8"
    )  # json.dumps writes NaN / Infinity, and json.loads reads them back
    page = write_report(tmp_path).read_text(encoding="utf-8")
    data = strict_page_data(page)
    assert data["steps"][0]["epoch"] is None and data["steps"][0]["batch"] is None
    assert data["steps"][0]["metrics"] == {"ok": 0.5}
    assert data["steps"][0]["cost"] is None and data["steps"][0]["phases"] == {}
    assert data["validations"][0]["epoch"] is None
    assert data["meta"]["total_cost"] is None and data["meta"]["max_epochs"] is None


def test_json_for_script_replaces_values_json_cannot_carry() -> None:
    from afnio.report._html import _json_for_script

    text = _json_for_script(
        {"a": float("nan"), "b": [float("-inf"), 1.5], 3: (1, Path("x"))}
    )
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "3": [1, "x"]}


def test_fields_of_the_wrong_type_are_left_out_with_a_note(tmp_path: Path) -> None:
    odd_step = step(2, change("p", "a", "a b", "t"))
    odd_step.update(metrics="high", samples=[1, 2], cost=[0.1], epoch="one")
    odd_step["params"][0]["feedback"] = {"text": "not a list"}
    write_log(
        tmp_path,
        [
            dict(header(p="a"), parameters=7, optimizer="TGD", started=5),
            step(1, change("p", "a", "a", "t")),
            odd_step,
            dict(step(3), params=True),
            {"type": "step", "step": "4", "params": []},
            {"type": "end", "status": "completed", "final": {"p": "a b"}},
        ],
    )
    data = page_data(write_report(tmp_path).read_text(encoding="utf-8"))
    assert [s["step"] for s in data["steps"]] == [1, 2, 3]
    assert [p["name"] for p in data["params"]] == ["p"]  # from the steps
    assert data["steps"][1]["metrics"] == {} and data["steps"][1]["epoch"] is None
    assert data["steps"][1]["changes"][0]["status"] == "updated"
    assert "feedback" not in data["steps"][1]["changes"][0]
    assert data["steps"][2]["changes"] == []
    assert (
        data["meta"]["started"] is None and data["meta"]["optimizer"]["class"] is None
    )
    note = data["notes"][-1]
    assert note.startswith("Some fields of the run log have an unexpected type")
    for where in (
        "header parameters (not a list)",
        "step params (not a list)",
        "step metrics (not an object)",
        "step samples (not an object)",
        "step cost (not an object)",
        "step epoch (not an integer)",
        "step params[].feedback (not a list)",
        "step record without a step number",
        "end final (not a list)",
        "header optimizer (not an object)",
    ):
        assert where in note, where


_ODD_VALUES = [
    None,
    "x",
    -1,
    1.5,
    True,
    [],
    {},
    [1, "a"],
    {"a": 1},
    float("nan"),
    float("inf"),
    10**30,
    "<img src=x onerror=alert(1)>",
]


def _paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path to a value inside ``value`` (dict keys and list positions)."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*path, key))
    elif isinstance(value, list):
        for position, item in enumerate(value):
            yield from _paths(item, (*path, position))


def mutated_logs(
    records: list[dict[str, Any]], count: int, seed: int
) -> Iterator[list[dict[str, Any]]]:
    """``count`` copies of ``records``, each with one field set to an odd value."""
    rng = random.Random(seed)
    for _ in range(count):
        copied = copy.deepcopy(records)
        record = rng.choice(copied)
        path = rng.choice([p for p in _paths(record) if p and p != ("type",)])
        holder = record
        for key in path[:-1]:
            holder = holder[key]
        holder[path[-1]] = rng.choice(_ODD_VALUES)
        yield copied


@pytest.mark.parametrize("seed", range(3))
def test_a_report_is_written_for_any_field_set_to_an_odd_value(
    tmp_path: Path, seed: int
) -> None:
    from afnio.report._html import render_html

    log = write_synthetic_run(
        tmp_path, steps=10, steps_per_epoch=5, resume_at=8, feedback_chars_per_step=900
    )
    records = load_run_log(log)
    next(r for r in records if r["type"] == "step")["reverted"] = 1
    for record in records:  # short texts: this test is about types, not diffs
        for entry in record.get("parameters", []) + record.get("params", []):
            for key in ("value", "before", "after"):
                if isinstance(entry.get(key), str):
                    entry[key] = f"{key} {record.get('step')} text"
    for odd in mutated_logs(records, 400, seed):
        page = render_html(build_data(odd), title="t", version="v")
        data = strict_page_data(page)
        assert len(data["steps"]) <= 10


def test_cli_writes_the_report_of_an_odd_log_and_exits_2_when_it_cannot_read_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_log(
        tmp_path,
        [dict(header(p="a"), parameters=7), dict(step(1), params=True, epoch=[])],
    )
    assert report_cli([str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(tmp_path / "report.html") and out.err == ""

    def unreadable(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", unreadable)
    assert report_cli([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cannot read the run log" in err and "Permission denied" in err
    assert "Traceback" not in err


# -- word diff -----------------------------------------------------------------


def test_word_diff_marks_inserted_and_deleted_words_and_folds_long_equal_runs() -> None:
    ops = word_diff("the cat sat on the mat.", "the dog sat on the mat today.")
    assert ["-", "cat"] in ops and ["+", "dog"] in ops and ["+", " today"] in ops
    assert replay(ops, "the cat sat on the mat.") == (
        "the cat sat on the mat.",
        "the dog sat on the mat today.",
    )
    words = [f"w{i}" for i in range(100)]
    before = " ".join(words)
    after = " ".join([*words[:50], "NEW", *words[50:]])
    ops = word_diff(before, after)
    assert [op[0] for op in ops] == ["=", "~", "=", "+", "=", "~", "="]
    assert ops[3] == ["+", "NEW "]
    for op in ops:
        if op[0] == "=":
            assert len(tokenize(str(op[1]))) == FOLD_KEEP
    assert replay(ops, before) == (before, after)
    assert word_diff("same text", "same text") == [["=", "same text"]]
    assert word_diff("", "new") == [["+", "new"]]


VOCAB = ["alpha", "beta", "gamma", "délta", "é", "x1", "...", ",", "!", "{name}", "🙂"]


@pytest.mark.parametrize("seed", range(40))
def test_word_diff_replays_to_both_texts_for_random_edits(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(10):
        words = [rng.choice(VOCAB) for _ in range(rng.randint(0, 150))]
        edited = list(words)
        for _ in range(rng.randint(0, 8)):
            kind = rng.choice(("insert", "delete", "replace", "newline"))
            where = rng.randrange(len(edited) + 1)
            if kind == "insert" or not edited:
                edited.insert(where, rng.choice(VOCAB))
            elif kind == "delete":
                del edited[min(where, len(edited) - 1)]
            elif kind == "replace":
                edited[min(where, len(edited) - 1)] = rng.choice(VOCAB)
            else:
                edited.insert(where, "\n")
        before, after = " ".join(words), " ".join(edited)
        ops = word_diff(before, after)
        assert replay(ops, before) == (before, after)
        for op in ops:
            if op[0] == "=":  # long unchanged runs are folded
                assert len(tokenize(str(op[1]))) <= FOLD_OVER
            if op[0] == "~":
                assert len(tokenize(before[op[1] : op[2]])) > FOLD_OVER - 2 * FOLD_KEEP
        if before == after:
            assert all(op[0] in "=~" for op in ops)
        else:
            assert any(op[0] in "+-" for op in ops)


# -- size budget ---------------------------------------------------------------


def test_500_steps_3_parameters_report_is_under_10mb(tmp_path: Path) -> None:
    log = write_synthetic_run(
        tmp_path, steps=500, feedback_chars_per_step=20_000, feedback_shown=False
    )
    records = load_run_log(log)
    steps = [r for r in records if r["type"] == "step"]
    assert len(steps) == 500
    feedback = [
        sum(len(f["text"]) for p in r["params"] for f in p["feedback"]) for r in steps
    ]
    assert max(feedback) > 15_000  # about 20 KB of feedback per step in the log
    assert all(step_overhead(r) <= STEP_BUDGET for r in steps)
    path = write_report(tmp_path)
    size = path.stat().st_size
    assert size < 10_000_000, size
    data = page_data(path.read_text(encoding="utf-8"))
    assert len(data["steps"]) == 500 and len(data["params"]) == 3
    changes = [c for s in data["steps"] for c in s["changes"] if "diff" in c]
    assert len(changes) > 1_300  # every parameter changes (nearly) every step


def _big_records(steps: int, chars: int) -> list[dict[str, Any]]:
    """Records with ``chars`` characters of feedback per parameter per step (3
    parameters), as an unbounded (not prepared) log would hold them."""
    rng = random.Random(3)
    records: list[dict[str, Any]] = [header(a="x", b="y", c="z")]
    values = {"a": "x", "b": "y", "c": "z"}
    for n in range(1, steps + 1):
        params = []
        for name in values:
            after = values[name] + f" {name}{n}"
            text = "".join(rng.choice("abc ") for _ in range(chars))
            params.append(
                change(
                    name, values[name], after, text[: chars // 2], text[chars // 2 :]
                )
            )
            values[name] = after
        records.append(step(n, *params))
    return records


def test_feedback_is_cut_evenly_with_a_note_when_over_the_size_budget() -> None:
    records = _big_records(steps=40, chars=6_000)  # 18 KB per step, 720 KB in all
    full = build_data(records, max_bytes=MAX_BYTES)
    assert not full["notes"] or "shortened" not in " ".join(full["notes"])
    budget = 300_000
    data = build_data(records, max_bytes=budget)
    size = len(json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode())
    assert size <= budget
    assert any("shortened" in n and "run_log.jsonl" in n for n in data["notes"])
    kept = [
        sum(len(f["text"]) for c in s["changes"] for f in c["feedback"])
        for s in data["steps"]
    ]
    assert max(kept) - min(kept) <= 6  # evenly across steps (integer shares)
    assert min(kept) >= 500
    items = [f for s in data["steps"] for c in s["changes"] for f in c["feedback"]]
    assert all(f["cut"] == 3_000 - len(f["text"]) for f in items)
    assert all("diff" in c for s in data["steps"] for c in s["changes"])


def test_diffs_give_way_when_the_parameter_texts_alone_fill_the_budget() -> None:
    records = _big_records(steps=30, chars=100)
    data = build_data(records, max_bytes=12_000)
    assert any("diffs" in n for n in data["notes"])
    assert all(c.get("nodiff") for s in data["steps"] for c in s["changes"])


# -- command line --------------------------------------------------------------


def test_cli_report_prints_the_path_and_writes_the_page(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_synthetic_run(tmp_path / "run", steps=5, resume_at=None)
    assert report_cli([str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(tmp_path / "run" / "report.html")
    assert Path(printed).read_text(encoding="utf-8").startswith("<!doctype html>")
    out = tmp_path / "elsewhere" / "deep" / "r.html"
    assert report_cli([str(tmp_path / "run"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and out.is_file()


def test_cli_open_calls_the_browser_with_the_file_uri(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    opened: list[str] = []
    monkeypatch.setattr("webbrowser.open", lambda url, *a, **k: opened.append(url))
    write_synthetic_run(tmp_path, steps=3, resume_at=None)
    assert report_cli([str(tmp_path), "--open"]) == 0
    assert opened == [(tmp_path / "report.html").resolve().as_uri()]
    assert capsys.readouterr().out.strip() == str(tmp_path / "report.html")
    assert report_cli([str(tmp_path)]) == 0
    assert len(opened) == 1  # no --open, no browser


def test_cli_exits_2_naming_run_dir_without_a_run_log(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr("webbrowser.open", lambda *a, **k: pytest.fail("opened"))
    missing = tmp_path / "nope"
    assert report_cli([str(missing), "--open"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err and "trainer.fit" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report_cli([str(empty)]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "run_log.jsonl" in err and "trainer.fit" in err
    write_log(tmp_path / "other", [dict(header(p="a"), schema="something/9")])
    assert report_cli([str(tmp_path / "other")]) == 2
    assert "something/9" in capsys.readouterr().err
    assert not (empty / "report.html").exists()


def test_afnio_report_command_runs_through_the_afnio_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "report" in USAGE and "RUN_DIR" in USAGE
    write_synthetic_run(tmp_path, steps=3, resume_at=None)
    assert afnio_cli(["report", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "report.html")
    assert afnio_cli(["report", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        afnio_cli(["report", "--help"])
    assert exit_info.value.code == 0
    assert "--open" in capsys.readouterr().out
