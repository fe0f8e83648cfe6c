"""The documentation: the README front page and the MkDocs site in docs/."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MKDOCS_YML = ROOT / "mkdocs.yml"
DOC_FILES = [README, MKDOCS_YML, *sorted(DOCS.rglob("*.md"))]

DEMO_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -e '.[demo]' "
    "&& .venv/bin/afnio demo"
)
TEST_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -e '.[test,dev,mlflow,browser]' "
    "&& .venv/bin/python -m pytest"
)


def test_readme_keeps_the_two_quickstart_commands_verbatim() -> None:
    text = README.read_text(encoding="utf-8")
    quickstart = text[text.index("## Quickstart") :]
    lines = [line.strip() for line in quickstart.splitlines()]
    assert DEMO_COMMAND in lines
    assert TEST_COMMAND in lines  # CI reads the test command from the README


def test_readme_is_a_front_page() -> None:
    assert README.stat().st_size < 12_000  # the rest lives in docs/


OUTSIDE = ("../shared", "/work/shared", "shared/data/", "shared/reference")
# the scripts a user runs from a clone: they must not default to the development
# workspace's data either (tests/ may, through their own fixtures)
SCRIPTS = sorted(
    path
    for folder in ("benchmarks", "examples")
    for path in (ROOT / folder).rglob("*.py")
    if ".venvs" not in path.parts
)


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.relative_to(ROOT).name)
def test_no_path_outside_the_repository(path: Path) -> None:
    # a clone has no ../shared (the development workspace's data and references)
    text = path.read_text(encoding="utf-8")
    for outside in OUTSIDE:
        assert outside not in text, f"{path.name} names {outside!r}"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_script_reaches_outside_the_repository(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    # also the pathlib spelling: REPO_ROOT.parent / "shared"
    spelled = re.search(r"\.parent\s*/\s*[\"']shared[\"']", text)
    assert not spelled, f"{path.name} builds a path into ../shared"
    for outside in OUTSIDE:
        assert outside not in text, f"{path.name} names {outside!r}"


def test_the_scripts_are_checked() -> None:
    names = {path.relative_to(ROOT).as_posix() for path in SCRIPTS}
    assert {
        "benchmarks/two_stage.py",
        "benchmarks/estimate_accuracy.py",
        "benchmarks/step_latency.py",
        "examples/facility_support.py",
    } <= names


def test_readme_links_into_the_docs_resolve() -> None:
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\((docs/[^)#\s]+)(?:#[^)\s]*)?\)", text)
    assert len(targets) >= 10
    missing = sorted({t for t in targets if not (ROOT / t).is_file()})
    assert not missing


def test_every_docs_page_is_in_the_nav() -> None:
    nav = MKDOCS_YML.read_text(encoding="utf-8")
    named = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", nav, re.M))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages == named


def test_the_demo_figures_are_stated_in_one_place() -> None:
    # "59.1% -> 83.3%": a before -> after accuracy, stated once (Getting started)
    figure = re.compile(r"\d%\**\s*(->|→)\s*\**\d")
    hits = [
        path.relative_to(ROOT).as_posix()
        for path in DOC_FILES
        if figure.search(path.read_text(encoding="utf-8"))
    ]
    assert hits == ["docs/getting-started.md"]


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None
    or importlib.util.find_spec("material") is None,
    reason="mkdocs and mkdocs-material are not installed (the dev and docs extras "
    "install them; CI does)",
)
def test_mkdocs_build_strict_succeeds(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    site = str(tmp_path / "site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", site],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "getting-started" / "index.html").is_file()
