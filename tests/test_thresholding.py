"""Data-prediction thresholding (clip, dynamic) and the NFE a sampler reports before it runs.

Independent answers: a Gaussian whose data prediction stays inside [-1, 1] (thresholding must
then be the identity, bit for bit); a point mass, whose data prediction D(x, t) = c is constant,
so DDIM with the thresholded constant c' is exact in closed form:
x_eps = m_eps c' + (m_T s_eps / (s_T m_eps)) m_eps (c - c') + s_eps z for x_T = m_T c + s_T z
(each step contracts the offset from c' by e^{-h}, h the step in log(m / s)); and dynamic
thresholding computed by hand on a few numbers (Saharia et al. 2022, Sec. 2.3).
"""

from __future__ import annotations

import pytest
import torch

from difftime import samplers as S
from difftime.randomness import PerSampleNoise
from difftime.schedules import LogSNR
from difftime.sde import VESDE, VPSDE
from difftime.toy import Gaussian, OracleScore
from difftime.utils import ConfigError, append_dims

pytestmark = pytest.mark.usefixtures("one_thread")

THRESHOLDED = [(S.ddim, {}), (S.dpm_solver_pp, {"order": 2, "corrector": True}),
               (S.dpm_solver_pp, {"order": 3, "corrector": False}), (S.sde_dpm_solver_pp, {"eta": 1.0})]
IDS = ["ddim", "2m-unic", "3m", "sde"]


class Recorded:
    """The oracle score, recording max |D(x, t)| = max |(x + s^2 score) / m| over every call."""

    def __init__(self, score, sde) -> None:
        self.score, self.sde, self.calls, self.max_abs_d = score, sde, 0, 0.0

    def __call__(self, x, t):
        self.calls += 1
        out = self.score(x, t)
        m, s = (append_dims(c, x.ndim) for c in self.sde.marginal_coeffs(t.double()))
        self.max_abs_d = max(self.max_abs_d, float(((x + s**2 * out) / m).abs().max()))
        return out


@pytest.mark.parametrize("T", [0.4, 1.0])
@pytest.mark.parametrize("threshold", ["clip", "dynamic"])
@pytest.mark.parametrize("fn, options", THRESHOLDED, ids=IDS)
def test_thresholding_never_changes_samples_inside_the_data_range(fn, options, threshold, T):
    data = Gaussian(dim=3, mean=[0.2, -0.1, 0.4], std=0.1)  # |D| <= |mean| + 5 std < 1 at every t
    sde = VPSDE(T=T, eps=1e-3)
    x_T = data.at_time(sde, T).sample(16, torch.Generator().manual_seed(0))
    plain, thresholded = Recorded(OracleScore(data, sde).score, sde), Recorded(OracleScore(data, sde).score, sde)
    a, info_a = fn(plain, sde, x_T, 9, PerSampleNoise(range(16)), denoise=True, **options)
    b, info_b = fn(thresholded, sde, x_T, 9, PerSampleNoise(range(16)), denoise=True, threshold=threshold,
                   percentile=0.9, **options)
    assert plain.max_abs_d < 1.0  # the premise: every data prediction was inside [-1, 1]
    assert torch.equal(a, b)
    assert info_a["nfe"] == info_b["nfe"] == plain.calls == thresholded.calls == 10
    assert info_a["threshold"] is None and info_b["threshold"] == threshold


def point_mass_score(c: torch.Tensor, sde):
    """Score of q_t = N(m c, s^2 I), the marginal of a point mass at c: D(x, t) = c for every x, t."""
    def score(x, t):
        m, s = (append_dims(v, x.ndim) for v in sde.marginal_coeffs(t.double()))
        return (m * c - x) / s**2

    return score


def closed_form_ddim(c: torch.Tensor, c_used: torch.Tensor, sde, z: torch.Tensor) -> torch.Tensor:
    """x_eps of DDIM from x_T = m_T c + s_T z when every data prediction is the constant ``c_used``."""
    (m_T, m_e), (s_T, s_e) = (v.tolist() for v in sde.marginal_coeffs(torch.tensor([sde.T, sde.eps],
                                                                                   dtype=torch.float64)))
    decay = (m_T * s_e) / (s_T * m_e)
    return m_e * (c_used + decay * (c - c_used)) + s_e * z


