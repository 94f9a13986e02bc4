"""Tests of per_instance.py: the unrolled AdamW step against torch.optim.AdamW, the
meta-gradient of Eq. 5 against finite differences, the S3 weights, the augmentation, and
CPU smoke runs of the script (SimpleBits, resume, baselines, error exit)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import glow
import nets
import per_instance as pi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinySimplifier(nn.Module):
    """sigmoid(logit(x) + 1×1 conv(x)): smooth, so finite differences apply."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return torch.sigmoid(torch.logit(x.clamp(1e-3, 1 - 1e-3)) + self.conv(x))


def tiny_classifier(num_classes=3):
    """A small conv net without dropout: deterministic, so finite differences apply."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ELU(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, num_classes))


def real_steps(model, optimizer, x, y, n):
    for _ in range(n):  # give the optimizer a non-trivial moment state
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("previous_steps", [0, 3])
def test_differentiable_adamw_step_matches_torch_adamw(previous_steps):
    torch.manual_seed(0)
    model = nets.NFWideResNet(3, depth=10, widen=1, dropout=0.0)
    optimizer = pi.make_optimizer(model)  # two groups: wd 1e-5 on weights/gains, 0 on biases
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-5, 0.0]
    for group in optimizer.param_groups:
        group["weight_decay"] *= 1000  # make the decoupled decay visible at 1e-6
    x, y = torch.rand(4, 3, 16, 16), torch.randint(0, 3, (4,))
    real_steps(model, optimizer, x, y, previous_steps)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    ours = pi.differentiable_adamw_step(model, optimizer, params, grads)
    optimizer.step()
    for n, p in model.named_parameters():
        assert (ours[n] - params[n]).abs().max() > 1e-5, n  # every parameter moved
        torch.testing.assert_close(ours[n], p.detach(), atol=1e-6, rtol=0, msg=n)


def meta_setup():
    torch.manual_seed(0)
    classifier, simplifier = tiny_classifier().double(), TinySimplifier().double()
    optimizer = pi.make_optimizer(classifier)
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64) * 0.8 + 0.1
    y = torch.randint(0, 3, (6,))
    real_steps(classifier, optimizer, x, y, 2)
    aug = (torch.randint(0, 2 * pi.PAD + 1, (6, 2)), torch.rand(6) < 0.5)
    return classifier, simplifier, optimizer, x, y, aug


def test_meta_gradient_matches_finite_differences():
    """d(Eq. 5)/d(simplifier weight) through the unrolled AdamW step, float64, λ = 0."""
    classifier, simplifier, optimizer, x, y, aug = meta_setup()

    def loss_of(weight):
        logit = torch.logit(x.clamp(1e-3, 1 - 1e-3))
        x_sim = torch.sigmoid(logit + F.conv2d(x, weight, simplifier.conv.bias))
        return pi.simplifier_loss(classifier, optimizer, None, x, x_sim, y, aug, 0.0)[0]

    w = simplifier.conv.weight.detach().clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss_of(w), w)
    numeric = torch.zeros_like(w)
    eps = 1e-6
    for i in range(w.numel()):
        delta = torch.zeros_like(w).view(-1)
        delta[i] = eps
        delta = delta.view_as(w)
        numeric.view(-1)[i] = (loss_of(w + delta).item() - loss_of(w - delta).item()) / (2 * eps)
    assert grad.abs().max() > 1e-4
    torch.testing.assert_close(grad, numeric, atol=1e-7, rtol=1e-5)


def test_lambda_zero_is_classification_only_and_sim_term_uses_ramp(monkeypatch):
    """λ = 0: no Glow needed, L = (10·l(f'(X̃)) + l(f(X̃_sim)) + l(f'(X̃_sim)))/12. λ > 0 adds
    λ·mean_i w_i·bpd_i/(12+λ), w_i = max(0, 1 − l_i(f'(X̃_i))/τ), not differentiated."""
    classifier, simplifier, optimizer, x, y, aug = meta_setup()
    x_sim = simplifier(x).detach().requires_grad_()
    loss0, parts = pi.simplifier_loss(classifier, optimizer, None, x, x_sim, y, aug, 0.0)
    expected = (10 * parts["loss_f1_orig"] + parts["loss_f_sim"] + parts["loss_f1_sim"]) / 12
    torch.testing.assert_close(loss0.detach(), expected)
    (grad0,) = torch.autograd.grad(loss0, x_sim)

    # a linear stand-in for Glow: bpd_i = Σ x_i, so ∂L_sim/∂x_i = w_i/B exactly
    monkeypatch.setattr(glow, "bits_per_dim", lambda g, x: x.flatten(1).sum(1))
    monkeypatch.setattr(pi, "TAU", 5.0)  # a threshold that gives distinct w_i in (0, 1)
    lam = 2.0
    loss2, parts2 = pi.simplifier_loss(classifier, optimizer, "glow", x, x_sim, y, aug, lam)
    (grad2,) = torch.autograd.grad(loss2, x_sim)
    _, params = pi.unrolled_train_step(classifier, optimizer, pi.augment(x_sim, aug), y)
    l_i = F.cross_entropy(torch.func.functional_call(classifier, params, (pi.augment(x, aug),)), y,
                          reduction="none").detach()
    w = (1 - l_i / 5.0).clamp_min(0)
    assert 0 < w.min() and w.max() < 1 and w.std() > 0
    torch.testing.assert_close(parts2["sim_weight"], w.mean())
    sim_grad = ((12 + lam) * grad2 - 12 * grad0) / lam  # gradient of L_sim alone
    torch.testing.assert_close(sim_grad, (w / len(x)).view(-1, 1, 1, 1).expand_as(sim_grad))


def test_non_finite_steps_are_skipped():
    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.tensor([[1.0, float("nan"), 0.0]])).sum()
    assert pi.finite_step(optimizer, loss, list(model.parameters())) is True
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    loss = model(torch.ones(1, 3)).sum()
    assert pi.finite_step(optimizer, loss, list(model.parameters())) is False
    assert not torch.equal(before[0], model.weight)


def test_augment_crop_and_flip():
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    shifts = torch.tensor([[4, 4], [4, 4], [0, 8]])
    out = pi.augment(x, (shifts, torch.tensor([False, True, False])))
    torch.testing.assert_close(out[0], x[0])  # centre crop: identity
    torch.testing.assert_close(out[1], x[1].flip(-1))  # flip only
    torch.testing.assert_close(out[2, :, 4:, :28], x[2, :, :28, 4:])  # 4 down, 4 left
    assert (out[2, :, :4] == 0).all() and (out[2, :, :, 28:] == 0).all()  # zero padding
    out.sum().backward()
    assert x.grad is not None


def tiny_glow(tmp_path):
    torch.manual_seed(0)
    path = str(tmp_path / "glow.pt")
    glow.save_glow(glow.Glow(levels=3, steps=1, hidden=8), path)  # a Glow at init
    return path


def run(tmp_path, out, *extra):
    argv = ["--dataset", "shapes", "--glow", tiny_glow(tmp_path), "--out", str(tmp_path / out),
            "--train-size", "32", "--test-size", "16", "--batch-size", "16", "--depth", "10",
            "--widen", "1", "--ngf", "8", "--lambda-sim", "2", *extra]
    return pi.main(pi.get_args(argv))


def test_smoke_simplebits_resume_retrain_save(tmp_path):
    full = run(tmp_path, "full", "--epochs", "2")
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
    assert nets.load_model(str(out / "simplifier.pt"), kind="UNetSimplifier").config["ngf"] == 8
    test = torch.load(out / "simplified_test.pt", weights_only=True)
    train = torch.load(out / "simplified_train.pt", weights_only=True)
    assert test["images"].dtype == torch.uint8 and test["images"].shape == (16, 3, 32, 32)
    assert train["images"].shape == (32, 3, 32, 32) and train["labels"].shape == (32,)


def test_convnet_classifier_and_quick_preset(tmp_path):
    """--classifier convnet trains the DC ConvNet as f (the --quick default) with a fresh one
    for --retrain; --quick changes only defaults."""
    results = run(tmp_path, "conv", "--classifier", "convnet", "--width", "8", "--epochs", "1",
                  "--retrain", "--retrain-epochs", "1")
    assert 0 <= results["retrain_test_acc"] <= 1 and results["test_bpd_simplified"] > 0
    assert nets.load_model(str(tmp_path / "conv" / "classifier.pt"), kind="ConvNet").config["width"] == 8
    cfg = pi.resolve_config(pi.get_args(["--quick", "--classifier", "wrn"]))
    assert (cfg.classifier, cfg.width, cfg.epochs) == ("wrn", 32, pi.QUICK["epochs"])
    assert pi.resolve_config(pi.get_args([])).classifier == "wrn"  # the paper's f by default


@pytest.mark.parametrize("kind", ["l2", "blur", "jpeg"])
def test_smoke_baselines(tmp_path, kind):
    results = run(tmp_path, kind, "--simplifier", kind, "--epochs", "1", "--retrain-epochs", "1")
    assert results["retrain_test_acc"] == results["test_acc"]
    assert results["test_bpd_simplified"] > 0 and results["png_bytes_simplified"] > 0
    if kind == "blur":  # blurring removes the pixel noise of the background
        assert results["png_bytes_simplified"] < results["png_bytes"]


def test_missing_glow_exits_with_status_2(tmp_path):
    proc = subprocess.run([sys.executable, "per_instance.py", "--dataset", "shapes", "--out",
                           str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "glow" in proc.stderr.lower()
