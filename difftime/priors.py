"""Priors at diffusion time T.

Every prior is an ``nn.Module`` (so ``.to(device)`` moves it) with one interface:
``sample(n, generator) -> [n, *D]`` and ``log_prob(x) -> [B]`` in nats. The SDE's Gaussian
prior and the learned auxiliary prior of Franzese et al. 2023 (Sec. 3) both implement it, and
samplers or likelihood code never need to know which one they were given.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from difftime.utils import Generator, append_dims, randn, sum_flat


@runtime_checkable
class Prior(Protocol):
    event_shape: tuple[int, ...]
    exact: bool  # log_prob is the exact log-density (False: a lower bound, e.g. a VAE)

    def sample(self, n: int, generator: Generator = None) -> Tensor: ...

    def log_prob(self, x: Tensor) -> Tensor: ...


class GaussianPrior(nn.Module):
    """Isotropic Gaussian N(mean, std^2 I) over samples of ``event_shape``."""

    exact, bound_name = True, "exact"

    def __init__(self, event_shape: tuple[int, ...], std: float = 1.0, mean: float = 0.0) -> None:
        super().__init__()
        self.event_shape = tuple(int(d) for d in event_shape)
        self.std, self.mean = float(std), float(mean)
        # a buffer only to follow .to(device); not saved in checkpoints
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def dim(self) -> int:
        return math.prod(self.event_shape)

    def sample(self, n: int, generator: Generator = None) -> Tensor:
        z = randn((n, *self.event_shape), generator, device=self._anchor.device)
        return self.mean + self.std * z

    def log_prob(self, x: Tensor) -> Tensor:
        x = x.float()
        quad = sum_flat(((x - self.mean) / self.std) ** 2)
        return -0.5 * quad - self.dim * (math.log(self.std) + 0.5 * math.log(2 * math.pi))

    def kl_from(self, mean: Tensor, std: Tensor) -> Tensor:
        """KL(N(mean, std^2 I) || this prior) per sample, in nats.

        ``mean: [B, *D]``, ``std: [B]``. Closed form for isotropic Gaussians:
        1/2 sum_i [ (std^2 + (mean_i - mu)^2) / sigma^2 - 1 - log(std^2 / sigma^2) ].
        """
        mean, std = mean.float(), std.float()
        ratio = (std / self.std) ** 2
        quad = sum_flat(((mean - self.mean) / self.std) ** 2)
        return 0.5 * (self.dim * (ratio - 1.0 - torch.log(ratio)) + quad)

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, std={self.std:g}, mean={self.mean:g}"


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, std^2 I) per sample. ``x, mean: [B, *D]``, ``std: [B]``."""
    x, mean, std = x.float(), mean.float(), std.float()
    d = x[0].numel()
    z = (x - mean) / append_dims(std, x.ndim)
    return -0.5 * sum_flat(z**2) - d * (torch.log(std) + 0.5 * math.log(2 * math.pi))
