"""Time grids fitted to a model's own sampling trajectories (a measured alternative to fixed rules).

The fixed schedules (:mod:`difftime.schedules`) place steps by a rule in lambda = log(s^2 / m^2)
that ignores the data. On the ring mixture of ``benchmarks/sampler_nfe.py`` the probability flow
changes fastest between lambda ~ log(component variance) and lambda ~ log(data variance), and
hardly at all above or below: a LogSNR grid at T = 1 spends most of its steps outside that band.
:func:`fit_time_grid` measures where the steps are needed instead, in the spirit of the
"geometry-inspired time scheduling" of Chen et al. 2024 ("On the Trajectory Regularity of
ODE-based Diffusion Sampling", Sec. 4: a teacher trajectory on a fine grid and dynamic
programming over its points):

1. **Teacher.** The probability-flow ODE is solved accurately (DPM-Solver++(3M), exact weights,
   ``candidates x substeps`` LogSNR steps) from a pilot batch ``x_T``, keeping its states x_k on a
   fine LogSNR grid of ``candidates + 1`` times, and the data predictions D_k = D(x_k, t_k).
2. **Step costs.** For every pair of candidate times k < j, one first-order exponential step
   (DDIM, :func:`difftime.samplers.ddim`) from the teacher's x_k to t_j has the error
   e_kj = (s_j / s_k) x_k + m_j (1 - e^{-h}) D_k - x_j, and costs C_kj = E||e_kj||^2 / s_j^2.
   The 1 / s_j^2 weight measures the error against the noise at t_j: the Fisher information of
   q_t is at most 1 / s_t^2 per dimension (x_t = m x_0 + s z; convolution inequality), so a
   perturbation e at t_j moves q_tj by a KL of at most about E||e||^2 / (2 s_j^2), and the flow
   after t_j (the same bijection for both) does not increase it.
3. **Grid.** Dynamic programming picks the path T = t_0 > ... > t_steps = eps through the candidates
   that minimises the summed cost (exactly ``steps`` steps; O(steps x candidates^2)).
4. **Refinement** (:func:`refine_grid`, deterministic samplers): the summed one-step cost is a
   proxy, so the grid is then tuned for the sampler that will use it, by coordinate descent on its
   interior lambda values against the real objective, the RMS distance between the sampler's
   output and the teacher's end points on the pilot batch (in the spirit of Xue et al. 2024,
   "Accelerating Diffusion Sampling with Optimized Time Steps", who fit the steps to the ODE's
   solution). It starts from the DP grid and from the sampler's own grid and keeps the closer.

Measured (``benchmarks/results/sampler_nfe.md``, ring mixture, T = 1): the first-order cost with
the 1 / s^2 weight beat the plain E||e|| (which leaves one large final step from sigma ~ 0.2 to
eps) and a cost that models the 2M step's own history (a steady -0.1 nats in E[log p]). With the
oracle score the DP grid alone reaches converged quality in 8 NFE and the refined grid in 6-7
(LogSNR: 15). With trained networks the DP grid alone can be worse than LogSNR (a trained
eps-network's data prediction amplifies its error by s / m at high noise, where one-step costs
then mislead); refinement fixes that (trained MLP: 7 NFE against 12 on the best fixed grid). The
fit costs ``candidates x (substeps + 1)`` score evaluations on the pilot batch and the refinement
(1 + sweeps x (steps - 1) x 5) x steps per start, once per model, T, eps, sampler and step count;
the grid is a :class:`~difftime.schedules.Tabulated` schedule that configs can carry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from difftime import checks
from difftime.samplers import Sampler, _data_prediction, _nodes, dpm_solver_pp
from difftime.schedules import LogSNR, Schedule, Tabulated
from difftime.sde import SDE, ScoreFn


@dataclass
class GridCosts:
    """Step costs between the candidate times of a fitted grid (see the module docstring).

    ``log_nsr: [K + 1]`` are the candidates' lambda values from lambda(T) down to lambda(eps);
    ``cost[k, j]`` (k < j, else inf) the cost of one step from candidate k to candidate j; ``nfe``
    the score evaluations the fit took on the pilot batch; ``x_T`` and ``x_eps`` the pilot batch and
    where the teacher took it (the converged probability flow), for :meth:`distance`.
    """

    log_nsr: Tensor
    cost: Tensor
    nfe: int
    x_T: Tensor
    x_eps: Tensor

    def distance(self, samples: Tensor) -> float:
        """RMS distance (per coordinate) between ``samples: [B, *D]``, drawn by some sampler from
        ``x_T``, and the teacher's end points: how far that sampler lands from the converged ODE.

        The fitted grid minimises a proxy (summed one-step costs), not this distance; comparing it
        with the distance of the sampler's own grid tells whether the fit pays off for a model.
        """
        return float((samples.double() - self.x_eps.double()).pow(2).mean().sqrt())

    def schedule(self, steps: int) -> Tabulated:
        """The ``steps``-step grid of least summed cost, as a :class:`~difftime.schedules.Tabulated`."""
        steps = checks.integer("steps", steps, "GridCosts")
        path = cheapest_path(self.cost, steps)
        return Tabulated([float(self.log_nsr[k]) for k in path])


def cheapest_path(cost: Tensor, steps: int) -> list[int]:
    """Indices 0 = k_0 < k_1 < ... < k_steps = K minimising sum_i cost[k_i, k_{i+1}] (dynamic programming).

    ``cost: [K + 1, K + 1]`` with inf where a step is not allowed (k >= j); needs steps <= K.
    """
    n = cost.shape[0] - 1
    if not 1 <= steps <= n:
        raise ValueError(f"steps must be in [1, {n}] (the number of candidate intervals), got {steps}")
    best = torch.full((n + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    back = []
    for _ in range(steps):  # best[j]: least cost of reaching candidate j in the steps taken so far
        total = best[:, None] + cost.to(torch.float64)
        best, arg = total.min(dim=0)
        back.append(arg)
    path = [n]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    return path[::-1]


@torch.no_grad()
def grid_costs(score_fn: ScoreFn, sde: SDE, x_T: Tensor, candidates: int = 240, substeps: int = 8) -> GridCosts:
    """The teacher trajectory of the pilot batch ``x_T: [B, *D]`` and the step costs between its
    ``candidates + 1`` LogSNR times (steps 1 and 2 of the module docstring)."""
    candidates = checks.integer("candidates", candidates, "grid_costs", minimum=2)
    substeps = checks.integer("substeps", substeps, "grid_costs")
    states = [x_T.detach().to(torch.promote_types(x_T.dtype, torch.float32))]

    def keep(d: dict) -> None:
        if (d["i"] + 1) % substeps == 0:
            states.append(d["x"].clone())

    dpm_solver_pp(score_fn, sde, states[0], candidates * substeps, callback=keep, order=3, variant="exact",
                  corrector=False, schedule=LogSNR())
    nodes = _nodes(sde, LogSNR()(sde, candidates).tolist())
    x = torch.stack(states)  # [K + 1, B, *D]
    m, s, lam = (torch.tensor([getattr(n, a) for n in nodes], dtype=x.dtype, device=x.device) for a in ("m", "s", "lam"))
    cost = torch.full((candidates + 1, candidates + 1), math.inf, dtype=torch.float64)
    for k in range(candidates):
        d = _data_prediction(score_fn, x[k], nodes[k])
        a, b = s[k + 1:] / s[k], m[k + 1:] * -torch.expm1(lam[k] - lam[k + 1:])  # DDIM k -> j, all j > k at once
        shape = (-1,) + (1,) * x[k].ndim
        err = a.view(shape) * x[k] + b.view(shape) * d - x[k + 1:]
        cost[k, k + 1:] = err.flatten(2).double().pow(2).sum(2).mean(1) / s[k + 1:].double() ** 2
    log_nsr = torch.tensor([-2.0 * node.lam for node in nodes], dtype=torch.float64)
    return GridCosts(log_nsr, cost, nfe=candidates * (substeps + 1), x_T=x[0], x_eps=x[-1])


def fit_time_grid(score_fn: ScoreFn, sde: SDE, x_T: Tensor, steps: int, candidates: int = 240,
                  substeps: int = 8) -> Tabulated:
    """A ``steps``-step grid fitted to ``score_fn``'s trajectories from the pilot batch ``x_T``.

    ``x_T`` should be drawn from the prior the sampler will start from, with seeds that the
    evaluation does not use. For several step counts, call :func:`grid_costs` once and
    :meth:`GridCosts.schedule` per count.
    """
    return grid_costs(score_fn, sde, x_T, candidates, substeps).schedule(steps)


@dataclass
class RefinedGrid:
    """Result of :func:`refine_grid`: the grid, its RMS distance to the teacher on the pilot batch,
    the start it came from, every start's own distance, and the NFE the refinement spent."""

    schedule: Tabulated
    distance: float
    start: str
    starts: dict[str, float]
    nfe: int


