"""Config errors, shape-agnostic tensor helpers and recorded constructor arguments.

Every function in the core works on ``x: [B, *D]`` whatever ``D`` is (2-D toy vectors in the
tests, images in training). Per-sample reductions use ``flatten(1)``; per-sample coefficients
are broadcast with :func:`append_dims`. Randomness lives in :mod:`difftime.randomness`; its
names are re-exported here for the modules that still import them from this one.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import Tensor

from difftime.randomness import (Generator, NoiseSource, PerSampleNoise, ShardedNoise, Stream,  # noqa: F401
                                 generate_indexed, rademacher_like, rand, randn, shard_range, step_seed)


class ConfigError(ValueError):
    """A constructor argument is out of its allowed range.

    ``key`` is the argument name as it appears in the config (for example ``T`` of an SDE);
    the command-line entry point prefixes it with the full config path.
    """

    def __init__(self, key: str, value: object, allowed: str, owner: str = "") -> None:
        self.key, self.value, self.allowed, self.owner = key, value, allowed, owner
        super().__init__(self._message())

    def _message(self, prefix: str = "") -> str:
        where = f"{prefix}{self.key}"
        owner = f" ({self.owner})" if self.owner else ""
        return f"config key '{where}'{owner} = {self.value!r} is invalid: allowed {self.allowed}"

    def with_prefix(self, prefix: str) -> "ConfigError":
        error = ConfigError(prefix + self.key, self.value, self.allowed, self.owner)
        return error


def append_dims(x: Tensor, target_dims: int) -> Tensor:
    """Append trailing singleton dims so ``x: [B]`` broadcasts against a ``[B, *D]`` tensor."""
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}")
    return x[(...,) + (None,) * missing]


def sum_flat(x: Tensor) -> Tensor:
    """Per-sample sum over all non-batch dims: ``[B, *D] -> [B]``."""
    return x.flatten(1).sum(1)


def mean_flat(x: Tensor) -> Tensor:
    """Per-sample mean over all non-batch dims: ``[B, *D] -> [B]``."""
    return x.flatten(1).mean(1)


# ---------------------------------------------------------------------- recorded constructor arguments
def plain(value: Any) -> Any:
    """``value`` as plain config types (tuples become lists), or raise TypeError if it has none."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: plain(v) for k, v in value.items()}
    raise TypeError(f"{type(value).__name__} is not a plain config value")


class RecordsInitArgs:
    """Mixin: ``self.init_args`` holds the arguments of the outermost constructor call.

    Every subclass's ``__init__`` is wrapped when the class is created; the outermost call (the
    most-derived constructor) binds its arguments to its signature, applies the defaults and
    stores them as plain values, so ``type(obj)(**obj.init_args)`` rebuilds the object and a
    checkpoint can hold them with ``weights_only``. Nothing is written by hand, so the record
    cannot drift from the signature. Arguments that are not plain (an ``nn.Module`` given in
    Python) make the object not rebuildable: ``init_args`` is then None.
    """

    init_args: dict[str, Any] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None:
            cls.__init__ = _recording(init)


def _recording(init: Any) -> Any:
    signature = inspect.signature(init)

    @functools.wraps(init)
    def recorded(self: Any, *args: Any, **kwargs: Any) -> None:
        outermost = "_init_depth" not in self.__dict__
        self.__dict__["_init_depth"] = True
        try:
            init(self, *args, **kwargs)
        finally:
            if outermost:
                del self.__dict__["_init_depth"]
        if outermost:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            arguments = dict(list(bound.arguments.items())[1:])
            try:
                self.__dict__["init_args"] = plain(arguments)
            except TypeError:
                self.__dict__["init_args"] = None

    return recorded
