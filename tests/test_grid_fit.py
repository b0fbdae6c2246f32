"""Fitted time grids: the dynamic programme against brute force, the step costs against the closed
form of Gaussian data, and the :class:`~difftime.schedules.Tabulated` schedule's contract."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from difftime import samplers as S
from difftime.grid_fit import cheapest_path, fit_time_grid, grid_costs, refine_grid
from difftime.schedules import LogSNR, Tabulated
from difftime.sde import SubVPSDE, VESDE, VPSDE
from difftime.toy import Gaussian, OracleScore, Ring
from difftime.utils import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
SDES = [VPSDE(T=1.0, eps=1e-3), SubVPSDE(T=0.4, eps=1e-3), VESDE(T=1.0, eps=1e-3, sigma_max=10.0)]


def _path_cost(cost, path):
    return sum(float(cost[a, b]) for a, b in zip(path, path[1:]))


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 7])
def test_cheapest_path_is_the_brute_force_minimum(steps):
    n = 7
    cost = torch.rand(n + 1, n + 1, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    cost = torch.where(torch.arange(n + 1)[:, None] < torch.arange(n + 1)[None, :], cost, math.inf)
    paths = [(0, *inner, n) for inner in itertools.combinations(range(1, n), steps - 1)]
    best = min(_path_cost(cost, p) for p in paths)
    path = cheapest_path(cost, steps)
    assert len(path) == steps + 1 and path[0] == 0 and path[-1] == n and path == sorted(set(path))
    assert math.isclose(_path_cost(cost, path), best, rel_tol=1e-12)
    with pytest.raises(ValueError, match=r"\[1, 7\]"):
        cheapest_path(cost, n + 1)


@pytest.mark.parametrize("sde", SDES, ids=["vp", "subvp", "ve"])
def test_step_costs_match_the_closed_form_of_gaussian_data(sde):
    """For x_0 ~ N(mu, sigma0^2 I) the probability flow keeps z = (x_t - m mu) / r_t fixed,
    r_t^2 = m^2 sigma0^2 + s^2, and D(x_t) = mu + sigma0^2 m z / r_t: every DDIM step error is
    alpha mu + beta z in closed form."""
    mu, sigma0 = torch.tensor([0.7, -0.3], dtype=torch.float64), 0.4
    data = Gaussian(dim=2, mean=mu.tolist(), std=sigma0)
    k_cand = 12
    t = LogSNR()(sde, k_cand)
    m, s = (c.double() for c in sde.marginal_coeffs(t))
    r = torch.sqrt(m**2 * sigma0**2 + s**2)
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_T = m[0] * mu + r[0] * z
    costs = grid_costs(OracleScore(data, sde).score, sde, x_T, candidates=k_cand, substeps=64)
    lam = -0.5 * sde.log_nsr(t)
    for k, j in [(0, 1), (0, k_cand), (3, 7), (k_cand - 1, k_cand)]:
        phi = -math.expm1(float(lam[k] - lam[j]))
        alpha = s[j] / s[k] * m[k] + m[j] * phi - m[j]
        beta = s[j] / s[k] * r[k] + m[j] * phi * sigma0**2 * m[k] / r[k] - r[j]
        expected = float(((alpha * mu + beta * z) ** 2).sum(1).mean() / s[j] ** 2)
        assert math.isclose(float(costs.cost[k, j]), expected, rel_tol=1e-3), (k, j)
    assert torch.isinf(costs.cost[5, 5]) and torch.isinf(costs.cost[6, 2])
    assert costs.nfe == k_cand * 65
    exact_end = m[-1] * mu + r[-1] * z  # where the probability flow takes x_T
    # the teacher (768 DPM-Solver++(3M) steps) is within 5e-6 of the flow here; 2e-5 leaves a margin
    assert torch.allclose(costs.x_eps.double(), exact_end, atol=2e-5) and costs.distance(exact_end) < 2e-5
    assert math.isclose(costs.distance(exact_end + 0.5), 0.5, rel_tol=1e-5)


@pytest.mark.parametrize("sde", SDES, ids=["vp", "subvp", "ve"])
def test_fitted_grid_is_a_schedule_from_T_to_eps_no_costlier_than_log_snr(sde):
    data = Ring(n_modes=4, radius=1.0, std=0.1)
    score = OracleScore(data, sde).score
    x_T = torch.randn(128, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * sde.prior_std
    costs = grid_costs(score, sde, x_T, candidates=24, substeps=4)
    for steps in (3, 6, 8):
        grid = costs.schedule(steps)
        t = grid(sde, steps)
        assert t.shape == (steps + 1,) and float(t[0]) == sde.T and float(t[-1]) == sde.eps
        assert torch.all(t[1:] < t[:-1])
        on_candidates = [round(i * 24 / steps) for i in range(steps + 1)]  # LogSNR's grid is one of the paths
        assert _path_cost(costs.cost, cheapest_path(costs.cost, steps)) <= _path_cost(costs.cost, on_candidates)
    direct = fit_time_grid(score, sde, x_T, 6, candidates=24, substeps=4)
    assert direct == costs.schedule(6)
    x, info = S.dpm_solver_pp(score, sde, x_T, 6, schedule=direct)
    assert info["nfe"] == 6 and info["schedule"] == "tabulated" and torch.isfinite(x).all()


def test_tabulated_refuses_other_steps_sdes_and_bad_values():
    sde = VPSDE(T=1.0, eps=1e-3)
    grid = fit_time_grid(OracleScore(Ring(n_modes=4), sde).score, sde, torch.randn(32, 2), 4, candidates=8,
                         substeps=2)
    assert len(grid.log_nsr) == 5 and grid == Tabulated(list(grid.log_nsr)) and hash(grid) == hash(Tabulated(grid.log_nsr))
    with pytest.raises(ConfigError, match="4, the step count") as err:
        grid(sde, 5)
    assert err.value.key == "steps"
    with pytest.raises(ConfigError, match="made for another SDE, T or eps") as err:
        grid(VPSDE(T=0.6, eps=1e-3), 4)
    assert err.value.key == "log_nsr" and err.value.value == grid.log_nsr[0]
    with pytest.raises(ConfigError, match="as its last value"):
        grid(VPSDE(T=1.0, eps=1e-2), 4)
    for bad in ([1.0], [1.0, 2.0], [3.0, float("nan"), -1.0], "1, 0", [2.0, True]):
        with pytest.raises(ConfigError, match="strictly decreasing") as err:
            Tabulated(bad)
        assert err.value.key == "log_nsr"


def test_tabulated_is_injectable_by_class_path():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--sampler", type=S.Sampler)
    config = parser.parse_object({"sampler": {"class_path": "difftime.samplers.DPMSolverPP", "init_args": {
        "steps": 2, "schedule": {"class_path": "difftime.schedules.Tabulated", "init_args": {"log_nsr": [3.0, 0.5, -2.0]}}}}})
    sampler = parser.instantiate(config).sampler
    assert sampler.schedule == Tabulated([3.0, 0.5, -2.0])


def test_score_module_refuses_a_grid_made_for_another_T_or_step_count():
    """A Tabulated grid is checked against the model's (evaluation) SDE when the system is built."""
    from difftime.networks import MLP
    from lightning_modules import ScoreModule

    sde = VPSDE(T=1.0, eps=1e-3)
    grid = LogSNR()(sde, 3)
    fitted = Tabulated(sde.log_nsr(grid).tolist())
    ScoreModule(MLP(dim=2, hidden=8, depth=1), sde, sampler=S.DPMSolverPP(steps=3, schedule=fitted))
    with pytest.raises(ConfigError, match="made for another SDE") as err:
        ScoreModule(MLP(dim=2, hidden=8, depth=1), sde, sampler=S.DPMSolverPP(steps=3, schedule=fitted), eval_T=0.5)
    assert err.value.key == "log_nsr"
    with pytest.raises(ConfigError, match="3, the step count") as err:
        ScoreModule(MLP(dim=2, hidden=8, depth=1), sde, sampler=S.DPMSolverPP(steps=4, schedule=fitted))
    assert err.value.key == "steps" and err.value.owner == "DPMSolverPP"


def test_refined_grid_is_never_farther_from_the_flow_than_its_starts():
    """Coordinate descent on the pilot distance: the result is at most every start's distance, the
    reported distance is the grid's own, and the NFE are the runs it made."""
    sde = VPSDE(T=1.0, eps=1e-3)
    score = OracleScore(Ring(n_modes=4, radius=1.0, std=0.1), sde).score
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    costs = grid_costs(score, sde, x_T, candidates=24, substeps=4)
    on = lambda schedule: S.DPMSolverPP(steps=5, schedule=schedule)  # noqa: E731
    refined = refine_grid(costs, on, score, sde, {"dp": costs.schedule(5), "log_snr": LogSNR()}, 5, sweeps=2)
    assert refined.distance <= min(refined.starts.values()) and refined.start in ("dp", "log_snr")
    assert math.isclose(costs.distance(on(refined.schedule)(score, sde, x_T)[0]), refined.distance, rel_tol=1e-9)
    assert refined.nfe == 2 * (1 + 2 * 4 * 5) * 5
    t = refined.schedule(sde, 5)
    assert float(t[0]) == sde.T and float(t[-1]) == sde.eps and torch.all(t[1:] < t[:-1])
