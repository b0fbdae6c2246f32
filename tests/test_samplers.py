"""Samplers fed the exact (oracle) score of Gaussian and Gaussian-mixture data.

Every sampler starts from x_T drawn from the exact q_T, so with the exact score its output
should follow the data distribution up to Monte-Carlo and discretisation error. Tolerances:

- sample mean, per dim: 5 standard errors sqrt(C_ii / n) plus ``allow * sqrt(max_i C_ii)``;
- sample covariance, per entry: 5 standard errors, estimated from the samples as
  std((x_i - mean_i)(x_j - mean_j)) / sqrt(n), plus ``allow * max_i C_ii``.

``allow`` is the discretisation allowance: 3% for the SDE samplers at 500 steps (weak order 1
with h = T / 500), 0.5% for the ODE samplers (the exact-flow tests below bound their per-sample
error by 5e-3 of the data scale). A 5-SE bound has a false-alarm rate of about 6e-7 per entry;
the seeds are fixed anyway. At these seeds the errors stay within 2.4 standard errors (and
within 3.4 over four other seeds), a third of the tolerance or less.

For Gaussian data the probability-flow ODE has a closed-form solution (each coordinate keeps
its standardised value (x - m mu) / sqrt(m^2 sigma^2 + s^2)), which checks the ODE solvers
sample by sample.
"""

from __future__ import annotations

import math

import pytest
import torch

from difftime import samplers as S
from difftime.sde import SDE, SubVPSDE, VESDE, VPSDE
from difftime.toy import Gaussian, GaussianMixture, OracleScore, RandomMixture, Ring
from difftime.utils import ConfigError, PerSampleNoise

N = 4000


pytestmark = pytest.mark.usefixtures("one_thread")

GAUSS = Gaussian(dim=2, mean=[1.0, -0.5], std=[0.5, 1.5])
MIX = RandomMixture(dim=2, n_components=3, seed=3)
RING = Ring(n_modes=6, radius=1.5, std=0.1)


def start(data: GaussianMixture, sde: SDE, n: int = N, seed: int = 1) -> torch.Tensor:
    """x_T drawn from the exact q_T of ``data``."""
    return data.at_time(sde, sde.T).sample(n, torch.Generator().manual_seed(seed))


def oracle(data: GaussianMixture, sde: SDE):
    return OracleScore(data, sde).score


