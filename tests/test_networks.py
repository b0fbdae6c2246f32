"""Score networks: shapes, config validation, parameter count, gradient flow, per-sample
independence, time conditioning, precision and memory-format invariance, dropout modes."""

from __future__ import annotations

import math

import pytest
import torch

from difftime.networks import MLP, UNet
from difftime.networks.layers import TimeEmbedding
from difftime.utils import ConfigError

SMALL = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, num_groups=4)
# (in_channels, resolution, extra config): CIFAR-like, MNIST 28 -> 14 -> 7, 8x8 digits.
CONFIGS = {
    "32": (3, 32, dict(SMALL, attn_resolutions=(16,))),
    "28": (1, 28, dict(SMALL, ch_mult=(1, 2, 2), attn_resolutions=(7,))),
    "8": (1, 8, dict(SMALL, attn_resolutions=(4,))),
}


def small_unet(name: str = "32", **overrides) -> UNet:
    channels, resolution, config = CONFIGS[name]
    return UNet(in_channels=channels, resolution=resolution, **{**config, **overrides})


def unet_input(net: UNet, batch: int, generator: torch.Generator) -> torch.Tensor:
    shape = (batch, net.in_channels, net.resolution, net.resolution)
    return torch.randn(shape, generator=generator)


@torch.no_grad()
def perturb_zero_init(net: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Give every all-zero parameter (zero-initialised last layers, biases) random values, so
    that gradients and outputs are not trivially zero."""
    for p in net.parameters():
        if torch.count_nonzero(p) == 0:
            std = 1 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.1
            p.copy_(std * torch.randn(p.shape, generator=generator))
    return net


# ---------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("resamp_with_conv", [True, False])
def test_unet_output_shape_and_zero_start(name, resamp_with_conv, generator):
    net = small_unet(name, resamp_with_conv=resamp_with_conv)
    x = unet_input(net, 3, generator)
    out = net(x, torch.rand(3, generator=generator))
    assert out.shape == x.shape
    # DDPM++ initialises the output conv at zero: the first noise prediction is exactly 0.
    assert torch.count_nonzero(out) == 0
    net.check_input_shape(tuple(x.shape[1:]))


def test_unet_out_channels(generator):
    net = small_unet("8", out_channels=2)
    assert net(unet_input(net, 2, generator), 0.5).shape == (2, 2, 8, 8)


@pytest.mark.parametrize("shape", [(5, 2), (5, 1, 4, 4)])
def test_mlp_output_shape(shape, generator):
    x = torch.randn(shape, generator=generator)
    net = MLP(dim=x[0].numel(), hidden=32, depth=2, embedding_dim=16)
    out = net(x, torch.rand(shape[0], generator=generator))
    assert out.shape == x.shape and torch.count_nonzero(out) == 0
    net.check_input_shape(tuple(shape[1:]))


@pytest.mark.parametrize("make", [lambda: small_unet("8"), lambda: MLP(dim=64, hidden=16, depth=1)])
def test_scalar_time_broadcasts(make, generator):
    net = perturb_zero_init(make(), generator).eval()
    x = torch.randn(3, 1, 8, 8, generator=generator)
    full = net(x, torch.full((3,), 0.4))
    for t in (0.4, torch.tensor(0.4), torch.tensor([0.4])):
        assert torch.equal(net(x, t), full)


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize("overrides, key", [
    (dict(resolution=30, ch_mult=(1, 2, 2)), "resolution"),   # 30 is not divisible by 4
    (dict(attn_resolutions=(5,)), "attn_resolutions"),         # only 32 and 16 occur
    (dict(nf=12, num_groups=8), "num_groups"),                 # 8 groups do not divide 12
    (dict(nf=8, ch_mult=(1, 3), num_groups=16), "num_groups"), # 16 groups do not divide 24
    (dict(ch_mult=()), "ch_mult"),
    (dict(dropout=1.0), "dropout"),
    (dict(embedding="learned"), "embedding"),
    (dict(nf=9, num_groups=3), "nf"),                          # odd time-embedding width
])
def test_unet_config_errors(overrides, key):
    config = dict(SMALL, resolution=32, attn_resolutions=(16,))
    with pytest.raises(ConfigError) as info:
        UNet(**{**config, **overrides})
    assert info.value.key == key


def test_resolution_error_names_allowed_values():
    with pytest.raises(ConfigError, match="divisible by 4 for ch_mult of length 3"):
        UNet(resolution=30, ch_mult=(1, 2, 2), **{k: v for k, v in SMALL.items() if k != "ch_mult"})


@pytest.mark.parametrize("shape, key", [((3, 28, 28), "resolution"), ((1, 32, 32), "in_channels"),
                                        ((3, 32), "in_channels")])
def test_unet_check_input_shape(shape, key):
    with pytest.raises(ConfigError) as info:
        small_unet("32").check_input_shape(shape)
    assert info.value.key == key


def test_mlp_config_errors():
    with pytest.raises(ConfigError) as info:
        MLP(dim=2).check_input_shape((1, 4, 4))
    assert info.value.key == "dim"
    with pytest.raises(ConfigError) as info:
        MLP(embedding_dim=15)
    assert info.value.key == "embedding_dim"


# ---------------------------------------------------------------------------- parameter count
def expected_unet_params(c_in: int, nf: int, ch_mult: tuple[int, ...], blocks: int,
                         n_attn_levels: int) -> int:
    """Closed-form parameter count of the DDPM++ layout (BigGAN resampling blocks).

    A residual block i -> o with time-embedding width E = 4 nf has GroupNorms (2i + 2o), two
    3x3 convs (9io + o, 9oo + o), the embedding projection (Eo + o) and, when i != o or it
    resamples, a 1x1 skip conv (io + o). An attention block on C channels has a GroupNorm
    (2C), q, k, v (3C^2 + 3C) and an output projection (C^2 + C).
    """
    emb = 4 * nf

    def res(i: int, o: int, resamples: bool = False) -> int:
        skip = i * o + o if (i != o or resamples) else 0
        return 2 * i + 9 * i * o + o + emb * o + o + 2 * o + 9 * o * o + o + skip

    def attn(c: int) -> int:
        return 2 * c + 3 * c * c + 3 * c + c * c + c

    total = nf * emb + emb + emb * emb + emb + 9 * c_in * nf + nf   # time MLP and input conv
    chans, skips, ch = [nf * m for m in ch_mult], [nf], nf
    for level, c in enumerate(chans):                               # down path
        for _ in range(blocks):
            total, ch = total + res(ch, c), c
            skips.append(ch)
        if level < len(chans) - 1:
            total += res(ch, ch, resamples=True)
            skips.append(ch)
    total += 2 * res(ch, ch) + attn(ch)                              # middle
    for level in reversed(range(len(chans))):                        # up path
        for _ in range(blocks + 1):
            total, ch = total + res(ch + skips.pop(), chans[level]), chans[level]
        if level > 0:
            total += res(ch, ch, resamples=True)
    # Attention: one per down block and one per up level at each attention resolution
    # (16x16 is level 1 here, 256 channels).
    total += n_attn_levels * (blocks + 1) * attn(chans[1])
    return total + 2 * ch + 9 * ch * c_in + c_in                     # output GroupNorm and conv


def test_cifar10_parameter_count():
    # The CIFAR-10 DDPM++ (cont.) configuration of Song et al. 2021 is reported at about 62M
    # parameters (Table 3). Most of them sit in the 3x3 convs of the 256-channel levels:
    # each 256 -> 256 residual block holds 2 * 9 * 256^2 = 1.18M conv weights, and levels 1-3
    # have 4 down + 5 up + 2 resampling blocks each, plus the middle blocks. Exactly:
    net = UNet()
    count = sum(p.numel() for p in net.parameters())
    assert count == expected_unet_params(3, 128, (1, 2, 2, 2), 4, n_attn_levels=1)
    assert count == 61_804_419
    assert 60e6 < count < 64e6
    # The Fourier frequencies are a buffer, not a parameter.
    assert all("freqs" not in name for name, _ in net.named_parameters())


def test_small_parameter_count_matches_formula():
    net = UNet(**dict(SMALL, attn_resolutions=(16,)))
    count = sum(p.numel() for p in net.parameters())
    assert count == expected_unet_params(3, 8, (1, 2), 1, n_attn_levels=1)
    assert 1_000 < count < 100_000


# ---------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("make", [lambda: small_unet("32"), lambda: small_unet("28", embedding="fourier"),
                                  lambda: MLP(dim=2, hidden=32, depth=2, embedding_dim=16)])
def test_gradient_reaches_every_parameter(make, generator):
    net = perturb_zero_init(make(), generator)
    x = (torch.randn(3, 2, generator=generator) if isinstance(net, MLP) else unet_input(net, 3, generator))
    out = net(x, torch.rand(3, generator=generator))
    (out * torch.randn(out.shape, generator=generator)).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


# ---------------------------------------------------------------------------- batch independence
@pytest.mark.parametrize("make", [lambda: small_unet("32"), lambda: small_unet("8"),
                                  lambda: MLP(dim=2, hidden=32, depth=2, embedding_dim=16)])
def test_batch_independence(make, generator):
    net = perturb_zero_init(make(), generator).eval()
    x = (torch.randn(4, 2, generator=generator) if isinstance(net, MLP) else unet_input(net, 4, generator))
    t = torch.rand(4, generator=generator)
    with torch.no_grad():
        batched = net(x, t)
        single = torch.cat([net(x[i:i + 1], t[i:i + 1]) for i in range(4)])
        # Changing the other samples must not change sample 0 either.
        other = net(torch.cat([x[:1], -x[1:]]), t)
    assert torch.allclose(batched, single, atol=1e-5, rtol=1e-4)
    assert torch.allclose(batched[0], other[0], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------- time conditioning
@pytest.mark.parametrize("embedding", ["positional", "fourier"])
@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_time_conditioning_matters(kind, embedding, generator):
    net = (small_unet("8", embedding=embedding) if kind == "unet"
           else MLP(dim=64, hidden=32, depth=2, embedding_dim=16, embedding=embedding))
    net = perturb_zero_init(net, generator).eval()
    x = torch.randn(2, 1, 8, 8, generator=generator)
    with torch.no_grad():
        a, b = net(x, 0.1), net(x, 0.9)
    assert (a - b).norm() > 1e-2 * a.norm()


def test_positional_embedding_closed_form():
    t = torch.tensor([0.0, 0.25, 1.0])
    emb = TimeEmbedding(8, "positional")(t)
    for i, ti in enumerate(t.tolist()):
        for k in range(4):
            angle = 999 * ti * 10000 ** (-k / 4)
            assert emb[i, k].item() == pytest.approx(math.sin(angle), abs=1e-3)
            assert emb[i, 4 + k].item() == pytest.approx(math.cos(angle), abs=1e-3)


def test_fourier_embedding_fixed_and_gaussian():
    torch.manual_seed(1)
    a = TimeEmbedding(2048, "fourier", fourier_scale=16.0)
    torch.manual_seed(2)
    b = TimeEmbedding(2048, "fourier", fourier_scale=16.0)
    assert torch.equal(a.freqs, b.freqs)                 # same whatever the global RNG state
    assert torch.equal(UNet(**dict(SMALL, attn_resolutions=(16,)), embedding="fourier").time_embed.freqs,
                       UNet(**dict(SMALL, attn_resolutions=(16,)), embedding="fourier").time_embed.freqs)
    # Angular frequencies 2 pi W with W ~ N(0, 16^2): standardised, mean 0 and std 1 within
    # 4 standard errors (1/sqrt(n) and 1/sqrt(2n) for n = 1024 draws).
    w = a.freqs.double() / (2 * math.pi * 16.0)
    assert abs(w.mean().item()) < 4 / math.sqrt(1024)
    assert abs(w.std().item() - 1) < 4 / math.sqrt(2 * 1024)
    emb = a(torch.rand(5))
    assert torch.allclose(emb[:, :1024] ** 2 + emb[:, 1024:] ** 2, torch.ones(5, 1024), atol=1e-5)
    assert "freqs" in dict(a.named_buffers()) and not list(a.parameters())


# ---------------------------------------------------------------------------- precision, layout
@pytest.mark.parametrize("make", [lambda: small_unet("32"),
                                  lambda: MLP(dim=2, hidden=32, depth=2, embedding_dim=16)])
def test_bf16_autocast_close_to_fp32(make, generator):
    net = perturb_zero_init(make(), generator).eval()
    x = (torch.randn(4, 2, generator=generator) if isinstance(net, MLP) else unet_input(net, 4, generator))
    t = torch.rand(4, generator=generator)
    with torch.no_grad():
        ref = net(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x, t)
    assert torch.isfinite(low).all()
    # bf16 keeps 8 significant bits (relative rounding 2^-9 per op); a few per cent over the
    # whole network is the expected accumulation.
    assert (low.float() - ref).norm() < 0.05 * ref.norm()


def test_channels_last_matches_contiguous(generator):
    net = perturb_zero_init(small_unet("32"), generator).eval()
    x, t = unet_input(net, 2, generator), torch.rand(2, generator=generator)
    with torch.no_grad():
        ref = net(x, t)
        cl_input = net(x.to(memory_format=torch.channels_last), t)
        net.to(memory_format=torch.channels_last)
        cl_both = net(x.to(memory_format=torch.channels_last), t)
    assert torch.allclose(cl_input, ref, atol=1e-5, rtol=0)
    assert torch.allclose(cl_both, ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- dropout
def test_dropout_train_vs_eval(generator):
    net = perturb_zero_init(small_unet("8", dropout=0.3), generator)
    x, t = unet_input(net, 2, generator), torch.rand(2, generator=generator)
    with torch.no_grad():
        torch.manual_seed(0)
        train_a, train_b = net.train()(x, t), net(x, t)
        eval_a, eval_b = net.eval()(x, t), net(x, t)
    assert not torch.allclose(train_a, train_b)
    assert torch.equal(eval_a, eval_b)
    assert not torch.allclose(train_a, eval_a)
    # Without dropout the train-mode forward is deterministic: dropout is the only randomness.
    no_drop = perturb_zero_init(small_unet("8", dropout=0.0), generator).train()
    with torch.no_grad():
        assert torch.equal(no_drop(x, t), no_drop(x, t))
