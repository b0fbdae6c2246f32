"""LightningModules: the score model and the auxiliary prior at T."""

from lightning_modules.aux_prior_module import AuxPriorModule
from lightning_modules.score_module import ScoreModule

__all__ = ["AuxPriorModule", "ScoreModule"]
