"""One GPU check of the CIFAR-10 DDPM++ configuration, printed as one table (``benchmarks/gpu_check.sh``).

Rows (section / setting / value / unit / note):

* ``train``: images/s of a bare training step (DSM loss, Adam, clipping 1) of the U-Net of
  ``configs/cifar10.yaml`` in fp32, bf16-mixed and 16-mixed (GradScaler), with/without
  ``channels_last`` and ``torch.compile``; model FLOP utilisation = 3 x forward FLOPs (counted by
  ``torch.utils.flop_counter``) x images/s / the device's nominal dense 16-bit tensor peak
  (``--peak-tflops`` overrides; n/a for unknown devices and CPU); peak memory (CUDA only).
* ``lightning``: the Lightning path of train.py against the bare loop
  (``benchmarks/train_throughput.py``), same precision as the config (bf16-mixed; fp32 on CPU).
* ``sampling``: images/s of DPM-Solver++ (10 NFE) and Heun (100 NFE) on the EMA-free net.
* ``likelihood``: the same net trained ``--train-steps`` steps from the same init on the same
  data in fp32 and in bf16-mixed, then the ELBO and the ODE likelihood (``difftime.likelihood``,
  both evaluated in fp32) on the same batch, in bits/dim of the model space (no dequantization
  term); PASS when |bf16 - fp32| <= 3 combined standard errors + ``--tolerance`` (relative).
* ``fid``: FID of ``--fid-samples`` DPM-Solver++ samples of the bf16 net against as many training
  images, with the converted Inception weights (``scripts/convert_inception.py``); skipped with a
  message when the weights file is absent. A pipeline check: the net is barely trained and the
  data are synthetic (smooth random images: nothing is downloaded).

``--tiny`` runs everything on a tiny U-Net for a few steps (seconds on CPU; the test suite runs it),
with a random-convolution feature extractor in place of Inception.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from common import NETS, compare
from difftime.data import ImageScaling
from difftime.likelihood import elbo, ode_log_likelihood
from difftime.losses import DSMLoss
from difftime.networks import UNet
from difftime.samplers import DPMSolverPP, HeunODE
from difftime.score import make_score_fn
from difftime.sde import VPSDE

ROOT = Path(__file__).resolve().parents[1]

# nominal dense bf16/fp16 tensor-core peak (vendor datasheets, TFLOP/s, no sparsity)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0,
               "V100": 125.0, "L4": 121.0}
TINY_NET = dict(in_channels=3, resolution=8, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                dropout=0.0, num_groups=4)
Row = dict[str, Any]


def cifar10_net_args() -> dict[str, Any]:
    config = yaml.safe_load((ROOT / "configs" / "cifar10.yaml").read_text())
    return dict(config["model"]["init_args"]["net"]["init_args"])


def synthetic_images(n: int, shape: tuple[int, ...], seed: int = 0) -> Tensor:
    """Smooth random uint8 images ``[n, C, H, W]``: bilinear up-sampled 4x4 noise (no download)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, shape[0], 4, 4, generator=g)
    return (F.interpolate(low, size=shape[1:], mode="bilinear", align_corners=False) * 255).round().to(torch.uint8)


def autocast(device: torch.device, precision: str):
    if precision == "32-true":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------- training
class Trainer:
    """A bare DSM training loop of the U-Net (the loop benchmarks/train_throughput.py times)."""

    def __init__(self, net_args: dict, device: torch.device, precision: str, channels_last: bool = False,
                 compile: bool = False, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.net = UNet(**net_args).to(device)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.net) if compile else self.net
        self.device, self.precision, self.channels_last = device, precision, channels_last
        self.opt = torch.optim.Adam(self.net.parameters(), lr=2e-4)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
        self.loss, self.sde, self.scaling = DSMLoss(), VPSDE(), ImageScaling()
        self.generator = torch.Generator(device).manual_seed(seed)

    def step(self, images: Tensor) -> float:
        x0, _ = self.scaling(images.to(self.device), self.generator)
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            loss = self.loss(self.forward, self.sde, x0, generator=self.generator).mean()
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        return float(loss.detach())


