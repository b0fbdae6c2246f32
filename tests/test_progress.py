"""Progress output: a global fit bar, plain lines (no carriage returns) outside a terminal, quiet
when the Trainer's progress bar is off, and the samplers' step callback feeding one bar."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from callbacks.support.progress import LineBar, SamplingProgress, planned_steps, progress_bar
from difftime.samplers import AdaptiveODE, EulerMaruyama
from difftime.sde import VPSDE

ROOT = Path(__file__).resolve().parents[1]
TOY = ["--config", str(ROOT / "configs/toy_gaussian.yaml"), "--trainer.max_steps", "12",
       "--trainer.val_check_interval", "6", "--trainer.limit_val_batches", "1",
       "--trainer.enable_model_summary", "false", "--model.init_args.sampler.init_args.steps", "4",
       "--trainer.callbacks+=callbacks.BitsPerDim", "--trainer.callbacks.max_samples=64"]


def test_line_bar_prints_a_line_per_tenth_and_no_carriage_returns():
    stream = io.StringIO()
    bar = LineBar(desc="work", total=1000, unit="step", stream=stream, interval=3600)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    text = stream.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and "\x1b" not in text
    assert 10 <= len(lines) <= 11, lines  # one per 10 %, nothing at step 0
    assert lines[-1].startswith("work: 100% 1000/1000 step")


def test_progress_bar_is_silent_when_disabled():
    stream = io.StringIO()
    bar = progress_bar("quiet", 10, enabled=False, stream=stream)
    bar.update(10)
    bar.close()
    assert stream.getvalue() == ""


def test_sampler_callback_drives_one_bar_over_every_batch():
    stream, sde = io.StringIO(), VPSDE(T=1.0)
    sampler = EulerMaruyama(steps=7)
    assert planned_steps(sampler, None) == 7 and planned_steps(sampler, 3) == 3
    assert planned_steps(AdaptiveODE(), None) is None  # the solver chooses its steps
    bar = LineBar(desc="sampling", total=2 * 7, unit="step", stream=stream, interval=3600)
    with SamplingProgress(bar, 8) as tracker:
        for done in (4, 8):
            sampler(lambda x, t: -x, sde, torch.randn(4, 2), callback=tracker.step)
            tracker.batch(done, 8)
    last = stream.getvalue().splitlines()[-1]
    assert "14/14 step" in last and "NFE 7" in last


def test_fit_outside_a_terminal_prints_progress_lines_not_carriage_returns(tmp_path, monkeypatch, capfd):
    from commands import cli as train

    monkeypatch.chdir(tmp_path)
    train.main(args=["fit", *TOY])
    out, err = capfd.readouterr()
    assert "\r" not in out and "\r" not in err
    fit_lines = [line for line in out.splitlines() if line.startswith("fit")]
    assert fit_lines and "12/12 step" in fit_lines[-1]  # counts steps to max_steps, not an epoch
    assert any(line.startswith("BitsPerDim (val)") for line in out.splitlines())
    assert any(line.startswith("SampleGrid step 12") and "4/4 step" in line for line in out.splitlines())
    assert len(out) < 20_000


def test_enable_progress_bar_false_prints_no_progress(tmp_path, monkeypatch, capfd):
    from commands import cli as train

    monkeypatch.chdir(tmp_path)
    train.main(args=["fit", *TOY, "--trainer.enable_progress_bar", "false"])
    out, _ = capfd.readouterr()
    assert not [line for line in out.splitlines() if "step [" in line or "NFE [" in line], out
