"""BitsPerDim and KLGap callbacks against closed forms, invariances and the command line.

Gaussian data N(mu, diag(sigma^2)) with the exact (oracle) score have every logged quantity in
closed form. With q(x_t | x_0) = N(m x_0, s^2 I), v = m^2 sigma^2 + s^2 per dimension and the
prior N(0, I) at T (derivations in tests/test_likelihood.py):

    E[-ELBO]                      = H(data) + KL(q_T || N(0, I)) + sum_i 1/2 log(1 + s_eps^2 / (m_eps^2 sigma_i^2))
    E_x0 KL(q(x_T'|x_0) || N(0,I)) = sum_i 1/2 [s^2 + m^2 (mu_i^2 + sigma_i^2) - 1 - log s^2]   at T'
    E_x0 KL(q(x_T|x_0) || q_T)     = sum_i 1/2 log(v_i / s^2)   (mutual information I(x_0; x_T))

The probability-flow ODE of a diagonal Gaussian keeps z_i = (x_i - m mu_i) / sqrt(v_i) fixed,
so its flow map eps -> T is affine and log p_eps(x) = log nu(Phi(x)) + 1/2 sum_i log(v_T,i / v_eps,i).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from scipy import integrate

from callbacks import BitsPerDim, KLGap
from callbacks.bpd import DEQUANTIZE, ODE_PROBES, PerSampleMoments, elbo_bits
from datamodules import MLXtendMNISTDataModule, ToyDataModule
from difftime.likelihood import ElboTerms, elbo, ode_log_likelihood
from difftime.sde import VPSDE
from difftime.toy import Gaussian, OracleScore
from difftime.utils import ConfigError
from lightning_modules import ScoreModule

MU, SIGMA, DIM = [0.8, -0.5], [0.5, 0.3], 2
LN2D = DIM * math.log(2.0)


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*(does not have many workers|LeafSpec|sync_dist|litlogger|litmodels).*")
        yield


def coeffs(sde: VPSDE, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    m, s = sde.marginal_coeffs(torch.tensor([t], dtype=torch.float64))
    return m, s


def gaussian_case(T: float = 0.6, n_val: int = 1000, eval_batch_size: int = 250, n_test: int = 8):
    sde = VPSDE(T=T, eps=1e-3)
    data = Gaussian(dim=DIM, mean=MU, std=SIGMA)
    datamodule = ToyDataModule(distribution=data, n_train=8, n_val=n_val, n_test=n_test,
                               eval_batch_size=eval_batch_size)
    module = ScoreModule(net=OracleScore(data, sde), sde=sde, data_shape=(DIM,))
    return sde, data, datamodule, module


def validate(module, datamodule, callbacks, root: Path, **trainer_kwargs) -> dict[str, float]:
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, callbacks=callbacks, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(root), **trainer_kwargs)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return {key: float(value) for key, value in trainer.callback_metrics.items()}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------- closed forms
def mu_sigma() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(MU, dtype=torch.float64), torch.tensor(SIGMA, dtype=torch.float64)


def marginal_kl(sde: VPSDE, T: float) -> float:
    mu, sigma = mu_sigma()
    m, s = coeffs(sde, T)
    v = m**2 * sigma**2 + s**2
    return float(0.5 * (v + m**2 * mu**2 - 1 - torch.log(v)).sum())


def conditional_kl(sde: VPSDE, T: float) -> float:
    mu, sigma = mu_sigma()
    m, s = coeffs(sde, T)
    return float(0.5 * (s**2 + m**2 * (mu**2 + sigma**2) - 1 - torch.log(s**2)).sum())


def mutual_information(sde: VPSDE, T: float) -> float:
    _, sigma = mu_sigma()
    m, s = coeffs(sde, T)
    return float(0.5 * torch.log((m**2 * sigma**2 + s**2) / s**2).sum())


def decoder_gap(sde: VPSDE) -> float:
    _, sigma = mu_sigma()
    m, s = coeffs(sde, sde.eps)
    return float(0.5 * torch.log1p(s**2 / (m**2 * sigma**2)).sum())


def oracle_diffusion(sde: VPSDE, T: float) -> float:
    """1/2 int_eps^T g^2/s^2 sum_i m^2 sigma_i^2 / v_i dt by quadrature in log t."""
    _, sigma = mu_sigma()

    def integrand(log_t: float) -> float:
        t = torch.tensor([math.exp(log_t)], dtype=torch.float64)
        m, s, g = sde.mean_coeff(t), sde.marginal_std(t), sde.diffusion(t)
        return float(0.5 * t * g**2 / s**2 * (m**2 * sigma**2 / (m**2 * sigma**2 + s**2)).sum())

    return integrate.quad(integrand, math.log(sde.eps), math.log(T), limit=400, epsabs=1e-10, epsrel=1e-10)[0]


def ode_reference(sde: VPSDE, x: torch.Tensor, exact_prior: bool) -> torch.Tensor:
    """log p_eps(x) of the probability-flow model through the affine flow map (module docstring)."""
    mu, sigma = mu_sigma()
    (m0, s0), (m1, s1) = coeffs(sde, sde.eps), coeffs(sde, sde.T)
    v0, v1 = m0**2 * sigma**2 + s0**2, m1**2 * sigma**2 + s1**2
    x_T = m1 * mu + torch.sqrt(v1 / v0) * (x.double() - m0 * mu)
    if exact_prior:  # nu = q_T = N(m_T mu, diag v_T)
        log_nu = -0.5 * (((x_T - m1 * mu) ** 2 / v1) + torch.log(2 * math.pi * v1)).sum(1)
    else:
        log_nu = -0.5 * (x_T**2 + math.log(2 * math.pi)).sum(1)
    return log_nu + 0.5 * torch.log(v1 / v0).sum()


# ---------------------------------------------------------------------- units
def test_elbo_bits_identity_is_exact():
    g = torch.Generator().manual_seed(0)
    terms = ElboTerms(*(torch.rand(64, generator=g, dtype=torch.float64) * 100 for _ in range(5)))
    log_det = torch.full((64,), 784 * math.log(2 / 256), dtype=torch.float64)
    bits = elbo_bits(terms, log_det, 784)
    identity = bits["bpd_prior"] + bits["bpd_diffusion"] - bits["bpd_reconstruction"]
    assert torch.allclose(identity, bits["bpd_elbo"], rtol=0, atol=1e-12)
    assert torch.allclose(bits["bpd_elbo"], -(terms.total + log_det) / (784 * math.log(2)), rtol=1e-14)


def test_moments_mean_and_standard_error():
    values = torch.randn(101, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3 + 2
    metric = PerSampleMoments(("a",))
    metric.empty(torch.device("cpu"))
    for chunk in values.split(17):
        metric.update({"a": chunk})
    summary = metric.compute()
    assert float(summary["count"]) == 101
    assert torch.allclose(summary["mean"]["a"], values.mean())
    assert torch.allclose(summary["se"]["a"], values.std() / math.sqrt(101))


def test_bad_arguments_raise_config_errors():
    for kwargs, key in [({"n_t": 0}, "n_t"), ({"max_samples": 0}, "max_samples"),
                        ({"every_n_validations": 0}, "every_n_validations"), ({"ode_rtol": 0.0}, "ode_rtol")]:
        with pytest.raises(ConfigError, match=key):
            BitsPerDim(**kwargs)
    with pytest.raises(ConfigError, match="T_grid"):
        KLGap(T_grid=[])
    sde = VPSDE(T=0.6, eps=1e-3)
    with pytest.raises(ConfigError, match="T_grid"):
        KLGap(T_grid=[0.3, 0.9]).make_grid(sde.T, sde.eps)
    assert KLGap(T_grid=[0.3]).make_grid(sde.T, sde.eps) == [0.3, 0.6]
    assert KLGap(n_grid=3).make_grid(0.6, 1e-3) == pytest.approx([0.2, 0.4, 0.6])


# ---------------------------------------------------------------------- oracle closed forms
def test_oracle_gaussian_prior_matches_closed_forms(tmp_path):
    sde, data, datamodule, module = gaussian_case()
    grid = [0.1, 0.3]
    metrics = validate(module, datamodule, [BitsPerDim(n_t=16, ode=True, ode_max_samples=12),
                                            KLGap(T_grid=grid, max_samples=None, n_t=8)], tmp_path)
    T = sde.T
    expected = (data.entropy() + marginal_kl(sde, T) + decoder_gap(sde)) / LN2D
    assert abs(metrics["val/bpd_elbo"] - expected) < 4 * metrics["val/bpd_elbo_se"], (metrics, expected)
    assert 0 < metrics["val/bpd_elbo_mc_se"] < math.inf
    # the terms one by one (tighter than the total, whose SE holds the spread of log q_0 over data)
    assert abs(metrics["val/bpd_prior"] - conditional_kl(sde, T) / LN2D) < 4 * metrics["val/bpd_prior_se"]
    assert abs(metrics["val/bpd_diffusion"] - oracle_diffusion(sde, T) / LN2D) < 4 * metrics["val/bpd_diffusion_se"]
    parts = metrics["val/bpd_prior"] + metrics["val/bpd_diffusion"] - metrics["val/bpd_reconstruction"]
    assert parts == pytest.approx(metrics["val/bpd_elbo"], abs=1e-5)
    m, s = coeffs(sde, sde.eps)
    reconstruction = -0.5 * DIM * math.log(2 * math.pi * math.e * float(s) ** 2 / float(m) ** 2) / LN2D
    assert metrics["val/bpd_reconstruction"] == pytest.approx(reconstruction, rel=1e-5)

    # KL gap curve: the CSV holds every T' (the model's T added) with standard errors
    rows = read_csv(tmp_path / "kl_gap" / "step=00000000.csv")
    assert [float(r["T"]) for r in rows] == [0.1, 0.3, T] and {r["prior"] for r in rows} == {"gaussian"}
    for row in rows:
        t, label = float(row["T"]), f"T={float(row['T']):.3f}"
        prior, prior_se = float(row["prior_bpd"]), float(row["prior_se"])
        assert abs(prior - conditional_kl(sde, t) / LN2D) < 4 * prior_se, (t, prior, prior_se)
        diffusion, diffusion_se = float(row["diffusion_bpd"]), float(row["diffusion_se"])
        assert abs(diffusion - oracle_diffusion(sde, t) / LN2D) < 4 * diffusion_se, (t, diffusion)
        total = float(row["total_bpd"])
        assert total == pytest.approx(prior + diffusion - metrics["val/bpd_reconstruction"], abs=1e-5)
        assert metrics[f"val_kl_gap_by_T/prior/{label}"] == pytest.approx(prior, rel=1e-6)
        assert metrics[f"val_kl_gap_by_T/bpd/{label}"] == pytest.approx(total, rel=1e-6)
    # the prior term at T is a closed form per datum: the same in both callbacks
    assert metrics[f"val_kl_gap_by_T/prior/T={T:.3f}"] == pytest.approx(metrics["val/bpd_prior"], rel=1e-6)
    assert metrics["val_kl_gap/T_star"] == pytest.approx(T)  # exact score: only the prior gap changes with T'

    # ODE on the first 12 validation points: the oracle's drift Jacobian is diagonal, so one
    # Hutchinson probe is exact and only the solver tolerance remains
    x = datamodule.val_set.data[:12]
    reference = float(-ode_reference(sde, x, exact_prior=False).mean() / LN2D)
    assert metrics["val/bpd_ode"] == pytest.approx(reference, abs=2e-3)
    assert metrics["val/bpd_ode_se"] > 0 and metrics["val/bpd_ode_nfe"] >= 6


def test_oracle_auxiliary_prior_decomposition(tmp_path):
    """An exact q_T as the module's prior (not a GaussianPrior) takes the auxiliary-prior path."""
    sde, data, datamodule, module = gaussian_case(n_val=800)
    module.prior = data.at_time(sde, sde.T)
    metrics = validate(module, datamodule, [BitsPerDim(n_t=16, n_prior=8, ode=True, ode_max_samples=8),
                                            KLGap(T_grid=[0.3], max_samples=None, n_t=8, n_prior=8)], tmp_path)
    expected = (data.entropy() + decoder_gap(sde)) / LN2D  # no prior gap with the exact q_T
    assert abs(metrics["val/bpd_elbo"] - expected) < 4 * metrics["val/bpd_elbo_se"], (metrics, expected)
    rows = read_csv(tmp_path / "kl_gap" / "step=00000000.csv")
    aux = [r for r in rows if r["prior"] != "gaussian"]
    assert len(aux) == 1 and aux[0]["prior"] == "aux:GaussianMixture" and float(aux[0]["T"]) == sde.T
    prior, prior_se = float(aux[0]["prior_bpd"]), float(aux[0]["prior_se"])
    assert abs(prior - mutual_information(sde, sde.T) / LN2D) < 4 * prior_se, (prior, prior_se)
    label = f"T={sde.T:.3f}"
    assert metrics[f"val_kl_gap_by_T/aux_prior/{label}"] == pytest.approx(prior, rel=1e-6)
    assert metrics[f"val_kl_gap_by_T/aux_bpd/{label}"] < metrics[f"val_kl_gap_by_T/bpd/{label}"]  # by KL(q_T || N(0, I)) = 0.06 bpd
    x = datamodule.val_set.data[:8]
    exact = float(-data.at_time(sde, sde.eps).log_prob(x).mean() / LN2D)
    assert float(-ode_reference(sde, x, exact_prior=True).mean() / LN2D) == pytest.approx(exact, abs=1e-9)
    assert metrics["val/bpd_ode"] == pytest.approx(exact, abs=2e-3)


