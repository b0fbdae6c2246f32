"""--dry-run cost estimates come from this machine's own measured rates (what the units recorded),
fall back to the spec's cost block only for what nothing has measured yet, and say which is which."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import commands.study as study

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "configs" / "study" / "toy_tiny.yaml"


def dry_run(path: Path, capsys) -> tuple[dict[str, float], list[str]]:
    """unit id -> estimated seconds, and the printed lines after the table."""
    capsys.readouterr()
    study.main(["--config", str(path), "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("estimated:"))
    return {line.split()[-1]: float(line.split()[-2]) for line in lines[2:end]}, lines[end:]


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_estimates_use_measured_rates_and_name_their_source(tmp_path, capsys):
    spec = yaml.safe_load(SPEC.read_text())
    spec["out"] = str(tmp_path / "study")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    cost = spec["cost"]

    estimates, notes = dry_run(path, capsys)
    score = next(u for u in estimates if u.startswith("score/"))
    assert estimates[score] == pytest.approx(cost["startup_s"] + cost["score_s_per_step"] * 60, abs=0.5)
    assert "  score fit: 0.01 s/step, the spec's cost.score_s_per_step (nothing measured yet)" in notes

    # what earlier runs on this machine recorded: two attempts of a score fit (an older version of the
    # unit, another hash) and one sample unit
    units = tmp_path / "study" / "units"
    attempts = [{"start": 0, "wall_s": 30.0, "rc": 0, "step_before": 0, "step_after": 20},
                {"start": 0, "wall_s": 7.0, "rc": 1, "step_before": 20, "step_after": 20},
                {"start": 0, "wall_s": 50.0, "rc": 0, "step_before": 20, "step_after": 60}]
    write(units / "score" / "T1-0123456789" / "attempts.jsonl", "".join(json.dumps(a) + "\n" for a in attempts))
    write(units / "sample" / "T1-old-0123456789" / "result.json", json.dumps({"wall_time_s": 4.0, "nfe": 8, "n": 100}))
    write(units / "sample" / "T1-broken-0123456789" / "result.json", "{not json")

    estimates, notes = dry_run(path, capsys)
    per_step = 80.0 / 60  # the attempts that trained: 80 s for 60 steps, start-up included
    assert estimates[score] == pytest.approx(per_step * 60, abs=0.5)
    assert f"  score fit: {per_step:.4g} s/step, measured here: 60 steps in 2 attempt(s), start-up included" in notes
    per_nfe_sample = 4.0 / (8 * 100)
    for unit, seconds in estimates.items():
        if unit.startswith("sample/"):
            nfe = int(unit.split("-nfe")[1].split("-")[0])
            assert seconds == pytest.approx(2.0 + per_nfe_sample * nfe * spec["quality"]["n_samples"], abs=0.5)
    assert f"  sampling: {per_nfe_sample:.4g} s per NFE per sample, measured here on 1 sample unit(s)" in notes
    aux = next(u for u in estimates if u.startswith("aux/"))  # nothing measured: the spec's numbers
    assert estimates[aux] == pytest.approx(cost["startup_s"] + cost["aux_s_per_step"] * 40, abs=0.5)
    assert "  aux realnvp fit: 0.02 s/step, the spec's cost.aux_s_per_step (nothing measured yet)" in notes
    assert notes[0].startswith("estimated: ") and "estimates" in notes[0]
