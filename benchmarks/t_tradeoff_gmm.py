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
import csv
import logging
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning  # noqa: E402

from datamodules.toy import ToyDataModule  # noqa: E402
from difftime.aux_priors import NeuralSplinePrior, RealNVPPrior  # noqa: E402
from difftime.losses import DSMLoss  # noqa: E402
from difftime.networks import MLP  # noqa: E402
from difftime.samplers import euler_maruyama, heun_ode  # noqa: E402
from difftime.sde import SDE, VPSDE, ScoreFn  # noqa: E402
from difftime.toy import GaussianMixture, Grid, RandomMixture, Ring  # noqa: E402
from difftime.utils import step_seed  # noqa: E402
from lightning_modules import AuxPriorModule, ScoreModule  # noqa: E402

MODES: dict[str, dict] = {
    "quick": dict(score_steps=2000, hidden=64, depth=3, flow_layers=4, flow_hidden=64, flow_steps=600,
                  reps=3, n=2000, nfe=[10, 20, 50, 100], directions=128, mmd_n=1000),
    "full": dict(score_steps=5000, hidden=128, depth=3, flow_layers=8, flow_hidden=64, flow_steps=2000,
                 reps=5, n=5000, nfe=[10, 20, 50, 100, 200], directions=256, mmd_n=2000),
}
SAMPLERS = ("euler_maruyama", "heun_ode")
_SAMPLE_STREAM, _REF_STREAM, _KL_STREAM, _INIT_STREAM = 1, 2, 3, 4


# ---------------------------------------------------------------------- data
def make_data(args: argparse.Namespace) -> GaussianMixture:
    if args.data == "ring":
        return Ring(n_modes=8, radius=1.0, std=args.std)
    if args.data == "grid":
        return Grid(n_per_side=4, spacing=0.7, std=args.std)
    return RandomMixture(dim=2, n_components=6, seed=args.seed, spread=1.0, std_min=0.08, std_max=0.3)


# ---------------------------------------------------------------------- metrics
def sorted_projections(x: Tensor, directions: Tensor) -> Tensor:
    """theta_l^T x_i sorted over i for each direction, ``[L, n]`` (rows are contiguous: fast sort)."""
    return (directions @ x.double().T).sort(dim=1).values


def sliced_w2(x: Tensor, y: Tensor, directions: Tensor) -> float:
    """Sliced Wasserstein-2 (Rabin et al. 2011; Bonneel et al. 2015) between equal-size samples.

    SW2^2 = mean over unit directions theta of W2^2(theta^T x, theta^T y); in 1-D the optimal
    coupling of two n-point empirical measures pairs the sorted values.
    """
    return sliced_w2_sorted(sorted_projections(x, directions), sorted_projections(y, directions))


def sliced_w2_sorted(px: Tensor, py: Tensor) -> float:
    return float(((px - py) ** 2).mean().sqrt())


def _kernel_sum(a: Tensor, b: Tensor, bandwidth: float) -> Tensor:
    """sum_ij exp(-||a_i - b_j||^2 / (2 h^2)): squared distances by one matrix product, kernel values
    in fp32 (relative error ~1e-5 at the bandwidth scale), summed in fp64."""
    a, b = a.float(), b.float()
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return d2.clamp_(min=0.0).mul_(-0.5 / bandwidth**2).exp_().sum(dtype=torch.float64)


def mmd2_unbiased(x: Tensor, y: Tensor, bandwidth: float, kyy: float | None = None) -> float:
    """Unbiased MMD^2 with the Gaussian kernel (Gretton et al. 2012, JMLR, Eq. 3).

    ``kyy``: the y-y term (:func:`mmd2_yy`) when y is a fixed reference set, computed once."""
    x, y = x.double(), y.double()
    n, m = x.shape[0], y.shape[0]
    kxx = (_kernel_sum(x, x, bandwidth) - n) / (n * (n - 1))  # k(x, x) = 1 on the diagonal
    kyy = mmd2_yy(y, bandwidth) if kyy is None else kyy
    return float(kxx + kyy - 2.0 * _kernel_sum(x, y, bandwidth) / (n * m))


