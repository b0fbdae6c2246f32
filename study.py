"""The diffusion-time study as one command (Franzese et al. 2023, "How Much is Enough?").

    python study.py --config configs/study/digits_cpu.yaml [--dry-run] [--executor local|slurm] [--stage ...]

A typed YAML spec (:class:`StudySpec`) names the base score and auxiliary-prior configs, the T
grid (each T trained, truncated from the model trained at T_max, or both), the priors, the
samplers with their NFE budgets, the metrics, sample counts and seeds. The whole spec is checked
before any work; a bad value fails naming its key.

Units of work, each in its own folder ``<out>/units/<kind>/<label>-<hash>`` named by a hash of
its resolved config (changing one spec value re-runs only the units it affects; a fit's hash covers
:func:`training_identity`, without the evaluation-only keys):

==========  ========  ==========================================================================
stage       kind      what runs
==========  ========  ==========================================================================
train       score     ``train.py fit`` of the score model at T (resumed exactly when interrupted)
train       classifier the digit classifier of the quality metrics (:mod:`difftime.quality`)
aux         aux       ``train.py fit`` of an AuxPriorModule at each T' that needs one
evaluate    bpd       ``train.py validate`` with callbacks.BitsPerDim at T' with one prior
evaluate    sample    ``sample.py`` (sampler, steps for the NFE budget, seeds) at T' with one prior
report      report    quality metrics, ``report.md``, ``results.csv``, figures, TensorBoard
==========  ========  ==========================================================================

A unit is done when its final checkpoint (fit units) or its ``result.json`` (other units) exists;
a second invocation skips done units and re-runs the others (fit units resume from their newest
valid checkpoint through train.py). ``--dry-run`` prints the plan (status, estimated cost and the
exact commands). Executors: ``local`` runs the units one after the other (fit units as
``train.py`` subprocesses, evaluations in this process, the same code a worker runs);
``slurm`` submits ``scripts/slurm_study.sh``: one array job per stage chained with
``--dependency=afterok``, the report last.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import importlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

ROOT = Path(__file__).resolve().parent
STAGES = ("train", "aux", "evaluate", "report")
GAUSSIAN = "gaussian"
AUX_CHECKPOINT = "difftime.aux_priors.AuxPriorCheckpoint"


class SpecError(ValueError):
    """A bad study spec, reported as one line naming the key, before any work."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"spec key '{key}': {message}")
        self.key = key


# ====================================================================== the typed spec
@dataclass
class ModelSpec:
    """A base config (layered LightningCLI YAML) and what the study changes in it."""

    config: list[str]
    steps: int
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys, e.g. trainer.log_every_n_steps
    remove_callbacks: list[str] = field(default_factory=list)  # class names, e.g. SampleGrid


@dataclass
class TEntry:
    """One T of the grid: train a score model at T, truncate the T_max model at T, or both."""

    T: float
    mode: Literal["trained", "truncated", "both"] = "trained"


@dataclass
class AuxSpec(ModelSpec):
    """An auxiliary-prior backend (an AuxPriorModule config), used at every T' < 1 (or also at 1)."""

    at_T1: bool = False


@dataclass
class SamplerSpec:
    """A sampler of :data:`difftime.samplers.SAMPLERS` with its NFE budgets per sample."""

    name: str
    nfe: list[int]


@dataclass
class BpdSpec:
    """callbacks.BitsPerDim settings of the evaluation units."""

    max_samples: int = 500
    n_t: int = 16
    n_prior: int = 1
    ode: bool = False
    ode_max_samples: int = 16
    seed: int = 0


@dataclass
class QualitySpec:
    """Sample-quality metrics: Fréchet distance and precision/recall with bootstrap intervals."""

    extractor: Literal["digit_classifier", "identity"] = "digit_classifier"
    n_samples: int = 500
    reference: Literal["test", "val"] = "test"
    k: int = 3
    resamples: int = 200
    level: float = 0.95
    seed: int = 0
    classifier_epochs: int = 4
    grid: int = 16  # samples per image grid of the side-by-side figure


@dataclass
class CostSpec:
    """Cost model of ``--dry-run`` (seconds); measure on the target machine and put them here."""

    score_s_per_step: float = 0.3
    aux_s_per_step: float = 0.5
    s_per_nfe_per_sample: float = 0.004
    bpd_s_per_image: float = 0.07
    classifier_s: float = 30.0
    startup_s: float = 10.0


@dataclass
class StudySpec:
    name: str
    out: str
    score: ModelSpec
    T: list[TEntry]
    priors: list[str]
    samplers: list[SamplerSpec]
    aux_priors: dict[str, AuxSpec] = field(default_factory=dict)
    T_max: float | None = None
    bpd: BpdSpec = field(default_factory=BpdSpec)
    quality: QualitySpec = field(default_factory=QualitySpec)
    cost: CostSpec = field(default_factory=CostSpec)
    seed: int = 0
    sample_batch_size: int = 250
    device: str = "cpu"
    inception_weights: str | None = None  # FID with Inception where weights exist (GPU clusters)
    note: str | None = None  # printed at the top of report.md (e.g. how this run differs from the shipped spec)


