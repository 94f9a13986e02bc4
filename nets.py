"""Networks of SimpleBits (Schirrmeister et al., "When less is more"), plus run utilities.

* `NFWideResNet`   normalizer-free Wide ResNet classifier            (Supplement S2.1)
* `UNetSimplifier` residual pix2pix UNet, identity at initialization  (Supplement S2.2)
* `ConvNet`        DC ConvNet of Zhao et al. (2021) for condensation  (Sec. 4)

All three are pure `nn.Module`s: images in [0,1] of shape (B, 3, 32, 32), no in-place
ops on their inputs, no state changes in `forward`, so they work with
`torch.func.functional_call` and support double backward (the unrolled train_step of
Sec. 3 and the gradient matching of Sec. 4 differentiate through their gradients).
Each model keeps its constructor arguments in `model.config`; `save_model` / `load_model`
store and rebuild it. The bottom of the file holds small run utilities shared by the
mode scripts (device, seeding, atomic files, progress lines, λ grids and their
trade-off charts).

    python3 -c "import nets; print(nets.NFWideResNet(10))"
"""
import argparse
import contextlib
import csv
import functools
import hashlib
import io
import json
import math
import os
import random
import signal
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

try:
    import fcntl  # POSIX; where it is missing (Windows) a run does not lock its folder
except ImportError:
    fcntl = None

# γ of the γ-scaled ELU (Brock et al. 2021, their `_nonlin_gamma['elu']`): 1/std(ELU(z))
# for z ~ N(0,1), so γ·ELU keeps unit variance. Their value was estimated by sampling;
# the exact integral gives 1.2708. We keep the published constant used by the authors.
ELU_GAMMA = 1.2716004848480225
RESIDUAL_ALPHA = 0.2  # S2.1: h_{i+1} = h_i + 0.2·f_i(h_i)


class ScaledStdConv2d(nn.Conv2d):
    """Conv with Scaled Weight Standardization (S2.1, Eq. S1) and a learned gain.

    Ŵ_ij = gain_i · (W_ij − μ_i) / ((σ_i + 1e-5)·√N), with μ_i, σ_i the mean and
    population std of output row i over its N = fan-in weights (authors' exact formula).
    Each row of Ŵ/gain has zero mean and variance ≈ 1/N, so unit-variance inputs give
    unit-variance outputs without any normalization layer.
    """

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, padding=0, eps=1e-5):
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=padding)
        self.gain = nn.Parameter(torch.ones(out_ch, 1, 1, 1))  # per output channel, init 1
        self.eps = eps  # 1e-5, authors' code
        # authors' init; the scale is irrelevant because of the standardization
        nn.init.xavier_uniform_(self.weight, gain=2 ** 0.5)
        nn.init.zeros_(self.bias)

    def standardized_weight(self):
        w = self.weight  # (out, in, k, k)
        fan_in = w[0].numel()
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.std(dim=(1, 2, 3), keepdim=True, correction=0)
        return self.gain * (w - mean) / ((std + self.eps) * fan_in ** 0.5)

    def forward(self, x):
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding)


def gamma_elu(x):
    """γ-scaled ELU (S2.1), variance preserving for unit-Gaussian inputs."""
    return ELU_GAMMA * F.elu(x)


class NFBlock(nn.Module):
    """Normalizer-free wide residual block (S2.1): h' = shortcut + 0.2·f(h).

    a = γ·ELU(h);  f(h) = conv2(γ·ELU(dropout(conv1(a))));  the shortcut is h itself, or a
    strided 1×1 ScaledStdConv of a when the shape changes (NF-ResNet transition block).
    Unlike the authors' code, ELU is not in place, so the identity shortcut carries h,
    as the paper writes. The stride sits on conv2 (meliketoy WRN layout, authors' code).
    """

    def __init__(self, in_ch, out_ch, stride, dropout):
        super().__init__()
        self.conv1 = ScaledStdConv2d(in_ch, out_ch, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = ScaledStdConv2d(out_ch, out_ch, 3, stride=stride, padding=1)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = ScaledStdConv2d(in_ch, out_ch, 1, stride=stride)

    def forward(self, h):  # (B, in_ch, H, W) -> (B, out_ch, H/stride, W/stride)
        a = gamma_elu(h)  # β = 1: no input scaling (S2.1)
        r = self.conv2(gamma_elu(self.dropout(self.conv1(a))))
        shortcut = h if self.shortcut is None else self.shortcut(a)
        return shortcut + RESIDUAL_ALPHA * r


class NFWideResNet(nn.Module):
    """Normalizer-free Wide ResNet classifier (S2.1; Zagoruyko & Komodakis 2016, Brock et al. 2021).

    WRN-depth-widen: stem conv 3→16, three stages of n = (depth−4)/6 blocks with widths
    16·widen, 32·widen, 64·widen and strides 1, 2, 2, no nonlinearity after the last
    block, global average pool, Linear. Default WRN-16-2 (paper: 91.2% on CIFAR10);
    depth=28, widen=10 is the 94.0% variant. Inputs in [0,1] are normalized with the
    dataset mean/std as the first operation.
    """

    def __init__(self, num_classes, depth=16, widen=2, dropout=0.3,
                 mean=(0.5,) * 3, std=(0.5,) * 3):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1 (e.g. 16 or 28), got {depth}.")
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.config = dict(num_classes=num_classes, depth=depth, widen=widen,
                           dropout=dropout, mean=mean, std=std)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))  # (1, 3, 1, 1)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        n = (depth - 4) // 6  # blocks per stage
        widths = [16, 16 * widen, 32 * widen, 64 * widen]  # stem, stages 1-3
        self.stem = ScaledStdConv2d(3, widths[0], 3, padding=1)
        blocks, in_ch = [], widths[0]
        for out_ch, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                blocks.append(NFBlock(in_ch, out_ch, stride if i == 0 else 1, dropout))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_ch, num_classes)  # default PyTorch init, as the authors

    def forward(self, x):  # (B, 3, 32, 32) in [0,1] -> logits (B, num_classes)
        h = self.stem((x - self.mean) / self.std)  # (B, 16, 32, 32)
        h = self.blocks(h)  # (B, 64·widen, 8, 8)
        return self.fc(h.mean(dim=(2, 3)))  # global average pool -> (B, 64·widen)


class AffineOnChans(nn.Module):
    """Per-channel affine y = (x + a)·f, a = 0 and f = 1 at init; replaces BatchNorm (S2.2)."""

    def __init__(self, channels):
        super().__init__()
        self.add = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.factor = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x):
        return (x + self.add) * self.factor


