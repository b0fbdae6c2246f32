"""NFE budgets to sampler steps, exactly and cheaply.

Every fixed-step sampler of :mod:`difftime.samplers` evaluates the network an affine number of
times in its steps: NFE = a steps + b (a = 1 for the first-order and multistep solvers, 2 for
Heun, 1 + corrector_steps for predictor-corrector; b = 1 when the final Tweedie denoising step
is on). The two coefficients are read off the sampler itself, on a 1-element state with a zero
score (no network), at 1 and 2 steps, and checked at 3; the steps of a budget B are then
floor((B - b) / a). Three tiny sampler calls per sampler, whatever B (a bisection that ran the
sampler at every probe cost about B log B: 458 s for B = 10,000).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from commands.study.config import build_object
from commands.study.spec import SpecError


@lru_cache(maxsize=None)
def _nfe_line(name: str, sde_json: str, options_json: str = "{}") -> tuple[int, int]:
    """(a, b) with NFE(steps) = a steps + b for the sampler ``name`` with its options (JSON)."""
    import torch

    from difftime.samplers import SAMPLERS

    sampler = SAMPLERS[name](**json.loads(options_json))
    if callable(getattr(sampler, "nfe", None)):  # a sampler that states its own count
        counts = [int(sampler.nfe(steps)) for steps in (1, 2, 3)]
    else:
        sde = build_object(json.loads(sde_json))
        zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
        counts = [int(sampler(zero, sde, torch.zeros(1, 1), steps=steps)[1]["nfe"]) for steps in (1, 2, 3)]
    a, b = counts[1] - counts[0], 2 * counts[0] - counts[1]
    if a < 1 or counts[2] != 3 * a + b:
        raise RuntimeError(f"sampler {name}: NFE at 1, 2, 3 steps = {counts} is not a + b steps with a >= 1")
    return a, b


def steps_for_nfe(name: str, budget: int, sde_config: dict[str, Any], key: str,
                  options: dict[str, Any] | None = None) -> tuple[int, int]:
    """The most sampler steps whose NFE per sample is <= ``budget``, and that NFE, for the sampler
    ``name`` constructed with ``options`` (e.g. ``denoise: true`` adds one evaluation).

    A budget below the sampler's one-step NFE is a SpecError naming ``key``.
    """
    a, b = _nfe_line(name, json.dumps(sde_config, sort_keys=True, default=str),
                     json.dumps(options or {}, sort_keys=True))
    if a + b > budget:
        raise SpecError(key, f"= {budget} is invalid: {name} needs at least {a + b} NFE per sample")
    steps = (budget - b) // a
    return steps, a * steps + b
