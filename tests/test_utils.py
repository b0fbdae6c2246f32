"""difftime.utils: config errors, shape helpers, recorded constructor arguments, argument checks."""

from __future__ import annotations

import pytest
import torch

from difftime.utils import ConfigError, RecordsInitArgs, append_dims


def test_append_dims():
    assert append_dims(torch.ones(4), 4).shape == (4, 1, 1, 1)
    assert append_dims(torch.ones(4), 2).shape == (4, 1)
    with pytest.raises(ValueError):
        append_dims(torch.ones(4, 2), 1)


class _Base(RecordsInitArgs):
    def __init__(self, a: int = 1, shape: tuple[int, ...] = (1, 2)) -> None:
        self.a, self.shape = a, shape


class _Derived(_Base):
    def __init__(self, c: float = 0.5, name: str = "x") -> None:
        super().__init__(a=7)
        self.c = c


class _Inherits(_Derived):
    pass


def test_recorded_init_args_are_the_outermost_call_with_defaults():
    assert _Base(a=3).init_args == {"a": 3, "shape": [1, 2]}
    assert _Derived(0.25).init_args == {"c": 0.25, "name": "x"}  # not the parent's a=7
    assert _Inherits(name="y").init_args == {"c": 0.5, "name": "y"}
    rebuilt = _Derived(**_Derived(0.25, "z").init_args)
    assert (rebuilt.c, rebuilt.a) == (0.25, 7)
    assert _Base(a=torch.nn.Linear(1, 1)).init_args is None  # not plain: not rebuildable


def test_checks_name_the_key_and_range():
    from difftime import checks

    assert checks.integer("steps", 3, "X") == 3 and checks.integer("steps", None, "X", optional=True) is None
    for bad in (0, 1.5, True, "3"):
        with pytest.raises(ConfigError, match=r"config key 'steps' \(X\) .* an integer >= 1"):
            checks.integer("steps", bad, "X")
    assert checks.real("decay", 0.0, "Y", 0.0, 1.0, low_open=False) == 0.0
    with pytest.raises(ConfigError, match=r"decay.*\[0, 1\)"):
        checks.real("decay", 1.0, "Y", 0.0, 1.0, low_open=False)
    with pytest.raises(ConfigError, match="one of 'a', 'b'"):
        checks.choice("mode", "c", ("a", "b"), "Z")
