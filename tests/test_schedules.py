"""Time discretisations: every schedule starts at T, ends at eps, is strictly decreasing and has
``steps + 1`` points, for every SDE, T and eps; LogSNR is uniform in lambda, KarrasRho in sigma^(1/rho)."""

from __future__ import annotations

import math

import pytest
import torch

from difftime import schedules
from difftime.schedules import SCHEDULES, KarrasRho, LogSNR, Tabulated, UniformT
from difftime.sde import SubVPSDE, VESDE, VPSDE
from difftime.utils import ConfigError

SDES = [VPSDE(T=1.0), VPSDE(T=0.2, eps=1e-3), SubVPSDE(T=1.0, eps=1e-5), SubVPSDE(T=0.4, eps=0.1),
        VESDE(T=1.0), VESDE(T=0.3, eps=1e-2, sigma_max=10.0)]
SCHEDULE_CASES = [UniformT(), LogSNR(), KarrasRho(), KarrasRho(rho=1.0), KarrasRho(rho=30.0)]


@pytest.mark.parametrize("steps", [1, 2, 7, 50, 1000])
@pytest.mark.parametrize("schedule", SCHEDULE_CASES, ids=repr)
@pytest.mark.parametrize("sde", SDES, ids=repr)
def test_grid_runs_from_T_to_eps(sde, schedule, steps):
    t = schedule(sde, steps)
    assert t.dtype == torch.float64 and t.shape == (steps + 1,)
    assert float(t[0]) == sde.T and float(t[-1]) == sde.eps
    assert torch.all(t[1:] < t[:-1])


def _half_log_snr(sde, t):
    return (-0.5 * sde.log_nsr(t)).tolist()


@pytest.mark.parametrize("sde", SDES, ids=repr)
def test_log_snr_is_uniform_in_lambda(sde):
    lam = sde.log_nsr(LogSNR()(sde, 20))
    steps = lam[1:] - lam[:-1]
    assert torch.allclose(steps, steps.mean().expand(20), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("sde", SDES, ids=repr)
def test_karras_is_uniform_in_sigma_to_the_one_over_rho(sde):
    rho = 7.0
    sigma = torch.exp(0.5 * sde.log_nsr(KarrasRho(rho)(sde, 16)))
    root = sigma ** (1 / rho)
    diffs = root[1:] - root[:-1]
    assert torch.allclose(diffs, diffs.mean().expand(16), rtol=1e-6, atol=1e-12)


def test_uniform_t_is_the_original_grid():
    sde = VPSDE(T=0.6, eps=1e-3)
    assert torch.equal(UniformT()(sde, 5), torch.linspace(0.6, 1e-3, 6, dtype=torch.float64))


def test_registry_and_config_checks():
    assert SCHEDULES == {"uniform_t": UniformT, "log_snr": LogSNR, "karras": KarrasRho, "tabulated": Tabulated}
    assert KarrasRho(3.0) == KarrasRho(rho=3) and KarrasRho() != LogSNR() and repr(KarrasRho()) == "KarrasRho(rho=7.0)"
    with pytest.raises(ConfigError) as err:
        KarrasRho(rho=0.0)
    assert err.value.key == "rho"
    with pytest.raises(ConfigError) as err:
        LogSNR()(VPSDE(), 0)
    assert err.value.key == "steps"
    assert math.isclose(schedules.KarrasRho().rho, 7.0)


def test_schedule_is_injectable_by_class_path():
    """LightningCLI-style injection: ``schedule: {class_path: difftime.schedules.KarrasRho, init_args: ...}``."""
    from jsonargparse import ArgumentParser

    from difftime.samplers import Sampler

    parser = ArgumentParser()
    parser.add_argument("--sampler", type=Sampler)
    config = parser.parse_object({"sampler": {"class_path": "difftime.samplers.DPMSolverPP", "init_args": {
        "steps": 12, "schedule": {"class_path": "difftime.schedules.KarrasRho", "init_args": {"rho": 5.0}}}}})
    sampler = parser.instantiate(config).sampler
    assert sampler.steps == 12 and sampler.schedule == KarrasRho(rho=5.0)
