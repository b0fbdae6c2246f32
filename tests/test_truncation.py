"""Post-hoc truncation (Franzese et al. 2023, Sec. 4): a score model trained on [eps, T_max],
evaluated and sampled from T' < T_max, checked against closed forms on Gaussian data with the
oracle score (formulas in tests/test_metric_callbacks.py)."""

from __future__ import annotations

import math

import pytest
import torch

from callbacks import BitsPerDim
from difftime.samplers import EulerMaruyama
from difftime.sde import VPSDE
from difftime.toy import GaussianMixture, OracleScore
from difftime.utils import ConfigError
from lightning_modules import ScoreModule
from test_metric_callbacks import (DIM, LN2D, conditional_kl, decoder_gap, gaussian_case, marginal_kl,
                                   oracle_diffusion, validate)

T_MAX, T_EVAL = 1.0, 0.4


def test_truncated_sampling_from_exact_q_T_reproduces_the_data():
    """Trained on [eps, 1], sampled from T' = 0.4 with the exact q_T' as prior: the data's moments."""
    sde = VPSDE(T=T_MAX, eps=1e-3)
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=torch.float64)
    data = GaussianMixture(torch.ones(1), torch.tensor([[1.5, -1.0]]), cov[None])
    q_T = data.at_time(sde, T_EVAL)
    module = ScoreModule(OracleScore(data, sde), sde, data_shape=(2,), sampler=EulerMaruyama(steps=200),
                         prior=q_T, eval_T=T_EVAL)
    assert module.sde.T == T_MAX and module.eval_sde.T == T_EVAL
    calls = []
    start = lambda score_fn, sde, x_T, steps=None, generator=None, callback=None: calls.append(sde.T) or (x_T, {"nfe": 0})
    module.sample(4, torch.Generator().manual_seed(0), sampler=start)
    assert calls == [T_EVAL]  # the reverse process starts at T'
    x, info = module.sample(4000, torch.Generator().manual_seed(1))
    assert info["T"] == T_EVAL
    x = x.double()
    mean_se = (cov.diagonal() / 4000).sqrt()
    assert torch.all((x.mean(0) - data.mean()).abs() < 5 * mean_se + 0.03), x.mean(0)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.08), torch.cov(x.T)


def test_truncated_elbo_matches_the_closed_form_at_T_prime(tmp_path):
    """BitsPerDim of a T_max model with eval_T = T': prior term at T', diffusion term on [eps, T']."""
    sde, data, datamodule, _ = gaussian_case(T=T_MAX)
    module = ScoreModule(net=OracleScore(data, sde), sde=sde, data_shape=(DIM,), eval_T=T_EVAL)
    metrics = validate(module, datamodule, [BitsPerDim(n_t=16, ode=False)], tmp_path)
    truncated = sde.with_T(T_EVAL)
    expected = (data.entropy() + marginal_kl(truncated, T_EVAL) + decoder_gap(truncated)) / LN2D
    assert abs(metrics["val/bpd_elbo"] - expected) < 4 * metrics["val/bpd_elbo_se"], (metrics, expected)
    assert abs(metrics["val/bpd_prior"] - conditional_kl(truncated, T_EVAL) / LN2D) < 4 * metrics["val/bpd_prior_se"]
    diffusion = oracle_diffusion(truncated, T_EVAL) / LN2D
    assert abs(metrics["val/bpd_diffusion"] - diffusion) < 4 * metrics["val/bpd_diffusion_se"]
    untruncated = conditional_kl(sde, T_MAX) / LN2D  # the prior term at T_max: far from the one at T'
    assert abs(metrics["val/bpd_prior"] - untruncated) > 20 * metrics["val/bpd_prior_se"] + 0.05


@pytest.mark.parametrize("eval_T", [1e-3, 0.0, 1.2, -0.5])
def test_truncation_outside_eps_T_max_is_refused(eval_T):
    sde = VPSDE(T=T_MAX, eps=1e-3)
    data = GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.eye(2)[None])
    with pytest.raises(ConfigError, match=r"eval_T.*\(0\.001, 1\]"):
        ScoreModule(OracleScore(data, sde), sde, data_shape=(2,), eval_T=eval_T)


