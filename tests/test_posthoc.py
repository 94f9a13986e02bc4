"""Tests of posthoc.py (Sec. 5, Alg. 1/2, S4): KL and the masked cosine distance by hand,
per-example gate gradients against a loop, the whole loss of Alg. 2 (as the authors coded
it) and its gradient w.r.t. z_sim against an independent re-implementation, the draws of
s and α, the zeroing of non-finite examples, the choice of images, the authors' defaults,
and tiny end-to-end runs of main()."""
import copy
import inspect
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.func import functional_call

import glow
import nets
import posthoc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def floats(parts):
    """posthoc_loss keeps its parts as 0-dim tensors on the device (no host sync per step)."""
    return {k: float(v) for k, v in parts.items()}


def tiny_glow(dtype=torch.float32, frozen=True):
    """A 3-level Glow with one tiny flow step per level, ActNorm initialised on random data;
    frozen for scoring, or as it is (to perturb or save it)."""
    torch.manual_seed(0)
    g = glow.Glow(levels=3, steps=1, hidden=8).to(dtype)
    with torch.no_grad():
        g(glow.to_glow_range(torch.rand(16, 3, 32, 32, dtype=dtype)))  # data-dependent ActNorm init
    return glow.freeze(g) if frozen else g


def tiny_classifier(dtype=torch.float32, num_classes=3):
    torch.manual_seed(1)
    return nets.NFWideResNet(num_classes, depth=10, widen=1).to(dtype).eval().requires_grad_(False)


def kl_ref(logits_p, logits_q):
    """KL(p ‖ q) per row, written out: Σ_k p_k·(log p_k − log q_k), p, q the softmaxes."""
    p, q = torch.softmax(logits_p, dim=1), torch.softmax(logits_q, dim=1)
    return (p * (p.log() - q.log())).sum(dim=1)


def test_kl_divergence_by_hand():
    """KL(p_a ‖ p_b) = Σ p_a·log(p_a/p_b), per example, the first argument is the reference
    distribution (the authors' kl_divergence(a, b)); logits are shift invariant."""
    a = torch.tensor([[0.0, 0.0, 0.0], [math.log(4), 0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, math.log(2), math.log(3)], [5.0, 5.0, 5.0]], dtype=torch.float64)
    # row 0: p = (1, 1, 1)/3, q = (1, 2, 3)/6;  row 1: p = (4, 1, 1)/6, q = (1, 1, 1)/3
    forward = [(math.log(2) + math.log(1) + math.log(2 / 3)) / 3,
               4 / 6 * math.log(2) + 2 / 6 * math.log(1 / 2)]
    backward = [1 / 6 * math.log(1 / 2) + 2 / 6 * math.log(1) + 3 / 6 * math.log(3 / 2),
                1 / 3 * math.log(1 / 2) + 2 / 3 * math.log(2)]
    assert posthoc.kl_divergence(a, b).tolist() == pytest.approx(forward, rel=1e-12)
    assert posthoc.kl_divergence(b, a).tolist() == pytest.approx(backward, rel=1e-12)
    assert posthoc.kl_divergence(a, a + 3).tolist() == pytest.approx([0, 0], abs=1e-12)


def test_straight_through_clamp_by_hand():
    x = torch.tensor([-0.5, 0.0, 0.3, 1.0, 1.7], dtype=torch.float64, requires_grad=True)
    y = posthoc.straight_through_clamp(x)
    assert y.tolist() == [0.0, 0.0, 0.3, 1.0, 1.0]
    (grad,) = torch.autograd.grad((y * torch.arange(1.0, 6.0, dtype=torch.float64)).sum(), x)
    assert grad.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]  # identity backward, also outside [0, 1]


