"""TensorBoard as a reader sees it: a default view that opens on the samples and the loss, a flat
HParams record with its key metrics first (no hp_metric = -1), one custom-scalars chart per
KL-gap term, a KL-gap figure readable at card size, terms that add up, and steps that agree
between scalars, figures, files and checkpoint names. Screenshots of each view:
benchmarks/results/tensorboard/."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, object]:
    """A 12-step toy fit with BitsPerDim, KLGap and SampleGrid; validation every 6 steps."""
    from commands import cli as train
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import yaml

    root = tmp_path_factory.mktemp("tb")
    save_dir = root / "runs"
    config = yaml.safe_load((ROOT / "configs/toy_gaussian.yaml").read_text())
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(save_dir)
    config["trainer"]["callbacks"][0]["init_args"].update(every_n_train_steps=4, save_top_k=-1)
    config["trainer"]["callbacks"] += [
        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}},
        {"class_path": "callbacks.BitsPerDim", "init_args": {"max_samples": 64}},
        {"class_path": "callbacks.KLGap", "init_args": {"max_samples": 64, "n_grid": 3, "n_t": 2}}]
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    train.main(args=["fit", "--config", str(root / "config.yaml"),
                     "--trainer.max_steps", "12", "--trainer.val_check_interval", "6",
                     "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "3",
                     "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                     "--model.init_args.sampler.init_args.steps", "4"])
    folder = save_dir / "toy_gaussian/default"
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return folder, acc


def test_hparams_tab_holds_a_flat_record_and_real_metrics(run):
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, acc = run
    content = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    keys = set(session.hparams)
    assert {"T", "T_eval", "data", "prior", "sampler", "sampler_steps", "sde", "sde_eps", "score_net_params",
            "train_batch_size", "train_lr"} <= keys
    assert not [k for k in keys if "class_path" in k or "instantiator" in k or "/" in k]
    assert session.hparams["prior"].string_value == "gaussian" and session.hparams["T"].number_value == 1.0
    assert session.hparams["score_net_params"].number_value > 1000
    metrics = [m.name.tag for m in experiment.metric_infos]
    # the tab shows five metrics after five hparam columns: the results first, nothing derived
    assert metrics == ["val/bpd_elbo", "val_kl_gap/T_star", "val_kl_gap/bpd_star", "val/loss"]
    assert "hp_metric" not in acc.Tags()["scalars"] and "val/bpd_ode" not in metrics  # ode is off by default
    assert "epoch" not in acc.Tags()["scalars"]  # it was the first card of the default view


def tensorboard_order(a: str, b: str) -> int:
    """TensorBoard's tag comparison (Time Series): '/' and digits sort before every other
    character, and runs of digits compare as numbers."""
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i].isdigit() and b[j].isdigit():
            m, n = i, j
            while m < len(a) and a[m].isdigit():
                m += 1
            while n < len(b) and b[n].isdigit():
                n += 1
            if int(a[i:m]) != int(b[j:n]):
                return -1 if int(a[i:m]) < int(b[j:n]) else 1
            i, j = m, n
            continue
        early_a, early_b = a[i] == "/" or a[i].isdigit(), b[j] == "/" or b[j].isdigit()
        if early_a != early_b:
            return -1 if early_a else 1
        if a[i] != b[j]:
            return -1 if a[i] < b[j] else 1
        i, j = i + 1, j + 1
    return (len(a) - i > 0) - (len(b) - j > 0)


def test_default_view_opens_on_samples_and_loss(run):
    """Time Series groups tags by their first path part, sorted, and expands the first two groups:
    they must be the sample grid and the training loss; the KL gap's per-T' cards come last."""
    from functools import cmp_to_key

    _, acc = run
    tags = sorted(acc.Tags()["scalars"] + acc.Tags()["images"], key=cmp_to_key(tensorboard_order))
    groups = list(dict.fromkeys(tag.split("/", 1)[0] for tag in tags))
    assert groups == ["samples", "train", "val", "val_kl_gap", "val_kl_gap_by_T"], groups
    assert tags[0] == "samples" and "train/loss" in tags and "train/lr-Adam" in tags  # the LR card joins train/
    by_T = [tag for tag in tags if "/T=" in tag]
    assert len(by_T) == 9 and all(tag.startswith("val_kl_gap_by_T/") for tag in by_T)  # 3 terms x 3 T'
    assert [tag for tag in tags if tag.startswith("val_kl_gap/")] == [
        "val_kl_gap/T_star", "val_kl_gap/bpd_star", "val_kl_gap/curves", "val_kl_gap/reconstruction"]


def test_kl_gap_figure_fits_a_card_with_its_legend_outside_the_curves(run):
    """One image with T' on the x-axis, about card size, and a legend that covers no data."""
    from callbacks.kl_gap import Row, curves_figure

    _, acc = run
    image = acc.Images("val_kl_gap/curves")[-1]
    assert 400 <= image.width <= 600 and image.height <= 300  # a card shows images about 220 px tall
    rows = [Row(t, 1 / t, 0.01, t, 0.01, -0.5, 0.01, 1 / t + t + 0.5, 0.01, "gaussian") for t in (0.2, 0.6, 1.0)]
    rows.append(Row(1.0, 0.3, 0.01, 1.0, 0.01, -0.5, 0.01, 1.8, 0.01, "aux:GlowPrior"))
    figure = curves_figure(rows, 1.0, 64, 12)
    figure.canvas.draw()
    axis, = figure.axes
    legend = figure.legends[0].get_window_extent()
    assert axis.get_xlabel().startswith("T'") and len(figure.legends[0].get_texts()) == 6
    assert not legend.overlaps(axis.get_window_extent()), (legend, axis.get_window_extent())
    assert legend.x0 >= 0 and legend.x1 <= figure.bbox.width  # not clipped