def test_prior_at_another_T_is_refused_with_both_values():
    """A prior fitted at T = 0.6 cannot start a process truncated at T' = 0.4."""
    sde = VPSDE(T=T_MAX, eps=1e-3)
    data = GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.eye(2)[None])

    class Fitted(torch.nn.Module):  # what AuxPriorCheckpoint exposes of a checkpoint
        exact, bound_name, event_shape, path = True, None, (2,), "aux.ckpt"
        trained_for = sde.with_T(0.6).hparams()

        def sample(self, n, generator=None):
            return torch.zeros(n, 2)

        def log_prob(self, x, generator=None):
            return torch.zeros(x.shape[0])

    with pytest.raises(ValueError, match=r"aux\.ckpt was trained for VPSDE\(T=0\.6.*uses VPSDE\(T=0\.4"):
        ScoreModule(OracleScore(data, sde), sde, data_shape=(2,), prior=Fitted(), eval_T=T_EVAL)
    ScoreModule(OracleScore(data, sde), sde, data_shape=(2,), prior=Fitted(), eval_T=0.6)  # the matching T'


def fitted_prior(sde: VPSDE, T: float, path: str) -> torch.nn.Module:
    """What AuxPriorCheckpoint exposes of a checkpoint fitted at ``T`` (2-D data)."""
    class Fitted(torch.nn.Module):
        exact, bound_name, event_shape = True, None, (2,)
        trained_for = sde.with_T(T).hparams()

        def sample(self, n, generator=None):
            return torch.zeros(n, 2)

        def log_prob(self, x, generator=None):
            return torch.zeros(x.shape[0])

    prior = Fitted()
    prior.path = path
    return prior


@pytest.mark.parametrize("prior_T,eval_T,train_with", [
    (0.6, 0.4, "--config configs/T/0.4.yaml"),  # a configs/T file exists for T' = 0.4
    (0.6, 0.3, "--model.init_args.sde.init_args.T 0.3 --trainer.logger.init_args.version T0.3"),
])
def test_prior_at_another_T_names_the_ways_out_in_one_line(prior_T, eval_T, train_with):
    """The refusal says: the Gaussian prior at T', the prior's own T, or the command that trains a prior at T'."""
    sde = VPSDE(T=T_MAX, eps=1e-3)
    data = GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.eye(2)[None])
    prior = fitted_prior(sde, prior_T, f"runs/aux_digits8x8_glow/T{prior_T:g}/checkpoints/last.ckpt")
    with pytest.raises(ValueError) as info:
        ScoreModule(OracleScore(data, sde), sde, data_shape=(2,), prior=prior, eval_T=eval_T)
    message = str(info.value)
    assert "\n" not in message and info.value.__context__ is None and info.value.__cause__ is None
    assert f"trained for VPSDE(T={prior_T:g}" in message and f"this prior exists at T = {prior_T:g} only" in message
    assert "--prior gaussian" in message and f"--eval_T {prior_T:g}" in message
    assert f"python train.py fit --config configs/aux/digits8x8_glow.yaml {train_with})" in message


def test_prior_beyond_the_trained_T_is_not_offered_as_a_truncation():
    """A prior at T = 0.6 cannot serve a score model trained up to T = 0.5: no --eval_T 0.6 advice."""
    sde = VPSDE(T=0.5, eps=1e-3)
    data = GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.eye(2)[None])
    with pytest.raises(ValueError) as info:
        ScoreModule(OracleScore(data, sde), sde, data_shape=(2,), prior=fitted_prior(sde, 0.6, "aux.ckpt"), eval_T=0.4)
    assert "--prior gaussian" in str(info.value) and "--eval_T" not in str(info.value)
    assert "configs/aux/<data>_<flow>.yaml" in str(info.value)  # the prior's config is not known from its path


def test_eval_T_above_the_trained_T_says_where_both_come_from():
    """The bound is the score model's own T, and the key is the one sample.py --eval_T sets."""
    sde = VPSDE(T=0.4, eps=1e-3)
    data = GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.eye(2)[None])
    with pytest.raises(ConfigError) as info:
        ScoreModule(OracleScore(data, sde), sde, data_shape=(2,), eval_T=0.5)
    message = str(info.value)
    assert "set by sample.py --eval_T" in message and "(0.001, 0.4]" in message
    assert "trained up to T = 0.4" in message and "\n" not in message
