"""Forward SDEs with a finite diffusion time T (Song et al. 2021, "Score-Based Generative
Modeling through Stochastic Differential Equations", Sec. 3.4 and App. B; Franzese et al. 2023,
"How Much is Enough? A Study on Diffusion Times in Score-based Generative Models", Sec. 2).

All three SDEs are linear, dx = f(t) x dt + g(t) dw, so the transition kernel is Gaussian:
q(x_t | x_0) = N(m(t) x_0, s(t)^2 I) with m(t) = exp(int_0^t f) and
ds^2/dt = 2 f(t) s^2 + g(t)^2 (Sarkka & Solin 2019, Eq. 5.51). The diffusion runs on
[eps, T]: training draws t in that interval, sampling integrates backwards from T to eps.

The SDE object is the hub of the core: losses, samplers, likelihood and priors only ever use
the methods below, so a new SDE plugs in by subclassing :class:`SDE`.
"""

from __future__ import annotations

import abc
import copy
import math
from typing import Callable

import torch
from torch import Tensor

from difftime import checks
from difftime.priors import GaussianPrior
from difftime.utils import ConfigError, append_dims

ScoreFn = Callable[[Tensor, Tensor], Tensor]


def _as_float(t: Tensor) -> Tensor:
    """SDE coefficients are computed in at least fp32, whatever the autocast dtype."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class SDE(abc.ABC):
    """Linear forward SDE on [0, T] with truncation ``eps`` (0 < eps < T).

    Subclasses give the drift coefficient f(t), the diffusion g(t), log m(t), s(t) and the
    prior standard deviation; everything else (marginals, reverse drift, probability-flow
    drift, log noise-to-signal ratio) follows from them.
    """

    max_T: float = math.inf

    def __init__(self, T: float = 1.0, eps: float = 1e-5) -> None:
        if not eps > 0:
            raise ConfigError("eps", eps, "eps > 0", type(self).__name__)
        if not (eps < T <= self.max_T):
            bound = "" if math.isinf(self.max_T) else f" <= {self.max_T:g}"
            raise ConfigError("T", T, f"eps < T{bound} (eps = {eps:g})", type(self).__name__)
        self.T, self.eps = float(T), float(eps)

    # ------------------------------------------------------------------ coefficients
    @abc.abstractmethod
    def drift_coeff(self, t: Tensor) -> Tensor:
        """f(t) such that the forward drift is f(t) x. ``t: [B] -> [B]``."""

    @abc.abstractmethod
    def diffusion(self, t: Tensor) -> Tensor:
        """g(t). ``t: [B] -> [B]``."""

    @abc.abstractmethod
    def log_mean_coeff(self, t: Tensor) -> Tensor:
        """log m(t) = int_0^t f(u) du. ``t: [B] -> [B]``."""

    @abc.abstractmethod
    def marginal_std(self, t: Tensor) -> Tensor:
        """s(t), the standard deviation of q(x_t | x_0). ``t: [B] -> [B]``."""

    @property
    @abc.abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the Gaussian prior N(0, prior_std^2 I) at T."""

    def hparams(self) -> dict[str, float | str]:
        """Plain description (class and parameters) used to check that a prior matches."""
        params = {k: v for k, v in vars(self).items() if isinstance(v, (int, float))}
        return {"class": type(self).__name__, **params}

    # ------------------------------------------------------------------ derived quantities
    def mean_coeff(self, t: Tensor) -> Tensor:
        return torch.exp(self.log_mean_coeff(t))

    def marginal_coeffs(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(m(t), s(t)), both ``[B]``."""
        return self.mean_coeff(t), self.marginal_std(t)

    def marginal(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``[B, *D]`` and std ``[B]`` of q(x_t | x_0)."""
        m, s = self.marginal_coeffs(t)
        return append_dims(m, x0.ndim) * x0, s

    def perturb(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = m(t) x_0 + s(t) z for given standard normal ``noise`` z."""
        m, s = self.marginal_coeffs(t)
        return append_dims(m, x0.ndim) * x0 + append_dims(s, x0.ndim) * noise

    def log_nsr(self, t: Tensor) -> Tensor:
        """log(s(t)^2 / m(t)^2), the log noise-to-signal ratio; increasing in t.

        Its derivative is g(t)^2 / s(t)^2, the likelihood weighting divided by the noise
        weighting, so it is the antiderivative used for importance sampling of t
        (Song et al. 2021, "Maximum Likelihood Training of Score-Based Diffusion Models", Sec. 5).
        """
        return 2.0 * torch.log(self.marginal_std(t)) - 2.0 * self.log_mean_coeff(t)

    def t_from_log_nsr(self, lam: Tensor) -> Tensor:
        """Inverse of :meth:`log_nsr` on [eps, T], by bisection (subclasses may solve it exactly)."""
        lam = _as_float(lam)
        lo = torch.full_like(lam, self.eps)
        hi = torch.full_like(lam, self.T)
        for _ in range(64 if lam.dtype == torch.float64 else 40):
            mid = 0.5 * (lo + hi)
            above = self.log_nsr(mid) > lam
            hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
        return 0.5 * (lo + hi)

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """Forward drift f(t) x."""
        return append_dims(self.drift_coeff(t), x.ndim) * x

    def reverse_drift(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """Drift of the reverse-time SDE, f(t) x - g(t)^2 score (Anderson 1982; Song 2021 Eq. 6).

        The reverse process runs dx = [f x - g^2 score] dt + g dw_bar with dt < 0.
        """
        g2 = append_dims(self.diffusion(t) ** 2, x.ndim)
        return self.drift(x, t) - g2 * score

    def probability_flow_drift(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """Drift of the probability-flow ODE, f(t) x - g(t)^2 score / 2 (Song 2021 Eq. 13)."""
        g2 = append_dims(self.diffusion(t) ** 2, x.ndim)
        return self.drift(x, t) - 0.5 * g2 * score

    def prior(self, shape: tuple[int, ...]) -> GaussianPrior:
        """The Gaussian prior N(0, prior_std^2 I) over samples of ``shape`` at time T."""
        return GaussianPrior(shape, std=self.prior_std)

    def with_T(self, T: float) -> "SDE":
        """The same SDE truncated at another diffusion time (truncated evaluation, Sec. 4)."""
        other = copy.copy(self)
        SDE.__init__(other, T=T, eps=self.eps)
        return other

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v:g}" for k, v in self.hparams().items() if k != "class")
        return f"{type(self).__name__}({params})"


class VPSDE(SDE):
    """Variance-preserving SDE, dx = -beta(t)/2 x dt + sqrt(beta(t)) dw (Song 2021 Eq. 11).

    beta(t) = beta_min + t (beta_max - beta_min), B(t) = int_0^t beta,
    m(t) = exp(-B/2), s(t)^2 = 1 - exp(-B). Prior N(0, I).
    """

    max_T = 1.0

    def __init__(self, T: float = 1.0, eps: float = 1e-5, beta_min: float = 0.1,
                 beta_max: float = 20.0) -> None:
        super().__init__(T=T, eps=eps)
        self.beta_min = checks.real("beta_min", beta_min, type(self).__name__)
        self.beta_max = checks.real("beta_max", beta_max, type(self).__name__, low=self.beta_min, low_open=False)

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + _as_float(t) * (self.beta_max - self.beta_min)

    def beta_integral(self, t: Tensor) -> Tensor:
        """B(t) = beta_min t + (beta_max - beta_min) t^2 / 2."""
        t = _as_float(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def t_from_beta_integral(self, b: Tensor) -> Tensor:
        """Positive root of (beta_max - beta_min)/2 t^2 + beta_min t - B = 0, written stably."""
        disc = torch.sqrt(self.beta_min**2 + 2.0 * (self.beta_max - self.beta_min) * b)
        return 2.0 * b / (self.beta_min + disc)

    def drift_coeff(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t)

    def diffusion(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.beta(t))

    def log_mean_coeff(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta_integral(t)

    def marginal_std(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(-self.beta_integral(t)))

    def log_nsr(self, t: Tensor) -> Tensor:
        # s^2 / m^2 = exp(B) - 1
        b = self.beta_integral(t)
        return torch.log(torch.expm1(b))

    def t_from_log_nsr(self, lam: Tensor) -> Tensor:
        # exp(B) - 1 = exp(lam)  =>  B = softplus(lam)
        return self.t_from_beta_integral(torch.nn.functional.softplus(_as_float(lam)))

    @property
    def prior_std(self) -> float:
        return 1.0


class SubVPSDE(VPSDE):
    """sub-VP SDE, dx = -beta/2 x dt + sqrt(beta (1 - exp(-2 B(t)))) dw (Song 2021 Eq. 12).

    m(t) = exp(-B/2), s(t) = 1 - exp(-B). Prior N(0, I).
    """

    def diffusion(self, t: Tensor) -> Tensor:
        return torch.sqrt(-self.beta(t) * torch.expm1(-2.0 * self.beta_integral(t)))

    def marginal_std(self, t: Tensor) -> Tensor:
        return -torch.expm1(-self.beta_integral(t))

    def log_nsr(self, t: Tensor) -> Tensor:
        # s^2 / m^2 = (1 - e^-B)^2 e^B, so log = 2 log(expm1(B)) - B
        b = self.beta_integral(t)
        return 2.0 * torch.log(torch.expm1(b)) - b

    def t_from_log_nsr(self, lam: Tensor) -> Tensor:
        # with u = e^B: u^2 - (2 + e^lam) u + 1 = 0, larger root; with a = e^(lam/2),
        # u - 1 = (a^2 + a sqrt(4 + a^2)) / 2, so B = log1p of that (no cancellation at small lam)
        a = torch.exp(0.5 * _as_float(lam))
        b = torch.log1p(0.5 * (a * a + a * torch.sqrt(4.0 + a * a)))
        return self.t_from_beta_integral(b)


class VESDE(SDE):
    """Variance-exploding SDE, dx = sqrt(d sigma^2/dt) dw (Song 2021 Eq. 9).

    sigma(t) = sigma_min (sigma_max / sigma_min)^t, m(t) = 1,
    s(t)^2 = sigma(t)^2 - sigma(0)^2 (the exact transition variance from x_0 at t = 0).
    Prior N(0, (sigma(T)^2 - sigma(0)^2) I).

    ``sigma_max`` is the noise scale *at t = 1*; beyond it the geometric schedule keeps growing
    (T = 5 gives a prior std of 50 * 5000^4 ~ 3e16), so T is limited to 1 like VP's.
    """

    max_T = 1.0

    def __init__(self, T: float = 1.0, eps: float = 1e-5, sigma_min: float = 0.01,
                 sigma_max: float = 50.0) -> None:
        super().__init__(T=T, eps=eps)
        self.sigma_min = checks.real("sigma_min", sigma_min, type(self).__name__)
        self.sigma_max = checks.real("sigma_max", sigma_max, type(self).__name__, low=self.sigma_min)

    @property
    def log_ratio(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * torch.exp(_as_float(t) * self.log_ratio)

    def drift_coeff(self, t: Tensor) -> Tensor:
        return torch.zeros_like(_as_float(t))

    def diffusion(self, t: Tensor) -> Tensor:
        return self.sigma(t) * math.sqrt(2.0 * self.log_ratio)

    def log_mean_coeff(self, t: Tensor) -> Tensor:
        return torch.zeros_like(_as_float(t))

    def marginal_std(self, t: Tensor) -> Tensor:
        # sigma_min^2 (r^(2t) - 1), with expm1 for small t
        return self.sigma_min * torch.sqrt(torch.expm1(2.0 * _as_float(t) * self.log_ratio))

    def log_nsr(self, t: Tensor) -> Tensor:
        return 2.0 * math.log(self.sigma_min) + torch.log(torch.expm1(2.0 * _as_float(t) * self.log_ratio))

    def t_from_log_nsr(self, lam: Tensor) -> Tensor:
        lam = _as_float(lam)
        return torch.log1p(torch.exp(lam - 2.0 * math.log(self.sigma_min))) / (2.0 * self.log_ratio)

    @property
    def prior_std(self) -> float:
        return self.sigma_min * math.sqrt(math.expm1(2.0 * self.T * self.log_ratio))
