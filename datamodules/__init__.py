"""Lightning datamodules yielding raw data (uint8 images, float32 toy vectors), sharded per rank."""

from datamodules.base import DiffusionDataModule, InMemoryDataset, ResumableDataLoader
from datamodules.images import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    ImageDataModule,
    MLXtendMNISTDataModule,
    MNISTDataModule,
    PackagedImageDataModule,
    SklearnDigitsDataModule,
    TorchvisionDataModule,
)
from datamodules.sharding import EvalShardSampler, ShardedSampler
from datamodules.toy import ToyDataModule

__all__ = [
    "CIFAR10DataModule",
    "DiffusionDataModule",
    "EvalShardSampler",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "InMemoryDataset",
    "MLXtendMNISTDataModule",
    "MNISTDataModule",
    "PackagedImageDataModule",
    "ResumableDataLoader",
    "ShardedSampler",
    "SklearnDigitsDataModule",
    "ToyDataModule",
    "TorchvisionDataModule",
]
