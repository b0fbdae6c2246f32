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

Outputs in ``--out``: ``samples.npz`` (key ``samples``: ``uint8 [N, C, H, W]`` for images,
``float32 [N, *D]`` model-space values for vector data), ``samples.png`` (an image grid, or a
scatter plot of the first two coordinates of vector data) and ``info.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from difftime.samplers import AdaptiveODE, EulerMaruyama, HeunODE, PredictorCorrector, Sampler
from difftime.utils import PerSampleNoise

SAMPLERS: dict[str, type[Sampler]] = {
    "euler_maruyama": EulerMaruyama,
    "predictor_corrector": PredictorCorrector,
    "heun": HeunODE,
    "adaptive": AdaptiveODE,
}
_CONFIG_KEYS = ("seed_everything", "model", "data")  # the run's trainer, ckpt_path etc. are not needed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="config.yaml saved with the run")
    parser.add_argument("--ckpt_path", default=None,
                        help="ScoreModule checkpoint (default: <config dir>/checkpoints/last.ckpt)")
    parser.add_argument("--prior", default=None,
                        help="'gaussian' or an AuxPriorModule checkpoint (default: the run's prior)")
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default=None,
                        help="default: the sampler of the config")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the sampler's own)")
    parser.add_argument("--n", type=int, default=64, help="number of samples")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    parser.add_argument("--nrow", type=int, default=None, help="grid width (default: sqrt(n))")
    parser.add_argument("--out", default="samples", help="output folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    for key in ("n", "batch_size", "steps"):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(f"--{key} must be >= 1, got {value}")
    return args


# ---------------------------------------------------------------------- model
def run_config(path: str | Path) -> tuple[dict[str, Any], str | None]:
    """The model/data part of a saved run config, with a bare CPU trainer and the prior unset
    (it is chosen by :func:`choose_prior`); and the run's own prior path, or None."""
    with open(path) as handle:
        saved = yaml.safe_load(handle)
    model = saved.get("model") or {}
    if not str(model.get("class_path", "")).endswith("ScoreModule"):
        raise SystemExit(f"sample.py: error: {path} does not configure a ScoreModule "
                         f"(model.class_path = {model.get('class_path')!r})")
    init_args = dict(model.get("init_args") or {})
    run_prior = init_args.pop("prior", None)
    config = {k: v for k, v in saved.items() if k in _CONFIG_KEYS}
    config["model"] = {"class_path": model["class_path"], "init_args": init_args}
    config["trainer"] = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                         "callbacks": []}
    return config, run_prior


def build(config_path: str | Path) -> tuple[nn.Module, Any, str | None]:
    """(ScoreModule, datamodule, the run's prior path or None) from a saved config."""
    import train

    config, run_prior = run_config(config_path)
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees this script's own arguments
    try:
        cli = train.main(args=config, run=False)
    finally:
        sys.argv = argv
    return cli.model, cli.datamodule, run_prior


