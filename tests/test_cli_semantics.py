"""What the user says is what runs (issue 10, defects 1, 2, 9, 10, 11).

The trained model comes from the checkpoint, the evaluation from the command line, conflicts
are errors; a run's training config is kept; bad values fail before any work. Every test here
failed on the code before the fix.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from test_datamodules import write_mnist
from test_fault_tolerance import TOY, write_config

EVAL = ["--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]


def fit(tmp_path: Path, monkeypatch, *extra: str, max_steps: int = 2):
    from commands import cli as train

    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, TOY, max_steps=max_steps)
    return train.main(args=["fit", "--config", str(config), f"--trainer.max_steps={max_steps}", *extra])


def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs/toy/run"


def fails(args: list[str], capsys) -> tuple[int, str]:
    """The CLI exits (before any work) with a status and a one-line message on stderr."""
    from commands import cli as train

    with pytest.raises(SystemExit) as stop:
        train.main(args=args)
    return stop.value.code, capsys.readouterr().err


# ---------------------------------------------------------------------- defect 1
def test_command_line_that_contradicts_the_checkpoint_is_an_error(tmp_path, monkeypatch, capsys):
    """Defect 1: ``fit --ckpt_path <T=0.6 run> --...T 0.4`` trained at T = 0.6 and exited 0."""
    fit(tmp_path, monkeypatch)
    last = run_dir(tmp_path) / "checkpoints/last.ckpt"
    code, err = fails(["fit", "--config", str(tmp_path / "config.yaml"), f"--ckpt_path={last}",
                       "--model.init_args.sde.init_args.T=0.4", "--trainer.max_steps=3"], capsys)
    assert code == 2
    assert "config key 'model.init_args.sde.init_args.T' = 0.4 on the command line, 0.6 in the checkpoint" in err
    code, err = fails(["validate", "--config", str(tmp_path / "config.yaml"), f"--ckpt_path={last}",
                       "--model.init_args.net.init_args.hidden=64", *EVAL], capsys)
    assert code == 2 and "'model.init_args.net.init_args.hidden' = 64 on the command line, 32" in err


def test_evaluation_settings_come_from_the_command_line(tmp_path, monkeypatch):
    """Defect 1: ``validate ... --model.init_args.sampler.init_args.steps 4`` used the checkpoint's steps."""
    from commands import cli as train

    fit(tmp_path, monkeypatch, "--model.init_args.sampler=difftime.samplers.EulerMaruyama",
        "--model.init_args.sampler.init_args.steps=7")
    cli = train.main(args=["validate", "--config", str(run_dir(tmp_path) / "config.yaml"),
                           f"--ckpt_path={run_dir(tmp_path) / 'checkpoints/last.ckpt'}",
                           "--model.init_args.sampler.init_args.steps=4", *EVAL])
    assert cli.model.sampler.steps == 4


