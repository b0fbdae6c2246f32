"""Cluster-grade training on CPU: DDP equivalence, preemption, exact resume, safe checkpoints,
numerical faults, mixed precision."""

from __future__ import annotations

import os
import random
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from commands.checkpoint_io import SafeCheckpointIO
from difftime.checkpoints import CorruptCheckpointError, find_resume_checkpoint, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# Tiny U-Net on the 8x8 digits: dropout, random flips and dequantization all draw randomness,
# so exact resume is tested on every source of it. 1397 training digits / 64 = 21 batches an epoch.
DIGITS = textwrap.dedent("""
    seed_everything: 0
    trainer:
      accelerator: cpu
      devices: 1
      max_steps: {max_steps}
      log_every_n_steps: 1
      val_check_interval: {val_every}
      check_val_every_n_epoch: null
      limit_val_batches: 2
      enable_progress_bar: false
      enable_model_summary: false
      gradient_clip_val: 1.0
      logger:
        class_path: lightning.pytorch.loggers.TensorBoardLogger
        init_args: {{save_dir: runs, name: digits, version: run}}
      callbacks:
        - class_path: lightning.pytorch.callbacks.ModelCheckpoint
          init_args: {{filename: "{{step:08d}}", every_n_train_steps: {ckpt_every}, save_last: true, save_top_k: -1}}
    model:
      class_path: lightning_modules.ScoreModule
      init_args:
        net:
          class_path: difftime.networks.UNet
          init_args: {{in_channels: 1, resolution: 8, nf: 8, ch_mult: [1, 2], num_res_blocks: 1,
                      attn_resolutions: [4], dropout: 0.2, num_groups: 4}}
        sde: {{class_path: difftime.sde.VPSDE, init_args: {{T: 0.6}}}}
        sampler: {{class_path: difftime.samplers.EulerMaruyama, init_args: {{steps: 5}}}}
        optimizer: {{class_path: torch.optim.Adam, init_args: {{lr: 1.0e-3}}}}
        lr_scheduler: {{class_path: torch.optim.lr_scheduler.LinearLR, init_args: {{start_factor: 0.1, total_iters: 20}}}}
        ema_decay: 0.9
    data:
      class_path: datamodules.SklearnDigitsDataModule
      init_args: {{batch_size: 64, eval_batch_size: 100, random_flip: true}}
""")

# 2-D toy data and an MLP without dropout: runs on 1 and 2 processes must agree.
TOY = textwrap.dedent("""
    seed_everything: 0
    trainer:
      accelerator: cpu
      max_steps: {max_steps}
      log_every_n_steps: 1
      limit_val_batches: 0
      enable_progress_bar: false
      enable_model_summary: false
      gradient_clip_val: 1.0
      logger:
        class_path: lightning.pytorch.loggers.TensorBoardLogger
        init_args: {{save_dir: runs, name: toy, version: run}}
      callbacks:
        - class_path: lightning.pytorch.callbacks.ModelCheckpoint
          init_args: {{filename: "{{step:08d}}", every_n_train_steps: {max_steps}, save_last: true}}
    model:
      class_path: lightning_modules.ScoreModule
      init_args:
        net: {{class_path: difftime.networks.MLP, init_args: {{dim: 2, hidden: 32, depth: 2}}}}
        sde: {{class_path: difftime.sde.VPSDE, init_args: {{T: 0.6}}}}
        loss: {{class_path: difftime.losses.DSMLoss, init_args: {{weighting: likelihood, importance_sampling: true}}}}
        optimizer: {{class_path: torch.optim.Adam, init_args: {{lr: 1.0e-2}}}}
        ema_decay: 0.9
    data:
      class_path: datamodules.ToyDataModule
      init_args:
        distribution: {{class_path: difftime.toy.Ring, init_args: {{n_modes: 4}}}}
        n_train: 640
        batch_size: 64
""")


def write_config(tmp_path: Path, template: str, **fields) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(template.format(**fields))
    return path