def _convert(tp: Any, value: Any, key: str) -> Any:
    """``value`` as type ``tp`` (dataclasses, list, dict, Literal, Optional, scalars) or SpecError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, key)
    if origin is Literal:
        if value not in args:
            raise SpecError(key, f"{value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise SpecError(key, f"expected a list, got {value!r}")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(key, f"expected a mapping, got {value!r}")
        return {str(k): _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise SpecError(key, f"expected {tp.__name__}, got {value!r}")
    return value


def _from_dict(cls: type, data: Any, key: str) -> Any:
    if not isinstance(data, dict):
        raise SpecError(key or "<top>", f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for name in data:
        if name not in names:
            raise SpecError(f"{key}.{name}".lstrip("."), f"unknown key (allowed: {', '.join(sorted(names))})")
    values = {}
    for f in dataclasses.fields(cls):
        sub = f"{key}.{f.name}".lstrip(".")
        if f.name in data:
            values[f.name] = _convert(hints[f.name], data[f.name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(sub, "required")
    return cls(**values)


def load_spec(path: str | Path) -> StudySpec:
    """Parse and check a study spec; relative paths are relative to the repository root."""
    with open(path) as handle:
        spec = _from_dict(StudySpec, yaml.safe_load(handle) or {}, "")
    check_spec(spec)
    return spec


def _positive(key: str, value: float, integer: bool = True) -> None:
    if not value > 0:
        raise SpecError(key, f"= {value} is invalid: allowed {'an integer ' if integer else ''}> 0")


def _check_model(spec: ModelSpec, key: str) -> None:
    _positive(f"{key}.steps", spec.steps)
    for i, name in enumerate(spec.config):
        if not (ROOT / name).is_file() and not Path(name).is_file():
            raise SpecError(f"{key}.config[{i}]", f"no such file {name}")
    every = checkpoint_interval(_model_config(spec))
    if every and spec.steps % every:
        raise SpecError(f"{key}.steps", f"= {spec.steps} is not a multiple of the checkpoint interval "
                                        f"every_n_train_steps = {every}: the final step would have no checkpoint")


def check_spec(spec: StudySpec) -> None:
    """Everything that would otherwise fail hours in: keys, ranges, files, priors, T, NFE budgets."""
    _check_model(spec.score, "score")
    for name, aux in spec.aux_priors.items():
        if name == GAUSSIAN:
            raise SpecError(f"aux_priors.{name}", "'gaussian' is the SDE's own prior, not an auxiliary one")
        _check_model(aux, f"aux_priors.{name}")
    if not spec.priors:
        raise SpecError("priors", "at least one prior")
    for i, name in enumerate(spec.priors):
        if name != GAUSSIAN and name not in spec.aux_priors:
            raise SpecError(f"priors[{i}]", f"unknown prior {name!r} (known: gaussian, "
                                            f"{', '.join(spec.aux_priors) or 'no aux_priors defined'})")
    sde = score_sde_config(spec)
    eps = float((sde.get("init_args") or {}).get("eps", 1e-5))
    trained = [e.T for e in spec.T if e.mode in ("trained", "both")]
    if not trained:
        raise SpecError("T", "no T is trained (mode trained or both)")
    T_max = spec.T_max if spec.T_max is not None else max(trained)
    if T_max not in trained:
        raise SpecError("T_max", f"= {T_max} has no trained entry in T")
    for i, entry in enumerate(spec.T):
        if not eps < entry.T <= 1.0:
            raise SpecError(f"T[{i}].T", f"= {entry.T} is invalid: allowed eps < T <= 1 (eps = {eps:g})")
        if entry.mode in ("truncated", "both") and not entry.T < T_max:
            raise SpecError(f"T[{i}].T", f"= {entry.T} is truncated from T_max = {T_max}: allowed T' < T_max")
    _positive("bpd.max_samples", spec.bpd.max_samples)
    _positive("bpd.n_t", spec.bpd.n_t)
    _positive("quality.n_samples", spec.quality.n_samples)
    _positive("quality.resamples", spec.quality.resamples)
    _positive("sample_batch_size", spec.sample_batch_size)
    if not 0 < spec.quality.level < 1:
        raise SpecError("quality.level", f"= {spec.quality.level} is invalid: allowed 0 < level < 1")
    if not 1 <= spec.quality.k < spec.quality.n_samples:
        raise SpecError("quality.k", f"= {spec.quality.k} is invalid: allowed 1 <= k < n_samples")
    _check_samplers(spec, sde)


def _check_samplers(spec: StudySpec, sde_config: dict[str, Any]) -> None:
    from difftime.samplers import SAMPLERS

    if not spec.samplers:
        raise SpecError("samplers", "at least one sampler")
    for i, sampler in enumerate(spec.samplers):
        if sampler.name not in SAMPLERS:
            raise SpecError(f"samplers[{i}].name", f"unknown sampler {sampler.name!r} (known: {', '.join(sorted(SAMPLERS))})")
        if sampler.name == "adaptive_ode":
            raise SpecError(f"samplers[{i}].name", "adaptive_ode chooses its own steps: it has no NFE budget")
        if not sampler.nfe:
            raise SpecError(f"samplers[{i}].nfe", "at least one NFE budget")
        for j, budget in enumerate(sampler.nfe):
            _positive(f"samplers[{i}].nfe[{j}]", budget)
            steps_for_nfe(sampler.name, budget, sde_config, f"samplers[{i}].nfe[{j}]")


# ====================================================================== configs and hashes
def merge(base: Any, update: Any) -> Any:
    """Deep merge of YAML layers as LightningCLI composes ``--config`` files: mappings merge, lists are replaced."""
    if isinstance(base, dict) and isinstance(update, dict):
        merged = dict(base)
        for key, value in update.items():
            merged[key] = merge(base.get(key), value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(update)


def merge_layers(paths: list[str]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for name in paths:
        path = ROOT / name if (ROOT / name).is_file() else Path(name)
        with open(path) as handle:
            config = merge(config, yaml.safe_load(handle) or {})
    return config


def set_key(config: dict[str, Any], dotted: str, value: Any) -> None:
    """``config[a][b][c] = value`` for ``dotted = "a.b.c"`` (integer parts index lists)."""
    parts = dotted.split(".")
    node: Any = config
    for part in parts[:-1]:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
            if node is None:
                raise KeyError(dotted)
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def checkpoint_interval(config: dict[str, Any]) -> int | None:
    for callback in (config.get("trainer") or {}).get("callbacks") or []:
        if str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
            return (callback.get("init_args") or {}).get("every_n_train_steps")
    return None


def digest(value: Any) -> str:
    """Ten hex digits of SHA-256 of the canonical JSON of ``value``."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def score_sde_config(spec: StudySpec) -> dict[str, Any]:
    return copy.deepcopy(_model_config(spec.score)["model"]["init_args"]["sde"])


def _model_config(model: ModelSpec) -> dict[str, Any]:
    config = merge_layers(model.config)
    for key, value in model.overrides.items():
        set_key(config, key, value)
    trainer = config.setdefault("trainer", {})
    drop = set(model.remove_callbacks)
    trainer["callbacks"] = [c for c in trainer.get("callbacks") or []
                            if str(c.get("class_path", "")).rsplit(".", 1)[-1] not in drop]
    trainer["max_steps"], trainer["max_time"] = int(model.steps), None  # done = the final step's checkpoint
    return config


def _with_T(sde: dict[str, Any], T: float) -> dict[str, Any]:
    sde = copy.deepcopy(sde)
    sde.setdefault("init_args", {})["T"] = float(T)
    return sde


def steps_for_nfe(name: str, budget: int, sde_config: dict[str, Any], key: str) -> tuple[int, int]:
    """The most sampler steps whose NFE per sample is <= ``budget``, and that NFE.

    Counted by running the sampler with a zero score on one 1-D state (no network), so any
    sampler of the registry maps exactly; a budget below the sampler's minimum is a SpecError.
    """
    import torch

    from difftime.samplers import SAMPLERS

    sde = _build(sde_config)
    sampler = SAMPLERS[name]()

    def count(steps: int) -> int:
        return int(sampler(lambda x, t: torch.zeros_like(x), sde, torch.zeros(1, 1), steps=steps)[1]["nfe"])

    if count(1) > budget:
        raise SpecError(key, f"= {budget} is invalid: {name} needs at least {count(1)} NFE per sample")
    low, high = 1, budget
    while low < high:  # nfe(steps) is non-decreasing: the largest steps with nfe <= budget
        mid = (low + high + 1) // 2
        low, high = (mid, high) if count(mid) <= budget else (low, mid - 1)
    return low, count(low)


def _build(config: Any) -> Any:
    """Instantiate ``{class_path, init_args}`` (nested ones too), as LightningCLI would."""
    if isinstance(config, list):
        return [_build(v) for v in config]
    if not isinstance(config, dict):
        return config
    if "class_path" not in config:
        return {k: _build(v) for k, v in config.items()}
    module, name = config["class_path"].rsplit(".", 1)
    kwargs = {k: _build(v) for k, v in (config.get("init_args") or {}).items()}
    return getattr(importlib.import_module(module), name)(**kwargs)


