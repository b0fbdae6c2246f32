"""Residual MLP noise-prediction network for vector data (toy mixtures, small flattened data).

The time embedding (see :class:`difftime.networks.layers.TimeEmbedding`) is passed through a
Linear-SiLU-Linear map and added, through a per-block projection, inside every residual block,
the vector analogue of the DDPM++ residual block (Song et al. 2021, App. H):
h <- h + W_2 SiLU(W_1 SiLU(h) + P_i SiLU(emb)). The output layer starts at zero, so the initial
noise prediction is 0 and the initial score is 0.
"""

from __future__ import annotations

import math
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from difftime.networks.base import NoisePredictor
from difftime.networks.layers import TimeEmbedding, broadcast_time, linear
from difftime.utils import ConfigError


class _MLPBlock(nn.Module):
    """h + W_2 SiLU(W_1 SiLU(h) + P SiLU(emb)), with W_2 starting at zero (identity block)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1, self.emb_proj = linear(hidden, hidden), linear(hidden, hidden)
        self.fc2 = linear(hidden, hidden, 0.0)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return h + self.fc2(F.silu(self.fc1(F.silu(h)) + self.emb_proj(emb)))


class MLP(NoisePredictor):
    """``forward(x: [B, *D], t: [B]) -> eps_hat: [B, *D]`` with prod(D) = ``dim``.

    Args:
        dim: number of entries D of one sample (the input is flattened to ``[B, dim]``).
        hidden: width of the hidden layers.
        depth: number of residual blocks.
        embedding_dim: width of the time embedding (even).
        embedding: ``positional`` (sinusoids of 999 t) or ``fourier`` (random Fourier features).
        fourier_scale: standard deviation of the Fourier frequencies.
    """

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 3, embedding_dim: int = 64,
                 embedding: Literal["positional", "fourier"] = "fourier",
                 fourier_scale: float = 16.0) -> None:
        super().__init__()
        for key, value in {"dim": dim, "hidden": hidden, "depth": depth}.items():
            if not value >= 1:
                raise ConfigError(key, value, "an integer >= 1", "MLP")
        self.dim = dim
        self.time_embed = TimeEmbedding(embedding_dim, embedding, fourier_scale)
        self.time_mlp = nn.Sequential(linear(embedding_dim, hidden), nn.SiLU(), linear(hidden, hidden))
        self.inp = linear(dim, hidden)
        self.blocks = nn.ModuleList(_MLPBlock(hidden) for _ in range(depth))
        self.out = linear(hidden, dim, 0.0)

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        """eps_hat(x_t, t). ``x: [B, *D]``; ``t: [B]`` or a scalar broadcast to B."""
        if x[0].numel() != self.dim:
            raise ValueError(f"MLP built for dim={self.dim} got samples of shape {tuple(x.shape[1:])}")
        t = broadcast_time(t, x.shape[0], x.device)
        emb = F.silu(self.time_mlp(self.time_embed(t).to(self.inp.weight.dtype)))
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(h)).reshape(x.shape)

    def check_input_shape(self, shape: tuple[int, ...]) -> None:
        """Raise :class:`ConfigError` unless a data sample has ``dim`` entries."""
        if math.prod(shape) != self.dim:
            raise ConfigError("dim", self.dim, f"the number of entries of a data sample of shape "
                              f"{tuple(shape)} ({math.prod(shape)})", "MLP")
