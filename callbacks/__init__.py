"""Lightning callbacks: metrics (bits/dim, KL gap over T, FID), sample grids and writers,
preemption. What they share lives in :mod:`callbacks.support`; the CheckpointIO plugin, which only
the CLI installs, in :mod:`commands.checkpoint_io`."""

from callbacks.bpd import BitsPerDim
from callbacks.fid import FID
from callbacks.kl_gap import KLGap
from callbacks.preemption import Preempted, Preemption
from callbacks.sample_grid import SampleGrid
from callbacks.sample_writer import SampleWriter

__all__ = [
    "BitsPerDim",
    "FID",
    "KLGap",
    "Preempted",
    "Preemption",
    "SampleGrid",
    "SampleWriter",
]
