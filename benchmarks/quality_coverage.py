"""Do the quality intervals of :mod:`difftime.quality` cover the true value as often as they claim?

Two Gaussian feature sets in d = 64 dimensions stand in for classifier features (a fixed random
covariance with eigenvalues from 3.2 down to 0.03, and a rotated, 1.15x wider copy with a shifted
mean). Their true values are known:

* FD: the closed form of :func:`difftime.quality.frechet_distance` of the two Gaussians;
* KID: the closed form of :func:`difftime.quality.kernel_distance_gaussians` (moments of the
  cubic polynomial kernel under two Gaussians, derived in ``polynomial_kernel_mean``);
* precision / recall: their expectation at these set sizes and k = 3 (the k-NN radii depend on
  the set size, so that is the estimand), by Monte Carlo over ``--truth_reps`` fresh pairs of
  sets, stated with its Monte-Carlo standard error.

For n = 200 and 500 points per set, ``--reps`` independent pairs of sets are drawn and every
interval method is asked whether its nominal 95 % interval covers the truth:

* FD: jackknife bias-corrected (the method of ``quality_row``), basic bootstrap (``fd_interval``)
  and the percentile bootstrap that the project used before (``fd_percentile_interval``);
* KID: unbiased U-statistic with the jackknife interval;
* precision / recall: the delete-half jackknife (``quality_row``), the delete-a-group jackknife
  and the bootstrap of the indicators given the manifolds (``precision_recall_intervals``).

Writes ``benchmarks/results/quality_coverage.csv`` (one row per replication and method) and
``quality_coverage.md`` (coverage with its Wilson 95 % interval, mean estimate, truth, mean width).

    nice python benchmarks/quality_coverage.py [--reps 200] [--truth_reps 2000] [--sizes 200 500]
        [--statistics pr_half]   # re-measure some groups of rows; keep the others'
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import torch

from difftime import quality

OUT = Path(__file__).resolve().parent / "results"
D = 64
CONDITIONAL = "percentile bootstrap of the indicators given the manifolds"
STATISTICS = ("fd", "kid", "pr_half", "pr_jackknife", "pr_conditional")  # groups of rows


def scenario(d: int = D, seed: int = 123) -> dict[str, torch.Tensor]:
    """Means and covariances of the reference (r) and generated (g) Gaussians, float64."""
    g = torch.Generator().manual_seed(seed)
    q_mat = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    cov_r = q_mat @ torch.diag(torch.logspace(0.5, -1.5, d, dtype=torch.float64)) @ q_mat.T
    skew = torch.randn(d, d, generator=g, dtype=torch.float64)
    rotation = torch.linalg.matrix_exp(0.15 * (skew - skew.T))
    return {"mu_r": torch.zeros(d, dtype=torch.float64), "cov_r": cov_r,
            "mu_g": 0.08 * torch.randn(d, generator=g, dtype=torch.float64), "cov_g": 1.15 * rotation @ cov_r @ rotation.T}


def draw(s: dict[str, torch.Tensor], n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n reference and n generated points from the scenario, seeded."""
    g = torch.Generator().manual_seed(seed)
    chol_r, chol_g = torch.linalg.cholesky(s["cov_r"]), torch.linalg.cholesky(s["cov_g"])
    d = s["mu_r"].shape[0]
    real = torch.randn(n, d, generator=g, dtype=torch.float64) @ chol_r.T + s["mu_r"]
    fake = torch.randn(n, d, generator=g, dtype=torch.float64) @ chol_g.T + s["mu_g"]
    return real, fake


def truths(s: dict[str, torch.Tensor], n: int, truth_reps: int) -> dict[str, tuple[float, float]]:
    """(value, Monte-Carlo s.e.) of each statistic: closed forms for FD and KID, MC for precision/recall."""
    pr = torch.tensor([quality.precision_recall(*draw(s, n, 10**7 + r)) for r in range(truth_reps)],
                      dtype=torch.float64)
    se = pr.std(0) / math.sqrt(truth_reps)
    return {"fd": (float(quality.frechet_distance(s["mu_r"], s["cov_r"], s["mu_g"], s["cov_g"])), 0.0),
            "kid": (float(quality.kernel_distance_gaussians(s["mu_r"], s["cov_r"], s["mu_g"], s["cov_g"])), 0.0),
            "precision": (float(pr[:, 0].mean()), float(se[0])), "recall": (float(pr[:, 1].mean()), float(se[1]))}


def intervals(real: torch.Tensor, fake: torch.Tensor, seed: int, resamples: int,
              statistics: set[str]) -> dict[tuple[str, str], quality.Interval]:
    """Every (statistic, method) interval of one replication, for the chosen groups of ``STATISTICS``."""
    out: dict[tuple[str, str], quality.Interval] = {}
    if "fd" in statistics:
        out |= {("fd", "jackknife"): quality.fd_jackknife(real, fake, seed=seed),
                ("fd", "basic bootstrap"): quality.fd_interval(real, fake, resamples, seed=seed),
                ("fd", "percentile bootstrap"): quality.fd_percentile_interval(real, fake, resamples, seed=seed)}
    if "kid" in statistics:
        out[("kid", "jackknife")] = quality.kid_jackknife(real, fake, seed=seed)
    for name, method, fn in (("pr_half", "half", quality.precision_recall_half_sampling),
                             ("pr_jackknife", "jackknife", quality.precision_recall_jackknife),
                             ("pr_conditional", CONDITIONAL, lambda x, y, seed: quality.precision_recall_intervals(
                                 x, y, resamples=resamples, seed=seed))):
        if name in statistics:
            pair = fn(real, fake, seed=seed)
            out |= {("precision", method): pair[0], ("recall", method): pair[1]}
    return out


