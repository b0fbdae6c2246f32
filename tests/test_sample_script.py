"""sample.py: rebuilds a run from the config LightningCLI saved, loads its weights (verified,
weights only), writes the PNG grid and the .npz, and draws sample i from seed + i, so the
samples do not depend on the batch size. Also the two-stage recipe end to end: an auxiliary
prior from configs/aux, then a score model trained and sampled with ``prior: <checkpoint>``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from commands import runs as runs_module
from commands import sampling

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.num_sanity_val_steps", "0", "--trainer.accelerator", "cpu", "--trainer.devices", "1"]

TOY = """
seed_everything: 0
trainer:
  max_steps: 20
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {save_dir: runs, name: toy, version: T0.4}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true}
model:
  class_path: lightning_modules.ScoreModule
  init_args:
    net:
      class_path: difftime.networks.MLP
      init_args: {dim: 2, hidden: 32, depth: 2}
    sde:
      class_path: difftime.sde.VPSDE
      init_args: {T: 0.4, eps: 1.0e-3}
    sampler:
      class_path: difftime.samplers.EulerMaruyama
      init_args: {steps: 8}
    ema_decay: 0.9
data:
  class_path: datamodules.ToyDataModule
  init_args:
    distribution:
      class_path: difftime.toy.Ring
    n_train: 512
    n_val: 64
    n_test: 64
    batch_size: 64
"""

DIGITS = """
seed_everything: 0
trainer:
  max_steps: 3
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {save_dir: runs, name: digits, version: default}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true}
model:
  class_path: lightning_modules.ScoreModule
  init_args:
    net:
      class_path: difftime.networks.UNet
      init_args: {in_channels: 1, resolution: 8, nf: 8, ch_mult: [1], num_res_blocks: 1,
                  attn_resolutions: [], dropout: 0.0, num_groups: 4}
    sde:
      class_path: difftime.sde.VPSDE
      init_args: {T: 1.0, eps: 1.0e-5}
    sampler:
      class_path: difftime.samplers.EulerMaruyama
      init_args: {steps: 6}
    ema_decay: 0.5