def test_gate_gradients_match_per_example_loop():
    """vmap(grad) gate gradients p_s ⊙ ∂KL_i/∂p_s equal a loop of torch.autograd.grad, and so
    does their gradient w.r.t. the input (the create-graph path used for g_m)."""
    model = tiny_classifier(torch.float64)
    params = {n: p.detach() * 0.9 for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    torch.manual_seed(2)
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 3, dtype=torch.float64)
    gates = posthoc.gate_gradients(model, params, buffers, x, target)
    weights = {n: torch.randn_like(g) for n, g in gates.items()}  # a random linear read-out
    (x_grad,) = torch.autograd.grad(sum((gates[n] * weights[n]).sum() for n in gates), x)

    loop_x_grad = torch.zeros_like(x)
    for i in range(3):
        p = {n: v.clone().requires_grad_(True) for n, v in params.items()}
        x_i = x[i:i + 1].detach().requires_grad_(True)
        kl = kl_ref(target[i:i + 1], functional_call(model, (p, buffers), (x_i,))).sum()
        grads = torch.autograd.grad(kl, list(p.values()), create_graph=True)
        readout = 0
        for (n, v), g in zip(p.items(), grads):
            torch.testing.assert_close(gates[n][i], (v * g).detach(), rtol=1e-9, atol=1e-12)
            readout = readout + (v * g * weights[n][i]).sum()
        loop_x_grad[i] = torch.autograd.grad(readout, x_i)[0][0]
    torch.testing.assert_close(x_grad, loop_x_grad, rtol=1e-8, atol=1e-12)


def test_masked_cosine_distance_by_hand():
    """1 − mean over (tensors × examples) of cos restricted to entries where g_o < 0."""
    g_o = {"w": torch.tensor([[-1.0, 2.0, -3.0], [4.0, -2.0, 0.0]]),
           "b": torch.tensor([[[-1.0, -1.0]], [[1.0, 1.0]]])}  # shapes (2, 3) and (2, 1, 2)
    g_m = {"w": torch.tensor([[-2.0, 7.0, 1.0], [5.0, -1.0, 9.0]]),
           "b": torch.tensor([[[3.0, -1.0]], [[2.0, 2.0]]])}
    # w, example 0: entries 0, 2 -> a = (-1, -3), b = (-2, 1): cos = (2 − 3)/(√10·√5)
    # w, example 1: entry 1 only -> cos = (−2·−1)/(2·1) = 1
    # b, example 0: a = (−1, −1), b = (3, −1): cos = −2/(√2·√10);  b, example 1: empty mask -> 0
    by_hand = [-1 / (10 ** 0.5 * 5 ** 0.5), 1.0, -2 / (2 ** 0.5 * 10 ** 0.5), 0.0]
    expected = 1 - sum(by_hand) / 4
    result = posthoc.masked_cosine_distance(g_o, g_m)
    assert result.item() == pytest.approx(expected, rel=1e-6)
    # entries with g_o >= 0 are ignored: changing g_m there changes nothing
    g_m2 = {n: torch.where(g_o[n] < 0, g_m[n], torch.randn_like(g_m[n]) * 100) for n in g_m}
    assert posthoc.masked_cosine_distance(g_o, g_m2).item() == pytest.approx(expected, rel=1e-6)
    # identical gradients: distance 0 where every example has a negative entry
    g_same = {"w": g_o["w"]}
    assert posthoc.masked_cosine_distance(g_same, g_same).item() == pytest.approx(0.0, abs=1e-6)


def latents_setup(num=2):
    model, g = tiny_classifier(), tiny_glow()
    torch.manual_seed(3)
    x = torch.rand(num, 3, 32, 32)
    with torch.no_grad():
        h, z_orig = model(x), glow.encode(g, x)
    return model, g, x, h, z_orig


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_loss_gradient_reaches_latents_through_decode(alpha):
    model, g, x, h, z_orig = latents_setup()
    z_sim = [(0.1 * torch.randn_like(z)).requires_grad_(True) for z in z_orig]
    loss, parts = posthoc.posthoc_loss(model, g, z_sim, z_orig, x, h, 0.9, alpha, 1.0)
    parts = floats(parts)  # 0-dim tensors on the device
    loss.backward()
    assert torch.isfinite(loss) and set(parts) >= {"loss", "l_grad", "l_pred", "bpd"}
    for z in z_sim:
        assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    # the loss is the authors' weighted sum (10·L_grad + λ·bpd + L_pred)/(12 + λ)
    expected = (10 * parts["l_grad"] + parts["bpd"] + parts["l_pred"]) / 13
    assert parts["loss"] == pytest.approx(expected, rel=1e-5)


