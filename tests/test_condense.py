"""condense.py (Sec. 4): the Eq. 6 distance by hand (DC `distance_wb`), Eq. 6-7 and their
gradient against a written-out computation, one outer iteration and the DC evaluation
protocol re-implemented with torch.optim, the authors' image optimizer and α init in main,
and a CPU smoke run."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import condense
import glow
import nets

ROOT = Path(__file__).resolve().parent.parent


def random_grads(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 3, 3, 3), (6,), (6,), (4, 24), (4,)]  # conv, bias, norm gain, linear, bias
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def test_distance_zero_for_identical_and_row_scale_invariant():
    grads = random_grads()
    # 0 up to the ε = 1e-6 in the denominator
    assert condense.gradient_match_loss(grads, grads).item() == pytest.approx(0, abs=1e-5)
    # positive scaling of each output row (and anything in 1-D tensors) changes nothing
    scaled = [g * torch.rand(g.shape[0], *[1] * (g.dim() - 1), dtype=g.dtype).add(0.1)
              if g.dim() > 1 else -5 * g for g in grads]
    assert condense.gradient_match_loss(grads, scaled).item() == pytest.approx(0, abs=1e-5)
    # negating one row turns its cosine from 1 into −1: distance 2
    flipped = [g.clone() for g in grads]
    flipped[0][2] *= -1
    assert condense.gradient_match_loss(grads, flipped).item() == pytest.approx(2, abs=1e-5)


def test_distance_matches_row_cosines():
    """D against DC `distance_wb` written out row by row in plain Python floats: for each
    tensor with more than one dimension, Σ over output rows of 1 − ⟨r, s⟩/(‖r‖·‖s‖ + 1e-6)."""
    a, b = random_grads(1), random_grads(2)
    expected = 0.0
    for x, y in zip(a, b):
        if x.dim() == 1:
            continue
        for r, s in zip(x.reshape(len(x), -1).tolist(), y.reshape(len(y), -1).tolist()):
            dot = sum(u * v for u, v in zip(r, s))
            norms = math.sqrt(sum(u * u for u in r)) * math.sqrt(sum(v * v for v in s))
            expected += 1 - dot / (norms + 1e-6)
    assert condense.gradient_match_loss(a, b).item() == pytest.approx(expected, rel=1e-12)


def test_distance_by_hand():
    """Eq. 6 on tiny tensors whose rows are computed by hand (DC `distance_wb`, 'ours'):
    rows of the reshaped (out, rest) gradient, ε = 1e-6 added to the product of the norms,
    a zero row counts 1, 1-D tensors count 0."""
    real = [torch.tensor([[1.0, 0.0], [1e-3, 0.0], [0.0, 0.0]], dtype=torch.float64).view(3, 1, 2, 1),
            torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64),  # a bias: ignored
            torch.tensor([[3.0, 4.0], [1.0, 1.0]], dtype=torch.float64)]
    syn = [torch.tensor([[0.0, 2.0], [1e-3, 0.0], [5.0, 5.0]], dtype=torch.float64).view(3, 1, 2, 1),
           torch.tensor([-1.0, 2.0, -3.0], dtype=torch.float64),
           torch.tensor([[6.0, 8.0], [1.0, -1.0]], dtype=torch.float64)]
    rows = [1.0,                       # (1, 0) ⟂ (0, 2): cos 0
            1 - 1e-6 / (1e-6 + 1e-6),  # parallel rows of norm 1e-3: ε halves the cosine
            1.0,                       # a zero real row: 0 / (0 + ε)
            1 - 50 / (50 + 1e-6),      # (3, 4) ∥ (6, 8): ⟨·,·⟩ = 50 = 5·10
            1.0]                       # (1, 1) ⟂ (1, −1)
    assert condense.gradient_match_loss(real, syn).item() == pytest.approx(sum(rows), rel=1e-12)
    assert condense.gradient_match_loss(real, syn).item() == pytest.approx(3.5, abs=1e-7)


def test_get_loops_follow_dc():
    assert [condense.get_loops(i) for i in (1, 10, 50)] == [(1, 1), (10, 50), (50, 10)]
    assert condense.get_loops(5) == (5, 100)
    assert [condense.get_loops(i) for i in (20, 30, 40)] == [(20, 25), (30, 20), (40, 15)]


def test_quick_changes_only_defaults():
    args = condense.get_args(["--dataset", "shapes", "--quick", "--iterations", "7"])
    cfg = condense.resolve_config(args)
    assert cfg.iterations == 7 and cfg.width == 32 and (cfg.outer_loop, cfg.inner_loop) == (1, 1)
    assert args.width is None and args.ipc is None  # args is never changed
    # the quick preset: one image per class (DC's loops (1, 1)), 400 iterations, 64 real
    # images per class and step, 3 evaluation networks of 100 epochs, 2000/1000 images
    assert (cfg.ipc, cfg.batch_real, cfg.num_eval, cfg.eval_epochs, cfg.train_size,
            cfg.test_size) == (1, 64, 3, 100, 2000, 1000)
    assert str(cfg.out) == "runs/condense-shapes-ipc1-lam50-seed0-quick"
    full = condense.resolve_config(condense.get_args(["--dataset", "shapes"]))
    assert (full.ipc, full.width, full.batch_real, full.outer_loop, full.inner_loop,
            full.iterations, full.num_eval) == (10, 128, 256, 10, 50, 1000, 5)
    assert str(full.out) == "runs/condense-shapes-ipc10-lam50-seed0"
    ten = condense.resolve_config(condense.get_args(["--dataset", "shapes", "--quick", "--ipc",
                                                     "10"]))
    assert (ten.ipc, ten.outer_loop, ten.inner_loop) == (10, 1, 1)
    with pytest.raises(SystemExit):  # the parser refuses it with one sentence
        condense.get_args(["--eval-at", "1,x"])


@pytest.fixture
def float64():
    """Build every network of a test in float64, so that re-implementations agree to ~1e-10."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def dc_convnet(num_classes, width):
    """The test's own statement of the DC ConvNet of Sec. 4: depth 3, input x − 0.5."""
    return nets.ConvNet(num_classes, width=width, depth=3, mean=(0.5,) * 3, std=(1.0,) * 3)


