"""difftime.quality against closed forms and a reference implementation: Fréchet distance of
Gaussians, KID against torchmetrics and against its Gaussian closed form (checked by Monte Carlo),
jackknife identities, precision/recall of identical and disjoint sets, bootstrap coverage of a
known mean, the digit classifier's cache. Interval coverage: tests/test_quality_coverage.py."""

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


def test_fd_interval_is_bias_corrected_basic_bootstrap():
    generator = torch.Generator().manual_seed(4)
    real, fake = torch.randn(200, 3, generator=generator), torch.randn(200, 3, generator=generator) + 1.0
    interval = quality.fd_interval(real, fake, resamples=50, level=0.9, seed=0)
    assert interval.resamples == 50 and interval.level == 0.9 and interval.method == "basic bootstrap"
    assert interval.low <= interval.estimate <= interval.high and interval.low < 3.0 < interval.high
    # in 32-d at n = 100 the plug-in FD's O(d/n) bias dominates; the basic bootstrap removes it
    wide_real, wide_fake = torch.randn(100, 32, generator=generator), torch.randn(100, 32, generator=generator)
    corrected = quality.fd_interval(wide_real, wide_fake, resamples=50, seed=0)
    assert corrected.estimate < 0.5 * float(quality.frechet_distance_features(wide_real, wide_fake))
    assert corrected.low <= 0.0 <= corrected.high  # the true FD of these two sets' laws
    old = quality.fd_percentile_interval(real, fake, resamples=50, level=0.9, seed=0)
    assert math.isclose(old.estimate, float(quality.frechet_distance_features(real, fake)))
    assert old.method == "percentile bootstrap"


def test_jackknife_of_mean_and_variance_identities():
    # Leave-one-out (groups = n): the jackknife s.e. of a mean is s / sqrt(n), its bias 0; the
    # jackknife bias-corrected plug-in variance (1/n) sum (x - xbar)^2 is the unbiased variance.
    x = torch.randn(40, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 2 + 1
    mean = quality.jackknife(lambda v: v.mean(), [x], groups=40, level=0.95)[0]
    half = quality.student_t_quantile(0.975, 39) * float(x.std() / 40**0.5)
    assert math.isclose(mean.estimate, float(x.mean()), rel_tol=1e-12)
    assert math.isclose(mean.high - mean.estimate, half, rel_tol=1e-9)
    variance = quality.jackknife(lambda v: v.var(unbiased=False), [x], groups=40)[0]
    assert math.isclose(variance.estimate, float(x.var()), rel_tol=1e-10)
    # two independent samples: variances add (difference of means: s.e.^2 = s1^2/n1 + s2^2/n2)
    y = torch.randn(30, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    diff = quality.jackknife(lambda a, b: a.mean() - b.mean(), [x, y], groups=100)[0]
    se = math.sqrt(float(x.var() / 40 + y.var() / 30))
    assert math.isclose((diff.high - diff.low) / 2, se * (diff.high - diff.estimate) / se, rel_tol=1e-12)
    assert 1.95 * se < diff.high - diff.estimate < 2.1 * se


def test_half_sampling_variance_of_a_mean():
    # r / (n - r) times the variance of a random half's mean is s^2 / n in expectation (sampling
    # without replacement from n); with 4000 halves the estimate is within a few % of it.
    x = torch.randn(100, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    interval = quality.half_sampling(lambda v: v.mean(), [x], subsets=4000)[0]
    se = (interval.high - interval.estimate) / quality.student_t_quantile(0.975, 3999)
    assert abs(se / float(x.std() / 10) - 1) < 0.05 and interval.estimate == float(x.mean())


def test_student_t_quantile_matches_scipy():
    from scipy import stats

    for df in (5, 9, 30, 99, 1e5):  # the expansion holds to 1e-3 from df = 5 on
        for p in (0.9, 0.975, 0.995):
            assert abs(quality.student_t_quantile(p, df) - stats.t.ppf(p, df)) < 1e-3 * stats.t.ppf(p, df)


def test_kid_matches_torchmetrics_full_and_subsets():
    # torchmetrics' KernelInceptionDistance with an identity feature module on the same features:
    # with subset_size = n each "subset" is a permutation, so its value is the full U-statistic.
    from torchmetrics.image.kid import KernelInceptionDistance

    generator = torch.Generator().manual_seed(8)
    real = torch.randn(120, 16, generator=generator, dtype=torch.float64)
    fake = 1.3 * torch.randn(120, 16, generator=generator, dtype=torch.float64) + 0.2
    metric = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=2, subset_size=120)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    expected, spread = metric.compute()
    assert abs(float(quality.kernel_distance(real, fake)) - float(expected)) < 1e-10 and float(spread) < 1e-10
    # Bińkowski et al.'s subset scheme, same random subsets: the mean of our statistic on them
    metric = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=5, subset_size=50)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    torch.manual_seed(3)
    expected, _ = metric.compute()
    torch.manual_seed(3)
    ours = [quality.kernel_distance(real[torch.randperm(120)[:50]], fake[torch.randperm(120)[:50]]) for _ in range(5)]
    assert abs(float(torch.stack(ours).mean()) - float(expected)) < 1e-10


def test_kid_closed_form_of_gaussians_against_monte_carlo():
    # E k(x, y) for independent Gaussians from moments, against 1e6 independent pairs.
    g = torch.Generator().manual_seed(9)
    d = 4
    a, b = torch.randn(d, d, generator=g, dtype=torch.float64), torch.randn(d, d, generator=g, dtype=torch.float64)
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    cov1, cov2 = a @ a.T / d, b @ b.T / d
    n = 1_000_000
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov1).T + mu1
    y = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov2).T + mu2
    values = ((x * y).sum(1) / d + 1) ** 3
    expected = float(quality.polynomial_kernel_mean(mu1, cov1, mu2, cov2))
    assert abs(float(values.mean()) - expected) < 4 * float(values.std()) / n**0.5
    # KID of two identical Gaussians is 0; the U-statistic is unbiased even at 20 points per set
    assert abs(float(quality.kernel_distance_gaussians(mu1, cov1, mu1, cov1))) < 1e-12
    truth = float(quality.kernel_distance_gaussians(mu1, cov1, mu2, cov2))
    estimates = torch.stack([quality.kernel_distance(x[i:i + 20], y[i + 20:i + 40]) for i in range(0, 40 * 500, 40)])
    assert abs(float(estimates.mean()) - truth) < 4 * float(estimates.std()) / 500**0.5