# ====================================================================== units
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


FIT_KINDS = ("score", "aux")  # units that are a train.py fit
SAMPLING_CALLBACKS = ("SampleGrid", "FID", "SampleWriter")  # callbacks that sample with model.sampler in a fit
DISPLAY_KEYS = ("enable_progress_bar", "enable_model_summary")  # trainer switches that change only the display


def training_identity(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a fit unit's resolved config that decides its checkpoints: what its hash covers.

    Left out, so that changing them neither renames nor retrains a finished unit: the model's
    ``sampler`` when no callback of the fit samples with it (the study's sample units choose their
    own), and the trainer's display switches. Everything else, evaluation callbacks included, stays.
    """
    identity = copy.deepcopy(config)
    trainer = identity.get("trainer") or {}
    for key in DISPLAY_KEYS:
        trainer.pop(key, None)
    names = {str(c.get("class_path", "")).rsplit(".", 1)[-1] for c in trainer.get("callbacks") or []}
    if not names & set(SAMPLING_CALLBACKS):
        ((identity.get("model") or {}).get("init_args") or {}).pop("sampler", None)
    return identity


@dataclass
class Plan:
    spec: StudySpec
    spec_path: Path
    out: Path
    units: dict[str, Unit]
    T_max: float

    def stage(self, stage: str) -> list[Unit]:
        return [u for u in self.units.values() if u.stage == stage]


def _fit_unit(kind: str, stage: str, label: str, config: dict[str, Any], root: Path) -> Unit:
    unit = Unit(kind, stage, label, config, root=root)
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              "init_args": {"save_dir": str(unit.folder.parent.parent), "name": kind,
                            "version": unit.folder.name}}
    unit.run_config = merge(config, {"trainer": {"logger": logger}})
    return unit


def make_plan(spec: StudySpec, spec_path: str | Path) -> Plan:
    """All units of the study, their dependencies and resolved configs (no work, no imports of Lightning)."""
    out = (ROOT / spec.out) if not Path(spec.out).is_absolute() else Path(spec.out)
    trained = sorted({e.T for e in spec.T if e.mode in ("trained", "both")})
    T_max = spec.T_max if spec.T_max is not None else max(trained)
    base = _model_config(spec.score)
    units: dict[str, Unit] = {}
    score_units = {}
    for T in trained:
        config = merge(base, {"model": {"init_args": {"sde": _with_T(base["model"]["init_args"]["sde"], T)}},
                              "seed_everything": spec.seed})
        unit = _fit_unit("score", "train", f"T{T:g}", config, out)
        units[unit.id], score_units[T] = unit, unit
    points = _eval_points(spec, T_max)
    aux_units: dict[tuple[str, float], Unit] = {}
    sde = base["model"]["init_args"]["sde"]
    for name in spec.priors:
        if name == GAUSSIAN:
            continue
        aux = spec.aux_priors[name]
        for T in sorted({T for _, T in points if T < 1.0 or aux.at_T1}):
            config = _model_config(aux)
            config = merge(config, {"model": {"init_args": {"sde": _with_T(sde, T)}}, "seed_everything": spec.seed})
            unit = _fit_unit("aux", "aux", f"{name}-T{T:g}", config, out)
            units[unit.id], aux_units[(name, T)] = unit, unit
    classifier = None
    if spec.quality.extractor == "digit_classifier":
        params = {"data": base.get("data"), "epochs": spec.quality.classifier_epochs, "seed": spec.quality.seed}
        classifier = Unit("classifier", "train", "digits", params, root=out)
        units[classifier.id] = classifier
    for T_train, T in points:
        for name in spec.priors:
            if name != GAUSSIAN and (name, T) not in aux_units:
                continue
            _eval_units(spec, units, score_units[T_train], T, name, aux_units.get((name, T)), out)
    report = Unit("report", "report", spec.name, {"units": sorted(units)}, deps=sorted(units), root=out)
    units[report.id] = report
    return Plan(spec, Path(spec_path).resolve(), out, units, T_max)


def _eval_points(spec: StudySpec, T_max: float) -> list[tuple[float, float]]:
    """(T the score model was trained at, T' it is evaluated at), in spec order, unique."""
    points: list[tuple[float, float]] = []
    for entry in spec.T:
        if entry.mode in ("trained", "both"):
            points.append((entry.T, entry.T))
        if entry.mode in ("truncated", "both"):
            points.append((T_max, entry.T))
    return list(dict.fromkeys(points))


def _eval_units(spec: StudySpec, units: dict[str, Unit], score: Unit, T: float, prior: str, aux: Unit | None,
                out: Path) -> None:
    T_train = score.params["model"]["init_args"]["sde"]["init_args"]["T"]
    common = {"score": score.id, "T_train": T_train, "T": T, "prior": prior, "aux": aux.id if aux else None}
    deps = [score.id] + ([aux.id] if aux else [])
    source = "trained" if T == T_train else f"trunc{T_train:g}"
    label = f"T{T:g}-{source}-{prior}"
    bpd = Unit("bpd", "evaluate", label, {**common, "bpd": dataclasses.asdict(spec.bpd)}, deps, root=out)
    units[bpd.id] = bpd
    sde = _with_T(score_sde_config(spec), T)
    for sampler in spec.samplers:
        for budget in sampler.nfe:
            steps, nfe = steps_for_nfe(sampler.name, budget, sde, sampler.name)
            params = {**common, "sampler": sampler.name, "steps": steps, "nfe_budget": budget, "nfe": nfe,
                      "n": spec.quality.n_samples, "seed": spec.seed}
            unit = Unit("sample", "evaluate", f"{label}-{sampler.name}-nfe{nfe}", params, deps, root=out)
            units[unit.id] = unit


# ====================================================================== status and cost
def final_checkpoint(unit: Unit) -> Path | None:
    """The newest valid checkpoint of a fit unit if it holds the final step, else None."""
    from difftime.checkpoints import scan_checkpoints

    chosen = scan_checkpoints(unit.folder / "checkpoints").chosen
    if chosen is None:
        return None
    return chosen if _ckpt_step(chosen) >= unit.params["trainer"]["max_steps"] else None


def _ckpt_step(path: Path) -> int:
    from difftime.checkpoints import checkpoint_step

    return checkpoint_step(path)


def status(unit: Unit) -> str:
    """'done', 'partial' (started, not finished: a fit resumes from its checkpoint) or 'to do'."""
    if unit.kind == "report":
        return "to do"  # always rebuilt: cheap, and it reads every other unit
    if unit.kind in FIT_KINDS:
        if final_checkpoint(unit) is not None:
            return "done"
        return "partial" if (unit.folder / "checkpoints").is_dir() and any((unit.folder / "checkpoints").glob("*.ckpt")) else "to do"
    if (unit.folder / "result.json").is_file():
        return "done"
    return "partial" if unit.folder.is_dir() else "to do"


def done_steps(unit: Unit) -> int:
    from difftime.checkpoints import scan_checkpoints

    chosen = scan_checkpoints(unit.folder / "checkpoints").chosen
    return _ckpt_step(chosen) if chosen is not None else 0


def estimate(unit: Unit, cost: CostSpec, spec: StudySpec) -> float:
    """Estimated seconds still needed for ``unit`` (the cost model of the spec)."""
    if status(unit) == "done":
        return 0.0
    if unit.kind in FIT_KINDS:
        per_step = cost.score_s_per_step if unit.kind == "score" else cost.aux_s_per_step
        return cost.startup_s + per_step * (unit.params["trainer"]["max_steps"] - done_steps(unit))
    if unit.kind == "classifier":
        return cost.classifier_s
    if unit.kind == "bpd":
        return cost.startup_s / 2 + cost.bpd_s_per_image * spec.bpd.max_samples * spec.bpd.n_t / 16
    if unit.kind == "sample":
        return 2.0 + cost.s_per_nfe_per_sample * unit.params["nfe"] * unit.params["n"]
    return 30.0


def command(plan: Plan, unit: Unit) -> list[str]:
    """The exact command that runs ``unit`` (the local executor runs evaluations in-process, the same code)."""
    if unit.kind in FIT_KINDS:
        return [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(unit.folder / "unit.yaml")]
    return [sys.executable, str(ROOT / "study.py"), "--config", str(plan.spec_path), "--run-unit", unit.id]


def print_plan(plan: Plan, stages: tuple[str, ...]) -> list[Unit]:
    """The plan table and the commands a run would execute; returns the units it would run."""
    todo, total = [], 0.0
    print(f"study {plan.spec.name}: {len(plan.units)} units in {plan.out}")
    print(f"{'stage':<9} {'status':<8} {'est. s':>8}  unit")
    for stage in stages:
        for unit in plan.stage(stage):
            state, cost = status(unit), estimate(unit, plan.spec.cost, plan.spec)
            total += cost
            print(f"{stage:<9} {state:<8} {cost:>8.0f}  {unit.id}")
            if state != "done":
                todo.append(unit)
    print(f"estimated: {total / 60:.1f} min for {len(todo)} units to run")
    print("would execute:")
    for unit in todo:
        print("  " + " ".join(command(plan, unit)))
    return todo


# ====================================================================== running units
def _atomic_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, default=str))
    tmp.replace(path)


