"""SDE coefficients and marginals against independent answers."""

from __future__ import annotations

import math

import pytest
import torch

from difftime.sde import SDE, SubVPSDE, VESDE, VPSDE
from difftime.utils import ConfigError


def simulate_forward(sde: SDE, x0: torch.Tensor, t_end: float, steps: int, g: torch.Generator) -> torch.Tensor:
    """Euler-Maruyama on the forward SDE dx = f x dt + g dw, in float64 (independent of the closed form)."""
    x = x0.clone().double()
    dt = t_end / steps
    for i in range(steps):
        t = torch.full((x.shape[0],), i * dt, dtype=torch.float64)
        x = x + sde.drift(x, t) * dt + sde.diffusion(t)[:, None] * math.sqrt(dt) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x


@pytest.mark.parametrize("t_end", [0.2, 0.6])
def test_marginal_matches_forward_simulation(sde, t_end, generator):
    n = 20000
    x0 = torch.full((n, 2), 0.7, dtype=torch.float64)
    x0[:, 1] = -1.3
    xt = simulate_forward(sde, x0, t_end, 2000, generator)
    m, s = sde.marginal_coeffs(torch.tensor([t_end], dtype=torch.float64))
    mean_se = s / math.sqrt(n)
    assert torch.allclose(xt.mean(0), m * x0[0], atol=float(5 * mean_se + 2e-3 * m))
    var = xt.var(0)
    # std of the sample variance is s^2 sqrt(2/(n-1)); Euler error O(dt)
    assert torch.allclose(var, (s**2).expand(2), rtol=5 * math.sqrt(2 / n) + 5e-3)


def test_variance_ode_identity(sde):
    """ds^2/dt = 2 f s^2 + g^2 and d log m/dt = f, checked by finite differences."""
    t = torch.linspace(0.05, sde.T - 0.01, 50, dtype=torch.float64)
    h = 1e-6
    s2 = lambda u: sde.marginal_std(u) ** 2
    ds2 = (s2(t + h) - s2(t - h)) / (2 * h)
    assert torch.allclose(ds2, 2 * sde.drift_coeff(t) * s2(t) + sde.diffusion(t) ** 2, rtol=1e-5)
    dlogm = (sde.log_mean_coeff(t + h) - sde.log_mean_coeff(t - h)) / (2 * h)
    assert torch.allclose(dlogm, sde.drift_coeff(t), atol=1e-6)


def test_log_nsr_derivative_and_inverse(sde):
    t = torch.linspace(sde.eps, sde.T, 200, dtype=torch.float64)
    lam = sde.log_nsr(t)
    assert torch.all(lam[1:] > lam[:-1])
    assert torch.allclose(sde.t_from_log_nsr(lam), t, rtol=1e-9, atol=1e-12)
    generic = SDE.t_from_log_nsr(sde, lam)
    assert torch.allclose(generic, t, rtol=1e-9, atol=1e-12)
    tm = t[10:-10]
    h = 1e-7
    dlam = (sde.log_nsr(tm + h) - sde.log_nsr(tm - h)) / (2 * h)
    assert torch.allclose(dlam, sde.diffusion(tm) ** 2 / sde.marginal_std(tm) ** 2, rtol=1e-5)


def test_prior_log_density_integrates_to_one(sde):
    prior = sde.prior((2,))
    r = 8 * prior.std
    ticks = torch.linspace(-r, r, 801, dtype=torch.float64)
    grid = torch.cartesian_prod(ticks, ticks)
    dx = float(ticks[1] - ticks[0])
    mass = prior.log_prob(grid).double().exp().sum() * dx * dx
    assert abs(float(mass) - 1.0) < 1e-4


def test_prior_matches_marginal_scale_at_T():
    vp = VPSDE(T=1.0)
    assert vp.prior_std == 1.0
    ve = VESDE(T=0.5, sigma_min=0.01, sigma_max=50.0)
    s_T = ve.marginal_std(torch.tensor([0.5], dtype=torch.float64))
    assert math.isclose(ve.prior_std, float(s_T), rel_tol=1e-12)
    assert math.isclose(ve.prior_std**2, ve.sigma(torch.tensor(0.5)).item() ** 2 - 0.01**2, rel_tol=1e-5)


def test_reverse_drift_identity(sde):
    """reverse drift = 2 * probability-flow drift - forward drift (both from the same score)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 4, 4, generator=g)
    score = torch.randn(16, 3, 4, 4, generator=g)
    t = torch.rand(16, generator=g) * (sde.T - sde.eps) + sde.eps
    rev = sde.reverse_drift(x, t, score)
    ode = sde.probability_flow_drift(x, t, score)
    assert torch.allclose(rev, 2 * ode - sde.drift(x, t), atol=1e-5)
    g2 = sde.diffusion(t) ** 2
    assert torch.allclose(rev - ode, -0.5 * g2[:, None, None, None] * score, atol=1e-5)


def test_subvp_variance_below_vp():
    t = torch.linspace(0.01, 1.0, 20)
    assert torch.all(SubVPSDE().marginal_std(t) < VPSDE().marginal_std(t))


def test_with_T_keeps_parameters():
    ve = VESDE(T=1.0, sigma_max=30.0)
    short = ve.with_T(0.4)
    assert short.T == 0.4 and short.sigma_max == 30.0 and ve.T == 1.0
    assert short.prior_std < ve.prior_std


@pytest.mark.parametrize(
    "factory, key",
    [
        (lambda: VPSDE(T=1.5), "T"),
        (lambda: VPSDE(T=1e-6, eps=1e-5), "T"),
        (lambda: SubVPSDE(T=0.5, eps=0.0), "eps"),
        (lambda: VPSDE(beta_min=-0.1), "beta_min"),
        (lambda: VPSDE(beta_min=1.0, beta_max=0.5), "beta_max"),
        (lambda: VESDE(sigma_min=0.0), "sigma_min"),
        (lambda: VESDE(sigma_min=1.0, sigma_max=0.5), "sigma_max"),
    ],
)
def test_bad_arguments_name_key_and_range(factory, key):
    with pytest.raises(ConfigError) as err:
        factory()
    assert err.value.key == key
    assert f"'{key}'" in str(err.value) and "allowed" in str(err.value)


def test_ve_refuses_T_above_one_like_vp():
    """sigma(t) = sigma_min (sigma_max / sigma_min)^t: at T = 5 the prior std is 3e16, never meant."""
    with pytest.raises(ConfigError, match=r"config key 'T' \(VESDE\) = 1.5 .*eps < T <= 1"):
        VESDE(T=1.5)
    assert VESDE(T=1.0).T == 1.0
