"""Config layering and hashing: the resolved LightningCLI config of each fit, and its identity.

Layers merge as LightningCLI composes ``--config`` files (mappings merge, lists are replaced);
the spec's dotted ``overrides`` are then set, with errors that name the spec key. A unit's folder
is named by :func:`digest` of what decides its outputs (:func:`training_identity` for fits).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
from pathlib import Path
from typing import Any

from commands.study.spec import ModelSpec, SpecError, SpecFileError, StudySpec, read_yaml

FIT_KINDS = ("score", "aux")  # units that are a train.py fit
SAMPLING_CALLBACKS = ("SampleGrid", "FID", "SampleWriter")  # callbacks that sample with model.sampler in a fit
DISPLAY_KEYS = ("enable_progress_bar", "enable_model_summary")  # trainer switches that change only the display


def merge(base: Any, update: Any) -> Any:
    """Deep merge of YAML layers as LightningCLI composes ``--config`` files: mappings merge, lists are replaced."""
    if isinstance(base, dict) and isinstance(update, dict):
        merged = dict(base)
        for key, value in update.items():
            merged[key] = merge(base.get(key), value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(update)


def config_file(name: str) -> Path | None:
    """A config named in a spec: a file relative to the working directory, else the installed
    copy of a shipped config (``configs/toy_ring.yaml``), else None."""
    from commands.config_files import shipped

    path = Path(name)
    return path if path.is_file() else shipped(name)


def merge_layers(paths: list[str], key: str = "config") -> dict[str, Any]:
    """The layers ``paths`` merged in order; a missing or unreadable layer names ``key[i]``."""
    config: dict[str, Any] = {}
    for i, name in enumerate(paths):
        path = config_file(name)
        if path is None:
            raise SpecFileError(name, "no such file (nor a shipped config of that name)", f"{key}[{i}]")
        layer = read_yaml(path, f"{key}[{i}]") or {}
        if not isinstance(layer, dict):
            raise SpecFileError(path, f"expected a mapping at the top, got {type(layer).__name__}", f"{key}[{i}]")
        config = merge(config, layer)
    return config


class OverrideError(ValueError):
    """An override key that does not fit the config's structure."""


def _child(node: Any, part: str, path: str) -> Any:
    """``node[part]`` for a dotted override: list parts must be an index in range; mappings create missing keys."""
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            allowed = f"0..{len(node) - 1}" if node else "none: the list is empty"
            raise OverrideError(f"'{path}' is a list of {len(node)} entries: '{part}' is not an index "
                                f"(allowed: {allowed})")
        return node[int(part)]
    if not isinstance(node, dict):
        raise OverrideError(f"'{path}' is {node!r}, not a mapping or a list: it has no key '{part}'")
    child = node.setdefault(part, {})
    if child is None:
        here = part if path == "<top>" else f"{path}.{part}"
        raise OverrideError(f"'{here}' is null in the config: set it whole instead")
    return child


def set_key(config: dict[str, Any], dotted: str, value: Any) -> None:
    """``config[a][b][c] = value`` for ``dotted = "a.b.c"`` (integer parts index lists); OverrideError
    when a part indexes a list wrongly or walks into a value."""
    parts = dotted.split(".")
    node: Any = config
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[:i]) or "<top>")
    last, path = parts[-1], ".".join(parts[:-1]) or "<top>"
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise OverrideError(f"'{path}' is a list of {len(node)} entries: '{last}' is not an index "
                                f"(allowed: {f'0..{len(node) - 1}' if node else 'none'})")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise OverrideError(f"'{path}' is {node!r}, not a mapping or a list: it has no key '{last}'")


def checkpoint_interval(config: dict[str, Any]) -> int | None:
    """``every_n_train_steps`` of the config's ModelCheckpoint, if any."""
    for callback in (config.get("trainer") or {}).get("callbacks") or []:
        if str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
            return (callback.get("init_args") or {}).get("every_n_train_steps")
    return None


def digest(value: Any) -> str:
    """Ten hex digits of SHA-256 of the canonical JSON of ``value``."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def model_config(model: ModelSpec, key: str = "score") -> dict[str, Any]:
    """The resolved config of a fit: layers, overrides, callbacks removed, ``max_steps`` = the spec's steps."""
    config = merge_layers(model.config, f"{key}.config")
    for dotted, value in model.overrides.items():
        try:
            set_key(config, dotted, value)
        except OverrideError as error:
            raise SpecError(f"{key}.overrides.{dotted}", str(error)) from None
    trainer = config.setdefault("trainer", {})
    drop = set(model.remove_callbacks)
    trainer["callbacks"] = [c for c in trainer.get("callbacks") or []
                            if str(c.get("class_path", "")).rsplit(".", 1)[-1] not in drop]
    trainer["max_steps"], trainer["max_time"] = int(model.steps), None  # done = the final step's checkpoint
    return config


def score_sde_config(spec: StudySpec) -> dict[str, Any]:
    """The score model's SDE entry (class_path / init_args) after the spec's overrides."""
    return copy.deepcopy(model_config(spec.score)["model"]["init_args"]["sde"])


def with_T(sde: dict[str, Any], T: float) -> dict[str, Any]:
    """A copy of an SDE entry at diffusion time ``T``."""
    sde = copy.deepcopy(sde)
    sde.setdefault("init_args", {})["T"] = float(T)
    return sde


def build_object(config: Any) -> Any:
    """Instantiate ``{class_path, init_args}`` (nested ones too), as LightningCLI would."""
    if isinstance(config, list):
        return [build_object(v) for v in config]
    if not isinstance(config, dict):
        return config
    if "class_path" not in config:
        return {k: build_object(v) for k, v in config.items()}
    module, name = config["class_path"].rsplit(".", 1)
    kwargs = {k: build_object(v) for k, v in (config.get("init_args") or {}).items()}
    return getattr(importlib.import_module(module), name)(**kwargs)


def training_identity(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a fit unit's resolved config that decides its checkpoints: what its hash covers.

    Left out, so that changing them neither renames nor retrains a finished unit: the model's
    ``sampler`` when no callback of the fit samples with it (the study's sample units choose their
    own), and the trainer's display switches. Everything else, evaluation callbacks included, stays.
    """
    identity = copy.deepcopy(config)
    trainer = identity.get("trainer") or {}
    for key in DISPLAY_KEYS:
        trainer.pop(key, None)
    names = {str(c.get("class_path", "")).rsplit(".", 1)[-1] for c in trainer.get("callbacks") or []}
    if not names & set(SAMPLING_CALLBACKS):
        ((identity.get("model") or {}).get("init_args") or {}).pop("sampler", None)
    return identity
