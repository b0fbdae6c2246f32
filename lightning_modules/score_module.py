"""ScoreModule: trains a noise-prediction network by denoising score matching on [eps, T].

The system owns devices, precision, logging and the optimisation loop; the maths (SDE, loss,
samplers, priors) lives in :mod:`diffusion`. Randomness of a training step (diffusion times,
noise, dequantization, flips, dropout) is counter-based on (seed, batch counter, rank) and drawn
for the whole global batch, so a resumed or re-sharded run draws exactly the same numbers.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from diffusion.data import ContinuousScaling, DataScaling
from diffusion.losses import DSMLoss
from diffusion.priors import Prior
from diffusion.samplers import EulerMaruyama, Sampler
from diffusion.score import make_score_fn
from diffusion.sde import SDE, ScoreFn
from diffusion.utils import ConfigError, Generator, ShardedNoise, step_seed

_PLAIN = (type(None), bool, int, float, str)


def _is_plain(value: Any) -> bool:
    """Only plain types go into checkpoint hyperparameters, so checkpoints load with weights_only."""
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return isinstance(value, _PLAIN)


class ScoreModule(LightningModule):
    """Score model of a diffusion with finite diffusion time ``sde.T``.

    Args:
        net: noise-prediction network ``net(x_t, t) -> eps_hat``.
        sde: forward SDE with its diffusion time T and truncation eps.
        data_shape: shape of one sample; linked from the datamodule by the CLI.
        loss: denoising score matching loss (weighting, importance sampling).
        sampler: default sampler for :meth:`sample` and the sample-grid callback.
        prior: path of a trained auxiliary-prior checkpoint (AuxPriorModule) used as the prior
            at T; ``None`` uses the SDE's Gaussian prior.
        optimizer, lr_scheduler: callables; the scheduler is stepped every optimizer step.
        ema_decay: decay of the fp32 exponential moving average of the weights (0 disables it:
            the EMA then tracks the weights exactly).
        seed: seed of the counter-based training noise.
        max_consecutive_skips: stop cleanly after this many consecutive non-finite steps.
        channels_last, compile: memory format and ``torch.compile`` of the network.
    """

    def __init__(
        self,
        net: nn.Module,
        sde: SDE,
        data_shape: tuple[int, ...] = (2,),
        loss: DSMLoss | None = None,
        sampler: Sampler | None = None,
        prior: str | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        ema_decay: float = 0.9999,
        seed: int = 0,
        max_consecutive_skips: int = 20,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= ema_decay < 1.0:
            raise ConfigError("ema_decay", ema_decay, "0 <= ema_decay < 1", "ScoreModule")
        if max_consecutive_skips < 1:
            raise ConfigError("max_consecutive_skips", max_consecutive_skips, ">= 1", "ScoreModule")
        self.save_hyperparameters()
        self.remove_ignored_hparams([k for k, v in self.hparams.items() if not _is_plain(v)])
        self.net, self.sde, self.data_shape = net, sde, tuple(int(d) for d in data_shape)
        if hasattr(net, "check_input_shape"):
            net.check_input_shape(self.data_shape)
        self.loss_fn = loss or DSMLoss()
        self.sampler = sampler or EulerMaruyama()
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.seed, self.max_consecutive_skips = seed, max_consecutive_skips
        self.channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        self.prior = self._build_prior(prior)
        self.scaling: DataScaling = ContinuousScaling()
        # counters restored with the weights: the noise of batch k is a function of k
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self._consecutive_skips, self._skip_this_step = 0, False
        self._last_loss = torch.zeros(())
        if compile:
            self.net.compile()

    def _build_prior(self, path: str | None) -> nn.Module:
        if path is None:
            return self.sde.prior(self.data_shape)
        from lightning_modules.aux_prior_module import load_aux_prior

        return load_aux_prior(path, sde=self.sde, data_shape=self.data_shape)

    # ------------------------------------------------------------------ inference
    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """EMA network's noise prediction."""
        return self.ema.module(x, t)

    def score_fn(self, use_ema: bool = True) -> ScoreFn:
        return make_score_fn(self.ema.module if use_ema else self.net, self.sde)

    @torch.no_grad()
    def sample(self, n: int, generator: Generator = None, sampler: Sampler | None = None,
               prior: Prior | None = None, steps: int | None = None,
               callback: Callable[[dict], None] | None = None) -> tuple[Tensor, dict]:
        """Draw x_T from the prior and integrate back to eps with the EMA network.

        Returns model-space samples ``[n, *data_shape]`` and the sampler's info plus the prior
        used and the wall time (``info["nfe"]`` counts network evaluations).
        """
        sampler, prior = sampler or self.sampler, prior or self.prior
        was_training = self.ema.training
        self.ema.eval()
        start = time.perf_counter()
        try:
            x_T = prior.sample(n, generator).to(self.device)
            samples, info = sampler(self.score_fn(), self.sde, x_T, steps=steps, generator=generator,
                                    callback=callback)
        finally:
            self.ema.train(was_training)
        info.update(prior=type(prior).__name__, wall_time_s=time.perf_counter() - start, T=self.sde.T)
        return samples, info

    # ------------------------------------------------------------------ training
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "scaling"):
            self.scaling = datamodule.scaling

    def step_noise(self, global_batch: int, local_batch: int) -> ShardedNoise:
        """Generator for this step: seeded by (seed, batch counter); this rank's slice of it."""
        seed = step_seed(self.seed, int(self.batches_seen))
        generator = torch.Generator(device=self.device).manual_seed(seed)
        offset = self.global_rank * local_batch
        return ShardedNoise(generator, global_batch, offset)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        noise = self.step_noise(batch.shape[0] * self.trainer.world_size, batch.shape[0])
        torch.manual_seed(step_seed(self.seed, int(self.batches_seen), self.global_rank, 1))  # dropout
        x0, _ = self.scaling(self.scaling.augment(batch, noise), noise)
        if self.channels_last and x0.ndim == 4:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        loss = self.loss_fn(self.net, self.sde, x0, noise).mean()
        self.batches_seen += 1
        self._last_loss = loss.detach()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Detect a non-finite loss or gradient on all ranks together, before the step.

        Gradients are already all-reduced (and unscaled under fp16), so the decision is the same
        on every rank; the loss flag is reduced explicitly. A faulty step is skipped everywhere:
        the gradients are dropped (Adam then updates neither weights nor moments), and the EMA
        and the LR scheduler are not stepped. Under fp16 an overflow with a finite loss is the
        grad scaler's business (it skips the step and lowers the scale), not a fault.
        """
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True).float() if grads else torch.zeros((), device=self.device)
        loss_bad = self.trainer.strategy.reduce((~torch.isfinite(self._last_loss)).float(), reduce_op="sum") > 0
        grad_bad = not torch.isfinite(norm)
        self._skip_this_step = bool(loss_bad or grad_bad)
        overflow = grad_bad and not loss_bad and getattr(self.trainer.precision_plugin, "scaler", None) is not None
        if self._skip_this_step:
            optimizer.zero_grad(set_to_none=True)
        if self._skip_this_step and not overflow:
            self.skipped_steps += 1
            self._consecutive_skips += 1
            if self._consecutive_skips >= self.max_consecutive_skips:
                self.trainer.should_stop = True
        elif not self._skip_this_step:
            self._consecutive_skips = 0
            self.log("train/grad_norm", norm)
        self.log("train/skipped_steps", self.skipped_steps.float())

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if not self._skip_this_step:
            self.ema.update_parameters(self.net)

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        if not self._skip_this_step:
            super().lr_scheduler_step(scheduler, metric)

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self._eval_loss(batch, batch_idx, "val")

    def test_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self._eval_loss(batch, batch_idx, "test")

    def _eval_loss(self, batch: Tensor, batch_idx: int, stage: str) -> Tensor:
        seed = step_seed(self.seed, 2**32 + batch_idx, self.global_rank)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        x0, _ = self.scaling(batch, generator)
        loss = self.loss_fn(self.ema.module, self.sde, x0, generator).mean()
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=batch.shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.net.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @property
    def data_dim(self) -> int:
        return math.prod(self.data_shape)
