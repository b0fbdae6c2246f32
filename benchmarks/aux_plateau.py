"""Has an auxiliary prior finished training? Its prior term at T at every kept checkpoint, 500, 1k, 2k, ...

The measurement of :mod:`benchmarks.plateau` for the auxiliary priors (Franzese et al. 2023, Sec. 3):
for an aux unit of a study (or any AuxPriorModule run whose ``checkpoints/`` hold ``step=<N>.ckpt``),
the ELBO's prior term KL(q(x_T | x_0) || nu) / (D ln 2) of each test image, in bits/dim
(:func:`difftime.likelihood.prior_term`; the Gaussian entropy exact, the cross-entropy from one
draw x_T per image), with the same images and the same draws at every step. It writes
``<out>/<unit>.csv`` (one row per step: mean, standard error over the images, and the change from
the previous kept step with the standard error of that paired difference), ``<out>/<unit>.md``
(whether the last doubling of the steps changed the mean by less than the 95 % half-width of its
estimate) and ``<out>/<unit>.png``. The KL of N(0, I), the SDE's own prior, is the last row.

    python -m benchmarks.aux_plateau runs/study_digits_plateau/units/aux/glow-T0.4-bc0ff30cd5 [--n 1000]
"""

from __future__ import annotations

import argparse
import csv
import math
import re
from pathlib import Path
from typing import Any

import torch

from difftime.likelihood import prior_term

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "plateau"
STEP = re.compile(r"step=(\d+)\.ckpt$")
Z95 = 1.959964


def checkpoints(unit: Path) -> dict[int, Path]:
    """step -> checkpoint path of every ``step=<N>.ckpt`` in the run."""
    found = {int(m.group(1)): p for p in (unit / "checkpoints").glob("step=*.ckpt") if (m := STEP.search(p.name))}
    if not found:
        raise SystemExit(f"aux_plateau: {unit}/checkpoints holds no step=<N>.ckpt")
    return dict(sorted(found.items()))


def load(unit: Path, ckpt: Path) -> tuple[Any, Any, Any]:
    """(the prior of one checkpoint, verified and frozen; the run's SDE; its datamodule)."""
    import yaml

    from commands.study.config import build_object
    from difftime.aux_priors import load_aux_prior

    config = yaml.safe_load((unit / "config.yaml").read_text())
    prior, _ = load_aux_prior(ckpt)
    return prior.eval(), build_object(config["model"]["init_args"]["sde"]), build_object(config["data"])


def per_image_kl(prior: Any, sde: Any, data: Any, images: torch.Tensor, seed: int,
                 batch: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """(prior term of nu, prior term of N(0, I)) per image in bits/dim; the dequantisation noise and
    the x_T draws come from ``seed`` alone, so every checkpoint sees the same ones."""
    generator = torch.Generator().manual_seed(seed)
    scale = images[0].numel() * math.log(2.0)
    gaussian_prior = sde.prior(tuple(images.shape[1:]))
    learned, gaussian = [], []
    with torch.no_grad():
        for chunk in images.split(batch):
            x0, _ = data.scaling(chunk, generator)
            learned.append(prior_term(sde, prior, x0, generator=generator)[0] / scale)
            gaussian.append(prior_term(sde, gaussian_prior, x0)[0] / scale)
    return torch.cat(learned), torch.cat(gaussian)


def measure(unit: Path, n: int, seed: int) -> list[dict]:
    rows, previous = [], None
    gaussian = None
    for step, ckpt in checkpoints(unit).items():
        prior, sde, data = load(unit, ckpt)
        images = data.splits()["test"].data[:n]
        kl, gaussian = per_image_kl(prior, sde, data, images, seed)
        row = {"step": step, "prior": type(prior).__name__, "T": sde.T, "n": len(kl),
               "kl_bpd": kl.mean().item(), "se": kl.std().item() / math.sqrt(len(kl)), "change": "", "change_se": ""}
        if previous is not None:
            diff = kl - previous
            row["change"], row["change_se"] = diff.mean().item(), diff.std().item() / math.sqrt(len(diff))
        rows.append(row)
        previous = kl
        print(f"step {step}: KL {row['kl_bpd']:.5f} ± {row['se']:.5f} bits/dim", flush=True)
    rows.append({"step": "N(0, I)", "prior": "gaussian", "T": rows[-1]["T"], "n": len(gaussian),
                 "kl_bpd": gaussian.mean().item(), "se": gaussian.std().item() / math.sqrt(len(gaussian)),
                 "change": "", "change_se": ""})
    return rows


def verdict(rows: list[dict]) -> str:
    """Whether the last doubling of the steps changed the mean by less than its 95 % half-width."""
    steps = {r["step"]: r for r in rows if isinstance(r["step"], int)}
    last = max(steps)
    half = steps.get(last // 2)
    if half is None:
        return f"no checkpoint at {last // 2} steps: the last doubling cannot be measured"
    change = steps[last]["kl_bpd"] - half["kl_bpd"]
    width = Z95 * steps[last]["se"]
    plateau = abs(change) < width
    return (f"{half['step']} -> {last} steps changed the prior term by {change:+.5f} bits/dim, "
            f"{'less' if plateau else 'more'} than the 95 % half-width of its estimate ({width:.5f}): "
            f"{'a plateau' if plateau else 'still improving'}.")


def write(rows: list[dict], out: Path, name: str, unit: Path, seed: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    first = rows[0]
    lines = [f"# Training length of the auxiliary prior `{name}`", "",
             f"Run `{unit.relative_to(ROOT) if unit.is_relative_to(ROOT) else unit}`: {first['prior']} at T = "
             f"{first['T']:g}. Prior term KL(q(x_T | x_0) || nu) in bits/dim on the first {first['n']} test "
             f"digits, one x_T draw per image, seed {seed}, the same images and draws at every step; ± one "
             "standard error over the images; `change`: the paired difference from the previous kept step "
             "± its standard error (`python -m benchmarks.aux_plateau`).", "",
             "| step | KL bits/dim | change |", "|---|---|---|"]
    for r in rows:
        change = f"{r['change']:+.5f} ± {r['change_se']:.5f}" if r["change"] != "" else ""
        lines.append(f"| {r['step']} | {r['kl_bpd']:.5f} ± {r['se']:.5f} | {change} |")
    lines += ["", verdict(rows)]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in rows if isinstance(r["step"], int)]
    fig, axis = plt.subplots(figsize=(5, 3.4))
    axis.errorbar([r["step"] for r in steps], [r["kl_bpd"] for r in steps], yerr=[Z95 * r["se"] for r in steps],
                  marker="o", capsize=3, label=first["prior"])
    axis.set_xscale("log", base=2)
    axis.set_xlabel("training step")
    axis.set_ylabel("prior term (bits/dim)")
    axis.set_title(f"{name}: KL(q_T | x_0 || nu), 95 % intervals; N(0, I): {rows[-1]['kl_bpd']:.4f}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.aux_plateau", description=__doc__.split("\n\n")[0])
    parser.add_argument("unit", type=Path, help="an aux unit folder (with config.yaml and checkpoints/)")
    parser.add_argument("--n", type=int, default=1000, help="test images (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    unit = args.unit.resolve()
    if not (unit / "config.yaml").is_file():
        parser.error(f"{args.unit}: no config.yaml (not a run folder)")
    if args.n < 2:
        parser.error(f"--n = {args.n} is invalid: allowed an integer >= 2")
    rows = measure(unit, args.n, args.seed)
    name = unit.name
    write(rows, args.out, name, unit, args.seed)
    print(verdict(rows))


if __name__ == "__main__":
    main()