def test_alpha_interpolates_between_original_and_simplified():
    """Alg. 2 decodes z_mix = α·z_sim + (1−α)·z: with z_sim = z the mix is z_sim for every α
    (same loss as Alg. 1's α = 1), and α → 0 gives the original image (no gradient or
    prediction difference left)."""
    model, g, x, h, z_orig = latents_setup()
    z_sim = [(0.3 * torch.randn_like(z)) for z in z_orig]
    losses = []
    for alpha in (1.0, 0.3):
        torch.manual_seed(4)  # same dequantization noise in the bpd term
        losses.append(floats(posthoc.posthoc_loss(model, g, z_orig, z_orig, x, h, 0.9, alpha, 1.0)[1]))
    # 0.3·z + 0.7·z is z to about an ulp, so the parts agree to ~1e-7 relative (seen: equal);
    # l_pred is a float32 KL of two equal predictions, a few 1e-8 of noise (hence abs 1e-6)
    for key in ("loss", "l_grad", "l_pred", "bpd"):
        assert losses[0][key] == pytest.approx(losses[1][key], rel=1e-4, abs=1e-6)
    # α → 0: x_mix = x, so L_grad drops to its floor (tensors whose gate gradients are all
    # ≥ 0 on x, e.g. zero biases, have an empty mask and always count cos = 0) and L_pred to 0
    floor = losses[0]["l_grad"]
    tiny_alpha = floats(posthoc.posthoc_loss(model, g, z_sim, z_orig, x, h, 0.9, 1e-7, 1.0)[1])
    full = floats(posthoc.posthoc_loss(model, g, z_sim, z_orig, x, h, 0.9, 1.0, 1.0)[1])
    assert tiny_alpha["l_grad"] == pytest.approx(floor, abs=1e-3) and tiny_alpha["l_pred"] < 1e-6
    assert full["l_grad"] > floor + 0.05 and full["l_pred"] > 1e-4
    # simplify_step: Alg. 1 always uses α = 1, Alg. 2 draws α = 1 − U[0, 1) from torch's RNG
    step_args = SimpleNamespace(scale_min=0.8, scale_max=0.95, lambda_sim=1.0)
    for algorithm in (1, 2):
        z = [zz.clone().requires_grad_(True) for zz in z_sim]
        optimizer = torch.optim.Adam(z, lr=1e-2)
        torch.manual_seed(5)
        draws = torch.rand(2)
        torch.manual_seed(5)
        parts = posthoc.simplify_step(model, g, z, z_orig, x, h, optimizer,
                                      SimpleNamespace(algorithm=algorithm, **vars(step_args)))
        assert parts["s"] == pytest.approx(0.8 + 0.15 * draws[0].item())
        assert parts["alpha"] == pytest.approx(1.0 if algorithm == 1 else 1 - draws[1].item())
        assert all(not torch.equal(a, b) for a, b in zip(z, z_sim))  # Adam moved z_sim


def float64_problem():
    """A float64 classifier whose every parameter tensor is perturbed (non-zero biases, gains
    ≠ 1, so that every tensor of f_s matters), a 2-level Glow (ActNorm initialised, weights
    perturbed), two images and latents z_sim whose decoded images leave [0, 1] in places."""
    model = tiny_classifier(torch.float64)
    torch.manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = glow.Glow(levels=2, steps=1, hidden=8).double()
    with torch.no_grad():
        g(glow.to_glow_range(torch.rand(16, 3, 32, 32, dtype=torch.float64)))  # ActNorm init
        for p in g.parameters():
            p.add_(0.01 * torch.randn_like(p))
    g = glow.freeze(g)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        h, z_orig = model(x), glow.encode(g, x)
    z_sim = [1.5 * torch.randn_like(z) for z in z_orig]
    return model, g, x, h, z_orig, z_sim


