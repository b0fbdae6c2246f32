"""Reverse-time samplers for a linear SDE with a finite diffusion time T.

Every sampler starts from a given ``x_T: [B, *D]`` at time T, so any distribution at T can feed
it (the SDE's Gaussian prior, the learned auxiliary prior of Franzese et al. 2023, or the
exact q_T of a toy distribution), and integrates backwards to ``sde.eps``. All share
one signature (k-diffusion style)::

    fn(score_fn, sde, x_T, steps, generator=None, callback=None, *, options) -> (samples, info)

- ``score_fn(x, t) -> [B, *D]`` with ``t: [B]``; it may run under autocast, its output is cast
  back to the state dtype.
- ``generator``: a ``torch.Generator``, a per-sample noise source
  (:class:`difftime.utils.PerSampleNoise`) or None; all noise is drawn through
  :func:`difftime.utils.randn`, so with per-sample seeds a sample's trajectory depends only on
  its own seed, not on the batch it is drawn in.
- ``callback(d)`` is called after each step with ``d = {"i", "t", "x", "nfe"}``.
- ``info`` holds ``nfe`` (score evaluations; one call on a batch counts 1), ``steps``,
  ``sampler`` and ``t_end``.

The state is kept in at least fp32 (fp64 inputs stay fp64). Fixed-step samplers take a
``schedule`` (:mod:`difftime.schedules`) giving the grid T = t_0 > ... > t_steps = eps; ``dt > 0``
below is the length of a step going backwards. The samplers only use the SDE's own methods
(reverse drift, probability-flow drift, diffusion, marginal coefficients), never its class.

Argument checks: every option is checked once, in the per-sampler routine ``_check_<name>``
(built on :mod:`difftime.checks`). The sampler function calls it on its keyword options and
the config class calls the same routine in its constructor.

Which to use (2-D ring mixture, VP, eps = 1e-3; ``benchmarks/results/sampler_nfe.md``): the
deterministic :func:`dpm_solver_pp` (2M with the UniC-style corrector): 12-30 NFE to converged
quality at T = 1 on the LogSNR grid, 7 on a grid fitted to the model and tuned to the sampler
(:func:`difftime.grid_fit.refine_grid`; oracle and trained score alike);
for a stochastic sampler, and for images, :func:`sde_dpm_solver_pp` (16-30 NFE). Euler-Maruyama,
predictor-corrector and Heun on the uniform-t grid need 50 to over 200.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import Tensor
from torchdiffeq import odeint

from difftime import checks
from difftime.schedules import LogSNR, Schedule, UniformT
from difftime.sde import SDE, ScoreFn
from difftime.utils import ConfigError, Generator, append_dims, randn

Callback = Callable[[dict[str, Any]], None]
Info = dict[str, Any]
ODEMethod = Literal["dopri5", "bosh3", "adaptive_heun"]
ODE_METHODS: tuple[str, ...] = ("dopri5", "bosh3", "adaptive_heun")
STEP_SIZES: tuple[str, ...] = ("expected", "per_sample")


# ---------------------------------------------------------------------- shared pieces
def _schedule(value: Schedule | None, owner: str, default: Schedule) -> Schedule:
    if value is None:
        return default
    if not isinstance(value, Schedule):
        raise ConfigError("schedule", value, "a difftime.schedules.Schedule (or null for the default)", owner)
    return value


def _check_fixed(owner: str, steps: int, schedule: Schedule | None, denoise: bool,
                 default: Schedule | None = None) -> dict[str, Any]:
    """The options every fixed-step sampler has: ``steps >= 1``, a schedule, a denoise flag."""
    return {"steps": checks.integer("steps", steps, owner), "denoise": bool(denoise),
            "schedule": _schedule(schedule, owner, default or UniformT())}


def _state(x_T: Tensor) -> Tensor:
    """The sampler state: ``x_T`` in at least fp32 (precision policy: the core keeps fp32)."""
    return x_T.detach().to(torch.promote_types(x_T.dtype, torch.float32)).clone()


def _time_grid(sde: SDE, steps: int, schedule: Schedule) -> list[float]:
    """The schedule's grid T = t_0 > t_1 > ... > t_steps = eps (computed in fp64)."""
    return schedule(sde, steps).tolist()


