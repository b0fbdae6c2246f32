"""Learned auxiliary priors nu ~ q_T (Franzese et al. 2023).

With a finite diffusion time T the forward-diffused data q_T is not the Gaussian prior the
reverse process starts from; the ELBO pays KL(q_T || prior). Franzese et al. fit an auxiliary
density model nu to samples of q_T by maximum likelihood and start the reverse process from
nu instead. Every model here implements the prior interface of :mod:`difftime.priors`
(``event_shape``, ``sample(n, generator)``, ``log_prob(x) -> [B]`` in nats) plus
``loss(x) -> [B]`` for maximum-likelihood training, ``exact`` (True when ``log_prob`` is the
exact log-density, False when it is a lower bound) and ``bound_name``.
"""

from __future__ import annotations

from torch import nn

from difftime.aux_priors.flows import FlowPrior, GlowPrior, NeuralSplinePrior, RealNVPPrior, glow_level_shapes
from difftime.aux_priors.vae import GaussianVAE, MLPVAEPrior, VAEPrior

__all__ = ["FlowPrior", "GlowPrior", "RealNVPPrior", "NeuralSplinePrior", "GaussianVAE", "VAEPrior",
           "MLPVAEPrior", "glow_level_shapes", "prior_info"]


def prior_info(prior: nn.Module) -> dict[str, bool | str | int]:
    """``exact``, ``bound_name`` and ``num_params`` of any prior (a Gaussian prior counts as exact)."""
    return {
        "exact": bool(getattr(prior, "exact", True)),
        "bound_name": str(getattr(prior, "bound_name", "exact")),
        "num_params": sum(p.numel() for p in prior.parameters()),
    }
