"""Diffusion time T against sampling cost and quality on a 2-D Gaussian mixture with known density.

Franzese et al. 2023 ("How Much is Enough? A Study on Diffusion Times in Score-based Generative
Models", Sec. 3-4) claim that a short diffusion time T (0.2-0.6) whose reverse process starts from
an auxiliary model nu ~ q_T matches or beats the classical T = 1 with the Gaussian prior, at fewer
score-network evaluations (NFE). This script measures that on data whose density is exact.

Contenders (VP SDE, beta in [0.1, 20], eps = 1e-3; the reverse process always runs from T to eps):

* ``T=1 gaussian``   (A)  the classical set-up, x_T ~ N(0, I);
* ``T<1 flow``       (B)  short T, x_T from a RealNVP (or NSF) nu trained by maximum likelihood on
  x_T = m(T) x_0 + s(T) z with fresh noise every step (AuxPriorModule + lightning.Trainer);
* ``T<1 gaussian``   (B') the same short T started from N(0, I): the prior mismatch the auxiliary
  model removes;
* ``exact``          (C)  reference: x_T from the exact q_T (diffused mixture, closed form).

Each is run with (i) the ORACLE score of the mixture (prior mismatch + discretisation only) and
(ii) an MLP noise-prediction network per T trained with ScoreModule for the same number of steps
(EMA weights). Samplers at equal NFE: reverse-SDE Euler-Maruyama (NFE = steps, no final Tweedie
step, so that the NFE are equal) and the probability-flow ODE with Heun (NFE = 2 steps).

Metrics, mean +- standard error over ``reps`` independent groups of ``n`` samples:

* ``logp``: E[log p_data(x)] of the samples under the TRUE mixture density; the data's own value
  (minus the entropy) is estimated from data samples. Higher than the data's value means
  over-concentrated samples; far lower means mass off the data (one outlier weighs a lot).
* ``sw2``: sliced Wasserstein-2 to a fresh data set of the same size (``--directions`` random
  unit directions, shared by every configuration; the 1-D W2 between equal-size samples is the
  distance of the sorted projections). Its floor (data vs data) is printed.
* ``mmd2``: unbiased MMD^2 (Gretton et al. 2012, Eq. 3) with the Gaussian kernel
  exp(-|x - y|^2 / (2 h^2)), h = ``--mmd-bandwidth``, on the first ``--mmd-n`` samples of each group.

Costs: NFE; wall time per 1000 samples of the sampler (score part) and of the x_T draw; the flow's
draw time per 1000 samples in units of one score evaluation per 1000 samples; training times and
parameter counts; the flow's own error KL(q_T || nu) = E_{q_T}[log q_T - log nu] (Monte Carlo, exact
q_T) next to KL(q_T || N(0, I)). Output: markdown tables on stdout, one row per configuration in
``--out`` (CSV) and the per-T costs in ``<out stem>_costs.csv`` beside it.

    python benchmarks/t_tradeoff_gmm.py                    # --quick: 5-6 min on 1 CPU thread
    python benchmarks/t_tradeoff_gmm.py --mode full        # MLP 128x3, 5000 steps, 5 x 5000 samples,
                                                           # NFE up to 200: roughly an hour (estimate)
    python benchmarks/t_tradeoff_gmm.py --data random --flow nsf --short-T 0.1 0.2 --out /tmp/tt.csv

Every setting of a mode can be overridden (``--score-steps``, ``--hidden``, ``--nfe 10 20`` ...).
Torch runs on ``--threads 1`` by default: on 2 cores shared with another process, two threads made
a training step 15x slower (OpenMP spin-waits).

Result of the quick run (Ring(8, r=1, std=0.1); MLP 64x3 trained 2000 steps per T, 24-41 s each;
RealNVP 4x64 trained 600 steps, 14-21 s; 3 x 2000 samples; 300-375 s in all on one shared CPU
thread; the metrics are bit-identical between runs, the timings are not):

* At equal NFE the claim holds for the trained score: short T + flow beats T = 1 + N(0, I) on
  MMD^2 and E[log p] at every NFE for T = 0.2 and 0.4, and on MMD^2 for T = 0.6 (whose E[log p]
  with Heun is worse at NFE 10, better above). MMD^2 x 1e3 at NFE 10 / 100:
  Euler-Maruyama 5.8 / 1.7 (T = 0.2) against 33.2 / 20.5 (T = 1); Heun 1.9 / 1.4 against
  21.6 / 18.2. E[log p] at NFE 100: -1.02 (EM) and -1.18 (Heun) against -3.18 and -2.89 (data:
  -0.30). T = 1 reaches its best MMD^2 only at NFE 50; T = 0.2 and 0.4 with the flow match it
  (within 2 se) or beat it at NFE 10, 5x fewer evaluations, for an extra flow draw worth 1.1-2
  NFE of this MLP (RealNVP; an NSF draw costs about 10 NFE).
* Most of the gain does NOT come from the auxiliary prior: the same short T started from N(0, I)
  is as good with Euler-Maruyama and nearly as good with Heun. It comes from (1) discretisation:
  the same NFE covers a shorter trajectory (oracle score: MMD^2 <= 5e-4 needs NFE 100 at T = 1,
  NFE 20 at T = 0.2) and (2) training: at an equal step budget the T = 0.2 network is far closer to the oracle
  (E[log p] about -1.0 against -3.2 at T = 1), since t ~ U(eps, T) spends every step where sample
  quality is decided. All trained networks are under-trained in quick mode (the oracle reaches -0.37).
* The flow matters only where q_T is far from N(0, I) and the sampler cannot forget its start:
  at T = 0.2 (KL(q_T || N(0, I)) = 0.079 nats, KL(q_T || flow) = 0.009) with the Heun ODE,
  E[log p] gains 0.4 nats (oracle) and 0.2-0.3 nats (trained) and MMD^2 halves; with
  Euler-Maruyama the reverse SDE's noise absorbs the prior mismatch and the flow brings nothing
  (trained: 0.05-0.1 nats worse). For this 2-D data q_T is within 0.005 nats (T = 0.4) and
  0.0001 nats (T = 0.6) of N(0, I) (VP, beta_max = 20): at T = 0.6 the flow's own error
  (0.0008 nats) is larger than the Gaussian's.

Caveats: KL(q_T || N(0, I)) grows with the dimension, so in image space the prior gap at
T = 0.4-0.6 is far larger than in this 2-D test. Standard errors cover sampling noise only, for
ONE trained network and ONE flow per T (rerun with ``--seed`` for training variance). SW2 sits at
its noise floor (data vs data: 0.047 +- 0.010 at n = 2000) for most configurations; MMD^2 and
E[log p] are the discriminating metrics. Wall times come from a shared CPU.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor

from common import (SAMPLE_STREAM, Contender, Evaluator, Stat, build_setup, flatten_stats, fresh_sets, header, make_data,
                    mixture_args, quiet, write_rows)
from difftime.randomness import step_seed
from difftime.samplers import euler_maruyama, heun_ode
from difftime.sde import SDE, ScoreFn

SAMPLERS = ("euler_maruyama", "heun_ode")


# ---------------------------------------------------------------------- one configuration
def run_sampler(name: str, score_fn: ScoreFn, sde: SDE, x_T: Tensor, nfe: int,
                generator: torch.Generator) -> tuple[Tensor, int]:
    if name == "euler_maruyama":
        x, info = euler_maruyama(score_fn, sde, x_T, nfe, generator, denoise=False)
    else:
        x, info = heun_ode(score_fn, sde, x_T, nfe // 2, generator)
    return x, int(info["nfe"])


def evaluate(c: Contender, sampler: str, nfe: int, index: int, evaluator: Evaluator,
             args: argparse.Namespace) -> dict:
    total = args.reps * args.n
    generator = torch.Generator().manual_seed(step_seed(args.seed, SAMPLE_STREAM, index))
    start = time.perf_counter()
    with torch.no_grad():
        x_T = c.prior.sample(total, generator).float()
    prior_s = time.perf_counter() - start
    start = time.perf_counter()
    x, used = run_sampler(sampler, c.score_fn, c.sde, x_T, nfe, generator)
    score_s = time.perf_counter() - start
    metrics = evaluator(x)
    per_k = 1000.0 / total
    return {"score": c.score, "T": c.T, "prior": c.prior_name, "sampler": sampler, "nfe": used,
            "prior_ms_per_1k": 1000 * prior_s * per_k, "score_ms_per_1k": 1000 * score_s * per_k, **metrics}


# ---------------------------------------------------------------------- tables
def pivot(rows: list[dict], score: str, metric: str, nfes: list[int], digits: int) -> list[str]:
    lines = ["| sampler | T | prior | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
             "|---|---|---|" + "---|" * len(nfes)]
    keys = sorted({(r["sampler"], r["T"], r["prior"]) for r in rows if r["score"] == score},
                  key=lambda k: (k[0], -k[1], ["gaussian", "flow", "exact"].index(k[2])))
    for sampler, T, prior in keys:
        cells = []
        for k in nfes:
            match = [r for r in rows if (r["score"], r["sampler"], r["T"], r["prior"], r["nfe"]) ==
                     (score, sampler, T, prior, k)]
            cells.append(match[0][metric].fmt(digits) if match else "")
        lines.append(f"| {sampler} | {T:g} | {prior} | " + " | ".join(cells) + " |")
    return lines


def find(rows: list[dict], **key: object) -> dict | None:
    match = [r for r in rows if all(r[k] == v for k, v in key.items())]
    return match[0] if match else None


def verdict(rows: list[dict], short_T: list[float], nfes: list[int], metric: str, digits: int,
            score: str = "trained") -> list[str]:
    """``metric`` of short T + flow and of T = 1 + N(0, I) at equal NFE; z = (short - T1) / combined se."""
    lines = ["| sampler | NFE | T=1 gaussian | " + " | ".join(f"T={T:g} flow (z)" for T in short_T) + " |",
             "|---|---|---|" + "---|" * len(short_T)]
    for sampler in SAMPLERS:
        for k in nfes:
            a = find(rows, score=score, sampler=sampler, T=1.0, prior="gaussian", nfe=k)[metric]
            bs = [find(rows, score=score, sampler=sampler, T=T, prior="flow", nfe=k)[metric] for T in short_T]
            cells = " | ".join(_diff_cell(b, a, digits) for b in bs)
            lines.append(f"| {sampler} | {k} | {a.fmt(digits)} | {cells} |")
    return lines


def _diff_cell(b: Stat, a: Stat, digits: int) -> str:
    se = math.hypot(a.se, b.se)
    z = (b.mean - a.mean) / se if se > 0 else math.nan
    return f"{b.fmt(digits)} ({z:+.1f})"


def prior_gain(rows: list[dict], short_T: list[float], nfes: list[int], score: str) -> list[str]:
    """E[log p_data] with the flow prior minus with N(0, I), same T, score, sampler and NFE."""
    lines = ["| sampler | T | " + " | ".join(f"NFE {k}" for k in nfes) + " |", "|---|---|" + "---|" * len(nfes)]
    for sampler in SAMPLERS:
        for T in short_T:
            cells = []
            for k in nfes:
                b = find(rows, score=score, sampler=sampler, T=T, prior="flow", nfe=k)["logp"]
                a = find(rows, score=score, sampler=sampler, T=T, prior="gaussian", nfe=k)["logp"]
                se = math.hypot(a.se, b.se)
                cells.append(f"{b.mean - a.mean:+.2f} ({(b.mean - a.mean) / se:+.1f})" if se > 0 else "nan")
            lines.append(f"| {sampler} | {T:g} | " + " | ".join(cells) + " |")
    return lines


def nfe_to_match(rows: list[dict], nfes: list[int], score: str, metric: str) -> list[str]:
    """Smallest NFE at which each contender's ``metric`` (lower is better) is within 2 se of the best
    value that T = 1 + N(0, I) reaches over all NFE."""
    lines = [f"| sampler | target {metric} (best of T=1 gaussian + 2 se) | contender: smallest NFE reaching it |",
             "|---|---|---|"]
    for sampler in SAMPLERS:
        ref = [find(rows, score=score, sampler=sampler, T=1.0, prior="gaussian", nfe=k) for k in nfes]
        best = min((r[metric] for r in ref if r and math.isfinite(r[metric].mean)), key=lambda s: s.mean)
        target = best.mean + 2.0 * best.se
        parts = []
        contenders = sorted({(r["T"], r["prior"]) for r in rows if r["score"] == score}, key=lambda k: (-k[0], k[1]))
        for T, prior in contenders:
            hit = [k for k in nfes if (r := find(rows, score=score, sampler=sampler, T=T, prior=prior, nfe=k))
                   and r[metric].mean <= target]
            parts.append(f"T={T:g} {prior}: {hit[0] if hit else '>' + str(nfes[-1])}")
        lines.append(f"| {sampler} | {target:.4f} | " + "; ".join(parts) + " |")
    return lines


def cost_table(costs: list[dict]) -> list[str]:
    lines = ["| T | KL(q_T‖N(0,I)) nats | KL(q_T‖flow) nats | score net params | score train s | "
             "1 NFE ms/1k (MLP) | 1 NFE ms/1k (oracle) | flow params | flow train s | flow draw ms/1k | "
             "flow draw in NFE |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in costs:
        flow = ("—",) * 5 if "flow_params" not in c else (
            c["kl_flow"].fmt(4), str(c["flow_params"]), f"{c['flow_train_s']:.1f}", f"{c['flow_draw_ms_per_1k']:.2f}",
            f"{c['flow_draw_ms_per_1k'] / c['score_eval_ms_per_1k']:.2f}")
        lines.append(f"| {c['T']:g} | {c['kl_gaussian'].fmt(4)} | {flow[0]} | {c['score_params']} | "
                     f"{c['score_train_s']:.1f} | {c['score_eval_ms_per_1k']:.2f} | {c['oracle_eval_ms_per_1k']:.2f} | "
                     f"{flow[1]} | {flow[2]} | {flow[3]} | {flow[4]} |")
    return lines


# ---------------------------------------------------------------------- main
def write_csv(path: Path, rows: list[dict], costs: list[dict], args: argparse.Namespace) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = []
    by_T = {c["T"]: c for c in costs}
    for r in rows:
        row, c = flatten_stats(r), by_T.get(r["T"], {})
        row.update(steps={"euler_maruyama": r["nfe"], "heun_ode": r["nfe"] // 2}.get(r["sampler"], ""),
                   reps=args.reps, n=args.n, data=args.data, flow=args.flow if r["prior"] == "flow" else "",
                   score_steps=args.score_steps, score_train_s=c.get("score_train_s", ""),
                   flow_train_s=c.get("flow_train_s", "") if r["prior"] == "flow" else "")
        flat.append(row)
    write_rows(path, flat)
    write_rows(path.with_name(f"{path.stem}_costs{path.suffix}"), [flatten_stats(c) for c in costs])


def main() -> None:
    args = mixture_args(description=__doc__)
    torch.set_num_threads(args.threads)
    quiet()
    start = time.perf_counter()
    data = make_data(args)
    dirs = torch.randn(args.directions, 2, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    evaluator = Evaluator(data, fresh_sets(data, args, offset=0), dirs / dirs.norm(dim=1, keepdim=True),
                          args.mmd_bandwidth, args.mmd_n)
    print(header(args), flush=True)
    floor = evaluator(torch.cat(fresh_sets(data, args, offset=1000)))
    setup = build_setup(data, args)
    rows, index = [], 0
    for c in setup.contenders:
        for sampler in SAMPLERS:
            for k in args.nfe:
                rows.append(evaluate(c, sampler, k, index, evaluator, args))
                index += 1
    write_csv(Path(args.out), rows, setup.costs, args)
    report(rows, setup.costs, floor, args)
    print(f"\n# total wall time {time.perf_counter() - start:.0f} s; CSV: {args.out}")


def report(rows: list[dict], costs: list[dict], floor: dict, args: argparse.Namespace) -> None:
    print(f"\n## Reference: data vs data (floor)\nlogp {floor['logp'].fmt(3)} (= -entropy), "
          f"sw2 {floor['sw2'].fmt(3)}, mmd2 {floor['mmd2'].fmt(5)}")
    print("\n## Costs per T\n" + "\n".join(cost_table(costs)))
    for score in ("trained", "oracle"):
        for metric, digits, title in (("sw2", 3, "sliced W2 to data (lower is better)"),
                                      ("logp", 2, f"E[log p_data(x)] (data: {floor['logp'].fmt(2)})"),
                                      ("mmd2", 4, f"MMD^2, h={args.mmd_bandwidth} (lower is better)")):
            print(f"\n## {score} score: {title}\n" + "\n".join(pivot(rows, score, metric, args.nfe, digits)))
    for score in ("trained", "oracle"):
        per_nfe = {s: statistics.fmean([r["score_ms_per_1k"] / r["nfe"] for r in rows
                                        if r["score"] == score and r["sampler"] == s]) for s in SAMPLERS}
        print(f"\n## Sampler wall time per 1000 samples per NFE (ms), {score} score: "
              + ", ".join(f"{s} {ms:.2f}" for s, ms in per_nfe.items()))
    print("\n## Verdict (trained score): short T + flow vs T = 1 + N(0, I) at equal NFE, MMD^2 "
          "(z < -2: short T significantly better)\n" + "\n".join(verdict(rows, args.short_T, args.nfe, "mmd2", 4)))
    print(f"\n## Verdict (trained score), E[log p_data(x)] (data {floor['logp'].fmt(2)}; z > +2: short T "
          "significantly better)\n" + "\n".join(verdict(rows, args.short_T, args.nfe, "logp", 2)))
    for score, metric in (("trained", "mmd2"), ("oracle", "mmd2")):
        print(f"\n## NFE to reach the best {metric} of T = 1 + N(0, I) (within 2 se), {score} score\n"
              + "\n".join(nfe_to_match(rows, args.nfe, score, metric)))
    for score in ("trained", "oracle"):
        print(f"\n## Is the auxiliary prior needed? E[log p] of flow minus gaussian prior at the same short T, "
              f"{score} score (z = diff/se; > 2: the flow helps)\n"
              + "\n".join(prior_gain(rows, args.short_T, args.nfe, score)))


if __name__ == "__main__":
    main()