def reference_class_distance(net, x_real, x_syn, label):
    """Eq. 6 for one class, written out: the cross-entropy of label c as −mean log-softmax,
    its gradient on every parameter (real: a constant; synthetic: differentiable), and
    DC `distance_wb` row by row."""
    params = list(net.parameters())

    def grads(x, create_graph):
        ce = -torch.log_softmax(net(x), dim=1)[:, label].mean()
        return torch.autograd.grad(ce, params, create_graph=create_graph)

    distance = 0
    for g_r, g_s in zip(grads(x_real, False), grads(x_syn, True)):
        if g_r.dim() == 1:
            continue
        g_r, g_s = g_r.reshape(len(g_r), -1), g_s.reshape(len(g_s), -1)
        for r, s in zip(g_r, g_s):
            distance = distance + 1 - (r @ s) / (r.norm() * s.norm() + 1e-6)
    return distance


def reference_condensation_loss(net, x_syn, real, ipc, batch_real, glow_model, lambda_sim):
    """Eq. 7 written out: Σ_c D_c over a random batch of ≤ batch_real real images of each
    class (one torch.randperm per class, in class order) + λ·mean bpd of the synthetic set."""
    match = 0
    for c, x_c in enumerate(real):
        batch = x_c[torch.randperm(len(x_c))[:batch_real]]
        match = match + reference_class_distance(net, batch, x_syn[c * ipc:(c + 1) * ipc], c)
    if lambda_sim == 0:
        return match, match, None
    bpd = glow.bits_per_dim(glow_model, x_syn).mean()
    return match + lambda_sim * bpd, match, bpd


def tiny_problem():
    torch.manual_seed(0)
    net = nets.ConvNet(2, width=4, mean=(0.5,) * 3, std=(1.0,) * 3).double()
    real = [torch.rand(3, 3, 32, 32, dtype=torch.float64) for _ in range(2)]  # 2 classes
    x_syn = torch.rand(2, 3, 32, 32, dtype=torch.float64)  # ipc 1
    return net, real, x_syn