def train(tmp_path: Path, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``python train.py fit ...`` in ``tmp_path`` (a separate process, as on a cluster)."""
    full_env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", **(env or {})}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=900, env=full_env)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a: dict, b: dict, rtol: float = 0.0) -> None:
    """Parameters, EMA weights, buffers and optimizer state equal (exactly when rtol = 0)."""
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        x, y = a["state_dict"][key], b["state_dict"][key]
        if rtol == 0.0 or not x.is_floating_point():
            assert torch.equal(x, y), key
        else:
            assert float((x - y).norm()) <= rtol * float(y.norm()) + 1e-30, key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        for name in sa:
            if rtol == 0.0:
                assert torch.equal(torch.as_tensor(sa[name]), torch.as_tensor(sb[name])), name
            else:
                assert torch.allclose(torch.as_tensor(sa[name]), torch.as_tensor(sb[name]), rtol=rtol, atol=1e-9), name


# ---------------------------------------------------------------------- distributed
@pytest.mark.slow
def test_two_process_ddp_equals_one_process(tmp_path):
    """Same global batch and data order on 1 and 2 gloo processes: the same parameters.

    Run in float64 so that the only difference left, the order of the gradient all-reduce
    sum, stays at rounding level (in fp32 Adam amplifies it to ~1e-5 on near-zero gradients).
    Everything else (data order, diffusion times, noise, clipping, EMA) must match exactly.
    """
    config = write_config(tmp_path, TOY, max_steps=12)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    common = ["--config", str(config), "--trainer.precision", "64-true"]
    train(one, *common, "--trainer.devices", "1")
    result = train(two, *common, "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert "distributed_backend=gloo" in result.stderr and "All distributed processes registered" in result.stderr
    a = load(one / "runs/toy/run/checkpoints/last.ckpt")
    b = load(two / "runs/toy/run/checkpoints/last.ckpt")
    assert a["global_step"] == b["global_step"] == 12
    assert_same_state(a, b, rtol=1e-6)


# ---------------------------------------------------------------------- exact resume
@pytest.mark.slow
@pytest.mark.parametrize("ckpt_every, kill_step, max_steps", [(4, random.Random(7).randint(26, 31), 32), (7, 23, 28)],
                         ids=["mid-epoch-random", "epoch-boundary"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, ckpt_every, kill_step, max_steps):
    """A run SIGKILLed at a step and resumed from its last checkpoint equals an uninterrupted run.

    An epoch is 21 steps (1397 digits, batch 64). With checkpoints every 4 steps, a kill at a
    random step in 26..31 resumes mid-epoch from step 24 or 28; with checkpoints every 7 steps,
    a kill at step 23 resumes from step 21, exactly at the epoch boundary. The kill callback runs
    before the checkpoint of its own step is written.
    """
    config = write_config(tmp_path, DIGITS, max_steps=max_steps, val_every=10, ckpt_every=ckpt_every)
    full, broken = tmp_path / "full", tmp_path / "broken"
    full.mkdir(), broken.mkdir()
    train(full, "--config", str(config))
    killer = ["--trainer.callbacks+=fault_helpers.KillAtStep", f"--trainer.callbacks.init_args.step={kill_step}"]
    killed = train(broken, "--config", str(config), *killer, check=False)
    assert killed.returncode == -9  # SIGKILL: no cleanup, no final checkpoint
    resumed = train(broken, "--config", str(config))
    assert "resuming from" in resumed.stderr
    resumed_at = ckpt_every * ((kill_step - 1) // ckpt_every)
    a = load(full / "runs/digits/run/checkpoints/last.ckpt")
    b = load(broken / "runs/digits/run/checkpoints/last.ckpt")
    assert a["global_step"] == b["global_step"] == max_steps
    assert_same_state(a, b)  # bit-identical: weights, EMA, counters, Adam moments
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]
    assert_no_duplicate_steps(broken / "runs/digits/run", "train/loss", expected=max_steps, resumed_at=resumed_at)


def assert_no_duplicate_steps(run_dir: Path, tag: str, expected: int, resumed_at: int) -> None:
    """The resumed run's event file starts by purging steps >= the checkpoint's step, and what
    TensorBoard shows is each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = sorted(run_dir.glob("events.out.tfevents.*"))
    assert len(files) == 2
    starts = [e.step for e in EventFileLoader(str(files[1])).Load() if e.HasField("session_log")]
    assert starts[:1] == [resumed_at]  # SessionLog.START at purge_step
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    steps = [event.step for event in acc.Scalars(tag)]
    assert steps == list(range(expected)), "a step is missing or shown twice after the resume"


# ---------------------------------------------------------------------- preemption
def fake_scontrol(tmp_path: Path) -> tuple[Path, dict]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    script = bin_dir / "scontrol"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "difftime-test",
           "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_NODEID": "0", "SLURM_NNODES": "1"}
    return log, env


@pytest.mark.slow
def test_sigusr1_in_validation_checkpoints_requeues_once_and_resumes(tmp_path):
    """A stand-in scontrol for what a real scheduler cannot show: the exact argument list, and a
    signal inside validation. A signal in training, the requeue and the resume on a real SLURM:
    tests/test_slurm_real.py."""
    where = "--trainer.callbacks.init_args.val_batch=1"
    log, env = fake_scontrol(tmp_path)
    config = write_config(tmp_path, DIGITS, max_steps=14, val_every=5, ckpt_every=100)
    signal = ["--trainer.callbacks+=fault_helpers.SignalAt", where]
    first = train(tmp_path, "--config", str(config), *signal, env=env)
    assert "exiting cleanly" in first.stderr
    assert log.read_text().split("\n")[:-1] == ["requeue 4242"]  # once, with the job id
    ckpt = tmp_path / "runs/digits/run/checkpoints/preempt.ckpt"
    verify_checkpoint(ckpt)
    stopped_at = load(ckpt)["global_step"]
    assert 0 < stopped_at < 14
    second = train(tmp_path, "--config", str(config), env=env)  # the requeued job runs the same command
    assert f"resuming from {Path('runs/digits/run/checkpoints/preempt.ckpt')}" in second.stderr
    assert load(tmp_path / "runs/digits/run/checkpoints/last.ckpt")["global_step"] == 14
    assert log.read_text().count("requeue") == 1


