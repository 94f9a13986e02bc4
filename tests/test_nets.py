"""Tests for nets.py: NF-WRN signal propagation (S2.1), the identity-at-init simplifier
(S2.2), the DC ConvNet (Sec. 4), the forward pass of each written out by hand, double
backward, checkpoints and the run utilities."""
import json
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradgradcheck
from torch.func import functional_call

import nets


@pytest.fixture(autouse=True)
def one_thread():
    """These tiny graphs run much faster on one thread: with two threads on a busy 2-core
    machine, OpenMP synchronisation made a 3 ms forward pass take 0.8 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def block_variances(model, x):
    """Variance of the stem output and of every residual block output."""
    variances = []
    layers = [model.stem, *model.blocks]
    hooks = [m.register_forward_hook(lambda mod, inp, out: variances.append(out.var().item()))
             for m in layers]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return variances


# ---------------------------------------------------------------- NF Wide ResNet (S2.1)

@pytest.mark.parametrize("depth,widen", [(16, 2), (28, 2)])
def test_nf_wrn_unit_variance_through_depth(depth, widen):
    torch.manual_seed(0)
    model = nets.NFWideResNet(10, depth=depth, widen=widen, mean=(0.5,) * 3, std=(0.25,) * 3).eval()
    x = 0.5 + 0.25 * torch.randn(8, 3, 32, 32)  # normalizes to N(0, 1) inside the model
    variances = block_variances(model, x)
    assert len(variances) == 1 + 3 * (depth - 4) // 6
    assert all(0.5 < v < 2.5 for v in variances), variances
    # each residual branch adds about 0.2² = 0.04 of variance: growth is linear and small
    n_blocks = len(variances) - 1
    assert variances[-1] - variances[0] < 0.1 * n_blocks, variances


def test_nf_block_identity_shortcut_carries_h():
    """Paper: h' = h + 0.2·f(h). The authors' in-place ELU made the shortcut carry ELU(h)."""
    torch.manual_seed(0)
    block = nets.NFBlock(8, 8, stride=1, dropout=0.0)
    h = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        block.conv2.gain.zero_()
        block.conv2.bias.zero_()  # residual branch f(h) = 0
    assert torch.equal(block(h), h)
    transition = nets.NFBlock(8, 16, stride=2, dropout=0.0)
    assert transition(h).shape == (2, 16, 3, 3)


def test_nf_wrn_shapes_and_param_count():
    model = nets.NFWideResNet(10)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    # the authors' WRN-16-2 NF has 692,122 parameters (weights, biases and gains of every
    # ScaledStdConv incl. the 1×1 shortcuts, plus the Linear); ours has the same layers
    assert sum(p.numel() for p in model.parameters()) == 692_122
    assert model.config["depth"] == 16 and model.config["widen"] == 2
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)) for m in model.modules())
    with pytest.raises(ValueError):
        nets.NFWideResNet(10, depth=15)


def test_nf_wrn_normalizes_inputs_first():
    torch.manual_seed(0)
    model = nets.NFWideResNet(3, depth=10, widen=1, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7)).eval()
    plain = nets.NFWideResNet(3, depth=10, widen=1, mean=(0.0,) * 3, std=(1.0,) * 3).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k not in ("mean", "std")},
                          strict=False)
    x = torch.rand(2, 3, 8, 8)  # the network is size-agnostic (global average pool)
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1), torch.tensor([0.5, 0.6, 0.7]).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), plain((x - mean) / std))


def test_scaled_std_conv_standardizes_each_output_row():
    torch.manual_seed(0)
    conv = nets.ScaledStdConv2d(16, 32, 3, padding=1)
    torch.nn.init.normal_(conv.weight, mean=0.7, std=3.0)  # far from standardized
    with torch.no_grad():
        conv.gain.fill_(2.0)
    w = conv.standardized_weight().flatten(1)  # (32, 144)
    fan_in = 16 * 9
    torch.testing.assert_close(w.mean(1), torch.zeros(32), atol=1e-6, rtol=0)
    torch.testing.assert_close(w.var(1, correction=0), torch.full((32,), 4.0 / fan_in), rtol=1e-3, atol=0)
    # the conv uses exactly that weight
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.standardized_weight(), conv.bias, padding=1))


def test_gamma_elu_is_variance_preserving():
    z = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(nets.gamma_elu(z).std().item() - 1.0) < 3e-3


# ---------------------------------------------------------------- UNet simplifier (S2.2)

def test_unet_is_identity_at_init_and_has_authors_size():
    torch.manual_seed(0)
    model = nets.UNetSimplifier()
    x = torch.rand(4, 3, 32, 32)
    x[0, 0, 0, :4] = torch.tensor([0.0, 1.0, 1e-4, 1 - 1e-4])  # values the clamp changes
    # merge weight 0: sigmoid(logit(clamped)), a float32 round trip off by ~1 ulp of x ≤ 1
    # (seen 6e-8); any UNet term that got through moves it by far more than 1e-6
    torch.testing.assert_close(model(x), x.clamp(1e-3, 1 - 1e-3), atol=1e-6, rtol=0)
    # authors' simplifier: 16.66 M parameters (num_down 5, ngf 64)
    assert sum(p.numel() for p in model.parameters()) == 16_659_076


def test_unet_output_in_unit_interval_after_perturbation():
    torch.manual_seed(0)
    model = nets.UNetSimplifier(num_down=3, ngf=8)
    with torch.no_grad():
        model.merge_weight.fill_(50.0)
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    x = torch.rand(6, 3, 32, 32)
    x[0], x[1] = 0.0, 1.0  # extreme inputs
    y = model(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
    assert (y - x.clamp(1e-3, 1 - 1e-3)).abs().max() > 0.1  # no longer the identity
    with pytest.raises(ValueError):
        model(torch.rand(1, 3, 20, 20))  # 20 not divisible by 2**3


def test_unet_uses_elu_and_affine_not_normalization():
    model = nets.UNetSimplifier(num_down=5, ngf=8)
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.ELU in kinds and nets.AffineOnChans in kinds
    assert not kinds & {torch.nn.LeakyReLU, torch.nn.ReLU, torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d}
    biased = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))
              and m.bias is not None]
    assert biased == [model.up[0][1]]  # only the outermost ConvTranspose has a bias


# ---------------------------------------------------------------- DC ConvNet (Sec. 4)

def test_convnet_shapes():
    model = nets.ConvNet(10)
    assert model(torch.rand(3, 3, 32, 32)).shape == (3, 10)
    assert model.classifier.in_features == 128 * 4 * 4
    assert nets.ConvNet(7, width=16, depth=2)(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    # instance norm: one GroupNorm group per channel, learned affine
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 3 and all(n.num_groups == n.num_channels == 128 and n.affine for n in norms)


# ---------------------------------------------------------------- paper formulas written out
# Each test below writes a forward pass out by hand with F.conv2d and the module's own
# parameters (set to random values first, so every term matters) and compares in float64.

ELU_GAMMA_BROCK = 1.2716004848480225  # Brock et al. 2021 (NF-ResNets), `_nonlin_gamma['elu']`


def randomize_(model, seed=0):
    """Every parameter to random non-trivial values (gains, affines and m included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype) + 0.3)
    return model


