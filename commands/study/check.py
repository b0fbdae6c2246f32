"""Everything a study will use, checked before any work, with one-line errors naming the spec key.

:func:`check_spec` is cheap (no network, no Lightning): keys, ranges, files, overrides, priors, T,
NFE budgets, ``device`` and ``out``. :func:`check_fit_configs` then parses and instantiates each
fit's resolved config as ``train.py fit`` would (model, data, callbacks; no trainer, no run folder),
so a typo or a bad value in a score or aux-prior override fails at once, not when its stage runs.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
from pathlib import Path
from typing import Any

from commands.study.config import checkpoint_interval, model_config, score_sde_config
from commands.study.nfe import steps_for_nfe
from commands.study.plan import evaluated_models
from commands.study.spec import (GAUSSIAN, ModelSpec, ReferenceSpec, SamplerSpec, SpecError, StudySpec, parse_spec,
                                 spec_path)


def load_spec(path: str | Path, executor: str = "local") -> StudySpec:
    """Parse and check a study spec (relative paths: the working directory, then the shipped configs)."""
    spec = parse_spec(spec_path(path))
    check_spec(spec, executor)
    return spec


def _positive(key: str, value: float, integer: bool = True) -> None:
    if not value > 0:
        raise SpecError(key, f"= {value} is invalid: allowed {'an integer ' if integer else ''}> 0")


def _check_model(spec: ModelSpec, key: str) -> None:
    _positive(f"{key}.steps", spec.steps)
    every = checkpoint_interval(model_config(spec, key))
    if every and spec.steps % every:
        raise SpecError(f"{key}.steps", f"= {spec.steps} is not a multiple of the checkpoint interval "
                                        f"every_n_train_steps = {every}: the final step would have no checkpoint")


def check_spec(spec: StudySpec, executor: str = "local") -> None:
    """Everything that would otherwise fail hours in: keys, ranges, files, priors, T, NFE, device, out."""
    _check_model(spec.score, "score")
    for name, aux in spec.aux_priors.items():
        if name == GAUSSIAN:
            raise SpecError(f"aux_priors.{name}", "'gaussian' is the SDE's own prior, not an auxiliary one")
        _check_model(aux, f"aux_priors.{name}")
    _check_priors(spec)
    sde = score_sde_config(spec)
    _check_T(spec, float((sde.get("init_args") or {}).get("eps", 1e-5)))
    for key in ("bpd.max_samples", "bpd.n_t", "quality.n_samples", "quality.resamples", "sample_batch_size"):
        section, _, name = key.rpartition(".")
        _positive(key, getattr(getattr(spec, section) if section else spec, name))
    if not 0 < spec.quality.level < 1:
        raise SpecError("quality.level", f"= {spec.quality.level} is invalid: allowed 0 < level < 1")
    if not 2 <= spec.quality.resamples <= spec.quality.n_samples:
        raise SpecError("quality.resamples", f"= {spec.quality.resamples} is invalid: allowed 2 <= resamples <= "
                                             f"n_samples = {spec.quality.n_samples} (jackknife groups per set)")
    if not 1 <= spec.quality.k < spec.quality.n_samples:
        raise SpecError("quality.k", f"= {spec.quality.k} is invalid: allowed 1 <= k < n_samples")
    _check_samplers(spec, sde)
    check_device(spec.device, executor)
    check_out(spec.out)


def _check_priors(spec: StudySpec) -> None:
    if not spec.priors:
        raise SpecError("priors", "at least one prior")
    for i, name in enumerate(spec.priors):
        if name != GAUSSIAN and name not in spec.aux_priors:
            raise SpecError(f"priors[{i}]", f"unknown prior {name!r} (known: gaussian, "
                                            f"{', '.join(spec.aux_priors) or 'no aux_priors defined'})")


def _check_T(spec: StudySpec, eps: float) -> None:
    if not spec.trained_T:
        raise SpecError("T", "no T is trained (mode trained or both)")
    if spec.T_top not in spec.trained_T:
        raise SpecError("T_max", f"= {spec.T_top} has no trained entry in T")
    for i, entry in enumerate(spec.T):
        if not eps < entry.T <= 1.0:
            raise SpecError(f"T[{i}].T", f"= {entry.T} is invalid: allowed eps < T <= 1 (eps = {eps:g})")
        if entry.mode in ("truncated", "both") and not entry.T < spec.T_top:
            raise SpecError(f"T[{i}].T", f"= {entry.T} is truncated from T_max = {spec.T_top}: allowed T' < T_max")


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
        _check_sampler_options(i, sampler)
        for j, budget in enumerate(sampler.nfe):
            _positive(f"samplers[{i}].nfe[{j}]", budget)
            steps_for_nfe(sampler.name, budget, sde_config, f"samplers[{i}].nfe[{j}]", sampler.options)
    _check_sampler_labels(spec)
    if spec.reference is not None:
        _check_reference(spec.reference, sde_config)
    _check_models(spec)


def _check_models(spec: StudySpec) -> None:
    """Each ``models`` label names a model the study evaluates; a list, if given, is not empty."""
    known = evaluated_models(spec)
    entries = [(f"samplers[{i}]", s.models) for i, s in enumerate(spec.samplers)]
    entries += [("reference", spec.reference.models)] if spec.reference is not None else []
    for key, models in entries:
        if models is None:
            continue
        if not models:
            raise SpecError(f"{key}.models", "an empty list runs nothing: leave the key out to run every model")
        for j, label in enumerate(models):
            if label not in known:
                raise SpecError(f"{key}.models[{j}]", f"{label!r} is not an evaluated model (these are: {', '.join(known)})")


def _check_reference(ref: ReferenceSpec, sde_config: dict[str, Any]) -> None:
    """A known sampler; adaptive_ode without an NFE budget, any other with one; its options as a sampler's."""
    from difftime.samplers import SAMPLERS

    if ref.name not in SAMPLERS:
        raise SpecError("reference.name", f"unknown sampler {ref.name!r} (known: {', '.join(sorted(SAMPLERS))})")
    if ref.name == "adaptive_ode" and ref.nfe is not None:
        raise SpecError("reference.nfe", "adaptive_ode chooses its own steps: leave nfe out")
    if ref.name != "adaptive_ode":
        if ref.nfe is None:
            raise SpecError("reference.nfe", f"required for {ref.name} (a converged budget, e.g. 256)")
        _positive("reference.nfe", ref.nfe)
        steps_for_nfe(ref.name, ref.nfe, sde_config, "reference.nfe", ref.options)
    _check_sampler_options("reference", SamplerSpec(ref.name, [], ref.options))


