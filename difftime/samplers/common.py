"""Pieces every sampler shares: argument checks, the fp32 state, time grids, score calls,
callbacks, Tweedie's final denoising step and data-prediction thresholding."""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from torch import Tensor

from difftime import checks
from difftime.schedules import Schedule, UniformT
from difftime.sde import SDE, ScoreFn
from difftime.utils import ConfigError, append_dims

Callback = Callable[[dict[str, Any]], None]
Info = dict[str, Any]
Threshold = Literal["clip", "dynamic"] | None
THRESHOLDS: tuple[str | None, ...] = (None, "clip", "dynamic")
#: the data range of the model space: :class:`difftime.data.ImageScaling` maps pixels to [-1, 1]
DATA_RANGE = 1.0


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


def _check_threshold(owner: str, threshold: Threshold, percentile: float) -> dict[str, Any]:
    """``threshold`` one of None, "clip", "dynamic"; ``percentile`` in (0, 1] (used by "dynamic")."""
    return {"threshold": checks.choice("threshold", threshold, THRESHOLDS, owner),
            "percentile": checks.real("percentile", percentile, owner, high=1.0, high_open=False)}


def threshold_data(x0: Tensor, threshold: Threshold, percentile: float = 0.995) -> Tensor:
    """Data-prediction thresholding of ``x0: [B, *D]`` for pixel-space models.

    * ``"clip"``: clamp to the data range [-1, 1], as DDPM's and DDIM's samplers clip x_0.
    * ``"dynamic"``: dynamic thresholding (Saharia et al. 2022, "Imagen", Sec. 2.3; recommended
      for pixel space by Lu et al. 2022b, DPM-Solver++, Sec. 5): per sample,
      s = max(1, quantile_p(|x0|)) and x0 <- clamp(x0, -s, s) / s.
    * None: unchanged.

    Both leave a prediction inside [-1, 1] bit for bit unchanged (s = 1 then, and x / 1 = x).
    """
    if threshold is None:
        return x0
    if threshold == "clip":
        return x0.clamp(-DATA_RANGE, DATA_RANGE)
    s = torch.quantile(x0.flatten(1).abs(), percentile, dim=1).clamp_min(DATA_RANGE)
    s = append_dims(s, x0.ndim)
    return x0.clamp(-s, s) / s


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


def _finish(score_fn: ScoreFn, sde: SDE, x: Tensor, denoise: bool, nfe: int, threshold: Threshold = None,
            percentile: float = 0.995) -> tuple[Tensor, int]:
    """The optional final Tweedie step (a data prediction at eps, thresholded like the others)."""
    if denoise:
        return threshold_data(tweedie_denoise(score_fn, sde, x), threshold, percentile), nfe + 1
    return x, nfe


def _info(name: str, nfe: int, steps: int | None, sde: SDE, **extra: Any) -> Info:
    return {"sampler": name, "nfe": nfe, "steps": steps, "t_end": sde.eps, **extra}
