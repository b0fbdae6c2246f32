"""The classical samplers: Euler-Maruyama, predictor-corrector and the probability-flow ODE
(fixed-step Heun, adaptive Runge-Kutta) of Song et al. 2021 and Karras et al. 2022.

They integrate the reverse SDE or the probability-flow ODE with the score directly and never
form the data prediction inside their steps, so they take no thresholding option.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor
from torchdiffeq import odeint

from difftime import checks
from difftime.randomness import Generator, randn
from difftime.samplers.common import (Callback, Info, _batch_time, _check_fixed, _coeff, _finish, _info, _notify,
                                      _score, _state, _time_grid)
from difftime.schedules import Schedule
from difftime.sde import SDE, ScoreFn
from difftime.utils import append_dims

ODEMethod = Literal["dopri5", "bosh3", "adaptive_heun"]
ODE_METHODS: tuple[str, ...] = ("dopri5", "bosh3", "adaptive_heun")
STEP_SIZES: tuple[str, ...] = ("expected", "per_sample")


# ---------------------------------------------------------------------- Euler-Maruyama
@torch.no_grad()
def euler_maruyama(score_fn: ScoreFn, sde: SDE, x_T: Tensor, steps: int,
                   generator: Generator = None, callback: Callback | None = None, *,
                   denoise: bool = True, schedule: Schedule | None = None) -> tuple[Tensor, Info]:
    """Euler-Maruyama on the reverse-time SDE (Song et al. 2021, Eq. 6 and App. G).

    x <- x - [f(t) x - g(t)^2 score(x, t)] dt + g(t) sqrt(dt) z,  z ~ N(0, I).

    Noise is added at every step, the last one included, so that every step is the same
    Markov kernel and the final state approximates q_eps; with ``denoise`` Tweedie's formula
    then maps it to E[x_0 | x_eps] (one extra score evaluation). NFE = steps (+1 if denoise).
    ``schedule`` defaults to :class:`~difftime.schedules.UniformT`.
    """
    o = _check_euler_maruyama("euler_maruyama", steps=steps, denoise=denoise, schedule=schedule)
    steps, denoise = o["steps"], o["denoise"]
    x, grid = _state(x_T), _time_grid(sde, steps, o["schedule"])
    for i in range(steps):
        t, dt = grid[i], grid[i] - grid[i + 1]
        tb = _batch_time(t, x)
        drift = sde.reverse_drift(x, tb, _score(score_fn, x, tb)).to(x.dtype)
        z = randn(x.shape, generator, x.device, x.dtype)
        x = x - drift * dt + _coeff(sde.diffusion, t) * math.sqrt(dt) * z
        _notify(callback, i, grid[i + 1], x, i + 1)
    x, nfe = _finish(score_fn, sde, x, denoise, steps)
    return x, _info("euler_maruyama", nfe, steps, sde, schedule=o["schedule"].name)


def _check_euler_maruyama(owner: str, *, steps: int, denoise: bool, schedule: Schedule | None) -> dict[str, Any]:
    return _check_fixed(owner, steps, schedule, denoise)


# ---------------------------------------------------------------------- predictor-corrector
def transition_coeffs(sde: SDE, t_hi: float, t_lo: float) -> tuple[float, float]:
    """Exact forward kernel x_hi = a x_lo + G z of the linear SDE over [t_lo, t_hi]: (a, G^2).

    a = m(t_hi) / m(t_lo) and G^2 = s(t_hi)^2 - a^2 s(t_lo)^2 (both marginals are Gaussian with
    the same x_0). For VP, a = sqrt(1 - beta_i) and G^2 = beta_i (DDPM); for VE, a = 1 and
    G^2 = sigma_hi^2 - sigma_lo^2 (SMLD).
    """
    log_a = _coeff(sde.log_mean_coeff, t_hi) - _coeff(sde.log_mean_coeff, t_lo)
    a = math.exp(log_a)
    g2 = _coeff(sde.marginal_std, t_hi) ** 2 - a**2 * _coeff(sde.marginal_std, t_lo) ** 2
    return a, max(g2, 0.0)


def reverse_diffusion_step(score_fn: ScoreFn, sde: SDE, x: Tensor, t_hi: float, t_lo: float,
                           generator: Generator = None) -> Tensor:
    """Reverse-diffusion predictor from t_hi to t_lo (Song et al. 2021, App. E).

    With the forward step x_hi = a x_lo + G z: x_lo = (2 - a) x_hi + G^2 score(x_hi, t_hi) + G z.
    This is line 3-5 of Algorithm 5 (VP) and of Algorithm 4 (VE) for a general linear SDE.
    """
    a, g2 = transition_coeffs(sde, t_hi, t_lo)
    score = _score(score_fn, x, _batch_time(t_hi, x))
    z = randn(x.shape, generator, x.device, x.dtype)
    return (2.0 - a) * x + g2 * score + math.sqrt(g2) * z


def langevin_step(score_fn: ScoreFn, x: Tensor, t: float, snr: float, alpha: float,
                  generator: Generator = None, noise_std: float | None = None) -> Tensor:
    """One Langevin corrector step at time t (Song et al. 2021, Algorithms 4/5, App. G).

    x <- x + step score + sqrt(2 step) z with step = 2 alpha (snr ||z|| / ||score||)^2.

    * ``noise_std`` given (the default of :func:`predictor_corrector`): the norms are replaced
      by their expectations under q_t, E||z||^2 = D and E||score||^2 ~ D / s(t)^2, so
      step = 2 alpha snr^2 s(t)^2. The step does not depend on the state, the chain is a plain
      Langevin chain (O(step) bias only) and no sample's step depends on its batch. This is
      the rule of Song et al.'s code up to their batch average of the norms.
    * ``noise_std=None``: the norms of each sample, per Algorithm 4/5 read per sample. The
      state-dependent step biases the chain: in the small-step limit its stationary density
      is p(x) ||score(x)||^2, and reusing z adds a factor (D + 2) / D to the injected variance.
      Both vanish as D grows (images), but in low dimensions ||score|| -> 0 at a mode and the
      chain diverges. A sample whose score is exactly zero is left unchanged.
    """
    score = _score(score_fn, x, _batch_time(t, x))
    z = randn(x.shape, generator, x.device, x.dtype)
    if noise_std is not None:
        step = torch.full((x.shape[0],), 2.0 * alpha * (snr * noise_std) ** 2, device=x.device, dtype=x.dtype)
    else:
        score_norm = score.flatten(1).norm(dim=1)
        ratio = snr * z.flatten(1).norm(dim=1) / torch.where(score_norm > 0, score_norm, math.inf)
        step = 2.0 * alpha * ratio**2
    step = append_dims(step, x.ndim)
    return x + step * score + torch.sqrt(2.0 * step) * z


@torch.no_grad()
def predictor_corrector(score_fn: ScoreFn, sde: SDE, x_T: Tensor, steps: int,
                        generator: Generator = None, callback: Callback | None = None, *,
                        snr: float = 0.16, corrector_steps: int = 1, denoise: bool = True,
                        step_size: Literal["expected", "per_sample"] = "expected",
                        schedule: Schedule | None = None) -> tuple[Tensor, Info]:
    """Predictor-corrector sampling (Song et al. 2021, Sec. 4.2, Algorithms 4 and 5).

    Each grid step runs the reverse-diffusion predictor t_i -> t_{i+1}, then
    ``corrector_steps`` Langevin steps at t_{i+1} (the order of the algorithms in App. G).
    The Langevin step size uses alpha_i = 1 - beta_i of the discretised VP chain; for a
    general linear SDE the same quantity is alpha_i = a^2 = (m(t_i) / m(t_{i+1}))^2, the
    squared mean decay of the forward kernel over the grid step (a = sqrt(1 - beta_i) for VP,
    m = 1 and so alpha = 1 for VE). Noise is added at every step, the last one included.
    NFE = steps (1 + corrector_steps) (+1 if denoise). ``step_size`` selects the Langevin
    step rule (see :func:`langevin_step`): "expected" (state-independent, s(t)-based) or
    "per_sample" (the per-sample norm ratio). ``schedule`` defaults to uniform t.
    """
    o = _check_predictor_corrector("predictor_corrector", steps=steps, snr=snr, corrector_steps=corrector_steps,
                                   denoise=denoise, step_size=step_size, schedule=schedule)
    steps, snr, corrector_steps, denoise = o["steps"], o["snr"], o["corrector_steps"], o["denoise"]
    x, grid, nfe = _state(x_T), _time_grid(sde, steps, o["schedule"]), 0
    for i in range(steps):
        t_hi, t_lo = grid[i], grid[i + 1]
        x = reverse_diffusion_step(score_fn, sde, x, t_hi, t_lo, generator)
        alpha = transition_coeffs(sde, t_hi, t_lo)[0] ** 2
        noise_std = _coeff(sde.marginal_std, t_lo) if step_size == "expected" else None
        for _ in range(corrector_steps):
            x = langevin_step(score_fn, x, t_lo, snr, alpha, generator, noise_std)
        nfe += 1 + corrector_steps
        _notify(callback, i, t_lo, x, nfe)
    x, nfe = _finish(score_fn, sde, x, denoise, nfe)
    return x, _info("predictor_corrector", nfe, steps, sde, snr=snr, corrector_steps=corrector_steps,
                    step_size=step_size, schedule=o["schedule"].name)


def _check_predictor_corrector(owner: str, *, steps: int, snr: float, corrector_steps: int, denoise: bool,
                               step_size: str, schedule: Schedule | None) -> dict[str, Any]:
    fixed = _check_fixed(owner, steps, schedule, denoise)
    return {"steps": fixed["steps"], "snr": checks.real("snr", snr, owner),
            "corrector_steps": checks.integer("corrector_steps", corrector_steps, owner, minimum=0),
            "denoise": fixed["denoise"], "step_size": checks.choice("step_size", step_size, STEP_SIZES, owner),
            "schedule": fixed["schedule"]}


# ---------------------------------------------------------------------- probability-flow ODE
def _flow(score_fn: ScoreFn, sde: SDE, x: Tensor, t: float) -> Tensor:
    """Probability-flow velocity dx/dt = f(t) x - g(t)^2 score / 2 (Song et al. 2021, Eq. 13)."""
    tb = _batch_time(t, x)
    return sde.probability_flow_drift(x, tb, _score(score_fn, x, tb)).to(x.dtype)


@torch.no_grad()
def heun_ode(score_fn: ScoreFn, sde: SDE, x_T: Tensor, steps: int,
             generator: Generator = None, callback: Callback | None = None, *,
             denoise: bool = False, schedule: Schedule | None = None) -> tuple[Tensor, Info]:
    """Probability-flow ODE with the fixed-step Heun (trapezoidal) solver.

    Karras et al. 2022, Algorithm 1 (deterministic): an Euler predictor
    x' = x - v(x, t_i) dt, then x <- x - (v(x, t_i) + v(x', t_{i+1})) dt / 2. Karras et al. fall
    back to Euler on the last step only because their grid ends at sigma = 0; this grid ends at
    eps > 0, so every step, the last one included, is a Heun step: NFE = 2 steps (+1 if
    denoise). No noise is drawn; ``generator`` is accepted for the common signature.
    ``schedule`` defaults to uniform t (Karras et al. use :class:`~difftime.schedules.KarrasRho`).
    """
    o = _check_heun_ode("heun_ode", steps=steps, denoise=denoise, schedule=schedule)
    steps = o["steps"]
    x, grid = _state(x_T), _time_grid(sde, steps, o["schedule"])
    for i in range(steps):
        t, t_next, dt = grid[i], grid[i + 1], grid[i] - grid[i + 1]
        v = _flow(score_fn, sde, x, t)
        v_next = _flow(score_fn, sde, x - v * dt, t_next)
        x = x - 0.5 * (v + v_next) * dt
        _notify(callback, i, t_next, x, 2 * (i + 1))
    x, nfe = _finish(score_fn, sde, x, o["denoise"], 2 * steps)
    return x, _info("heun_ode", nfe, steps, sde, schedule=o["schedule"].name)


def _check_heun_ode(owner: str, *, steps: int, denoise: bool, schedule: Schedule | None) -> dict[str, Any]:
    return _check_fixed(owner, steps, schedule, denoise)


@torch.no_grad()
def adaptive_ode(score_fn: ScoreFn, sde: SDE, x_T: Tensor, steps: int | None = None,
                 generator: Generator = None, callback: Callback | None = None, *,
                 rtol: float = 1e-5, atol: float = 1e-5, method: str = "dopri5",
                 denoise: bool = False) -> tuple[Tensor, Info]:
    """Probability-flow ODE (Song et al. 2021, Eq. 13) with an adaptive Runge-Kutta solver.

    ``torchdiffeq.odeint`` integrates from T to eps with the error tolerances ``rtol``/``atol``
    (Dormand-Prince 5(4) by default; Song et al. 2021, Sec. 4.3, use RK45). ``steps`` is ignored:
    the solver chooses its own steps. ``callback`` is called at every function evaluation with
    the stage time and state the solver asked for (so ``t`` is not monotone when a step is
    rejected) and ``i = nfe - 1``. NFE counts every evaluation the solver made (+1 if denoise).
    No noise is drawn.
    """
    o = _check_adaptive_ode("adaptive_ode", rtol=rtol, atol=atol, method=method, denoise=denoise)
    rtol, atol, method = o["rtol"], o["atol"], o["method"]
    x, nfe = _state(x_T), 0

    def velocity(t: Tensor, y: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        v = _flow(score_fn, sde, y, float(t))
        _notify(callback, nfe - 1, float(t), y, nfe)
        return v

    times = torch.tensor([sde.T, sde.eps], dtype=torch.float64, device=x.device)
    # torchdiffeq steps past the last time and interpolates back; the SDE coefficients are
    # undefined below t = 0, so eps is made a step boundary that no stage crosses.
    options = {"step_t": times[1:]}
    x = odeint(velocity, x, times, rtol=rtol, atol=atol, method=method, options=options)[-1]
    x, nfe = _finish(score_fn, sde, x, o["denoise"], nfe)
    return x, _info("adaptive_ode", nfe, None, sde, rtol=rtol, atol=atol, method=method)


def _check_adaptive_ode(owner: str, *, rtol: float, atol: float, method: str, denoise: bool) -> dict[str, Any]:
    return {"rtol": checks.real("rtol", rtol, owner), "atol": checks.real("atol", atol, owner),
            "method": checks.choice("method", method, ODE_METHODS, owner), "denoise": bool(denoise)}
