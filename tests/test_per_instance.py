"""Tests of per_instance.py against computations written here from the paper (Sec. 3,
Eq. 2-5, Supplement S3, S5, S7) and the authors' code, never against the module itself:

* the unrolled train_step of Eq. 3 against a deep copy of f stepped by a real
  torch.optim.AdamW, every loss term recomputed from scratch, and its gradient w.r.t.
  X_sim against finite differences of that independent pipeline;
* Eq. 4 (S3), the S3 weights and Eq. 5 by hand on four examples with known logits;
* the training protocol of Sec. 3 (simplifier first, then the classifier on the NEW
  simplified batch with the SAME augmentation), recorded with hooks;
* the optimizers, the augmentation (against a per-example loop), the S7 baselines and
  the S5 PNG sizes against PIL, retraining (Fig. 5), and CPU smoke runs of the script.
"""
import argparse
import copy
import dataclasses
import io
import json
import math
import runpy
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import datasets
import glow
import nets
import per_instance as pi

# The constants below are written out on purpose (not read from per_instance), so that a
# changed constant there fails here.
PAD = 4  # random crop from a 4-pixel zero-padded image (authors' kornia RandomCrop)
ADAMW_BETAS, ADAMW_EPS, ADAMW_WD = (0.9, 0.995), 1e-8, 1e-5  # authors' classifier AdamW
GLOW = object()  # stands for the Glow model where bits_per_dim is replaced by a fake


# ------------------------------------------------------------------------- references
def loop_augment(x, shifts, flips):
    """Reference augmentation, one example at a time: zero-pad by 4, crop at (row, col)
    offsets, then flip horizontally (kornia RandomCrop → RandomHorizontalFlip)."""
    out = []
    for img, (r, c), f in zip(x, shifts.tolist(), flips.tolist()):
        channels, h, w = img.shape
        padded = img.new_zeros(channels, h + 2 * PAD, w + 2 * PAD)
        padded[:, PAD:PAD + h, PAD:PAD + w] = img
        crop = padded[:, r:r + h, c:c + w]
        out.append(crop.flip(-1) if f else crop)
    return torch.stack(out)


def quantize_ref(x):
    """8-bit levels (Eq. 2 output as the classifier and Glow see it)."""
    return torch.round(x * 255) / 255


def copy_with_adamw(model, optimizer):
    """A deep copy of `model` and a real torch.optim.AdamW over the copy with the same
    parameter groups, hyper-parameters, fused setting and moment state (exp_avg,
    exp_avg_sq, step)."""
    clone = copy.deepcopy(model)
    name_of = {id(p): n for n, p in model.named_parameters()}
    params = dict(clone.named_parameters())
    groups = [dict(params=[params[name_of[id(p)]] for p in g["params"]], lr=g["lr"],
                   betas=g["betas"], eps=g["eps"], weight_decay=g["weight_decay"])
              for g in optimizer.param_groups]
    clone_opt = torch.optim.AdamW(groups, fused=optimizer.defaults.get("fused"))
    clone_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # no shared moments
    return clone, clone_opt


def reference_loss(classifier, optimizer, x, x_sim, y, aug, lam, bpd_fn=None, weight=None):
    """Eq. 2-5 with the S3 changes, from scratch: f' is a deep copy of f after ONE real
    torch.optim.AdamW step on l(f(X̃_sim), y). `weight` fixes the S3 weights (they are
    not differentiated, so finite differences must hold them fixed)."""
    x_aug, sim_aug = loop_augment(x, *aug), loop_augment(x_sim.detach(), *aug)
    f, opt = copy_with_adamw(classifier, optimizer)
    loss_f_sim = F.cross_entropy(f(sim_aug), y)  # l(f(X̃_sim))
    opt.zero_grad()
    loss_f_sim.backward()
    opt.step()  # Eq. 3: f' = train_step(f, l(f(X̃_sim), y))
    with torch.no_grad():
        loss_fp_sim = F.cross_entropy(f(sim_aug), y)  # l(f'(X̃_sim))
        l_i = F.cross_entropy(f(x_aug), y, reduction="none")  # l_i(f'(X̃_orig))
        w = (1 - l_i / 0.1).clamp(min=0) if weight is None else weight  # S3, τ = 0.1
        bpd = bpd_fn(x_sim.detach()) if lam > 0 else torch.zeros(len(x), dtype=x.dtype)
        loss_cls = 10 * l_i.mean() + loss_f_sim.detach() + loss_fp_sim  # Eq. S3
        loss_sim = (w * bpd).sum() / len(x)  # mean over the batch, zero weights included
        loss = (loss_cls + lam * loss_sim) / (12 + lam)  # Eq. 5, weights 10+1+1+λ
    parts = dict(loss=loss, loss_f_sim=loss_f_sim.detach(), loss_fp_sim=loss_fp_sim,
                 loss_fp_orig=l_i.mean(), bpd=bpd.mean(), sim_weight=w.mean())
    return loss, parts, w


def fake_bpd(x):
    """A smooth stand-in for Glow's bpd (Eq. 1): one value per image, nonlinear in x."""
    flat = x.flatten(1)
    return 3 + 20 * ((flat - 0.4) ** 2).mean(1) + torch.sin(5 * flat).mean(1)


def patch_bpd(monkeypatch, fn=fake_bpd):
    """Replace glow.bits_per_dim by fn and record each call's (glow_model, input)."""
    calls = []

    def bits_per_dim(glow_model, x, *args, **kwargs):
        calls.append((glow_model, x))
        return fn(x)
    monkeypatch.setattr(glow, "bits_per_dim", bits_per_dim)
    return calls


def forbid_bpd(monkeypatch):
    def bits_per_dim(*args, **kwargs):
        raise AssertionError("Glow must not be called when λ = 0")
    monkeypatch.setattr(glow, "bits_per_dim", bits_per_dim)


def spy_augmentation(monkeypatch):
    """Record every (crop offsets, flips) that nets.sample_crop_flip draws."""
    drawn, real = [], nets.sample_crop_flip

    def sample(*args, **kwargs):
        aug = real(*args, **kwargs)
        drawn.append(aug)
        return aug
    monkeypatch.setattr(nets, "sample_crop_flip", sample)
    return drawn