def reference_posthoc_loss(model, g, z_sim, z_orig, x, s, alpha, lambda_sim, noise_seed, base=None):
    """Alg. 2 (S4) as the authors coded it, written out independently of posthoc.py:

    f_s is a deep copy of f with every parameter multiplied by s in place; the gate gradients
    p_s ⊙ ∂KL(target_i ‖ f_s(x_i))/∂p_s come from a loop of torch.autograd.grad over the
    examples; target h = f(x) for the original, h_mix = f(x_mix) for the mixed image; per
    tensor and example the cosine over the entries where g_o < 0 (0 if there are none);
    L_pred = KL(h_s ‖ h_mix,s) + KL(h ‖ h_mix); bpd of the 8-bit x_sim with the dequantization
    noise drawn after seeding `noise_seed`; L = (10·L_grad + λ·bpd + L_pred)/(12 + λ).

    The classifier sees decode(z_mix) clamped to [0, 1] and Glow scores round(255·x_sim)/255,
    both straight-through; for finite differences around `base` (latents) the clamp and the
    rounding are taken at `base` and the decoded images enter linearly around it.
    """
    base = z_sim if base is None else base
    f_s = copy.deepcopy(model).requires_grad_(True)
    with torch.no_grad():
        for p in f_s.parameters():
            p.mul_(s)
    params = list(f_s.parameters())

    def mix(z):
        return [alpha * a + (1 - alpha) * b for a, b in zip(z, z_orig)]

    def decoded(z, z0):  # clamp(decode(z0)) + (decode(z) − decode(z0))
        x_z, x_0 = glow.decode(g, z), glow.decode(g, z0)
        return x_z - x_0 + x_0.clamp(0, 1), x_0.clamp(0, 1)

    def gates(x_i, target_i):
        kl = kl_ref(target_i[None], f_s(x_i[None]))[0]
        return [p.detach() * d for p, d in zip(params, torch.autograd.grad(kl, params))]

    x_mix, _ = decoded(mix(z_sim), mix(base))
    x_sim, x_sim0 = decoded(z_sim, base)
    x_sim = x_sim - x_sim0 + torch.round(255 * x_sim0) / 255  # 8-bit, straight-through
    with torch.no_grad():
        h, h_mix = model(x), model(x_mix)
        h_s, h_mix_s = f_s(x), f_s(x_mix)
    cosines = []
    for i in range(len(x)):
        for a, b in zip(gates(x[i], h[i]), gates(x_mix[i], h_mix[i])):
            keep = a < 0
            if keep.any():
                a, b = a[keep], b[keep]
                cosines.append((a @ b / (a.norm() * b.norm())).item())
            else:
                cosines.append(0.0)
    l_grad = 1 - sum(cosines) / len(cosines)
    l_pred = (kl_ref(h_s, h_mix_s).mean() + kl_ref(h, h_mix).mean()).item()
    torch.manual_seed(noise_seed)
    with torch.no_grad():
        bpd = glow.bits_per_dim(g, x_sim).mean().item()
    loss = (10 * l_grad + lambda_sim * bpd + l_pred) / (12 + lambda_sim)
    return dict(loss=loss, l_grad=l_grad, l_pred=l_pred, bpd=bpd, cosines=cosines)


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_posthoc_loss_matches_independent_computation(alpha):
    """The whole loss of Alg. 2 and its parts against reference_posthoc_loss (fixed s, α,
    λ = 0.7), and its gradient w.r.t. z_sim against central differences of the reference."""
    model, g, x, h, z_orig, z_sim = float64_problem()
    s, lam = 0.85, 0.7
    x_mix = glow.decode(g, [alpha * a + (1 - alpha) * b for a, b in zip(z_sim, z_orig)])
    assert (x_mix < 0).any() and (x_mix > 1).any()  # the clamp is active
    z = [t.clone().requires_grad_(True) for t in z_sim]
    torch.manual_seed(12)
    loss, parts = posthoc.posthoc_loss(model=model, glow_model=g, z_sim=z, z_orig=z_orig, x=x, h=h,
                                       s=s, alpha=alpha, lambda_sim=lam)
    parts = floats(parts)
    ref = reference_posthoc_loss(model, g, z_sim, z_orig, x, s, alpha, lam, noise_seed=12)
    assert parts["l_grad"] == pytest.approx(ref["l_grad"], rel=1e-9)
    assert parts["l_pred"] == pytest.approx(ref["l_pred"], rel=1e-9)
    assert parts["bpd"] == pytest.approx(ref["bpd"], rel=1e-9)
    assert loss.item() == pytest.approx(ref["loss"], rel=1e-9)
    # not degenerate: the mixed image changes the gate gradients and the predictions
    assert 0.05 < ref["l_grad"] < 1.5 and ref["l_pred"] > 1e-4
    assert min(ref["cosines"]) < 0.9

    grads = torch.autograd.grad(loss, z)
    gen = torch.Generator().manual_seed(13)
    step = 1e-7  # ReLUs in Glow's coupling nets: the error of the differences is O(step)
    for _ in range(2):  # directional derivatives along random directions
        v = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in z_sim]
        plus = reference_posthoc_loss(model, g, [a + step * b for a, b in zip(z_sim, v)], z_orig, x,
                                      s, alpha, lam, noise_seed=12, base=z_sim)["loss"]
        minus = reference_posthoc_loss(model, g, [a - step * b for a, b in zip(z_sim, v)], z_orig, x,
                                       s, alpha, lam, noise_seed=12, base=z_sim)["loss"]
        analytic = sum((gr * b).sum() for gr, b in zip(grads, v)).item()
        assert analytic == pytest.approx((plus - minus) / (2 * step), rel=1e-5, abs=1e-9)


