"""Checkpoint cost for the CIFAR-10 DDPM++ model: write, verify and load times.

Builds the full training state of configs/cifar10.yaml (U-Net weights, fp32 EMA, Adam moments
after one optimizer step) as Lightning's checkpoint dict, then times side by side, interleaved:
SafeCheckpointIO (temp file in the target directory, fsync, os.replace, directory fsync),
Lightning's default TorchCheckpointIO (staged in memory and moved), the CRC verification that
precedes every load, and the weights-only load itself.

    python benchmarks/checkpoint_save.py [--dir /path/on/the/cluster/filesystem] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from commands.checkpoint_io import SafeCheckpointIO
from difftime.checkpoints import load_verified, verify_checkpoint
from difftime.networks import UNet
from difftime.sde import VPSDE
from lightning_modules import ScoreModule


def training_state() -> dict:
    torch.manual_seed(0)
    module = ScoreModule(UNet(), VPSDE(), data_shape=(3, 32, 32), ema_decay=0.9999)
    optimizer = torch.optim.Adam(module.net.parameters(), lr=2e-4)
    for p in module.net.parameters():  # one step's worth of Adam state, without a 62M-param forward
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    module.ema.update_parameters(module.net)
    return {"state_dict": module.state_dict(), "optimizer_states": [optimizer.state_dict()], "global_step": 1,
            "epoch": 0, "pytorch-lightning_version": "2.6"}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="directory to write in (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    state = training_state()
    n_values = sum(v.numel() for v in state["state_dict"].values())
    n_values += sum(t.numel() for s in state["optimizer_states"][0]["state"].values() for t in s.values())
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        safe, plain = Path(folder) / "safe.ckpt", Path(folder) / "plain.ckpt"
        times = {"safe save": [], "lightning save": [], "verify": [], "verified load": []}
        for _ in range(args.repeats):
            times["lightning save"].append(timed(lambda: TorchCheckpointIO().save_checkpoint(state, plain)))
            times["safe save"].append(timed(lambda: SafeCheckpointIO().save_checkpoint(state, safe)))
            times["verify"].append(timed(lambda: verify_checkpoint(safe)))
            times["verified load"].append(timed(lambda: load_verified(safe)))
        size = safe.stat().st_size / 2**20
    print(f"# CIFAR-10 DDPM++ training state (weights, EMA, Adam moments): {n_values / 1e6:.1f}M values, "
          f"{size:.0f} MiB on disk")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:15s} {median:7.2f} s   ({size / median:6.0f} MiB/s)")
    ratio = statistics.median(times["safe save"]) / statistics.median(times["lightning save"])
    print(f"safe / lightning save time: {ratio:.2f}")


if __name__ == "__main__":
    main()