def tiny_classifier(num_classes=3):
    """A small conv net without dropout (deterministic): weights and biases, 8×8 inputs."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ELU(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, num_classes))


def real_steps(model, optimizer, x, y, n):
    for _ in range(n):  # gives the optimizer a non-trivial moment state and step count
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


# crop offsets in [0, 8] incl. both extremes, and flips, for batches of six
AUG6 = (torch.tensor([[4, 4], [0, 8], [8, 0], [2, 5], [6, 3], [4, 4]]),
        torch.tensor([False, True, False, True, True, False]))


def meta_setup(previous_steps):
    """float64 f fitted on X̃ until some examples are below S3's loss threshold 0.1 and
    some above, an AdamW of nets.classifier_optimizer after `previous_steps` real steps, X_sim ≠ X."""
    torch.manual_seed(0)
    classifier = tiny_classifier().double()
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64) * 0.8 + 0.1
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    real_steps(classifier, nets.classifier_optimizer(classifier, lr=0.03), loop_augment(x, *AUG6), y, 12)
    x_sim = (x + 0.05 * torch.randn_like(x)).clamp(0.01, 0.99)
    optimizer = nets.classifier_optimizer(classifier, lr=0.01)
    real_steps(classifier, optimizer, loop_augment(x_sim, *AUG6), y, previous_steps)
    return classifier, optimizer, x, x_sim, y


# ------------------------------------------------------------------------- augmentation
def test_sample_augmentation_offsets_and_flips():
    torch.manual_seed(0)
    shifts, flips = nets.sample_crop_flip(4000, 4, True, "cpu")
    assert shifts.shape == (4000, 2) and flips.shape == (4000,) and flips.dtype == torch.bool
    for axis in (0, 1):  # every offset 0..2·4 of the padded image, uniformly
        counts = torch.bincount(shifts[:, axis], minlength=2 * PAD + 1)
        assert len(counts) == 2 * PAD + 1 and counts.min() > 4000 / 9 * 0.75, counts
    assert (shifts[:, 0] != shifts[:, 1]).float().mean() > 0.8  # rows and columns independent
    assert 0.45 < flips.float().mean() < 0.55  # horizontal flip with p = 0.5
    _, no_flips = nets.sample_crop_flip(500, 4, False, "cpu")
    assert not no_flips.any()  # no flips outside CIFAR (authors' code)


def test_augment_crop_and_flip():
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    shifts = torch.tensor([[4, 4], [4, 4], [0, 8]])
    out = nets.crop_flip(x, (shifts, torch.tensor([False, True, False])), 4)
    torch.testing.assert_close(out[0], x[0])  # centre crop: identity
    torch.testing.assert_close(out[1], x[1].flip(-1))  # flip only
    torch.testing.assert_close(out[2, :, 4:, :28], x[2, :, :28, 4:])  # 4 down, 4 left
    assert (out[2, :, :4] == 0).all() and (out[2, :, :, 28:] == 0).all()  # zero padding


@pytest.mark.parametrize("size", [(32, 32), (12, 10)])
def test_augment_matches_per_example_loop(size):
    torch.manual_seed(1)
    n = 40
    x = torch.rand(n, 3, *size, dtype=torch.float64, requires_grad=True)
    shifts = torch.randint(0, 2 * PAD + 1, (n, 2))
    shifts[:4] = torch.tensor([[0, 0], [8, 8], [0, 8], [8, 0]])
    flips = torch.rand(n) < 0.5
    out, ref = nets.crop_flip(x, (shifts, flips), 4), loop_augment(x, shifts, flips)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    r = torch.randn_like(ref)  # differentiable in x, with the loop's gradient
    (g_out,) = torch.autograd.grad((out * r).sum(), x)
    (g_ref,) = torch.autograd.grad((ref * r).sum(), x)
    torch.testing.assert_close(g_out, g_ref, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize("kind", ["wrn", "convnet"])
def test_classifier_optimizer_groups(kind):
    """Authors' classifier optimizer: AdamW, betas (0.9, 0.995), eps 1e-8, decoupled weight
    decay 1e-5 on weights and gains, none on biases; lr as given (default 5e-4, Sec. 3)."""
    model = (nets.NFWideResNet(3, depth=10, widen=1) if kind == "wrn"
             else nets.ConvNet(3, width=4))
    optimizer = nets.classifier_optimizer(model, lr=3e-3)
    assert type(optimizer) is torch.optim.AdamW  # decoupled decay, not Adam's L2
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    named = list(model.named_parameters())
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(named) == len(group_of)
    for name, p in named:
        group = group_of[id(p)]
        assert group["lr"] == 3e-3 and group["betas"] == ADAMW_BETAS and group["eps"] == ADAMW_EPS
        assert not group["amsgrad"] and group.get("decoupled_weight_decay", True)
        assert group["weight_decay"] == (0.0 if name.endswith("bias") else ADAMW_WD), name
    assert {n.rsplit(".", 1)[1] for n, _ in named} >= ({"weight", "bias", "gain"} if kind == "wrn"
                                                        else {"weight", "bias"})
    assert all(g["lr"] == 5e-4 for g in nets.classifier_optimizer(model).param_groups)


@pytest.mark.parametrize("previous_steps", [0, 3])
def test_differentiable_adamw_step_matches_torch_adamw(previous_steps):
    """The unrolled step (Eq. 3) is torch.optim.AdamW's update, with each group's own lr,
    betas, eps and weight decay (unusual values, so that each one shows), from the
    optimizer's current moments and step count."""
    torch.manual_seed(0)
    model = nets.NFWideResNet(3, depth=10, widen=1, dropout=0.0).double()
    optimizer = nets.classifier_optimizer(model)
    for group, hyper in zip(optimizer.param_groups, [(0.02, (0.8, 0.9), 1e-3, 0.3),
                                                     (0.005, (0.7, 0.95), 1e-4, 0.1)]):
        group["lr"], group["betas"], group["eps"], group["weight_decay"] = hyper
    x, y = torch.rand(4, 3, 16, 16, dtype=torch.float64), torch.randint(0, 3, (4,))
    real_steps(model, optimizer, x, y, previous_steps)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    ours = pi.differentiable_adamw_step(model, optimizer, params, grads)
    optimizer.step()
    for n, p in model.named_parameters():
        assert (ours[n] - params[n]).abs().max() > 1e-4, n  # every parameter moved
        torch.testing.assert_close(ours[n], p.detach(), atol=1e-12, rtol=1e-10, msg=n)
    # a parameter without a gradient is left alone, decay included, as torch.optim does
    unused = pi.differentiable_adamw_step(model, optimizer, params, {**grads, "fc.weight": None})
    assert torch.equal(unused["fc.weight"], params["fc.weight"])