def mmd2_yy(y: Tensor, bandwidth: float) -> float:
    """The y-y term of :func:`mmd2_unbiased`: mean of k(y_i, y_j) over i != j."""
    m = y.shape[0]
    return float((_kernel_sum(y.double(), y.double(), bandwidth) - m) / (m * (m - 1)))


@dataclass
class Stat:
    mean: float
    se: float

    def fmt(self, digits: int = 3) -> str:
        if not math.isfinite(self.mean):
            return "nan"
        return f"{self.mean:.{digits}f}±{self.se:.{digits}f}"


def stat(values: list[float]) -> Stat:
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return Stat(statistics.fmean(values) if values else math.nan, math.nan)
    return Stat(statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values)))


@dataclass
class Evaluator:
    """Per-group metrics against fixed fresh data sets (the same for every configuration)."""

    data: GaussianMixture
    refs: list[Tensor]
    directions: Tensor
    bandwidth: float
    mmd_n: int
    sliced: bool = True  # also the sliced W2 (sampler_nfe.py's criterion does not use it)
    _sorted_refs: list[Tensor] = field(init=False)
    _kyy: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self._sorted_refs = [sorted_projections(ref, self.directions) if self.sliced else ref for ref in self.refs]
        self._kyy = [mmd2_yy(ref[: self.mmd_n], self.bandwidth) for ref in self.refs]

    def __call__(self, samples: Tensor) -> dict[str, Stat | int]:
        groups = samples.reshape(len(self.refs), -1, samples.shape[-1])
        finite = torch.isfinite(groups).all(-1)
        out: dict[str, list[float]] = {"logp": [], "sw2": [], "mmd2": []} if self.sliced else {"logp": [], "mmd2": []}
        for x, ref, sorted_ref, kyy, ok in zip(groups, self.refs, self._sorted_refs, self._kyy, finite):
            if not bool(ok.all()):
                for values in out.values():
                    values.append(math.nan)
                continue
            out["logp"].append(float(self.data.log_prob(x).mean()))
            if self.sliced:
                out["sw2"].append(sliced_w2_sorted(sorted_projections(x, self.directions), sorted_ref))
            out["mmd2"].append(mmd2_unbiased(x[: self.mmd_n], ref[: self.mmd_n], self.bandwidth, kyy))
        return {**{k: stat(v) for k, v in out.items()}, "nonfinite": int((~finite).sum())}


# ---------------------------------------------------------------------- training
def _quiet() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    for pattern in (".*does not have many workers.*", ".*LeafSpec.*", ".*torch.lu.*", ".*GPU available.*",
                    ".*TPU available.*"):
        warnings.filterwarnings("ignore", message=pattern)