def _check_sampler_options(i: int | str, sampler: SamplerSpec) -> None:
    """``options`` are keywords of the sampler's constructor with values it accepts (its own checks,
    one option at a time so the error names the key); ``steps`` comes from the NFE budget."""
    import inspect

    from difftime.samplers import SAMPLERS

    cls = SAMPLERS[sampler.name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "steps")]
    for key, value in sampler.options.items():
        where = f"{_entry(i)}.options.{key}"
        if key == "steps":
            raise SpecError(where, "is set by the NFE budgets (samplers[].nfe)")
        if key not in allowed:
            raise SpecError(where, f"unknown option of {sampler.name} (allowed: {', '.join(allowed)})")
        try:
            cls(**{key: value})
        except (TypeError, ValueError) as error:
            raise SpecError(where, f"= {value!r} is invalid: {error}") from None
    if sampler.options:
        try:
            cls(**sampler.options)
        except (TypeError, ValueError) as error:
            raise SpecError(f"{_entry(i)}.options", f"invalid together: {error}") from None


def _entry(i: int | str) -> str:
    """The spec key of a sampler entry: ``samplers[i]``, or ``reference``."""
    return f"samplers[{i}]" if isinstance(i, int) else i


def _check_sampler_labels(spec: StudySpec) -> None:
    """Each entry's name in unit labels and the report (``label``, else ``name``) is a plain file-name
    word, unique unless the entries differ only in NFE budgets on disjoint models."""
    seen: dict[str, int] = {}
    for i, sampler in enumerate(spec.samplers):
        if sampler.label is not None and not re.fullmatch(r"[A-Za-z0-9_.]+", sampler.label):
            raise SpecError(f"samplers[{i}].label",
                            f"= {sampler.label!r} is invalid: allowed letters, digits, '_', '.'")
        if sampler.tag.startswith("reference_"):
            raise SpecError(f"samplers[{i}].label", f"= {sampler.tag!r} is invalid: 'reference_' names the "
                            "converged reference units")
        if sampler.tag in seen and not _split_by_models(spec.samplers[seen[sampler.tag]], sampler):
            raise SpecError(f"samplers[{i}].label", f"{sampler.tag!r} also names samplers[{seen[sampler.tag]}]: give "
                            "each entry of the same sampler its own label (or disjoint models)")
        seen[sampler.tag] = i


def _split_by_models(a: SamplerSpec, b: SamplerSpec) -> bool:
    """Two entries of one sampler with the same options on disjoint models (e.g. a full NFE sweep on
    some models, one budget on others): they may share a name, no unit is named twice."""
    return (a.name == b.name and a.options == b.options and a.models is not None and b.models is not None
            and not set(a.models) & set(b.models))


