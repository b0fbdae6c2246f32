"""Bits per dimension of the validation and test sets: variational bound and probability-flow ODE.

Per datum x (raw integers, or continuous toy vectors) the callback dequantizes and scales with the
module's own data scaling, y = 2 (x + u) / L - 1 with log_det = D log(2 / L) (``difftime.data``),
and evaluates the score model (EMA weights) with the module's prior at T, Gaussian or auxiliary:

    ELBO (Kingma et al. 2021 Eq. 17; Song et al. 2021b Thm. 1; ``difftime.likelihood.elbo``)
        bpd_elbo           = -(R - P - S + log_det) / (D ln 2)
        bpd_prior          =  P / (D ln 2)                    KL(q(x_T | y) || nu), a cost
        bpd_diffusion      =  S / (D ln 2)                    score-matching integral, a cost
        bpd_reconstruction = (R + log_det) / (D ln 2)         decoder log-likelihood on the data
                                                              scale, a contribution
    so that, exactly,  bpd_elbo = bpd_prior + bpd_diffusion - bpd_reconstruction.

    ODE (Song et al. 2021 Eq. 13; ``difftime.likelihood.ode_log_likelihood``): the density p_eps
    of the model at time eps is used as the continuous model of y, as Song et al. do, so
        bpd_ode = -(log p_eps(y) + log_det) / (D ln 2).
    With dequantization both are upper bounds on the discrete -log2 P(x) / D (Theis et al. 2016);
    a model uniform on [-1, 1]^D scores log2(L) = 8 bits/dim on 8-bit images.

Standard errors. Every datum i gets ONE draw of the estimator (dequantization u, times, noise,
Hutchinson probe), so b_i = b(x_i) + e_i with E[e_i | x_i] = 0. By the law of total variance,
Var b_i = Var_x b(x) + E Var(e_i | x_i): the sample variance of the b_i over the N data already
contains the Monte-Carlo noise, and ``*_se`` = sqrt(sample variance / N) is the standard error of
the mean as an estimate of the expectation over the data distribution. ``bpd_elbo_mc_se`` =
sqrt(sum_i se_i^2) / N is the smaller part due to the time/noise integrals alone (the
estimator's own per-datum SE, ``ElboTerms.total_se``), i.e. the error for this fixed set of
dequantized images; it is NaN when the estimator cannot report its spread (``n_t = 1``, or an
auxiliary prior with ``n_prior = 1``). It is an upper bound (collapsed strata, see
``difftime.likelihood._stratified_mean``): on digits it measured 2-2.5x the true Monte-Carlo
spread at ``n_t`` = 4-8, so it can exceed ``bpd_elbo_se``, which is unbiased.

Invariance. The randomness of datum i comes from a :class:`~difftime.utils.PerSampleNoise` row
seeded by its dataset index (``trainer.datamodule.sample_ids``), and per-datum sums, sums of
squares and counts are float64 torchmetrics states summed over ranks. The ELBO keys therefore do
not depend on the batch size or the number of devices (up to float64 summation order). The ODE
solver (dopri5) picks its steps for the whole batch it is given, so ``bpd_ode`` depends on the
batch composition at the level of the solver tolerance, unless all ``ode_max_samples`` data fall
into one batch on one rank.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torchmetrics import Metric
from typing_extensions import override

from callbacks.support.contract import ScoreSystem, is_due
from callbacks.support.progress import Tqdm, progress_for
from difftime import checks
from difftime.data import bits_per_dim
from difftime.likelihood import ElboTerms, elbo, ode_log_likelihood
from difftime.sde import ScoreFn
from difftime.utils import PerSampleNoise, Stream, step_seed

DEQUANTIZE, ODE_PROBES = 0, 1  # sub-streams: dequantization then the ELBO draws; Hutchinson probes


class PerSampleMoments(Metric):
    """Count, sum and sum of squares of named per-sample values, float64, summed over ranks.

    ``compute()`` returns ``{"count": N, "mean": {name: mean}, "se": {name: standard error of the
    mean}}`` over all ranks; it is a collective (every rank must call it) and exact up to float64
    round-off whatever the sharding. (After ``compute()`` the states hold this rank's share again.)
    """

    full_state_update = False

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        self.names = tuple(names)
        k = len(self.names)
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: dict[str, Tensor]) -> None:
        stacked = torch.stack([values[name].detach().to(torch.float64) for name in self.names])  # [k, B]
        self.count += stacked.shape[1]
        self.total += stacked.sum(1).to(self.total.device)
        self.total_sq += (stacked**2).sum(1).to(self.total.device)

    def compute(self) -> dict[str, Any]:
        n = self.count
        mean = self.total / n
        var = (self.total_sq - n * mean**2).clamp_min(0) / (n - 1)
        se = torch.sqrt(var / n)
        return {"count": n.clone(), "mean": dict(zip(self.names, mean)), "se": dict(zip(self.names, se))}

    def empty(self, device: torch.device) -> None:
        """Move to ``device``, reset, and record a zero-sample update (a rank may see no data)."""
        self.to(device)
        self.reset()
        self.update({name: torch.zeros(0, device=device) for name in self.names})


@contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside, each one's own mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class EvalSetCallback(Callback):
    """Per-sample metrics over the (first ``max_samples`` of the) validation/test set.

    Subclasses implement :meth:`start` (reset their metrics and say whether this loop is due),
    :meth:`update` (one batch) and :meth:`finish` (all ranks: compute and log). This class owns
    the interval (every ``every_n_validations``-th validation loop during fit; every
    ``validate``/``test`` call), the dataset indices of each batch and the per-sample noise.
    """

    stages: tuple[str, ...] = ("val", "test")
    owner = "EvalSetCallback"

    def __init__(self, every_n_validations: int = 1, max_samples: int | None = None, seed: int = 0) -> None:
        self.every_n_validations = checks.integer("every_n_validations", every_n_validations, self.owner)
        self.max_samples = checks.integer("max_samples", max_samples, self.owner, optional=True)
        self.seed = int(seed)
        self.validations = 0  # validation loops run during fit (sanity check excluded)
        self._active: dict[str, bool] = {}
        self._seen: dict[str, int] = {}
        self._rank_tag = 0  # 0 with dataset indices; the rank in the fallback (running counts)
        self._bar: Tqdm = Tqdm(disable=True)  # network evaluations of the running loop
        self._counted = 0

    # ------------------------------------------------------------------ interval
    def is_due(self, trainer: Trainer, every: int) -> bool:
        """Outside fit always; during fit on every ``every``-th validation loop."""
        return trainer.state.fn != TrainerFn.FITTING or is_due(self.validations, every)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))

    # ------------------------------------------------------------------ data and noise
    def sample_ids(self, trainer: Trainer, stage: str, batch_idx: int, size: int) -> Tensor:
        """Dataset indices of the batch; without a difftime datamodule, this rank's running count.

        The fallback makes results depend on the world size (and ``max_samples`` then counts per
        rank); difftime datamodules give true dataset indices.
        """
        datamodule = getattr(trainer, "datamodule", None)
        self._rank_tag = 0
        if datamodule is not None and hasattr(datamodule, "sample_ids"):
            ids = datamodule.sample_ids(stage, batch_idx)
            if ids.numel() == size:
                return ids
        start = self._seen.get(stage, 0)
        self._seen[stage], self._rank_tag = start + size, trainer.global_rank
        return torch.arange(start, start + size)

    @staticmethod
    def within(ids: Tensor, limit: int | None) -> Tensor:
        """Mask of the ids counted under ``limit`` (the first ``limit`` samples of the set)."""
        return torch.ones_like(ids, dtype=torch.bool) if limit is None else ids < limit

    def noise(self, ids: Tensor, stream: int, device: torch.device) -> PerSampleNoise:
        """Per-sample noise of data ``ids`` in sub-stream ``stream`` (DEQUANTIZE or ODE_PROBES).

        Dequantization u is the first draw of the DEQUANTIZE stream; the ELBO's times and noise
        follow in the same stream.
        """
        seeds = [step_seed(self.seed, Stream.METRIC, stream, self._rank_tag, i) for i in ids.tolist()]
        return PerSampleNoise(seeds, device)

    # ------------------------------------------------------------------ hooks
    def _start(self, trainer: Trainer, pl_module: ScoreSystem, stage: str) -> None:
        if stage == "val" and trainer.sanity_checking:
            self._active[stage] = False
            return
        if stage == "val" and trainer.state.fn == TrainerFn.FITTING:
            self.validations += 1
        self._seen[stage] = 0
        self._active[stage] = self.start(trainer, pl_module, stage)
        if self._active[stage]:  # a validation batch of the ODE or the KL gap can take minutes
            self._bar, self._counted = progress_for(trainer, f"{self.owner} ({stage})", None, "NFE"), 0

    def _batch(self, trainer: Trainer, pl_module: ScoreSystem, batch: Tensor, batch_idx: int,
               stage: str) -> None:
        if not self._active.get(stage):
            return
        ids = self.sample_ids(trainer, stage, batch_idx, batch.shape[0])
        with evaluating(pl_module):
            self.update(trainer, pl_module, stage, batch, ids.to(batch.device))
        self._counted += batch.shape[0]
        self._bar.set_postfix_str(f"{self._counted} data seen", refresh=False)

    def _end(self, trainer: Trainer, pl_module: ScoreSystem, stage: str) -> None:
        if self._active.pop(stage, False):
            self._bar.close()
            self.finish(trainer, pl_module, stage)

    def tracked(self, score_fn: ScoreFn) -> ScoreFn:
        """``score_fn`` that advances this loop's progress bar by one at every network evaluation."""
        def counted(x: Tensor, t: Tensor) -> Tensor:
            self._bar.update(1)
            return score_fn(x, t)

        return counted

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: ScoreSystem) -> None:
        self._start(trainer, pl_module, "val")

    @override
    def on_validation_batch_end(self, trainer: Trainer, pl_module: ScoreSystem, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch(trainer, pl_module, batch, batch_idx, "val")

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: ScoreSystem) -> None:
        self._end(trainer, pl_module, "val")

    @override
    def on_test_epoch_start(self, trainer: Trainer, pl_module: ScoreSystem) -> None:
        if "test" in self.stages:
            self._start(trainer, pl_module, "test")

    @override
    def on_test_batch_end(self, trainer: Trainer, pl_module: ScoreSystem, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch(trainer, pl_module, batch, batch_idx, "test")

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: ScoreSystem) -> None:
        self._end(trainer, pl_module, "test")

    # ------------------------------------------------------------------ subclass interface
    def start(self, trainer: Trainer, pl_module: ScoreSystem, stage: str) -> bool:
        raise NotImplementedError

    def update(self, trainer: Trainer, pl_module: ScoreSystem, stage: str, batch: Tensor, ids: Tensor) -> None:
        raise NotImplementedError

    def finish(self, trainer: Trainer, pl_module: ScoreSystem, stage: str) -> None:
        raise NotImplementedError


