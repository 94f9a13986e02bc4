"""Tests of posthoc.py (Sec. 5, Alg. 1/2, S4): per-example gate gradients against a loop,
the masked cosine distance against a hand computation, gradients through Glow's decode,
the α-interpolation of Alg. 2 vs Alg. 1, and a tiny end-to-end run of main()."""
import json
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


def tiny_glow(dtype=torch.float32):
    """A 3-level Glow with one tiny flow step per level, ActNorm initialised on random data."""
    torch.manual_seed(0)
    g = glow.Glow(levels=3, steps=1, hidden=8).to(dtype)
    with torch.no_grad():
        g(glow.to_glow_range(torch.rand(16, 3, 32, 32, dtype=dtype)))  # data-dependent ActNorm init
    return glow.freeze(g)


def tiny_classifier(dtype=torch.float32, num_classes=3):
    torch.manual_seed(1)
    return nets.NFWideResNet(num_classes, depth=10, widen=1).to(dtype).eval().requires_grad_(False)


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
        kl = posthoc.kl_divergence(target[i:i + 1], functional_call(model, (p, buffers), (x_i,))).sum()
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
        losses.append(posthoc.posthoc_loss(model, g, z_orig, z_orig, x, h, 0.9, alpha, 1.0)[1])
    for key in ("loss", "l_grad", "l_pred", "bpd"):
        assert losses[0][key] == pytest.approx(losses[1][key], rel=1e-4, abs=1e-6)
    # α → 0: x_mix = x, so L_grad drops to its floor (tensors whose gate gradients are all
    # ≥ 0 on x, e.g. zero biases, have an empty mask and always count cos = 0) and L_pred to 0
    floor = losses[0]["l_grad"]
    _, tiny_alpha = posthoc.posthoc_loss(model, g, z_sim, z_orig, x, h, 0.9, 1e-7, 1.0)
    _, full = posthoc.posthoc_loss(model, g, z_sim, z_orig, x, h, 0.9, 1.0, 1.0)
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
    g = tiny_glow()
    glow_path = str(tmp_path / "glow.pt")
    glow.save_glow(g, glow_path)
    common = ["--dataset", "shapes", "--glow", glow_path, "--device", "cpu", "--train-size", "64",
              "--test-size", "40", "--steps", "3", "--num-images", "2", "--log-every", "2"]
    out1 = tmp_path / "run1"
    summary = posthoc.main(posthoc.get_args(common + ["--out", str(out1), "--train-epochs", "1",
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
