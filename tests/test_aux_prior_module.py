"""AuxPriorModule and AuxPriorCheckpoint (Franzese et al. 2023, Sec. 3), checked against Gaussian data
whose diffused marginal q_T is closed form: its entropy, the prior term E KL(q(x_T | x_0) || nu)
of the exact q_T (the mutual information I(x_0; x_T)) and of N(0, I), and the oracle score."""

from __future__ import annotations

import math
import shutil
from functools import partial
from pathlib import Path

import lightning
import pytest
import torch

from difftime.checkpoints import CorruptCheckpointError
from datamodules import ToyDataModule
from difftime.aux_priors import GlowPrior, MLPVAEPrior, RealNVPPrior
from difftime.networks import MLP
from difftime.sde import VPSDE
from difftime.samplers import EulerMaruyama
from difftime.toy import Gaussian, GaussianMixture, OracleScore
from lightning_modules import AuxPriorModule, ScoreModule
from difftime.aux_priors import AuxPriorCheckpoint
from difftime.priors import check_prior

ROOT = Path(__file__).resolve().parents[1]
T = 0.4
MEAN, STD = [2.0, -1.5], [0.6, 0.3]
LN2 = math.log(2.0)


def load_aux_prior(path: str, sde: VPSDE, shape: tuple[int, ...]) -> AuxPriorCheckpoint:
    """The prior of an AuxPriorModule checkpoint, checked as a ScoreModule checks it."""
    prior = AuxPriorCheckpoint(path)
    check_prior(prior, sde.hparams(), shape)
    return prior


def make_trainer(**kwargs) -> lightning.Trainer:
    return lightning.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, use_distributed_sampler=False, **kwargs)


def gaussian_terms(sde: VPSDE) -> dict[str, float]:
    """Closed forms for x_0 ~ N(MEAN, diag(STD^2)) and q(x_T | x_0) = N(m x_0, s^2 I), in nats.

    q_T = N(m MEAN, diag(m^2 STD^2 + s^2)). E_{x_0} KL(q(x_T|x_0) || q_T) = I(x_0; x_T)
    = sum_i log(v_i / s^2) / 2; E_{x_0} KL(q(x_T|x_0) || N(0, I)) = sum_i (s^2 + m^2 E[x_0i^2] - 1 - log s^2) / 2.
    """
    m, s = (float(c) for c in sde.marginal_coeffs(torch.tensor([T], dtype=torch.float64)))
    var = [m**2 * sd**2 + s**2 for sd in STD]
    return {
        "mutual_info": sum(0.5 * math.log(v / s**2) for v in var),
        "kl_gaussian": sum(0.5 * (s**2 + m**2 * (mu**2 + sd**2) - 1 - math.log(s**2)) for mu, sd in zip(MEAN, STD)),
    }


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """RealNVP fitted to q_T of Gaussian data at T = 0.4 (300 Adam steps), validated, checkpointed."""
    sde = VPSDE(T=T, eps=1e-3)
    data = Gaussian(dim=2, mean=MEAN, std=STD)
    dm = ToyDataModule(data, n_train=8192, n_val=8192, n_test=8, batch_size=256, eval_batch_size=4096)
    torch.manual_seed(0)
    model = AuxPriorModule(RealNVPPrior(dim=2, layers=4, hidden=32), sde, data_shape=(2,),
                           optimizer=partial(torch.optim.Adam, lr=5e-3))
    trainer = make_trainer(max_steps=300, limit_val_batches=0)
    trainer.fit(model, dm)
    metrics = make_trainer().validate(model, dm, verbose=False)[0]
    path = tmp_path_factory.mktemp("aux") / "prior.ckpt"
    trainer.save_checkpoint(path)
    return {"model": model, "sde": sde, "data": data, "metrics": metrics, "path": path}


# ---------------------------------------------------------------------- maximum likelihood on q_T
def test_learned_prior_reaches_the_entropy_of_q_T(fitted):
    """Cross-entropy E_{q_T}[-log nu] = H(q_T) + KL(q_T || nu) >= H(q_T); the fit comes close.

    val/nll_bpd is a mean over 8192 held-out x_T (standard error about 0.008 bits/dim); a paired
    estimate E[log q_T - log nu] on 20,000 exact q_T samples gives KL(q_T || nu) itself.
    """
    q_T = fitted["data"].at_time(fitted["sde"], T)
    entropy_bpd = q_T.entropy() / (2 * LN2)
    assert abs(fitted["metrics"]["val/nll_bpd"] - entropy_bpd) < 0.03
    x = q_T.sample(20_000, torch.Generator().manual_seed(5))
    with torch.no_grad():
        kl = q_T.log_prob(x) - fitted["model"].prior.log_prob(x).double()
    se = (kl.std() / math.sqrt(len(kl))).item()
    assert -3 * se < kl.mean().item() < 0.03  # nats; the fit is trained on q_T, not on the data


