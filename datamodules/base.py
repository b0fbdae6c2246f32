"""Base datamodule: raw data, sharded by the datamodule itself, resumable mid-epoch.

Datasets yield raw samples (``uint8 [C, H, W]`` images, ``float32 [D]`` toy vectors) and no
labels. Scaling, dequantization and augmentation happen on the device in the LightningModule
through :attr:`DiffusionDataModule.scaling`, with the module's counter-based noise, so the
data pipeline holds no randomness except the seeded epoch permutation.

The Trainer runs with ``use_distributed_sampler=False``; sharding is done here by
:class:`~datamodules.sharding.ShardedSampler` so that one- and multi-process runs see the same
global batches. The training loader implements ``state_dict``/``load_state_dict``: Lightning
stores it in every checkpoint and restores it before the first batch, so a run resumed from a
mid-epoch checkpoint continues with exactly the next batch of the same epoch.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from datamodules.sharding import EvalShardSampler, ShardedSampler, check_world
from difftime.data import DataScaling
from difftime.utils import ConfigError


class InMemoryDataset(Dataset):
    """Rows of one tensor held in memory, ``data: [N, *D]``; ``labels`` are kept, never yielded."""

    def __init__(self, data: Tensor, labels: Tensor | None = None) -> None:
        self.data, self.labels = data, labels

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.data[index]

    def subset(self, indices: Tensor) -> "InMemoryDataset":
        """The rows ``indices`` as a new, contiguous dataset."""
        labels = self.labels[indices] if self.labels is not None else None
        return InMemoryDataset(self.data[indices].contiguous(), labels)

    def __getitems__(self, indices: list[int]) -> list[Tensor]:
        # One gather per batch instead of one indexing call per sample.
        return list(self.data[torch.as_tensor(indices)].unbind(0))


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ShardedSampler` whose position survives checkpoints.

    ``state_dict`` holds the epoch and the number of batches of that epoch already handed to
    the training loop. Lightning's loaders do not prefetch from a sized loader, so that count is
    the number of batches the loop has consumed.
    """

    sampler: ShardedSampler
    _position: int = 0

    def __iter__(self) -> Iterator[Any]:
        # A generator: the sampler is read at the first batch, after Lightning's set_epoch.
        self._position = self.sampler.pending_skip
        for batch in super().__iter__():
            self._position += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self._position}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        if batches >= self.sampler.num_batches:  # saved at the end of an epoch
            epoch, batches = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.skip(batches)
        self._position = batches


class DataNotFoundError(FileNotFoundError):
    """The files a datamodule reads are not where its config points.

    The message is one line naming the folder, the files expected there and the fix; the entry
    point prints it as it is (no traceback) and exits with status 2.
    """