def test_class_match_loss_matches_reference():
    """class_match_loss = the written-out Eq. 6 for class c; the real gradient is a constant
    (no gradient reaches the real images), the synthetic one is differentiable."""
    net, real, x_syn = tiny_problem()
    x_real = real[1].clone().requires_grad_()
    x = x_syn[1:].clone().requires_grad_()
    loss = condense.class_match_loss(net=net, x_real=x_real, x_syn=x, label=1)
    expected = reference_class_distance(net, real[1], x_syn[1:], 1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    grad_real, grad_syn = torch.autograd.grad(loss, [x_real, x], allow_unused=True)
    assert grad_real is None or not grad_real.any()  # gw_real is detached (DC)
    assert grad_syn is not None and grad_syn.abs().sum() > 0  # gw_syn: create_graph=True
    # the label of the class matters: class 0's cross-entropy gives another distance
    other = reference_class_distance(net, real[1], x_syn[1:], 0)
    assert abs(other.item() - loss.item()) > 1e-3


def test_match_gradient_matches_finite_differences():
    """∂(Σ_c D_c)/∂X_syn by autograd equals central differences of the written-out Eq. 6."""
    net, real, x_syn = tiny_problem()

    def reference(x):  # batch_real ≥ class size: every real image of the class is used
        return sum(reference_class_distance(net, real[c], x[c:c + 1], c) for c in range(2))

    x = x_syn.clone().requires_grad_()
    loss = condense.matching_loss(net=net, x_syn=x, real_by_class=real, ipc=1, batch_real=8)
    assert loss.item() == pytest.approx(reference(x_syn).item(), rel=1e-10)
    grad = torch.autograd.grad(loss, x)[0]
    g = torch.Generator().manual_seed(1)
    h = 1e-6
    for _ in range(3):  # directional derivatives along random directions
        v = torch.randn(x_syn.shape, generator=g, dtype=torch.float64)
        numeric = (reference(x_syn + h * v) - reference(x_syn - h * v)).item() / (2 * h)
        assert (grad * v).sum().item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def tiny_glow():
    """A Glow at init whose first ActNorm scales by 20: a sharp density around grey."""
    g = glow.Glow(levels=1, steps=1, hidden=8)
    with torch.no_grad():
        g.flow.layers[1].actnorm.logs.fill_(3.0)  # e³ ≈ 20
    return glow.freeze(g)


def test_lambda_step_lowers_bpd():
    """One outer iteration with a large λ gives simpler images than the λ = 0 step."""
    g = tiny_glow()
    torch.manual_seed(0)
    real = [torch.rand(4, 3, 32, 32) for _ in range(2)]
    alpha0 = 0.2 * torch.randn(2, 3, 32, 32)
    bpd = {}
    for lam in (0.0, 1e4):
        torch.manual_seed(1)
        alpha = alpha0.clone().requires_grad_()
        opt = torch.optim.Adam([alpha], lr=0.1, betas=(0.5, 0.99), eps=1e-6)
        condense.outer_iteration(alpha, opt, real, g, lambda_sim=lam, ipc=1, batch_real=4, width=8,
                                 outer_loop=2, inner_loop=2, batch_size=256, bpd_chunk=50)
        x = condense.synthetic_images(alpha).detach()
        bpd[lam] = glow.bits_per_dim(g, x, noise=False).mean().item()
    assert bpd[1e4] < bpd[0.0] - 0.1


def small_glow():
    """A 2-level Glow, ActNorm initialised on random images, every parameter perturbed."""
    torch.manual_seed(2)
    g = glow.Glow(levels=2, steps=1, hidden=8)
    with torch.no_grad():
        g(glow.to_glow_range(torch.rand(8, 3, 32, 32)))  # data-dependent ActNorm init
        for p in g.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return glow.freeze(g)


def reference_synthetic(alpha):
    sig = torch.sigmoid(alpha)
    return sig + (torch.round(255 * sig) / 255 - sig).detach()  # 8-bit, straight-through


def condensation_grad(net, alpha, *args, **kwargs):
    """(∂L/∂α, L, Σ_c D_c, mean bpd) of condense.condensation_loss (it leaves ∂L/∂α in
    alpha.grad)."""
    alpha.grad = None
    loss, match, bpd = condense.condensation_loss(net, alpha, *args, **kwargs)
    return alpha.grad, loss, match, bpd


def test_condensation_loss_and_its_gradient_match_reference(float64, monkeypatch):
    """Eq. 7: L = Σ_c D_c + λ·mean bpd(X_syn) with a random real batch of each class, and
    ∂L/∂α, against the written-out computation in one graph under the same seed (sampling
    and dequantization noise); the bpd term in chunks of 1, 2 or all images gives the same
    gradient (memory bounded, the result unchanged)."""
    torch.manual_seed(3)
    net = dc_convnet(2, 4)
    real = [torch.rand(5, 3, 32, 32) for _ in range(2)]
    alpha = (0.5 * torch.randn(4, 3, 32, 32)).requires_grad_()  # ipc 2, class-major
    g = small_glow()
    torch.manual_seed(4)
    ref_loss, ref_match, ref_bpd = reference_condensation_loss(
        net, reference_synthetic(alpha), real, 2, 3, g, 0.3)
    ref_grad = torch.autograd.grad(ref_loss, alpha, retain_graph=True)[0]
    ref_rng = torch.get_rng_state()
    for chunk in (1, 3, 50):
        torch.manual_seed(4)
        grad, loss, match, bpd = condensation_grad(
            net, alpha, real, g, lambda_sim=0.3, ipc=2, batch_real=3, bpd_chunk=chunk)
        assert match.item() == pytest.approx(ref_match.item(), rel=1e-10)
        assert bpd.item() == pytest.approx(ref_bpd.item(), rel=1e-10)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-10)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
        assert torch.equal(torch.get_rng_state(), ref_rng)  # the same draws, no more
    # the real batch is a random subset: another draw gives another D
    torch.manual_seed(5)
    other = reference_condensation_loss(net, reference_synthetic(alpha), real, 2, 3, g, 0.3)[1]
    assert abs(other.item() - match.item()) > 1e-4
    # λ = 0 is plain DC (no Glow needed)
    torch.manual_seed(4)
    ref_match_grad = torch.autograd.grad(ref_match, alpha)[0]
    grad, loss, _, bpd = condensation_grad(net, alpha, real, None, lambda_sim=0.0, ipc=2,
                                                    batch_real=3, bpd_chunk=50)
    assert loss.item() == pytest.approx(ref_match.item(), rel=1e-10) and math.isnan(bpd)
    torch.testing.assert_close(grad, ref_match_grad, rtol=1e-9, atol=1e-12)
    # a bpd term whose value, or only its gradient, is not finite is left out of the loss
    # and the gradient (authors' code skipped a non-finite bpd)
    for fake in (lambda g, x, *a, **k: x.sum((1, 2, 3)) * math.inf,  # value inf
                 lambda g, x, *a, **k: 3 + (x - x.detach()).abs().sqrt().sum((1, 2, 3))):
        monkeypatch.setattr(condense.glow, "bits_per_dim", fake)  # the second: 3, ∂ = NaN
        torch.manual_seed(4)
        grad, loss, _, bpd = condensation_grad(net, alpha, real, g, lambda_sim=0.3,
                                                        ipc=2, batch_real=3, bpd_chunk=50)
        assert loss.item() == pytest.approx(ref_match.item(), rel=1e-10) and math.isnan(bpd)
        torch.testing.assert_close(grad, ref_match_grad, rtol=1e-9, atol=1e-12)


