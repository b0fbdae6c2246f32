"""Trade-off curves of the diffusion time from one checkpoint (Franzese et al. 2023, Sec. 4).

A score model trained on [eps, T] is evaluated as if the diffusion stopped at each T' of a grid
(``difftime.likelihood.truncated_elbo``): the diffusion term integrates [eps, T'] only and the
prior term compares q(x_T' | x_0) with the Gaussian prior of ``sde.with_T(T')``. In bits/dim, per
datum (dequantized and scaled as in :mod:`callbacks.bpd`, same per-sample noise):

    prior(T')     = KL(q(x_T' | x_0) || N(0, s_prior^2 I)) / (D ln 2)
    diffusion(T') = S_[eps, T'] / (D ln 2)
    bpd(T')       = prior(T') + diffusion(T') - (R + log_det) / (D ln 2)

Averaged over the data, prior(T') is KL(q_T' || nu) + I(x_0; x_T') (the marginal KL gap of the
paper plus the mutual information between data and x_T'), both decreasing in T'; the diffusion
term grows with T'. T* = argmin_T' bpd(T') is the best diffusion time the model supports with a
Gaussian prior. An auxiliary prior (Franzese et al. Sec. 3) exists only at its training T, so with
one the decomposition at T is also reported with that prior in place of the Gaussian.

Logged scalars (validation loop; T' printed with three decimals). TensorBoard's default view
(Time Series) sorts tag groups by name and opens the first two, ``samples`` and ``train``: the
KL-gap groups are named to sort after ``train/`` and ``val/``, the summary first and the
per-T' values, one card each, last:

    val_kl_gap/T_star, val_kl_gap/bpd_star      T* and bpd(T*), bits/dim
    val_kl_gap/reconstruction                   the reconstruction term (the same for every T')
    val_kl_gap/curves                           the figure: every term against T' (an image)
    val_kl_gap_by_T/prior/T=0.400               prior(T'), bits/dim
    val_kl_gap_by_T/diffusion/T=0.400           diffusion(T'), bits/dim
    val_kl_gap_by_T/bpd/T=0.400                 bpd(T'), bits/dim
    val_kl_gap_by_T/aux_prior/T=1.000, val_kl_gap_by_T/aux_bpd/T=1.000   (auxiliary prior only)

Rank zero also writes ``<log_dir>/kl_gap/step=<step>.csv`` (columns T, prior_bpd, prior_se,
diffusion_bpd, diffusion_se, reconstruction_bpd, reconstruction_se, total_bpd, total_se, prior; the
last is ``gaussian`` or ``aux:<class>``; total = prior + diffusion - reconstruction per row,
exactly, for the means) and the figure as PNG. ``<step>`` is ``trainer.global_step``, the step the
scalars are logged at. TensorBoard's Custom Scalars tab shows one chart per term holding every T'
(:attr:`KLGap.scalar_layout`).
Standard errors are those of the mean over data of one-draw-per-datum estimates, which include the
Monte-Carlo noise (law of total variance; see :mod:`callbacks.bpd`).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import NamedTuple

import torch
from lightning.pytorch import Trainer
from torch import Tensor
from typing_extensions import override

from callbacks.bpd import DEQUANTIZE, EvalSetCallback, PerSampleMoments, elbo_bits, log_values
from callbacks.support.contract import ScoreSystem
from difftime import checks
from difftime.likelihood import ElboTerms, prior_term, truncated_elbo
from difftime.priors import GaussianPrior
from difftime.utils import ConfigError



class Row(NamedTuple):
    """One point of the curves (a CSV row): means and standard errors in bits/dim."""

    T: float
    prior_bpd: float
    prior_se: float
    diffusion_bpd: float
    diffusion_se: float
    reconstruction_bpd: float  # (R + log_det) / (D ln 2), subtracted: total = prior + diffusion - reconstruction
    reconstruction_se: float
    total_bpd: float
    total_se: float
    prior: str  # "gaussian" or "aux:<class>"


#: tag groups (the part before the first '/'): after ``train`` and ``val`` in TensorBoard's sort
SUMMARY, BY_T = "val_kl_gap", "val_kl_gap_by_T"
#: the figure's resolution in TensorBoard (shown near 1:1 in a card) and in the PNG file
FIGURE_DPI, FILE_DPI = 80, 160


def t_label(T: float) -> str:
    return f"T={T:.3f}"


class KLGap(EvalSetCallback):
    """Prior (KL gap), diffusion and total bits/dim against the truncation time T' (module docstring).

    Args:
        T_grid: truncation times T' (each in (eps, T]); None: ``n_grid`` equally spaced values
            T/n, 2T/n, ..., T. The model's own T is always added.
        n_grid: size of the default grid.
        every_n_validations: during fit, run on every n-th validation loop (``validate`` always).
        max_samples: the first ``max_samples`` validation data (None: every batch the loop visits).
        n_t: lambda-strata per piece between consecutive grid points (network evaluations per
            datum: n_t times the number of grid points).
        n_prior: prior samples for the Monte-Carlo prior term of an auxiliary prior.
        seed: seed of the per-sample noise (the same seed as :class:`~callbacks.BitsPerDim`
            gives the same dequantization).
        use_ema: evaluate the EMA weights.
    """

    stages = ("val",)
    owner = "KLGap"
    hparam_metrics = (f"{SUMMARY}/T_star", f"{SUMMARY}/bpd_star")
    scalar_layout = {"KL gap over T'": {
        "prior(T'), the KL gap, bits/dim": ["Multiline", [rf"^{BY_T}/prior/T=.*", rf"^{BY_T}/aux_prior/T=.*"]],
        "diffusion(T'), bits/dim": ["Multiline", [rf"^{BY_T}/diffusion/T=.*"]],
        "total bpd(T') = prior + diffusion - reconstruction": ["Multiline", [rf"^{BY_T}/bpd/T=.*",
                                                                             rf"^{BY_T}/aux_bpd/T=.*"]],
        "T* and its bits/dim": ["Multiline", [f"^{SUMMARY}/T_star$", f"^{SUMMARY}/bpd_star$",
                                              f"^{SUMMARY}/reconstruction$"]]}}

    def __init__(self, T_grid: list[float] | None = None, n_grid: int = 10, every_n_validations: int = 1,
                 max_samples: int | None = 500, n_t: int = 4, n_prior: int = 1, seed: int = 0,
                 use_ema: bool = True) -> None:
        super().__init__(every_n_validations, max_samples, seed)
        self.n_grid, self.n_t = checks.integer("n_grid", n_grid, self.owner), checks.integer("n_t", n_t, self.owner)
        self.n_prior = checks.integer("n_prior", n_prior, self.owner)
        if T_grid is not None and (not T_grid or min(T_grid) <= 0):
            raise ConfigError("T_grid", T_grid, "a non-empty list of positive times, or null", self.owner)
        self.T_grid = T_grid
        self.use_ema = bool(use_ema)
        self.grid: list[float] = []
        self.aux, self.eval_T = False, 0.0
        self.metric = PerSampleMoments(())

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(T_grid=self.T_grid, n_grid=self.n_grid, max_samples=self.max_samples,
                                        seed=self.seed)

    def make_grid(self, T: float, eps: float, eval_T: float | None = None) -> list[float]:
        """Sorted grid with T (and the evaluation's T') included; raises ConfigError unless every T' is in (eps, T]."""
        values = self.T_grid if self.T_grid is not None else [T * (k + 1) / self.n_grid for k in range(self.n_grid)]
        grid = sorted({float(v) for v in values} | {float(T), float(eval_T if eval_T is not None else T)})
        if grid[0] <= eps or grid[-1] > T:
            raise ConfigError("T_grid", self.T_grid, f"times in (eps, T] = ({eps:g}, {T:g}]", self.owner)
        if len({t_label(v) for v in grid}) != len(grid):
            raise ConfigError("T_grid", self.T_grid, "times at least 0.001 apart (they name the logged keys)",
                              self.owner)
        return grid

    def check_config(self, trainer: Trainer, pl_module: ScoreSystem) -> None:
        """Called by train.py before any process group or step: a T' outside (eps, T] fails
        now, with its config key, instead of at the first validation, possibly hours in."""
        self.make_grid(pl_module.sde.T, pl_module.sde.eps, pl_module.eval_sde.T)

    def start(self, trainer: Trainer, pl_module: ScoreSystem, stage: str) -> bool:
        if not self.is_due(trainer, self.every_n_validations):
            return False
        self.grid = self.make_grid(pl_module.sde.T, pl_module.sde.eps, pl_module.eval_sde.T)
        self.eval_T = pl_module.eval_sde.T
        self.aux = not isinstance(pl_module.prior, GaussianPrior)
        parts = ("prior", "diffusion", "reconstruction", "total")
        names = [f"{part}{i}" for i in range(len(self.grid)) for part in parts]
        self.metric = PerSampleMoments(names + (["aux_prior", "aux_total"] if self.aux else []))
        self.metric.empty(pl_module.device)
        return True

    def update(self, trainer: Trainer, pl_module: ScoreSystem, stage: str, batch: Tensor, ids: Tensor) -> None:
        keep = self.within(ids, self.max_samples)
        if not bool(keep.any()):
            return
        noise = self.noise(ids[keep], DEQUANTIZE, pl_module.device)
        y, log_det = pl_module.scaling(batch[keep], noise)
        dim, sde = y[0].numel(), pl_module.sde
        results = truncated_elbo(self.tracked(pl_module.score_fn(self.use_ema)), sde, y, self.grid, n_t=self.n_t,
                                 n_prior=self.n_prior, generator=noise)
        values: dict[str, Tensor] = {}
        for i, terms in enumerate(results.values()):
            bits = elbo_bits(terms, log_det, dim)
            values.update({f"prior{i}": bits["bpd_prior"], f"diffusion{i}": bits["bpd_diffusion"],
                           f"reconstruction{i}": bits["bpd_reconstruction"], f"total{i}": bits["bpd_elbo"]})
        if self.aux:  # the auxiliary prior lives at the evaluation's T' only
            at_T = results[pl_module.eval_sde.T]
            kl, kl_se = prior_term(pl_module.eval_sde, pl_module.prior, y, n_prior=self.n_prior, generator=noise)
            bits = elbo_bits(ElboTerms(kl, at_T.diffusion, at_T.reconstruction, kl_se, at_T.diffusion_se), log_det, dim)
            values.update(aux_prior=bits["bpd_prior"], aux_total=bits["bpd_elbo"])
        self.metric.update(values)

    def finish(self, trainer: Trainer, pl_module: ScoreSystem, stage: str) -> None:
        summary = self.metric.compute()
        rows = self.rows(summary, type(pl_module.prior).__name__)
        best = min((row for row in rows if row.prior == "gaussian"), key=lambda row: row.total_bpd)
        log_values(pl_module, {**curve_keys(rows), f"{SUMMARY}/T_star": best.T, f"{SUMMARY}/bpd_star": best.total_bpd,
                               f"{SUMMARY}/reconstruction": best.reconstruction_bpd})
        log_dir = trainer.log_dir or trainer.default_root_dir  # a broadcast under DDP: every rank asks
        if trainer.is_global_zero:
            self._write(trainer, Path(log_dir) / "kl_gap", rows, best.T, int(summary["count"]))

    def rows(self, summary: dict, prior_name: str) -> list[Row]:
        """One row per T' with the Gaussian prior, plus the auxiliary prior's row at T."""
        def stat(name: str) -> tuple[float, float]:
            return float(summary["mean"][name]), float(summary["se"][name])

        rows = [Row(T, *stat(f"prior{i}"), *stat(f"diffusion{i}"), *stat(f"reconstruction{i}"), *stat(f"total{i}"),
                    "gaussian") for i, T in enumerate(self.grid)]
        if self.aux:
            at_T = rows[self.grid.index(self.eval_T)]
            rows.append(Row(at_T.T, *stat("aux_prior"), at_T.diffusion_bpd, at_T.diffusion_se, at_T.reconstruction_bpd,
                            at_T.reconstruction_se, *stat("aux_total"), f"aux:{prior_name}"))
        return rows

    def _write(self, trainer: Trainer, out_dir: Path, rows: list[Row], T_star: float, count: int) -> None:
        step = trainer.global_step
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / f"step={step:08d}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(Row._fields)
            writer.writerows([*(repr(float(v)) for v in row[:-1]), row.prior] for row in rows)
        figure = curves_figure(rows, T_star, count, step)
        figure.savefig(out_dir / f"step={step:08d}.png", dpi=FILE_DPI)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_figure"):
            experiment.add_figure(f"{SUMMARY}/curves", figure, global_step=step)  # closes the figure
        else:
            import matplotlib.pyplot as plt

            plt.close(figure)


