"""SimpleBits during training: per-instance simplification (Sec. 3, Eq. 2-5, Supplement S3).

A simplifier network learns to remove from each training image everything the classifier
trained on its outputs does not need, measured in Glow bits per dimension (Eq. 1). Also:
retraining / finetuning a classifier on the simplified images (Fig. 5), the L2, blur and
JPEG baselines (S7, Fig. S4) and PNG file sizes (S5).

    python per_instance.py --dataset shapes --quick                  # CPU, a few minutes
    python per_instance.py --dataset shapes --quick --lambda-sim 0,10,50   # a Fig. 5 grid, ~10 min
    python per_instance.py --dataset cifar10 --lambda-sim 2.0 --glow glow-cifar10.pt --retrain
    python per_instance.py --dataset mnist --simplifier blur --blur-sigma 1 --glow glow-cifar10.pt

Read it in the paper's order: `simplebits_step` (one batch of Sec. 3: Eq. 2, then the
classifier's step), `simplifier_loss` (Eq. 3-5 with S3), `unrolled_train_step` and
`differentiable_adamw_step` (Eq. 3's train_step); then the S7 baselines, the training loop
`train`, and the evaluation. Everything below the "running it" banner is presets, flags,
checkpoints and `main`.
"""
import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch.func import functional_call

import datasets
import glow
import nets

TAU = 0.1  # S3: L_sim's per-example weight w = max(0, 1 − l(f'(x_orig))/τ) ramps linearly to 0
# at a loss of 0.1 (the authors' soft form of S3's "switched off where the loss > 0.1")
ORIG_WEIGHT = 10.0  # S3, Eq. S3: weight of l(f'(X_orig))
MSE_WEIGHT = 10.0  # S7 L2 baseline: (10·MSE + λ·bpd)/(10 + λ), authors' mse_weight
PAD = 4  # random-crop padding, zeros (the authors' kornia RandomCrop)
EVAL_BATCH = 256  # evaluation batch (authors' test loader)


# ---------------------------------------------------------------------- Sec. 3: Eq. 2-5, S3
def simplebits_step(simplifier, classifier, opt_simp, opt_clf, glow_model, x, y, lambda_sim,
                    flip, fast_classifier=None):
    """One batch of Sec. 3: update the simplifier on Eq. 5, then the classifier on the new
    simplified batch with the same augmentation (authors' code). Returns parts, #skipped.
    fast_classifier (--compile): the classifier torch.compile'd, for its plain step; Eq. 3's
    unrolled step is differentiated twice, which torch.compile cannot, so it runs f itself."""
    aug = nets.sample_crop_flip(len(x), PAD, flip, x.device)  # one draw for X and X_sim
    # --- update the simplifier: minimise Eq. 5
    x_sim = glow.quantize(simplifier(x))  # Eq. 2, (B, 3, 32, 32) on 8-bit levels
    loss, parts = simplifier_loss(classifier, opt_clf, glow_model, x, x_sim, y, aug, lambda_sim)
    skipped = finite_step(opt_simp, loss, list(simplifier.parameters()))
    # --- update the classifier on simplified images only (authors' train_orig=False)
    with torch.no_grad():
        x_sim = glow.quantize(simplifier(x))
    plain = classifier if fast_classifier is None else fast_classifier
    parts["clf_loss"], clf_skipped = classifier_step(plain, opt_clf,
                                                     nets.crop_flip(x_sim, aug, PAD), y)
    return parts, skipped + clf_skipped