def test_synthetic_images_by_hand():
    """X_syn = quantize(sigmoid(α)): forward round(255·σ(α))/255, backward σ'(α) (STE)."""
    values = [-10.0, 0.1, 0.3, 2.0, 10.0]
    alpha = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    x = condense.synthetic_images(alpha)
    sig = [1 / (1 + math.exp(-a)) for a in values]
    assert x.tolist() == pytest.approx([round(255 * s) / 255 for s in sig], abs=1e-12)
    assert [round(255 * s) for s in sig] == [0, 134, 146, 225, 255]  # 8-bit levels
    (grad,) = torch.autograd.grad(x.sum(), alpha)
    assert grad.tolist() == pytest.approx([s * (1 - s) for s in sig], rel=1e-10)


def chunks_of(monkeypatch, images, width):
    """Make condense pass `images` images at a time on a CPU (None: its own chunk size)."""
    if images is not None:
        monkeypatch.setattr(condense, "CPU_CHUNK_BYTES", images * 4 * width * 32 * 32)


def test_chunk_size_keeps_a_cpu_pass_within_its_budget_and_a_gpu_batch_whole():
    net = dc_convnet(10, 128)  # DC's width: a first-layer activation of 512 KiB an image
    assert condense.chunk_size(net, torch.empty(256, 3, 32, 32)) == 8  # 4 MiB
    assert condense.chunk_size(dc_convnet(10, 32), torch.empty(256, 3, 32, 32)) == 32
    assert condense.chunk_size(net, torch.empty(256, 3, 32, 32, device="meta")) == 256
    assert condense.chunk_size(dc_convnet(2, 4096), torch.empty(8, 3, 32, 32)) == 1


@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_outer_iteration_matches_reference(float64, monkeypatch, chunk):
    """One outer iteration of DC with Eq. 7 (Sec. 4), re-implemented with torch.optim: a fresh
    ConvNet; outer_loop Adam steps on α, and between them (not after the last) inner_loop
    epochs of SGD (lr 0.01, momentum 0.5) of the net on the detached synthetic set in random
    minibatches. Same seed, same draws: the same α, loss and RNG state afterwards. The
    reference takes every gradient of a batch in one pass and of every parameter; condense
    in chunks of 1 or 2 images (of 3: a remainder) and only of the weights Eq. 6 compares."""
    ipc, width, outer_loop, inner_loop, batch_size, lam = 2, 4, 3, 2, 3, 0.5
    chunks_of(monkeypatch, chunk, width)
    torch.manual_seed(6)
    real = [torch.rand(4, 3, 32, 32) for _ in range(2)]
    alpha0 = 0.2 * torch.randn(2 * ipc, 3, 32, 32)
    g = small_glow()

    alpha = alpha0.clone().requires_grad_()
    optimizer = torch.optim.Adam([alpha], lr=0.1, betas=(0.5, 0.99), eps=1e-6)
    torch.manual_seed(7)
    metrics = condense.outer_iteration(alpha=alpha, optimizer=optimizer, real_by_class=real,
                                       glow_model=g, lambda_sim=lam, ipc=ipc, batch_real=3,
                                       width=width, outer_loop=outer_loop, inner_loop=inner_loop,
                                       batch_size=batch_size, bpd_chunk=3)
    rng_after = torch.get_rng_state()

    ref_alpha = alpha0.clone().requires_grad_()
    ref_optimizer = torch.optim.Adam([ref_alpha], lr=0.1, betas=(0.5, 0.99), eps=1e-6)
    labels = torch.tensor([0, 0, 1, 1])
    torch.manual_seed(7)
    net = dc_convnet(2, width)  # fresh random weights from the global RNG
    net_optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.5)
    for step in range(outer_loop):
        loss, match, bpd = reference_condensation_loss(net, reference_synthetic(ref_alpha), real,
                                                       ipc, 3, g, lam)
        ref_optimizer.zero_grad()
        ref_alpha.grad = torch.autograd.grad(loss, ref_alpha)[0]
        ref_optimizer.step()
        if step == outer_loop - 1:
            break  # no network training after the last image update
        x_fixed = (torch.round(255 * torch.sigmoid(ref_alpha)) / 255).detach()
        net.train()
        for _ in range(inner_loop):
            for idx in torch.randperm(len(x_fixed)).split(batch_size):
                net_optimizer.zero_grad()
                F.cross_entropy(net(x_fixed[idx]), labels[idx]).backward()
                net_optimizer.step()

    torch.testing.assert_close(alpha.detach(), ref_alpha.detach(), rtol=1e-9, atol=1e-11)
    assert float(metrics["loss"]) == pytest.approx(loss.item(), rel=1e-9)
    assert float(metrics["match"]) == pytest.approx(match.item(), rel=1e-9)
    assert float(metrics["bpd"]) == pytest.approx(bpd.item(), rel=1e-9)
    assert torch.equal(rng_after, torch.get_rng_state())  # the same random draws, no more
    assert not torch.equal(alpha.detach(), alpha0)


