"""Randomness helpers: counter-based seeds, per-sample and sharded noise."""

from __future__ import annotations

import pytest
import torch

from difftime.utils import (ConfigError, PerSampleNoise, RecordsInitArgs, ShardedNoise, Stream, append_dims, randn,
                            shard_range, step_seed)


def test_append_dims():
    assert append_dims(torch.ones(4), 4).shape == (4, 1, 1, 1)
    assert append_dims(torch.ones(4), 2).shape == (4, 1)
    with pytest.raises(ValueError):
        append_dims(torch.ones(4, 2), 1)


def test_step_seed_is_deterministic_and_sensitive_to_each_counter():
    base = step_seed(7, 100, 0)
    assert base == step_seed(7, 100, 0)
    others = {step_seed(7, 101, 0), step_seed(7, 100, 1), step_seed(8, 100, 0), step_seed(7, 0, 100)}
    assert base not in others and len(others) == 4
    assert 0 <= base < 2**63


def test_per_sample_noise_is_batch_invariant():
    seeds = list(range(10, 16))
    whole = randn((6, 3, 2), PerSampleNoise(seeds))
    halves = torch.cat([randn((3, 3, 2), PerSampleNoise(seeds[:3])), randn((3, 3, 2), PerSampleNoise(seeds[3:]))])
    assert torch.equal(whole, halves)


@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_noise_equals_single_process_draws(world_size):
    global_batch = 8
    local = global_batch // world_size
    single = ShardedNoise(torch.Generator().manual_seed(3), global_batch, 0)
    ref = [single.randn((global_batch, 5), torch.device("cpu")), single.rand((global_batch,), torch.device("cpu"))]
    for rank in range(world_size):
        shard = ShardedNoise(torch.Generator().manual_seed(3), global_batch, rank * local)
        a = shard.randn((local, 5), torch.device("cpu"))
        b = shard.rand((local,), torch.device("cpu"))
        assert torch.equal(a, ref[0][rank * local:(rank + 1) * local])
        assert torch.equal(b, ref[1][rank * local:(rank + 1) * local])


def test_stream_tags_are_distinct():
    """Every consumer of counter-based randomness has its own first counter."""
    values = [s.value for s in Stream]
    assert len(set(values)) == len(values) == len(Stream.__members__)
    seeds = {step_seed(0, tag, 3) for tag in Stream}
    assert len(seeds) == len(values)  # the same seed and counter in two streams never collide


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


def test_shard_range_partitions_in_order():
    for n in (0, 1, 7, 103):
        for world in (1, 2, 3, 8):
            blocks = [shard_range(n, r, world) for r in range(world)]
            assert [i for b in blocks for i in b] == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


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