def _append(path: Path, rows: list[dict]) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n."""
    p, denom = k / n, 1 + z**2 / n
    centre, half = (p + z**2 / (2 * n)) / denom, z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return centre - half, centre + half


def run(sizes: list[int], reps: int, truth_reps: int, resamples: int, statistics: set[str],
        partial: Path | None = None) -> list[dict]:
    """Every replication's rows; also appended to ``partial`` as they come (a killed run keeps them)."""
    s, rows = scenario(), []
    for n in sizes:
        truth, start = truths(s, n, truth_reps), time.perf_counter()
        for r in range(reps):
            for (stat, method), iv in intervals(*draw(s, n, 1000 + r), r, resamples, statistics).items():
                rows.append({"n": n, "rep": r, "statistic": stat, "method": iv.method if method != CONDITIONAL else method,
                             "estimate": iv.estimate, "low": iv.low, "high": iv.high, "truth": truth[stat][0],
                             "truth_mc_se": truth[stat][1], "covered": int(iv.low <= truth[stat][0] <= iv.high),
                             "contains_estimate": int(iv.low <= iv.estimate <= iv.high)})
            if partial is not None:
                _append(partial, [x for x in rows if x["n"] == n and x["rep"] == r])
            if (r + 1) % 20 == 0:
                print(f"n={n}: {r + 1}/{reps} replications, {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def summary(rows: list[dict], truth_reps: int, resamples: int, seconds: float, groups: list[str]) -> str:
    lines = ["# Coverage of the quality intervals (nominal 95 %)", "",
             f"Gaussian features, d = {D}, n reference = n generated points; independent replications per row as "
             "counted in the coverage column; "
             f"bootstraps with {resamples} resamples; jackknife with 50 groups per set and Student-t "
             f"quantiles. Truth: closed forms for FD and KID, the mean over {truth_reps} fresh replications "
             "for precision and recall (k = 3; Monte-Carlo s.e. shown). Made by `benchmarks/quality_coverage.py`; "
             f"its last invocation measured {', '.join(groups)} in {seconds / 60:.0f} min on one CPU core.", "",
             "| n | statistic | interval method | coverage | Wilson 95 % | truth | mean estimate | mean width "
             "| estimate inside |", "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["n"], r["statistic"], r["method"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    for n, stat, method in keys:
        sel = [r for r in rows if (r["n"], r["statistic"], r["method"]) == (n, stat, method)]
        k = sum(r["covered"] for r in sel)
        lo, hi = wilson(k, len(sel))
        truth = f"{sel[0]['truth']:.4g}" + (f" ± {sel[0]['truth_mc_se']:.1g}" if sel[0]["truth_mc_se"] else "")
        lines.append(f"| {n} | {stat} | {method} | {100 * k / len(sel):.1f} % ({k}/{len(sel)}) | "
                     f"{100 * lo:.1f}–{100 * hi:.1f} % | {truth} | {sum(r['estimate'] for r in sel) / len(sel):.4g} | "
                     f"{sum(r['high'] - r['low'] for r in sel) / len(sel):.3g} | "
                     f"{100 * sum(r['contains_estimate'] for r in sel) / len(sel):.0f} % |")
    return "\n".join(lines) + "\n"


def group(row: dict) -> str:
    """The ``--statistics`` group a row belongs to."""
    if row["statistic"] in ("fd", "kid"):
        return row["statistic"]
    return {"delete-half": "pr_half", "jackknife": "pr_jackknife"}.get(row["method"].split(" ")[0], "pr_conditional")


def kept_rows(path: Path, chosen: set[str], sizes: set[int]) -> list[dict]:
    """Rows of an earlier run for the groups and sizes not measured now (numbers parsed back)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if group(r) not in chosen or int(r["n"]) not in sizes]
    numbers = ("estimate", "low", "high", "truth", "truth_mc_se")
    return [{**r, **{k: float(r[k]) for k in numbers}, **{k: int(r[k]) for k in ("n", "rep", "covered", "contains_estimate")}}
            for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--truth_reps", type=int, default=2000)
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 500])
    parser.add_argument("--statistics", nargs="+", choices=STATISTICS, default=list(STATISTICS),
                        help="measure only these; the other statistics' rows of an existing CSV are kept")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    chosen = set(args.statistics)
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / "quality_coverage.partial.csv"
    partial.unlink(missing_ok=True)
    rows = run(args.sizes, args.reps, args.truth_reps, args.resamples, chosen, partial)
    rows = kept_rows(args.out / "quality_coverage.csv", chosen, set(args.sizes)) + rows
    with open(args.out / "quality_coverage.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = summary(rows, args.truth_reps, args.resamples, time.perf_counter() - start, args.statistics)
    (args.out / "quality_coverage.md").write_text(text)
    partial.unlink()
    print(text)


if __name__ == "__main__":
    main()