def forward_flops(net_args: dict, shape: tuple[int, ...]) -> float:
    """Forward FLOPs of one image (``torch.utils.flop_counter``, on CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = UNet(**net_args).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, *shape), torch.full((1,), 0.5))
    return float(counter.get_total_flops())


def peak_tflops(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])) if k in name), None)


def throughput_rows(args: argparse.Namespace, device: torch.device, net_args: dict, shape: tuple) -> list[Row]:
    flops, peak = forward_flops(net_args, shape), peak_tflops(args, device)
    data = synthetic_images(args.batch, shape).to(device)
    rows = []
    for precision, channels_last, compile in args.variants:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer = Trainer(net_args, device, precision, channels_last, compile)
        for _ in range(args.warmup):
            trainer.step(data)
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.step(data)
        sync(device)
        ips = args.batch * args.steps / (time.perf_counter() - start)
        mfu = f"{100 * 3 * flops * ips / (peak * 1e12):.1f}" if peak else "n/a"
        mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "n/a"
        setting = f"{precision} channels_last={channels_last} compile={compile}"
        rows.append(row("train", setting, f"{ips:.1f}", "images/s", f"MFU {mfu}%; peak memory {mem}"))
        del trainer
    return rows


def lightning_rows(args: argparse.Namespace, device: torch.device, net_args: dict) -> list[Row]:
    NETS["gpu_check"] = net_args
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    ns = argparse.Namespace(net="gpu_check", batch=args.batch, steps=args.steps, warmup=args.warmup, repeats=1,
                            device=str(device), precision=precision,
                            accelerator="gpu" if device.type == "cuda" else "cpu")
    r = compare(ns)
    note = f"bare {r['bare']:.1f}, bare+EMA {r['bare+ema']:.1f}, Lightning {r['lightning']:.1f} images/s"
    return [row("lightning", f"{precision} Lightning / bare", f"{r['lightning'] / r['bare']:.3f}", "ratio", note),
            row("lightning", f"{precision} Lightning / bare+EMA", f"{r['lightning'] / r['bare+ema']:.3f}", "ratio", "")]


# ---------------------------------------------------------------------- sampling, likelihood, FID
def score_fn_of(net: nn.Module, device: torch.device, precision: str) -> Callable[[Tensor, Tensor], Tensor]:
    inner = make_score_fn(net, VPSDE())

    def score(x: Tensor, t: Tensor) -> Tensor:
        with autocast(device, precision):
            return inner(x, t)

    return score


@torch.no_grad()
def sample(net: nn.Module, device: torch.device, sampler, n: int, shape: tuple, precision: str,
           seed: int = 0) -> tuple[Tensor, int]:
    net.eval()
    x_T = torch.randn(n, *shape, generator=torch.Generator(device).manual_seed(seed), device=device)
    x, info = sampler(score_fn_of(net, device, precision), VPSDE(), x_T)
    return x, info["nfe"]


def sampling_rows(args: argparse.Namespace, device: torch.device, net: nn.Module, shape: tuple) -> list[Row]:
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    rows = []
    for label, sampler in (("DPM-Solver++(2M)+UniC, 10 steps", DPMSolverPP(steps=10)),
                           (f"Heun, uniform t, {args.heun_steps} steps", HeunODE(steps=args.heun_steps))):
        sample(net, device, DPMSolverPP(steps=1), 2, shape, precision)  # warm-up
        sync(device)
        start = time.perf_counter()
        _, nfe = sample(net, device, sampler, args.sample_batch, shape, precision)
        sync(device)
        seconds = time.perf_counter() - start
        rows.append(row("sampling", f"{label} ({precision})", f"{args.sample_batch / seconds:.1f}", "images/s",
                        f"NFE {nfe}; {1000 * seconds / nfe:.1f} ms per NFE at batch {args.sample_batch}"))
    return rows


def train(args: argparse.Namespace, device: torch.device, net_args: dict, precision: str, data: Tensor) -> nn.Module:
    trainer = Trainer(net_args, device, precision, seed=1)
    g = torch.Generator().manual_seed(2)
    for _ in range(args.train_steps):
        trainer.step(data[torch.randint(0, len(data), (args.batch,), generator=g)])
    return trainer.net.eval()


def bits_per_dim(log_p: Tensor, dim: int) -> float:
    return float(-log_p.detach().mean() / (dim * math.log(2)))


def likelihood_rows(args: argparse.Namespace, device: torch.device, nets: dict[str, nn.Module], x0: Tensor) -> list[Row]:
    dim, sde, out = x0[0].numel(), VPSDE(), {}
    prior = sde.prior(tuple(x0.shape[1:]))
    for name, net in nets.items():
        score = make_score_fn(net, sde)
        terms = elbo(score, sde, prior, x0, n_t=args.elbo_nt, generator=torch.Generator(device).manual_seed(3))
        ode = ode_log_likelihood(score, sde, prior, x0, rtol=args.ode_tol, atol=args.ode_tol,
                                 generator=torch.Generator(device).manual_seed(4))
        out[name] = {"ELBO": (terms.total, terms.total_se), "ODE": (ode.log_prob, None)}
    rows = []
    for kind in ("ELBO", "ODE"):
        (a, a_se), (b, _) = out["fp32"][kind], out["bf16-mixed"][kind]
        fa, fb = bits_per_dim(a, dim), bits_per_dim(b, dim)
        # paired per datum: the same images, probes and times
        se = float((a - b).detach().std() / math.sqrt(len(a)) / (dim * math.log(2)))
        allowed = 3 * se + args.tolerance * abs(fa)
        verdict = "PASS" if abs(fb - fa) <= allowed else "FAIL"
        rows.append(row("likelihood", f"{kind} bits/dim fp32 vs bf16-mixed", f"{fa:.4f} vs {fb:.4f}", "bits/dim",
                        f"{verdict}: |diff| {abs(fb - fa):.4f} <= {allowed:.4f} (3 se + {args.tolerance:.0%})"))
    return rows


def fid_rows(args: argparse.Namespace, device: torch.device, net: nn.Module, real: Tensor, shape: tuple) -> list[Row]:
    from callbacks.fid import FrechetDistance, RandomConvFeatures

    common = dict(reset_real_features=False, normalize=False)
    if args.tiny:
        metric, extractor = FrechetDistance(feature=RandomConvFeatures(), input_img_size=shape, **common), "random conv"
    elif not Path(args.inception_weights).is_file():
        return [row("fid", f"{args.fid_samples} samples", "skipped", "", f"no Inception weights at "
                    f"{args.inception_weights}: run scripts/convert_inception.py --download --out inception.pth")]
    else:
        metric = FrechetDistance(feature=2048, feature_extractor_weights_path=args.inception_weights, **common)
        extractor = "Inception-v3 (converted), antialias default"
    metric = metric.to(device)
    scaling, n = ImageScaling(), args.fid_samples
    for start in range(0, n, args.sample_batch):
        b = min(args.sample_batch, n - start)
        x, _ = sample(net, device, DPMSolverPP(steps=10), b, shape, "32-true", seed=100 + start)
        metric.update(scaling.to_uint8(x).to(device), real=False)
        metric.update(real[start:start + b].to(device), real=True)
    return [row("fid", f"{n} DPM-Solver++ samples vs {n} training images", f"{float(metric.compute()):.2f}", "FID",
                extractor)]


# ---------------------------------------------------------------------- main
def timed(label: str, fn: Callable, *args: Any) -> Any:
    start = time.perf_counter()
    out = fn(*args)
    print(f"# {label}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return out


def row(section: str, setting: str, value: str, unit: str, note: str) -> Row:
    return {"section": section, "setting": setting, "value": value, "unit": unit, "note": note}


def table(rows: list[Row]) -> str:
    lines = ["| section | setting | value | unit | note |", "|---|---|---|---|---|"]
    return "\n".join(lines + [f"| {r['section']} | {r['setting']} | {r['value']} | {r['unit']} | {r['note']} |"
                              for r in rows])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny U-Net, a few steps, CPU-friendly (seconds)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--inception-weights", default=str(ROOT / "inception.pth"))
    p.add_argument("--tolerance", type=float, default=0.02, help="relative tolerance of the likelihood check")
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = p.parse_args(argv)
    tiny = dict(batch=8, steps=2, warmup=1, train_steps=10, sample_batch=16, heun_steps=5, fid_samples=32,
                elbo_nt=4, ode_tol=1e-2, likelihood_n=4)
    full = dict(batch=128, steps=20, warmup=5, train_steps=300, sample_batch=250, heun_steps=50, fid_samples=1000,
                elbo_nt=16, ode_tol=1e-4, likelihood_n=64)
    vars(args).update(tiny if args.tiny else full)
    # torch.compile only on the full run (on CPU it needs a C++ tool chain and minutes)
    precisions = ["32-true", "bf16-mixed"] if args.tiny else ["32-true", "bf16-mixed", "16-mixed"]
    args.variants = [(p_, cl, False) for p_ in precisions for cl in (False, True)]
    args.variants += [] if args.tiny else [("32-true", False, True), ("bf16-mixed", True, True)]
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.tiny:
        torch.set_num_threads(1)  # tiny tensors: one thread avoids synchronisation cost on shared cores
    device = torch.device(args.device)
    net_args = TINY_NET if args.tiny else cifar10_net_args()
    shape = (net_args["in_channels"], net_args["resolution"], net_args["resolution"])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    start = time.perf_counter()
    rows = timed("throughput", throughput_rows, args, device, net_args, shape)
    rows += timed("lightning", lightning_rows, args, device, net_args)
    data = synthetic_images(max(args.fid_samples, 4 * args.batch), shape, seed=5)
    nets = {p_: timed(f"train {p_}", train, args, device, net_args, p_, data) for p_ in ("32-true", "bf16-mixed")}
    rows += timed("sampling", sampling_rows, args, device, nets["bf16-mixed"], shape)
    x0, _ = ImageScaling(dequantize=False)(data[: args.likelihood_n].to(device))
    rows += timed("likelihood", likelihood_rows, args, device, {"fp32": nets["32-true"], "bf16-mixed": nets["bf16-mixed"]},
                  x0)
    rows += timed("fid", fid_rows, args, device, nets["bf16-mixed"], data, shape)
    text = (f"# GPU check ({'tiny' if args.tiny else 'CIFAR-10 DDPM++'} U-Net, {where}, torch {torch.__version__}, "
            f"{time.perf_counter() - start:.0f} s)\n\n" + table(rows))
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
