"""Has a score model finished training? Sample quality at its intermediate checkpoints, 1k, 2k, 4k, ...

"Finished" is a measurement, not a step count: for a score unit of a study (or any run whose
``checkpoints/`` hold Lightning checkpoints named ``step=<N>.ckpt``), this script draws ``--n``
samples at each of the requested training steps that exist (default 1k, 2k, 4k, 8k, 16k), with
the run's own sampler (the study's SDE-DPM-Solver++ at 30 steps) or ``--sampler``, from the
per-sample seeds ``seed + i`` (the same noise at every step), and compares them with the
test split in the features of the digit classifier (:mod:`difftime.features`):
FD (jackknife bias-corrected) and KID (unbiased) with 95 % jackknife intervals, and
precision/recall, all from :func:`difftime.quality.quality_row`, the row the study reports.

It appends one row per step to ``<out>/<unit>.csv`` (resumable: a step already measured with the
same sampler, steps, n and seed is skipped), draws ``<out>/<unit>.png`` (FD and KID against
training step, with interval bars) and writes ``<out>/<unit>.md``, which states whether the last
doubling of the training steps changed FD and KID by less than their intervals' half-widths
(the `.md` and `.png` show the rows of the sampler setting of the latest invocation; the CSV keeps all).

The run folder is only read: nothing is written under it (``--out`` inside it is refused).

    python -m benchmarks.plateau runs/study_digits_plateau/units/score/T1-ab7212d080 [--n 1000]

A model trained at a short T is measured with its auxiliary prior (the Gaussian at T < 1 would
measure the prior's mismatch, not the score model): ``--prior <aux unit>/checkpoints/<step>.ckpt``;
its results are then named ``<unit>-<aux unit>``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from difftime import features, quality

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "plateau"
CACHE = Path.home() / ".cache" / "difftime"
STEP = re.compile(r"step=(\d+)\.ckpt$")
KEY = ("step", "sampler", "sampler_steps", "n_samples", "seed")


def load_run(ckpt: Path, config: Path, prior: Path | None = None) -> tuple[Any, Any]:
    """The model of one checkpoint and its datamodule (the project's loader, which verifies the weights),
    with the auxiliary prior of ``prior`` (an AuxPriorModule checkpoint at the run's T) in place of its own."""
    from commands.runs import load_run as loader

    return loader(ckpt, config=config, prior=str(prior) if prior else None)


def prior_name(args: argparse.Namespace) -> str:
    """``own`` (the run's prior) or the aux unit / run folder of ``--prior``."""
    return args.prior.resolve().parent.parent.name if args.prior else "own"


def curve_name(args: argparse.Namespace) -> str:
    """The results' file stem: the unit's name, and the prior's when ``--prior`` replaces it."""
    return args.unit.name if args.prior is None else f"{args.unit.name}-{prior_name(args)}"


def generate(model: Any, sampler: Any, n: int, batch: int, seed: int, steps: int | None) -> tuple[torch.Tensor, list]:
    """n samples, sample i from the seed ``seed + i`` (the noise does not depend on the batch size)."""
    from commands.sampling import generate as gen

    return gen(model, sampler, n, batch, seed, steps)


# ---------------------------------------------------------------------- arguments
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"plateau.py: error: {message}\n")
        raise SystemExit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from difftime.samplers import SAMPLERS

    parser = _Parser(description=__doc__.split("\n")[0])
    parser.add_argument("unit", type=Path, help="the run folder holding config.yaml and checkpoints/")
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 2000, 4000, 8000, 16000])
    parser.add_argument("--n", type=int, default=1000, help="samples per checkpoint")
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default=None, help="default: the run's sampler")
    parser.add_argument("--sampler_steps", type=int, default=None, help="default: the sampler's own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prior", type=Path, default=None,
                        help="an AuxPriorModule checkpoint at the run's T to sample from (default: the run's prior)")
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--groups", type=int, default=50, help="jackknife groups per set")
    parser.add_argument("--classifier", type=Path, default=None,
                        help="a classifier.pt (difftime.features.save_classifier); default: the study's, else trained")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser: _Parser, args: argparse.Namespace) -> None:
    for key, value, low in (("--n", args.n, 2), ("--batch_size", args.batch_size, 1), ("--groups", args.groups, 2),
                            ("--sampler_steps", args.sampler_steps or 1, 1), ("--steps", min(args.steps), 1)):
        if value < low:
            parser.error(f"{key} = {value} is invalid: allowed >= {low}")
    if not (args.unit / "config.yaml").is_file() or not (args.unit / "checkpoints").is_dir():
        parser.error(f"{args.unit} is not a run folder: it needs config.yaml and checkpoints/")
    if args.classifier is not None and not args.classifier.is_file():
        parser.error(f"--classifier {args.classifier} is not a file")
    unit = args.unit.resolve()
    run_root = unit.parents[2] if unit.parent.parent.name == "units" else unit  # a study's whole folder
    if args.out.resolve().is_relative_to(run_root):
        parser.error(f"--out {args.out} lies inside the run's folder {run_root}, which this script only reads")


