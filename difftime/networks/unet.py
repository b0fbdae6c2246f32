"""DDPM++ U-Net noise-prediction network (Song et al. 2021, "Score-Based Generative Modeling
through Stochastic Differential Equations", App. H, the ``ncsnpp`` model with DDPM++ settings:
BigGAN residual blocks, no progressive growing, no FIR filters; Ho et al. 2020, App. B for the
underlying DDPM U-Net).

Layout, for L = len(ch_mult) levels at resolutions r, r/2, ..., r/2^(L-1):

* input 3x3 conv to nf channels;
* down path: at level i, ``num_res_blocks`` residual blocks to nf * ch_mult[i] channels, each
  followed by self-attention if the level's resolution is in ``attn_resolutions``; between
  levels a resampling block halves the resolution. Every block output is kept as a skip;
* middle: residual block, self-attention, residual block;
* up path: at level i, ``num_res_blocks + 1`` residual blocks, each taking the concatenation of
  the current features and one skip (popped last-in first-out); then self-attention if the
  level's resolution is listed (once per level, as DDPM++ does); between levels a resampling
  block doubles the resolution;
* output: GroupNorm, SiLU, 3x3 conv (initialised at zero) to ``out_channels``.

Resampling: with ``resamp_with_conv`` (the DDPM++ setting) it is a BigGAN-style residual block
that resamples inside its residual branch and its 1x1-projected skip (Brock et al. 2019,
Fig. 15); without, it is parameter-free 2x2 average pooling / nearest-neighbour upsampling.

The network predicts the noise eps_hat(x_t, t) of x_t = m(t) x_0 + s(t) z (see
:mod:`difftime.score`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difftime.networks.base import NoisePredictor
from difftime.networks.layers import (AttentionBlock, Embedding, Resample, ResAttnBlock, ResBlock,
                                       TimeEmbedding, broadcast_time, conv, group_norm, linear)
from difftime.utils import ConfigError


class _Level(nn.Module):
    """Blocks of one resolution, an optional attention (up path) and an optional resampler."""

    def __init__(self, blocks: list[nn.Module], attn: AttentionBlock | None,
                 resampler: nn.Module | None) -> None:
        super().__init__()
        self.blocks, self.attn, self.resampler = nn.ModuleList(blocks), attn, resampler


class UNet(NoisePredictor):
    """DDPM++ U-Net: ``forward(x: [B, C, H, W], t: [B]) -> eps_hat: [B, C_out, H, W]``.

    Defaults are the CIFAR-10 DDPM++ (cont.) configuration of Song et al. 2021 (Table 3 and
    App. H): 4 levels of 128, 256, 256, 256 channels, 4 residual blocks per level, attention at
    16x16, dropout 0.1, positional embedding of 999 t, skip rescaling by 1/sqrt(2).

    Args:
        in_channels: channels C of the data.
        resolution: height = width of the data; divisible by 2^(len(ch_mult) - 1).
        nf: base channel count; level i has nf * ch_mult[i] channels.
        ch_mult: channel multiplier per resolution level.
        num_res_blocks: residual blocks per level in the down path (one more in the up path).
        attn_resolutions: resolutions (among resolution / 2^i) that get self-attention.
        dropout: dropout probability inside residual blocks, in [0, 1).
        embedding: ``positional`` (sinusoids of 999 t) or ``fourier`` (random Fourier features).
        fourier_scale: standard deviation of the Fourier frequencies.
        resamp_with_conv: BigGAN residual resampling blocks (True) or parameter-free pooling.
        skip_rescale: multiply every residual sum by 1/sqrt(2).
        num_groups: GroupNorm groups, min(num_groups, C) must divide every channel count C.
        out_channels: output channels; defaults to ``in_channels``.
    """

    def __init__(self, in_channels: int = 3, resolution: int = 32, nf: int = 128,
                 ch_mult: tuple[int, ...] = (1, 2, 2, 2), num_res_blocks: int = 4,
                 attn_resolutions: tuple[int, ...] = (16,), dropout: float = 0.1,
                 embedding: Literal["positional", "fourier"] = "positional",
                 fourier_scale: float = 16.0, resamp_with_conv: bool = True,
                 skip_rescale: bool = True, num_groups: int = 32,
                 out_channels: int | None = None) -> None:
        super().__init__()
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        _validate(in_channels, resolution, nf, ch_mult, num_res_blocks, attn_resolutions, dropout,
                  num_groups, out_channels)
        self.in_channels, self.resolution = in_channels, resolution
        self.out_channels = out_channels or in_channels
        self.resolutions = [resolution >> i for i in range(len(ch_mult))]
        self._block_args = dict(emb_dim=4 * nf, dropout=dropout, num_groups=num_groups,
                                skip_rescale=skip_rescale)
        self._attn_resolutions, self._resamp_with_conv = attn_resolutions, resamp_with_conv

        self.time_embed = TimeEmbedding(nf, embedding, fourier_scale)
        self.time_mlp = nn.Sequential(linear(nf, 4 * nf), nn.SiLU(), linear(4 * nf, 4 * nf))
        self.conv_in = conv(in_channels, nf)
        skips = self._build_down(nf, ch_mult, num_res_blocks)
        ch = skips[-1]
        self.mid = nn.ModuleList([self._res(ch, ch), AttentionBlock(ch, num_groups, skip_rescale),
                                  self._res(ch, ch)])
        ch = self._build_up(nf, ch_mult, num_res_blocks, skips, ch)
        self.norm_out = group_norm(ch, num_groups, "UNet")
        self.conv_out = conv(ch, self.out_channels, scale=0.0)

    # ------------------------------------------------------------------ construction
    def _res(self, in_ch: int, out_ch: int, mode: Literal["up", "down", "none"] = "none") -> ResBlock:
        return ResBlock(in_ch, out_ch, mode=mode, **self._block_args)

    def _attn(self, ch: int, resolution: int) -> AttentionBlock | None:
        if resolution not in self._attn_resolutions:
            return None
        return AttentionBlock(ch, self._block_args["num_groups"], self._block_args["skip_rescale"])

    def _resampler(self, ch: int, mode: Literal["up", "down"]) -> nn.Module:
        return self._res(ch, ch, mode) if self._resamp_with_conv else Resample(mode)

    def _build_down(self, nf: int, ch_mult: tuple[int, ...], num_res_blocks: int) -> list[int]:
        """Down path; returns the channel count of every skip, in the order they are pushed."""
        skips, ch, self.down = [nf], nf, nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            blocks = []
            for _ in range(num_res_blocks):
                attn = self._attn(nf * mult, self.resolutions[i])
                blocks.append(ResAttnBlock(self._res(ch, nf * mult), attn))
                ch = nf * mult
                skips.append(ch)
            last = i == len(ch_mult) - 1
            self.down.append(_Level(blocks, None, None if last else self._resampler(ch, "down")))
            skips += [] if last else [ch]
        return skips

    def _build_up(self, nf: int, ch_mult: tuple[int, ...], num_res_blocks: int, skips: list[int],
                  ch: int) -> int:
        """Up path, consuming ``skips`` from the end; returns the final channel count."""
        skips, self.up = list(skips), nn.ModuleList()
        for i in reversed(range(len(ch_mult))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(self._res(ch + skips.pop(), nf * ch_mult[i]))
                ch = nf * ch_mult[i]
            resampler = self._resampler(ch, "up") if i > 0 else None
            self.up.append(_Level(blocks, self._attn(ch, self.resolutions[i]), resampler))
        return ch

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        """eps_hat(x_t, t). ``x: [B, C, H, W]``; ``t: [B]`` or a scalar broadcast to B."""
        t = broadcast_time(t, x.shape[0], x.device)
        emb = F.silu(self.time_mlp(self.time_embed(t).to(self.time_mlp[0].weight.dtype)))
        hs = [self.conv_in(x)]
        for level in self.down:
            for block in level.blocks:
                hs.append(block(hs[-1], emb))
            if level.resampler is not None:
                hs.append(level.resampler(hs[-1], emb))
        h = self.mid[0](hs[-1], emb)
        h = self.mid[2](self.mid[1](h), emb)
        for level in self.up:
            for block in level.blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            h = level.attn(h) if level.attn is not None else h
            h = level.resampler(h, emb) if level.resampler is not None else h
        return self.conv_out(F.silu(self.norm_out(h)))

    def check_input_shape(self, shape: tuple[int, ...]) -> None:
        """Raise :class:`ConfigError` unless a data sample has shape (C, resolution, resolution)."""
        shape = tuple(shape)
        if len(shape) != 3 or shape[0] != self.in_channels:
            raise ConfigError("in_channels", self.in_channels,
                              f"the channel count of the data, whose sample shape is {shape}", "UNet")
        if shape[1:] != (self.resolution, self.resolution):
            raise ConfigError("resolution", self.resolution,
                              f"the data's height and width, whose sample shape is {shape}", "UNet")


def _validate(in_channels: int, resolution: int, nf: int, ch_mult: tuple[int, ...],
              num_res_blocks: int, attn_resolutions: tuple[int, ...], dropout: float,
              num_groups: int, out_channels: int | None) -> None:
    """Argument checks of :class:`UNet` that do not need the built network (group counts are
    checked as each GroupNorm is built, since they depend on concatenated channel counts)."""
    positive = {"in_channels": in_channels, "resolution": resolution, "nf": nf,
                "num_res_blocks": num_res_blocks, "num_groups": num_groups}
    for key, value in positive.items():
        if not value >= 1:
            raise ConfigError(key, value, "an integer >= 1", "UNet")
    if out_channels is not None and not out_channels >= 1:
        raise ConfigError("out_channels", out_channels, "null or an integer >= 1", "UNet")
    if not ch_mult or min(ch_mult) < 1:
        raise ConfigError("ch_mult", ch_mult, "a non-empty tuple of integers >= 1", "UNet")
    if nf % 2:
        raise ConfigError("nf", nf, "an even integer (it is the time-embedding width)", "UNet")
    factor = 2 ** (len(ch_mult) - 1)
    if resolution % factor:
        raise ConfigError("resolution", resolution,
                          f"resolution divisible by {factor} for ch_mult of length {len(ch_mult)} "
                          f"(or a shorter ch_mult)", "UNet")
    occurring = [resolution >> i for i in range(len(ch_mult))]
    if any(r not in occurring for r in attn_resolutions):
        raise ConfigError("attn_resolutions", attn_resolutions,
                          f"resolutions that occur in the network: a subset of {occurring}", "UNet")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError("dropout", dropout, "0 <= dropout < 1", "UNet")
