"""The typed study spec: dataclasses, parsing with one-line errors that name the spec key.

A spec is YAML (``configs/study/*.yaml``); :func:`load_spec` reads it into :class:`StudySpec`
and :func:`commands.study.check.check_spec` checks it before any work.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

GAUSSIAN = "gaussian"  # the SDE's own prior, not an auxiliary one


class SpecError(ValueError):
    """A bad study spec, reported as one line naming the key, before any work."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"spec key '{key}': {message}")
        self.key = key


class SpecFileError(SpecError):
    """A spec (or a config it names) that cannot be read: the message names the file."""

    def __init__(self, path: str | Path, message: str, key: str = "") -> None:
        ValueError.__init__(self, f"{f'spec key {key!r}: ' if key else ''}file {path}: {message}")
        self.key = key


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
    """A sampler of :data:`difftime.samplers.SAMPLERS` with its NFE budgets per sample.

    ``options``: keyword arguments of the sampler's constructor (e.g. ``threshold: dynamic,
    percentile: 0.995``; ``steps`` comes from the budget). ``label``: the sampler's name in unit
    labels and the report (default: ``name``), so one sampler with two option sets can sit side by
    side. Both enter a unit's params only when set: entries without them keep their unit ids.
    ``models``: the evaluated models it runs on, by label (``T1-trained-gaussian``,
    ``T0.4-trunc1-glow``: T', where the score model comes from, prior); default every one.
    """

    name: str
    nfe: list[int]
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    models: list[str] | None = None

    @property
    def tag(self) -> str:
        """The name of this entry in unit labels and the report."""
        return self.label or self.name


@dataclass
class ReferenceSpec:
    """The converged sampler of each evaluated model (T', prior): an adaptive ODE solver (no NFE
    budget) or a fixed-step sampler at a large budget (``nfe``, e.g. 256). The T = T_max Gaussian-prior
    model's reference is the baseline of the report's ``nfe_to_baseline``."""

    name: str
    nfe: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    models: list[str] | None = None  # as a sampler's: the evaluated models it runs on (default every one)


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
    """Sample-quality metrics of :func:`difftime.quality.quality_row`: Fréchet distance (jackknife
    bias-corrected), KID, precision and recall, each with an interval of measured coverage."""

    extractor: Literal["digit_classifier", "identity"] = "digit_classifier"
    n_samples: int = 500
    reference: Literal["test", "val"] = "test"
    k: int = 3
    resamples: int = 200  # replicates per feature set: jackknife groups (FD, KID) and random halves (precision, recall)
    level: float = 0.95
    seed: int = 0
    classifier_epochs: int = 4
    grid: int = 16  # samples per image grid of the side-by-side figure


@dataclass
class CostSpec:
    """Fallback rates of the ``--dry-run`` estimates (seconds), used only for what this machine has
    not measured yet: once units of a kind have run, their own records (``attempts.jsonl`` of fit
    units, ``result.json`` of evaluations) give the rate (:mod:`commands.study.estimates`)."""

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
    reference: ReferenceSpec | None = None
    T_max: float | None = None
    bpd: BpdSpec = field(default_factory=BpdSpec)
    quality: QualitySpec = field(default_factory=QualitySpec)
    cost: CostSpec = field(default_factory=CostSpec)
    seed: int = 0
    sample_batch_size: int = 250
    device: str = "cpu"
    inception_weights: str | None = None  # FID with Inception where weights exist (GPU clusters)
    note: str | None = None  # printed at the top of report.md (e.g. how this run differs from the shipped spec)

    @property
    def trained_T(self) -> list[float]:
        """The T of the score models that are trained, sorted."""
        return sorted({e.T for e in self.T if e.mode in ("trained", "both")})

    @property
    def T_top(self) -> float:
        """T_max: the spec's, else the largest trained T (the model truncated entries come from)."""
        return self.T_max if self.T_max is not None else max(self.trained_T)


def _convert(tp: Any, value: Any, key: str) -> Any:
    """``value`` as type ``tp`` (dataclasses, list, dict, Literal, Optional, scalars) or SpecError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
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
    return _scalar(tp, value, key)


def _scalar(tp: Any, value: Any, key: str) -> Any:
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


def read_yaml(path: Path, key: str = "") -> Any:
    """A YAML file's content; a missing file or a syntax error is a SpecFileError naming it (and ``key``)."""
    try:
        text = path.read_text()
    except OSError as error:
        raise SpecFileError(path, error.strerror or str(error), key) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SpecFileError(path, f"YAML syntax error{where}: {problem}", key) from None


def spec_path(name: str | Path) -> Path:
    """A spec named on the command line: a file relative to the working directory, else the
    installed copy of a shipped spec (``configs/study/toy_tiny.yaml``), said on stderr."""
    import sys

    path = Path(name)
    if path.exists():
        return path
    from commands.config_files import shipped

    found = shipped(name)
    if found is None:
        raise SpecFileError(path, "no such file (nor a shipped spec of that name)")
    print(f"study.py: --config {name}: using the shipped spec {found}", file=sys.stderr)
    return found


def parse_spec(path: Path) -> StudySpec:
    """The typed spec of a YAML file (types and keys only; :func:`check_spec` checks the values)."""
    return _from_dict(StudySpec, read_yaml(path) or {}, "")
