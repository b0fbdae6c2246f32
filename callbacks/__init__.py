"""Lightning callbacks: metrics (bits/dim, KL gap over T, FID), sample grids and writers,
preemption, checkpoint IO."""

from callbacks.bpd import BitsPerDim
from callbacks.checkpoint_io import CorruptCheckpointError, SafeCheckpointIO
from callbacks.fid import FID
from callbacks.kl_gap import KLGap
from callbacks.preemption import Preempted, Preemption
from callbacks.sample_grid import SampleGrid
from callbacks.sample_writer import SampleWriter

__all__ = [
    "BitsPerDim",
    "CorruptCheckpointError",
    "FID",
    "KLGap",
    "Preempted",
    "Preemption",
    "SafeCheckpointIO",
    "SampleGrid",
    "SampleWriter",
]