def _log_executed(plan: Plan, unit: Unit) -> None:
    plan.out.mkdir(parents=True, exist_ok=True)
    with open(plan.out / "executed.jsonl", "a") as handle:
        handle.write(json.dumps({"unit": unit.id, "time": time.time()}) + "\n")


def run_unit(plan: Plan, unit: Unit) -> None:
    """Run one unit to completion (what a local step and a SLURM array task both do)."""
    for dep in unit.deps:
        if status(plan.units[dep]) != "done":
            raise RuntimeError(f"unit {unit.id} needs {dep}, which is not done")
    unit.folder.mkdir(parents=True, exist_ok=True)
    _log_executed(plan, unit)
    runner = {"score": run_fit, "aux": run_fit, "classifier": run_classifier, "bpd": run_bpd,
              "sample": run_sample, "report": run_report}[unit.kind]
    runner(plan, unit)


def run_fit(plan: Plan, unit: Unit) -> None:
    """``train.py fit`` in a subprocess; an interrupted unit resumes from its newest valid checkpoint.

    Every attempt (start step, end step, wall time, exit status) is appended to ``attempts.jsonl``;
    the unit's training wall time is their sum. Outside SLURM, SIGTERM/SIGUSR1 are forwarded to
    train.py (which checkpoints at the next step and exits cleanly); under SLURM every process of
    the step gets them from SLURM itself.
    """
    path = unit.folder / "unit.yaml"
    with open(path, "w") as handle:
        yaml.safe_dump(unit.run_config, handle, sort_keys=False)
    before, start = done_steps(unit), time.time()
    child = subprocess.Popen(command(plan, unit), cwd=ROOT)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    forward = (lambda s, f: None) if os.environ.get("SLURM_JOB_ID") else (lambda s, f: child.send_signal(s))
    for s in previous:
        signal.signal(s, forward)
    try:
        rc = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    after = done_steps(unit)
    with open(unit.folder / "attempts.jsonl", "a") as handle:
        handle.write(json.dumps({"start": start, "wall_s": time.time() - start, "rc": rc,
                                 "step_before": before, "step_after": after}) + "\n")
    if rc != 0:
        raise RuntimeError(f"unit {unit.id}: train.py fit exited with status {rc} (log above)")
    if final_checkpoint(unit) is None:
        raise RuntimeError(f"unit {unit.id}: stopped at step {after} of {unit.params['trainer']['max_steps']} "
                           "(preempted?); run the study again to resume it")


def _datamodule(config: dict[str, Any]) -> Any:
    return _build(config)


def run_classifier(plan: Plan, unit: Unit) -> None:
    """Train the digit classifier on the training split; cache weights, test accuracy and data digest."""
    from difftime import quality

    start = time.time()
    splits = _datamodule(unit.params["data"]).splits()
    train, test = splits["train"], splits["test"]
    trained = quality.train_classifier((train.data, train.labels), (test.data, test.labels),
                                       epochs=unit.params["epochs"], seed=unit.params["seed"])
    quality.save_classifier(trained, unit.folder / "classifier.pt")
    _atomic_json(unit.folder / "result.json", {"test_accuracy": trained.test_accuracy, "data_digest": trained.data_digest,
                                               "n_train": len(train), "n_test": len(test), "wall_s": time.time() - start})


def _score_run(plan: Plan, unit: Unit) -> tuple[Path, Path]:
    """The score unit's saved run config and final checkpoint."""
    score = plan.units[unit.params["score"]]
    ckpt = final_checkpoint(score)
    assert ckpt is not None, score.id
    return score.folder / "config.yaml", ckpt


def _aux_ckpt(plan: Plan, unit: Unit) -> Path | None:
    return final_checkpoint(plan.units[unit.params["aux"]]) if unit.params["aux"] else None


def _eval_T(unit: Unit) -> float | None:
    return None if unit.params["T"] == unit.params["T_train"] else float(unit.params["T"])