class UNetSimplifier(nn.Module):
    """Residual UNet simplifier (S2.2), adapted from the pix2pix UnetGenerator.

    simplifier(x) = sigmoid(logit(clamp(x, 1e-3, 1−1e-3)) + m·UNet(2x − 1)), with the
    learned scalar m = 0 at init: the simplifier starts as the identity (up to the clamp)
    and its output always lies in [0,1]. The UNet has num_down 4×4 stride-2 convs
    (32→1 pixels for num_down = 5) with ngf·{1,2,4,8,8,...} channels, skip concatenations,
    ELU nonlinearities and AffineOnChans instead of normalization. As in pix2pix, only the
    outermost ConvTranspose has a bias. The authors' innermost block used LeakyReLU(0.2)
    and ReLU (a pix2pix default they did not override); we use ELU as the paper says.
    """

    def __init__(self, num_down=5, ngf=64):
        super().__init__()
        if num_down < 1:
            raise ValueError(f"num_down must be at least 1, got {num_down}.")
        self.config = dict(num_down=num_down, ngf=ngf)
        chans = [3] + [ngf * min(2 ** i, 8) for i in range(num_down)]  # 3, 64, 128, 256, 512, 512
        last = num_down - 1
        down, up = [], []
        for i in range(num_down):
            # down i: (B, chans[i], S, S) -> (B, chans[i+1], S/2, S/2); no ELU before the first conv,
            # no affine after the first and the innermost conv (pix2pix)
            layers = [] if i == 0 else [nn.ELU()]
            layers.append(nn.Conv2d(chans[i], chans[i + 1], 4, stride=2, padding=1, bias=False))
            if 0 < i < last:
                layers.append(AffineOnChans(chans[i + 1]))
            down.append(nn.Sequential(*layers))
            # up i: input is down i's output, concatenated with up i+1's output unless innermost
            in_ch = chans[i + 1] if i == last else 2 * chans[i + 1]
            layers = [nn.ELU(), nn.ConvTranspose2d(in_ch, chans[i], 4, stride=2, padding=1,
                                                   bias=(i == 0))]
            if i > 0:
                layers.append(AffineOnChans(chans[i]))
            up.append(nn.Sequential(*layers))
        self.down, self.up = nn.ModuleList(down), nn.ModuleList(up)
        self.merge_weight = nn.Parameter(torch.zeros(()))  # m, 0 at init -> identity

    def unet(self, x):  # (B, 3, S, S) in [-1, 1] -> (B, 3, S, S), unbounded
        skips = []
        for layer in self.down:
            x = layer(x)
            skips.append(x)
        h = self.up[-1](skips[-1])  # innermost block has no skip
        for i in reversed(range(len(self.up) - 1)):  # (B, 2·chans[i+1], ...) -> (B, chans[i], ...)
            h = self.up[i](torch.cat([skips[i], h], dim=1))
        return h

    def forward(self, x):  # (B, 3, S, S) in [0,1] -> (B, 3, S, S) in [0,1]
        size = 2 ** len(self.down)
        if x.shape[-2] % size or x.shape[-1] % size:
            raise ValueError(f"UNetSimplifier with num_down={len(self.down)} needs image sides "
                             f"divisible by {size}, got {tuple(x.shape[-2:])}.")
        clamped = x.clamp(1e-3, 1 - 1e-3)  # keeps logit finite; 1e-3 from the authors' code
        # the UNet sees the unclamped image, as in the authors' WrapResidualIdentityUnet
        return torch.sigmoid(torch.logit(clamped) + self.merge_weight * self.unet(2 * x - 1))


class ConvNet(nn.Module):
    """DC ConvNet of Zhao et al. (2021) used for dataset condensation (Sec. 4).

    depth × [Conv3×3 (bias) → instance norm → ReLU → AvgPool 2] → Linear, for 32×32 inputs.
    Instance norm is GroupNorm with one group per channel and a learned affine, as in DC.
    Inputs are normalized with mean/std first (condense.py passes mean 0.5, std 1, which
    reproduces the authors' x − 0.5 input).
    """

    def __init__(self, num_classes, width=128, depth=3, mean=(0.5,) * 3, std=(0.5,) * 3):
        super().__init__()
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.config = dict(num_classes=num_classes, width=width, depth=depth, mean=mean, std=std)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))  # (1, 3, 1, 1)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        layers, in_ch = [], 3
        for _ in range(depth):
            layers += [nn.Conv2d(in_ch, width, 3, padding=1), nn.GroupNorm(width, width, affine=True),
                       nn.ReLU(), nn.AvgPool2d(2)]
            in_ch = width
        self.features = nn.Sequential(*layers)
        side = 32 // 2 ** depth  # 4 for depth 3
        self.classifier = nn.Linear(width * side * side, num_classes)

    def forward(self, x):  # (B, 3, 32, 32) in [0,1] -> logits (B, num_classes)
        h = self.features((x - self.mean) / self.std)  # (B, width, 32/2^depth, 32/2^depth)
        return self.classifier(h.flatten(1))


# Training helpers of the method: the authors' classifier optimizer and augmentation
def classifier_optimizer(classifier, lr=5e-4):
    """The authors' classifier optimizer: AdamW(lr, betas (0.9, 0.995), eps 1e-8), weight
    decay 1e-5 on weights and gains, none on biases (the paper's text says AdamW, wd 1e-5)."""
    decay = [p for n, p in classifier.named_parameters() if "weight" in n or "gain" in n]
    rest = [p for n, p in classifier.named_parameters() if not ("weight" in n or "gain" in n)]
    groups = [dict(params=decay, weight_decay=1e-5), dict(params=rest, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.995), eps=1e-8,
                             fused=fused_ok(classifier.parameters()))


def fused_ok(params):
    """Whether torch's fused Adam/AdamW kernel runs on these parameters (CUDA and CPU; not
    MPS or meta in every torch version). Fused: one kernel per step, and it can skip a
    non-finite step on the device (per_instance.finite_step) without a host sync."""
    return all(p.device.type in ("cuda", "cpu") for p in params)


def sample_crop_flip(n, pad, flip, device):
    """Random crop offsets in [0, 2·pad] (rows, columns) and horizontal flips for n images,
    drawn on the CPU (the same numbers on every device): ((n, 2) long, (n,) bool)."""
    shifts = torch.randint(0, 2 * pad + 1, (n, 2))
    flips = torch.rand(n) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return shifts.to(device), flips.to(device)


def crop_flip(x, aug, pad, padding="constant"):
    """Random-crop augmentation with the draws `aug` of sample_crop_flip: pad by `pad`
    (zeros, or "reflect"), cut the (H, W) window at the offsets, flip where drawn.
    Differentiable in x; one draw can augment X and X_sim alike. (B,C,H,W) -> same."""
    shifts, flips = aug
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode=padding)  # (B, C, H+2·pad, W+2·pad)
    rows = shifts[:, :1] + torch.arange(h, device=x.device)  # (B, H)
    cols = shifts[:, 1:] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # a flip reads the columns backwards
    batch = torch.arange(n, device=x.device)[:, None, None]  # (B, 1, 1)
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


# ======================================================================================
# Checkpoints and run utilities shared by the mode scripts (no model maths below here)
# ======================================================================================

MODEL_KINDS = {cls.__name__: cls for cls in (NFWideResNet, UNetSimplifier, ConvNet)}


