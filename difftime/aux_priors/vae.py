"""Gaussian VAE auxiliary prior nu(x_T) with an evidence or importance-weighted lower bound.

Generative model: z ~ N(0, I), x | z ~ N(mu_theta(z), diag(sigma^2)) with a learned
per-dimension decoder scale sigma. Inference model: q_phi(z | x) = N(m_phi(x), diag(s_phi(x)^2)).
The marginal nu(x) = int p(x | z) p(z) dz is intractable, so :meth:`GaussianVAE.log_prob`
returns a stochastic LOWER BOUND on log nu(x): the ELBO (Kingma & Welling 2014, Eq. 3) or the
importance-weighted bound of Burda et al. 2016 (Eq. 8), which is tighter and tends to
log nu(x) as k grows (their Theorem 1). ``exact`` is therefore False and ``bound_name`` says
which bound is reported.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from difftime.utils import ConfigError, Generator, RecordsInitArgs, randn, sum_flat

_LOG_2PI = math.log(2 * math.pi)


def diag_normal_log_prob(x: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """log N(x; mean, diag(exp(log_std)^2)) per sample: ``[B, *D] -> [B]`` (log_std broadcasts)."""
    z = (x - mean) * torch.exp(-log_std)
    return sum_flat(-0.5 * z**2 - log_std.expand_as(z) - 0.5 * _LOG_2PI)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) per sample: ``[B, *L] -> [B]``."""
    return sum_flat(-0.5 * z**2 - 0.5 * _LOG_2PI)


