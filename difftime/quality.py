"""Sample-quality metrics in a feature space made for the data, with intervals that cover.

* Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, Eq. 6):
  ``FD = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))``, moments and roots in float64.
  The plug-in FD is biased upward by O(d/n); :func:`fd_jackknife` reports the jackknife
  bias-corrected FD.
* Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs", Sec. 4): the
  unbiased MMD^2 U-statistic (Gretton et al. 2012, "A Kernel Two-Sample Test", Lemma 6) with the
  cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``, on all pairs (no subsets).
* Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall
  Metric for Assessing Generative Models", Eq. 1-2): the manifold of a set is the union of balls
  around its points whose radius is the distance to the k-th nearest neighbour in the same set;
  precision is the fraction of generated points inside the real manifold, recall the fraction
  of real points inside the generated manifold.
* Intervals: the delete-a-group jackknife over both feature sets for FD and KID (Efron and
  Tibshirani 1993, Ch. 11; Shao and Tu 1995, Sec. 5.2), see :func:`jackknife` for why; the
  delete-half jackknife for the non-smooth precision and recall (:func:`half_sampling`); the basic
  and percentile bootstraps (Efron and Tibshirani 1993, Ch. 13; Davison and Hinkley 1997, Eq. 5.6)
  for comparison. Their coverage is measured in ``benchmarks/results/quality_coverage.md``.
* :func:`quality_row`: every number above from sample and reference features, in one record
  naming the interval methods, so every table reports the same thing.

The feature extractors (the digit classifier, random-conv features) live in
:mod:`difftime.features` and are re-exported here under their old names.
Pure torch: no Lightning, no data modules; callers hand in tensors.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from difftime.features import (DigitClassifier, TrainedClassifier, accuracy, data_digest,  # noqa: F401 (re-exports)
                               extract_features, load_classifier, save_classifier, train_classifier)

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


# ---------------------------------------------------------------------- kernel distance (KID)


def polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """KID's kernel ``k(x, y) = (x.y / d + 1)^3`` (Bińkowski et al. 2018, Sec. 4), ``[N, M]`` float64."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kernel_distance(real: Tensor, fake: Tensor) -> Tensor:
    """Unbiased MMD^2 of ``real: [M, d]`` and ``fake: [N, d]`` with KID's kernel (Gretton et al. 2012, Eq. 3).

    ``1/(M(M-1)) sum_{i!=j} k(x_i, x_j) + 1/(N(N-1)) sum_{i!=j} k(y_i, y_j) - 2/(MN) sum k(x_i, y_j)``:
    a U-statistic, unbiased for MMD^2 at every M, N >= 2 (so it can be negative).
    """
    m, n = real.shape[0], fake.shape[0]
    if min(m, n) < 2:
        raise ValueError(f"KID needs at least two points in each set, got {m} and {n}")
    kxx, kyy = polynomial_kernel(real, real), polynomial_kernel(fake, fake)
    within = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return within - 2.0 * polynomial_kernel(real, fake).mean()


