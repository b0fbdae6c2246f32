"""ScoreModule: trains a noise-prediction network by denoising score matching on [eps, T].

The system owns devices, precision, logging and the optimisation loop; the maths (SDE, loss,
samplers, priors) lives in :mod:`diffusion`. Randomness of a training step (diffusion times,
noise, dequantization, flips, dropout) is counter-based on (seed, batch counter, rank) and drawn
for the whole global batch, so a resumed or re-sharded run draws exactly the same numbers.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from difftime import checks
from difftime.data import bits_per_dim
from difftime.likelihood import elbo
from difftime.losses import DSMLoss
from difftime.networks import NoisePredictor
from difftime.priors import Prior, check_prior, describe_prior, same_q_T
from difftime.samplers import EulerMaruyama, Sampler
from difftime.score import make_score_fn
from difftime.sde import SDE, ScoreFn
from difftime.utils import ConfigError, Generator, PerSampleNoise
from lightning_modules.common import DiffusionSystem


class ScoreModule(DiffusionSystem):
    """Score model of a diffusion with finite diffusion time ``sde.T``.

    Args:
        net: noise-prediction network ``net(x_t, t) -> eps_hat``.
        sde: forward SDE with its diffusion time T and truncation eps.
        data_shape: shape of one sample; linked from the datamodule by the CLI.
        loss: denoising score matching loss (weighting, importance sampling).
        sampler: default sampler for :meth:`sample` and the sample-grid callback.
        prior: the distribution at T the reverse process starts from, any
            :class:`~difftime.priors.Prior`: ``None`` is the SDE's Gaussian prior; an auxiliary
            prior is injected as ``{class_path: difftime.aux_priors.AuxPriorCheckpoint,
            init_args: {path: <AuxPriorModule checkpoint>}}`` and must have been trained for
            this SDE at this T on this data shape (:func:`difftime.priors.check_prior`). Its
            weights are not stored in this module's checkpoints: the prior is part of the
            evaluation, chosen by the config.
        optimizer, lr_scheduler: callables; the scheduler is stepped every optimizer step.
        ema_decay: decay of the fp32 exponential moving average of the weights (0 disables it:
            the EMA then tracks the weights exactly).
        seed: seed of the counter-based training noise.
        max_consecutive_skips: stop cleanly after this many consecutive non-finite steps.
        channels_last, compile: memory format and ``torch.compile`` of the network.
        eval_T: post-hoc truncation (Franzese et al. 2023, Sec. 4): evaluate and sample as if the
            diffusion stopped at T' = ``eval_T``, with eps < T' <= ``sde.T``. The network and the
            training SDE stay what they are (training still runs on [eps, T]); the reverse
            process and the bound start at T' (``self.eval_sde``), from the SDE's Gaussian prior
            at T' or from an auxiliary prior trained at exactly T'. None: T' = T.
    """

    def __init__(
        self,
        net: NoisePredictor,
        sde: SDE,
        data_shape: tuple[int, ...] = (2,),
        loss: DSMLoss | None = None,
        sampler: Sampler | None = None,
        prior: Prior | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        ema_decay: float = 0.9999,
        seed: int = 0,
        max_consecutive_skips: int = 20,
        channels_last: bool = False,
        compile: bool = False,
        eval_T: float | None = None,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, seed=seed, max_consecutive_skips=max_consecutive_skips)
        checks.real("ema_decay", ema_decay, "ScoreModule", 0.0, 1.0, low_open=False)
        self.ema_decay = float(ema_decay)
        self.save_plain_hyperparameters()
        self.net, self.sde, self.data_shape = net, sde, tuple(int(d) for d in data_shape)
        if hasattr(net, "check_input_shape"):
            net.check_input_shape(self.data_shape)
        self.loss_fn = loss or DSMLoss()
        self.sampler = sampler or EulerMaruyama()
        self.channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        self.eval_sde = self._truncated(sde, eval_T)
        self.prior = prior if prior is not None else self.eval_sde.prior(self.data_shape)
        self._check_prior()
        self._check_schedule()
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        if compile:
            self.net.compile()

    def _check_schedule(self) -> None:
        """Build the sampler's grid for ``eval_sde`` once, so that a tabulated grid made for another
        SDE, T' or step count fails here, naming the key, before any work."""
        schedule, steps = getattr(self.sampler, "schedule", None), getattr(self.sampler, "steps", None)
        if schedule is None or steps is None:
            return
        try:
            schedule(self.eval_sde, steps)
        except ConfigError as error:
            if error.key != "steps":
                raise
            raise ConfigError("steps", steps, error.allowed, type(self.sampler).__name__) from None

    @staticmethod
    def _truncated(sde: SDE, eval_T: float | None) -> SDE:
        """The SDE that evaluation runs: the training SDE, or the same SDE stopped at T' = eval_T.

        The message says where the key comes from (``sample.py --eval_T`` sets it) and where the
        bound T comes from (the score model's own training SDE), not only the config paths.
        """
        if eval_T is None:
            return sde
        ok = not isinstance(eval_T, bool) and isinstance(eval_T, (int, float)) and math.isfinite(eval_T)
        if not (ok and sde.eps < eval_T <= sde.T):
            raise ConfigError("eval_T", eval_T, f"eps < T' <= T, i.e. ({sde.eps:g}, {sde.T:g}]: the score model was "
                              f"trained up to T = {sde.T:g} (its sde's T) and cannot start later",
                              "ScoreModule post-hoc truncation T', set by sample.py --eval_T")
        return sde.with_T(eval_T)

    def _check_prior(self) -> None:
        """:func:`~difftime.priors.check_prior` for the evaluation SDE; a prior fitted at another T
        fails with the ways out: the Gaussian prior, that prior's own T, or a prior trained at T'."""
        try:
            return check_prior(self.prior, self.eval_sde.hparams(), self.data_shape)
        except ValueError as error:
            failure = error
        trained_for = getattr(self.prior, "trained_for", None) or {}
        prior_T, shape = trained_for.get("T"), tuple(getattr(self.prior, "event_shape", ()))
        if prior_T is None or shape != self.data_shape or not same_q_T({**trained_for, "T": self.eval_sde.T},
                                                                       self.eval_sde.hparams()):
            raise failure
        # raised outside the handler: one error, not a chain (entry points print its line alone)
        raise ValueError(f"{failure}; {prior_remedies(float(prior_T), self.sde, self.eval_sde.T, self.prior)}")

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The prior's weights belong to the prior's own source, not to the score model."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("prior.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the configured prior: its weights (in checkpoints written before they were left
        out) are replaced by the current prior's, so a strict load keeps what the config says."""
        super().on_load_checkpoint(checkpoint)
        state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("prior.")}
        state.update({f"prior.{k}": v for k, v in self.prior.state_dict().items()})
        checkpoint["state_dict"] = state

    # ------------------------------------------------------------------ TensorBoard record
    hparam_metrics = ("val/loss",)
    scalar_layout = {"loss": {"train/loss and val/loss": ["Multiline", ["^train/loss$", "^val/loss$"]]}}

    def run_record(self) -> dict[str, Any]:
        """The base record plus what a score run is compared by: T', prior, sampler, network."""
        record = super().run_record()
        steps = getattr(self.sampler, "steps", None)
        record.update({"T_eval": float(self.eval_sde.T), "prior": describe_prior(self.prior), "sampler": self.sampler.name,
                       "sampler_steps": int(steps) if steps is not None else "adaptive",
                       "score_net": type(self.net).__name__, "score_net_params": sum(p.numel() for p in self.net.parameters()),
                       "train_ema_decay": float(self.ema_decay),
                       "train_loss_weighting": str(getattr(self.loss_fn, "weighting", "?"))})
        return record

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
        """Draw x_T' from the prior and integrate back to eps with the EMA network (T' = ``eval_sde.T``).

        Returns model-space samples ``[n, *data_shape]`` and the sampler's info plus the prior
        used and the wall time (``info["nfe"]`` counts network evaluations).
        """
        sampler, prior = sampler or self.sampler, prior or self.prior
        was_training = self.ema.training
        self.ema.eval()
        start = time.perf_counter()
        try:
            x_T = prior.sample(n, generator).to(self.device)
            samples, info = sampler(self.score_fn(), self.eval_sde, x_T, steps=steps, generator=generator,
                                    callback=callback)
        finally:
            self.ema.train(was_training)
        info.update(prior=describe_prior(prior), wall_time_s=time.perf_counter() - start, T=self.eval_sde.T)
        return samples, info

    def to_images(self, samples: Tensor) -> Tensor:
        """Model-space samples -> what a person looks at: uint8 images ``[B, C, H, W]`` (fp32 vectors for toy data)."""
        return self.scaling.to_output(samples)

    @torch.no_grad()
    def bits_per_dim(self, x: Tensor, n_t: int = 16, generator: Generator = None) -> Tensor:
        """ELBO bits/dim ``[B]`` of raw data ``x`` (uint8 pixels) on the standard 8-bit scale.

        The continuous-time bound of :func:`difftime.likelihood.elbo` at T' = ``eval_sde.T`` with
        this module's prior, dequantized and scaled by the data scaling (its log-Jacobian
        included), EMA weights; one stochastic draw per datum (seed ``generator``).
        """
        was_training = self.ema.training
        self.ema.eval()
        try:
            y, log_det = self.scaling(x.to(self.device), generator)
            terms = elbo(self.score_fn(), self.eval_sde, self.prior, y, n_t=n_t, generator=generator)
        finally:
            self.ema.train(was_training)
        return bits_per_dim(terms.total.double(), log_det.double(), y[0].numel())

    # ------------------------------------------------------------------ training
    def trainable(self) -> nn.Module:
        return self.net

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        noise = self.step_noise(batch.shape[0])
        x0, _ = self.scaling(self.scaling.augment(batch, noise), noise)
        if self.channels_last and x0.ndim == 4:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        loss = self.guard_loss(self.loss_fn(self.net, self.sde, x0, noise).mean())
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def after_optimizer_step(self) -> None:
        self.ema.update_parameters(self.net)

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self._eval_loss(batch, batch_idx, "val")

    def test_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self._eval_loss(batch, batch_idx, "test")

    def _eval_loss(self, batch: Tensor, batch_idx: int, stage: str) -> Tensor:
        noise = self.eval_noise(stage, batch_idx, batch.shape[0])
        x0, _ = self.scaling(batch, noise)
        loss = self.loss_fn(self.ema.module, self.sde, x0, noise)
        metric = self.val_loss if stage == "val" else self.test_loss
        metric.update(loss)
        self.log(f"{stage}/loss", metric, on_step=False, on_epoch=True)
        return loss.mean()

    #: called after every sampler step of :meth:`predict_step` (the progress bar sets it per batch)
    step_callback: Callable[[dict], None] | None = None

    def predict_step(self, batch: Tensor, batch_idx: int) -> dict[str, Tensor]:
        """``train.py predict``: samples for the indices in ``batch``, sample i from seed ``seed + i``.

        Samples come back in the data's output form (``scaling.to_output``: uint8 images, clamped
        and rounded; vector data in model space).
        """
        noise = PerSampleNoise([self.seed + int(i) for i in batch], self.device)
        samples, _ = self.sample(batch.shape[0], generator=noise, callback=self.step_callback)
        return {"index": batch, "samples": self.scaling.to_output(samples)}