class GaussianVAE(RecordsInitArgs, nn.Module):
    """A VAE with Gaussian prior, Gaussian encoder and Gaussian decoder, as a prior over x.

    ``encoder(x) -> (mean, log_std)``, each ``[B, *latent_shape]``; ``decoder(z) -> mean``
    ``[B, *event_shape]``. The decoder's log standard deviation ``log_scale`` has the shape of
    one sample (one learned variance per dimension / pixel). Any pair of modules with these
    signatures works, e.g. linear maps, which make the model probabilistic PCA.
    """

    exact: bool = False

    def __init__(self, encoder: nn.Module, decoder: nn.Module, event_shape: tuple[int, ...],
                 latent_shape: tuple[int, ...], bound: Literal["elbo", "iwae"] = "iwae", k: int = 16) -> None:
        super().__init__()
        owner = type(self).__name__
        if bound not in ("elbo", "iwae"):
            raise ConfigError("bound", bound, "'elbo' or 'iwae'", owner)
        if k < 1:
            raise ConfigError("k", k, "k >= 1 importance samples", owner)
        self.encoder, self.decoder = encoder, decoder
        self.event_shape = tuple(int(d) for d in event_shape)
        self.latent_shape = tuple(int(d) for d in latent_shape)
        self.bound, self.k = bound, int(k)
        self.log_scale = nn.Parameter(torch.zeros(self.event_shape))

    @property
    def bound_name(self) -> str:
        return "elbo" if self.bound == "elbo" else f"iwae{self.k}"

    def _dtype(self) -> torch.dtype:
        """Working precision: the parameters' dtype, at least fp32."""
        return torch.promote_types(self.log_scale.dtype, torch.float32)

    def _check_input(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(f"expected samples of shape {self.event_shape}, got {tuple(x.shape[1:])}")

    def decoder_log_prob(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x | z) = log N(x; mu_theta(z), diag(sigma^2)), ``[B]``."""
        return diag_normal_log_prob(x, self.decoder(z), self.log_scale)

    # ------------------------------------------------------------------ bounds
    def elbo(self, x: Tensor, generator: Generator = None) -> Tensor:
        """Single-sample ELBO E_q[log p(x | z)] - KL(q(z | x) || N(0, I)), ``[B]``.

        Reparametrised reconstruction term with the closed-form Gaussian KL (Kingma & Welling
        2014, Eq. 10 and App. B). An unbiased estimate of a lower bound of log nu(x).
        """
        self._check_input(x)
        mean, log_std = self.encoder(x)
        z = mean + log_std.exp() * randn(mean.shape, generator, mean.device, mean.dtype)
        kl = 0.5 * sum_flat(mean**2 + torch.exp(2 * log_std) - 1 - 2 * log_std)
        return self.decoder_log_prob(x, z) - kl

    def iw_bound(self, x: Tensor, k: int, generator: Generator = None) -> Tensor:
        """Importance-weighted bound log (1/k) sum_j p(x, z_j) / q(z_j | x), z_j ~ q(z | x), ``[B]``.

        Burda et al. 2016, Eq. 8; k = 1 is the ELBO, and its expectation increases with k
        towards log nu(x). The k draws of sample b come from row b of ``generator`` when it is a
        per-sample noise source.
        """
        self._check_input(x)
        b = x.shape[0]
        mean, log_std = self.encoder(x)
        eps = randn((b, k, *self.latent_shape), generator, mean.device, mean.dtype)
        z = mean.unsqueeze(1) + log_std.exp().unsqueeze(1) * eps
        log_q = standard_normal_log_prob(eps.flatten(0, 1)) - sum_flat(log_std).repeat_interleave(k)
        z = z.flatten(0, 1)
        x_rep = x.unsqueeze(1).expand(b, k, *x.shape[1:]).flatten(0, 1)
        log_w = self.decoder_log_prob(x_rep, z) + standard_normal_log_prob(z) - log_q
        return torch.logsumexp(log_w.view(b, k), dim=1) - math.log(k)

    # ------------------------------------------------------------------ prior interface
    def log_prob(self, x: Tensor, generator: Generator = None) -> Tensor:
        """The configured LOWER BOUND on log nu(x) (``bound_name``), ``[B]``, fp32 outside autocast.

        Stochastic: pass a generator (per-sample for evaluation) to make it reproducible.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(self._dtype())
            if self.bound == "iwae":
                return self.iw_bound(x, self.k, generator)
            return self.elbo(x, generator)

    def loss(self, x: Tensor, generator: Generator = None) -> Tensor:
        """Training loss: the negative configured bound (-ELBO or -IWAE_k), ``[B]``."""
        return -self.log_prob(x, generator)

    def sample(self, n: int, generator: Generator = None) -> Tensor:
        """Ancestral samples of the full generative model: x = mu_theta(z) + sigma * eps, ``[n, *D]``."""
        device = self.log_scale.device
        with torch.autocast(device_type=device.type, enabled=False):
            z = randn((n, *self.latent_shape), generator, device, self._dtype())
            noise = randn((n, *self.event_shape), generator, device, self._dtype())
            return self.decoder(z) + self.log_scale.exp() * noise

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, latent_shape={self.latent_shape}, bound={self.bound_name!r}"


# ---------------------------------------------------------------------- networks
class _SplitHead(nn.Module):
    """Runs ``net`` and splits its output channels (dim 1) into (mean, log_std)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_std = self.net(x).chunk(2, dim=1)
        return mean, log_std


def _conv_encoder(channels: int, hidden: int, latent_channels: int, downsamples: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(channels, hidden, 3, padding=1), nn.SiLU()]
    for _ in range(downsamples):
        layers += [nn.Conv2d(hidden, hidden, 4, stride=2, padding=1), nn.SiLU()]
    layers.append(nn.Conv2d(hidden, 2 * latent_channels, 3, padding=1))
    return _SplitHead(nn.Sequential(*layers))


def _conv_decoder(channels: int, hidden: int, latent_channels: int, downsamples: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(latent_channels, hidden, 3, padding=1), nn.SiLU()]
    for _ in range(downsamples):
        layers += [nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1), nn.SiLU()]
    layers.append(nn.Conv2d(hidden, channels, 3, padding=1))
    return nn.Sequential(*layers)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class VAEPrior(GaussianVAE):
    """Convolutional Gaussian VAE over images ``[B, C, H, W]``.

    The encoder halves the resolution ``downsamples`` times (stride-2 convolutions) to a latent
    of ``latent_channels x H / 2^downsamples x W / 2^downsamples``; the decoder mirrors it with
    transposed convolutions. The decoder variance is learned per pixel.
    """

    def __init__(self, shape: tuple[int, ...] = (3, 32, 32), latent_channels: int = 4, hidden: int = 64,
                 downsamples: int = 2, bound: Literal["elbo", "iwae"] = "iwae", k: int = 16) -> None:
        if len(shape) != 3 or any(int(d) < 1 for d in shape):
            raise ConfigError("shape", shape, "(C, H, W) with positive sizes", "VAEPrior")
        c, h, w = (int(d) for d in shape)
        if downsamples < 0 or h % 2**downsamples or w % 2**downsamples:
            raise ConfigError("downsamples", downsamples,
                              f"downsamples >= 0 with H = {h} and W = {w} divisible by 2**downsamples", "VAEPrior")
        if latent_channels < 1:
            raise ConfigError("latent_channels", latent_channels, "latent_channels >= 1", "VAEPrior")
        if hidden < 1:
            raise ConfigError("hidden", hidden, "hidden >= 1", "VAEPrior")
        f = 2**downsamples
        super().__init__(_conv_encoder(c, hidden, latent_channels, downsamples),
                         _conv_decoder(c, hidden, latent_channels, downsamples),
                         (c, h, w), (latent_channels, h // f, w // f), bound, k)


class MLPVAEPrior(GaussianVAE):
    """Gaussian VAE over vectors ``[B, dim]`` with two-hidden-layer MLP encoder and decoder."""

    def __init__(self, dim: int = 2, latent_dim: int = 2, hidden: int = 64,
                 bound: Literal["elbo", "iwae"] = "iwae", k: int = 16) -> None:
        for key, value in (("dim", dim), ("latent_dim", latent_dim), ("hidden", hidden)):
            if value < 1:
                raise ConfigError(key, value, f"{key} >= 1", "MLPVAEPrior")
        super().__init__(_SplitHead(_mlp([dim, hidden, hidden, 2 * latent_dim])),
                         _mlp([latent_dim, hidden, hidden, dim]), (dim,), (latent_dim,), bound, k)
