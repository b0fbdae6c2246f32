"""Feature extractors of the sample-quality metrics: the digit classifier and random-conv features.

* :class:`DigitClassifier`: a LeNet-5-style network (LeCun et al. 1998), trained once on the
  training split of the offline digits; its penultimate activations are the feature space of
  :mod:`difftime.quality` and its test accuracy is reported with every figure computed in it.
  Offline, on 28-px digits, this replaces Inception, which is meaningless (and slow) there.
* :class:`RandomConvFeatures`: fixed random convolutions (no training, no download) for the FID
  callback on small images (Naeem et al. 2020, Sec. 5).

Pure torch: no Lightning, no data modules; callers hand in tensors.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from difftime.utils import ConfigError

# ---------------------------------------------------------------------- digit classifier


class DigitClassifier(nn.Module):
    """LeNet-5-style classifier of ``uint8 [B, 1, H, W]`` digits (LeCun et al. 1998).

    Two 5x5 conv + max-pool blocks, then ``features`` hidden units (the feature space of the
    quality metrics, :meth:`features`) and a linear read-out to ``classes`` logits.
    """

    def __init__(self, image_size: int = 28, channels: int = 1, features: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.config = {"image_size": image_size, "channels": channels, "features": features, "classes": classes}
        pad = 2 if image_size < 16 else 0
        self.body = nn.Sequential(
            nn.Conv2d(channels, 16, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        with torch.no_grad():
            flat = self.body(torch.zeros(1, channels, image_size, image_size)).shape[1]
        self.hidden = nn.Sequential(nn.Linear(flat, features), nn.ReLU())
        self.head = nn.Linear(features, classes)

    @staticmethod
    def prepare(images: Tensor) -> Tensor:
        """uint8 pixels -> float in [-1, 1]."""
        return images.float() / 127.5 - 1.0

    def features(self, images: Tensor) -> Tensor:
        """Penultimate activations ``[B, features]`` of uint8 images."""
        return self.hidden(self.body(self.prepare(images)))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


@dataclass
class TrainedClassifier:
    """A digit classifier with what every figure computed in its features must state."""

    model: DigitClassifier
    test_accuracy: float
    data_digest: str
    epochs: int
    seed: int

    @property
    def name(self) -> str:
        """The extractor's name in every table: architecture, feature width, test accuracy."""
        return (f"digit classifier LeNet ({self.model.config['features']}-d penultimate layer, "
                f"test accuracy {self.test_accuracy:.3f})")


def data_digest(*tensors: Tensor) -> str:
    """SHA-256 (first 16 hex digits) of the tensors' bytes, shapes and dtypes."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def accuracy(model: DigitClassifier, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    """Fraction of ``images`` whose arg-max class is ``labels``."""
    model.eval()
    correct = sum(int((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
                  for i in range(0, len(images), batch_size))
    return correct / len(images)


def train_classifier(train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], epochs: int = 4,
                     batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> TrainedClassifier:
    """Adam on cross-entropy, fixed seed; returns the model with its test accuracy."""
    images, labels = train
    generator = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    model = DigitClassifier(image_size=images.shape[-1], channels=images.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(images), generator=generator).split(batch_size):
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    return TrainedClassifier(model, accuracy(model, *test), data_digest(images, labels), epochs, int(seed))


def save_classifier(trained: TrainedClassifier, path: str | Path) -> None:
    """Weights, architecture, test accuracy and data digest, as plain types (weights-only loadable)."""
    record = {"state_dict": trained.model.state_dict(), "config": trained.model.config,
              "test_accuracy": trained.test_accuracy, "data_digest": trained.data_digest,
              "epochs": trained.epochs, "seed": trained.seed}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(record, tmp)
    tmp.replace(path)


def load_classifier(path: str | Path) -> TrainedClassifier:
    """A classifier saved by :func:`save_classifier`, in eval mode."""
    record = torch.load(path, map_location="cpu", weights_only=True)
    model = DigitClassifier(**record["config"])
    model.load_state_dict(record["state_dict"])
    model.eval()
    return TrainedClassifier(model, float(record["test_accuracy"]), str(record["data_digest"]),
                             int(record["epochs"]), int(record["seed"]))


@torch.no_grad()
def extract_features(model: DigitClassifier | None, data: Tensor, batch_size: int = 500) -> Tensor:
    """Features of ``data``: the classifier's penultimate layer, or the raw values (``model=None``)."""
    if model is None:
        return data.double().flatten(1)
    model.eval()
    return torch.cat([model.features(data[i:i + batch_size]) for i in range(0, len(data), batch_size)]).double()


# ---------------------------------------------------------------------- random convolutions


class RandomConvFeatures(nn.Module):
    """Fixed random convolutional features for small images: uint8 ``[B, 3, H, W]`` -> ``[B, F]``.

    Pretrained-free: He-normal convolutions drawn once from ``seed``, ReLU, stride-2
    down-sampling, spatial mean of the last layer (``F = widths[-1]``). Random embeddings keep
    FID informative on domains far from ImageNet (Naeem et al. 2020, "Reliable Fidelity and
    Diversity Metrics for Generative Models", Sec. 5), and need no download. FIDs computed with
    it are only comparable with FIDs computed with the same ``widths`` and ``seed``, never with
    Inception FIDs.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), seed: int = 0) -> None:
        super().__init__()
        if not widths or min(widths) < 1:
            raise ConfigError("widths", widths, "a non-empty tuple of positive integers", "RandomConvFeatures")
        self.widths, self.seed = tuple(int(w) for w in widths), int(seed)
        generator = torch.Generator().manual_seed(self.seed)
        layers, channels = [], 3
        for i, width in enumerate(self.widths):
            conv = nn.Conv2d(channels, width, 3, stride=1 if i == 0 else 2, padding=1)
            fan_in = channels * 9
            conv.weight.data = torch.randn(conv.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in)
            conv.bias.data = 0.1 * torch.randn(conv.bias.shape, generator=generator)
            layers += [conv, nn.ReLU()]
            channels = width
        self.layers = nn.Sequential(*layers).requires_grad_(False)
        self.num_features = self.widths[-1]

    def forward(self, images: Tensor) -> Tensor:
        x = (images.float() - 127.5) / 127.5
        return self.layers(x).flatten(2).mean(-1)

    def extra_repr(self) -> str:
        return f"widths={self.widths}, seed={self.seed}"


def weights_digest(module: nn.Module) -> str:
    """Short SHA-256 of a module's structure and every tensor of its state dict (its identity)."""
    digest = hashlib.sha256(repr(module).encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]
