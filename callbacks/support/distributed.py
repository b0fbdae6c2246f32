"""Sharded generation with per-sample seeds: no duplicated or missing samples across ranks.

Sample i is always generated from seed ``seed + i`` (a :class:`~difftime.utils.PerSampleNoise`
row), whatever the number of ranks or the batch size, so a metric computed on N samples is the
same on 1 or 8 GPUs.
"""

from __future__ import annotations

from typing import Callable

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from difftime.utils import generate_indexed, shard_range


def generate_shard(pl_module: LightningModule, indices: range, seed: int, batch_size: int,
                   sample_fn: Callable | None = None) -> tuple[Tensor, dict]:
    """Generate samples ``indices`` (seed + i each) in batches on this rank; returns samples and info."""
    sample_fn = sample_fn or (lambda k, generator: pl_module.sample(k, generator=generator))
    chunks, infos = generate_indexed(sample_fn, indices, seed, batch_size, pl_module.device)
    if not chunks:
        return torch.empty(0, *pl_module.data_shape, device=pl_module.device), {"nfe": 0}
    return torch.cat(chunks), infos[-1]


def gather_samples(trainer: Trainer, local: Tensor, n: int) -> Tensor:
    """All-gather every rank's block (padded to equal size) and restore the order 0..n-1.

    A collective: every rank must call it.
    """
    world = trainer.world_size
    if world == 1:
        return local
    width = -(-n // world)
    padded = torch.zeros(width, *local.shape[1:], dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    gathered = trainer.strategy.all_gather(padded)  # [world, width, *D]
    blocks = [gathered[r, : len(shard_range(n, r, world))] for r in range(world)]
    return torch.cat(blocks)
