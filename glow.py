"""Glow and bits per dimension: the simplicity measure of SimpleBits (Sec. 2, Eq. 1).

    L_sim(x) = -log p_G(x)          (Eq. 1), reported as bits per dimension (bpd)

A canonical multi-scale Glow (Kingma & Dhariwal 2018) whose parameter names and maths
match the public pretrained CIFAR-10 model of y0ast/Glow-PyTorch (3.39 bpd), so that
checkpoint can be converted and used for scoring; "y0ast" below names that repository
(y0ast/Glow-PyTorch, model.py and modules.py), whose conventions the comments point out.

    python glow.py train --quick                                  # tiny Glow, CPU, ~1 min
    python glow.py import-y0ast glow/glow_affine_coupling.pt --out glow-cifar10.pt
    python glow.py bpd --glow glow-cifar10.pt --dataset cifar10,svhn   # Fig. 2 style grid
    python glow.py train --dataset cifar10,cifar100,svhn --out glow-general.pt
    python glow.py sample --glow glow-cifar10.pt --out samples.png     # what it learned

Read it in this order: the flow layers and `Glow`, `bits_per_dim` (Eq. 1) with the
latent helpers, `freeze` (the scoring copy), checkpoints; pretraining (`train_glow`) and the
command line come after.
"""
import argparse
import copy
import math
import os
import re
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import datasets
import nets

LOGSCALE_FACTOR = 3.0  # Conv2dZeros output gain exp(3·logs): fixed in y0ast, not stored
N_BINS = 256  # 8-bit images: bins of width 1/256 in the Glow input space
QUICK_GLOW = dict(levels=3, steps=4, hidden=32)  # the tiny Glow that --quick pretrains on CPU
QUICK_STEPS = 300  # Adamax steps of batch QUICK_BATCH for the tiny Glow
QUICK_BATCH = 64  # y0ast's and the authors' batch
IMAGE_SHAPE = (3, 32, 32)  # of every dataset of datasets.py, and so of every Glow used here
QUICK_LR = 5e-3  # 10x the full-size rate, so that 300 steps learn that plain backgrounds
# are cheap (the README's notes)


class GlowCheckpointError(Exception):
    """An expected failure with a Glow checkpoint; the message says what to do."""


def gaussian_log_p(x, mean, logs):
    """Elementwise log N(x; mean, exp(logs)²), logs = log standard deviation (y0ast
    `gaussian_log_p`)."""
    return -0.5 * (2.0 * logs + (x - mean) ** 2 / torch.exp(2.0 * logs) + math.log(2 * math.pi))


# ----------------------------------------------------------------------------------------
# Layers. Each flow layer maps x -> (y, logdet) and has an exact reverse(y). The layers
# compute the Glow maths as written; freeze() below makes a folded copy for scoring.
# ----------------------------------------------------------------------------------------


class ActNorm(nn.Module):
    """y = (x + bias)·exp(logs) per channel; log-det H·W·Σ logs (Glow Sec. 3.1).

    Data-dependent init (Glow Sec. 3.1, y0ast `ActNorm2d`): the first forward in training
    mode sets bias = −mean and logs = −log(std + 1e-6) from that batch. "initialized" is a
    buffer, so a loaded model never re-initialises itself (a python attribute would be lost
    on loading).
    """

    def __init__(self, channels):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self._known_initialized = None  # python mirror, avoids a GPU sync per forward

    def _load_from_state_dict(self, *args, **kwargs):
        self._known_initialized = None
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def initialize(self, x):  # x: (B, C, H, W)
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True).sqrt()  # biased, as y0ast
        self.bias.copy_(-mean)
        self.logs.copy_(torch.log(1.0 / (std + 1e-6)))
        self.initialized.fill_(1)
        self._known_initialized = True

    def forward(self, x):
        if self.training:
            if self._known_initialized is None:
                self._known_initialized = bool(self.initialized)
            if not self._known_initialized:
                self.initialize(x)
        y = (x + self.bias) * torch.exp(self.logs)
        return y, x.shape[2] * x.shape[3] * self.logs.sum()

    def reverse(self, y):
        return y * torch.exp(-self.logs) - self.bias


class InvConv1x1(nn.Module):
    """Invertible 1×1 convolution, W = p·L·U in LU form (Glow Sec. 3.2).

    L = strict_lower(lower) + I and U = strict_upper(upper) + diag(sign_s·exp(log_s)); the
    stored entries on/above (lower) and on/below (upper) the diagonal are ignored (y0ast
    masks them; its checkpoint holds junk there). log|det W| = Σ log_s per pixel.
    """

    def __init__(self, channels, lu=True):
        super().__init__()
        self.lu = lu
        w = torch.linalg.qr(torch.randn(channels, channels))[0]  # random rotation (Glow Sec. 3.2)
        if lu:
            p, lower, upper = torch.linalg.lu(w)
            diag = torch.diagonal(upper)
            self.register_buffer("p", p)
            self.register_buffer("sign_s", torch.sign(diag))
            self.lower = nn.Parameter(lower)  # unit diagonal included, as y0ast stores it
            self.log_s = nn.Parameter(torch.log(diag.abs()))
            self.upper = nn.Parameter(torch.triu(upper, 1))
            self.register_buffer("l_mask", torch.tril(torch.ones_like(w), -1), persistent=False)
        else:
            self.weight = nn.Parameter(w)

    def weight_matrix(self):  # (C, C); W[r, c] maps input channel c to output channel r
        if not self.lu:
            return self.weight
        eye = torch.eye(self.l_mask.shape[0], dtype=self.l_mask.dtype, device=self.l_mask.device)
        lower = self.lower * self.l_mask + eye
        upper = self.upper * self.l_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.p @ lower @ upper

    def logdet_per_pixel(self):
        if self.lu:
            return self.log_s.sum()
        # float64 slogdet: y0ast's float32 slogdet is imprecise
        return torch.linalg.slogdet(self.weight.double())[1].to(self.weight.dtype)

    def forward(self, x):
        w = self.weight_matrix()
        y = F.conv2d(x, w.view(*w.shape, 1, 1))
        return y, x.shape[2] * x.shape[3] * self.logdet_per_pixel()

    def reverse(self, y):
        w_inv = torch.linalg.inv(self.weight_matrix().double()).to(y.dtype)
        return F.conv2d(y, w_inv.view(*w_inv.shape, 1, 1))


