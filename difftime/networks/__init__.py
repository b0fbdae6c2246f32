"""Noise-prediction networks ``net(x_t, t) -> eps_hat``: the DDPM++ U-Net for images and a
residual MLP for vector data."""

from difftime.networks.base import NoisePredictor
from difftime.networks.mlp import MLP
from difftime.networks.unet import UNet

__all__ = ["MLP", "NoisePredictor", "UNet"]