class CheckpointError(Exception):
    """Expected failure reading a checkpoint; the message is one sentence for the user."""


def save_model(model, path, **extra):
    """Atomically save {"kind", "config", "state_dict", **extra}; loadable with weights_only=True."""
    atomic_save({"kind": type(model).__name__, "config": dict(model.config),
                 "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                 **extra}, path)


def load_model(path, kind=None, map_location="cpu", expect=None):
    """Rebuild a model saved by `save_model` from its config; returned in eval mode.

    Raises CheckpointError when the file is missing or unreadable, holds another kind of
    model than `kind` (a name or a tuple of names), was saved with other `expect`ed extras
    (e.g. {"dataset": "cifar10"}), or its weights do not fit the architecture its config
    describes.
    """
    ckpt = read_checkpoint(path, "a model saved by nets.save_model (kind, config, state_dict)",
                           "check the path, or train a model first",
                           keys=("kind", "config", "state_dict"))
    kinds = (kind,) if isinstance(kind, str) else tuple(kind or MODEL_KINDS)
    if ckpt["kind"] not in MODEL_KINDS or ckpt["kind"] not in kinds:
        wanted = " or ".join(kinds)
        raise CheckpointError(f"Checkpoint {path} holds a {ckpt['kind']}, "
                              f"but a {wanted} is needed here.")
    for key, value in (expect or {}).items():  # e.g. the dataset's name, then its fingerprint
        if key in ckpt and ckpt[key] != value:
            raise CheckpointError(f"Checkpoint {path} was made for {key} {ckpt[key]!r}, not "
                                  f"{value!r} (this run's); give one made for it.")
    try:
        model = MODEL_KINDS[ckpt["kind"]](**ckpt["config"])
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, ValueError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        detail = lines[1] if len(lines) > 1 else lines[0]  # line 0 is "Error(s) in loading state_dict"
        raise CheckpointError(f"Checkpoint {path} does not match its {ckpt['kind']} config "
                              f"({detail.rstrip('.')}); it was saved by different code.") from None
    return model.to(map_location).eval()


class RunError(Exception):
    """An expected failure of a run (bad flag value, unusable device, output folder of
    another run); the message is one sentence that says what to do."""


def resolve_device(name):
    """--device: `auto` (cuda, then mps, then cpu) or any torch device (cpu, cuda, cuda:1, mps).
    A device this machine does not have is a RunError."""
    mps = getattr(torch.backends, "mps", None)
    mps_ok = mps is not None and mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise RunError(f"--device {name!r} is not a torch device; use auto, cpu, cuda, cuda:N "
                       "or mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name} was requested but no CUDA GPU is available; "
                       "use --device cpu or auto.")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise RunError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                       "GPU(s), numbered from 0.")
    if device.type == "mps" and not mps_ok:
        raise RunError(f"--device {name} was requested but Apple's MPS is not available here; "
                       "use --device cpu or auto.")
    if device.type not in ("cpu", "cuda", "mps"):
        raise RunError(f"--device {name}: only cpu, cuda, cuda:N and mps are supported.")
    return device


def compiled(model, compile=True):
    """--compile: `model` with a torch.compile'd forward, for first-order steps (a plain
    training step, an evaluation). It shares `model`'s parameters and buffers, so a step
    through it trains `model`; save `model`, never this (torch.compile's `_orig_mod.`
    names). torch.compile cannot differentiate a graph twice, so steps that need
    second-order gradients (create_graph: the unrolled step of Eq. 3, the synthetic side
    of Eq. 6, the gate gradients of Alg. 2) call `model` itself. Random ops (dropout) draw
    from torch's own stream, as in eager mode, so --compile changes a run's numbers only
    to float rounding, not its random draws. Without `compile`: `model` itself."""
    if not compile:
        return model
    from torch._inductor import config
    config.fallback_random = True  # dropout masks as eager mode draws them
    return torch.compile(model)


def check_compile(device):
    """--compile, before a run starts: torch.compile needs a working C++ compiler on a CPU
    (a slim Docker image or a Windows machine may have none) and Triton on a GPU. It is
    tried on a one-line function, so that a machine without them gets one sentence now
    rather than a traceback from inside the first training step."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(2, device=device))
    except Exception as error:  # whatever the compiler backend raises: the probe's purpose
        lines = str(error).strip().splitlines() or [type(error).__name__]
        raise RunError(f"--compile: torch.compile does not work here on {device} "
                       f"({type(error).__name__}: {lines[0][:200]}); install what it needs (a "
                       "C++ compiler for the CPU, Triton for a GPU) or drop --compile.") from None


def _terminated(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def console():
    """What every script's __main__ sets up first. Standard output and error never fail on
    a character they cannot encode: a run printing "λ" or "±" into a cp1252 or ASCII
    stream (a Windows redirect, LANG=C) shows "?" instead of crashing. SIGTERM, what Slurm
    and most schedulers send before killing a job, is raised as KeyboardInterrupt, so it is
    answered like Ctrl-C: the last checkpoint is intact and one line says how to resume.
    A SIGTERM the process was started to ignore stays ignored. This project's own warnings
    print as one line, `warning: ...` (one_line_warning)."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # a TextIOWrapper; not when replaced (e.g. pytest)
            stream.reconfigure(errors="replace")
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminated)
    warnings.formatwarning = one_line_warning


_python_warning_format = warnings.formatwarning


def one_line_warning(message, category, filename, lineno, line=None):
    """A warning raised in this project's files as `warning: <message>`: a sentence for the
    user, not Python's file:line and source line. Other libraries' warnings keep Python's
    format, which says where they come from."""
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.dirname(os.path.abspath(filename)) == here:
        return f"warning: {message}\n"
    return _python_warning_format(message, category, filename, lineno, line)


def quick_threads(quick, device):
    """--quick on a CPU uses one intra-op thread unless OMP_NUM_THREADS says otherwise. On
    2 cores torch's default of one thread per core thrashes as soon as another process
    runs: the quick loops' steps took 5-8x longer than with one thread (tests/benchmark.py
    threads), while one thread costs 1.2-1.5x on an idle machine."""
    if quick and device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def seed_everything(seed):
    """Seed python, numpy and torch (all devices) once, at the start of a run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def isolated_rng(device, seed):
    """A seeded random stream for evaluation and reporting that leaves the global one
    untouched: where and how often a run evaluates never changes what it trains."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def rng_state():
    """The random state of python, numpy, torch's CPU generator and every CUDA device's, for
    a checkpoint (loadable with weights_only=True): restored by set_rng_state, a resumed
    run draws exactly what an uninterrupted one would, on any device."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(python=random.getstate(), torch=torch.get_rng_state(),
                numpy=(name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [])


def set_rng_state(state):
    """Restore what rng_state() returned (CUDA generators only where this machine has them)."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        count = min(len(state["cuda"]), torch.cuda.device_count())
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"][:count]])


