"""Shared fixtures. Everything runs on CPU with no network."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slurm`` run on a real cluster (``scripts/local_slurm.sh start``); without one
    they are skipped with the reason, which ``-ra`` prints in the summary."""
    marked = [item for item in items if item.get_closest_marker("slurm")]
    if not marked:
        return
    from slurm_helpers import cluster_problem

    reason = cluster_problem()
    if reason:
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def one_thread():
    """For tests of many tiny ops, where a second (shared) intra-op thread only adds overhead.

    Test modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture(params=["vp", "subvp", "ve"])
def sde(request):
    from difftime.sde import SubVPSDE, VESDE, VPSDE

    return {"vp": VPSDE(T=0.6), "subvp": SubVPSDE(T=0.6), "ve": VESDE(T=0.6, sigma_max=5.0)}[request.param]