@pytest.mark.parametrize("kind", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("fused", [True, False])
def test_non_finite_steps_are_skipped(fused, kind):
    """A step with a non-finite loss or gradient leaves parameters, Adam's moments and its
    step count exactly as they were (authors: skipped), decided on the device by the fused
    kernel (or on the host for an unfused optimizer); a finite step then is torch's
    ordinary Adam step (compared on a copy)."""
    model = nn.Linear(3, 2)
    optimizer = kind(model.parameters(), lr=0.1, fused=fused)
    reference = copy.deepcopy(model)
    ref_optimizer = kind(reference.parameters(), lr=0.1)  # not fused
    for m, opt in ((model, optimizer), (reference, ref_optimizer)):  # one real step first
        opt.zero_grad()
        m(torch.ones(1, 3)).sum().backward()
        opt.step()

    def state():
        return [p.detach().clone() for p in model.parameters()] + \
               [t.clone() for p in model.parameters() for t in optimizer.state[p].values()]

    before = state()
    loss = model(torch.tensor([[1.0, float("nan"), 0.0]])).sum()  # non-finite loss
    assert int(pi.finite_step(optimizer, loss, list(model.parameters()))) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, state()))
    with torch.no_grad():
        model.bias.zero_()
        reference.bias.zero_()
    before = state()
    loss = model.bias.sqrt().sum() + model(torch.ones(1, 3)).sum()  # finite, but ∂√b/∂b = ∞ at 0
    assert int(pi.finite_step(optimizer, loss, list(model.parameters()))) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, state()))
    x = torch.tensor([[0.5, -1.0, 2.0]])
    assert int(pi.finite_step(optimizer, model(x).pow(2).sum(), list(model.parameters()))) == 0
    ref_optimizer.zero_grad()
    reference(x).pow(2).sum().backward()
    ref_optimizer.step()  # the second real step: t = 2 in the bias correction
    # fused and unfused kernels on the same O(1) gradients: a few ulps of the weights
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # a plain step() afterwards is an ordinary step: no flag of a skipped step is left over
    assert not hasattr(optimizer, "found_inf")
    for opt, m in ((optimizer, model), (ref_optimizer, reference)):
        opt.zero_grad()
        m(x).sum().backward()
        opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not torch.equal(before[0], model.weight)


# ------------------------------------------------------------------------- Eq. 2-5
@pytest.mark.parametrize("previous_steps,lam", [(0, 0.0), (3, 0.0), (0, 3.0), (3, 3.0)])
def test_simplifier_loss_matches_real_adamw_step(monkeypatch, previous_steps, lam):
    """Every term of Eq. 5 (with S3) against f' = a deep copy of f after one real AdamW step."""
    classifier, optimizer, x, x_sim, y = meta_setup(previous_steps)
    calls = patch_bpd(monkeypatch) if lam > 0 else forbid_bpd(monkeypatch)
    state = copy.deepcopy(optimizer.state_dict())
    params = {n: p.detach().clone() for n, p in classifier.named_parameters()}
    x_sim = x_sim.clone().requires_grad_()
    loss, parts = pi.simplifier_loss(classifier=classifier, optimizer=optimizer, glow_model=GLOW,
                                     x=x, x_sim=x_sim, y=y, aug=AUG6, lambda_sim=lam)
    ref_loss, ref, w = reference_loss(classifier, optimizer, x, x_sim, y, AUG6, lam, fake_bpd)
    assert (w == 0).any() and ((w > 0.05) & (w < 0.95)).any()  # both sides of S3's threshold
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-10, atol=0)
    for key in ("loss", "loss_f_sim", "loss_fp_sim", "loss_fp_orig", "sim_weight"):
        torch.testing.assert_close(parts[key], ref[key], rtol=1e-10, atol=1e-14, msg=key)
    if lam > 0:  # bpd of the UN-augmented X_sim (authors' code), scored by the given Glow
        assert len(calls) == 1 and calls[0][0] is GLOW and torch.equal(calls[0][1], x_sim)
        torch.testing.assert_close(parts["bpd"], ref["bpd"], rtol=1e-12, atol=0)
    # the meta-loss reaches X_sim but neither f's weights nor its optimizer (authors:
    # higher with copy_initial_weights=True); f and its AdamW state are unchanged
    classifier.zero_grad(set_to_none=True)
    loss.backward()
    assert x_sim.grad is not None and all(p.grad is None for p in classifier.parameters())
    for n, p in classifier.named_parameters():
        assert torch.equal(p, params[n]), n
    after = optimizer.state_dict()
    for key, value in state["state"].items():
        for name, tensor in value.items():
            assert torch.equal(after["state"][key][name], tensor), (key, name)


