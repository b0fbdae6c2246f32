"""AuxPriorModule: fits an auxiliary density nu ~ q_T, the prior of a finite-time diffusion.

Franzese et al. 2023 ("How Much is Enough?", Sec. 3): with a short diffusion time T the
forward-diffused data q_T is far from the Gaussian prior, and the ELBO pays
E_{x_0} KL(q(x_T | x_0) || prior). They fit an auxiliary model nu to samples of q_T by maximum
likelihood and start the reverse SDE/ODE from nu, integrating only from T to eps. Training
samples x_T = m(T) x_0 + s(T) z are drawn fresh every step from the data and the SDE, with the
same counter-based noise as the score model.

:func:`load_aux_prior` turns a checkpoint of this module into a frozen prior for
:class:`~lightning_modules.score_module.ScoreModule` (``prior: <path>``) or ``sample.py``,
after checking that it was trained for the same SDE at the same T and the same data shape.
"""

from __future__ import annotations

import importlib
import inspect
import math
import time
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from difftime.checkpoints import load_verified
from difftime.aux_priors import FlowPrior, GaussianVAE
from difftime.likelihood import prior_term
from difftime.sde import SDE
from difftime.utils import ConfigError, Generator, randn, step_seed
from lightning_modules.common import DiffusionSystem

_INIT_STREAM = 2**41  # counter offset that keeps the ActNorm init noise apart from training and evaluation
_REBUILDABLE = (FlowPrior, GaussianVAE)  # checkpoints may only name these classes (weights-only spirit)
_REL_TOL = 1e-9


