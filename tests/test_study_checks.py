"""The study's checks before any work (commands.study.check): one line naming the spec key, exit 2,
for a missing or broken spec, a wrong list index or a bad value in an override, a typo in an aux
override, a device or out folder that cannot be used; NFE budgets mapped to steps without running
the network, checked against the samplers' own counts; and the unit names of a running study pinned."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import commands.study as study
from commands.study.nfe import steps_for_nfe
from difftime.samplers import SAMPLERS

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "configs" / "study" / "toy_tiny.yaml"
SDE = {"class_path": "difftime.sde.VPSDE", "init_args": {"T": 1.0, "eps": 1e-3}}


def write_spec(folder: Path, edit=None, name: str = "spec.yaml") -> Path:
    spec = yaml.safe_load(SPEC.read_text())
    spec["out"] = str(folder / "study")
    if edit is not None:
        edit(spec)
    path = folder / name
    path.write_text(yaml.safe_dump(spec))
    return path


def refused(path: Path, *extra: str) -> str:
    """The SpecError message of a dry-run of ``path``; no study folder may have been made."""
    with pytest.raises(study.SpecError) as error:
        study.main(["--config", str(path), "--dry-run", *extra])
    assert not (path.parent / "study").exists()
    return str(error.value)


def command_line(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "study.py"), "--config", str(path), "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_missing_spec_file_and_yaml_syntax_error_are_one_line(tmp_path):
    result = command_line(tmp_path / "nope.yaml")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"study.py: error: file {tmp_path / 'nope.yaml'}: no such file (nor a shipped spec of that name)"]
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nscore: {config: [a.yaml]\nT: [1]\n")
    result = command_line(broken)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"study.py: error: file {broken}: YAML syntax error at line ")


def test_yaml_error_in_a_config_the_spec_names(tmp_path):
    layer = tmp_path / "layer.yaml"
    layer.write_text("trainer: [1, 2\n")
    path = write_spec(tmp_path, lambda s: s["score"]["config"].append(str(layer)))
    assert refused(path).startswith(f"spec key 'score.config[1]': file {layer}: YAML syntax error at line 2")


def test_override_that_indexes_a_list_wrongly(tmp_path):
    def edit(spec):
        spec["score"]["overrides"]["trainer.callbacks.9.init_args.every_n_train_steps"] = 30
    message = refused(write_spec(tmp_path, edit))
    assert message == ("spec key 'score.overrides.trainer.callbacks.9.init_args.every_n_train_steps': "
                       "'trainer.callbacks' is a list of 3 entries: '9' is not an index (allowed: 0..2)")

    def edit(spec):
        spec["score"]["overrides"]["trainer.callbacks.first.init_args.x"] = 30
    assert "'first' is not an index" in refused(write_spec(tmp_path, edit))

    def edit(spec):
        spec["score"]["overrides"]["trainer.max_epochs.x"] = 3
    assert refused(write_spec(tmp_path, edit)).startswith("spec key 'score.overrides.trainer.max_epochs.x': ")


def test_override_with_a_bad_value_names_the_spec_key(tmp_path):
    def edit(spec):
        spec["score"]["overrides"]["model.init_args.sde.init_args.beta_max"] = -1.0
    message = refused(write_spec(tmp_path, edit))
    assert message.startswith("spec key 'score.overrides.model.init_args.sde.init_args.beta_max': ")
    assert "-1.0 is invalid" in message and "\n" not in message

    def edit(spec):
        spec["score"]["overrides"]["trainer.log_every_n_steps"] = "often"
    message = refused(write_spec(tmp_path, edit))
    assert message.startswith("spec key 'score.overrides.trainer.log_every_n_steps': ") and "often" in message


def test_dry_run_checks_the_aux_overrides_before_anything_trains(tmp_path):
    """A typo in an aux-prior override fails the dry-run, not the aux stage after the score models trained."""
    def edit(spec):
        spec["aux_priors"]["realnvp"]["overrides"]["model.init_args.prior.init_args.layer"] = 4
    message = refused(write_spec(tmp_path, edit))
    assert message.startswith("spec key 'aux_priors.realnvp.overrides.model.init_args.prior.init_args.layer': ")
    assert "'layer' is not accepted" in message

    def edit(spec):
        spec["aux_priors"]["realnvp"]["overrides"]["model.init_args.prior.init_args.layers"] = 0
    message = refused(write_spec(tmp_path, edit))
    assert message.startswith("spec key 'aux_priors.realnvp.overrides.model.init_args.prior.init_args.layers': ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_and_out_are_checked(tmp_path):
    message = refused(write_spec(tmp_path, lambda s: s.update(device="cuda")))
    assert message.startswith("spec key 'device': = 'cuda' but this machine has no CUDA device")
    assert refused(write_spec(tmp_path, lambda s: s.update(device="tpu"))).startswith("spec key 'device': 'tpu'")
    blocker = tmp_path / "file"
    blocker.write_text("")
    message = refused(write_spec(tmp_path, lambda s: s.update(out=str(blocker / "study"))))
    assert message.startswith("spec key 'out': ") and "not writable" in message
    message = refused(write_spec(tmp_path, lambda s: s.update(out=str(blocker))))
    assert message == f"spec key 'out': = {blocker}: {blocker} exists and is not a folder"


def counted_nfe(name: str, steps: int) -> int:
    """NFE per sample of a sampler run (zero score, one 1-element state): the sampler's own count."""
    from difftime.sde import VPSDE

    run = SAMPLERS[name]()
    return int(run(lambda x, t: torch.zeros_like(x), VPSDE(T=1.0, eps=1e-3), torch.zeros(1, 1), steps=steps)[1]["nfe"])


