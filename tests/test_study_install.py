"""The study runs from an installed copy of the packages, outside the source tree: the spec and the
configs it names are found through the ``configs`` package, ``out`` is relative to the working
directory, and nothing refers to the repository (no study.py, no train.py, no scripts/)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import commands.study as study

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("commands", "configs", "difftime", "callbacks", "lightning_modules", "datamodules")


def test_dry_run_from_an_installed_copy(tmp_path):
    site, work = tmp_path / "site", tmp_path / "work"
    for package in PACKAGES:
        shutil.copytree(ROOT / package, site / package, ignore=shutil.ignore_patterns("__pycache__"))
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-m", "commands.study", "--config", "configs/study/toy_tiny.yaml",
                             "--dry-run"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"using the shipped spec {site / 'configs' / 'study' / 'toy_tiny.yaml'}" in result.stderr
    out = result.stdout
    assert f"units in {work / 'runs' / 'study_toy_tiny'}" in out
    assert str(ROOT) not in out.replace(sys.executable, "")
    spec_path = ROOT / "configs" / "study" / "toy_tiny.yaml"
    here = study.make_plan(study.load_spec(spec_path), spec_path)
    lines = out.splitlines()
    table = lines[2:next(i for i, line in enumerate(lines) if line.startswith("estimated:"))]
    listed = [line.split()[-1] for line in table]
    assert listed == list(here.units)  # the same units, named alike
    assert f"{sys.executable} -m commands.study.train fit --config {work / 'runs' / 'study_toy_tiny' / 'units'}" in out
