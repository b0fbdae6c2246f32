"""Analytic data distributions: Gaussians and Gaussian mixtures in any dimension.

Under a linear SDE a Gaussian mixture stays a Gaussian mixture: if x_0 ~ sum_k w_k N(mu_k, S_k)
then x_t ~ sum_k w_k N(m(t) mu_k, m(t)^2 S_k + s(t)^2 I). Its density, score and samples are
therefore exact at every t, which makes these distributions the oracle of the test suite:
marginals, scores, KL terms and log-likelihoods are all closed form.

Each covariance is stored by its eigendecomposition S_k = U_k diag(lam_k) U_k^T, so the
diffused covariance m^2 S_k + s^2 I = U_k diag(m^2 lam_k + s^2) U_k^T stays diagonal in the same
basis and per-sample times cost no extra factorisation.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from difftime.networks.base import NoisePredictor
from difftime.sde import SDE
from difftime.utils import Generator, append_dims, rand, randn


class GaussianMixture(nn.Module):
    """sum_k w_k N(mu_k, S_k) over samples of ``event_shape`` (D = prod(event_shape)).

    ``weights: [K]``, ``means: [K, D]``, ``covs: [K, D, D]`` (symmetric positive definite).
    Implements the prior interface (``sample``/``log_prob``), so a diffused mixture is the exact
    q_T and can be used as the prior of a sampler.
    """

    exact: bool = True
    bound_name: str | None = None

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor,
                 event_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        covs = torch.as_tensor(covs, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        k, d = means.shape
        if covs.shape != (k, d, d) or weights.shape != (k,):
            raise ValueError(f"weights {tuple(weights.shape)}, means {tuple(means.shape)}, "
                             f"covs {tuple(covs.shape)}: expected [K], [K, D], [K, D, D]")
        if not torch.all(weights > 0):
            raise ValueError("mixture weights must be positive")
        lam, vecs = torch.linalg.eigh(0.5 * (covs + covs.transpose(-1, -2)))
        if not torch.all(lam > 0):
            raise ValueError("component covariances must be positive definite")
        self.event_shape = tuple(event_shape) if event_shape is not None else (d,)
        if math.prod(self.event_shape) != d:
            raise ValueError(f"event_shape {self.event_shape} does not hold D = {d} values")
        self.register_buffer("log_weights", torch.log(weights / weights.sum()))
        self.register_buffer("means", means)
        self.register_buffer("eigvecs", vecs)
        self.register_buffer("eigvals", lam)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def weights(self) -> Tensor:
        return self.log_weights.exp()

    @property
    def covs(self) -> Tensor:
        return self.eigvecs @ torch.diag_embed(self.eigvals) @ self.eigvecs.transpose(-1, -2)

    def mean(self) -> Tensor:
        """Mixture mean ``[D]``."""
        return (self.weights[:, None] * self.means).sum(0)

    def covariance(self) -> Tensor:
        """Mixture covariance ``[D, D]`` (law of total covariance)."""
        mu = self.mean()
        centred = self.means - mu
        within = (self.weights[:, None, None] * self.covs).sum(0)
        between = (self.weights[:, None, None] * centred[:, :, None] * centred[:, None, :]).sum(0)
        return within + between

    # ------------------------------------------------------------------ diffused marginals
    def _components(self, x: Tensor, m: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-component quantities of the diffused mixture at per-sample (m, s).

        Returns y = U_k^T (x - m mu_k) ``[B, K, D]``, the eigenvalues of the diffused covariance
        ``[B, K, D]`` and the component log-densities ``[B, K]``.
        """
        x = x.reshape(x.shape[0], -1).to(torch.float64)
        m = m.to(torch.float64).reshape(-1, 1, 1)
        s = s.to(torch.float64).reshape(-1, 1, 1)
        diff = x[:, None, :] - m * self.means[None]
        y = torch.einsum("kde,bkd->bke", self.eigvecs, diff)
        var = m**2 * self.eigvals[None] + s**2
        log_n = -0.5 * ((y**2 / var) + torch.log(2 * math.pi * var)).sum(-1)
        return y, var, log_n

    def _coeffs(self, x: Tensor, m: Tensor | float | None, s: Tensor | float | None) -> tuple[Tensor, Tensor]:
        b = x.shape[0]
        m = torch.ones(b, dtype=torch.float64, device=x.device) if m is None else m
        s = torch.zeros(b, dtype=torch.float64, device=x.device) if s is None else s
        m = torch.as_tensor(m, dtype=torch.float64, device=x.device).expand(b)
        s = torch.as_tensor(s, dtype=torch.float64, device=x.device).expand(b)
        return m, s

    def marginal_log_prob(self, x: Tensor, m: Tensor | float | None = None,
                          s: Tensor | float | None = None) -> Tensor:
        """log of the mixture diffused to N(m mu_k, m^2 S_k + s^2 I); ``x: [B, *D] -> [B]`` (fp64)."""
        m, s = self._coeffs(x, m, s)
        _, _, log_n = self._components(x, m, s)
        return torch.logsumexp(self.log_weights + log_n, dim=-1)

    def marginal_score(self, x: Tensor, m: Tensor | float | None = None,
                       s: Tensor | float | None = None) -> Tensor:
        """Exact score of the diffused mixture, ``[B, *D]`` in the dtype of ``x``."""
        m, s = self._coeffs(x, m, s)
        y, var, log_n = self._components(x, m, s)
        resp = torch.softmax(self.log_weights + log_n, dim=-1)
        comp_score = -torch.einsum("kde,bke->bkd", self.eigvecs, y / var)
        return (resp[..., None] * comp_score).sum(1).reshape(x.shape).to(x.dtype)

    def log_prob(self, x: Tensor, generator: Generator = None) -> Tensor:
        """Exact log-density ``[B]``; ``generator`` is unused (the prior interface)."""
        return self.marginal_log_prob(x)

    def score(self, x: Tensor) -> Tensor:
        return self.marginal_score(x)

    def sample(self, n: int, generator: Generator = None) -> Tensor:
        """Exact samples ``[n, *event_shape]`` in fp32 (float64 maths)."""
        device = self.means.device
        u = rand((n, 1), generator, device, torch.float64)[:, 0]
        cdf = torch.cumsum(self.weights, 0)
        k = torch.searchsorted(cdf, u * cdf[-1]).clamp_max(len(cdf) - 1)
        z = randn((n, self.dim), generator, device, torch.float64)
        x = self.means[k] + torch.einsum("nde,ne->nd", self.eigvecs[k], self.eigvals[k].sqrt() * z)
        return x.float().reshape(n, *self.event_shape)

    def diffused(self, m: float, s: float) -> "GaussianMixture":
        """The mixture pushed through q(x_t | x_0) = N(m x_0, s^2 I): exact q_t."""
        covs = m**2 * self.covs + s**2 * torch.eye(self.dim, dtype=torch.float64, device=self.means.device)
        return GaussianMixture(self.weights, m * self.means, covs, self.event_shape)

    def at_time(self, sde: SDE, t: float) -> "GaussianMixture":
        """Exact marginal q_t of this distribution under ``sde``."""
        m, s = sde.marginal_coeffs(torch.tensor([float(t)], dtype=torch.float64))
        return self.diffused(float(m), float(s))

    def entropy(self) -> float:
        """Differential entropy in nats; exact for one component (K = 1)."""
        if self.means.shape[0] != 1:
            raise NotImplementedError("closed-form entropy exists only for a single Gaussian")
        return float(0.5 * (self.dim * (1 + math.log(2 * math.pi)) + torch.log(self.eigvals[0]).sum()))


