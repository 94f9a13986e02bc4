"""Dataset condensation with simplification (SimpleBits, Sec. 4, Eq. 6-7, Fig. 6, S10).

Condenses a training set into `ipc` synthetic images per class by gradient matching
(Zhao et al. 2021, "Dataset condensation with gradient matching") and, at the same time,
makes those images simple: their code length under a frozen Glow (bits per dimension)
is added to the matching loss with weight λ. The condensed set is evaluated the DC way:
fresh ConvNets are trained on it and tested on the real test set (mean ± std), next to
the same number of randomly chosen real images per class. A two-class dataset also gets
Fig. 7's view (two_class.png): the two condensed classes and their colour-coded difference,
beside an earlier run (--compare, typically λ = 0). --continual evaluates condensed sets for
task-incremental continual learning (S11, Fig. S8/S9, Zhao & Bilen 2021).

    # CPU quick start (a few minutes, pretrains a tiny Glow on the fly); a grid of λ = 0 (plain DC)
    # and 50, each into a sub-folder, with tradeoff.csv/png (~5 min)
    python condense.py --dataset shapes --quick
    python condense.py --dataset shapes --quick --lambda-sim 0,50
    # the paper's setting on a GPU (Fig. 6): CIFAR-10, 1 image per class, the λ grid
    python condense.py --dataset cifar10 --ipc 1 --lambda-sim 0,0.2,2,20,200 --glow glow-cifar10.pt
    # continual learning (S11) on CPU (~1 min): shapes, then shapes-colour, replaying the
    # quick start's condensed shapes; --no-replay instead of --condensed: Fig. S8's ablation
    python condense.py --continual --dataset shapes,shapes-colour --quick \
        --condensed runs/condense-shapes-ipc10-lam50-seed0-quick
    # S11 on a GPU: SVHN -> MNIST -> USPS, replaying condensed SVHN and MNIST (ipc 10 runs)
    python condense.py --continual --dataset svhn,mnist,usps --condensed RUN_SVHN,RUN_MNIST

Read it in the paper's order: `gradient_match_loss` (Eq. 6's D), `matching_loss` (Σ_c D_c),
`condensation_loss` (Eq. 7), `outer_iteration` and `condense` (DC's loops); then the
evaluation, the figures, and continual learning (S11: `continual`). Everything below the
"running it" banner is presets, flags, checkpoints and `main`.
"""
import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import datasets
import glow
import nets

CROP_PAD = 3  # random-crop padding of the continual training images (authors' RandomCrop pad 3)


# ------------------------------------------------------------------ Sec. 4: Eq. 6 and 7
def gradient_match_loss(grads_real, grads_syn, eps=1e-6):
    """Layer-wise cosine distance D of Eq. 6 (Zhao et al. 2021, `distance_wb`):

        D(G_real, G_syn) = Σ_layers Σ_i ( 1 − ⟨g_r,i, g_s,i⟩ / (‖g_r,i‖·‖g_s,i‖ + ε) )

    where g_r,i and g_s,i are row i of the real and the synthetic gradient of one weight
    tensor reshaped to (out, rest); a row belongs to one output unit: an output channel
    of a conv, a class of the final linear layer. Tensors with one dimension (biases,
    instance-norm gains and offsets) contribute 0, as in DC's 'ours' metric. ε = 1e-6
    (DC) keeps zero rows finite.
    """
    distance = grads_syn[0].new_zeros(())
    for g_real, g_syn in zip(grads_real, grads_syn):
        if g_real.dim() == 1:
            continue  # biases / norm parameters are ignored
        g_real, g_syn = g_real.flatten(1), g_syn.flatten(1)  # (out, in·kh·kw)
        cos = (g_real * g_syn).sum(1) / (g_real.norm(dim=1) * g_syn.norm(dim=1) + eps)
        distance = distance + (1 - cos).sum()  # sum over rows, then over layers
    return distance


def class_match_loss(net, x_real, x_syn, label, fast=None):
    """Eq. 6 for one class c: D(∇θ l(f(X_real,c), c), ∇θ l(f(X_syn,c), c)), over the weights
    D compares (tensors of 2+ dimensions: biases and norm parameters add 0 to D, so their
    gradients are not computed).

    The real gradient is a constant target (detached), summed over chunks of the real
    batch (`chunk_size`: the same gradient, as instance norm keeps images independent).
    The synthetic gradient keeps its graph (create_graph=True) so that D can be
    differentiated w.r.t. the synthetic images. `fast` (--compile): the same net
    torch.compile'd, for the real gradient only; the synthetic one is differentiated
    twice, which torch.compile cannot.
    """
    weights = [p for p in net.parameters() if p.dim() > 1]  # conv kernels, linear weight
    real_net = net if fast is None else fast
    g_real = [torch.zeros_like(w) for w in weights]
    for x in x_real.split(chunk_size(net, x_real)):
        y = torch.full((len(x),), label, dtype=torch.long, device=x.device)
        part = F.cross_entropy(real_net(x), y, reduction="sum") / len(x_real)  # share of the mean
        for g, g_part in zip(g_real, torch.autograd.grad(part, weights)):
            g += g_part
    y_syn = torch.full((len(x_syn),), label, dtype=torch.long, device=x_syn.device)
    g_syn = torch.autograd.grad(F.cross_entropy(net(x_syn), y_syn), weights, create_graph=True)
    return gradient_match_loss(g_real, g_syn)


def matching_loss(net, x_syn, real_by_class, ipc, batch_real, fast=None):
    """Σ_c D_c of Eq. 6-7: the gradient-matching distance of every class, each against a
    fresh random batch of that class's real images. x_syn (N, 3, 32, 32) is class-major,
    ipc images per class."""
    return sum(class_match_loss(net, sample_real(real_by_class, c, batch_real),
                                x_syn[c * ipc:(c + 1) * ipc], c, fast)
               for c in range(len(real_by_class)))


def sample_real(real_by_class, c, batch_real):
    """A random batch of up to `batch_real` real images of class c (global RNG, on CPU so
    that the draw does not depend on the device)."""
    x = real_by_class[c]
    return x[torch.randperm(len(x))[:batch_real].to(x.device)]


def condensation_loss(net, alpha, real_by_class, glow_model, *, lambda_sim, ipc, batch_real,
                      bpd_chunk, fast=None):
    """The condensation objective with simplification, Eq. 7 (our λ, see the README):

        L = Σ_c D_c(X_real,c, X_syn,c) + λ · mean_{x ∈ X_syn} bpd(x),  X_syn = quantize(σ(α))

    backpropagated into alpha.grad. Eq. 7 adds Σ −log p_G(x_syn); we use the mean bpd (bits
    per dimension incl. the +8 of the 256-bin term), what the authors optimise. The bpd
    term is backpropagated `bpd_chunk` images at a time (gradient accumulation: the same
    gradient as one graph, with Glow's saved activations, ~44 MiB per image at the
    released size, bounded; the authors used chunks of 50), its dequantization noise drawn
    once for the whole set. A bpd term whose value or gradient is not finite is left out
    (the authors skipped a non-finite bpd). Returns L, Σ_c D_c and the mean bpd (NaN when
    λ = 0 or left out), detached. `fast`: see class_match_loss.
    """
    match = matching_loss(net, synthetic_images(alpha), real_by_class, ipc, batch_real, fast)
    match.backward(inputs=[alpha])  # alpha.grad = ∂Σ_c D_c/∂α
    if lambda_sim == 0:  # plain DC: Glow is not needed
        return match.detach(), match.detach(), match.new_tensor(math.nan)
    match_grad, alpha.grad = alpha.grad, None
    noise = torch.rand_like(alpha) / glow.N_BINS  # u ~ U(0, 1/256), as bits_per_dim draws it
    bpd = alpha.new_zeros(())
    for rows in torch.arange(len(alpha), device=alpha.device).split(bpd_chunk):
        part = glow.bits_per_dim(glow_model, synthetic_images(alpha[rows]), noise=noise[rows])
        part = part.sum() / len(alpha)  # this chunk's share of the mean
        part.backward(inputs=[alpha])  # alpha.grad accumulates ∂ mean bpd/∂α
        bpd = bpd + part.detach()
    # the one place for a non-finite bpd term: left out of L and of the gradient
    use = torch.isfinite(bpd) & torch.isfinite(alpha.grad).all()  # 0-dim, on the device
    alpha.grad = match_grad + torch.where(use, lambda_sim * alpha.grad, 0.0)
    loss = match.detach() + torch.where(use, lambda_sim * bpd, 0.0)
    return loss, match.detach(), torch.where(use, bpd, math.nan)


