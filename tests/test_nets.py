"""Tests for nets.py: NF-WRN signal propagation (S2.1), the identity-at-init simplifier
(S2.2), the DC ConvNet (Sec. 4), double backward, checkpoints and the run utilities."""
import json
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
    nets.save_model(torch.nn.DataParallel(model), path, epoch=3)  # wrapper adds "module."
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["kind"] == type(model).__name__ and ckpt["config"] == model.config and ckpt["epoch"] == 3
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["state_dict"])
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
    with pytest.raises(ValueError, match="no CUDA GPU"):
        nets.resolve_device("cuda")
    with pytest.raises(ValueError):
        nets.resolve_device("tpu")


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
