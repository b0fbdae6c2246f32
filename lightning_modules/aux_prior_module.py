"""AuxPriorModule: fits an auxiliary density nu ~ q_T, the prior of a finite-time diffusion.

Franzese et al. 2023 ("How Much is Enough?", Sec. 3): with a short diffusion time T the
forward-diffused data q_T is far from the Gaussian prior, and the ELBO pays
E_{x_0} KL(q(x_T | x_0) || prior). They fit an auxiliary model nu to samples of q_T by maximum
likelihood and start the reverse SDE/ODE from nu, integrating only from T to eps. Training
samples x_T = m(T) x_0 + s(T) z are drawn fresh every step from the data and the SDE, with the
same counter-based noise as the score model.

:class:`difftime.aux_priors.AuxPriorCheckpoint` turns a checkpoint of this module into a
frozen prior for :class:`~lightning_modules.score_module.ScoreModule` or ``sample.py``;
:func:`difftime.priors.check_prior` checks that it was trained for the same SDE at the same T
and the same data shape.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from difftime import checks
from difftime.aux_priors.checkpoint import checkpoint_record
from difftime.likelihood import prior_term
from difftime.priors import Prior
from difftime.sde import SDE
from difftime.utils import ConfigError, Generator, Stream, randn, step_seed
from lightning_modules.common import DiffusionSystem


class AuxPriorModule(DiffusionSystem):
    """Maximum-likelihood fit of an auxiliary prior nu to q_T, the data diffused to ``sde.T``.

    Logged (bits per dimension, in model space: the data after ``scaling``, without the
    dequantization Jacobian, since x_T is a continuous variable):

    * ``train/nll_bpd``, ``val/nll_bpd``: -log nu(x_T) / (D ln 2) on fresh samples x_T ~ q_T.
      For a VAE prior log nu is replaced by its lower bound (hyperparameters ``prior_exact``
      False, ``prior_bound`` e.g. ``iwae16``), so the value is an UPPER bound on the NLL.
    * ``val/kl_prior_bpd``: the ELBO's prior term E_{x_0}[KL(q(x_T | x_0) || nu)] / (D ln 2)
      (:func:`difftime.likelihood.prior_term`), and ``val/kl_prior_gaussian_bpd``, the same for
      the SDE's Gaussian prior: their difference is the gain from the auxiliary model.
      Both exceed KL(q_T || prior) by the same mutual information I(x_0; x_T).

    Density maths (x_T, log nu, the loss) runs in fp32 outside autocast under any precision.
    A non-finite loss or gradient (normflows' Glow can diverge) skips the step on every rank
    before the optimizer sees it (:class:`DiffusionSystem`). Glow's ActNorm is initialised in
    ``on_fit_start`` on a batch that is identical on every rank, so DDP replicas start equal.
    The checkpoint's hyperparameters hold plain types only, including everything
    :class:`~difftime.aux_priors.AuxPriorCheckpoint` needs (``prior_spec``, ``sde_hparams``,
    ``data_shape``).

    Args:
        prior: the auxiliary model (a :mod:`difftime.aux_priors` class), over ``data_shape``.
        sde: forward SDE; the prior models its marginal at ``sde.T``.
        data_shape: shape of one sample; linked from the datamodule by the CLI.
        optimizer, lr_scheduler: callables; the scheduler is stepped every optimizer step.
        seed: seed of the counter-based training noise.
        max_consecutive_skips: stop cleanly after this many consecutive non-finite steps.
        n_eval_prior: x_T draws per datum for the Monte-Carlo prior term in evaluation.
    """

    def __init__(
        self,
        prior: Prior,
        sde: SDE,
        data_shape: tuple[int, ...] = (2,),
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
        max_consecutive_skips: int = 20,
        n_eval_prior: int = 1,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, seed=seed, max_consecutive_skips=max_consecutive_skips)
        data_shape = tuple(int(d) for d in data_shape)
        if tuple(prior.event_shape) != data_shape:
            raise ConfigError("prior", type(prior).__name__,
                              f"a prior over samples of the data's shape {data_shape}, not {tuple(prior.event_shape)}",
                              "AuxPriorModule")
        self.n_eval_prior = checks.integer("n_eval_prior", n_eval_prior, "AuxPriorModule")
        self.save_plain_hyperparameters()
        self.save_hyperparameters(checkpoint_record(prior, sde, data_shape), logger=False)
        self.prior, self.sde, self.data_shape = prior, sde, data_shape
        self.reference_prior = sde.prior(data_shape)
        self._data_init_done = False
        names = ("nll", "kl_prior", "kl_prior_gaussian")
        self.metrics = nn.ModuleDict({f"{s}_{n}": MeanMetric() for s in ("val", "test") for n in names})

    # ------------------------------------------------------------------ inference
    def forward(self, x: Tensor, generator: Generator = None) -> Tensor:
        """log nu(x) ``[B]`` (a lower bound for a VAE; ``generator`` feeds its draws)."""
        return self.prior.log_prob(x, generator)

    @torch.no_grad()
    def sample(self, n: int, generator: Generator = None, steps: int | None = None) -> tuple[Tensor, dict]:
        """n samples ``[n, *data_shape]`` of nu, an approximation of q_T, and an info dict.

        The signature of :meth:`ScoreModule.sample`, so the sample-grid callback shows nu;
        ``steps`` is ignored (nothing is integrated: ``info["nfe"]`` is 0).
        """
        start = time.perf_counter()
        samples = self.prior.sample(n, generator)
        return samples, {"nfe": 0, "prior": type(self.prior).__name__, "T": self.sde.T,
                         "wall_time_s": time.perf_counter() - start}

    def diffuse(self, x0: Tensor, generator: Generator) -> Tensor:
        """x_T = m(T) x_0 + s(T) z, z ~ N(0, I) from ``generator`` (fp32)."""
        t = torch.full((x0.shape[0],), self.sde.T, device=x0.device)
        return self.sde.perturb(x0.float(), t, randn(x0.shape, generator, x0.device))

    def _no_autocast(self) -> torch.autocast:
        """Density maths in fp32 whatever the Trainer's precision (the priors cast too)."""
        return torch.autocast(device_type=self.device.type, enabled=False)

    def _bpd(self, nats: Tensor) -> Tensor:
        return nats / (self.data_dim * math.log(2.0))

    # ------------------------------------------------------------------ training
    def trainable(self) -> nn.Module:
        return self.prior

    hparam_metrics = ("val/nll_bpd", "val/kl_prior_bpd", "val/kl_prior_gaussian_bpd")

    def run_record(self) -> dict[str, Any]:
        """The base record plus the auxiliary model's class (HParams tab)."""
        params = sum(p.numel() for p in self.prior.parameters())
        return {**super().run_record(), "prior": type(self.prior).__name__, "prior_params": params}

    def on_fit_start(self) -> None:
        """ActNorm's data-dependent init on one batch that is identical on every rank."""
        super().on_fit_start()  # the TensorBoard record
        batch = self._init_batch()
        if batch is not None:
            self._data_init(batch)

    def _init_batch(self) -> Tensor | None:
        """The first global batch (``batch_size`` samples) of the training set, unshuffled."""
        datamodule = getattr(self.trainer, "datamodule", None)
        dataset = getattr(datamodule, "train_set", None)
        if dataset is None:
            return None
        size = min(len(dataset), int(getattr(datamodule, "batch_size", 256)))
        return torch.stack([torch.as_tensor(dataset[i]) for i in range(size)]).to(self.device)

    @torch.no_grad()
    def _data_init(self, batch: Tensor) -> None:
        """One log_prob pass on x_T of ``batch`` with noise seeded only by ``seed``.

        Glow's ActNorm layers set their scale and shift from the first batch they see (Kingma &
        Dhariwal 2018, Sec. 3.1); other priors ignore this pass. Every rank passes the same
        batch with the same noise, so all ranks hold the same parameters when training starts.
        """
        generator = torch.Generator().manual_seed(step_seed(self.seed, Stream.ACTNORM_INIT))
        x0, _ = self.scaling(batch, generator)
        with self._no_autocast():
            self(self.diffuse(x0, generator), generator)
        self._data_init_done = True

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        noise = self.step_noise(batch.shape[0])
        x0, _ = self.scaling(self.scaling.augment(batch, noise), noise)
        with self._no_autocast():
            x_T = self.diffuse(x0, noise)
            if not self._data_init_done:  # fit without a datamodule: init on the first global batch
                self._data_init_from_batch(x_T)
            nll = -self(x_T, noise)
        loss = self.guard_loss(nll.mean())
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/nll_bpd", self._bpd(loss))
        return loss

    def _data_init_from_batch(self, x_T: Tensor) -> None:
        """ActNorm init on this step's global batch of x_T, gathered so every rank sees it whole."""
        gathered = self.all_gather(x_T)
        generator = torch.Generator().manual_seed(step_seed(self.seed, Stream.ACTNORM_INIT))
        with torch.no_grad():
            self(gathered.flatten(0, 1) if gathered.ndim > x_T.ndim else gathered, generator)
        self._data_init_done = True

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def _evaluate(self, batch: Tensor, batch_idx: int, stage: str) -> None:
        noise = self.eval_noise(stage, batch_idx, batch.shape[0])
        x0, _ = self.scaling(batch, noise)
        with self._no_autocast():
            nll = -self(self.diffuse(x0, noise), noise)
            kl, _ = prior_term(self.sde, self.prior, x0, n_prior=self.n_eval_prior, generator=noise)
            kl_gaussian, _ = prior_term(self.sde, self.reference_prior, x0)
        for name, value in (("nll", nll), ("kl_prior", kl), ("kl_prior_gaussian", kl_gaussian)):
            metric = self.metrics[f"{stage}_{name}"]
            metric.update(self._bpd(value))
            self.log(f"{stage}/{name}_bpd", metric, on_step=False, on_epoch=True)
