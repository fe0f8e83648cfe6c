"""Which LangChain releases afnio admits, and that the admitted range is the tested one.

The extras admit every LangChain 1.x release from 1.7 on, so afnio installs beside a
current LangChain app (``langchain`` 1.5 needs ``langchain-core>=1.8``). CI
(``.ci/run``) runs the suite on the newest allowed releases; ``.ci/oldest`` runs it on
the oldest allowed sets, whose pins these tests tie to ``pyproject.toml``. afnio's
LangChain integration imports without the ``agents`` extra (``langchain``,
``langgraph``): the oldest set without agents runs the suite that way.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
OLDEST_SCRIPT = ROOT / ".ci" / "oldest"

CORE = {"langchain-core": ">=1.7,<2", "langchain-openai": ">=1.7,<2"}
AGENTS = {**CORE, "langchain": ">=1.5,<2", "langgraph": ">=1.2,<2"}
AGENT_PACKAGES = ("langchain", "langgraph")


def _extras() -> dict[str, dict[str, SpecifierSet]]:
    with PYPROJECT.open("rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    parsed: dict[str, dict[str, SpecifierSet]] = {}
    for extra, requirements in extras.items():
        parsed[extra] = {}
        for text in requirements:
            requirement = Requirement(text)
            parsed[extra][requirement.name.lower()] = requirement.specifier
    return parsed


def _langchain_family(extra: dict[str, SpecifierSet]) -> dict[str, SpecifierSet]:
    return {name: spec for name, spec in extra.items() if name in AGENTS}


@pytest.mark.parametrize(
    ("extra", "expected"),
    [("langchain", CORE), ("demo", CORE), ("agents", AGENTS), ("test", AGENTS)],
)
def test_extras_hold_the_langchain_ranges(extra: str, expected: dict[str, str]) -> None:
    assert _langchain_family(_extras()[extra]) == {
        name: SpecifierSet(spec) for name, spec in expected.items()
    }


def test_the_ranges_admit_a_current_langchain_app_and_refuse_2x() -> None:
    extras = _extras()
    agents = extras["agents"]
    # langchain 1.5.0 needs langchain-core>=1.8,<2 and langgraph>=1.2.12,<1.3
    assert Version("1.8.3") in agents["langchain-core"]
    assert Version("1.8.1") in agents["langchain-openai"]
    assert Version("1.5.0") in agents["langchain"]
    assert Version("1.2.24") in agents["langgraph"]
    for name in AGENTS:
        assert Version("2.0.0") not in agents[name], name
    assert Version("1.6.13") not in extras["langchain"]["langchain-core"]


def test_the_dspy_extra_and_the_test_extra_agree() -> None:
    extras = _extras()
    assert extras["test"]["dspy"] == extras["dspy"]["dspy"]


@pytest.mark.parametrize("package", sorted(AGENTS))
def test_installed_langchain_packages_lie_in_the_extras_ranges(package: str) -> None:
    """What this venv runs the suite on is what the extras admit (in CI: the newest)."""
    try:
        installed = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        if package in AGENT_PACKAGES:
            pytest.skip(f"{package} is not installed (the agents extra is not)")
        raise
    assert Version(installed) in _extras()["agents"][package], installed


def _oldest_sets() -> dict[str, dict[str, SpecifierSet]]:
    """The constraints ``.ci/oldest`` installs, per set."""
    text = OLDEST_SCRIPT.read_text(encoding="utf-8")
    sets: dict[str, dict[str, SpecifierSet]] = {}
    for name, body in re.findall(r"^constraints_(\w+)=\$'([^']*)'$", text, re.M):
        lines = body.split("\\n")
        sets[name] = {
            Requirement(line).name.lower(): Requirement(line).specifier
            for line in lines
        }
    return sets


def _pin(spec: SpecifierSet) -> Version:
    (only,) = list(spec)
    assert only.operator == "==", spec
    return Version(only.version.removesuffix(".*"))


def _floor(spec: SpecifierSet) -> Version:
    (lower,) = [s for s in spec if s.operator == ">="]
    return Version(lower.version)


def test_the_oldest_script_pins_the_floors_of_the_extras() -> None:
    sets = _oldest_sets()
    assert set(sets) == {"core17", "agents"}
    extras = _extras()
    core17, agents = sets["core17"], sets["agents"]
    # set (a): the langchain extra alone, at its floors
    assert set(core17) == set(CORE)
    for name in CORE:
        assert _pin(core17[name]) == _floor(extras["langchain"][name]), name
    script = OLDEST_SCRIPT.read_text(encoding="utf-8")
    assert re.search(r'^absent_core17="langchain langgraph"$', script, re.M)
    # set (b): the agents extra at langchain's floor and the oldest core it accepts
    assert set(agents) == set(AGENTS)
    assert _pin(agents["langchain"]) == _floor(extras["agents"]["langchain"])
    assert _pin(agents["langchain-core"]) == Version("1.8.0")
    for name, spec in agents.items():
        assert _pin(spec) in extras["agents"][name], name


_BLOCK_AGENT_PACKAGES = """
import importlib.abc, sys

class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in ("langchain", "langgraph"):
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None

sys.meta_path.insert(0, _Blocked())
for blocked in ("langchain", "langgraph", "langchain.agents", "langgraph.graph"):
    try:
        __import__(blocked)
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"the block let {blocked} through")
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_the_langchain_integration_imports_without_langchain_and_langgraph() -> None:
    pytest.importorskip("langchain_core", reason="needs the langchain extra")
    code = _BLOCK_AGENT_PACKAGES + textwrap.dedent(
        """
        import afnio_integrations.langchain as integration
        from afnio_integrations.langchain import optimize, trace

        assert callable(trace) and callable(optimize)
        for name in integration.__all__:
            getattr(integration, name)
        agent_packages = ("langchain", "langgraph")
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in agent_packages)
        assert not loaded, loaded
        print("ok")
        """
    )
    done = _run(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "ok"


def test_every_integration_module_imports_without_langchain_and_langgraph() -> None:
    """pytest imports every module for its doctests: a top-level ``import langgraph``
    would break the suite wherever the agents extra is not installed."""
    pytest.importorskip("langchain_core", reason="needs the langchain extra")
    pytest.importorskip("dspy", reason="needs the dspy extra")
    code = _BLOCK_AGENT_PACKAGES + textwrap.dedent(
        """
        import importlib, pkgutil
        import afnio_integrations

        names = [
            info.name
            for info in pkgutil.walk_packages(
                afnio_integrations.__path__, "afnio_integrations."
            )
            if not info.name.endswith("__main__")
        ]
        for name in names:
            importlib.import_module(name)
        print(len(names))
        """
    )
    done = _run(code)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip().splitlines()[-1]) > 10


def test_the_langchain_integration_imports_beside_langchain_and_langgraph() -> None:
    for package in AGENT_PACKAGES:
        pytest.importorskip(package, reason="needs the agents extra")
    code = textwrap.dedent(
        """
        import langchain.agents, langgraph.graph
        import afnio_integrations.langchain
        from langchain.agents import create_agent
        print("ok")
        """
    )
    done = _run(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "ok"