def test_custom_scalars_put_every_T_of_a_term_in_one_chart(run):
    from tensorboard.plugins.custom_scalar import layout_pb2

    _, acc = run
    layout = layout_pb2.Layout.FromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert any(r"^val_kl_gap_by_T/prior/T=.*" in tags for tags in charts.values())
    assert any(r"^val_kl_gap_by_T/diffusion/T=.*" in tags for tags in charts.values())
    assert any("^val/bpd_reconstruction$" in tags for tags in charts.values())
    assert not any("^val/bpd_ode$" in tags for tags in charts.values())  # no ODE chart when ode is off


def test_steps_agree_between_scalars_figures_files_and_checkpoints(run):
    folder, acc = run
    assert [e.step for e in acc.Scalars("val/bpd_elbo")] == [6, 12]
    assert [e.step for e in acc.Scalars("val/loss")] == [6, 12]
    assert [e.step for e in acc.Images("val_kl_gap/curves")] == [6, 12]
    assert sorted(p.name for p in (folder / "kl_gap").glob("*.csv")) == ["step=00000006.csv", "step=00000012.csv"]
    names = sorted(p.name for p in (folder / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", "step=00000004.ckpt", "step=00000008.ckpt", "step=00000012.ckpt"], names
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 5, 8, 11]  # batch k logs at step k


def test_kl_gap_csv_terms_add_up_with_the_reconstruction(run):
    folder, acc = run
    with open(folder / "kl_gap/step=00000012.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and {"reconstruction_bpd", "reconstruction_se"} <= set(rows[0])
    for row in rows:
        parts = float(row["prior_bpd"]) + float(row["diffusion_bpd"]) - float(row["reconstruction_bpd"])
        assert parts == pytest.approx(float(row["total_bpd"]), abs=1e-6)
    reconstruction = acc.Scalars("val_kl_gap/reconstruction")[-1].value
    assert reconstruction == pytest.approx(float(rows[-1]["reconstruction_bpd"]), rel=1e-5)


def test_sample_grid_has_a_caption_with_sampler_nfe_and_prior(run):
    _, acc = run
    caption = acc.Tensors("samples/caption/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "dpm_solver_pp" in caption and "NFE" in caption and "prior gaussian" in caption