def synthetic_images(alpha):
    """X_syn = quantize(sigmoid(α)): straight-through 8-bit rounding, so the classifier
    and Glow both see an actual 8-bit image and gradients reach α unchanged. The
    classifier gets this image without dequantization noise, like the real images (the
    authors also fed it the +U(0, 1/255) noise); only Glow adds noise, in bits_per_dim.
    The saved synthetic.pt therefore holds exactly what the evaluation nets train on."""
    return glow.quantize(torch.sigmoid(alpha))


def outer_iteration(alpha, optimizer, real_by_class, glow_model, *, lambda_sim, ipc,
                    batch_real, width, outer_loop, inner_loop, batch_size, bpd_chunk,
                    compile=False):
    """One outer iteration of DC with the simplification term: a fresh ConvNet; then
    `outer_loop` times: one Adam step on α minimising Eq. 7, and (except after the last)
    `inner_loop` epochs of SGD (lr 0.01, momentum 0.5) of the net on the synthetic set.
    Returns the last step's loss, Σ_c D_c and mean bpd (NaN when left out), as 0-dim
    tensors on the device: reading them waits for the device, so the caller does it
    rarely. `compile` (--compile): the net's first-order passes (the real gradients of
    Eq. 6, its own training) run torch.compile'd (nets.compiled)."""
    num_classes = len(real_by_class)
    labels = torch.arange(num_classes, device=alpha.device).repeat_interleave(ipc)
    net = make_convnet(num_classes, width, alpha.device)
    fast = nets.compiled(net, compile)  # the same parameters
    net_optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.5)
    for step in range(outer_loop):
        # update the synthetic images: one Adam step on Eq. 7 w.r.t. α
        optimizer.zero_grad()
        loss, match, bpd = condensation_loss(
            net, alpha, real_by_class, glow_model, lambda_sim=lambda_sim, ipc=ipc,
            batch_real=batch_real, bpd_chunk=bpd_chunk, fast=fast)
        optimizer.step()
        if step == outer_loop - 1:
            break
        # update the network: inner_loop epochs on the current (detached) synthetic set
        train_network(fast, net_optimizer, synthetic_images(alpha).detach(), labels,
                      inner_loop, batch_size)
    return {"loss": loss, "match": match, "bpd": bpd}  # 0-dim tensors on the device


def make_convnet(num_classes, width, device):
    """A fresh randomly initialised DC ConvNet (depth 3, instance norm), seeded by the
    global RNG. mean 0.5, std 1 gives the input x − 0.5, the authors' glow-range input
    x·255/256 − 0.5 up to 0.4% (the authors' repository feeds the classifier that input)."""
    return nets.ConvNet(num_classes, width=width, depth=3,
                        mean=(0.5,) * 3, std=(1.0,) * 3).to(device)


def get_loops(ipc):
    """(outer_loop, inner_loop) of DC's `get_loops`: image updates per network, and the
    network's epochs on the synthetic set between them. DC defines 1, 10, 20, ..., 50;
    for other ipc we keep outer = ipc and inner ≈ 500/ipc, the rule behind DC's table."""
    table = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
    return table.get(ipc, (ipc, max(1, round(500 / ipc))))


def condense(cfg, alpha, optimizer, real_by_class, glow_model, evaluate_images, class_names,
             resuming):
    """Sec. 4: cfg.iterations outer iterations (Eq. 7), each with a fresh ConvNet; at the
    iterations in cfg.eval_at the DC evaluation, the bpd and a Fig. 6-style grid; a
    checkpoint every 10 iterations. Returns the last evaluation's accuracies."""
    ckpt_path = cfg.out / "checkpoint.pt"
    start, history = 0, []  # history: every metrics.jsonl row up to the checkpoint
    if resuming and ckpt_path.exists():
        start, history = load_checkpoint(ckpt_path, alpha, optimizer, cfg.iterations)
    log = nets.Metrics(cfg.out / "metrics.jsonl", history)

    labels = torch.arange(len(real_by_class), device=alpha.device).repeat_interleave(cfg.ipc)
    progress = nets.Progress(cfg.iterations - start, "condense")
    evaluated = {row["iteration"]: row["test_accs"] for row in history if "test_accs" in row}
    for it in range(start, cfg.iterations + 1):
        if it in cfg.eval_at and it not in evaluated:  # (a resumed run may have evaluated it)
            x_syn = synthetic_images(alpha).detach()
            evaluated[it] = accs = evaluate_images([(x_syn, labels)] * cfg.num_eval)
            acc, std = mean_std(accs)
            bpd = mean_bpd(glow_model, x_syn, cfg.seed)
            print(f"iteration {it}: test accuracy {100 * acc:.2f} ± {100 * std:.2f}% "
                  f"({cfg.num_eval} nets), bpd {bpd:.3f}", flush=True)
            log({"iteration": it, "test_acc_mean": acc, "test_acc_std": std, "test_accs": accs,
                 "bpd": bpd})
            save_grid(cfg.out / "synthetic.png", x_syn, class_names, cfg.ipc)
        if it == cfg.iterations:
            break
        t0 = time.time()
        metrics = outer_iteration(alpha, optimizer, real_by_class, glow_model,
                                  lambda_sim=cfg.lambda_sim, ipc=cfg.ipc,
                                  batch_real=cfg.batch_real, width=cfg.width,
                                  outer_loop=cfg.outer_loop, inner_loop=cfg.inner_loop,
                                  batch_size=cfg.batch_size, bpd_chunk=cfg.bpd_chunk,
                                  compile=getattr(cfg, "compile", False))
        log({"iteration": it + 1, **metrics, "seconds": time.time() - t0}, wait=True)  # read
        progress.update(1, **metrics)  # at the next checkpoint or progress line, not here
        if (it + 1) % 10 == 0:
            if cfg.lambda_sim > 0:  # a simplicity term left out (nearly) every time: plain DC
                recent = [row for row in log.rows if "match" in row and row["iteration"] > it - 9]
                nets.check_skipped(sum(row["bpd"] is None for row in recent), len(recent),
                                   f"iterations {it - 8}-{it + 1}",
                                   "bpd terms (non-finite bpd or gradient)")
            save_checkpoint(ckpt_path, it + 1, alpha, optimizer, log.rows)
    progress.close()
    # with the last evaluation: a longer rerun keeps its row
    save_checkpoint(ckpt_path, cfg.iterations, alpha, optimizer, log.rows)
    return evaluated[cfg.iterations]


# ------------------------------------------- evaluation (Sec. 4, DC's protocol) and figures
# DC's get_daparam: of DC's datasets only MNIST is augmented when evaluating a ConvNet
# (crop_scale_rotate), and an augmented evaluation trains 1000 epochs instead of 300
# (DC's main.py; the authors' runs alike)
DC_AUGMENTED = ("mnist",)


def eval_protocol(dataset):
    """(augment, epochs) of DC's evaluation of a condensed `dataset` (a built-in name)."""
    augment = dataset in DC_AUGMENTED
    return augment, 1000 if augment else 300


def evaluate_synset(sets, x_test, y_test, *, num_classes, epochs, width, batch_size, seed,
                    augment=False, compile=False):
    """DC's `evaluate_synset` (Sec. 4): one fresh ConvNet per training set of `sets`,
    [(x, y)] (the condensed set once per network, or a new random real draw each), trained
    with SGD lr 0.01, momentum 0.9, wd 5e-4 for epochs + 1 epochs (DC's range(Epoch + 1));
    after epoch epochs//2 + 1 the lr is ÷10 by a new optimizer, so the momentum restarts
    (DC); with `augment`, every batch through DC's crop_scale_rotate (dc_augment). Returns
    their accuracies on the real test set. Every evaluation (synthetic or random real, at
    any iteration) uses the same `seed`, hence the same initialisations and batch orders.
    `compile` (--compile): the networks train and test torch.compile'd (nets.compiled)."""
    device = x_test.device
    accs = []
    with nets.isolated_rng(device, seed):
        for x_train, y_train in sets:
            net = make_convnet(num_classes, width, device)
            fast = nets.compiled(net, compile)  # the same parameters
            opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            for epoch in range(epochs + 1):
                train_network(fast, opt, x_train, y_train, 1, batch_size, augment)
                if epoch == epochs // 2 + 1:
                    opt = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9,
                                          weight_decay=5e-4)
            accs.append(test_accuracy(fast, x_test, y_test))
    return accs


