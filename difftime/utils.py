"""Shape-agnostic tensor helpers and explicit randomness.

Every function in the core works on ``x: [B, *D]`` whatever ``D`` is (2-D toy vectors in the
tests, images in training). Per-sample reductions use ``flatten(1)``; per-sample coefficients
are broadcast with :func:`append_dims`.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor


class ConfigError(ValueError):
    """A constructor argument is out of its allowed range.

    ``key`` is the argument name as it appears in the config (for example ``T`` of an SDE);
    the command-line entry point prefixes it with the full config path.
    """

    def __init__(self, key: str, value: object, allowed: str, owner: str = "") -> None:
        self.key, self.value, self.allowed, self.owner = key, value, allowed, owner
        super().__init__(self._message())

    def _message(self, prefix: str = "") -> str:
        where = f"{prefix}{self.key}"
        owner = f" ({self.owner})" if self.owner else ""
        return f"config key '{where}'{owner} = {self.value!r} is invalid: allowed {self.allowed}"

    def with_prefix(self, prefix: str) -> "ConfigError":
        error = ConfigError(prefix + self.key, self.value, self.allowed, self.owner)
        return error


def append_dims(x: Tensor, target_dims: int) -> Tensor:
    """Append trailing singleton dims so ``x: [B]`` broadcasts against a ``[B, *D]`` tensor."""
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}")
    return x[(...,) + (None,) * missing]


def sum_flat(x: Tensor) -> Tensor:
    """Per-sample sum over all non-batch dims: ``[B, *D] -> [B]``."""
    return x.flatten(1).sum(1)


def mean_flat(x: Tensor) -> Tensor:
    """Per-sample mean over all non-batch dims: ``[B, *D] -> [B]``."""
    return x.flatten(1).mean(1)


def batch_dims(x: Tensor) -> int:
    """Number of dimensions D of one sample of ``x: [B, *D]``."""
    return x[0].numel()


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


def randn_like(x: Tensor, generator: Generator = None) -> Tensor:
    return randn(x.shape, generator, x.device, x.dtype)


def rademacher_like(x: Tensor, generator: Generator = None) -> Tensor:
    """Random signs +-1 with the shape of ``x`` (Hutchinson probes)."""
    return torch.where(rand(x.shape, generator, x.device, x.dtype) < 0.5, -1.0, 1.0).to(x.dtype)


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