@pytest.mark.parametrize("lam", [0.0, 3.0])
def test_meta_gradient_matches_finite_differences(monkeypatch, lam):
    """dL/dX_sim of simplifier_loss (autograd through the unrolled AdamW step, Eq. 3) against
    central differences of the independent pipeline (deep copy + real AdamW step), float64,
    along a random direction. The S3 weights are a stop-gradient: held at their value."""
    classifier, optimizer, x, x_sim, y = meta_setup(3)
    if lam > 0:
        patch_bpd(monkeypatch)
    else:
        forbid_bpd(monkeypatch)
    x_leaf = x_sim.clone().requires_grad_()
    loss, _ = pi.simplifier_loss(classifier=classifier, optimizer=optimizer, glow_model=GLOW,
                                 x=x, x_sim=x_leaf, y=y, aug=AUG6, lambda_sim=lam)
    (grad,) = torch.autograd.grad(loss, x_leaf)
    _, _, w = reference_loss(classifier, optimizer, x, x_sim, y, AUG6, lam, fake_bpd)
    direction = torch.randn(x_sim.shape, generator=torch.Generator().manual_seed(2),
                            dtype=torch.float64)
    h = 1e-5

    def along(t):
        return reference_loss(classifier, optimizer, x, x_sim + t * direction, y, AUG6, lam,
                              fake_bpd, weight=w)[0].item()
    numeric = (along(h) - along(-h)) / (2 * h)
    analytic = (grad * direction).sum().item()
    assert abs(numeric) > 1e-3
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-10)


class PixelLogits(nn.Module):
    """logits_i = b + 10·x_i[:, 0, 0]: pixel (0, 0) of each image sets its three logits;
    only the bias b is trained, so one AdamW step can be done by hand."""

    def __init__(self, bias):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(bias, dtype=torch.float64))

    def forward(self, x):
        return self.bias + 10 * x[:, :, 0, 0]


def hand_setup(lr=0.3):
    """Four examples with known pixel (0, 0) values; the rest of each image is random."""
    px_orig = [[0.9, 0.1, 0.1],  # label 0, margin 8: very confident
               [0.2, 0.6, 0.2],  # label 1, margin 4: loss between 0 and 0.1
               [0.5, 0.5, 0.2],  # label 2, wrong: loss > 0.1, weight 0
               [0.65, 0.3, 0.3]]  # label 0, margin 3.5
    y = [0, 1, 2, 0]
    bias = [0.0, 0.2, -0.1]
    px_sim = [[0.5 * v + 0.25 for v in row] for row in px_orig]  # halved contrast
    torch.manual_seed(3)
    x, x_sim = torch.rand(2, 4, 3, 8, 8, dtype=torch.float64)
    x[:, :, 0, 0] = torch.tensor(px_orig, dtype=torch.float64)
    x_sim[:, :, 0, 0] = torch.tensor(px_sim, dtype=torch.float64)
    classifier = PixelLogits(bias)
    optimizer = torch.optim.AdamW([classifier.bias], lr=lr, betas=ADAMW_BETAS, eps=ADAMW_EPS,
                                  weight_decay=0.0)
    identity = (torch.full((4, 2), PAD), torch.zeros(4, dtype=torch.bool))  # X̃ = X
    return classifier, optimizer, x, x_sim, torch.tensor(y), identity, \
        dict(px_orig=px_orig, px_sim=px_sim, y=y, bias=bias, lr=lr)


def by_hand(px_orig, px_sim, y, bias, lr):
    """Eq. 3-5 and S3 in plain Python floats for PixelLogits."""
    def ce(z, k):
        return math.log(sum(math.exp(v) for v in z)) - z[k]

    def softmax(z):
        e = [math.exp(v) for v in z]
        return [v / sum(e) for v in e]
    n = len(y)
    z_sim = [[b + 10 * p for b, p in zip(bias, row)] for row in px_sim]
    # first AdamW step from a fresh state, no decay: m̂ = g, √v̂ = |g|, so b' = b − lr·g/(|g|+eps)
    g = [sum(softmax(z)[k] - (y[i] == k) for i, z in enumerate(z_sim)) / n for k in range(3)]
    bias1 = [b - lr * gk / (abs(gk) + 1e-8) for b, gk in zip(bias, g)]
    l_f_sim = sum(ce(z, y[i]) for i, z in enumerate(z_sim)) / n
    l_f1_sim = sum(ce([b + 10 * p for b, p in zip(bias1, row)], y[i])
                   for i, row in enumerate(px_sim)) / n
    l_i = [ce([b + 10 * p for b, p in zip(bias1, row)], y[i]) for i, row in enumerate(px_orig)]
    w = [max(0.0, 1 - li / 0.1) for li in l_i]
    return dict(loss_f_sim=l_f_sim, loss_fp_sim=l_f1_sim, l_i=l_i, w=w,
                loss_cls=10 * sum(l_i) / n + l_f_sim + l_f1_sim)


@pytest.mark.parametrize("lam", [0.0, 1.5])
def test_losses_by_hand(monkeypatch, lam):
    """L_cls = 10·l(f'(X̃_orig)) + l(f(X̃_sim)) + l(f'(X̃_sim)) (Eq. S3); w_i = max(0, 1 −
    l_i(f'(X̃_orig))/0.1) (S3); L_sim = mean over the WHOLE batch of w_i·bpd_i; L = (L_cls +
    λ·L_sim)/(12 + λ) (Eq. 5); λ = 0 never calls Glow."""
    classifier, optimizer, x, x_sim, y, identity, setup = hand_setup()
    bpd = [2.0, 4.0, 6.0, 8.0]
    if lam > 0:
        known = torch.tensor(bpd, dtype=torch.float64)
        patch_bpd(monkeypatch, lambda im: known + 0 * im.sum((1, 2, 3)))
    else:
        forbid_bpd(monkeypatch)
    loss, parts = pi.simplifier_loss(classifier=classifier, optimizer=optimizer,
                                     glow_model=GLOW if lam else None, x=x, x_sim=x_sim, y=y,
                                     aug=identity, lambda_sim=lam)
    hand = by_hand(**setup)
    w = hand["w"]
    assert w[0] > 0.99 and 0.1 < w[1] < 0.9 and w[2] == 0 and 0.1 < w[3] < 0.9
    loss_sim = sum(wi * bi for wi, bi in zip(w, bpd)) / 4 if lam > 0 else 0.0
    expected = (hand["loss_cls"] + lam * loss_sim) / (12 + lam)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert parts["loss"].item() == pytest.approx(expected, rel=1e-9)
    assert parts["loss_f_sim"].item() == pytest.approx(hand["loss_f_sim"], rel=1e-9)
    assert parts["loss_fp_sim"].item() == pytest.approx(hand["loss_fp_sim"], rel=1e-9)
    assert parts["loss_fp_orig"].item() == pytest.approx(sum(hand["l_i"]) / 4, rel=1e-9)
    assert parts["sim_weight"].item() == pytest.approx(sum(w) / 4, rel=1e-9)
    if lam > 0:
        assert parts["bpd"].item() == pytest.approx(5.0)