def _batch_time(t: float, x: Tensor) -> Tensor:
    """The scalar time ``t`` as a ``[B]`` tensor in the state dtype."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)


def _coeff(fn: Callable[[Tensor], Tensor], t: float) -> float:
    """An SDE coefficient at a scalar time, evaluated in fp64."""
    return float(fn(torch.tensor([t], dtype=torch.float64))[0])


def _score(score_fn: ScoreFn, x: Tensor, t: Tensor) -> Tensor:
    return score_fn(x, t).to(x.dtype)


def _notify(callback: Callback | None, i: int, t: float, x: Tensor, nfe: int) -> None:
    if callback is not None:
        callback({"i": i, "t": t, "x": x, "nfe": nfe})


def tweedie_denoise(score_fn: ScoreFn, sde: SDE, x: Tensor) -> Tensor:
    """Posterior mean E[x_0 | x_eps] by Tweedie's formula, one score evaluation.

    For q(x_eps | x_0) = N(m x_0, s^2 I): E[x_0 | x_eps] = (x_eps + s^2 grad log q_eps(x_eps)) / m
    (Robbins 1956; Efron 2011, "Tweedie's formula and selection bias", applied to m x_0).
    """
    m, s = (float(c[0]) for c in sde.marginal_coeffs(torch.tensor([sde.eps], dtype=torch.float64)))
    return (x + s**2 * _score(score_fn, x, _batch_time(sde.eps, x))) / m


def _finish(score_fn: ScoreFn, sde: SDE, x: Tensor, denoise: bool, nfe: int) -> tuple[Tensor, int]:
    if denoise:
        return tweedie_denoise(score_fn, sde, x), nfe + 1
    return x, nfe


def _info(name: str, nfe: int, steps: int | None, sde: SDE, **extra: Any) -> Info:
    return {"sampler": name, "nfe": nfe, "steps": steps, "t_end": sde.eps, **extra}


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


# ---------------------------------------------------------------------- exponential integrators
# Lu et al. 2022a ("DPM-Solver", Sec. 3.1) and 2022b ("DPM-Solver++", Sec. 4): with the data
# prediction D(x, t) = (x + s^2 score) / m and the half log-SNR l(t) = log(m / s) = -lambda / 2,
# the probability-flow ODE of ANY linear SDE reads d(x / s) = D d(m / s) (from dx/dt = f x - g^2
# score / 2 with f = m'/m and g^2 = 2 s s' - 2 f s^2), so from t_i to t_{i+1} with h = l_{i+1} - l_i:
#     x_{i+1} = (s_{i+1} / s_i) x_i + m_{i+1} int_0^h e^{tau - h} D(l_i + tau) dtau.      (*)
# Only m(t) and s(t) of the SDE enter: VP, sub-VP and VE (m = 1) alike.
# The reverse SDEs dx = [f x - (1 + eta^2) g^2 score / 2] dt + eta g dw (Karras et al. 2022, Eq. 6
# family; eta = 1 is Song et al. 2021, Eq. 6) become, with y = x / s and g^2 dt = -2 s^2 dl, the
# Ornstein-Uhlenbeck process dy = (1 + eta^2) e^l D dl - eta^2 y dl + eta sqrt(2) dW_l, solved by
#     x_{i+1} = (s_{i+1} / s_i) e^{-eta^2 h} x_i + m_{i+1} int_0^h k e^{k (tau - h)} D dtau
#               + s_{i+1} sqrt(1 - e^{-2 eta^2 h}) z,       k = 1 + eta^2,                      (**)
# which for eta = 1 and constant D is the DDPM posterior q(x_{i+1} | x_i, x_0 = D).
# D is replaced by the polynomial through the last data predictions (multistep, Adams-Bashforth
# type) and the weight integrals are exact: I_0 = 1 - e^{-k h}, I_j = h^j - (j / k) I_{j-1}.
@dataclass(frozen=True)
class _Node:
    """A grid time with its fp64 coefficients m(t), s(t) and half log-SNR l(t) = log(m / s)."""

    t: float
    m: float
    s: float
    lam: float


def _nodes(sde: SDE, grid: list[float]) -> list[_Node]:
    t = torch.tensor(grid, dtype=torch.float64)
    m, s = sde.marginal_coeffs(t)
    lam = -0.5 * sde.log_nsr(t)
    return [_Node(*values) for values in zip(grid, m.tolist(), s.tolist(), lam.tolist())]


def _data_prediction(score_fn: ScoreFn, x: Tensor, node: _Node) -> Tensor:
    """D(x, t) = (x + s^2 score(x, t)) / m = E[x_0 | x_t] (Tweedie), ``[B, *D]``."""
    return (x + node.s**2 * _score(score_fn, x, _batch_time(node.t, x))) / node.m


def _weights(taus: list[float], h: float, kappa: float = 1.0) -> list[float]:
    """w_j such that int_0^h k e^{k (tau - h)} P(tau) dtau = sum_j w_j D_j, P the polynomial
    through (tau_j, D_j) (tau relative to the step's start, scaled by h for conditioning)."""
    n = len(taus)
    moments = [-math.expm1(-kappa * h)]
    for j in range(1, n):
        moments.append(h**j - j / kappa * moments[-1])
    vander = torch.tensor([[(tau / h) ** j for j in range(n)] for tau in taus], dtype=torch.float64)
    scaled = torch.tensor([moments[j] / h**j for j in range(n)], dtype=torch.float64)
    return torch.linalg.solve(vander.T, scaled).tolist()


def _paper_2m_weights(taus: list[float], h: float) -> list[float]:
    """DPM-Solver++(2M), Lu et al. 2022b, Algorithm 2: D = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1} / h,
    times 1 - e^{-h}: the exact I_1 = h - (1 - e^{-h}) replaced by h (1 - e^{-h}) / 2 (same order)."""
    phi, r = -math.expm1(-h), -taus[1] / h
    return [phi * (1.0 + 0.5 / r), -phi * 0.5 / r]


def _exp_step(x: Tensor, history: list[tuple[float, Tensor]], src: _Node, dst: _Node, eta: float = 0.0,
              paper_2m: bool = False) -> Tensor:
    """Deterministic part of (**) from ``src`` to ``dst``; ``history``: (l_j, D_j), newest first."""
    h = dst.lam - src.lam
    taus = [lam - src.lam for lam, _ in history]
    use_paper = paper_2m and len(history) == 2 and eta == 0.0 and taus[0] == 0.0
    weights = _paper_2m_weights(taus, h) if use_paper else _weights(taus, h, 1.0 + eta**2)
    out = (dst.s / src.s) * math.exp(-(eta**2) * h) * x
    for w, (_, d) in zip(weights, history):
        out = out + (dst.m * w) * d
    return out


def _step_order(order: int, i: int, steps: int, lower_order_final: bool) -> int:
    """Order of step i: first-order start (no history), lower order over the last steps when asked
    (Lu et al. 2022b, Sec. 5 / App.: lower-order final steps stabilise sampling at < 15 steps)."""
    k = min(order, i + 1)
    return min(k, steps - i) if lower_order_final else k


def _multistep(score_fn: ScoreFn, sde: SDE, x_T: Tensor, o: dict[str, Any], callback: Callback | None,
               generator: Generator = None, eta: float = 0.0) -> tuple[Tensor, int]:
    """The multistep exponential integrator (*)/(**) of order ``o["order"]``; returns (x, nfe)."""
    steps, order = o["steps"], o.get("order", 1)
    x, nodes = _state(x_T), _nodes(sde, _time_grid(sde, o["steps"], o["schedule"]))
    history: list[tuple[float, Tensor]] = []
    for i in range(steps):
        src, dst = nodes[i], nodes[i + 1]
        d = _data_prediction(score_fn, x, src)
        if o.get("corrector") and history:  # UniC-style: refit the last step with the new D, no extra NFE
            x = _exp_step(x_prev, ([(src.lam, d)] + history)[:order + 1], nodes[i - 1], src)
        history = ([(src.lam, d)] + history)[:order]
        x_prev = x
        k = _step_order(order, i, steps, o.get("lower_order_final", False))
        x = _exp_step(x, history[:k], src, dst, eta, o.get("variant") == "paper")
        if eta > 0:
            x = x + dst.s * math.sqrt(-math.expm1(-2.0 * eta**2 * (dst.lam - src.lam))) * randn(
                x.shape, generator, x.device, x.dtype)
        _notify(callback, i, dst.t, x, i + 1)
    return _finish(score_fn, sde, x, o["denoise"], steps)


@torch.no_grad()
def ddim(score_fn: ScoreFn, sde: SDE, x_T: Tensor, steps: int, generator: Generator = None,
         callback: Callback | None = None, *, schedule: Schedule | None = None,
         denoise: bool = False) -> tuple[Tensor, Info]:
    """DDIM (Song, Meng & Ermon 2021, Eq. 12 with sigma = 0) as the first-order exponential
    integrator of the probability-flow ODE (Lu et al. 2022b, Eq. 9 / DPM-Solver++(1)):

        x_{i+1} = (s_{i+1} / s_i) x_i + m_{i+1} (1 - e^{-h}) D(x_i, t_i),  h = log(m/s)_{i+1} - log(m/s)_i.

    First order in h for every linear SDE (derived from its own m, s; for VE, m = 1). NFE = steps
    (+1 if denoise). ``schedule`` defaults to :class:`~difftime.schedules.LogSNR` (constant h).
    ``denoise`` (final Tweedie step, +1 NFE) is off by default, as for :func:`dpm_solver_pp`:
    on the ring benchmark it halved the NFE with the oracle score but, with a trained MLP, kept
    T = 1 and T = 0.6 from converging at all (the network's error at t = eps, amplified by s^2,
    moves the samples). No noise is drawn.
    """
    o = _check_ddim("ddim", steps=steps, schedule=schedule, denoise=denoise)
    x, nfe = _multistep(score_fn, sde, x_T, {**o, "order": 1}, callback)
    return x, _info("ddim", nfe, o["steps"], sde, schedule=o["schedule"].name)


def _check_ddim(owner: str, *, steps: int, schedule: Schedule | None, denoise: bool) -> dict[str, Any]:
    return _check_fixed(owner, steps, schedule, denoise, default=LogSNR())


@torch.no_grad()
def dpm_solver_pp(score_fn: ScoreFn, sde: SDE, x_T: Tensor, steps: int, generator: Generator = None,
                  callback: Callback | None = None, *, order: int = 2, lower_order_final: bool = True,
                  corrector: bool = True, variant: Literal["paper", "exact"] = "paper",
                  schedule: Schedule | None = None, denoise: bool = False) -> tuple[Tensor, Info]:
    """Multistep DPM-Solver++ (Lu et al. 2022b, "DPM-Solver++", Sec. 4.2, Algorithm 2) in
    data-prediction form for the probability-flow ODE of any linear SDE, one NFE per step.

    Step i integrates (*) above with D replaced by the polynomial through the last ``order``
    data predictions (``order`` 1 = DDIM, 2 = DPM-Solver++(2M), 3 = DPM-Solver++(3M)); the first
    steps use lower orders (no history yet), and with ``lower_order_final`` the last steps too
    (order <= steps left). ``variant="paper"`` takes Algorithm 2's 2M weights
    (1 + 1/(2r), -1/(2r)) times (1 - e^{-h}); "exact" (and every order 3 step) integrates the
    interpolating polynomial exactly against e^{tau - h}. ``corrector`` refits each finished
    step with the data prediction made at its end, as UniC does (Zhao et al. 2023, "UniPC",
    Sec. 3.1; here with exact weights): order + 1, at no extra NFE (the last step is not
    corrected). NFE = steps (+1 if denoise). Defaults by measurement (ring benchmark, T = 1):
    order 2 with the corrector on the LogSNR grid (30 NFE for the oracle and the trained score;
    order 3 + corrector reached 12 with the trained score but 30 with the oracle, plain 2M/3M 30);
    ``denoise`` off (see :func:`ddim`). No noise is drawn.
    """
    o = _check_dpm_solver_pp("dpm_solver_pp", steps=steps, order=order, lower_order_final=lower_order_final,
                             corrector=corrector, variant=variant, schedule=schedule, denoise=denoise)
    x, nfe = _multistep(score_fn, sde, x_T, o, callback)
    return x, _info("dpm_solver_pp", nfe, o["steps"], sde, schedule=o["schedule"].name, order=o["order"],
                    corrector=o["corrector"])


def _check_dpm_solver_pp(owner: str, *, steps: int, order: int, lower_order_final: bool, corrector: bool,
                         variant: str, schedule: Schedule | None, denoise: bool) -> dict[str, Any]:
    return {**_check_fixed(owner, steps, schedule, denoise, default=LogSNR()),
            "order": checks.choice("order", order, (1, 2, 3), owner), "lower_order_final": bool(lower_order_final),
            "corrector": bool(corrector), "variant": checks.choice("variant", variant, ("paper", "exact"), owner)}


@torch.no_grad()
def sde_dpm_solver_pp(score_fn: ScoreFn, sde: SDE, x_T: Tensor, steps: int, generator: Generator = None,
                      callback: Callback | None = None, *, eta: float = 1.0, order: int = 2,
                      schedule: Schedule | None = None, denoise: bool = True) -> tuple[Tensor, Info]:
    """SDE-DPM-Solver++ (Lu et al. 2022b, Sec. 4 / App.; here derived for the whole eta family):
    the exponential integrator (**) above of dx = [f x - (1 + eta^2) g^2 score / 2] dt + eta g dw.

    ``eta`` is the churn: 0 gives the probability-flow ODE (:func:`dpm_solver_pp`, exact weights),
    1 the reverse SDE (order 1 = DDPM ancestral sampling with x_0 = D), in between a partial
    refresh of the noise. ``order`` 1 or 2 (multistep, first-order first step). All noise is
    drawn through :func:`difftime.utils.randn` with ``generator`` (per-sample seeds give
    batch-invariant samples). Noise is added on every step, so the state approximates q_eps and
    ``denoise`` (Tweedie, +1 NFE) is on by default. NFE = steps (+1 if denoise).
    """
    o = _check_sde_dpm_solver_pp("sde_dpm_solver_pp", steps=steps, eta=eta, order=order, schedule=schedule,
                                 denoise=denoise)
    x, nfe = _multistep(score_fn, sde, x_T, {**o, "variant": "exact"}, callback, generator, o["eta"])
    return x, _info("sde_dpm_solver_pp", nfe, o["steps"], sde, schedule=o["schedule"].name, eta=o["eta"],
                    order=o["order"])


def _check_sde_dpm_solver_pp(owner: str, *, steps: int, eta: float, order: int, schedule: Schedule | None,
                             denoise: bool) -> dict[str, Any]:
    return {**_check_fixed(owner, steps, schedule, denoise, default=LogSNR()),
            "eta": checks.real("eta", eta, owner, low_open=False), "order": checks.choice("order", order, (1, 2), owner)}


# ---------------------------------------------------------------------- config classes
SAMPLERS: dict[str, type["Sampler"]] = {}


class Sampler(abc.ABC):
    """A configured sampler: ``sampler(score_fn, sde, x_T) -> (samples, info)``.

    Typed constructors make the config schema (LightningCLI ``class_path``/``init_args``); each
    passes its arguments through the sampler's own check routine (the one its function uses),
    so every option is checked in one place. Every option other than ``steps`` is passed on as
    a keyword of the sampler function; ``steps=None`` in a call means the configured
    ``self.steps``. Each subclass with a ``name`` (the function's name) registers itself in
    :data:`SAMPLERS`.
    """

    name: str = "sampler"
    steps: int | None = None
    check: Callable[..., dict[str, Any]]
    deterministic: bool = True  # no noise drawn after x_T: it follows the probability-flow ODE

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in SAMPLERS:
                raise TypeError(f"sampler name {cls.name!r} is taken by {SAMPLERS[cls.name].__name__}")
            SAMPLERS[cls.name] = cls

    def _configure(self, **options: Any) -> None:
        vars(self).update(type(self).check(type(self).__name__, **options))

    @staticmethod
    @abc.abstractmethod
    def function(score_fn: ScoreFn, sde: SDE, x_T: Tensor, steps: int | None, generator: Generator,
                 callback: Callback | None, **options: Any) -> tuple[Tensor, Info]:
        """The sampler function this class configures."""

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "steps"}

    def __call__(self, score_fn: ScoreFn, sde: SDE, x_T: Tensor, steps: int | None = None,
                 generator: Generator = None, callback: Callback | None = None) -> tuple[Tensor, Info]:
        steps = self.steps if steps is None else steps
        return self.function(score_fn, sde, x_T, steps, generator, callback, **self.options())

    def hparams(self) -> dict[str, Any]:
        """Plain description of the configuration (for logs and file names)."""
        plain = {k: repr(v) if isinstance(v, Schedule) else v for k, v in vars(self).items()}
        return {"name": self.name, **plain}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class EulerMaruyama(Sampler):
    """Reverse-SDE Euler-Maruyama (:func:`euler_maruyama`)."""

    deterministic = False
    name, function, check = "euler_maruyama", staticmethod(euler_maruyama), staticmethod(_check_euler_maruyama)

    def __init__(self, steps: int = 1000, denoise: bool = True, schedule: Schedule | None = None) -> None:
        self._configure(steps=steps, denoise=denoise, schedule=schedule)


