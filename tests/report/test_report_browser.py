"""The run report in a real browser: headless Chromium from the distribution's
packages, driven by Selenium with the distribution's ``chromedriver`` passed
explicitly (nothing is downloaded).

Where Chromium, chromedriver or Selenium is missing the tests skip with the reason,
except under CI (``CI=true``), where they fail; ``AFNIO_BROWSER_TESTS=skip`` skips
them even under CI (``.ci/oldest``, which does not install the ``browser`` extra).
Each test saves a screenshot in its ``tmp_path`` and copies it into
``$AFNIO_TEST_ARTIFACTS`` when that is set.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from afnio.report import load_run_log, write_report
from tests.report._synthetic import write_synthetic_run


def _missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[browser]')"
    for program, package in (
        ("chromium", "chromium"),
        ("chromedriver", "chromium-driver"),
    ):
        if shutil.which(program) is None:
            return f"no {program} on PATH (apt-get install {package})"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium (Selenium 4) with the browser console log enabled."""
    if os.environ.get("AFNIO_BROWSER_TESTS") == "skip":
        pytest.skip("AFNIO_BROWSER_TESTS=skip: the browser tests are turned off")
    why = _missing()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(
                f"{why}; under CI (CI=true) the browser tests must run: .ci/run "
                "installs chromium, chromium-driver and the browser extra (set "
                "AFNIO_BROWSER_TESTS=skip where that is not wanted)"
            )
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(
        service=Service(shutil.which("chromedriver")), options=options
    )
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
    )
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def big_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of a 500-step, 3-parameter synthetic run (resumed once)."""
    run_dir = tmp_path_factory.mktemp("big-run")
    write_synthetic_run(run_dir, steps=500, feedback_shown=False)
    return write_report(run_dir)


def open_report(driver: Any, path: Path) -> dict[str, int]:
    """Load ``path``, wait until the page says it is rendered, return its counts."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(path.resolve().as_uri())
    WebDriverWait(driver, 60).until(
        lambda d: d.execute_script("return document.body.dataset.ready") == "1"
    )
    return driver.execute_script("return window.afnioReport")


