"""Every Python example in README.md runs as written."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(
    index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # examples may write files
    # a real module, as a script would have (pydantic resolves names through it)
    module = types.ModuleType(f"readme_example_{index}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    code = compile(BLOCKS[index], f"README.md[python block {index}]", "exec")
    exec(code, module.__dict__)
