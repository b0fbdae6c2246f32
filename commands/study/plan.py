"""The plan: every unit of the study, its dependencies, its resolved config and its folder.

A unit lives in ``<out>/units/<kind>/<label>-<hash>``, named by :func:`~commands.study.config.digest`
of its resolved config, so changing one spec value re-runs only the units it affects. Making a plan
does no work and imports neither Lightning nor the network code.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from commands.study.config import FIT_KINDS, digest, merge, model_config, score_sde_config, training_identity, with_T
from commands.study.nfe import steps_for_nfe
from commands.study.spec import GAUSSIAN, SamplerSpec, StudySpec

STAGES = ("train", "aux", "evaluate", "report")


@dataclass
class Unit:
    """One unit of work: a train.py run, an evaluation, a sample run, the classifier or the report."""

    kind: str
    stage: str
    label: str
    params: dict[str, Any]  # the resolved config (fit units) or the evaluation's parameters
    deps: list[str] = field(default_factory=list)
    root: Path = Path(".")
    run_config: dict[str, Any] | None = None  # fit units: params plus the pinned logger (not hashed)

    @property
    def hash(self) -> str:
        params = training_identity(self.params) if self.kind in FIT_KINDS else self.params
        return digest({"kind": self.kind, "params": params})

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.label}-{self.hash}"

    @property
    def folder(self) -> Path:
        return self.root / "units" / self.id


@dataclass
class Plan:
    spec: StudySpec
    spec_path: Path
    out: Path
    units: dict[str, Unit]
    T_max: float

    def stage(self, stage: str) -> list[Unit]:
        return [u for u in self.units.values() if u.stage == stage]


def out_folder(spec: StudySpec) -> Path:
    """The study's folder: ``out`` as given, relative to the working directory."""
    return Path(os.path.abspath(spec.out))


def _fit_unit(kind: str, stage: str, label: str, config: dict[str, Any], root: Path) -> Unit:
    unit = Unit(kind, stage, label, config, root=root)
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              "init_args": {"save_dir": str(unit.folder.parent.parent), "name": kind,
                            "version": unit.folder.name}}
    unit.run_config = merge(config, {"trainer": {"logger": logger}})
    return unit


