"""The command line: every config runs, bad configs fail fast with the key, runs resume."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_datamodules import write_cifar, write_mnist

ROOT = Path(__file__).resolve().parents[1]
TOP_CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
FAST = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def data_overrides(name: str, tmp_path: Path, monkeypatch) -> list[str]:
    """Fake MNIST/CIFAR-10 files in the official formats for the configs that need downloads."""
    # bf16 convolutions are emulated on CPUs without bf16 units (minutes for the CIFAR-10 U-Net);
    # the bf16-mixed path is covered by a dedicated test on a small network
    small = ["--data.init_args.batch_size", "2", "--data.init_args.eval_batch_size", "2",
             "--data.init_args.num_workers", "0", "--trainer.precision", "32-true"]
    if name == "mnist.yaml":
        write_mnist(tmp_path, "MNIST")
        return small + ["--data.init_args.root", str(tmp_path), "--data.init_args.download", "false",
                        "--data.init_args.val_size", "6"]
    if name == "cifar10.yaml":
        import torchvision.datasets.cifar as tv_cifar

        write_cifar(tmp_path)
        monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
        monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
        return small + ["--data.init_args.root", str(tmp_path), "--data.init_args.download", "false",
                        "--data.init_args.val_size", "6"]
    return []


@pytest.mark.parametrize("name", TOP_CONFIGS)
def test_every_config_runs_fast_dev_run(name, tmp_path, monkeypatch):
    from commands import cli as train

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(ROOT / "configs" / name), "--trainer.fast_dev_run", "true",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", *FAST,
            *data_overrides(name, tmp_path, monkeypatch)]
    cli = train.main(args=args)
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("T", ["0.2", "0.4", "0.6", "1.0"])
def test_T_is_selected_by_one_override(T):
    from commands import cli as train

    cli = train.main(args=["--config", str(ROOT / "configs/quickstart.yaml"),
                           "--config", str(ROOT / f"configs/T/{T}.yaml")], run=False)
    assert cli.model.sde.T == float(T) and cli.model.prior.std == 1.0


def cli_error(args: list[str], capsys, tmp_path, monkeypatch) -> tuple[int, str]:
    """Run the CLI in-process and return (exit code, stderr); it must exit before any work."""
    from commands import cli as train

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        train.main(args=["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *args])
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written
    return stop.value.code, capsys.readouterr().err


@pytest.mark.parametrize("override, key", [
    (["--model.init_args.sde.init_args.T=1.5"], "model.init_args.sde.init_args.T"),
    (["--model.init_args.sde.init_args.T=0.0"], "model.init_args.sde.init_args.T"),
    (["--model.init_args.sde.init_args.beta_min=-1"], "model.init_args.sde.init_args.beta_min"),
    (["--model.init_args.net.init_args.resolution=30"], "model.init_args.net.init_args.resolution"),
    (["--model.init_args.net.init_args.resolution=32", "--model.init_args.net.init_args.attn_resolutions=[8]"],
     "model.init_args.net.init_args.resolution"),  # the network does not fit the 28x28 data
    (["--data.init_args.batch_size=0"], "data.init_args.batch_size"),
    (["--model.init_args.loss.init_args.importance_sampling=true"], "model.init_args.loss.init_args.importance_sampling"),
])
def test_out_of_range_values_fail_fast_with_the_key_path(override, key, capsys, tmp_path, monkeypatch):
    code, err = cli_error(override, capsys, tmp_path, monkeypatch)
    assert code == 2
    assert f"config key '{key}'" in err and "allowed" in err


@pytest.mark.parametrize("override, fragment", [
    ("--model.init_args.sde=difftime.sde.FooSDE", "FooSDE"),
    ("--model.init_args.bogus=1", "bogus"),
    ("--model.init_args.sde.init_args.T=abc", "sde.init_args.T"),
])
def test_unknown_classes_keys_and_types_are_rejected(override, fragment, capsys, tmp_path, monkeypatch):
    code, err = cli_error([override], capsys, tmp_path, monkeypatch)
    assert code != 0 and fragment in err


def test_core_never_imports_lightning():
    offenders = []
    for path in (ROOT / "difftime").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path}: {n}" for n in names if n.split(".")[0] in ("lightning", "pytorch_lightning")]
    assert not offenders
    code = ("import sys, difftime.sde, difftime.losses, difftime.samplers, difftime.likelihood, "
            "difftime.networks, difftime.aux_priors, difftime.toy, difftime.data; "
            "print(any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_short_quickstart_run_writes_loss_curve_and_sample_image(tmp_path, monkeypatch):
    """The quickstart config for a few steps: TensorBoard holds train/loss, val/loss and a grid."""
    from commands import cli as train
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    train.main(args=["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *FAST,
                     "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "1",
                     "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                     "--model.init_args.sampler.init_args.steps", "5"])
    run = tmp_path / "runs/quickstart/default"
    acc = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1, 2, 3]  # batch k logs at step k
    assert {"val/loss", "train/grad_norm", "train/lr-Adam"} <= set(acc.Tags()["scalars"])
    image = acc.Images("samples")[-1]
    assert image.step == 4 and image.width == image.height > 28
    assert (run / "samples/step=00000004.png").is_file() and (run / "config.yaml").is_file()
    assert (run / "checkpoints/last.ckpt").is_file()


def test_predict_writes_the_same_samples_for_any_batch_size(tmp_path, monkeypatch):
    """``train.py predict`` after a short fit: sample i comes from seed + i, whatever the batch."""
    import numpy as np

    from commands import cli as train

    monkeypatch.chdir(tmp_path)
    config = ["--config", str(ROOT / "configs/digits8x8.yaml"), *FAST]
    train.main(args=["fit", *config, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"])
    run = tmp_path / "runs/digits8x8/default"
    outputs = []
    for batch in ("5", "8"):
        out = tmp_path / f"out{batch}"
        train.main(args=["predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints/last.ckpt"),
                         "--data.init_args.num_predict", "8", "--data.init_args.eval_batch_size", batch,
                         "--model.init_args.sampler.init_args.steps", "4",
                         "--trainer.callbacks+=callbacks.SampleWriter", f"--trainer.callbacks.output_dir={out}"])
        outputs.append(np.load(out / "samples_rank0.npz"))
        assert (out / "samples.png").is_file()
    assert outputs[0]["index"].tolist() == list(range(8))
    assert outputs[0]["samples"].dtype == np.uint8 and outputs[0]["samples"].shape == (8, 1, 8, 8)
    assert np.abs(outputs[0]["samples"].astype(int) - outputs[1]["samples"].astype(int)).max() <= 1


def test_fit_help_starts_with_the_configs_and_the_model_help(capsys):
    """``fit --help`` says where to start before the option list (it was 490 lines of options)."""
    from commands import cli as train

    with pytest.raises(SystemExit):
        train.main(args=["fit", "--help"])
    head = "\n".join(capsys.readouterr().out.splitlines()[:14])
    assert "usage: " in head and "--config CONFIG.yaml" in head
    for pointer in ("configs/<name>.yaml", "quickstart", "configs/aux/<name>.yaml", "digits_glow",
                    "configs/T/<T>.yaml", "0.4", "--model.help lightning_modules.ScoreModule"):
        assert pointer in head, pointer
    assert head.index("configs/<name>.yaml") < head.index("options:") if "options:" in head else True


@pytest.mark.parametrize("form", ["two words", "equals"])
def test_prior_checkpoint_path_reads_as_the_long_form(form, tmp_path, monkeypatch, capsys):
    """``--model.init_args.prior X.ckpt`` resolves to the config the header's long form gives
    (``AuxPriorCheckpoint`` with ``path X.ckpt``), not to a YAML read of the binary file."""
    from commands import cli

    monkeypatch.chdir(tmp_path)
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"PK\x03\x04\x80\x81 not text")
    base = ["fit", "--config", str(ROOT / "configs/toy_ring.yaml")]
    short = ([f"--model.init_args.prior={checkpoint}"] if form == "equals"
             else ["--model.init_args.prior", str(checkpoint)])
    long = ["--model.init_args.prior", "difftime.aux_priors.AuxPriorCheckpoint", "--model.init_args.prior.path",
            str(checkpoint)]
    printed = []
    for extra in (short, long):
        with pytest.raises(SystemExit) as stop:
            cli.main(args=[*base, *extra, "--print_config"])
        assert stop.value.code in (0, None)
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and "AuxPriorCheckpoint" in printed[0] and str(checkpoint) in printed[0]