class AuxPriorModule(DiffusionSystem):
    """Maximum-likelihood fit of an auxiliary prior nu to q_T, the data diffused to ``sde.T``.

    Logged (bits per dimension, in model space: the data after ``scaling``, without the
    dequantization Jacobian, since x_T is a continuous variable):

    * ``train/nll_bpd``, ``val/nll_bpd``: -log nu(x_T) / (D ln 2) on fresh samples x_T ~ q_T.
      For a VAE prior log nu is replaced by its lower bound (hyperparameters ``prior_exact``
      False, ``prior_bound`` e.g. ``iwae16``), so the value is an UPPER bound on the NLL.
    * ``val/kl_prior_bpd``: the ELBO's prior term E_{x_0}[KL(q(x_T | x_0) || nu)] / (D ln 2)
      (:func:`difftime.likelihood.prior_term`), and ``val/kl_prior_gaussian_bpd``, the same for
      the SDE's Gaussian prior: their difference is the gain from the auxiliary model.
      Both exceed KL(q_T || prior) by the same mutual information I(x_0; x_T).

    Density maths (x_T, log nu, the loss) runs in fp32 outside autocast under any precision.
    A non-finite loss or gradient (normflows' Glow can diverge) skips the step on every rank
    before the optimizer sees it (:class:`DiffusionSystem`). Glow's ActNorm is initialised in
    ``on_fit_start`` on a batch that is identical on every rank, so DDP replicas start equal.
    The checkpoint's hyperparameters hold plain types only, including everything
    :func:`load_aux_prior` needs (``prior_spec``, ``sde_hparams``, ``data_shape``).

    Args:
        prior: the auxiliary model (a :mod:`difftime.aux_priors` class), over ``data_shape``.
        sde: forward SDE; the prior models its marginal at ``sde.T``.
        data_shape: shape of one sample; linked from the datamodule by the CLI.
        optimizer, lr_scheduler: callables; the scheduler is stepped every optimizer step.
        seed: seed of the counter-based training noise.
        max_consecutive_skips: stop cleanly after this many consecutive non-finite steps.
        n_eval_prior: x_T draws per datum for the Monte-Carlo prior term in evaluation.
    """

    def __init__(
        self,
        prior: nn.Module,
        sde: SDE,
        data_shape: tuple[int, ...] = (2,),
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
        max_consecutive_skips: int = 20,
        n_eval_prior: int = 1,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, seed=seed, max_consecutive_skips=max_consecutive_skips)
        data_shape = tuple(int(d) for d in data_shape)
        if tuple(prior.event_shape) != data_shape:
            raise ConfigError("prior", type(prior).__name__,
                              f"a prior over samples of the data's shape {data_shape}, not {tuple(prior.event_shape)}",
                              "AuxPriorModule")
        if n_eval_prior < 1:
            raise ConfigError("n_eval_prior", n_eval_prior, "an integer >= 1", "AuxPriorModule")
        self.save_plain_hyperparameters()
        self.save_hyperparameters(checkpoint_record(prior, sde, data_shape))
        self.prior, self.sde, self.data_shape = prior, sde, data_shape
        self.reference_prior = sde.prior(data_shape)
        self.n_eval_prior = int(n_eval_prior)
        self._stochastic = "generator" in inspect.signature(prior.log_prob).parameters
        self._data_init_done = False
        names = ("nll", "kl_prior", "kl_prior_gaussian")
        self.metrics = nn.ModuleDict({f"{s}_{n}": MeanMetric() for s in ("val", "test") for n in names})

    # ------------------------------------------------------------------ inference
    def forward(self, x: Tensor, generator: Generator = None) -> Tensor:
        """log nu(x) ``[B]`` (a lower bound for a VAE; ``generator`` feeds its draws)."""
        return self.prior.log_prob(x, generator) if self._stochastic else self.prior.log_prob(x)

    @torch.no_grad()
    def sample(self, n: int, generator: Generator = None, steps: int | None = None) -> tuple[Tensor, dict]:
        """n samples ``[n, *data_shape]`` of nu, an approximation of q_T, and an info dict.

        The signature of :meth:`ScoreModule.sample`, so the sample-grid callback shows nu;
        ``steps`` is ignored (nothing is integrated: ``info["nfe"]`` is 0).
        """
        start = time.perf_counter()
        samples = self.prior.sample(n, generator)
        return samples, {"nfe": 0, "prior": type(self.prior).__name__, "T": self.sde.T,
                         "wall_time_s": time.perf_counter() - start}

    def diffuse(self, x0: Tensor, generator: Generator) -> Tensor:
        """x_T = m(T) x_0 + s(T) z, z ~ N(0, I) from ``generator`` (fp32)."""
        t = torch.full((x0.shape[0],), self.sde.T, device=x0.device)
        return self.sde.perturb(x0.float(), t, randn(x0.shape, generator, x0.device))

    def _no_autocast(self) -> torch.autocast:
        """Density maths in fp32 whatever the Trainer's precision (the priors cast too)."""
        return torch.autocast(device_type=self.device.type, enabled=False)

    def _bpd(self, nats: Tensor) -> Tensor:
        return nats / (self.data_dim * math.log(2.0))

    # ------------------------------------------------------------------ training
    def trainable(self) -> nn.Module:
        return self.prior

    def on_fit_start(self) -> None:
        """ActNorm's data-dependent init on one batch that is identical on every rank."""
        batch = self._init_batch()
        if batch is not None:
            self._data_init(batch)

    def _init_batch(self) -> Tensor | None:
        """The first global batch (``batch_size`` samples) of the training set, unshuffled."""
        datamodule = getattr(self.trainer, "datamodule", None)
        dataset = getattr(datamodule, "train_set", None)
        if dataset is None:
            return None
        size = min(len(dataset), int(getattr(datamodule, "batch_size", 256)))
        return torch.stack([torch.as_tensor(dataset[i]) for i in range(size)]).to(self.device)

    @torch.no_grad()
    def _data_init(self, batch: Tensor) -> None:
        """One log_prob pass on x_T of ``batch`` with noise seeded only by ``seed``.

        Glow's ActNorm layers set their scale and shift from the first batch they see (Kingma &
        Dhariwal 2018, Sec. 3.1); other priors ignore this pass. Every rank passes the same
        batch with the same noise, so all ranks hold the same parameters when training starts.
        """
        generator = torch.Generator().manual_seed(step_seed(self.seed, _INIT_STREAM))
        x0, _ = self.scaling(batch, generator)
        with self._no_autocast():
            self(self.diffuse(x0, generator), generator)
        self._data_init_done = True

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        noise = self.step_noise(batch.shape[0])
        x0, _ = self.scaling(self.scaling.augment(batch, noise), noise)
        with self._no_autocast():
            x_T = self.diffuse(x0, noise)
            if not self._data_init_done:  # fit without a datamodule: init on the first global batch
                self._data_init_from_batch(x_T)
            nll = -self(x_T, noise)
        loss = self.guard_loss(nll.mean())
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/nll_bpd", self._bpd(loss))
        return loss

    def _data_init_from_batch(self, x_T: Tensor) -> None:
        """ActNorm init on this step's global batch of x_T, gathered so every rank sees it whole."""
        gathered = self.all_gather(x_T)
        generator = torch.Generator().manual_seed(step_seed(self.seed, _INIT_STREAM))
        with torch.no_grad():
            self(gathered.flatten(0, 1) if gathered.ndim > x_T.ndim else gathered, generator)
        self._data_init_done = True

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def _evaluate(self, batch: Tensor, batch_idx: int, stage: str) -> None:
        noise = self.eval_noise(stage, batch_idx, batch.shape[0])
        x0, _ = self.scaling(batch, noise)
        with self._no_autocast():
            nll = -self(self.diffuse(x0, noise), noise)
            kl, _ = prior_term(self.sde, _Seeded(self.prior, noise, self._stochastic), x0,
                               n_prior=self.n_eval_prior, generator=noise)
            kl_gaussian, _ = prior_term(self.sde, self.reference_prior, x0)
        for name, value in (("nll", nll), ("kl_prior", kl), ("kl_prior_gaussian", kl_gaussian)):
            metric = self.metrics[f"{stage}_{name}"]
            metric.update(self._bpd(value))
            self.log(f"{stage}/{name}_bpd", metric, on_step=False, on_epoch=True)