@pytest.mark.parametrize("sde", [VPSDE(T=1.0, eps=1e-3), VPSDE(T=0.4, eps=1e-3), VESDE(T=1.0, eps=1e-2)],
                         ids=["vp1", "vp0.4", "ve"])
def test_clip_bounds_the_data_prediction_in_closed_form(sde):
    c = torch.tensor([[2.0, -3.0, 0.5, -0.25]], dtype=torch.float64).expand(6, -1)
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    m_T, s_T = (float(v) for v in sde.marginal_coeffs(torch.tensor([sde.T], dtype=torch.float64)))
    x_T = m_T * c + s_T * z
    x, info = S.ddim(point_mass_score(c, sde), sde, x_T, 7, threshold="clip")
    assert info["nfe"] == 7
    assert torch.allclose(x, closed_form_ddim(c, c.clamp(-1, 1), sde, z), atol=1e-10)
    unclipped, _ = S.ddim(point_mass_score(c, sde), sde, x_T, 7)
    assert torch.allclose(unclipped, closed_form_ddim(c, c, sde, z), atol=1e-10)
    denoised, info = S.ddim(point_mass_score(c, sde), sde, x_T, 7, threshold="clip", denoise=True)
    assert info["nfe"] == 8 and torch.allclose(denoised, c.clamp(-1, 1), atol=1e-12)  # Tweedie's D, clipped


def test_dynamic_thresholding_matches_a_hand_computation():
    x0 = torch.tensor([[0.5, -2.0, 3.0, 1.5], [0.1, -0.2, 0.3, 0.9]], dtype=torch.float64)
    # |x0| of row 0 sorted: 0.5, 1.5, 2, 3; linear quantile at p = 0.5 is 1.75, at p = 0.75 is 2.25.
    # Row 1 lies inside [-1, 1]: s = max(1, .) = 1 leaves it unchanged.
    got = S.threshold_data(x0, "dynamic", 0.5)
    expected = torch.tensor([[0.5 / 1.75, -1.0, 1.0, 1.5 / 1.75], [0.1, -0.2, 0.3, 0.9]], dtype=torch.float64)
    assert torch.allclose(got, expected, rtol=0, atol=1e-15) and torch.equal(got[1], x0[1])
    got = S.threshold_data(x0, "dynamic", 0.75)
    assert torch.allclose(got[0], torch.tensor([0.5, -2.0, 2.25, 1.5], dtype=torch.float64) / 2.25, atol=1e-15)
    clipped = S.threshold_data(x0, "clip")
    assert torch.equal(clipped, torch.tensor([[0.5, -1.0, 1.0, 1.0], [0.1, -0.2, 0.3, 0.9]], dtype=torch.float64))
    assert S.threshold_data(x0, None) is x0


def test_dynamic_thresholding_is_per_sample_over_every_dimension():
    x0 = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(3)) * torch.tensor([0.1, 1, 2, 4, 8]).view(
        5, 1, 1, 1)
    got = S.threshold_data(x0, "dynamic", 0.9)
    for i in range(5):
        s = max(1.0, float(torch.quantile(x0[i].flatten().abs(), 0.9)))
        assert torch.allclose(got[i], x0[i].clamp(-s, s) / s, atol=1e-7)
        assert float(got[i].abs().max()) <= 1.0 + 1e-7


