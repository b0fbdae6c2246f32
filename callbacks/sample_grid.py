"""Sample grid in TensorBoard every N training steps (images: a grid; 2-D data: a scatter)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torchvision
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from callbacks.distributed import gather_samples, generate_shard, shard_range


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

    def __init__(self, every_n_steps: int = 1000, n: int = 64, nrow: int | None = None,
                 steps: int | None = None, seed: int = 0, batch_size: int = 64) -> None:
        if every_n_steps < 1 or n < 1 or batch_size < 1:
            raise ValueError("SampleGrid: every_n_steps, n and batch_size must be >= 1")
        self.every_n_steps, self.n, self.nrow, self.steps = every_n_steps, n, nrow, steps
        self.seed, self.batch_size = seed, batch_size
        self._last_step = -1

    def should_run(self, trainer: Trainer) -> bool:
        step = trainer.global_step
        if trainer.fast_dev_run or trainer.sanity_checking:
            return False  # a smoke run checks the training loop, not hundreds of sampler steps
        return step > 0 and step % self.every_n_steps == 0 and step != self._last_step

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self.should_run(trainer):
            self.log_samples(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step != self._last_step and trainer.global_step > 0 and not trainer.fast_dev_run:
            self.log_samples(trainer, pl_module)

    @torch.no_grad()
    def log_samples(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_step = trainer.global_step
        indices = shard_range(self.n, trainer.global_rank, trainer.world_size)
        sample_fn = lambda k, generator: pl_module.sample(k, generator=generator, steps=self.steps)
        local, info = generate_shard(pl_module, indices, self.seed, self.batch_size, sample_fn)
        samples = gather_samples(trainer, local.float(), self.n)
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank asks
        if trainer.is_global_zero:
            self._write(trainer, pl_module, samples.cpu(), info, Path(log_dir or trainer.default_root_dir))

    def _write(self, trainer: Trainer, pl_module: LightningModule, samples: torch.Tensor, info: dict,
               log_dir: Path) -> None:
        step = trainer.global_step
        experiment = getattr(trainer.logger, "experiment", None)
        out_dir = log_dir / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        if samples.ndim == 4:
            grid = torchvision.utils.make_grid(pl_module.scaling.to_uint8(samples), nrow=self.nrow or int(self.n**0.5))
            save_png(grid, out_dir / f"step={step:08d}.png")
            if hasattr(experiment, "add_image"):
                experiment.add_image("samples", grid, global_step=step)
        else:
            figure = _scatter(samples.flatten(1), info)
            figure.savefig(out_dir / f"step={step:08d}.png", dpi=80)
            if hasattr(experiment, "add_figure"):
                experiment.add_figure("samples", figure, global_step=step)
        if hasattr(experiment, "add_scalar"):
            experiment.add_scalar("samples/nfe", float(info.get("nfe", 0)), global_step=step)


def save_png(grid: torch.Tensor, path: str | Path) -> None:
    """Write a uint8 image grid ``[C, H, W]`` as PNG (Pillow; torchvision.io's encoders are deprecated)."""
    from PIL import Image

    array = grid.cpu().permute(1, 2, 0).numpy()
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(path)


def _scatter(points: torch.Tensor, info: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4, 4))
    axis.scatter(points[:, 0], points[:, 1 if points.shape[1] > 1 else 0], s=4, alpha=0.6)
    axis.set_title(f"{points.shape[0]} samples, NFE {info.get('nfe', '?')}")
    axis.set_aspect("equal")
    return figure