def severe(driver: Any) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def screenshot(driver: Any, tmp_path: Path, name: str) -> Path:
    """Save a screenshot in ``tmp_path`` (and ``$AFNIO_TEST_ARTIFACTS``)."""
    png = tmp_path / name
    assert driver.save_screenshot(str(png)), "the screenshot was not written"
    assert png.stat().st_size > 10_000  # a rendered page, not a blank image
    artifacts = os.environ.get("AFNIO_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, Path(artifacts) / name)
    return png


def visible(driver: Any, css: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return [e for e in driver.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]


def wait_for(driver: Any, check: Callable[[Any], Any]) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 20).until(check)


def set_value(driver: Any, element_id: str, value: str) -> None:
    """Set an input/select value the way a user's change would (a change event)."""
    driver.execute_script(
        "var e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('change', {bubbles: true}));",
        element_id,
        value,
    )


def test_500_step_report_loads_without_console_errors_and_shows_diff_and_feedback(
    browser: Any, big_run: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    counts = open_report(browser, big_run)
    loaded = time.monotonic() - started
    assert counts == {"steps": 500, "params": 3}
    assert severe(browser) == []
    # lazily rendered: a first batch of changes, not all 1,500
    rendered = visible(browser, "#changes .change")
    assert 0 < len(rendered) < 200
    first = rendered[0]
    assert first.get_attribute("data-step") == "1"
    assert first.find_elements("css selector", ".diff ins")
    assert first.find_elements("css selector", ".diff del, .diff ins")
    feedback = first.find_element("css selector", ".feedback")
    assert "Sample feedback" in feedback.text and "train rows #" in feedback.text
    assert browser.find_element("id", "stat-steps").text == "500"
    assert browser.find_element("id", "stat-params").text == "3"
    assert len(visible(browser, ".param-card")) == 3
    assert visible(browser, "#score-chart svg path") and visible(
        browser, "#cost-chart svg rect"
    )
    # scrolling renders more
    browser.execute_script("window.scrollTo(0, document.body.scrollHeight)")
    wait_for(browser, lambda d: len(visible(d, "#changes .change")) > len(rendered))
    screenshot(browser, tmp_path, "report-500-steps.png")
    assert severe(browser) == []
    assert loaded < 60  # generous: a slow shared machine, not a benchmark


def test_param_filter_hides_other_parameters(browser: Any, big_run: Path) -> None:
    open_report(browser, big_run)
    names = {e.get_attribute("data-param") for e in visible(browser, ".change")}
    assert len(names) == 3
    set_value(browser, "param-filter", "instructions")
    wait_for(
        browser,
        lambda d: (
            {e.get_attribute("data-param") for e in visible(d, ".change")}
            == {"instructions"}
        ),
    )
    set_value(browser, "status-filter", "failed")
    wait_for(browser, lambda d: not visible(d, ".change"))  # it never fails
    set_value(browser, "param-filter", "output_format")
    wait_for(
        browser,
        lambda d: (
            visible(d, ".change")
            and all(
                "st-failed" in e.get_attribute("class") for e in visible(d, ".change")
            )
        ),
    )
    errors = visible(browser, ".change .error-box")
    assert errors and "improved_value" in errors[0].text
    assert severe(browser) == []


def test_step_range_filter_limits_the_timeline(browser: Any, big_run: Path) -> None:
    open_report(browser, big_run)
    set_value(browser, "step-from", "120")
    set_value(browser, "step-to", "125")
    wait_for(
        browser,
        lambda d: (
            {int(e.get_attribute("data-step")) for e in visible(d, ".change")}
            == set(range(120, 126))
        ),
    )
    # step 125 of the last parameter... 3 parameters x 6 steps, minus failures
    shown = visible(browser, ".change")
    assert 15 <= len(shown) <= 18
    browser.find_element("id", "reset-filters").click()
    wait_for(
        browser,
        lambda d: visible(d, ".change")[0].get_attribute("data-step") == "1",
    )
    assert severe(browser) == []


def test_unfinished_run_without_validation_and_a_torn_line_renders(
    browser: Any, tmp_path: Path
) -> None:
    log = write_synthetic_run(
        tmp_path / "run", steps=12, validation=False, finished=False, resume_at=None
    )
    with open(log, "ab") as f:
        f.write(b'{"type":"step","st')
    counts = open_report(browser, write_report(tmp_path / "run"))
    assert counts == {"steps": 12, "params": 3}
    notes = browser.find_element("id", "notes").text
    assert "no end record" in notes and "incomplete" in notes
    assert browser.find_element("id", "run-status").text == "unfinished"
    assert "no validation" in browser.find_element("id", "score-legend").text
    assert severe(browser) == []
    screenshot(browser, tmp_path, "report-unfinished.png")


def test_demo_report_renders_with_its_steps_parameters_diff_and_feedback(
    browser: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("langchain_openai", reason="the demo needs the demo extra")
    from afnio_integrations.cli import main as afnio_cli

    assert afnio_cli(["demo", "--sample", "--epochs", "2", "--out", str(tmp_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("run report: "), last
    report = Path(last.removeprefix("run report: "))
    assert report.is_file()
    records = load_run_log(report.parent / "run_log.jsonl")
    steps = [r for r in records if r["type"] == "step"]
    params = next(r for r in records if r["type"] == "header")["parameters"]
    counts = open_report(browser, report)
    assert counts == {"steps": len(steps), "params": len(params)}
    assert browser.find_element("id", "stat-steps").text == str(len(steps))
    assert severe(browser) == []
    change = visible(browser, ".change")[0]
    assert change.find_elements("css selector", ".diff ins")
    feedback = change.find_element("css selector", ".feedback").text
    first = next(p for p in steps[0]["params"] if p["status"] == "updated")
    assert change.get_attribute("data-param") == first["name"]
    assert f"FEEDBACK ({len(first['feedback'])})" in feedback.upper()
    item = first["feedback"][0]
    assert item["text"] in feedback
    assert item["samples"], "the demo's feedback names the train rows it came from"
    rows = "train row" if len(item["samples"]) == 1 else "train rows"
    assert f"{rows} #{item['samples'][0]}" in feedback
    assert visible(browser, "#score-chart svg circle")  # validation points
    png = screenshot(browser, tmp_path, "report-demo.png")
    assert png.is_file()


def _minimal_runs() -> dict[str, list[dict[str, Any]]]:
    head = {
        "type": "header",
        "schema": "afnio.run_log/1",
        "parameters": [{"name": "p", "role": "", "value": "a"}],
    }
    empty_step = {"type": "step", "step": 1, "params": [], "metrics": {}, "cost": {}}
    failed = {
        "type": "step",
        "step": 1,
        "params": [
            {
                "name": "p",
                "before": "a",
                "after": None,
                "status": "failed",
                "answer": {"error": "no JSON", "attempts": 2, "raw_answer": "{"},
                "feedback": [{"text": "be brief", "samples": None}],
            }
        ],
    }
    return {
        "header-only": [head],
        "validation-only": [
            head,
            {"type": "validation", "step": 0, "kind": "initial", "metrics": {"f1": 1}},
        ],
        "empty-step-and-unknown-record": [head, empty_step, {"type": "future"}],
        "failed-step-only": [head, failed, {"type": "end", "status": "failed"}],
    }


@pytest.mark.parametrize("name", sorted(_minimal_runs()))
def test_minimal_run_logs_render_without_console_errors(
    browser: Any, tmp_path: Path, name: str
) -> None:
    import json

    records = _minimal_runs()[name]
    (tmp_path / "run_log.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8"
    )
    steps = sum(r["type"] == "step" for r in records)
    assert open_report(browser, write_report(tmp_path)) == {"steps": steps, "params": 1}
    assert severe(browser) == []
    set_value(browser, "status-filter", "all")
    set_value(browser, "param-filter", "p")
    assert severe(browser) == []
    if name == "failed-step-only":
        box = visible(browser, ".change .error-box")[0]
        assert "no JSON" in box.text and "2 attempts" in box.text


def _write(run_dir: Path, records: list[dict[str, Any]]) -> Path:
    """``records`` as ``run_dir/run_log.jsonl`` (``json.dumps``: NaN stays NaN)."""
    import json

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run_log.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8"
    )
    return run_dir


def _entry(
    before: str, after: str | None, samples: list[list[int]], status: str = "updated"
) -> dict[str, Any]:
    return {
        "name": "p",
        "before": before,
        "after": after,
        "status": status,
        "answer": None,
        "feedback": [
            {"text": f"feedback {n}", "samples": ids, "call_samples": None, "count": 1}
            for n, ids in enumerate(samples)
        ],
        "feedback_shown": "",
    }


def _step(number: int, entry: dict[str, Any], **fields: Any) -> dict[str, Any]:
    record = {
        "type": "step",
        "step": number,
        "epoch": 0,
        "batch": number - 1,
        "samples": {"dataset": "train", "indices": [1, 2, 12], "indexed_by": "dataset"},
        "metrics": {"accuracy": 0.5},
        "reverted": None,
        "params": [entry],
        "cost": {"total_usd": 0.01 * number, "step_usd": 0.01, "by_phase": []},
    }
    record.update(fields)
    return record


_HEADER = {
    "type": "header",
    "schema": "afnio.run_log/1",
    "parameters": [{"name": "p", "role": "prompt", "value": "Be brief."}],
}


def test_a_reverted_step_is_marked_undone_and_the_card_shows_the_kept_text(
    browser: Any, tmp_path: Path
) -> None:
    run = _write(
        tmp_path / "run",
        [
            _HEADER,
            _step(1, _entry("Be brief.", "Be brief and kind.", [[12], [1, 2]])),
            _step(
                2,
                _entry("Be brief and kind.", "Be very long and rude.", [[2]]),
                reverted=1,
            ),
            {
                "type": "end",
                "status": "completed",
                "total_cost": 0.02,
                "final": [{"name": "p", "value": "Be brief and kind."}],
            },
        ],
    )
    open_report(browser, write_report(run))
    assert severe(browser) == []
    undone = next(
        e for e in visible(browser, ".change") if e.get_attribute("data-step") == "2"
    )
    assert "st-reverted" in undone.get_attribute("class")
    assert (
        "reverted (score dropped)" in undone.find_element("css selector", ".badge").text
    )
    assert "undid it" in undone.find_element("css selector", ".undone-box").text
    assert "PROPOSED WORD DIFF (UNDONE)" in undone.text.upper()  # CSS upper-cases
    inserted = " ".join(
        e.text for e in undone.find_elements("css selector", ".diff ins")
    )
    assert "rude" in inserted  # the proposal stays visible
    card = browser.find_element("css selector", ".param-card")
    assert "kind" in card.text and "rude" not in card.text
    assert "1 change · 1 reverted" in browser.find_element("id", "cards").text
    assert not visible(browser, "#more")  # every entry is shown: no "Show more"
    # the status filter shows only the undone changes
    set_value(browser, "status-filter", "reverted")
    wait_for(
        browser,
        lambda d: (
            [e.get_attribute("data-step") for e in visible(d, ".change")] == ["2"]
        ),
    )
    assert severe(browser) == []


def test_sample_chips_say_row_for_one_sample_and_rows_for_several(
    browser: Any, tmp_path: Path
) -> None:
    batch = {"dataset": "train", "indices": [0], "indexed_by": "batch"}
    run = _write(
        tmp_path / "run",
        [
            _HEADER,
            _step(1, _entry("Be brief.", "Be kind.", [[12], [1, 2]])),
            _step(2, _entry("Be kind.", "Be nice.", [[0]]), samples=batch),
        ],
    )
    open_report(browser, write_report(run))
    chips = [e.text for e in visible(browser, ".chip-samples")]
    assert chips == ["train row #12", "train rows #1 #2", "batch position #0"]
    batches = [e.text for e in visible(browser, ".change-text p.muted")]
    assert batches == ["Batch: train rows #1 #2 #12", "Batch: batch position #0"]
    assert severe(browser) == []


def test_a_run_log_with_nan_and_infinity_renders(browser: Any, tmp_path: Path) -> None:
    nan = float("nan")
    first = _step(1, _entry("Be brief.", "Be kind.", [[1]]), epoch=nan)
    first["metrics"] = {"accuracy": nan, "loss": float("inf")}
    run = _write(
        tmp_path / "run",
        [_HEADER, first, {"type": "end", "status": "completed", "total_cost": nan}],
    )
    assert open_report(browser, write_report(run)) == {"steps": 1, "params": 1}
    assert visible(browser, ".change .diff ins")
    assert severe(browser) == []


def test_run_logs_with_odd_field_values_render_without_console_errors(
    browser: Any, tmp_path: Path
) -> None:
    from tests.report.test_report import mutated_logs

    log = write_synthetic_run(
        tmp_path / "base",
        steps=8,
        steps_per_epoch=4,
        resume_at=7,
        feedback_chars_per_step=900,
    )
    records = load_run_log(log)
    next(r for r in records if r["type"] == "step")["reverted"] = 1
    for n, odd in enumerate(mutated_logs(records, 30, seed=11)):
        run = _write(tmp_path / f"odd{n}", odd)
        counts = open_report(browser, write_report(run))
        assert counts["steps"] <= 8
        set_value(browser, "status-filter", "all")
        assert severe(browser) == [], (n, odd)