def refine_grid(costs: GridCosts, sampler_for: Callable[[Schedule], Sampler], score_fn: ScoreFn, sde: SDE,
                starts: dict[str, Schedule], steps: int, sweeps: int = 2,
                fractions: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)) -> RefinedGrid:
    """Tune a ``steps``-step grid for one deterministic sampler (step 4 of the module docstring).

    ``sampler_for(schedule)`` builds the configured sampler on a grid; ``starts`` names the grids to
    start from (for example the DP grid and the sampler's own). Each sweep moves every interior
    lambda_i, in turn, to each ``fractions`` point between its neighbours and keeps a move when the
    pilot distance falls, so the result is never farther from the teacher than its start.
    Cost: sum over starts of 1 + sweeps x (steps - 1) x len(fractions) sampler runs on the pilot.
    """
    steps = checks.integer("steps", steps, "refine_grid")
    nfe = 0

    def distance(log_nsr: list[float]) -> float:
        nonlocal nfe
        samples, info = sampler_for(Tabulated(log_nsr))(score_fn, sde, costs.x_T)
        nfe += int(info["nfe"])
        return costs.distance(samples)

    results, first = {}, {}
    for name, schedule in starts.items():
        lam = sde.log_nsr(schedule(sde, steps)).tolist()
        best = first[name] = distance(lam)
        for _ in range(sweeps):
            for i in range(1, steps):
                for f in fractions:
                    trial = lam[:i] + [lam[i - 1] + f * (lam[i + 1] - lam[i - 1])] + lam[i + 1:]
                    d = distance(trial)
                    if d < best:
                        best, lam = d, trial
        results[name] = (best, lam)
    name = min(results, key=lambda k: results[k][0])
    return RefinedGrid(Tabulated(results[name][1]), results[name][0], name, first, nfe)