def test_sim_term_gradient_is_weighted_bpd_gradient(monkeypatch):
    """∂L/∂X_sim,i = λ/(12+λ) · w_i/B · ∂bpd_i/∂X_sim,i away from the pixel the classifier
    reads: a linear stand-in bpd_i = 5 + Σ r·X_sim,i makes this exact (w_i by hand)."""
    classifier, optimizer, x, x_sim, y, identity, setup = hand_setup()
    r = torch.randn(3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    patch_bpd(monkeypatch, lambda im: 5 + (im * r).sum((1, 2, 3)))
    x_sim.requires_grad_()
    lam = 2.0
    loss, _ = pi.simplifier_loss(classifier=classifier, optimizer=optimizer, glow_model=GLOW,
                                 x=x, x_sim=x_sim, y=y, aug=identity, lambda_sim=lam)
    (grad,) = torch.autograd.grad(loss, x_sim)
    w = torch.tensor(by_hand(**setup)["w"], dtype=torch.float64)
    expected = lam / (12 + lam) * (w / 4).view(-1, 1, 1, 1) * r  # (4, 3, 8, 8)
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[0, 0] = False  # the classifier's pixel also carries the L_cls gradient
    torch.testing.assert_close(grad[:, :, mask], expected[:, :, mask], rtol=1e-9, atol=1e-15)


def test_bpd_is_glow_with_dequantization_noise():
    """With a real (tiny) Glow, the L_sim scores are glow.bits_per_dim of X_sim, noise included."""
    torch.manual_seed(0)
    model = glow.freeze(glow.Glow(levels=1, steps=1, hidden=8, image_size=8).double())
    classifier, optimizer, x, x_sim, y = meta_setup(0)
    torch.manual_seed(5)
    _, parts = pi.simplifier_loss(classifier=classifier, optimizer=optimizer, glow_model=model,
                                  x=x, x_sim=x_sim, y=y, aug=AUG6, lambda_sim=1.0)
    torch.manual_seed(5)  # the same uniform dequantization noise
    expected = glow.bits_per_dim(model, x_sim).mean()
    torch.testing.assert_close(parts["bpd"], expected, rtol=1e-12, atol=0)
    assert (glow.bits_per_dim(model, x_sim, noise=False).mean() - expected).abs() > 1e-6


# ------------------------------------------------------------------------- protocol (Sec. 3)
@pytest.mark.parametrize("flip", [False, True])
def test_simplebits_step_protocol(monkeypatch, flip):
    """One batch of Sec. 3 (authors' code): the simplifier is updated first, on Eq. 5 with
    f and its AdamW state as they were; then f takes one real step on
    l(f(aug(quantize(simplifier_updated(X)))), y) with the SAME crop offsets and flips —
    not on the originals, not on the stale simplified batch, not with a new augmentation."""
    torch.manual_seed(0)
    simplifier = nets.UNetSimplifier(num_down=5, ngf=2)
    with torch.no_grad():
        simplifier.merge_weight.fill_(1.0)  # away from the identity of the initialization
    classifier = nets.ConvNet(3, width=4)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 3, (8,))
    opt_simp = torch.optim.Adam(simplifier.parameters(), lr=0.05, betas=(0.5, 0.99), fused=True)
    opt_clf = nets.classifier_optimizer(classifier, lr=0.01)
    real_steps(classifier, opt_clf, x, y, 2)  # moments and step count matter
    patch_bpd(monkeypatch)
    drawn = spy_augmentation(monkeypatch)
    # the state before the step, copied before any hook is registered
    simp_before = copy.deepcopy(simplifier)
    simp_ref = copy.deepcopy(simplifier)
    simp_ref_opt = torch.optim.Adam(simp_ref.parameters(), lr=0.05, betas=(0.5, 0.99),
                                    fused=True)
    simp_ref_opt.load_state_dict(copy.deepcopy(opt_simp.state_dict()))
    clf_for_loss, opt_for_loss = copy_with_adamw(classifier, opt_clf)
    clf_ref, clf_ref_opt = copy_with_adamw(classifier, opt_clf)

    events = []
    classifier.register_forward_pre_hook(lambda m, args: events.append(("f", args[0].detach())))
    opt_simp.register_step_pre_hook(lambda *a: events.append(("simplifier step", None)))
    opt_clf.register_step_pre_hook(lambda *a: events.append(("classifier step", None)))
    parts, skipped = pi.simplebits_step(simplifier=simplifier, classifier=classifier,
                                        opt_simp=opt_simp, opt_clf=opt_clf, glow_model=GLOW, x=x,
                                        y=y, lambda_sim=2.0, flip=flip)
    assert skipped == 0 and torch.isfinite(parts["loss"])

    # one augmentation for the batch; flips as asked
    assert len(drawn) == 1
    shifts, flips = aug = drawn[0]
    assert flips.any() if flip else not flips.any()
    kinds = [k for k, _ in events]
    assert kinds.count("simplifier step") == 1 and kinds.count("classifier step") == 1
    i_simp, i_clf = kinds.index("simplifier step"), kinds.index("classifier step")
    assert i_simp < i_clf  # simplifier first, then the classifier

    with torch.no_grad():
        stale = loop_augment(quantize_ref(simp_before(x)), shifts, flips)
        new = loop_augment(quantize_ref(simplifier(x)), shifts, flips)
    assert (new - stale).abs().max() > 2 / 255  # the simplifier step changed X_sim
    # Eq. 5 sees f on X̃_sim of the current simplifier and f' on X̃_orig, same augmentation
    before = [t for k, t in events[:i_simp] if k == "f"]
    torch.testing.assert_close(before[0], stale, rtol=0, atol=1e-6)
    assert any(torch.allclose(t, loop_augment(x, shifts, flips), rtol=0, atol=1e-7)
               for t in before)
    # the classifier update saw exactly the new simplified batch, with the same augmentation
    seen = [t for k, t in events[i_simp:i_clf] if k == "f"]
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], new, rtol=0, atol=1e-6)
    assert torch.equal(seen[0], quantize_ref(seen[0]))  # on 8-bit levels

    # the simplifier: one Adam step on Eq. 5 with the classifier and AdamW state before the step
    loss, _ = pi.simplifier_loss(classifier=clf_for_loss, optimizer=opt_for_loss, glow_model=GLOW,
                                 x=x, x_sim=glow.quantize(simp_ref(x)), y=y, aug=aug,
                                 lambda_sim=2.0)
    simp_ref_opt.zero_grad()
    loss.backward()
    simp_ref_opt.step()
    # the same kernels on the same inputs give the same gradients (seen: bit for bit), and
    # both sides step with the same fused Adam kernel
    for (n, p), q in zip(simplifier.named_parameters(), simp_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)
    # the classifier: one real AdamW step (lr 0.01) on the batch it saw, which is the new
    # simplified batch (checked above): the same kernels on the same tensor, then the same
    # fused AdamW, so bit for bit (seen). The conv biases feed an instance norm, so their
    # gradients are float32 noise (≲1e-7) with √v ≲ 1e-9 < ε, where Adam's update has slope
    # lr/ε = 1e6 and is up to ~lr either way: to 2·lr, should a kernel ever round them apart.
    # Every other entry has √v ≥ 1e-4 ≫ ε (seen), so rounding moves it by ~lr·1e-7, while a
    # wrong input, lr, betas or step count moves it by ~lr
    clf_ref_opt.zero_grad()
    F.cross_entropy(clf_ref(seen[0]), y).backward()
    clf_ref_opt.step()
    noise = {f"features.{i}.bias" for i, m in enumerate(classifier.features)
             if isinstance(m, torch.nn.Conv2d)}
    assert len(noise) == 3
    for (n, p), q in zip(classifier.named_parameters(), clf_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=0.02 if n in noise else 1e-6, msg=n)
    torch.testing.assert_close(parts["clf_loss"], F.cross_entropy(clf_for_loss(new), y),
                               rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- baselines (S7, S5)
@pytest.mark.parametrize("lam", [0.0, 2.5])
def test_l2_baseline_loss(monkeypatch, lam):
    """S7 L2 baseline (authors' mse_weight 10): (10·MSE(X_sim, X) + λ·mean bpd)/(10 + λ)."""
    torch.manual_seed(0)
    x, x_sim = torch.rand(2, 4, 3, 8, 8, dtype=torch.float64)
    bpd = [1.0, 2.0, 4.0, 9.0]
    if lam > 0:
        calls = patch_bpd(monkeypatch, lambda im: torch.tensor(bpd, dtype=im.dtype))
    else:
        forbid_bpd(monkeypatch)
    loss, parts = pi.l2_simplifier_loss(glow_model=GLOW, x=x, x_sim=x_sim, lambda_sim=lam)
    mse = sum(((a - b) ** 2).sum().item() for a, b in zip(x_sim, x)) / x.numel()
    expected = (10 * mse + lam * sum(bpd) / 4 * (lam > 0)) / (10 + lam)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert parts["mse"].item() == pytest.approx(mse, rel=1e-12)
    if lam > 0:
        assert torch.equal(calls[0][1], x_sim) and parts["bpd"].item() == pytest.approx(4.0)


def reference_blur(x, sigma):
    """15×15 Gaussian (kornia GaussianBlur2d((15, 15), (σ, σ))), reflect borders."""
    t = torch.arange(15, dtype=torch.float64) - 7
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k2 = (k[:, None] * k[None, :]) / k.sum() ** 2  # (15, 15), sums to 1
    padded = F.pad(x.double(), (7, 7, 7, 7), mode="reflect")
    return F.conv2d(padded, k2.expand(3, 1, 15, 15), groups=3).to(x.dtype)


@pytest.mark.parametrize("sigma", [0.7, 3.0])
def test_gaussian_blur_baseline(sigma):
    """The blur against a float64 one: each output is a float32 sum of 225 weights (summing
    to 1) times pixels in [0, 1], so another summation order moves it by at most
    225·2⁻²⁴ ≈ 1.3e-5 (seen 6.6e-7); a σ 1% off moves it by over 1e-3. The 8-bit levels
    of the simplifier are compared with those of the same float32 blur (rounding the
    float64 one could land on the other side of a level's half-way point), up to the ulp
    of the straight-through x + (q − x)."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    blurred = pi.gaussian_blur(x, sigma)
    torch.testing.assert_close(blurred, reference_blur(x, sigma), rtol=0, atol=1.5e-5)
    # the script's blur simplifier takes σ from --blur-sigma and returns 8-bit levels
    simplify = pi.simplification(argparse.Namespace(simplifier="blur", blur_sigma=sigma,
                                                   jpeg_quality=20), None)
    torch.testing.assert_close(simplify(x), quantize_ref(blurred), rtol=0, atol=1e-6)


def smooth_images(n=3, seed=0):
    """Natural-looking test images: smooth colour plus a little noise, in [0,1]."""
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(32, 32), mode="bilinear",
                           align_corners=False)
    return (0.8 * smooth + 0.2 * torch.rand(n, 3, 32, 32, generator=g)).clamp(0, 1)


def reference_jpeg(x, quality):
    out = []
    for img in x:
        array = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)  # PIL defaults
        out.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


@pytest.mark.parametrize("quality", [5, 20])
def test_jpeg_baseline(quality):
    """S7: a JPEG round trip through PIL at the given quality."""
    x = smooth_images()
    ref = reference_jpeg(x, quality)
    assert (ref - x).abs().mean() > 1 / 255  # lossy
    torch.testing.assert_close(pi.jpeg(x, quality), ref, rtol=0, atol=0)
    simplify = pi.simplification(argparse.Namespace(simplifier="jpeg", blur_sigma=1.0,
                                                   jpeg_quality=quality), None)
    torch.testing.assert_close(simplify(x), ref, rtol=0, atol=0)


def test_png_bytes():
    """S5: mean byte size of each image saved as a lossless PNG with PIL's defaults
    (posterized images, like simplified ones, on which the compression level shows)."""
    images = (smooth_images(4, seed=1) * 8).round().mul(255 / 8).round().to(torch.uint8)
    sizes = []
    for img in images:
        buffer = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
        sizes.append(len(buffer.getvalue()))
    assert len(set(sizes)) > 1
    assert pi.png_bytes(images) == pytest.approx(sum(sizes) / len(sizes), abs=1e-9)


# ------------------------------------------------------------------------- retraining (Fig. 5)
def test_retrain_on_stored_simplified_images(monkeypatch, tmp_path):
    """Fig. 5: f is trained on the stored uint8 simplified images, each batch cropped (and
    flipped) as in joint training, with the authors' AdamW; every image once per epoch."""
    torch.manual_seed(0)
    n, batch = 8, 4
    train_sim = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 3, (n,))
    classifier = nets.ConvNet(3, width=4)
    reference = copy.deepcopy(classifier)
    seen = []
    classifier.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach()) if m.training else None)
    drawn = spy_augmentation(monkeypatch)
    cfg = argparse.Namespace(lr=0.05, retrain_epochs=1, epochs=1, seed=0, batch_size=batch,
                             out=tmp_path)
    test = {"orig": (torch.rand(4, 3, 32, 32), torch.randint(0, 3, (4,))),
            "sim": (torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8),
                    torch.randint(0, 3, (4,)))}
    pi.retrain(classifier=classifier, train_sim=train_sim, train_labels=labels, test=test,
               cfg=cfg, flip=True, device="cpu", phase="retrain")
    assert len(seen) == len(drawn) == n // batch
    decay = [p for name, p in reference.named_parameters() if not name.endswith("bias")]
    no_decay = [p for name, p in reference.named_parameters() if name.endswith("bias")]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=ADAMW_WD),
                                   dict(params=no_decay, weight_decay=0.0)],
                                  lr=0.05, betas=ADAMW_BETAS, eps=ADAMW_EPS,
                                  fused=True)  # the conv biases before instance norm get
    used = []  # gradients ~1e-9 that Adam scales to ±lr: another kernel rounds them differently
    images = train_sim.float() / 255
    for batch_in, (shifts, flips) in zip(seen, drawn):
        index = []  # which stored image is in each row, given that row's crop and flip
        for row, (s, f) in enumerate(zip(shifts, flips)):
            candidates = loop_augment(images, s.expand(n, 2), f.expand(n))
            match = [j for j in range(n) if torch.equal(candidates[j], batch_in[row])]
            assert len(match) == 1, row
            index += match
        used += index
        optimizer.zero_grad()
        F.cross_entropy(reference(loop_augment(images[index], shifts, flips)),
                        labels[index]).backward()
        optimizer.step()
    assert sorted(used) == list(range(n))
    assert any(flips.any() for _, flips in drawn)
    for (name, p), q in zip(classifier.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------- CPU smoke runs
def tiny_glow(tmp_path):
    torch.manual_seed(0)
    path = str(tmp_path / "glow.pt")
    glow.save_glow(glow.Glow(levels=3, steps=1, hidden=8), path)  # a Glow at init
    return path


def run(tmp_path, out, *extra):
    """A tiny run on shapes; the flags of f and of the simplifier only where they act (a
    flag that does nothing in the chosen mode is refused)."""
    argv = ["--dataset", "shapes", "--glow", tiny_glow(tmp_path), "--out", str(tmp_path / out),
            "--device", "cpu", "--train-size", "8", "--test-size", "8", "--batch-size", "4",
            *extra]
    if "convnet" not in extra:
        argv += ["--depth", "10", "--widen", "1"]
    if "blur" not in extra and "jpeg" not in extra:
        argv += ["--ngf", "4", "--lambda-sim", "2"]
    return pi.main(pi.get_args(argv))


def optimizer_states(checkpoint):
    return [v for v in checkpoint.values() if isinstance(v, dict) and "param_groups" in v]


def test_eval_every_never_changes_training(tmp_path):
    """--eval-every N: the test metrics and grid every N epochs and after the last; the
    evaluation draws its bpd noise from its own seeded stream, so training is the same
    whether it evaluates every epoch or not (the same weights bit for bit)."""
    run(tmp_path, "every", "--epochs", "3", "--eval-every", "1")
    run(tmp_path, "rare", "--epochs", "3", "--eval-every", "2")
    for out, evaluated in (("every", [1, 2, 3]), ("rare", [2, 3])):
        rows = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").open()]
        assert [r["epoch"] for r in rows if "test_acc" in r] == evaluated, out
        assert [r["epoch"] for r in rows] == [1, 2, 3]
        grids = sorted(p.name for p in (tmp_path / out).glob("simplified_epoch*.png"))
        assert grids == [f"simplified_epoch{e:03d}.png" for e in evaluated]
    for name in ("classifier.pt", "simplifier.pt"):
        a, b = (torch.load(tmp_path / out / name, weights_only=True)["state_dict"]
                for out in ("every", "rare"))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_smoke_simplebits_resume_retrain_save(tmp_path, monkeypatch):
    drawn = spy_augmentation(monkeypatch)
    full = run(tmp_path, "full", "--epochs", "2")
    assert drawn and not any(flips.any() for _, flips in drawn)  # no flips outside CIFAR
    run(tmp_path, "resumed", "--epochs", "1")
    resumed = run(tmp_path, "resumed", "--epochs", "2", "--resume", "--retrain", "--finetune",
                  "--retrain-epochs", "1", "--save-simplified")
    for key in ("test_acc", "test_acc_simplified", "test_bpd", "test_bpd_simplified"):
        assert resumed[key] == pytest.approx(full[key], abs=1e-6), key  # resume == uninterrupted
    out = tmp_path / "resumed"
    results = json.loads((out / "results.json").read_text())
    for key in ("test_acc", "test_acc_simplified", "test_bpd", "test_bpd_simplified", "png_bytes",
                "png_bytes_simplified", "retrain_test_acc", "finetune_test_acc"):
        assert key in results and results[key] == results[key], key  # present, not NaN
    assert 0 <= results["test_acc"] <= 1 and results["test_bpd"] > 0 and results["png_bytes"] > 100
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in rows] == [("train", 1), ("train", 2), ("retrain", 1),
                                                         ("finetune", 1)]
    for name in ("simplified_epoch002.png", "simplified.png", "classifier.pt", "simplifier.pt",
                 "checkpoint.pt", "args.json"):
        assert (out / name).exists(), name
    assert nets.load_model(str(out / "simplifier.pt"), kind="UNetSimplifier").config["ngf"] == 4
    test = torch.load(out / "simplified_test.pt", weights_only=True)
    train = torch.load(out / "simplified_train.pt", weights_only=True)
    assert test["images"].dtype == torch.uint8 and test["images"].shape == (8, 3, 32, 32)
    assert train["images"].shape == (8, 3, 32, 32) and train["labels"].shape == (8,)


