"""Building blocks shared by the score networks: time embeddings, initialisation, residual and
attention blocks of the DDPM++ family (Song et al. 2021, "Score-Based Generative Modeling
through Stochastic Differential Equations", App. H; Ho et al. 2020, "Denoising Diffusion
Probabilistic Models", App. B; Brock et al. 2019, BigGAN, Fig. 15 for the resampling blocks).

Feature maps are ``[B, C, H, W]``; time embeddings are ``[B, E]`` and are broadcast onto the
features with :func:`difftime.utils.append_dims`. Nothing here mixes samples of a batch
(GroupNorm and attention are per sample), so the output for one sample never depends on the
others.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difftime.utils import ConfigError, append_dims

Embedding = Literal["positional", "fourier"]

# Continuous t in [0, 1] is mapped onto the discrete DDPM step range [0, 999] before the
# sinusoidal embedding, as the continuous-time DDPM++ models do (Song et al. 2021, App. H.1).
POSITIONAL_TIME_SCALE = 999.0
# The Fourier frequencies are drawn once from this fixed seed, so every construction of a
# network (and every rank of a distributed run) holds the same embedding.
FOURIER_SEED = 0


# ---------------------------------------------------------------------------- initialisation
@torch.no_grad()
def variance_scaling_(weight: Tensor, scale: float = 1.0) -> Tensor:
    """In-place fan-average uniform variance-scaling initialisation (Ho et al. 2020, App. B).

    Var(w) = scale / ((fan_in + fan_out) / 2), i.e. w ~ U(-a, a) with a = sqrt(3 Var). A scale
    of 0 gives exact zeros: DDPM++ initialises the last layer of every residual branch and the
    output layer this way (``init_scale = 0``), so each block starts as the identity and the
    network's first output is zero.
    """
    receptive = weight[0, 0].numel() if weight.ndim > 2 else 1
    fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
    bound = math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2.0))
    return weight.uniform_(-bound, bound) if scale > 0 else weight.zero_()


def init_layer_(layer: nn.Conv2d | nn.Linear, scale: float = 1.0) -> nn.Conv2d | nn.Linear:
    """Variance-scaling weights and zero bias; returns the layer for inline use."""
    variance_scaling_(layer.weight, scale)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def conv(in_ch: int, out_ch: int, kernel: int = 3, scale: float = 1.0) -> nn.Conv2d:
    """'Same'-padded convolution with variance-scaling initialisation."""
    return init_layer_(nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2), scale)


def linear(in_dim: int, out_dim: int, scale: float = 1.0) -> nn.Linear:
    return init_layer_(nn.Linear(in_dim, out_dim), scale)


def group_norm(channels: int, num_groups: int, owner: str = "") -> nn.GroupNorm:
    """GroupNorm with min(num_groups, channels) groups, which must divide ``channels``."""
    groups = min(num_groups, channels)
    if channels % groups:
        raise ConfigError("num_groups", num_groups,
                          f"a group count min(num_groups, C) dividing every normalised channel "
                          f"count C; C = {channels} is not divisible by {groups}", owner)
    return nn.GroupNorm(groups, channels, eps=1e-6)


# ---------------------------------------------------------------------------- time embedding
class TimeEmbedding(nn.Module):
    """Embedding of continuous time ``t: [B] -> [B, dim]``, computed in fp32 outside autocast.

    * ``positional``: sinusoidal embedding (Vaswani et al. 2017, Sec. 3.5) of 999 t with
      frequencies 10000^(-k / (dim/2)), k = 0..dim/2-1, as in DDPM (Ho et al. 2020, App. B).
    * ``fourier``: Gaussian random Fourier features (Tancik et al. 2020; Song et al. 2021,
      App. H): [sin(2 pi W t), cos(2 pi W t)] with W_k ~ N(0, fourier_scale^2) fixed at
      construction from a fixed seed and stored as a buffer (never trained).
    """

    def __init__(self, dim: int, kind: Embedding = "positional", fourier_scale: float = 16.0) -> None:
        super().__init__()
        if kind not in ("positional", "fourier"):
            raise ConfigError("embedding", kind, "'positional' or 'fourier'", type(self).__name__)
        if dim < 2 or dim % 2:
            raise ConfigError("embedding_dim", dim, "an even integer >= 2", type(self).__name__)
        if not fourier_scale > 0:
            raise ConfigError("fourier_scale", fourier_scale, "fourier_scale > 0", type(self).__name__)
        self.dim, self.kind = dim, kind
        half = dim // 2
        if kind == "positional":
            freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
            freqs = (POSITIONAL_TIME_SCALE * freqs).float()
        else:
            gen = torch.Generator().manual_seed(FOURIER_SEED)
            freqs = 2 * math.pi * fourier_scale * torch.randn(half, generator=gen, dtype=torch.float64)
            freqs = freqs.float()
        # Angular frequencies omega_k: the embedding is [sin(omega t), cos(omega t)].
        self.register_buffer("freqs", freqs)

    def forward(self, t: Tensor) -> Tensor:
        with torch.autocast(device_type=t.device.type, enabled=False):
            dtype = torch.promote_types(t.dtype, torch.float32)
            angles = torch.outer(t.to(dtype), self.freqs.to(dtype))
            return torch.cat([angles.sin(), angles.cos()], dim=1)


def broadcast_time(t: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """Turn a python float, a 0-d/one-element tensor or a ``[B]`` tensor into ``t: [B]``."""
    t = torch.as_tensor(t, device=device)
    if not t.is_floating_point():
        t = t.float()
    t = t.reshape(-1)
    if t.numel() == 1:
        return t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"t has {t.numel()} entries for a batch of {batch}")
    return t


# ---------------------------------------------------------------------------- U-Net blocks
def resample(h: Tensor, mode: Literal["up", "down", "none"]) -> Tensor:
    """Parameter-free 2x resampling: nearest-neighbour up, 2x2 average-pool down."""
    if mode == "up":
        return F.interpolate(h, scale_factor=2.0, mode="nearest")
    if mode == "down":
        return F.avg_pool2d(h, 2)
    return h


class ResBlock(nn.Module):
    """BigGAN-style residual block of DDPM++ (Song et al. 2021, App. H; Brock et al. 2019).

    h = Conv(Dropout(SiLU(GN(Conv(resample(SiLU(GN(x)))) + Dense(SiLU(emb)))))), with the
    skip x resampled the same way and projected by a 1x1 conv when the channel count or the
    resolution changes; output (x + h) / sqrt(2) with ``skip_rescale`` (keeps the variance of
    the sum of two unit-variance branches at 1). The last conv starts at zero.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, num_groups: int,
                 skip_rescale: bool, mode: Literal["up", "down", "none"] = "none") -> None:
        super().__init__()
        self.mode, self.skip_rescale = mode, skip_rescale
        self.norm0 = group_norm(in_ch, num_groups, "UNet")
        self.conv0 = conv(in_ch, out_ch)
        self.emb_proj = linear(emb_dim, out_ch)
        self.norm1 = group_norm(out_ch, num_groups, "UNet")
        self.dropout = nn.Dropout(dropout)
        self.conv1 = conv(out_ch, out_ch, scale=0.0)
        changes = in_ch != out_ch or mode != "none"
        self.skip = conv(in_ch, out_ch, kernel=1) if changes else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """``x: [B, in_ch, H, W]``, ``emb: [B, E]`` (already passed through SiLU)."""
        h = resample(F.silu(self.norm0(x)), self.mode)
        h = self.conv0(h) + append_dims(self.emb_proj(emb), x.ndim)
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        out = self.skip(resample(x, self.mode)) + h
        return out * (1 / math.sqrt(2.0)) if self.skip_rescale else out