RESUME_HINT = "delete it to restart the run, or choose another --out"  # a bad checkpoint of a run


def read_checkpoint(path, what, hint, keys=(), error=None, map_location="cpu"):
    """The one reader of every file torch wrote here: the dict in `path`, or one sentence
    (an `error`, default CheckpointError) when it is missing, unreadable (empty, truncated,
    not a torch file) or not `what` (a dict holding `keys`). `hint` says what to do."""
    error = error or CheckpointError
    if not os.path.isfile(path):
        raise error(f"{path} does not exist; {hint}.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # empty, truncated, pickled code, or not a torch file at all
        raise error(f"cannot read {path} ({type(e).__name__}: empty, truncated or not a "
                    f"checkpoint); {hint}.") from None
    if not isinstance(ckpt, dict) or not set(keys) <= ckpt.keys():
        raise error(f"{path} is not {what}; {hint}.")
    return ckpt


def save_state(path, parts, **extra):
    """The one checkpoint of a training run: the state of each of `parts` (name -> module,
    optimizer, scheduler, tensor; None stays None), the `extra` values (epoch, metrics
    rows, ...) and the random state (rng_state), in one atomic file: --resume continues
    exactly where the run was (load_state)."""
    state = {name: part if part is None or torch.is_tensor(part) else part.state_dict()
             for name, part in parts.items()}
    atomic_save({**state, **extra, "rng": rng_state()}, path)


def load_state(path, what, parts, keys=(), map_location="cpu"):
    """Restore what save_state wrote: each of `parts` in place (restore) and the random
    state; returns the checkpoint, for its extra `keys` (and for parts made only once
    those are known: restore). A file that is not `what` is one sentence."""
    ckpt = read_checkpoint(path, what, RESUME_HINT, keys=(*parts, *keys, "rng"),
                           map_location=map_location)
    restore(ckpt, parts, path)
    set_rng_state(ckpt["rng"])
    return ckpt


def restore(ckpt, parts, path):
    """Load each of `parts` from the checkpoint dict `ckpt` of `path` (a tensor is copied
    into); a part that does not fit (other networks or sizes) is one sentence."""
    for name, part in parts.items():
        try:
            if torch.is_tensor(part):
                if ckpt[name].shape != part.shape:
                    raise ValueError(name)
                with torch.no_grad():
                    part.copy_(ckpt[name])
            else:
                part.load_state_dict(ckpt[name])
        except (RuntimeError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"--resume: the {name} in {path} was made with other "
                                  f"settings; {RESUME_HINT}.") from None


def write_file(path, data, append=False):
    """The one writer of every file a run writes: `data` (bytes or str) goes to a temporary
    file beside `path` that is then renamed onto it, so an interrupted run never leaves a
    truncated file (remove_stale deletes a killed one's .tmp-* files on --resume);
    append=True appends instead (metrics rows). A write that fails (disk full, no
    permission) is one sentence."""
    data = data.encode() if isinstance(data, str) else data
    tmp = None
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        if append:
            with open(path, "ab") as f:
                f.write(data)
            return
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)  # atomic on POSIX and Windows
        tmp = None
    except OSError as e:
        raise RunError(f"could not write {path} ({e.strerror or e}); the last complete "
                       "checkpoint is kept and the same command with --resume continues "
                       "from it once that is fixed.") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path):
    """torch.save `obj` to `path` through write_file (serialised in memory first, so a full
    disk is an OSError of the writer, not an error inside torch's zip writer)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_file(path, buffer.getvalue())


def save_png(image, path):
    """A PIL image as a PNG file, through write_file."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_file(path, buffer.getvalue())


def _json_default(obj):  # numpy scalars/arrays and tensors -> python; anything else -> str
    return obj.tolist() if hasattr(obj, "tolist") else str(obj)


