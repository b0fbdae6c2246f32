"""What the user says is what runs (issue 10, defects 1, 2, 9, 10, 11).

The trained model comes from the checkpoint, the evaluation from the command line, conflicts
are errors; a run's training config is kept; bad values fail before any work. Every test here
failed on the code before the fix.
"""

from __future__ import annotations

import re
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


# ---------------------------------------------------------------------- issue 20: CLI traps
def one_line_refusal(args: list[str], capsys, tmp_path: Path) -> str:
    """``train.py`` refuses ``args`` with exit 2 and exactly one line on stderr, before any work."""
    code, err = fails(args, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("train.py: error: "), err
    assert not (tmp_path / "runs").exists()
    return lines[0]


@pytest.mark.parametrize("override, expected", [
    (["--model.init_args.sde.init_args.TT", "0.5"],
     "config key 'model.init_args.sde.init_args.TT' is not an argument of difftime.sde.VPSDE; "
     "did you mean 'model.init_args.sde.init_args.T'?"),
    (["--data.init_args.batch_sise=3"],  # an argument of the datamodule's base class (through **kwargs)
     "config key 'data.init_args.batch_sise' is not an argument of datamodules.ToyDataModule; "
     "did you mean 'data.init_args.batch_size'?"),
    (["--trainer.max_stepz", "10"], "unrecognized option --trainer.max_stepz (did you mean --trainer.max_steps?)"),
    (["--model.init_args.sde.init_args.T=abc"], "config key 'model.init_args.sde.init_args.T': Expected a <class 'float'>"),
], ids=["nested-class-key", "base-class-key", "trainer-option", "bad-type"])
def test_unknown_keys_are_one_line_with_the_closest_valid_key(override, expected, tmp_path, monkeypatch, capsys):
    """A nested typo was a 13-line jsonargparse dump with no "did you mean"."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, TOY, max_steps=2)
    assert expected in one_line_refusal(["fit", "--config", str(config), *override], capsys, tmp_path)


def test_unknown_key_in_a_config_file_names_the_closest_key(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, TOY, max_steps=2)
    (tmp_path / "typo.yaml").write_text("trainer:\n  max_stepz: 3\n")
    line = one_line_refusal(["fit", "--config", str(config), "--config", str(tmp_path / "typo.yaml")], capsys, tmp_path)
    assert "config key 'trainer.max_stepz' is not accepted; did you mean 'trainer.max_steps'?" in line


def test_option_prefixes_are_not_expanded(tmp_path, monkeypatch, capsys):
    """``--trainer.max_step 10`` ran as ``max_steps 10`` (argparse's allow_abbrev)."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, TOY, max_steps=2)
    line = one_line_refusal(["fit", "--config", str(config), "--trainer.max_step", "10"], capsys, tmp_path)
    assert "unrecognized option --trainer.max_step (did you mean --trainer.max_steps?)" in line


def test_limit_batches_one_is_one_batch_and_one_point_zero_all(tmp_path, monkeypatch):
    """``--trainer.limit_val_batches 1`` was stored as 1.0, i.e. every batch (a 13-minute validation)."""
    from commands import cli as train

    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, TOY, max_steps=2)
    (tmp_path / "one.yaml").write_text("trainer:\n  limit_val_batches: 1\n  limit_train_batches: 3\n")
    parsed = {value: train.main(args=["--config", str(config), "--trainer.limit_val_batches", value], run=False)
              for value in ("1", "1.0", "0.5")}
    assert type(parsed["1"].trainer.limit_val_batches) is int and parsed["1"].trainer.limit_val_batches == 1
    assert type(parsed["1.0"].trainer.limit_val_batches) is float and parsed["0.5"].trainer.limit_val_batches == 0.5
    layered = train.main(args=["--config", str(config), "--config", str(tmp_path / "one.yaml")], run=False)
    assert layered.trainer.limit_val_batches == 1 and type(layered.trainer.limit_val_batches) is int
    assert layered.trainer.limit_train_batches == 3 and type(layered.trainer.limit_train_batches) is int
    # what it means: one validation batch where the loader has several
    cli = fit(tmp_path, monkeypatch, "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2",
              "--trainer.num_sanity_val_steps=0", "--data.init_args.eval_batch_size=16")
    assert len(cli.datamodule.val_dataloader()) > 1 and cli.trainer.num_val_batches == [1]


def test_a_fit_into_a_run_folder_says_it_resumes_and_when_nothing_is_left(tmp_path, monkeypatch, capsys):
    """Running a config again resumed the old run with one line lost in Lightning's banner, and a run
    already at max_steps stopped without training and without saying why."""
    fit(tmp_path, monkeypatch)
    capsys.readouterr()
    cli = fit(tmp_path, monkeypatch, max_steps=4)
    err = capsys.readouterr().err
    run = Path("runs/toy/run")
    assert cli.trainer.global_step == 4
    assert re.search(rf"^train.py: RESUMING the run in {re.escape(str(run))} at step 2 of max_steps = 4 "
                     rf"\(resuming from {re.escape(str(run / 'checkpoints'))}/\S+\.ckpt\)$", err, re.MULTILINE), err
    assert "this folder already holds a run; for a new run pass --trainer.logger.init_args.version NAME" in err
    cli = fit(tmp_path, monkeypatch, max_steps=4)
    err = capsys.readouterr().err
    assert cli.trainer.global_step == 4
    assert f"train.py: NOTHING LEFT TO TRAIN: the run in {run} is already at step 4, max_steps = 4" in err
    cli = fit(tmp_path, monkeypatch, "--trainer.logger.init_args.version=fresh", max_steps=1)
    assert cli.trainer.global_step == 1 and "RESUMING" not in capsys.readouterr().err  # a new run starts at 0


def test_a_config_error_is_reported_before_the_run_folder_checkpoint(tmp_path, monkeypatch, capsys):
    """A bad T on a folder holding a run at T = 0.6 reported a checkpoint mismatch, not the invalid T."""
    fit(tmp_path, monkeypatch)
    code, err = fails(["fit", "--config", str(tmp_path / "config.yaml"), "--model.init_args.sde.init_args.T=1.5",
                       "--trainer.max_steps=4"], capsys)
    assert code == 2 and "config key 'model.init_args.sde.init_args.T' (VPSDE) = 1.5 is invalid: allowed" in err
    assert "in the checkpoint" not in err
    code, err = fails(["fit", "--config", str(tmp_path / "config.yaml"), "--model.init_args.sde.init_args.T=0.4",
                       "--trainer.max_steps=4"], capsys)  # a valid value that contradicts the run: the checkpoint's turn
    assert code == 2 and "'model.init_args.sde.init_args.T' = 0.4 on the command line, 0.6 in the checkpoint" in err


def test_the_resume_notice_comes_after_lightnings_banner(tmp_path, monkeypatch):
    """``python train.py fit`` on a folder holding a run: the framed notice follows the device banner
    (the old one-line note came before it and was lost)."""
    import subprocess

    from test_fault_tolerance import ROOT

    fit(tmp_path, monkeypatch)
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "--config", "config.yaml",
                             "--trainer.max_steps=3"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**__import__("os").environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    assert result.returncode == 0, result.stderr[-3000:]
    err = result.stderr
    rule = "train.py: " + "=" * 72
    notice = err.index("train.py: RESUMING the run in")
    assert err.index("GPU available") < notice < err.index("Restoring states from the checkpoint")
    assert err[:notice].rstrip().endswith(rule) and err[notice:].split("\n")[2] == rule