class OracleScore(NoisePredictor):
    """The exact score of ``data`` diffused by ``sde``: grad_x log q_t(x).

    Wraps a :class:`GaussianMixture` as a noise-prediction network, ``eps_hat = -s(t) score``,
    so it can stand in wherever a trained network is used.
    """

    def __init__(self, data: GaussianMixture, sde: SDE) -> None:
        super().__init__()
        self.data, self.sde = data, sde

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        m, s = self.sde.marginal_coeffs(t.to(torch.float64))
        return self.data.marginal_score(x, m, s)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        s = self.sde.marginal_std(t.to(torch.float64))
        return (-append_dims(s, x.ndim) * self.score(x, t).to(torch.float64)).to(x.dtype)


# ---------------------------------------------------------------------- typed constructors
# Subclasses with plain-typed arguments, so a config can inject a distribution with
# ``class_path: difftime.toy.Ring`` and ``init_args``.
def _isotropic_covs(std: Tensor, k: int, d: int) -> Tensor:
    std = torch.as_tensor(std, dtype=torch.float64).expand(k)
    return std[:, None, None] ** 2 * torch.eye(d, dtype=torch.float64)


class Gaussian(GaussianMixture):
    """N(mean, diag(std^2)) in ``dim`` dimensions; ``mean`` and ``std`` scalars or per-dim lists."""

    def __init__(self, dim: int = 2, mean: float | list[float] = 0.0, std: float | list[float] = 1.0,
                 event_shape: list[int] | None = None) -> None:
        mu = torch.as_tensor(mean, dtype=torch.float64).expand(dim).reshape(1, dim)
        sd = torch.as_tensor(std, dtype=torch.float64).expand(dim)
        super().__init__(torch.ones(1), mu, torch.diag(sd**2)[None], event_shape)


class Ring(GaussianMixture):
    """2-D mixture of ``n_modes`` isotropic Gaussians equally spaced on a circle."""

    def __init__(self, n_modes: int = 8, radius: float = 1.0, std: float = 0.05) -> None:
        angles = torch.arange(n_modes, dtype=torch.float64) * (2 * math.pi / n_modes)
        mu = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
        super().__init__(torch.ones(n_modes), mu, _isotropic_covs(torch.tensor(std), n_modes, 2))


class Grid(GaussianMixture):
    """2-D mixture on an ``n_per_side`` x ``n_per_side`` grid centred at the origin."""

    def __init__(self, n_per_side: int = 5, spacing: float = 0.5, std: float = 0.05) -> None:
        ticks = (torch.arange(n_per_side, dtype=torch.float64) - (n_per_side - 1) / 2) * spacing
        mu = torch.cartesian_prod(ticks, ticks)
        k = mu.shape[0]
        super().__init__(torch.ones(k), mu, _isotropic_covs(torch.tensor(std), k, 2))


class RandomMixture(GaussianMixture):
    """Reproducible random mixture with anisotropic covariances, in any dimension."""

    def __init__(self, dim: int = 2, n_components: int = 4, seed: int = 0, spread: float = 1.0,
                 std_min: float = 0.1, std_max: float = 0.4) -> None:
        g = torch.Generator().manual_seed(seed)
        mu = spread * torch.randn(n_components, dim, generator=g, dtype=torch.float64)
        q, _ = torch.linalg.qr(torch.randn(n_components, dim, dim, generator=g, dtype=torch.float64))
        stds = std_min + (std_max - std_min) * torch.rand(n_components, dim, generator=g, dtype=torch.float64)
        covs = q @ torch.diag_embed(stds**2) @ q.transpose(-1, -2)
        weights = 0.5 + torch.rand(n_components, generator=g, dtype=torch.float64)
        super().__init__(weights, mu, covs)
