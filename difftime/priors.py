"""Priors at diffusion time T: one role, one interface (:class:`Prior`).

Every prior is an ``nn.Module`` (so ``.to(device)`` moves it) with ``event_shape``,
``sample(n, generator) -> [n, *D]`` and ``log_prob(x, generator=None) -> [B]`` in nats, and
declares whether that log-density is exact (``exact``) or which lower bound it is
(``bound_name``, e.g. ``iwae16`` for a VAE; None when exact). The SDE's Gaussian prior, the
learned auxiliary priors of Franzese et al. 2023 (Sec. 3, :mod:`difftime.aux_priors`) and the
exact q_T of a toy distribution all implement it; samplers and likelihood code never need to
know which one they were given. A stochastic bound draws its noise from ``generator``, so a
seeded evaluation is reproducible; exact priors ignore it.

:func:`check_prior` is the one place that checks a prior against the score model it serves.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from difftime.randomness import Generator, randn
from difftime.utils import sum_flat


@runtime_checkable
class Prior(Protocol):
    """A distribution at diffusion time T that the reverse process can start from."""

    event_shape: tuple[int, ...]
    exact: bool  # log_prob is the exact log-density (False: a lower bound, e.g. a VAE)
    bound_name: str | None  # which bound log_prob is when not exact ("elbo", "iwae16"); None if exact

    def sample(self, n: int, generator: Generator = None) -> Tensor: ...

    def log_prob(self, x: Tensor, generator: Generator = None) -> Tensor: ...


class GaussianPrior(nn.Module):
    """Isotropic Gaussian N(mean, std^2 I) over samples of ``event_shape``."""

    exact: bool = True
    bound_name: str | None = None

    def __init__(self, event_shape: tuple[int, ...], std: float = 1.0, mean: float = 0.0) -> None:
        super().__init__()
        self.event_shape = tuple(int(d) for d in event_shape)
        self.std, self.mean = float(std), float(mean)
        # a buffer only to follow .to(device); not saved in checkpoints
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def dim(self) -> int:
        return math.prod(self.event_shape)

    def sample(self, n: int, generator: Generator = None) -> Tensor:
        z = randn((n, *self.event_shape), generator, device=self._anchor.device)
        return self.mean + self.std * z

    def log_prob(self, x: Tensor, generator: Generator = None) -> Tensor:
        x = x.float()
        quad = sum_flat(((x - self.mean) / self.std) ** 2)
        return -0.5 * quad - self.dim * (math.log(self.std) + 0.5 * math.log(2 * math.pi))

    def kl_from(self, mean: Tensor, std: Tensor) -> Tensor:
        """KL(N(mean, std^2 I) || this prior) per sample, in nats.

        ``mean: [B, *D]``, ``std: [B]``. Closed form for isotropic Gaussians:
        1/2 sum_i [ (std^2 + (mean_i - mu)^2) / sigma^2 - 1 - log(std^2 / sigma^2) ].
        """
        mean, std = mean.float(), std.float()
        ratio = (std / self.std) ** 2
        quad = sum_flat(((mean - self.mean) / self.std) ** 2)
        return 0.5 * (self.dim * (ratio - 1.0 - torch.log(ratio)) + quad)

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, std={self.std:g}, mean={self.mean:g}"


# ---------------------------------------------------------------------- compatibility
_REL_TOL = 1e-9


def describe_sde(hparams: dict[str, Any]) -> str:
    """``VPSDE(T=0.4, eps=1e-05, beta_min=0.1, beta_max=20)`` from ``SDE.hparams()``."""
    params = ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
                       for k, v in hparams.items() if k != "class")
    return f"{hparams.get('class', '?')}({params})"


def same_q_T(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same SDE class and parameters (``SDE.hparams()``); ``eps`` is ignored, q_T does not depend on it."""
    keys_a, keys_b = set(a) - {"eps"}, set(b) - {"eps"}
    if a.get("class") != b.get("class") or keys_a != keys_b:
        return False
    numeric = [k for k in keys_a if isinstance(a[k], (int, float)) and isinstance(b[k], (int, float))]
    same = all(math.isclose(float(a[k]), float(b[k]), rel_tol=_REL_TOL, abs_tol=1e-12) for k in numeric)
    return same and all(a[k] == b[k] for k in keys_a - set(numeric))


def describe_prior(prior: Prior) -> str:
    """``gaussian``, ``<class> (<checkpoint>)`` for a prior read from a checkpoint, or the class name."""
    if isinstance(prior, GaussianPrior):
        return "gaussian"
    path = getattr(prior, "path", None)  # optional attributes of fitted priors only
    return f"{type(prior.model).__name__} ({path})" if path else type(prior).__name__


def check_prior(prior: Prior, sde_hparams: dict[str, Any], data_shape: tuple[int, ...]) -> None:
    """Raise ValueError naming both values unless ``prior`` models q_T of this SDE on this data.

    Every prior must be over samples of ``data_shape``. A prior fitted to q_T records the forward
    SDE it was fitted for (``trained_for``, the ``SDE.hparams()`` of its training) and its source
    (``path``), as :class:`~difftime.aux_priors.AuxPriorCheckpoint` does; it must have been fitted
    for the same SDE class and parameters at exactly this T (``eps`` is ignored).
    """
    path = getattr(prior, "path", None)  # optional attributes of fitted priors only
    name = f"auxiliary prior {path}" if path else f"prior {type(prior).__name__}"
    trained_for = getattr(prior, "trained_for", None)
    if trained_for is not None and not same_q_T(trained_for, sde_hparams):
        raise ValueError(f"{name} was trained for {describe_sde(trained_for)} "
                         f"but the score model uses {describe_sde(sde_hparams)}")
    shape = tuple(int(d) for d in data_shape)
    if tuple(prior.event_shape) != shape:
        raise ValueError(f"{name} was trained on samples of shape {tuple(prior.event_shape)} but the score "
                         f"model's data have shape {shape}")
