"""The sampler registry: typed config classes (the LightningCLI schema of ``model.sampler``), one
per sampler function, each registered in :data:`SAMPLERS` under its function's name."""

from __future__ import annotations

import abc
from typing import Any, Callable, Literal

from torch import Tensor

from difftime import checks
from difftime.randomness import Generator
from difftime.samplers.classical import (ODEMethod, _check_adaptive_ode, _check_euler_maruyama, _check_heun_ode,
                                         _check_predictor_corrector, adaptive_ode, euler_maruyama, heun_ode,
                                         predictor_corrector)
from difftime.samplers.common import Callback, Info, Threshold
from difftime.samplers.exponential import (_check_ddim, _check_dpm_solver_pp, _check_sde_dpm_solver_pp, ddim,
                                           dpm_solver_pp, sde_dpm_solver_pp)
from difftime.schedules import Schedule
from difftime.sde import SDE, ScoreFn

SAMPLERS: dict[str, type["Sampler"]] = {}


class Sampler(abc.ABC):
    """A configured sampler: ``sampler(score_fn, sde, x_T) -> (samples, info)``.

    Typed constructors make the config schema (LightningCLI ``class_path``/``init_args``); each
    passes its arguments through the sampler's own check routine (the one its function uses),
    so every option is checked in one place. Every option other than ``steps`` is passed on as
    a keyword of the sampler function; ``steps=None`` in a call means the configured
    ``self.steps``. Each subclass with a ``name`` (the function's name) registers itself in
    :data:`SAMPLERS`. :meth:`nfe` gives the cost of a step count without running the network.
    """

    name: str = "sampler"
    steps: int | None = None
    denoise: bool = False
    check: Callable[..., dict[str, Any]]
    deterministic: bool = True  # no noise drawn after x_T: it follows the probability-flow ODE
    evals_per_step: int = 1  # score evaluations per grid step (per sample: one call on a batch counts 1)

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

    def nfe(self, steps: int | None = None) -> int | None:
        """Score evaluations per sample of a run with ``steps`` steps (None: the configured ones),
        ``evals_per_step * steps`` plus one for the final Tweedie step; the ``info["nfe"]`` the run
        reports, computed from the configuration alone (no network call)."""
        steps = checks.integer("steps", self.steps if steps is None else steps, type(self).__name__)
        return self.evals_per_step * steps + int(self.denoise)

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

    @property
    def evals_per_step(self) -> int:  # type: ignore[override]
        return 1 + self.corrector_steps


class HeunODE(Sampler):
    """Probability-flow ODE, fixed-step Heun (:func:`heun_ode`)."""

    name, function, check = "heun_ode", staticmethod(heun_ode), staticmethod(_check_heun_ode)
    evals_per_step = 2

    def __init__(self, steps: int = 100, denoise: bool = False, schedule: Schedule | None = None) -> None:
        self._configure(steps=steps, denoise=denoise, schedule=schedule)


class AdaptiveODE(Sampler):
    """Probability-flow ODE, adaptive Runge-Kutta (:func:`adaptive_ode`); ``steps`` is ignored."""

    name, function, check = "adaptive_ode", staticmethod(adaptive_ode), staticmethod(_check_adaptive_ode)

    def __init__(self, rtol: float = 1e-5, atol: float = 1e-5, method: ODEMethod = "dopri5",
                 denoise: bool = False) -> None:
        self._configure(rtol=rtol, atol=atol, method=method, denoise=denoise)

    def nfe(self, steps: int | None = None) -> None:
        """None: the solver chooses its own steps, so the cost is known only after the run."""
        return None


class DDIM(Sampler):
    """Deterministic DDIM, the first-order exponential integrator (:func:`ddim`)."""

    name, function, check = "ddim", staticmethod(ddim), staticmethod(_check_ddim)

    def __init__(self, steps: int = 20, denoise: bool = False, schedule: Schedule | None = None,
                 threshold: Threshold = None, percentile: float = 0.995) -> None:
        self._configure(steps=steps, denoise=denoise, schedule=schedule, threshold=threshold, percentile=percentile)


class DPMSolverPP(Sampler):
    """Multistep DPM-Solver++ (2M/3M, optional UniC-style corrector) (:func:`dpm_solver_pp`)."""

    name, function, check = "dpm_solver_pp", staticmethod(dpm_solver_pp), staticmethod(_check_dpm_solver_pp)

    def __init__(self, steps: int = 10, order: int = 2, lower_order_final: bool = True, corrector: bool = True,
                 variant: Literal["paper", "exact"] = "paper", denoise: bool = False,
                 schedule: Schedule | None = None, threshold: Threshold = None, percentile: float = 0.995) -> None:
        self._configure(steps=steps, order=order, lower_order_final=lower_order_final, corrector=corrector,
                        variant=variant, denoise=denoise, schedule=schedule, threshold=threshold,
                        percentile=percentile)


class SDEDPMSolverPP(Sampler):
    """Stochastic multistep DPM-Solver++ with churn ``eta`` (:func:`sde_dpm_solver_pp`)."""

    name = "sde_dpm_solver_pp"
    function, check = staticmethod(sde_dpm_solver_pp), staticmethod(_check_sde_dpm_solver_pp)

    def __init__(self, steps: int = 50, eta: float = 1.0, order: int = 2, denoise: bool = True,
                 schedule: Schedule | None = None, threshold: Threshold = None, percentile: float = 0.995) -> None:
        self._configure(steps=steps, eta=eta, order=order, denoise=denoise, schedule=schedule, threshold=threshold,
                        percentile=percentile)

    @property
    def deterministic(self) -> bool:  # type: ignore[override]
        return self.eta == 0.0