class PredictorCorrector(Sampler):
    """Reverse-diffusion predictor + Langevin corrector (:func:`predictor_corrector`)."""

    deterministic = False
    name = "predictor_corrector"
    function, check = staticmethod(predictor_corrector), staticmethod(_check_predictor_corrector)

    def __init__(self, steps: int = 1000, snr: float = 0.16, corrector_steps: int = 1,
                 denoise: bool = True, step_size: Literal["expected", "per_sample"] = "expected",
                 schedule: Schedule | None = None) -> None:
        self._configure(steps=steps, snr=snr, corrector_steps=corrector_steps, denoise=denoise,
                        step_size=step_size, schedule=schedule)


class HeunODE(Sampler):
    """Probability-flow ODE, fixed-step Heun (:func:`heun_ode`)."""

    name, function, check = "heun_ode", staticmethod(heun_ode), staticmethod(_check_heun_ode)

    def __init__(self, steps: int = 100, denoise: bool = False, schedule: Schedule | None = None) -> None:
        self._configure(steps=steps, denoise=denoise, schedule=schedule)


class AdaptiveODE(Sampler):
    """Probability-flow ODE, adaptive Runge-Kutta (:func:`adaptive_ode`); ``steps`` is ignored."""

    name, function, check = "adaptive_ode", staticmethod(adaptive_ode), staticmethod(_check_adaptive_ode)

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-5, method: ODEMethod = "dopri5",
                 denoise: bool = False) -> None:
        self._configure(rtol=rtol, atol=atol, method=method, denoise=denoise)