def check_device(device: str, executor: str = "local") -> None:
    """``device`` names a torch device; run here (``local``), it must also exist on this machine."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise SpecError("device", f"{device!r} is not a device (allowed: cpu, cuda, cuda:N)") from None
    if parsed.type not in ("cpu", "cuda"):
        raise SpecError("device", f"{device!r} is not supported (allowed: cpu, cuda, cuda:N)")
    if executor != "local" or parsed.type == "cpu":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise SpecError("device", f"= {device!r} but this machine has no CUDA device (use cpu, or --executor slurm)")
    if parsed.index is not None and parsed.index >= count:
        raise SpecError("device", f"= {device!r} but this machine has {count} CUDA device(s): allowed cuda:0..{count - 1}")


def check_out(out: str) -> None:
    """``out`` is a folder (or can become one) that this user can write to."""
    path = Path(os.path.abspath(out))
    if path.exists() and not path.is_dir():
        raise SpecError("out", f"= {out}: {path} exists and is not a folder")
    parent = next(p for p in (path, *path.parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SpecError("out", f"= {out}: folder {parent} is not writable")


# ---------------------------------------------------------------------- the fits' configs, as train.py reads them
def check_fit_configs(plan: Any) -> None:
    """Parse and instantiate one resolved config per fit model (the score model, each aux prior) as
    ``train.py fit`` would, without a trainer or a run folder; an error names the spec key."""
    seen: set[str] = set()
    for unit in [*plan.stage("train"), *plan.stage("aux")]:
        if unit.run_config is None:
            continue
        model = "score" if unit.kind == "score" else f"aux_priors.{unit.label.rsplit('-T', 1)[0]}"
        if model in seen:
            continue
        seen.add(model)
        spec_model = plan.spec.score if unit.kind == "score" else plan.spec.aux_priors[model.split(".", 1)[1]]
        problem = _cli_problem(copy.deepcopy(unit.run_config))  # the parser edits what it is given
        if problem is not None:
            problem = _concise(problem)
            raise SpecError(_blame(problem, model, spec_model), problem)


def _cli_problem(config: dict[str, Any]) -> str | None:
    """The one-line reason the CLI refuses ``config``, or None (model, data and callbacks are built)."""
    import random

    import numpy as np
    import torch

    from commands.cli import DifftimeCLI

    class _Check(DifftimeCLI):
        def _parse_ckpt_path(self) -> None:  # no checkpoint, no run folder
            pass

        def instantiate_trainer(self, **kwargs: Any) -> None:  # devices of another machine are no error here
            return None

    stderr = io.StringIO()
    states = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]), contextlib.redirect_stderr(stderr), \
                contextlib.redirect_stdout(io.StringIO()):
            _Check(args=config, run=False, parser_kwargs={"exit_on_error": False}, auto_configure_optimizers=False,
                   save_config_callback=None)
    except SystemExit:
        lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
        return re.sub(r"^\S+: error: ", "", lines[-1]) if lines else "refused by the command line"
    except Exception as error:  # noqa: BLE001 -- any refusal becomes the one-line spec error
        return " ".join(str(error).split()) or type(error).__name__
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
    return None


def _concise(problem: str) -> str:
    """jsonargparse's union dump in one short line: the parser key, the first alternative's reason, the value."""
    problem = " ".join(problem.split())
    if "Errors: - " not in problem:
        return problem
    head = problem.split(": Does not validate", 1)[0]
    errors, _, given = problem.split("Errors: - ", 1)[1].partition(" Given value type:")
    reasons = [e.strip() for e in errors.split(" - ") if "NoneType" not in e] or [errors.strip()]
    value = given.partition("Given value: ")[2].strip()
    return f"{head}: {reasons[0]}" + (f" (given: {value})" if value and len(value) <= 60 else "")


def _blame(problem: str, key: str, model: ModelSpec) -> str:
    """The spec key behind a refused config: the override the message names, else the config files."""
    quoted = set(re.findall(r"['\"]([\w.]+)['\"]", problem)) | set(re.findall(r"[A-Za-z_]\w*(?:\.\w+)+", problem))
    overrides = sorted(model.overrides, key=len, reverse=True)
    for dotted in overrides:
        if any(q == dotted or q.endswith("." + dotted) or dotted.endswith("." + q) and "." in q for q in quoted):
            return f"{key}.overrides.{dotted}"
    for dotted in overrides:
        if dotted.rsplit(".", 1)[-1] in quoted:
            return f"{key}.overrides.{dotted}"
    return f"{key}.config"
