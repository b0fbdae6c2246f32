"""Auxiliary priors saved in checkpoints: the record that rebuilds them and the verified loader.

An ``AuxPriorModule`` checkpoint stores, as plain hyperparameters, everything needed to rebuild
its prior without unpickling code: the prior's class path and recorded constructor arguments
(:class:`~difftime.utils.RecordsInitArgs`), the forward SDE it was fitted for (``SDE.hparams()``)
and the data shape. :class:`AuxPriorCheckpoint` reads such a checkpoint (CRC-verified,
``weights_only``; :mod:`difftime.checkpoints`) into a frozen prior; it is how a score model is
given an auxiliary prior in a config::

    prior:
      class_path: difftime.aux_priors.AuxPriorCheckpoint
      init_args: {path: runs/aux_digits_glow/T0.4/checkpoints/last.ckpt}

Only classes of :mod:`difftime.aux_priors` can be rebuilt, and the class path is checked as a
string before any module is imported, so a checkpoint cannot make the loader import code.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difftime.checkpoints import load_verified
from difftime.priors import Prior, describe_sde
from difftime.sde import SDE
from difftime.utils import Generator

ALLOWED_MODULES = ("difftime.aux_priors.flows", "difftime.aux_priors.vae")
_RECORD_KEYS = ("prior_spec", "sde_hparams", "data_shape")


def prior_spec(prior: nn.Module) -> dict[str, Any] | None:
    """``{"class_path", "init_args"}`` that rebuilds ``prior``; None when its arguments are not plain."""
    init_args = getattr(prior, "init_args", None)  # recorded by RecordsInitArgs; plain priors have none
    if not isinstance(init_args, dict):
        return None
    cls = type(prior)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(init_args)}


def checkpoint_record(prior: Prior, sde: SDE, data_shape: tuple[int, ...]) -> dict[str, Any]:
    """Plain hyperparameters that :func:`load_aux_prior` needs, whatever built the module."""
    return {"prior_spec": prior_spec(prior), "sde_hparams": dict(sde.hparams()), "data_shape": list(data_shape),
            "prior_exact": bool(prior.exact), "prior_bound": prior.bound_name}


def build_prior(spec: dict[str, Any]) -> nn.Module:
    """Instantiate a prior from its spec; only classes of :data:`ALLOWED_MODULES` are allowed.

    The module name is checked against the allowlist before it is imported. The global RNG is
    left untouched (layers draw their initial weights from it; the checkpoint's weights follow).
    """
    from difftime.aux_priors import FlowPrior, GaussianVAE

    module_name, _, name = str(spec.get("class_path", "")).rpartition(".")
    if module_name not in ALLOWED_MODULES:
        raise ValueError(f"prior class '{spec.get('class_path')}' is not an auxiliary prior of difftime.aux_priors "
                         f"(allowed modules: {', '.join(ALLOWED_MODULES)})")
    cls = getattr(importlib.import_module(module_name), name, None)
    if not (isinstance(cls, type) and issubclass(cls, (FlowPrior, GaussianVAE))):
        raise ValueError(f"prior class '{spec['class_path']}' is not an auxiliary prior of difftime.aux_priors")
    with torch.random.fork_rng(devices=[]):
        return cls(**spec.get("init_args", {}))


def load_aux_prior(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """(frozen prior on the CPU, its record) from an AuxPriorModule checkpoint.

    Verified weights-only load: a damaged file raises
    :class:`~difftime.checkpoints.CorruptCheckpointError` naming it; a checkpoint of another
    module raises ValueError naming the missing record.
    """
    checkpoint = load_verified(path)
    hparams = checkpoint.get("hyper_parameters") or {}
    missing = [k for k in _RECORD_KEYS if k not in hparams]
    if missing:
        raise ValueError(f"{path} is not an AuxPriorModule checkpoint (no {', '.join(missing)} in its hyperparameters)")
    spec = hparams["prior_spec"]
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"auxiliary prior {path} does not record how to rebuild its prior (no prior_spec)")
    prior = build_prior(spec)
    state = {k[len("prior."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("prior.")}
    prior.load_state_dict(state)
    return prior.eval().requires_grad_(False), hparams


class AuxPriorCheckpoint(nn.Module):
    """A frozen auxiliary prior nu ~ q_T read from an AuxPriorModule checkpoint (Franzese et al. 2023, Sec. 3).

    The prior interface of :mod:`difftime.priors`, delegated to the rebuilt model, plus
    ``trained_for`` (the SDE it was fitted for), which :func:`difftime.priors.check_prior` compares
    with the score model's SDE. Its weights belong to ``path``, not to the score model: a score
    checkpoint does not store them, so the prior named in the config is the prior that is used.

    Args:
        path: the AuxPriorModule checkpoint (``runs/<name>/<version>/checkpoints/last.ckpt``).
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = str(path)
        self.model, record = load_aux_prior(self.path)
        self.trained_for: dict[str, Any] = dict(record["sde_hparams"])
        self.event_shape = tuple(int(d) for d in record["data_shape"])
        self.exact, self.bound_name = bool(self.model.exact), self.model.bound_name
        self.requires_grad_(False).train(False)

    def train(self, mode: bool = True) -> "AuxPriorCheckpoint":
        """Always in eval mode: the prior is frozen, whatever mode its owner is put in."""
        return super().train(False)

    def sample(self, n: int, generator: Generator = None) -> Tensor:
        return self.model.sample(n, generator)

    def log_prob(self, x: Tensor, generator: Generator = None) -> Tensor:
        return self.model.log_prob(x, generator)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, trained_for={describe_sde(self.trained_for)}"
