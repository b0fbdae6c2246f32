"""Normalizing-flow auxiliary priors nu(x_T) built from ``normflows`` layers.

A flow is a bijection x = f(z) from base variables z to x with exact density
log nu(x) = log p_Z(f^{-1}(x)) + log |det d f^{-1}(x) / dx|
(change of variables; Dinh et al. 2017, "Density estimation using Real NVP", Eq. 3).
All layers, base distributions and the likelihood path are normflows' own; this module only
wires them into the prior interface of :mod:`difftime.priors`.

Sampling honours the ``generator`` argument by drawing the standardised base noise
eps ~ N(0, I) of all ``D = prod(event_shape)`` base variables ourselves with
:func:`difftime.utils.randn` (one ``[n, D]`` draw), mapping it through the base
distribution's reparametrisation z = loc + exp(log_scale) * eps and then through the flow's
deterministic forward pass. The global RNG is never touched, and with a
:class:`~difftime.utils.PerSampleNoise` source sample i depends only on seed i.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import normflows as nf
import torch
from torch import Tensor, nn

from difftime.utils import ConfigError, Generator, RecordsInitArgs, randn


def _no_autocast(x: Tensor) -> torch.autocast:
    """Flow likelihoods are evaluated in fp32 whatever precision the caller runs in."""
    return torch.autocast(device_type=x.device.type, enabled=False)


class FlowPrior(RecordsInitArgs, nn.Module):
    """Base class: a normflows model with per-level :class:`normflows.distributions.DiagGaussian`
    bases, exposed as an exact-likelihood prior.

    Subclasses hold the normflows model in ``self.flow`` and implement ``bases`` (its
    DiagGaussian per latent level), ``_to_base``, ``_from_base`` and ``_nf_log_prob``.
    """

    exact: bool = True
    bound_name: str | None = None

    def __init__(self, event_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.event_shape = tuple(int(d) for d in event_shape)

    # ------------------------------------------------------------------ subclass hooks
    @property
    def bases(self) -> list[nn.Module]:
        raise NotImplementedError

    def _to_base(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        raise NotImplementedError

    def _from_base(self, zs: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def _nf_log_prob(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    @property
    def dim(self) -> int:
        return math.prod(self.event_shape)

    @property
    def latent_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(base.shape) for base in self.bases]

    def _device(self) -> torch.device:
        return self.bases[0].loc.device

    def _dtype(self) -> torch.dtype:
        """Working precision: the parameters' dtype, at least fp32 (fp64 modules stay fp64)."""
        return torch.promote_types(self.bases[0].loc.dtype, torch.float32)

    def _split(self, z: Tensor) -> list[Tensor]:
        """``[B, D] -> [[B, *latent_shape_i]]`` in the order of ``self.bases``."""
        sizes = [math.prod(s) for s in self.latent_shapes]
        return [c.reshape(z.shape[0], *s) for c, s in zip(z.split(sizes, dim=1), self.latent_shapes)]

    def _actnorm_pending(self) -> bool:
        """True while some ActNorm layer still waits for its data-dependent initialisation."""
        return any(not bool(m.data_dep_init_done > 0) for m in self.modules() if isinstance(m, nf.flows.ActNorm))

    def _check_input(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(f"expected samples of shape {self.event_shape}, got {tuple(x.shape[1:])}")
        if x.shape[0] < 2 and self._actnorm_pending():
            # ActNorm initialises from the batch std (Kingma & Dhariwal 2018, Sec. 3.1): NaN for one sample
            raise ValueError("the first batch seen by a flow with ActNorm must hold >= 2 samples")

    # ------------------------------------------------------------------ bijection
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x ``[B, *event_shape]`` -> (z ``[B, D]``, log |det dz/dx| ``[B]``), in fp32 (or fp64).

        z concatenates the flattened base variables of all levels.
        """
        self._check_input(x)
        with _no_autocast(x):
            zs, log_det = self._to_base(x.to(self._dtype()))
        return torch.cat([z.flatten(1) for z in zs], dim=1), log_det

    def decode(self, z: Tensor) -> Tensor:
        """Inverse of :meth:`encode`: z ``[B, D]`` -> x ``[B, *event_shape]``."""
        if self._actnorm_pending():
            raise RuntimeError("ActNorm is not initialised yet: evaluate log_prob on a data batch first")
        with _no_autocast(z):
            return self._from_base(self._split(z.to(self._dtype()))).reshape(z.shape[0], *self.event_shape)

    def base_log_prob(self, z: Tensor) -> Tensor:
        """log p_Z(z) of the concatenated base variables ``z: [B, D] -> [B]``."""
        with _no_autocast(z):
            return sum(base.log_prob(part) for base, part in zip(self.bases, self._split(z.to(self._dtype()))))

    # ------------------------------------------------------------------ prior interface
    def log_prob(self, x: Tensor, generator: Generator = None) -> Tensor:
        """Exact log nu(x) in nats, ``[B, *event_shape] -> [B]``, fp32 outside autocast.

        ``generator`` is unused: the density is exact (the prior interface).

        The input is cast to the parameters' dtype, at least fp32 (a ``.double()`` module runs
        in fp64). Non-finite values (a diverged flow) are returned as they are, for the caller to skip.
        """
        self._check_input(x)
        with _no_autocast(x):
            return self._nf_log_prob(x.to(self._dtype()))

    def loss(self, x: Tensor) -> Tensor:
        """Maximum-likelihood loss -log nu(x), ``[B]``."""
        return -self.log_prob(x)

    def sample(self, n: int, generator: Generator = None) -> Tensor:
        """n samples ``[n, *event_shape]`` (fp32) from the flow, using only ``generator``.

        eps ~ N(0, I) is drawn as one ``[n, D]`` tensor, shifted and scaled by each level's
        DiagGaussian (z = loc + exp(log_scale) eps) and pushed through the flow's forward pass.
        """
        eps = randn((n, self.dim), generator, self._device(), self._dtype())
        loc = torch.cat([base.loc.flatten(1) for base in self.bases], dim=1)
        log_scale = torch.cat([base.log_scale.flatten(1) for base in self.bases], dim=1)
        return self.decode(loc + log_scale.exp() * eps)

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}"


# ---------------------------------------------------------------------- vector flows
def _check_vector_args(owner: str, dim: int, layers: int, hidden: int) -> None:
    if dim < 2:
        raise ConfigError("dim", dim, "dim >= 2 (coupling layers split the vector in two)", owner)
    if layers < 1:
        raise ConfigError("layers", layers, "layers >= 1", owner)
    if hidden < 1:
        raise ConfigError("hidden", hidden, "hidden >= 1", owner)


class _VectorFlowPrior(FlowPrior):
    """A :class:`normflows.NormalizingFlow` over flattened vectors ``[B, D]``."""

    def __init__(self, dim: int, flows: list[nn.Module]) -> None:
        super().__init__((dim,))
        self.flow = nf.NormalizingFlow(q0=nf.distributions.DiagGaussian(dim, trainable=True), flows=flows)

    @property
    def bases(self) -> list[nn.Module]:
        return [self.flow.q0]

    def _to_base(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        # normflows' inverse_and_log_det sums the log-determinants in an fp32 buffer; sum them
        # in the input's dtype so an fp64 module stays exact to fp64
        z, log_det = x.flatten(1), x.new_zeros(x.shape[0])
        for flow in reversed(self.flow.flows):
            z, log_d = flow.inverse(z)
            log_det = log_det + log_d
        return [z], log_det

    def _from_base(self, zs: list[Tensor]) -> Tensor:
        return self.flow.forward(zs[0])

    def _nf_log_prob(self, x: Tensor) -> Tensor:
        return self.flow.log_prob(x.flatten(1))


class RealNVPPrior(_VectorFlowPrior):
    """RealNVP (Dinh et al. 2017) over vectors: ``layers`` masked affine couplings.

    Layer l keeps the dimensions selected by an alternating binary mask b (b and 1 - b in
    turn) and maps the others as x' = x exp(s(b x)) + t(b x) (Eq. 9). s and t are normflows
    MLPs with zero-initialised output layers; s ends in tanh, so each layer's log-scale stays in
    (-1, 1), the bounded scale Dinh et al. use for stable training. The base is a learnable
    diagonal Gaussian.
    """

    def __init__(self, dim: int = 2, layers: int = 8, hidden: int = 64) -> None:
        _check_vector_args("RealNVPPrior", dim, layers, hidden)
        mask = (torch.arange(dim) % 2 == 0).float()
        flows = []
        for layer in range(layers):
            b = mask if layer % 2 == 0 else 1.0 - mask
            s = nf.nets.MLP([dim, hidden, hidden, dim], init_zeros=True, output_fn="tanh")
            t = nf.nets.MLP([dim, hidden, hidden, dim], init_zeros=True)
            flows.append(nf.flows.MaskedAffineFlow(b, t, s))
        super().__init__(dim, flows)
        self.layers, self.hidden = layers, hidden


class NeuralSplinePrior(_VectorFlowPrior):
    """Rational-quadratic neural spline flow (Durkan et al. 2019, "Neural Spline Flows").

    Each of ``layers`` blocks is a normflows ``CoupledRationalQuadraticSpline`` (monotone
    rational-quadratic splines with ``bins`` bins on [-tail_bound, tail_bound], identity tails,
    Sec. 3.1) with alternating masks, followed by ``LULinearPermute`` (a fixed permutation and an
    LU-parametrised linear map, Sec. 3.3). The base is a learnable diagonal Gaussian.
    """

    def __init__(self, dim: int = 2, layers: int = 8, hidden: int = 64, bins: int = 8,
                 tail_bound: float = 5.0) -> None:
        _check_vector_args("NeuralSplinePrior", dim, layers, hidden)
        if bins < 2:
            raise ConfigError("bins", bins, "bins >= 2", "NeuralSplinePrior")
        if not tail_bound > 0:
            raise ConfigError("tail_bound", tail_bound, "tail_bound > 0", "NeuralSplinePrior")
        flows = []
        for layer in range(layers):
            flows.append(nf.flows.CoupledRationalQuadraticSpline(
                dim, num_blocks=2, num_hidden_channels=hidden, num_bins=bins, tails="linear",
                tail_bound=float(tail_bound), reverse_mask=layer % 2 == 1))
            flows.append(nf.flows.LULinearPermute(dim))
        super().__init__(dim, flows)
        self.layers, self.hidden, self.bins, self.tail_bound = layers, hidden, bins, float(tail_bound)


# ---------------------------------------------------------------------- Glow
def glow_level_shapes(shape: tuple[int, int, int], levels: int) -> list[tuple[int, tuple[int, int, int]]]:
    """(coupling channels, latent shape) of each level in normflows' ``MultiscaleFlow`` order.

    normflows evaluates log_prob from the last level to level 0: level i first squeezes
    (space-to-depth, C -> 4C, H -> H/2), runs its Glow blocks and, for i > 0, splits half of the
    channels off as that level's latent (Dinh et al. 2017, Sec. 3.6; Kingma & Dhariwal 2018,
    Fig. 2b). Level 0 keeps everything. With s = 2^(levels - i) squeezes done at level i its
    blocks act on 2 s C channels at H/s x W/s, the latent of level i > 0 is (s C, H/s, W/s) and
    that of level 0 is (2 s C, H/s, W/s).
    """
    c, h, w = shape
    out = []
    for i in range(levels):
        s = 2 ** (levels - i)
        latent_c = 2 * s * c if i == 0 else s * c
        out.append((2 * s * c, (latent_c, h // s, w // s)))
    return out


class GlowPrior(FlowPrior):
    """Multiscale Glow (Kingma & Dhariwal 2018) on images ``[B, C, H, W]`` with normflows'
    ``MultiscaleFlow``.

    Each of ``levels`` levels is a squeeze followed by ``blocks_per_level`` ``GlowBlock`` steps
    (ActNorm, invertible 1x1 convolution, affine coupling; Sec. 3) and a channel split that
    factors out half of the variables to a per-level learnable ``DiagGaussian`` (RealNVP's
    multiscale architecture). ``split_mode`` chooses the coupling masks: channel halves or a
    spatial checkerboard. ActNorm initialises itself from the first batch passed to
    :meth:`log_prob` (data-dependent initialisation, Sec. 3.1), so train before sampling.
    """

    def __init__(self, shape: tuple[int, int, int] = (3, 32, 32), levels: int = 3,
                 blocks_per_level: int = 8, hidden_channels: int = 256,
                 split_mode: Literal["channel", "checkerboard"] = "channel", scale: bool = True) -> None:
        shape = self._check_args(shape, levels, blocks_per_level, hidden_channels, split_mode)
        super().__init__(shape)
        flows, bases = [], []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"torch\.lu is deprecated")
            for channels, latent in glow_level_shapes(shape, levels):
                flows.append([nf.flows.GlowBlock(channels, hidden_channels, scale=scale, split_mode=split_mode)
                              for _ in range(blocks_per_level)] + [nf.flows.Squeeze()])
                bases.append(nf.distributions.DiagGaussian(latent, trainable=True))
        merges = [nf.flows.Merge() for _ in range(levels - 1)]
        self.flow = nf.MultiscaleFlow(bases, flows, merges, class_cond=False)
        self.levels, self.blocks_per_level, self.hidden_channels = levels, blocks_per_level, hidden_channels
        self.split_mode, self.scale = split_mode, scale

    @staticmethod
    def _check_args(shape, levels: int, blocks: int, hidden: int, split_mode: str) -> tuple[int, int, int]:
        if len(shape) != 3 or any(int(d) < 1 for d in shape):
            raise ConfigError("shape", shape, "(C, H, W) with positive sizes", "GlowPrior")
        c, h, w = (int(d) for d in shape)
        if levels < 1 or h % 2**levels or w % 2**levels:
            raise ConfigError("levels", levels, f"levels >= 1 with H = {h} and W = {w} divisible by 2**levels",
                              "GlowPrior")
        if blocks < 1:
            raise ConfigError("blocks_per_level", blocks, "blocks_per_level >= 1", "GlowPrior")
        if hidden < 1:
            raise ConfigError("hidden_channels", hidden, "hidden_channels >= 1", "GlowPrior")
        if split_mode not in ("channel", "checkerboard"):
            raise ConfigError("split_mode", split_mode, "'channel' or 'checkerboard'", "GlowPrior")
        if split_mode == "checkerboard" and w % 2 ** (levels + 1):
            # the checkerboard halves the last axis, which is W / 2**levels wide at the last level
            raise ConfigError("split_mode", split_mode,
                              f"'channel', or 'checkerboard' when W = {w} is divisible by 2**(levels + 1)",
                              "GlowPrior")
        return c, h, w

    @property
    def bases(self) -> list[nn.Module]:
        return list(self.flow.q0)

    def _to_base(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        return self.flow.inverse_and_log_det(x)

    def _from_base(self, zs: list[Tensor]) -> Tensor:
        return self.flow.forward_and_log_det(zs)[0]

    def _nf_log_prob(self, x: Tensor) -> Tensor:
        return self.flow.log_prob(x, None)

    def extra_repr(self) -> str:
        return (f"event_shape={self.event_shape}, levels={self.levels}, "
                f"blocks_per_level={self.blocks_per_level}, split_mode={self.split_mode!r}")
