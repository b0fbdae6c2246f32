"""Sample-quality metrics in a feature space made for the data, with bootstrap intervals.

* Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, Eq. 6):
  ``FD = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))``, moments and roots in float64.
* Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall
  Metric for Assessing Generative Models", Eq. 1-2): the manifold of a set is the union of balls
  around its points whose radius is the distance to the k-th nearest neighbour in the same set;
  precision is the fraction of generated points inside the real manifold, recall the fraction
  of real points inside the generated manifold.
* Percentile bootstrap confidence intervals (Efron and Tibshirani 1993, Ch. 13) with a fixed seed
  and a stated number of resamples.
* A small digit classifier (a LeNet-5-style network, LeCun et al. 1998), trained once on the
  training split of the offline digits; its penultimate activations are the feature space and its
  test accuracy is reported with every figure computed in it. Offline, on 28-px digits, this
  replaces Inception, which is meaningless (and slow) there.

Pure torch: no Lightning, no data modules; callers hand in tensors.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

# ---------------------------------------------------------------------- Fréchet distance


def feature_moments(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``[F]`` and unbiased covariance ``[F, F]`` of ``features: [N, F]``, float64."""
    x = features.double().flatten(1)
    mean = x.mean(0)
    centred = x - mean
    return mean, centred.T @ centred / (x.shape[0] - 1)


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> Tensor:
    """Fréchet distance of N(mu1, cov1) and N(mu2, cov2) (Heusel et al. 2017, Eq. 6), float64.

    ``Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2)``; the inner matrix is symmetric PSD,
    so both square roots come from ``eigh`` (no complex eigenvalues of the non-symmetric product;
    round-off negatives clipped to 0). The FID callback uses this function too.
    """
    mu1, cov1, mu2, cov2 = (x.double() for x in (mu1, cov1, mu2, cov2))
    values, vectors = torch.linalg.eigh((cov1 + cov1.T) / 2)
    root1 = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
    inner = root1 @ cov2 @ root1
    trace_root = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    return (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2.0 * trace_root


def frechet_distance_features(real: Tensor, fake: Tensor) -> Tensor:
    """Fréchet distance between Gaussians fitted to ``real: [N, F]`` and ``fake: [M, F]``."""
    return frechet_distance(*feature_moments(real), *feature_moments(fake))


# ---------------------------------------------------------------------- precision / recall


def knn_radii(features: Tensor, k: int = 3) -> Tensor:
    """Distance of every row of ``features: [N, F]`` to its k-th nearest other row, ``[N]``."""
    if not 1 <= k < features.shape[0]:
        raise ValueError(f"k = {k} needs 1 <= k < N = {features.shape[0]}")
    x = features.double().flatten(1)
    distances = torch.cdist(x, x)
    return distances.kthvalue(k + 1, dim=1).values  # the 1st "neighbour" is the point itself


def in_manifold(reference: Tensor, radii: Tensor, queries: Tensor) -> Tensor:
    """Boolean ``[M]``: query j lies in some ball B(reference_i, radii_i) (Kynkäänniemi Eq. 1)."""
    distances = torch.cdist(queries.double().flatten(1), reference.double().flatten(1))
    return (distances <= radii[None, :]).any(1)


def precision_recall_indicators(real: Tensor, fake: Tensor, k: int = 3) -> tuple[Tensor, Tensor]:
    """Per-sample indicators whose means are precision (over ``fake``) and recall (over ``real``)."""
    precision = in_manifold(real, knn_radii(real, k), fake)
    recall = in_manifold(fake, knn_radii(fake, k), real)
    return precision.double(), recall.double()


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Eq. 2) with k-NN radii."""
    precision, recall = precision_recall_indicators(real, fake, k)
    return float(precision.mean()), float(recall.mean())


# ---------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile bootstrap interval."""

    estimate: float
    low: float
    high: float
    level: float
    resamples: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def bootstrap(statistic: Callable[..., Tensor | float], samples: Sequence[Tensor], resamples: int = 200,
              level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of ``statistic(*samples)`` (Efron and Tibshirani 1993, Sec. 13.3).

    Each tensor of ``samples`` (rows are observations) is resampled with replacement on its own,
    ``resamples`` times, from a CPU generator seeded ``seed``; the interval is the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled statistics.
    """
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap needs resamples >= 1 and 0 < level < 1, got {resamples}, {level}")
    generator = torch.Generator().manual_seed(int(seed))
    values = []
    for _ in range(resamples):
        drawn = [s[torch.randint(0, s.shape[0], (s.shape[0],), generator=generator)] for s in samples]
        values.append(float(statistic(*drawn)))
    quantiles = torch.tensor(values, dtype=torch.float64).quantile(
        torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return Interval(float(statistic(*samples)), float(quantiles[0]), float(quantiles[1]), float(level), int(resamples))


def mean_interval(values: Tensor, resamples: int = 200, level: float = 0.95, seed: int = 0) -> Interval:
    """Bootstrap interval of the mean of ``values: [N]``."""
    return bootstrap(lambda v: v.double().mean(), [values], resamples, level, seed)


def fd_interval(real: Tensor, fake: Tensor, resamples: int = 200, level: float = 0.95, seed: int = 0) -> Interval:
    """Fréchet distance with a bootstrap interval over both feature sets."""
    return bootstrap(frechet_distance_features, [real, fake], resamples, level, seed)


def precision_recall_intervals(real: Tensor, fake: Tensor, k: int = 3, resamples: int = 200, level: float = 0.95,
                               seed: int = 0) -> tuple[Interval, Interval]:
    """Precision and recall with bootstrap intervals of their per-sample indicators.

    The k-NN manifolds are built once on the full sets (a resample with duplicates would shrink
    the radii), so the intervals are conditional on the two manifolds.
    """
    precision, recall = precision_recall_indicators(real, fake, k)
    return (mean_interval(precision, resamples, level, seed), mean_interval(recall, resamples, level, seed + 1))


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


def data_digest(*tensors: Tensor) -> str:
    """SHA-256 (first 16 hex digits) of the tensors' bytes, shapes and dtypes."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def accuracy(model: DigitClassifier, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
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