def folded_conv(conv, weight, bias):
    """A plain nn.Conv2d shaped like `conv`, holding the given (folded) weight and bias;
    built without a random initialisation, so freezing draws nothing from the random
    stream (a run's numbers never depend on which Glow it scores with at λ = 0)."""
    out = torch.nn.utils.skip_init(nn.Conv2d, conv.in_channels, conv.out_channels,
                                   conv.kernel_size, padding=conv.padding,
                                   device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        out.bias.copy_(bias)
    return out


class ConvActNorm(nn.Module):
    """Conv without bias, then ActNorm whose log-det is discarded (coupling NN, y0ast `Conv2d`)."""

    def __init__(self, in_channels, out_channels, kernel_size):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size,
                              padding=kernel_size // 2, bias=False)
        nn.init.normal_(self.conv.weight, std=0.05)  # y0ast's init
        self.actnorm = ActNorm(out_channels)

    def forward(self, x):
        return self.actnorm(self.conv(x))[0]

    def folded(self):  # (Wx + b)·e^s = (e^s·W)x + b·e^s: one convolution (see freeze)
        scale = torch.exp(self.actnorm.logs).view(-1)
        return folded_conv(self.conv, self.conv.weight * scale.view(-1, 1, 1, 1),
                           self.actnorm.bias.view(-1) * scale)


class ZeroConv(nn.Module):
    """y0ast's Conv2dZeros: (conv(x) + bias)·exp(3·logs), all zero at init (Glow Sec. 3.3).

    Zero init makes every coupling start as a pure scaling by sigmoid(2) and every prior
    start as N(0, I): a deep flow that is well-conditioned from the first step.
    """

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(out_channels, 1, 1))

    def forward(self, x):
        return self.conv(x) * torch.exp(self.logs * LOGSCALE_FACTOR)

    def folded(self):  # the gain folds into the convolution (see freeze)
        gain = torch.exp(self.logs * LOGSCALE_FACTOR).view(-1)
        return folded_conv(self.conv, self.conv.weight * gain.view(-1, 1, 1, 1),
                           self.conv.bias * gain)


class FoldedMix(nn.Module):
    """ActNorm followed by the invertible 1×1 conv as ONE 1×1 conv with bias, for scoring
    (see freeze): y = W·diag(e^s)·(x + b), log-det per pixel Σ s + log|det W|; exact reverse."""

    def __init__(self, actnorm, invconv):
        super().__init__()
        dtype = actnorm.logs.dtype
        with torch.no_grad():
            mix = invconv.weight_matrix().double() * torch.exp(actnorm.logs.view(-1)).double()
            self.register_buffer("weight", mix.to(dtype)[:, :, None, None])  # W·diag(e^s)
            self.register_buffer("bias", (mix @ actnorm.bias.view(-1).double()).to(dtype))
            self.register_buffer("inverse", torch.linalg.inv(mix).to(dtype)[:, :, None, None])
            self.register_buffer("shift", actnorm.bias.detach().clone())  # (1, C, 1, 1)
            self.register_buffer("logdet", actnorm.logs.sum() + invconv.logdet_per_pixel())

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias), x.shape[2] * x.shape[3] * self.logdet

    def reverse(self, y):
        return F.conv2d(y, self.inverse) - self.shift


class IdentityFlow(nn.Module):
    """A flow layer that does nothing (log-det 0): stands in for a layer folded elsewhere."""

    def forward(self, x):
        return x, 0.0

    def reverse(self, y):
        return y