# ---------------------------------------------------------------------- checkpoints
def small_checkpoint(path: Path, step: int) -> None:
    SafeCheckpointIO().save_checkpoint({"global_step": step, "state_dict": {"w": torch.arange(50000.0) * step}}, path)


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpts" / "step=00000001.ckpt"
    small_checkpoint(path, 1)
    before = path.read_bytes()

    def crash(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        SafeCheckpointIO().save_checkpoint({"global_step": 2}, path)
    assert path.read_bytes() == before  # the previous checkpoint is intact
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_is_caught_and_resume_falls_back(tmp_path, damage):
    good, bad = tmp_path / "step=00000010.ckpt", tmp_path / "step=00000020.ckpt"
    small_checkpoint(good, 10)
    small_checkpoint(bad, 20)
    data = bytearray(bad.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01  # one bit, inside the tensor data: torch.load would not notice
    bad.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=str(bad)):
        verify_checkpoint(bad)
    with pytest.raises(CorruptCheckpointError, match=str(bad)):
        SafeCheckpointIO().load_checkpoint(bad)
    with pytest.warns(UserWarning, match=str(bad)):
        assert find_resume_checkpoint(tmp_path) == good
    assert SafeCheckpointIO().load_checkpoint(good)["global_step"] == 10


def test_resume_never_rolls_back_to_an_older_checkpoint(tmp_path):
    for step in (30, 10, 20):  # written out of order: mtimes say 20 is newest
        small_checkpoint(tmp_path / f"step={step:08d}.ckpt", step)
    small_checkpoint(tmp_path / "last.ckpt", 25)  # a stale "last"
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step=00000030.ckpt"


def test_cli_resume_skips_a_corrupted_newest_checkpoint(tmp_path, monkeypatch, capsys):
    from commands import cli as train

    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, TOY, max_steps=4)
    args = ["fit", "--config", str(config), "--trainer.callbacks.init_args.every_n_train_steps=2",
            "--trainer.callbacks.init_args.save_top_k=-1"]
    train.main(args=args)
    ckpt_dir = tmp_path / "runs/toy/run/checkpoints"
    newest = ckpt_dir / "step=00000004.ckpt"
    newest.write_bytes(newest.read_bytes()[:1000])
    (ckpt_dir / "last.ckpt").unlink()
    with pytest.warns(UserWarning, match="step=00000004.ckpt"):
        cli = train.main(args=args[:-2] + ["--trainer.max_steps=6"] + args[-2:])
    assert "step=00000002.ckpt" in capsys.readouterr().err
    assert cli.trainer.global_step == 6


# ---------------------------------------------------------------------- numerical faults
def toy_system(net, max_steps: int, tmp_path: Path, **module_args):
    import lightning

    from datamodules import ToyDataModule
    from difftime.sde import VPSDE
    from difftime.toy import Ring
    from lightning_modules import ScoreModule

    module = ScoreModule(net, VPSDE(T=0.6), data_shape=(2,), ema_decay=0.9,
                         optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
                         lr_scheduler=lambda o: torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=50), **module_args)
    data = ToyDataModule(Ring(n_modes=4), n_train=640, batch_size=64)
    trainer = lightning.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                                enable_model_summary=False, limit_val_batches=0, use_distributed_sampler=False,
                                default_root_dir=tmp_path, gradient_clip_val=1.0,
                                callbacks=[lightning.pytorch.callbacks.ModelCheckpoint(every_n_train_steps=1, save_last=True)])
    return module, data, trainer


def snapshot(module, trainer) -> dict:
    opt = trainer.optimizers[0]
    return {"net": {k: v.clone() for k, v in module.net.state_dict().items()},
            "ema": {k: v.clone() for k, v in module.ema.state_dict().items()},
            "adam": {id(p): {k: torch.as_tensor(v).clone() for k, v in s.items()} for p, s in opt.state.items()},
            "lr": [g["lr"] for g in opt.param_groups],
            "sched": trainer.lr_scheduler_configs[0].scheduler.last_epoch}


