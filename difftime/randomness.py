"""Explicit randomness: noise sources, counter-based streams and sharding.

Randomness is an argument (STYLE 6): everything that samples takes a ``torch.Generator``, a
:class:`NoiseSource` (one generator per sample, or one rank's rows of a global batch) or None
for the global RNG, and draws through :func:`randn` / :func:`rand`. Seeds that must survive a
resume or a change of world size are counter-based (:func:`step_seed`, one :class:`Stream` tag
per consumer), and work is split across ranks in contiguous blocks (:func:`shard_range`), so a
sample's noise depends on its seed and index only, never on the batch or the number of ranks.
"""

from __future__ import annotations

import enum
from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class NoiseSource(Protocol):
    """Something that draws standard normal / uniform noise for a batch of a given shape.

    :class:`PerSampleNoise` implements it with one generator per sample, so a sample's noise
    depends only on its seed, never on the batch it is drawn in.
    """

    def randn(self, shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> Tensor: ...

    def rand(self, shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> Tensor: ...


Generator = torch.Generator | NoiseSource | None


class PerSampleNoise:
    """One ``torch.Generator`` per sample, seeded from ``seeds``.

    Row ``i`` of every draw comes from generator ``i``, so generating samples ``0..N-1`` in
    batches of 7 or 64, or sharded across ranks, gives the same images.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def _draw(self, fn, shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"batch of {shape[0]} drawn from {len(self.generators)} seeds")
        rows = [fn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(device)

    def randn(self, shape: Sequence[int], device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
        return self._draw(torch.randn, shape, device, dtype)

    def rand(self, shape: Sequence[int], device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
        return self._draw(torch.rand, shape, device, dtype)


def _draw(kind: str, shape: Sequence[int], generator: Generator, device: torch.device | str,
          dtype: torch.dtype) -> Tensor:
    device = torch.device(device)
    if isinstance(generator, NoiseSource):
        return getattr(generator, kind)(shape, device, dtype)
    fn = getattr(torch, kind)
    where = generator.device if generator is not None else device
    return fn(shape, generator=generator, device=where, dtype=dtype).to(device)


def randn(shape: Sequence[int], generator: Generator = None, device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal noise of ``shape`` from a generator, a per-sample source, or the global RNG."""
    return _draw("randn", shape, generator, device, dtype)


def rand(shape: Sequence[int], generator: Generator = None, device: torch.device | str = "cpu",
         dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform [0, 1) noise of ``shape``; same sources as :func:`randn`."""
    return _draw("rand", shape, generator, device, dtype)


def rademacher_like(x: Tensor, generator: Generator = None) -> Tensor:
    """Random signs +-1 with the shape of ``x`` (Hutchinson probes)."""
    return torch.where(rand(x.shape, generator, x.device, x.dtype) < 0.5, -1.0, 1.0).to(x.dtype)


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous block of ``range(n)``; the first ``n % world_size`` blocks hold one more.

    Evaluation sets, generated samples and metric references are all split this way, so every
    item is handled by exactly one rank (no padding, no duplicates) and blocks concatenate in order.
    """
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def generate_indexed(sample_fn: Any, indices: range, seed: int, batch_size: int,
                     device: torch.device | str = "cpu",
                     progress: Any = None) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Samples ``indices`` in batches, sample i drawing all its noise from seed ``seed + i``.

    ``sample_fn(k, generator) -> (samples [k, *D], info)``; per-sample generators
    (:class:`PerSampleNoise` on ``device``) make sample i the same whatever the batch size or
    sharding. ``progress(done, total)`` is called after each batch. Returns the chunks and infos.
    """
    chunks, infos = [], []
    for start in range(indices.start, indices.stop, batch_size):
        stop = min(start + batch_size, indices.stop)
        samples, info = sample_fn(stop - start, PerSampleNoise([seed + i for i in range(start, stop)], device))
        chunks.append(samples)
        infos.append(info)
        if progress is not None:
            progress(stop - indices.start, len(indices))
    return chunks, infos


class Stream(enum.IntEnum):
    """The registry of counter-based random streams: the first counter of every :func:`step_seed`.

    Each consumer of randomness draws from ``step_seed(seed, Stream.X, ...)`` with its own tag,
    so no two consumers ever share a seed even when they are given the same ``seed`` (the
    module, the datamodule and the callbacks usually are). The values are arbitrary but fixed:
    changing one changes every number drawn from that stream.
    """

    TOY_DATA = 1 << 32  # toy datamodule splits: (TOY_DATA, split)
    DATA_SPLIT = 1 << 33  # train/val split of image datasets
    EVAL = 1 << 40  # per-sample evaluation noise of the systems: (EVAL, dataset index)
    METRIC = 1 << 41  # metric callbacks: (METRIC, sub-stream, rank tag, dataset index)
    ACTNORM_INIT = 1 << 42  # the auxiliary prior's data-dependent initialisation batch
    TRAIN_STEP = 1 << 43  # training noise of optimizer step k: (TRAIN_STEP, k)
    DROPOUT = 1 << 44  # global RNG (dropout) at step k on a rank: (DROPOUT, k, rank)
    EPOCH_SHUFFLE = 1 << 45  # training-set permutation of epoch e: (EPOCH_SHUFFLE, e)
    GRID_PILOT = 1 << 46  # pilot batch of a fitted time grid (sample.py --fit_grid): (GRID_PILOT,)


def step_seed(seed: int, *counters: int) -> int:
    """A 63-bit seed derived from ``seed`` and integer counters (step, rank, ...).

    Counter-based: the same (seed, counters) always give the same value and different counters
    give unrelated ones (SplitMix64 mixing), so a resumed run draws exactly what it would have.
    """
    state = seed & 0xFFFFFFFFFFFFFFFF
    for counter in counters:
        state = _splitmix64((state ^ _splitmix64(counter & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF)
    return state >> 1


def _splitmix64(z: int) -> int:
    mask = 0xFFFFFFFFFFFFFFFF
    z = (z + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


class ShardedNoise:
    """Noise for one rank's shard of a global batch, identical to the 1-process draw.

    Every draw of shape ``[b, *D]`` takes ``[global_batch, *D]`` values from ``generator`` and
    returns rows ``offset .. offset + b``. With the global batch split into contiguous per-rank
    slices, the noise (and diffusion times) of each global sample then depend only on the
    generator's seed and the sample's position in the global batch, not on the number of ranks.
    The extra draws cost ``world_size`` times the random numbers, negligible next to the network.
    """

    def __init__(self, generator: torch.Generator, global_batch: int, offset: int) -> None:
        if not 0 <= offset < global_batch:
            raise ValueError(f"offset {offset} outside a global batch of {global_batch}")
        self.generator, self.global_batch, self.offset = generator, global_batch, offset

    def _draw(self, fn, shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> Tensor:
        if self.offset + shape[0] > self.global_batch:
            raise ValueError(f"rows {self.offset}..{self.offset + shape[0]} outside a global batch of {self.global_batch}")
        full = fn((self.global_batch, *shape[1:]), generator=self.generator, device=self.generator.device, dtype=dtype)
        return full[self.offset: self.offset + shape[0]].to(device)

    def randn(self, shape: Sequence[int], device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
        return self._draw(torch.randn, shape, device, dtype)

    def rand(self, shape: Sequence[int], device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
        return self._draw(torch.rand, shape, device, dtype)