def test_simplify_step_draws_and_zeroes_non_finite_examples(monkeypatch):
    """simplify_step: s = scale_min + (scale_max − scale_min)·u₁ and α = 1 − u₂ (u from torch's
    RNG, in that order) are passed to the loss; an example whose gradient has a non-finite
    entry in any latent tensor gets a zero gradient in all of them (authors), so Adam leaves
    it where it was, while the others take Adam's first step of size lr."""
    signature = inspect.signature(posthoc.posthoc_loss)
    z = [torch.zeros(2, 3, 4, 4, requires_grad=True), torch.zeros(2, 5, requires_grad=True)]
    weights = [torch.full((2, 3, 4, 4), 0.5), torch.full((2, 5), -2.0)]
    seen = {}

    def fake_loss(*args, **kwargs):
        seen.update(signature.bind(*args, **kwargs).arguments)
        loss = sum((t * w).sum() for t, w in zip(z, weights))
        loss = loss + z[0][1, 0, 0, 0].abs().sqrt()  # √|z| at 0: a NaN gradient for example 1
        return loss, dict(loss=loss.item(), s=seen["s"], alpha=seen["alpha"])

    monkeypatch.setattr(posthoc, "posthoc_loss", fake_loss)
    optimizer = torch.optim.Adam(z, lr=0.03)
    args = SimpleNamespace(scale_min=0.3, scale_max=0.7, lambda_sim=0.4, algorithm=2)
    torch.manual_seed(14)
    u = torch.rand(2)
    torch.manual_seed(14)
    posthoc.simplify_step(model=None, glow_model=None, z_sim=z, z_orig=None, x=None, h=None,
                          optimizer=optimizer, cfg=args)
    assert seen["s"] == pytest.approx(0.3 + 0.4 * u[0].item(), rel=1e-6)
    assert seen["alpha"] == pytest.approx(1 - u[1].item(), rel=1e-6)
    assert seen["lambda_sim"] == 0.4 and seen["z_sim"] is z
    assert torch.equal(z[0][1], torch.zeros(3, 4, 4)) and torch.equal(z[1][1], torch.zeros(5))
    torch.testing.assert_close(z[0][0], torch.full((3, 4, 4), -0.03))
    torch.testing.assert_close(z[1][0], torch.full((5,), 0.03))
    # Alg. 1: α = 1 whatever the draw
    posthoc.simplify_step(model=None, glow_model=None, z_sim=z, z_orig=None, x=None, h=None,
                          optimizer=optimizer, cfg=SimpleNamespace(**{**vars(args), "algorithm": 1}))
    assert seen["alpha"] == 1.0


