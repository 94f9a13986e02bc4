"""condense.py: the Eq. 6 distance, its gradient, the Eq. 7 step, and a CPU smoke run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    a, b = random_grads(1), random_grads(2)
    expected = sum((1 - torch.nn.functional.cosine_similarity(x.flatten(1), y.flatten(1))).sum()
                   for x, y in zip(a, b) if x.dim() > 1)
    assert condense.gradient_match_loss(a, b).item() == pytest.approx(expected.item(), rel=1e-6)


def test_get_loops_follow_dc():
    assert [condense.get_loops(i) for i in (1, 10, 50)] == [(1, 1), (10, 50), (50, 10)]
    assert condense.get_loops(5) == (5, 100)


def test_quick_changes_only_defaults():
    args = condense.get_args(["--dataset", "shapes", "--quick", "--iterations", "7"])
    cfg = condense.get_config(args)
    assert cfg.iterations == 7 and cfg.width == 32 and (cfg.outer_loop, cfg.inner_loop) == (1, 1)
    assert args.width is None  # args is never changed
    full = condense.get_config(condense.get_args(["--dataset", "shapes", "--ipc", "10"]))
    assert (full.width, full.batch_real, full.outer_loop, full.inner_loop) == (128, 256, 10, 50)
    with pytest.raises(ValueError):
        condense.get_config(condense.get_args(["--eval-at", "1,x"]))


def tiny_problem():
    torch.manual_seed(0)
    net = nets.ConvNet(2, width=4, mean=(0.5,) * 3, std=(1.0,) * 3).double()
    real = [torch.rand(3, 3, 32, 32, dtype=torch.float64) for _ in range(2)]  # 2 classes
    x_syn = torch.rand(2, 3, 32, 32, dtype=torch.float64)  # ipc 1
    return net, real, x_syn


def test_match_gradient_matches_finite_differences():
    net, real, x_syn = tiny_problem()

    def loss(x):  # Σ_c D_c; batch_real ≥ class size, so the real batches are fixed
        return condense.condensation_loss(net, x, real, 1, 8, None, 0.0)[0]

    x = x_syn.clone().requires_grad_()
    grad = torch.autograd.grad(loss(x), x)[0]
    g = torch.Generator().manual_seed(1)
    h = 1e-6
    for _ in range(3):  # directional derivatives along random directions
        v = torch.randn(x_syn.shape, generator=g, dtype=torch.float64)
        numeric = (loss(x_syn + h * v) - loss(x_syn - h * v)).item() / (2 * h)
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
        condense.outer_iteration(alpha, opt, real, g, lam, 1, 4, 8, 2, 2, 256)  # 2 loops
        x = condense.synthetic_images(alpha).detach()
        bpd[lam] = glow.bits_per_dim(g, x, noise=False).mean().item()
    assert bpd[1e4] < bpd[0.0] - 0.1


def run_main(out, glow_path, *extra):
    argv = ["--dataset", "shapes", "--train-size", "60", "--test-size", "40", "--ipc", "1",
            "--batch-real", "8", "--width", "8", "--num-eval", "2", "--eval-epochs", "2",
            "--glow", str(glow_path), "--device", "cpu", "--lambda-sim", "1",
            "--out", str(out), *extra]
    return condense.main(condense.get_args(argv))


def test_main_smoke_and_resume(tmp_path):
    glow_path = tmp_path / "glow.pt"
    glow.save_glow(glow.Glow(levels=1, steps=1, hidden=8), glow_path)
    results = run_main(tmp_path / "a", glow_path, "--iterations", "4", "--eval-at", "0,2")
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
