"""Analytic toy distributions, the oracle score and the DSM loss."""

from __future__ import annotations

import math

import pytest
import torch

from difftime.losses import DSMLoss, sample_time
from difftime.sde import VESDE, VPSDE
from difftime.toy import Gaussian, OracleScore, RandomMixture, Ring
from difftime.utils import ConfigError


@pytest.mark.parametrize("data", [RandomMixture(dim=3, n_components=3, seed=1), Ring(n_modes=6, std=0.1)])
def test_oracle_score_is_gradient_of_marginal_log_density(sde, data):
    g = torch.Generator().manual_seed(0)
    t = torch.rand(64, generator=g, dtype=torch.float64) * (sde.T - sde.eps) + sde.eps
    x = sde.perturb(data.sample(64, g).double(), t, torch.randn(64, data.dim, generator=g, dtype=torch.float64))
    x.requires_grad_(True)
    m, s = sde.marginal_coeffs(t)
    (grad,) = torch.autograd.grad(data.marginal_log_prob(x, m, s).sum(), x)
    oracle = OracleScore(data, sde).score(x.detach(), t)
    assert torch.allclose(oracle, grad, rtol=1e-9, atol=1e-9)


def test_diffused_mixture_matches_sampled_forward_process():
    """q_t from at_time() against x_t = m x_0 + s z of samples: mean and covariance."""
    sde, data = VESDE(T=1.0, sigma_max=3.0), RandomMixture(dim=2, n_components=3, seed=4)
    q_t = data.at_time(sde, 0.7)
    g = torch.Generator().manual_seed(1)
    n = 200_000
    t = torch.full((n,), 0.7, dtype=torch.float64)
    xt = sde.perturb(data.sample(n, g).double(), t, torch.randn(n, 2, generator=g, dtype=torch.float64))
    se = (q_t.covariance().diagonal() / n).sqrt()
    assert torch.all((xt.mean(0) - q_t.mean()).abs() < 5 * se)
    assert torch.allclose(torch.cov(xt.T), q_t.covariance(), rtol=0.02, atol=0.02)


def test_mixture_density_normalises_and_matches_moments():
    data = Ring(n_modes=5, radius=1.0, std=0.2)
    ticks = torch.linspace(-2.5, 2.5, 501, dtype=torch.float64)
    grid = torch.cartesian_prod(ticks, ticks)
    dx = float(ticks[1] - ticks[0])
    assert abs(float(data.log_prob(grid).exp().sum()) * dx * dx - 1.0) < 1e-4
    x = data.sample(100_000, torch.Generator().manual_seed(3)).double()
    assert torch.allclose(x.mean(0), data.mean(), atol=0.01)
    assert torch.allclose(torch.cov(x.T), data.covariance(), atol=0.01)


def test_gaussian_entropy_closed_form():
    data = Gaussian(dim=3, mean=[0.0, 1.0, -1.0], std=[0.5, 1.0, 2.0])
    x = data.sample(200_000, torch.Generator().manual_seed(0))
    mc = -data.log_prob(x).mean()
    assert abs(float(mc) - data.entropy()) < 4 * float(data.log_prob(x).std()) / math.sqrt(x.shape[0])


def test_dsm_loss_is_minimised_by_the_oracle():
    """E||eps_hat - z||^2 = E||eps_hat - E[z|x_t]||^2 + const, with E[z|x_t] = -s grad log q_t.

    With common random numbers, the loss of the oracle plus a perturbation exceeds the oracle's
    by the mean squared perturbation (the cross term vanishes in expectation).
    """
    sde, data = VPSDE(T=0.6), RandomMixture(dim=2, n_components=3, seed=2)
    oracle = OracleScore(data, sde)
    g = torch.Generator().manual_seed(5)
    n = 100_000
    x0 = data.sample(n, g)
    t = sample_time(sde, n, g)
    z = torch.randn(x0.shape, generator=g)
    direction = lambda x, t_: torch.sin(3 * x) + t_[:, None]
    perturbed = lambda x, t_: oracle(x, t_) + 0.3 * direction(x, t_)
    loss = DSMLoss("noise")
    base = loss(oracle, sde, x0, t=t, noise=z)
    pert = loss(perturbed, sde, x0, t=t, noise=z)
    excess = pert - base
    expected = (0.3 * direction(sde.perturb(x0, t, z), t)).pow(2).mean(1)
    diff = excess - expected
    assert float(diff.mean()).__abs__() < 4 * float(diff.std()) / math.sqrt(n)
    assert float(excess.mean()) > 0


def test_importance_sampled_time_follows_g2_over_s2():
    sde = VPSDE(T=0.4, eps=1e-4)
    t = sample_time(sde, 50_000, torch.Generator().manual_seed(0), importance=True).double()
    assert float(t.min()) >= sde.eps and float(t.max()) <= sde.T
    # empirical CDF against the exact one, F(t) = (lam(t) - lam(eps)) / (lam(T) - lam(eps))
    ts = torch.sort(t).values
    ends = sde.log_nsr(torch.tensor([sde.eps, sde.T], dtype=torch.float64))
    cdf = (sde.log_nsr(ts) - ends[0]) / (ends[1] - ends[0])
    ecdf = torch.arange(1, len(ts) + 1, dtype=torch.float64) / len(ts)
    assert float((cdf - ecdf).abs().max()) < 1.63 / math.sqrt(len(ts)) * 1.2  # KS 1% level


def test_importance_sampling_is_unbiased_for_likelihood_weighting():
    sde, data = VPSDE(T=1.0, eps=1e-3), Gaussian(dim=2, std=0.5)
    net = lambda x, t: 0.8 * OracleScore(data, sde)(x, t)  # imperfect, so the loss depends on t
    g = torch.Generator().manual_seed(9)
    n = 200_000
    x0 = data.sample(n, g)
    plain = DSMLoss("likelihood")(net, sde, x0, g)
    weighted = DSMLoss("likelihood", importance_sampling=True)(net, sde, x0, g)
    se = math.sqrt(plain.var() / n + weighted.var() / n)
    assert abs(float(plain.mean() - weighted.mean())) < 4 * se
    assert weighted.var() < plain.var()  # the point of importance sampling


def test_loss_options_are_validated():
    with pytest.raises(ConfigError, match="importance_sampling"):
        DSMLoss("noise", importance_sampling=True)
    with pytest.raises(ConfigError, match="weighting"):
        DSMLoss("bogus")