class FlowStep(nn.Module):
    """ActNorm → invertible 1×1 conv → affine (or additive) coupling (Glow Fig. 2a).

    Coupling: the first channel half x_a conditions, the second half x_b is transformed.
    h = NN(x_a); shift = h[:, 0::2], raw = h[:, 1::2] (even/odd channels, as y0ast's
    `split_feature(h, "cross")`);
    σ = sigmoid(raw + 2): the +2 makes σ ≈ 0.88 at init, i.e. close to the identity while
    keeping σ in (0, 1) so the flow cannot blow up; y_b = (x_b + shift)·σ; log-det Σ log σ.
    """

    def __init__(self, channels, hidden, affine=True, lu=True):
        super().__init__()
        self.affine = affine
        self.actnorm = ActNorm(channels)
        self.invconv = InvConv1x1(channels, lu)
        out = channels if affine else channels // 2
        self.block = nn.Sequential(ConvActNorm(channels // 2, hidden, 3), nn.ReLU(),
                                   ConvActNorm(hidden, hidden, 1), nn.ReLU(),
                                   ZeroConv(hidden, out))

    def coupling_params(self, x_a):
        h = self.block(x_a)
        if not self.affine:
            return h, None
        return h[:, 0::2], torch.sigmoid(h[:, 1::2] + 2.0)

    def forward(self, x):
        x, logdet_actnorm = self.actnorm(x)
        x, logdet_conv = self.invconv(x)
        logdet = logdet_actnorm + logdet_conv
        x_a, x_b = x.chunk(2, dim=1)
        shift, scale = self.coupling_params(x_a)
        if scale is None:  # additive coupling: volume preserving
            return torch.cat([x_a, x_b + shift], dim=1), logdet
        y_b = (x_b + shift) * scale  # add first, then scale (y0ast's order)
        return torch.cat([x_a, y_b], dim=1), logdet + torch.log(scale).sum(dim=(1, 2, 3))

    def reverse(self, y):
        y_a, y_b = y.chunk(2, dim=1)
        shift, scale = self.coupling_params(y_a)
        x_b = y_b - shift if scale is None else y_b / scale - shift  # divide, then subtract
        x = torch.cat([y_a, x_b], dim=1)
        return self.actnorm.reverse(self.invconv.reverse(x))


class Split(nn.Module):
    """y0ast's Split2d: factor out the second channel half z₂ under a Gaussian prior whose
    mean/log-std come from the kept half z₁ (learned conditional prior).
    Mean = even, log-std = odd output channels (y0ast's "cross" split)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = ZeroConv(channels // 2, channels)

    def prior(self, z1):
        h = self.conv(z1)
        return h[:, 0::2], h[:, 1::2]

    def forward(self, x):
        z1, z2 = x.chunk(2, dim=1)
        mean, logs = self.prior(z1)
        return z1, z2, gaussian_log_p(z2, mean, logs).sum(dim=(1, 2, 3))

    def reverse(self, z1, z2=None, temperature=1.0):
        """z2 given: exact inverse. z2 None: sample it from the prior at `temperature`."""
        if z2 is None:
            mean, logs = self.prior(z1)
            z2 = mean + temperature * torch.exp(logs) * torch.randn_like(mean)
        return torch.cat([z1, z2], dim=1)


class Squeeze(nn.Module):
    """(B, C, H, W) -> (B, 4C, H/2, W/2), out channel 4c + 2dy + dx (y0ast `squeeze2d`)."""

    def forward(self, x):
        return F.pixel_unshuffle(x, 2)

    def reverse(self, y):
        return F.pixel_shuffle(y, 2)


class FlowNet(nn.Module):
    """Container whose `layers` indices match y0ast's state dict (layer l·(K+2) opens level l)."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class Glow(nn.Module):
    """Multi-scale Glow: per level a squeeze, `steps` flow steps, then a split (not after
    the last level); a learned Gaussian prior on the top latent (Glow Sec. 3, y0ast `learn_top`).

    forward(x) takes glow-range images x ∈ [−0.5, 0.5) (already dequantized) and returns
    (log p(x) per image in nats, latents); latents = [z₂ of each split, top z] is the
    complete code of x, and reverse(latents) reconstructs x exactly. reverse with None
    entries samples those latents from their priors instead (see sample()).
    """

    def __init__(self, levels=3, steps=32, hidden=512, affine=True, lu=True, learn_top=True,
                 in_channels=3, image_size=32):
        super().__init__()
        if image_size % 2 ** levels:
            raise ValueError(f"image size {image_size} is not divisible by 2^levels = {2 ** levels}")
        self.config = dict(levels=levels, steps=steps, hidden=hidden, affine=affine, lu=lu,
                           learn_top=learn_top, in_channels=in_channels, image_size=image_size)
        layers, channels, size = [], in_channels, image_size
        for level in range(levels):
            channels, size = channels * 4, size // 2
            layers.append(Squeeze())
            layers += [FlowStep(channels, hidden, affine, lu) for _ in range(steps)]
            if level < levels - 1:
                layers.append(Split(channels))
                channels //= 2
        self.flow = FlowNet(layers)
        self.top_channels = channels
        # top prior input: zeros (B, 2·C_top, S_top, S_top); a buffer as in y0ast
        self.register_buffer("prior_h", torch.zeros(1, 2 * channels, size, size))
        self.learn_top_fn = ZeroConv(2 * channels, 2 * channels) if learn_top else None

    def top_prior(self):
        """(mean, log-std) of the top latent; first/second channel half (y0ast `prior`)."""
        h = self.prior_h if self.learn_top_fn is None else self.learn_top_fn(self.prior_h)
        return h[:, :self.top_channels], h[:, self.top_channels:]

    def flow_forward(self, x):
        """x -> (latents, Σ log-dets (B,), Σ log priors (B,)); log p(x) is their sum."""
        logdet = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        log_prior = torch.zeros_like(logdet)
        latents = []
        for layer in self.flow.layers:
            if isinstance(layer, FlowStep):
                x, layer_logdet = layer(x)
                logdet = logdet + layer_logdet
            elif isinstance(layer, Split):
                x, z2, split_log_prior = layer(x)
                latents.append(z2)
                log_prior = log_prior + split_log_prior
            else:
                x = layer(x)
        mean, logs = self.top_prior()  # (1, C_top, S, S), broadcast over the batch
        log_prior = log_prior + gaussian_log_p(x, mean, logs).sum(dim=(1, 2, 3))
        return latents + [x], logdet, log_prior

    def forward(self, x):
        latents, logdet, log_prior = self.flow_forward(x)
        return logdet + log_prior, latents

    def reverse(self, latents, temperature=1.0):
        """Latents -> glow-range x. Exact reconstruction when every latent is given; a None
        entry is sampled from its prior at `temperature` (the top one needs a tensor or
        use sample()). Differentiable: post-hoc simplification optimises latents through it.
        """
        latents = list(latents)
        x = latents.pop()
        for layer in reversed(self.flow.layers):
            if isinstance(layer, Split):
                x = layer.reverse(x, latents.pop(), temperature)
            else:
                x = layer.reverse(x)
        return x

    def sample(self, n, temperature=1.0):
        """n glow-range images drawn from the model: every latent from its prior at
        `temperature` (Glow's trick: below 1 the samples are cleaner); 0 gives the mode."""
        mean, logs = self.top_prior()
        top = mean + temperature * torch.exp(logs) * torch.randn(n, *mean.shape[1:],
                                                                 device=mean.device)
        return self.reverse([None] * (self.config["levels"] - 1) + [top], temperature)


def freeze(glow):
    """A frozen copy of `glow` (or of one of its layers) for scoring: eval mode, no parameter
    gradients (gradients still flow to the input), and every per-channel affine folded into
    its convolution, so one flow step is four convolutions: ActNorm and the 1×1 conv become
    one FoldedMix, each ConvActNorm / ZeroConv one nn.Conv2d; on a CPU its weights are
    stored channels_last. The same numbers, faster (README, Speed). Train and save the
    original: the copy is for scoring only. A frozen Glow is returned as it is."""
    if getattr(glow, "folded", False):
        return glow
    frozen = copy.deepcopy(glow).eval()
    for module in list(frozen.modules()):
        if isinstance(module, FlowStep):
            module.actnorm = FoldedMix(module.actnorm, module.invconv)
            module.invconv = IdentityFlow()
        for name, child in list(module.named_children()):
            if isinstance(child, (ConvActNorm, ZeroConv)):
                setattr(module, name, child.folded())
    if all(p.device.type == "cpu" for p in frozen.parameters()):
        # channels_last: the CPU's (oneDNN) convolutions score 1.05-1.3x faster so (README,
        # Speed); the same numbers. Elsewhere the default layout, until measured on a GPU
        frozen = frozen.to(memory_format=torch.channels_last)
    frozen.folded = True  # save_glow refuses it
    return frozen.requires_grad_(False)


# ----------------------------------------------------------------------------------------
# Bits per dimension (Eq. 1) and the image <-> latent helpers
# ----------------------------------------------------------------------------------------


def to_glow_range(x):
    """[0,1] image u = k/255 -> k/256 − 0.5 (y0ast `preprocess`: divide by 256, not 255)."""
    return x * (255.0 / N_BINS) - 0.5


def from_glow_range(x_glow):
    return (x_glow + 0.5) * (N_BINS / 255.0)


def quantize(x):
    """Straight-through 8-bit quantization: forward round(255x)/255, backward identity, so
    Glow scores the code length of an actual 8-bit image."""
    return x + (torch.round(x * 255.0) / 255.0 - x).detach()


def bits_per_dim(glow, x, noise=True):
    """Eq. 1 as code length per dimension, per image: x (B, C, H, W) in [0,1] -> (B,).

    bpd(x) = (−log p_G(x_g + u) + D·ln 256) / (D·ln 2),  u ~ U(0, 1/256),  D = C·H·W.
    The +D·ln 256 turns the density over bins of width 1/256 into a probability mass, so
    bpd includes the "+8" of the authors' loss. The noise is added out of place
    (x may require grad); noise=False scores deterministically, and a tensor is used as u
    itself (distributed training draws u for the whole batch on every process).
    """
    x_glow = to_glow_range(x)
    if torch.is_tensor(noise):
        x_glow = x_glow + noise
    elif noise:
        x_glow = x_glow + torch.rand_like(x_glow) / N_BINS
    log_p, _ = glow(x_glow)
    dims = x[0].numel()
    return (-log_p + dims * math.log(N_BINS)) / (dims * math.log(2.0))


@torch.no_grad()
def prior_mode(glow, n):
    """Latents of the simplest image the priors describe, for n images: the top latent at
    its prior mean, then each split's z₂ at its conditional prior mean given the levels
    above (sampling at temperature 0). With learned, conditional priors z = 0 is not this
    point. Sec. 5 starts post-hoc simplification from such "a very simple image"."""
    mean, _ = glow.top_prior()  # (1, C_top, S, S)
    levels = glow.config["levels"]
    x_glow = glow.reverse([None] * (levels - 1) + [mean.expand(n, -1, -1, -1)], temperature=0.0)
    return glow(x_glow)[1]  # the latents of that image, [z₂ of each split, top z]


@torch.no_grad()
def sample_images(glow, n, temperature=0.7):
    """n [0,1] images drawn from the Glow (Glow.sample): what it has learned."""
    return from_glow_range(glow.sample(n, temperature)).clamp(0, 1)


def encode(glow, x):
    """[0,1] images -> list of latents (no dequantization noise)."""
    return glow(to_glow_range(x))[1]


def decode(glow, latents):
    """Latents -> [0,1]-range images; exact inverse of encode (values may leave [0,1])."""
    return from_glow_range(glow.reverse(latents))


# ----------------------------------------------------------------------------------------
# Checkpoints: our format, and the import of the public y0ast CIFAR-10 model
# ----------------------------------------------------------------------------------------

HOW_TO_GET_A_GLOW = (
    "convert the public CIFAR-10 Glow (glow.zip from the y0ast/Glow-PyTorch README) with "
    "`python glow.py import-y0ast glow/glow_affine_coupling.pt --out glow-cifar10.pt`, or train "
    "one with `python glow.py train --dataset NAME --out glow.pt`")


def save_glow(glow, path, **extra):
    """Write {"kind": "glow", "config", "state_dict", **extra} atomically."""
    if getattr(glow, "folded", False):
        raise ValueError("save the Glow itself, not the scoring copy that freeze() made")
    nets.atomic_save({"kind": "glow", "config": glow.config, "state_dict": glow.state_dict(),
                      **extra}, path)


def check_image_shape(config, shape, what):
    """A Glow scores images of one shape only (in_channels × image_size × image_size):
    one sentence, naming `what` Glow, when `shape` (C, H, W) of the images is another."""
    glow_shape = (config.get("in_channels", 3),) + (config.get("image_size", 32),) * 2
    if tuple(shape) != glow_shape:
        raise GlowCheckpointError(
            f"{what} models {'×'.join(map(str, glow_shape))} images, but the images to score "
            f"are {'×'.join(map(str, shape))}; give a Glow of such images "
            f"({HOW_TO_GET_A_GLOW}).")


def load_glow(path, device="cpu", frozen=True, made_from=None, image_shape=None):
    """Rebuild a Glow from its config, load its weights and move it to `device`; frozen for
    scoring by default. The checkpoint is read on the CPU; every parameter and buffer of
    the returned model lives on `device`. With `made_from`, a Glow that was pretrained on
    other data (its stored "made_from") is refused, and so is, given `image_shape`
    (C, H, W), a Glow of images of another shape."""
    checkpoint = nets.read_checkpoint(path, "a checkpoint", HOW_TO_GET_A_GLOW,
                                      error=GlowCheckpointError)
    if checkpoint.get("kind") != "glow":
        if any(str(k).startswith("flow.layers.") for k in checkpoint):
            raise GlowCheckpointError(
                f"{path} is a y0ast state dict, not a checkpoint of this project: convert it "
                f"with `python glow.py import-y0ast {path} --out glow-cifar10.pt`.")
        raise GlowCheckpointError(f"{path} holds a {checkpoint.get('kind')!r}, not a Glow: "
                                  f"{HOW_TO_GET_A_GLOW}.")
    if made_from is not None and checkpoint.get("made_from") != made_from:
        raise GlowCheckpointError(f"{path} was pretrained on {checkpoint.get('made_from')}, not "
                                  f"on {made_from}; delete it or choose another --out.")
    if image_shape is not None:
        check_image_shape(checkpoint["config"], image_shape, path)
    with torch.random.fork_rng(devices=[]):  # the random init, overwritten below, must not
        glow = Glow(**checkpoint["config"])  # move the caller's stream: a cached quick Glow
        # then gives the same run as one pretrained in place (get_glow forks its stream too)
    try:
        glow.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        last_line = str(error).strip().splitlines()[-1].strip()
        raise GlowCheckpointError(f"{path}: the weights do not match its config ({last_line}).")
    glow = glow.to(device)
    return freeze(glow) if frozen else glow


def config_from_y0ast(state):
    """Read levels, steps, hidden, coupling, LU and learn_top from the keys and shapes."""
    def indices(pattern):
        return sorted(int(m.group(1)) for k in state if (m := re.fullmatch(pattern, k)))

    steps = indices(r"flow\.layers\.(\d+)\.actnorm\.bias")
    splits = indices(r"flow\.layers\.(\d+)\.conv\.conv\.weight")
    if not steps or "prior_h" not in state:
        raise GlowCheckpointError("this is not a y0ast Glow state dict (no flow.layers.*.actnorm "
                                  "or prior_h entries).")
    if "project_ycond.linear.weight" in state:
        raise GlowCheckpointError("class-conditional (y_condition) y0ast checkpoints are not "
                                  "supported: their density depends on the label.")
    levels = len(splits) + 1
    k = len(steps) // levels
    # y0ast's index formula: level l starts at l·(K+2) with its squeeze
    if steps != [l * (k + 2) + 1 + i for l in range(levels) for i in range(k)] or \
            splits != [l * (k + 2) + k + 1 for l in range(levels - 1)]:
        raise GlowCheckpointError("the flow.layers indices do not follow y0ast's layout "
                                  "(squeeze, K steps, split per level).")
    first = f"flow.layers.{steps[0]}"
    c0 = state[f"{first}.actnorm.bias"].shape[1]  # 4 × image channels after the squeeze
    return dict(levels=levels, steps=k, hidden=state[f"{first}.block.0.conv.weight"].shape[0],
                affine=state[f"{first}.block.4.conv.weight"].shape[0] == c0,
                lu=f"{first}.invconv.lower" in state,
                learn_top="learn_top_fn.conv.weight" in state,
                in_channels=c0 // 4, image_size=state["prior_h"].shape[-1] * 2 ** levels)


def import_y0ast(state):
    """y0ast state dict (any K, L, hidden, LU or not, affine or additive, learn_top or not)
    -> our Glow. Tensor names are identical by construction; we add the ActNorm
    "initialized" flags (y0ast keeps them out of the state dict)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    config = config_from_y0ast(state)
    check_image_shape(config, IMAGE_SHAPE, "this y0ast Glow")
    glow = Glow(**config)
    ours = dict(state)
    for name in glow.state_dict():
        if name.endswith(".initialized"):
            ours[name] = torch.tensor(1, dtype=torch.uint8)
    try:
        glow.load_state_dict(ours)
    except RuntimeError as error:
        raise GlowCheckpointError(f"the y0ast state dict does not match the inferred config "
                                  f"({str(error).strip().splitlines()[-1].strip()}).")
    return glow


# --- running it: pretraining, caches and the command line (not needed to follow the paper) --
# Pretraining (Kingma & Dhariwal 2018, the recipe of y0ast and the authors) and scoring


def random_crop_flip(x, pad=3):
    """Per-image random translation by up to ±pad pixels (reflect padding) and horizontal
    flip (the authors' Glow training: RandomCrop(32, padding=3, reflect) + flip)."""
    return nets.crop_flip(x, nets.sample_crop_flip(len(x), pad, True, x.device), pad, "reflect")


@torch.no_grad()
def score_dataset(glow, dataset, device, batch_size=256, noise=True):
    """bpd of every image of `dataset`, in dataset order: (N,) on the CPU."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    return torch.cat([bits_per_dim(glow, x.to(device), noise).cpu() for x, _ in loader])


def glow_step(model, optimizer, x, noise):
    """One maximum-likelihood step: Adamax on the mean bpd of the batch x (Eq. 1). A batch
    whose gradient is not finite is skipped (authors): weights and Adamax's moments and
    step count stay untouched. Adamax has no fused kernel that could read the check on
    the device, so it is read on the host. Under DDP the check sees the averaged
    gradient, so every process decides alike. Returns (loss, 1 if skipped else 0)."""
    loss = bits_per_dim(model, x, noise=noise).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # DDP averages the gradients over the processes
    params = [p for group in optimizer.param_groups for p in group["params"]]
    finite = bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(params, math.inf)))
    if finite:
        optimizer.step()
    return loss.detach(), int(not finite)


def train_glow(glow, train_set, device, epochs, test_set=None, batch_size=64, lr=5e-4,
               warmup_steps=None, max_steps=None, out=None, init_images=512, settings=None,
               seed=0, log=print, compile=False, after_epoch=None):
    """Maximum likelihood (mean bpd) with Adamax(lr, weight decay 5e-5), linear warm-up
    (default: a tenth of the run, at most 4000 steps as the released model), ActNorm
    data-dependent init on `init_images` augmented images; a batch whose gradient is not
    finite is skipped (glow_step), and an epoch that skipped (nearly) all is an error.
    Saves `out` atomically after every epoch (with `settings`, the run's flags) and resumes
    from it when it holds an unfinished run (a finished run keeps only the model).
    A run that diverges (non-finite weights or test bpd) raises instead of saving.

    Under torchrun (torch.distributed initialised) it trains with DistributedDataParallel:
    `batch_size` is the global batch, each of the W processes takes every W-th image of
    it, and the augmentation and dequantization noise are drawn for the whole batch on
    every process, so N processes take the same steps as one (up to float rounding).
    Only rank 0 logs, evaluates and writes `out`, and calls `after_epoch(epoch)` (glow.py
    train: write_samples). With `compile` (--compile) the training steps run
    torch.compile'd; `glow` itself is what is initialised, saved and returned.
    """
    rank, world = rank_and_world()
    sampler, loader = global_batches(train_set, batch_size, seed)
    total_steps = min(epochs * len(loader), max_steps or math.inf)
    # an epoch line every log_every epochs and the last: about 20 lines even where a small
    # training set makes an epoch of one batch (300 of them for --quick)
    last_epoch = math.ceil(total_steps / len(loader))
    log_every = max(1, last_epoch // 20)
    model = glow if world == 1 else torch.nn.parallel.DistributedDataParallel(
        glow, device_ids=[device.index] if device.type == "cuda" else None)
    model = torch.compile(model) if compile else model
    optimizer, warmup = glow_optimizer(glow, lr, warmup_steps, total_steps, log)
    log(f"global batch {batch_size} = {world} process(es) × {batch_size // world}")
    start_epoch, step = 0, 0
    if out and os.path.isfile(out):  # an unfinished run of the same flags (main checked them)
        state = nets.load_state(out, "an unfinished `glow.py train` run",
                                dict(state_dict=glow, optimizer=optimizer, scheduler=warmup),
                                keys=("epoch", "step"))
        start_epoch, step = state["epoch"], state["step"]
        log(f"resumed {out} at epoch {start_epoch}")
    else:
        init_actnorm(glow, train_set, init_images, seed, device)
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        train_bpd, count, skipped, step = glow_epoch(
            model, optimizer, warmup, loader, batch_size, device, step, max_steps,
            f"glow epoch {epoch + 1}/{last_epoch}")
        test_bpd = mean_test_bpd(glow, test_set, device, seed)
        done = epoch + 1 == epochs or (max_steps and step >= max_steps)
        if (epoch + 1) % log_every == 0 or done or skipped:
            log(f"glow epoch {epoch + 1}: train bpd {train_bpd:.3f}"
                + (f", test bpd {test_bpd:.3f}" if test_set is not None else "")
                + (f", {skipped} batches with non-finite gradients skipped" if skipped else ""))
        nets.check_skipped(skipped, count, f"glow epoch {epoch + 1}")
        weights_finite = all(bool(p.isfinite().all()) for p in glow.parameters())
        if not (math.isfinite(test_bpd) and weights_finite):
            raise nets.RunError(f"Glow training diverged in epoch {epoch + 1} (non-finite "
                                "weights or test bpd), so it was not saved; lower --lr.")
        if out and rank == 0:  # a finished run keeps only the model
            save_glow(glow, out, settings=settings, **({} if done else dict(
                optimizer=optimizer.state_dict(), scheduler=warmup.state_dict(),
                epoch=epoch + 1, step=step, rng=nets.rng_state())))
        if after_epoch and rank == 0:
            after_epoch(epoch + 1)
        if world > 1:
            dist.barrier()  # nobody runs ahead of the checkpoint
        if done:
            break
    return glow


def rank_and_world():
    """(this process's rank, the number of processes): (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def global_batches(train_set, batch_size, seed):
    """The DistributedSampler and this process's DataLoader of `batch_size` global batches:
    every process sees its share of each epoch, in an order fixed by (seed, epoch)."""
    rank, world = rank_and_world()
    if batch_size % world:
        raise nets.RunError(f"--batch-size {batch_size} (the global batch) does not divide "
                            f"over {world} processes.")
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank,
                                                  shuffle=True, seed=seed, drop_last=True)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size // world,
                                         sampler=sampler, drop_last=True)
    if len(loader) == 0:
        raise nets.RunError(f"the {len(train_set)} training images do not fill one batch of "
                            f"{batch_size}; lower --batch-size.")
    return sampler, loader


def glow_optimizer(glow, lr, warmup_steps, total_steps, log):
    """Adamax(lr, weight decay 5e-5) as y0ast and the authors, with a linear warm-up over
    `warmup_steps` (default: a tenth of the run, at most the released model's 4000)."""
    if warmup_steps is None:
        warmup_steps = max(1, min(4000, total_steps // 10))
    log(f"Adamax lr {lr:g}, linear warm-up over {warmup_steps} of {total_steps} steps")
    if warmup_steps > total_steps:
        log(f"warning: the warm-up ({warmup_steps} steps) is longer than the run "
            f"({total_steps} steps): the learning rate never reaches {lr:g}")
    optimizer = torch.optim.Adamax(glow.parameters(), lr=lr, weight_decay=5e-5)
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps))
    return optimizer, warmup


def init_actnorm(glow, train_set, init_images, seed, device):
    """ActNorm's data-dependent initialisation (Glow Sec. 3.1) before the first step, on
    `init_images` augmented training images, the same on every process."""
    pick = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))
    x = torch.stack([train_set[i][0] for i in pick[:init_images].tolist()]).to(device)
    glow.train()
    with torch.no_grad():
        x = random_crop_flip(x)
        glow(to_glow_range(x) + torch.rand_like(x) / N_BINS)


def glow_epoch(model, optimizer, warmup, loader, batch_size, device, step, max_steps, desc):
    """One epoch of maximum likelihood (glow_step per batch, until `max_steps` in all).
    The augmentation and the dequantization noise are drawn for the whole global batch on
    every process, which takes its rows. Returns (mean train bpd over the batches learned
    from, over all processes; batches; skipped batches; steps so far)."""
    rank, world = rank_and_world()
    model.train()
    total, count, skipped = torch.zeros((), device=device), 0, 0
    progress = nets.Progress(len(loader), desc, every=5.0 if rank == 0 else math.inf)
    for x, _ in loader:  # x: this process's images of the global batch
        shifts, flips = nets.sample_crop_flip(batch_size, 3, True, device)
        noise = torch.rand(batch_size, *x.shape[1:], device=device) / N_BINS
        mine = slice(rank, None, world)
        x = nets.crop_flip(x.to(device), (shifts[mine], flips[mine]), 3, "reflect")
        loss, bad = glow_step(model, optimizer, x, noise[mine])
        with warnings.catch_warnings():  # a skipped first batch is meant, not torch's warning
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)`")
            warmup.step()  # the warm-up counts batches, skipped ones included
        total = total if bad else total + loss
        count, step, skipped = count + 1, step + 1, skipped + bad
        progress.update()
        if max_steps and step >= max_steps:
            break
    progress.close()
    if world > 1:
        dist.all_reduce(total)
        total = total / world
    return total.item() / max(count - skipped, 1), count, skipped, step


def write_samples(glow, path, device, seed, n=32, temperature=0.7):
    """`n` samples of `glow` at `temperature` as a PNG grid at `path`, from the same latent
    noise every time (seeded on a stream apart from training's): after every epoch of
    `glow.py train`, a picture of what the Glow has learned so far."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            torch.no_grad():
        torch.manual_seed(seed)
        images = sample_images(glow, n, temperature).nan_to_num(0.5)  # an early, wild Glow
    datasets.save_image_grid(images, path, nrow=8)


def mean_test_bpd(glow, test_set, device, seed):
    """The mean bpd of `test_set` (0 without one), scored by rank 0 on its own
    random stream (training draws the same numbers with or without a test set) and sent
    to every process."""
    rank, world = rank_and_world()
    test_bpd = torch.zeros((), device=device)
    if test_set is not None and rank == 0:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            test_bpd += score_dataset(glow, test_set, device).mean().to(device)
    if world > 1:
        dist.broadcast(test_bpd, 0)
    return test_bpd.item()


def get_glow(path, quick, train_set, cache_path, device, made_from=None, log=print,
             test_set=None):
    """The scoring Glow of a mode script, on `device`: `path` if given; with `quick`, the
    tiny Glow of the --quick presets, pretrained here on `train_set` and
    cached at `cache_path`, or taken from there if it was made from the same data
    (`made_from`, e.g. {"dataset": ..., "train_size": ..., "seed": ...}); otherwise a clear
    error. The pretraining draws from its own random stream seeded with made_from["seed"],
    so it neither depends on nor changes the caller's: a run gives the same numbers whether
    the Glow was cached or not, and runs of a λ grid share one Glow. A freshly pretrained
    Glow reports its bpd of training and `test_set` images (check_fit)."""
    device = torch.device(device)
    shape = IMAGE_SHAPE if train_set is None else image_shape(train_set)
    if path:
        return load_glow(path, device, image_shape=shape)
    if not quick:
        raise nets.RunError(f"no Glow given: pass --glow PATH ({HOW_TO_GET_A_GLOW}), "
                                  f"or use --quick to pretrain a tiny one.")
    if os.path.isfile(cache_path):
        log(f"using the cached quick Glow {cache_path}")
        return load_glow(cache_path, device, made_from=made_from, image_shape=shape)
    if len(train_set) < QUICK_BATCH:
        raise nets.RunError(f"--quick pretrains its tiny Glow in batches of {QUICK_BATCH} "
                            f"training images, more than the {len(train_set)} here; give at "
                            f"least {QUICK_BATCH} (a larger --train-size or folder), or a "
                            "--glow to score with.")
    log(f"pretraining a tiny Glow {QUICK_GLOW} on {len(train_set)} images -> {cache_path}")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed((made_from or {}).get("seed", 0))
        glow = Glow(**QUICK_GLOW, in_channels=shape[0], image_size=shape[-1]).to(device)
        train_glow(glow, train_set, device, epochs=1000, batch_size=QUICK_BATCH,
                   max_steps=QUICK_STEPS, lr=QUICK_LR,
                   warmup_steps=50, seed=(made_from or {}).get("seed", 0), log=log)
        if test_set is not None:
            check_fit(glow, train_set, test_set, device, log)
    save_glow(glow, cache_path, made_from=made_from)
    return freeze(glow)


def check_fit(glow, train_set, test_set, device, log, n=500):
    """Log the mean bpd of up to `n` training and `n` test images, and warn when the test
    images cost over 10% more: a tiny Glow pretrained on a few hundred images memorises
    them, and its bpd of other images then say little."""
    fit = {name: score_dataset(glow, datasets.subset(data, n, seed=0), device).mean().item()
           for name, data in (("training", train_set), ("test", test_set))}
    log(f"tiny Glow: mean bpd {fit['training']:.3f} of training images, {fit['test']:.3f} "
        "of test images")
    if fit["test"] > 1.1 * fit["training"]:
        warnings.warn(f"The tiny Glow fits its {len(train_set)} training images much better "
                      f"than the test images ({fit['training']:.2f} against {fit['test']:.2f} "
                      "bpd): it has memorised them, so the bpd it gives other images say "
                      "little; give more training images or a --glow.", stacklevel=2)


def image_shape(dataset):
    """(C, H, W) of the dataset's images, read from its first item without moving the
    random stream (a composite's training item draws its distractor afresh)."""
    with torch.random.fork_rng(devices=[]):
        return tuple(dataset[0][0].shape)


def glow_for_run(cfg, train_set, test_set, device):
    """A mode script's scoring Glow (get_glow: --glow, or the quick one cached for this
    training data and seed), and what the run is made from, for --resume to compare
    (nets.start_run): fingerprints of its data and of the --glow file."""
    if getattr(cfg, "compile", False):
        nets.check_compile(device)  # before a quick Glow is pretrained
    data = datasets.fingerprint(train_set)
    quick_from = dict(dataset=train_set.info.name, data=data, seed=cfg.seed)
    model = get_glow(cfg.glow, cfg.quick, train_set, quick_glow_path(cfg.out, quick_from), device,
                     quick_from, test_set=test_set)
    if getattr(cfg, "compile", False):
        model = compiled(model)
    return model, dict(train_data=data, test_data=datasets.fingerprint(test_set),
                       glow=nets.file_hash(cfg.glow) if cfg.glow else "quick")


def compiled(frozen):
    """--compile: the frozen Glow with torch.compile'd forward (what bits_per_dim calls);
    its other methods (encode, reverse, priors) and attributes are the frozen Glow's own.
    Only a frozen copy is compiled, and it is never saved, so no checkpoint carries
    torch.compile's `_orig_mod.` names."""
    if not getattr(frozen, "folded", False):
        raise ValueError("compile the scoring copy that freeze() made")
    return torch.compile(frozen)


def quick_glow_path(out, made_from):
    """Where the quick Glow of `made_from` is cached: a quick-glow/ folder beside the run's
    output folder, shared by all runs on the same data (e.g. every λ of a grid)."""
    name = "-".join(str(v) for v in made_from.values()).replace(os.sep, "_")
    return os.path.join(os.path.dirname(os.path.abspath(out)), "quick-glow", f"glow-{name}.pt")


# ----------------------------------------------------------------------------------------
# Command line: train | import-y0ast | bpd | sample
# ----------------------------------------------------------------------------------------


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="pretrain a Glow (the G of Eq. 1)")
    train.add_argument("--dataset", default=None,
                       help="dataset name(s) from datasets.py or ImageFolder path(s), comma-"
                            "separated to combine (default cifar10; shapes with --quick)")
    train.add_argument("--out", default=None, help="checkpoint path (default runs/glow-<dataset>.pt)")
    train.add_argument("--levels", type=nets.positive_int, default=None, help="levels L of the multi-scale Glow (3)")
    train.add_argument("--flow-steps", type=nets.positive_int, default=None,
                       help="flow steps K per level (default 32; quick 4)")
    train.add_argument("--hidden", type=nets.positive_int, default=None, help="coupling-network width (512)")
    train.add_argument("--additive", action="store_true", help="additive instead of affine coupling")
    train.add_argument("--epochs", type=nets.positive_int, default=None, help="training epochs (100)")
    train.add_argument("--max-steps", type=nets.positive_int, default=None, help="stop after this many steps")
    train.add_argument("--batch-size", type=nets.positive_int, default=64,
                       help="global batch size (y0ast and the authors: 64); under torchrun each "
                            "of the N processes takes batch/N images, so it must divide by N")
    train.add_argument("--lr", type=nets.finite_float, default=None,
                       help="Adamax learning rate (5e-4; quick %g)" % QUICK_LR)
    train.add_argument("--warmup-steps", type=nets.positive_int, default=None,
                       help="linear lr warm-up steps (default: a tenth of the run's steps, at most "
                            "4000 as the released model; quick 50)")
    train.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
    train.add_argument("--train-size", type=nets.positive_int, default=None, help="train on a fixed random subset of N images")
    train.add_argument("--test-size", type=nets.positive_int, default=None, help="report test bpd on a fixed random subset")
    train.add_argument("--compile", action="store_true",
                       help="torch.compile the training steps: the same model to float "
                            "rounding, faster once compiled (a minute or more); the saved "
                            "checkpoint is the plain Glow's")
    train.add_argument("--quick", action="store_true",
                       help="CPU preset: the tiny Glow of the mode scripts' --quick, on shapes")
    imp = commands.add_parser("import-y0ast", help="convert y0ast/Glow-PyTorch's checkpoint")
    imp.add_argument("checkpoint", help="y0ast state dict, e.g. glow/glow_affine_coupling.pt")
    imp.add_argument("--out", required=True, help="converted checkpoint path")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    bpd = commands.add_parser("bpd", help="score datasets: mean bpd and a grid sorted by bpd (Fig. 2)")
    bpd.add_argument("--glow", required=True, help="Glow checkpoint of this project")
    bpd.add_argument("--dataset", required=True, help="comma-separated dataset names or folders")
    bpd.add_argument("--split", choices=["train", "test"], default="test", help="which split to score")
    bpd.add_argument("--compile", action="store_true",
                     help="torch.compile the Glow's scoring: the same numbers to float "
                          "rounding, faster on large sets once compiled (a minute or more)")
    bpd.add_argument("--test-size", type=nets.positive_int, default=None, help="score a fixed random subset of N images")
    bpd.add_argument("--out", default="runs/glow-bpd", help="output folder for bpd.json and the grids")
    bpd.add_argument("--batch-size", type=nets.positive_int, default=256, help="scoring batch size")
    bpd.add_argument("--overwrite", action="store_true",
                     help="replace the bpd.json and grids of an earlier scoring in --out")
    sample = commands.add_parser("sample", help="a grid of images drawn from a Glow: the "
                                                 "quickest look at what it learned")
    sample.add_argument("--glow", required=True, help="Glow checkpoint of this project")
    sample.add_argument("--num", type=nets.positive_int, default=64, help="images to draw")
    sample.add_argument("--temperature", type=nets.finite_float, default=0.7,
                        help="prior temperature: 1 the model's own density, lower gives "
                             "cleaner images (Glow paper: 0.7), 0 the mode")
    sample.add_argument("--out", default="glow-samples.png", help="the PNG grid to write")
    sample.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    for sub in (train, imp, bpd, sample):
        sub.add_argument("--device", default="auto",
                         help="auto (cuda, then mps, then cpu) or a torch device: cpu, cuda, cuda:1, mps")
        sub.add_argument("--data-root", default="data", help="where datasets are (downloaded)")
        sub.add_argument("--seed", type=nets.seed_int, default=0, help="random seed")
    return parser.parse_args(argv)


def load_many(names, root, train, size, seed):
    """One or several (comma-separated) datasets as one, optionally a fixed random subset."""
    parts = [datasets.load_dataset(name, root, train=train)
             for name in datasets.dataset_names(names)]
    if len(parts) == 1:
        return datasets.subset(parts[0], size, seed)
    data = torch.utils.data.ConcatDataset(parts)
    data.info = parts[0].info  # Glow ignores labels; subset() only carries this along
    return datasets.subset(data, size, seed)


def refuse_overwrite(paths, overwrite):
    """A command that is not a run (import-y0ast, bpd) replaces no file unless told."""
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise nets.RunError(f"{existing[0]} exists; pass --overwrite to replace it, or choose "
                            "another --out.")


def train_out(args):
    """The checkpoint `glow.py train` writes: --out, else runs/glow-<dataset>.pt."""
    name = args.dataset or ("shapes" if args.quick else "cifar10")
    return args.out or f"runs/glow-{name.replace(',', '+').replace(os.sep, '_')}.pt"


@nets.releases_held  # the run's folder, once it ends
def main(args):
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun; only rank 0 prints
    log = print if rank == 0 else (lambda *a, **k: None)
    log(nets.settings_line(vars(args)))
    nets.seed_everything(args.seed)  # the same on every process
    device = nets.resolve_device(args.device)
    nets.quick_threads(getattr(args, "quick", False), device)  # only `train` has --quick
    if args.command == "import-y0ast":
        refuse_overwrite([args.out], args.overwrite)
        state = nets.read_checkpoint(args.checkpoint, "a y0ast state dict", "download glow.zip "
                                     "from the y0ast/Glow-PyTorch README, unzip it and give "
                                     "glow_affine_coupling.pt", error=GlowCheckpointError)
        glow = import_y0ast(state)
        save_glow(glow, args.out)
        print(f"wrote {args.out}: {glow.config}")
    elif args.command == "train":
        def pick(value, full, quick):  # an explicit flag wins over the preset
            return value if value is not None else (quick if args.quick else full)
        name = pick(args.dataset, "cifar10", "shapes")
        config = dict(levels=pick(args.levels, 3, QUICK_GLOW["levels"]),
                      steps=pick(args.flow_steps, 32, QUICK_GLOW["steps"]),
                      hidden=pick(args.hidden, 512, QUICK_GLOW["hidden"]), affine=not args.additive)
        if 32 % 2 ** config["levels"]:
            raise nets.RunError(f"--levels {config['levels']}: 32×32 images allow at most 5 levels.")
        if args.lr is not None and args.lr <= 0:
            raise nets.RunError(f"--lr must be positive, got {args.lr}.")
        if args.compile:
            nets.check_compile(device)
        out = train_out(args)
        if os.path.isdir(out):
            raise nets.RunError(f"--out {out} is a folder; give the checkpoint file to write, "
                                f"e.g. {os.path.join(out, 'glow.pt')}.")
        nets.check_folder(os.path.dirname(os.path.abspath(out)), "--out's folder")
        if os.path.isfile(out) and not args.resume:
            raise nets.RunError(f"{out} exists: pass --resume to continue it or another --out.")
        if args.resume and not os.path.isfile(out):
            raise nets.RunError(f"--resume: {out} does not exist, so there is no run to "
                                      "continue; drop --resume to start one.")
        if args.resume:  # only a run of the same flags continues (more epochs or steps allowed)
            state = nets.read_checkpoint(out, "an unfinished `glow.py train` run (finished, "
                                         "imported or foreign)", "choose another --out",
                                         keys=("optimizer", "settings"), error=GlowCheckpointError)
            nets.check_settings(f"--resume: {out}", state["settings"], vars(args),
                                may_change=("epochs", "max_steps"))
        if rank == 0:  # the process that writes `out` holds it (a hidden lock file beside)
            folder, file = os.path.split(os.path.abspath(out))
            nets.hold(os.path.join(folder, f".{file}.lock"), out)
            if args.resume:
                nets.remove_stale(folder, file)
        samples = os.path.splitext(out)[0] + "-samples.png"  # rewritten after every epoch
        train_set = load_many(name, args.data_root, True, args.train_size, args.seed)
        test_set = load_many(name, args.data_root, False, args.test_size, args.seed)
        world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun: DistributedDataParallel
        if world > 1:
            if device.type == "cuda":  # one GPU per process
                device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        try:
            glow = Glow(**config).to(device)
            train_glow(glow, train_set, device, epochs=pick(args.epochs, 100, 1000),
                       test_set=test_set, batch_size=args.batch_size,
                       lr=pick(args.lr, 5e-4, QUICK_LR), warmup_steps=pick(args.warmup_steps, None, 50),
                       max_steps=pick(args.max_steps, None, QUICK_STEPS), out=out,
                       settings=vars(args), seed=args.seed, log=log, compile=args.compile,
                       after_epoch=lambda epoch: write_samples(glow, samples, device, args.seed))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        log(f"wrote {out} and {samples} (samples at temperature 0.7)")
    elif args.command == "sample":
        if args.temperature < 0:
            raise nets.RunError(f"--temperature must not be negative, got {args.temperature}.")
        refuse_overwrite([args.out], args.overwrite)
        images = sample_images(load_glow(args.glow, device), args.num, args.temperature)
        datasets.save_image_grid(images, args.out, nrow=8)
        print(f"wrote {args.out}: {args.num} samples at temperature {args.temperature:g}")
    else:
        tags = [os.path.basename(name.rstrip(os.sep))
                for name in datasets.dataset_names(args.dataset)]
        files = ["bpd.json"] + [f"bpd-{tag}.png" for tag in tags]
        refuse_overwrite([os.path.join(args.out, f) for f in files], args.overwrite)
        if args.compile:
            nets.check_compile(device)
        glow = load_glow(args.glow, device, image_shape=IMAGE_SHAPE)
        glow = compiled(glow) if args.compile else glow
        means = {}
        for name in datasets.dataset_names(args.dataset):
            data = load_many(name, args.data_root, args.split == "train", args.test_size, args.seed)
            bpd = score_dataset(glow, data, device, args.batch_size)
            means[name] = bpd.mean().item()
            order = bpd.argsort()
            picks = order[torch.linspace(0, len(order) - 1, min(32, len(order))).long()]
            images = torch.stack([data[i][0] for i in picks.tolist()])
            tag = os.path.basename(name.rstrip(os.sep))  # as in tags
            datasets.save_image_grid(images, os.path.join(args.out, f"bpd-{tag}.png"), nrow=8,
                                     captions=[f"{bpd[i]:.2f}" for i in picks.tolist()])
            print(f"{name}: mean bpd {means[name]:.3f} over {len(data)} images "
                  f"(grid sorted by bpd: {args.out}/bpd-{tag}.png)")
        nets.write_json(os.path.join(args.out, "bpd.json"), means)


if __name__ == "__main__":
    nets.console()  # before --help: its text has λ
    args = get_args()
    try:
        main(args)
    except (GlowCheckpointError, datasets.DatasetError, nets.CheckpointError, nets.RunError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (nets.console)
        print("interrupted" + (f": the same command with --resume continues {train_out(args)} "
                               "from its last saved epoch." if args.command == "train" else "."),
              file=sys.stderr)
        sys.exit(130)
