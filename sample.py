"""Generate samples from a trained ScoreModule: a PNG grid and an ``.npz`` array.

    python sample.py --config runs/quickstart/default/config.yaml \\
        --ckpt_path runs/quickstart/default/checkpoints/last.ckpt \\
        --n 64 --sampler euler_maruyama --steps 100 --out samples/quickstart

The model and datamodule are rebuilt from the ``config.yaml`` that LightningCLI saved with the
run; the weights come from a verified weights-only load of ``--ckpt_path`` (the EMA weights are
used). ``--prior`` chooses the distribution at T: ``gaussian`` (the SDE's prior) or the path of
an AuxPriorModule checkpoint (Franzese et al. 2023, Sec. 3); by default the run's own prior.

Sample i draws all its noise (prior draw and sampler noise) from a CPU generator seeded
``seed + i`` (:class:`difftime.utils.PerSampleNoise`), so the same seed gives the same samples
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
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from difftime.priors import describe_prior
from difftime.render import render
from difftime.samplers import SAMPLERS, Sampler
from difftime.utils import PerSampleNoise, generate_indexed

_CONFIG_KEYS = ("seed_everything", "model", "data")  # the run's trainer, ckpt_path etc. are not needed
_AUX = "difftime.aux_priors.AuxPriorCheckpoint"


class SampleError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="config.yaml saved with the run")
    parser.add_argument("--ckpt_path", default=None,
                        help="ScoreModule checkpoint (default: <config dir>/checkpoints/last.ckpt)")
    parser.add_argument("--prior", default=None,
                        help="'gaussian' or an AuxPriorModule checkpoint (default: the run's prior)")
    parser.add_argument("--eval_T", type=float, default=None,
                        help="post-hoc truncation: start the reverse process at T' (eps < T' <= the run's T) "
                             "instead of T; the prior must then be Gaussian or trained at exactly T'")
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default=None,
                        help="default: the sampler of the config")
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
    args = parser.parse_args(argv)
    for key in ("n", "batch_size", "steps", "fit_pilot", "fit_candidates"):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(f"--{key} must be >= 1, got {value}")
    if args.fit_sweeps < 0:
        parser.error(f"--fit_sweeps must be >= 0, got {args.fit_sweeps}")
    return args


def check_out(out: Path) -> None:
    """Fail before any sampling unless ``out`` can take new outputs without overwriting any."""
    if out.exists() and not out.is_dir():
        raise SampleError(f"--out {out} exists and is not a folder")
    taken = [name for name in ("samples.npz", "samples.png", "info.json", "grid.yaml") if (out / name).exists()]
    if taken:
        raise SampleError(f"--out {out} already holds {', '.join(taken)}: choose a new folder (outputs are never overwritten)")
    parent = next(p for p in (out, *out.parents) if p.exists())
    if not os.access(parent, os.W_OK):
        raise SampleError(f"--out {out}: folder {parent} is not writable")


# ---------------------------------------------------------------------- model
def run_config(path: str | Path, prior: str | None = None, eval_T: float | None = None) -> dict[str, Any]:
    """The model/data part of a saved run config, with a bare CPU trainer.

    ``prior`` replaces the run's prior: ``"gaussian"`` (the SDE's own) or the path of an
    AuxPriorModule checkpoint; None keeps the run's. ``eval_T`` sets the post-hoc truncation T'.
    The score model checks both (eps < T' <= T; the prior's SDE, T' and shape).
    """
    try:
        with open(path) as handle:
            saved = yaml.safe_load(handle)
    except OSError as error:
        raise SampleError(f"--config {path}: {error.strerror}") from None
    model = (saved or {}).get("model") or {}
    if not str(model.get("class_path", "")).endswith("ScoreModule"):
        raise SampleError(f"{path} does not configure a ScoreModule (model.class_path = {model.get('class_path')!r})")
    init_args = dict(model.get("init_args") or {})
    if prior == "gaussian":
        init_args["prior"] = None
    elif prior is not None:
        init_args["prior"] = {"class_path": _AUX, "init_args": {"path": str(prior)}}
    if eval_T is not None:
        init_args["eval_T"] = float(eval_T)
    config = {k: v for k, v in saved.items() if k in _CONFIG_KEYS}
    config["model"] = {"class_path": model["class_path"], "init_args": init_args}
    config["trainer"] = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                         "callbacks": []}
    return config


def build(config_path: str | Path, prior: str | None = None, eval_T: float | None = None) -> tuple[nn.Module, Any]:
    """(ScoreModule, datamodule) from a saved config, with the chosen prior and truncation."""
    import train

    config = run_config(config_path, prior, eval_T)
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees this script's own arguments
    try:
        cli = train.main(args=config, run=False)
    finally:
        sys.argv = argv
    return cli.model, cli.datamodule


def load_weights(model: nn.Module, ckpt_path: str | Path) -> None:
    """Verified weights-only load of the score model; the prior is the config's (``prior.*`` skipped)."""
    from difftime.checkpoints import load_verified

    checkpoint = load_verified(ckpt_path)
    check_trained_sde(checkpoint, model, ckpt_path)
    state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("prior.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # same names, other shapes
        raise RuntimeError(f"checkpoint {ckpt_path} does not match the config's model: {error}") from error
    missing = [k for k in missing if not k.startswith("prior.")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt_path} does not match the config's model: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")


def load_run(ckpt_path: str | Path, config: str | Path | None = None, prior: str | None = None,
             eval_T: float | None = None, device: str = "cpu") -> tuple[nn.Module, Any]:
    """(trained ScoreModule ready to sample, its datamodule) from a checkpoint of a run (Python, notebooks).

    ``config`` defaults to the run's ``config.yaml`` (``<run>/checkpoints/x.ckpt`` -> ``<run>/config.yaml``);
    ``prior`` and ``eval_T`` as for the command line. Weights are verified and loaded weights-only;
    the data scaling of the run's datamodule is attached, so ``model.to_images`` and
    ``model.bits_per_dim`` work on the run's data.
    """
    ckpt_path = Path(ckpt_path)
    config = Path(config) if config is not None else ckpt_path.parent.parent / "config.yaml"
    model, datamodule = build(config, prior, eval_T)
    load_weights(model, ckpt_path)
    model.scaling = datamodule.scaling
    return model.to(device).eval(), datamodule


def real_images(datamodule: Any, n: int, split: str = "test") -> Tensor:
    """The first ``n`` raw items (uint8 images) of a datamodule's ``split`` ("train", "val" or "test")."""
    datamodule.setup("test" if split == "test" else "fit")
    dataset = getattr(datamodule, f"{split}_set")
    return torch.stack([torch.as_tensor(dataset[i]) for i in range(min(n, len(dataset)))])


def check_trained_sde(checkpoint: dict[str, Any], model: nn.Module, ckpt_path: str | Path) -> None:
    """The checkpoint's training SDE and data shape must be the config's (truncate with --eval_T instead)."""
    from difftime.priors import describe_sde, same_q_T

    saved = checkpoint.get("difftime") or {}
    sde = saved.get("sde")
    if sde is not None and not (same_q_T(sde, model.sde.hparams()) and sde.get("eps") == model.sde.eps):
        raise SampleError(f"checkpoint {ckpt_path} was trained with {describe_sde(sde)} but the config gives "
                          f"{describe_sde(model.sde.hparams())}; use the run's own config.yaml "
                          "(and --eval_T to start from an earlier time)")
    shape = saved.get("data_shape")
    if shape is not None and tuple(shape) != tuple(model.data_shape):
        raise SampleError(f"checkpoint {ckpt_path} was trained on data of shape {tuple(shape)} but the config "
                          f"gives {tuple(model.data_shape)}")


def choose_sampler(model: nn.Module, name: str | None) -> Sampler:
    return model.sampler if name is None else SAMPLERS[name]()


def fitted_sampler(model: nn.Module, sampler: Sampler, steps: int | None, pilot: int, candidates: int,
                   seed: int, sweeps: int = 2) -> tuple[Sampler, dict[str, Any]]:
    """A copy of ``sampler`` on a time grid fitted to ``model`` (:mod:`difftime.grid_fit`): the DP
    grid, then (deterministic samplers, ``sweeps`` > 0) tuned to the sampler against the teacher's
    end points, from both the DP grid and the sampler's own. The pilot batch is drawn from the
    model's prior with seeds of their own stream."""
    from difftime.grid_fit import grid_costs, refine_grid
    from difftime.utils import Stream, step_seed

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
    from callbacks.progress import SamplingProgress, planned_steps, progress_bar

    per_batch = planned_steps(sampler, steps)
    total = per_batch * -(-n // batch_size) if per_batch else None
    bar = progress_bar("sample.py", total, "step", enabled=progress, stream=sys.stderr)
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


# ---------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None, progress: bool = False) -> dict[str, Any]:
    """Sample as the command line does; ``progress``: the bar on stderr (the command line's
    default, ``--quiet`` turns it off; Python callers ask for it)."""
    args = parse_args(argv)
    out = Path(args.out)
    check_out(out)
    ckpt_path = args.ckpt_path or str(Path(args.config).parent / "checkpoints" / "last.ckpt")
    model, datamodule = build(args.config, args.prior, args.eval_T)
    load_weights(model, ckpt_path)
    model = model.to(args.device).eval()
    sampler, prior_name = choose_sampler(model, args.sampler), describe_prior(model.prior)
    grid = None
    if args.fit_grid:
        sampler, grid = fitted_sampler(model, sampler, args.steps, args.fit_pilot, args.fit_candidates, args.seed,
                                       args.fit_sweeps)
        grid["path"] = str(write_grid(out, grid))
        print(f"sample.py: fitted a {len(grid['log_nsr']) - 1}-step time grid in {grid['fit_wall_time_s']:.1f} s "
              f"({grid['fit_nfe']} NFE on {grid['pilot']} pilot samples): log_nsr "
              f"[{', '.join(f'{v:.3f}' for v in grid['log_nsr'])}]; wrote {grid['path']}", file=sys.stdout)
        print(f"sample.py: {grid_verdict(grid)}", file=sys.stdout)
    start = time.perf_counter()
    samples, infos = generate(model, sampler, args.n, args.batch_size, args.seed, args.steps,
                              progress=progress and not args.quiet)
    wall = time.perf_counter() - start
    nfe = [int(info["nfe"]) for info in infos]
    caption = f"{args.n} samples | {infos[0]['sampler']} | NFE {max(nfe)} | prior {prior_name} | T {model.eval_sde.T:g}"
    paths = write_outputs(samples, datamodule.scaling, out, args.nrow, caption)
    summary = {"n": args.n, "seed": args.seed, "sampler": infos[0]["sampler"], "steps": infos[0]["steps"],
               "nfe": max(nfe), "nfe_total": sum(nfe), "wall_time_s": wall, "prior": prior_name,
               "T": model.eval_sde.T, "T_trained": model.sde.T, "eps": model.sde.eps, "checkpoint": str(ckpt_path),
               **paths, **({"fitted_grid": grid} if grid else {})}
    with open(out / "info.json", "w") as handle:
        json.dump(summary, handle, indent=2)
    per_batch = f"{min(nfe)}-{max(nfe)}" if min(nfe) != max(nfe) else str(nfe[0])
    print(f"sample.py: {args.n} samples in {wall:.1f} s | sampler {summary['sampler']} "
          f"(steps {summary['steps']}) | NFE {per_batch} per batch | prior {prior_name} | "
          f"T {model.eval_sde.T:g} | wrote {paths['png']} and {paths['npz']}", file=sys.stdout)
    return summary


def cli_main() -> None:
    """``python sample.py ...`` and the ``difftime-sample`` console entry point.

    Errors in what the user gave (config, checkpoint, prior, output folder) are one line on
    stderr and exit status 2, not a traceback.
    """
    from configs import resolve_config_args
    from difftime.checkpoints import CorruptCheckpointError

    try:
        main(resolve_config_args(sys.argv[1:]), progress=True)
    except (SampleError, CorruptCheckpointError, FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"sample.py: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli_main()
