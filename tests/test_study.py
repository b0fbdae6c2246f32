"""The study (commands.study, study.py) on a tiny toy study (configs/study/toy_tiny.yaml): spec checks
before any work, the dry-run plan against what runs, a study killed mid-unit and re-run, units whose
recorded outputs no longer verify run again, a one-value change, and every report cell equal to what
the library gives on the same units."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import commands.study as study
from commands.study.config import build_object, model_config
from commands.study.records import final_checkpoint, write_record
from difftime import quality

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "configs" / "study" / "toy_tiny.yaml"


def write_spec(folder: Path, name: str = "spec.yaml", **changes) -> Path:
    spec = yaml.safe_load(SPEC.read_text())
    spec["out"] = str(folder / "study")
    # long enough an aux fit that the test can kill it between its first and last checkpoint
    spec["aux_priors"]["realnvp"]["steps"] = 200
    for key, value in changes.items():
        study.set_key(spec, key, value)
    path = folder / name
    path.write_text(yaml.safe_dump(spec))
    return path


def plan_table(path: Path, capsys) -> dict[str, str]:
    """unit id -> status, as --dry-run prints them."""
    capsys.readouterr()
    study.main(["--config", str(path), "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    table = lines[2:lines.index(next(l for l in lines if l.startswith("estimated:")))]
    return {line.split()[-1]: line.split()[1] if line.split()[1] != "to" else "to do" for line in table}


def executed(out: Path) -> list[str]:
    path = out / "executed.jsonl"
    return [json.loads(line)["unit"] for line in path.read_text().splitlines()] if path.is_file() else []


def file_digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_study(path: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "study.py"), "--config", str(path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **popen)


@pytest.mark.parametrize("key, value, named", [
    ("priors", ["gaussian", "flowz"], "priors[1]"),
    ("T", [{"T": 1.0, "mode": "trained"}, {"T": 0.4, "mode": "truncated"}, {"T": 1.0, "mode": "truncated"}], "T[2].T"),
    ("T_max", 0.4, "T[1].T"),
    ("samplers", [{"name": "dpm_solver_pp", "nfe": [4, 0]}], "samplers[0].nfe[1]"),
    ("samplers", [{"name": "euler_maruyama", "nfe": [0]}], "samplers[0].nfe[0]"),
    ("samplers", [{"name": "no_such", "nfe": [4]}], "samplers[0].name"),
    ("score.steps", 45, "score.steps"),
    ("bpd.n_tt", 4, "bpd.n_tt"),
])
def test_bad_spec_fails_before_any_work_naming_the_key(tmp_path, key, value, named):
    path = write_spec(tmp_path, **{key: value})
    if key == "T_max":  # T_max = 0.4 with 0.4 truncated: "T' above T_max" for the 1.0 model too
        spec = yaml.safe_load(path.read_text())
        spec["T"] = [{"T": 0.4, "mode": "trained"}, {"T": 0.4, "mode": "truncated"}]
        path.write_text(yaml.safe_dump(spec))
    with pytest.raises(study.SpecError) as error:
        study.main(["--config", str(path)])
    assert f"spec key '{named}'" in str(error.value), str(error.value)
    assert not (tmp_path / "study").exists()  # no work started


def test_bad_spec_is_one_line_on_the_command_line(tmp_path):
    path = write_spec(tmp_path, **{"priors": ["gaussian", "flowz"]})
    result = subprocess.run([sys.executable, str(ROOT / "study.py"), "--config", str(path), "--dry-run"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "study.py: error: spec key 'priors[1]': unknown prior 'flowz' (known: gaussian, realnvp)"]


def test_study_end_to_end_kill_resume_and_one_change(tmp_path, capsys):
    path = write_spec(tmp_path)
    out = tmp_path / "study"
    planned = plan_table(path, capsys)
    assert set(planned.values()) == {"to do"} and len(planned) == 12

    # 1. run, and kill the whole study while the aux prior is between its checkpoints
    process = run_study(path)
    aux_dir = next(out / "units" / u for u in planned if u.startswith("aux/"))
    deadline = time.time() + 600  # a guard against a hang; the machine may be busy
    while not list((aux_dir / "checkpoints").glob("step=*.ckpt")):
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    score_id = next(u for u in planned if u.startswith("score/"))
    finished = file_digests(out / "units" / score_id)
    after_kill = plan_table(path, capsys)
    assert after_kill[score_id] == "done" and after_kill[aux_dir.relative_to(out / "units").as_posix()] == "partial"
    todo = [u for u, s in after_kill.items() if s != "done"]

    # 2. the second invocation runs exactly the units its dry-run listed, resuming the aux fit
    before = len(executed(out))
    process = run_study(path)
    _, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr
    assert executed(out)[before:] == todo
    assert executed(out).count(score_id) == 1
    assert file_digests(out / "units" / score_id) == finished  # bit-identical, not re-run
    attempts = [json.loads(l) for l in (aux_dir / "attempts.jsonl").read_text().splitlines()]
    assert attempts[-1]["step_before"] >= 20 and attempts[-1]["step_after"] == 200
    assert "resuming from" in stderr

    # 3. every report cell filled, with the values the library gives on the same units
    check_report(out, path)

    # 4. a done unit whose recorded outputs no longer verify runs again, and the study says which file
    samples = [u for u in planned if u.startswith("sample/")]
    (out / "units" / samples[0] / "samples" / "samples.npz").unlink()
    (out / "units" / samples[1] / "result.json").write_text("{garbage")
    table = plan_table(path, capsys)
    assert table[samples[0]] == table[samples[1]] == "invalid"
    assert [u for u, s in table.items() if s != "done"] == [samples[0], samples[1], report_id(table)]
    before = len(executed(out))
    process = run_study(path)
    _, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr
    assert executed(out)[before:] == [samples[0], samples[1], report_id(table)]
    assert f"running {samples[0]} (samples/samples.npz is missing; running it again)" in stderr
    assert f"running {samples[1]} (result.json differs from what the unit wrote" in stderr
    check_report(out, path)

    # 4. one spec value changed: only the units it affects run
    changed = write_spec(tmp_path, "changed.yaml", **{"samplers": [{"name": "dpm_solver_pp", "nfe": [4, 6]}]})
    plan = plan_table(changed, capsys)
    todo = [u for u, s in plan.items() if s != "done"]
    assert sorted(u.split("-nfe")[1][:1] for u in todo if u.startswith("sample/")) == ["6", "6", "6"]
    assert [u for u in todo if not u.startswith("sample/")] == [next(u for u in todo if u.startswith("report/"))]
    before = len(executed(out))
    study.main(["--config", str(changed)])
    assert executed(out)[before:] == todo


    # 5. a report that cannot read a unit names the unit and the file, and leaves no stale report behind
    unit = next(u for u in study.make_plan(study.load_spec(changed), changed).units.values() if u.kind == "sample")
    (unit.folder / "samples" / "samples.npz").write_bytes(b"not an npz")
    write_record(unit, [unit.folder / "samples" / "samples.npz", unit.folder / "result.json"])  # verifies: done
    with pytest.raises(study.OutputError, match=rf"unit {unit.id}: cannot read .*samples.npz"):
        study.main(["--config", str(changed), "--stage", "report"])
    assert not (out / "report" / "report.md").exists() and not (out / "report" / "results.csv").exists()


def report_id(table: dict[str, str]) -> str:
    return next(u for u in table if u.startswith("report/"))


def check_report(out: Path, spec_path: Path) -> None:
    rows = list(csv.DictReader(open(out / "report" / "results.csv")))
    assert len(rows) == 6  # (T=1, gaussian), (0.4 truncated, gaussian), (0.4 truncated, realnvp) x 2 NFE
    optional = {"bpd_ode", "fid_inception", "extractor_test_accuracy", "nfe_to_baseline"}  # no reference: empty
    for row in rows:
        for key, value in row.items():
            if key not in optional and not (key == "aux_train_s" and row["prior"] == "gaussian"):
                assert value not in ("", "nan", "None"), (key, row)
    report = (out / "report" / "report.md").read_text()
    assert "## Findings" in report and "nan" not in report.split("## Main table")[1]
    for name in ("bpd_terms.png", "quality_vs_nfe.png", "samples_side_by_side.png"):
        assert (out / "report" / name).stat().st_size > 1000
    assert list((out / "report" / "tensorboard").glob("events.out.tfevents.*"))
    plan = study.make_plan(study.load_spec(spec_path), spec_path)
    reference = plan.units[rows[0]["unit"]]  # the data's test split, through the datamodule
    data = build_object(model_config(plan.spec.score)["data"]).draw("test").data.double()
    for row in rows:
        unit = plan.units[row["unit"]]
        samples = study.load_samples(unit)
        q = plan.spec.quality
        expected = quality.quality_row(data, samples.double(), "identity (raw values)", level=q.level,
                                       groups=q.resamples, k=q.k, seed=q.seed)
        for key in ("fd", "fd_low", "fd_high", "kid", "kid_low", "precision", "recall", "recall_high"):
            assert math.isclose(float(row[key]), expected[key], rel_tol=1e-12, abs_tol=1e-15), key
        assert row["fd_interval_method"] == expected["fd_interval_method"]
        info = json.loads((unit.folder / "samples" / "info.json").read_text())
        assert int(row["nfe"]) == info["nfe"] and info["T"] == pytest.approx(float(row["T"]))
        assert int(row["n_samples"]) == info["n"] == len(samples)
    bpd_unit = next(u for u in plan.units.values() if u.kind == "bpd" and u.params["prior"] == "realnvp")
    result = json.loads((bpd_unit.folder / "result.json").read_text())
    row = next(r for r in rows if r["prior"] == "realnvp")
    assert float(row["bpd_elbo"]) == result["bpd_elbo"] and float(row["bpd_prior_se"]) == result["bpd_prior_se"]
    # the same number from a fresh train.py validate with BitsPerDim on the same checkpoint
    fresh = validate_again(plan, bpd_unit)
    assert fresh["val/bpd_elbo"] == pytest.approx(result["bpd_elbo"], rel=1e-9)
    assert fresh["val/bpd_diffusion"] == pytest.approx(result["bpd_diffusion"], rel=1e-9)
    assert reference.kind == "sample"


def validate_again(plan, unit) -> dict[str, float]:
    """``train.py validate`` with BitsPerDim on the score unit's checkpoint, through the command line
    (LightningCLI restores the checkpoint itself): an independent path to the unit's numbers."""
    from commands.cli import main

    score = plan.units[unit.params["score"]]
    config = yaml.safe_load((score.folder / "config.yaml").read_text())
    aux = plan.units[unit.params["aux"]] if unit.params["aux"] else None
    bpd = unit.params["bpd"]
    init = {k: bpd[k] for k in ("max_samples", "n_t", "n_prior", "ode", "ode_max_samples", "seed")}
    config["trainer"].update(callbacks=[{"class_path": "callbacks.BitsPerDim", "init_args": init}],
                             limit_val_batches=None, enable_progress_bar=False, devices=1, num_nodes=1, strategy="auto",
                             logger={"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                     "init_args": {"save_dir": str(unit.folder.parent), "name": "check"}})
    aux_ckpt = final_checkpoint(aux) if aux else None
    config["model"]["init_args"]["prior"] = ({"class_path": "difftime.aux_priors.AuxPriorCheckpoint",
                                              "init_args": {"path": str(aux_ckpt)}} if aux else None)
    config["model"]["init_args"]["eval_T"] = None if unit.params["T"] == unit.params["T_train"] else unit.params["T"]
    path = unit.folder.parent / "check.yaml"
    path.write_text(yaml.safe_dump(config))
    ckpt = json.loads((unit.folder / "result.json").read_text())["checkpoint"]
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        cli = main(["validate", "--config", str(path), "--ckpt_path", ckpt])
    finally:
        sys.argv = argv
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


def test_unit_hash_names_resolved_config(tmp_path):
    spec = study.load_spec(write_spec(tmp_path))
    plan = study.make_plan(spec, SPEC)
    changed = study.load_spec(write_spec(tmp_path, "b.yaml", **{"bpd.n_t": 8}))
    other = study.make_plan(changed, SPEC)
    moved = set(plan.units) ^ set(other.units)
    assert {u.split("/")[0] for u in moved} == {"bpd", "report"}  # bpd units and the report only
    for unit in plan.units.values():
        params = study.training_identity(unit.params) if unit.kind in study.FIT_KINDS else unit.params
        assert unit.folder.name.endswith(unit.hash) and unit.hash == study.digest({"kind": unit.kind, "params": params})
        if unit.run_config is not None:  # the fit logs into the unit's own folder
            assert unit.run_config["trainer"]["logger"]["init_args"]["version"] == unit.folder.name


def test_evaluation_only_keys_do_not_retrain_fit_units(tmp_path):
    """The score model's default sampler and the progress bar do not decide a fit's checkpoints:
    changing them keeps every unit; the sampler counts again once a fit callback samples with it."""
    plan = study.make_plan(study.load_spec(write_spec(tmp_path)), SPEC)
    sampler = {"class_path": "difftime.samplers.DDIM", "init_args": {"steps": 7}}
    display = write_spec(tmp_path, "b.yaml", **{"score.overrides": {
        **yaml.safe_load(SPEC.read_text())["score"]["overrides"], "model.init_args.sampler": sampler,
        "trainer.enable_progress_bar": True}})
    assert set(study.make_plan(study.load_spec(display), SPEC).units) == set(plan.units)
    sampling = write_spec(tmp_path, "c.yaml", **{"score.overrides": {
        **yaml.safe_load(SPEC.read_text())["score"]["overrides"], "model.init_args.sampler": sampler},
        "score.remove_callbacks": ["LearningRateMonitor"]})
    default_sampler = write_spec(tmp_path, "d.yaml", **{"score.remove_callbacks": ["LearningRateMonitor"]})
    moved = (set(study.make_plan(study.load_spec(sampling), SPEC).units)
             ^ set(study.make_plan(study.load_spec(default_sampler), SPEC).units))
    assert {u.split("/")[0] for u in moved} >= {"score"}  # the SampleGrid of the fit samples with it


def test_slurm_executor_chains_one_array_job_per_stage(tmp_path, monkeypatch):
    """--executor slurm with a stand-in sbatch: arrays sized by the to-do units, afterok chain, report last."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.log"
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\necho "$@" >> {log}\necho $(( $(wc -l < {log}) + 100 ))\n')
    (bin_dir / "sbatch").chmod(0o755)
    path = write_spec(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)  # the jobs find the package from anywhere
    study.main(["--config", str(path), "--executor", "slurm"])
    calls = log.read_text().splitlines()
    assert len(calls) == 4
    assert "--array=0-0" in calls[0] and "--task train" in calls[0] and "dependency" not in calls[0]
    assert "--array=0-0" in calls[1] and "--task aux" in calls[1] and "dependency" not in calls[1]
    assert "--array=0-8" in calls[2] and "--dependency=afterok:101:102" in calls[2] and "--task evaluate" in calls[2]
    assert "--dependency=afterok:103" in calls[3] and "--task report" in calls[3]
    pinned = (tmp_path / "study" / "slurm" / "evaluate.units").read_text().split()
    plan = study.make_plan(study.load_spec(path), path)
    assert pinned == [u.id for u in plan.stage("evaluate")]
