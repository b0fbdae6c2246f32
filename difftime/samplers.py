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

The state is kept in at least fp32 (fp64 inputs stay fp64). Fixed-step samplers use the uniform
grid t_i = T - i (T - eps) / steps, i = 0..steps; ``dt > 0`` below is the length of a step
going backwards. The samplers only use the SDE's own methods (reverse drift,
probability-flow drift, diffusion, marginal coefficients), never its class.
"""

from __future__ import annotations

import abc
import math
from typing import Any, Callable, Literal

import torch
from torch import Tensor
from torchdiffeq import odeint

from difftime.sde import SDE, ScoreFn
from difftime.utils import ConfigError, Generator, append_dims, randn

Callback = Callable[[dict[str, Any]], None]
Info = dict[str, Any]
ODEMethod = Literal["dopri5", "bosh3", "adaptive_heun"]
ODE_METHODS: tuple[str, ...] = ("dopri5", "bosh3", "adaptive_heun")


# ---------------------------------------------------------------------- shared pieces
def _positive_int(key: str, value: int, owner: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(key, value, f"an integer >= {minimum}", owner)
    return value


def _positive_float(key: str, value: float, owner: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(key, value, "a finite float > 0", owner)
    return float(value)


def _state(x_T: Tensor) -> Tensor:
    """The sampler state: ``x_T`` in at least fp32 (precision policy: the core keeps fp32)."""
    return x_T.detach().to(torch.promote_types(x_T.dtype, torch.float32)).clone()


def _time_grid(sde: SDE, steps: int) -> list[float]:
    """Uniform grid T = t_0 > t_1 > ... > t_steps = eps (computed in fp64)."""
    return torch.linspace(sde.T, sde.eps, steps + 1, dtype=torch.float64).tolist()


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
                   denoise: bool = True) -> tuple[Tensor, Info]:
    """Euler-Maruyama on the reverse-time SDE (Song et al. 2021, Eq. 6 and App. G).

    x <- x - [f(t) x - g(t)^2 score(x, t)] dt + g(t) sqrt(dt) z,  z ~ N(0, I).

    Noise is added at every step, the last one included, so that every step is the same
    Markov kernel and the final state approximates q_eps; with ``denoise`` Tweedie's formula
    then maps it to E[x_0 | x_eps] (one extra score evaluation). NFE = steps (+1 if denoise).
    """
    steps = _positive_int("steps", steps, "euler_maruyama")
    x, grid = _state(x_T), _time_grid(sde, steps)
    for i in range(steps):
        t, dt = grid[i], grid[i] - grid[i + 1]
        tb = _batch_time(t, x)
        drift = sde.reverse_drift(x, tb, _score(score_fn, x, tb)).to(x.dtype)
        z = randn(x.shape, generator, x.device, x.dtype)
        x = x - drift * dt + _coeff(sde.diffusion, t) * math.sqrt(dt) * z
        _notify(callback, i, grid[i + 1], x, i + 1)
    x, nfe = _finish(score_fn, sde, x, denoise, steps)
    return x, _info("euler_maruyama", nfe, steps, sde)


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
                        step_size: Literal["expected", "per_sample"] = "expected") -> tuple[Tensor, Info]:
    """Predictor-corrector sampling (Song et al. 2021, Sec. 4.2, Algorithms 4 and 5).

    Each grid step runs the reverse-diffusion predictor t_i -> t_{i+1}, then
    ``corrector_steps`` Langevin steps at t_{i+1} (the order of the algorithms in App. G).
    The Langevin step size uses alpha_i = 1 - beta_i of the discretised VP chain; for a
    general linear SDE the same quantity is alpha_i = a^2 = (m(t_i) / m(t_{i+1}))^2, the
    squared mean decay of the forward kernel over the grid step (a = sqrt(1 - beta_i) for VP,
    m = 1 and so alpha = 1 for VE). Noise is added at every step, the last one included.
    NFE = steps (1 + corrector_steps) (+1 if denoise). ``step_size`` selects the Langevin
    step rule (see :func:`langevin_step`): "expected" (state-independent, s(t)-based) or
    "per_sample" (the per-sample norm ratio).
    """
    steps = _positive_int("steps", steps, "predictor_corrector")
    snr = _positive_float("snr", snr, "predictor_corrector")
    corrector_steps = _positive_int("corrector_steps", corrector_steps, "predictor_corrector", minimum=0)
    x, grid, nfe = _state(x_T), _time_grid(sde, steps), 0
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
                    step_size=step_size)


# ---------------------------------------------------------------------- probability-flow ODE
def _flow(score_fn: ScoreFn, sde: SDE, x: Tensor, t: float) -> Tensor:
    """Probability-flow velocity dx/dt = f(t) x - g(t)^2 score / 2 (Song et al. 2021, Eq. 13)."""
    tb = _batch_time(t, x)
    return sde.probability_flow_drift(x, tb, _score(score_fn, x, tb)).to(x.dtype)


@torch.no_grad()
def heun_ode(score_fn: ScoreFn, sde: SDE, x_T: Tensor, steps: int,
             generator: Generator = None, callback: Callback | None = None, *,
             denoise: bool = False) -> tuple[Tensor, Info]:
    """Probability-flow ODE with the fixed-step Heun (trapezoidal) solver.

    Karras et al. 2022, Algorithm 1 (deterministic): an Euler predictor
    x' = x - v(x, t_i) dt, then x <- x - (v(x, t_i) + v(x', t_{i+1})) dt / 2. Karras et al. fall
    back to Euler on the last step only because their grid ends at sigma = 0; this grid ends at
    eps > 0, so every step, the last one included, is a Heun step: NFE = 2 steps (+1 if
    denoise). No noise is drawn; ``generator`` is accepted for the common signature.
    """
    steps = _positive_int("steps", steps, "heun_ode")
    x, grid = _state(x_T), _time_grid(sde, steps)
    for i in range(steps):
        t, t_next, dt = grid[i], grid[i + 1], grid[i] - grid[i + 1]
        v = _flow(score_fn, sde, x, t)
        v_next = _flow(score_fn, sde, x - v * dt, t_next)
        x = x - 0.5 * (v + v_next) * dt
        _notify(callback, i, t_next, x, 2 * (i + 1))
    x, nfe = _finish(score_fn, sde, x, denoise, 2 * steps)
    return x, _info("heun_ode", nfe, steps, sde)


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
    rtol, atol = _positive_float("rtol", rtol, "adaptive_ode"), _positive_float("atol", atol, "adaptive_ode")
    if method not in ODE_METHODS:
        raise ConfigError("method", method, f"one of {ODE_METHODS}", "adaptive_ode")
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
    x, nfe = _finish(score_fn, sde, x, denoise, nfe)
    return x, _info("adaptive_ode", nfe, None, sde, rtol=rtol, atol=atol, method=method)


# ---------------------------------------------------------------------- config classes
class Sampler(abc.ABC):
    """A configured sampler: ``sampler(score_fn, sde, x_T) -> (samples, info)``.

    Typed constructors make the config schema (LightningCLI ``class_path``/``init_args``).
    Every constructor argument other than ``steps`` is passed on as a keyword option of the
    sampler function; ``steps=None`` in a call means the configured ``self.steps``.
    """

    name: str = "sampler"
    steps: int | None = None

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
        return {"name": self.name, **vars(self)}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class EulerMaruyama(Sampler):
    """Reverse-SDE Euler-Maruyama (:func:`euler_maruyama`)."""

    name = "euler_maruyama"
    function = staticmethod(euler_maruyama)

    def __init__(self, steps: int = 1000, denoise: bool = True) -> None:
        self.steps = _positive_int("steps", steps, type(self).__name__)
        self.denoise = bool(denoise)


class PredictorCorrector(Sampler):
    """Reverse-diffusion predictor + Langevin corrector (:func:`predictor_corrector`)."""

    name = "predictor_corrector"
    function = staticmethod(predictor_corrector)

    def __init__(self, steps: int = 1000, snr: float = 0.16, corrector_steps: int = 1,
                 denoise: bool = True, step_size: Literal["expected", "per_sample"] = "expected") -> None:
        owner = type(self).__name__
        self.steps = _positive_int("steps", steps, owner)
        self.snr = _positive_float("snr", snr, owner)
        self.corrector_steps = _positive_int("corrector_steps", corrector_steps, owner, minimum=0)
        self.denoise = bool(denoise)
        if step_size not in ("expected", "per_sample"):
            raise ConfigError("step_size", step_size, "'expected' or 'per_sample'", owner)
        self.step_size = step_size


class HeunODE(Sampler):
    """Probability-flow ODE, fixed-step Heun (:func:`heun_ode`)."""

    name = "heun_ode"
    function = staticmethod(heun_ode)

    def __init__(self, steps: int = 100, denoise: bool = False) -> None:
        self.steps = _positive_int("steps", steps, type(self).__name__)
        self.denoise = bool(denoise)


class AdaptiveODE(Sampler):
    """Probability-flow ODE, adaptive Runge-Kutta (:func:`adaptive_ode`); ``steps`` is ignored."""

    name = "adaptive_ode"
    function = staticmethod(adaptive_ode)

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-5, method: ODEMethod = "dopri5",
                 denoise: bool = False) -> None:
        owner = type(self).__name__
        self.rtol = _positive_float("rtol", rtol, owner)
        self.atol = _positive_float("atol", atol, owner)
        if method not in ODE_METHODS:
            raise ConfigError("method", method, f"one of {ODE_METHODS}", owner)
        self.method = method
        self.denoise = bool(denoise)
