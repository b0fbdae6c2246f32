"""Reverse-time samplers for a linear SDE with a finite diffusion time T.

Every sampler starts from a given ``x_T: [B, *D]`` at time T, so any distribution at T can feed
it (the SDE's Gaussian prior, the learned auxiliary prior of Franzese et al. 2023, or the
exact q_T of a toy distribution), and integrates backwards to ``sde.eps``. All share
one signature (k-diffusion style)::

    fn(score_fn, sde, x_T, steps, generator=None, callback=None, *, options) -> (samples, info)

- ``score_fn(x, t) -> [B, *D]`` with ``t: [B]``; it may run under autocast, its output is cast
  back to the state dtype.
- ``generator``: a ``torch.Generator``, a per-sample noise source
  (:class:`difftime.randomness.PerSampleNoise`) or None; all noise is drawn through
  :func:`difftime.randomness.randn`, so with per-sample seeds a sample's trajectory depends only on
  its own seed, not on the batch it is drawn in.
- ``callback(d)`` is called after each step with ``d = {"i", "t", "x", "nfe"}``.
- ``info`` holds ``nfe`` (score evaluations; one call on a batch counts 1), ``steps``,
  ``sampler`` and ``t_end``; a config class's :meth:`Sampler.nfe` gives the same number from
  its configuration alone.

The state is kept in at least fp32 (fp64 inputs stay fp64). Fixed-step samplers take a
``schedule`` (:mod:`difftime.schedules`) giving the grid T = t_0 > ... > t_steps = eps; ``dt > 0``
below is the length of a step going backwards. The samplers only use the SDE's own methods
(reverse drift, probability-flow drift, diffusion, marginal coefficients), never its class.

Argument checks: every option is checked once, in the per-sampler routine ``_check_<name>``
(built on :mod:`difftime.checks`). The sampler function calls it on its keyword options and
the config class calls the same routine in its constructor.

Which to use (2-D ring mixture, VP, eps = 1e-3; ``benchmarks/results/sampler_nfe.md``): the
deterministic :func:`dpm_solver_pp` (2M with the UniC-style corrector): 12-30 NFE to converged
quality at T = 1 on the LogSNR grid, 7 on a grid fitted to the model and tuned to the sampler
(:func:`difftime.grid_fit.refine_grid`; oracle and trained score alike);
for a stochastic sampler, and for images, :func:`sde_dpm_solver_pp` (16-30 NFE). Euler-Maruyama,
predictor-corrector and Heun on the uniform-t grid need 50 to over 200.

Thresholding: the samplers that form the data prediction D(x, t) in their steps (DDIM,
DPM-Solver++ with or without its UniC-style corrector, SDE-DPM-Solver++) take
``threshold: None | "clip" | "dynamic"`` and ``percentile`` (:func:`threshold_data`).

The package: :mod:`~difftime.samplers.common` (shared pieces), :mod:`~difftime.samplers.classical`
(Euler-Maruyama, predictor-corrector, probability-flow ODE), :mod:`~difftime.samplers.exponential`
(the exponential integrators with their derivation) and :mod:`~difftime.samplers.registry` (the
config classes and :data:`SAMPLERS`). Every name is re-exported here, so ``class_path:
difftime.samplers.X`` in configs, saved ones included, keeps naming the same class.
"""

from difftime.randomness import Generator
from difftime.samplers.classical import (ODE_METHODS, STEP_SIZES, ODEMethod, adaptive_ode, euler_maruyama, heun_ode,
                                         langevin_step, predictor_corrector, reverse_diffusion_step, transition_coeffs)
from difftime.samplers.common import DATA_RANGE, THRESHOLDS, Callback, Info, Threshold, threshold_data, tweedie_denoise
from difftime.samplers.exponential import ddim, dpm_solver_pp, sde_dpm_solver_pp
from difftime.samplers.exponential import _data_prediction, _nodes  # noqa: F401  (difftime.grid_fit uses them)
from difftime.samplers.registry import (DDIM, SAMPLERS, AdaptiveODE, DPMSolverPP, EulerMaruyama, HeunODE,
                                        PredictorCorrector, Sampler, SDEDPMSolverPP)

__all__ = [
    "DATA_RANGE", "DDIM", "ODE_METHODS", "SAMPLERS", "STEP_SIZES", "THRESHOLDS", "AdaptiveODE", "Callback",
    "DPMSolverPP", "EulerMaruyama", "Generator", "HeunODE", "Info", "ODEMethod", "PredictorCorrector", "SDEDPMSolverPP",
    "Sampler", "Threshold", "adaptive_ode", "ddim", "dpm_solver_pp", "euler_maruyama", "heun_ode", "langevin_step",
    "predictor_corrector", "reverse_diffusion_step", "sde_dpm_solver_pp", "threshold_data", "transition_coeffs",
    "tweedie_denoise",
]
