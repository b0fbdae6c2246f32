"""Package layering: the core imports no Lightning and nothing above it; systems, callbacks and
data never import each other's layers or the application layer (``commands``); entry scripts are
doors that import no other entry script, and nothing imports them."""

from __future__ import annotations

import ast
import importlib
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_SCRIPTS = {"train", "sample", "study"}
APPLICATION = {"commands"}


def imports_of(path: Path) -> set[str]:
    """Top-level names imported by one file (relative imports excluded)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def imported_packages(package: str) -> dict[str, set[str]]:
    """Top-level packages imported by each file of ``package``."""
    return {str(path.relative_to(ROOT)): imports_of(path) for path in (ROOT / package).rglob("*.py")}


@pytest.mark.parametrize("package, forbidden", [
    ("difftime", {"lightning", "pytorch_lightning", "lightning_modules", "callbacks", "datamodules",
                  *APPLICATION, *ENTRY_SCRIPTS}),
    ("callbacks", {"lightning_modules", *APPLICATION, *ENTRY_SCRIPTS}),
    ("lightning_modules", {"callbacks", *APPLICATION, *ENTRY_SCRIPTS}),
    ("datamodules", {"lightning_modules", "callbacks", *APPLICATION, *ENTRY_SCRIPTS}),
    ("commands", ENTRY_SCRIPTS),
])
def test_layers(package, forbidden):
    offenders = {path: names & forbidden for path, names in imported_packages(package).items() if names & forbidden}
    assert not offenders


def test_the_checker_sees_a_forbidden_import(tmp_path):
    """The AST walk finds ``import X``, ``from X.y import z`` and imports inside functions."""
    path = tmp_path / "f.py"
    path.write_text("import os\nfrom commands.cli import main\ndef f():\n    import train\n    from . import x\n")
    assert imports_of(path) == {"os", "commands", "train"}


@pytest.mark.parametrize("script", ["train", "sample", "study"])
def test_entry_scripts_are_doors(script):
    """At most about 30 lines, importing no other entry script (they import ``commands``)."""
    path = ROOT / f"{script}.py"
    assert len(path.read_text().splitlines()) <= 30
    assert not imports_of(path) & (ENTRY_SCRIPTS - {script})


def _callers() -> list:
    paths = sorted(p for folder in ("tests", "benchmarks", "examples", "scripts") for p in (ROOT / folder).rglob("*.py"))
    return [pytest.param(p, id=str(p.relative_to(ROOT))) for p in paths]


@pytest.mark.parametrize("path", _callers())
def test_nothing_imports_an_entry_script(path):
    """Tests, benchmarks and examples import ``commands``; the scripts are only doors."""
    assert not imports_of(path) & ENTRY_SCRIPTS


def _console_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("name", ["difftime-train", "difftime-sample", "difftime-study"])
def test_console_scripts_point_at_the_application_layer(name):
    """Each console script is a ``cli_main`` of ``commands``, a package the wheel ships."""
    from setuptools import find_packages

    module, function = _console_scripts()[name].split(":")
    assert module.split(".")[0] == "commands" and function == "cli_main"
    assert callable(getattr(importlib.import_module(module), function))
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert module.rsplit(".", 1)[0] in find_packages(str(ROOT), include=include)


def test_configs_is_a_data_package():
    """``configs/`` holds YAML and a docstring-only ``__init__.py``; the code that finds the shipped
    files lives in ``commands.config_files`` and reads them through ``importlib.resources``."""
    from commands.config_files import configs_root, shipped

    assert sorted(p.name for p in (ROOT / "configs").rglob("*.py")) == ["__init__.py"]
    body = ast.parse((ROOT / "configs" / "__init__.py").read_text()).body
    assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
    assert configs_root() == (ROOT / "configs").resolve()
    for name in ("configs/quickstart.yaml", "quickstart.yaml", "T/0.4.yaml", "configs/study/toy_tiny.yaml"):
        assert shipped(name) == (ROOT / "configs" / name.removeprefix("configs/")).resolve(), name
    for name in ("nope.yaml", "../pyproject.toml", "configs/../README.md", "__init__.py"):
        assert shipped(name) is None, name


@pytest.mark.parametrize("script", ["train", "sample"])
def test_doors_import_only_cli_main(script):
    """A door re-exports nothing: callers import ``commands``, so its one import is ``cli_main``."""
    body = ast.parse((ROOT / f"{script}.py").read_text()).body
    imports = [node for node in body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert len(imports) == 1 and isinstance(imports[0], ast.ImportFrom)
    assert imports[0].module.startswith("commands.") and [a.name for a in imports[0].names] == ["cli_main"]