class Resample(nn.Module):
    """Parameter-free up/down sampling with the block signature ``(x, emb) -> h``."""

    def __init__(self, mode: Literal["up", "down"]) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return resample(x, self.mode)


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection (Ho et al. 2020, App. B;
    DDPM++ ``AttnBlockpp``): softmax(q^T k / sqrt(C)) v over the H*W positions of each sample,
    q, k, v and the output projection are 1x1 convs; the output projection starts at zero."""

    def __init__(self, channels: int, num_groups: int, skip_rescale: bool) -> None:
        super().__init__()
        self.skip_rescale = skip_rescale
        self.norm = group_norm(channels, num_groups, "UNet")
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        init_layer_(self.qkv)
        # q, k and v are separate C -> C maps initialised with scale 0.1 as in DDPM++.
        for part in self.qkv.weight.data.chunk(3, dim=0):
            variance_scaling_(part, 0.1)
        self.proj = conv(channels, channels, kernel=1, scale=0.0)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v)  # [B, H*W, C], scale 1/sqrt(C)
        h = self.proj(h.transpose(1, 2).reshape(b, c, height, width))
        out = x + h
        return out * (1 / math.sqrt(2.0)) if self.skip_rescale else out


class ResAttnBlock(nn.Module):
    """A residual block, optionally followed by self-attention."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None) -> None:
        super().__init__()
        self.res, self.attn = res, attn

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.res(x, emb)
        return self.attn(h) if self.attn is not None else h
