"""Denoising score matching (Vincent 2011; Song et al. 2021 Eq. 7), per sample.

With x_t = m(t) x_0 + s(t) z and a noise-prediction network, the weighted DSM objective
lambda(t) || s_theta(x_t, t) - grad log q(x_t | x_0) ||^2 equals
(lambda(t) / s(t)^2) || eps_hat - z ||^2. Two weightings:

* ``noise``: lambda = s(t)^2, the epsilon-prediction MSE of Ho et al. 2020;
* ``likelihood``: lambda = g(t)^2, whose integral over t bounds the negative log-likelihood
  (Song et al. 2021b, "Maximum Likelihood Training of Score-Based Diffusion Models", Thm. 1).
  With ``importance_sampling`` t is drawn with density proportional to g^2 / s^2, i.e. uniformly
  in the log noise-to-signal ratio (see :meth:`difftime.sde.SDE.log_nsr`), which makes the
  weight constant and the estimator's variance far lower (ibid. Sec. 5).

Losses are averaged over dimensions and returned per sample, ``[B]``: the caller reduces.
For the likelihood weighting, ``loss * D * (T - eps) / 2`` is an unbiased estimate of the
diffusion term of the ELBO up to a constant that does not depend on the network.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from difftime.sde import SDE
from difftime.score import NoiseNet
from difftime.utils import ConfigError, Generator, mean_flat, rand, randn


def sample_time(sde: SDE, n: int, generator: Generator = None, device: torch.device | str = "cpu",
                importance: bool = False) -> Tensor:
    """t in [eps, T], ``[n]`` in fp32: uniform, or with density g^2/s^2 / Z if ``importance``."""
    u = rand((n,), generator, device, torch.float64)
    lo, hi = torch.tensor([sde.eps, sde.T], dtype=torch.float64, device=device)
    if not importance:
        return (lo + u * (hi - lo)).float()
    lam_lo, lam_hi = sde.log_nsr(lo), sde.log_nsr(hi)
    t = sde.t_from_log_nsr(lam_lo + u * (lam_hi - lam_lo))
    return t.clamp(lo, hi).float()


class DSMLoss:
    """Denoising score matching loss with t ~ U(eps, T) or importance-sampled t.

    Args:
        weighting: ``"noise"`` (lambda = s^2) or ``"likelihood"`` (lambda = g^2).
        importance_sampling: draw t proportional to g^2 / s^2 (only with ``likelihood``).
    """

    def __init__(self, weighting: Literal["noise", "likelihood"] = "noise",
                 importance_sampling: bool = False) -> None:
        if weighting not in ("noise", "likelihood"):
            raise ConfigError("weighting", weighting, "'noise' or 'likelihood'", "DSMLoss")
        if importance_sampling and weighting != "likelihood":
            raise ConfigError("importance_sampling", importance_sampling,
                              "true only with weighting: likelihood", "DSMLoss")
        self.weighting, self.importance_sampling = weighting, importance_sampling

    def sample_time(self, sde: SDE, n: int, generator: Generator = None,
                    device: torch.device | str = "cpu") -> Tensor:
        return sample_time(sde, n, generator, device, self.importance_sampling)

    def weight(self, sde: SDE, t: Tensor) -> Tensor:
        """lambda(t) / s(t)^2 divided by the density of t relative to U(eps, T); ``[B]`` fp32."""
        if self.weighting == "noise":
            return torch.ones_like(t, dtype=torch.float32)
        if not self.importance_sampling:
            return (sde.diffusion(t) ** 2 / sde.marginal_std(t) ** 2).float()
        ends = torch.tensor([sde.eps, sde.T], dtype=torch.float64, device=t.device)
        lam = sde.log_nsr(ends)
        z = (lam[1] - lam[0]) / (sde.T - sde.eps)
        return torch.full_like(t, float(z), dtype=torch.float32)

    def __call__(self, net: NoiseNet, sde: SDE, x0: Tensor, generator: Generator = None,
                 t: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
        """Per-sample loss ``[B]``. ``t`` and ``noise`` may be given (sharded draws, tests)."""
        if t is None:
            t = self.sample_time(sde, x0.shape[0], generator, x0.device)
        if noise is None:
            noise = randn(x0.shape, generator, x0.device, x0.dtype)
        x_t = sde.perturb(x0, t, noise)
        eps_hat = net(x_t, t)
        return self.weight(sde, t) * mean_flat((eps_hat.float() - noise.float()) ** 2)

    def __repr__(self) -> str:
        return f"DSMLoss(weighting={self.weighting!r}, importance_sampling={self.importance_sampling})"
