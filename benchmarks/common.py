"""Shared helpers of the benchmarks; they import one another only through this module.

Run a benchmark as a script from the repository root (``python benchmarks/<name>.py``): the script's
own folder is on ``sys.path``, so ``import common`` finds this file, and the project itself is
imported as the installed package (``pip install -e .``), with no ``sys.path`` patching.

* The 2-D mixture kit of ``t_tradeoff_gmm.py`` and ``sampler_nfe.py``: data, metrics (E[log p],
  sliced W2, unbiased MMD^2, each with its standard error over fixed groups), training of the score
  MLP and the flow prior, costs, the contenders (score x T x prior) and their command-line options.
* The NFE cases of ``sampler_nfe.py`` and its sweeps (``sampler_nfe_t1_sweep.py``,
  ``fitted_grid_pilots.py``): a fixed x_T per (score, T, prior), fitted grids on a pilot batch, the
  converged references and the convergence criterion.
* The training-throughput comparison of ``train_throughput.py`` and ``gpu_check.py``: the Lightning
  path of ``train.py`` against a bare PyTorch loop on the same U-Net.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from datamodules.base import DiffusionDataModule, InMemoryDataset
from datamodules.toy import ToyDataModule
from difftime.aux_priors import NeuralSplinePrior, RealNVPPrior
from difftime.data import ImageScaling
from difftime.grid_fit import GridCosts, grid_costs, refine_grid
from difftime.losses import DSMLoss
from difftime.networks import MLP, UNet
from difftime.randomness import step_seed
from difftime.samplers import SAMPLERS, adaptive_ode, sde_dpm_solver_pp
from difftime.schedules import LogSNR, Schedule
from difftime.sde import SDE, VPSDE, ScoreFn
from difftime.toy import GaussianMixture, Grid, RandomMixture, Ring
from lightning_modules import AuxPriorModule, ScoreModule

RESULTS = Path(__file__).resolve().parent / "results"


# ====================================================================== the 2-D mixture kit
MODES: dict[str, dict] = {
    "quick": dict(score_steps=2000, hidden=64, depth=3, flow_layers=4, flow_hidden=64, flow_steps=600,
                  reps=3, n=2000, nfe=[10, 20, 50, 100], directions=128, mmd_n=1000),
    "full": dict(score_steps=5000, hidden=128, depth=3, flow_layers=8, flow_hidden=64, flow_steps=2000,
                 reps=5, n=5000, nfe=[10, 20, 50, 100, 200], directions=256, mmd_n=2000),
}


SAMPLE_STREAM, REF_STREAM, KL_STREAM, INIT_STREAM = 1, 2, 3, 4


# ---------------------------------------------------------------------- data
def make_data(args: argparse.Namespace) -> GaussianMixture:
    if args.data == "ring":
        return Ring(n_modes=8, radius=1.0, std=args.std)
    if args.data == "grid":
        return Grid(n_per_side=4, spacing=0.7, std=args.std)
    return RandomMixture(dim=2, n_components=6, seed=args.seed, spread=1.0, std_min=0.08, std_max=0.3)


def fresh_sets(data: GaussianMixture, args: argparse.Namespace, offset: int) -> list[Tensor]:
    """``reps`` independent data sets of ``n`` samples (reference sets, or the data-vs-data floor)."""
    return [data.sample(args.n, torch.Generator().manual_seed(step_seed(args.seed, REF_STREAM, offset + r)))
            for r in range(args.reps)]


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
def quiet() -> None:
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
    torch.manual_seed(step_seed(args.seed, INIT_STREAM, int(round(T * 1000))))
    net = MLP(dim=2, hidden=args.hidden, depth=args.depth)
    module = ScoreModule(net, VPSDE(T=T, eps=args.eps), data_shape=(2,), loss=DSMLoss("noise"),
                         optimizer=lambda p: torch.optim.Adam(p, lr=args.lr), ema_decay=args.ema_decay,
                         seed=args.seed)
    seconds = fit(module, datamodule(data, args.batch, args.seed), args.score_steps, clip=1.0)
    return module.eval(), seconds


def train_flow(data: GaussianMixture, T: float, args: argparse.Namespace) -> tuple[nn.Module, float]:
    torch.manual_seed(step_seed(args.seed, INIT_STREAM, 10_000 + int(round(T * 1000))))
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


def score_costs(data: GaussianMixture, sde: SDE, module: ScoreModule, seed: int) -> dict:
    """Time of one evaluation on 1000 samples (MLP and oracle) and KL(q_T || N(0, I))."""
    probe = data.sample(1000, torch.Generator().manual_seed(step_seed(seed, KL_STREAM)))
    t = torch.full((1000,), 0.5 * sde.T)
    trained, oracle = module.score_fn(), oracle_score_fn(data, sde)
    kl = kl_from_exact(data.at_time(sde, sde.T), sde.prior((2,)), 20000, step_seed(seed, KL_STREAM, 1))
    return {"score_params": num_params(module.net), "kl_gaussian": kl,
            "score_eval_ms_per_1k": median_ms(lambda: trained(probe, t), 20),
            "oracle_eval_ms_per_1k": median_ms(lambda: oracle(probe, t), 20)}


def flow_costs(flow: nn.Module, q_T: GaussianMixture, seed: int) -> dict:
    with torch.no_grad():
        draw_ms = median_ms(lambda: flow.sample(1000), 10)
    return {"flow_params": num_params(flow), "flow_draw_ms_per_1k": draw_ms,
            "kl_flow": kl_from_exact(q_T, flow, 20000, step_seed(seed, KL_STREAM, 2))}


# ---------------------------------------------------------------------- contenders
@dataclass
class Contender:
    score: str  # "oracle" or "trained"
    T: float
    prior_name: str  # "gaussian", "flow" or "exact"
    prior: nn.Module
    sde: SDE
    score_fn: ScoreFn


@dataclass
class Setup:
    contenders: list[Contender] = field(default_factory=list)
    costs: list[dict] = field(default_factory=list)


def oracle_score_fn(data: GaussianMixture, sde: SDE) -> ScoreFn:
    """Exact score of the diffused mixture, grad log q_t(x)."""
    return lambda x, t: data.marginal_score(x, *sde.marginal_coeffs(t.double()))


def build_setup(data: GaussianMixture, args: argparse.Namespace) -> Setup:
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


# ---------------------------------------------------------------------- options, CSV
def mixture_args(argv: Sequence[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """The data, training, metric and sample-size options of the 2-D mixture benchmarks."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--out", default=str(RESULTS / "t_tradeoff_gmm.csv"))
    for key, value in MODES["quick"].items():  # every mode setting can be overridden
        kind = type(value[0]) if isinstance(value, list) else type(value)
        parser.add_argument(f"--{key.replace('_', '-')}", type=kind, nargs="+" if isinstance(value, list) else None,
                            default=None)
    args = parser.parse_args(argv)
    for key, value in MODES[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if any(k % 2 for k in args.nfe):
        parser.error("--nfe values must be even (Heun uses 2 evaluations per step)")
    return args


def header(args: argparse.Namespace) -> str:
    return (f"# data {args.data} (std {args.std}), VP SDE eps={args.eps}; score MLP {args.hidden}x{args.depth}, "
            f"{args.score_steps} steps x batch {args.batch}, Adam {args.lr}, EMA {args.ema_decay}; flow {args.flow} "
            f"{args.flow_layers}x{args.flow_hidden}, {args.flow_steps} steps x batch {args.flow_batch}; "
            f"{args.reps} x {args.n} samples; MMD h={args.mmd_bandwidth} on {min(args.mmd_n, args.n)}; "
            f"SW2 {args.directions} dirs; {torch.get_num_threads()} thread(s)")


def flatten_stats(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        if isinstance(v, Stat):
            out[f"{k}_mean"], out[f"{k}_se"] = v.mean, v.se
        else:
            out[k] = v
    return out


def write_rows(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


# ====================================================================== NFE cases (sampler_nfe.py and its sweeps)
LOGP_TOL = 0.05


NFE_GRID = {"quick": [3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 30, 50, 100, 200],
            "full": [3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 25, 30, 40, 50, 70, 100, 140, 200, 300, 400]}


_X_T_STREAM, _NOISE_STREAM, _PILOT_STREAM = 21, 22, 23


PILOT_N, CANDIDATES, REFINE_SWEEPS = 512, 240, 2  # fitted grids: pilot from the case's prior, candidates


@dataclass
class Case:
    score: str
    T: float
    prior: str
    contender: Contender
    x_T: Tensor
    refs: dict[str, dict] = field(default_factory=dict)
    pilot_seed: int = 0
    costs: GridCosts | None = None
    fit_seconds: float = 0.0
    refine_nfe: int = 0

    def refined(self, config: Any, steps: int) -> Schedule:
        """The fitted grid tuned to ``config``'s sampler at ``steps`` (its pilot NFE are counted in ``refine_nfe``)."""
        costs, start = self.fitted(), time.perf_counter()
        on = lambda schedule: SAMPLERS[config.sampler](steps=steps, schedule=schedule, **dict(config.options))  # noqa: E731
        result = refine_grid(costs, on, self.contender.score_fn, self.contender.sde,
                             {"dp": costs.schedule(steps), "log_snr": LogSNR()}, steps, sweeps=REFINE_SWEEPS)
        self.refine_nfe += result.nfe
        self.fit_seconds += time.perf_counter() - start
        return result.schedule

    def fitted(self) -> GridCosts:
        """Step costs of this case's score from a pilot batch of its prior (seeds the evaluation does
        not use), computed once; every fitted grid of the case is cut from them."""
        if self.costs is None:
            start = time.perf_counter()
            with torch.no_grad():
                pilot = self.contender.prior.sample(PILOT_N, torch.Generator().manual_seed(self.pilot_seed)).float()
            self.costs = grid_costs(self.contender.score_fn, self.contender.sde, pilot, CANDIDATES)
            self.fit_seconds = time.perf_counter() - start
        return self.costs


def make_case(c: Contender, n: int, seed: int, index: int) -> Case:
    with torch.no_grad():
        x_T = c.prior.sample(n, torch.Generator().manual_seed(step_seed(seed, _X_T_STREAM, index))).float()
    return Case(c.score, c.T, c.prior_name, c, x_T, pilot_seed=step_seed(seed, _PILOT_STREAM, index))


def references(case: Case, evaluator: Evaluator, args: argparse.Namespace) -> None:
    """Converged values: dopri5 on the probability-flow ODE, and the reverse SDE on a fine grid."""
    c = case.contender
    x, info = adaptive_ode(c.score_fn, c.sde, case.x_T, rtol=1e-6, atol=1e-6)
    case.refs["ode"] = {**evaluator(x), "nfe": info["nfe"]}
    x, info = sde_dpm_solver_pp(c.score_fn, c.sde, case.x_T, args.ref_steps, noise(args), eta=1.0, order=1)
    case.refs["sde"] = {**evaluator(x), "nfe": info["nfe"]}


def noise(args: argparse.Namespace) -> torch.Generator:
    return torch.Generator().manual_seed(step_seed(args.seed, _NOISE_STREAM))


def converged(metrics: dict, ref: dict, floor: float) -> bool:
    return (abs(metrics["logp"].mean - ref["logp"].mean) <= LOGP_TOL
            and metrics["mmd2"].mean - ref["mmd2"].mean <= floor)


def nfe_args(argv: Sequence[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """The options of ``sampler_nfe.py``: its own, then every option of :func:`mixture_args`."""
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--full", action="store_true", help="t_tradeoff's full mode and the long NFE grid")
    own.add_argument("--score", choices=["oracle", "trained", "both"], default="both")
    own.add_argument("--ref-steps", type=int, default=None, help="steps of the reverse-SDE reference (500 / 1000)")
    own.add_argument("--out", default=str(RESULTS / "sampler_nfe.csv"))
    mine, rest = own.parse_known_args(argv)
    # the data, training, metric and sample-size options of t_tradeoff_gmm.py pass through
    args = mixture_args(["--mode", "full" if mine.full else "quick", *rest], description)
    vars(args).update(vars(mine))
    args.grid = NFE_GRID[args.mode]
    args.ref_steps = args.ref_steps or (1000 if mine.full else 500)
    if not mine.full and "--n" not in rest:  # quick: 3 x 1000 samples keeps the run within 15 min
        args.n = 1000
    return args


def evaluation(data, args: argparse.Namespace) -> tuple[Evaluator, dict]:
    """The evaluator against fixed fresh data sets, and its data-vs-data statistics (the floor)."""
    dirs = torch.randn(args.directions, 2, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    evaluator = Evaluator(data, fresh_sets(data, args, offset=0), dirs / dirs.norm(dim=1, keepdim=True),
                          args.mmd_bandwidth, args.mmd_n, sliced=False)
    return evaluator, evaluator(torch.cat(fresh_sets(data, args, offset=1000)))


def oracle_at_T1() -> tuple[argparse.Namespace, Evaluator, float, Contender]:
    """Quick-mode options, evaluator, MMD^2 floor and the oracle contender at T = 1 from N(0, I)
    (the setting of the sweep scripts), on one thread."""
    args = nfe_args(["--score", "oracle"])
    torch.set_num_threads(1)
    quiet()
    data = make_data(args)
    evaluator, floor_stats = evaluation(data, args)
    sde = VPSDE(T=1.0, eps=args.eps)
    contender = Contender("oracle", 1.0, "gaussian", sde.prior((2,)), sde, oracle_score_fn(data, sde))
    return args, evaluator, 2.0 * floor_stats["mmd2"].se, contender


# ====================================================================== training throughput (Lightning vs bare)
NETS = {
    "quickstart": dict(in_channels=1, resolution=28, nf=16, ch_mult=(1, 2, 4), num_res_blocks=1,
                       attn_resolutions=(), dropout=0.0, num_groups=8),  # configs/quickstart.yaml
    "cifar10": dict(),  # the UNet defaults are the DDPM++ CIFAR-10 configuration
}


class RandomImages(DiffusionDataModule):
    """Random uint8 images of the benchmark's shape (the input pipeline is not what is timed)."""

    name = "random"

    def __init__(self, shape: tuple[int, ...], n: int, batch_size: int) -> None:
        super().__init__(batch_size=batch_size)
        self.shape, self.n, self.scaling = tuple(shape), n, ImageScaling()

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.shape

    def build_fit(self):
        data = torch.randint(0, 256, (self.n, *self.shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        return InMemoryDataset(data), InMemoryDataset(data[:1])


class StepTimer(lightning.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.warmup:
            sync(trainer.strategy.root_device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, *args) -> None:
        sync(trainer.strategy.root_device)
        self.end = time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_net(args) -> UNet:
    torch.manual_seed(0)
    return UNet(**NETS[args.net])


def lightning_run(args, channels_last: bool, compile: bool) -> float:
    net = make_net(args)
    module = ScoreModule(net, VPSDE(), data_shape=tuple(image_shape(args)), ema_decay=0.999,
                         optimizer=lambda p: torch.optim.Adam(p, lr=2e-4), channels_last=channels_last, compile=compile)
    data = RandomImages(image_shape(args), args.batch * (args.steps + args.warmup), args.batch)
    timer = StepTimer(args.warmup)
    trainer = lightning.Trainer(accelerator=args.accelerator, devices=1, precision=args.precision,
                                max_steps=args.warmup + args.steps, gradient_clip_val=1.0, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                limit_val_batches=0, use_distributed_sampler=False, callbacks=[timer])
    trainer.fit(module, data)
    return args.batch * args.steps / (timer.end - timer.start)


def bare_run(args, channels_last: bool, compile: bool, ema: bool) -> float:
    device = torch.device(args.device)
    net = make_net(args).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    forward = torch.compile(net) if compile else net
    average = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True) if ema else None
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    loss_fn, sde, scaling = DSMLoss(), VPSDE(), ImageScaling()
    data = torch.randint(0, 256, (args.batch, *image_shape(args)), dtype=torch.uint8, device=device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16-mixed"
                else contextlib.nullcontext())
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(device)
            start = time.perf_counter()
        x0, _ = scaling(data)
        if channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        with autocast:
            loss = loss_fn(forward, sde, x0).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if average is not None:
            average.update_parameters(net)
    sync(device)
    return args.batch * args.steps / (time.perf_counter() - start)


def image_shape(args) -> list[int]:
    cfg = {"in_channels": 3, "resolution": 32, **NETS[args.net]}  # UNet's defaults are CIFAR-10's
    return [cfg["in_channels"], cfg["resolution"], cfg["resolution"]]


def compare(args, channels_last: bool = False, compile: bool = False) -> dict[str, float]:
    runs = {"lightning": [], "bare": [], "bare+ema": []}
    for _ in range(args.repeats):
        runs["bare"].append(bare_run(args, channels_last, compile, ema=False))
        runs["lightning"].append(lightning_run(args, channels_last, compile))
        runs["bare+ema"].append(bare_run(args, channels_last, compile, ema=True))
    return {k: statistics.median(v) for k, v in runs.items()}