@pytest.mark.parametrize("dataset, augment, epochs", [
    ("mnist", True, 1000), ("fashionmnist", False, 300), ("svhn", False, 300),
    ("cifar10", False, 300), ("cifar100", False, 300), ("shapes", False, 300),
    ("./mnist", False, 300)])  # a folder named mnist is not DC's MNIST
def test_each_dataset_is_evaluated_as_dc_evaluates_it(dataset, augment, epochs):
    """DC's get_daparam and main.py, written out: only MNIST is augmented (with
    crop_scale_rotate), and an augmented evaluation trains 1000 epochs, the others 300;
    --quick trains 100, and an explicit --eval-epochs wins."""
    assert condense.eval_protocol(dataset) == (augment, epochs)
    cfg = condense.resolve_config(condense.get_args(["--dataset", dataset]))
    assert cfg.eval_epochs == epochs and cfg.num_eval == 5  # the authors' 5 (DC: 20)
    assert condense.resolve_config(condense.get_args(["--dataset", dataset, "--quick"])).eval_epochs == 100
    assert condense.resolve_config(condense.get_args(["--dataset", dataset, "--eval-epochs",
                                                      "7"])).eval_epochs == 7


def dc_augment_reference(x, draws, crop=4):
    """DC's `augment` (crop_scale_rotate), one image at a time as DC writes it, with given
    draws; the rotation written out as bilinear interpolation pixel by pixel (DC: scipy)."""
    out = x.clone()
    b, c, h, w = x.shape
    mean = [x[:, ch].mean().item() for ch in range(c)]
    for i in range(b):
        op = draws["op"][i].item()
        if op == 0:  # DC's cropfun
            im = torch.empty(c, h + 2 * crop, w + 2 * crop)
            for ch in range(c):
                im[ch] = mean[ch]
            im[:, crop:crop + h, crop:crop + w] = x[i]
            r, col = draws["shift"][i].tolist()
            out[i] = im[:, r:r + h, col:col + w]
        elif op == 1:  # DC's scalefun
            sh, sw = draws["size"][i].tolist()
            tmp = F.interpolate(x[i:i + 1], [sh, sw])[0]  # nearest, DC's default
            mhw = max(sh, sw, h, w)
            im = torch.zeros(c, mhw, mhw)
            r, col = int((mhw - sh) / 2), int((mhw - sw) / 2)
            im[:, r:r + sh, col:col + sw] = tmp
            r, col = int((mhw - h) / 2), int((mhw - w) / 2)
            out[i] = im[:, r:r + h, col:col + w]
        else:  # rotation about the centre, bilinear, filled with the mean of the means
            t = math.radians(draws["angle"][i].item())
            fill = sum(mean) / c
            for y in range(h):
                for x_ in range(w):
                    dy, dx = y - (h - 1) / 2, x_ - (w - 1) / 2
                    sy = math.cos(t) * dy - math.sin(t) * dx + (h - 1) / 2
                    sx = math.sin(t) * dy + math.cos(t) * dx + (w - 1) / 2
                    y0, x0 = math.floor(sy), math.floor(sx)
                    value = torch.zeros(c)
                    for yy, wy in ((y0, 1 - (sy - y0)), (y0 + 1, sy - y0)):
                        for xx, wx in ((x0, 1 - (sx - x0)), (x0 + 1, sx - x0)):
                            inside = 0 <= yy < h and 0 <= xx < w
                            value += wy * wx * (x[i, :, yy, xx] if inside else torch.full((c,), fill))
                    out[i, :, y, x_] = value
    return out