def sample_dc_augment(n, size, crop=4, scale=0.2, rotate=45):
    """The draws of DC's crop_scale_rotate (DC's `augment`) for n images of size×size,
    on the CPU: one operation per image, uniformly (0 crop, 1 scale, 2 rotate); crop
    offsets in [0, 2·crop) (DC's np.random.permutation(2·crop)[0]); scaled heights and
    widths int(U(1 − scale, 1 + scale)·size); angles in whole degrees in [−rotate, rotate)
    (np.random.randint)."""
    return dict(op=torch.randint(3, (n,)), shift=torch.randint(2 * crop, (n, 2)),
                size=((1 - scale + 2 * scale * torch.rand(n, 2)) * size).long(),
                angle=torch.randint(-rotate, rotate, (n,)).float())


def dc_augment(x, draws, crop=4):
    """DC's crop_scale_rotate on a batch x (B, C, H, W) of network inputs (x − 0.5 here,
    as in the authors' fork, so DC's zero padding is grey), with sample_dc_augment's draws:

        crop:   pad by `crop` with the batch's channel means, cut the window at the offsets
        scale:  nearest-neighbour resize to the drawn (h, w), centred on a zero canvas of
                max(h, w, H) pixels whose centre H×W is kept
        rotate: about the image centre by the drawn angle, filled with the mean of the
                batch's channel means; bilinear (DC: scipy's cubic spline)

    Every output pixel reads one source position of its own image (exact integer positions
    for crop and scale); a position outside the image reads the fill."""
    b, c, h, w = x.shape
    dev = x.device
    op, angle = draws["op"].to(dev).view(b, 1, 1), draws["angle"].to(dev).view(b, 1, 1)
    shift, size = draws["shift"].to(dev), draws["size"].to(dev)  # (B, 2) each
    rows = torch.arange(h, device=dev, dtype=torch.float32).view(1, h, 1).expand(b, h, w)
    cols = torch.arange(w, device=dev, dtype=torch.float32).view(1, 1, w).expand(b, h, w)
    # crop: out(i, j) = x(i + r − crop, j + c − crop)
    crop_r = rows + (shift[:, 0] - crop).view(b, 1, 1)
    crop_c = cols + (shift[:, 1] - crop).view(b, 1, 1)
    # scale: out row i is canvas row i + (m − H)//2, i.e. row u = i + (m − H)//2 − (m − h)//2
    # of the resized image, which reads source row ⌊u·H/h⌋ (nearest, as F.interpolate)
    sh, sw = size[:, 0].view(b, 1, 1), size[:, 1].view(b, 1, 1)
    m = torch.maximum(torch.maximum(sh, sw), torch.tensor(max(h, w), device=dev))
    u = rows + ((m - h) // 2 - (m - sh) // 2)
    v = cols + ((m - w) // 2 - (m - sw) // 2)
    inside = (u >= 0) & (u < sh) & (v >= 0) & (v < sw)
    scale_r = torch.where(inside, (u * (h / sh.float())).floor(), -2.0)
    scale_c = torch.where(inside, (v * (w / sw.float())).floor(), -2.0)
    # rotate: the source of out (i, j) is the centre plus (i, j) − centre turned by −θ
    theta = angle.deg2rad()
    dy, dx = rows - (h - 1) / 2, cols - (w - 1) / 2
    rot_r = theta.cos() * dy - theta.sin() * dx + (h - 1) / 2
    rot_c = theta.sin() * dy + theta.cos() * dx + (w - 1) / 2
    src_r = torch.where(op == 0, crop_r, torch.where(op == 1, scale_r, rot_r))
    src_c = torch.where(op == 0, crop_c, torch.where(op == 1, scale_c, rot_c))
    means = x.mean((0, 2, 3))  # (C,) of the batch
    fill = torch.stack([means, torch.zeros_like(means), means.mean().expand(c)])  # per op
    fill = fill[op.view(b)].view(b, c, 1, 1)
    grid = torch.stack([2 * src_c / (w - 1) - 1, 2 * src_r / (h - 1) - 1], -1)  # (B, H, W, 2)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=True) + fill


def train_network(net, optimizer, x, y, epochs, batch_size, augment=False):
    """Minibatch training on (x, y) for `epochs` epochs; with `augment`, each batch through
    dc_augment on the network's normalised input (x − mean)/std, as DC augments. A batch's
    gradient is summed over chunks of it (chunk_size), after its augmentation (which uses
    the whole batch's channel means)."""
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(batch_size):
            idx = idx.to(x.device)
            xb, yb = x[idx], y[idx]
            if augment:
                draws = sample_dc_augment(len(xb), xb.shape[-1])
                xb = dc_augment((xb - net.mean) / net.std, draws) * net.std + net.mean
            optimizer.zero_grad()
            n = chunk_size(net, xb)
            for x_part, y_part in zip(xb.split(n), yb.split(n)):  # the batch's mean loss
                (F.cross_entropy(net(x_part), y_part, reduction="sum") / len(xb)).backward()
            optimizer.step()


@torch.no_grad()
def test_accuracy(net, x_test, y_test, batch_size=1000):
    """The fraction of x_test classified as y_test, batch_size images at a time (fewer on a
    CPU: chunk_size)."""
    net.eval()
    n = min(batch_size, chunk_size(net, x_test))
    correct = sum((net(x).argmax(1) == y).sum().item()
                  for x, y in zip(x_test.split(n), y_test.split(n)))
    return correct / len(x_test)


def random_real(real_by_class, ipc, generator):
    """Sec. 4's baseline: `ipc` random real images of each class (fewer where a class has
    fewer), class-major like the condensed set, with their labels."""
    device = real_by_class[0].device
    x = torch.cat([x[torch.randperm(len(x), generator=generator)[:ipc].to(device)]
                   for x in real_by_class])  # (≤ C·ipc, 3, 32, 32)
    y = torch.cat([torch.full((min(ipc, len(x)),), c, device=device)
                   for c, x in enumerate(real_by_class)])
    return x, y


@torch.no_grad()
def mean_bpd(glow_model, x, seed, batch_size=100):
    """Mean bpd of 8-bit images x (one dequantization draw from a seeded stream)."""
    with nets.isolated_rng(x.device, seed):
        return torch.cat([glow.bits_per_dim(glow_model, glow.quantize(b))
                          for b in x.split(batch_size)]).mean().item()


def mean_std(values):
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), t.std(correction=0).item()  # population std, as DC (np.std)


def save_grid(path, images, class_names, ipc):
    """Fig. 6 layout: one row per class (ipc > 1), or the whole set on one row (ipc = 1;
    a square of rows for more than 20 classes: 10×10 for CIFAR-100)."""
    captions = [class_names[i // ipc][:10] for i in range(len(images))]
    n = len(images)
    nrow = ipc if ipc > 1 else n if n <= 20 else math.ceil(math.sqrt(n))
    datasets.save_image_grid(images.cpu(), path, nrow=nrow, captions=captions)


def two_class_difference(a, b, scale):
    """Fig. 7's colour-coded mixed image of two condensed images a (class A) and b (class B),
    (..., 3, H, W) in [0, 1] -> (..., 3, H, W) in [0, 1]:

        d = mean_rgb(a) − mean_rgb(b),  w = min(|d| / scale, 1),  grey = mean_rgb(a + b) / 2
        mix = (1 − w)·grey + w·green  where d > 0 (A brighter)
        mix = (1 − w)·grey + w·red    where d ≤ 0 (B brighter; w = 0 where d = 0)

    i.e. the pair's grey average, tinted in proportion to |d|; `scale` is the |d| drawn in
    full colour (save_two_class passes the largest |d| of the figure, so rows compare)."""
    d = (a - b).mean(-3, keepdim=True)  # (..., 1, H, W) in [−1, 1]
    grey = (a + b).mean(-3, keepdim=True) / 2  # (..., 1, H, W)
    w = (d.abs() / scale).clamp(max=1)
    green, red = a.new_tensor([0.0, 1.0, 0.0]), a.new_tensor([1.0, 0.0, 0.0])
    colour = torch.where(d > 0, green[:, None, None], red[:, None, None])  # (..., 3, H, W)
    return (1 - w) * grey + w * colour


def save_two_class(path, runs, class_names, order=(0, 1)):
    """Fig. 7: per run and image pair k, a row [image k of class A, image k of class B, their
    two_class_difference]; runs = [(caption, images (N, 3, 32, 32), labels (N,))], e.g. the
    λ = 0 run above the simplified one; order = the labels of (A, B): A is drawn green, B
    red. With ipc > 1 the k-th images of the two classes are paired as stored (DC does not
    match them, so a pair also differs in what it depicts): the paper's figure is ipc 1."""
    green, red = order
    class_names = [class_names[green], class_names[red]]
    pairs = [(cap, x[y == green], x[y == red]) for cap, x, y in runs]
    pairs = [(cap, a[:len(b)], b[:len(a)]) for cap, a, b in pairs]  # (ipc, 3, 32, 32) each
    scale = max(max((a - b).mean(1).abs().max().item() for _, a, b in pairs), 1 / 255)
    tiles, captions = [], []
    for cap, a, b in pairs:
        for xa, xb, mix in zip(a, b, two_class_difference(a, b, scale)):
            tiles += [xa, xb, mix]
            captions += [f"{class_names[0]} {cap}", f"{class_names[1]} {cap}",
                         f"g:{class_names[0]} r:{class_names[1]}"]
    datasets.save_image_grid(torch.stack(tiles), path, nrow=3, captions=captions)


# ------------------------------------- continual learning with condensed sets (S11, Fig. S8/S9)
def continual(cfg, net, tasks, replay, resuming):
    """S11: train the tasks in turn (cfg.first_cycles cosine cycles on the first task, one
    on each later one), replaying the earlier tasks' condensed sets `replay` (none with
    --no-replay) through their own frozen heads and, with --distill, distilling from one
    teacher per such task, the network as it was right after it (the authors' protocol:
    kept_tasks); after each stage the test accuracy of every task seen so far (through the
    head of scoring_heads). A checkpoint after every epoch. Returns the accuracies after
    each stage, [{task: accuracy}]."""
    stage_epochs = [cfg.cycle_epochs * (cfg.first_cycles if i == 0 else 1)
                    for i in range(len(tasks))]
    steps_per_cycle = [cfg.cycle_epochs * math.ceil(len(t.x_train) / cfg.train_batch)
                       for t in tasks]
    ckpt_path = cfg.out / "checkpoint.pt"
    start_stage, start_epoch, history, stage_accs, (optimizer, scheduler), teachers = \
        0, 0, [], [], (None, None), {}
    if resuming and ckpt_path.exists():
        start_stage, start_epoch, history, stage_accs, (optimizer, scheduler), teachers = \
            load_continual_checkpoint(ckpt_path, net, steps_per_cycle)
    log = nets.Metrics(cfg.out / "metrics.jsonl", history)
    for stage in range(start_stage, len(tasks)):
        task, kept = tasks[stage], kept_tasks(stage, len(replay), cfg.own_heads)
        if start_epoch == 0:  # a new task: new optimizer and schedule
            optimizer, scheduler = stage_optimizer(net, stage, steps_per_cycle[stage])
            if cfg.distill and stage - 1 in kept:  # the network right after that task
                teachers[stage - 1] = frozen_copy(net)
        replayed = [(*replay[j], j) for j in kept if j < len(replay)]  # (S_j, y_j, head j)
        print(f"task {stage + 1}/{len(tasks)}: {task.name}, {stage_epochs[stage]} epochs, "
              f"replaying {len(replayed)} condensed set(s)"
              f"{f', distilling from {len(teachers)} teacher(s)' if teachers else ''}",
              flush=True)
        for epoch in range(start_epoch, stage_epochs[stage]):
            t0, lr = time.time(), optimizer.param_groups[0]["lr"]
            loss = train_continual_epoch(net, optimizer, scheduler, task.x_train, task.y_train,
                                         stage, replayed, teachers, cfg.train_batch)
            row = {"stage": stage + 1, "task": task.name, "epoch": epoch + 1,
                   "train_loss": loss, "lr": lr, "seconds": time.time() - t0}
            if epoch + 1 == stage_epochs[stage]:  # end of the stage: every task seen so far
                stage_accs.append(task_accuracies(net, tasks[:stage + 1],
                                                  scoring_heads(stage, kept)))
                row["test_acc"] = stage_accs[-1]
                print(f"after task {stage + 1} ({task.name}): " + ", ".join(
                    f"{k} {100 * v:.2f}%" for k, v in stage_accs[-1].items()), flush=True)
            log(row)
            nets.save_state(ckpt_path, dict(model=net, optimizer=optimizer, scheduler=scheduler,
                                            **{f"teacher{j}": t for j, t in teachers.items()}),
                            stage=stage, epoch=epoch + 1, teachers=sorted(teachers),
                            history=log.rows, stage_accs=stage_accs)
        start_epoch = 0
    return stage_accs


def kept_tasks(stage, num_condensed, own_heads=False):
    """The earlier tasks j < stage that keep their own frozen head (and, with --distill,
    their teacher). The authors' protocol (Fig. S8/S9): only a task with a condensed set
    (the first `num_condensed` tasks); a task without one is scored through the current
    head instead. --own-heads (ours, not the paper's): every earlier task."""
    return [j for j in range(stage) if own_heads or j < num_condensed]


def scoring_heads(stage, kept):
    """The head that scores each task 0..stage after task `stage`: a kept task's own, else
    the current one, as the authors' code did (SVHN, MNIST and USPS share the ten digit
    labels; check_shared_labels refuses tasks whose labels differ)."""
    return [j if j in kept or j == stage else stage for j in range(stage + 1)]


def check_shared_labels(tasks, num_condensed, own_heads=False):
    """A task scored through a later task's head (scoring_heads) must have its classes."""
    for stage, task in enumerate(tasks):
        for j, head in enumerate(scoring_heads(stage, kept_tasks(stage, num_condensed,
                                                                 own_heads))):
            if tasks[j].class_names != task.class_names and head == stage != j:
                raise nets.RunError(
                    f"without a condensed set, task {tasks[j].name} is scored through the "
                    f"head of the current task {task.name} (the authors' protocol of Fig. S8), "
                    f"but their classes, in label order, differ "
                    f"({', '.join(tasks[j].class_names[:3])}... and "
                    f"{', '.join(task.class_names[:3])}...); replay condensed sets "
                    "(--condensed), or pass --own-heads to keep a frozen head per task (ours).")


class MultiHeadConvNet(nn.Module):
    """Task-incremental network (Zhao & Bilen 2021, the authors' continual code): the
    features of the DC ConvNet of make_convnet (depth 3, instance norm, input x − 0.5)
    shared by all tasks, and a new linear head per task (all made here; head j is trained
    during task j only, see stage_optimizer)."""

    def __init__(self, class_counts, width):
        super().__init__()
        convnet = make_convnet(1, width, "cpu")  # only its features and input shift are kept
        self.register_buffer("mean", convnet.mean)  # (1, 3, 1, 1)
        self.register_buffer("std", convnet.std)
        self.features = convnet.features
        self.heads = nn.ModuleList(nn.Linear(convnet.classifier.in_features, n)
                                   for n in class_counts)

    def embed(self, x):  # (B, 3, 32, 32) in [0,1] -> shared features (B, width·4·4)
        return self.features((x - self.mean) / self.std).flatten(1)

    def forward(self, x, task):  # -> logits of head `task` (B, classes of that task)
        return self.heads[task](self.embed(x))


def continual_loss(net, x, y, task, replay, teachers=None):
    """The loss of one step of task t = `task` (S11; Zhao & Bilen 2021; authors' code):

        L = ℓ(x, y, t) + Σ_{j∈R} ℓ(S_j, y_j, j),   ℓ(x, y, j) = CE(h_j(φ(x)), y)

    φ the shared features, h_j the head of task j, x a batch of task t's real images, and
    replay = [(S_j, y_j, j) for j ∈ R] the whole condensed sets of the kept earlier tasks
    (kept_tasks), each through its own head; the earlier heads are frozen
    (stage_optimizer), so replay keeps φ usable for them. With `teachers` {k: φ^k, h^k}
    (--distill: the network right after each kept task k, frozen) every input also
    distils each kept head from its own teacher, and each term is averaged as the
    authors did:

        ℓ(x, y, j) = [CE(h_j(φ(x)), y) + Σ_{k∈K} KD(h_k(φ(x)), h^k_k(φ^k(x)))] / (1 + |K|)

    so the KD inputs are the current real batch and every replayed condensed set."""
    loss, teachers = 0.0, teachers or {}
    for inputs, labels, head in [(x, y, task), *replay]:
        h = net.embed(inputs)  # (B, width·16)
        term = F.cross_entropy(net.heads[head](h), labels)
        if teachers:
            for k, teacher in teachers.items():
                with torch.no_grad():
                    target = teacher(inputs, k)
                term = term + distillation_loss(net.heads[k](h), target)
            term = term / (1 + len(teachers))
        loss = loss + term
    return loss


def distillation_loss(student_logits, teacher_logits, temperature=2.0):
    """Knowledge distillation (Hinton et al. 2015) as in the authors' continual code, T = 2:
    KD = mean_batch −Σ_c softmax(z_teacher/T)_c · log softmax(z_student/T)_c, no T² factor."""
    target = F.softmax(teacher_logits / temperature, dim=1)
    return -(target * F.log_softmax(student_logits / temperature, dim=1)).sum(1).mean()


def train_continual_epoch(net, optimizer, scheduler, x_train, y_train, task, replay, teachers,
                          batch_size):
    """One epoch on task `task` (minibatches, continual_loss, one lr step per batch);
    returns the mean batch loss. Augmentation: a random crop with zero padding 3 and no
    flip (digits); the authors also translated by up to 10% (RandomAffine). The condensed
    images are replayed unaugmented, as the authors did."""
    net.train()
    losses = []
    for idx in torch.randperm(len(x_train)).split(batch_size):  # CPU draws: any device
        idx = idx.to(x_train.device)
        x = x_train[idx].float() / 255  # uint8 storage -> (B, 3, 32, 32) in [0, 1]
        x = nets.crop_flip(x, nets.sample_crop_flip(len(x), CROP_PAD, False, x.device), CROP_PAD)
        loss = continual_loss(net, x, y_train[idx], task, replay, teachers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.detach())
    return torch.stack(losses).mean().item()


def stage_optimizer(net, task, steps_per_cycle):
    """The optimizer of task `task`: SGD (lr 0.1, momentum 0.9, weight decay 1e-4; S11 and
    the authors' code), new for each task as the authors', on the shared features and this
    task's head; the other heads are frozen (the authors' train_old_clfs=False: replay
    trains only the features; see the README's notes). The schedule is the cosine of S11
    (Loshchilov & Hutter 2017), stepped every iteration and restarted at 0.1 every
    `steps_per_cycle` iterations: lr(i) = 0.05·(1 + cos(π·(i mod T)/T)), as S11 describes
    (the authors' code differs: README, "Notes and deviations")."""
    for j, head in enumerate(net.heads):
        head.requires_grad_(j == task)
    params = [*net.features.parameters(), *net.heads[task].parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, steps_per_cycle)
    return optimizer, scheduler


def frozen_copy(net):
    """A teacher of --distill: a copy of the network that no optimizer changes."""
    return copy.deepcopy(net).requires_grad_(False).eval()


@torch.no_grad()
def task_accuracies(net, tasks, heads, batch_size=1000):
    """{task name: test accuracy through head heads[j]} for the given tasks j."""
    net.eval()
    return {t.name: sum((net(x.float() / 255, head).argmax(1) == y).sum().item()
                        for x, y in zip(t.x_test.split(batch_size), t.y_test.split(batch_size)))
            / len(t.x_test) for t, head in zip(tasks, heads)}


def save_accuracy_table(path, stage_accs, title):
    """Fig. S8/S9 as a PNG table: a row per task (and the mean of the tasks seen), a column
    per stage ("after task k"), each cell the test accuracy in %, shaded white (0) to green
    (100)."""
    names = list(stage_accs[-1])
    rows = [(n, [a.get(n) for a in stage_accs]) for n in names]
    rows.append(("mean of tasks seen", [sum(a.values()) / len(a) for a in stage_accs]))
    left, cell_w, cell_h = 150, 96, 26  # pixels
    img = Image.new("RGB", (left + cell_w * len(stage_accs) + 4, cell_h * (len(rows) + 2)), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=13)
    draw.text((6, cell_h // 2), title, fill="black", font=font, anchor="lm")
    for j in range(len(stage_accs)):
        draw.text((left + j * cell_w + cell_w // 2, cell_h * 3 // 2), f"after task {j + 1}",
                  fill="black", font=font, anchor="mm")
    for i, (name, accs) in enumerate(rows):
        top = cell_h * (i + 2)
        draw.text((6, top + cell_h // 2), name[:22], fill="black", font=font, anchor="lm")
        for j, acc in enumerate(accs):
            if acc is not None:  # a task not seen yet has no cell
                x0, shade = left + j * cell_w, round(255 - 155 * acc)
                draw.rectangle((x0, top, x0 + cell_w - 3, top + cell_h - 3),
                               fill=(shade, 255, shade))
                draw.text((x0 + cell_w // 2, top + cell_h // 2), f"{100 * acc:.1f}",
                          fill="black", font=font, anchor="mm")
    img.save(path, format="PNG")


# --- running it: presets, flags, checkpoints (not needed to follow the paper) -------------
CPU_CHUNK_BYTES = 4 << 20  # a pass's first-layer activation on a CPU, at most (chunk_size)


def chunk_size(net, x):
    """How many images of x one pass of the ConvNet `net` takes. On a GPU: all of them. On
    a CPU: as many as keep one first-layer activation (width·H·W float32 an image) within
    CPU_CHUNK_BYTES, 8 images at DC's width 128. glibc's malloc gives large freed blocks
    back to the system and page-faults them in again at the next allocation; at DC's batch
    of 256 (134 MB an activation) that costs nearly as much as the arithmetic. Chunks of
    4 MiB measured fastest, whatever else the process had allocated (README, Speed).
    Gradients summed over chunks are the batch's: instance norm keeps images independent."""
    if x.device.type != "cpu":
        return max(1, len(x))
    per_image = 4 * net.config["width"] * x.shape[-2] * x.shape[-1]
    return max(1, CPU_CHUNK_BYTES // per_image)


# Presets: the paper's setting (DC and the authors' code), and a CPU-sized one for --quick:
# one image per class, where DC's loops are (1, 1) and DC's table shows the largest gain
# over random real images (ipc 10 with DC's (10, 50) loops costs ~15x more per iteration;
# --quick --ipc 10 keeps the (1, 1) loops). outer/inner None: DC's get_loops(ipc).
# eval_epochs None: DC's for the dataset (eval_protocol). Any flag given explicitly wins.
FULL = dict(ipc=10, train_size=None, test_size=None, iterations=1000, batch_real=256,
            width=128, num_eval=5, eval_epochs=None, eval_at="0,500,1000", outer_loop=None,
            inner_loop=None)

QUICK = dict(ipc=1, train_size=2000, test_size=1000, iterations=400, batch_real=64, width=32,
             num_eval=3, eval_epochs=100, eval_at="", outer_loop=1, inner_loop=1)

# --resume may condense longer, evaluate elsewhere, and chunk the bpd term differently
RESUMABLE = ("iterations", "eval_at", "bpd_chunk", "green_red")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=nets.HelpFormatter)
    nets.add_run_flags(p, datasets.DATASET_NAMES, QUICK, may_change=RESUMABLE,
                       out="runs/condense-<dataset>-ipc<ipc>-lam<λ>-seed<seed>[-quick]")
    # condensation (Sec. 4; the authors' repository, a fork of DC)
    p.add_argument("--ipc", type=nets.positive_int, default=None,
                   help="synthetic images per class (paper: 1 and 10; default 10, quick 1)")
    p.add_argument("--iterations", type=int, default=None,
                   help="outer iterations, each with a fresh random ConvNet (default 1000; "
                        "quick 400)")
    p.add_argument("--outer-loop", type=nets.positive_int, default=None,
                   help="image updates per fresh ConvNet (default DC's get_loops: ipc 1 -> 1, "
                        "10 -> 10, 50 -> 50; quick 1)")
    p.add_argument("--inner-loop", type=nets.positive_int, default=None,
                   help="ConvNet epochs on the synthetic set between image updates (default "
                        "DC's: ipc 1 -> 1, 10 -> 50, 50 -> 10; quick 1)")
    p.add_argument("--lambda-sim", type=nets.float_grid, default=50.0,
                   help="simplification weight λ in L = Σ_c D_c + λ·mean bpd(X_syn), Eq. 7 "
                        "(ours = authors' λ·max(N//50,1)/(5C)), or a grid such as 0,20,200 "
                        "(Fig. 6)")
    p.add_argument("--batch-real", type=nets.positive_int, default=None,
                   help="real images of one class per matching step, Eq. 6 (default 256; "
                        "quick 64)")
    p.add_argument("--batch-size", type=nets.positive_int, default=256,
                   help="batch size when training ConvNets on the synthetic set (DC's 256)")
    p.add_argument("--width", type=nets.positive_int, default=None,
                   help="ConvNet channels (default 128 as the DC ConvNet; quick 32)")
    p.add_argument("--bpd-chunk", type=nets.positive_int, default=50,
                   help="synthetic images per Glow forward/backward of the bpd term: bounds its "
                        "memory (~44 MiB per image at the released Glow size) and gives the "
                        "same gradient for any value (authors: 50)")
    # evaluation (DC protocol, Sec. 4)
    p.add_argument("--num-eval", type=nets.positive_int, default=None,
                   help="fresh ConvNets trained on the synthetic set per evaluation (default "
                        "5; quick 3)")
    p.add_argument("--eval-epochs", type=nets.positive_int, default=None,
                   help="epochs of each evaluation ConvNet, lr ÷10 after half (default DC's: "
                        "1000 on mnist, which DC evaluates with its crop_scale_rotate "
                        "augmentation, 300 on the others; quick 100)")
    p.add_argument("--eval-at", default=None,
                   help="comma-separated iterations to evaluate at; the last one always is "
                        "(default 0,500,1000; quick only the last)")
    p.add_argument("--compare", default=None, metavar="RUN",
                   help="two-class datasets (e.g. chest radiographs, Fig. 7: an ImageFolder of "
                        "grayscale or larger images loads, resized to 32×32 and repeated to 3 "
                        "channels): an earlier run on the same dataset, typically --lambda-sim "
                        "0, whose condensed images two_class.png shows above this run's")
    p.add_argument("--green-red", default=None, metavar="A,B",
                   help="two-class datasets (Fig. 7): the class drawn green, then the one drawn "
                        "red in two_class.png, e.g. female,male (default: folder order)")
    # continual learning with condensed sets (S11, Fig. S8/S9)
    p.add_argument("--continual", action="store_true",
                   help="task-incremental continual learning (S11): --dataset T1,T2,... "
                        "(names or ImageFolder paths) trained in turn with shared features and "
                        "one head per task, replaying the condensed sets of the earlier tasks")
    p.add_argument("--condensed", default=None, metavar="RUN_1,...",
                   help="with --continual: output folders of earlier condense.py runs on T1 ... "
                        "Tn−1, in task order (their synthetic.pt is replayed)")
    p.add_argument("--distill", action="store_true",
                   help="with --continual: add knowledge distillation (temperature 2) from the "
                        "frozen network of the previous stage, on every previous head")
    p.add_argument("--no-replay", action="store_true",
                   help="with --continual: plain sequential training without condensed sets "
                        "(the Fig. S8 ablation: as the authors, every task is then scored "
                        "through the newest head, so the tasks must share their classes)")
    p.add_argument("--own-heads", action="store_true",
                   help="with --continual --no-replay: keep a frozen head per task and score "
                        "each task through its own (ours, not the paper's protocol; allows "
                        "tasks of other classes and --distill without condensed sets)")
    p.add_argument("--cycle-epochs", type=nets.positive_int, default=None,
                   help="with --continual: epochs per cosine cycle (default 50; quick 5); the "
                        "first task trains 3 cycles (quick 2), each later task one")
    nets.add_grid_flags(p, ["lambda_sim"])
    args = p.parse_args(argv)
    nets.settle_grid(p, args, "lambda_sim", ["lambda_sim"])
    if args.iterations is not None and args.iterations < 0:
        p.error("--iterations must not be negative.")
    if args.eval_at is not None and not all(v.strip().isdigit() for v in args.eval_at.split(",")
                                            if v.strip()):
        p.error(f"--eval-at must be comma-separated iterations, got {args.eval_at!r}.")
    given = nets.given_flags(p, args, argv)
    if not args.continual:
        nets.refuse_unused(p, given, dict.fromkeys(("condensed", "distill", "no_replay",
                                                    "own_heads", "cycle_epochs"),
                                                   "with --continual"))
        return args
    return check_continual_flags(p, args, given)


def resolve_config(args):
    """Quick-sensitive defaults, resolved once into a new namespace; args is never changed."""
    if args.continual:
        preset = CONTINUAL_QUICK if args.quick else CONTINUAL
    else:
        preset = QUICK if args.quick else FULL
    cfg = {k: v if getattr(args, k, None) is None else getattr(args, k) for k, v in preset.items()}
    if args.continual:
        names = "-".join(Path(t).name for t in datasets.dataset_names(args.dataset))
        cfg["out"] = Path(args.out or f"runs/condense-continual-{names}-"
                                      f"{'noreplay' if args.no_replay else 'replay'}"
                                      f"{'-ownheads' if args.own_heads else ''}"
                                      f"{'-distill' if args.distill else ''}-seed{args.seed}"
                                      + ("-quick" if args.quick else ""))
        return argparse.Namespace(**{**vars(args), **cfg})
    outer_loop, inner_loop = get_loops(cfg["ipc"])
    cfg["eval_epochs"] = cfg["eval_epochs"] or eval_protocol(args.dataset)[1]  # DC's
    cfg["outer_loop"] = cfg["outer_loop"] or outer_loop
    cfg["inner_loop"] = cfg["inner_loop"] or inner_loop
    at = {int(v) for v in cfg["eval_at"].split(",") if v.strip()}
    cfg["eval_at"] = {i for i in at if i <= cfg["iterations"]} | {cfg["iterations"]}
    name = Path(args.dataset).name
    cfg["out"] = Path(args.out or f"runs/condense-{name}-ipc{cfg['ipc']}-lam"
                                  f"{nets.grid_text(args.lambda_sim)}-seed{args.seed}"
                                  + ("-quick" if args.quick else ""))
    return argparse.Namespace(**{**vars(args), **cfg})


def by_class(x_train, y_train, info, ipc, device, train_size=None):
    """The real training images of each class, on the device; a class without any, or with
    fewer than --ipc (the random-real baseline draws --ipc per class), is one sentence
    (advising a larger --train-size where one was given)."""
    more = "raise --train-size" if train_size else "add training images of it"
    real_by_class = [x_train[y_train == c].to(device) for c in range(info.num_classes)]
    sizes = [len(x) for x in real_by_class]
    if min(sizes) == 0:
        raise nets.RunError(f"class {info.class_names[sizes.index(0)]} has no training "
                            f"images; {more}.")
    if ipc > min(sizes):  # checked before the quick Glow's pretraining
        name = info.class_names[sizes.index(min(sizes))]
        raise nets.RunError(f"--ipc {ipc} is more than the {min(sizes)} training images of "
                            f"class {name}: a condensed set is smaller than its data, and the "
                            f"random-real baseline draws --ipc real images per class; lower "
                            f"--ipc or {more}.")
    return real_by_class


def load_run_images(run, dataset, class_names, flag):
    """(images (N, 3, 32, 32), labels (N,), args of the run) of the synthetic.pt of an earlier
    condense.py run in folder `run`, checked to be a condensation of `dataset` with these
    classes; `flag` names the flag that gave it in the one-sentence error."""
    run = Path(run)
    if not (run / "synthetic.pt").is_file() or not (run / "args.json").is_file():
        raise nets.CheckpointError(f"{flag} {run}: no synthetic.pt and args.json there; give "
                                   f"the folder of a finished condense.py run on {dataset}.")
    syn = nets.read_checkpoint(run / "synthetic.pt", "a condensed set of condense.py",
                               f"give {flag} a finished condense.py run on {dataset}",
                               keys=("images", "labels", "class_names"))
    images, labels, names = syn["images"], syn["labels"], list(syn["class_names"])
    try:
        stored = json.loads((run / "args.json").read_text())
    except (OSError, ValueError):  # truncated, or not written by condense.py
        raise nets.CheckpointError(f"{flag} {run}: cannot read its args.json; condense "
                                   f"{dataset} again.") from None
    if Path(str(stored.get("dataset"))).name != Path(dataset).name:
        raise nets.CheckpointError(f"{flag} {run} condensed {stored.get('dataset')!r}, not "
                                   f"{dataset!r}; give a run on {dataset} (in task order).")
    if names != list(class_names):
        raise nets.CheckpointError(f"{flag} {run} has {len(names)} classes ("
                                   f"{', '.join(names[:3])}...) but {dataset} has "
                                   f"{len(class_names)} ({', '.join(class_names[:3])}...); "
                                   "give a run on this dataset.")
    if images.shape[1:] != (3, 32, 32) or len(images) != len(labels):
        raise nets.CheckpointError(f"{flag} {run} holds images of shape "
                                   f"{tuple(images.shape[1:])}, not (3, 32, 32); condense "
                                   f"{dataset} again with this code.")
    return images.float(), labels.long(), stored


def save_checkpoint(path, iteration, alpha, optimizer, history):
    """Everything --resume needs in one atomic file: α, its Adam state, the log (and the
    random state: nets.save_state)."""
    nets.save_state(path, dict(alpha=alpha.detach(), optimizer=optimizer),
                    iteration=iteration, history=history)


def load_checkpoint(path, alpha, optimizer, iterations):
    """Restore what save_checkpoint wrote; returns (iteration, metrics history)."""
    ckpt = nets.load_state(path, "a checkpoint of condense.py",
                           dict(alpha=alpha, optimizer=optimizer), keys=("iteration", "history"),
                           map_location=alpha.device)
    if ckpt["iteration"] > iterations:
        raise nets.RunError(f"{path} is at iteration {ckpt['iteration']}, beyond --iterations "
                            f"{iterations}; raise --iterations to continue it.")
    print(f"resuming at iteration {ckpt['iteration']} from {path}", flush=True)
    return ckpt["iteration"], ckpt["history"]


def two_class_order(green_red, class_names):
    """The labels (green, red) of Fig. 7 from --green-red "A,B" (default: folder order)."""
    if not green_red:
        return 0, 1
    names = green_red.split(",")
    if len(names) != 2 or sorted(names) != sorted(class_names):
        raise nets.RunError(f"--green-red needs the two classes, the green one first: "
                            f"{','.join(class_names)} or {','.join(class_names[::-1])}; got "
                            f"{green_red!r}.")
    return class_names.index(names[0]), class_names.index(names[1])


def save_condensed(cfg, class_names, x_syn, x_random, compare, colours=(0, 1)):
    """synthetic.pt (what the evaluation nets trained on, for --compare and --condensed),
    the grids synthetic.png and random_real.png, and for two classes Fig. 7's
    two_class.png with the --compare run above this one (colours: labels drawn green, red)."""
    labels = torch.arange(len(class_names)).repeat_interleave(cfg.ipc)
    nets.atomic_save({"images": x_syn.cpu(), "labels": labels, "class_names": class_names},
                     cfg.out / "synthetic.pt")
    save_grid(cfg.out / "synthetic.png", x_syn, class_names, cfg.ipc)
    save_grid(cfg.out / "random_real.png", x_random, class_names, cfg.ipc)
    if len(class_names) == 2:  # captions say "lam": the default PIL font has no λ
        rows = [(f"lam{compare[2].get('lambda_sim', math.nan):g}", *compare[:2])] if compare else []
        save_two_class(cfg.out / "two_class.png",
                       rows + [(f"lam{cfg.lambda_sim:g}", x_syn.cpu(), labels)], class_names,
                       colours)


@nets.releases_held  # the run's folder, once it ends
def main(args):
    if args.continual:
        return continual_main(args)
    cfg = resolve_config(args)
    print(nets.settings_line(vars(cfg)), flush=True)
    resuming = nets.check_out(cfg.out, vars(args), cfg.resume, RESUMABLE,
                              length=dict(iterations=cfg.iterations))
    nets.seed_everything(cfg.seed)
    device = nets.resolve_device(cfg.device)
    nets.quick_threads(cfg.quick, device)

    # data: the real training set grouped by class, on the device
    train_set, test_set = datasets.load_splits(cfg.dataset, cfg.data_root, cfg.train_size,
                                               cfg.test_size, cfg.seed)
    info = train_set.info
    x_train, y_train = datasets.to_tensors(train_set)
    x_test, y_test = (t.to(device) for t in datasets.to_tensors(test_set))
    real_by_class = by_class(x_train, y_train, info, cfg.ipc, device, cfg.train_size)
    for flag, given in (("--compare", cfg.compare), ("--green-red", cfg.green_red)):
        if given and info.num_classes != 2:
            raise nets.RunError(f"{flag} is for Fig. 7 of two classes, but {info.name} has "
                                f"{info.num_classes}; drop {flag}.")
    colours = two_class_order(cfg.green_red, info.class_names)
    compare = cfg.compare and load_run_images(cfg.compare, cfg.dataset, info.class_names,
                                              "--compare")

    # models: the frozen Glow that scores bpd, and the synthetic images X = sigmoid(α)
    glow_model, made_from = glow.glow_for_run(cfg, train_set, test_set, device)
    nets.start_run(cfg.out, vars(args), made_from, resuming)  # the run starts: it holds its folder
    alpha = (0.2 * torch.randn(info.num_classes * cfg.ipc, 3, 32, 32)).to(device)  # grey ≈ 0.5
    alpha.requires_grad_()

    # optimizer of the images (authors: Adam lr 0.1, betas (0.5, 0.99), eps 1e-6)
    optimizer = torch.optim.Adam([alpha], lr=0.1, betas=(0.5, 0.99), eps=1e-6)

    # condense, evaluating with fresh networks at cfg.eval_at
    augment = eval_protocol(cfg.dataset)[0]

    def evaluate_images(sets):
        return evaluate_synset(sets, x_test, y_test, num_classes=info.num_classes,
                               epochs=cfg.eval_epochs, width=cfg.width,
                               batch_size=cfg.batch_size, seed=cfg.seed, augment=augment,
                               compile=cfg.compile)

    print(f"condensing {cfg.dataset} to {cfg.ipc} image(s) per class: {cfg.iterations} "
          f"iterations, loops (outer, inner) = ({cfg.outer_loop}, {cfg.inner_loop}), "
          f"λ = {cfg.lambda_sim:g}, {len(x_train)} real images, device {device}; evaluation: "
          f"{cfg.num_eval} ConvNets, {cfg.eval_epochs} epochs"
          f"{', DC augmentation crop_scale_rotate' if augment else ''}", flush=True)
    accs = condense(cfg, alpha, optimizer, real_by_class, glow_model, evaluate_images,
                    info.class_names, resuming)

    # final evaluation: the same number of random real images per class, same protocol,
    # a new draw for each evaluation network
    gen = torch.Generator().manual_seed(cfg.seed)
    draws = [random_real(real_by_class, cfg.ipc, gen) for _ in range(cfg.num_eval)]
    random_accs = evaluate_images(draws)
    x_random = torch.cat([x for x, _ in draws])
    real_sample = x_train[torch.randperm(len(x_train), generator=gen)[:500]].to(device)

    # save
    x_syn = synthetic_images(alpha).detach()
    acc, std = mean_std(accs)
    random_acc, random_std = mean_std(random_accs)
    results = {
        "ipc": cfg.ipc, "lambda_sim": cfg.lambda_sim, "iterations": cfg.iterations,
        "eval_epochs": cfg.eval_epochs, "eval_augment": "crop_scale_rotate" if augment else "none",
        "test_acc_mean": acc, "test_acc_std": std, "test_accs": accs,
        "random_real_acc_mean": random_acc, "random_real_acc_std": random_std,
        "random_real_accs": random_accs,
        "bpd_synthetic": mean_bpd(glow_model, x_syn, cfg.seed),
        "bpd_random_real": mean_bpd(glow_model, x_random, cfg.seed),
        "bpd_real": mean_bpd(glow_model, real_sample, cfg.seed),
    }
    save_condensed(cfg, info.class_names, x_syn, draws[0][0], compare, colours)
    nets.check_finite(results, f"the run in {cfg.out}")  # before: a failed run has no results
    nets.write_json(cfg.out / "results.json", results)
    print(f"condensed ({cfg.ipc}/class): {100 * acc:.2f} ± {100 * std:.2f}%, bpd "
          f"{results['bpd_synthetic']:.3f} | random real: {100 * random_acc:.2f} ± "
          f"{100 * random_std:.2f}%, bpd {results['bpd_random_real']:.3f} | "
          f"real training images: bpd {results['bpd_real']:.3f} -> {cfg.out}")
    return results


# tradeoff.csv / tradeoff.png of a λ grid (Fig. 6): the DC accuracy of the condensed set
# and of as many random real images per class, each against its own bpd
SUMMARY = dict(x_key="bpd_synthetic", ref_key="bpd_real",
               series=[("condensed", "test_acc_mean"),
                       ("random real images", "bpd_random_real", "random_real_acc_mean")],
               title="Fig. 6: test accuracy against bits per dimension of the training images")


# --------------------------------------------- running it: --continual (S11, after the flags)
# --continual (S11): the paper's schedule, 3 cosine cycles of 50 epochs on the first task and
# one on each later one, DC ConvNet width 128, batches of 512 (authors); quick: 2 cycles of
# 5 epochs, then 5 per task, on batches of 128 (with 512 a 2000-image task gets 4 steps an
# epoch, too few to learn it; see the README).
CONTINUAL = dict(train_size=None, test_size=None, width=128, cycle_epochs=50, first_cycles=3,
                 train_batch=512)

CONTINUAL_QUICK = dict(train_size=2000, test_size=1000, width=32, cycle_epochs=5,
                       first_cycles=2, train_batch=128)


# The flags --continual reads; the others (--ipc, --glow, --lambda-sim, ...) make
# condensed sets, which --condensed gives it ready-made.
CONTINUAL_FLAGS = {"dataset", "data_root", "out", "device", "seed", "quick", "resume",
                   "train_size", "test_size", "width", "continual", "condensed", "distill",
                   "no_replay", "own_heads", "cycle_epochs"}


def check_continual_flags(p, args, given):
    """The flags of --continual that parse but do not fit together or do nothing in it
    (`given`: the flags on the command line): p.error names them."""
    if args.summarize:  # Fig. S9 of finished runs: nothing else to say
        nets.refuse_unused(p, given, dict.fromkeys(sorted(given - {"continual", "summarize",
                                                                   "out"}),
                                                   "without --summarize"))
        return args
    nets.refuse_unused(p, given, {
        **dict.fromkeys(sorted(given - CONTINUAL_FLAGS - {"summarize"}), "without --continual"),
        "own_heads": not args.no_replay and "with --no-replay",  # else every head is kept
        # the authors' runs without condensed sets keep no teacher
        "distill": args.no_replay and not args.own_heads and "with --condensed or --own-heads"})
    try:
        tasks = datasets.dataset_names(args.dataset)
    except datasets.DatasetError as e:
        p.error(str(e))
    names = [Path(t).name for t in tasks]
    if len(tasks) < 2 or not all(names) or len(set(names)) < len(names):
        p.error(f"--continual needs --dataset T1,T2,... with two or more different tasks, got "
                f"{args.dataset!r}.")
    runs = args.condensed.split(",") if args.condensed else []
    if args.no_replay and runs:
        p.error("--no-replay trains without condensed sets; drop --condensed.")
    if not args.no_replay and (len(runs) != len(tasks) - 1 or not all(runs)):
        p.error(f"--condensed needs {len(tasks) - 1} run folder(s), one per task but the last "
                f"({', '.join(tasks[:-1])}); got {len(runs)} (or pass --no-replay).")
    return args


# tradeoff.csv / tradeoff.png of continual runs with replay (Fig. S9): the final mean test
# accuracy against the mean bpd of the replayed condensed sets, with and without distillation
CONTINUAL_SUMMARY = dict(
    x_key="replayed_bpd", knob="replayed_bpd",
    series=[("replay", "final_mean_acc", dict(distill=False)),
            ("replay + distillation", "final_mean_acc", dict(distill=True))],
    title="Fig. S9: final mean test accuracy against bits per dimension of the replayed sets")


def load_tasks(cfg, device):
    """The tasks of --continual (each one's splits as uint8 on the device), the condensed
    sets to replay, where each came from (its run, and its bpd as that run measured it,
    under the Glow named by the run's fingerprint), and their fingerprints for --resume
    (made_from)."""
    tasks, replay, replayed, made_from = [], [], [], {}
    runs = cfg.condensed.split(",") if cfg.condensed else []
    for i, name in enumerate(datasets.dataset_names(cfg.dataset)):
        train_set, test_set = datasets.load_splits(name, cfg.data_root, cfg.train_size,
                                                   cfg.test_size, cfg.seed)
        made_from.update({f"task{i + 1}_train_data": datasets.fingerprint(train_set),
                          f"task{i + 1}_test_data": datasets.fingerprint(test_set)})
        (x_train, y_train), (x_test, y_test) = map(datasets.to_tensors, (train_set, test_set))
        tasks.append(argparse.Namespace(
            name=Path(name).name, num_classes=train_set.info.num_classes,
            class_names=list(train_set.info.class_names),
            x_train=datasets.to_uint8(x_train).to(device), y_train=y_train.to(device),
            x_test=datasets.to_uint8(x_test).to(device), y_test=y_test.to(device)))
        if i < len(runs):
            x_syn, y_syn, _ = load_run_images(runs[i], name, train_set.info.class_names,
                                              "--condensed")
            replay.append((x_syn.to(device), y_syn.to(device)))
            made_from[f"task{i + 1}_condensed"] = nets.file_hash(Path(runs[i]) / "synthetic.pt")
            replayed.append(condensed_source(runs[i], tasks[-1].name))
    return tasks, replay, replayed, made_from


def condensed_source(run, task):
    """Where a replayed set came from: {task, run, bpd (the run's bpd_synthetic), glow (the
    fingerprint of the Glow that measured it, from the run's made_from.json)}."""
    results = nets.read_results(Path(run) / "results.json") or {}
    if not isinstance(results.get("bpd_synthetic"), (int, float)):
        raise nets.CheckpointError(f"--condensed {run}: its results.json holds no bpd_synthetic; "
                                   "give the folder of a finished condense.py run.")
    made_from = nets.read_results(Path(run) / "made_from.json") or {}
    return dict(task=task, run=str(run), bpd=results["bpd_synthetic"],
                glow=made_from.get("glow"))


def load_continual_checkpoint(path, net, steps_per_cycle):
    """Restore what continual() saved into `net`; returns (stage, epoch, metrics history,
    stage accuracies, (optimizer, scheduler) of that stage, {task: teacher})."""
    ckpt = nets.load_state(path, "a checkpoint of condense.py --continual", dict(model=net),
                           map_location=next(net.parameters()).device,
                           keys=("optimizer", "scheduler", "teachers", "stage", "epoch",
                                 "history", "stage_accs"))
    optimizer, scheduler = stage_optimizer(net, ckpt["stage"], steps_per_cycle[ckpt["stage"]])
    teachers = {j: frozen_copy(net) for j in ckpt["teachers"]}
    nets.restore(ckpt, dict(optimizer=optimizer, scheduler=scheduler,
                            **{f"teacher{j}": t for j, t in teachers.items()}), path)
    print(f"resuming after epoch {ckpt['epoch']} of task {ckpt['stage'] + 1} from {path}",
          flush=True)
    return (ckpt["stage"], ckpt["epoch"], ckpt["history"], ckpt["stage_accs"],
            (optimizer, scheduler), teachers)


@nets.releases_held  # the run's folder, once it ends
def continual_main(args):
    """condense.py --continual: S11 on the tasks of --dataset (continual)."""
    cfg = resolve_config(args)
    print(nets.settings_line(vars(cfg)), flush=True)
    resuming = nets.check_out(cfg.out, vars(args), cfg.resume)
    nets.seed_everything(cfg.seed)
    device = nets.resolve_device(cfg.device)
    nets.quick_threads(cfg.quick, device)
    tasks, replay, replayed, made_from = load_tasks(cfg, device)
    check_shared_labels(tasks, len(replay), cfg.own_heads)
    net = MultiHeadConvNet([t.num_classes for t in tasks], cfg.width).to(device)
    nets.start_run(cfg.out, vars(args), made_from, resuming)  # the run starts: it holds its folder
    print(f"continual learning on {device}", flush=True)
    stage_accs = continual(cfg, net, tasks, replay, resuming)

    # save: accuracies after every stage (Fig. S8/S9) and their mean at the end; the bits of
    # the replayed sets (Fig. S9's x-axis)
    last = len(tasks) - 1
    heads = scoring_heads(last, kept_tasks(last, len(replay), cfg.own_heads))
    results = {"tasks": [t.name for t in tasks], "replay": not cfg.no_replay,
               "distill": cfg.distill, "own_heads": cfg.own_heads,
               "scored_through": {t.name: tasks[h].name for t, h in zip(tasks, heads)},
               "stage_test_acc": stage_accs,
               "final_mean_acc": sum(stage_accs[-1].values()) / len(tasks)}
    if replayed:
        results.update(replayed=replayed,
                       replayed_bpd=sum(r["bpd"] for r in replayed) / len(replayed))
    save_accuracy_table(cfg.out / "accuracy.png", stage_accs,
                        f"test accuracy (%), {'no replay' if cfg.no_replay else 'replay'}"
                        f"{' + distillation' if cfg.distill else ''}"
                        f"{', own heads' if cfg.own_heads else ''}")
    nets.check_finite(results, f"the run in {cfg.out}")  # before: a failed run has no results
    nets.write_json(cfg.out / "results.json", results)
    print(f"final mean test accuracy {100 * results['final_mean_acc']:.2f}% -> {cfg.out}")
    return results


if __name__ == "__main__":
    nets.console()  # before --help: its text has λ
    args = get_args()
    try:
        nets.run_command(main, args, "lambda_sim", resolve_config(args).out,
                         CONTINUAL_SUMMARY if args.continual else SUMMARY, RESUMABLE)
    except (datasets.DatasetError, nets.CheckpointError, glow.GlowCheckpointError,
            nets.RunError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (nets.console)
        grid = isinstance(args.lambda_sim, tuple)
        print(nets.interrupted(resolve_config(args).out, grid), file=sys.stderr)
        sys.exit(130)
