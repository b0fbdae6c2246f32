"""Package layering: the core imports no Lightning; systems and callbacks never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_packages(package: str) -> dict[str, set[str]]:
    """Top-level packages imported by each file of ``package``."""
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("package, forbidden", [
    ("difftime", {"lightning", "pytorch_lightning", "lightning_modules", "callbacks", "datamodules"}),
    ("callbacks", {"lightning_modules"}),
    ("lightning_modules", {"callbacks"}),
    ("datamodules", {"lightning_modules", "callbacks"}),
])
def test_layers(package, forbidden):
    offenders = {path: names & forbidden for path, names in imported_packages(package).items() if names & forbidden}
    assert not offenders