def fit(module: lightning.LightningModule, datamodule: ToyDataModule, steps: int, clip: float) -> float:
    """Train for ``steps`` optimizer steps without validation; returns the wall time in seconds."""
    trainer = lightning.Trainer(accelerator="cpu", devices=1, max_steps=steps, precision="32-true",
                                gradient_clip_val=clip, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                                use_distributed_sampler=False, num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(module, datamodule)
    return time.perf_counter() - start


def datamodule(data: GaussianMixture, batch_size: int, seed: int) -> ToyDataModule:
    # 10^5 training points: with fresh noise every step this is close to training on fresh data
    return ToyDataModule(data, n_train=100_000, n_val=batch_size, n_test=batch_size, batch_size=batch_size, seed=seed)


def train_score(data: GaussianMixture, T: float, args: argparse.Namespace) -> tuple[ScoreModule, float]:
    torch.manual_seed(step_seed(args.seed, _INIT_STREAM, int(round(T * 1000))))
    net = MLP(dim=2, hidden=args.hidden, depth=args.depth)
    module = ScoreModule(net, VPSDE(T=T, eps=args.eps), data_shape=(2,), loss=DSMLoss("noise"),
                         optimizer=lambda p: torch.optim.Adam(p, lr=args.lr), ema_decay=args.ema_decay,
                         seed=args.seed)
    seconds = fit(module, datamodule(data, args.batch, args.seed), args.score_steps, clip=1.0)
    return module.eval(), seconds


def train_flow(data: GaussianMixture, T: float, args: argparse.Namespace) -> tuple[nn.Module, float]:
    torch.manual_seed(step_seed(args.seed, _INIT_STREAM, 10_000 + int(round(T * 1000))))
    cls = RealNVPPrior if args.flow == "realnvp" else NeuralSplinePrior
    prior = cls(dim=2, layers=args.flow_layers, hidden=args.flow_hidden)
    module = AuxPriorModule(prior, VPSDE(T=T, eps=args.eps), data_shape=(2,),
                            optimizer=lambda p: torch.optim.Adam(p, lr=args.lr), seed=args.seed)
    seconds = fit(module, datamodule(data, args.flow_batch, args.seed), args.flow_steps, clip=50.0)
    return module.prior.eval().requires_grad_(False), seconds


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------- costs
def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


@torch.no_grad()
def kl_from_exact(q_T: GaussianMixture, prior: nn.Module, n: int, seed: int) -> Stat:
    """KL(q_T || prior) = E_{q_T}[log q_T(x) - log prior(x)] by Monte Carlo with exact q_T samples."""
    x = q_T.sample(n, torch.Generator().manual_seed(seed))
    diff = (q_T.log_prob(x) - prior.log_prob(x).double()).tolist()
    return Stat(statistics.fmean(diff), statistics.stdev(diff) / math.sqrt(n))


# ---------------------------------------------------------------------- one configuration
@dataclass
class Contender:
    score: str  # "oracle" or "trained"
    T: float
    prior_name: str  # "gaussian", "flow" or "exact"
    prior: nn.Module
    sde: SDE
    score_fn: ScoreFn


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
    generator = torch.Generator().manual_seed(step_seed(args.seed, _SAMPLE_STREAM, index))
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


# ---------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--quick", action="store_const", const="quick", dest="mode", help="same as --mode quick")
    parser.add_argument("--data", choices=["ring", "grid", "random"], default="ring")
    parser.add_argument("--std", type=float, default=0.1, help="component std of ring/grid")
    parser.add_argument("--short-T", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--flow", choices=["realnvp", "nsf"], default="realnvp")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--batch", type=int, default=256, help="score training batch")
    parser.add_argument("--flow-batch", type=int, default=1024)
    parser.add_argument("--mmd-bandwidth", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "t_tradeoff_gmm.csv"))
    for key, value in MODES["quick"].items():  # every mode setting can be overridden
        kind = type(value[0]) if isinstance(value, list) else type(value)
        parser.add_argument(f"--{key.replace('_', '-')}", type=kind, nargs="+" if isinstance(value, list) else None,
                            default=None)
    args = parser.parse_args()
    for key, value in MODES[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if any(k % 2 for k in args.nfe):
        parser.error("--nfe values must be even (Heun uses 2 evaluations per step)")
    return args


@dataclass
class Setup:
    contenders: list[Contender] = field(default_factory=list)
    costs: list[dict] = field(default_factory=list)


def oracle_score_fn(data: GaussianMixture, sde: SDE) -> ScoreFn:
    """Exact score of the diffused mixture, grad log q_t(x)."""
    return lambda x, t: data.marginal_score(x, *sde.marginal_coeffs(t.double()))


def score_costs(data: GaussianMixture, sde: SDE, module: ScoreModule, seed: int) -> dict:
    """Time of one evaluation on 1000 samples (MLP and oracle) and KL(q_T || N(0, I))."""
    probe = data.sample(1000, torch.Generator().manual_seed(step_seed(seed, _KL_STREAM)))
    t = torch.full((1000,), 0.5 * sde.T)
    trained, oracle = module.score_fn(), oracle_score_fn(data, sde)
    kl = kl_from_exact(data.at_time(sde, sde.T), sde.prior((2,)), 20000, step_seed(seed, _KL_STREAM, 1))
    return {"score_params": num_params(module.net), "kl_gaussian": kl,
            "score_eval_ms_per_1k": median_ms(lambda: trained(probe, t), 20),
            "oracle_eval_ms_per_1k": median_ms(lambda: oracle(probe, t), 20)}


def flow_costs(flow: nn.Module, q_T: GaussianMixture, seed: int) -> dict:
    with torch.no_grad():
        draw_ms = median_ms(lambda: flow.sample(1000), 10)
    return {"flow_params": num_params(flow), "flow_draw_ms_per_1k": draw_ms,
            "kl_flow": kl_from_exact(q_T, flow, 20000, step_seed(seed, _KL_STREAM, 2))}


def build(data: GaussianMixture, args: argparse.Namespace) -> Setup:
    """Train one score network per T and one flow per short T; collect contenders and costs."""
    setup = Setup()
    for T in [1.0] + list(args.short_T):
        sde = VPSDE(T=T, eps=args.eps)
        q_T = data.at_time(sde, T)
        module, score_s = train_score(data, T, args)
        cost = {"T": T, "score_train_s": score_s, **score_costs(data, sde, module, args.seed)}
        priors = {"gaussian": sde.prior((2,)), "exact": q_T}
        if T < 1.0:
            priors["flow"], flow_s = train_flow(data, T, args)
            cost.update(flow_train_s=flow_s, **flow_costs(priors["flow"], q_T, args.seed))
        setup.costs.append(cost)
        print(f"# trained T={T:g}: score {score_s:.1f} s" + (f", flow {cost['flow_train_s']:.1f} s" if T < 1 else ""),
              flush=True)
        for name, prior in priors.items():
            setup.contenders.append(Contender("oracle", T, name, prior, sde, oracle_score_fn(data, sde)))
            setup.contenders.append(Contender("trained", T, name, prior, sde, module.score_fn()))
    return setup


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


def write_csv(path: Path, rows: list[dict], costs: list[dict], args: argparse.Namespace) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = []
    by_T = {c["T"]: c for c in costs}
    for r in rows:
        row, c = _flatten_stats(r), by_T.get(r["T"], {})
        row.update(steps={"euler_maruyama": r["nfe"], "heun_ode": r["nfe"] // 2}.get(r["sampler"], ""),
                   reps=args.reps, n=args.n, data=args.data, flow=args.flow if r["prior"] == "flow" else "",
                   score_steps=args.score_steps, score_train_s=c.get("score_train_s", ""),
                   flow_train_s=c.get("flow_train_s", "") if r["prior"] == "flow" else "")
        flat.append(row)
    _write_rows(path, flat)
    _write_rows(path.with_name(f"{path.stem}_costs{path.suffix}"), [_flatten_stats(c) for c in costs])


def _flatten_stats(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        if isinstance(v, Stat):
            out[f"{k}_mean"], out[f"{k}_se"] = v.mean, v.se
        else:
            out[k] = v
    return out


def _write_rows(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def fresh_sets(data: GaussianMixture, args: argparse.Namespace, offset: int) -> list[Tensor]:
    """``reps`` independent data sets of ``n`` samples (reference sets, or the data-vs-data floor)."""
    return [data.sample(args.n, torch.Generator().manual_seed(step_seed(args.seed, _REF_STREAM, offset + r)))
            for r in range(args.reps)]


def header(args: argparse.Namespace) -> str:
    return (f"# data {args.data} (std {args.std}), VP SDE eps={args.eps}; score MLP {args.hidden}x{args.depth}, "
            f"{args.score_steps} steps x batch {args.batch}, Adam {args.lr}, EMA {args.ema_decay}; flow {args.flow} "
            f"{args.flow_layers}x{args.flow_hidden}, {args.flow_steps} steps x batch {args.flow_batch}; "
            f"{args.reps} x {args.n} samples; MMD h={args.mmd_bandwidth} on {min(args.mmd_n, args.n)}; "
            f"SW2 {args.directions} dirs; {torch.get_num_threads()} thread(s)")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    _quiet()
    start = time.perf_counter()
    data = make_data(args)
    dirs = torch.randn(args.directions, 2, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    evaluator = Evaluator(data, fresh_sets(data, args, offset=0), dirs / dirs.norm(dim=1, keepdim=True),
                          args.mmd_bandwidth, args.mmd_n)
    print(header(args), flush=True)
    floor = evaluator(torch.cat(fresh_sets(data, args, offset=1000)))
    setup = build(data, args)
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
