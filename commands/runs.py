"""A trained run, rebuilt from its saved config and checkpoint (Python, notebooks, ``sample.py``).

    model, datamodule = load_run("runs/quickstart/default/checkpoints/last.ckpt")

The model and datamodule are rebuilt from the ``config.yaml`` that LightningCLI saved with the
run (through :func:`commands.cli.main`, so every config check of ``train.py`` applies); the weights
come from a verified weights-only load of the checkpoint (the EMA weights are used). ``prior``
chooses the distribution at T: ``gaussian`` (the SDE's prior) or the path of an AuxPriorModule
checkpoint (Franzese et al. 2023, Sec. 3); by default the run's own prior. ``eval_T`` truncates
the trained model post hoc at T' (eps < T' <= T).

:func:`checkpoint_conflicts` is the one check that a checkpoint matches a config, used by
``train.py`` (``--ckpt_path``) and here: the trained model (network, training SDE, data shape)
comes from the checkpoint, and a config that contradicts it is an error naming the key and both
values.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from torch import nn

#: init_args of each system that define the *trained* model; everything else is evaluation or
#: optimisation and may differ from the checkpoint
MODEL_KEYS = {"ScoreModule": ("net", "sde"), "AuxPriorModule": ("prior", "sde")}
_CONFIG_KEYS = ("seed_everything", "model", "data")  # the run's trainer, ckpt_path etc. are not needed
_AUX = "difftime.aux_priors.AuxPriorCheckpoint"


class RunError(ValueError):
    """A run that cannot be rebuilt as asked (config, checkpoint, prior): the message names the file."""


# ---------------------------------------------------------------------- checkpoint vs config
def _plain(value: Any) -> Any:
    """Tuples as lists, so a checkpoint's values compare equal to the parsed config's."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _leaf_conflicts(saved: Any, given: Any, key: str, source: str) -> list[str]:
    """Leaves where ``given`` contradicts the checkpoint's ``saved`` value, one message each."""
    if isinstance(saved, dict) and isinstance(given, dict):
        if "class_path" in saved and saved.get("class_path") != given.get("class_path"):
            return [f"config key '{key}.class_path' = {given.get('class_path')} {source}, "
                    f"{saved.get('class_path')} in the checkpoint"]
        return [m for k in saved if k in given for m in _leaf_conflicts(saved[k], given[k], f"{key}.{k}", source)]
    if _plain(saved) != _plain(given):
        return [f"config key '{key}' = {given!r} {source}, {saved!r} in the checkpoint"]
    return []


def _config_conflicts(hparams: Mapping[str, Any], model: Mapping[str, Any], source: str) -> list[str]:
    saved_class = str(hparams.get("_class_path") or "")
    if saved_class and model.get("class_path") and saved_class != model["class_path"]:
        return [f"config key 'model.class_path' = {model['class_path']} {source}, {saved_class} in the checkpoint"]
    init_args = model.get("init_args") or {}
    keys = MODEL_KEYS.get(saved_class.rsplit(".", 1)[-1], ("net", "sde"))
    return [m for k in keys if k in hparams and k in init_args
            for m in _leaf_conflicts(hparams[k], init_args[k], f"model.init_args.{k}", source)]


def _record_conflicts(record: Mapping[str, Any], sde: Mapping[str, Any] | None,
                      data_shape: Sequence[int] | None) -> list[str]:
    from difftime.priors import describe_sde, same_q_T

    messages = []
    saved = record.get("sde")
    if saved is not None and sde is not None and not (same_q_T(saved, sde) and saved.get("eps") == sde.get("eps")):
        messages.append(f"the checkpoint was trained with {describe_sde(saved)} but the config gives "
                        f"{describe_sde(sde)} (post-hoc truncation: --eval_T, not another SDE)")
    shape = record.get("data_shape")
    if shape is not None and data_shape is not None and list(shape) != list(data_shape):
        messages.append(f"config key 'data' gives data of shape {tuple(data_shape)}, the checkpoint was trained on "
                        f"{tuple(shape)}; the data shape comes from the checkpoint")
    return messages


