"""What a person sees of a set of samples: one renderer for sample.py, sample grids and writers.

``render(outputs)`` takes the output form of samples (:meth:`difftime.data.DataScaling.to_output`:
uint8 images ``[N, C, H, W]`` or fp32 vectors ``[N, D]``) and returns a :class:`Rendered`: an image
grid upscaled by an integer factor with nearest-neighbour interpolation (so 28-px digits stay
sharp and legible, at least ``min_width`` pixels wide), or for vectors a scatter plot of the
first two coordinates. torchvision builds the grid, Pillow writes PNG, matplotlib draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


@dataclass
class Rendered:
    """An image grid ``uint8 [C, H, W]`` or a matplotlib figure, with its caption."""

    grid: Tensor | None = None
    figure: Any = None
    caption: str = ""

    def save(self, path: str | Path) -> None:
        """PNG at ``path``."""
        if self.grid is not None:
            from PIL import Image

            array = self.grid.permute(1, 2, 0).numpy()
            Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(path)
        else:
            self.figure.savefig(path, dpi=100)

    def log(self, experiment: Any, tag: str, step: int) -> None:
        """Add to a TensorBoard ``SummaryWriter`` (image or figure), the caption as text."""
        if self.grid is not None:
            experiment.add_image(tag, self.grid, global_step=step)
        else:
            experiment.add_figure(tag, self.figure, global_step=step, close=False)
        if self.caption:
            experiment.add_text(f"{tag}/caption", self.caption, global_step=step)

    def close(self) -> None:
        if self.figure is not None:
            import matplotlib.pyplot as plt

            plt.close(self.figure)


def render(outputs: Tensor, nrow: int | None = None, caption: str = "", min_width: int = 512) -> Rendered:
    """A :class:`Rendered` view of ``outputs`` (uint8 images or float vectors)."""
    if outputs.dtype == torch.uint8:
        return Rendered(grid=image_grid(outputs, nrow, min_width), caption=caption)
    return Rendered(figure=scatter(outputs.flatten(1).float(), caption), caption=caption)


def image_grid(images: Tensor, nrow: int | None = None, min_width: int = 512) -> Tensor:
    """``uint8 [N, C, H, W]`` -> grid ``uint8 [C', H', W']``, nearest-upscaled to >= ``min_width`` px."""
    import torchvision

    nrow = nrow or max(1, int(math.sqrt(len(images))))
    grid = torchvision.utils.make_grid(images, nrow=nrow)
    factor = max(1, math.ceil(min_width / grid.shape[-1]))
    if factor > 1:
        grid = grid.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    return grid


def scatter(points: Tensor, caption: str = ""):
    """Scatter plot of the first two coordinates of ``points: [N, D]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 5))
    axis.scatter(points[:, 0], points[:, 1 if points.shape[1] > 1 else 0], s=4, alpha=0.6)
    axis.set_title(caption or f"{points.shape[0]} samples", fontsize=9)
    axis.set_aspect("equal")
    return figure