def log_values(pl_module: ScoreSystem, values: dict[str, float]) -> None:
    """Log values already reduced over ranks (identical everywhere). ``sync_dist`` averages
    identical numbers; it only keeps Lightning's epoch-level distributed check quiet."""
    for key, value in values.items():
        pl_module.log(key, float(value), on_step=False, on_epoch=True, sync_dist=True)


def elbo_bits(terms: ElboTerms, log_det: Tensor, dim: int) -> dict[str, Tensor]:
    """Per-datum bits/dim of the ELBO and its three terms (module docstring), float64 ``[B]``."""
    scale = dim * math.log(2.0)
    prior, diffusion = terms.prior.double() / scale, terms.diffusion.double() / scale
    reconstruction = (terms.reconstruction.double() + log_det.double()) / scale
    return {"bpd_elbo": bits_per_dim(terms.total.double(), log_det.double(), dim), "bpd_prior": prior,
            "bpd_diffusion": diffusion, "bpd_reconstruction": reconstruction,
            "mc_var": (terms.total_se.double() / scale) ** 2}


class BitsPerDim(EvalSetCallback):
    """ELBO and probability-flow bits/dim of the validation (during fit and ``validate``) and test sets.

    Logs ``<stage>/bpd_elbo``, ``bpd_elbo_se``, ``bpd_elbo_mc_se``, ``bpd_prior``, ``bpd_prior_se``,
    ``bpd_diffusion``, ``bpd_diffusion_se``, ``bpd_reconstruction`` and, when the ODE is due, ``bpd_ode``,
    ``bpd_ode_se``, ``bpd_ode_nfe`` (network evaluations per image, each with one
    vector-Jacobian product), with ``<stage>`` = ``val`` or ``test``; definitions and standard
    errors in the module docstring. Every rank must run it (metric reduction is a collective).

    Args:
        every_n_validations: during fit, evaluate the ELBO on every n-th validation loop
            (``validate`` and ``test`` always evaluate).
        max_samples: evaluate the first ``max_samples`` data of the set (dataset indices); None: all
            the batches the loop visits (``limit_val_batches`` still applies).
        n_t: lambda-strata of the diffusion term, one network evaluation each per datum.
        n_prior: prior samples for the Monte-Carlo prior term of an auxiliary prior.
        ode: also evaluate the probability-flow ODE likelihood. Off by default: it costs hundreds
            of network evaluations with a vector-Jacobian product per image (about 1.75 s per
            28x28 image on 2 CPU cores at tol 1e-3, README "Benchmarks"); ask for it with
            ``ode: true``, with a small ``ode_max_samples`` on a CPU.
        ode_every_n_validations: during fit, the ODE runs on every n-th validation loop.
        ode_max_samples: the ODE uses the first ``ode_max_samples`` data (None: as the ELBO).
        ode_rtol, ode_atol, ode_method: ``torchdiffeq.odeint`` settings; use an adaptive method
            (fixed-grid methods such as ``euler`` take one step from eps to T here).
        ode_probes: Hutchinson probes (independent solves) per datum.
        seed: seed of the per-sample evaluation noise.
        use_ema: evaluate the EMA weights (True) or the raw training weights.
    """

    owner = "BitsPerDim"
    @property
    def scalar_layout(self) -> dict[str, dict[str, list]]:
        """Custom-scalars charts (tags are regular expressions, hence anchored)."""
        terms = ["^val/bpd_elbo$", "^val/bpd_prior$", "^val/bpd_diffusion$", "^val/bpd_reconstruction$"]
        charts = {"ELBO bits/dim = prior + diffusion - reconstruction": ["Multiline", terms]}
        if self.ode:
            charts["ELBO vs ODE bits/dim"] = ["Multiline", ["^val/bpd_elbo$", "^val/bpd_ode$"]]
        return {"bits/dim": charts}

    @property
    def hparam_metrics(self) -> tuple[str, ...]:
        """What the HParams tab compares runs by (the ODE value only when it is computed)."""
        return ("val/bpd_elbo", "val/bpd_ode") if self.ode else ("val/bpd_elbo",)

    def __init__(self, every_n_validations: int = 1, max_samples: int | None = None, n_t: int = 16,
                 n_prior: int = 1, ode: bool = False, ode_every_n_validations: int = 1,
                 ode_max_samples: int | None = 128, ode_rtol: float = 1e-5, ode_atol: float = 1e-5,
                 ode_method: str = "dopri5", ode_probes: int = 1, seed: int = 0, use_ema: bool = True) -> None:
        super().__init__(every_n_validations, max_samples, seed)
        owner = self.owner
        self.n_t, self.n_prior = checks.integer("n_t", n_t, owner), checks.integer("n_prior", n_prior, owner)
        self.ode = bool(ode)
        self.ode_every_n_validations = checks.integer("ode_every_n_validations", ode_every_n_validations, owner)
        ode_probes = checks.integer("ode_probes", ode_probes, owner)
        ode_max_samples = checks.integer("ode_max_samples", ode_max_samples, owner, optional=True)
        ode_rtol, ode_atol = checks.real("ode_rtol", ode_rtol, owner), checks.real("ode_atol", ode_atol, owner)
        self.ode_max_samples, self.ode_probes = ode_max_samples, ode_probes
        self.ode_solver = {"rtol": float(ode_rtol), "atol": float(ode_atol), "method": ode_method}
        self.use_ema = bool(use_ema)
        self.elbo_metric = PerSampleMoments(("bpd_elbo", "bpd_prior", "bpd_diffusion", "bpd_reconstruction", "mc_var"))
        self.ode_metric = PerSampleMoments(("bpd_ode", "nfe"))
        self._due = {"elbo": False, "ode": False}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(max_samples=self.max_samples, n_t=self.n_t, seed=self.seed,
                                        ode_max_samples=self.ode_max_samples)

    @property
    def ode_limit(self) -> int | None:
        return self.ode_max_samples if self.ode_max_samples is not None else self.max_samples

    def start(self, trainer: Trainer, pl_module: ScoreSystem, stage: str) -> bool:
        self._due = {"elbo": self.is_due(trainer, self.every_n_validations),
                     "ode": self.ode and self.is_due(trainer, self.ode_every_n_validations)}
        for metric in (self.elbo_metric, self.ode_metric):
            metric.empty(pl_module.device)
        return any(self._due.values())

    def update(self, trainer: Trainer, pl_module: ScoreSystem, stage: str, batch: Tensor, ids: Tensor) -> None:
        # Each part dequantizes its own subset: noise rows are per sample, so a datum gets the
        # same u (hence the same y) in the ELBO and in the ODE.
        use_elbo = self.within(ids, self.max_samples) & self._due["elbo"]
        use_ode = self.within(ids, self.ode_limit) & self._due["ode"]
        if bool(use_elbo.any()):
            self._update_elbo(pl_module, batch[use_elbo], ids[use_elbo])
        if bool(use_ode.any()):
            self._update_ode(pl_module, batch[use_ode], ids[use_ode])

    def _update_elbo(self, pl_module: ScoreSystem, batch: Tensor, ids: Tensor) -> None:
        noise = self.noise(ids, DEQUANTIZE, pl_module.device)
        y, log_det = pl_module.scaling(batch, noise)
        terms = elbo(self.tracked(pl_module.score_fn(self.use_ema)), pl_module.eval_sde, pl_module.prior, y, n_t=self.n_t,
                     n_prior=self.n_prior, generator=noise)
        self.elbo_metric.update(elbo_bits(terms, log_det, y[0].numel()))

    def _update_ode(self, pl_module: ScoreSystem, batch: Tensor, ids: Tensor) -> None:
        y, log_det = pl_module.scaling(batch, self.noise(ids, DEQUANTIZE, pl_module.device))
        # Validation runs under inference mode; the divergence needs autograd, so leave it and
        # clone y into a normal tensor (ode_log_likelihood itself works in fp32 outside autocast).
        with torch.inference_mode(False):
            out = ode_log_likelihood(self.tracked(pl_module.score_fn(self.use_ema)), pl_module.eval_sde, pl_module.prior, y.clone(),
                                     n_probes=self.ode_probes, generator=self.noise(ids, ODE_PROBES, y.device),
                                     **self.ode_solver)
        bpd = bits_per_dim(out.log_prob.double(), log_det.double(), y[0].numel())
        nfe = torch.full_like(bpd, out.nfe / self.ode_probes)
        self.ode_metric.update({"bpd_ode": bpd, "nfe": nfe})

    def finish(self, trainer: Trainer, pl_module: ScoreSystem, stage: str) -> None:
        values: dict[str, float] = {}
        if self._due["elbo"]:
            stats = self.elbo_metric.compute()
            mean, se, count = stats["mean"], stats["se"], float(stats["count"])
            for name in ("bpd_elbo", "bpd_prior", "bpd_diffusion", "bpd_reconstruction"):
                values[f"{stage}/{name}"] = float(mean[name])
            for name in ("bpd_elbo", "bpd_prior", "bpd_diffusion"):
                values[f"{stage}/{name}_se"] = float(se[name])
            values[f"{stage}/bpd_elbo_mc_se"] = math.sqrt(float(mean["mc_var"]) / count) if count else math.nan
        if self._due["ode"]:
            stats = self.ode_metric.compute()
            values[f"{stage}/bpd_ode"] = float(stats["mean"]["bpd_ode"])
            values[f"{stage}/bpd_ode_se"] = float(stats["se"]["bpd_ode"])
            values[f"{stage}/bpd_ode_nfe"] = float(stats["mean"]["nfe"])
        log_values(pl_module, values)
