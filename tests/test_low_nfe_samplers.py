"""The low-NFE samplers (DDIM, DPM-Solver++ 2M/3M, SDE-DPM-Solver++) with the oracle score.

Convergence orders are measured against a converged reference solve from the exact q_T prior:
the mean per-sample error must fall by 2^p per halving of the (constant) step in lambda on the
LogSNR grid, p = 1 for DDIM and p = 2 for DPM-Solver++(2M), for VP, sub-VP and VE alike (the
integrator is derived from each SDE's own m(t), s(t)). Measured at 16/32/64 steps on the
3-component mixture: DDIM 0.97-1.01, 2M 2.02-2.09, 3M 2.6-3.2 per halving.
"""

from __future__ import annotations

import math

import pytest
import torch

from difftime import samplers as S
from difftime.schedules import KarrasRho, LogSNR, UniformT
from difftime.sde import SubVPSDE, VESDE, VPSDE
from difftime.toy import OracleScore, RandomMixture
from difftime.utils import ConfigError, PerSampleNoise, append_dims

MIX = RandomMixture(dim=2, n_components=3, seed=3)
ORDER_SDES = [VPSDE(T=1.0, eps=1e-3), SubVPSDE(T=1.0, eps=1e-3), VESDE(T=1.0, eps=1e-3, sigma_max=10.0)]


pytestmark = pytest.mark.usefixtures("one_thread")


def oracle(sde):
    return OracleScore(MIX, sde).score


def start(sde, n: int = 200, seed: int = 0) -> torch.Tensor:
    return MIX.at_time(sde, sde.T).sample(n, torch.Generator().manual_seed(seed)).double()


class Counted:
    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        assert t.shape == (x.shape[0],)
        self.calls += 1
        return self.fn(x, t)


# ---------------------------------------------------------------------- convergence order
def observed_orders(sde, fn, **options) -> list[float]:
    x_T = start(sde)
    ref, _ = S.dpm_solver_pp(oracle(sde), sde, x_T, 1000, order=3, corrector=False, lower_order_final=False)
    errors = [float((fn(oracle(sde), sde, x_T, n, **options)[0] - ref).norm(dim=1).mean()) for n in (16, 32, 64)]
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


@pytest.mark.parametrize("sde", ORDER_SDES, ids=["vp", "subvp", "ve"])
def test_ddim_is_first_order_in_lambda(sde):
    assert all(0.85 <= p <= 1.2 for p in observed_orders(sde, S.ddim))


@pytest.mark.parametrize("variant", ["paper", "exact"])
@pytest.mark.parametrize("sde", ORDER_SDES, ids=["vp", "subvp", "ve"])
def test_dpm_solver_2m_is_second_order_in_lambda(sde, variant):
    orders = observed_orders(sde, S.dpm_solver_pp, order=2, corrector=False, variant=variant)
    assert all(1.8 <= p <= 2.4 for p in orders)


def test_dpm_solver_3m_is_third_order_in_lambda():
    orders = observed_orders(ORDER_SDES[0], S.dpm_solver_pp, order=3, corrector=False)
    assert orders[-1] >= 2.7


def test_unic_corrector_raises_the_order_of_2m():
    orders = observed_orders(ORDER_SDES[2], S.dpm_solver_pp, order=2, corrector=True)
    assert orders[-1] >= 2.5


