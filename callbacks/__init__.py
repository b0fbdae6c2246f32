"""Lightning callbacks: sample grids, preemption, checkpoint IO (and metrics)."""

from callbacks.bpd import BitsPerDim
from callbacks.checkpoint_io import CorruptCheckpointError, SafeCheckpointIO
from callbacks.fid import FID
from callbacks.kl_gap import KLGap
from callbacks.preemption import Preempted, Preemption
from callbacks.sample_grid import SampleGrid

__all__ = [
    "BitsPerDim",
    "CorruptCheckpointError",
    "FID",
    "KLGap",
    "Preempted",
    "Preemption",
    "SafeCheckpointIO",
    "SampleGrid",
]