class _Seeded:
    """A stochastic-bound prior (VAE) with its evaluation noise bound, for ``prior_term``."""

    def __init__(self, prior: nn.Module, generator: Generator, stochastic: bool) -> None:
        self.prior, self.generator, self.stochastic = prior, generator, stochastic
        self.event_shape, self.exact = prior.event_shape, getattr(prior, "exact", True)

    def log_prob(self, x: Tensor) -> Tensor:
        return self.prior.log_prob(x, self.generator) if self.stochastic else self.prior.log_prob(x)

    def sample(self, n: int, generator: Generator = None) -> Tensor:
        return self.prior.sample(n, generator)


# ---------------------------------------------------------------------- checkpoint record
def prior_spec(prior: nn.Module) -> dict[str, Any] | None:
    """``{"class_path", "init_args"}`` that rebuilds ``prior``; None without recorded init args."""
    init_args = getattr(prior, "init_args", None)
    if not isinstance(init_args, dict):
        return None
    cls = type(prior)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(init_args)}


def checkpoint_record(prior: nn.Module, sde: SDE, data_shape: tuple[int, ...]) -> dict[str, Any]:
    """Plain hyperparameters that :func:`load_aux_prior` needs, whatever built the module."""
    return {
        "prior_spec": prior_spec(prior),
        "sde_hparams": dict(sde.hparams()),
        "data_shape": list(data_shape),
        "prior_exact": bool(getattr(prior, "exact", True)),
        "prior_bound": str(getattr(prior, "bound_name", "exact")),
    }


def build_prior(spec: dict[str, Any]) -> nn.Module:
    """Instantiate a prior from its spec; only :mod:`difftime.aux_priors` classes are allowed.

    A checkpoint loaded with weights_only must not be able to run arbitrary constructors, hence
    the class check. The global RNG is left untouched (layers draw their initial weights from it).
    """
    module_name, _, name = str(spec["class_path"]).rpartition(".")
    cls = getattr(importlib.import_module(module_name), name, None) if module_name else None
    if not (isinstance(cls, type) and issubclass(cls, _REBUILDABLE)):
        raise ValueError(f"prior class '{spec['class_path']}' is not an auxiliary prior of difftime.aux_priors")
    with torch.random.fork_rng(devices=[]):
        return cls(**spec.get("init_args", {}))


# ---------------------------------------------------------------------- loading
def describe_sde(hparams: dict[str, Any]) -> str:
    """``VPSDE(T=0.4, eps=1e-05, beta_min=0.1, beta_max=20)`` from ``SDE.hparams()``."""
    params = ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
                       for k, v in hparams.items() if k != "class")
    return f"{hparams.get('class', '?')}({params})"


def _same_q_T(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same SDE class and parameters; ``eps`` is ignored since q_T does not depend on it."""
    keys_a, keys_b = set(a) - {"eps"}, set(b) - {"eps"}
    if a.get("class") != b.get("class") or keys_a != keys_b:
        return False
    numeric = [k for k in keys_a if isinstance(a[k], (int, float)) and isinstance(b[k], (int, float))]
    same = all(math.isclose(float(a[k]), float(b[k]), rel_tol=_REL_TOL, abs_tol=1e-12) for k in numeric)
    return same and all(a[k] == b[k] for k in keys_a - set(numeric))


def load_aux_prior(path: str, sde: SDE, data_shape: tuple[int, ...]) -> nn.Module:
    """The frozen prior of an AuxPriorModule checkpoint, checked against the score model.

    Verified weights-only load (:func:`difftime.checkpoints.load_verified`; a damaged file
    raises :class:`~difftime.checkpoints.CorruptCheckpointError` naming it). Raises
    ValueError naming both values when the checkpoint's SDE (class, T and its beta/sigma
    parameters; eps does not change q_T) or data shape differ from ``sde`` / ``data_shape``.
    Returns the prior in eval mode with ``requires_grad`` False, on the CPU.
    """
    checkpoint = load_verified(path)
    hparams = checkpoint.get("hyper_parameters") or {}
    missing = [k for k in ("prior_spec", "sde_hparams", "data_shape") if k not in hparams]
    if missing:
        raise ValueError(f"{path} is not an AuxPriorModule checkpoint (no {', '.join(missing)} in its hyperparameters)")
    if not _same_q_T(hparams["sde_hparams"], sde.hparams()):
        raise ValueError(f"auxiliary prior {path} was trained for {describe_sde(hparams['sde_hparams'])} "
                         f"but the score model uses {describe_sde(sde.hparams())}")
    trained_shape, shape = tuple(hparams["data_shape"]), tuple(int(d) for d in data_shape)
    if trained_shape != shape:
        raise ValueError(f"auxiliary prior {path} was trained on samples of shape {trained_shape} "
                         f"but the score model's data have shape {shape}")
    spec = hparams["prior_spec"] or hparams.get("prior")
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"auxiliary prior {path} does not record how to rebuild its prior (no prior_spec)")
    prior = build_prior(spec)
    state = {k[len("prior."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("prior.")}
    prior.load_state_dict(state)
    return prior.eval().requires_grad_(False)
