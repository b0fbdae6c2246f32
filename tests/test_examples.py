"""examples/notebook.py runs end to end on a tiny checkpoint and its numbers are the library's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from commands.runs import load_run
from commands.sampling import real_images

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "0", "--trainer.max_steps", "2",
        "--trainer.logger.init_args.save_dir", "runs"]


def test_notebook_runs_on_a_tiny_checkpoint(tmp_path, monkeypatch):
    from commands import cli as train

    monkeypatch.chdir(tmp_path)
    train.main(["fit", "--config", str(ROOT / "configs/digits8x8.yaml"), *FAST])
    ckpt = next(tmp_path.glob("runs/**/checkpoints/last.ckpt"))
    out = tmp_path / "grid.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "examples/notebook.py"), str(ckpt), str(out)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.is_file() and "NFE 10" in result.stdout and "bits/dim on 8 test images" in result.stdout
    # the script's bits/dim are the library's on the same images and seed
    model, data = load_run(ckpt)
    bpd = model.bits_per_dim(real_images(data, 8), generator=torch.Generator().manual_seed(0))
    assert f"{bpd.mean():.3f}" in result.stdout