data:
  class_path: datamodules.SklearnDigitsDataModule
  init_args: {batch_size: 32, eval_batch_size: 64}
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny runs made by train.py in a scratch folder: an auxiliary RealNVP prior from
    configs/aux at T = 0.4, a toy score model using it, and a digits U-Net with the Gaussian prior."""
    from commands import cli as train

    root, cwd = tmp_path_factory.mktemp("runs"), Path.cwd()
    try:
        os.chdir(root)
        (root / "toy.yaml").write_text(TOY)
        (root / "digits.yaml").write_text(DIGITS)
        train.main(["fit", "--config", str(ROOT / "configs/aux/toy_ring_realnvp.yaml"),
                    "--config", str(ROOT / "configs/T/0.4.yaml"), "--trainer.max_steps", "3",
                    "--model.init_args.prior.init_args.layers", "2", *FAST])
        aux = root / "runs/aux_toy_ring_realnvp/T0.4/checkpoints/last.ckpt"
        train.main(["fit", "--config", "toy.yaml", "--model.init_args.prior", "difftime.aux_priors.AuxPriorCheckpoint",
                    "--model.init_args.prior.path", str(aux), *FAST])
        train.main(["fit", "--config", "digits.yaml", *FAST])
    finally:
        os.chdir(cwd)
    return {"root": root, "aux": aux, "toy": root / "runs/toy/T0.4", "digits": root / "runs/digits/default"}


def run_sample(run_dir: Path, out: Path, *args: str) -> tuple[np.ndarray, dict]:
    summary = sampling.main(["--config", str(run_dir / "config.yaml"), "--out", str(out), "--device", "cpu", *args])
    with np.load(out / "samples.npz") as archive:
        samples = archive["samples"]
    assert json.loads((out / "info.json").read_text()) == json.loads(json.dumps(summary))
    return samples, summary


def test_vector_samples_do_not_depend_on_the_batch_size(runs, tmp_path):
    whole, info = run_sample(runs["toy"], tmp_path / "a", "--n", "10", "--batch_size", "10", "--seed", "3")
    parts, _ = run_sample(runs["toy"], tmp_path / "b", "--n", "10", "--batch_size", "3", "--seed", "3")
    head, _ = run_sample(runs["toy"], tmp_path / "c", "--n", "4", "--batch_size", "4", "--seed", "3")
    other, _ = run_sample(runs["toy"], tmp_path / "d", "--n", "10", "--batch_size", "10", "--seed", "4")
    assert whole.shape == (10, 2) and whole.dtype == np.float32 and np.isfinite(whole).all()
    assert np.allclose(whole, parts, atol=1e-5, rtol=0) and np.allclose(whole[:4], head, atol=1e-5, rtol=0)
    assert not np.allclose(whole, other)
    assert info["sampler"] == "euler_maruyama" and info["steps"] == 8 and info["nfe"] == 9  # + Tweedie step
    assert torchvision.io.decode_png(torchvision.io.read_file(str(tmp_path / "a/samples.png"))).shape[0] in (3, 4)


def test_run_prior_is_the_default_and_gaussian_overrides_it(runs, tmp_path):
    """The toy run was trained with the auxiliary prior: sample.py uses it unless told otherwise."""
    _, learned = run_sample(runs["toy"], tmp_path / "a", "--n", "4", "--steps", "2")
    _, gaussian = run_sample(runs["toy"], tmp_path / "b", "--n", "4", "--steps", "2", "--prior", "gaussian")
    _, explicit = run_sample(runs["toy"], tmp_path / "c", "--n", "4", "--sampler", "heun_ode", "--steps", "2",
                             "--prior", str(runs["aux"]))
    assert learned["prior"] == explicit["prior"] == f"RealNVPPrior ({runs['aux']})"
    assert gaussian["prior"] == "gaussian" and learned["T"] == 0.4 and learned["nfe"] == 3
    assert explicit["sampler"] == "heun_ode" and explicit["nfe"] == 4


def test_prior_trained_for_another_T_is_refused(runs, tmp_path):
    """The digits run has T = 1 and images: the toy prior (T = 0.4, shape (2,)) must not load."""
    with pytest.raises(ValueError, match="trained for VPSDE\\(T=0.4.*score model uses VPSDE\\(T=1"):
        run_sample(runs["digits"], tmp_path / "a", "--n", "2", "--prior", str(runs["aux"]))


def test_image_grid_and_uint8_array(runs, tmp_path):
    whole, info = run_sample(runs["digits"], tmp_path / "a", "--n", "6", "--batch_size", "6", "--nrow", "3")
    parts, _ = run_sample(runs["digits"], tmp_path / "b", "--n", "6", "--batch_size", "4", "--nrow", "3")
    assert whole.shape == (6, 1, 8, 8) and whole.dtype == np.uint8 and info["prior"] == "gaussian"
    # same per-sample noise; only float rounding of the batched convolutions may differ
    assert np.abs(whole.astype(int) - parts.astype(int)).max() <= 16 and (whole != parts).mean() < 0.01
    grid = torchvision.io.decode_png(torchvision.io.read_file(str(tmp_path / "a/samples.png")))
    k = -(-512 // (2 + 3 * 10))  # nearest-neighbour upscaling to at least 512 px wide
    assert tuple(grid.shape) == (3, k * (2 + 2 * 10), k * (2 + 3 * 10))  # 2 rows x 3 columns of 8x8 tiles, padding 2
    tile = grid[0, 2 * k:10 * k:k, 2 * k:10 * k:k]  # the first image, grey replicated to RGB by make_grid
    assert torch.equal(tile, torch.from_numpy(whole[0, 0]))


def test_checkpoint_that_does_not_match_the_config_is_refused(runs, tmp_path):
    """The toy checkpoint (VP, T = 0.4, 2-D) against the digits config (T = 1, images): both SDEs named."""
    with pytest.raises(runs_module.RunError) as refused:
        run_sample(runs["digits"], tmp_path / "a", "--n", "2",
                   "--ckpt_path", str(runs["toy"] / "checkpoints/last.ckpt"))
    message = str(refused.value)
    assert "\n" not in message and str(runs["toy"] / "checkpoints/last.ckpt") in message
    assert "'model.init_args.net.class_path' = difftime.networks.UNet in " in message  # the config's
    assert "'model.init_args.sde.init_args.T' = 1.0 in " in message and "0.4 in the checkpoint" in message


def test_post_hoc_truncation(runs, tmp_path):
    """--eval_T: the T = 1 digits model sampled from T' = 0.5 (Gaussian prior at T'); T' > T is refused."""
    _, info = run_sample(runs["digits"], tmp_path / "a", "--n", "2", "--eval_T", "0.5")
    assert info["T"] == 0.5 and info["T_trained"] == 1.0 and info["prior"] == "gaussian"
    with pytest.raises(runs_module.RunError, match=r"^--eval_T 1.5: [^\n]*= 1.5 is invalid: allowed [^\n]*\(1e-05, 1\]"):
        run_sample(runs["digits"], tmp_path / "b", "--n", "2", "--eval_T", "1.5")