def curve_keys(rows: list[Row]) -> dict[str, float]:
    """Logged scalars of the rows (module docstring)."""
    values = {}
    for row in rows:
        label = t_label(row.T)
        if row.prior == "gaussian":
            values.update({f"{BY_T}/prior/{label}": row.prior_bpd, f"{BY_T}/diffusion/{label}": row.diffusion_bpd,
                           f"{BY_T}/bpd/{label}": row.total_bpd})
        else:
            values.update({f"{BY_T}/aux_prior/{label}": row.prior_bpd, f"{BY_T}/aux_bpd/{label}": row.total_bpd})
    return values


def curves_figure(rows: list[Row], T_star: float, count: int, step: int = 0):
    """Every term against T' with +-2 SE bars, auxiliary-prior points marked: one figure.

    Sized for a TensorBoard card, which shows images about 220 px tall and scales them without
    smoothing: a wide, low figure at screen resolution (so it is shown near 1:1), large type, and
    the legend to the right of the axes, where it covers no curve. The PNG file is written at a
    higher resolution by the caller.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gaussian = [row for row in rows if row.prior == "gaussian"]
    T = [row.T for row in gaussian]
    figure, axis = plt.subplots(figsize=(6.0, 3.0), dpi=FIGURE_DPI, layout="constrained")
    terms = (("total", "total", 1, "k", 2.5), ("prior", "prior (KL gap)", 1, "C0", 1.8),
             ("diffusion", "diffusion", 1, "C1", 1.8), ("reconstruction", "−reconstruction", -1, "C2", 1.8))
    handles = []
    for name, label, sign, color, width in terms:
        means = [sign * getattr(row, f"{name}_bpd") for row in gaussian]
        bars = [2 * getattr(row, f"{name}_se") for row in gaussian]
        handles.append(axis.errorbar(T, means, yerr=bars, marker="o", ms=4, lw=width, capsize=2, color=color,
                                     label=label))
    handles.append(axis.axvline(T_star, color="grey", ls="--", lw=1.5, label=f"T* = {T_star:.3g}"))
    for row in rows:
        if row.prior != "gaussian":
            handles += axis.plot([row.T] * 2, [row.prior_bpd, row.total_bpd], "*", color="C3", ms=12,
                                 label=f"{row.prior.removeprefix('aux:')}:\nprior, total")
    axis.set_xlabel("T'", fontsize=13)
    axis.set_ylabel("bits/dim", fontsize=13)
    axis.tick_params(labelsize=12)
    axis.grid(alpha=0.3)
    figure.legend(handles=handles, loc="outside right upper", fontsize=12, frameon=False, handlelength=1.5,
                  title=f"step {step}\n{count} data, ±2 SE", title_fontsize=11, alignment="left")
    return figure
