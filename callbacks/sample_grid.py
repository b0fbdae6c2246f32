"""Sample grid in TensorBoard every N training steps (images: a grid; 2-D data: a scatter)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from typing_extensions import override

from callbacks.support.contract import SampleSource, is_due
from callbacks.support.distributed import gather_samples, generate_shard
from callbacks.support.progress import SamplingProgress
from difftime import checks
from difftime.render import render
from difftime.utils import shard_range


class SampleGrid(Callback):
    """Generate ``n`` samples with the EMA weights, the module's sampler and its prior.

    Sample i always uses seed ``seed + i``, so grids from successive steps show the same noise
    and differ only by training. Generation is sharded across ranks (each rank must run this);
    rank zero writes ``samples`` (image or figure) to the logger and a PNG to
    ``<log_dir>/samples/step=<step>.png``.

    Args:
        every_n_steps: interval in optimizer steps (also run at the end of training if > 0).
        n: number of samples; nrow: grid width (default sqrt(n)).
        steps: sampler steps (None: the sampler's own).
        batch_size: generation batch per rank.
    """

    #: none in the HParams tab: the NFE follows from the sampler and its steps, which are hparams
    #: there; ``samples/nfe`` is still logged with every grid
    hparam_metrics: tuple[str, ...] = ()

    def __init__(self, every_n_steps: int = 1000, n: int = 64, nrow: int | None = None,
                 steps: int | None = None, seed: int = 0, batch_size: int = 64) -> None:
        owner = "SampleGrid"
        self.every_n_steps = checks.integer("every_n_steps", every_n_steps, owner)
        self.n, self.batch_size = checks.integer("n", n, owner), checks.integer("batch_size", batch_size, owner)
        self.nrow = checks.integer("nrow", nrow, owner, optional=True)
        self.steps = checks.integer("steps", steps, owner, optional=True)
        self.seed = int(seed)
        self._last_step = -1

    def should_run(self, trainer: Trainer) -> bool:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return False  # a smoke run checks the training loop, not hundreds of sampler steps
        return is_due(trainer.global_step, self.every_n_steps, self._last_step)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: SampleSource, *args: Any) -> None:
        if self.should_run(trainer):
            self.log_samples(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: SampleSource) -> None:
        if trainer.global_step != self._last_step and trainer.global_step > 0 and not trainer.fast_dev_run:
            self.log_samples(trainer, pl_module)

    @torch.no_grad()
    def log_samples(self, trainer: Trainer, pl_module: SampleSource) -> None:
        self._last_step = trainer.global_step
        indices = shard_range(self.n, trainer.global_rank, trainer.world_size)
        sampler = getattr(pl_module, "sampler", None)  # None: an auxiliary prior, drawn in one pass
        with SamplingProgress.open(trainer, f"SampleGrid step {trainer.global_step}", len(indices),
                                   self.batch_size, sampler, self.steps) as tracker:
            sample_fn = sampling_fn(pl_module, self.steps, tracker if sampler is not None else None)
            local, info = generate_shard(pl_module, indices, self.seed, self.batch_size, sample_fn)
        samples = gather_samples(trainer, local.float(), self.n)
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank asks
        if trainer.is_global_zero:
            self._write(trainer, pl_module, samples.cpu(), info, Path(log_dir or trainer.default_root_dir))

    def _write(self, trainer: Trainer, pl_module: SampleSource, samples: torch.Tensor, info: dict,
               log_dir: Path) -> None:
        step = trainer.global_step
        out_dir = log_dir / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        caption = (f"step {step}: {self.n} samples | {info.get('sampler', '?')} | NFE {info.get('nfe', '?')} | "
                   f"prior {info.get('prior', '?')} | T {info.get('T', '?')}")
        rendered = render(pl_module.scaling.to_output(samples), self.nrow, caption)
        rendered.save(out_dir / f"step={step:08d}.png")
        experiment = getattr(trainer.logger, "experiment", None)  # None without a logger
        if hasattr(experiment, "add_image"):
            rendered.log(experiment, "samples", step)
            experiment.add_scalar("samples/nfe", float(info.get("nfe", 0)), global_step=step)
        rendered.close()


def sampling_fn(pl_module: SampleSource, steps: int | None, tracker: SamplingProgress | None) -> Any:
    """``(k, generator) -> (samples, info)``, reporting every sampler step to ``tracker`` if given."""
    if tracker is None:
        return lambda k, generator: pl_module.sample(k, generator=generator, steps=steps)
    return lambda k, generator: pl_module.sample(k, generator=generator, steps=steps, callback=tracker.step)