def elu(x):  # ELU with α = 1, written out
    return torch.where(x > 0, x, torch.exp(x) - 1)


def ws_weight(conv):
    """Scaled Weight Standardization (S2.1, Eq. S1): Ŵ_i = gain_i·(W_i − μ_i)/((σ_i + 1e-5)·√N),
    μ_i and σ_i² = (1/N)·Σ_j (W_ij − μ_i)² (population variance) over the N fan-in weights."""
    w = conv.weight
    rows = w.reshape(w.shape[0], -1)
    n = rows.shape[1]
    mu = rows.sum(1, keepdim=True) / n
    sigma = (((rows - mu) ** 2).sum(1, keepdim=True) / n).sqrt()
    return (conv.gain.reshape(-1, 1) * (rows - mu) / ((sigma + 1e-5) * math.sqrt(n))).reshape(w.shape)


def nf_block_by_hand(block, h, in_ch, out_ch, stride, dropout_mask=None):
    """S2.1: h' = shortcut + 0.2·f(h), a = γ·ELU(h), f = conv2(γ·ELU(dropout(conv1(a)))), stride
    on conv2 (WRN layout); shortcut = h, or a strided 1×1 scaled-std conv of a when the
    shape changes (NF-ResNet transition block of Brock et al.)."""
    a = ELU_GAMMA_BROCK * elu(h)
    t = F.conv2d(a, ws_weight(block.conv1), block.conv1.bias, padding=1)
    if dropout_mask is not None:
        t = t * dropout_mask
    r = F.conv2d(ELU_GAMMA_BROCK * elu(t), ws_weight(block.conv2), block.conv2.bias,
                 stride=stride, padding=1)
    if stride == 1 and in_ch == out_ch:
        assert block.shortcut is None
        shortcut = h
    else:
        assert block.shortcut.weight.shape == (out_ch, in_ch, 1, 1)
        shortcut = F.conv2d(a, ws_weight(block.shortcut), block.shortcut.bias, stride=stride)
    return shortcut + 0.2 * r


