"""difftime.randomness: counter-based seeds, per-sample and sharded noise, contiguous shards."""

from __future__ import annotations

import pytest
import torch

from difftime import randomness, utils
from difftime.randomness import PerSampleNoise, ShardedNoise, Stream, randn, shard_range, step_seed


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


def test_shard_range_partitions_in_order():
    for n in (0, 1, 7, 103):
        for world in (1, 2, 3, 8):
            blocks = [shard_range(n, r, world) for r in range(world)]
            assert [i for b in blocks for i in b] == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_old_import_paths_name_the_same_objects():
    """Modules that import randomness from difftime.utils get the very same objects."""
    for name in ("Generator", "NoiseSource", "PerSampleNoise", "ShardedNoise", "Stream", "generate_indexed",
                 "rademacher_like", "rand", "randn", "shard_range", "step_seed"):
        assert getattr(utils, name) is getattr(randomness, name), name


def test_generate_indexed_gives_each_sample_its_own_seed_whatever_the_batch():
    draw = lambda k, generator: (randn((k, 3), generator), {"k": k})  # noqa: E731
    a, _ = randomness.generate_indexed(draw, range(2, 9), seed=5, batch_size=3)
    b, infos = randomness.generate_indexed(draw, range(2, 9), seed=5, batch_size=7)
    assert torch.equal(torch.cat(a), torch.cat(b)) and [i["k"] for i in infos] == [7]
    alone = randn((1, 3), torch.Generator().manual_seed(5 + 4))
    assert torch.equal(torch.cat(a)[2], alone[0])  # sample 4 (row 2) drew from seed 5 + 4