def write_json(path, obj):
    """Write `obj` as indented JSON."""
    write_file(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def write_jsonl(path, rows):
    """Write `rows` as a JSON-lines file (a resumed run rewrites its history)."""
    write_file(path, "".join(json.dumps(row, default=_json_default) + "\n" for row in rows))


def append_jsonl(path, obj):
    """Append `obj` as one JSON line (metrics.jsonl)."""
    write_file(path, json.dumps(obj, default=_json_default) + "\n", append=True)


class Metrics:
    """A run's metrics.jsonl: `Metrics(path, rows)` rewrites the file with the rows kept in
    the checkpoint (a resumed run drops what came after it, so no row appears twice), then
    `metrics(row)` adds one row; tensor values are read as numbers, NaN and inf written as
    null (JSON has neither). `metrics(row, wait=True)` does not read them yet, so that a GPU
    loop does not stop for its log: the row is written with the next row or when `.rows`
    (every row) is read for the next checkpoint."""

    def __init__(self, path, rows=()):
        self.path = path
        self.restart(rows)

    def restart(self, rows):
        """Rewrite the file with `rows`, those the checkpoint a run resumes from kept."""
        self.written, self.pending = list(rows), []
        write_jsonl(self.path, self.written)

    def __call__(self, row, wait=False):
        self.pending.append(row)
        if not wait:
            self.flush()

    def flush(self):
        rows = [{k: _plain(v) for k, v in row.items()} for row in self.pending]
        if rows:
            write_file(self.path, "".join(json.dumps(row, default=_json_default) + "\n"
                                          for row in rows), append=True)
        self.written, self.pending = self.written + rows, []

    @property
    def rows(self):
        self.flush()
        return self.written


def _plain(value):  # a metrics value as JSON: tensors as numbers, non-finite numbers as None
    value = value.item() if torch.is_tensor(value) else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default: argparse's "(default: …)" for fixed defaults; flags whose
    default comes from the --quick preset (None here) say both values in their own text."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def add_run_flags(parser, dataset_names, quick, out, may_change=()):
    """The eleven flags every mode script shares, with one meaning and one help text.

    quick: the --quick preset (its train_size and test_size are shown); out: the default
    output folder pattern; may_change: the flags --resume lets differ from the first run.
    """
    add = parser.add_argument
    add("--dataset", default="cifar10",
        help=f"dataset: {', '.join(dataset_names)}, or an ImageFolder path (images of any size "
             "are resized to 32×32, grayscale repeated to 3 channels)")
    add("--data-root", default="data",
        help="folder where torchvision datasets are found, or downloaded to")
    add("--glow", default=None,
        help="Glow checkpoint G that scores bits per dimension (Eq. 1); with --quick and none "
             "given, a tiny Glow is pretrained on the training images and cached in "
             "quick-glow/ beside --out")
    add("--out", default=None, help=f"output folder (default {out})")
    add("--device", default="auto",
        help="auto (cuda, then mps, then cpu) or a torch device: cpu, cuda, cuda:1, mps")
    add("--seed", type=seed_int, default=0,
        help="seed of python, numpy and torch: the same seed gives the same numbers on a CPU")
    add("--quick", action="store_true",
        help="CPU preset of a few minutes: subsets, small networks, a tiny Glow; a flag given "
             "explicitly wins over the preset")
    changeable = ", ".join("--" + k.replace("_", "-") for k in may_change) or "nothing else"
    add("--resume", action="store_true",
        help="continue the run in --out from its last checkpoint; refused when a setting "
             f"differs from the first run (--device, --data-root, --compile and {changeable} "
             "may change)")
    add("--compile", action="store_true",
        help="torch.compile the frozen Glow's scoring (bits per dimension, Eq. 1), what every "
             "step of every mode runs, and the first-order network steps: the classifier's "
             "plain step, condensation's real gradients and evaluation networks, post hoc's "
             "training of f; what is "
             "differentiated twice (Eq. 3's unrolled step, Eq. 6's synthetic gradient, Alg. "
             "2's gate gradients) runs uncompiled, as torch.compile cannot. The same numbers "
             "to float rounding, faster once compiled, which takes a minute or more; off by "
             "default, as on a CPU the compile outweighs a quick run")
    add("--train-size", type=positive_int, default=None,
        help=f"use a fixed random subset of N training images (default all; quick "
             f"{quick['train_size']})")
    add("--test-size", type=positive_int, default=None,
        help=f"use a fixed random subset of N test images (default all; quick "
             f"{quick['test_size']})")


def given_flags(parser, args, argv=None):
    """The flags (as dests) given on the command line, whatever their value: args alone
    cannot tell `--ipc 10` from no --ipc. Parses argv again into a namespace that already
    holds every dest, so that argparse sets only what was given."""
    unset = object()
    again = parser.parse_args(argv, argparse.Namespace(**{k: unset for k in vars(args)}))
    return {k for k, v in vars(again).items() if v is not unset}


def refuse_unused(parser, given, rules):
    """parser.error naming every flag of `given` (nets.given_flags) that does nothing in
    the chosen mode: rules {dest: where it would act, e.g. "with --arch wrn", or a false
    value where it acts}. A flag silently ignored would make a run look like another."""
    by_where = {}  # where -> the flags that act only there
    for k, where in rules.items():
        if k in given and where:
            by_where.setdefault(where, []).append("--" + k.replace("_", "-"))
    if by_where:
        many = sum(map(len, by_where.values())) > 1
        parser.error(", ".join(f"{', '.join(flags)} (only {where})"
                               for where, flags in by_where.items())
                     + f" {'do' if many else 'does'} nothing in this run; drop "
                     f"{'them' if many else 'it'}.")


def finite_float(text):
    """argparse type for real-valued flags: refuses nan and inf like any other bad number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _int_in(text, low, high=math.inf):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}" if high == math.inf
                                         else f"must be from {low} to {high}, got {value}")
    return value


def positive_int(text):
    """argparse type for counts and sizes: an integer of at least 1."""
    return _int_in(text, 1)


def seed_int(text):
    """argparse type for --seed: an integer in [0, 2**32 - 1], the range numpy accepts."""
    return _int_in(text, 0, 2 ** 32 - 1)


# never change a run's numbers (--compile: only to float rounding, tested to 1e-5)
ALWAYS_MAY_CHANGE = ("resume", "device", "data_root", "out", "compile")


def check_settings(where, stored, settings, may_change=()):
    """The one settings rule of --resume, of grid values and of `glow.py train --resume`:
    this command's `settings` against `stored`, those the run in `where` was started with.
    Flags that never change a run's numbers (ALWAYS_MAY_CHANGE) are free; those in
    `may_change` may grow (--epochs, --iterations): they are returned, and the run
    continues; any other difference is one sentence naming `where` and the flags."""
    current = json.loads(json.dumps(settings, default=_json_default))
    stored = json.loads(json.dumps(stored, default=_json_default))
    changed = [k for k in sorted(set(stored) | set(current))
               if k not in ALWAYS_MAY_CHANGE and stored.get(k) != current.get(k)]
    other = [f"--{k.replace('_', '-')} {stored.get(k)!r} -> {current.get(k)!r}"
             for k in changed if k not in may_change]
    if other:
        raise RunError(f"{where} holds a run of other settings ({', '.join(other[:4])}); "
                       "rerun with its flags, or choose another --out.")
    return [k for k in changed if k in may_change]


def read_args(out, name="args.json"):
    """The JSON object a run wrote into its folder `out` (its settings, args.json, by
    default), or one sentence."""
    try:
        stored = json.loads((Path(out) / name).read_text())
    except (OSError, ValueError):
        stored = None
    if not isinstance(stored, dict):
        raise RunError(f"{Path(out) / name} is unreadable; move {out} away to start this run "
                       "again.")
    return stored


def check_folder(folder, flag="--out"):
    """A RunError unless `folder` is a folder or can be made one (made, then removed again:
    nothing is written yet), so a bad --out fails before anything trains."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunError(f"{flag} {folder} is a file, not a folder; choose another {flag}.")
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for made in missing:
            made.rmdir()
    except OSError as e:
        raise RunError(f"{flag} {folder} cannot be a folder ({e.strerror or e}); choose "
                       f"another {flag}.") from None


def check_out(out, settings, resume, may_change=(), length=None):
    """Make sure the folder `out` may receive this run; nothing is written here.

    `out` must be a folder or creatable as one. A new run needs a missing or empty folder:
    a folder with another run's files is refused, so nothing is ever appended to or
    overwritten in them. `--resume` continues the run whose args.json is in `out` (a
    folder without one holds no run to continue): it is refused when another process
    holds the folder (hold), a setting differs (check_settings), or the run is finished
    and `length` ({"epochs": 1}: what this command asks for, as results.json records
    it) is shorter, and removes the temporary files of a killed write. Returns True when
    an earlier run is continued.
    """
    out = Path(out)
    check_folder(out)
    if resume and (out / "args.json").is_file():
        hold(out / ".lock", out)  # refused here, before anything trains, if another holds it
        remove_stale(out)
    files = sorted(p.name for p in out.iterdir() if p.name != ".lock") if out.is_dir() else []
    if not resume:
        if files:
            raise RunError(f"{out} already holds a run ({', '.join(files[:3])}"
                           f"{', ...' if len(files) > 3 else ''}); pass --resume to continue "
                           "it, or choose another --out.")
        return False
    if not (out / "args.json").is_file():
        raise RunError(f"--resume: {out} holds no run to continue (no args.json); drop "
                       "--resume to start one there, or give the --out of the run.")
    check_settings(f"--resume: {out}", read_args(out), settings, may_change)
    finished = read_results(out / "results.json") or {}
    for key, value in (length or {}).items():
        if finished.get(key, -math.inf) > value:
            raise RunError(f"--resume: {out} is a finished run of {key} {finished[key]}, more "
                           f"than {value}; a resume never shortens a run: raise --{key} to "
                           "continue it, or choose another --out.")
    return True


def remove_stale(folder, name=""):
    """Remove the temporary files that a killed write_file left in `folder` (of the file
    `name` only, or all): the files they were written for are intact. Call it holding
    the run (hold), so no living writer's file is removed."""
    for tmp in Path(folder).glob(f".tmp-{name}*"):
        tmp.unlink()


_HELD = {}  # lock file -> its open file: what this process holds (released when it exits)


def hold(lock_path, what):
    """Hold `what` (a run's folder, a Glow checkpoint) for this process: an exclusive
    fcntl.flock on the file `lock_path`, which names the holder. The OS releases it when
    the process ends, however it ends (kill -9 included), so a lock is never stale; a
    second process is refused with one sentence naming the holder. This process may hold
    the same lock twice (a resumed run in the same Python session). No-op without fcntl."""
    key = os.path.realpath(lock_path)
    if fcntl is None or key in _HELD:
        return
    os.makedirs(os.path.dirname(key), exist_ok=True)
    f = open(key, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunError(f"{what} is held by {holder}, which is still running; wait for it to "
                       "end, or choose another --out.") from None
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _HELD[key] = f


def releases_held(main):
    """Decorator of a script's main(args): what it held (hold) is released when it returns
    or raises, so a later run in the same Python session or another process may continue
    there. (A process that ends releases everything anyway.)"""
    @functools.wraps(main)
    def run(*args, **kwargs):
        before = set(_HELD)
        try:
            return main(*args, **kwargs)
        finally:
            for key in set(_HELD) - before:
                _HELD.pop(key).close()  # closing the file releases its flock
    return run


def start_run(out, settings, made_from, resuming=False):
    """The run starts: it holds its folder `out` (hold) and writes args.json (its settings,
    what --resume and grids compare: check_settings) and made_from.json (`made_from`: the
    fingerprints of its data and model files). A resumed run must be made from the same:
    a difference is one sentence naming what changed, and nothing is rewritten."""
    out = Path(out)
    hold(out / ".lock", out)
    if resuming and (out / "made_from.json").is_file():
        stored = read_args(out, "made_from.json")
        changed = [f"{k.replace('_', ' ')} {stored.get(k)} -> {made_from.get(k)}"
                   for k in sorted(set(stored) | set(made_from))
                   if stored.get(k) != made_from.get(k)]
        if changed:
            raise RunError(f"--resume: {out} was made from other data or model files than this "
                           f"command gives (fingerprints: {', '.join(changed)}); give the ones "
                           "it was made from, or choose another --out.")
    write_json(out / "args.json", settings)
    write_json(out / "made_from.json", made_from)


def file_hash(path):
    """A short sha256 of a file's contents: what a run records of a model file it reads."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def settings_line(settings):
    """The first line a run prints: its settings as flag=value pairs."""
    return "settings: " + "  ".join(f"{k}={v}" for k, v in settings.items())


def interrupted(out, grid=False):
    """The one line a script prints on Ctrl-C or SIGTERM: how to continue the run in `out`."""
    if not grid and not (Path(out) / "args.json").is_file():
        return "interrupted before the run started; the same command starts it again."
    return (f"interrupted: the same command {'' if grid else 'with --resume '}continues the "
            f"run{'s' if grid else ''} in {out} from the last checkpoint.")


SKIP_LIMIT = 0.9  # the share of skipped steps at which an epoch counts as having learned nothing


def check_skipped(skipped, steps, what, kind="steps (non-finite loss or gradients)"):
    """Steps whose loss or gradient is not finite are skipped (authors' code). When (nearly)
    all steps of an epoch were, the run learns nothing: a RunError, raised before that
    epoch is checkpointed or any result is written."""
    if steps and skipped >= SKIP_LIMIT * steps:
        raise RunError(f"{what} skipped {skipped} of its {steps} {kind}, so the run stopped, "
                       "keeping its last checkpoint; check the data (an image channel that "
                       "never varies?) or lower --lr or λ.")


def check_finite(results, what):
    """A run whose numbers are NaN or infinite has failed: say which, as a RunError."""
    bad = [k for k, v in results.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise RunError(f"{what} ended with non-finite {', '.join(bad)}: the run diverged "
                       "(lower the learning rate or λ and start again).")


def format_duration(seconds):
    """3725 -> "01:02:05", 93784 -> "1 d 02:03:04" (no wrap at 24 h)."""
    seconds = max(int(seconds), 0)
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days} d {text}" if days else text


class Progress:
    """Prints "desc step/total, rate, ETA, metrics" at most every `every` seconds.

    Short loops print nothing; a loop that printed at least one line prints a final line
    on `close()`.
    """

    def __init__(self, total, desc, every=5.0):
        self.total, self.desc, self.every = total, desc, every
        self.count, self.metrics, self.printed = 0, {}, False
        self.start = self.last_print = time.monotonic()

    def update(self, n=1, **metrics):
        self.count += n
        self.metrics.update(metrics)
        if time.monotonic() - self.last_print >= self.every:
            self._print()

    def _print(self):
        now = time.monotonic()
        rate = self.count / max(now - self.start, 1e-9)  # steps per second
        eta = (self.total - self.count) / rate if rate > 0 else 0.0
        parts = [f"{self.desc} {self.count}/{self.total}", f"{rate:.2f} it/s",
                 "ETA " + format_duration(eta)]
        parts += [f"{k}={float(v):.4g}" for k, v in self.metrics.items()]
        print("  ".join(parts), flush=True)
        self.last_print, self.printed = now, True

    def close(self):
        if self.printed:
            self._print()


# ======================================================================================
# λ grids and trade-off figures (Fig. 5, Fig. 6, Fig. S4)
# ======================================================================================

def float_grid(text):
    """argparse type for grid flags: "0,0.4,1" -> (0.0, 0.4, 1.0) in the given order,
    "2" -> (2.0,). Refuses empty items, non-numbers, nan/inf, repeats and negative values."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"grid {text!r} has an empty item; give "
                                         "comma-separated numbers such as 0,0.4,1")
    values = []
    for item in items:
        try:
            value = finite_float(item)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"grid {text!r}: {e}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"grid {text!r}: {item!r} is negative; the "
                                             "weights and strengths of a grid are at least 0")
        if value in values:
            raise argparse.ArgumentTypeError(f"grid {text!r}: {item!r} repeats an earlier "
                                             "value; give each value once")
        values.append(value)
    return tuple(values)


def exact_text(value):
    """A number as short as it reads, yet exact: 2.0 -> "2", 0.4 -> "0.4", 0.1000001 ->
    "0.1000001" (never "0.1"), so two values never share a folder name."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def grid_text(value):
    """A knob value or grid in a folder name: 2.0 -> "2", (0.0, 0.4, 1.0) -> "0_0.4_1" (no
    commas: folder lists such as condense.py's --condensed are comma-separated)."""
    return "_".join(map(exact_text, value)) if isinstance(value, tuple) else exact_text(value)


def grid_folder(out, knob, value):
    """Folder of one grid value: grid_folder("g", "lambda_sim", 0.4) -> g/lambda_sim=0.4."""
    return Path(out) / f"{knob}={exact_text(value)}"


def run_grid(main, args, knob, grid_index=None, summary=None, may_change=()):
    """Run a mode script's main(args) once per value of the tuple getattr(args, knob), each
    into grid_folder(args.out, knob, value); with grid_index I only the I-th value (0-based,
    one value per job of an array). A value's folder that holds a run is compared with
    this command by the rule of --resume (check_settings): a finished run of the same
    settings is skipped, an unfinished one continues, as does one whose `may_change`
    settings grew (e.g. more epochs); other settings are a RunError naming the folder.
    After each value `summarize([args.out], args.out, **summary)` refreshes tradeoff.csv/png
    from whatever is finished, so array jobs need not wait for each other. Returns the
    results dicts of the values run or found finished, in grid order."""
    values, out = tuple(getattr(args, knob)), Path(args.out)
    if grid_index is not None and not 0 <= grid_index < len(values):
        raise RunError(f"--grid-index {grid_index} is out of range: --{knob.replace('_', '-')} "
                       f"has {len(values)} values, so use 0 to {len(values) - 1}.")
    done = []
    for i, value in enumerate(values):
        if grid_index is not None and i != grid_index:
            continue
        folder = grid_folder(out, knob, value)
        run_args = argparse.Namespace(**vars(args))  # a copy: the caller's args stay as given
        setattr(run_args, knob, value)
        run_args.out, run_args.resume = str(folder), (folder / "args.json").is_file()
        if hasattr(run_args, "grid_index"):
            run_args.grid_index = None  # the value's own args.json describes one plain run
        grown = run_args.resume and check_settings(folder, read_args(folder), vars(run_args),
                                                   may_change)
        if read_results(folder / "results.json") is not None and not grown:
            print(f"{folder} is finished; skipped", flush=True)
        else:  # new, unfinished, grown, or its results.json unreadable: (re)run it
            print(f"{knob} = {exact_text(value)} ({i + 1}/{len(values)}) -> {folder}", flush=True)
            main(run_args)
        done.append(read_results(folder / "results.json"))
        if summary is not None:
            summarize([out], out, **summary)
    return done


def add_grid_flags(parser, knobs):
    """--grid-index and --summarize, shared by the scripts whose `knobs` (e.g. --lambda-sim)
    take a grid: several comma-separated values, each run into its own sub-folder."""
    names = "/".join("--" + k.replace("_", "-") for k in knobs)
    parser.add_argument("--grid-index", type=int, default=None, metavar="I",
                        help=f"with a grid (several comma-separated values of {names}): run "
                             "only the I-th value (0-based), one value per job of an array "
                             "(e.g. sbatch --array=0-4)")
    parser.add_argument("--summarize", nargs="+", default=None, metavar="DIR",
                        help="only write tradeoff.csv and tradeoff.png of the finished runs in "
                             "these grid folders (several: one series each, as Fig. S4) into "
                             "--out (default: the one DIR)")


def settle_grid(parser, args, knob, knobs):
    """After parsing: a grid of one value becomes that value; only `knob`, the knob of the
    chosen method, may hold several; --grid-index needs a grid. Returns args."""
    for name in knobs:
        value = getattr(args, name)
        if isinstance(value, tuple) and len(value) == 1:
            setattr(args, name, value[0])
        elif isinstance(value, tuple) and name != knob:
            parser.error(f"--{name.replace('_', '-')} takes one value here; the grid of this "
                         f"method is --{knob.replace('_', '-')}.")
    if args.grid_index is not None and not isinstance(getattr(args, knob), tuple):
        parser.error(f"--grid-index needs a grid: several comma-separated values of "
                     f"--{knob.replace('_', '-')}.")
    if args.summarize and len(args.summarize) > 1 and args.out is None:
        parser.error("--summarize with several folders needs --out for the summary.")
    return args


def run_command(main, args, knob, out, summary, may_change=()):
    """What a mode script's command line asks for: a trade-off summary (--summarize), every
    value of a grid into its sub-folder of `out` (or the --grid-index one), or one run.
    may_change: the settings a run may grow (see run_grid)."""
    if args.summarize:
        return summarize(args.summarize, args.out or args.summarize[0], **summary)
    if isinstance(getattr(args, knob), tuple):
        grid = argparse.Namespace(**{**vars(args), "out": str(out)})
        return run_grid(main, grid, knob, args.grid_index, summary, may_change)
    return main(args)


def read_results(path):
    """The results.json at `path` as a dict, or None when it is missing, truncated or not a
    JSON object (a summary skips it; a grid runs that value again)."""
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) else None


def _number(value):  # a value a chart can draw
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _distinct_names(folders):
    """The shortest trailing parts of each path that tell the folders apart: a/g, b/g ->
    "a/g", "b/g"; x/g1, x/g2 -> "g1", "g2"."""
    parts = [Path(f).resolve().parts for f in folders]
    for k in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(f) for f in folders]


