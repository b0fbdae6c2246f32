"""Sampler entries of a study spec with constructor options and labels: checked before any work
(one line naming ``samplers[i].options.<key>``), side by side in the plan, and an entry without them
planning exactly the units it planned before (finished units stay finished)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

import commands.study as study
from commands.study import check
from commands.study.config import digest, score_sde_config, with_T

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "configs" / "study" / "toy_tiny.yaml"
DYNAMIC = {"name": "dpm_solver_pp", "nfe": [4, 8], "options": {"threshold": "dynamic", "percentile": 0.99},
           "label": "dpm_dyn"}


def write(folder: Path, samplers: list[dict] | None = None) -> Path:
    spec = yaml.safe_load(SPEC.read_text())
    spec["out"] = str(folder / "study")
    if samplers is not None:
        spec["samplers"] = samplers
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def plan_of(path: Path):
    return study.make_plan(study.load_spec(path), path)


@pytest.fixture
def passes_options(monkeypatch):
    """As with a commands.sampling.SampleOptions that has its ``sampler_options`` field."""
    monkeypatch.setattr(check, "_check_sample_options_field", lambda i: None)


def test_an_entry_without_options_plans_the_same_unit_ids_as_before(tmp_path):
    """The sample units' hashes recomputed from the params an entry had before options existed."""
    path = write(tmp_path)
    plan = plan_of(path)
    samples = [u for u in plan.units.values() if u.kind == "sample"]
    assert samples
    for unit in samples:
        before = {k: unit.params[k] for k in ("score", "T_train", "T", "prior", "aux", "sampler", "steps",
                                              "nfe_budget", "nfe", "n", "seed")}
        assert unit.params == before
        assert unit.id == f"sample/{unit.label}-{digest({'kind': 'sample', 'params': before})}"
        assert "-dpm_solver_pp-nfe" in unit.label


def test_a_labelled_entry_sits_beside_the_plain_one(tmp_path, passes_options):
    plain = plan_of(write(tmp_path / "a", [{"name": "dpm_solver_pp", "nfe": [4, 8]}]))
    both = plan_of(write(tmp_path / "b", [{"name": "dpm_solver_pp", "nfe": [4, 8]}, DYNAMIC]))
    old = {u for u in plain.units if u.startswith("sample/")}
    new = {u for u in both.units if u.startswith("sample/")} - old
    assert old <= set(both.units) and len(new) == len(old)
    for unit_id in new:
        unit = both.units[unit_id]
        assert "-dpm_dyn-nfe" in unit.label
        assert unit.params["sampler"] == "dpm_solver_pp" and unit.params["sampler_label"] == "dpm_dyn"
        assert unit.params["sampler_options"] == {"percentile": 0.99, "threshold": "dynamic"}


def test_options_that_change_the_nfe_change_the_steps(tmp_path, passes_options):
    """denoise adds one network evaluation (the final Tweedie step): a budget of 8 leaves 7 steps."""
    plan = plan_of(write(tmp_path, [{"name": "dpm_solver_pp", "nfe": [8], "options": {"denoise": True},
                                     "label": "dpm_den"}]))
    steps = {(u.params["steps"], u.params["nfe"]) for u in plan.units.values() if u.kind == "sample"}
    assert steps == {(7, 8)}


@pytest.mark.parametrize("entry, key", [
    ({"options": {"thresold": "dynamic"}}, "samplers[1].options.thresold"),
    ({"options": {"threshold": "bogus"}}, "samplers[1].options.threshold"),
    ({"options": {"percentile": 1.5}}, "samplers[1].options.percentile"),
    ({"options": {"steps": 3}}, "samplers[1].options.steps"),
    ({"label": None}, "samplers[1].label"),
    ({"label": "a-b"}, "samplers[1].label"),
], ids=["unknown", "bad-choice", "out-of-range", "steps", "same-label", "bad-label"])
def test_bad_options_and_labels_are_one_line_naming_the_key(tmp_path, passes_options, entry, key):
    sampler = {"name": "dpm_solver_pp", "nfe": [4], **entry}
    path = write(tmp_path, [{"name": "dpm_solver_pp", "nfe": [4]}, sampler])
    with pytest.raises(study.SpecError) as caught:
        study.load_spec(path)
    assert caught.value.key == key and "\n" not in str(caught.value)


def test_options_need_a_sampling_layer_that_passes_them(tmp_path):
    from commands.sampling import SampleOptions

    if "sampler_options" in {f.name for f in dataclasses.fields(SampleOptions)}:
        pytest.skip("SampleOptions passes sampler options")
    with pytest.raises(study.SpecError) as caught:
        study.load_spec(write(tmp_path, [DYNAMIC]))
    assert caught.value.key == "samplers[0].options"
