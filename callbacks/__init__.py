"""Lightning callbacks: sample grids, preemption, checkpoint IO (and metrics)."""

from callbacks.checkpoint_io import CorruptCheckpointError, SafeCheckpointIO
from callbacks.preemption import Preempted, Preemption
from callbacks.sample_grid import SampleGrid

__all__ = ["CorruptCheckpointError", "Preempted", "Preemption", "SafeCheckpointIO", "SampleGrid"]