def test_select_images_confident_in_dataset_order():
    """Fig. 8 / S17: the first num_images test images (dataset order) that are misclassified
    (or correct) with max softmax > 0.99, strictly; too few: the most confident of that kind."""
    confidence = [0.999, 0.995, 0.98, 0.99, 0.9999, 0.999, 0.5]
    wrong = [False, True, True, True, True, True, True]
    probs = torch.tensor([[c, 1 - c] for c in confidence], dtype=torch.float64)  # predicts 0
    labels = torch.tensor([1 if w else 0 for w in wrong])

    def select(**kw):
        args = SimpleNamespace(**{**dict(indices=None, select="misclassified", confidence=0.99,
                                         num_images=2), **kw})
        return posthoc.select_images(probs, labels, args)[0].tolist()

    assert select() == [1, 4]  # 4 is more confident than 1, but comes later; 3 is not > 0.99
    assert select(num_images=3) == [1, 4, 5]
    assert select(select="correct", num_images=1) == [0]
    assert select(num_images=5) == [4, 5, 1, 3, 2]  # only 3 confident ones: by confidence
    assert select(indices=[6, 2]) == [6, 2]


def test_evaluate_by_hand():
    """The simplified image is clamp(decode(z_sim)) rounded to 8 bit; predictions are argmax of
    f; bpds with dequantization noise, originals first."""
    model, g, x, h, z_orig, z_sim = float64_problem()
    torch.manual_seed(15)
    result = posthoc.predictions_and_bpd(model, g, x, z_sim)
    x_sim = torch.round(255 * glow.decode(g, z_sim).clamp(0, 1)) / 255
    torch.testing.assert_close(result["x_sim"], x_sim, rtol=0, atol=1e-12)
    with torch.no_grad():
        assert result["pred_original"].tolist() == model(x).argmax(1).tolist()
        assert result["pred_simplified"].tolist() == model(x_sim).argmax(1).tolist()
        torch.manual_seed(15)
        bpd_original, bpd_simplified = glow.bits_per_dim(g, x), glow.bits_per_dim(g, x_sim)
    torch.testing.assert_close(result["bpd_original"], bpd_original)
    torch.testing.assert_close(result["bpd_simplified"], bpd_simplified)


def test_flag_defaults_follow_the_authors():
    """S4 / the authors' post-hoc config: s ~ U(0.8, 0.95), Adam lr 1e-2, λ = 1, 5000 steps,
    confidence > 0.99, Alg. 2."""
    args = posthoc.get_args(["--dataset", "shapes"])
    assert (args.scale_min, args.scale_max, args.lr, args.lambda_sim) == (0.8, 0.95, 1e-2, 1.0)
    assert (args.confidence, args.algorithm) == (0.99, 2)
    assert posthoc.resolve_config(args).steps == 5000


def test_main_optimises_z_sim_with_adam_lr_1e_2(tmp_path):
    """main: z_sim takes Adam steps of lr 1e-2 (S4) from its start point, the priors' mode:
    after one step every latent entry has moved by 1e-2·g/(|g| + 1e-8), g its gradient."""
    g = tiny_glow(frozen=False)
    torch.manual_seed(16)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.05 * torch.randn_like(p))  # learned priors whose mode is not z = 0
    glow.save_glow(g, tmp_path / "glow.pt")
    model = nets.NFWideResNet(5, depth=10, widen=1)  # shapes has 5 classes
    nets.save_model(model, tmp_path / "f.pt", dataset="shapes")
    posthoc.main(posthoc.get_args(["--dataset", "shapes", "--glow", str(tmp_path / "glow.pt"),
                                   "--classifier", str(tmp_path / "f.pt"), "--device", "cpu",
                                   "--train-size", "16", "--test-size", "8", "--steps", "1",
                                   "--indices", "0", "1", "--out", str(tmp_path / "o")]))
    latents = torch.load(tmp_path / "o" / "simplified.pt", weights_only=True)["latents"]
    with torch.no_grad():
        start = glow.prior_mode(glow.load_glow(tmp_path / "glow.pt"), 2)
    assert any(z.abs().max() > 0.1 for z in start)
    moved = torch.cat([(z - z0).flatten() for z, z0 in zip(latents, start)]).abs()
    # Adam's first step moves each entry by lr·|g|/(|g| + 1e-8): at most lr, ≈ lr for most
    assert moved.max().item() == pytest.approx(1e-2, rel=1e-3)
    assert (moved > 5e-3).double().mean().item() > 0.5