def prior_remedies(prior_T: float, sde: SDE, eval_T: float, prior: Prior) -> str:
    """The ways out when an auxiliary prior fitted at ``prior_T`` meets a process started at T' = ``eval_T``:
    the Gaussian prior at T', the prior's own T (when the score model reaches it), or a prior trained at T'."""
    options = [f"use the Gaussian prior at T' = {eval_T:g} (sample.py --prior gaussian; prior: null in a config)"]
    if sde.eps < prior_T <= sde.T:
        options.append(f"truncate at T' = {prior_T:g} (sample.py --eval_T {prior_T:g})")
    run = Path(str(getattr(prior, "path", "") or "")).parts  # runs/aux_<config>/<version>/checkpoints/last.ckpt
    name = next((part[4:] for part in run if part.startswith("aux_")), "<data>_<flow>")
    T_file = f"configs/T/{eval_T:g}.yaml"
    where = (f"--config {T_file}" if (Path(__file__).resolve().parents[1] / T_file).is_file() else
             f"--model.init_args.sde.init_args.T {eval_T:g} --trainer.logger.init_args.version T{eval_T:g}")
    options.append(f"train an auxiliary prior at T = {eval_T:g} (python train.py fit --config configs/aux/{name}.yaml {where})")
    return f"this prior exists at T = {prior_T:g} only: " + ", or ".join(options)
