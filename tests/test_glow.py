"""glow.py against trusted references: brute-force Jacobians, hand computations (ActNorm
init, one flow step, glow range, quantization, bpd of Eq. 1, dequantization noise), and an
independent implementation of the density of y0ast Glow-PyTorch, written from its code."""
import copy
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import datasets
import glow
import nets

torch.set_default_dtype(torch.float32)


def randomize(module, scale=0.1, seed=0):
    """Give every parameter (also the zero-initialised ones) random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    for m in module.modules():
        if isinstance(m, glow.ActNorm):
            m.initialized.fill_(1)
    return module


def tiny_glow(dtype=torch.float64, scale=0.1, **kw):
    config = dict(levels=2, steps=2, hidden=8, image_size=8) | kw
    torch.manual_seed(0)
    return randomize(glow.Glow(**config).to(dtype), scale)


# ---------------------------------------------------------------- invertibility, log-dets


def layer_cases():
    torch.manual_seed(0)
    return {
        "actnorm": glow.ActNorm(4),
        "invconv_lu": glow.InvConv1x1(4, lu=True),
        "invconv_full": glow.InvConv1x1(4, lu=False),
        "step_affine": glow.FlowStep(4, hidden=6, affine=True),
        "step_additive": glow.FlowStep(4, hidden=6, affine=False),
    }


@pytest.mark.parametrize("name", list(layer_cases()))
def test_layer_reverse_and_logdet_match_brute_force_jacobian(name):
    layer = randomize(layer_cases()[name].double()).eval()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    y, logdet = layer(x)
    assert torch.allclose(layer.reverse(y), x, atol=1e-10)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v)[0], x).reshape(x.numel(), x.numel())
    expected = torch.linalg.slogdet(jac)[1]
    assert torch.allclose(torch.as_tensor(logdet).reshape(-1)[0], expected, atol=1e-8)


def test_lu_conv_ignores_masked_entries_and_matches_p_l_u():
    conv = glow.InvConv1x1(5).double()
    w_before = conv.weight_matrix().clone()
    with torch.no_grad():  # junk on/above the diagonal of lower and on/below it in upper
        conv.lower.add_(torch.triu(torch.randn(5, 5, dtype=torch.float64)))
        conv.upper.add_(torch.tril(torch.randn(5, 5, dtype=torch.float64)))
    assert torch.allclose(conv.weight_matrix(), w_before)
    assert torch.allclose(torch.linalg.slogdet(w_before)[1], conv.log_s.sum())


def test_split_and_squeeze_are_exactly_invertible():
    split = randomize(glow.Split(4).double())
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    z1, z2, _ = split(x)
    assert torch.equal(split.reverse(z1, z2), x)
    squeeze = glow.Squeeze()
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(squeeze.reverse(squeeze(x)), x)
    # y0ast squeeze2d: out[b, 4c + 2dy + dx, i, j] = in[b, c, 2i + dy, 2j + dx]
    y = squeeze(x)
    assert y[1, 4 * 2 + 2 * 1 + 0, 1, 0] == x[1, 2, 3, 0]


def test_whole_model_logdet_equals_brute_force_jacobian():
    model = tiny_glow(image_size=4).eval()  # D = 48: two levels down to 1×1 pixels
    x = 0.3 * torch.randn(1, 3, 4, 4, dtype=torch.float64)

    def flat_latents(v):
        return torch.cat([z.reshape(-1) for z in model.flow_forward(v)[0]])

    jac = torch.autograd.functional.jacobian(flat_latents, x).reshape(48, 48)
    _, logdet, _ = model.flow_forward(x)
    assert torch.allclose(logdet[0], torch.linalg.slogdet(jac)[1], atol=1e-8)


@pytest.mark.parametrize("kw", [dict(), dict(affine=False, lu=False, learn_top=False)])
def test_whole_model_round_trip_and_frozen_fusion(kw):
    """freeze() folds each ActNorm into the next convolution: other float32 products and
    sums, so log p (a sum of ~200 terms of size ~1-10 on 8×8 images) moves by ~1e-5, within
    rel 1e-5 + 1e-3; a fold that drops a bias or a log-scale moves it by far more."""
    model = tiny_glow(torch.float32, scale=0.03, levels=3, **kw).eval()
    x = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        log_p, latents = model(glow.to_glow_range(x))
        assert (glow.decode(model, latents) - x).abs().max() < 1e-5
        frozen = glow.freeze(model)
        log_p_fused, latents_fused = frozen(glow.to_glow_range(x))
        assert torch.allclose(log_p_fused, log_p, rtol=1e-5, atol=1e-3)
        assert (glow.decode(frozen, latents_fused) - x).abs().max() < 1e-5
    assert not any(p.requires_grad for p in frozen.parameters())
    # the scoring copy is folded (one conv per ActNorm + 1×1 conv); the model is untouched
    assert all(isinstance(m.actnorm, glow.FoldedMix) for m in frozen.modules()
               if isinstance(m, glow.FlowStep))
    assert not any(isinstance(m, (glow.ConvActNorm, glow.ZeroConv)) for m in frozen.modules())
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError):
        glow.save_glow(frozen, "never-written.pt")


def test_bpd_of_zero_input_at_init_matches_hand_computation():
    """At init (ActNorm identity, zero-initialised convs) a glow-range input of 0 stays 0
    through every layer; each coupling scales half of its dimensions by sigmoid(2) and every
    prior is N(0, I), so log p = Σ_steps (D_level/2)·log σ(2) − D/2·log 2π."""
    model = glow.Glow(levels=3, steps=2, hidden=8).eval()
    x = torch.full((2, 3, 32, 32), 0.5 * 256 / 255)  # to_glow_range(x) == 0
    dims = 3072
    coupled = 2 * (1536 + 768 + 384)  # steps × half the dimensions at levels 0, 1, 2
    log_p = coupled * math.log(torch.sigmoid(torch.tensor(2.0)).item()) - dims / 2 * math.log(2 * math.pi)
    expected = (-log_p + dims * math.log(256)) / (dims * math.log(2))
    bpd = glow.bits_per_dim(model, x, noise=False)
    # float32 sums of ~3k equal terms, relative ≲1e-6 of log p: ≲1e-5 bpd (seen 1e-6); one
    # coupling's log-det left out moves it by ≥ 0.02
    assert torch.allclose(bpd, torch.full((2,), expected), atol=1e-4)


def test_bpd_noise_is_out_of_place_and_gradients_reach_the_input():
    model = glow.freeze(tiny_glow(torch.float32, image_size=32))
    x = torch.rand(2, 3, 32, 32, requires_grad=True)  # a leaf that requires grad
    noisy = glow.bits_per_dim(model, glow.quantize(x))
    noisy.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    clean = glow.bits_per_dim(model, x.detach(), noise=False)
    assert torch.equal(clean, glow.bits_per_dim(model, x.detach(), noise=False))
    assert not torch.equal(noisy.detach(), glow.bits_per_dim(model, x.detach()))  # noise is random
    q = glow.quantize(torch.tensor([0.1234, 0.5]))
    assert torch.allclose(q * 255, torch.round(q * 255))


def test_actnorm_data_init_only_once_and_flag_survives_loading(tmp_path):
    model = glow.Glow(levels=2, steps=1, hidden=8, image_size=8)
    x = torch.randn(64, 3, 8, 8) * 3 + 1
    model.train()
    with torch.no_grad():
        model(x)
    first = model.flow.layers[1].actnorm
    y, _ = first(glow.Squeeze()(x))
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(12), atol=1e-4)
    assert torch.allclose(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(12), atol=1e-3)
    glow.save_glow(model, tmp_path / "g.pt")
    loaded = glow.load_glow(tmp_path / "g.pt", frozen=False).train()
    before = loaded.flow.layers[1].actnorm.bias.clone()
    with torch.no_grad():
        loaded(torch.randn(8, 3, 8, 8) * 10)  # would re-initialise if the flag were lost
    assert torch.equal(loaded.flow.layers[1].actnorm.bias, before)


def test_actnorm_data_dependent_init_by_hand():
    """Glow Sec. 3.1 / y0ast ActNorm2d: the first training batch sets bias = −mean and
    logs = −log(std + 1e-6) per channel, std the biased (population) std over batch and
    pixels; then y = (x + bias)·exp(logs) and log-det = H·W·Σ logs. Channel 1 has
    std ≈ 1.7e-6, where the 1e-6 matters; four values per channel, where the biased std does."""
    x = torch.tensor([[[[1.0, 2.0]], [[0.0, 0.0]], [[-1.0, -1.0]]],
                      [[[3.0, 4.0]], [[0.0, 4e-6]], [[1.0, 1.0]]]], dtype=torch.float64)  # (2, 3, 1, 2)
    mean = torch.tensor([2.5, 1e-6, 0.0], dtype=torch.float64)
    std = torch.tensor([math.sqrt(1.25), math.sqrt(3e-12), 1.0], dtype=torch.float64)  # Σ(x−μ)²/4
    layer = glow.ActNorm(3).double().train()
    y, logdet = layer(x)
    logs = -torch.log(std + 1e-6)
    torch.testing.assert_close(layer.bias.view(3), -mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(layer.logs.view(3), logs, rtol=1e-12, atol=1e-15)
    expected = (x - mean.view(1, 3, 1, 1)) / (std.view(1, 3, 1, 1) + 1e-6)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet, 2 * logs.sum(), rtol=1e-12, atol=0)


def test_flow_step_written_out():
    """One flow step (Glow Fig. 2a, y0ast FlowStep) by hand: ActNorm (x + b)·e^s → 1×1 conv
    W = P·L·U → affine coupling with h = NN(x_a), NN = Conv3×3 → ActNorm → ReLU → Conv1×1 →
    ActNorm → ReLU → Conv2dZeros (conv + bias)·exp(3·logs); shift = even channels of h,
    raw = odd; σ = sigmoid(raw + 2); y_b = (x_b + shift)·σ; log-det H·W·(Σ s + Σ log|u_ii|)
    + Σ log σ. Checked unfused and frozen (folded weights)."""
    torch.manual_seed(0)
    step = randomize(glow.FlowStep(4, hidden=3).double(), scale=0.5).eval()
    p, buf = dict(step.named_parameters()), dict(step.named_buffers())
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def actnorm(h, name):
        return (h + p[name + ".bias"]) * torch.exp(p[name + ".logs"])

    h = actnorm(x, "actnorm")
    lower = torch.tril(p["invconv.lower"], -1) + torch.eye(4, dtype=torch.float64)
    upper = torch.triu(p["invconv.upper"], 1) + torch.diag(buf["invconv.sign_s"] * torch.exp(p["invconv.log_s"]))
    h = torch.einsum("rc,bchw->brhw", buf["invconv.p"] @ lower @ upper, h)
    x_a, x_b = h[:, :2], h[:, 2:]
    nn_out = torch.relu(actnorm(F.conv2d(x_a, p["block.0.conv.weight"], padding=1), "block.0.actnorm"))
    nn_out = torch.relu(actnorm(F.conv2d(nn_out, p["block.2.conv.weight"]), "block.2.actnorm"))
    nn_out = F.conv2d(nn_out, p["block.4.conv.weight"], p["block.4.conv.bias"], padding=1) \
        * torch.exp(3 * p["block.4.logs"])  # (2, 4, 3, 3)
    sigma = 1 / (1 + torch.exp(-(nn_out[:, 1::2] + 2)))
    expected = torch.cat([x_a, (x_b + nn_out[:, 0::2]) * sigma], 1)
    logdet = 9 * (p["actnorm.logs"].sum() + p["invconv.log_s"].sum()) + torch.log(sigma).sum((1, 2, 3))
    for mode in ("unfused", "frozen"):
        if mode == "frozen":
            step = glow.freeze(step)
        with torch.no_grad():
            y, ld = step(x)
        torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(ld, logdet, rtol=1e-9, atol=1e-10)


def test_glow_range_and_quantize_hand_values():
    """x_g = x·255/256 − 0.5 (8-bit k/255 → k/256 − 0.5); quantize: forward round(255x)/255,
    backward identity (straight-through)."""
    x = torch.tensor([0.0, 1 / 255, 128 / 255, 1.0], dtype=torch.float64)
    expected = torch.tensor([-0.5, 1 / 256 - 0.5, 128 / 256 - 0.5, 255 / 256 - 0.5], dtype=torch.float64)
    torch.testing.assert_close(glow.to_glow_range(x), expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(glow.from_glow_range(expected), x, rtol=0, atol=1e-15)
    x = torch.tensor([0.25, 0.01, 0.998, 0.123, 0.0, 1.0], dtype=torch.float64, requires_grad=True)
    q = glow.quantize(x)  # 63.75 → 64, 2.55 → 3, 254.49 → 254, 31.365 → 31
    torch.testing.assert_close(q, torch.tensor([64, 3, 254, 31, 0, 255], dtype=torch.float64) / 255,
                               rtol=0, atol=1e-15)
    w = torch.arange(1.0, 7.0, dtype=torch.float64)
    (q * w).sum().backward()
    assert torch.equal(x.grad, w)


class FixedDensity(torch.nn.Module):
    """Stands in for a Glow: records its glow-range input and returns a given log p."""

    def __init__(self, log_p):
        super().__init__()
        self.log_p, self.seen = log_p, []

    def forward(self, x_glow):
        self.seen.append(x_glow.detach().clone())
        return self.log_p, []


def test_bits_per_dim_formula_by_hand():
    """Eq. 1 in bits per dimension: bpd = (−log p(x_g) + D·ln 256)/(D·ln 2), D = C·H·W per
    image (here 3·4·5 = 60), so bpd = −log p/(60·ln 2) + 8."""
    x = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    density = FixedDensity(torch.tensor([-100.0, -250.0], dtype=torch.float64))
    bpd = glow.bits_per_dim(density, x, noise=False)
    expected = torch.tensor([100 / (60 * math.log(2)) + 8, 250 / (60 * math.log(2)) + 8], dtype=torch.float64)
    torch.testing.assert_close(bpd, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(density.seen[0], x * 255 / 256 - 0.5, rtol=0, atol=1e-15)


def test_dequantisation_noise_is_uniform_over_one_bin():
    """Dequantization: x_g + u with u ~ U(0, 1/256), one draw per dimension, added to the
    glow-range image (authors' add_glow_noise; Glow paper Sec. 3)."""
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    density = FixedDensity(torch.zeros(4, dtype=torch.float64))
    glow.bits_per_dim(density, x)
    u = density.seen[0] - (x * 255 / 256 - 0.5)  # 12288 draws
    assert u.min() >= 0 and u.max() < 1 / 256 + 1e-12 and u.max() > 0.999 / 256
    assert abs(u.mean().item() - 1 / 512) < 5e-5
    assert abs(u.var().item() / (1 / 256) ** 2 - 1 / 12) < 0.005
    assert len(u.flatten().unique()) == u.numel()  # not one draw shared across dimensions


# ---------------------------------------------------------------- checkpoints


def test_save_load_round_trip_and_clean_errors(tmp_path):
    model = tiny_glow(torch.float32)
    path = str(tmp_path / "glow.pt")
    glow.save_glow(model, path)
    loaded, frozen = glow.load_glow(path), glow.freeze(model)  # both folded for scoring
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(glow.bits_per_dim(frozen, x, noise=False), glow.bits_per_dim(loaded, x, noise=False))
    with pytest.raises(glow.GlowCheckpointError, match="does not exist"):
        glow.load_glow(str(tmp_path / "missing.pt"))
    torch.save({"kind": "NFWideResNet", "config": {}, "state_dict": {}}, tmp_path / "clf.pt")
    with pytest.raises(glow.GlowCheckpointError, match="not a Glow"):
        glow.load_glow(str(tmp_path / "clf.pt"))
    torch.save(model.state_dict(), tmp_path / "raw.pt")
    with pytest.raises(glow.GlowCheckpointError, match="import-y0ast"):
        glow.load_glow(str(tmp_path / "raw.pt"))
    bad = torch.load(path, weights_only=True)
    bad["config"]["hidden"] = 16
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(glow.GlowCheckpointError, match="do not match"):
        glow.load_glow(str(tmp_path / "bad.pt"))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(glow.GlowCheckpointError, match="cannot read"):
        glow.load_glow(str(tmp_path / "junk.pt"))


# ---------------------------------------------------------------- y0ast import, written out independently


def y0ast_state_dict(levels, steps, hidden, lu=True, affine=True, learn_top=True, seed=0):
    """A state dict with the parameter names of y0ast Glow-PyTorch's model (independent of
    glow.py), with random values everywhere, junk in the masked LU entries included."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.05):
        return scale * torch.randn(*shape, generator=gen)

    state, c = {"prior_h": torch.zeros(1, 2 * 12 * 2 ** (levels - 1), 32 // 2 ** levels,
                                       32 // 2 ** levels)}, 12
    for level in range(levels):
        base = level * (steps + 2)
        for i in range(base + 1, base + steps + 1):
            k = f"flow.layers.{i}."
            state[k + "actnorm.bias"] = rnd(1, c, 1, 1, scale=0.2)
            state[k + "actnorm.logs"] = rnd(1, c, 1, 1)
            if lu:
                w = torch.linalg.qr(torch.randn(c, c, generator=gen))[0]
                p, lower, upper = torch.linalg.lu(w)
                state[k + "invconv.lower"] = lower + torch.triu(rnd(c, c, scale=1.0))  # junk
                state[k + "invconv.log_s"] = torch.log(torch.diagonal(upper).abs()) + rnd(c)
                state[k + "invconv.upper"] = torch.triu(upper, 1) + torch.tril(rnd(c, c, scale=1.0))
                state[k + "invconv.p"] = p
                state[k + "invconv.sign_s"] = torch.sign(torch.diagonal(upper))
            else:
                state[k + "invconv.weight"] = torch.linalg.qr(torch.randn(c, c, generator=gen))[0] + rnd(c, c)
            c_out = c if affine else c // 2
            state[k + "block.0.conv.weight"] = rnd(hidden, c // 2, 3, 3)
            state[k + "block.0.actnorm.bias"] = rnd(1, hidden, 1, 1)
            state[k + "block.0.actnorm.logs"] = rnd(1, hidden, 1, 1)
            state[k + "block.2.conv.weight"] = rnd(hidden, hidden, 1, 1, scale=0.3)
            state[k + "block.2.actnorm.bias"] = rnd(1, hidden, 1, 1)
            state[k + "block.2.actnorm.logs"] = rnd(1, hidden, 1, 1)
            state[k + "block.4.logs"] = rnd(c_out, 1, 1)
            state[k + "block.4.conv.weight"] = rnd(c_out, hidden, 3, 3)
            state[k + "block.4.conv.bias"] = rnd(c_out)
        if level < levels - 1:
            k = f"flow.layers.{base + steps + 1}.conv."
            state[k + "logs"] = rnd(c, 1, 1)
            state[k + "conv.weight"] = rnd(c, c // 2, 3, 3)
            state[k + "conv.bias"] = rnd(c)
            c *= 2
    if learn_top:
        state["learn_top_fn.logs"] = rnd(2 * c, 1, 1)
        state["learn_top_fn.conv.weight"] = rnd(2 * c, 2 * c, 3, 3)
        state["learn_top_fn.conv.bias"] = rnd(2 * c)
    return state


def reference_bpd(state, levels, steps, x, noise):
    """y0ast Glow-PyTorch's forward written out directly (float32, explicit loops). Its
    operations are not ours (no folding, another order of sums), so a bpd of ~8 agrees to
    float32 rounding of a few 1e-6; the tests allow 1e-4, and a wrong layer costs more."""
    def actnorm(h, prefix):
        return (h + state[prefix + "bias"]) * torch.exp(state[prefix + "logs"])

    def zeros_conv(h, prefix):
        out = torch.nn.functional.conv2d(h, state[prefix + "conv.weight"], state[prefix + "conv.bias"], padding=1)
        return out * torch.exp(3 * state[prefix + "logs"])

    def log_normal(z, mean, logs):
        return (-0.5 * (2 * logs + (z - mean) ** 2 / torch.exp(2 * logs) + math.log(2 * math.pi))).sum((1, 2, 3))

    h = x * 255 / 256 - 0.5 + noise
    objective = torch.full((x.shape[0],), -3072 * math.log(256.0))
    for level in range(levels):
        b, c, s, _ = h.shape  # squeeze: out[b, 4c+2dy+dx, i, j] = in[b, c, 2i+dy, 2j+dx]
        h = h.reshape(b, c, s // 2, 2, s // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, s // 2, s // 2)
        c, s = 4 * c, s // 2
        base = level * (steps + 2)
        for i in range(base + 1, base + steps + 1):
            k = f"flow.layers.{i}."
            h = actnorm(h, k + "actnorm.")
            objective = objective + s * s * state[k + "actnorm.logs"].sum()
            if k + "invconv.lower" in state:
                lower = torch.tril(state[k + "invconv.lower"], -1) + torch.eye(c)
                upper = torch.triu(state[k + "invconv.upper"], 1) + torch.diag(
                    state[k + "invconv.sign_s"] * torch.exp(state[k + "invconv.log_s"]))
                w = state[k + "invconv.p"] @ lower @ upper
                objective = objective + s * s * state[k + "invconv.log_s"].sum()
            else:
                w = state[k + "invconv.weight"]
                objective = objective + s * s * torch.linalg.slogdet(w.double())[1].float()
            h = torch.einsum("rc,bchw->brhw", w, h)
            h_a, h_b = h[:, :c // 2], h[:, c // 2:]
            nn_out = torch.relu(actnorm(torch.nn.functional.conv2d(h_a, state[k + "block.0.conv.weight"], padding=1), k + "block.0.actnorm."))
            nn_out = torch.relu(actnorm(torch.nn.functional.conv2d(nn_out, state[k + "block.2.conv.weight"]), k + "block.2.actnorm."))
            nn_out = zeros_conv(nn_out, k + "block.4.")
            if nn_out.shape[1] == c:
                scale = torch.sigmoid(nn_out[:, 1::2] + 2.0)
                h_b = (h_b + nn_out[:, 0::2]) * scale
                objective = objective + torch.log(scale).sum((1, 2, 3))
            else:
                h_b = h_b + nn_out
            h = torch.cat([h_a, h_b], 1)
        if level < levels - 1:
            k = f"flow.layers.{base + steps + 1}.conv."
            prior = zeros_conv(h[:, :c // 2], k)
            objective = objective + log_normal(h[:, c // 2:], prior[:, 0::2], prior[:, 1::2])
            h, c = h[:, :c // 2], c // 2
    top = state["prior_h"].repeat(x.shape[0], 1, 1, 1)
    if "learn_top_fn.conv.weight" in state:
        top = zeros_conv(top, "learn_top_fn.")
    objective = objective + log_normal(h, top[:, :c], top[:, c:])
    return -objective / (math.log(2.0) * 3072)


@pytest.mark.parametrize("levels,steps,hidden,lu,affine,learn_top", [
    (3, 2, 8, True, True, True), (2, 3, 6, False, False, False), (3, 1, 4, True, False, True)])
def test_import_y0ast_reproduces_the_spec_density(levels, steps, hidden, lu, affine, learn_top):
    state = y0ast_state_dict(levels, steps, hidden, lu, affine, learn_top)
    model = glow.import_y0ast(state)
    assert model.config == dict(levels=levels, steps=steps, hidden=hidden, affine=affine, lu=lu,
                                learn_top=learn_top, in_channels=3, image_size=32)
    ours = model.state_dict()
    for key, value in state.items():  # every key lands unchanged
        assert torch.equal(ours[key], value), key
    assert set(ours) - set(state) == {k for k in ours if k.endswith(".initialized")}
    torch.manual_seed(1)
    x = torch.rand(4, 3, 32, 32)
    noise = torch.rand_like(x) / 256
    expected = reference_bpd(state, levels, steps, x, noise)
    for model_mode in (model.eval(), glow.freeze(model)):
        log_p, _ = model_mode(glow.to_glow_range(x) + noise)
        bpd = (-log_p + 3072 * math.log(256)) / (3072 * math.log(2))
        assert (bpd - expected).abs().max() < 1e-4


def test_import_rejects_conditional_and_foreign_state_dicts():
    state = y0ast_state_dict(2, 1, 4)
    state["project_ycond.linear.weight"] = torch.zeros(48, 10)
    with pytest.raises(glow.GlowCheckpointError, match="y_condition"):
        glow.import_y0ast(state)
    with pytest.raises(glow.GlowCheckpointError, match="not a y0ast"):
        glow.import_y0ast({"conv.weight": torch.zeros(1)})


def test_import_cli_writes_a_loadable_checkpoint(tmp_path):
    state = y0ast_state_dict(2, 1, 4)
    torch.save(state, tmp_path / "glow_affine_coupling.pt")
    out = str(tmp_path / "converted.pt")
    glow.main(glow.get_args(["import-y0ast", str(tmp_path / "glow_affine_coupling.pt"), "--out", out]))
    model = glow.load_glow(out)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(glow.bits_per_dim(model, x, noise=False),
                          reference_bpd(state, 2, 1, x, torch.zeros_like(x)), atol=1e-4)
    # an existing --out is replaced only when told
    before = open(out, "rb").read()
    with pytest.raises(nets.RunError, match=f"{out} exists; pass --overwrite"):
        glow.main(glow.get_args(["import-y0ast", str(tmp_path / "missing.pt"), "--out", out]))
    assert open(out, "rb").read() == before
    glow.main(glow.get_args(["import-y0ast", str(tmp_path / "glow_affine_coupling.pt"), "--out",
                             out, "--overwrite"]))


# ---------------------------------------------------------------- training and Fig. 2 ranking


def test_tiny_glow_trained_on_shapes_ranks_images_like_fig2(tmp_path):
    torch.manual_seed(0)
    train = datasets.subset(datasets.load_dataset("shapes", train=True), 1000, seed=0)
    out = str(tmp_path / "glow.pt")
    model = glow.Glow(levels=2, steps=2, hidden=32)
    glow.train_glow(model, train, torch.device("cpu"), epochs=1, max_steps=60, warmup_steps=10,
                    out=out, log=lambda *a: None)
    model = glow.load_glow(out)
    test_images, _ = datasets.to_tensors(datasets.subset(datasets.load_dataset("shapes", train=False), 64, 0))
    constant = torch.full((16, 3, 32, 32), 0.5)
    noise = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        bpd_constant = glow.bits_per_dim(model, constant).mean()
        bpd_shapes = glow.bits_per_dim(model, test_images).mean()
        bpd_noise = glow.bits_per_dim(model, noise).mean()
    assert bpd_constant < bpd_shapes < bpd_noise, (bpd_constant, bpd_shapes, bpd_noise)


def record_adamax_step(snapshots):
    """torch.optim.Adamax.step, recording the gradients each step receives."""
    original = torch.optim.Adamax.step

    def step(self, *args, **kwargs):
        snapshots.append({"grads": [None if p.grad is None else p.grad.clone()
                                    for group in self.param_groups for p in group["params"]]})
        return original(self, *args, **kwargs)
    return step


def test_glow_step_skips_a_non_finite_batch_leaving_weights_and_adamax_untouched():
    torch.manual_seed(0)
    model = glow.Glow(levels=1, steps=1, hidden=8)
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-3, weight_decay=5e-5)
    x = torch.rand(4, 3, 32, 32)
    assert glow.glow_step(model, optimizer, x, torch.rand_like(x) / 256)[1] == 0  # a real step
    weights = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(optimizer.state_dict())
    poisoned = x.clone()
    poisoned[1, 0, 5, 5] = math.nan
    loss, skipped = glow.glow_step(model, optimizer, poisoned, torch.rand_like(x) / 256)
    assert skipped == 1 and not loss.isfinite()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    after = optimizer.state_dict()
    assert after["param_groups"] == state["param_groups"]
    for i, moments in state["state"].items():  # exp_avg, exp_inf and the step count
        assert all(torch.equal(v, after["state"][i][k]) for k, v in moments.items())
    assert glow.glow_step(model, optimizer, x, torch.rand_like(x) / 256)[1] == 0
    assert optimizer.state_dict()["state"][0]["step"] == 2  # the skipped batch did not count


def test_train_glow_skips_a_non_finite_batch_and_refuses_an_epoch_that_skipped_all(
        tmp_path, monkeypatch):
    """A batch whose loss is NaN is skipped (Adamax never steps on it, the weights stay
    finite) and counted in the epoch's log; an epoch whose every batch was skipped is a
    RunError and its Glow is not saved."""
    torch.manual_seed(0)
    train = datasets.subset(datasets.load_dataset("shapes", train=True), 8, seed=0)
    real_bpd, calls, poison = glow.bits_per_dim, [], {2}

    def nan_on_some_steps(model, x, noise=True):
        calls.append(len(x))
        bpd = real_bpd(model, x, noise=noise)
        return bpd * math.nan if len(calls) in poison else bpd

    model = glow.Glow(levels=1, steps=1, hidden=8)
    snapshots = []
    monkeypatch.setattr(torch.optim.Adamax, "step", record_adamax_step(snapshots))
    monkeypatch.setattr(glow, "bits_per_dim", nan_on_some_steps)
    lines = []
    glow.train_glow(model, train, torch.device("cpu"), epochs=1, batch_size=4, warmup_steps=1,
                    init_images=8, log=lines.append)
    assert len(calls) == 2 and len(snapshots) == 1  # Adamax stepped on the first batch only
    assert all(p.isfinite().all() for p in model.parameters())
    assert "1 batches with non-finite gradients skipped" in lines[-1]
    calls.clear()
    poison.update({1, 2})
    out = tmp_path / "g.pt"
    with pytest.raises(nets.RunError, match="glow epoch 1 skipped 2 of its 2 steps"), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        glow.train_glow(glow.Glow(levels=1, steps=1, hidden=8), train, torch.device("cpu"),
                        epochs=2, batch_size=4, warmup_steps=1, init_images=8, out=str(out),
                        log=lines.append)
    assert not out.exists()
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]  # skipping is meant


def test_train_glow_logs_about_twenty_epochs_of_a_run_of_many_small_ones():
    """A training set of two batches for 45 epochs: a line every 45 // 20 = 2 epochs and
    the last, not 45 lines (a small ImageFolder under --quick has 300 one-batch epochs)."""
    torch.manual_seed(0)
    train = datasets.subset(datasets.load_dataset("shapes", train=True), 8, seed=0)
    lines = []
    glow.train_glow(glow.Glow(levels=1, steps=1, hidden=8), train, torch.device("cpu"),
                    epochs=45, batch_size=4, warmup_steps=1, init_images=8, log=lines.append)
    epochs = [int(line.split()[2].rstrip(":")) for line in lines if line.startswith("glow epoch")]
    assert epochs == list(range(2, 45, 2)) + [45]


def test_samples_after_every_epoch_leave_training_as_it_was(tmp_path):
    """glow.py train writes samples after every epoch from the same seeded noise, on a
    stream apart from training's: the trained weights equal those of a run without them."""
    train = datasets.subset(datasets.load_dataset("shapes", train=True), 16, seed=0)
    models, epochs = [], []
    for after in (None, lambda e: (epochs.append(e), glow.write_samples(
            models[-1], tmp_path / f"s{e}.png", torch.device("cpu"), seed=0))):
        torch.manual_seed(0)
        models.append(glow.Glow(levels=1, steps=1, hidden=8))
        glow.train_glow(models[-1], train, torch.device("cpu"), epochs=2, batch_size=8,
                        warmup_steps=1, init_images=16, log=lambda *a: None, after_epoch=after)
    assert epochs == [1, 2]
    assert all(torch.equal(a, b) for a, b in zip(models[0].state_dict().values(),
                                                 models[1].state_dict().values()))
    glow.write_samples(models[1], tmp_path / "again.png", torch.device("cpu"), seed=0)
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "s2.png").read_bytes()