class DiffusionDataModule(LightningDataModule):
    """Common loaders of every datamodule; subclasses build the datasets.

    ``batch_size`` and ``eval_batch_size`` are GLOBAL (summed over ranks) and must be multiples
    of the world size. Subclasses set :attr:`scaling` and :attr:`name`, implement
    :attr:`data_shape` and :meth:`build_fit` / :meth:`build_test`.
    """

    name: str = "data"
    scaling: DataScaling

    def __init__(self, batch_size: int = 128, eval_batch_size: int | None = None, num_workers: int = 0,
                 seed: int = 0, pin_memory: bool = False, num_predict: int = 64) -> None:
        super().__init__()
        owner = type(self).__name__
        if batch_size < 1:
            raise ConfigError("batch_size", batch_size, "an integer >= 1", owner)
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ConfigError("eval_batch_size", eval_batch_size, "an integer >= 1 or null", owner)
        if num_workers < 0:
            raise ConfigError("num_workers", num_workers, "an integer >= 0", owner)
        if num_predict < 1:
            raise ConfigError("num_predict", num_predict, "an integer >= 1", owner)
        self.num_predict = int(num_predict)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size is not None else self.batch_size
        self.num_workers, self.seed, self.pin_memory = int(num_workers), int(seed), bool(pin_memory)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.train_sampler: ShardedSampler | None = None
        self.eval_samplers: dict[str, EvalShardSampler] = {}

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(1, 28, 28)`` or ``(2,)``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ datasets
    def build_fit(self) -> tuple[Dataset, Dataset]:
        """Training and validation datasets."""
        raise NotImplementedError

    def build_test(self) -> Dataset:
        """Test dataset."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        self.world()  # a batch that does not divide fails here, before any step
        if stage in (None, "fit", "validate") and self.train_set is None:
            self.train_set, self.val_set = self.build_fit()
        if stage in (None, "test") and self.test_set is None:
            self.test_set = self.build_test()

    def check_data(self) -> None:
        """Called by the entry point before any work: raise :class:`DataNotFoundError` when the
        data cannot be there (files missing and no download asked for). Packaged sets: nothing to do."""

    # ------------------------------------------------------------------ sharding
    def world(self) -> tuple[int, int]:
        """(world size, global rank) from the attached Trainer, else (1, 0); checks divisibility."""
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        self.check_world_size(world_size, rank)
        return world_size, rank

    def check_world_size(self, world_size: int, rank: int = 0) -> None:
        """Both global batches must divide by the number of processes.

        train.py calls this with ``devices x num_nodes`` before any process group starts, so a
        bad batch fails once, with its key, instead of in every rank after DDP is up.
        """
        owner = type(self).__name__
        for key, value in (("batch_size", self.batch_size), ("eval_batch_size", self.eval_batch_size)):
            try:
                check_world(value, world_size, rank, owner)
            except ConfigError as error:
                allowed = error.allowed if world_size == 1 else f"{error.allowed} (trainer.devices x trainer.num_nodes)"
                raise ConfigError(key, error.value, allowed, owner) from None

    def _loader(self, cls: type[DataLoader], dataset: Dataset, sampler: Any, batch_size: int,
                persistent: bool) -> DataLoader:
        return cls(dataset, batch_size=batch_size, sampler=sampler, drop_last=False,
                   num_workers=self.num_workers, pin_memory=self.pin_memory,
                   persistent_workers=persistent and self.num_workers > 0)

    def train_dataloader(self) -> ResumableDataLoader:
        world_size, rank = self.world()
        if self.train_set is None:
            self.setup("fit")
        size = len(self.train_set)
        if size < self.batch_size:
            raise ConfigError("batch_size", self.batch_size, f"at most the training set size {size}",
                              type(self).__name__)
        self.train_sampler = ShardedSampler(size, self.batch_size, world_size, rank, shuffle=True, seed=self.seed)
        return self._loader(ResumableDataLoader, self.train_set, self.train_sampler,
                            self.train_sampler.local_batch_size, persistent=True)

    def _eval_loader(self, stage: str, dataset: Dataset) -> DataLoader:
        world_size, rank = self.world()
        sampler = EvalShardSampler(len(dataset), world_size, rank)
        self.eval_samplers[stage] = sampler
        return self._loader(DataLoader, dataset, sampler, self.eval_batch_size // world_size, persistent=False)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("fit")
        return self._eval_loader("val", self.val_set)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            self.setup("test")
        return self._eval_loader("test", self.test_set)

    def predict_dataloader(self) -> DataLoader:
        """Sample indices ``0 .. num_predict - 1`` for ``train.py predict``, sharded without duplicates.

        The module generates sample i from seed ``seed + i``, so the samples do not depend on the
        batch size or on the number of ranks.
        """
        world_size, rank = self.world()
        sampler = EvalShardSampler(self.num_predict, world_size, rank)
        indices = InMemoryDataset(torch.arange(self.num_predict))
        return self._loader(DataLoader, indices, sampler, self.eval_batch_size // world_size, persistent=False)

    def sample_ids(self, stage: str, batch_idx: int) -> Tensor:
        """Dataset indices ``[B]`` of this rank's ``batch_idx``-th ``stage`` ("val"/"test") batch.

        Evaluation can seed per-sample noise with them (``PerSampleNoise``), making metrics
        independent of batch size and world size.
        """
        sampler = self.eval_samplers[stage]
        return sampler.batch_indices(batch_idx, self.eval_batch_size // sampler.num_replicas)