def test_gamma_elu_hand_values():
    x = torch.tensor([1.0, -1.0, 0.0, 2.5], dtype=torch.float64)
    expected = torch.tensor([1.2716004848480225, 1.2716004848480225 * (math.exp(-1.0) - 1), 0.0,
                             1.2716004848480225 * 2.5], dtype=torch.float64)
    torch.testing.assert_close(nets.gamma_elu(x), expected, rtol=1e-15, atol=0)


def test_scaled_std_conv_hand_computed_weight():
    """Two fan-in weights per row (N = 2): row [1, 3] has μ = 2, σ = 1; row [0, 2e-5] has
    μ = σ = 1e-5, where the 1e-5 of (σ + 1e-5) and the population std both matter."""
    conv = nets.ScaledStdConv2d(2, 2, 1).double()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 3.0], [0.0, 2e-5]], dtype=torch.float64).view(2, 2, 1, 1))
        conv.gain.copy_(torch.tensor([2.0, 1.0]).view(2, 1, 1, 1))
    expected = torch.tensor([[2 * -1 / ((1 + 1e-5) * math.sqrt(2)), 2 * 1 / ((1 + 1e-5) * math.sqrt(2))],
                             [-1 / (2 * math.sqrt(2)), 1 / (2 * math.sqrt(2))]], dtype=torch.float64)
    torch.testing.assert_close(conv.standardized_weight().view(2, 2), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("in_ch,out_ch,stride", [(4, 4, 1), (3, 5, 2), (4, 6, 1)])
def test_nf_block_forward_written_out(in_ch, out_ch, stride):
    torch.manual_seed(0)
    block = randomize_(nets.NFBlock(in_ch, out_ch, stride=stride, dropout=0.3).double()).eval()
    with torch.no_grad():  # one conv with tiny weights (σ ≈ 1e-5), so the eps of Eq. S1 counts
        block.conv1.weight.mul_(1e-5)
    h = torch.randn(2, in_ch, 6, 6, dtype=torch.float64)
    expected = nf_block_by_hand(block, h, in_ch, out_ch, stride)
    torch.testing.assert_close(block(h), expected, rtol=1e-10, atol=1e-12)


def test_nf_block_dropout_acts_on_conv1_output():
    """Dropout sits between conv1 and the second γ-ELU (WRN of Zagoruyko & Komodakis)."""
    torch.manual_seed(0)
    block = randomize_(nets.NFBlock(4, 4, stride=1, dropout=0.5).double()).train()
    h = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    seen = []
    block.dropout.register_forward_hook(lambda mod, inp, out: seen.append((inp[0], out)))
    out = block(h)
    (dropped_in, dropped_out), = seen
    a = ELU_GAMMA_BROCK * elu(h)
    torch.testing.assert_close(dropped_in, F.conv2d(a, ws_weight(block.conv1), block.conv1.bias,
                                                    padding=1), rtol=1e-10, atol=1e-12)
    mask = torch.where(dropped_in != 0, dropped_out / dropped_in, torch.zeros_like(dropped_in))
    assert set(mask.unique().tolist()) == {0.0, 2.0}  # dropped or scaled by 1/(1 − 0.5)
    torch.testing.assert_close(out, nf_block_by_hand(block, h, 4, 4, 1, mask), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("depth,widen", [(10, 3), (16, 2)])
def test_nf_wrn_forward_written_out(depth, widen):
    """S2.1: normalize, stem 3→16, stages of n = (depth − 4)/6 blocks with widths 16·widen,
    32·widen, 64·widen and strides 1, 2, 2, no nonlinearity after the last block, global
    average pool, Linear."""
    mean, std = (0.125, 0.25, 0.375), (0.5, 0.625, 0.75)  # exact in float32 buffers
    torch.manual_seed(0)
    model = randomize_(nets.NFWideResNet(7, depth=depth, widen=widen, mean=mean, std=std).double()).eval()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    h = (x - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / \
        torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    assert model.stem.weight.shape == (16, 3, 3, 3)
    h = F.conv2d(h, ws_weight(model.stem), model.stem.bias, padding=1)
    blocks, in_ch = list(model.blocks), 16
    n = (depth - 4) // 6
    assert len(blocks) == 3 * n
    for stage, (width, stride) in enumerate(((16 * widen, 1), (32 * widen, 2), (64 * widen, 2))):
        for i in range(n):
            block = blocks[stage * n + i]
            assert block.conv1.weight.shape == (width, in_ch, 3, 3)
            h = nf_block_by_hand(block, h, in_ch, width, stride if i == 0 else 1)
            in_ch = width
    assert h.shape[-2:] == (2, 2)  # 8 / (1·2·2)
    logits = h.mean(dim=(2, 3)) @ model.fc.weight.T + model.fc.bias
    torch.testing.assert_close(model(x), logits, rtol=1e-10, atol=1e-12)


def test_unet_simplifier_forward_written_out():
    """S2.2 for num_down = 3, ngf = 2 (channels 3 → 2 → 4 → 8), pix2pix UnetSkipConnectionBlock
    wiring: down = [ELU] → Conv4×4/2 → [AffineOnChans (x + a)·f]; up = ELU → ConvT4×4/2 →
    [affine]; each up path input is cat([skip, h]); no ELU before the first conv, no affine
    after the outermost and innermost down conv nor after the outermost ConvT, which alone
    has a bias. Output sigmoid(logit(clamp(x, 1e-3, 1 − 1e-3)) + m·UNet(2x − 1))."""
    torch.manual_seed(0)
    model = randomize_(nets.UNetSimplifier(num_down=3, ngf=2).double())
    p = dict(model.named_parameters())
    assert set(p) == {"down.0.0.weight", "down.1.1.weight", "down.1.2.add", "down.1.2.factor",
                      "down.2.1.weight", "up.2.1.weight", "up.2.2.add", "up.2.2.factor",
                      "up.1.1.weight", "up.1.2.add", "up.1.2.factor", "up.0.1.weight",
                      "up.0.1.bias", "merge_weight"}
    assert p["merge_weight"] != 0 and (p["up.1.2.add"] != 0).all() and (p["up.1.2.factor"] != 1).all()

    def down(h, name):
        return F.conv2d(h, p[name], stride=2, padding=1)

    def up(h, name, bias=None):
        return F.conv_transpose2d(h, p[name], bias, stride=2, padding=1)

    def affine(h, name):
        return (h + p[name + ".add"]) * p[name + ".factor"]

    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    x[0, 0, 0, :4] = torch.tensor([0.0, 1.0, 1e-4, 1 - 1e-4])  # values the clamp changes
    v = 2 * x - 1  # the UNet sees [-1, 1] images
    d0 = down(v, "down.0.0.weight")  # (2, 2, 4, 4)
    d1 = affine(down(elu(d0), "down.1.1.weight"), "down.1.2")  # (2, 4, 2, 2)
    d2 = down(elu(d1), "down.2.1.weight")  # (2, 8, 1, 1) innermost
    u2 = affine(up(elu(d2), "up.2.1.weight"), "up.2.2")  # (2, 4, 2, 2)
    u1 = affine(up(elu(torch.cat([d1, u2], 1)), "up.1.1.weight"), "up.1.2")  # (2, 2, 4, 4)
    u0 = up(elu(torch.cat([d0, u1], 1)), "up.0.1.weight", p["up.0.1.bias"])  # (2, 3, 8, 8)
    low, high = torch.tensor(1e-3, dtype=torch.float64), torch.tensor(1 - 1e-3, dtype=torch.float64)
    xc = torch.minimum(torch.maximum(x, low), high)  # only the logit term is clamped
    expected = 1 / (1 + torch.exp(-(torch.log(xc / (1 - xc)) + p["merge_weight"] * u0)))
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-12)


def test_affine_on_chans_adds_then_scales():
    layer = nets.AffineOnChans(2).double()
    with torch.no_grad():
        layer.add.copy_(torch.tensor([1.0, -2.0]).view(1, 2, 1, 1))
        layer.factor.copy_(torch.tensor([3.0, 0.5]).view(1, 2, 1, 1))
    x = torch.tensor([[[[2.0]], [[4.0]]]], dtype=torch.float64)  # (1, 2, 1, 1)
    assert layer(x).flatten().tolist() == [9.0, 1.0]  # (2 + 1)·3, (4 − 2)·0.5


def test_convnet_forward_written_out():
    """DC ConvNet (Zhao et al. 2021), Sec. 4: (x − mean)/std, then depth × [Conv3×3 with bias →
    instance norm (per image and channel, biased variance, eps 1e-5, learned affine) →
    ReLU → AvgPool 2], flatten, Linear."""
    mean, std = (0.375, 0.5, 0.625), (0.25, 0.375, 0.875)  # exact in float32 buffers
    torch.manual_seed(0)
    model = randomize_(nets.ConvNet(5, width=4, depth=2, mean=mean, std=std).double())
    p = dict(model.named_parameters())
    assert set(p) == {"features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias",
                      "features.4.weight", "features.4.bias", "features.5.weight", "features.5.bias",
                      "classifier.weight", "classifier.bias"}
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    h = (x - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / \
        torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    for conv, norm in (("features.0", "features.1"), ("features.4", "features.5")):
        h = F.conv2d(h, p[conv + ".weight"], p[conv + ".bias"], padding=1)
        mu = h.mean(dim=(2, 3), keepdim=True)
        var = ((h - mu) ** 2).mean(dim=(2, 3), keepdim=True)
        h = (h - mu) / torch.sqrt(var + 1e-5) * p[norm + ".weight"].view(1, -1, 1, 1) \
            + p[norm + ".bias"].view(1, -1, 1, 1)
        h = torch.where(h > 0, h, torch.zeros_like(h))
        h = (h[..., 0::2, 0::2] + h[..., 0::2, 1::2] + h[..., 1::2, 0::2] + h[..., 1::2, 1::2]) / 4
    assert h.shape == (2, 4, 8, 8)
    logits = h.reshape(2, -1) @ p["classifier.weight"].T + p["classifier.bias"]
    torch.testing.assert_close(model(x), logits, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- double backward

def check_double_backward(model, x, names=None, fast_mode=True):
    """gradgradcheck in float64 w.r.t. the input and the named parameters (all by default),
    passed through torch.func.functional_call as the unrolled step does. fast_mode checks
    random projections of the second derivatives, which keeps whole networks affordable."""
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    inputs = (x,) + tuple(params[n].detach().clone().requires_grad_() for n in names)

    def fn(x, *ps):
        return functional_call(model, dict(zip(names, ps)), (x,))
    assert gradgradcheck(fn, inputs, fast_mode=fast_mode)


def test_double_backward_scaled_std_conv():
    torch.manual_seed(0)
    conv = nets.ScaledStdConv2d(2, 3, 3, padding=1).double()
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    check_double_backward(conv, x, fast_mode=False)  # every second derivative, element by element


def test_double_backward_nf_wrn():
    torch.manual_seed(0)
    model = nets.NFWideResNet(3, depth=10, widen=1, dropout=0.0).double().eval()
    x = torch.rand(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    # one tensor of each kind: stem, a transition block's convs and shortcut, head
    check_double_backward(model, x, ["stem.weight", "stem.gain", "blocks.1.conv1.weight",
                                     "blocks.1.conv2.bias", "blocks.1.shortcut.weight", "fc.weight"])


def test_double_backward_unet():
    torch.manual_seed(0)
    model = nets.UNetSimplifier(num_down=2, ngf=2).double()
    with torch.no_grad():
        model.merge_weight.fill_(0.7)  # at m = 0 the UNet would not be reached
    x = (0.1 + 0.8 * torch.rand(2, 3, 8, 8, dtype=torch.float64)).requires_grad_()  # inside the clamp
    check_double_backward(model, x)


def test_double_backward_convnet():
    torch.manual_seed(0)
    model = nets.ConvNet(3, width=4, depth=3).double()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    check_double_backward(model, x)


# ---------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("make", [lambda: nets.NFWideResNet(5, depth=10, widen=1, mean=(0.1, 0.2, 0.3)),
                                  lambda: nets.UNetSimplifier(num_down=3, ngf=4),
                                  lambda: nets.ConvNet(4, width=8, depth=2, mean=(0.5,) * 3, std=(1.0,) * 3)])
def test_save_load_round_trip(tmp_path, make):
    torch.manual_seed(0)
    model = make()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # so that a fresh init would not pass
    path = tmp_path / "model.pt"
    nets.save_model(model, path, epoch=3)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["kind"] == type(model).__name__ and ckpt["config"] == model.config and ckpt["epoch"] == 3
    assert list(ckpt["state_dict"]) == list(model.state_dict())
    loaded = nets.load_model(path, kind=type(model).__name__)
    assert type(loaded) is type(model) and not loaded.training
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded(x), model.eval()(x))


def test_load_model_errors(tmp_path):
    path = tmp_path / "convnet.pt"
    nets.save_model(nets.ConvNet(3, width=4, depth=1), path)
    with pytest.raises(nets.CheckpointError, match="holds a ConvNet"):
        nets.load_model(path, kind="NFWideResNet")
    with pytest.raises(nets.CheckpointError, match="does not exist"):
        nets.load_model(tmp_path / "missing.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"]["classifier.weight"] = torch.zeros(3, 5)  # wrong shape
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(nets.CheckpointError, match="does not match") as err:
        nets.load_model(tmp_path / "bad.pt")
    assert "\n" not in str(err.value)
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(nets.CheckpointError):
        nets.load_model(tmp_path / "junk.pt")


# ---------------------------------------------------------------- run utilities

def test_seed_everything_makes_runs_identical():
    def run():
        nets.seed_everything(123)
        model = nets.NFWideResNet(10, depth=10, widen=1)  # dropout active in train mode
        return random.random(), np.random.rand(), model(torch.rand(2, 3, 8, 8))
    (a1, b1, c1), (a2, b2, c2) = run(), run()
    assert a1 == a2 and b1 == b2 and torch.equal(c1, c2)
    nets.seed_everything(124)
    assert not torch.equal(nets.NFWideResNet(10, depth=10, widen=1)(torch.rand(2, 3, 8, 8)), c1)


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert nets.resolve_device("auto") == torch.device("cpu")
    assert nets.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(nets.RunError, match="no CUDA GPU"):
        nets.resolve_device("cuda")
    with pytest.raises(nets.RunError, match="no CUDA GPU"):
        nets.resolve_device("cuda:1")
    with pytest.raises(nets.RunError, match="not a torch device"):
        nets.resolve_device("gpu0")
    with pytest.raises(nets.RunError):
        nets.resolve_device("meta")  # a torch device, but no place to run a model


def test_progress_prints_rate_and_eta(capsys):
    progress = nets.Progress(total=4, desc="epoch 1", every=0.0)
    progress.update(loss=0.5)
    progress.update(loss=torch.tensor(0.25))
    progress.close()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert "epoch 1 2/4" in lines[1] and "it/s" in lines[1] and "ETA 00:00:00" in lines[1]
    assert "loss=0.25" in lines[1]
    quiet = nets.Progress(total=4, desc="quiet", every=3600.0)
    quiet.update()
    quiet.close()
    assert capsys.readouterr().out == ""


def test_atomic_files(tmp_path):
    nets.atomic_save({"a": torch.arange(3)}, tmp_path / "x.pt")
    assert torch.equal(torch.load(tmp_path / "x.pt", weights_only=True)["a"], torch.arange(3))
    with pytest.raises(Exception):
        nets.atomic_save({"f": lambda: 0}, tmp_path / "x.pt")  # unpicklable: the save fails
    assert torch.equal(torch.load(tmp_path / "x.pt", weights_only=True)["a"], torch.arange(3))
    nets.write_json(tmp_path / "sub" / "r.json", {"acc": np.float32(0.5), "t": torch.tensor([1, 2])})
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == {"acc": 0.5, "t": [1, 2]}
    nets.append_jsonl(tmp_path / "m.jsonl", {"epoch": 0})
    nets.append_jsonl(tmp_path / "m.jsonl", {"epoch": 1})
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]
    assert sorted(os.listdir(tmp_path)) == ["m.jsonl", "sub", "x.pt"]  # no temporary files left
    assert os.listdir(tmp_path / "sub") == ["r.json"]


def test_compiled_training_steps_train_the_same_network_with_the_same_dropout():
    """--compile (nets.compiled): SGD steps through the torch.compile'd classifier train
    the eager classifier's own parameters, to the same weights as eager steps (1e-5), with
    the same dropout masks (the RNG ends where eager leaves it); its state_dict keeps the
    plain names, and without --compile the model itself is used. SGD, not Adam: its moves
    are lr times the gradient, so compiled kernels' other float32 sums give weights apart
    by ~1e-8 (seen), within 1e-6 + 1e-5·|w| (Adam's lr·g/(|g|+ε) would turn a rounding of
    a near-zero gradient into a move of lr)."""
    torch.manual_seed(0)
    net = nets.NFWideResNet(3, depth=10, widen=1, dropout=0.3)
    assert nets.compiled(net, False) is net
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 3, (8,))
    weights, states = [], []
    for compile in (False, True):
        model = nets.NFWideResNet(3, depth=10, widen=1, dropout=0.3)
        model.load_state_dict(net.state_dict())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # (Adam would
        forward = nets.compiled(model, compile)  # blow rounding up where a gradient is ~0)
        torch.manual_seed(1)
        for _ in range(3):
            loss = F.cross_entropy(forward(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        weights.append(model.state_dict())
        states.append(torch.get_rng_state())
    assert weights[0].keys() == weights[1].keys() == net.state_dict().keys()
    assert not torch.equal(weights[0]["fc.weight"], net.state_dict()["fc.weight"])  # it trained
    for name, eager in weights[0].items():
        torch.testing.assert_close(weights[1][name], eager, rtol=1e-5, atol=1e-6)
    assert torch.equal(states[0], states[1])  # the same draws, hence the same masks