@pytest.mark.parametrize("name", sorted(n for n in SAMPLERS if n != "adaptive_ode"))
def test_steps_for_nfe_is_the_largest_step_count_within_the_budget(name):
    """Against a brute-force search that runs the sampler at every step count."""
    counts = {steps: counted_nfe(name, steps) for steps in range(1, 26)}
    for budget in range(1, 25):
        fitting = [s for s, nfe in counts.items() if nfe <= budget]
        if not fitting:
            with pytest.raises(study.SpecError, match="needs at least"):
                steps_for_nfe(name, budget, SDE, "key")
            continue
        assert steps_for_nfe(name, budget, SDE, "key") == (max(fitting), counts[max(fitting)])


def test_steps_for_nfe_of_a_huge_budget_is_instant():
    start = time.perf_counter()
    for name in ("euler_maruyama", "heun_ode", "predictor_corrector", "dpm_solver_pp"):
        steps, nfe = steps_for_nfe(name, 10**7, {**SDE, "init_args": {"T": 0.5, "eps": 1e-3}}, "key")
        assert nfe <= 10**7 and nfe > 10**7 - 3
    assert time.perf_counter() - start < 1.0
    assert steps_for_nfe("heun_ode", 10**7, SDE, "key") == (5 * 10**6, 10**7)  # NFE = 2 steps (Heun)


def test_unit_names_of_the_digits_plateau_study_are_pinned():
    """configs/study/digits_plateau.yaml is being trained: its fit units' folders must keep their names.
    A change to configs/quickstart.yaml (the score config it layers) that renames them fails here."""
    path = ROOT / "configs" / "study" / "digits_plateau.yaml"
    plan = study.make_plan(study.load_spec(path), path)
    fits = sorted(u for u in plan.units if u.startswith("score/"))
    assert fits == ["score/T0.2-7320ea78e1", "score/T0.4-da43179347", "score/T0.6-6402233a00",
                    "score/T1-ab7212d080"], (
        "the score units of configs/study/digits_plateau.yaml were renamed: a change to a config it layers "
        "changed their resolved config, so a running study would retrain them from scratch")