def test_errors_are_one_line_and_outputs_never_overwritten(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "a"
    run_sample(runs["digits"], out, "--n", "2")
    before = (out / "samples.npz").read_bytes()
    argv = ["sample.py", "--config", str(runs["digits"] / "config.yaml"), "--out", str(out), "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stop:
        sampling.cli_main()
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and "already holds samples.npz" in err
    assert (out / "samples.npz").read_bytes() == before
    monkeypatch.setattr(sys, "argv", argv[:3] + ["--out", str(tmp_path / "b"), "--ckpt_path", str(tmp_path / "nope.ckpt")])
    with pytest.raises(SystemExit):
        sampling.cli_main()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope.ckpt" in err and not (tmp_path / "b").exists()


def test_fit_grid_writes_a_schedule_a_config_can_carry(runs, tmp_path):
    """--fit_grid: the sampler runs on a grid fitted to the toy model (from its own prior at T = 0.4),
    recorded in info.json and written as a Tabulated ``schedule:`` entry; the fit is deterministic."""
    from jsonargparse import ArgumentParser

    from difftime.samplers import Sampler
    from difftime.schedules import Tabulated

    options = ("--n", "6", "--sampler", "dpm_solver_pp", "--steps", "4", "--fit_grid", "--fit_pilot", "16",
               "--fit_candidates", "12")
    samples, info = run_sample(runs["toy"], tmp_path / "a", *options)
    again, info_again = run_sample(runs["toy"], tmp_path / "b", *options)
    grid = info["fitted_grid"]
    refine_runs = 2 * (1 + 2 * 3 * 5)  # two starts, each 1 + sweeps x interior knots x fractions runs of 4 NFE
    assert info["nfe"] == 4 and len(grid["log_nsr"]) == 5 and grid["pilot"] == 16 and grid["sweeps"] == 2
    assert grid["fit_nfe"] == 12 * 5 + refine_runs * 4 and grid["start"] in ("dp", "configured")
    assert grid["log_nsr"] == info_again["fitted_grid"]["log_nsr"] and np.array_equal(samples, again)
    rms = grid["pilot_rms_to_ode"]  # every grid's distance to the teacher's end points on the pilot
    assert set(rms) == {"fitted", "dp", "configured"} and all(np.isfinite(v) and v >= 0 for v in rms.values())
    assert rms["fitted"] <= min(rms["dp"], rms["configured"])  # the tuning never moves away from the flow
    assert grid["configured_schedule"] == "LogSNR()"
    _, stochastic = run_sample(runs["toy"], tmp_path / "e", "--n", "2", "--sampler", "sde_dpm_solver_pp", "--steps", "3",
                               "--fit_grid", "--fit_pilot", "8", "--fit_candidates", "6")
    assert stochastic["fitted_grid"]["pilot_rms_to_ode"] is None  # noise, not the grid, sets that distance
    parser = ArgumentParser()
    parser.add_argument("--sampler", type=Sampler)
    entry = __import__("yaml").safe_load((tmp_path / "a/grid.yaml").read_text())
    config = parser.parse_object({"sampler": {"class_path": "difftime.samplers.DPMSolverPP",
                                              "init_args": {"steps": 4, **entry}}})
    schedule = parser.instantiate(config).sampler.schedule
    assert schedule == Tabulated(grid["log_nsr"])
    model, _ = runs_module.load_run(runs["toy"] / "checkpoints/last.ckpt")
    times = schedule(model.eval_sde, 4)
    assert float(times[0]) == 0.4 and float(times[-1]) == model.eval_sde.eps and torch.all(times[1:] < times[:-1])
    with pytest.raises(sampling.SampleError, match="fixed-step sampler"):
        run_sample(runs["toy"], tmp_path / "c", "--n", "2", "--sampler", "adaptive_ode", "--fit_grid")
    with pytest.raises(sampling.SampleError, match="at least as many --fit_candidates"):
        run_sample(runs["toy"], tmp_path / "d", "--n", "2", "--sampler", "ddim", "--steps", "20", "--fit_grid",
                   "--fit_candidates", "10")


def sample_command(args: list[str], capsys, monkeypatch) -> str:
    """``sample.py ARGS`` in-process: it must exit 2 with one line on stderr, in its own name."""
    monkeypatch.setattr(sys, "argv", ["sample.py", *args])
    with pytest.raises(SystemExit) as stop:
        sampling.cli_main()
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("sample.py: error: ") and "train.py" not in err
    return err


def test_refused_prior_is_one_line_with_the_reason(runs, tmp_path, capsys, monkeypatch):
    """A prior trained at T = 0.4 for a T = 1 model was a 7-15-line jsonargparse dump (the reason on line 4)."""
    err = sample_command(["--config", str(runs["digits"] / "config.yaml"), "--out", str(tmp_path / "a"),
                          "--prior", str(runs["aux"])], capsys, monkeypatch)
    assert f"--prior {runs['aux']}: " in err and "was trained for VPSDE(T=0.4" in err and "uses VPSDE(T=1" in err
    assert not (tmp_path / "a").exists()


def test_checkpoint_that_is_not_a_dictionary_is_one_line(runs, tmp_path, capsys, monkeypatch):
    """A --ckpt_path that loads weights-only but holds a bare tensor raised AttributeError."""
    path = tmp_path / "tensor.ckpt"
    torch.save(torch.zeros(3), path)
    err = sample_command(["--config", str(runs["digits"] / "config.yaml"), "--out", str(tmp_path / "a"),
                          "--ckpt_path", str(path)], capsys, monkeypatch)
    assert f"checkpoint {path} is not a Lightning checkpoint: it holds a Tensor" in err


def test_network_that_does_not_match_is_one_line(runs, tmp_path, capsys, monkeypatch):
    """A wider U-Net than the checkpoint's printed 51 lines of size mismatches: now the config key when the
    checkpoint records its hyperparameters, else the first mismatching tensor and their count."""
    config = tmp_path / "config.yaml"
    config.write_text((runs["digits"] / "config.yaml").read_text().replace("nf: 8", "nf: 16"))
    ckpt = runs["digits"] / "checkpoints/last.ckpt"
    err = sample_command(["--config", str(config), "--ckpt_path", str(ckpt), "--out", str(tmp_path / "a")],
                         capsys, monkeypatch)
    assert f"checkpoint {ckpt} does not match the config" in err
    assert f"config key 'model.init_args.net.init_args.nf' = 16 in {config}, 8 in the checkpoint" in err
    bare = tmp_path / "bare.ckpt"  # the same weights without the hyperparameters (e.g. a converted file)
    state = torch.load(ckpt, weights_only=True)
    del state["hyper_parameters"]
    torch.save(state, bare)
    err = sample_command(["--config", str(config), "--ckpt_path", str(bare), "--out", str(tmp_path / "b")],
                         capsys, monkeypatch)
    wider = torch.load(bare, weights_only=True)["state_dict"]
    expected = sum(1 for v in wider.values() if v.ndim > 0)
    assert f"checkpoint {bare} does not match the config's network: " in err and " tensors differ in shape" in err
    count = int(err.split("network: ")[1].split(" tensors")[0])
    assert 0 < count <= expected and "in the checkpoint" in err


def test_option_errors_are_one_line(runs, tmp_path, capsys, monkeypatch):
    config = str(runs["digits"] / "config.yaml")
    assert "--n must be >= 1, got 0" in sample_command(["--config", config, "--n", "0"], capsys, monkeypatch)
    assert "--sampler" in sample_command(["--config", config, "--sampler", "bogus"], capsys, monkeypatch)
    assert "--ste" in sample_command(["--config", config, "--ste", "3"], capsys, monkeypatch)  # no abbreviations
    assert "--device 'gpu0' is not a device" in sample_command(["--config", config, "--device", "gpu0"], capsys,
                                                                monkeypatch)