def test_cifar_flips_and_optimizers_of_main(tmp_path, monkeypatch):
    """CIFAR gets horizontal flips (authors' code); the optimizers main saves: the
    classifier's AdamW of nets.classifier_optimizer, the simplifier's Adam(lr, betas (0.5, 0.99),
    coupled weight decay 5e-5) of the authors' code (the paper text says AdamW for both)."""
    real_load = datasets.load_dataset

    def load(name, root="data", train=True, download=True):  # shapes images named cifar10
        base = real_load("shapes", root, train=train)
        return datasets.TensorImages(base.images, base.labels,
                                     dataclasses.replace(base.info, name="cifar10"))
    monkeypatch.setattr(datasets, "load_dataset", load)
    drawn = spy_augmentation(monkeypatch)
    argv = ["--dataset", "cifar10", "--glow", tiny_glow(tmp_path), "--out", str(tmp_path / "c"),
            "--device", "cpu", "--train-size", "16", "--test-size", "8", "--batch-size", "8",
            "--arch", "convnet", "--width", "4", "--ngf", "4", "--lambda-sim", "1",
            "--lr", "1e-3", "--epochs", "1"]
    pi.main(pi.get_args(argv))
    assert len(drawn) == 2 and all(flips.any() for _, flips in drawn)
    ckpt = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)
    n_simp = len(list(nets.UNetSimplifier(num_down=5, ngf=4).parameters()))
    states = optimizer_states(ckpt)
    simp = [s for s in states if sum(len(g["params"]) for g in s["param_groups"]) == n_simp]
    clf = [s for s in states if s is not (simp[0] if simp else None)]
    assert len(simp) == 1 and len(clf) == 1
    (group,) = simp[0]["param_groups"]
    assert (group["lr"], tuple(group["betas"]), group["weight_decay"]) == (1e-3, (0.5, 0.99), 5e-5)
    assert group["eps"] == 1e-8 and not group.get("decoupled_weight_decay", False)  # Adam, L2
    groups = clf[0]["param_groups"]
    assert sorted(g["weight_decay"] for g in groups) == [0.0, ADAMW_WD]
    for g in groups:
        assert (g["lr"], tuple(g["betas"]), g["eps"]) == (1e-3, ADAMW_BETAS, ADAMW_EPS)
        assert g.get("decoupled_weight_decay", True)


