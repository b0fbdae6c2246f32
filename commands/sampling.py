"""Generate samples from a trained ScoreModule: a PNG grid and an ``.npz`` array (``sample.py``).

    python sample.py --config runs/quickstart/default/config.yaml \\
        --ckpt_path runs/quickstart/default/checkpoints/last.ckpt \\
        --n 64 --sampler euler_maruyama --steps 100 --out samples/quickstart

or, from Python, ``sample(SampleOptions(config=..., n=64, out=...))`` (no command line round trip).
The run is rebuilt by :func:`commands.runs.load_run` from the ``config.yaml`` that LightningCLI
saved with it and a verified weights-only load of the checkpoint (the EMA weights). ``--prior``
chooses the distribution at T: ``gaussian`` (the SDE's prior) or the path of an AuxPriorModule
checkpoint (Franzese et al. 2023, Sec. 3); by default the run's own prior.

Sample i draws all its noise (prior draw and sampler noise) from a CPU generator seeded
``seed + i`` (:class:`difftime.randomness.PerSampleNoise`), so the same seed gives the same samples
whatever ``--batch_size`` or device, up to floating-point rounding of the network. The adaptive
ODE solver is the exception: its step sizes are chosen for a whole batch.

``--fit_grid`` replaces the sampler's time grid by one fitted to this model's own trajectories
(:func:`difftime.grid_fit.grid_costs`, on ``--fit_pilot`` prior draws whose seeds the samples
never use) for the sampler's step count and, for a deterministic sampler, tuned to it
(:func:`difftime.grid_fit.refine_grid`, ``--fit_sweeps``). The grid is printed with every candidate
grid's RMS distance to the converged flow on the pilot, and written to ``--out/grid.yaml`` as a
``schedule:`` entry that a config can carry, so later runs reuse it without fitting again.

Outputs in ``--out``: ``samples.npz`` (key ``samples``: ``uint8 [N, C, H, W]`` for images,
``float32 [N, *D]`` model-space values for vector data), ``samples.png`` (an image grid, or a
scatter plot of the first two coordinates of vector data), ``info.json`` and, with ``--fit_grid``,
``grid.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from commands.runs import RunError, build, load_weights, run_config
from difftime.priors import describe_prior
from difftime.randomness import PerSampleNoise, generate_indexed
from difftime.render import render
from difftime.samplers import SAMPLERS, Sampler

PROG = "sample.py"
OUTPUTS = ("samples.npz", "samples.png", "info.json", "grid.yaml")


class SampleError(RunError):
    """A problem with the user's input: reported as one line, exit status 2."""


