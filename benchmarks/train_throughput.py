"""Training throughput: the Lightning path of train.py against a bare PyTorch loop.

Both run the same U-Net, batch, loss (DSM, noise weighting), optimizer (Adam), gradient clipping
and precision, side by side in this process, interleaved (A B A B ...) so that machine noise
hits both alike; the figure reported is the median over repeats of images per second and the
ratio Lightning / bare. The Lightning path is ScoreModule + a Trainer configured as train.py
configures it (no sampler sharding by Lightning, counter-based sharded noise, guarded steps,
fp32 EMA). Two bare loops are timed: a minimal one, and one that also keeps an EMA (what a
diffusion training script does anyway). The runs themselves are in ``benchmarks/common.py``
(``gpu_check.py`` reports the same ratio).

    python benchmarks/train_throughput.py                       # quickstart U-Net, CPU, fp32
    python benchmarks/train_throughput.py --precision bf16-mixed
    python benchmarks/train_throughput.py --net cifar10 --batch 128 --device cuda --precision bf16-mixed
    python benchmarks/train_throughput.py --variants             # fp32/bf16, channels_last, compile
"""

from __future__ import annotations

import argparse

import torch

from common import NETS, compare


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