def assert_snapshots_equal(a: dict, b: dict) -> None:
    for part in ("net", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert a["adam"].keys() == b["adam"].keys()
    for p in a["adam"]:
        assert all(torch.equal(a["adam"][p][k], b["adam"][p][k]) for k in a["adam"][p]), "adam"
    assert a["lr"] == b["lr"] and a["sched"] == b["sched"]


def test_nan_step_is_skipped_with_state_unchanged(tmp_path):
    import lightning

    from fault_helpers import make_nan_mlp

    class Watch(lightning.Callback):
        def __init__(self):
            self.before = self.after = None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 3:
                self.before = snapshot(module, trainer)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx == 3:
                self.after = snapshot(module, trainer)

    net = make_nan_mlp({4})(dim=2, hidden=16, depth=1)
    module, data, trainer = toy_system(net, 6, tmp_path)
    watch = Watch()
    trainer.callbacks.append(watch)
    trainer.fit(module, data)
    assert_snapshots_equal(watch.before, watch.after)  # weights, EMA, Adam, LR schedule untouched
    assert int(module.skipped_steps) == 1 and int(module.batches_seen) == 6
    assert all(torch.isfinite(p).all() for p in module.net.parameters())
    assert trainer.callback_metrics["train/skipped_steps"] == 1
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 5  # 6 batches, one step skipped


def test_consecutive_faults_stop_cleanly_with_a_finite_checkpoint(tmp_path):
    from fault_helpers import make_nan_mlp

    net = make_nan_mlp(set(range(3, 100)))(dim=2, hidden=16, depth=1)
    module, data, trainer = toy_system(net, 50, tmp_path, max_consecutive_skips=4)
    trainer.fit(module, data)
    assert trainer.global_step < 10 and int(module.skipped_steps) == 4
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


# ---------------------------------------------------------------------- precision
def test_bf16_mixed_fit_keeps_fp32_weights_and_ema(tmp_path):
    from difftime.networks import MLP

    module, data, trainer = toy_system(MLP(dim=2, hidden=32, depth=2), 5, tmp_path)
    import lightning

    trainer = lightning.Trainer(accelerator="cpu", max_steps=5, precision="bf16-mixed", logger=False,
                                enable_progress_bar=False, enable_checkpointing=False, limit_val_batches=0,
                                use_distributed_sampler=False, default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert trainer.global_step == 5 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(p.dtype == torch.float32 for p in module.net.parameters())
    assert all(p.dtype == torch.float32 for p in module.ema.parameters())
    assert int(module.skipped_steps) == 0


def test_resuming_a_run_with_another_T_is_refused(tmp_path, monkeypatch, capsys):
    """Refused before any work (issue 10: no longer at fit start), naming the key and both values."""
    from commands import cli as train

    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, TOY, max_steps=2)
    train.main(args=["fit", "--config", str(config)])
    with pytest.raises(SystemExit) as stop:
        train.main(args=["fit", "--config", str(config), "--model.init_args.sde.init_args.T=0.4",
                         "--trainer.max_steps=4"])
    assert stop.value.code == 2
    assert "'model.init_args.sde.init_args.T' = 0.4 on the command line, 0.6 in the checkpoint" in capsys.readouterr().err


def test_fp16_overflow_steps_are_left_to_the_grad_scaler(tmp_path):
    """16-mixed: overflowing steps while the scale calibrates are skipped by the scaler, not faults."""
    import lightning

    from difftime.networks import MLP

    from lightning.pytorch.plugins.precision import MixedPrecision

    module, data, _ = toy_system(MLP(dim=2, hidden=32, depth=2), 6, tmp_path)
    # Lightning maps 16-mixed on CPU to bf16; build the fp16 plugin and its scaler explicitly
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # overflows until it backs off
    trainer = lightning.Trainer(accelerator="cpu", max_steps=6, logger=False, plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
                                enable_progress_bar=False, enable_checkpointing=False, limit_val_batches=0,
                                use_distributed_sampler=False, default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert trainer.precision_plugin.scaler.get_scale() < 2.0**127  # the scaler backed off
    assert int(module.skipped_steps) == 0 and trainer.global_step == 6
    assert all(torch.isfinite(p).all() for p in module.net.parameters())


@pytest.mark.parametrize("environ, expected", [
    ({"SLURM_JOB_ID": "123"}, "123"),
    ({"SLURM_JOB_ID": "123", "SLURM_ARRAY_JOB_ID": "120", "SLURM_ARRAY_TASK_ID": "3"}, "120_3"),
    ({}, None),
])
def test_slurm_job_id(environ, expected):
    from callbacks.preemption import slurm_job_id

    assert slurm_job_id(environ) == expected


@pytest.mark.parametrize("bad", ["123; rm -rf /", "12 3", "abc", "123_", "-1"])
def test_malformed_job_ids_are_never_passed_to_scontrol(bad):
    from callbacks.preemption import slurm_job_id

    with pytest.raises(ValueError, match="malformed"):
        slurm_job_id({"SLURM_JOB_ID": bad})