def simplifier_loss(classifier, optimizer, glow_model, x, x_sim, y, aug, lambda_sim):
    """The simplifier's objective, Eq. 2-5 with the S3 changes, as in the authors' code:

        X_sim = simplifier(X_orig)                               (Eq. 2; 8-bit, straight-through)
        f'    = train_step(f, l(f(X̃_sim), y))                    (Eq. 3; one AdamW step)
        L_cls = 10·l(f'(X̃_orig)) + l(f(X̃_sim)) + l(f'(X̃_sim))     (Eq. 4 → S3)
        L     = (L_cls + λ_sim·L_sim) / (12 + λ_sim)               (Eq. 5, weights normalised)
        L_sim = mean_i w_i·bpd(X_sim,i),  w_i = max(0, 1 − l_i(f'(X̃_orig))/0.1)   (Eq. 1, S3)

    ~ marks the augmentation `aug`, shared by X and X_sim; bpd is taken on the un-augmented
    X_sim. w_i is the authors' soft form of S3's "turn L_sim off where the loss > 0.1", and
    is not differentiated. Each pass of f or f' draws its own dropout mask (README,
    "Notes and deviations"). With
    λ_sim = 0 Glow is not called (glow_model may be None) and L is the classification loss
    of plain training through a simplifier. Returns (L, parts).
    """
    x_sim_aug, x_aug = nets.crop_flip(x_sim, aug, PAD), nets.crop_flip(x, aug, PAD)  # (B, 3, 32, 32)
    loss_f_sim, params = unrolled_train_step(classifier, optimizer, x_sim_aug, y)  # Eq. 3
    # the updated classifier f' on the simplified and on the original batch (Eq. 4)
    loss_fp_sim = F.cross_entropy(functional_call(classifier, params, (x_sim_aug,)), y)
    loss_fp_orig_i = F.cross_entropy(functional_call(classifier, params, (x_aug,)), y,
                                     reduction="none")  # (B,) per example, for w_i
    loss_cls = ORIG_WEIGHT * loss_fp_orig_i.mean() + loss_f_sim + loss_fp_sim  # Eq. S3
    # S3: no simplification pressure on examples f' does not yet get right (loss >= τ)
    weight = (1 - loss_fp_orig_i.detach() / TAU).clamp_min(0)  # (B,) w_i ∈ [0, 1]
    if lambda_sim > 0:
        bpd = glow.bits_per_dim(glow_model, x_sim)  # (B,) Eq. 1, un-augmented (authors)
        loss_sim = (weight * bpd).mean()  # mean over the whole batch, w_i = 0 included
    else:
        bpd = loss_sim = torch.zeros((), device=x.device)
    loss = (loss_cls + lambda_sim * loss_sim) / (ORIG_WEIGHT + 2 + lambda_sim)  # Eq. 5
    parts = dict(loss=loss, loss_f_sim=loss_f_sim, loss_fp_sim=loss_fp_sim,
                 loss_fp_orig=loss_fp_orig_i.mean(), bpd=bpd.mean(), sim_weight=weight.mean())
    return loss, {k: v.detach() for k, v in parts.items()}


def unrolled_train_step(classifier, optimizer, x_sim, y):
    """Eq. 3: f' = train_step(f, l(f(X_sim), y)), differentiable w.r.t. X_sim.

    f's weights enter as detached copies (authors: copy_initial_weights=True), so the
    simplifier loss sends no gradient into the classifier. Returns l(f(X_sim)) and f''s
    parameters, for torch.func.functional_call.
    """
    params = {n: p.detach().requires_grad_() for n, p in classifier.named_parameters()}
    loss = F.cross_entropy(functional_call(classifier, params, (x_sim,)), y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True,
                                allow_unused=True)  # create_graph: differentiable in X_sim
    return loss, differentiable_adamw_step(classifier, optimizer, params, dict(zip(params, grads)))