def _grid_runs(grid_dir, knob):
    """The finished runs of one grid folder, sorted by knob value: (name, knob, value, results).
    The knob is `knob`, or the part before "=" of the sub-folder name (see grid_folder);
    its value is read from results.json, else from the folder name."""
    runs = []
    for path in Path(grid_dir).glob("*/results.json"):  # quick-glow/ or unfinished: no results
        results = read_results(path)
        if results is None:
            print(f"skipped {path}: not a readable results.json", file=sys.stderr, flush=True)
            continue
        name_key, _, text = path.parent.name.partition("=")
        key = knob or name_key
        value = results.get(key)
        if value is None and key == name_key:
            try:
                value = float(text)  # e.g. a baseline whose results.json lacks its knob
            except ValueError:
                pass  # not a grid_folder name: listed last
        runs.append((path.parent.name, key, value, results))
    return sorted(runs, key=lambda r: (r[2] is None, r[2] or 0, r[0]))


def summarize(grid_dirs, out, x_key, series, ref_key=None, knob=None, title=""):
    """Collect the runs of one or more grid folders into out/tradeoff.csv and tradeoff.png.

    CSV: one row per run, columns run ("<grid folder>/<sub-folder>"), the knob, then every
    scalar of results.json (first-seen order; a missing cell is empty). Chart: each
    `series` entry, (label, y_key) against x_key or (label, x_key, y_key), optionally
    followed by a dict of values a run's results must hold (e.g. {"distill": True}), is
    drawn for the runs that have both keys; with several grid folders each gets its own
    series labelled
    "<folder>: <label>" (Fig. S4). ref_key (e.g. test_bpd, bpd_real): the original images'
    bpd, a dashed line at its mean over runs. Returns the CSV rows as dicts.
    """
    rows, lines, refs, knob_keys = [], [], [], {}
    grid_dirs = list(map(Path, grid_dirs))
    for grid_dir, grid_name in zip(grid_dirs, _distinct_names(grid_dirs)):
        runs = _grid_runs(grid_dir, knob)
        if not runs:
            if not grid_dir.is_dir():
                raise RunError(f"--summarize: {grid_dir} is not a folder; give a grid's --out.")
            unfinished = sorted(p.name for p in grid_dir.iterdir()
                                if (p / "args.json").is_file())
            raise RunError(f"--summarize: {grid_dir} holds no finished run (a sub-folder with "
                           "results.json)" + (f"; unfinished: {', '.join(unfinished)}"
                                              if unfinished else "") + ".")
        for name, key, value, results in runs:
            scalars = {k: v for k, v in results.items() if isinstance(v, (int, float, str, bool))}
            rows.append({"run": f"{grid_name}/{name}", key: value, **scalars})
            knob_keys[key] = None  # an ordered set: the knob column(s) come right after run
            refs += [results[ref_key]] if _number(results.get(ref_key)) else []
        for label, *keys in series:
            where = keys.pop() if isinstance(keys[-1], dict) else {}
            xk, yk = keys if len(keys) == 2 else (x_key, keys[0])
            points = [(r[xk], r[yk], f"{key}={exact_text(value)}" if "=" in name and value is not None
                       else name)
                      for name, key, value, r in runs if _number(r.get(xk)) and _number(r.get(yk))
                      and all(r.get(k) == v for k, v in where.items())]
            if points:
                lines.append((f"{grid_name}: {label}" if len(grid_dirs) > 1 else label, points))
    columns = list(dict.fromkeys(["run", *knob_keys] + [k for row in rows for k in row]))

    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_file(Path(out) / "tradeoff.csv", text.getvalue())
    draw_tradeoff(Path(out) / "tradeoff.png", lines, "bits per dimension", "test accuracy (%)",
                  ref_x=sum(refs) / len(refs) if refs else None, title=title)
    return rows