def checkpoint_conflicts(checkpoint: Mapping[str, Any], model_config: Mapping[str, Any] | None = None,
                         sde: Mapping[str, Any] | None = None, data_shape: Sequence[int] | None = None,
                         source: str = "on the command line") -> list[str]:
    """What a config contradicts in the trained model of a checkpoint, one message per key.

    ``model_config`` (the ``model`` entry: class_path/init_args) is compared with the saved
    hyperparameters on the keys of :data:`MODEL_KEYS` only, class paths as strings, never
    imported; ``sde`` (``SDE.hparams()`` of a built model) and ``data_shape`` with the
    checkpoint's ``difftime`` record. Whatever is None is not compared. ``source`` says where the
    config's values came from (``on the command line``, ``in <config.yaml>``).
    """
    messages = []
    if model_config is not None:
        messages += _config_conflicts(checkpoint.get("hyper_parameters") or {}, model_config, source)
    if any("model.init_args.sde" in m for m in messages):
        sde = None  # already named, key by key
    return messages + _record_conflicts(checkpoint.get("difftime") or {}, sde, data_shape)


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Verified weights-only load of a Lightning checkpoint; anything but its dictionary is refused."""
    from difftime.checkpoints import load_verified

    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint {path} not found")
    state = load_verified(path, mmap=mmap)
    if not isinstance(state, dict) or "state_dict" not in state:
        what = f"a dictionary without 'state_dict' (keys {sorted(map(str, state))[:5]})" \
            if isinstance(state, dict) else f"a {type(state).__name__}"
        raise RunError(f"checkpoint {path} is not a Lightning checkpoint: it holds {what}")
    return state


# ---------------------------------------------------------------------- rebuilding a run
def run_config(path: str | Path, prior: str | None = None, eval_T: float | None = None) -> dict[str, Any]:
    """The model/data part of a saved run config, with a bare CPU trainer.

    ``prior`` replaces the run's prior: ``"gaussian"`` (the SDE's own) or the path of an
    AuxPriorModule checkpoint; None keeps the run's. ``eval_T`` sets the post-hoc truncation T'.
    The score model checks both (eps < T' <= T; the prior's SDE, T' and shape).
    """
    try:
        with open(path) as handle:
            saved = yaml.safe_load(handle)
    except OSError as error:
        raise RunError(f"config {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise RunError(f"config {path} is not valid YAML ({str(error).splitlines()[0]})") from None
    model = (saved or {}).get("model") if isinstance(saved, dict) else None
    if not isinstance(model, dict) or not str(model.get("class_path", "")).endswith("ScoreModule"):
        found = model.get("class_path") if isinstance(model, dict) else None
        raise RunError(f"config {path} does not configure a ScoreModule (model.class_path = {found!r})")
    init_args = dict(model.get("init_args") or {})
    if prior == "gaussian":
        init_args["prior"] = None
    elif prior is not None:
        init_args["prior"] = {"class_path": _AUX, "init_args": {"path": str(prior)}}
    if eval_T is not None:
        init_args["eval_T"] = float(eval_T)
    config = {k: v for k, v in saved.items() if k in _CONFIG_KEYS}
    config["model"] = {"class_path": model["class_path"], "init_args": init_args}
    config["trainer"] = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                         "callbacks": []}
    return config


def build(config_path: str | Path, prior: str | None = None, eval_T: float | None = None) -> tuple[nn.Module, Any]:
    """(ScoreModule, datamodule) from a saved config, with the chosen prior and truncation."""
    from commands.cli import CliFailed, build_cli

    config = run_config(config_path, prior, eval_T)
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees the caller's own arguments
    try:
        with _quiet_lightning():
            cli = build_cli(args=config, run=False)
    except CliFailed as failure:
        raise RunError(f"{_option_named(failure, prior, eval_T)}{failure}") from None
    finally:
        sys.argv = argv
    return cli.model, cli.datamodule


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's INFO lines (``Seed set to``, the device banner) are not news when rebuilding a
    run: a refused config stays one line on stderr."""
    loggers = [logging.getLogger(name) for name in ("lightning.fabric", "lightning.pytorch")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _option_named(failure: Exception, prior: str | None, eval_T: float | None) -> str:
    """``--prior X: `` / ``--eval_T X: `` when the refused config value is one the caller chose."""
    text = str(failure)
    if prior is not None and ("prior" in text or str(prior) in text):
        return f"--prior {prior}: "
    if eval_T is not None and "eval_T" in text:
        return f"--eval_T {eval_T:g}: "
    return ""


def _shape_mismatches(model: nn.Module, state: Mapping[str, Any]) -> list[str]:
    own = model.state_dict()
    return [f"{k} {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the config's model"
            for k, v in state.items() if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]


def load_weights(model: nn.Module, ckpt_path: str | Path, model_config: Mapping[str, Any] | None = None,
                 source: str = "in the config") -> None:
    """Verified weights-only load of the score model; the prior is the config's (``prior.*`` skipped).

    The checkpoint must match the model's config (``model_config``, the ``model`` entry it was
    built from, values ``source``), SDE and data shape (:func:`checkpoint_conflicts`), and its
    tensors the model's; either failure is one :class:`RunError` naming the file and the first
    difference.
    """
    checkpoint = load_checkpoint(ckpt_path)
    conflicts = checkpoint_conflicts(checkpoint, model_config, sde=model.sde.hparams(),
                                     data_shape=getattr(model, "data_shape", None), source=source)
    if conflicts:
        raise RunError(f"checkpoint {ckpt_path} does not match the config: {'; '.join(conflicts)}; "
                       "use the run's own config.yaml")
    state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("prior.")}
    mismatched = _shape_mismatches(model, state)
    if mismatched:
        raise RunError(f"checkpoint {ckpt_path} does not match the config's network: {len(mismatched)} tensors "
                       f"differ in shape, the first {mismatched[0]}; use the run's own config.yaml")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("prior.")]
    if missing or unexpected:
        raise RunError(f"checkpoint {ckpt_path} does not match the config's network: {len(missing)} tensors "
                       f"missing (first {missing[:1]}), {len(unexpected)} unexpected (first {unexpected[:1]})")


def load_run(ckpt_path: str | Path, config: str | Path | None = None, prior: str | None = None,
             eval_T: float | None = None, device: str = "cpu") -> tuple[nn.Module, Any]:
    """(trained ScoreModule ready to sample, its datamodule) from a checkpoint of a run.

    ``config`` defaults to the run's ``config.yaml`` (``<run>/checkpoints/x.ckpt`` -> ``<run>/config.yaml``);
    ``prior`` and ``eval_T`` as for ``sample.py``. Weights are verified and loaded weights-only;
    the data scaling of the run's datamodule is attached, so ``model.to_images`` and
    ``model.bits_per_dim`` work on the run's data.
    """
    ckpt_path = Path(ckpt_path)
    config = Path(config) if config is not None else ckpt_path.parent.parent / "config.yaml"
    model, datamodule = build(config, prior, eval_T)
    load_weights(model, ckpt_path, run_config(config)["model"], f"in {config}")
    model.scaling = datamodule.scaling
    return model.to(device).eval(), datamodule
