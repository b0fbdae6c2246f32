"""Randomness helpers: counter-based seeds, per-sample and sharded noise."""

from __future__ import annotations

import pytest
import torch

from difftime.utils import PerSampleNoise, ShardedNoise, append_dims, randn, step_seed


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
