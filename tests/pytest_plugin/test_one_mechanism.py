"""The project's own suite records and replays through ``afnio_pytest``, the plugin a
user's project uses: one mechanism, not two. ``tests/conftest.py`` keeps no cassette
machinery of its own, no test is marked with pytest-recording's bare ``vcr`` marker,
and every cassette in ``cassettes/`` belongs to a test marked ``afnio_replay``."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from tests.pytest_plugin._runner import clean_env, output, run_pytest

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
CASSETTES = ROOT / "cassettes"
CONFTEST = TESTS / "conftest.py"

SHARED: frozenset[str] = frozenset()
"""Cassettes (paths relative to ``cassettes/``) that no single ``afnio_replay`` test
owns by name, e.g. one shared through ``@pytest.mark.default_cassette`` by tests of
another module. None today."""

# pytest-recording's marker, written so that this file does not match the grep itself
_BARE_VCR = re.compile(r"mark\.vcr\b".replace("\\.", "."))

# names of the cassette machinery that moved into afnio_pytest
_MOVED = re.compile(
    r"^(vcr_config|pytest_recording_configure|pytest_addoption|"
    r"pytest_runtest_makereport)$"
    r"|scrub|persister|miss|replayable",
    re.I,
)


def _dotted(node: ast.AST) -> str:
    """The dotted name of a marker expression (``pytest.mark.foo`` or a call of it)."""
    if isinstance(node, ast.Call):
        node = node.func
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _marks(tree: ast.Module) -> list[tuple[int, str]]:
    """Every marker expression the module applies: decorators and ``pytestmark``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found += [(d.lineno, _dotted(d)) for d in node.decorator_list]
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets
        ):
            values = (
                node.value.elts if isinstance(node.value, ast.List) else [node.value]
            )
            found += [(v.lineno, _dotted(v)) for v in values]
    return found


def test_the_suites_conftest_keeps_no_cassette_machinery() -> None:
    tree = ast.parse(CONFTEST.read_text(encoding="utf-8"))
    defined = [
        node.name
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.ClassDef))
    ]
    assert defined, "tests/conftest.py defines nothing?"
    moved = [name for name in defined if _MOVED.search(name)]
    assert not moved, f"tests/conftest.py still defines {moved}: use afnio_pytest"
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (
            node.names
            if isinstance(node, ast.Import)
            else [ast.alias(node.module or "")]
        )
    }
    assert not imported & {"vcr", "pytest_recording"}, imported
    text = CONFTEST.read_text(encoding="utf-8")
    assert "--real-provider" not in text.replace("--afnio-real-provider", "")
    assert "pytest_plugins" not in text  # the entry point loads the plugin, once
    assert "vcr_cassette_dir" in defined  # the one pytest-recording setting it keeps


def test_no_test_of_the_suite_is_marked_with_the_bare_vcr_marker() -> None:
    marked = []
    for path in sorted(TESTS.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        marked += [
            f"{path.relative_to(ROOT)}:{line}"
            for line, name in _marks(tree)
            if name.split(".")[-2:] == ["mark", "vcr"]
        ]
    assert not marked, f"mark these tests @pytest.mark.afnio_replay: {marked}"
    # the text too, outside the plugin's tests (whose throwaway projects, in strings,
    # check that plain pytest-recording tests are left as they are)
    plugin_tests = TESTS / "pytest_plugin"
    written = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in sorted(TESTS.rglob("*.py"))
        if plugin_tests not in path.parents
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if _BARE_VCR.search(line)
    ]
    assert not written, written


LISTER = """
import json
import os
from pathlib import Path

from pytest_recording.plugin import get_default_cassette_name


def pytest_collection_finish(session):
    found = []
    for item in session.items:
        if item.get_closest_marker("afnio_replay") is None:
            continue
        shared = item.get_closest_marker("default_cassette")
        name = (
            shared.args[0]
            if shared is not None
            else get_default_cassette_name(getattr(item, "cls", None), item.name)
        )
        found.append({"nodeid": item.nodeid, "module": str(item.path), "name": name})
    Path(os.environ["AFNIO_T5_LIST"]).write_text(json.dumps(found))
"""


@pytest.fixture(scope="module")
def replay_tests(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    """The suite's tests marked ``afnio_replay`` (collected in a subprocess), with
    the cassette name pytest-recording gives each."""
    where = tmp_path_factory.mktemp("t5")
    (where / "afnio_t5_lister.py").write_text(LISTER, encoding="utf-8")
    listing = where / "list.json"
    folders = sorted({str(TESTS / p.relative_to(CASSETTES).parts[0]) for p in _all()})
    env = clean_env(PYTHONPATH=f"{where}", AFNIO_T5_LIST=str(listing))
    run = run_pytest(
        ROOT,
        "--co",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "afnio_t5_lister",
        *folders,
        env=env,
        timeout=240,
    )
    assert run.returncode == 0, output(run)[-3000:]
    return json.loads(listing.read_text(encoding="utf-8"))


def _all() -> list[Path]:
    return sorted(CASSETTES.rglob("*.yaml"))


def _cassette_of(test: dict[str, str]) -> Path:
    """Where ``tests/conftest.py``'s ``vcr_cassette_dir`` puts a test's cassette."""
    module = Path(test["module"]).resolve()
    return (
        CASSETTES / module.relative_to(TESTS).with_suffix("") / f"{test['name']}.yaml"
    )


def test_every_cassette_belongs_to_an_afnio_replay_test(
    replay_tests: list[dict[str, str]],
) -> None:
    assert len(replay_tests) >= 80, len(replay_tests)
    used = {_cassette_of(test) for test in replay_tests}
    orphans = [
        str(p.relative_to(CASSETTES))
        for p in _all()
        if p not in used and str(p.relative_to(CASSETTES)) not in SHARED
    ]
    assert not orphans, (
        f"cassettes no afnio_replay test uses (delete them, or list them in SHARED): "
        f"{orphans}"
    )
    missing = [
        test["nodeid"] for test in replay_tests if not _cassette_of(test).is_file()
    ]
    assert not missing, f"afnio_replay tests without a cassette: {missing}"