def test_test_stage_logs_test_keys(tmp_path):
    sde, data, datamodule, module = gaussian_case(n_test=600, eval_batch_size=200)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path),
                      callbacks=[BitsPerDim(n_t=8, ode=False), KLGap(T_grid=[0.3], max_samples=None)])
    trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    expected = (data.entropy() + marginal_kl(sde, sde.T) + decoder_gap(sde)) / LN2D
    assert abs(metrics["test/bpd_elbo"] - expected) < 4 * metrics["test/bpd_elbo_se"], (metrics, expected)
    assert not any(key.startswith(("val/", "val_kl_gap", "test/bpd_ode")) for key in metrics), metrics  # validation only


# ---------------------------------------------------------------------- invariances
def test_results_do_not_depend_on_batch_size(tmp_path):
    results = []
    for batch in (50, 100):
        _, _, datamodule, module = gaussian_case(n_val=200, eval_batch_size=batch)
        callbacks = [BitsPerDim(n_t=4, ode=True, ode_max_samples=8), KLGap(T_grid=[0.2], max_samples=150, n_t=2)]
        results.append(validate(module, datamodule, callbacks, tmp_path / str(batch)))
    assert results[0].keys() == results[1].keys() and "val/bpd_ode" in results[0]
    for key, value in results[0].items():
        assert value == pytest.approx(results[1][key], rel=1e-6, abs=1e-9), key