def score_config(spec: StudySpec, T: float, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resolved config of the score model trained at ``T``."""
    base = model_config(spec.score) if base is None else base
    return merge(base, {"model": {"init_args": {"sde": with_T(base["model"]["init_args"]["sde"], T)}},
                        "seed_everything": spec.seed})


def aux_config(spec: StudySpec, name: str, T: float, sde: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resolved config of the auxiliary prior ``name`` trained at ``T`` on the score model's SDE."""
    sde = score_sde_config(spec) if sde is None else sde
    config = model_config(spec.aux_priors[name], f"aux_priors.{name}")
    return merge(config, {"model": {"init_args": {"sde": with_T(sde, T)}}, "seed_everything": spec.seed})


def aux_points(spec: StudySpec, name: str) -> list[float]:
    """The T' at which the auxiliary prior ``name`` is trained (every evaluated T' < 1, or also 1)."""
    aux = spec.aux_priors[name]
    return sorted({T for _, T in eval_points(spec) if T < 1.0 or aux.at_T1})


def make_plan(spec: StudySpec, spec_path: str | Path) -> Plan:
    """All units of the study, their dependencies and resolved configs (no work, no imports of Lightning)."""
    out = out_folder(spec)
    base = model_config(spec.score)
    units: dict[str, Unit] = {}
    score_units = {}
    for T in spec.trained_T:
        unit = _fit_unit("score", "train", f"T{T:g}", score_config(spec, T, base), out)
        units[unit.id], score_units[T] = unit, unit
    aux_units: dict[tuple[str, float], Unit] = {}
    sde = base["model"]["init_args"]["sde"]
    for name in spec.priors:
        if name == GAUSSIAN:
            continue
        for T in aux_points(spec, name):
            unit = _fit_unit("aux", "aux", f"{name}-T{T:g}", aux_config(spec, name, T, sde), out)
            units[unit.id], aux_units[(name, T)] = unit, unit
    if spec.quality.extractor == "digit_classifier":
        params = {"data": base.get("data"), "epochs": spec.quality.classifier_epochs, "seed": spec.quality.seed}
        classifier = Unit("classifier", "train", "digits", params, root=out)
        units[classifier.id] = classifier
    for T_train, T in eval_points(spec):
        for name in spec.priors:
            if name != GAUSSIAN and (name, T) not in aux_units:
                continue
            _eval_units(spec, units, score_units[T_train], T, name, aux_units.get((name, T)), out)
    report = Unit("report", "report", spec.name, {"units": sorted(units)}, deps=sorted(units), root=out)
    units[report.id] = report
    return Plan(spec, Path(spec_path).resolve(), out, units, spec.T_top)


def eval_points(spec: StudySpec) -> list[tuple[float, float]]:
    """(T the score model was trained at, T' it is evaluated at), in spec order, unique."""
    points: list[tuple[float, float]] = []
    for entry in spec.T:
        if entry.mode in ("trained", "both"):
            points.append((entry.T, entry.T))
        if entry.mode in ("truncated", "both"):
            points.append((spec.T_top, entry.T))
    return list(dict.fromkeys(points))


def model_label(T_train: float, T: float, prior: str) -> str:
    """An evaluated model's name in unit labels and in a sampler's ``models``: ``T0.4-trunc1-glow``."""
    source = "trained" if T == T_train else f"trunc{T_train:g}"
    return f"T{T:g}-{source}-{prior}"


def evaluated_models(spec: StudySpec) -> list[str]:
    """The labels of every (score model, T', prior) the study evaluates, in plan order."""
    return [model_label(T_train, T, name) for T_train, T in eval_points(spec) for name in spec.priors
            if name == GAUSSIAN or T in aux_points(spec, name)]


def _eval_units(spec: StudySpec, units: dict[str, Unit], score: Unit, T: float, prior: str, aux: Unit | None,
                out: Path) -> None:
    T_train = score.params["model"]["init_args"]["sde"]["init_args"]["T"]
    common = {"score": score.id, "T_train": T_train, "T": T, "prior": prior, "aux": aux.id if aux else None}
    deps = [score.id] + ([aux.id] if aux else [])
    label = model_label(T_train, T, prior)
    bpd = Unit("bpd", "evaluate", label, {**common, "bpd": dataclasses.asdict(spec.bpd)}, deps, root=out)
    units[bpd.id] = bpd
    sde = with_T(score_sde_config(spec), T)
    for sampler in spec.samplers:
        if sampler.models is not None and label not in sampler.models:
            continue
        for budget in sampler.nfe:
            steps, nfe = steps_for_nfe(sampler.name, budget, sde, sampler.name, sampler.options)
            params = {**common, "sampler": sampler.name, "steps": steps, "nfe_budget": budget, "nfe": nfe,
                      "n": spec.quality.n_samples, "seed": spec.seed, **sampler_extras(sampler)}
            unit = Unit("sample", "evaluate", f"{label}-{sampler.tag}-nfe{nfe}", params, deps, root=out)
            units[unit.id] = unit
    if spec.reference is not None and (spec.reference.models is None or label in spec.reference.models):
        unit = _reference_unit(spec, common, sde, f"{label}-ref-{spec.reference.name}", deps, out)
        units[unit.id] = unit


def _reference_unit(spec: StudySpec, common: dict[str, Any], sde: dict[str, Any], label: str, deps: list[str],
                    out: Path) -> Unit:
    """The converged sample unit of one evaluated model (``spec.reference``): adaptive_ode chooses its
    own steps (``steps`` None), a fixed-step sampler takes the steps of its budget."""
    ref = spec.reference
    assert ref is not None
    steps, nfe = steps_for_nfe(ref.name, ref.nfe, sde, "reference.nfe", ref.options) if ref.nfe else (None, None)
    params = {**common, "sampler": ref.name, "steps": steps, "nfe_budget": ref.nfe, "nfe": nfe,
              "n": spec.quality.n_samples, "seed": spec.seed, "sampler_label": f"reference_{ref.name}",
              "reference": True, **({"sampler_options": dict(sorted(ref.options.items()))} if ref.options else {})}
    return Unit("sample", "evaluate", label, params, deps, root=out)


def sampler_extras(sampler: SamplerSpec) -> dict[str, Any]:
    """The sampler's options and label as unit params, only those that are set (an entry without
    them hashes as before, so finished units stay finished)."""
    extras: dict[str, Any] = {}
    if sampler.options:
        extras["sampler_options"] = dict(sorted(sampler.options.items()))
    if sampler.label:
        extras["sampler_label"] = sampler.label
    return extras