def test_prior_terms_match_closed_forms_and_the_gain_is_visible(fitted):
    """val/kl_prior_bpd = (I(x_0; x_T) + KL(q_T || nu)) / (D ln 2) >= I / (D ln 2); the Gaussian
    prior's term has a closed form. With the data's mean at (2, -1.5) the learned prior's term is
    about 0.05 bits/dim against 0.49 for N(0, I) (the irreducible part I is 0.038)."""
    terms = {k: v / (2 * LN2) for k, v in gaussian_terms(fitted["sde"]).items()}
    metrics = fitted["metrics"]
    assert metrics["val/kl_prior_gaussian_bpd"] == pytest.approx(terms["kl_gaussian"], abs=0.01)
    assert terms["mutual_info"] - 0.025 < metrics["val/kl_prior_bpd"] < terms["mutual_info"] + 0.03
    assert metrics["val/kl_prior_bpd"] < 0.25 * metrics["val/kl_prior_gaussian_bpd"]


def test_oracle_score_needs_q_T_as_prior_at_short_T():
    """Sampling from T = 0.4 with the exact score: the exact q_T as prior reproduces the data's
    mean and covariance; N(0, I) as prior does not (its x_T is off by m(T) mu and the reverse
    SDE carries that error back to x_0)."""
    sde = VPSDE(T=T, eps=1e-3)
    cov = torch.tensor([[4.0, 1.2], [1.2, 1.0]], dtype=torch.float64)
    data = GaussianMixture(torch.ones(1), torch.tensor([[1.5, -1.0]]), cov[None])
    module = ScoreModule(OracleScore(data, sde), sde, data_shape=(2,), sampler=EulerMaruyama(steps=100))
    n, errors = 4000, {}
    for name, prior in (("q_T", data.at_time(sde, T)), ("gaussian", sde.prior((2,)))):
        x, info = module.sample(n, torch.Generator().manual_seed(1), prior=prior)
        assert info["prior"] == {"q_T": "GaussianMixture", "gaussian": "gaussian"}[name] and info["T"] == T
        x = x.double()
        errors[name] = ((x.mean(0) - data.mean()).norm().item(),
                        (torch.cov(x.T) - data.covariance()).norm().item() / cov.norm().item())
    # standard errors at n = 4000: mean about sqrt(5 / 4000) = 0.035 in norm, covariance about
    # 0.03 relative. Measured: q_T 0.003 and 0.011; N(0, I) 0.60 and 0.20.
    assert errors["q_T"][0] < 0.12 and errors["q_T"][1] < 0.09, errors
    assert errors["gaussian"][0] > 0.4 and errors["gaussian"][1] > 0.12, errors


# ---------------------------------------------------------------------- checkpoints and ScoreModule
def test_checkpoint_records_plain_hyperparameters(fitted):
    hp = torch.load(fitted["path"], weights_only=True)["hyper_parameters"]
    assert hp["prior_spec"] == {"class_path": "difftime.aux_priors.flows.RealNVPPrior",
                                "init_args": {"dim": 2, "layers": 4, "hidden": 32}}
    assert hp["sde_hparams"] == {"class": "VPSDE", "T": T, "eps": 1e-3, "beta_min": 0.1, "beta_max": 20.0}
    assert hp["data_shape"] == [2] and hp["prior_exact"] is True and hp["prior_bound"] is None


def test_loaded_prior_is_frozen_and_identical(fitted):
    prior = load_aux_prior(str(fitted["path"]), VPSDE(T=T, eps=1e-5), (2,))  # eps does not change q_T
    assert not prior.training and not any(p.requires_grad for p in prior.parameters())
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(prior.log_prob(x), fitted["model"].prior.log_prob(x))


@pytest.mark.parametrize("sde, shape, fragments", [
    (VPSDE(T=0.6), (2,), ["VPSDE(T=0.4", "VPSDE(T=0.6"]),
    (VPSDE(T=T, beta_max=10.0), (2,), ["beta_max=20", "beta_max=10"]),
    (VPSDE(T=T), (3,), ["(2,)", "(3,)"]),
])
def test_prior_score_mismatch_names_both_values(fitted, sde, shape, fragments):
    with pytest.raises(ValueError, match="auxiliary prior") as error:
        load_aux_prior(str(fitted["path"]), sde, shape)
    assert str(fitted["path"]) in str(error.value)
    assert all(f in str(error.value) for f in fragments), str(error.value)
    with pytest.raises(ValueError, match="auxiliary prior"):
        ScoreModule(MLP(dim=shape[0], hidden=8, depth=1), sde, data_shape=shape,
                    prior=AuxPriorCheckpoint(str(fitted["path"])))