def test_convnet_classifier_and_quick_preset(tmp_path):
    """--classifier convnet trains the DC ConvNet as f (the --quick default) with a fresh one
    for --retrain; --quick changes only defaults."""
    results = run(tmp_path, "conv", "--arch", "convnet", "--width", "8", "--epochs", "1",
                  "--retrain", "--retrain-epochs", "1")
    assert 0 <= results["retrain_test_acc"] <= 1 and results["test_bpd_simplified"] > 0
    assert nets.load_model(str(tmp_path / "conv" / "classifier.pt"),
                           kind="ConvNet").config["width"] == 8
    cfg = pi.resolve_config(pi.get_args(["--quick", "--arch", "wrn"]))
    assert (cfg.arch, cfg.width, cfg.epochs) == ("wrn", 32, pi.QUICK["epochs"])
    assert pi.resolve_config(pi.get_args([])).arch == "wrn"  # the paper's f by default


@pytest.mark.parametrize("kind", ["l2", "blur", "jpeg"])
def test_smoke_baselines(tmp_path, kind):
    results = run(tmp_path, kind, "--simplifier", kind, "--retrain-epochs", "1",
                  *(["--epochs", "1"] if kind == "l2" else []))  # blur and JPEG train nothing
    assert "test_acc" not in results and 0 <= results["retrain_test_acc"] <= 1  # f is retrained
    assert results[pi.KNOB_OF[kind]] == {"l2": 2, "blur": 1, "jpeg": 20}[kind]
    assert results["test_bpd_simplified"] > 0 and results["png_bytes_simplified"] > 0
    if kind == "blur":  # blurring removes the pixel noise of the background
        assert results["png_bytes_simplified"] < results["png_bytes"]


def test_missing_glow_exits_with_status_2(tmp_path, monkeypatch, capsys):
    """The script's entry point, run in this process: one sentence, status 2, no traceback."""
    monkeypatch.setattr(sys, "argv", ["per_instance.py", "--dataset", "shapes", "--device", "cpu",
                                      "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(pi.__file__, run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "glow" in err.lower()


def test_train_batches_equal_the_items_in_epoch_order():
    """The training batches of an epoch: full batches of the permutation fixed by (seed,
    epoch), built by indexing — equal to stacking the dataset's items one by one."""
    train = datasets.subset(datasets.load_dataset("shapes", train=True), 50, seed=0)
    batches = list(pi.train_batches(datasets.Batches(train, "cpu"), 16, seed=3, epoch=2))
    order = torch.randperm(50, generator=torch.Generator().manual_seed(3 * 9973 + 2))
    assert len(batches) == 3  # 50 // 16, the last partial batch dropped
    for k, (x, y) in enumerate(batches):
        items = [train[int(i)] for i in order[16 * k:16 * (k + 1)]]
        assert torch.equal(x, torch.stack([img for img, _ in items]))
        assert y.tolist() == [label for _, label in items]