class Counted:
    """A score function that counts its calls and checks the time argument."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == (x.shape[0],)
        self.calls += 1
        return self.fn(x, t)


def moment_errors(x: torch.Tensor, data: GaussianMixture) -> tuple[torch.Tensor, ...]:
    """(mean error, its SE, covariance error, its SE), per dim / per entry, in fp64."""
    x = x.double()
    n = x.shape[0]
    mu, cov = data.mean(), data.covariance()
    centred = x - x.mean(0)
    products = centred[:, :, None] * centred[:, None, :]
    mean_se = (cov.diagonal() / n).sqrt()
    cov_se = products.std(0) / math.sqrt(n)
    return (x.mean(0) - mu).abs(), mean_se, (products.mean(0) - cov).abs(), cov_se


def assert_moments(x: torch.Tensor, data: GaussianMixture, allow: float) -> None:
    assert torch.isfinite(x).all()
    mean_err, mean_se, cov_err, cov_se = moment_errors(x, data)
    scale = float(data.covariance().diagonal().max())
    assert torch.all(mean_err <= 5 * mean_se + allow * math.sqrt(scale)), (mean_err, mean_se)
    assert torch.all(cov_err <= 5 * cov_se + allow * scale), (cov_err, cov_se)


def exact_flow(data: Gaussian, sde: SDE, x_T: torch.Tensor) -> torch.Tensor:
    """Closed-form probability-flow map T -> eps for diagonal Gaussian data."""
    mu, var = data.mean(), data.covariance().diagonal()
    m_T, s_T = sde.marginal_coeffs(torch.tensor([sde.T], dtype=torch.float64))
    m_e, s_e = sde.marginal_coeffs(torch.tensor([sde.eps], dtype=torch.float64))
    ratio = ((m_e**2 * var + s_e**2) / (m_T**2 * var + s_T**2)).sqrt()
    return m_e * mu + ratio * (x_T.double() - m_T * mu)


class OrnsteinUhlenbeck(SDE):
    """dx = -x dt + sqrt(2) dw: a linear SDE the samplers have never seen (no class branching)."""

    def drift_coeff(self, t):
        return -torch.ones_like(t, dtype=torch.promote_types(t.dtype, torch.float32))

    def diffusion(self, t):
        return math.sqrt(2.0) * torch.ones_like(t, dtype=torch.promote_types(t.dtype, torch.float32))

    def log_mean_coeff(self, t):
        return -t.to(torch.promote_types(t.dtype, torch.float32))

    def marginal_std(self, t):
        return torch.sqrt(-torch.expm1(-2.0 * t.to(torch.promote_types(t.dtype, torch.float32))))

    @property
    def prior_std(self) -> float:
        return 1.0


# ---------------------------------------------------------------------- distributions
SAMPLE_CASES = [
    ("em-vp-gauss", S.EulerMaruyama(steps=500), VPSDE(T=1.0), GAUSS, 0.03),
    ("em-subvp-mix", S.EulerMaruyama(steps=500), SubVPSDE(T=0.4), MIX, 0.03),
    ("em-ve-ring", S.EulerMaruyama(steps=500), VESDE(T=1.0, sigma_max=10.0), RING, 0.03),
    ("em-ou-gauss", S.EulerMaruyama(steps=500, denoise=False), OrnsteinUhlenbeck(T=1.0), GAUSS, 0.03),
    ("rd-vp-mix", S.PredictorCorrector(steps=500, corrector_steps=0), VPSDE(T=0.4), MIX, 0.03),
    ("rd-ve-gauss", S.PredictorCorrector(steps=500, corrector_steps=0), VESDE(T=1.0), GAUSS, 0.03),
    ("pc-vp-mix", S.PredictorCorrector(steps=500, snr=0.16), VPSDE(T=0.4), MIX, 0.03),
    ("pc-ve-ring", S.PredictorCorrector(steps=500, snr=0.16), VESDE(T=1.0, sigma_max=10.0), RING, 0.03),
    ("heun-subvp-mix", S.HeunODE(steps=100), SubVPSDE(T=0.4), MIX, 0.005),
    ("heun-ve-ring", S.HeunODE(steps=100), VESDE(T=0.4, sigma_max=10.0), RING, 0.005),
    ("ode-vp-ring", S.AdaptiveODE(), VPSDE(T=1.0), RING, 0.005),
    ("ode-subvp-mix", S.AdaptiveODE(method="bosh3"), SubVPSDE(T=1.0), MIX, 0.005),
    ("dpm-ve-ring", S.DPMSolverPP(steps=50), VESDE(T=1.0, sigma_max=10.0), RING, 0.005),
    ("ddim-vp-mix", S.DDIM(steps=200), VPSDE(T=1.0), MIX, 0.005),
    ("sdedpm-subvp-mix", S.SDEDPMSolverPP(steps=200), SubVPSDE(T=0.4), MIX, 0.03),
]


@pytest.mark.parametrize("sampler, sde, data, allow", [c[1:] for c in SAMPLE_CASES],
                         ids=[c[0] for c in SAMPLE_CASES])
def test_samples_reproduce_data_moments(sampler, sde, data, allow):
    x, info = sampler(oracle(data, sde), sde, start(data, sde), generator=torch.Generator().manual_seed(2))
    assert x.shape == (N, 2) and x.dtype == torch.float32
    assert info["sampler"] == sampler.name and info["t_end"] == sde.eps
    assert_moments(x, data, allow)


@pytest.mark.parametrize("sde", [VPSDE(T=0.4), VESDE(T=1.0)], ids=["vp", "ve"])
def test_predictor_corrector_in_high_dimension(sde):
    """Reverse-diffusion + Langevin corrector on an isotropic 64-D Gaussian.

    The per-sample step-size rule biases the variance upwards by about
    (1 + 2/D)^2 / (1 - snr^2) - 1 = 0.09 at D = 64 (see ``langevin_step``); the mean variance
    ratio over the 64 dims has standard error sqrt(2 / n / D) = 0.004. Means (64) and
    off-diagonal covariances (2016 entries) get 5 standard errors: a false alarm below 1e-3.
    """
    d, n, snr = 64, 2000, 0.16
    data = Gaussian(dim=d, mean=torch.linspace(-1, 1, d).tolist(), std=0.7)
    x, info = S.predictor_corrector(oracle(data, sde), sde, start(data, sde, n), 200,
                                    torch.Generator().manual_seed(2), snr=snr, step_size="per_sample")
    assert torch.isfinite(x).all() and info["nfe"] == 200 * 2 + 1
    mean_err, mean_se, cov_err, cov_se = moment_errors(x, data)
    assert torch.all(mean_err <= 5 * mean_se)
    var_ratio = float((x.double().var(0) / 0.49).mean())
    bias = (1 + 2 / d) ** 2 / (1 - snr**2) - 1
    assert 1 - 5 * math.sqrt(2 / n / d) <= var_ratio <= 1 + bias + 5 * math.sqrt(2 / n / d)
    off_diag = cov_err - torch.diag(cov_err.diagonal())
    assert torch.all(off_diag <= 5 * cov_se)


def test_langevin_corrector_contracts_to_the_target():
    """Langevin steps at a fixed t pull samples of N(mu, 4 v I) to the target N(mu, v I)."""
    d, n, v, snr = 64, 1000, 0.3, 0.16
    mu = torch.linspace(-1, 1, d)
    score = lambda x, t: -(x - mu) / v
    g = torch.Generator().manual_seed(0)
    x = mu + 2.0 * math.sqrt(v) * torch.randn(n, d, generator=g)
    for _ in range(200):
        x = S.langevin_step(score, x, 0.5, snr, 1.0, g)
    var_ratio = float((x.var(0) / v).mean())
    bias = (1 + 2 / d) ** 2 / (1 - snr**2) - 1
    se = math.sqrt(2 / n / d)
    assert 1 - 5 * se <= var_ratio <= 1 + bias + 5 * se
    assert float((x.mean(0) - mu).abs().max()) <= 5 * math.sqrt(v / n)


# ---------------------------------------------------------------------- ODE samplers
@pytest.mark.parametrize("sde", [VPSDE(T=1.0), SubVPSDE(T=1.0), VESDE(T=1.0), OrnsteinUhlenbeck(T=1.0)],
                         ids=["vp", "subvp", "ve", "ou"])
def test_ode_samplers_follow_the_exact_flow(sde):
    """Per-sample error against the closed-form flow; Heun is 2nd order (error x 1/4 per halving)."""
    x_T = start(GAUSS, sde, 500)
    exact = exact_flow(GAUSS, sde, x_T)
    scale = float(exact.abs().max())
    errors = [float((S.heun_ode(oracle(GAUSS, sde), sde, x_T, steps)[0] - exact).abs().max())
              for steps in (50, 100)]
    assert errors[1] <= 5e-3 * scale
    assert 0.15 <= errors[1] / errors[0] <= 0.35
    x, info = S.adaptive_ode(oracle(GAUSS, sde), sde, x_T)
    assert float((x - exact).abs().max()) <= 1e-4 * scale + 1e-4


def test_adaptive_ode_tighter_tolerance_costs_more_and_is_closer():
    sde = VPSDE(T=1.0)
    x_T = start(GAUSS, sde, 200).double()
    exact = exact_flow(GAUSS, sde, x_T)
    results = {tol: S.adaptive_ode(oracle(GAUSS, sde), sde, x_T, rtol=tol, atol=tol)
               for tol in (1e-3, 1e-5, 1e-7)}
    nfe = [results[tol][1]["nfe"] for tol in (1e-3, 1e-5, 1e-7)]
    errors = [float((results[tol][0] - exact).abs().max()) for tol in (1e-3, 1e-5, 1e-7)]
    assert 0 < nfe[0] < nfe[1] < nfe[2]
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] <= 1e-5
    assert results[1e-7][0].dtype == torch.float64
    assert results[1e-7][1]["rtol"] == 1e-7 and results[1e-7][1]["atol"] == 1e-7


@pytest.mark.parametrize("sampler", [S.HeunODE(steps=20), S.AdaptiveODE(rtol=1e-4, atol=1e-4)],
                         ids=["heun", "adaptive"])
def test_ode_samplers_are_deterministic(sampler):
    sde = VPSDE(T=0.4)
    x_T = start(MIX, sde, 200)
    g = torch.Generator().manual_seed(5)
    g_state, global_state = g.get_state(), torch.get_rng_state()
    a, _ = sampler(oracle(MIX, sde), sde, x_T, generator=g)
    b, _ = sampler(oracle(MIX, sde), sde, x_T, generator=torch.Generator().manual_seed(6))
    c, _ = sampler(oracle(MIX, sde), sde, x_T, generator=PerSampleNoise(range(200)))
    assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(g.get_state(), g_state) and torch.equal(torch.get_rng_state(), global_state)


# ---------------------------------------------------------------------- SDE samplers
SDE_SAMPLERS = [S.EulerMaruyama(steps=20), S.PredictorCorrector(steps=20)]


@pytest.mark.parametrize("sampler", SDE_SAMPLERS, ids=["em", "pc"])
def test_sde_samplers_use_the_generator(sampler):
    sde = SubVPSDE(T=0.4)
    x_T = start(MIX, sde, 200)
    a, _ = sampler(oracle(MIX, sde), sde, x_T, generator=torch.Generator().manual_seed(1))
    b, _ = sampler(oracle(MIX, sde), sde, x_T, generator=torch.Generator().manual_seed(1))
    c, _ = sampler(oracle(MIX, sde), sde, x_T, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert float((a - c).abs().min(dim=1).values.min()) > 0  # every sample moved by its noise


@pytest.mark.parametrize("sampler", SDE_SAMPLERS, ids=["em", "pc"])
def test_sde_samplers_are_batch_invariant(sampler):
    """With per-sample seeds, one batch of 6 equals two batches of 3 (EDM per-seed sampling)."""
    sde = VPSDE(T=1.0)
    seeds = [11, 12, 13, 14, 15, 16]
    x_T = start(MIX, sde, 6)
    whole, _ = sampler(oracle(MIX, sde), sde, x_T, generator=PerSampleNoise(seeds))
    parts = [sampler(oracle(MIX, sde), sde, x_T[i:i + 3], generator=PerSampleNoise(seeds[i:i + 3]))[0]
             for i in (0, 3)]
    assert torch.allclose(whole, torch.cat(parts), rtol=1e-6, atol=1e-6)
    other, _ = sampler(oracle(MIX, sde), sde, x_T, generator=PerSampleNoise([s + 100 for s in seeds]))
    assert not torch.allclose(whole, other)


# ---------------------------------------------------------------------- NFE and callbacks
NFE_CASES = [
    (S.euler_maruyama, {}, lambda n: n),
    (S.predictor_corrector, {"corrector_steps": 2}, lambda n: 3 * n),
    (S.predictor_corrector, {"corrector_steps": 0}, lambda n: n),
    (S.heun_ode, {}, lambda n: 2 * n),
]


@pytest.mark.parametrize("denoise", [False, True])
@pytest.mark.parametrize("fn, options, expected", NFE_CASES, ids=["em", "pc2", "pc0", "heun"])
def test_fixed_step_nfe(fn, options, expected, denoise):
    sde = VESDE(T=0.4, sigma_max=10.0)
    score = Counted(oracle(MIX, sde))
    _, info = fn(score, sde, start(MIX, sde, 50), 7, None, None, denoise=denoise, **options)
    assert info["nfe"] == expected(7) + int(denoise) == score.calls
    assert info["steps"] == 7


def test_adaptive_nfe_counts_every_evaluation_and_calls_back():
    sde = VPSDE(T=1.0)
    score = Counted(oracle(MIX, sde))
    seen = []
    _, info = S.adaptive_ode(score, sde, start(MIX, sde, 50), callback=seen.append, denoise=True)
    assert info["nfe"] == score.calls == len(seen) + 1 > 1
    assert [d["nfe"] for d in seen] == list(range(1, len(seen) + 1))
    assert all(sde.eps <= d["t"] <= sde.T for d in seen)
    assert info["steps"] is None and info["method"] == "dopri5"


@pytest.mark.parametrize("fn, per_step", [(S.euler_maruyama, 1), (S.predictor_corrector, 2), (S.heun_ode, 2)],
                         ids=["em", "pc", "heun"])
def test_callback_once_per_step_with_decreasing_time(fn, per_step):
    sde = VPSDE(T=0.4)
    seen = []
    x, _ = fn(oracle(MIX, sde), sde, start(MIX, sde, 20), 9, torch.Generator().manual_seed(0), seen.append,
              denoise=False)
    assert [d["i"] for d in seen] == list(range(9))
    times = [d["t"] for d in seen]
    assert all(a > b for a, b in zip(times, times[1:]))
    assert times[-1] == pytest.approx(sde.eps, rel=1e-9) and times[0] < sde.T
    assert [d["nfe"] for d in seen] == [per_step * (i + 1) for i in range(9)]
    assert torch.equal(seen[-1]["x"], x)


# ---------------------------------------------------------------------- building blocks
def test_tweedie_denoise_is_the_posterior_mean():
    """E[x_0 | x_eps] for Gaussian data: mu + m sigma^2 / (m^2 sigma^2 + s^2) (x - m mu)."""
    sde = VPSDE(T=1.0, eps=0.05)
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    m, s = sde.marginal_coeffs(torch.tensor([sde.eps], dtype=torch.float64))
    mu, var = GAUSS.mean(), GAUSS.covariance().diagonal()
    expected = mu + m * var / (m**2 * var + s**2) * (x - m * mu)
    assert torch.allclose(S.tweedie_denoise(oracle(GAUSS, sde), sde, x), expected, atol=1e-10)


def test_denoise_applies_tweedie_to_the_last_state():
    sde = SubVPSDE(T=0.4, eps=0.01)
    x_T = start(MIX, sde, 100)
    raw, _ = S.euler_maruyama(oracle(MIX, sde), sde, x_T, 10, torch.Generator().manual_seed(3), denoise=False)
    den, _ = S.euler_maruyama(oracle(MIX, sde), sde, x_T, 10, torch.Generator().manual_seed(3), denoise=True)
    assert torch.allclose(den, S.tweedie_denoise(oracle(MIX, sde), sde, raw), atol=1e-6)
    assert not torch.allclose(den, raw, atol=1e-4)


def test_transition_coeffs_match_ddpm_and_smld():
    vp, ve = VPSDE(), VESDE()
    t_hi, t_lo = 0.5001, 0.5
    a, g2 = S.transition_coeffs(vp, t_hi, t_lo)
    b = lambda t: vp.beta_min * t + 0.5 * (vp.beta_max - vp.beta_min) * t**2
    assert a == pytest.approx(math.exp(-0.5 * (b(t_hi) - b(t_lo))), rel=1e-12)
    assert g2 == pytest.approx(1 - a**2, rel=1e-9)  # beta_i = 1 - alpha_i (DDPM)
    assert g2 == pytest.approx(float(vp.beta(torch.tensor(0.50005, dtype=torch.float64))) * 1e-4, rel=1e-3)
    a, g2 = S.transition_coeffs(ve, t_hi, t_lo)
    sigma = lambda t: ve.sigma_min * (ve.sigma_max / ve.sigma_min) ** t
    assert a == 1.0 and g2 == pytest.approx(sigma(t_hi) ** 2 - sigma(t_lo) ** 2, rel=1e-10)


LOW_PRECISION_CASES = [S.EulerMaruyama(steps=5), S.PredictorCorrector(steps=5), S.HeunODE(steps=5),
                       S.AdaptiveODE(rtol=1e-3, atol=1e-3), S.DDIM(steps=5), S.DPMSolverPP(steps=5),
                       S.SDEDPMSolverPP(steps=5)]


@pytest.mark.parametrize("sampler", LOW_PRECISION_CASES, ids=["em", "pc", "heun", "adaptive", "ddim", "dpm", "sde-dpm"])
def test_state_is_fp32_under_low_precision_scores(sampler):
    sde = VPSDE(T=0.4)
    score = lambda x, t: oracle(MIX, sde)(x.float(), t).to(torch.bfloat16)
    x_T = start(MIX, sde, 30).to(torch.bfloat16)
    x, _ = sampler(score, sde, x_T, generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and torch.isfinite(x).all()


# ---------------------------------------------------------------------- configuration
@pytest.mark.parametrize("build, key", [
    (lambda: S.EulerMaruyama(steps=0), "steps"),
    (lambda: S.PredictorCorrector(steps=-3), "steps"),
    (lambda: S.PredictorCorrector(snr=0.0), "snr"),
    (lambda: S.PredictorCorrector(snr=-0.1), "snr"),
    (lambda: S.PredictorCorrector(corrector_steps=-1), "corrector_steps"),
    (lambda: S.HeunODE(steps=0), "steps"),
    (lambda: S.AdaptiveODE(rtol=0.0), "rtol"),
    (lambda: S.AdaptiveODE(atol=-1e-5), "atol"),
    (lambda: S.AdaptiveODE(method="euler"), "method"),
])
def test_bad_config_raises(build, key):
    with pytest.raises(ConfigError) as err:
        build()
    assert err.value.key == key


def test_functions_validate_their_arguments():
    sde = VPSDE(T=0.4)
    x = torch.zeros(2, 2)
    score = lambda x, t: -x
    with pytest.raises(ConfigError):
        S.euler_maruyama(score, sde, x, 0)
    with pytest.raises(ConfigError):
        S.predictor_corrector(score, sde, x, 3, snr=0.0)
    with pytest.raises(ConfigError):
        S.heun_ode(score, sde, x, 2.5)
    with pytest.raises(ConfigError):
        S.adaptive_ode(score, sde, x, method="rk4")


def test_sampler_classes_call_their_function():
    sde = VPSDE(T=0.4)
    x_T = start(MIX, sde, 20)
    sampler = S.PredictorCorrector(steps=4, snr=0.1, corrector_steps=2, denoise=False)
    assert repr(sampler) == ("PredictorCorrector(steps=4, snr=0.1, corrector_steps=2, denoise=False, "
                             "step_size='expected', schedule=UniformT())")
    x, info = sampler(oracle(MIX, sde), sde, x_T, generator=torch.Generator().manual_seed(0))
    y, _ = S.predictor_corrector(oracle(MIX, sde), sde, x_T, 4, torch.Generator().manual_seed(0), snr=0.1,
                                 corrector_steps=2, denoise=False)
    assert torch.equal(x, y)
    assert info == {"sampler": "predictor_corrector", "nfe": 12, "steps": 4, "t_end": sde.eps,
                    "snr": 0.1, "corrector_steps": 2, "step_size": "expected", "schedule": "uniform_t"}
    _, info = sampler(oracle(MIX, sde), sde, x_T, steps=3)
    assert info["steps"] == 3 and info["nfe"] == 9
    _, info = S.AdaptiveODE(rtol=1e-3, atol=1e-3)(oracle(MIX, sde), sde, x_T, steps=50)
    assert info["steps"] is None and info["sampler"] == S.AdaptiveODE.name
    assert "AdaptiveODE(" in repr(S.AdaptiveODE()) and "method='dopri5'" in repr(S.AdaptiveODE())