def polynomial_kernel_mean(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> Tensor:
    """``E k(x, y)`` for independent ``x ~ N(mu1, cov1)``, ``y ~ N(mu2, cov2)`` with KID's kernel.

    With ``u = x.y`` and ``k = 1 + 3u/d + 3u^2/d^2 + u^3/d^3``: ``E u = a = mu1.mu2``;
    ``E u^2 = Tr(M1 M2)`` with second moments ``Mi = cov_i + mu_i mu_i^T``; given y,
    ``u ~ N(mu1.y, y^T cov1 y)``, whose third moment ``c^3 + 3 c v`` averaged over y gives
    ``E u^3 = a^3 + 3a mu1^T cov2 mu1 + 3a (mu2^T cov1 mu2 + Tr(cov1 cov2)) + 6 mu1^T cov2 cov1 mu2``.
    """
    mu1, cov1, mu2, cov2 = (t.double() for t in (mu1, cov1, mu2, cov2))
    d = mu1.shape[0]
    a = mu1 @ mu2
    u2 = torch.trace((cov1 + torch.outer(mu1, mu1)) @ (cov2 + torch.outer(mu2, mu2)))
    u3 = (a**3 + 3 * a * (mu1 @ cov2 @ mu1) + 3 * a * (mu2 @ cov1 @ mu2 + torch.trace(cov1 @ cov2))
          + 6 * (mu1 @ cov2 @ cov1 @ mu2))
    return 1 + 3 * a / d + 3 * u2 / d**2 + u3 / d**3


def kernel_distance_gaussians(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> Tensor:
    """Population KID (MMD^2 with KID's kernel) of N(mu1, cov1) and N(mu2, cov2), closed form."""
    return (polynomial_kernel_mean(mu1, cov1, mu1, cov1) + polynomial_kernel_mean(mu2, cov2, mu2, cov2)
            - 2 * polynomial_kernel_mean(mu1, cov1, mu2, cov2))


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


# ---------------------------------------------------------------------- intervals


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval; ``resamples``: resamples or jackknife replicates."""

    estimate: float
    low: float
    high: float
    level: float
    resamples: int
    method: str = "percentile bootstrap"

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def student_t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t (Cornish-Fisher expansion, Abramowitz and Stegun 26.7.5).

    Relative error below 1e-3 for ``df >= 5`` (checked against scipy in the tests).
    """
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(p, dtype=torch.float64)))
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level = {level} is invalid: allowed 0 < level < 1")


def bootstrap(statistic: Callable[..., Tensor | float], samples: Sequence[Tensor], resamples: int = 200,
              level: float = 0.95, seed: int = 0, method: str = "percentile") -> Interval:
    """Bootstrap interval of ``statistic(*samples)``, each tensor resampled with replacement on its own.

    ``percentile`` (Efron and Tibshirani 1993, Sec. 13.3): the estimate is the plug-in value and
    the interval the ``(1 -+ level) / 2`` quantiles ``q_lo, q_hi`` of the resampled statistics.
    It is wrong for a statistic biased by O(1/n) like the FD: a resample holds about 63 % distinct
    points and adds the bias again, so the interval sits above the estimate.
    ``basic`` (Davison and Hinkley 1997, Eq. 5.6): ``[2 t - q_hi, 2 t - q_lo]``, which reflects
    the resampling bias back; its estimate ``2 t - median`` (bias-corrected) lies inside it.
    """
    if resamples < 1 or method not in ("percentile", "basic"):
        raise ValueError(f"bootstrap needs resamples >= 1 and method percentile|basic, got {resamples}, {method}")
    _check_level(level)
    generator = torch.Generator().manual_seed(int(seed))
    values = []
    for _ in range(resamples):
        drawn = [s[torch.randint(0, s.shape[0], (s.shape[0],), generator=generator)] for s in samples]
        values.append(float(statistic(*drawn)))
    probs = torch.tensor([(1 - level) / 2, 0.5, (1 + level) / 2], dtype=torch.float64)
    low, median, high = torch.tensor(values, dtype=torch.float64).quantile(probs).tolist()
    full = float(statistic(*samples))
    if method == "percentile":
        return Interval(full, low, high, float(level), int(resamples), "percentile bootstrap")
    return Interval(2 * full - median, 2 * full - high, 2 * full - low, float(level), int(resamples), "basic bootstrap")