def load_weights(model: nn.Module, ckpt_path: str | Path) -> None:
    """Verified weights-only load of the state dict; the prior's copy (``prior.*``) is skipped."""
    from difftime.checkpoints import load_verified

    state = load_verified(ckpt_path)["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("prior.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # same names, other shapes
        raise RuntimeError(f"checkpoint {ckpt_path} does not match the config's model: {error}") from error
    missing = [k for k in missing if not k.startswith("prior.")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt_path} does not match the config's model: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")


def choose_prior(model: nn.Module, requested: str | None, run_prior: str | None) -> tuple[nn.Module, str]:
    """(prior at T, its description) from ``--prior`` or the run's config."""
    choice = requested if requested is not None else (run_prior or "gaussian")
    if choice == "gaussian":
        return model.sde.prior(model.data_shape), "gaussian"
    from lightning_modules.aux_prior_module import load_aux_prior

    prior = load_aux_prior(choice, sde=model.sde, data_shape=model.data_shape)
    return prior, f"{type(prior).__name__} ({choice})"


def choose_sampler(model: nn.Module, name: str | None) -> Sampler:
    if name is None:
        return model.sampler
    return SAMPLERS[name]()


# ---------------------------------------------------------------------- generation
def generate(model: nn.Module, prior: nn.Module, sampler: Sampler, n: int, batch_size: int, seed: int,
             steps: int | None) -> tuple[Tensor, list[dict]]:
    """n samples, sample i from CPU generators seeded ``seed + i``; the infos of every batch."""
    chunks, infos = [], []
    for start in range(0, n, batch_size):
        noise = PerSampleNoise([seed + i for i in range(start, min(start + batch_size, n))])
        samples, info = model.sample(len(noise), generator=noise, sampler=sampler, prior=prior, steps=steps)
        chunks.append(samples.float().cpu())
        infos.append(info)
    return torch.cat(chunks), infos


def write_outputs(samples: Tensor, scaling: Any, out: Path, nrow: int | None) -> dict[str, str]:
    """``samples.npz`` and ``samples.png`` in ``out``; returns their paths."""
    import torchvision

    from callbacks.sample_grid import save_png

    out.mkdir(parents=True, exist_ok=True)
    paths = {"npz": str(out / "samples.npz"), "png": str(out / "samples.png")}
    if samples.ndim == 4:
        images = scaling.to_uint8(samples)  # clamps to [-1, 1] and rounds: never wraps around
        np.savez_compressed(paths["npz"], samples=images.numpy())
        grid = torchvision.utils.make_grid(images, nrow=nrow or max(1, int(math.sqrt(len(images)))))
        save_png(grid, paths["png"])
    else:
        np.savez_compressed(paths["npz"], samples=samples.numpy().astype(np.float32))
        _scatter(samples.flatten(1), paths["png"])
    return paths


def _scatter(points: Tensor, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4, 4))
    axis.scatter(points[:, 0], points[:, 1 if points.shape[1] > 1 else 0], s=4, alpha=0.6)
    axis.set_title(f"{points.shape[0]} samples")
    axis.set_aspect("equal")
    figure.savefig(path, dpi=80)
    plt.close(figure)


# ---------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    ckpt_path = args.ckpt_path or str(Path(args.config).parent / "checkpoints" / "last.ckpt")
    model, datamodule, run_prior = build(args.config)
    load_weights(model, ckpt_path)
    prior, prior_name = choose_prior(model, args.prior, run_prior)
    model, prior = model.to(args.device).eval(), prior.to(args.device).eval()
    sampler = choose_sampler(model, args.sampler)
    start = time.perf_counter()
    samples, infos = generate(model, prior, sampler, args.n, args.batch_size, args.seed, args.steps)
    wall = time.perf_counter() - start
    paths = write_outputs(samples, datamodule.scaling, Path(args.out), args.nrow)
    nfe = [int(info["nfe"]) for info in infos]
    summary = {"n": args.n, "seed": args.seed, "sampler": infos[0]["sampler"], "steps": infos[0]["steps"],
               "nfe": max(nfe), "nfe_total": sum(nfe), "wall_time_s": wall, "prior": prior_name,
               "T": model.sde.T, "eps": model.sde.eps, "checkpoint": str(ckpt_path), **paths}
    with open(Path(args.out) / "info.json", "w") as handle:
        json.dump(summary, handle, indent=2)
    per_batch = f"{min(nfe)}-{max(nfe)}" if min(nfe) != max(nfe) else str(nfe[0])
    print(f"sample.py: {args.n} samples in {wall:.1f} s | sampler {summary['sampler']} "
          f"(steps {summary['steps']}) | NFE {per_batch} per batch | prior {prior_name} | "
          f"T {model.sde.T:g} | wrote {paths['png']} and {paths['npz']}", file=sys.stdout)
    return summary


def cli_main() -> None:
    """``python sample.py ...`` and the ``difftime-sample`` console entry point."""
    from configs import resolve_config_args

    main(resolve_config_args(sys.argv[1:]))


if __name__ == "__main__":
    cli_main()
