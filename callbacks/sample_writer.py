"""Writes the samples of ``train.py predict`` to disk (one file per rank, no gather needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from difftime.render import render


class SampleWriter(BasePredictionWriter):
    """Save ``{output_dir}/samples_rank{r}.npz`` (keys ``index``, ``samples``) at the end of predict.

    ``samples`` are in the data's output form (:meth:`difftime.data.DataScaling.to_output`: uint8
    ``[N, C, H, W]`` for images, float32 model-space vectors for toy data); ``index`` says which
    sample each row is, so the rank files can be merged in order. A single process also writes
    ``samples.png`` (:func:`difftime.render.render`: an image grid or a scatter, in index order).

        python train.py predict --config runs/quickstart/default/config.yaml \\
            --ckpt_path runs/quickstart/default/checkpoints/last.ckpt \\
            --data.init_args.num_predict 64 --trainer.callbacks+=callbacks.SampleWriter \\
            --trainer.callbacks.output_dir samples/
    """

    def __init__(self, output_dir: str = "samples", nrow: int | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir, self.nrow = Path(output_dir), nrow

    @override
    def write_on_epoch_end(self, trainer: Trainer, pl_module: LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        if not predictions:
            return
        index = torch.cat([p["index"] for p in predictions]).cpu()
        samples = torch.cat([p["samples"] for p in predictions]).cpu()
        order = torch.argsort(index)
        index, samples = index[order], samples[order]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        np.savez(self.output_dir / f"samples_rank{trainer.global_rank}.npz", index=index.numpy(),
                 samples=samples.numpy())
        if trainer.world_size == 1:
            rendered = render(samples, self.nrow, f"{len(samples)} samples")
            rendered.save(self.output_dir / "samples.png")
            rendered.close()