class DDIM(Sampler):
    """Deterministic DDIM, the first-order exponential integrator (:func:`ddim`)."""

    name, function, check = "ddim", staticmethod(ddim), staticmethod(_check_ddim)

    def __init__(self, steps: int = 20, denoise: bool = False, schedule: Schedule | None = None) -> None:
        self._configure(steps=steps, denoise=denoise, schedule=schedule)


class DPMSolverPP(Sampler):
    """Multistep DPM-Solver++ (2M/3M, optional UniC-style corrector) (:func:`dpm_solver_pp`)."""

    name, function, check = "dpm_solver_pp", staticmethod(dpm_solver_pp), staticmethod(_check_dpm_solver_pp)

    def __init__(self, steps: int = 10, order: int = 2, lower_order_final: bool = True, corrector: bool = True,
                 variant: Literal["paper", "exact"] = "paper", denoise: bool = False,
                 schedule: Schedule | None = None) -> None:
        self._configure(steps=steps, order=order, lower_order_final=lower_order_final, corrector=corrector,
                        variant=variant, denoise=denoise, schedule=schedule)


class SDEDPMSolverPP(Sampler):
    """Stochastic multistep DPM-Solver++ with churn ``eta`` (:func:`sde_dpm_solver_pp`)."""

    name = "sde_dpm_solver_pp"
    function, check = staticmethod(sde_dpm_solver_pp), staticmethod(_check_sde_dpm_solver_pp)

    def __init__(self, steps: int = 50, eta: float = 1.0, order: int = 2, denoise: bool = True,
                 schedule: Schedule | None = None) -> None:
        self._configure(steps=steps, eta=eta, order=order, denoise=denoise, schedule=schedule)

    @property
    def deterministic(self) -> bool:  # type: ignore[override]
        return self.eta == 0.0
