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
def passes_options():
    """Sampler options reach the sampler through ``SampleOptions.sampler_options``."""
    from commands.sampling import SampleOptions

    assert "sampler_options" in {f.name for f in dataclasses.fields(SampleOptions)}


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


def test_a_reference_adds_one_converged_unit_per_evaluated_model(tmp_path):
    plain = plan_of(write(tmp_path / "a"))
    with_ref = write(tmp_path / "b")
    data = yaml.safe_load(with_ref.read_text())
    data["reference"] = {"name": "adaptive_ode"}
    with_ref.write_text(yaml.safe_dump(data))
    plan = plan_of(with_ref)
    assert set(plain.units) - {u for u in plain.units if u.startswith("report/")} <= set(plan.units)
    models = {(u.params["score"], u.params["T"], u.params["prior"]) for u in plan.units.values() if u.kind == "bpd"}
    refs = [u for u in plan.units.values() if u.kind == "sample" and u.params.get("reference")]
    assert sorted((u.params["score"], u.params["T"], u.params["prior"]) for u in refs) == sorted(models)
    assert all(u.params["steps"] is None and u.params["sampler"] == "adaptive_ode" for u in refs)


@pytest.mark.parametrize("reference, key", [({"name": "adaptive_ode", "nfe": 64}, "reference.nfe"),
                                            ({"name": "sde_dpm_solver_pp"}, "reference.nfe"),
                                            ({"name": "nope"}, "reference.name"),
                                            ({"name": "sde_dpm_solver_pp", "nfe": 0}, "reference.nfe")])