def test_dc_augment_is_dcs_crop_scale_rotate():
    """dc_augment against DC's per-image procedure written out (crop padded with the batch's
    channel means, nearest-neighbour scaling on a zero canvas, rotation filled with the
    mean of the means), for every operation, offsets at both ends, sizes below and above
    the image; and the draws lie in DC's ranges."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(9, 3, 12, 12, generator=g) - 0.3
    draws = dict(op=torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2]),
                 shift=torch.tensor([[0, 0], [7, 7], [2, 5]] + [[0, 0]] * 6),
                 size=torch.tensor([[12, 12]] * 3 + [[9, 14], [14, 9], [10, 10], [13, 12]]
                                   + [[12, 12]] * 2),
                 angle=torch.tensor([0.0] * 7 + [30.0, -45.0]))
    torch.testing.assert_close(condense.dc_augment(x, draws), dc_augment_reference(x, draws),
                               atol=1e-5, rtol=0)
    torch.manual_seed(1)
    d = condense.sample_dc_augment(4000, 32)
    assert set(d["op"].tolist()) == {0, 1, 2} and set(d["shift"].flatten().tolist()) == set(range(8))
    assert d["size"].min() == 25 and d["size"].max() == 38  # int(U(0.8, 1.2)·32)
    assert set(d["angle"].tolist()) == set(float(a) for a in range(-45, 45))
    for op in range(3):  # one operation per image, uniformly
        assert abs((d["op"] == op).float().mean().item() - 1 / 3) < 0.03


def test_mnist_evaluation_augments_each_batch_and_random_real_draws_anew(monkeypatch):
    """With augment, every training batch goes through dc_augment on the network's input
    (x − 0.5): a batch of one grey image stays grey whatever the draws; and the random
    real baseline is evaluated on a new draw per evaluation network."""
    seen = []
    real = condense.dc_augment
    monkeypatch.setattr(condense, "dc_augment", lambda x, d: seen.append(x.clone()) or real(x, d))
    x, y = torch.full((5, 3, 32, 32), 0.5), torch.arange(5) % 2
    condense.evaluate_synset([(x, y)], x[:2], y[:2], num_classes=2, epochs=3, width=4,
                             batch_size=2, seed=0, augment=True)
    assert len(seen) == 4 * 3 and all(torch.equal(b, torch.zeros_like(b)) for b in seen)
    seen.clear()
    condense.evaluate_synset([(x, y)], x[:2], y[:2], num_classes=2, epochs=3, width=4,
                             batch_size=2, seed=0)
    assert not seen
    gen = torch.Generator().manual_seed(0)
    real_by_class = [torch.rand(20, 3, 32, 32), torch.rand(20, 3, 32, 32)]
    draws = [condense.random_real(real_by_class, 2, gen) for _ in range(3)]
    assert not torch.equal(draws[0][0], draws[1][0])


@pytest.mark.parametrize("chunk", [None, 2])
def test_evaluate_follows_dc_protocol(float64, monkeypatch, chunk):
    """DC's evaluate_synset (Sec. 4), re-implemented: from the seed, one fresh ConvNet per
    training set, each trained for epochs + 1 epochs (DC's range(Epoch + 1)) with SGD lr
    0.01, momentum 0.9, weight decay 5e-4 in random minibatches, and after epoch
    epochs // 2 + 1 on a new SGD at lr 0.001 (DC re-creates it: the momentum restarts);
    returns their test accuracies; the global RNG is untouched. Minibatches of 3 in chunks
    of 2 images train the same networks."""
    chunks_of(monkeypatch, chunk, 4)
    torch.manual_seed(8)
    x_train, y_train = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    x_test, y_test = torch.rand(6, 3, 32, 32), torch.tensor([0, 1, 1, 0, 1, 0])
    trained = []
    score = condense.test_accuracy

    def record(net, x, y, *args, **kwargs):
        trained.append({k: v.clone() for k, v in net.state_dict().items()})
        return score(net, x, y, *args, **kwargs)

    monkeypatch.setattr(condense, "test_accuracy", record)
    rng_before = torch.get_rng_state()
    accs = condense.evaluate_synset([(x_train, y_train)] * 2, x_test, y_test, num_classes=2,
                                    epochs=5, width=4, batch_size=3, seed=9)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert len(accs) == len(trained) == 2

    torch.manual_seed(9)
    for k in range(2):
        net = dc_convnet(2, 4)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        for epoch in range(6):  # DC: range(Epoch + 1)
            net.train()
            for idx in torch.randperm(4).split(3):
                opt.zero_grad()
                F.cross_entropy(net(x_train[idx]), y_train[idx]).backward()
                opt.step()
            if epoch == 3:  # DC: lr_schedule = [Epoch // 2 + 1], momentum buffers dropped
                opt = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9, weight_decay=5e-4)
        for name, value in net.state_dict().items():
            torch.testing.assert_close(trained[k][name], value, rtol=1e-10, atol=1e-12, msg=name)
        with torch.no_grad():
            acc = (net.eval()(x_test).argmax(1) == y_test).double().mean().item()
        assert accs[k] == pytest.approx(acc)
    assert not torch.equal(trained[0]["classifier.weight"], trained[1]["classifier.weight"])


def test_test_accuracy_and_population_std_by_hand():
    class Fixed(torch.nn.Module):  # predicts class 1 iff the first pixel is > 0.5
        config = dict(width=1)  # (chunk_size reads a ConvNet's width)

        def forward(self, x):
            p = x[:, 0, 0, 0]
            return torch.stack([0.5 - p, p - 0.5], dim=1)
    x = torch.zeros(5, 3, 32, 32)
    x[[0, 2, 3], 0, 0, 0] = 1.0
    y = torch.tensor([1, 1, 1, 0, 0])
    assert condense.test_accuracy(Fixed(), x, y, batch_size=2) == pytest.approx(3 / 5)
    mean, std = condense.mean_std([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7) and std == pytest.approx(math.sqrt(0.08 / 3))  # np.std


def test_synthetic_grid_rows_per_class_or_one_row_or_a_square(tmp_path):
    """Fig. 6's grid: ipc > 1 a row per class; ipc = 1 one row of up to 20 classes, and a
    square of rows beyond (CIFAR-100: 10×10, not one row of 100 images)."""
    from PIL import Image
    sizes = {}
    for classes, ipc in ((10, 1), (100, 1), (3, 4)):
        path = tmp_path / f"{classes}-{ipc}.png"
        condense.save_grid(path, torch.rand(classes * ipc, 3, 32, 32),
                           [f"c{i}" for i in range(classes)], ipc)
        sizes[classes, ipc] = Image.open(path).size
    tile = sizes[10, 1][0] // 10  # (width, height) of one captioned image and its padding
    assert sizes[100, 1][0] // tile == 10 and sizes[100, 1][1] == 10 * sizes[10, 1][1] - 18
    assert sizes[3, 4][0] // tile == 4 and sizes[3, 4][1] == 3 * sizes[10, 1][1] - 2 * 2


def test_mean_bpd_scores_8_bit_images_from_a_seeded_stream():
    g = small_glow()
    torch.manual_seed(10)
    x = torch.rand(3, 3, 32, 32)
    rng_before = torch.get_rng_state()
    value = condense.mean_bpd(g, x, seed=11)
    assert torch.equal(torch.get_rng_state(), rng_before)
    torch.manual_seed(11)
    expected = glow.bits_per_dim(g, torch.round(255 * x) / 255).mean().item()
    assert value == pytest.approx(expected, rel=1e-6)


def test_main_image_optimizer_and_alpha_init(tmp_path):
    """main: Adam(lr 0.1, betas (0.5, 0.99), eps 1e-6) on α and α₀ = 0.2·N(0, 1) (authors'
    condensation code), read back from the checkpoint after one image update: its Adam
    state (m = (1 − β₁)·g, v = (1 − β₂)·g²) gives α₀ = α₁ + 0.1·m̂/(√v̂ + 1e-6)."""
    glow_path = tmp_path / "glow.pt"
    glow.save_glow(glow.Glow(levels=1, steps=1, hidden=8), glow_path)
    run_main(tmp_path / "c", glow_path, "--iterations", "1", "--width", "4", "--num-eval", "1",
             "--eval-epochs", "1")
    ckpt = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)
    group = ckpt["optimizer"]["param_groups"][0]
    assert group["lr"] == 0.1 and tuple(group["betas"]) == (0.5, 0.99) and group["eps"] == 1e-6
    assert group["weight_decay"] == 0 and not group["amsgrad"]
    state = ckpt["optimizer"]["state"][0]
    m, v = state["exp_avg"].double(), state["exp_avg_sq"].double()
    assert float(state["step"]) == 1
    torch.testing.assert_close(v, 0.04 * m ** 2, rtol=1e-5, atol=1e-30)  # 0.01·g² = 0.04·(0.5·g)²
    alpha0 = ckpt["alpha"].double() + 0.1 * (m / 0.5) / ((v / 0.01).sqrt() + 1e-6)  # (5, 3, 32, 32)
    # 15360 draws of 0.2·N(0, 1): mean 0 ± 0.0016, std 0.2 ± 0.0011, 68.3% within one std
    assert abs(alpha0.mean().item()) < 0.01 and alpha0.std().item() == pytest.approx(0.2, abs=0.006)
    assert (alpha0.abs() < 0.2).double().mean().item() == pytest.approx(0.6827, abs=0.02)


def run_main(out, glow_path, *extra):
    argv = ["--dataset", "shapes", "--train-size", "60", "--test-size", "40", "--ipc", "1",
            "--batch-real", "8", "--width", "8", "--num-eval", "2", "--eval-epochs", "2",
            "--glow", str(glow_path), "--device", "cpu", "--lambda-sim", "1",
            "--out", str(out), *extra]
    return condense.main(condense.get_args(argv))


def test_main_smoke_and_resume(tmp_path, monkeypatch):
    glow_path = tmp_path / "glow.pt"
    glow.save_glow(glow.Glow(levels=1, steps=1, hidden=8), glow_path)
    evaluated, evaluate = [], condense.evaluate_synset
    monkeypatch.setattr(condense, "evaluate_synset", lambda sets, *a, **k: evaluated.append(
        sets) or evaluate(sets, *a, **k))
    results = run_main(tmp_path / "a", glow_path, "--iterations", "4", "--eval-at", "0,2")
    # 3 evaluations of the condensed set, each once per network; then random real images,
    # a new draw (one image per class) for each network
    assert [len(sets) for sets in evaluated] == [2] * 4
    assert all(sets[0] is sets[1] for sets in evaluated[:3])
    (x1, y1), (x2, y2) = evaluated[3]
    assert y1.tolist() == y2.tolist() == [0, 1, 2, 3, 4] and not torch.equal(x1, x2)
    monkeypatch.setattr(condense, "evaluate_synset", evaluate)
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved.keys() == results.keys()
    for key, value in results.items():  # approx() takes lists but no nested containers
        assert saved[key] == pytest.approx(value), key
    for key in ["ipc", "test_acc_mean", "test_acc_std", "random_real_acc_mean",
                "random_real_acc_std", "bpd_synthetic", "bpd_real", "lambda_sim", "iterations"]:
        assert key in saved
    assert saved["ipc"] == 1 and saved["iterations"] == 4
    assert 0 <= saved["test_acc_mean"] <= 1 and 0 <= saved["random_real_acc_mean"] <= 1
    assert 0 < saved["bpd_synthetic"] < 20 and 0 < saved["bpd_real"] < 20
    syn = torch.load(tmp_path / "a" / "synthetic.pt", weights_only=True)
    assert syn["images"].shape == (5, 3, 32, 32) and syn["labels"].tolist() == [0, 1, 2, 3, 4]
    assert syn["images"].min() >= 0 and syn["images"].max() <= 1
    assert torch.equal(syn["images"], torch.round(syn["images"] * 255) / 255)  # 8-bit levels
    for name in ["args.json", "metrics.jsonl", "synthetic.png", "random_real.png"]:
        assert (tmp_path / "a" / name).exists()
    evals = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert [m["iteration"] for m in evals if "test_acc_mean" in m] == [0, 2, 4]
    # interrupted after 2 iterations, then resumed: the same synthetic set as one run
    run_main(tmp_path / "b", glow_path, "--iterations", "2")
    run_main(tmp_path / "b", glow_path, "--iterations", "4", "--resume")
    resumed = torch.load(tmp_path / "b" / "synthetic.pt", weights_only=True)
    assert torch.equal(resumed["images"], syn["images"])


def test_bad_flag_exits_with_status_2(tmp_path):
    proc = subprocess.run([sys.executable, "condense.py", "--dataset", "shapes", "--ipc", "0",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "--ipc" in proc.stderr


def test_compiled_condensation_and_evaluation_equal_eager():
    """--compile: an outer iteration whose real gradients and inner training run through
    the torch.compile'd ConvNet (the synthetic side, differentiated twice, stays eager),
    and DC's evaluation with compiled networks, give the eager α and accuracies.

    α takes SGD steps here, not a run's Adam: Adam's first step lr·g/(|g| + ε) has slope
    lr/ε = 1e5 at g ≈ 0, so a reassociation difference of 1e-10 in a near-zero gradient
    moves α by 1e-5, by as much as the CPU's kernels happen to round. SGD moves α by
    lr·g, so the two moves differ by lr times the gradients' float32 rounding: ~1e-6 of
    the largest move on the CPUs tried (both kinds of inner training and real gradients
    are sums of ≤ 1e4 float32 products). The bound, 1e-4 of the largest move, leaves
    100× for other kernels and fails on any real difference (a gradient left out, another
    network), which moves α by a fraction of itself. The match of Eq. 6 is a sum of
    cosine distances of that size: rel 1e-5. Both evaluations train on the eager run's
    images (α apart by rounding could round a pixel to the other 8-bit level); their
    accuracies are counts of argmaxes, equal unless a test logit pair ties to float32
    rounding."""
    torch.manual_seed(2)
    real = [torch.rand(4, 3, 32, 32) for _ in range(2)]
    alpha0 = 0.2 * torch.randn(4, 3, 32, 32)
    results = []
    for compile in (False, True):
        alpha = alpha0.clone().requires_grad_()
        optimizer = torch.optim.SGD([alpha], lr=1.0)
        torch.manual_seed(3)
        metrics = condense.outer_iteration(alpha, optimizer, real, None, lambda_sim=0.0, ipc=2,
                                           batch_real=3, width=4, outer_loop=2, inner_loop=2,
                                           batch_size=3, bpd_chunk=2, compile=compile)
        if not compile:
            x = condense.synthetic_images(alpha).detach()  # the eager run's images for both
        accs = condense.evaluate_synset([(x, torch.tensor([0, 0, 1, 1]))], real[0], torch.zeros(
            4, dtype=torch.long), num_classes=2, epochs=2, width=4, batch_size=3, seed=0,
            compile=compile)
        results.append((alpha.detach() - alpha0, float(metrics["match"]), accs))
    moved = results[0][0]
    assert moved.abs().max() > 0.1  # the images moved
    torch.testing.assert_close(results[1][0], moved, rtol=0, atol=1e-4 * moved.abs().max().item())
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-5)
    assert results[1][2] == results[0][2]
