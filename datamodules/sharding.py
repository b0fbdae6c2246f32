"""Index samplers (torch.utils.data) that shard every global batch across ranks: any world size sees the same data.

Training (:class:`ShardedSampler`): epoch e uses the permutation pi_e drawn from
``torch.Generator().manual_seed(step_seed(seed, Stream.EPOCH_SHUFFLE, e))``. The incomplete global batch is dropped;
global batch k is ``pi_e[k G : (k + 1) G]`` (G the global batch size) and rank r takes its
contiguous slice ``[r b, (r + 1) b)`` with b = G / world_size. Concatenating the ranks' k-th
batches in rank order therefore gives exactly the k-th batch of a single-process run.

Evaluation (:class:`EvalShardSampler`): no shuffling, padding or duplicates. Rank r takes a
contiguous block of the dataset; block sizes differ by at most one sample, and the blocks in
rank order are exactly ``0, ..., N - 1``.

Both subclass :class:`torch.utils.data.DistributedSampler` only so that Lightning recognises
them as already sharded and never wraps them in a second distributed sampler (which would
shard twice, or pad evaluation with duplicates) even if ``use_distributed_sampler=True``.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

from difftime.randomness import Stream, shard_range, step_seed
from difftime.utils import ConfigError


def check_world(batch_size: int, world_size: int, rank: int = 0, owner: str = "") -> int:
    """Per-rank share ``batch_size // world_size`` of a global batch; it must divide evenly."""
    if batch_size < 1:
        raise ConfigError("batch_size", batch_size, "an integer >= 1", owner)
    if batch_size % world_size != 0:
        raise ConfigError("batch_size", batch_size, f"a multiple of the world size {world_size}", owner)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    return batch_size // world_size


class ShardedSampler(DistributedSampler):
    """Dataset indices for one rank's slice of every global training batch.

    Use it with ``DataLoader(batch_size=batch_size // world_size, drop_last=False)``: it yields
    whole per-rank batches back to back, so the loader's k-th batch is this rank's slice of
    global batch k.

    ``len(self)`` is always the full epoch (``num_batches * local_batch_size``), also while a
    :meth:`skip` is pending: Lightning counts the batches before a mid-epoch resume as done and
    ends the epoch when its counter reaches ``len(loader)``, so a shortened length would end
    the resumed epoch early. :attr:`remaining_batches` says what the next pass yields.
    """

    def __init__(self, size: int, batch_size: int, world_size: int = 1, rank: int = 0,
                 shuffle: bool = True, seed: int = 0) -> None:
        self.local_batch_size = check_world(batch_size, world_size, rank, type(self).__name__)
        super().__init__(range(size), num_replicas=world_size, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=True)
        self.size, self.batch_size = int(size), int(batch_size)
        self.num_batches = self.size // self.batch_size
        self.num_samples = self.num_batches * self.local_batch_size
        self.total_size = self.num_batches * self.batch_size
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``'s permutation; a pending skip survives only the same epoch."""
        if epoch != self.epoch:
            self._skip = 0
        self.epoch = int(epoch)

    def skip(self, n_batches: int) -> None:
        """Start the next pass after the first ``n_batches`` batches of the current epoch (once)."""
        if not 0 <= n_batches <= self.num_batches:
            raise ValueError(f"cannot skip {n_batches} of {self.num_batches} batches")
        self._skip = int(n_batches)

    @property
    def pending_skip(self) -> int:
        return self._skip

    @property
    def remaining_batches(self) -> int:
        return self.num_batches - self._skip

    def permutation(self, epoch: int | None = None) -> Tensor:
        """The epoch's order of the whole dataset, identical on every rank."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return torch.arange(self.size)
        generator = torch.Generator().manual_seed(step_seed(self.seed, Stream.EPOCH_SHUFFLE, epoch))
        return torch.randperm(self.size, generator=generator)

    def global_batches(self, epoch: int | None = None) -> Tensor:
        """All global batches of an epoch, ``[num_batches, batch_size]`` (drop_last applied)."""
        return self.permutation(epoch)[: self.total_size].view(self.num_batches, self.batch_size)

    def local_batches(self, epoch: int | None = None) -> Tensor:
        """This rank's batches of an epoch, ``[num_batches, local_batch_size]``."""
        b, r = self.local_batch_size, self.rank
        return self.global_batches(epoch)[:, r * b:(r + 1) * b]

    def __iter__(self) -> Iterator[int]:
        start, self._skip = self._skip, 0
        return iter(self.local_batches()[start:].reshape(-1).tolist())

    def __len__(self) -> int:
        return self.num_samples


class EvalShardSampler(DistributedSampler):
    """Evaluation indices of one rank: a contiguous block, in order, no padding or duplicates."""

    def __init__(self, size: int, world_size: int = 1, rank: int = 0) -> None:
        super().__init__(range(size), num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
        self.size = int(size)
        block = shard_range(self.size, rank, world_size)
        self.start, self.stop = block.start, block.stop
        self.num_samples = self.stop - self.start
        self.total_size = self.size

    def batch_indices(self, batch_idx: int, batch_size: int) -> Tensor:
        """Dataset indices of this rank's ``batch_idx``-th batch of ``batch_size`` (the last may be short).

        Lets evaluation seed noise per sample (by dataset index), so results do not depend on
        the batch size or on the number of ranks.
        """
        first = self.start + batch_idx * batch_size
        return torch.arange(first, min(first + batch_size, self.stop))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.num_samples
