"""difftime.quality against closed forms: Fréchet distance of Gaussians, precision/recall of
identical and disjoint sets, bootstrap coverage of a known mean, the digit classifier's cache."""

from __future__ import annotations

import math

import torch

from difftime import quality


def test_frechet_distance_of_gaussians_closed_form():
    # Diagonal covariances commute: FD = |mu1 - mu2|^2 + sum (s1 - s2)^2 with s the stds.
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.5])
    s1, s2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 1.0, 0.5])
    expected = (mu1 - mu2).square().sum() + (s1 - s2).square().sum()
    fd = quality.frechet_distance(mu1, torch.diag(s1**2), mu2, torch.diag(s2**2))
    assert torch.allclose(fd, expected.double(), atol=1e-10)
    # Non-commuting case: a rotated covariance; FD(N(0, A), N(0, A)) = 0 and FD is symmetric.
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)) @ q.T
    b = torch.diag(torch.tensor([2.0, 1.0, 1.0, 0.5], dtype=torch.float64))
    zero = torch.zeros(4, dtype=torch.float64)
    assert abs(float(quality.frechet_distance(zero, a, zero, a))) < 1e-9
    assert abs(float(quality.frechet_distance(zero, a, zero, b) - quality.frechet_distance(zero, b, zero, a))) < 1e-9


def test_frechet_distance_of_samples_converges():
    generator = torch.Generator().manual_seed(1)
    real = torch.randn(20000, 2, generator=generator, dtype=torch.float64)
    fake = torch.randn(20000, 2, generator=generator, dtype=torch.float64) * 2.0 + torch.tensor([1.0, 0.0], dtype=torch.float64)
    # closed form: |mu|^2 + sum (1 - 2)^2 = 1 + 2 = 3
    assert abs(float(quality.frechet_distance_features(real, fake)) - 3.0) < 0.1


def test_precision_recall_identical_and_disjoint_sets():
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(2))
    assert quality.precision_recall(x, x.clone(), k=3) == (1.0, 1.0)
    far = x + 100.0
    assert quality.precision_recall(x, far, k=3) == (0.0, 0.0)
    # half the fakes on the real manifold, half far away: precision 1/2, recall 1
    mixed = torch.cat([x[:150], far[150:]])
    precision, recall = quality.precision_recall(x, mixed, k=3)
    assert precision == 0.5 and recall > 0.9


def test_knn_radius_is_kth_other_point():
    points = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert quality.knn_radii(points, k=1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert quality.knn_radii(points, k=2).tolist() == [3.0, 2.0, 3.0, 6.0]


def test_bootstrap_interval_covers_known_mean():
    # 95 % percentile intervals of the mean of N(0.3, 1) samples cover 0.3 about 95 % of the time.
    generator = torch.Generator().manual_seed(3)
    trials, covered = 120, 0
    for trial in range(trials):
        values = torch.randn(100, generator=generator, dtype=torch.float64) + 0.3
        interval = quality.mean_interval(values, resamples=200, level=0.95, seed=trial)
        assert interval.low <= interval.estimate <= interval.high
        covered += interval.low <= 0.3 <= interval.high
    # binomial(120, 0.95): mean 114, sd 2.4; percentile intervals under-cover slightly at n = 100
    assert 104 <= covered <= 120, covered
    # same seed, same interval
    values = torch.arange(10.0)
    assert quality.mean_interval(values, seed=5) == quality.mean_interval(values, seed=5)


def test_fd_interval_reports_its_settings():
    generator = torch.Generator().manual_seed(4)
    real, fake = torch.randn(200, 3, generator=generator), torch.randn(200, 3, generator=generator) + 1.0
    interval = quality.fd_interval(real, fake, resamples=50, level=0.9, seed=0)
    assert interval.resamples == 50 and interval.level == 0.9
    assert interval.low < 3.0 < interval.high * 1.5 and interval.low <= interval.high
    assert math.isclose(interval.estimate, float(quality.frechet_distance_features(real, fake)))


def test_classifier_trains_caches_and_reloads(tmp_path):
    # Two separable synthetic "digit" classes: bright left half vs bright right half.
    generator = torch.Generator().manual_seed(5)
    n = 200
    labels = torch.arange(n) % 2
    images = torch.randint(0, 60, (n, 1, 28, 28), generator=generator, dtype=torch.uint8)
    images[labels == 0, :, :, :14] += 180
    images[labels == 1, :, :, 14:] += 180
    trained = quality.train_classifier((images[:150], labels[:150]), (images[150:], labels[150:]), epochs=2, seed=0)
    assert trained.test_accuracy == 1.0
    path = tmp_path / "classifier.pt"
    quality.save_classifier(trained, path)
    loaded = quality.load_classifier(path)
    assert loaded.data_digest == trained.data_digest == quality.data_digest(images[:150], labels[:150])
    assert loaded.test_accuracy == trained.test_accuracy
    features = quality.extract_features(loaded.model, images[150:])
    assert features.shape == (50, 64)
    assert torch.equal(features, quality.extract_features(trained.model, images[150:]))
