"""Cost of each metric on a trained run (by default the quickstart model): seconds and NFE per image.

* ELBO bits/dim (``difftime.likelihood.elbo``, what ``callbacks.BitsPerDim`` computes): time and
  NFE per image at several ``n_t``, the spread of the per-image estimates, and from it the number
  of images, seconds and NFE needed for a standard error of 0.01 bits/dim on the test set mean.
* ODE bits/dim (``difftime.likelihood.ode_log_likelihood``, dopri5, one Hutchinson probe):
  NFE and seconds per image at two tolerances. Each NFE is a forward pass plus a vector-Jacobian
  product.
* FID per 1,000 samples: generation with the run's sampler (NFE per sample and seconds) and
  feature extraction (seconds), with the Inception network if ``--inception_weights`` is given,
  else the small random-conv extractor of ``callbacks.fid``.

    python benchmarks/metric_cost.py [--config runs/quickstart/default/config.yaml] [--images 64]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from callbacks.fid import RandomConvFeatures
from commands.runs import build, load_weights
from difftime.data import bits_per_dim
from difftime.likelihood import elbo, ode_log_likelihood
from difftime.randomness import PerSampleNoise

TARGET_SE = 0.01  # bits/dim


def test_images(datamodule, n: int) -> torch.Tensor:
    datamodule.setup("test")
    return torch.stack([datamodule.test_set[i] for i in range(min(n, len(datamodule.test_set)))])


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def elbo_cost(model, scaling, images: torch.Tensor, n_t: int, batch: int) -> dict:
    score_fn, values, seconds = model.score_fn(), [], 0.0
    for start in range(0, len(images), batch):
        x = images[start:start + batch]
        noise = PerSampleNoise(range(start, start + len(x)))
        y, log_det = scaling(x, noise)
        terms, dt = timed(lambda: elbo(score_fn, model.sde, model.prior, y, n_t=n_t, generator=noise))
        values.append(bits_per_dim(terms.total, log_det, y[0].numel()))
        seconds += dt
    bpd = torch.cat(values).double()
    sd = float(bpd.std())
    n_needed = math.ceil((sd / TARGET_SE) ** 2)
    per_image = seconds / len(images)
    return {"n_t": n_t, "bpd": float(bpd.mean()), "sd": sd, "s/image": per_image, "nfe/image": n_t,
            "images for SE 0.01": n_needed, "s for SE 0.01": n_needed * per_image, "NFE for SE 0.01": n_needed * n_t}


def ode_cost(model, scaling, images: torch.Tensor, tol: float) -> dict:
    noise = PerSampleNoise(range(len(images)))
    y, log_det = scaling(images, noise)
    result, seconds = timed(lambda: ode_log_likelihood(model.score_fn(), model.sde, model.prior, y, rtol=tol,
                                                       atol=tol, generator=noise))
    bpd = bits_per_dim(result.log_prob, log_det, y[0].numel())
    return {"tol": tol, "bpd": float(bpd.mean()), "nfe/image (batch)": result.nfe,
            "s/image": seconds / len(images)}


def fid_cost(model, scaling, inception_weights: str | None, n: int, batch: int) -> dict:
    (samples, info), sample_seconds = timed(lambda: _generate(model, n, batch))
    if inception_weights:
        from torchmetrics.image.fid import NoTrainInceptionV3

        extractor, name = NoTrainInceptionV3("inception-v3-compat", ["2048"], inception_weights, antialias=False), "Inception"
    else:
        extractor, name = RandomConvFeatures(), "RandomConvFeatures"
    images = scaling.to_uint8(samples)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    _, feature_seconds = timed(lambda: [extractor(images[i:i + batch]) for i in range(0, n, batch)])
    scale = 1000 / n
    return {"samples": n, "nfe/sample": info["nfe"], "sampling s/1000": sample_seconds * scale,
            "features s/1000": feature_seconds * scale, "extractor": name}


def _generate(model, n: int, batch: int):
    chunks, info = [], {}
    for start in range(0, n, batch):
        k = min(batch, n - start)
        x, info = model.sample(k, generator=PerSampleNoise(range(start, start + k)))
        chunks.append(x)
    return torch.cat(chunks), info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="runs/quickstart/default/config.yaml")
    parser.add_argument("--ckpt_path", default=None)
    parser.add_argument("--images", type=int, default=64, help="test images for the ELBO spread")
    parser.add_argument("--ode_images", type=int, default=4)
    parser.add_argument("--fid_samples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--inception_weights", default=None)
    args = parser.parse_args()
    if not Path(args.config).is_file():
        raise SystemExit(f"{args.config} not found: train the quickstart first (make quickstart)")
    model, datamodule = build(args.config)
    load_weights(model, args.ckpt_path or Path(args.config).parent / "checkpoints" / "last.ckpt")
    model.eval()
    scaling, images = datamodule.scaling, test_images(datamodule, args.images)
    print(f"# {args.config}: {sum(p.numel() for p in model.net.parameters()) / 1e6:.2f}M parameters, "
          f"{torch.get_num_threads()} CPU threads" if not torch.cuda.is_available() else f"# {torch.cuda.get_device_name()}")
    for n_t in (4, 16):
        print("ELBO", elbo_cost(model, scaling, images, n_t, args.batch), flush=True)
    for tol in (1e-3, 1e-5):
        print("ODE ", ode_cost(model, scaling, images[: args.ode_images], tol), flush=True)
    print("FID ", fid_cost(model, scaling, args.inception_weights, args.fid_samples, args.batch), flush=True)


if __name__ == "__main__":
    main()