def test_dynamic_thresholding_enters_every_step_in_closed_form():
    """Point mass at c: the dynamic threshold of c is a constant c', so DDIM is exact with c'."""
    sde = VPSDE(T=1.0, eps=1e-3)
    c = torch.tensor([[3.0, -0.5, 1.2, 0.1], [0.3, -0.6, 0.2, 0.9]], dtype=torch.float64)
    z = torch.randn(2, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    m_T, s_T = (float(v) for v in sde.marginal_coeffs(torch.tensor([sde.T], dtype=torch.float64)))
    x, _ = S.ddim(point_mass_score(c, sde), sde, m_T * c + s_T * z, 6, threshold="dynamic", percentile=0.75)
    c_used = S.threshold_data(c, "dynamic", 0.75)
    assert not torch.equal(c_used[0], c[0]) and torch.equal(c_used[1], c[1])
    assert torch.allclose(x, closed_form_ddim(c, c_used, sde, z), atol=1e-10)


@pytest.mark.parametrize("fn, options", THRESHOLDED, ids=IDS)
def test_thresholding_keeps_the_nfe_when_it_acts(fn, options):
    sde = VPSDE(T=1.0, eps=1e-3)
    c = torch.full((4, 3), 2.5, dtype=torch.float64)
    counted = Recorded(point_mass_score(c, sde), sde)
    _, info = fn(counted, sde, torch.randn(4, 3, dtype=torch.float64), 5, torch.Generator().manual_seed(0),
                 threshold="dynamic", **options)
    assert counted.max_abs_d > 1.0 and info["nfe"] == counted.calls == 5 + int(fn is S.sde_dpm_solver_pp)


@pytest.mark.parametrize("key, value", [("threshold", "soft"), ("threshold", True), ("percentile", 0.0),
                                        ("percentile", 1.5), ("percentile", float("nan"))])
@pytest.mark.parametrize("cls", [S.DDIM, S.DPMSolverPP, S.SDEDPMSolverPP])
def test_bad_thresholding_options_name_the_key(cls, key, value):
    with pytest.raises(ConfigError) as error:
        cls(**{key: value})
    assert error.value.key == key


def test_thresholding_is_injectable_by_class_path():
    from jsonargparse import ArgumentError, ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--sampler", type=S.Sampler)
    config = parser.parse_object({"sampler": {"class_path": "difftime.samplers.SDEDPMSolverPP", "init_args": {
        "steps": 12, "threshold": "dynamic", "percentile": 0.99}}})
    sampler = parser.instantiate(config).sampler
    assert isinstance(sampler, S.SDEDPMSolverPP) and sampler.threshold == "dynamic" and sampler.percentile == 0.99
    with pytest.raises(ArgumentError, match="threshold"):  # the Literal type refuses other names at parse time
        parser.parse_object({"sampler": {"class_path": "difftime.samplers.DDIM", "init_args": {"threshold": "soft"}}})


# ---------------------------------------------------------------------- NFE without running the network
CONFIGS = [(name, {}) for name in S.SAMPLERS if name != "adaptive_ode"] + [
    ("predictor_corrector", {"corrector_steps": 3}), ("predictor_corrector", {"corrector_steps": 0}),
    ("dpm_solver_pp", {"order": 3}), ("sde_dpm_solver_pp", {"eta": 0.0, "denoise": False}),
    ("ddim", {"threshold": "clip", "denoise": True})]


@pytest.mark.parametrize("name, options", CONFIGS, ids=lambda v: str(v) if isinstance(v, str) else repr(v))
@pytest.mark.parametrize("flip_denoise", [False, True])
def test_nfe_is_the_count_of_score_calls_for_steps_1_to_40(name, options, flip_denoise):
    sampler = S.SAMPLERS[name](**options)
    if flip_denoise:
        sampler = S.SAMPLERS[name](**{**options, "denoise": not sampler.denoise})
    sde, calls = VPSDE(T=1.0, eps=1e-3), []

    def zero(x, t):
        calls.append(1)
        return torch.zeros_like(x)

    for steps in range(1, 41):
        calls.clear()
        _, info = sampler(zero, sde, torch.zeros(2, 2), steps, torch.Generator().manual_seed(0))
        assert sampler.nfe(steps) == info["nfe"] == len(calls), steps
    assert sampler.nfe() == sampler.nfe(sampler.steps)


def test_nfe_of_the_adaptive_solver_is_unknown_and_bad_steps_are_refused():
    assert S.AdaptiveODE().nfe(10) is None and S.SAMPLERS["adaptive_ode"]().nfe(3) is None
    with pytest.raises(ConfigError) as error:
        S.DDIM().nfe(0)
    assert error.value.key == "steps"
    assert S.DPMSolverPP(steps=8, schedule=LogSNR()).nfe() == 8
