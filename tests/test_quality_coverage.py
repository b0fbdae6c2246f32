"""Coverage of the quality intervals against closed-form truths (fast version of
``benchmarks/quality_coverage.py``): Gaussian features, d = 64, n = 200 points per set.

With 60 replications the number of covering intervals is Binomial(60, c). The acceptance band
50..60 passes a true coverage c = 0.95 with probability 0.9998 and c = 0.90 with 0.97, and
fails the old percentile bootstrap of the FD, whose coverage here is 0 (its interval sits
above the estimate, see ``bootstrap``): for it the test asserts at most 20 of 60.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.quality_coverage import draw, scenario
from difftime import quality

pytestmark = pytest.mark.usefixtures("one_thread")

REPS, N = 60, 200


@pytest.fixture(scope="module")
def replications() -> list[dict[str, quality.Interval]]:
    s, out = scenario(), []
    for r in range(REPS):
        real, fake = draw(s, N, 5000 + r)
        out.append({"fd": quality.fd_jackknife(real, fake, seed=r), "kid": quality.kid_jackknife(real, fake, seed=r),
                    "fd_percentile": quality.fd_percentile_interval(real, fake, resamples=40, seed=r)})
    return out


def covered(replications: list[dict[str, quality.Interval]], key: str, truth: float) -> int:
    return sum(rep[key].low <= truth <= rep[key].high for rep in replications)


def test_fd_jackknife_covers_closed_form(replications) -> None:
    s = scenario()
    truth = float(quality.frechet_distance(s["mu_r"], s["cov_r"], s["mu_g"], s["cov_g"]))
    assert 50 <= covered(replications, "fd", truth) <= REPS
    assert all(rep["fd"].low <= rep["fd"].estimate <= rep["fd"].high for rep in replications)
    # the bias correction works: the mean estimate is within 3 s.e. of the truth, the plug-in is not
    estimates = torch.tensor([rep["fd"].estimate for rep in replications])
    assert abs(float(estimates.mean()) - truth) < 3 * float(estimates.std()) / REPS**0.5


def test_kid_jackknife_covers_closed_form(replications) -> None:
    s = scenario()
    truth = float(quality.kernel_distance_gaussians(s["mu_r"], s["cov_r"], s["mu_g"], s["cov_g"]))
    assert 50 <= covered(replications, "kid", truth) <= REPS


def test_old_percentile_fd_interval_fails(replications) -> None:
    s = scenario()
    truth = float(quality.frechet_distance(s["mu_r"], s["cov_r"], s["mu_g"], s["cov_g"]))
    assert covered(replications, "fd_percentile", truth) <= 20
    # ... and it excludes its own (plug-in) estimate ("FD 64 [65, 98]")
    assert sum(rep["fd_percentile"].low > rep["fd_percentile"].estimate for rep in replications) > REPS // 2
