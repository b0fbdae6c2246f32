"""What the callbacks need from a LightningModule, and when they run.

The callbacks work with any module that offers these attributes (``ScoreModule`` does; an
``AuxPriorModule`` is a :class:`SampleSource`), typed as Protocols rather than read with
``getattr``, so the contract is read here, not learned by grepping.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

from difftime.data import DataScaling
from difftime.priors import Prior
from difftime.samplers import Sampler
from difftime.sde import SDE, ScoreFn
from difftime.utils import Generator


@runtime_checkable
class SampleSource(Protocol):
    """A module that draws samples: what the sample grid and the prediction writer need."""

    data_shape: tuple[int, ...]
    scaling: DataScaling
    device: torch.device

    def sample(self, n: int, generator: Generator = None, *args: Any, **kwargs: Any) -> tuple[Tensor, dict]: ...


@runtime_checkable
class ScoreSystem(SampleSource, Protocol):
    """A score model: what the likelihood, KL-gap and FID callbacks need."""

    sde: SDE  # the training SDE, on [eps, T]
    eval_sde: SDE  # the SDE evaluation runs: the same one stopped at T' <= T (post-hoc truncation)
    prior: Prior  # the distribution at T' the reverse process starts from
    sampler: Sampler

    def score_fn(self, use_ema: bool = True) -> ScoreFn: ...


def is_due(count: int, every: int | None, last: int | None = None) -> bool:
    """The one interval rule of the callbacks: ``count`` > 0, a multiple of ``every``, not ``last``.

    ``count`` is what the callback counts (optimizer steps, epochs, validation loops); ``every``
    None or 0 means never; ``last`` is the count it last ran at, so a step is never handled twice
    (e.g. by a batch-end hook and the train-end hook of the same step).
    """
    return bool(every) and count > 0 and count % every == 0 and count != last


Progress = Callable[[int, int], None]
