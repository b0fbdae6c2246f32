"""Auxiliary priors (difftime.aux_priors): flows checked against autograd Jacobians and numeric
integration on perturbed parameters, the VAE bounds against probabilistic PCA's closed-form
likelihood, sampling against the prior interface's randomness contract."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from difftime.aux_priors import (GaussianVAE, GlowPrior, MLPVAEPrior, NeuralSplinePrior, RealNVPPrior,
                                  VAEPrior, glow_level_shapes, prior_info)
from difftime.priors import GaussianPrior
from difftime.toy import GaussianMixture
from difftime.utils import ConfigError, PerSampleNoise

LOG_2PI = math.log(2 * math.pi)


def perturb_(module: nn.Module, std: float, seed: int) -> nn.Module:
    """Add N(0, std^2) noise to every parameter: normflows layers start at (or near) the identity
    (zero-initialised last layers, ActNorm), where a wrong inverse or log-det can still pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def actnorm_init_(prior: nn.Module, seed: int = 0) -> nn.Module:
    """Run one data batch through log_prob so ActNorm layers finish their data-dependent init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        prior.log_prob(1.5 * torch.randn(32, *prior.event_shape, generator=g) + 0.3)
    return prior


FLOWS = {
    "realnvp": lambda: RealNVPPrior(dim=3, layers=4, hidden=16),
    "nsf": lambda: NeuralSplinePrior(dim=3, layers=2, hidden=16, bins=4, tail_bound=3.0),
    "glow": lambda: GlowPrior((2, 4, 4), levels=2, blocks_per_level=2, hidden_channels=8),
    "glow_checkerboard": lambda: GlowPrior((2, 4, 4), levels=1, blocks_per_level=2, hidden_channels=8,
                                           split_mode="checkerboard"),
}


def perturbed_flow(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # layer construction (1x1 convolutions, permutations) uses the global RNG
    return perturb_(actnorm_init_(FLOWS[name]()), std=0.2, seed=seed + 1)


# ---------------------------------------------------------------------- flows: bijection
@pytest.mark.parametrize("name", list(FLOWS))
def test_flow_round_trip_and_log_det_match_autograd(name: str) -> None:
    prior = perturbed_flow(name).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, *prior.event_shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        z, log_det = prior.encode(x)
        assert torch.allclose(prior.decode(z), x, atol=1e-9, rtol=0)
        log_prob = prior.log_prob(x)
    locs = torch.cat([b.loc.detach().flatten() for b in prior.bases])
    log_scales = torch.cat([b.log_scale.detach().flatten() for b in prior.bases])
    for i in range(len(x)):
        jac = torch.autograd.functional.jacobian(lambda v: prior.encode(v[None])[0][0], x[i])
        sign, logabsdet = torch.linalg.slogdet(jac.reshape(prior.dim, prior.dim))
        assert sign != 0
        assert log_det[i].item() == pytest.approx(logabsdet.item(), abs=1e-8)
        # change of variables with the base density written out: N(loc, exp(log_scale)^2)
        u = (z[i] - locs) * torch.exp(-log_scales)
        log_base = (-0.5 * u**2 - log_scales - 0.5 * LOG_2PI).sum()
        assert log_prob[i].item() == pytest.approx((log_base + logabsdet).item(), abs=1e-8)
        assert prior.base_log_prob(z[i:i + 1]).item() == pytest.approx(log_base.item(), abs=1e-10)
    assert prior.loss(x).detach().equal(-log_prob)


def test_perturbation_moves_flows_away_from_identity() -> None:
    """Guards the checks above: on perturbed parameters the flow is far from an affine map."""
    for name in FLOWS:
        prior = perturbed_flow(name).double()
        x = torch.randn(64, *prior.event_shape, dtype=torch.float64)
        with torch.no_grad():
            _, log_det = prior.encode(x)
        assert log_det.std() > 1e-2, name


def test_glow_level_shapes_partition_the_image() -> None:
    for shape, levels in (((3, 32, 32), 3), ((2, 4, 4), 2), ((1, 8, 16), 1)):
        shapes = glow_level_shapes(shape, levels)
        assert sum(math.prod(latent) for _, latent in shapes) == math.prod(shape)
        prior = GlowPrior(shape, levels=levels, blocks_per_level=1, hidden_channels=4)
        assert prior.latent_shapes == [latent for _, latent in shapes]


# ---------------------------------------------------------------------- flows: normalisation
def grid_density(prior: nn.Module, half_width: float, n: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    ticks = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    with torch.no_grad():
        density = prior.log_prob(torch.cartesian_prod(ticks, ticks)).exp().view(n, n)
    return ticks, density, float(ticks[1] - ticks[0])


PLANAR = {
    "realnvp": lambda: RealNVPPrior(dim=2, layers=4, hidden=16),
    "nsf": lambda: NeuralSplinePrior(dim=2, layers=2, hidden=16, bins=4, tail_bound=3.0),
}


@pytest.mark.parametrize("name", list(PLANAR))
def test_2d_flow_density_integrates_to_one_and_matches_its_samples(name: str) -> None:
    torch.manual_seed(0)
    prior = perturb_(PLANAR[name](), std=0.3, seed=1).double()
    ticks, density, h = grid_density(prior, half_width=12.0, n=401)
    edge_mass = (density[0].sum() + density[-1].sum() + density[:, 0].sum() + density[:, -1].sum()) * h * h
    assert edge_mass < 1e-4  # the grid holds essentially all the mass (measured <= 6e-6)
    # midpoint rule on a smooth density: error O(h^2), measured < 1e-4 here
    assert (density.sum() * h * h).item() == pytest.approx(1.0, abs=2e-3)
    # sample() and log_prob() describe the same law: P(x1 <= a, x2 <= b) on the grid vs a
    # 20000-sample frequency (binomial standard error <= 0.0035)
    n = 20_000
    with torch.no_grad():
        x = prior.sample(n, torch.Generator().manual_seed(5))
    for a in (-1.0, 0.0, 1.0):
        for b in (-1.0, 0.0, 1.0):
            cdf = (density[ticks <= a][:, ticks <= b].sum() * h * h).item()
            freq = ((x[:, 0] <= a) & (x[:, 1] <= b)).double().mean().item()
            se = math.sqrt(max(cdf * (1 - cdf), 1e-4) / n)
            assert abs(freq - cdf) < 4 * se + 2e-3, (a, b, freq, cdf)


# ---------------------------------------------------------------------- maximum likelihood
def test_realnvp_fit_to_gaussian_reaches_its_entropy() -> None:
    """Cross-entropy E_p[-log nu] = H(p) + KL(p || nu) >= H(p); a fit brings it close to H(p)."""
    torch.manual_seed(0)
    sigma = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)
    data = GaussianMixture(torch.ones(1), torch.tensor([[0.5, -1.0]]), sigma[None])
    prior = RealNVPPrior(dim=2, layers=4, hidden=32)
    opt = torch.optim.Adam(prior.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-D MLP flow runs faster on one thread than on two shared ones
    try:
        for _ in range(400):
            loss = prior.loss(data.sample(256, g)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    x_test = data.sample(20_000, torch.Generator().manual_seed(2))
    with torch.no_grad():
        nll = -prior.log_prob(x_test).double()
    se = (nll.std() / math.sqrt(len(nll))).item()  # about 0.007 nats
    entropy = data.entropy()
    assert se < 0.01
    assert abs(nll.mean().item() - entropy) < 0.05
    # paired estimate of KL(p || nu) = E[log p - log nu]: much smaller MC error
    kl = nll + data.log_prob(x_test)
    assert -3 * (kl.std() / math.sqrt(len(kl))).item() < kl.mean().item() < 0.05


# ---------------------------------------------------------------------- VAE bounds
class LinearGaussianEncoder(nn.Module):
    """q(z | x) = N(A x + c, diag(exp(log_std)^2))."""

    def __init__(self, a: torch.Tensor, c: torch.Tensor, log_std: torch.Tensor) -> None:
        super().__init__()
        self.a, self.c, self.log_std = a, c, log_std

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x @ self.a.T + self.c, self.log_std.expand(x.shape[0], -1)


def ppca(w: torch.Tensor, b: torch.Tensor, log_sigma: torch.Tensor, mean_shift: float = 0.0,
         std_factor: float = 1.0) -> tuple[GaussianVAE, torch.distributions.MultivariateNormal, dict]:
    """Probabilistic PCA x = W z + b + sigma * eps as a GaussianVAE with a linear decoder.

    The exact marginal is N(b, W W^T + diag(sigma^2)) and the exact posterior N(m(x), S) with
    S = (I + W^T Sigma^-1 W)^-1, m(x) = S W^T Sigma^-1 (x - b) (Tipping & Bishop 1999). The
    encoder uses diag(S) and shifts/scales it by ``mean_shift`` / ``std_factor`` posterior stds.
    """
    d, l = w.shape
    sigma = torch.diag(torch.exp(2 * log_sigma))
    s = torch.linalg.inv(torch.eye(l, dtype=w.dtype) + w.T @ torch.linalg.inv(sigma) @ w)
    a = s @ w.T @ torch.linalg.inv(sigma)
    post_std = s.diagonal().sqrt()
    encoder = LinearGaussianEncoder(a, -a @ b + mean_shift * post_std, torch.log(std_factor * post_std))
    decoder = nn.Linear(l, d).double()
    with torch.no_grad():
        decoder.weight.copy_(w)
        decoder.bias.copy_(b)
    vae = GaussianVAE(encoder, decoder, (d,), (l,), bound="iwae", k=8).double()
    with torch.no_grad():
        vae.log_scale.copy_(log_sigma)
    marginal = torch.distributions.MultivariateNormal(b, w @ w.T + sigma)
    return vae, marginal, {"a": a, "S": s, "post_std": post_std}


def draw(dist: torch.distributions.MultivariateNormal, n: int, g: torch.Generator) -> torch.Tensor:
    eps = torch.randn(n, dist.mean.shape[-1], generator=g, dtype=torch.float64)
    return dist.mean + eps @ dist.scale_tril.T


def test_iwae_is_exact_with_the_true_posterior() -> None:
    """With q(z | x) = p(z | x) every importance weight p(x, z) / q(z | x) equals p(x)."""
    q, _ = torch.linalg.qr(torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    w = q * torch.tensor([2.0, 0.7], dtype=torch.float64)  # orthogonal columns, isotropic noise:
    log_sigma = torch.full((3,), -0.2, dtype=torch.float64)  # the exact posterior is diagonal
    vae, marginal, parts = ppca(w, torch.tensor([0.3, -0.5, 1.0], dtype=torch.float64), log_sigma)
    assert torch.allclose(parts["S"], torch.diag(parts["S"].diagonal()), atol=1e-12)
    g = torch.Generator().manual_seed(1)
    x = draw(marginal, 16, g)
    for k in (1, 5):
        assert torch.allclose(vae.iw_bound(x, k, g), marginal.log_prob(x), atol=1e-10, rtol=0)


def test_elbo_and_iwae_bounds_against_ppca_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    log_sigma = torch.tensor([-0.3, 0.0, 0.4], dtype=torch.float64)
    vae, marginal, parts = ppca(w, b, log_sigma, mean_shift=0.5, std_factor=1.3)
    x = draw(marginal, 4, g)
    log_p = marginal.log_prob(x)
    # closed-form ELBO = log p(x) - KL(q(z | x) || p(z | x)), Gaussian KL with full S
    s_inv = torch.linalg.inv(parts["S"])
    diff = 0.5 * parts["post_std"]  # posterior mean minus encoder mean, the same for every x
    q_var = (1.3 * parts["post_std"]) ** 2
    kl = 0.5 * (torch.trace(s_inv @ torch.diag(q_var)) + diff @ s_inv @ diff - 2
                + torch.logdet(parts["S"]) - q_var.log().sum())
    elbo_exact = (log_p - kl).mean().item()
    log_p = log_p.mean().item()
    m = 4000
    xr = x.repeat_interleave(m, 0)
    rng = torch.Generator().manual_seed(1)

    def mc(values: torch.Tensor) -> tuple[float, float]:
        return values.mean().item(), (values.view(4, m).std(1).pow(2).mean().sqrt() / math.sqrt(4 * m)).item()

    with torch.no_grad():
        elbo, elbo_se = mc(vae.elbo(xr, rng))
        gaps = {k: mc(vae.iw_bound(xr, k, rng)) for k in (1, 4, 32)}
    assert kl.item() > 0.3  # the encoder is far enough from the posterior to test the bounds
    assert abs(elbo - elbo_exact) < 4 * elbo_se  # about 0.015 nats
    assert abs(gaps[1][0] - elbo_exact) < 4 * gaps[1][1]  # IWAE with k = 1 is the ELBO
    # Burda et al. Theorem 1: E[IWAE_k] increases with k and stays <= log p(x)
    for k_small, k_large in ((1, 4), (4, 32)):
        se = math.hypot(gaps[k_small][1], gaps[k_large][1])
        assert gaps[k_large][0] - gaps[k_small][0] > 4 * se
    assert gaps[32][0] < log_p + 3 * gaps[32][1]
    assert log_p - gaps[32][0] < 0.1 * kl.item()  # measured about 0.008 of a 0.46 nat gap


def test_vae_log_prob_is_the_configured_bound() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 3)
    for bound, name in (("elbo", "elbo"), ("iwae", "iwae4")):
        vae = MLPVAEPrior(dim=3, latent_dim=2, hidden=8, bound=bound, k=4)
        assert vae.bound_name == name and not vae.exact
        expected = (vae.elbo(x, torch.Generator().manual_seed(1)) if bound == "elbo"
                    else vae.iw_bound(x, 4, torch.Generator().manual_seed(1)))
        assert torch.equal(vae.log_prob(x, torch.Generator().manual_seed(1)), expected)
        assert torch.equal(vae.loss(x, torch.Generator().manual_seed(1)), -expected)
    # per-sample noise makes the stochastic bound independent of the batch it is evaluated in
    vae = VAEPrior((2, 8, 8), latent_channels=2, hidden=8, downsamples=1, k=3)
    x = torch.randn(6, 2, 8, 8)
    with torch.no_grad():
        whole = vae.log_prob(x, PerSampleNoise(range(6)))
        halves = torch.cat([vae.log_prob(x[:3], PerSampleNoise(range(3))),
                            vae.log_prob(x[3:], PerSampleNoise(range(3, 6)))])
    assert torch.allclose(whole, halves, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------- sampling contract
PRIORS = {
    "realnvp": lambda: RealNVPPrior(dim=3, layers=2, hidden=8),
    "nsf": lambda: NeuralSplinePrior(dim=3, layers=2, hidden=8, bins=4),
    "glow": lambda: actnorm_init_(GlowPrior((2, 4, 4), levels=2, blocks_per_level=1, hidden_channels=8)),
    "vae": lambda: VAEPrior((2, 8, 8), latent_channels=2, hidden=8, downsamples=2, k=2),
    "mlp_vae": lambda: MLPVAEPrior(dim=3, latent_dim=2, hidden=8, k=2),
}


@pytest.mark.parametrize("name", list(PRIORS))
def test_sample_contract(name: str) -> None:
    torch.manual_seed(0)
    prior = perturb_(PRIORS[name](), std=0.1, seed=1)
    state = torch.get_rng_state()
    with torch.no_grad():
        x = prior.sample(6, torch.Generator().manual_seed(7))
        again = prior.sample(6, torch.Generator().manual_seed(7))
        other = prior.sample(6, torch.Generator().manual_seed(8))
        whole = prior.sample(6, PerSampleNoise(range(6)))
        halves = torch.cat([prior.sample(3, PerSampleNoise(range(3))), prior.sample(3, PerSampleNoise(range(3, 6)))])
    assert torch.equal(torch.get_rng_state(), state)  # only the given generators were used
    assert x.shape == (6, *prior.event_shape) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert torch.equal(x, again) and not torch.allclose(x, other)
    assert torch.allclose(whole, halves, atol=1e-5, rtol=0)
    assert prior.log_prob(x).shape == (6,)


@pytest.mark.parametrize("name", list(PRIORS))
def test_log_prob_is_fp32_under_bf16_autocast(name: str) -> None:
    torch.manual_seed(0)
    prior = perturb_(PRIORS[name](), std=0.1, seed=1)
    x = torch.randn(4, *prior.event_shape)
    # the VAE bound is stochastic: the same generator seed gives the same draws
    kwargs = (lambda: {"generator": torch.Generator().manual_seed(2)}) if name.endswith("vae") else dict
    with torch.no_grad():
        ref = prior.log_prob(x, **kwargs())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = prior.log_prob(x, **kwargs())
            samples = prior.sample(2, torch.Generator().manual_seed(3))
    assert mixed.dtype == torch.float32 and samples.dtype == torch.float32
    assert torch.allclose(mixed, ref, rtol=1e-6, atol=1e-5)


def test_glow_actnorm_needs_a_data_batch_first() -> None:
    prior = GlowPrior((1, 4, 4), levels=1, blocks_per_level=1, hidden_channels=4)
    with pytest.raises(RuntimeError, match="ActNorm"):
        prior.sample(2)
    with pytest.raises(ValueError, match=">= 2"):
        prior.log_prob(torch.randn(1, 1, 4, 4))
    prior.log_prob(torch.randn(8, 1, 4, 4))
    assert torch.isfinite(prior.log_prob(torch.randn(1, 1, 4, 4))).all()
    assert prior.sample(2).shape == (2, 1, 4, 4)


# ---------------------------------------------------------------------- configuration
@pytest.mark.parametrize("build, key", [
    (lambda: GlowPrior((3, 30, 30), levels=3), "levels"),
    (lambda: GlowPrior((3, 32, 32), levels=0), "levels"),
    (lambda: GlowPrior((3, 32), levels=1), "shape"),
    (lambda: GlowPrior((2, 4, 4), levels=2, split_mode="checkerboard"), "split_mode"),
    (lambda: GlowPrior((2, 4, 4), levels=1, split_mode="diagonal"), "split_mode"),
    (lambda: GlowPrior((2, 4, 4), levels=1, blocks_per_level=0), "blocks_per_level"),
    (lambda: RealNVPPrior(dim=1), "dim"),
    (lambda: RealNVPPrior(layers=0), "layers"),
    (lambda: NeuralSplinePrior(bins=1), "bins"),
    (lambda: NeuralSplinePrior(tail_bound=0.0), "tail_bound"),
    (lambda: VAEPrior((3, 30, 30), downsamples=2), "downsamples"),
    (lambda: VAEPrior((3, 32)), "shape"),
    (lambda: VAEPrior(k=0), "k"),
    (lambda: MLPVAEPrior(bound="vi"), "bound"),
    (lambda: MLPVAEPrior(latent_dim=0), "latent_dim"),
])
def test_config_errors(build, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        build()
    assert info.value.key == key


def test_wrong_event_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        RealNVPPrior(dim=2).log_prob(torch.randn(4, 3))
    with pytest.raises(ValueError, match="shape"):
        MLPVAEPrior(dim=2).log_prob(torch.randn(4, 3))


def test_prior_info() -> None:
    flow, vae = RealNVPPrior(dim=2, layers=2, hidden=4), MLPVAEPrior(dim=2, hidden=4, bound="iwae", k=5)
    assert prior_info(flow) == {"exact": True, "bound_name": None,
                                "num_params": sum(p.numel() for p in flow.parameters())}
    assert prior_info(vae)["exact"] is False and prior_info(vae)["bound_name"] == "iwae5"
    assert prior_info(GaussianPrior((2,))) == {"exact": True, "bound_name": None, "num_params": 0}


def test_every_prior_implements_the_one_interface() -> None:
    """Gaussian, flows, VAE and the exact toy q_T: one Protocol, one log_prob(x, generator) signature."""
    from difftime.priors import Prior
    from difftime.toy import Ring

    priors = [GaussianPrior((2,)), RealNVPPrior(dim=2, layers=2, hidden=4), MLPVAEPrior(dim=2, hidden=4, k=3), Ring()]
    x = torch.randn(5, 2)
    for prior in priors:
        assert isinstance(prior, Prior) and isinstance(prior.exact, bool)
        assert (prior.bound_name is None) == prior.exact
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        with torch.no_grad():
            assert torch.equal(prior.log_prob(x, g1), prior.log_prob(x, g2))  # seeded: reproducible
        assert prior.sample(3, torch.Generator().manual_seed(0)).shape == (3, 2)


def test_recorded_arguments_rebuild_a_perturbed_prior() -> None:
    """The spec recorded from the constructor rebuilds the same architecture: perturbed weights load
    strictly and give the same log-density (not an identity-initialised flow)."""
    from difftime.aux_priors.checkpoint import build_prior, prior_spec

    torch.manual_seed(0)
    for prior in (RealNVPPrior(dim=2, layers=3, hidden=8), NeuralSplinePrior(dim=2, layers=2, hidden=8, bins=4),
                  MLPVAEPrior(dim=2, latent_dim=1, hidden=8, bound="elbo")):
        with torch.no_grad():
            for p in prior.parameters():
                p.add_(0.1 * torch.randn_like(p))
        rebuilt = build_prior(prior_spec(prior))
        assert type(rebuilt) is type(prior)
        rebuilt.load_state_dict(prior.state_dict())
        x = torch.randn(6, 2)
        with torch.no_grad():
            a = prior.log_prob(x, torch.Generator().manual_seed(2))
            b = rebuilt.log_prob(x, torch.Generator().manual_seed(2))
        assert torch.allclose(a, b) and not torch.allclose(a, GaussianPrior((2,)).log_prob(x))


def test_checkpoint_cannot_make_the_loader_import_a_module(monkeypatch) -> None:
    """The class path is checked against the allowlist before anything is imported."""
    import importlib
    import sys

    from difftime.aux_priors.checkpoint import build_prior

    imported = []
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real(name, *a))
    for path in ("os.system", "evil_module.Payload", "difftime.aux_priors.checkpoint.AuxPriorCheckpoint"):
        with pytest.raises(ValueError, match="not an auxiliary prior"):
            build_prior({"class_path": path, "init_args": {}})
    assert imported == [] and "evil_module" not in sys.modules
