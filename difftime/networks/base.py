"""The role every score network plays: predict the noise of x_t = m(t) x_0 + s(t) z."""

from __future__ import annotations

from torch import Tensor, nn


class NoisePredictor(nn.Module):
    """Base of the noise-prediction networks ``net(x_t, t) -> eps_hat``, ``x_t: [B, *D]``, ``t: [B]``.

    The score is s_theta(x, t) = -eps_hat / s(t) (:func:`difftime.score.make_score_fn`). Typing
    ScoreModule's ``net`` with this class makes the command line's ``--model.help`` list the
    networks that play this role (``UNet``, ``MLP``, the toy ``OracleScore``), not every module.
    """

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError

    def check_input_shape(self, shape: tuple[int, ...]) -> None:
        """Raise ConfigError when the network cannot take samples of ``shape`` (default: any shape)."""
