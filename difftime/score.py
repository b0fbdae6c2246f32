"""Score parametrisation: networks predict the noise, the score is derived from it.

A network ``net(x_t, t) -> eps_hat`` of the shape of ``x_t`` estimates the standard normal z in
x_t = m(t) x_0 + s(t) z. Since grad log q(x_t | x_0) = -z / s(t), the score estimate is
s_theta(x_t, t) = -eps_hat / s(t) (Ho et al. 2020 Eq. 11; Song et al. 2021 App. C). The division
is done in fp32 outside the network's autocast dtype.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from difftime.sde import SDE, ScoreFn
from difftime.utils import append_dims

NoiseNet = Callable[[Tensor, Tensor], Tensor] | nn.Module


def score_from_eps(eps_hat: Tensor, sde: SDE, t: Tensor) -> Tensor:
    """s_theta = -eps_hat / s(t), in fp32. ``eps_hat: [B, *D]``, ``t: [B]``."""
    return -eps_hat.float() / append_dims(sde.marginal_std(t).float(), eps_hat.ndim)


def make_score_fn(net: NoiseNet, sde: SDE) -> ScoreFn:
    """Turn a noise-prediction network into a score function ``(x, t) -> [B, *D]``."""

    def score_fn(x: Tensor, t: Tensor) -> Tensor:
        return score_from_eps(net(x, t), sde, t)

    return score_fn