@dataclass
class SampleOptions:
    """What ``sample.py`` is asked to do; each field is the command-line option of the same name."""

    config: str
    ckpt_path: str | None = None  # default: <config dir>/checkpoints/last.ckpt
    prior: str | None = None  # "gaussian" or an AuxPriorModule checkpoint; default: the run's prior
    eval_T: float | None = None  # post-hoc truncation T' (eps < T' <= the run's T)
    sampler: str | None = None  # a name of difftime.samplers.SAMPLERS; default: the config's
    steps: int | None = None
    fit_grid: bool = False
    fit_pilot: int = 64
    fit_candidates: int = 120
    fit_sweeps: int = 2
    n: int = 64
    batch_size: int = 64
    seed: int = 0
    nrow: int | None = None
    out: str = "samples"
    device: str = "cpu"
    sampler_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # constructor options of ``sampler``
    progress: bool = False  # a bar on stderr (the command line's default; --quiet turns it off)

    def check(self) -> None:
        """Raise :class:`SampleError` naming the option of the first value out of range."""
        for key in ("n", "batch_size", "steps", "fit_pilot", "fit_candidates"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise SampleError(f"--{key} must be >= 1, got {value}")
        if self.fit_sweeps < 0:
            raise SampleError(f"--fit_sweeps must be >= 0, got {self.fit_sweeps}")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise SampleError(f"--sampler {self.sampler!r} is not one of {', '.join(sorted(SAMPLERS))}")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise SampleError(f"--device {self.device!r} is not a device (e.g. cpu, cuda, cuda:1)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SampleError(f"--device {self.device}: no CUDA device is available here (use --device cpu)")

    @property
    def checkpoint(self) -> Path:
        return Path(self.ckpt_path) if self.ckpt_path else Path(self.config).parent / "checkpoints" / "last.ckpt"


class _Parser(argparse.ArgumentParser):
    """Errors as one line (``sample.py: error: ...``), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{PROG}: error: {message} (see {PROG} --help)", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: list[str] | None = None) -> SampleOptions:
    """The command line as :class:`SampleOptions` (checked)."""
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--config", required=True, help="config.yaml saved with the run")
    parser.add_argument("--ckpt_path", default=None,
                        help="ScoreModule checkpoint (default: <config dir>/checkpoints/last.ckpt)")
    parser.add_argument("--prior", default=None,
                        help="'gaussian' or an AuxPriorModule checkpoint (default: the run's prior)")
    parser.add_argument("--eval_T", type=float, default=None,
                        help="post-hoc truncation: start the reverse process at T' (eps < T' <= the run's T) "
                             "instead of T; the prior must then be Gaussian or trained at exactly T'")
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default=None, help="default: the sampler of the config")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the sampler's own)")
    parser.add_argument("--fit_grid", action="store_true",
                        help="fit the sampler's time grid to this model first (difftime.grid_fit; a fixed-step "
                             "sampler); the grid is written to OUT/grid.yaml")
    parser.add_argument("--fit_pilot", type=int, default=64, help="pilot samples for --fit_grid")
    parser.add_argument("--fit_candidates", type=int, default=120,
                        help="candidate LogSNR times for --fit_grid (the DP fit costs 5 x this many NFE on the "
                             "pilot; the tuning adds about 2 x (1 + 5 sweeps (steps - 1)) x steps)")
    parser.add_argument("--fit_sweeps", type=int, default=2,
                        help="--fit_grid: coordinate-descent sweeps that tune the grid to the sampler (0: none)")
    parser.add_argument("--n", type=int, default=64, help="number of samples")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    parser.add_argument("--nrow", type=int, default=None, help="grid width (default: sqrt(n))")
    parser.add_argument("--out", default="samples", help="output folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress on stderr (by default: a bar on a terminal, a plain line every 30 s "
                             "or 10 %% in a log file)")
    args = vars(parser.parse_args(argv))
    options = SampleOptions(**{k: v for k, v in args.items() if k != "quiet"}, progress=not args["quiet"])
    try:
        options.check()
    except SampleError as error:
        parser.error(str(error))
    return options


def check_out(out: Path) -> None:
    """Fail before any sampling unless ``out`` can take new outputs without overwriting any."""
    if out.exists() and not out.is_dir():
        raise SampleError(f"--out {out} exists and is not a folder")
    taken = [name for name in OUTPUTS if (out / name).exists()]
    if taken:
        raise SampleError(f"--out {out} already holds {', '.join(taken)}: choose a new folder (outputs are never overwritten)")
    parent = next(p for p in (out, *out.parents) if p.exists())
    if not os.access(parent, os.W_OK):
        raise SampleError(f"--out {out}: folder {parent} is not writable")


def real_images(datamodule: Any, n: int, split: str = "test") -> Tensor:
    """The first ``n`` raw items (uint8 images) of a datamodule's ``split`` ("train", "val" or "test")."""
    datamodule.setup("test" if split == "test" else "fit")
    dataset = getattr(datamodule, f"{split}_set")
    return torch.stack([torch.as_tensor(dataset[i]) for i in range(min(n, len(dataset)))])


# ---------------------------------------------------------------------- time grids
def choose_sampler(model: nn.Module, name: str | None, options: dict[str, Any] | None = None) -> Sampler:
    """The run's own sampler, or ``SAMPLERS[name]`` built with ``options`` (e.g. ``threshold``)."""
    if name is None:
        if options:
            raise SampleError(f"sampler options {sorted(options)} need a sampler name to build")
        return model.sampler
    return SAMPLERS[name](**(options or {}))


def fitted_sampler(model: nn.Module, sampler: Sampler, steps: int | None, pilot: int, candidates: int,
                   seed: int, sweeps: int = 2) -> tuple[Sampler, dict[str, Any]]:
    """A copy of ``sampler`` on a time grid fitted to ``model`` (:mod:`difftime.grid_fit`): the DP
    grid, then (deterministic samplers, ``sweeps`` > 0) tuned to the sampler against the teacher's
    end points, from both the DP grid and the sampler's own. The pilot batch is drawn from the
    model's prior with seeds of their own stream."""
    from difftime.grid_fit import grid_costs, refine_grid
    from difftime.randomness import Stream, step_seed

    steps = sampler.steps if steps is None else steps
    if getattr(sampler, "schedule", None) is None or steps is None:
        raise SampleError(f"--fit_grid needs a fixed-step sampler with a schedule; {sampler.name} has none")
    if steps > candidates:
        raise SampleError(f"--fit_grid: {steps} steps need at least as many --fit_candidates (got {candidates})")
    start = time.perf_counter()
    on = lambda schedule: type(sampler)(**{**vars(sampler), "steps": steps, "schedule": schedule})  # noqa: E731
    score_fn = model.score_fn()
    with torch.no_grad():
        x_T = model.prior.sample(pilot, torch.Generator().manual_seed(step_seed(seed, Stream.GRID_PILOT)))
        costs = grid_costs(score_fn, model.eval_sde, x_T.to(model.device), candidates, substeps=4)
        grid, rms, origin, refine_nfe = costs.schedule(steps), None, "dp", 0
        if sampler.deterministic:
            refined = refine_grid(costs, on, score_fn, model.eval_sde,
                                  {"dp": grid, "configured": sampler.schedule}, steps, sweeps=sweeps)
            grid, origin, refine_nfe = refined.schedule, refined.start, refined.nfe
            rms = {**refined.starts, "fitted": refined.distance}
    record = {"log_nsr": grid.log_nsr, "pilot": pilot, "candidates": candidates, "fit_nfe": costs.nfe + refine_nfe,
              "sweeps": sweeps if sampler.deterministic else 0, "start": origin,
              "fit_wall_time_s": time.perf_counter() - start, "pilot_rms_to_ode": rms,
              "configured_schedule": repr(sampler.schedule)}
    return on(grid), record


def grid_verdict(record: dict[str, Any]) -> str:
    """One line: how far the sampler lands from the converged ODE on the pilot batch, per grid."""
    rms = record["pilot_rms_to_ode"]
    if rms is None:
        return ("the sampler is stochastic: the grid is the DP grid of the probability flow's trajectories, "
                "not tuned to the sampler (its distance to the flow would measure its noise)")
    return (f"on the pilot batch the sampler lands {rms['fitted']:.4g} (RMS) from the converged probability flow "
            f"on the fitted grid (tuned from the {record['start']} grid, {record['sweeps']} sweeps), "
            f"{rms['dp']:.4g} on the DP grid and {rms['configured']:.4g} on its own {record['configured_schedule']} grid")


def write_grid(out: Path, record: dict[str, Any]) -> Path:
    """``grid.yaml``: the fitted grid as a ``schedule:`` entry (class_path / init_args) of a sampler config."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "grid.yaml"
    entry = {"schedule": {"class_path": "difftime.schedules.Tabulated", "init_args": {"log_nsr": record["log_nsr"]}}}
    path.write_text(f"# fitted by sample.py --fit_grid: {record['pilot']} pilot samples, {record['candidates']} "
                    f"candidates, {record['sweeps']} sweeps, {record['fit_nfe']} NFE\n"
                    + yaml.safe_dump(entry, default_flow_style=None))
    return path


# ---------------------------------------------------------------------- generation
def generate(model: nn.Module, sampler: Sampler, n: int, batch_size: int, seed: int,
             steps: int | None, progress: bool = False) -> tuple[Tensor, list[dict]]:
    """n samples, sample i from CPU generators seeded ``seed + i``; the infos of every batch.

    ``progress``: one bar on stderr over every sampler step of every batch (a long run at 1,000
    steps was otherwise silent for minutes).
    """
    from callbacks.support.progress import SamplingProgress, planned_steps, progress_bar

    per_batch = planned_steps(sampler, steps)
    total = per_batch * -(-n // batch_size) if per_batch else None
    bar = progress_bar(PROG, total, "step", enabled=progress, stream=sys.stderr)
    with SamplingProgress(bar, n) as tracker:
        def sample_fn(k: int, generator: PerSampleNoise) -> tuple[Tensor, dict]:
            samples, info = model.sample(k, generator=generator, sampler=sampler, steps=steps, callback=tracker.step)
            return samples.float().cpu(), info

        chunks, infos = generate_indexed(sample_fn, range(n), seed, batch_size, progress=tracker.batch)
    return torch.cat(chunks), infos


def write_outputs(samples: Tensor, scaling: Any, out: Path, nrow: int | None, caption: str) -> dict[str, str]:
    """``samples.npz`` (the output form: uint8 images or fp32 vectors) and ``samples.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"npz": str(out / "samples.npz"), "png": str(out / "samples.png")}
    outputs = scaling.to_output(samples)
    np.savez_compressed(paths["npz"], samples=outputs.numpy())
    rendered = render(outputs, nrow, caption)
    rendered.save(paths["png"])
    rendered.close()
    return paths


# ---------------------------------------------------------------------- the command
def _load(options: SampleOptions) -> tuple[nn.Module, Any]:
    """The trained model on ``options.device`` and its datamodule (the config checked against the checkpoint)."""
    model, datamodule = build(options.config, options.prior, options.eval_T)
    load_weights(model, options.checkpoint, run_config(options.config)["model"], f"in {options.config}")
    return model.to(options.device).eval(), datamodule


def _fit_grid(model: nn.Module, sampler: Sampler, options: SampleOptions, out: Path) -> tuple[Sampler, dict]:
    sampler, grid = fitted_sampler(model, sampler, options.steps, options.fit_pilot, options.fit_candidates,
                                   options.seed, options.fit_sweeps)
    grid["path"] = str(write_grid(out, grid))
    print(f"{PROG}: fitted a {len(grid['log_nsr']) - 1}-step time grid in {grid['fit_wall_time_s']:.1f} s "
          f"({grid['fit_nfe']} NFE on {grid['pilot']} pilot samples): log_nsr "
          f"[{', '.join(f'{v:.3f}' for v in grid['log_nsr'])}]; wrote {grid['path']}")
    print(f"{PROG}: {grid_verdict(grid)}")
    return sampler, grid


def sample(options: SampleOptions) -> dict[str, Any]:
    """Generate ``options.n`` samples and write them to ``options.out`` (optionally on a fitted
    grid); returns the record written to ``info.json``."""
    options.check()
    out = Path(options.out)
    check_out(out)
    model, datamodule = _load(options)
    sampler, prior_name, grid = choose_sampler(model, options.sampler, options.sampler_options), describe_prior(model.prior), None
    if options.fit_grid:
        sampler, grid = _fit_grid(model, sampler, options, out)
    start = time.perf_counter()
    samples, infos = generate(model, sampler, options.n, options.batch_size, options.seed, options.steps,
                              progress=options.progress)
    wall = time.perf_counter() - start
    nfe = [int(info["nfe"]) for info in infos]
    caption = f"{options.n} samples | {infos[0]['sampler']} | NFE {max(nfe)} | prior {prior_name} | T {model.eval_sde.T:g}"
    paths = write_outputs(samples, datamodule.scaling, out, options.nrow, caption)
    summary = {"n": options.n, "seed": options.seed, "sampler": infos[0]["sampler"], "steps": infos[0]["steps"],
               "nfe": max(nfe), "nfe_total": sum(nfe), "wall_time_s": wall, "prior": prior_name,
               "T": model.eval_sde.T, "T_trained": model.sde.T, "eps": model.sde.eps,
               "checkpoint": str(options.checkpoint), **paths, **({"fitted_grid": grid} if grid else {})}
    with open(out / "info.json", "w") as handle:
        json.dump(summary, handle, indent=2)
    per_batch = f"{min(nfe)}-{max(nfe)}" if min(nfe) != max(nfe) else str(nfe[0])
    print(f"{PROG}: {options.n} samples in {wall:.1f} s | sampler {summary['sampler']} "
          f"(steps {summary['steps']}) | NFE {per_batch} per batch | prior {prior_name} | "
          f"T {model.eval_sde.T:g} | wrote {paths['png']} and {paths['npz']}")
    return summary


def main(argv: list[str] | None = None, progress: bool = False) -> dict[str, Any]:
    """Sample as the command line does (``argv`` without the program name); ``progress``: the bar
    on stderr unless ``--quiet`` (Python callers ask for it)."""
    options = parse_args(argv)
    return sample(dataclasses.replace(options, progress=progress and options.progress))


def cli_main() -> None:
    """``python sample.py ...`` and the ``difftime-sample`` console entry point.

    Errors in what the user gave (config, checkpoint, prior, output folder) are one line on
    stderr and exit status 2, not a traceback.
    """
    from commands.cli import CliFailed
    from commands.config_files import resolve_config_args
    from difftime.checkpoints import CorruptCheckpointError

    try:
        main(resolve_config_args(sys.argv[1:]), progress=True)
    except (RunError, CliFailed, CorruptCheckpointError, FileNotFoundError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