def mean_interval(values: Tensor, resamples: int = 200, level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean of ``values: [N]`` (unbiased: percentile is right here)."""
    return bootstrap(lambda v: v.double().mean(), [values], resamples, level, seed)


def group_labels(n: int, groups: int, seed: int) -> Tensor:
    """A random split of ``range(n)`` into ``min(groups, n)`` groups of near-equal size, ``[n]`` labels."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=generator) % min(groups, n)


def jackknife(statistic: Callable[..., Tensor], samples: Sequence[Tensor], groups: int = 50, level: float = 0.95,
              seed: int = 0, bias_correct: bool = True) -> list[Interval]:
    """Delete-a-group jackknife of a (vector) statistic of several independent samples.

    Each sample is split at random into ``G`` groups; ``t_(g)`` is the statistic with group g of that
    sample deleted. Per sample (Efron and Tibshirani 1993, Eq. 11.5 and 11.12 with G groups;
    Shao and Tu 1995, Sec. 5.2) ``bias = (G-1)(mean_g t_(g) - t)`` and
    ``var = (G-1)/G sum_g (t_(g) - mean)^2``; the samples are independent, so biases and
    variances add. The estimate is ``t - bias`` (``bias_correct``) or ``t``; the interval
    ``estimate -+ t_q sqrt(var)`` with Student's t at Welch-Satterthwaite degrees of freedom.

    Why the jackknife: the FD's plug-in bias is O(d/n), which the jackknife removes to first order
    (a resample with replacement instead adds it again); KID is a U-statistic whose jackknife bias
    is zero, and its jackknife variance is consistent (Arvesen 1969) and, if anything, too large
    (Efron and Stein 1981); precision and recall cannot be bootstrapped at all (a duplicated point
    has a zero k-NN radius), but a deleted group only thins the manifold. The interval is
    symmetric about its estimate, so it always contains it. Coverage measured on Gaussian
    features: ``benchmarks/results/quality_coverage.md``.
    """
    _check_level(level)
    full = torch.as_tensor(statistic(*samples), dtype=torch.float64).reshape(-1)
    parts = [_deleted_groups(statistic, samples, which, full, groups, seed + which) for which in range(len(samples))]
    bias, variance, df_terms = (sum(p[i] for p in parts) for i in range(3))
    estimate = full - bias if bias_correct else full
    reps = sum(min(groups, s.shape[0]) for s in samples)
    name = f"jackknife ({groups} groups per set{', bias-corrected' if bias_correct else ''})"
    return _t_intervals(estimate, variance, df_terms, level, reps, name)


def _t_intervals(estimate: Tensor, variance: Tensor, df_terms: Tensor, level: float, reps: int,
                 name: str) -> list[Interval]:
    """``estimate -+ t_q sqrt(variance)``, Student's t at Welch-Satterthwaite ``variance^2 / sum df_terms``."""
    df = torch.where(df_terms > 0, variance**2 / df_terms.clamp_min(1e-300), torch.full_like(variance, 1e6))
    out = []
    for est, var, dof in zip(estimate.tolist(), variance.tolist(), df.tolist()):
        half = student_t_quantile((1 + level) / 2, max(dof, 1.0)) * math.sqrt(var)
        out.append(Interval(est, est - half, est + half, float(level), reps, name))
    return out


def half_sampling(statistic: Callable[..., Tensor], samples: Sequence[Tensor], subsets: int = 50,
                  level: float = 0.95, seed: int = 0) -> list[Interval]:
    """Delete-half jackknife (Shao and Wu 1989; Shao and Tu 1995, Sec. 2.3) of a statistic of independent samples.

    For each sample in turn, ``subsets`` random halves (``r = floor(n/2)`` points without
    replacement; the other samples whole) give replicates ``t_s``; that sample's variance is
    ``r / (n - r) * var_s(t_s)``, which for a mean is exactly ``s^2 / n`` in expectation. Unlike
    the delete-one (or small-group) jackknife it stays consistent for non-smooth statistics such
    as quantiles, and k-NN precision and recall are of that kind. Variances of the samples add;
    the interval is ``t -+ t_q sqrt(var)`` around the plug-in value ``t``.
    """
    _check_level(level)
    full = torch.as_tensor(statistic(*samples), dtype=torch.float64).reshape(-1)
    variance, df_terms = torch.zeros_like(full), torch.zeros_like(full)
    for which, sample in enumerate(samples):
        generator, n = torch.Generator().manual_seed(int(seed) + which), sample.shape[0]
        kept = n // 2
        replicates = torch.stack([torch.as_tensor(statistic(*_replace(
            samples, which, sample[torch.randperm(n, generator=generator)[:kept]])), dtype=torch.float64).reshape(-1)
            for _ in range(subsets)])
        var = kept / (n - kept) * replicates.var(0)
        variance, df_terms = variance + var, df_terms + var**2 / (subsets - 1)
    return _t_intervals(full, variance, df_terms, level, subsets * len(samples),
                        f"delete-half jackknife ({subsets} random halves per set)")


def _deleted_groups(statistic: Callable[..., Tensor], samples: Sequence[Tensor], which: int, full: Tensor,
                    groups: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Jackknife bias, variance and Welch-Satterthwaite term ``var^2 / (G-1)`` over the groups of one sample."""
    sample = samples[which]
    labels = group_labels(sample.shape[0], groups, seed)
    count = int(labels.max()) + 1
    replicates = torch.stack([torch.as_tensor(statistic(*_replace(samples, which, sample[labels != g])),
                                              dtype=torch.float64).reshape(-1) for g in range(count)])
    mean = replicates.mean(0)
    var = (count - 1) / count * (replicates - mean).square().sum(0)
    return (count - 1) * (mean - full), var, var**2 / (count - 1)


def _replace(samples: Sequence[Tensor], which: int, new: Tensor) -> list[Tensor]:
    return [new if i == which else s for i, s in enumerate(samples)]


# ---------------------------------------------------------------------- the metrics with intervals


def fd_jackknife(real: Tensor, fake: Tensor, groups: int = 50, level: float = 0.95, seed: int = 0) -> Interval:
    """Jackknife bias-corrected Fréchet distance with its jackknife t-interval (:func:`jackknife`)."""
    return jackknife(frechet_distance_features, [real.double(), fake.double()], groups, level, seed)[0]


def fd_interval(real: Tensor, fake: Tensor, resamples: int = 200, level: float = 0.95, seed: int = 0) -> Interval:
    """Fréchet distance, bias-corrected, with a basic bootstrap interval over both feature sets."""
    return bootstrap(frechet_distance_features, [real, fake], resamples, level, seed, method="basic")


def fd_percentile_interval(real: Tensor, fake: Tensor, resamples: int = 200, level: float = 0.95,
                           seed: int = 0) -> Interval:
    """The plug-in FD with a percentile bootstrap interval: kept only to show that it does not cover."""
    return bootstrap(frechet_distance_features, [real, fake], resamples, level, seed, method="percentile")


def kid_jackknife(real: Tensor, fake: Tensor, groups: int = 50, level: float = 0.95, seed: int = 0) -> Interval:
    """Unbiased KID (:func:`kernel_distance`) with its jackknife t-interval (no bias correction needed)."""
    return jackknife(kernel_distance, [real.double(), fake.double()], groups, level, seed, bias_correct=False)[0]


def precision_recall_jackknife(real: Tensor, fake: Tensor, k: int = 3, groups: int = 50, level: float = 0.95,
                               seed: int = 0) -> tuple[Interval, Interval]:
    """Precision and recall with delete-a-group jackknife t-intervals (clipped to [0, 1]).

    Conservative: k-NN statistics are not smooth, and the small-group jackknife overstates their
    spread (``benchmarks/results/quality_coverage.md``); :func:`precision_recall_half_sampling` does not.
    """
    statistic = lambda x, y: torch.tensor(precision_recall(x, y, k), dtype=torch.float64)
    pair = jackknife(statistic, [real.double(), fake.double()], groups, level, seed, bias_correct=False)
    return tuple(replace(iv, low=max(iv.low, 0.0), high=min(iv.high, 1.0)) for iv in pair)  # fractions


def precision_recall_half_sampling(real: Tensor, fake: Tensor, k: int = 3, subsets: int = 50, level: float = 0.95,
                                   seed: int = 0) -> tuple[Interval, Interval]:
    """Precision and recall with delete-half jackknife t-intervals (:func:`half_sampling`), clipped to [0, 1].

    They include the manifolds' own variability. The estimand is the expected precision (recall)
    at these set sizes and this k: the k-NN radii depend on the set size, so the plug-in value is
    not corrected towards an infinite set.
    """
    statistic = lambda x, y: torch.tensor(precision_recall(x, y, k), dtype=torch.float64)
    pair = half_sampling(statistic, [real.double(), fake.double()], subsets, level, seed)
    return tuple(replace(iv, low=max(iv.low, 0.0), high=min(iv.high, 1.0)) for iv in pair)  # fractions


def precision_recall_intervals(real: Tensor, fake: Tensor, k: int = 3, resamples: int = 200, level: float = 0.95,
                               seed: int = 0) -> tuple[Interval, Interval]:
    """Precision and recall with bootstrap intervals of their per-sample indicators, given the manifolds.

    The k-NN manifolds are built once on the full sets (a resample with duplicates would shrink
    the radii), so these intervals ignore the manifolds' variability and under-cover;
    :func:`precision_recall_jackknife` includes it.
    """
    precision, recall = precision_recall_indicators(real, fake, k)
    return (mean_interval(precision, resamples, level, seed), mean_interval(recall, resamples, level, seed + 1))


# ---------------------------------------------------------------------- one quality record


def quality_row(reference: Tensor, samples: Tensor, extractor: str, level: float = 0.95, groups: int = 50,
                k: int = 3, seed: int = 0) -> dict[str, Any]:
    """FD, KID, precision and recall with intervals of measured coverage, and what they were computed with.

    FD: jackknife bias-corrected (:func:`fd_jackknife`); KID: unbiased with a jackknife interval
    (:func:`kid_jackknife`); both with ``groups`` groups per set. Precision and recall (k-NN
    manifolds with ``k``): delete-half jackknife with ``groups`` halves per set
    (:func:`precision_recall_half_sampling`). ``reference: [M, F]`` and ``samples: [N, F]`` are
    features of the same extractor, named by ``extractor``. Keys: ``fd fd_low fd_high fd_plugin
    kid kid_low kid_high precision precision_low precision_high recall recall_low recall_high
    n_samples n_reference extractor k ci_level jackknife_groups fd_interval_method
    kid_interval_method pr_interval_method``. Cost: ``2 * groups`` evaluations of each metric.
    """
    fd = fd_jackknife(reference, samples, groups, level, seed)
    kid = kid_jackknife(reference, samples, groups, level, seed)
    precision, recall = precision_recall_half_sampling(reference, samples, k, groups, level, seed)
    row: dict[str, Any] = {}
    for name, interval in (("fd", fd), ("kid", kid), ("precision", precision), ("recall", recall)):
        row |= {name: interval.estimate, f"{name}_low": interval.low, f"{name}_high": interval.high}
    return row | {"fd_plugin": float(frechet_distance_features(reference, samples)), "n_samples": int(samples.shape[0]),
                  "n_reference": int(reference.shape[0]), "extractor": extractor, "k": int(k), "ci_level": float(level),
                  "jackknife_groups": int(groups), "fd_interval_method": fd.method,
                  "kid_interval_method": kid.method, "pr_interval_method": precision.method}


def interval_note(row: dict[str, Any]) -> str:
    """One sentence for under a table: the interval level and methods, the sets and the extractor."""
    return (f"Intervals: {100 * float(row['ci_level']):g} % Student-t intervals over both sets: FD "
            f"{row['fd_interval_method']}, KID {row['kid_interval_method']} (unbiased, cubic kernel), "
            f"precision/recall (k = {row['k']}) {row['pr_interval_method']}. {row['n_samples']} samples against "
            f"{row['n_reference']} reference points in the features of {row['extractor']}.")