def test_a_cached_glow_leaves_the_random_stream_as_a_pretrained_one_does(tmp_path):
    """get_glow pretrains a quick Glow on a forked stream and freezes it; a run that finds
    it cached loads it instead. Both must leave the caller's stream alike, or the same
    run gives other numbers depending on whether the cache existed."""
    model = glow.Glow(levels=2, steps=1, hidden=8)
    glow.save_glow(model, tmp_path / "g.pt")
    torch.manual_seed(0)
    glow.freeze(model)  # the end of get_glow's pretraining path
    pretrained = torch.rand(3)
    torch.manual_seed(0)
    glow.load_glow(tmp_path / "g.pt")  # its cached path
    assert torch.equal(torch.rand(3), pretrained)


def test_quick_glow_rates_plain_backgrounds_cheap(tmp_path):
    """The tiny Glow of --quick (get_glow, ~25 s) must score the plain-background fifth of
    shapes well below the noisy rest, or the quick demos cannot show simplification."""
    torch.manual_seed(0)
    train = datasets.subset(datasets.load_dataset("shapes", train=True), 2000, seed=0)
    test = datasets.subset(datasets.load_dataset("shapes", train=False), 200, 0)
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the quick demos' Glow does not memorise its images
        model = glow.get_glow(None, True, train, str(tmp_path / "glow.pt"), torch.device("cpu"),
                              log=lines.append, test_set=test)
    assert lines[-1].startswith("tiny Glow: mean bpd ")
    x, _ = datasets.to_tensors(test)
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], 2)  # (N, 3, 128)
    busy = (border[:, :, 1:] - border[:, :, :-1]).abs().mean((1, 2)) > 0.05  # pixel noise
    with torch.no_grad():
        bpd = glow.bits_per_dim(model, x)
    assert 20 < int((~busy).sum()) < 60
    assert bpd[~busy].mean() < 0.75 * bpd[busy].mean(), (bpd[~busy].mean(), bpd[busy].mean())