def test_nothing_named_in_a_checkpoint_is_imported(tmp_path, monkeypatch, capsys):
    """Defect 1: LightningCLI parsed the checkpoint's hyperparameters, importing their class paths."""
    fit(tmp_path, monkeypatch)
    (tmp_path / "planted_module.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    last = run_dir(tmp_path) / "checkpoints/last.ckpt"
    state = torch.load(last, weights_only=True)
    state["hyper_parameters"]["net"]["class_path"] = "planted_module.Net"
    torch.save(state, tmp_path / "planted.ckpt")
    code, err = fails(["validate", "--config", str(tmp_path / "config.yaml"), f"--ckpt_path={tmp_path / 'planted.ckpt'}",
                       *EVAL], capsys)
    assert code == 2 and "planted_module.Net in the checkpoint" in err
    assert not (tmp_path / "imported").exists() and "planted_module" not in sys.modules


# ---------------------------------------------------------------------- defect 2
def test_training_config_is_kept_and_evaluations_write_their_own(tmp_path, monkeypatch):
    """Defect 2: validate/predict and a resumed fit overwrote the run's config.yaml, added
    event files to the training run, and evaluated at step 0."""
    from commands import cli as train

    fit(tmp_path, monkeypatch)
    run = run_dir(tmp_path)
    training_config = (run / "config.yaml").read_text()
    events = sorted(run.glob("events.out.tfevents.*"))
    for _ in range(2):
        cli = train.main(args=["validate", "--config", str(run / "config.yaml"),
                               f"--ckpt_path={run / 'checkpoints/last.ckpt'}", *EVAL])
        assert cli.trainer.global_step == 2  # outputs and logged points are named by the checkpoint's step
    fit(tmp_path, monkeypatch, max_steps=3)  # a resumed fit
    assert (run / "config.yaml").read_text() == training_config
    assert len(list(run.glob("config-validate-*.yaml"))) == 2 and len(list(run.glob("config-fit-*.yaml"))) == 1
    assert len(list(run.glob("validate-*/events.out.tfevents.*"))) == 2
    assert len(sorted(run.glob("events.out.tfevents.*"))) == len(events) + 1  # only the resumed fit's
    code = train.main(args=["validate", "--config", str(run / "config.yaml"),  # the README's command still works
                            f"--ckpt_path={run / 'checkpoints/last.ckpt'}", *EVAL]).trainer.global_step
    assert code == 3 and not list(run.glob("checkpoints/last-v*.ckpt"))  # last.ckpt is the file kept current


# ---------------------------------------------------------------------- defect 9
@pytest.mark.parametrize("override, key", [
    (["--trainer.devices=3", "--trainer.strategy=ddp"], "data.init_args.batch_size"),
    (["--model.init_args.optimizer.init_args.lr=-0.001"], "model.init_args.optimizer.init_args.lr"),
    (["--model.init_args.optimizer.init_args.lr=0"], "model.init_args.optimizer.init_args.lr"),
    (["--model.init_args.sde=difftime.sde.VESDE", "--model.init_args.sde.init_args.T=5"], "model.init_args.sde.init_args.T"),
    (["--trainer.callbacks+=fault_helpers.CheckedCallback", "--trainer.callbacks.init_args.limit=0.9"],
     "trainer.callbacks.1.init_args.limit"),
    (["--trainer.callbacks+=callbacks.KLGap", "--trainer.callbacks.init_args.T_grid=[0.3,0.9]"],
     "trainer.callbacks.1.init_args.T_grid"),  # T = 0.6: found only at the first validation before
    (["--model.init_args.sampler=difftime.samplers.DPMSolverPP", "--model.init_args.sampler.init_args.steps=3",
      '--model.init_args.sampler.init_args.schedule={"class_path": "difftime.schedules.Tabulated", '
      '"init_args": {"log_nsr": [3.0, 0.0, -1.0, -2.0]}}'],
     "model.init_args.sampler.init_args.schedule.init_args.log_nsr"),  # a grid fitted for another SDE
], ids=["batch-vs-devices", "negative-lr", "zero-lr", "ve-T-above-1", "callback-check", "kl-gap-T-grid",
        "tabulated-grid-of-another-sde"])
def test_bad_values_fail_before_any_work_with_the_full_key(override, key, tmp_path, monkeypatch, capsys):
    """Defect 9: these failed after DDP started (two rank tracebacks), at the first step or at the
    first validation; VE accepted T = 5 (prior std 3e16)."""
    from commands import cli as train

    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, TOY, max_steps=2)
    code, err = fails(["fit", "--config", str(config), "--trainer.accelerator=cpu", *override], capsys)
    assert code == 2 and f"'{key}'" in err and "allowed" in err
    assert "Traceback" not in err and "distributed_backend" not in err
    assert not (tmp_path / "runs").exists()


def test_unwritable_checkpoint_folder_fails_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")
    config = write_config(tmp_path, TOY, max_steps=2)
    code, err = fails(["fit", "--config", str(config), f"--trainer.logger.init_args.save_dir={tmp_path / 'a_file/runs'}"],
                      capsys)
    assert code == 2 and "'trainer.logger.init_args.save_dir'" in err and "not a folder" in err


# ---------------------------------------------------------------------- defect 10
def test_stop_after_consecutive_faults_says_why_and_exits_non_zero(tmp_path, monkeypatch, capsys):
    """Defect 10: the stop after max_consecutive_skips was silent and exited 0."""
    from commands import cli as train

    with pytest.raises(SystemExit) as stop:
        fit(tmp_path, monkeypatch, "--model.init_args.net=fault_helpers.NaNFromMLP",
            "--model.init_args.net.init_args.nan_from=2", "--model.init_args.max_consecutive_skips=2", max_steps=20)
    assert stop.value.code == train.FAULT_EXIT != 0
    assert "stopped after 2 consecutive steps with a non-finite loss" in capsys.readouterr().err


# ---------------------------------------------------------------------- defect 11 (third bullet)
def test_a_truncated_mnist_file_is_named(tmp_path):
    """Defect 11: a truncated idx file surfaced as torchvision's raw reshape error."""
    from datamodules import MNISTDataModule

    write_mnist(tmp_path, "MNIST")
    images = tmp_path / "MNIST/raw/train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    dm = MNISTDataModule(root=str(tmp_path), download=False, val_size=6, batch_size=2)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte is truncated"):
        dm.setup("fit")