def test_bad_reference_is_one_line_naming_the_key(tmp_path, reference, key):
    path = write(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["reference"] = reference
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(study.SpecError) as caught:
        study.load_spec(path)
    assert caught.value.key == key


def test_nfe_to_baseline_is_the_first_nfe_whose_interval_overlaps_the_baseline():
    """Hand-made intervals: the baseline FD [10, 12]; one configuration overlaps first at 8 NFE, one lies
    wholly above at every NFE (-), and the reference of a short T does not count as a baseline."""
    from types import SimpleNamespace

    from commands.study.findings import baseline_table, nfe_to_baseline

    def row(unit, T, prior, nfe, low, high, sampler="dpm_solver_pp"):
        return {"unit": unit, "T": T, "T_train": T, "source": "trained", "prior": prior, "sampler": sampler,
                "nfe": nfe, "fd": (low + high) / 2, "fd_low": low, "fd_high": high}

    rows = [row("ref1", 1.0, "gaussian", 300, 10, 12, "reference_adaptive_ode"),
            row("ref2", 0.4, "glow", 280, 5, 6, "reference_adaptive_ode"),
            row("a16", 0.4, "glow", 16, 9, 11), row("a4", 0.4, "glow", 4, 20, 30), row("a8", 0.4, "glow", 8, 11.5, 15),
            row("b4", 0.4, "gaussian", 4, 40, 50), row("b8", 0.4, "gaussian", 8, 12.5, 13)]
    units = {r["unit"]: SimpleNamespace(params={"reference": r["unit"].startswith("ref")}) for r in rows}
    plan = SimpleNamespace(units=units, T_max=1.0, spec=SimpleNamespace(reference=SimpleNamespace(name="adaptive_ode")))
    base, reached = nfe_to_baseline(plan, rows)
    assert base["unit"] == "ref1"
    assert reached == {(0.4, "trained", "glow", "dpm_solver_pp"): 8,
                       (0.4, "trained", "gaussian", "dpm_solver_pp"): None}
    text = "\n".join(baseline_table(plan, rows))
    assert "| 0.4 | trained | glow | dpm_solver_pp | 8 |" in text
    assert "| 0.4 | trained | gaussian | dpm_solver_pp | - |" in text
    assert "overlaps the FD interval" in text and "adaptive_ode" in text


def test_dry_run_estimates_an_adaptive_reference(tmp_path, capsys):
    """The adaptive reference has no NFE before it runs: the dry run still prints its estimate."""
    from commands.study.estimates import ADAPTIVE_NFE, Rates, estimate

    path = write(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["reference"] = {"name": "adaptive_ode"}
    path.write_text(yaml.safe_dump(data))
    plan = plan_of(path)
    ref = next(u for u in plan.units.values() if u.params.get("reference"))
    plain = next(u for u in plan.units.values() if u.kind == "sample" and not u.params.get("reference"))
    rates = Rates(plan)
    per_nfe = (estimate(plain, rates, plan.spec, "to do") - 2.0) / plain.params["nfe"]
    assert estimate(ref, rates, plan.spec, "to do") - 2.0 == pytest.approx(per_nfe * ADAPTIVE_NFE)


def test_sampler_options_reach_the_sampler():
    """What a unit's ``sampler_options`` become: the sampler built with them, NFE unchanged."""
    from commands.sampling import choose_sampler
    from difftime.samplers import SAMPLERS

    plain = choose_sampler(None, "dpm_solver_pp")
    built = choose_sampler(None, "dpm_solver_pp", {"threshold": "dynamic", "percentile": 0.99})
    assert vars(built)["threshold"] == "dynamic" and vars(built)["percentile"] == 0.99
    assert vars(plain)["threshold"] is None and type(built) is type(SAMPLERS["dpm_solver_pp"]())
    assert built.nfe(8) == plain.nfe(8)


def sample_models(plan) -> dict[str, set[str]]:
    """Sampler tag -> the model labels (``T0.4-trunc1-gaussian``) it has sample units on."""
    found: dict[str, set[str]] = {}
    for unit in plan.units.values():
        if unit.kind == "sample" and not unit.params.get("reference"):
            tag = unit.params.get("sampler_label", unit.params["sampler"])
            found.setdefault(tag, set()).add(unit.label.split(f"-{tag}-nfe")[0])
    return found


def test_models_restrict_an_entry_and_keep_the_ids_of_the_units_it_plans(tmp_path, passes_options):
    full = plan_of(write(tmp_path / "a", [{"name": "dpm_solver_pp", "nfe": [4, 8]}, DYNAMIC]))
    some = plan_of(write(tmp_path / "b", [{"name": "dpm_solver_pp", "nfe": [4, 8]},
                                          {**DYNAMIC, "models": ["T1-trained-gaussian", "T0.4-trunc1-realnvp"]}]))
    assert sample_models(full) == {"dpm_solver_pp": {"T1-trained-gaussian", "T0.4-trunc1-gaussian",
                                                     "T0.4-trunc1-realnvp"},
                                   "dpm_dyn": {"T1-trained-gaussian", "T0.4-trunc1-gaussian", "T0.4-trunc1-realnvp"}}
    assert sample_models(some)["dpm_dyn"] == {"T1-trained-gaussian", "T0.4-trunc1-realnvp"}
    planned = {u for u in some.units if not u.startswith("report/")}
    assert planned < set(full.units)
    assert {u for u in set(full.units) - set(some.units) if not u.startswith("report/")} == {
        u for u in full.units if u.startswith("sample/T0.4-trunc1-gaussian-dpm_dyn-")}


def test_one_sampler_may_run_other_budgets_on_disjoint_models(tmp_path):
    plan = plan_of(write(tmp_path, [
        {"name": "dpm_solver_pp", "nfe": [4, 8], "models": ["T1-trained-gaussian", "T0.4-trunc1-realnvp"]},
        {"name": "dpm_solver_pp", "nfe": [8], "models": ["T0.4-trunc1-gaussian"]}]))
    budgets = {(u.label.split("-dpm_solver_pp-")[0], u.params["nfe_budget"]) for u in plan.units.values()
               if u.kind == "sample"}
    assert budgets == {("T1-trained-gaussian", 4), ("T1-trained-gaussian", 8), ("T0.4-trunc1-realnvp", 4),
                       ("T0.4-trunc1-realnvp", 8), ("T0.4-trunc1-gaussian", 8)}


@pytest.mark.parametrize("second, key, says", [
    ({"models": ["T0.4-trunc1-glow"]}, "samplers[1].models[0]", "T1-trained-gaussian, T0.4-trunc1-gaussian, "
                                                               "T0.4-trunc1-realnvp"),
    ({"models": []}, "samplers[1].models", "leave the key out"),
    ({"models": ["T1-trained-gaussian"]}, "samplers[1].label", "disjoint models"),
], ids=["unknown-model", "empty", "overlapping"])
def test_bad_models_are_one_line_naming_the_key(tmp_path, second, key, says):
    first = {"name": "dpm_solver_pp", "nfe": [4], "models": ["T1-trained-gaussian", "T0.4-trunc1-realnvp"]}
    path = write(tmp_path, [first, {"name": "dpm_solver_pp", "nfe": [8], **second}])
    with pytest.raises(study.SpecError) as caught:
        study.load_spec(path)
    assert caught.value.key == key and says in str(caught.value) and "\n" not in str(caught.value)


def test_a_reference_with_models_runs_only_on_them(tmp_path):
    path = write(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["reference"] = {"name": "adaptive_ode", "models": ["T1-trained-gaussian"]}
    path.write_text(yaml.safe_dump(data))
    refs = [u for u in plan_of(path).units.values() if u.kind == "sample" and u.params.get("reference")]
    assert [u.label for u in refs] == ["T1-trained-gaussian-ref-adaptive_ode"]
    data["reference"]["models"] = ["T2-trained-gaussian"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(study.SpecError) as caught:
        study.load_spec(path)
    assert caught.value.key == "reference.models[0]"


def test_findings_and_the_quality_figure_skip_the_samplers_a_model_does_not_run():
    """A ragged grid (the dynamic entry only on T = 1): no empty curve, no sentence about a pair not run."""
    from commands.study.figures import figure_quality
    from commands.study.findings import findings

    def row(T, prior, sampler, nfe, fd):
        return {"T": T, "T_train": T, "source": "trained", "prior": prior, "sampler": sampler, "nfe": nfe,
                "fd": fd, "fd_low": fd - 1, "fd_high": fd + 1, "recall": 0.5, "bpd_elbo": 1.0, "bpd_elbo_se": 0.01,
                "bpd_prior": 0.1, "bpd_diffusion": 0.8, "bpd_reconstruction": 0.0}

    rows = [row(1.0, "gaussian", "sde", 8, 10), row(1.0, "gaussian", "sde", 16, 5), row(1.0, "gaussian", "dyn", 8, 9),
            row(0.4, "glow", "sde", 8, 5.5), row(0.4, "glow", "sde", 16, 5)]
    text = findings(rows, 1.0)
    assert "With sde, T=0.4 (trained), glow reaches" in text and "with 8 NFE" in text
    assert "With dyn, T=0.4" not in text
    figure = figure_quality(rows)
    curves = [len(line.get_xdata()) for axis in figure.axes for line in axis.get_lines()]
    assert sorted(curves) == [1, 2, 2]


def test_the_verdict_compares_with_the_fastest_route_at_T_max():
    """nfe_to_baseline per configuration: T = 1 reaches the converged FD at 8 NFE with one sampler, so
    T' = 0.6 reaching it at 12 NFE is not 'fewer NFE'; at 6 NFE (bits/dim no worse) it is."""
    from commands.study.findings import findings

    rows = [{"T": T, "T_train": 1.0, "source": "trained" if T == 1.0 else "truncated", "prior": prior,
             "sampler": "sde", "nfe": 12, "fd": 1.0, "fd_low": 0.0, "fd_high": 2.0, "recall": 0.9,
             "bpd_elbo": 1.64, "bpd_elbo_se": 0.02, "bpd_prior": 0.0, "bpd_diffusion": 2.5, "bpd_reconstruction": 0.9}
            for T, prior in ((1.0, "gaussian"), (0.6, "glow"))]
    reached = {(1.0, "trained", "gaussian", "sde"): 12, (1.0, "trained", "gaussian", "ode"): 8,
               (0.6, "truncated", "glow", "sde"): 12}
    text = findings(rows, 1.0, reached)
    assert text.startswith("Overall, these numbers do not support the paper's claim of fewer NFE: T=1 with the "
                           "Gaussian prior reaches it at 8 NFE (ode)")
    reached[(0.6, "truncated", "glow", "sde")] = 6
    assert findings(rows, 1.0, reached).startswith("Overall, these numbers support")
    rows[1]["bpd_elbo"] = 1.8  # worse bits/dim: not the paper's claim even at fewer NFE
    assert "do not support" in findings(rows, 1.0, reached).split(".")[0]