# tab10 colours and four marker shapes: series i gets colour i % 10 and shape i % 4
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
MARKERS = ["circle", "square", "triangle", "diamond"]
REF_COLOUR = (80, 80, 80)  # the dashed reference line; in no series colour


def _nice_ticks(lo, hi, target=6):
    """About `target` ticks in [lo, hi] at multiples of 1, 2, 2.5 or 5 × 10^k."""
    raw = (hi - lo) / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9)
    return [k * step for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def _padded(values):
    """Axis limits around `values` with 5% room each side (±0.5 for a single value)."""
    lo, hi = min(values), max(values)
    pad = 0.05 * (hi - lo) if hi > lo else 0.5
    return lo - pad, hi + pad


def _marker(draw, shape, x, y, colour, r=6):
    """A filled marker of radius r pixels centred on (x, y)."""
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    else:  # a regular polygon in the circle of radius r: (sides, rotation in degrees)
        sides, rotation = {"square": (4, 45), "triangle": (3, 0), "diamond": (4, 0)}[shape]
        draw.regular_polygon((x, y, r), sides, rotation=rotation, fill=colour)


def draw_tradeoff(path, series, xlabel, ylabel, ref_x=None, ref_label="original images", title=""):
    """Draw accuracy against bits per dimension (Fig. 5, Fig. 6) as an 800×560 PNG, atomically.

    series: [(label, [(x, y, text), ...]), ...], points in knob order; x in bits/dim, y an
    accuracy *fraction* in [0, 1] as results.json holds it, drawn in % on the axis; text
    (e.g. "lambda_sim=0.4") is written beside the marker. A line joins a series' points.
    ref_x: bpd of the original images, a dashed vertical line. Returns the mapping
    to_pixel(x, y_fraction) -> (column, row) of the image, for checking where markers land.
    """
    width, rows = 800, math.ceil(len(series) / 2)  # legend: two columns under the axes
    height = max(560, 480 + 20 * rows)
    left, right, top, bottom = 80, width - 24, 48, 400  # plot box in pixels
    xs = [x for _, pts in series for x, _, _ in pts] + ([ref_x] if ref_x is not None else [])
    ys = [100 * y for _, pts in series for _, y, _ in pts]
    (x0, x1), (y0, y1) = _padded(xs or [0.0]), _padded(ys or [0.0])

    def to_pixel(x, y):
        return (round(left + (x - x0) / (x1 - x0) * (right - left)),
                round(bottom - (100 * y - y0) / (y1 - y0) * (bottom - top)))  # rows grow down

    img = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=13)  # Pillow >= 10.1
    # grid lines and tick labels at nice values, then the box, the axis labels and the title
    for t in _nice_ticks(x0, x1):
        px = to_pixel(t, 0)[0]
        draw.line((px, top, px, bottom + 4), fill=(228, 228, 228))
        draw.text((px, bottom + 8), f"{t:g}", fill="black", font=font, anchor="mt")
    for t in _nice_ticks(y0, y1):
        py = to_pixel(x0, t / 100)[1]
        draw.line((left - 4, py, right, py), fill=(228, 228, 228))
        draw.text((left - 8, py), f"{t:g}", fill="black", font=font, anchor="rm")
    draw.rectangle((left, top, right, bottom), outline="black")
    draw.text(((left + right) // 2, bottom + 30), xlabel, fill="black", font=font, anchor="mt")
    draw.text((left - 8, top - 10), ylabel, fill="black", font=font, anchor="ls")
    draw.text((width // 2, 8), title, fill="black", font=font, anchor="mt")
    texts = []  # boxes of the texts in the plot: a text that would overlap one is left out

    def write(x, y, text, colour):  # beside (x, y): to the right, or left near the right edge
        anchor = "lb" if x + 9 + font.getlength(text) < width else "rb"
        xy = (x + 9 if anchor == "lb" else x - 9, y)
        box = draw.textbbox(xy, text, font=font, anchor=anchor)
        if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]
                   for b in texts):
            draw.text(xy, text, fill=colour, font=font, anchor=anchor)
            texts.append(box)
    if ref_x is not None:
        px = to_pixel(ref_x, 0)[0]
        for row in range(top, bottom, 10):  # dashes of 6 pixels, gaps of 4
            draw.line((px, row, px, min(row + 5, bottom)), fill=REF_COLOUR)
        write(px - 5, bottom - 6, f"{ref_label} ({ref_x:.3g} bpd)", REF_COLOUR)
    # series: all joining lines first, so that every marker and its text stay on top
    for i, (_, points) in enumerate(series):
        if len(points) > 1:
            draw.line([to_pixel(x, y) for x, y, _ in points], fill=COLOURS[i % len(COLOURS)],
                      width=2)
    for i, (label, points) in enumerate(series):
        colour, shape = COLOURS[i % len(COLOURS)], MARKERS[i % len(MARKERS)]
        for x, y, text in points:
            px, py = to_pixel(x, y)
            _marker(draw, shape, px, py, colour)
            write(px, py - 5, text, (70, 70, 70))
        lx, ly = left + (i % 2) * (right - left) // 2, bottom + 60 + (i // 2) * 20
        _marker(draw, shape, lx + 6, ly + 7, colour)
        draw.text((lx + 18, ly), label, fill="black", font=font)
    save_png(img, path)
    return to_pixel
