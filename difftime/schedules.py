"""Time discretisations of [eps, T] for the fixed-step samplers.

A schedule maps ``(sde, steps)`` to the decreasing grid T = t_0 > t_1 > ... > t_steps = eps
(``steps + 1`` times, fp64, both end points exact). It only uses the SDE's own methods: its
``T``/``eps`` and the log noise-to-signal ratio lambda(t) = log(s(t)^2 / m(t)^2) with its inverse
``t_from_log_nsr``, so every schedule works for VP, sub-VP, VE or any new linear SDE.

* :class:`UniformT`: uniform in t (Song et al. 2021); for VP at T = 1 it spends about half of the
  steps where q_t is already close to N(0, I).
* :class:`LogSNR`: uniform in lambda, the step variable of the exponential integrators
  (Lu et al. 2022, "DPM-Solver", Sec. 3.3 and App. D.1: "uniform logSNR").
* :class:`KarrasRho`: Karras et al. 2022 ("EDM"), Eq. 5, uniform in sigma^(1/rho) with
  sigma = s / m, rho = 7: dense near eps where the detail forms.
* :class:`Tabulated`: a given grid of lambda values for one (SDE, T, eps, steps), as
  :mod:`difftime.grid_fit` writes it: placed on a model's own sampling trajectories (dynamic
  programming over a fine LogSNR grid) and tuned to a sampler (``refine_grid``).

Schedules are typed objects, so a config injects one with ``class_path:
difftime.schedules.LogSNR``; :data:`SCHEDULES` maps their ``name`` to the class for scripts.
"""

from __future__ import annotations

import abc
import math
from typing import Any

import torch
from torch import Tensor

from difftime import checks
from difftime.sde import SDE
from difftime.utils import ConfigError

SCHEDULES: dict[str, type["Schedule"]] = {}


class Schedule(abc.ABC):
    """``schedule(sde, steps) -> [steps + 1]`` fp64 times from ``sde.T`` down to ``sde.eps``."""

    name: str = "schedule"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            SCHEDULES[cls.name] = cls

    def __call__(self, sde: SDE, steps: int) -> Tensor:
        steps = checks.integer("steps", steps, type(self).__name__)
        t = self.times(sde, steps).to(torch.float64)
        t[0], t[-1] = sde.T, sde.eps  # exact end points, whatever the rounding of the inverse map
        return t

    @abc.abstractmethod
    def times(self, sde: SDE, steps: int) -> Tensor:
        """The ``steps + 1`` grid times, decreasing, from about T to about eps."""

    def hparams(self) -> dict[str, Any]:
        return {"name": self.name, **vars(self)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in vars(self).items()) + ")"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash(repr(self))


def _log_nsr(sde: SDE, t: float) -> float:
    return float(sde.log_nsr(torch.tensor([t], dtype=torch.float64))[0])


class UniformT(Schedule):
    """t_i = T - i (T - eps) / steps (Song et al. 2021; the grid of the original samplers)."""

    name = "uniform_t"

    def times(self, sde: SDE, steps: int) -> Tensor:
        return torch.linspace(sde.T, sde.eps, steps + 1, dtype=torch.float64)


class LogSNR(Schedule):
    """Uniform in lambda = log(s^2 / m^2): lambda_i = lambda(T) + i (lambda(eps) - lambda(T)) / steps.

    Lu et al. 2022 (DPM-Solver, App. D.1) step uniformly in the half log-SNR log(m / s) = -lambda / 2,
    the same grid. The step size h = |Delta lambda| / 2 is then constant, which the convergence
    orders of the exponential integrators are stated in.
    """

    name = "log_snr"

    def times(self, sde: SDE, steps: int) -> Tensor:
        lam = torch.linspace(_log_nsr(sde, sde.T), _log_nsr(sde, sde.eps), steps + 1, dtype=torch.float64)
        return sde.t_from_log_nsr(lam)


class KarrasRho(Schedule):
    """Karras et al. 2022 (EDM), Eq. 5: sigma_i = (sigma_max^(1/rho) + i/steps (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho with sigma = s / m = exp(lambda / 2), sigma_max = sigma(T), sigma_min = sigma(eps).

    rho = 7 is EDM's choice (their Fig. 13a); rho = 1 is uniform in sigma, rho -> infinity
    tends to :class:`LogSNR`. The times follow from ``sde.t_from_log_nsr(2 log sigma_i)``.
    """

    name = "karras"

    def __init__(self, rho: float = 7.0) -> None:
        self.rho = checks.real("rho", rho, type(self).__name__)

    def times(self, sde: SDE, steps: int) -> Tensor:
        inv = 1.0 / self.rho
        hi, lo = math.exp(0.5 * inv * _log_nsr(sde, sde.T)), math.exp(0.5 * inv * _log_nsr(sde, sde.eps))
        ramp = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
        log_sigma = self.rho * torch.log(hi + ramp * (lo - hi))
        return sde.t_from_log_nsr(2.0 * log_sigma)


class Tabulated(Schedule):
    """A fixed grid given by its log noise-to-signal ratios, ``log_nsr[0] = lambda(T) > ... >
    log_nsr[-1] = lambda(eps)`` (``steps + 1`` values).

    The grid belongs to the SDE, T and eps it was made for (:func:`difftime.grid_fit.fit_time_grid`
    writes one for a model): it refuses any other step count, and an SDE whose lambda(T) or
    lambda(eps) differs from the end points, naming both values. In a config::

        schedule: {class_path: difftime.schedules.Tabulated, init_args: {log_nsr: [10.05, 1.11, ..., -9.12]}}
    """

    name = "tabulated"

    def __init__(self, log_nsr: list[float]) -> None:
        owner = type(self).__name__
        values = list(log_nsr) if isinstance(log_nsr, (list, tuple)) else None
        ok = values is not None and len(values) >= 2 and all(
            not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) for v in values)
        if not ok or any(b >= a for a, b in zip(values, values[1:])):
            raise ConfigError("log_nsr", log_nsr, "a list of at least 2 finite, strictly decreasing numbers "
                              "(lambda(T) first, lambda(eps) last)", owner)
        self.log_nsr = [float(v) for v in values]

    def times(self, sde: SDE, steps: int) -> Tensor:
        owner = type(self).__name__
        if steps != len(self.log_nsr) - 1:
            raise ConfigError("steps", steps, f"{len(self.log_nsr) - 1}, the step count of this tabulated grid", owner)
        for end, t, value in (("first", sde.T, self.log_nsr[0]), ("last", sde.eps, self.log_nsr[-1])):
            expected = _log_nsr(sde, t)
            if abs(expected - value) > 1e-6 * max(1.0, abs(expected)):
                raise ConfigError("log_nsr", value, f"{expected!r} as its {end} value: lambda at t = {t:g} of "
                                  f"{type(sde).__name__}; this grid was made for another SDE, T or eps", owner)
        return sde.t_from_log_nsr(torch.tensor(self.log_nsr, dtype=torch.float64))