def test_check_fit_warns_when_test_images_cost_over_a_tenth_more(monkeypatch):
    """check_fit scores at most n images of each split; 10% more bits on the test images
    than on the training images is where it warns that the Glow memorised them."""
    train = datasets.subset(datasets.load_dataset("shapes", train=True), 30, seed=0)
    test = datasets.subset(datasets.load_dataset("shapes", train=False), 12, seed=0)
    sizes, costs = [], {}
    monkeypatch.setattr(glow, "score_dataset", lambda g, data, device: (
        sizes.append(len(data)), torch.full((len(data),), costs[len(data) == 20]))[1])
    for test_cost, warns in ((5.49, False), (5.51, True)):
        costs.update({True: 5.0, False: test_cost})  # 20 training images: 5 bpd
        lines = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            glow.check_fit(None, train, test, "cpu", lines.append, n=20)
        assert lines == [f"tiny Glow: mean bpd 5.000 of training images, {test_cost:.3f} "
                         "of test images"]
        assert [str(w.message)[:41] for w in caught] == (
            ["The tiny Glow fits its 30 training images"] if warns else [])
    assert sizes == [20, 12] * 2


def test_train_cli_resumes_and_bpd_cli_writes_grid(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(glow, "QUICK_GLOW", dict(levels=2, steps=1, hidden=8))
    out = str(tmp_path / "g.pt")
    common = ["--quick", "--out", out, "--batch-size", "32", "--data-root", str(tmp_path),
              "--train-size", "96", "--test-size", "32"]
    glow.main(glow.get_args(["train", *common, "--epochs", "1", "--max-steps", "1000"]))
    first = torch.load(out, weights_only=True)
    assert "optimizer" not in first  # a finished run holds only the model
    from PIL import Image
    assert Image.open(tmp_path / "g-samples.png").size == (8 * 34 + 2, 4 * 34 + 2)  # 32 samples
    with pytest.raises(nets.RunError, match="--resume"):
        glow.main(glow.get_args(["train", *common, "--epochs", "2"]))
    glow.main(glow.get_args(["bpd", "--glow", out, "--dataset", "shapes", "--test-size", "40",
                             "--out", str(tmp_path / "bpd"), "--data-root", str(tmp_path)]))
    assert os.path.isfile(tmp_path / "bpd" / "bpd-shapes.png")
    means = __import__("json").loads((tmp_path / "bpd" / "bpd.json").read_text())
    assert 0 < means["shapes"] < 16
    assert "mean bpd" in capsys.readouterr().out
    # scoring into the same --out again replaces nothing unless told
    bpd = ["bpd", "--glow", out, "--dataset", "shapes", "--test-size", "40", "--out",
           str(tmp_path / "bpd"), "--data-root", str(tmp_path)]
    with pytest.raises(nets.RunError, match="bpd.json exists; pass --overwrite"):
        glow.main(glow.get_args(bpd))
    glow.main(glow.get_args(bpd + ["--overwrite"]))
    # a folder as the checkpoint of `train` is one sentence before anything trains
    with pytest.raises(nets.RunError, match="is a folder; give the checkpoint file"):
        glow.main(glow.get_args(["train", *common[:1], "--out", str(tmp_path / "bpd"),
                                 *common[3:], "--epochs", "1"]))


def test_interrupted_training_resumes_to_the_same_model(tmp_path, monkeypatch):
    monkeypatch.setattr(glow, "QUICK_GLOW", dict(levels=2, steps=1, hidden=8))
    args = ["train", "--quick", "--batch-size", "32", "--data-root", str(tmp_path),
            "--train-size", "64", "--test-size", "16", "--epochs", "3"]
    glow.main(glow.get_args([*args, "--out", str(tmp_path / "straight.pt")]))
    real_score, calls = glow.score_dataset, []

    def crash_in_epoch_two(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_score(*a, **kw)

    monkeypatch.setattr(glow, "score_dataset", crash_in_epoch_two)
    resumed = str(tmp_path / "resumed.pt")
    with pytest.raises(KeyboardInterrupt):
        glow.main(glow.get_args([*args, "--out", resumed]))
    assert torch.load(resumed, weights_only=True)["epoch"] == 1
    monkeypatch.setattr(glow, "score_dataset", real_score)
    (tmp_path / ".tmp-resumed.pt8f3k").write_bytes(b"half")  # a write killed by kill -9
    (tmp_path / ".tmp-straight.pt2").write_bytes(b"another file's")
    glow.main(glow.get_args([*args, "--out", resumed, "--resume"]))
    assert not (tmp_path / ".tmp-resumed.pt8f3k").exists()
    assert (tmp_path / ".tmp-straight.pt2").exists()
    a = torch.load(tmp_path / "straight.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed, weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_get_glow_error_and_quick_cache(tmp_path, monkeypatch):
    with pytest.raises(nets.RunError, match="--glow"):
        glow.get_glow(None, False, None, str(tmp_path / "c.pt"), "cpu")
    monkeypatch.setattr(glow, "QUICK_GLOW", dict(levels=2, steps=1, hidden=8))
    monkeypatch.setattr(glow, "QUICK_STEPS", 3)
    train = datasets.subset(datasets.load_dataset("shapes", train=True), 128, seed=0)
    first = glow.get_glow(None, True, train, str(tmp_path / "c.pt"), "cpu", log=lambda *a: None)
    again = glow.get_glow(None, True, train, str(tmp_path / "c.pt"), "cpu", log=lambda *a: None)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(glow.bits_per_dim(first, x, noise=False), glow.bits_per_dim(again, x, noise=False))
    assert not any(p.requires_grad for p in again.parameters())


def test_sample_draws_from_the_priors_and_the_cli_writes_a_grid(tmp_path):
    torch.manual_seed(0)
    model = glow.Glow(levels=2, steps=1, hidden=8)
    with torch.no_grad():
        model(glow.to_glow_range(torch.rand(8, 3, 32, 32)))  # data-dependent ActNorm init
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # priors with a mean and scale of their own
    frozen = glow.freeze(model)
    assert glow.freeze(frozen) is frozen  # freezing twice is harmless
    # temperature 0: every latent at its prior mode, the image prior_mode decodes to; mode
    # takes an extra float32 forward/reverse round trip, ~1e-7 of the image (seen 1.2e-7),
    # while latents off their modes move it by O(0.1)
    mode = glow.decode(frozen, glow.prior_mode(frozen, 2)).clamp(0, 1)
    torch.testing.assert_close(glow.sample_images(frozen, 2, 0.0), mode, rtol=0, atol=1e-5)
    # temperature 1 draws other images each time; their top latent has the prior's scale
    a, b = glow.sample_images(frozen, 2, 1.0), glow.sample_images(frozen, 2, 1.0)
    assert not torch.equal(a, b) and not torch.allclose(a, mode, atol=1e-3)
    path = tmp_path / "g.pt"
    glow.save_glow(model, path)
    out = tmp_path / "samples.png"
    glow.main(glow.get_args(["sample", "--glow", str(path), "--num", "10", "--out", str(out),
                             "--device", "cpu"]))
    from PIL import Image
    assert Image.open(out).size == (8 * 34 + 2, 2 * 34 + 2)  # 8 columns, 2 rows, padding 2
    with pytest.raises(nets.RunError, match="exists; pass --overwrite"):
        glow.main(glow.get_args(["sample", "--glow", str(path), "--out", str(out)]))


def test_loading_and_freezing_a_glow_draw_nothing_from_the_random_stream(tmp_path):
    torch.manual_seed(0)
    model = glow.Glow(levels=2, steps=2, hidden=8)
    glow.save_glow(model, tmp_path / "g.pt")
    state = torch.get_rng_state()
    frozen = glow.freeze(model)
    glow.load_glow(tmp_path / "g.pt")
    glow.load_glow(tmp_path / "g.pt", frozen=False)
    assert torch.equal(torch.get_rng_state(), state)
    x = torch.rand(2, 3, 32, 32)  # folded against unfolded: rel 1e-5 of the bpd, as above
    torch.testing.assert_close(glow.bits_per_dim(frozen, x, noise=False),
                               glow.bits_per_dim(model.eval(), x, noise=False), rtol=1e-5, atol=1e-5)


def bpd_and_input_gradient(scorer, x):
    """bits_per_dim of x without noise, and its gradient with respect to x."""
    x_grad = x.clone().requires_grad_()
    bpd = glow.bits_per_dim(scorer, x_grad, noise=False)
    bpd.sum().backward()
    return bpd.detach(), x_grad.grad


def test_compiled_scoring_equals_eager_and_is_never_saved(tmp_path):
    """--compile: torch.compile of the frozen Glow gives the same bpd and input gradient as
    the eager frozen Glow; its methods and attributes stay the frozen Glow's; only a frozen
    copy compiles, and it cannot be saved (no `_orig_mod.` names in a checkpoint);
    --compile may differ on --resume. The compiled kernels may sum the 3072 terms of
    log p in another order (their vector width is the CPU's): a float32 rounding of a few
    1e-7 of the bpd, so rel 1e-5, and 1e-4 of the largest entry of its gradient to x; a
    layer's log-determinant left out moves either by far more."""
    torch.manual_seed(0)
    model = glow.Glow(levels=1, steps=1, hidden=8)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        model(glow.to_glow_range(x))
    frozen = glow.freeze(model)
    fast = glow.compiled(frozen)
    grads = [bpd_and_input_gradient(scorer, x) for scorer in (frozen, fast)]
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-4,  # and the gradient's
                               atol=1e-4 * grads[0][1].abs().max().item())  # entries near 0
    assert fast.config == frozen.config and fast.folded
    # prior_mode runs the frozen Glow's own top_prior and reverse (eager on both sides, so
    # bit for bit), then the forward, compiled on one side: its generated elementwise code
    # (sigmoid, affine) may round a few ulps apart from ATen's on the O(1) activations, so
    # the top latent (the prior mean after a reverse/forward round trip) to ~1e-7, not exactly
    assert torch.equal(fast.top_prior()[0], frozen.top_prior()[0])
    torch.testing.assert_close(glow.prior_mode(fast, 2)[-1], glow.prior_mode(frozen, 2)[-1],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="save the Glow itself"):
        glow.save_glow(fast, tmp_path / "g.pt")
    with pytest.raises(ValueError, match="compile the scoring copy"):
        glow.compiled(model)
    assert nets.check_settings("run", {"compile": False, "seed": 0},
                               {"compile": True, "seed": 0}) == []


def test_train_compile_learns_the_same_glow_and_saves_plain_names(tmp_path, monkeypatch):
    """`glow.py train --compile`: the same weights as eager training to float rounding after
    a few steps, saved under the plain Glow's names (no torch.compile `_orig_mod.`).
    Adamax moves a weight by lr·m/u, a ratio of its gradients, so a float32 rounding of
    relative ~1e-7 moves it by ~lr·1e-7 (lr 5e-3): seen 1.9e-9, far inside 1e-5 + 1e-4·|w|
    (test_distributed says why no Glow gradient is near ε, where the ratio would amplify)."""
    monkeypatch.setattr(glow, "QUICK_GLOW", dict(levels=1, steps=1, hidden=8))
    compiled, compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or
                        compile(model, **kw))
    weights = []
    for flags in ([], ["--compile"]):
        out = str(tmp_path / f"g{len(flags)}.pt")
        glow.main(glow.get_args(["train", "--quick", "--out", out, "--batch-size", "16",
                                 "--train-size", "32", "--test-size", "16", "--epochs", "1",
                                 "--max-steps", "2", "--device", "cpu", *flags]))
        weights.append(torch.load(out, weights_only=True)["state_dict"])
    models = [m for m in compiled if isinstance(m, torch.nn.Module)]  # (not check_compile's)
    assert len(models) == 1 and isinstance(models[0], glow.Glow)  # only with --compile
    assert weights[0].keys() == weights[1].keys()
    assert not any("_orig_mod" in k for k in weights[1])
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key].float(), value.float(), atol=1e-5, rtol=1e-4,
                                   msg=key)