def differentiable_adamw_step(model, optimizer, params, grads):
    """One AdamW step (Loshchilov & Hutter) as a differentiable function of params and grads.

    Same maths as torch.optim.AdamW, per parameter group (lr, betas, eps, weight decay),
    starting from the optimizer's CURRENT moments m, v and step t (constants; zeros before
    the first real step), as the authors' `higher` DifferentiableAdamW:
        p ← p·(1 − lr·wd);  m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²
        p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + eps)
    params, grads: {name: tensor} of model's parameters (grad None: unused). Returns the
    parameters after the step, {name: tensor}.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    new = dict(params)
    for group in optimizer.param_groups:
        lr, (beta1, beta2), eps, wd = (group[k] for k in ("lr", "betas", "eps", "weight_decay"))
        # t, shared by the group (Adam steps its parameters together); a tensor on the
        # device for fused optimizers, used there (no host sync), once per group
        first = group["params"][0]
        steps = [optimizer.state[p]["step"] for p in group["params"] if p in optimizer.state]
        step = torch.as_tensor(steps[0] if steps else 0, dtype=first.dtype, device=first.device) + 1
        bias1, bias2 = 1 - beta1 ** step, (1 - beta2 ** step) ** 0.5
        for p in group["params"]:
            name, g = names[id(p)], grads[names[id(p)]]
            if g is None:  # a parameter the loss does not use: unchanged, as in torch
                continue
            state = optimizer.state.get(p, {})
            m = state.get("exp_avg", torch.zeros_like(p)).detach()
            v = state.get("exp_avg_sq", torch.zeros_like(p)).detach()
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            # clamp: √ has an infinite derivative at 0 (0·∞ = NaN where g = 0 and v = 0);
            # 1e-30 changes √v by at most 1e-15, far below eps
            denom = v.clamp_min(1e-30).sqrt() / bias2 + eps
            new[name] = params[name] * (1 - lr * wd) - lr / bias1 * m / denom
    return new


def classifier_step(classifier, optimizer, x, y):
    """Plain training step of f on l(f(x), y); returns (loss, skipped)."""
    loss = F.cross_entropy(classifier(x), y)
    return loss.detach(), finite_step(optimizer, loss, list(classifier.parameters()))


def finite_step(optimizer, loss, params):
    """Backward into `params` and step, unless the loss or a gradient is non-finite
    (authors' code: such steps are skipped). Returns 1 when the step was skipped, else 0
    (a tensor on the device)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward(inputs=params)
    grads = [p.grad for p in params if p.grad is not None]
    finite = torch.stack([loss.isfinite().all()] + [g.isfinite().all() for g in grads]).all()
    if optimizer.defaults.get("fused"):
        # the contract of torch.amp.GradScaler with the fused Adam/AdamW kernels: a float32
        # 0-dim `found_inf` attribute, read on the device, makes step() leave parameters,
        # moments and step count untouched when it is 1; removed again after the step
        optimizer.found_inf = (~finite).float()
        optimizer.step()
        del optimizer.found_inf
    elif finite:  # an unfused optimizer (e.g. on MPS): the check is read on the host
        optimizer.step()
    return (~finite).long()


# --------------------------------------------------------------------------- baselines (S7)
def l2_step(simplifier, opt_simp, glow_model, x, lambda_sim):
    """One batch of the L2 baseline (S7): the simplifier alone on its loss, no classifier,
    no augmentation. Returns parts, #skipped."""
    x_sim = glow.quantize(simplifier(x))
    loss, parts = l2_simplifier_loss(glow_model, x, x_sim, lambda_sim)
    return parts, finite_step(opt_simp, loss, list(simplifier.parameters()))


def l2_simplifier_loss(glow_model, x, x_sim, lambda_sim):
    """S7 baseline without a classifier (authors' mse_weight 10, normalised like Eq. 5):
        L = (10·MSE(X_sim, X) + λ_sim·mean_i bpd(X_sim,i)) / (10 + λ_sim)"""
    mse = F.mse_loss(x_sim, x)
    bpd = glow.bits_per_dim(glow_model, x_sim) if lambda_sim > 0 else mse.new_zeros(1)
    loss = (MSE_WEIGHT * mse + lambda_sim * bpd.mean()) / (MSE_WEIGHT + lambda_sim)
    return loss, dict(loss=loss.detach(), mse=mse.detach(), bpd=bpd.mean().detach())


def gaussian_blur(x, sigma):
    """S7 baseline: 15×15 Gaussian blur with reflect borders (authors: kornia GaussianBlur2d)."""
    return TF.gaussian_blur(x, kernel_size=15, sigma=sigma)


def jpeg(x, quality):
    """S7 baseline: JPEG round trip through PIL at `quality` (PIL defaults otherwise)."""
    out = []
    for img in datasets.to_uint8(x).permute(0, 2, 3, 1).cpu().numpy():  # (H, W, 3) uint8
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(buffer).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(x.device).float() / 255


def simplification(cfg, simplifier):
    """The function x in [0,1] -> X_sim on 8-bit levels (what the classifier and Glow see):
    the simplifier network, or the blur / JPEG baseline of S7."""
    if cfg.simplifier == "blur":
        return lambda x: glow.quantize(gaussian_blur(x, cfg.blur_sigma))
    if cfg.simplifier == "jpeg":
        return lambda x: jpeg(x, int(cfg.jpeg_quality))
    return lambda x: glow.quantize(simplifier(x))


# --------------------------------------------------- training (Sec. 3), retraining (Fig. 5)
def epoch_order(n, seed, epoch):
    """A permutation of n fixed by (seed, epoch), so a resumed run sees the same batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 9973 + epoch))


def train_batches(batches, batch_size, seed, epoch):
    """The full batches of one epoch in the order epoch_order fixes, built by indexing on
    the device (datasets.Batches); composites draw their distractors from the global RNG."""
    order = epoch_order(len(batches), seed, epoch)
    for idx in order[:len(order) // batch_size * batch_size].split(batch_size):
        yield batches.get(idx)  # (B, 3, 32, 32) float32, (B,) long on the device


def train(cfg, simplifier, classifier, opt_simp, opt_clf, glow_model, simplify, train_set,
          test, flip, device, resuming):
    """Sec. 3 epoch by epoch: SimpleBits steps (unet), or the L2 baseline's steps (l2);
    after each epoch a metrics row and a checkpoint, every cfg.eval_every epochs the test
    metrics and a Fig. 3-style grid. Returns the number of skipped (non-finite) steps."""
    models = dict(classifier=classifier, simplifier=simplifier)
    optimizers = dict(opt_clf=opt_clf, opt_simp=opt_simp)
    ckpt_path, made_for = cfg.out / "checkpoint.pt", datasets.identity(train_set)
    done, history, skipped_total = 0, [], 0
    if resuming and ckpt_path.exists():
        done, history, skipped_total = load_checkpoint(ckpt_path, models, optimizers, cfg.epochs)
    log = nets.Metrics(cfg.out / "metrics.jsonl", history)
    batches = datasets.Batches(train_set, device)  # the training images, on the device
    fast_classifier = nets.compiled(classifier, getattr(cfg, "compile", False))  # --compile
    steps = len(train_set) // cfg.batch_size
    progress = nets.Progress((cfg.epochs - done) * steps, "train")  # ETA of the whole run
    t_start = time.time()
    for epoch in range(done + 1, cfg.epochs + 1):
        sums, skipped = {}, 0
        progress.desc = f"epoch {epoch}/{cfg.epochs}"
        for x, y in train_batches(batches, cfg.batch_size, cfg.seed, epoch):
            if cfg.simplifier == "unet":  # Sec. 3
                parts, n_skip = simplebits_step(simplifier, classifier, opt_simp, opt_clf,
                                                glow_model, x, y, cfg.lambda_sim, flip,
                                                fast_classifier)
            else:  # the L2 baseline (S7)
                parts, n_skip = l2_step(simplifier, opt_simp, glow_model, x, cfg.lambda_sim)
            skipped += n_skip
            sums = {k: sums.get(k, 0.0) + v / steps for k, v in parts.items()}  # on the device
            progress.update(loss=parts["loss"])
        skipped = int(skipped)  # unet: the simplifier's and the classifier's steps
        nets.check_skipped(skipped, steps * (2 if cfg.simplifier == "unet" else 1),
                           f"epoch {epoch}/{cfg.epochs}")
        skipped_total += skipped
        row = dict(phase="train", epoch=epoch, **{f"train_{k}": float(v) for k, v in sums.items()},
                   skipped_steps=skipped)
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:  # and after the last epoch
            row.update(test_epoch(cfg, classifier, simplify, glow_model, test, device, epoch))
        row["seconds"] = time.time() - t_start  # since training started
        log(row)
        print(epoch_line(row, cfg.epochs), flush=True)
        save_checkpoint(ckpt_path, epoch, models, optimizers, log.rows, skipped_total, made_for)
    progress.close()
    return skipped_total


def retrain(classifier, train_sim, train_labels, test, cfg, flip, device, phase):
    """Fig. 5: train f on the stored simplified training images (uint8), with the same
    augmentation and optimizer as joint training; returns its test accuracies."""
    optimizer = nets.classifier_optimizer(classifier, cfg.lr)
    fast = nets.compiled(classifier, getattr(cfg, "compile", False))  # --compile
    for epoch in range(1, cfg.retrain_epochs + 1):
        order = epoch_order(len(train_sim), cfg.seed, epoch)
        losses, skipped = [], 0
        for idx in order[:len(order) // cfg.batch_size * cfg.batch_size].split(cfg.batch_size):
            x, y = train_sim[idx].to(device).float() / 255, train_labels[idx].to(device)
            aug = nets.sample_crop_flip(len(x), PAD, flip, device)
            loss, n_skip = classifier_step(fast, optimizer, nets.crop_flip(x, aug, PAD), y)
            losses.append(loss)
            skipped += n_skip
        nets.check_skipped(int(skipped), len(losses), f"{phase} epoch {epoch}/{cfg.retrain_epochs}")
        orig, _ = accuracy_and_bpd(classifier, None, *test["orig"], device)
        sim, _ = accuracy_and_bpd(classifier, None, *test["sim"], device)
        row = dict(phase=phase, epoch=epoch, train_loss=torch.stack(losses).mean().item(),
                   test_acc=orig["acc"], test_acc_simplified=sim["acc"])
        nets.append_jsonl(cfg.out / "metrics.jsonl", row)
        print(f"{phase} epoch {epoch}/{cfg.retrain_epochs}  loss {row['train_loss']:.3f}  "
              f"test_acc {orig['acc']:.3f}  test_acc_simplified {sim['acc']:.3f}", flush=True)
    return orig["acc"], sim["acc"]


def retrain_phases(cfg, classifier, simplify, train_set, test, test_sim, flip, device):
    """Fig. 5: a fresh classifier trained on the simplified training images (--retrain, and
    always for the S7 baselines, whose only classifier is that one) and the jointly trained
    one finetuned on them (--finetune); --save-simplified stores both sets. Returns the
    accuracies for results.json."""
    results = {}
    if not (cfg.retrain or cfg.finetune or cfg.save_simplified or cfg.simplifier != "unet"):
        return results
    train_x, train_y = datasets.to_tensors(train_set)  # dataset order
    train_sim = simplify_all(simplify, train_x, device)  # uint8, computed once (authors)
    del train_x
    if cfg.save_simplified:
        for name, images, labels in (("test", test_sim, test["y"]), ("train", train_sim, train_y)):
            nets.atomic_save(dict(images=images, labels=labels),
                             cfg.out / f"simplified_{name}.pt")
    phases = {"orig": (test["x"], test["y"]), "sim": (test_sim, test["y"])}
    if cfg.retrain or cfg.simplifier != "unet":
        fresh = make_classifier(cfg, train_set.info, device)
        acc, acc_sim = retrain(fresh, train_sim, train_y, phases, cfg, flip, device, "retrain")
        results.update(retrain_test_acc=acc, retrain_test_acc_simplified=acc_sim)
        if cfg.simplifier != "unet":
            nets.save_model(fresh, cfg.out / "classifier.pt", **datasets.identity(train_set))
    if cfg.finetune:
        acc, acc_sim = retrain(classifier, train_sim, train_y, phases, cfg, flip, device, "finetune")
        results.update(finetune_test_acc=acc, finetune_test_acc_simplified=acc_sim)
    return results


# ---------------------------------------------------------- evaluation (Fig. 3, Fig. 5, S5)
@torch.no_grad()
def simplify_all(simplify, images, device):
    """Simplify (N, 3, 32, 32) float images in batches -> uint8 (N, 3, 32, 32) on the CPU."""
    return torch.cat([datasets.to_uint8(simplify(x.to(device))).cpu()
                      for x in images.split(EVAL_BATCH)])


@torch.no_grad()
def accuracy_and_bpd(classifier, glow_model, images, labels, device, seed=0):
    """Accuracy and loss of f (if given), and per-image bpd (Eq. 1) if glow_model is given.
    The bpd's dequantization noise comes from its own seeded stream, so that how often a
    run evaluates never changes what it trains; counts are summed on the device."""
    correct, loss, bpd = 0, 0.0, []
    with nets.isolated_rng(device, seed):
        for x, y in zip(images.split(EVAL_BATCH), labels.split(EVAL_BATCH)):
            x, y = x.to(device).float(), y.to(device)
            x = x / 255 if images.dtype == torch.uint8 else x
            if classifier is not None:
                logits = classifier.eval()(x)  # no dropout
                correct += (logits.argmax(1) == y).sum()
                loss += F.cross_entropy(logits, y, reduction="sum")
            if glow_model is not None:
                bpd.append(glow.bits_per_dim(glow_model, x))
    if classifier is not None:
        classifier.train()
    bpd = torch.cat(bpd).cpu() if bpd else None
    return dict(acc=float(correct) / len(labels), loss=float(loss) / len(labels)), bpd


def simplified_test_metrics(classifier, simplify, glow_model, test, device):
    """bpd of the simplified test images and, given a classifier, its accuracy on the
    original and on the simplified ones (Fig. 5, S6). test: {"x", "y"}. Returns the
    metrics, the simplified images (uint8) and their bpd."""
    test_sim = simplify_all(simplify, test["x"], device)  # uint8 (N, 3, 32, 32)
    sim, sim_bpd = accuracy_and_bpd(classifier, glow_model, test_sim, test["y"], device)
    metrics = dict(test_bpd_simplified=sim_bpd.mean().item())
    if classifier is not None:
        metrics.update(test_acc=accuracy_and_bpd(classifier, None, test["x"], test["y"], device)[0]["acc"],
                       test_acc_simplified=sim["acc"])
    return metrics, test_sim, sim_bpd


def test_epoch(cfg, classifier, simplify, glow_model, test, device, epoch):
    """The test metrics after an epoch (the test_* entries of its metrics row), and its
    Fig. 3-style grid simplified_epoch<epoch>.png."""
    joint = classifier if cfg.simplifier == "unet" else None  # l2: no classifier (S7)
    metrics, test_sim, sim_bpd = simplified_test_metrics(joint, simplify, glow_model, test, device)
    save_grid(cfg.out / f"simplified_epoch{epoch:03d}.png", test["x"], test_sim, test["bpd"],
              sim_bpd)
    return dict(test_bpd=test["bpd"].mean().item(), **metrics)


def epoch_line(row, epochs):
    """The line an epoch prints: its metrics row in short."""
    line = (f"epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.3f}  "
            f"skipped {row['skipped_steps']}")
    if "test_acc" in row:
        line += f"  test acc {row['test_acc']:.3f} (simplified {row['test_acc_simplified']:.3f})"
    if "test_bpd" in row:
        line += f"  test bpd {row['test_bpd']:.2f} -> {row['test_bpd_simplified']:.2f}"
    return line + f"  {row['seconds']:.0f}s"


def png_bytes(images):
    """S5: mean size in bytes of each uint8 (3, H, W) image as a lossless PNG (PIL defaults)."""
    sizes = []
    for img in images.permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="PNG")
        sizes.append(buffer.tell())
    return float(np.mean(sizes))


def save_grid(path, x_orig, x_sim, bpd_orig, bpd_sim, n=16, nrow=8):
    """Fig. 3/S5 style: n test images spread over the set (so over the classes), rows
    alternating between original (uint8 or float) and simplified, each with its bpd."""
    pick = torch.linspace(0, len(x_sim) - 1, min(n, len(x_sim))).long()
    tiles, captions = [], []
    for rows in pick.split(nrow):
        for images, bpd in ((x_orig, bpd_orig), (x_sim, bpd_sim)):
            tiles.append(images[rows].float() / (255 if images.dtype == torch.uint8 else 1))
            captions += [f"{b:.2f} bpd" for b in bpd[rows].tolist()]
    datasets.save_image_grid(torch.cat(tiles), path, nrow=nrow, captions=captions)


# --- running it: presets, flags, checkpoints (not needed to follow the paper) -------------
# Presets: the paper's setting (authors' code), and a CPU-sized one for --quick that shows
# the effect in ~1500 steps instead of ~150k: the DC ConvNet as f (4x cheaper per step than
# the NF-WRN and quicker to become confident, which is when L_sim starts acting, Eq. 5),
# smaller batches, 10x the learning rate, a larger λ (measured on shapes, see the README).
# Any flag given explicitly wins.
FULL = dict(epochs=100, batch_size=32, lambda_sim=2.0, lr=5e-4, arch="wrn", depth=16,
            widen=2, width=128, ngf=64, train_size=None, test_size=None, eval_every=5)
QUICK = dict(epochs=12, batch_size=16, lambda_sim=50.0, lr=5e-3, arch="convnet", depth=10,
             widen=1, width=32, ngf=16, train_size=2000, test_size=500, eval_every=1)
# the knob of each --simplifier: the flag that takes a grid (Fig. 5, Fig. S4)
KNOB_OF = dict(unet="lambda_sim", l2="lambda_sim", blur="blur_sigma", jpeg="jpeg_quality")
GRID_KNOBS = ("lambda_sim", "blur_sigma", "jpeg_quality")
# what --resume lets change: train longer, evaluate elsewhere, and add the phases after
# joint training (Fig. 5)
RESUMABLE = ("epochs", "eval_every", "retrain", "finetune", "retrain_epochs", "save_simplified")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=nets.HelpFormatter)
    nets.add_run_flags(p, datasets.DATASET_NAMES, QUICK, may_change=RESUMABLE,
                       out="runs/per_instance-<dataset>-<simplifier>-<lam λ | sigma σ | q quality>"
                           "-seed<seed>[-quick]")
    p.add_argument("--epochs", type=nets.positive_int, default=None,
                   help="epochs of joint training (Sec. 3; default 100, the L2 baseline 50 as "
                        "the authors; quick %d)" % QUICK["epochs"])
    p.add_argument("--eval-every", type=nets.positive_int, default=None,
                   help="evaluate on the test set every N epochs, and after the last (default "
                        "5; quick 1)")
    p.add_argument("--batch-size", type=nets.positive_int, default=None,
                   help="training batch size (default 32 as the authors; quick %d)"
                        % QUICK["batch_size"])
    p.add_argument("--lr", type=nets.finite_float, default=None,
                   help="learning rate of f and the simplifier (Sec. 3: default 5e-4; quick %g)"
                        % QUICK["lr"])
    p.add_argument("--lambda-sim", type=nets.float_grid, default=None,
                   help="weight λ_sim of L_sim in bits/dim (Eq. 5; default 2; quick %g), or a "
                        "grid such as 0,0.4,1,1.6,2 (Fig. 5)" % QUICK["lambda_sim"])
    p.add_argument("--simplifier", default="unet", choices=["unet", "l2", "blur", "jpeg"],
                   help="unet: SimpleBits (Sec. 3); l2, blur, jpeg: the baselines of S7")
    p.add_argument("--blur-sigma", type=nets.float_grid, default=1.0,
                   help="σ of the blur baseline (S7), or a grid such as 0.5,1,2 (Fig. S4)")
    p.add_argument("--jpeg-quality", type=nets.float_grid, default=20,
                   help="quality 1-100 of the JPEG baseline (S7), or a grid such as 10,30,70 "
                        "(Fig. S4)")
    p.add_argument("--arch", default=None, choices=["wrn", "convnet"],
                   help="architecture of the classifier f: wrn = the paper's NF-WideResNet "
                        "(S2.1, default); convnet = the DC ConvNet of Sec. 4 (quick, faster on "
                        "a CPU)")
    p.add_argument("--depth", type=nets.positive_int, default=None,
                   help="depth of the NF-WRN f (S2.1; default 16; quick 10)")
    p.add_argument("--widen", type=nets.positive_int, default=None,
                   help="widen factor of the NF-WRN f (S2.1; default 2; quick 1)")
    p.add_argument("--width", type=nets.positive_int, default=None,
                   help="channels of the ConvNet f (--arch convnet; default 128 as DC; quick 32)")
    p.add_argument("--ngf", type=nets.positive_int, default=None,
                   help="UNet simplifier width ngf (S2.2; default 64; quick 16)")
    p.add_argument("--retrain", action="store_true",
                   help="train a fresh classifier on the simplified training images (Fig. 5)")
    p.add_argument("--finetune", action="store_true",
                   help="finetune the joint classifier on the simplified images (Fig. 5)")
    p.add_argument("--retrain-epochs", type=nets.positive_int, default=None,
                   help="epochs of retraining / finetuning (Fig. 5; default 100 as the authors; "
                        "quick %d)" % QUICK["epochs"])
    p.add_argument("--save-simplified", action="store_true",
                   help="write simplified_{train,test}.pt (uint8 images in dataset order; S5)")
    nets.add_grid_flags(p, GRID_KNOBS)
    args = p.parse_args(argv)
    nets.settle_grid(p, args, KNOB_OF[args.simplifier], GRID_KNOBS)
    sigmas, qualities = (v if isinstance(v, tuple) else (v,)
                         for v in (args.blur_sigma, args.jpeg_quality))
    if min(sigmas) <= 0 or not all(q == int(q) and 1 <= q <= 100 for q in qualities):
        p.error("--blur-sigma must be > 0 and --jpeg-quality an integer in 1..100.")
    if args.lr is not None and args.lr <= 0:
        p.error("--lr must be positive.")
    if args.depth is not None and (args.depth < 10 or (args.depth - 4) % 6):
        p.error(f"--depth must be 6n+4 with n >= 1 (e.g. 10, 16, 28), got {args.depth}.")
    if args.finetune and args.simplifier != "unet":
        p.error("--finetune needs the jointly trained classifier of --simplifier unet.")
    trains = args.simplifier in ("unet", "l2")  # the blur and JPEG baselines train nothing
    arch = args.arch or (QUICK if args.quick else FULL)["arch"]
    nets.refuse_unused(p, nets.given_flags(p, args, argv), dict(
        blur_sigma=args.simplifier != "blur" and "with --simplifier blur",
        jpeg_quality=args.simplifier != "jpeg" and "with --simplifier jpeg",
        **dict.fromkeys(("lambda_sim", "ngf", "epochs", "eval_every"),
                        not trains and "with --simplifier unet or l2"),
        retrain_epochs=not (args.retrain or args.finetune or args.simplifier != "unet")
        and "with --retrain, --finetune or a baseline simplifier",
        depth=arch != "wrn" and "with --arch wrn", widen=arch != "wrn" and "with --arch wrn",
        width=arch != "convnet" and "with --arch convnet"))
    return args


def resolve_config(args):
    """Quick-sensitive defaults, resolved once into a new namespace; args is never changed."""
    preset = QUICK if args.quick else FULL
    cfg = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in preset.items()}
    if args.epochs is None and args.simplifier == "l2" and not args.quick:
        cfg["epochs"] = 50  # the authors' L2 baseline ran 50 epochs (S7)
    cfg["retrain_epochs"] = args.retrain_epochs or preset["epochs"]
    name = Path(args.dataset).name
    knob = {"blur": "sigma", "jpeg": "q"}.get(args.simplifier, "lam") + nets.grid_text(
        {"blur": args.blur_sigma, "jpeg": args.jpeg_quality}.get(args.simplifier, cfg["lambda_sim"]))
    cfg["out"] = Path(args.out or f"runs/per_instance-{name}-{args.simplifier}-{knob}"
                                  f"-seed{args.seed}" + ("-quick" if args.quick else ""))
    return argparse.Namespace(**{**vars(args), **cfg})


def make_classifier(cfg, info, device):
    if cfg.arch == "convnet":
        return nets.ConvNet(info.num_classes, width=cfg.width, mean=info.mean,
                            std=info.std).to(device)
    return nets.NFWideResNet(info.num_classes, depth=cfg.depth, widen=cfg.widen,
                             mean=info.mean, std=info.std).to(device)


def save_checkpoint(path, epoch, models, optimizers, history, skipped, made_for):
    """Everything --resume needs in one atomic file (nets.save_state); and each model on
    its own beside it (<name>.pt, nets.load_model), with `made_for` (datasets.identity)."""
    for name, model in models.items():
        nets.save_model(model, path.parent / f"{name}.pt", epoch=epoch, **made_for)
    nets.save_state(path, {**models, **optimizers}, epoch=epoch, history=history, skipped=skipped)


def load_checkpoint(path, models, optimizers, epochs=None):
    """Restore what save_checkpoint wrote; returns (epoch, metrics history, skipped steps).
    A run that already went beyond `epochs` is not shortened: a RunError."""
    ckpt = nets.load_state(path, "a checkpoint of per_instance.py", {**models, **optimizers},
                           keys=("epoch", "history", "skipped"))
    if epochs is not None and ckpt["epoch"] > epochs:
        raise nets.RunError(f"{path} is at epoch {ckpt['epoch']}, beyond --epochs {epochs}; "
                            "a resume never shortens a run: raise --epochs to continue it.")
    print(f"resuming after epoch {ckpt['epoch']} from {path}", flush=True)
    return ckpt["epoch"], ckpt["history"], ckpt["skipped"]


@nets.releases_held  # the run's folder, once it ends
def main(args):
    cfg = resolve_config(args)
    print(nets.settings_line(vars(cfg)), flush=True)
    resuming = nets.check_out(cfg.out, vars(args), cfg.resume, RESUMABLE,
                              length=dict(epochs=cfg.epochs))
    nets.seed_everything(cfg.seed)
    device = nets.resolve_device(cfg.device)
    nets.quick_threads(cfg.quick, device)
    t_start = time.time()

    # data: training items are read per epoch (composites re-draw their distractors);
    # the test set is fixed and held in memory
    train_set, test_set = datasets.load_splits(cfg.dataset, cfg.data_root, cfg.train_size,
                                               cfg.test_size, cfg.seed)
    info, (test_x, test_y) = train_set.info, datasets.to_tensors(test_set)
    flip = info.name in ("cifar10", "cifar100")  # authors: flips for CIFAR only
    if len(train_set) < cfg.batch_size:
        raise nets.RunError(f"--batch-size {cfg.batch_size} is larger than the {len(train_set)} "
                            "training images; lower it or "
                            + ("raise --train-size." if cfg.train_size else "add images."))

    # models: simplifier (S2.2), classifier f (S2.1), frozen Glow G (Eq. 1)
    simplifier = nets.UNetSimplifier(num_down=5, ngf=cfg.ngf).to(device)
    classifier = make_classifier(cfg, info, device)
    glow_model, made_from = glow.glow_for_run(cfg, train_set, test_set, device)
    simplify = simplification(cfg, simplifier)
    nets.start_run(cfg.out, vars(args), made_from, resuming)  # the run starts: it holds its folder

    # optimizers, the authors' code (the paper text says AdamW, wd 1e-5, for both): f takes
    # AdamW, betas (0.9, 0.995), decoupled wd 1e-5 on weights and gains only; the simplifier
    # Adam, betas (0.5, 0.99), coupled L2 5e-5 on every parameter
    opt_clf = nets.classifier_optimizer(classifier, cfg.lr)
    opt_simp = torch.optim.Adam(simplifier.parameters(), lr=cfg.lr, betas=(0.5, 0.99),
                                weight_decay=5e-5, fused=nets.fused_ok(simplifier.parameters()))

    # train: Sec. 3 (unet) or the L2 baseline (l2); the blur and JPEG baselines train nothing.
    # The original test images' bpd is computed once, before --resume restores the RNG.
    test = dict(x=test_x, y=test_y, bpd=accuracy_and_bpd(None, glow_model, test_x, test_y, device)[1])
    skipped = 0
    if cfg.simplifier in ("unet", "l2"):
        skipped = train(cfg, simplifier, classifier, opt_simp, opt_clf, glow_model, simplify,
                        train_set, test, flip, device, resuming)

    # final evaluation (Fig. 3, Fig. 5 "joint", S5 PNG sizes), then the Fig. 5 phases
    joint = classifier if cfg.simplifier == "unet" else None
    metrics, test_sim, sim_bpd = simplified_test_metrics(joint, simplify, glow_model, test, device)
    knob = KNOB_OF[cfg.simplifier]  # lambda_sim, blur_sigma or jpeg_quality
    results = dict(dataset=info.name, simplifier=cfg.simplifier, **{knob: getattr(cfg, knob)},
                   epochs=cfg.epochs if cfg.simplifier in ("unet", "l2") else 0,
                   test_bpd=test["bpd"].mean().item(), **metrics,
                   png_bytes=png_bytes(datasets.to_uint8(test_x)),
                   png_bytes_simplified=png_bytes(test_sim), skipped_steps=skipped)
    save_grid(cfg.out / "simplified.png", test_x, test_sim, test["bpd"], sim_bpd, n=32)
    results.update(retrain_phases(cfg, classifier, simplify, train_set, test, test_sim, flip, device))

    # save
    results["seconds"] = time.time() - t_start
    nets.check_finite(results, f"the run in {cfg.out}")  # before: a failed run has no results
    nets.write_json(cfg.out / "results.json", results)
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}, flush=True)
    return results


# tradeoff.csv / tradeoff.png of a grid (Fig. 5, Fig. S4): accuracy against the bpd of the
# simplified test images; the joint classifier is tested on simplified images, the
# retrained and finetuned ones (and the baselines', which are retrained) on the originals
SUMMARY = dict(x_key="test_bpd_simplified", ref_key="test_bpd",
               series=[("joint (simplified test images)", "test_acc_simplified"),
                       ("retrain", "retrain_test_acc"), ("finetune", "finetune_test_acc")],
               title="Fig. 5: test accuracy against bits per dimension of simplified images")


if __name__ == "__main__":
    nets.console()  # before --help: its text has λ
    args = get_args()
    try:
        nets.run_command(main, args, KNOB_OF[args.simplifier], resolve_config(args).out,
                         SUMMARY, RESUMABLE)
    except (datasets.DatasetError, nets.CheckpointError, glow.GlowCheckpointError,
            nets.RunError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (nets.console)
        grid = isinstance(getattr(args, KNOB_OF[args.simplifier]), tuple)
        print(nets.interrupted(resolve_config(args).out, grid), file=sys.stderr)
        sys.exit(130)