def run_bpd(plan: Plan, unit: Unit) -> None:
    """``train.py validate`` with callbacks.BitsPerDim at T' with the unit's prior (in this process)."""
    import train

    config_path, ckpt = _score_run(plan, unit)
    with open(config_path) as handle:
        config = yaml.safe_load(handle)
    aux = _aux_ckpt(plan, unit)
    bpd = unit.params["bpd"]
    init = {k: bpd[k] for k in ("max_samples", "n_t", "n_prior", "ode", "ode_max_samples", "seed")}
    config["trainer"].update(callbacks=[{"class_path": "callbacks.BitsPerDim", "init_args": init}],
                             limit_val_batches=None, enable_progress_bar=False, devices=1, num_nodes=1,
                             strategy="auto",
                             logger={"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                     "init_args": {"save_dir": str(unit.folder.parent.parent), "name": "bpd",
                                                   "version": unit.folder.name}})
    config["model"]["init_args"]["prior"] = ({"class_path": AUX_CHECKPOINT, "init_args": {"path": str(aux)}}
                                             if aux else None)
    config["model"]["init_args"]["eval_T"] = _eval_T(unit)
    path = unit.folder / "validate.yaml"
    with open(path, "w") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    start = time.time()
    cli = _in_process(train.main, ["validate", "--config", str(path), "--ckpt_path", str(ckpt)])
    metrics = {k.split("/", 1)[1]: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/bpd")}
    _atomic_json(unit.folder / "result.json", {**metrics, "n": bpd["max_samples"], "checkpoint": str(ckpt),
                                               "checkpoint_step": _ckpt_step(ckpt), "wall_s": time.time() - start})


def _in_process(fn: Any, args: list[str]) -> Any:
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI reads sys.argv otherwise
    try:
        return fn(args)
    finally:
        sys.argv = argv


def run_sample(plan: Plan, unit: Unit) -> None:
    """``sample.py`` with the unit's sampler, steps, seeds, prior and T' (in this process), then the
    prior's draw cost per sample. Outputs go to a temporary folder renamed into place."""
    import shutil

    import sample

    config_path, ckpt = _score_run(plan, unit)
    aux = _aux_ckpt(plan, unit)
    p = unit.params
    for stale in unit.folder.glob("samples.tmp*"):  # left by an interrupted attempt
        shutil.rmtree(stale, ignore_errors=True)
    tmp = unit.folder / f"samples.tmp{os.getpid()}"
    args = ["--config", str(config_path), "--ckpt_path", str(ckpt), "--prior", str(aux) if aux else GAUSSIAN,
            "--sampler", p["sampler"], "--steps", str(p["steps"]), "--n", str(p["n"]), "--seed", str(p["seed"]),
            "--batch_size", str(plan.spec.sample_batch_size), "--out", str(tmp), "--device", plan.spec.device]
    if _eval_T(unit) is not None:
        args += ["--eval_T", str(_eval_T(unit))]
    summary = _in_process(sample.main, args)
    prior_s = prior_draw_cost(aux, summary, p["n"], p["seed"])
    (unit.folder / "samples").exists() and shutil.rmtree(unit.folder / "samples")
    tmp.replace(unit.folder / "samples")
    _atomic_json(unit.folder / "result.json", {**{k: v for k, v in summary.items() if k not in ("npz", "png")},
                                               "prior_s_per_sample": prior_s, "checkpoint_step": _ckpt_step(ckpt)})


def prior_draw_cost(aux: Path | None, summary: dict[str, Any], n: int, seed: int) -> float:
    """Seconds per sample of drawing x_T' from the prior alone (per-sample seeds, as the sampler)."""
    import numpy as np
    import torch

    from difftime.aux_priors import AuxPriorCheckpoint
    from difftime.priors import GaussianPrior
    from difftime.utils import PerSampleNoise

    shape = tuple(np.load(summary["npz"])["samples"].shape[1:])
    prior = AuxPriorCheckpoint(str(aux)) if aux is not None else GaussianPrior(shape)
    start = time.perf_counter()
    with torch.no_grad():
        prior.sample(n, PerSampleNoise([seed + i for i in range(n)]))
    return (time.perf_counter() - start) / n


def run_report(plan: Plan, unit: Unit) -> None:
    """Quality metrics of every sample unit, then report.md, results.csv, figures and TensorBoard."""
    import torch

    folder = plan.out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small float64 eigh/cdist: thread start-up and spinning cost 30x on a busy CPU
    try:
        rows = collect_rows(plan)
    finally:
        torch.set_num_threads(threads)
    write_csv(rows, folder / "results.csv")
    figures = {"bpd_terms.png": figure_bpd(rows), "quality_vs_nfe.png": figure_quality(rows),
               "samples_side_by_side.png": figure_samples(plan, rows)}
    for name, fig in figures.items():
        fig.savefig(folder / name, dpi=110, bbox_inches="tight")
    text = report_markdown(plan, rows, list(figures))
    (folder / "report.md").write_text(text)
    log_tensorboard(folder / "tensorboard", rows, figures, text)
    import matplotlib.pyplot as plt

    for fig in figures.values():
        plt.close(fig)
    print(f"study.py: report in {folder / 'report.md'}", file=sys.stderr)


# ====================================================================== the report
def _read(unit: Unit) -> dict[str, Any]:
    return json.loads((unit.folder / "result.json").read_text())


def fit_cost(unit: Unit) -> tuple[float, int]:
    """Training wall time (sum over attempts, startup included) and final step of a fit unit."""
    path = unit.folder / "attempts.jsonl"
    attempts = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return sum(a["wall_s"] for a in attempts), done_steps(unit)


class FeatureSpace:
    """The quality metrics' feature space and reference set, with what every figure must state."""

    def __init__(self, plan: Plan) -> None:
        import torch

        from difftime import quality

        q = plan.spec.quality
        data = _datamodule(_model_config(plan.spec.score)["data"])
        reference = _reference_data(data, q.reference)
        self.model, self.accuracy = None, None
        self.name = "identity (raw values)"
        if q.extractor == "digit_classifier":
            unit = next(u for u in plan.units.values() if u.kind == "classifier")
            trained = quality.load_classifier(unit.folder / "classifier.pt")
            self.model, self.accuracy = trained.model, trained.test_accuracy
            self.name = f"digit classifier LeNet ({trained.model.config['features']}-d penultimate layer)"
        self.reference_name = f"{getattr(data, 'name', type(data).__name__)} {q.reference} split"
        self.n_reference = len(reference)
        with torch.no_grad():
            self.reference = quality.extract_features(self.model, reference)

    def features(self, samples: Any) -> Any:
        from difftime import quality

        return quality.extract_features(self.model, samples)


def _reference_data(data: Any, split: str) -> Any:
    """Raw reference samples (uint8 images or float vectors) of ``split`` of a difftime datamodule."""
    if hasattr(data, "splits"):
        return data.splits()[split].data
    if hasattr(data, "draw"):
        return data.draw(split).data
    raise SpecError("quality.reference", f"{type(data).__name__} offers no {split} split to compare with")


def load_samples(unit: Unit) -> Any:
    import numpy as np
    import torch

    return torch.from_numpy(np.load(unit.folder / "samples" / "samples.npz")["samples"])


def quality_row(space: FeatureSpace, samples: Any, q: QualitySpec) -> dict[str, Any]:
    """Fréchet distance and precision/recall with bootstrap intervals, and what they were computed with."""
    from difftime import quality

    fake = space.features(samples)
    fd = quality.fd_interval(space.reference, fake, q.resamples, q.level, q.seed)
    precision, recall = quality.precision_recall_intervals(space.reference, fake, q.k, q.resamples, q.level, q.seed)
    return {"fd": fd.estimate, "fd_low": fd.low, "fd_high": fd.high,
            "precision": precision.estimate, "precision_low": precision.low, "precision_high": precision.high,
            "recall": recall.estimate, "recall_low": recall.low, "recall_high": recall.high,
            "n_samples": len(samples), "reference": space.reference_name, "n_reference": space.n_reference,
            "extractor": space.name, "extractor_test_accuracy": space.accuracy, "k": q.k,
            "bootstrap_resamples": q.resamples, "ci_level": q.level}


def collect_rows(plan: Plan) -> list[dict[str, Any]]:
    """One row per sample unit: T', source, prior, sampler, NFE, bpd (terms, s.e.), quality (CI), costs."""
    space = FeatureSpace(plan)
    bpd_units = {(u.params["score"], u.params["T"], u.params["prior"]): u for u in plan.stage("evaluate") if u.kind == "bpd"}
    rows = []
    for unit in plan.stage("evaluate"):
        if unit.kind != "sample":
            continue
        p = unit.params
        bpd = _read(bpd_units[(p["score"], p["T"], p["prior"])])
        sampled = _read(unit)
        train_s, train_steps = fit_cost(plan.units[p["score"]])
        aux_s, aux_steps = fit_cost(plan.units[p["aux"]]) if p["aux"] else (0.0, 0)
        row = {"T": p["T"], "T_train": p["T_train"], "source": "trained" if p["T"] == p["T_train"] else "truncated",
               "prior": p["prior"], "sampler": p["sampler"], "steps": p["steps"], "nfe": sampled["nfe"],
               **{k: bpd.get(k, math.nan) for k in ("bpd_elbo", "bpd_elbo_se", "bpd_prior", "bpd_prior_se",
                                                   "bpd_diffusion", "bpd_diffusion_se", "bpd_reconstruction")},
               "bpd_ode": bpd.get("bpd_ode", math.nan), "bpd_n": bpd["n"],
               **quality_row(space, load_samples(unit), plan.spec.quality),
               "fid_inception": inception_fid(plan, space, unit),
               "score_train_s": train_s, "score_train_steps": train_steps, "aux_train_s": aux_s,
               "aux_train_steps": aux_steps, "sample_wall_s": sampled["wall_time_s"],
               "sample_s_per_sample": sampled["wall_time_s"] / sampled["n"],
               "prior_ms_per_sample": 1e3 * sampled["prior_s_per_sample"], "unit": unit.id}
        rows.append(row)
    return rows


def inception_fid(plan: Plan, space: FeatureSpace, unit: Unit) -> float:
    """Inception FID of RGB-able uint8 samples where weights are given (GPU clusters); NaN otherwise."""
    weights = plan.spec.inception_weights
    if not weights or not Path(weights).is_file():
        return math.nan
    from torchmetrics.image.fid import FrechetInceptionDistance

    data = _datamodule(_model_config(plan.spec.score)["data"])
    real, fake = _reference_data(data, plan.spec.quality.reference), load_samples(unit)
    metric = FrechetInceptionDistance(feature=2048, normalize=False, antialias=False,
                                      feature_extractor_weights_path=weights)
    for images, is_real in ((real, True), (fake, False)):
        for chunk in images.split(100):
            metric.update(chunk.expand(-1, 3, -1, -1) if chunk.shape[1] == 1 else chunk, real=is_real)
    return float(metric.compute())


CSV_KEYS = ("T", "T_train", "source", "prior", "sampler", "steps", "nfe", "bpd_elbo", "bpd_elbo_se", "bpd_prior",
            "bpd_prior_se", "bpd_diffusion", "bpd_diffusion_se", "bpd_reconstruction", "bpd_ode", "bpd_n", "fd",
            "fd_low", "fd_high", "precision", "precision_low", "precision_high", "recall", "recall_low",
            "recall_high", "n_samples", "reference", "n_reference", "extractor", "extractor_test_accuracy", "k",
            "bootstrap_resamples", "ci_level", "fid_inception", "score_train_s", "score_train_steps",
            "aux_train_s", "aux_train_steps", "sample_wall_s", "sample_s_per_sample", "prior_ms_per_sample", "unit")


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_KEYS)
        writer.writeheader()
        writer.writerows([{k: row[k] for k in CSV_KEYS} for row in rows])