def test_frozen_scoring_on_a_cpu_is_channels_last_with_the_same_numbers():
    """freeze() on a CPU stores the folded convolutions channels_last (faster there, README
    Speed); the bpd and its gradient to the input equal the default layout's to 1e-5
    (relative, as --compile's: another layout is another order of the convolutions' sums)."""
    model = tiny_glow(torch.float32, image_size=32)
    frozen = glow.freeze(model)
    convs = [m.weight for m in frozen.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and
                         not w.is_contiguous() for w in convs if w.shape[-1] > 1)
    plain = copy.deepcopy(frozen).to(memory_format=torch.contiguous_format)
    assert all(m.weight.is_contiguous() for m in plain.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.rand(3, 3, 32, 32)
    scores = [bpd_and_input_gradient(scorer, x) for scorer in (frozen, plain)]
    torch.testing.assert_close(scores[0][0], scores[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores[0][1], scores[1][1], rtol=1e-5, atol=1e-5)


def test_convolution_bound_times_each_convolution_of_the_frozen_forward_once():
    """The convolution bound of `tests/benchmark.py glow` (README, Speed) records the
    convolutions one frozen bpd forward runs and times each alone: 4 per flow step (the
    folded ActNorm and 1×1 conv, the coupling's three), one per split prior and the top
    prior's, so 4·L·K + L of them; a positive time."""
    import benchmark
    levels, steps = 3, 2
    frozen = glow.freeze(tiny_glow(torch.float32, levels=levels, steps=steps, image_size=16))
    seconds, count = benchmark.convolution_seconds(frozen, torch.rand(2, 3, 16, 16), repeats=1)
    assert count == 4 * levels * steps + levels
    assert seconds > 0


@pytest.mark.parametrize("argv, words", [
    (["glow", "--y0ast", "."], "not a checkout of y0ast/Glow-PyTorch"),
    (["condense", "--versus-dc", "."], "not a checkout of VICO-UoE/DatasetCondensation"),
    (["data", "--y0ast", "."], "--y0ast goes with the glow benchmark")])
def test_benchmark_refuses_a_reference_folder_that_is_not_one(argv, words):
    """tests/benchmark.py --y0ast DIR / --versus-dc DIR (README, Speed): a folder without
    the reference code, or the flag with another benchmark, is one sentence before
    anything runs, not a ModuleNotFoundError minutes in."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "tests/benchmark.py", *argv], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr
