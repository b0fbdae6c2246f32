"""TensorBoard as a reader sees it: a flat HParams record with real metrics (no hp_metric = -1),
one custom-scalars chart per KL-gap term, terms that add up, and steps that agree between
scalars, figures, files and checkpoint names."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, object]:
    """A 12-step toy fit with BitsPerDim, KLGap and SampleGrid; validation every 6 steps."""
    import train
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import yaml

    root = tmp_path_factory.mktemp("tb")
    save_dir = root / "runs"
    config = yaml.safe_load((ROOT / "configs/toy_gaussian.yaml").read_text())
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(save_dir)
    config["trainer"]["callbacks"][0]["init_args"].update(every_n_train_steps=4, save_top_k=-1)
    config["trainer"]["callbacks"] += [
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
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert {"val/bpd_elbo", "val/loss", "kl_gap/T_star", "samples/nfe"} <= metrics
    assert "hp_metric" not in acc.Tags()["scalars"] and "val/bpd_ode" not in metrics  # ode is off by default
    assert "epoch" not in acc.Tags()["scalars"]  # it was the first card of the default view


def test_custom_scalars_put_every_T_of_a_term_in_one_chart(run):
    from tensorboard.plugins.custom_scalar import layout_pb2

    _, acc = run
    layout = layout_pb2.Layout.FromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert any(r"kl_gap/prior/T=.*" in tags for tags in charts.values())
    assert any(r"kl_gap/diffusion/T=.*" in tags for tags in charts.values())
    assert any("^val/bpd_reconstruction$" in tags for tags in charts.values())
    assert not any("^val/bpd_ode$" in tags for tags in charts.values())  # no ODE chart when ode is off


def test_steps_agree_between_scalars_figures_files_and_checkpoints(run):
    folder, acc = run
    assert [e.step for e in acc.Scalars("val/bpd_elbo")] == [6, 12]
    assert [e.step for e in acc.Scalars("val/loss")] == [6, 12]
    assert [e.step for e in acc.Images("kl_gap/curves")] == [6, 12]
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
    reconstruction = acc.Scalars("kl_gap/reconstruction")[-1].value
    assert reconstruction == pytest.approx(float(rows[-1]["reconstruction_bpd"]), rel=1e-5)


def test_sample_grid_has_a_caption_with_sampler_nfe_and_prior(run):
    _, acc = run
    caption = acc.Tensors("samples/caption/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "dpm_solver_pp" in caption and "NFE" in caption and "prior gaussian" in caption
