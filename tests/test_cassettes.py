"""The recorded cassettes: no secrets, a declared server, and the compare tool."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from afnio.testing.cassettes import compare_cassette_dirs, main

CASSETTES = Path(__file__).resolve().parents[1] / "cassettes"
ALL = sorted(CASSETTES.rglob("*.yaml"))
SECRET_PATTERNS = [
    re.compile(r"sk-[A-Za-z0-9_-]{16,}"),
    re.compile(r"Bearer\s+[A-Za-z0-9._-]{8,}", re.I),
    re.compile(
        r"^\s*(authorization|api-key|x-api-key|openai-organization|cookie)\s*:",
        re.I | re.M,
    ),
]


def test_there_are_cassettes() -> None:
    assert len(ALL) >= 10


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(CASSETTES)))
def test_cassette_holds_no_secret_and_names_its_server(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    for pattern in SECRET_PATTERNS:
        assert not pattern.search(text), (
            f"{path} looks like it holds a secret ({pattern.pattern})"
        )
    data = yaml.safe_load(text)
    assert data["metadata"]["recorded_with"], (
        "every cassette says which server answered"
    )
    for item in data["interactions"]:
        assert set(item["request"]["headers"]) <= {"content-type"}


def test_secret_scan_catches_a_leaked_key(tmp_path: Path) -> None:
    leaked = "headers:\n  authorization:\n  - Bearer sk-abcdefghijklmnopqrstuvwxyz\n"
    assert any(p.search(leaked) for p in SECRET_PATTERNS)


def test_compare_ignores_order_host_and_port_but_not_bodies(tmp_path: Path) -> None:
    source = next(p for p in ALL if "cache_makes" in p.name)
    before, after = tmp_path / "before", tmp_path / "after"
    for root in (before, after):
        (root / "x").mkdir(parents=True)
        shutil.copy(source, root / "x" / "c.yaml")
    data = yaml.safe_load((after / "x" / "c.yaml").read_text())
    data["interactions"].reverse()
    for item in data["interactions"]:
        item["request"]["uri"] = item["request"]["uri"].replace(
            "simulator.invalid", "127.0.0.1:5555"
        )
    (after / "x" / "c.yaml").write_text(yaml.safe_dump(data))
    assert compare_cassette_dirs(before, after) == []
    assert main(["compare", str(before), str(after)]) == 0

    data["interactions"][0]["response"]["body"]["string"] = '{"changed": true}'
    (after / "x" / "c.yaml").write_text(yaml.safe_dump(data))
    problems = compare_cassette_dirs(before, after)
    assert len(problems) == 2 and "newly recorded" in problems[1]
    assert main(["compare", str(before), str(after)]) == 1
    (after / "x" / "extra.yaml").write_text("interactions: []\n")
    assert any("only in after" in p for p in compare_cassette_dirs(before, after))
