"""Every Python example in README.md and docs/*.md runs as written.

A block fenced as ```` ```python ```` is a complete script: it runs on its own, in a
temporary working directory, offline (the examples use the bundled simulator). Blocks
fenced otherwise (```` ```py ````, ```` ```bash ````, ...) are shown, not run.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from tests._helpers import collect_what_earlier_tests_left

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
# a fence at the start of a line, possibly indented (in a list item)
_BLOCK = re.compile(r"^([ \t]*)```python\n(.*?)^\1```", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    """The ```python blocks of a Markdown file, dedented by their fence's indent."""
    blocks = []
    for indent, body in _BLOCK.findall(path.read_text(encoding="utf-8")):
        lines = body.splitlines(keepends=True)
        blocks.append("".join(line.removeprefix(indent) for line in lines))
    return blocks


BLOCKS = [
    (path.relative_to(ROOT).as_posix(), index, code)
    for path in PAGES
    for index, code in enumerate(python_blocks(path))
]


OPTIONAL = {"agents": ("langchain", "langgraph"), "mlflow": ("mlflow",)}
"""Packages of an optional extra an example may import: without them (``.ci/oldest
core17`` installs no ``agents`` extra, and ``.ci/oldest`` no ``mlflow`` extra) the
example is skipped, naming the extra."""


def test_readme_has_one_python_example_each_for_afnio_langchain_and_dspy() -> None:
    blocks = python_blocks(README)
    assert len(blocks) == 3
    afnio_example, langchain_example, dspy_example = blocks
    assert "from afnio.optim import TGD" in afnio_example
    assert "from afnio_integrations.langchain import" in langchain_example
    assert "from afnio_integrations.dspy import" in dspy_example


def test_docs_pages_have_python_examples() -> None:
    documented = {name for name, _, _ in BLOCKS if name.startswith("docs/")}
    assert len(documented) >= 10, documented


@pytest.mark.parametrize(
    ("page", "index", "code"),
    BLOCKS,
    ids=[f"{page}[{index}]" for page, index, _ in BLOCKS],
)
def test_example_runs(
    page: str,
    index: int,
    code: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for extra, modules in OPTIONAL.items():
        for module_name in modules:
            if re.search(rf"^\s*(from|import) {module_name}\b", code, re.M):
                pytest.importorskip(module_name, reason=f"needs the {extra} extra")
    monkeypatch.chdir(tmp_path)  # examples may write files
    # garbage earlier tests left is not the example's (see the helper)
    left = collect_what_earlier_tests_left()
    if left:
        print("left by earlier tests:", left)
    # a real module, as a script would have (pydantic resolves names through it)
    name = re.sub(r"\W", "_", f"doc_example_{page}_{index}")
    module = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    compiled = compile(code, f"{page}[python block {index}]", "exec")
    exec(compiled, module.__dict__)


def test_readme_and_the_reports_page_show_the_run_report_screenshots() -> None:
    readme = README.read_text(encoding="utf-8")
    reports = (DOCS / "reports.md").read_text(encoding="utf-8")
    assert "](docs/img/report.png)" in readme
    assert "](img/report.png)" in reports
    assert "](img/report-timeline.png)" in reports
    for name in ("report.png", "report-timeline.png"):
        image = DOCS / "img" / name
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert image.stat().st_size < 300_000, name  # keep the repository light