def _config_name(row: dict[str, Any]) -> str:
    source = "trained" if row["source"] == "trained" else f"trunc. from {row['T_train']:g}"
    return f"T={row['T']:g} ({source}), {row['prior']}"


def _configs(rows: list[dict[str, Any]]) -> list[tuple[float, str, str]]:
    return list(dict.fromkeys((r["T"], r["source"], r["prior"]) for r in rows))


def figure_bpd(rows: list[dict[str, Any]]) -> Any:
    """ELBO bits/dim and its three terms against T', one line per (prior, source), s.e. error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = (("bpd_elbo", "bpd_elbo_se"), ("bpd_prior", "bpd_prior_se"), ("bpd_diffusion", "bpd_diffusion_se"),
             ("bpd_reconstruction", None))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    points = {(r["T"], r["source"], r["prior"]): r for r in rows}
    for prior, source in dict.fromkeys((r["prior"], r["source"]) for r in rows):
        chosen = sorted((k[0], v) for k, v in points.items() if k[1] == source and k[2] == prior)
        for axis, (key, se) in zip(axes, terms):
            axis.errorbar([T for T, _ in chosen], [r[key] for _, r in chosen],
                          yerr=[r[se] for _, r in chosen] if se else None, marker="o" if source == "trained" else "s",
                          linestyle="-" if source == "trained" else "--", capsize=3, label=f"{prior}, {source}")
    for axis, (key, _) in zip(axes, terms):
        axis.set_xlabel("T'")
        axis.set_title(key.replace("bpd_", "") + " (bits/dim)", fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def figure_quality(rows: list[dict[str, Any]]) -> Any:
    """Fréchet distance (bootstrap CI) against NFE, one panel per sampler, one curve per (T', source, prior)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    fig, axes = plt.subplots(1, len(samplers), figsize=(5.5 * len(samplers), 4), squeeze=False)
    for axis, sampler in zip(axes[0], samplers):
        for config in _configs(rows):
            chosen = sorted((r for r in rows if r["sampler"] == sampler and (r["T"], r["source"], r["prior"]) == config),
                            key=lambda r: r["nfe"])
            # a percentile interval of a biased statistic (FD) need not contain the estimate: draw
            # the interval itself, not error bars around the point
            nfe = [r["nfe"] for r in chosen]
            line, = axis.plot(nfe, [r["fd"] for r in chosen], marker="o", label=_config_name(chosen[0]))
            axis.vlines(nfe, [r["fd_low"] for r in chosen], [r["fd_high"] for r in chosen], color=line.get_color(),
                        alpha=0.6)
        axis.set_xscale("log")
        axis.set_xlabel("NFE per sample")
        axis.set_ylabel("Fréchet distance (features)")
        axis.set_title(sampler, fontsize=10)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def figure_samples(plan: Plan, rows: list[dict[str, Any]]) -> Any:
    """The same seeds' samples side by side for each (T', source, prior), first sampler at its largest NFE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from difftime.render import image_grid

    sampler = rows[0]["sampler"]
    configs = _configs(rows)
    fig, axes = plt.subplots(1, len(configs), figsize=(3.2 * len(configs), 3.6), squeeze=False)
    n = plan.spec.quality.grid
    for axis, config in zip(axes[0], configs):
        row = max((r for r in rows if r["sampler"] == sampler and (r["T"], r["source"], r["prior"]) == config),
                  key=lambda r: r["nfe"])
        samples = load_samples(plan.units[row["unit"]])[:n]
        if samples.dtype.is_floating_point:
            axis.scatter(samples[:, 0], samples[:, -1], s=6)
            axis.set_aspect("equal")
        else:
            grid = image_grid(samples, nrow=int(math.sqrt(n)), min_width=256)
            axis.imshow(grid.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", interpolation="nearest")
            axis.axis("off")
        axis.set_title(f"{_config_name(row)}\n{sampler}, NFE {row['nfe']}", fontsize=8)
    fig.suptitle(f"seeds {plan.spec.seed}..{plan.spec.seed + n - 1}, the same for every panel", fontsize=9, y=1.04)
    fig.tight_layout()
    return fig


def _pm(value: float, se: float) -> str:
    return f"{value:.3f} ± {se:.3f}" if not math.isnan(se) else f"{value:.3f}"


def _ci(row: dict[str, Any], key: str, digits: int = 2) -> str:
    return f"{row[key]:.{digits}f} [{row[key + '_low']:.{digits}f}, {row[key + '_high']:.{digits}f}]"


def report_markdown(plan: Plan, rows: list[dict[str, Any]], figures: list[str]) -> str:
    """report.md: settings, the main table, the bits/dim table, costs, findings, figures."""
    q, first = plan.spec.quality, rows[0]
    accuracy = f", test accuracy {first['extractor_test_accuracy']:.4f}" if first["extractor_test_accuracy"] is not None else ""
    lines = [f"# T study: {plan.spec.name}", "", *([plan.spec.note.strip(), ""] if plan.spec.note else []),
             f"Spec `{plan.spec_path.name}`; {len(plan.units) - 1} units. bits/dim: ELBO on the first "
             f"{first['bpd_n']} validation data (`callbacks.BitsPerDim`, n_t = {plan.spec.bpd.n_t}), ± one standard "
             f"error. Quality: Fréchet distance (FD) and precision/recall (Kynkäänniemi et al. 2019, k = {q.k}) of "
             f"{first['n_samples']} samples against the {first['n_reference']} items of the {first['reference']}, in "
             f"the features of the {first['extractor']}{accuracy}; [{q.level:.0%} percentile bootstrap interval, "
             f"{q.resamples} resamples, seed {q.seed}]. Costs on this machine: training wall time (all attempts, "
             "start-up included) and steps, sampling wall time per sample, the prior's draw time per sample.", "",
             "## Main table", "",
             "| T' | score model | prior | sampler | NFE | bpd (ELBO) | FD | precision | recall | train s (steps) | aux s (steps) | sample s/sample | prior ms/sample |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        source = "trained" if r["source"] == "trained" else f"trunc. from {r['T_train']:g}"
        aux = f"{r['aux_train_s']:.0f} ({r['aux_train_steps']})" if r["aux_train_steps"] else "-"
        lines.append(f"| {r['T']:g} | {source} | {r['prior']} | {r['sampler']} | {r['nfe']} | "
                     f"{_pm(r['bpd_elbo'], r['bpd_elbo_se'])} | {_ci(r, 'fd')} | {_ci(r, 'precision')} | "
                     f"{_ci(r, 'recall')} | {r['score_train_s']:.0f} ({r['score_train_steps']}) | {aux} | "
                     f"{r['sample_s_per_sample']:.4f} | {r['prior_ms_per_sample']:.3f} |")
    lines += ["", "## Bits/dim and its terms", "", "bpd_elbo = bpd_prior + bpd_diffusion - bpd_reconstruction.", "",
              "| T' | score model | prior | bpd_elbo | bpd_prior | bpd_diffusion | bpd_reconstruction |",
              "|---|---|---|---|---|---|---|"]
    for config in _configs(rows):
        r = next(r for r in rows if (r["T"], r["source"], r["prior"]) == config)
        source = "trained" if r["source"] == "trained" else f"trunc. from {r['T_train']:g}"
        lines.append(f"| {r['T']:g} | {source} | {r['prior']} | {_pm(r['bpd_elbo'], r['bpd_elbo_se'])} | "
                     f"{_pm(r['bpd_prior'], r['bpd_prior_se'])} | {_pm(r['bpd_diffusion'], r['bpd_diffusion_se'])} | "
                     f"{r['bpd_reconstruction']:.3f} |")
    lines += ["", "## Findings", "", findings(rows, plan.T_max), "", "## Figures", ""]
    lines += [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["fd_low"] <= b["fd_high"] and b["fd_low"] <= a["fd_high"]


def findings(rows: list[dict[str, Any]], T_max: float) -> str:
    """A short paragraph generated from the numbers; it says so where they do not support the paper."""
    out = []
    ref_rows = [r for r in rows if r["T"] == T_max and r["source"] == "trained" and r["prior"] == GAUSSIAN]
    short = [c for c in _configs(rows) if c[0] < T_max]
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        refs = [r for r in ref_rows if r["sampler"] == sampler]
        if not refs:
            continue
        ref = max(refs, key=lambda r: r["nfe"])
        for config in short:
            chosen = sorted((r for r in rows if r["sampler"] == sampler and (r["T"], r["source"], r["prior"]) == config),
                            key=lambda r: r["nfe"])
            reached = next((r for r in chosen if r["fd_low"] <= ref["fd_high"]), None)
            name = _config_name(chosen[0])
            if reached is not None:
                better = " (better: its interval lies below)" if reached["fd_high"] < ref["fd_low"] else ""
                out.append(f"With {sampler}, {name} reaches the quality of T={T_max:g} with the Gaussian prior at "
                           f"{ref['nfe']} NFE (FD {_ci(ref, 'fd')}) with {reached['nfe']} NFE (FD {_ci(reached, 'fd')}){better}.")
            else:
                best = min(chosen, key=lambda r: r["fd"])
                out.append(f"With {sampler}, {name} does not reach the quality of T={T_max:g} with the Gaussian prior at "
                           f"{ref['nfe']} NFE (FD {_ci(ref, 'fd')}) at any NFE tested (best FD {_ci(best, 'fd')} at "
                           f"{best['nfe']} NFE): these data do not support the paper's claim for it.")
    out += _bpd_findings(rows, T_max)
    out.insert(0, _verdict(rows, T_max))
    out.append("(\"Reaches\": the lower end of its FD interval is at or below the upper end of the reference's; "
               "bits/dim differences count only beyond two combined standard errors.)")
    return " ".join(out)


def _verdict(rows: list[dict[str, Any]], T_max: float) -> str:
    """Overall: does some T' < T_max with an auxiliary prior match T_max + Gaussian in bits/dim and
    quality with fewer NFE (the paper's claim, Franzese et al. 2023, Sec. 5)?"""
    refs = {r["sampler"]: r for r in sorted(rows, key=lambda r: r["nfe"])
            if r["T"] == T_max and r["source"] == "trained" and r["prior"] == GAUSSIAN}
    best_recall = max(r["recall"] for r in rows)
    if best_recall < 0.1:
        return (f"Overall, these numbers cannot test the paper's claim on sample quality: the samples cover almost "
                f"none of the reference set (recall <= {best_recall:.2f} everywhere), so every configuration is far "
                "from the data and matching the T_max reference means only being equally poor; train longer.")
    supported = []
    for r in rows:
        ref = refs.get(r["sampler"])
        if ref is None or r["T"] >= T_max or r["prior"] == GAUSSIAN:
            continue
        bpd_ok = r["bpd_elbo"] - ref["bpd_elbo"] <= 2 * math.hypot(r["bpd_elbo_se"], ref["bpd_elbo_se"])
        if bpd_ok and r["nfe"] < ref["nfe"] and r["fd_low"] <= ref["fd_high"]:
            supported.append(f"{_config_name(r)} with {r['sampler']} at {r['nfe']} NFE")
    if supported:
        return ("Overall, these numbers support the paper's claim that a shorter T with an auxiliary prior matches "
                f"T={T_max:g} with the Gaussian prior in bits/dim and sample quality at fewer NFE: "
                + "; ".join(supported[:3]) + ".")
    return ("Overall, these numbers do not support the paper's claim: no T' < " f"{T_max:g} with an auxiliary prior "
            f"matches T={T_max:g} with the Gaussian prior in both bits/dim and sample quality at fewer NFE.")


def _bpd_findings(rows: list[dict[str, Any]], T_max: float) -> list[str]:
    by_config = {c: next(r for r in rows if (r["T"], r["source"], r["prior"]) == c) for c in _configs(rows)}
    ref = by_config.get((T_max, "trained", GAUSSIAN))
    out = []
    for (T, source, prior), r in by_config.items():
        if ref is None or r is ref:
            continue
        diff = r["bpd_elbo"] - ref["bpd_elbo"]
        se = math.hypot(r["bpd_elbo_se"], ref["bpd_elbo_se"])
        verdict = ("lower" if diff < -2 * se else "higher" if diff > 2 * se else "not distinguishable (within 2 s.e.)")
        out.append(f"{_config_name(r)}: bits/dim {_pm(r['bpd_elbo'], r['bpd_elbo_se'])}, {verdict} than "
                   f"T={T_max:g} Gaussian ({_pm(ref['bpd_elbo'], ref['bpd_elbo_se'])}); prior term "
                   f"{r['bpd_prior']:.3f} vs {ref['bpd_prior']:.3f}.")
    for (T, source, prior), r in by_config.items():
        trained = by_config.get((T, "trained", prior))
        if source == "truncated" and trained is not None:
            diff = r["bpd_elbo"] - trained["bpd_elbo"]
            se = math.hypot(r["bpd_elbo_se"], trained["bpd_elbo_se"])
            verdict = "indistinguishable from" if abs(diff) <= 2 * se else ("better than" if diff < 0 else "worse than")
            out.append(f"Truncating the T={r['T_train']:g} model at T'={T:g} ({prior}) gives bits/dim "
                       f"{_pm(r['bpd_elbo'], r['bpd_elbo_se'])}, {verdict} the model trained at {T:g} "
                       f"({_pm(trained['bpd_elbo'], trained['bpd_elbo_se'])}).")
    gaps = [(r, by_config.get((T, source, GAUSSIAN))) for (T, source, prior), r in by_config.items() if prior != GAUSSIAN]
    for r, gauss in gaps:
        if gauss is not None:
            helped = r["bpd_prior"] < gauss["bpd_prior"]
            out.append(f"At T={r['T']:g} ({r['source']}) the {r['prior']} prior {'lowers' if helped else 'does not lower'} "
                       f"the prior term ({r['bpd_prior']:.3f} vs Gaussian {gauss['bpd_prior']:.3f} bits/dim)"
                       f"{'' if helped else ', contrary to the paper'}.")
    return out


def log_tensorboard(folder: Path, rows: list[dict[str, Any]], figures: dict[str, Any], text: str) -> None:
    """The report as one TensorBoard run: the markdown, the figures and FD / bits/dim scalars."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    try:
        writer.add_text("study/report", text, 0)
        for name, fig in figures.items():
            writer.add_figure(f"study/{name.removesuffix('.png')}", fig, 0, close=False)
        for r in rows:
            tag = f"T{r['T']:g}-{r['source']}-{r['prior']}"
            writer.add_scalar(f"fd/{r['sampler']}/{tag}", r["fd"], r["nfe"])
            writer.add_scalar(f"bpd_elbo/{tag}", r["bpd_elbo"], 0)
    finally:
        writer.close()


# ====================================================================== executors
def run_local(plan: Plan, stages: tuple[str, ...]) -> None:
    """Run every unit that is not done, stage by stage, one after the other."""
    for stage in stages:
        for unit in plan.stage(stage):
            if status(unit) == "done":
                continue
            print(f"study.py: running {unit.id}", file=sys.stderr, flush=True)
            run_unit(plan, unit)


def write_task_list(plan: Plan, stage: str) -> int:
    """Pin the to-do units of ``stage`` for a SLURM array (index -> unit id); returns their count."""
    todo = [u.id for u in plan.stage(stage) if status(u) != "done"]
    folder = plan.out / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stage}.units").write_text("".join(f"{u}\n" for u in todo))
    return len(todo)


def run_task(plan: Plan, stage: str, index: int) -> None:
    units = (plan.out / "slurm" / f"{stage}.units").read_text().split()
    unit = plan.units[units[index]]
    if status(unit) != "done":
        run_unit(plan, unit)


def submit_slurm(plan: Plan) -> None:
    subprocess.run(["bash", str(ROOT / "scripts" / "slurm_study.sh"), str(plan.spec_path)], check=True, cwd=ROOT)


# ====================================================================== entry point
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="study spec (YAML)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and what a run would execute")
    parser.add_argument("--executor", choices=("local", "slurm"), default="local")
    parser.add_argument("--stage", choices=STAGES + ("all",), default="all")
    parser.add_argument("--run-unit", default=None, help="run one unit by id (what a worker does)")
    parser.add_argument("--task-list", choices=STAGES, default=None, help="SLURM: pin a stage's to-do units, print their count")
    parser.add_argument("--task", nargs=2, metavar=("STAGE", "INDEX"), default=None, help="SLURM: run one array task")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Plan:
    args = parse_args(argv)
    plan = make_plan(load_spec(args.config), args.config)
    stages = STAGES if args.stage == "all" else (args.stage,)
    if args.dry_run:
        print_plan(plan, stages)
    elif args.run_unit:
        run_unit(plan, plan.units[args.run_unit])
    elif args.task_list:
        print(write_task_list(plan, args.task_list))
    elif args.task:
        run_task(plan, args.task[0], int(args.task[1]))
    elif args.executor == "slurm":
        submit_slurm(plan)
    else:
        run_local(plan, stages)
    return plan


def cli_main() -> None:
    try:
        main()
    except SpecError as error:
        print(f"study.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli_main()
