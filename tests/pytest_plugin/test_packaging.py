"""How the plugin ships: the ``pytest11`` entry point names ``afnio_pytest.plugin``,
setuptools packages ``afnio_pytest``, and the ``pytest`` extra's pins are the ``test``
extra's (the suite runs with the versions users get)."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _project() -> dict:
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)


def test_the_pytest11_entry_point_is_the_plugin_module() -> None:
    project = _project()
    assert project["project"]["entry-points"]["pytest11"] == {
        "afnio": "afnio_pytest.plugin"
    }
    installed = {
        ep.name: ep.value
        for ep in importlib.metadata.entry_points(group="pytest11")
        if ep.dist is not None and ep.dist.name == "afnio-local"
    }
    assert installed == {"afnio": "afnio_pytest.plugin"}, (
        "reinstall: pip install -e '.[test,dev]'"
    )


def test_setuptools_packages_afnio_pytest() -> None:
    include = _project()["tool"]["setuptools"]["packages"]["find"]["include"]
    assert "afnio_pytest*" in include


def test_the_pytest_extra_is_part_of_the_test_extra() -> None:
    extras = _project()["project"]["optional-dependencies"]

    def parsed(name: str) -> dict[str, str]:
        return {
            (r := Requirement(text)).name.lower(): str(r.specifier)
            for text in extras[name]
        }

    plugin, test = parsed("pytest"), parsed("test")
    assert set(plugin) == {"pytest", "vcrpy", "pytest-recording"}
    assert {name: test.get(name) for name in plugin} == plugin
