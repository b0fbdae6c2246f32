"""The report unit: quality metrics of every sample unit, then ``report.md``, ``results.csv``, the
figures and a TensorBoard run, in ``<out>/report``.

The report is built in a temporary folder and swapped into place, and the previous ``report.md``
and ``results.csv`` are removed first: a report that fails never leaves an older one looking current.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

from commands.study.config import build_object, model_config
from commands.study.figures import figure_bpd, figure_quality, figure_samples
from commands.study.findings import nfe_to_baseline, report_markdown
from commands.study.plan import Plan, Unit
from commands.study.records import done_steps, load_samples, read_result
from commands.study.spec import QualitySpec, SpecError
from commands.study.units import say

CSV_KEYS = ("T", "T_train", "source", "prior", "sampler", "steps", "nfe", "bpd_elbo", "bpd_elbo_se", "bpd_prior",
            "bpd_prior_se", "bpd_diffusion", "bpd_diffusion_se", "bpd_reconstruction", "bpd_ode", "bpd_n", "fd",
            "fd_low", "fd_high", "fd_plugin", "kid", "kid_low", "kid_high", "precision", "precision_low",
            "precision_high", "recall", "recall_low", "recall_high", "n_samples", "reference", "n_reference",
            "extractor", "extractor_test_accuracy", "k", "ci_level", "jackknife_groups", "fd_interval_method",
            "kid_interval_method", "pr_interval_method", "fid_inception", "score_train_s", "score_train_steps",
            "aux_train_s", "aux_train_steps", "sample_wall_s", "sample_s_per_sample", "prior_ms_per_sample", "unit",
            "nfe_to_baseline")
BPD_KEYS = ("bpd_elbo", "bpd_elbo_se", "bpd_prior", "bpd_prior_se", "bpd_diffusion", "bpd_diffusion_se",
            "bpd_reconstruction")


def run_report(plan: Plan, unit: Unit) -> None:
    """Quality metrics of every sample unit, then report.md, results.csv, figures and TensorBoard."""
    import torch

    folder = plan.out / "report"
    for stale in ("report.md", "results.csv"):
        (folder / stale).unlink(missing_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small float64 eigh/cdist: thread start-up and spinning cost 30x on a busy CPU
    try:
        rows = collect_rows(plan)
    finally:
        torch.set_num_threads(threads)
    tmp = plan.out / f"report.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_report(plan, rows, tmp)
    if folder.exists():
        old = plan.out / f"report.old{os.getpid()}"
        folder.replace(old)
        tmp.replace(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.replace(folder)
    say(f"report in {folder / 'report.md'}")


def write_report(plan: Plan, rows: list[dict[str, Any]], folder: Path) -> None:
    """results.csv, the figures, report.md and the TensorBoard run in ``folder``."""
    import matplotlib.pyplot as plt

    _, reached = nfe_to_baseline(plan, rows)
    for r in rows:
        nfe = reached.get((r["T"], r["source"], r["prior"], r["sampler"]))
        r["nfe_to_baseline"] = "" if nfe is None else nfe
    write_csv(rows, folder / "results.csv")
    figures = {"bpd_terms.png": figure_bpd(rows), "quality_vs_nfe.png": figure_quality(rows),
               "samples_side_by_side.png": figure_samples(plan, rows)}
    try:
        for name, fig in figures.items():
            fig.savefig(folder / name, dpi=110, bbox_inches="tight")
        text = report_markdown(plan, rows, list(figures))
        (folder / "report.md").write_text(text)
        log_tensorboard(folder / "tensorboard", rows, figures, text)
    finally:
        for fig in figures.values():
            plt.close(fig)


def fit_cost(unit: Unit) -> tuple[float, int]:
    """Training wall time (sum over attempts, startup included) and final step of a fit unit."""
    import json

    path = unit.folder / "attempts.jsonl"
    attempts = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return sum(a["wall_s"] for a in attempts), done_steps(unit)


def datamodule(plan: Plan) -> Any:
    """The score model's datamodule (the quality metrics' reference data)."""
    return build_object(model_config(plan.spec.score)["data"])


class FeatureSpace:
    """The quality metrics' feature space and reference set, with what every figure must state."""

    def __init__(self, plan: Plan) -> None:
        import torch

        from difftime import quality

        q = plan.spec.quality
        data = datamodule(plan)
        reference = reference_data(data, q.reference)
        self.model, self.accuracy = None, None
        self.name = "identity (raw values)"
        if q.extractor == "digit_classifier":
            unit = next(u for u in plan.units.values() if u.kind == "classifier")
            trained = quality.load_classifier(unit.folder / "classifier.pt")
            self.model, self.accuracy = trained.model, trained.test_accuracy
            self.name = f"digit classifier LeNet ({trained.model.config['features']}-d penultimate layer)"
        self.reference_name = f"{getattr(data, 'name', type(data).__name__)} {q.reference} split"
        self.n_reference = len(reference)
        with torch.no_grad():
            self.reference = quality.extract_features(self.model, reference)

    def features(self, samples: Any) -> Any:
        from difftime import quality

        return quality.extract_features(self.model, samples)