def test_corrupted_prior_checkpoint_names_the_file(fitted, tmp_path):
    damaged = tmp_path / "damaged.ckpt"
    shutil.copy(fitted["path"], damaged)
    raw = bytearray(damaged.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside a stored tensor: only the zip CRC can notice
    damaged.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match=str(damaged)):
        load_aux_prior(str(damaged), VPSDE(T=T), (2,))


def test_score_module_samples_from_the_learned_prior(fitted):
    """``ScoreModule(prior=path)``: the frozen learned prior feeds the sampler; only the network
    is optimised and the prior's weights do not move in training."""
    sde = VPSDE(T=T, eps=1e-3)
    torch.manual_seed(0)
    module = ScoreModule(MLP(dim=2, hidden=16, depth=1), sde, data_shape=(2,), prior=AuxPriorCheckpoint(str(fitted["path"])))
    assert not any(p.requires_grad for p in module.prior.parameters())
    optimizer = module.configure_optimizers()
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.net.parameters()}
    assert optimised.isdisjoint(id(p) for p in module.prior.parameters())

    start = lambda score_fn, sde, x_T, steps=None, generator=None, callback=None: (x_T, {"nfe": 0})
    x_T, info = module.sample(4000, torch.Generator().manual_seed(3), sampler=start)
    assert info["prior"] == f"RealNVPPrior ({fitted['path']})"
    assert torch.equal(x_T, fitted["model"].prior.sample(4000, torch.Generator().manual_seed(3)))
    q_T = fitted["data"].at_time(sde, T)  # the learned prior's draws follow q_T, not N(0, I)
    assert torch.allclose(x_T.double().mean(0), q_T.mean(), atol=0.08)

    before = {k: v.clone() for k, v in module.prior.state_dict().items()}
    dm = ToyDataModule(fitted["data"], n_train=64, n_val=8, n_test=8, batch_size=32)
    make_trainer(max_steps=2, limit_val_batches=0).fit(module, dm)
    assert all(torch.equal(before[k], v) for k, v in module.prior.state_dict().items())


# ---------------------------------------------------------------------- faults and initialisation
class Probe(lightning.Callback):
    """Puts a NaN into the training batch of step ``at`` (if any); records the loss and the prior's
    weights after every step and ActNorm's init flags when training starts."""

    def __init__(self, at: int | None = None) -> None:
        self.at, self.weights, self.losses, self.actnorm_at_start = at, [], [], None

    def on_train_start(self, trainer, pl_module):
        self.actnorm_at_start = {k: v.clone() for k, v in pl_module.prior.state_dict().items() if "data_dep" in k}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.at:
            batch[0, 0, 1, 2] = float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(pl_module._last_loss))
        self.weights.append({k: v.detach().clone() for k, v in pl_module.prior.named_parameters()})


def test_nan_in_glow_never_reaches_the_weights():
    sde = VPSDE(T=T, eps=1e-3)
    data = Gaussian(dim=16, mean=0.5, std=0.7, event_shape=[1, 4, 4])
    dm = ToyDataModule(data, n_train=256, n_val=8, n_test=8, batch_size=16)
    torch.manual_seed(0)
    prior = GlowPrior((1, 4, 4), levels=1, blocks_per_level=2, hidden_channels=8)
    module = AuxPriorModule(prior, sde, data_shape=(1, 4, 4), optimizer=partial(torch.optim.Adam, lr=1e-2))
    probe = Probe(at=2)
    trainer = make_trainer(max_steps=4, limit_val_batches=0, callbacks=[probe], gradient_clip_val=1.0)
    trainer.fit(module, dm)
    # ActNorm was initialised in on_fit_start, before the first training step
    assert probe.actnorm_at_start and all(bool(v.all()) for v in probe.actnorm_at_start.values())
    assert math.isnan(probe.losses[2]) and all(math.isfinite(v) for i, v in enumerate(probe.losses) if i != 2)
    assert int(module.skipped_steps) == 1 and trainer.global_step == 4
    w = probe.weights
    assert all(torch.equal(w[2][k], w[1][k]) for k in w[1])  # the faulty step changed nothing
    assert any(not torch.equal(w[3][k], w[2][k]) for k in w[2])  # the next one trains again
    assert all(torch.isfinite(p).all() for p in module.prior.parameters())
    state = trainer.optimizers[0].state_dict()["state"].values()
    assert all(torch.isfinite(s["exp_avg"]).all() and torch.isfinite(s["exp_avg_sq"]).all() for s in state)