# ---------------------------------------------------------------------- feature space
def checkpoints(unit: Path, steps: list[int]) -> dict[int, Path]:
    """The requested steps that have a ``step=<N>.ckpt`` checkpoint."""
    found = {int(m.group(1)): p for p in (unit / "checkpoints").glob("*.ckpt") if (m := STEP.search(p.name))}
    return {s: found[s] for s in sorted(steps) if s in found}


def classifier(args: argparse.Namespace, train: tuple[torch.Tensor, torch.Tensor],
               test: tuple[torch.Tensor, torch.Tensor]) -> features.TrainedClassifier:
    """``--classifier``, else the study's classifier unit, else one trained here and cached by data digest."""
    candidates = [args.classifier] if args.classifier else sorted(args.unit.parent.parent.glob("classifier/*/classifier.pt"))
    for path in candidates:
        trained = features.load_classifier(path)
        if trained.data_digest == features.data_digest(*train):
            return trained
        if args.classifier:
            raise SystemExit(f"plateau.py: error: --classifier {path} was trained on other data (digest differs)")
    cache = CACHE / f"classifier-{features.data_digest(*train)}.pt"
    if cache.is_file():
        return features.load_classifier(cache)
    trained = features.train_classifier(train, test, epochs=4, seed=0)
    cache.parent.mkdir(parents=True, exist_ok=True)
    features.save_classifier(trained, cache)
    return trained