def reference_data(data: Any, split: str) -> Any:
    """Raw reference samples (uint8 images or float vectors) of ``split`` of a difftime datamodule."""
    if hasattr(data, "splits"):
        return data.splits()[split].data
    if hasattr(data, "draw"):
        return data.draw(split).data
    raise SpecError("quality.reference", f"{type(data).__name__} offers no {split} split to compare with")


def quality_row(space: FeatureSpace, samples: Any, q: QualitySpec) -> dict[str, Any]:
    """:func:`difftime.quality.quality_row` of the samples' features (FD, KID, precision, recall with
    intervals and their methods), with the reference set and the extractor's test accuracy."""
    from difftime import quality

    row = quality.quality_row(space.reference, space.features(samples), space.name, level=q.level, groups=q.resamples,
                              k=q.k, seed=q.seed)
    return row | {"reference": space.reference_name, "extractor_test_accuracy": space.accuracy}


def collect_rows(plan: Plan) -> list[dict[str, Any]]:
    """One row per sample unit: T', source, prior, sampler, NFE, bpd (terms, s.e.), quality (CI), costs."""
    space = FeatureSpace(plan)
    bpd_units = {(u.params["score"], u.params["T"], u.params["prior"]): u for u in plan.stage("evaluate") if u.kind == "bpd"}
    return [_row(plan, space, unit, bpd_units[(unit.params["score"], unit.params["T"], unit.params["prior"])])
            for unit in plan.stage("evaluate") if unit.kind == "sample"]


def _row(plan: Plan, space: FeatureSpace, unit: Unit, bpd_unit: Unit) -> dict[str, Any]:
    p = unit.params
    bpd, sampled = read_result(bpd_unit), read_result(unit)
    train_s, train_steps = fit_cost(plan.units[p["score"]])
    aux_s, aux_steps = fit_cost(plan.units[p["aux"]]) if p["aux"] else (0.0, 0)
    try:
        costs = {"sample_wall_s": sampled["wall_time_s"], "sample_s_per_sample": sampled["wall_time_s"] / sampled["n"],
                 "prior_ms_per_sample": 1e3 * sampled["prior_s_per_sample"], "nfe": sampled["nfe"]}
        bpd_values = {**{k: bpd.get(k, math.nan) for k in BPD_KEYS}, "bpd_ode": bpd.get("bpd_ode", math.nan),
                      "bpd_n": bpd["n"]}
    except (KeyError, TypeError, ZeroDivisionError) as error:
        from commands.study.records import OutputError

        raise OutputError(f"unit {unit.id} or {bpd_unit.id}: result.json lacks a value ({error!r})") from None
    return {"T": p["T"], "T_train": p["T_train"], "source": "trained" if p["T"] == p["T_train"] else "truncated",
            "prior": p["prior"], "sampler": p.get("sampler_label", p["sampler"]), "steps": p["steps"], **bpd_values,
            **quality_row(space, load_samples(unit), plan.spec.quality),
            "fid_inception": inception_fid(plan, unit),
            "score_train_s": train_s, "score_train_steps": train_steps, "aux_train_s": aux_s,
            "aux_train_steps": aux_steps, **costs, "unit": unit.id}


def inception_fid(plan: Plan, unit: Unit) -> float:
    """Inception FID of RGB-able uint8 samples where weights are given (GPU clusters); NaN otherwise."""
    weights = plan.spec.inception_weights
    if not weights or not Path(weights).is_file():
        return math.nan
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = reference_data(datamodule(plan), plan.spec.quality.reference), load_samples(unit)
    metric = FrechetInceptionDistance(feature=2048, normalize=False, antialias=False,
                                      feature_extractor_weights_path=weights)
    for images, is_real in ((real, True), (fake, False)):
        for chunk in images.split(100):
            metric.update(chunk.expand(-1, 3, -1, -1) if chunk.shape[1] == 1 else chunk, real=is_real)
    return float(metric.compute())


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_KEYS)
        writer.writeheader()
        writer.writerows([{k: row[k] for k in CSV_KEYS} for row in rows])


def log_tensorboard(folder: Path, rows: list[dict[str, Any]], figures: dict[str, Any], text: str) -> None:
    """The report as one TensorBoard run: the markdown, the figures and FD / bits/dim scalars."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    try:
        writer.add_text("study/report", text, 0)
        for name, fig in figures.items():
            writer.add_figure(f"study/{name.removesuffix('.png')}", fig, 0, close=False)
        for r in rows:
            tag = f"T{r['T']:g}-{r['source']}-{r['prior']}"
            writer.add_scalar(f"fd/{r['sampler']}/{tag}", r["fd"], r["nfe"])
            writer.add_scalar(f"bpd_elbo/{tag}", r["bpd_elbo"], 0)
    finally:
        writer.close()
