"""Training throughput: the Lightning path of train.py against a bare PyTorch loop.

Both run the same U-Net, batch, loss (DSM, noise weighting), optimizer (Adam), gradient clipping
and precision, side by side in this process, interleaved (A B A B ...) so that machine noise
hits both alike; the figure reported is the median over repeats of images per second and the
ratio Lightning / bare. The Lightning path is ScoreModule + a Trainer configured as train.py
configures it (no sampler sharding by Lightning, counter-based sharded noise, guarded steps,
fp32 EMA). Two bare loops are timed: a minimal one, and one that also keeps an EMA (what a
diffusion training script does anyway).

    python benchmarks/train_throughput.py                       # quickstart U-Net, CPU, fp32
    python benchmarks/train_throughput.py --precision bf16-mixed
    python benchmarks/train_throughput.py --net cifar10 --batch 128 --device cuda --precision bf16-mixed
    python benchmarks/train_throughput.py --variants             # fp32/bf16, channels_last, compile
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning  # noqa: E402
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn  # noqa: E402

from datamodules.base import DiffusionDataModule, InMemoryDataset  # noqa: E402
from difftime.data import ImageScaling  # noqa: E402
from difftime.losses import DSMLoss  # noqa: E402
from difftime.networks import UNet  # noqa: E402
from difftime.sde import VPSDE  # noqa: E402
from lightning_modules import ScoreModule  # noqa: E402

NETS = {
    "quickstart": dict(in_channels=1, resolution=28, nf=16, ch_mult=(1, 2, 4), num_res_blocks=1,
                       attn_resolutions=(), dropout=0.0, num_groups=8),  # configs/quickstart.yaml
    "cifar10": dict(),  # the UNet defaults are the DDPM++ CIFAR-10 configuration
}


class RandomImages(DiffusionDataModule):
    """Random uint8 images of the benchmark's shape (the input pipeline is not what is timed)."""

    name = "random"

    def __init__(self, shape: tuple[int, ...], n: int, batch_size: int) -> None:
        super().__init__(batch_size=batch_size)
        self.shape, self.n, self.scaling = tuple(shape), n, ImageScaling()

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.shape

    def build_fit(self):
        data = torch.randint(0, 256, (self.n, *self.shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        return InMemoryDataset(data), InMemoryDataset(data[:1])


class StepTimer(lightning.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.warmup:
            _sync(trainer.strategy.root_device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, *args) -> None:
        _sync(trainer.strategy.root_device)
        self.end = time.perf_counter()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_net(args) -> UNet:
    torch.manual_seed(0)
    return UNet(**NETS[args.net])


def lightning_run(args, channels_last: bool, compile: bool) -> float:
    net = make_net(args)
    module = ScoreModule(net, VPSDE(), data_shape=tuple(_shape(args)), ema_decay=0.999,
                         optimizer=lambda p: torch.optim.Adam(p, lr=2e-4), channels_last=channels_last, compile=compile)
    data = RandomImages(_shape(args), args.batch * (args.steps + args.warmup), args.batch)
    timer = StepTimer(args.warmup)
    trainer = lightning.Trainer(accelerator=args.accelerator, devices=1, precision=args.precision,
                                max_steps=args.warmup + args.steps, gradient_clip_val=1.0, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                limit_val_batches=0, use_distributed_sampler=False, callbacks=[timer])
    trainer.fit(module, data)
    return args.batch * args.steps / (timer.end - timer.start)


def bare_run(args, channels_last: bool, compile: bool, ema: bool) -> float:
    device = torch.device(args.device)
    net = make_net(args).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    forward = torch.compile(net) if compile else net
    average = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True) if ema else None
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    loss_fn, sde, scaling = DSMLoss(), VPSDE(), ImageScaling()
    data = torch.randint(0, 256, (args.batch, *_shape(args)), dtype=torch.uint8, device=device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16-mixed"
                else contextlib.nullcontext())
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            _sync(device)
            start = time.perf_counter()
        x0, _ = scaling(data)
        if channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        with autocast:
            loss = loss_fn(forward, sde, x0).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if average is not None:
            average.update_parameters(net)
    _sync(device)
    return args.batch * args.steps / (time.perf_counter() - start)


def _shape(args) -> list[int]:
    cfg = {"in_channels": 3, "resolution": 32, **NETS[args.net]}  # UNet's defaults are CIFAR-10's
    return [cfg["in_channels"], cfg["resolution"], cfg["resolution"]]


def compare(args, channels_last: bool = False, compile: bool = False) -> dict[str, float]:
    runs = {"lightning": [], "bare": [], "bare+ema": []}
    for _ in range(args.repeats):
        runs["bare"].append(bare_run(args, channels_last, compile, ema=False))
        runs["lightning"].append(lightning_run(args, channels_last, compile))
        runs["bare+ema"].append(bare_run(args, channels_last, compile, ema=True))
    return {k: statistics.median(v) for k, v in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", choices=sorted(NETS), default="quickstart")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--variants", action="store_true", help="also bf16, channels_last and torch.compile")
    args = parser.parse_args()
    args.accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
    device_name = torch.cuda.get_device_name() if args.accelerator == "gpu" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# {args.net} U-Net, batch {args.batch}, {args.steps} timed steps x {args.repeats} repeats, {device_name}")
    variants = [(args.precision, False, False)]
    if args.variants:
        variants = [("32-true", False, False), ("bf16-mixed", False, False), ("32-true", True, False), ("32-true", False, True)]
    print(f"{'precision':12s} {'ch_last':8s} {'compile':8s} {'bare img/s':>11s} {'bare+ema':>9s} {'lightning':>10s} "
          f"{'L/bare':>7s} {'L/bare+ema':>10s}")
    for precision, channels_last, compile in variants:
        args.precision = precision
        r = compare(args, channels_last, compile)
        print(f"{precision:12s} {str(channels_last):8s} {str(compile):8s} {r['bare']:11.1f} {r['bare+ema']:9.1f} "
              f"{r['lightning']:10.1f} {r['lightning'] / r['bare']:7.3f} {r['lightning'] / r['bare+ema']:10.3f}", flush=True)


if __name__ == "__main__":
    main()