WORLD_SCRIPT = """
import json, sys, warnings
warnings.filterwarnings("ignore")
from lightning.pytorch import Trainer
from test_metric_callbacks import gaussian_case, world_size_callbacks
_, _, datamodule, module = gaussian_case(n_val=120, eval_batch_size=40)
trainer = Trainer(accelerator="cpu", devices=int(sys.argv[1]), strategy=sys.argv[2], logger=False,
                  enable_progress_bar=False, enable_model_summary=False, default_root_dir=sys.argv[3],
                  callbacks=world_size_callbacks())
trainer.validate(module, datamodule=datamodule, verbose=False)
if trainer.is_global_zero:
    json.dump({k: float(v) for k, v in trainer.callback_metrics.items()}, open(sys.argv[4], "w"))
"""


def world_size_callbacks() -> list:
    return [BitsPerDim(n_t=4, max_samples=100, ode=False), KLGap(T_grid=[0.2], max_samples=90, n_t=2)]


def test_results_do_not_depend_on_world_size(tmp_path):
    """Two CPU processes (DDP over gloo) give the one-process numbers: per-sample sums and counts
    are reduced over ranks (rank 1 holds samples 60..119, of which 60..99 count), none computed alone."""
    _, _, datamodule, module = gaussian_case(n_val=120, eval_batch_size=40)
    single = validate(module, datamodule, world_size_callbacks(), tmp_path / "one")
    script, out = tmp_path / "world.py", tmp_path / "two.json"
    script.write_text(WORLD_SCRIPT)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    result = subprocess.run([sys.executable, str(script), "2", "ddp", str(tmp_path / "two"), str(out)], cwd=root,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    double = json.loads(out.read_text())
    assert single.keys() == double.keys()
    for key, value in single.items():
        assert value == pytest.approx(double[key], rel=1e-6, abs=1e-9), key


# ---------------------------------------------------------------------- 8-bit images
class TinyNet(torch.nn.Module):
    """A small conv noise predictor with random (not identity) weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 1, 3, padding=1)
        torch.nn.init.normal_(self.conv.weight, std=0.3, generator=torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([x, t.view(-1, 1, 1, 1).expand_as(x)], dim=1))


def test_image_bits_use_the_8bit_log_det(tmp_path):
    sde = VPSDE(T=1.0, eps=1e-3)
    datamodule = MLXtendMNISTDataModule(eval_batch_size=4)
    module = ScoreModule(net=TinyNet(), sde=sde, data_shape=(1, 28, 28), ema_decay=0.0)
    callback = BitsPerDim(n_t=3, max_samples=4, ode=True, ode_max_samples=2, ode_rtol=1e-4, ode_atol=1e-4)
    metrics = validate(module, datamodule, [callback], tmp_path, limit_val_batches=1)

    # direct computation on the same four images with the same per-sample noise
    x, dim = datamodule.val_set.data[:4], 784
    ids = torch.arange(4)
    noise = callback.noise(ids, DEQUANTIZE, torch.device("cpu"))
    u = noise.rand(x.shape, torch.device("cpu"))
    y = 2.0 * (x.float() + u) / 256.0 - 1.0
    log_det = dim * math.log(2.0 / 256.0)  # density on [-1, 1] per unit cell of 8-bit levels
    terms = elbo(module.score_fn(), sde, module.prior, y, n_t=3, generator=noise)
    bpd = float((-(terms.total.double() + log_det) / (dim * math.log(2))).mean())
    assert metrics["val/bpd_elbo"] == pytest.approx(bpd, rel=1e-6)
    reconstruction = float((terms.reconstruction[0] + log_det) / (dim * math.log(2)))
    assert metrics["val/bpd_reconstruction"] == pytest.approx(reconstruction, rel=1e-6)
    ode = ode_log_likelihood(module.score_fn(), sde, module.prior, y[:2], rtol=1e-4, atol=1e-4,
                             generator=callback.noise(ids[:2], ODE_PROBES, torch.device("cpu")))
    ode_bpd = float((-(ode.log_prob.double() + log_det) / (dim * math.log(2))).mean())
    assert metrics["val/bpd_ode"] == pytest.approx(ode_bpd, rel=1e-6)


# ---------------------------------------------------------------------- command line
EXTRA = """
trainer:
  callbacks:
    - class_path: callbacks.SampleGrid
      init_args: {every_n_steps: 2, n: 4, batch_size: 4}
    - class_path: callbacks.BitsPerDim
      init_args:
        n_t: 2
        max_samples: 4
        ode: true           # off by default
        ode_max_samples: 2
        ode_method: euler   # one step eps -> T: the wiring, not the accuracy, is tested here
        ode_every_n_validations: 2
    - class_path: callbacks.KLGap
      init_args: {T_grid: [0.5], max_samples: 4, n_t: 1}
FID
"""
FID = """    - class_path: callbacks.FID
      init_args:
        every_n_steps: 2
        every_n_epochs: null
        num_samples: 8
        batch_size: 8
        num_reference: 8
        cache_dir: null
        feature_extractor: {class_path: callbacks.fid.RandomConvFeatures, init_args: {widths: [4, 8]}}
"""


def test_fit_writes_every_key_to_tensorboard_and_csv(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from commands import cli as train

    has_fid = Path(__file__).resolve().parents[1].joinpath("callbacks", "fid.py").exists()
    (tmp_path / "extra.yaml").write_text(EXTRA.replace("FID\n", FID if has_fid else ""))
    net = "--model.init_args.net.init_args."
    train.main(args=[
        "fit", "--config", "configs/quickstart.yaml", "--config", str(tmp_path / "extra.yaml"),
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
        "--trainer.limit_val_batches", "2",  # the CLI parses int | float "1" as 1.0 = every batch
        "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--model.init_args.sampler.init_args.steps", "5", "--data.init_args.batch_size", "8",
        "--data.init_args.eval_batch_size", "4",
        f"{net}nf", "8", f"{net}ch_mult", "[1]", f"{net}attn_resolutions", "[]",
    ])
    run = tmp_path / "runs" / "quickstart" / "default"
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {f"val/bpd_{name}" for name in ("elbo", "elbo_se", "elbo_mc_se", "prior", "prior_se", "diffusion",
                                               "diffusion_se", "reconstruction", "ode", "ode_se", "ode_nfe")}
    expected |= {f"val_kl_gap_by_T/{part}/T={T}" for part in ("prior", "diffusion", "bpd") for T in ("0.500", "1.000")}
    expected |= {"val_kl_gap/T_star", "val_kl_gap/bpd_star"} | ({"val/fid"} if has_fid else set())
    assert expected <= scalars, expected - scalars
    assert len(events.Scalars("val/bpd_elbo")) == 2  # both validations (steps 2 and 4)
    assert len(events.Scalars("val/bpd_ode")) == 1  # every second validation only
    checkpoint = torch.load(run / "checkpoints" / "epoch=0-step=4.ckpt", map_location="cpu", weights_only=True)
    states = {key: value for key, value in checkpoint["callbacks"].items() if key.startswith(("BitsPerDim", "KLGap"))}
    assert sorted(states.values(), key=str) == [{"validations": 2}] * 2  # interval state only, no metric tensors
    assert "val_kl_gap/curves" in events.Tags()["images"]
    for step in (2, 4):
        rows = read_csv(run / "kl_gap" / f"step={step:08d}.csv")
        assert list(rows[0]) == ["T", "prior_bpd", "prior_se", "diffusion_bpd", "diffusion_se", "reconstruction_bpd",
                                 "reconstruction_se", "total_bpd", "total_se", "prior"]
        assert [float(r["T"]) for r in rows] == [0.5, 1.0]
        assert all(math.isfinite(float(r["total_bpd"])) for r in rows)


def test_vae_prior_is_seeded_per_sample(tmp_path):
    """A VAE prior's bound is stochastic: BitsPerDim and KLGap draw its noise from the per-sample
    seeds too, so the same seed gives the same bits/dim whatever the batch size (it was unseeded)."""
    from difftime.aux_priors import MLPVAEPrior

    torch.manual_seed(0)
    vae = MLPVAEPrior(dim=DIM, latent_dim=1, hidden=8, bound="iwae", k=4)
    results = []
    for eval_batch_size in (100, 40):
        sde, data, datamodule, module = gaussian_case(n_val=200, eval_batch_size=eval_batch_size)
        module.prior = vae
        callbacks = [BitsPerDim(n_t=2, n_prior=2, ode=False), KLGap(T_grid=[0.3], max_samples=None, n_t=2, n_prior=2)]
        metrics = validate(module, datamodule, callbacks, tmp_path / str(eval_batch_size))
        results.append((metrics["val/bpd_elbo"], metrics["val/bpd_prior"], metrics[f"val_kl_gap_by_T/aux_prior/T={sde.T:.3f}"]))
    assert results[0] == pytest.approx(results[1], rel=1e-9, abs=1e-9), results
