"""Learned auxiliary priors nu ~ q_T (Franzese et al. 2023).

With a finite diffusion time T the forward-diffused data q_T is not the Gaussian prior the
reverse process starts from; the ELBO pays KL(q_T || prior). Franzese et al. fit an auxiliary
density model nu to samples of q_T by maximum likelihood and start the reverse process from
nu instead. Every model here implements the :class:`~difftime.priors.Prior` interface
(``event_shape``, ``sample(n, generator)``, ``log_prob(x, generator=None) -> [B]`` in nats,
``exact`` and ``bound_name``) plus ``loss(x) -> [B]`` for maximum-likelihood training.
:class:`AuxPriorCheckpoint` loads a trained one from its checkpoint.
"""

from __future__ import annotations

from torch import nn

from difftime.aux_priors.checkpoint import AuxPriorCheckpoint, load_aux_prior
from difftime.aux_priors.flows import FlowPrior, GlowPrior, NeuralSplinePrior, RealNVPPrior, glow_level_shapes
from difftime.aux_priors.vae import GaussianVAE, MLPVAEPrior, VAEPrior

__all__ = ["AuxPriorCheckpoint", "FlowPrior", "GlowPrior", "RealNVPPrior", "NeuralSplinePrior", "GaussianVAE",
           "VAEPrior", "MLPVAEPrior", "glow_level_shapes", "load_aux_prior", "prior_info"]


def prior_info(prior: nn.Module) -> dict[str, bool | str | int | None]:
    """``exact``, ``bound_name`` and ``num_params`` of a prior."""
    return {"exact": bool(prior.exact), "bound_name": prior.bound_name,
            "num_params": sum(p.numel() for p in prior.parameters())}