def test_mixed_precision_leaves_the_density_in_fp32():
    """Under bf16-mixed autocast would run the flow's coupling MLPs in bf16; the module and the
    priors keep x_T and log nu in fp32 outside autocast, so the run matches 32-true step by step."""
    sde = VPSDE(T=T, eps=1e-3)
    dm = ToyDataModule(Gaussian(dim=2, mean=MEAN, std=STD), n_train=256, n_val=8, n_test=8, batch_size=64)
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        torch.manual_seed(0)
        module = AuxPriorModule(RealNVPPrior(dim=2, layers=2, hidden=16), sde, data_shape=(2,))
        probe = Probe()
        make_trainer(max_steps=3, limit_val_batches=0, precision=precision, callbacks=[probe]).fit(module, dm)
        runs[precision] = probe
    reference, mixed = runs["32-true"], runs["bf16-mixed"]
    assert mixed.losses == pytest.approx(reference.losses, rel=1e-6, abs=0)
    assert all(torch.allclose(mixed.weights[-1][k], v, rtol=1e-5, atol=1e-7) for k, v in reference.weights[-1].items())
    assert all(v.dtype == torch.float32 for v in mixed.weights[-1].values())


def test_vae_prior_logs_a_bound_reproducibly():
    """A VAE prior is trained and evaluated on its IWAE bound (recorded as not exact); evaluation
    noise is per sample, so the metrics do not depend on the evaluation batch size."""
    sde = VPSDE(T=T, eps=1e-3)
    data = Gaussian(dim=2, mean=MEAN, std=STD)
    torch.manual_seed(0)
    module = AuxPriorModule(MLPVAEPrior(dim=2, latent_dim=2, hidden=16, k=4), sde, data_shape=(2,))
    assert module.hparams["prior_exact"] is False and module.hparams["prior_bound"] == "iwae4"
    make_trainer(max_steps=3, limit_val_batches=0).fit(module, ToyDataModule(data, n_train=256, batch_size=64))
    results = [make_trainer().validate(module, ToyDataModule(data, n_val=96, eval_batch_size=b), verbose=False)[0]
               for b in (96, 40)]
    for key in ("val/nll_bpd", "val/kl_prior_bpd", "val/kl_prior_gaussian_bpd"):
        assert math.isfinite(results[0][key]) and results[0][key] == pytest.approx(results[1][key], rel=1e-5)


# ---------------------------------------------------------------------- configs
AUX_CONFIGS = sorted(p.name for p in (ROOT / "configs/aux").glob("*.yaml") if not p.name.startswith("T"))
OFFLINE = [n for n in AUX_CONFIGS if n.startswith(("toy", "digits"))]
FAST = ["--trainer.fast_dev_run", "true", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def small_data(name: str) -> list[str]:
    if name.startswith("toy"):
        return ["--data.init_args.n_val", "64", "--data.init_args.eval_batch_size", "64"]
    return ["--data.init_args.batch_size", "4", "--data.init_args.eval_batch_size", "8"]


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_aux_configs_run_fast_dev_run(name, tmp_path, monkeypatch):
    from commands import cli as train

    monkeypatch.chdir(tmp_path)
    cli = train.main(args=["fit", "--config", str(ROOT / "configs/aux" / name), *FAST, *small_data(name)])
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train/nll_bpd"])
    assert torch.isfinite(cli.trainer.callback_metrics["val/kl_prior_bpd"])


@pytest.mark.parametrize("name", sorted(set(AUX_CONFIGS) - set(OFFLINE)))
def test_download_aux_configs_instantiate(name, tmp_path, monkeypatch):
    """MNIST/CIFAR-10 files are not here: the configs are parsed and their classes built."""
    from commands import cli as train

    monkeypatch.chdir(tmp_path)
    cli = train.main(args=["--config", str(ROOT / "configs/aux" / name), "--trainer.accelerator", "cpu",
                           "--trainer.devices", "1"], run=False)
    assert isinstance(cli.model, AuxPriorModule)
    assert cli.model.data_shape == cli.datamodule.data_shape == tuple(cli.model.prior.event_shape)


@pytest.mark.parametrize("T_file", ["0.2.yaml", "0.4.yaml", "0.6.yaml"])
def test_one_override_file_sets_T_for_both_stages(T_file, tmp_path, monkeypatch):
    from commands import cli as train

    monkeypatch.chdir(tmp_path)
    value = float(T_file[:-5])
    for config in ("configs/aux/toy_ring_realnvp.yaml", "configs/toy_ring.yaml"):
        cli = train.main(args=["--config", str(ROOT / config), "--config", str(ROOT / "configs/T" / T_file)],
                         run=False)
        assert cli.model.sde.T == value and cli.trainer.logger.version == f"T{T_file[:-5]}"
