"""LightningModules: the score model and the auxiliary prior at T."""

from lightning_modules.score_module import ScoreModule

__all__ = ["ScoreModule"]