def test_quality_row_states_methods_and_sizes():
    generator = torch.Generator().manual_seed(10)
    reference, samples = torch.randn(150, 8, generator=generator), torch.randn(90, 8, generator=generator) + 0.5
    row = quality.quality_row(reference, samples, "identity", groups=20)
    for name in ("fd", "kid", "precision", "recall"):
        assert row[f"{name}_low"] <= row[name] <= row[f"{name}_high"]
    assert (row["n_samples"], row["n_reference"], row["extractor"], row["jackknife_groups"]) == (90, 150, "identity", 20)
    assert "bias-corrected" in row["fd_interval_method"] and "jackknife" in row["kid_interval_method"]
    assert row["pr_interval_method"].startswith("delete-half jackknife")
    assert row["fd"] < row["fd_plugin"]
    assert math.isclose(row["kid"], float(quality.kernel_distance(reference, samples)))
    assert (row["precision"], row["recall"]) == quality.precision_recall(reference.double(), samples.double())
    note = quality.interval_note(row)
    assert "bias-corrected" in note and "delete-half" in note and "90 samples against 150" in note


def test_feature_extractors_moved_with_old_names():
    from callbacks import fid
    from difftime import features

    assert quality.DigitClassifier is features.DigitClassifier and quality.load_classifier is features.load_classifier
    assert fid.RandomConvFeatures is features.RandomConvFeatures and fid.weights_digest is features.weights_digest


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


def test_plateau_verdict_and_one_line_errors(tmp_path, capsys):
    # benchmarks/plateau.py: the verdict compares the last doubling's change with the interval's
    # half-width; bad arguments give one line and exit 2 before any work.
    import pytest

    from benchmarks import plateau

    row = lambda step, fd, half: {"step": str(step), "fd": str(fd), "fd_low": str(fd - half), "fd_high": str(fd + half),
                                  "kid": "1.0", "kid_low": "0.5", "kid_high": "1.5"}
    text = plateau.verdict([row(1000, 50.0, 2.0), row(2000, 30.0, 2.0), row(4000, 29.0, 2.0)])
    assert "step 2000 -> 29 at step 4000" in text[0] and "less than its interval (plateau)" in text[0]
    text = plateau.verdict([row(1000, 50.0, 2.0), row(2000, 30.0, 2.0)])
    assert "changed it by more than its interval" in text[0]
    assert "no doubling" in plateau.verdict([row(1000, 50.0, 2.0)])[0]
    unit = tmp_path / "units" / "score" / "T1"
    (unit / "checkpoints").mkdir(parents=True)
    (unit / "config.yaml").write_text("{}")
    for name in ("step=00001000.ckpt", "step=00002000.ckpt", "last.ckpt"):
        (unit / "checkpoints" / name).write_bytes(b"")
    assert list(plateau.checkpoints(unit, [1000, 4000, 2000])) == [1000, 2000]
    for argv, message in (([str(unit), "--n", "1"], "--n = 1 is invalid: allowed >= 2"),
                          ([str(tmp_path), "--n", "5"], "is not a run folder"),
                          ([str(unit), "--out", str(tmp_path / "report")], "which this script only reads")):
        with pytest.raises(SystemExit) as exit_info:
            plateau.parse_args(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and message in err and len(err.splitlines()) == 1