def test_sde_solver_with_eta_zero_is_the_exact_2m_ode_solver():
    sde = ORDER_SDES[1]
    x_T = start(sde, 50)
    a, _ = S.sde_dpm_solver_pp(oracle(sde), sde, x_T, 12, eta=0.0, denoise=False)
    b, _ = S.dpm_solver_pp(oracle(sde), sde, x_T, 12, order=2, corrector=False, variant="exact",
                           lower_order_final=False)
    assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_ddim_is_exact_for_a_point_mass_data_prediction():
    """With D(x, t) = c for all x, t (a point mass at c) the first-order step is exact: x_eps = m c + s z."""
    sde = VESDE(T=1.0, eps=1e-2, sigma_max=5.0)
    c = torch.tensor([0.3, -1.2], dtype=torch.float64)
    s_T, s_eps = sde.marginal_std(torch.tensor([sde.T, sde.eps], dtype=torch.float64)).tolist()  # m = 1 (VE)
    z = torch.randn(10, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    score = lambda x, t: (c - x) / append_dims(sde.marginal_std(t.double()) ** 2, x.ndim)
    x, _ = S.ddim(score, sde, c + s_T * z, 3)
    assert torch.allclose(x, c + s_eps * z, atol=1e-10)


# ---------------------------------------------------------------------- NFE accounting
FIXED = [(S.euler_maruyama, {}), (S.predictor_corrector, {"corrector_steps": 1}), (S.heun_ode, {}),
         (S.ddim, {}), (S.dpm_solver_pp, {"order": 2, "corrector": False}), (S.dpm_solver_pp, {"order": 3, "corrector": True}),
         (S.sde_dpm_solver_pp, {"eta": 0.7})]
PER_STEP = {"predictor_corrector": 2, "heun_ode": 2}


@pytest.mark.parametrize("denoise", [False, True])
@pytest.mark.parametrize("schedule", [UniformT(), LogSNR(), KarrasRho()], ids=repr)
@pytest.mark.parametrize("fn, options", FIXED, ids=["em", "pc", "heun", "ddim", "2m", "3m-unic", "sde"])
def test_nfe_equals_counted_score_calls(fn, options, schedule, denoise):
    sde = SubVPSDE(T=0.6, eps=1e-3)
    score, seen = Counted(oracle(sde)), []
    x, info = fn(score, sde, start(sde, 8).float(), 5, torch.Generator().manual_seed(0), seen.append,
                 schedule=schedule, denoise=denoise, **options)
    assert info["nfe"] == score.calls == PER_STEP.get(fn.__name__, 1) * 5 + int(denoise)
    assert info["schedule"] == schedule.name and info["sampler"] == fn.__name__
    grid = schedule(sde, 5).tolist()
    assert [d["i"] for d in seen] == list(range(5)) and [d["t"] for d in seen] == grid[1:]
    assert seen[-1]["nfe"] == info["nfe"] - int(denoise)
    if not denoise:
        assert torch.equal(seen[-1]["x"], x)


# ---------------------------------------------------------------------- randomness
NEW = [S.DDIM(steps=6), S.DPMSolverPP(steps=6, order=3, corrector=False), S.DPMSolverPP(steps=6),
       S.SDEDPMSolverPP(steps=6), S.SDEDPMSolverPP(steps=6, eta=0.5, order=1)]
NEW_IDS = ["ddim", "3m", "2m-unic", "sde", "sde-eta0.5"]


@pytest.mark.parametrize("sampler", NEW, ids=NEW_IDS)
def test_batch_invariance_with_per_sample_seeds(sampler):
    sde = VPSDE(T=1.0)
    seeds = [3, 4, 5, 6, 7, 8]
    x_T = start(sde, 6).float()
    whole, _ = sampler(oracle(sde), sde, x_T, generator=PerSampleNoise(seeds))
    parts = [sampler(oracle(sde), sde, x_T[i:i + 3], generator=PerSampleNoise(seeds[i:i + 3]))[0] for i in (0, 3)]
    assert torch.allclose(whole, torch.cat(parts), rtol=1e-6, atol=1e-6)


def test_stochastic_sampler_draws_all_noise_from_the_generator():
    sde = VESDE(T=0.5, sigma_max=10.0)
    x_T = start(sde, 100).float()
    global_state = torch.get_rng_state()
    a, _ = S.sde_dpm_solver_pp(oracle(sde), sde, x_T, 8, torch.Generator().manual_seed(1))
    b, _ = S.sde_dpm_solver_pp(oracle(sde), sde, x_T, 8, torch.Generator().manual_seed(1))
    c, _ = S.sde_dpm_solver_pp(oracle(sde), sde, x_T, 8, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and float((a - c).abs().min(dim=1).values.min()) > 0
    assert torch.equal(torch.get_rng_state(), global_state)
    other = PerSampleNoise(range(100))
    d, _ = S.sde_dpm_solver_pp(oracle(sde), sde, x_T, 8, other)
    assert not torch.allclose(a, d)


@pytest.mark.parametrize("sampler", NEW[:3], ids=NEW_IDS[:3])
def test_deterministic_samplers_ignore_the_generator(sampler):
    sde = SubVPSDE(T=0.4)
    x_T = start(sde, 50).float()
    a, _ = sampler(oracle(sde), sde, x_T, generator=torch.Generator().manual_seed(5))
    b, _ = sampler(oracle(sde), sde, x_T, generator=PerSampleNoise(range(50)))
    assert torch.equal(a, b)


def test_reverse_sde_solver_reproduces_the_data_moments():
    """eta = 1, 200 steps from the exact q_T: sample mean and covariance within 5 se + 3% (VE)."""
    sde = VESDE(T=1.0, eps=1e-3, sigma_max=10.0)
    x, _ = S.sde_dpm_solver_pp(oracle(sde), sde, start(sde, 4000, seed=2).float(), 200,
                               torch.Generator().manual_seed(3))
    x = x.double()
    cov = MIX.covariance()
    scale = float(cov.diagonal().max())
    assert torch.all((x.mean(0) - MIX.mean()).abs() <= 5 * (cov.diagonal() / 4000).sqrt() + 0.03 * math.sqrt(scale))
    assert torch.all((torch.cov(x.T) - cov).abs() <= 0.1 * scale)


# ---------------------------------------------------------------------- configuration
def test_registry_names_are_the_function_names():
    assert set(S.SAMPLERS) == {"euler_maruyama", "predictor_corrector", "heun_ode", "adaptive_ode", "ddim",
                               "dpm_solver_pp", "sde_dpm_solver_pp"}
    for name, cls in S.SAMPLERS.items():
        assert cls.name == name == cls.function.__name__ and issubclass(cls, S.Sampler)


@pytest.mark.parametrize("cls, fn, key, value", [
    (S.DPMSolverPP, S.dpm_solver_pp, "order", 4),
    (S.DPMSolverPP, S.dpm_solver_pp, "variant", "fancy"),
    (S.SDEDPMSolverPP, S.sde_dpm_solver_pp, "eta", -0.5),
    (S.SDEDPMSolverPP, S.sde_dpm_solver_pp, "order", 3),
    (S.DDIM, S.ddim, "steps", 0),
    (S.HeunODE, S.heun_ode, "schedule", "log_snr"),
])
def test_class_and_function_share_one_check(cls, fn, key, value):
    sde = VPSDE(T=0.4)
    with pytest.raises(ConfigError) as by_class:
        cls(**{key: value})
    args = {"steps": value} if key == "steps" else {key: value}
    steps = args.pop("steps", 3)
    with pytest.raises(ConfigError) as by_function:
        fn(lambda x, t: -x, sde, torch.zeros(2, 2), steps, **args)
    assert by_class.value.key == by_function.value.key == key
    assert by_class.value.allowed == by_function.value.allowed


def test_config_classes_call_their_functions_with_defaults():
    sde = VPSDE(T=1.0)
    x_T = start(sde, 20).float()
    sampler = S.DPMSolverPP(steps=7, schedule=KarrasRho())
    assert repr(sampler) == ("DPMSolverPP(steps=7, denoise=False, schedule=KarrasRho(rho=7.0), order=2, "
                             "lower_order_final=True, corrector=True, variant='paper', threshold=None, percentile=0.995)")
    x, info = sampler(oracle(sde), sde, x_T)
    y, _ = S.dpm_solver_pp(oracle(sde), sde, x_T, 7, schedule=KarrasRho())
    assert torch.equal(x, y) and info["nfe"] == 7 and info["schedule"] == "karras"
    assert S.DDIM().schedule == LogSNR() and S.HeunODE().schedule == UniformT()
    assert S.SDEDPMSolverPP().hparams()["schedule"] == "LogSNR()"