def test_same_seed_same_steps():
    """The only randomness (s, α, dequantization noise) comes from torch's seeded RNG."""
    model, g, x, h, z_orig = latents_setup()
    step_args = SimpleNamespace(scale_min=0.8, scale_max=0.95, lambda_sim=1.0, algorithm=2)
    runs = []
    for _ in range(2):
        z_sim = [torch.zeros_like(z, requires_grad=True) for z in z_orig]
        optimizer = torch.optim.Adam(z_sim, lr=1e-2)
        torch.manual_seed(6)
        runs.append((posthoc.simplify_step(model, g, z_sim, z_orig, x, h, optimizer, step_args), z_sim))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_main_smoke_and_classifier_reuse(tmp_path):
    """Tiny end-to-end run on shapes: trains a classifier, simplifies 2 images, writes the
    outputs; a second run loads that classifier with --classifier."""
    g = tiny_glow(frozen=False)
    glow_path = str(tmp_path / "glow.pt")
    glow.save_glow(g, glow_path)
    common = ["--dataset", "shapes", "--glow", glow_path, "--device", "cpu", "--train-size", "64",
              "--test-size", "40", "--steps", "3", "--log-every", "2"]
    out1 = tmp_path / "run1"
    summary = posthoc.main(posthoc.get_args(common + ["--out", str(out1), "--num-images", "2",
                                                      "--train-epochs", "1",
                                                      "--depth", "10", "--widen", "1", "--batch-size", "32"]))
    results = json.loads((out1 / "results.json").read_text())
    for key in ("kept_prediction_rate", "mean_bpd_original", "mean_bpd_simplified"):
        assert key in results and results[key] == pytest.approx(summary[key])
    assert 0 <= results["kept_prediction_rate"] <= 1 and len(results["images"]) == 2
    for image in results["images"]:
        assert set(image) >= {"label", "pred_original", "pred_simplified", "bpd_original", "bpd_simplified"}
        assert 0 < image["bpd_original"] < 30 and 0 < image["bpd_simplified"] < 30
    for name in ("args.json", "metrics.jsonl", "classifier.pt", "simplified.png", "simplified.pt"):
        assert (out1 / name).is_file(), name
    saved = torch.load(out1 / "simplified.pt", weights_only=True)
    assert saved["images"].shape == (2, 3, 32, 32) and saved["images"].dtype == torch.uint8
    steps = [json.loads(line) for line in (out1 / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps if m["phase"] == "simplify"] == [2, 3]

    out2 = tmp_path / "run2"
    posthoc.main(posthoc.get_args(common + ["--out", str(out2), "--classifier", str(out1 / "classifier.pt"),
                                            "--indices", "0", "5"]))
    results2 = json.loads((out2 / "results.json").read_text())
    assert not (out2 / "classifier.pt").exists()  # loaded, not trained
    assert results2["classifier_test_acc"] == pytest.approx(results["classifier_test_acc"])
    assert [im["index"] for im in results2["images"]] == [0, 5]


def test_missing_classifier_exits_cleanly(tmp_path):
    proc = subprocess.run([sys.executable, "posthoc.py", "--dataset", "shapes", "--device", "cpu",
                           "--classifier", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
