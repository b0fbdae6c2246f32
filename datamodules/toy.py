"""Fixed samples from an analytic Gaussian mixture, the oracle data of the toy experiments."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.utils.data import Dataset

from datamodules.base import DiffusionDataModule, InMemoryDataset
from difftime.data import ContinuousScaling
from difftime.toy import GaussianMixture, Ring
from difftime.utils import ConfigError, Stream, step_seed

# Counter tag of the dataset draws, kept apart from the epoch counters of the sampler.
SPLITS = {"train": 0, "val": 1, "test": 2}


class ToyDataModule(DiffusionDataModule):
    """Train/val/test sets drawn once from ``distribution`` (float32 vectors ``[D]``).

    Each split is drawn with its own generator, seeded ``step_seed(seed, Stream.TOY_DATA, split)``,
    so the sets are fixed by ``seed`` and unrelated to one another. ``distribution`` stays
    available for the exact (oracle) score and marginals; in a config it is injected with
    ``class_path: difftime.toy.Ring`` and ``init_args``.
    """

    name = "toy"

    def __init__(self, distribution: GaussianMixture = Ring(), n_train: int = 20000,
                 n_val: int = 2000, n_test: int = 2000, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for key, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if value < 1:
                raise ConfigError(key, value, "an integer >= 1", type(self).__name__)
        # A private copy: the default instance in the signature is shared by every call.
        self.distribution = copy.deepcopy(distribution)
        self.sizes = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
        self.scaling = ContinuousScaling()
        self.name = f"toy_{type(self.distribution).__name__.lower()}"

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.distribution.event_shape)

    def draw(self, split: str) -> InMemoryDataset:
        """The fixed samples of ``split`` ("train", "val" or "test")."""
        generator = torch.Generator().manual_seed(step_seed(self.seed, Stream.TOY_DATA, SPLITS[split]))
        with torch.no_grad():
            data = self.distribution.sample(self.sizes[split], generator)
        return InMemoryDataset(data.cpu().float().contiguous())

    def build_fit(self) -> tuple[Dataset, Dataset]:
        return self.draw("train"), self.draw("val")

    def build_test(self) -> Dataset:
        return self.draw("test")
