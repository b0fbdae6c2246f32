"""Variational bound, truncated evaluation and probability-flow likelihood against independent answers.

Gaussian data with the oracle score have every term in closed form (derived below); Gaussian
mixtures are checked against Monte-Carlo references built only from their exact densities.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import integrate
from torchdiffeq import odeint

from difftime.data import ImageScaling, bits_per_dim
from difftime.likelihood import (ElboTerms, best_truncation, elbo, ode_log_likelihood, prior_term,
                                  truncated_elbo)
from difftime.score import make_score_fn
from difftime.sde import SDE, SubVPSDE, VESDE, VPSDE
from difftime.toy import Gaussian, GaussianMixture, OracleScore, RandomMixture, Ring
from difftime.utils import ConfigError, PerSampleNoise


pytestmark = pytest.mark.usefixtures("one_thread")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def coeffs(sde: SDE, t: float) -> tuple[float, float]:
    m, s = sde.marginal_coeffs(torch.tensor([t], dtype=torch.float64))
    return float(m), float(s)


def mean_se(x: torch.Tensor) -> tuple[float, float]:
    x = x.double()
    return float(x.mean()), float(x.std() / math.sqrt(x.numel()))


# ---------------------------------------------------------------------- Gaussian closed forms
# Data N(mu, diag(sigma^2)), q(x_t | x_0) = N(m x_0, s^2 I), prior N(0, I), per dimension i:
#   E_x0 KL(q(x_T|x_0) || N(0,1)) = 1/2 [s^2 + m^2 (mu^2 + sigma^2) - 1 - log s^2]
#   KL(q_T || N(0,1))             = 1/2 [v + m^2 mu^2 - 1 - log v],   v = m^2 sigma^2 + s^2
#   oracle: eps_hat = s (x_t - m mu) / v, so eps_hat - z = m sigma (s w - m sigma z) / v with
#   x_0 = mu + sigma w, and E ||eps_hat - z||^2 = m^2 sigma^2 / v per dimension;
#   E KL(q(x_0|x_eps) || N(x_eps/m, s^2/m^2)) = 1/2 log(1 + s^2 / (m^2 sigma^2)).
def expected_prior_kl(sde: SDE, mu: torch.Tensor, sigma: torch.Tensor) -> float:
    m, s = coeffs(sde, sde.T)
    return float(0.5 * (s**2 + m**2 * (mu**2 + sigma**2) - 1 - math.log(s**2)).sum())


def marginal_prior_kl(sde: SDE, mu: torch.Tensor, sigma: torch.Tensor, T: float) -> float:
    m, s = coeffs(sde, T)
    v = m**2 * sigma**2 + s**2
    return float(0.5 * (v + m**2 * mu**2 - 1 - torch.log(v)).sum())


def oracle_diffusion_term(sde: SDE, sigma: torch.Tensor, T: float) -> float:
    """1/2 int_eps^T g^2/s^2 sum_i m^2 sigma_i^2 / (m^2 sigma_i^2 + s^2) dt, by quadrature in log t."""

    def integrand(log_t: float) -> float:
        t = torch.tensor([math.exp(log_t)], dtype=torch.float64)
        m, s, g = sde.mean_coeff(t), sde.marginal_std(t), sde.diffusion(t)
        inner = (m**2 * sigma**2 / (m**2 * sigma**2 + s**2)).sum()
        return float(0.5 * t * g**2 / s**2 * inner)

    value, err = integrate.quad(integrand, math.log(sde.eps), math.log(T), limit=400, epsabs=1e-10, epsrel=1e-10)
    assert err < 1e-6
    return value


def decoder_gap(sde: SDE, sigma: torch.Tensor) -> float:
    m, s = coeffs(sde, sde.eps)
    return float(0.5 * torch.log1p(s**2 / (m**2 * sigma**2)).sum())


GAUSSIAN_CASES = [
    (2, 0.4, 1e-3, [0.8, -0.5], [0.5, 0.3]),
    (3, 1.0, 1e-5, [1.0, 0.0, -1.5], [0.2, 0.7, 1.0]),
    (4, 1.0, 1e-3, [0.3, 0.3, -0.2, 2.0], [0.1, 0.4, 0.4, 1.3]),
]


@pytest.mark.parametrize("dim, T, eps, mu, sigma", GAUSSIAN_CASES)
def test_gaussian_elbo_gap_and_terms(dim, T, eps, mu, sigma):
    sde = VPSDE(T=T, eps=eps)
    data = Gaussian(dim=dim, mean=mu, std=sigma)
    mu, sigma = torch.tensor(mu, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64)
    g = seeded(dim)
    x0 = data.sample(20000, g)
    terms = elbo(OracleScore(data, sde).score, sde, sde.prior((dim,)), x0, n_t=16, generator=g)

    # E_{q_0} log q_0 - E ELBO = KL(q_T || N(0, I)) + sum_i 1/2 log(1 + s^2 / (m^2 sigma_i^2))
    gap, gap_se = mean_se(terms.neg_elbo - data.entropy())
    reference = marginal_prior_kl(sde, mu, sigma, T) + decoder_gap(sde, sigma)
    assert abs(gap - reference) < 4 * gap_se, (gap, gap_se, reference)

    prior, prior_se = mean_se(terms.prior)
    assert abs(prior - expected_prior_kl(sde, mu, sigma)) < 4 * prior_se
    m_T, s_T = coeffs(sde, T)
    per_datum = 0.5 * (s_T**2 + m_T**2 * x0.double() ** 2 - 1 - math.log(s_T**2)).sum(1)
    assert torch.allclose(terms.prior.double(), per_datum, rtol=1e-4, atol=1e-6)
    assert torch.all(terms.prior_se == 0)

    m_e, s_e = coeffs(sde, eps)
    recon = -0.5 * dim * math.log(2 * math.pi * math.e * s_e**2 / m_e**2)
    assert torch.allclose(terms.reconstruction.double(), torch.full((20000,), recon, dtype=torch.float64), rtol=1e-6)

    diffusion, diffusion_se = mean_se(terms.diffusion)
    assert abs(diffusion - oracle_diffusion_term(sde, sigma, T)) < 4 * diffusion_se


def test_diffusion_standard_error_is_calibrated():
    """The per-datum SE from one-draw strata matches the spread of repeated estimates."""
    sde = VPSDE(T=1.0, eps=1e-3)
    data = Gaussian(dim=3, mean=[0.5, -1.0, 0.0], std=[0.3, 0.6, 1.0])
    x0 = data.sample(1, seeded(0)).expand(4000, 3)
    terms = elbo(OracleScore(data, sde).score, sde, sde.prior((3,)), x0, n_t=16, generator=seeded(1))
    ratio = float(terms.diffusion.std() / terms.diffusion_se.pow(2).mean().sqrt())
    assert 0.85 < ratio < 1.1, ratio


def test_monte_carlo_prior_term_matches_closed_form():
    """A prior without kl_from (a one-component mixture equal to N(0, I)) takes the MC path."""
    sde = VPSDE(T=0.15, eps=1e-3)  # s(T)^2 = 0.22: the entropy term matters
    data = Gaussian(dim=3, mean=[1.0, 0.0, -0.5], std=0.5)
    x0 = data.sample(2000, seeded(2))
    exact, exact_se = prior_term(sde, sde.prior((3,)), x0)
    mc, mc_se = prior_term(sde, Gaussian(dim=3), x0, n_prior=64, generator=seeded(3))
    assert torch.all(exact_se == 0)
    error, error_se = mean_se(mc - exact)
    assert abs(error) < 4 * error_se
    # the reported SE matches the spread of the error (mean and SE are correlated per datum,
    # the cross-entropy being skewed, so compare spreads rather than averaging z-scores)
    ratio = float((mc - exact).std() / mc_se.pow(2).mean().sqrt())
    assert 0.9 < ratio < 1.1, ratio
    _, single_se = prior_term(sde, Gaussian(dim=3), x0[:4], n_prior=1, generator=seeded(3))
    assert torch.all(torch.isnan(single_se))


# ---------------------------------------------------------------------- mixtures, other SDEs
def mixture_gap_reference(data: GaussianMixture, sde: SDE, n: int, g: torch.Generator) -> tuple[float, float]:
    """KL(q_T || nu) + E KL(q(x_0|x_eps) || p(x_0|x_eps)) by Monte Carlo with exact densities.

    q(x_0|x_eps) = q_0(x_0) q(x_eps|x_0) / q_eps(x_eps); against the decoder
    N(x_0; x_eps/m, s^2/m^2) the two Gaussian kernels differ only by the Jacobian m^D.
    """
    q_T = data.at_time(sde, sde.T)
    x_T = q_T.sample(n, g).double()
    var = sde.prior_std**2
    log_nu = -0.5 * (x_T**2).sum(1) / var - data.dim / 2 * math.log(2 * math.pi * var)
    kl_T = q_T.log_prob(x_T) - log_nu
    m, s = coeffs(sde, sde.eps)
    x0 = data.sample(n, g).double()
    x_eps = m * x0 + s * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    kl_dec = data.log_prob(x0) - data.at_time(sde, sde.eps).log_prob(x_eps) - data.dim * math.log(m)
    return float(kl_T.mean() + kl_dec.mean()), math.sqrt(float(kl_T.var() + kl_dec.var()) / n)


@pytest.mark.parametrize("case", ["subvp-random-mixture", "ve-ring"])
def test_mixture_gap_matches_exact_density_reference(case):
    if case == "ve-ring":
        sde, data = VESDE(T=0.6, eps=1e-3, sigma_max=5.0), Ring(n_modes=6, radius=1.0, std=0.15)
    else:
        sde, data = SubVPSDE(T=0.3, eps=1e-3), RandomMixture(dim=2, n_components=4, seed=3)
    g = seeded(7)
    x0 = data.sample(20000, g)
    terms = elbo(OracleScore(data, sde).score, sde, sde.prior((2,)), x0, n_t=16, generator=g)
    gap, gap_se = mean_se(terms.neg_elbo.double() + data.log_prob(x0))
    reference, reference_se = mixture_gap_reference(data, sde, 40000, seeded(8))
    assert reference > 10 * reference_se  # the prior gap is resolved, not just zero
    assert abs(gap - reference) < 4 * math.hypot(gap_se, reference_se), (gap, gap_se, reference, reference_se)


# ---------------------------------------------------------------------- shapes, precision, seeds
def test_elbo_is_shape_agnostic():
    flat = Gaussian(dim=4, mean=[0.1, 0.2, -0.3, 0.4], std=[0.5, 0.6, 0.7, 0.8])
    image = Gaussian(dim=4, mean=[0.1, 0.2, -0.3, 0.4], std=[0.5, 0.6, 0.7, 0.8], event_shape=[1, 2, 2])
    sde = SubVPSDE(T=0.7, eps=1e-3)
    x0 = flat.sample(32, seeded(0))
    a = elbo(OracleScore(flat, sde).score, sde, sde.prior((4,)), x0, n_t=4, generator=seeded(1))
    b = elbo(OracleScore(image, sde).score, sde, sde.prior((1, 2, 2)), x0.reshape(32, 1, 2, 2), n_t=4,
             generator=seeded(1))
    for name in ("prior", "diffusion", "reconstruction", "diffusion_se"):
        assert torch.allclose(getattr(a, name), getattr(b, name), rtol=1e-6), name
    qa, qb = image.at_time(sde, sde.T), flat.at_time(sde, sde.T)
    la = ode_log_likelihood(OracleScore(flat, sde).score, sde, qb, x0[:4], generator=seeded(2))
    lb = ode_log_likelihood(OracleScore(image, sde).score, sde, qa, x0[:4].reshape(4, 1, 2, 2), generator=seeded(2))
    assert torch.allclose(la.log_prob, lb.log_prob, rtol=1e-5)


class TinyNoiseNet(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(dim + 1, dim)
        torch.nn.init.normal_(self.linear.weight, generator=seeded(0))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([x, t[:, None]], dim=1))


def test_elbo_runs_in_fp32_under_autocast():
    sde = VPSDE(T=1.0, eps=1e-3)
    score_fn = make_score_fn(TinyNoiseNet(3), sde)
    x0 = torch.randn(16, 3, generator=seeded(0))
    plain = elbo(score_fn, sde, sde.prior((3,)), x0, n_t=4, generator=seeded(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = elbo(score_fn, sde, sde.prior((3,)), x0, n_t=4, generator=seeded(1))
        ode = ode_log_likelihood(score_fn, sde, sde.prior((3,)), x0[:2], generator=seeded(2))
    assert mixed.diffusion.dtype == torch.float32 and ode.log_prob.dtype == torch.float32
    assert torch.equal(plain.diffusion, mixed.diffusion)


def test_per_sample_noise_makes_results_batch_independent():
    sde, data = VPSDE(T=1.0, eps=1e-3), Gaussian(dim=2, std=0.5)
    score = OracleScore(data, sde).score
    x0 = data.sample(12, seeded(0))
    full = elbo(score, sde, Gaussian(dim=2), x0, n_t=4, n_prior=2, generator=PerSampleNoise(range(12)))
    part = elbo(score, sde, Gaussian(dim=2), x0[5:], n_t=4, n_prior=2, generator=PerSampleNoise(range(5, 12)))
    assert torch.allclose(full.total[5:], part.total, rtol=1e-6)


# ---------------------------------------------------------------------- truncated evaluation
def test_truncated_elbo_single_point_reproduces_elbo():
    sde, data = VPSDE(T=1.0, eps=1e-3), Gaussian(dim=2, mean=[0.5, -1.0], std=[0.3, 0.8])
    score = OracleScore(data, sde).score
    x0 = data.sample(64, seeded(0))
    for T, prior_fn in [(0.3, None), (1.0, None), (0.6, lambda T: Gaussian(dim=2))]:
        short = sde.with_T(T)
        prior = prior_fn(T) if prior_fn else short.prior((2,))
        a = truncated_elbo(score, sde, x0, [T], prior_fn=prior_fn, n_t=8, n_prior=3, generator=seeded(5))[T]
        b = elbo(score, short, prior, x0, n_t=8, n_prior=3, generator=seeded(5))
        for name in ("prior", "diffusion", "reconstruction", "prior_se", "diffusion_se"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (T, name)


def test_truncated_elbo_grid_matches_separate_runs_and_closed_forms():
    sde, dim = VPSDE(T=1.0, eps=1e-3), 2
    data = Gaussian(dim=dim, mean=[1.0, -0.5], std=[0.4, 0.7])
    sigma = torch.tensor([0.4, 0.7], dtype=torch.float64)
    score = OracleScore(data, sde).score
    x0 = data.sample(4000, seeded(0))
    grid = [1.0, 0.2, 0.5]
    results = truncated_elbo(score, sde, x0, grid, n_t=16, generator=seeded(1))
    assert list(results) == [0.2, 0.5, 1.0]
    for T, terms in results.items():
        separate = elbo(score, sde.with_T(T), sde.with_T(T).prior((dim,)), x0, n_t=16, generator=seeded(int(10 * T)))
        assert torch.allclose(terms.prior, separate.prior)
        assert torch.equal(terms.reconstruction, separate.reconstruction)
        diff, diff_se = mean_se(terms.diffusion - separate.diffusion)
        assert abs(diff) < 4 * diff_se
        value, value_se = mean_se(terms.diffusion)
        assert abs(value - oracle_diffusion_term(sde, sigma, T)) < 4 * value_se, T
    priors = torch.stack([results[T].prior for T in results])
    assert torch.all(priors[1:] < priors[:-1])


def test_truncated_elbo_rejects_bad_grids():
    sde, data = VPSDE(T=0.8, eps=1e-3), Gaussian(dim=2)
    score, x0 = OracleScore(data, sde).score, torch.zeros(2, 2)
    for grid in ([0.5, 0.9], [1e-3], [0.0005, 0.5], []):
        with pytest.raises(ConfigError, match="T_grid"):
            truncated_elbo(score, sde, x0, grid)


def test_best_truncation():
    def terms(neg: list[float]) -> ElboTerms:
        zero = torch.zeros(len(neg))
        return ElboTerms(torch.tensor(neg), zero, zero, zero, zero)

    assert best_truncation({0.2: terms([3.0, 3.0]), 0.4: terms([1.0, 2.0]), 0.8: terms([2.0, 2.0])}) == 0.4
    # oracle score: the gap KL(q_T' || N(0, I)) only shrinks with T', so T* is the largest T'
    sde, data = VPSDE(T=1.0, eps=1e-3), Gaussian(dim=2, mean=1.0, std=0.5)
    x0 = data.sample(500, seeded(0))
    results = truncated_elbo(OracleScore(data, sde).score, sde, x0, [0.05, 0.15, 1.0], generator=seeded(1))
    assert best_truncation(results) == 1.0


# ---------------------------------------------------------------------- probability-flow ODE
def rotated_gaussian(dim: int) -> GaussianMixture:
    a = torch.randn(dim, dim, generator=seeded(11), dtype=torch.float64)
    mean = torch.linspace(-0.5, 1.0, dim, dtype=torch.float64)
    return GaussianMixture(torch.ones(1), mean[None], (0.3 * a @ a.T + 0.05 * torch.eye(dim))[None])


class BalancedProbes:
    """A noise source whose successive Rademacher probes cycle through fixed sign patterns.

    Averaged over patterns whose pairwise products v_i v_j (i != j) sum to zero, Hutchinson's
    v^T J v is exactly tr J, so the probe average must equal the exact-trace answer.
    """

    def __init__(self, patterns: list[list[int]]) -> None:
        self.patterns, self.count = torch.tensor(patterns, dtype=torch.float64), 0

    def randn(self, shape, device, dtype):
        raise NotImplementedError

    def rand(self, shape, device, dtype):
        signs = self.patterns[self.count % len(self.patterns)]
        self.count += 1
        return torch.where(signs > 0, 0.75, 0.25).to(dtype).reshape(1, *shape[1:]).expand(shape).to(device)


BALANCED_3D = [[1, 1, 1], [1, 1, -1], [1, -1, 1], [-1, 1, 1]]


class CountingScore:
    def __init__(self, score_fn) -> None:
        self.score_fn, self.calls = score_fn, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.score_fn(x, t)


@pytest.mark.parametrize("sde", [VPSDE(T=1.0, eps=1e-5), VESDE(T=1.0, eps=1e-5, sigma_max=5.0)], ids=["vp", "ve"])
def test_ode_log_likelihood_of_gaussian(sde):
    """With the exact score and the exact q_T as prior the PF ODE gives log q_eps exactly."""
    data = rotated_gaussian(3)
    x = data.sample(6, seeded(0))
    score = CountingScore(OracleScore(data, sde).score)
    out = ode_log_likelihood(score, sde, data.at_time(sde, sde.T), x, n_probes=8, generator=seeded(1))
    exact = data.at_time(sde, sde.eps).log_prob(x).float()
    assert torch.all(out.log_prob_se > 0)  # non-diagonal Jacobian: the probes do vary
    assert torch.all((out.log_prob - exact).abs() < 5 * out.log_prob_se + 2e-3), (out.log_prob - exact, out.log_prob_se)
    mean_error = float((out.log_prob - exact).mean())
    assert abs(mean_error) < 4 * float(out.log_prob_se.pow(2).sum().sqrt()) / 6 + 1e-3
    assert out.nfe == score.calls and out.nfe >= 8 * 6
    single = ode_log_likelihood(score, sde, data.at_time(sde, sde.T), x[:2], generator=seeded(1))
    assert torch.all(torch.isnan(single.log_prob_se))
    balanced = ode_log_likelihood(score, sde, data.at_time(sde, sde.T), x, n_probes=4,
                                  generator=BalancedProbes(BALANCED_3D))
    assert torch.allclose(balanced.log_prob, exact, atol=2e-4), balanced.log_prob - exact


def exact_trace_log_likelihood(score_fn, sde: SDE, prior, x: torch.Tensor) -> torch.Tensor:
    """Reference PF-ODE likelihood with the exact divergence of a 2-D drift (one VJP per row)."""

    def func(t, state):
        y = state[0].detach().requires_grad_(True)
        t_b = t.expand(y.shape[0])
        with torch.enable_grad():
            drift = sde.probability_flow_drift(y, t_b, score_fn(y, t_b))
            rows = [torch.autograd.grad(drift[:, i].sum(), y, retain_graph=True)[0][:, i] for i in range(2)]
        return drift.detach(), sum(rows).detach()

    times = torch.tensor([sde.eps, sde.T], dtype=torch.float64)
    with torch.no_grad():
        xs, div = odeint(func, (x.double(), torch.zeros(x.shape[0], dtype=torch.float64)), times, rtol=1e-8, atol=1e-8)
    return prior.log_prob(xs[-1]) + div[-1]


def test_ode_hutchinson_average_matches_exact_divergence():
    sde, data = SubVPSDE(T=1.0, eps=1e-3), RandomMixture(dim=2, n_components=3, seed=1)
    x = data.sample(4, seeded(0))
    score, q_T = OracleScore(data, sde).score, data.at_time(sde, sde.T)
    reference = exact_trace_log_likelihood(score, sde, q_T, x)
    assert torch.allclose(reference, data.at_time(sde, sde.eps).log_prob(x), atol=1e-5)
    out = ode_log_likelihood(score, sde, q_T, x, n_probes=16, generator=seeded(1))
    error = out.log_prob.double() - reference
    assert torch.all(error.abs() < 4 * out.log_prob_se + 2e-3), (error, out.log_prob_se)
    balanced = ode_log_likelihood(score, sde, q_T, x, n_probes=2, generator=BalancedProbes([[1, 1], [1, -1]]))
    assert torch.allclose(balanced.log_prob.double(), reference, atol=2e-4), balanced.log_prob - reference
    assert torch.all(balanced.log_prob_se > 1e-2)  # the two probes differ: the off-diagonal part is real


def test_ode_rejects_zero_probes():
    sde = VPSDE()
    with pytest.raises(ConfigError, match="n_probes"):
        ode_log_likelihood(lambda x, t: -x, sde, sde.prior((2,)), torch.zeros(1, 2), n_probes=0)


# ---------------------------------------------------------------------- bits per dimension
def test_bits_per_dim_of_uniform_model_is_eight():
    scaling = ImageScaling(levels=256)
    x = torch.randint(0, 256, (5, 3, 4, 4), generator=seeded(0))
    y, log_det = scaling(x, seeded(1))
    assert float(y.min()) >= -1.0 and float(y.max()) <= 1.0
    dim = 48
    log_prob_uniform = torch.full((5,), -dim * math.log(2.0))  # density 2^-D on [-1, 1]^D
    assert torch.allclose(bits_per_dim(log_prob_uniform, log_det, dim), torch.full((5,), 8.0), atol=1e-5)


class TimeRecordingScore:
    """Oracle score that records every time it is evaluated at."""

    def __init__(self, score_fn) -> None:
        self.score_fn, self.times = score_fn, []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.times.append(float(t.max()))
        return self.score_fn(x, t)


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_ode_likelihood_never_evaluates_the_score_beyond_T(method):
    """Regression (issue 10, defect 12): torchdiffeq stepped past T and interpolated back, so
    the score was evaluated at t up to 1.5 for T = 1, where a trained network extrapolates."""
    sde, data = VPSDE(T=1.0, eps=1e-5), RandomMixture(dim=2, n_components=3, seed=1)
    x = data.sample(8, seeded(0))
    score = TimeRecordingScore(OracleScore(data, sde).score)
    out = ode_log_likelihood(score, sde, data.at_time(sde, sde.T), x, method=method, n_probes=2,
                             generator=BalancedProbes([[1, 1], [1, -1]]))  # exact trace in 2-D
    assert len(score.times) == out.nfe > 10
    assert max(score.times) <= sde.T and min(score.times) >= sde.eps * (1 - 1e-6)  # fp32 eps
    assert torch.allclose(out.log_prob, data.at_time(sde, sde.eps).log_prob(x).float(), atol=2e-3)