def splits(datamodule: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    datamodule.setup("fit"), datamodule.setup("test")
    return {name: (ds.data, ds.labels) for name, ds in (("train", datamodule.train_set), ("test", datamodule.test_set))}


# ---------------------------------------------------------------------- measurement
def setting(args: argparse.Namespace, sampler: Any) -> tuple[str, str]:
    """(sampler class, sampler steps) as the CSV stores them."""
    return type(sampler).__name__, str(args.sampler_steps or getattr(sampler, "steps", ""))


def measure(args: argparse.Namespace, step: int, ckpt: Path, model: Any, sampler: Any,
            space: dict[str, Any]) -> dict[str, Any]:
    """One row: the checkpoint's samples against the test split, with what they were made with."""
    start = time.perf_counter()
    samples, infos = generate(model, sampler, args.n, args.batch_size, args.seed, args.sampler_steps)
    sample_s = time.perf_counter() - start
    fake = features.extract_features(space["model"], model.to_images(samples))
    row = quality.quality_row(space["reference"], fake, space["name"], groups=args.groups, seed=args.seed)
    name, steps = setting(args, sampler)
    return {"unit": args.unit.name, "step": step, "checkpoint": ckpt.name, "checkpoint_sha256": _digest(ckpt),
            "prior": prior_name(args), "sampler": name, "sampler_steps": steps, "nfe": infos[0].get("nfe"), "seed": args.seed, **row,
            "reference": "test split", "sample_s": round(sample_s, 2), "eval_s": round(time.perf_counter() - start, 2)}


def floor_row(args: argparse.Namespace, train: tuple[torch.Tensor, torch.Tensor], space: dict[str, Any]) -> dict[str, Any]:
    """The floor: ``n`` real training digits (a seeded draw) against the same test digits and features.

    A model whose samples score like this cannot be told from the data by these features at this n.
    """
    index = torch.randperm(len(train[0]), generator=torch.Generator().manual_seed(args.seed))[:args.n]
    real = features.extract_features(space["model"], train[0][index])
    return quality.quality_row(space["reference"], real, space["name"], groups=args.groups, seed=args.seed)


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append (header first if new); a file with other columns is refused rather than mixed."""
    new = not path.is_file()
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f))
        if header != list(row):
            raise SystemExit(f"plateau.py: error: {path} has other columns; move it away to start a new curve")
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def same_setting(row: dict[str, str], args: argparse.Namespace, sampler_setting: tuple[str, str]) -> bool:
    return (row.get("prior", "own"), row["sampler"], row["sampler_steps"], row["n_samples"], row["seed"]) == (
        prior_name(args), *sampler_setting, str(args.n), str(args.seed))


# ---------------------------------------------------------------------- report
def verdict(rows: list[dict[str, str]]) -> list[str]:
    """Whether the last doubling of the steps changed FD and KID by less than the intervals' half-widths."""
    by_step = {int(r["step"]): r for r in rows}
    if len(by_step) < 2:
        return ["Only one training step measured: no doubling to compare yet."]
    last = max(by_step)
    before = last // 2 if last // 2 in by_step else max(s for s in by_step if s < last)
    kind = "doubling" if before * 2 == last else "step"
    out = []
    for name in ("fd", "kid"):
        a, b = by_step[before], by_step[last]
        change, half = float(b[name]) - float(a[name]), (float(b[f"{name}_high"]) - float(b[f"{name}_low"])) / 2
        within = abs(change) < half
        out.append(f"{name.upper()}: {float(a[name]):.4g} at step {before} -> {float(b[name]):.4g} at step {last} "
                   f"(change {change:+.3g}, interval half-width {half:.3g}): the last {kind} changed it by "
                   f"{'less' if within else 'more'} than its interval{' (plateau)' if within else ''}.")
    return out


def _prior_text(prior: str) -> str:
    return "from the run's own prior" if prior == "own" else f"from the auxiliary prior {prior}"


def write_report(path: Path, rows: list[dict[str, str]], floor: dict[str, Any] | None = None) -> None:
    lines = [f"# Training-length curve of {rows[0]['unit']}", "",
             f"{rows[0]['n_samples']} samples per step from {rows[0]['sampler']} ({rows[0]['sampler_steps']} steps, "
             f"NFE {rows[0]['nfe']}), {_prior_text(rows[0].get('prior', 'own'))}, seeds {rows[0]['seed']}..; {rows[0]['n_reference']} test digits.", "",
             "| step | FD | KID | precision | recall |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: int(r["step"])):
        cell = lambda k: f"{float(r[k]):.4g} [{float(r[k + '_low']):.4g}, {float(r[k + '_high']):.4g}]"
        lines.append(f"| {r['step']} | {cell('fd')} | {cell('kid')} | {cell('precision')} | {cell('recall')} |")
    if floor is not None:
        cell = lambda k: f"{float(floor[k]):.4g} [{float(floor[k + '_low']):.4g}, {float(floor[k + '_high']):.4g}]"
        lines.append(f"| floor: {floor['n_samples']} real training digits | {cell('fd')} | {cell('kid')} | "
                     f"{cell('precision')} | {cell('recall')} |")
    note = quality.interval_note(rows[-1])
    lines += ["", note, "", *verdict(rows), "",
              "A plateau is judged on the last doubling only; read it with the whole curve (`.png`, `.csv`).", ""]
    path.write_text("\n".join(lines))


def figure(path: Path, rows: list[dict[str, str]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: int(r["step"]))
    steps = [int(r["step"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, (name, label) in zip(axes, (("fd", "FD (bias-corrected)"), ("kid", "KID (unbiased)"))):
        value = [float(r[name]) for r in rows]
        err = [[v - float(r[f"{name}_low"]) for v, r in zip(value, rows)],
               [float(r[f"{name}_high"]) - v for v, r in zip(value, rows)]]
        ax.errorbar(steps, value, yerr=err, marker="o", capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(steps, [f"{s:,}" for s in steps])
        ax.minorticks_off()
        ax.set(xlabel="training step", ylabel=label, title=f"{label}, 95 % jackknife interval")
    fig.suptitle(f"{rows[0]['unit']}: {rows[0]['sampler']} {rows[0]['sampler_steps']} steps, n = {rows[0]['n_samples']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from difftime.samplers import SAMPLERS

    args = parse_args(argv)
    found = checkpoints(args.unit, args.steps)
    if not found:
        raise SystemExit(f"plateau.py: error: no checkpoint of steps {args.steps} in {args.unit / 'checkpoints'}")
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path, space, chosen = args.out / f"{curve_name(args)}.csv", {}, None
    for step, ckpt in found.items():
        model, datamodule = load_run(ckpt, args.unit / "config.yaml", args.prior)
        sampler = SAMPLERS[args.sampler]() if args.sampler else model.sampler
        chosen = setting(args, sampler)
        if any(int(r["step"]) == step and same_setting(r, args, chosen) for r in read_rows(csv_path)):
            print(f"step {step}: already measured with these settings, skipped")
            continue
        if not space:
            data = splits(datamodule)
            trained = classifier(args, data["train"], data["test"])
            space = {"model": trained.model, "name": trained.name,
                     "reference": features.extract_features(trained.model, data["test"][0])}
        row = measure(args, step, ckpt, model, sampler, space)
        append_row(csv_path, row)
        print(f"step {step}: FD {row['fd']:.3f} [{row['fd_low']:.3f}, {row['fd_high']:.3f}], "
              f"KID {row['kid']:.5f} [{row['kid_low']:.5f}, {row['kid_high']:.5f}] ({row['eval_s']:.0f} s)", flush=True)
    rows = [r for r in read_rows(csv_path) if int(r["step"]) in found and same_setting(r, args, chosen)]
    if not space:
        data = splits(load_run(next(iter(found.values())), args.unit / "config.yaml")[1])
        trained = classifier(args, data["train"], data["test"])
        space = {"model": trained.model, "name": trained.name,
                 "reference": features.extract_features(trained.model, data["test"][0])}
    write_report(args.out / f"{curve_name(args)}.md", rows, floor_row(args, data["train"], space))
    figure(args.out / f"{curve_name(args)}.png", rows)
    print("\n".join(verdict(rows)))


if __name__ == "__main__":
    main()
