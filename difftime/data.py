"""Data scaling, dequantization and the bits-per-dim formula.

Discrete data x in {0, ..., L-1}^D (L = 2^bits levels, L = 256 for 8-bit images) are mapped to
the model space by uniform dequantization and an affine scaling:

    x_c = x + u,  u ~ U[0, 1)^D          (dequantize: density on [0, L)^D)
    y   = 2 x_c / L - 1                  (scale to [-1, 1]^D, log|dy/dx_c| = D log(2 / L))

Because the dequantization cells have unit volume, for any continuous model p_y,
log P(x) >= E_u[log p_y(y) + D log(2 / L)] (Theis et al. 2016, "A note on the evaluation of
generative models", Sec. 3.1). Bits per dimension on the standard scale are then

    bpd = -(log p_y(y) + log_det) / (D ln 2),   log_det = D log(2 / L),

so a model uniform on [-1, 1]^D scores exactly log2(L) (8 bits/dim for 8-bit data). Without
dequantization, x_c = x + 1/2 (the cell centres) and the result is a density, not a bound on
the discrete likelihood.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difftime.utils import ConfigError, Generator, append_dims, rand


class DataScaling:
    """Map raw data to the model space and back; states what bits/dim needs.

    ``bits`` is None for continuous data (toy distributions): then the map is the identity,
    ``log_det`` is 0 and "bits per dim" is the continuous -log2 density per dimension.
    """

    bits: float | None = None

    def __call__(self, x: Tensor, generator: Generator = None) -> tuple[Tensor, Tensor]:
        """``x: [B, *D]`` raw -> (y ``[B, *D]``, at least fp32, log|dy/dx_c| ``[B]``)."""
        y = x.to(torch.promote_types(x.dtype, torch.float32)) if x.is_floating_point() else x.float()
        return y, torch.zeros(y.shape[0], device=y.device)

    def log_det(self, dim: int) -> float:
        """log|dy/dx_c| for one sample of ``dim`` values."""
        return 0.0

    def augment(self, x: Tensor, generator: Generator = None) -> Tensor:
        """Training-time augmentation of raw data (none for continuous data)."""
        return x

    def to_uint8(self, y: Tensor) -> Tensor:
        raise NotImplementedError("continuous data has no 8-bit image form")

    def to_output(self, y: Tensor) -> Tensor:
        """Model-space samples -> what is written and shown: fp32 values for continuous data.

        The one place that decides what a sample looks like outside the model (images override
        it with 8-bit pixels), used by sample.py, the sample grids and the prediction writer.
        """
        return y.detach().float().cpu()


class ContinuousScaling(DataScaling):
    """Identity map for continuous data."""


class ImageScaling(DataScaling):
    """Integer pixels in {0, ..., levels - 1} -> [-1, 1], with optional uniform dequantization.

    ``levels`` is 256 for 8-bit images; scikit-learn's 8x8 digits have 17 (values 0..16), so
    their bits/dim are on a log2(17) = 4.09 scale, stated as ``bits``.
    """

    def __init__(self, levels: int = 256, dequantize: bool = True, random_flip: bool = False) -> None:
        if not 2 <= levels <= 65536:
            raise ConfigError("levels", levels, "an integer in [2, 65536]", type(self).__name__)
        self.levels, self.dequantize, self.random_flip = int(levels), bool(dequantize), bool(random_flip)
        self.bits = math.log2(self.levels)

    def augment(self, x: Tensor, generator: Generator = None) -> Tensor:
        """Training augmentation: horizontal flip of each image with probability 1/2.

        Drawn from ``generator`` on the device, so it is part of the step's counter-based
        randomness rather than of data-loader workers' RNG.
        """
        if not self.random_flip:
            return x
        flip = rand((x.shape[0],), generator, x.device) < 0.5
        return torch.where(append_dims(flip, x.ndim), x.flip(-1), x)

    def log_det(self, dim: int) -> float:
        return dim * math.log(2.0 / self.levels)

    def __call__(self, x: Tensor, generator: Generator = None) -> tuple[Tensor, Tensor]:
        x = x.float()
        u = rand(x.shape, generator, x.device) if self.dequantize else torch.full_like(x, 0.5)
        y = 2.0 * (x + u) / self.levels - 1.0
        return y, torch.full((x.shape[0],), self.log_det(x[0].numel()), device=x.device)

    def to_levels(self, y: Tensor) -> Tensor:
        """Model space -> integer levels: clamp to [-1, 1], scale, round (never wrap around)."""
        x = (y.float().clamp(-1.0, 1.0) + 1.0) * (self.levels / 2.0) - 0.5
        return x.round().clamp(0, self.levels - 1)

    def to_uint8(self, y: Tensor) -> Tensor:
        """Model space -> 8-bit pixels for images and FID (levels rescaled to 0..255)."""
        x = self.to_levels(y)
        if self.levels != 256:
            x = (x * 255.0 / (self.levels - 1)).round()
        return x.to(torch.uint8)

    def to_output(self, y: Tensor) -> Tensor:
        """Model-space samples -> uint8 pixels ``[B, C, H, W]`` (clamped and rounded, never wrapped)."""
        return self.to_uint8(y.detach()).cpu()

    def __repr__(self) -> str:
        return f"ImageScaling(levels={self.levels}, dequantize={self.dequantize}, random_flip={self.random_flip})"


def bits_per_dim(log_prob_y: Tensor, log_det: Tensor | float, dim: int) -> Tensor:
    """-(log p_y(y) + log|dy/dx_c|) / (D ln 2), per sample. Both terms in nats."""
    return -(log_prob_y + log_det) / (dim * math.log(2.0))
