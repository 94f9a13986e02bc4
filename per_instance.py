"""SimpleBits during training: per-instance simplification (Sec. 3, Eq. 2-5, Supplement S3).

A simplifier network learns to remove from each training image everything the classifier
trained on its outputs does not need, measured in Glow bits per dimension (Eq. 1). Also:
retraining / finetuning a classifier on the simplified images (Fig. 5), the L2, blur and
JPEG baselines (S7, Fig. S4) and PNG file sizes (S5).

    python per_instance.py --dataset shapes --quick                  # CPU, a few minutes
    python per_instance.py --dataset cifar10 --lambda-sim 2.0 --glow glow-cifar10.pt --retrain
    python per_instance.py --dataset mnist --simplifier blur --blur-sigma 1 --glow glow-cifar10.pt
"""
import argparse
import io
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch.func import functional_call
from torch.utils.data import DataLoader, Subset

import datasets
import glow
import nets

TAU = 0.1  # S3: L_sim is switched off (soft ramp, authors' code) where l(f'(x_orig)) > 0.1
ORIG_WEIGHT = 10.0  # S3, Eq. S3: weight of l(f'(X_orig))
MSE_WEIGHT = 10.0  # S7 L2 baseline: (10·MSE + λ·bpd)/(10 + λ), authors' mse_weight
PAD = 4  # random-crop padding, zeros (the authors' kornia RandomCrop)
EVAL_BATCH = 256  # evaluation batch (authors' test loader)
# Presets: the paper's setting (authors' code), and a CPU-sized one for --quick that shows
# the effect in ~1500 steps instead of ~150k: the DC ConvNet as f (4x cheaper per step than
# the NF-WRN and quicker to become confident, which is when L_sim starts acting, Eq. 5),
# smaller batches, 10x the learning rate, a larger λ (measured on shapes, see the README).
# Any flag given explicitly wins.
FULL = dict(epochs=100, batch_size=32, lambda_sim=2.0, lr=5e-4, classifier="wrn", depth=16,
            widen=2, width=128, ngf=64, train_size=None, test_size=None)
QUICK = dict(epochs=12, batch_size=16, lambda_sim=50.0, lr=5e-3, classifier="convnet", depth=10,
             widen=1, width=32, ngf=16, train_size=2000, test_size=500)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="cifar10",
                   help=f"dataset (Sec. 3.1, 3.2): {', '.join(datasets.DATASET_NAMES)}, "
                        "or an ImageFolder path")
    p.add_argument("--data-root", default="data", help="where torchvision datasets are stored")
    p.add_argument("--glow", default=None, help="Glow checkpoint G that scores bpd (Eq. 1)")
    p.add_argument("--out", default=None, help="output folder (default "
                   "runs/per_instance-<dataset>-<simplifier>-lam<λ>-seed<seed>)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda, then mps, then cpu) or a torch device: cpu, cuda, cuda:1, mps")
    p.add_argument("--seed", type=int, default=0, help="seed of python, numpy and torch")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of joint training (Sec. 3; paper 100, L2 baseline 50 as the "
                        "authors, quick %d)" % QUICK["epochs"])
    p.add_argument("--batch-size", type=int, default=None, help="batch size (authors: 32)")
    p.add_argument("--quick", action="store_true", help="CPU preset: small subsets, tiny "
                   "networks, few epochs, a tiny Glow pretrained on the fly")
    p.add_argument("--train-size", type=int, default=None, help="use N training images")
    p.add_argument("--test-size", type=int, default=None, help="use N test images")
    p.add_argument("--lambda-sim", type=nets.finite_float, default=None,
                   help="weight λ_sim of L_sim in bits/dim (Eq. 5; default 2, paper grid 0-2)")
    p.add_argument("--simplifier", default="unet", choices=["unet", "l2", "blur", "jpeg"],
                   help="unet: SimpleBits (Sec. 3); l2, blur, jpeg: the baselines of S7")
    p.add_argument("--blur-sigma", type=nets.finite_float, default=1.0, help="σ of the blur baseline (S7)")
    p.add_argument("--jpeg-quality", type=int, default=20, help="quality of the JPEG baseline (S7)")
    p.add_argument("--retrain", action="store_true",
                   help="train a fresh classifier on the simplified training images (Fig. 5)")
    p.add_argument("--finetune", action="store_true",
                   help="finetune the joint classifier on the simplified images (Fig. 5)")
    p.add_argument("--retrain-epochs", type=int, default=None,
                   help="epochs of retraining / finetuning (Fig. 5; 100 as the authors, quick %d)"
                        % QUICK["epochs"])
    p.add_argument("--save-simplified", action="store_true",
                   help="write simplified_{train,test}.pt (uint8 images in dataset order; S5)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint.pt (same flags; --epochs "
                        "may grow)")
    p.add_argument("--classifier", default=None, choices=["wrn", "convnet"],
                   help="classifier f: wrn = the paper's NF-WideResNet (S2.1, default); convnet "
                        "= the DC ConvNet of Sec. 4 (quick default, faster on a CPU)")
    p.add_argument("--depth", type=int, default=None, help="WRN depth of f (S2.1; 16, quick 10)")
    p.add_argument("--widen", type=int, default=None, help="WRN widen of f (S2.1; 2, quick 1)")
    p.add_argument("--width", type=int, default=None,
                   help="channels of the ConvNet f (--classifier convnet; DC 128, quick 32)")
    p.add_argument("--ngf", type=int, default=None, help="UNet width ngf (S2.2; 64, quick 16)")
    p.add_argument("--lr", type=nets.finite_float, default=None, help="learning rate of f and the simplifier "
                   "(Sec. 3 Implementation: 5e-4; quick %g)" % QUICK["lr"])
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "train_size", "test_size", "retrain_epochs", "depth",
                 "widen", "width", "ngf", "lr"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive.")
    if (args.lambda_sim or 0) < 0 or args.blur_sigma <= 0 or not 0 <= args.jpeg_quality <= 100:
        p.error("--lambda-sim must be >= 0, --blur-sigma > 0 and --jpeg-quality in 0..100.")
    if args.finetune and args.simplifier != "unet":
        p.error("--finetune needs the jointly trained classifier of --simplifier unet.")
    return args


def resolve_config(args):
    """Quick-sensitive defaults, resolved once into a new namespace; args is never changed."""
    preset = QUICK if args.quick else FULL
    cfg = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in preset.items()}
    if args.epochs is None and args.simplifier == "l2" and not args.quick:
        cfg["epochs"] = 50  # the authors' L2 baseline ran 50 epochs (S7)
    cfg["retrain_epochs"] = args.retrain_epochs or preset["epochs"]
    name = os.path.basename(os.path.normpath(args.dataset))
    knob = {"blur": f"sigma{args.blur_sigma:g}", "jpeg": f"q{args.jpeg_quality}"}.get(
        args.simplifier, f"lam{cfg['lambda_sim']:g}")
    cfg["out"] = args.out or (f"runs/per_instance-{name}-{args.simplifier}-{knob}-seed{args.seed}"
                              + ("-quick" if args.quick else ""))
    return argparse.Namespace(**{**vars(args), **cfg})


# ------------------------------------------------------------------------- augmentation
def sample_augmentation(n, flip, device):
    """Per-example crop offsets in [0, 2·PAD] and horizontal flips, shared by X and X_sim."""
    shifts = torch.randint(0, 2 * PAD + 1, (n, 2))
    flips = torch.rand(n) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return shifts.to(device), flips.to(device)


def augment(x, aug):
    """Random crop from the zero-padded image (+ flip); differentiable in x. (B,C,H,W) -> same."""
    shifts, flips = aug
    n, _, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD))  # (B, C, H+8, W+8), zeros as kornia
    rows = shifts[:, :1] + torch.arange(h, device=x.device)  # (B, H)
    cols = shifts[:, 1:] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # a flip reads the columns backwards
    batch = torch.arange(n, device=x.device)[:, None, None]  # (B, 1, 1)
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------- Eq. 2-5
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
        for p in group["params"]:
            name, g = names[id(p)], grads[names[id(p)]]
            if g is None:  # a parameter the loss does not use: unchanged, as in torch
                continue
            state = optimizer.state.get(p, {})
            step = float(state.get("step", 0)) + 1
            m = state.get("exp_avg", torch.zeros_like(p)).detach()
            v = state.get("exp_avg_sq", torch.zeros_like(p)).detach()
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            # clamp: √ has an infinite derivative at 0 (0·∞ = NaN where g = 0 and v = 0);
            # 1e-30 changes √v by at most 1e-15, far below eps
            denom = v.clamp_min(1e-30).sqrt() / (1 - beta2 ** step) ** 0.5 + eps
            new[name] = params[name] * (1 - lr * wd) - lr / (1 - beta1 ** step) * m / denom
    return new


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


def simplifier_loss(classifier, optimizer, glow_model, x, x_sim, y, aug, lambda_sim):
    """The simplifier's objective, Eq. 2-5 with the S3 changes, as in the authors' code:

        X_sim = simplifier(X_orig)                               (Eq. 2; 8-bit, straight-through)
        f'    = train_step(f, l(f(X̃_sim), y))                    (Eq. 3; one AdamW step)
        L_cls = 10·l(f'(X̃_orig)) + l(f(X̃_sim)) + l(f'(X̃_sim))     (Eq. 4 → S3)
        L     = (L_cls + λ_sim·L_sim) / (12 + λ_sim)               (Eq. 5, weights normalised)
        L_sim = mean_i w_i·bpd(X_sim,i),  w_i = max(0, 1 − l_i(f'(X̃_orig))/0.1)   (Eq. 1, S3)

    ~ marks the augmentation `aug`, shared by X and X_sim; bpd is taken on the un-augmented
    X_sim. w_i is the authors' soft form of S3's "turn L_sim off where the loss > 0.1", and
    is not differentiated. With λ_sim = 0 Glow is not called (glow_model may be None) and L
    is the classification loss of plain training through a simplifier. Returns (L, parts).
    """
    x_sim_aug, x_aug = augment(x_sim, aug), augment(x, aug)  # (B, 3, 32, 32) each
    loss_f_sim, params = unrolled_train_step(classifier, optimizer, x_sim_aug, y)  # Eq. 3
    # the updated classifier f' on the simplified and on the original batch (Eq. 4)
    loss_f1_sim = F.cross_entropy(functional_call(classifier, params, (x_sim_aug,)), y)
    loss_f1_orig_i = F.cross_entropy(functional_call(classifier, params, (x_aug,)), y,
                                     reduction="none")  # (B,) per example, for w_i
    loss_cls = ORIG_WEIGHT * loss_f1_orig_i.mean() + loss_f_sim + loss_f1_sim  # Eq. S3
    # S3: no simplification pressure on examples f' does not yet get right (loss >= τ)
    weight = (1 - loss_f1_orig_i.detach() / TAU).clamp_min(0)  # (B,) w_i ∈ [0, 1]
    if lambda_sim > 0:
        bpd = glow.bits_per_dim(glow_model, x_sim)  # (B,) Eq. 1, un-augmented (authors)
        loss_sim = (weight * bpd).mean()  # mean over the whole batch, w_i = 0 included
    else:
        bpd = loss_sim = torch.zeros((), device=x.device)
    loss = (loss_cls + lambda_sim * loss_sim) / (ORIG_WEIGHT + 2 + lambda_sim)  # Eq. 5
    parts = dict(loss=loss, loss_f_sim=loss_f_sim, loss_f1_sim=loss_f1_sim,
                 loss_f1_orig=loss_f1_orig_i.mean(), bpd=bpd.mean(), sim_weight=weight.mean())
    return loss, {k: v.detach() for k, v in parts.items()}


def l2_simplifier_loss(glow_model, x, x_sim, lambda_sim):
    """S7 baseline without a classifier (authors' mse_weight 10, normalised like Eq. 5):
        L = (10·MSE(X_sim, X) + λ_sim·mean_i bpd(X_sim,i)) / (10 + λ_sim)"""
    mse = F.mse_loss(x_sim, x)
    bpd = glow.bits_per_dim(glow_model, x_sim) if lambda_sim > 0 else mse.new_zeros(1)
    loss = (MSE_WEIGHT * mse + lambda_sim * bpd.mean()) / (MSE_WEIGHT + lambda_sim)
    return loss, dict(loss=loss.detach(), mse=mse.detach(), bpd=bpd.mean().detach())


def finite_step(optimizer, loss, params):
    """Backward into `params` and step, unless the loss or a gradient is non-finite
    (authors' code: such steps are skipped). Returns True when the step was skipped."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward(inputs=params)
    grads = [p.grad for p in params if p.grad is not None]
    finite = torch.stack([loss.isfinite().all()] + [g.isfinite().all() for g in grads]).all()
    if not bool(finite):
        optimizer.zero_grad(set_to_none=True)
        return True
    optimizer.step()
    return False


def classifier_step(classifier, optimizer, x, y):
    """Plain training step of f on l(f(x), y); returns (loss, skipped)."""
    loss = F.cross_entropy(classifier(x), y)
    return loss.detach(), finite_step(optimizer, loss, list(classifier.parameters()))


def simplebits_step(simplifier, classifier, opt_simp, opt_clf, glow_model, x, y, lambda_sim,
                    flip):
    """One batch of Sec. 3: update the simplifier on Eq. 5, then the classifier on the new
    simplified batch with the same augmentation (authors' code). Returns parts, #skipped."""
    aug = sample_augmentation(len(x), flip, x.device)
    # --- update the simplifier: minimise Eq. 5
    x_sim = glow.quantize(simplifier(x))  # Eq. 2, (B, 3, 32, 32) on 8-bit levels
    loss, parts = simplifier_loss(classifier, opt_clf, glow_model, x, x_sim, y, aug, lambda_sim)
    skipped = finite_step(opt_simp, loss, list(simplifier.parameters()))
    # --- update the classifier on simplified images only (authors' train_orig=False)
    with torch.no_grad():
        x_sim = glow.quantize(simplifier(x))
    parts["clf_loss"], clf_skipped = classifier_step(classifier, opt_clf, augment(x_sim, aug), y)
    return parts, int(skipped) + int(clf_skipped)


# ------------------------------------------------------------------------- fixed simplifiers
def gaussian_blur(x, sigma):
    """S7 baseline: 15×15 Gaussian blur with reflect borders (authors: kornia GaussianBlur2d)."""
    return TF.gaussian_blur(x, kernel_size=15, sigma=sigma)


def jpeg(x, quality):
    """S7 baseline: JPEG round trip through PIL at `quality` (PIL defaults otherwise)."""
    out = []
    for img in to_uint8(x).permute(0, 2, 3, 1).cpu().numpy():  # (H, W, 3) uint8
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(buffer).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(x.device).float() / 255


def make_simplify(args, simplifier):
    """x in [0,1] -> X_sim on 8-bit levels: what the classifier and Glow see."""
    if args.simplifier == "blur":
        return lambda x: glow.quantize(gaussian_blur(x, args.blur_sigma))
    if args.simplifier == "jpeg":
        return lambda x: jpeg(x, args.jpeg_quality)
    return lambda x: glow.quantize(simplifier(x))


# ------------------------------------------------------------------------- evaluation
def to_uint8(x):
    return (x.detach().clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def simplify_all(simplify, images, device):
    """Simplify (N, 3, 32, 32) float images in batches -> uint8 (N, 3, 32, 32) on the CPU."""
    return torch.cat([to_uint8(simplify(x.to(device))).cpu() for x in images.split(EVAL_BATCH)])


@torch.no_grad()
def evaluate(classifier, glow_model, images, labels, device):
    """Accuracy and loss of f (if given), and per-image bpd (Eq. 1) if glow_model is given."""
    correct, loss, bpd = 0, 0.0, []
    for x, y in zip(images.split(EVAL_BATCH), labels.split(EVAL_BATCH)):
        x, y = x.to(device).float(), y.to(device)
        x = x / 255 if images.dtype == torch.uint8 else x
        if classifier is not None:
            logits = classifier.eval()(x)  # no dropout
            correct += (logits.argmax(1) == y).sum().item()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
        if glow_model is not None:
            bpd.append(glow.bits_per_dim(glow_model, x).cpu())
    if classifier is not None:
        classifier.train()
    bpd = torch.cat(bpd) if bpd else None
    return dict(acc=correct / len(labels), loss=loss / len(labels)), bpd


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


def epoch_order(n, seed, epoch):
    """A permutation of n fixed by (seed, epoch), so a resumed run sees the same batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 9973 + epoch))


def train_batches(dataset, batch_size, seed, epoch):
    order = epoch_order(len(dataset), seed, epoch)
    return DataLoader(Subset(dataset, order.tolist()), batch_size=batch_size, drop_last=True)


def make_classifier(cfg, info, device):
    if cfg.classifier == "convnet":
        return nets.ConvNet(info.num_classes, width=cfg.width, mean=info.mean,
                            std=info.std).to(device)
    return nets.NFWideResNet(info.num_classes, depth=cfg.depth, widen=cfg.widen,
                             mean=info.mean, std=info.std).to(device)


def make_optimizer(classifier, lr=5e-4):
    """Authors' classifier optimizer: AdamW(lr 5e-4, betas (0.9, 0.995), eps 1e-8), weight
    decay 1e-5 on weights and gains only, none on biases."""
    decay = [p for n, p in classifier.named_parameters() if "weight" in n or "gain" in n]
    rest = [p for n, p in classifier.named_parameters() if not ("weight" in n or "gain" in n)]
    groups = [dict(params=decay, weight_decay=1e-5), dict(params=rest, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.995), eps=1e-8)


def retrain(classifier, train_sim, train_labels, test, cfg, flip, device, phase):
    """Fig. 5: train f on the stored simplified training images (uint8), with the same
    augmentation and optimizer as joint training; returns its test accuracies."""
    optimizer = make_optimizer(classifier, cfg.lr)
    for epoch in range(1, cfg.retrain_epochs + 1):
        order = epoch_order(len(train_sim), cfg.seed, epoch)
        losses = []
        for idx in order[:len(order) // cfg.batch_size * cfg.batch_size].split(cfg.batch_size):
            x, y = train_sim[idx].to(device).float() / 255, train_labels[idx].to(device)
            aug = sample_augmentation(len(x), flip, device)
            losses.append(classifier_step(classifier, optimizer, augment(x, aug), y)[0])
        orig, _ = evaluate(classifier, None, *test["orig"], device)
        sim, _ = evaluate(classifier, None, *test["sim"], device)
        row = dict(phase=phase, epoch=epoch, train_loss=torch.stack(losses).mean().item(),
                   test_acc=orig["acc"], test_acc_simplified=sim["acc"])
        nets.append_jsonl(os.path.join(cfg.out, "metrics.jsonl"), row)
        print(f"{phase} epoch {epoch}/{cfg.retrain_epochs}  loss {row['train_loss']:.3f}  "
              f"test_acc {orig['acc']:.3f}  test_acc_simplified {sim['acc']:.3f}", flush=True)
    return orig["acc"], sim["acc"]


def test_metrics(classifier, simplify, glow_model, test_x, test_y, device):
    """bpd of the simplified test images and, given a classifier, its accuracy on the
    original and on the simplified ones (Fig. 5, S6)."""
    test_sim = simplify_all(simplify, test_x, device)  # uint8 (N, 3, 32, 32)
    sim, sim_bpd = evaluate(classifier, glow_model, test_sim, test_y, device)
    metrics = dict(test_bpd_simplified=sim_bpd.mean().item())
    if classifier is not None:
        metrics.update(test_acc=evaluate(classifier, None, test_x, test_y, device)[0]["acc"],
                       test_acc_simplified=sim["acc"])
    return metrics, test_sim, sim_bpd


def save_checkpoint(path, epoch, models, optimizers, history, skipped, args):
    """Everything --resume needs in one atomic file; models as {"kind", "config", "state_dict"}."""
    state = {name: {"kind": type(m).__name__, "config": dict(m.config),
                    "state_dict": m.state_dict()} for name, m in models.items()}
    state.update({name: opt.state_dict() for name, opt in optimizers.items()})
    cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None
    nets.atomic_save(dict(state, epoch=epoch, history=history, skipped=skipped, args=vars(args),
                          rng_cpu=torch.get_rng_state(), rng_cuda=cuda_rng), path)


def load_checkpoint(path, models, optimizers):
    """Restore what save_checkpoint wrote; returns (epoch, metrics history, skipped steps)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, empty, or not a torch file
        raise nets.CheckpointError(f"--resume: cannot read {path} ({type(e).__name__}); "
                                   "delete it to restart the run, or choose another --out.") from None
    if not isinstance(ckpt, dict) or not {*models, *optimizers, "epoch"} <= ckpt.keys():
        raise nets.CheckpointError(f"--resume: {path} is not a checkpoint of per_instance.py; "
                                   "choose another --out.")
    for name, model in models.items():
        if ckpt[name]["config"] != model.config:
            raise nets.CheckpointError(f"{path} was written with other network settings; "
                                       "use another --out or drop --resume.")
        model.load_state_dict(ckpt[name]["state_dict"])
    for name, opt in optimizers.items():
        opt.load_state_dict(ckpt[name])
    torch.set_rng_state(ckpt["rng_cpu"])
    if ckpt["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(ckpt["rng_cuda"])
    print(f"resuming after epoch {ckpt['epoch']} from {path}", flush=True)
    return ckpt["epoch"], ckpt["history"], ckpt["skipped"]


def main(args):
    cfg = resolve_config(args)
    print(vars(cfg), flush=True)
    # a resumed run may train longer and add the phases after joint training (Fig. 5)
    resuming = nets.check_out(cfg.out, vars(args), cfg.resume, may_change=(
        "epochs", "retrain", "finetune", "retrain_epochs", "save_simplified"))
    nets.seed_everything(cfg.seed)
    device = nets.resolve_device(cfg.device)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")

    # data: training items are read per epoch (composites re-draw their distractors);
    # the test set is fixed and held in memory
    def load(train, size):
        dataset = datasets.load_dataset(cfg.dataset, cfg.data_root, train=train)
        return datasets.subset(dataset, size, cfg.seed)
    train_set, test_set = load(True, cfg.train_size), load(False, cfg.test_size)
    info, (test_x, test_y) = train_set.info, datasets.to_tensors(test_set)
    flip = info.name in ("cifar10", "cifar100")  # authors: flips for CIFAR only
    if len(train_set) < cfg.batch_size:
        raise nets.RunError(f"--batch-size {cfg.batch_size} is larger than the {len(train_set)} "
                            "training images; lower it or raise --train-size.")

    # models: simplifier (S2.2), classifier f (S2.1), frozen Glow G (Eq. 1)
    simplifier = nets.UNetSimplifier(num_down=5, ngf=cfg.ngf).to(device)
    classifier = make_classifier(cfg, info, device)
    made_from = dict(dataset=info.name, train_size=len(train_set), seed=cfg.seed)
    glow_model = glow.get_glow(cfg.glow, cfg.quick, train_set,
                               glow.quick_glow_path(cfg.out, made_from), device, made_from)
    simplify = make_simplify(cfg, simplifier)
    nets.write_json(os.path.join(cfg.out, "args.json"), vars(args))  # the run starts here

    # optimizers: the authors' code (the paper text says AdamW, wd 1e-5, for both)
    opt_clf = make_optimizer(classifier, cfg.lr)
    opt_simp = torch.optim.Adam(simplifier.parameters(), lr=cfg.lr, betas=(0.5, 0.99),
                                weight_decay=5e-5)
    models = dict(classifier=classifier, simplifier=simplifier)
    optimizers = dict(opt_clf=opt_clf, opt_simp=opt_simp)

    # bpd of the original test images never changes: computed once, before --resume
    # restores the RNG, so a resumed run draws the same numbers as an uninterrupted one
    _, test_bpd = evaluate(None, glow_model, test_x, test_y, device)  # (N,)
    done, history, skipped_total = 0, [], 0
    if resuming and os.path.exists(ckpt_path):
        done, history, skipped_total = load_checkpoint(ckpt_path, models, optimizers)
        nets.write_jsonl(metrics_path, history)  # rows after the checkpoint are dropped

    epochs = cfg.epochs if cfg.simplifier in ("unet", "l2") else 0  # blur/jpeg: nothing to train
    t_start = time.time()
    for epoch in range(done + 1, epochs + 1):
        sums, skipped = {}, 0
        loader = train_batches(train_set, cfg.batch_size, cfg.seed, epoch)
        progress = nets.Progress(len(loader), f"epoch {epoch}")
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if cfg.simplifier == "unet":
                parts, n_skip = simplebits_step(simplifier, classifier, opt_simp, opt_clf,
                                                glow_model, x, y, cfg.lambda_sim, flip)
            else:  # l2 baseline: the simplifier alone, no classifier, no augmentation (S7)
                x_sim = glow.quantize(simplifier(x))
                loss, parts = l2_simplifier_loss(glow_model, x, x_sim, cfg.lambda_sim)
                n_skip = int(finite_step(opt_simp, loss, list(simplifier.parameters())))
            skipped += n_skip
            for k, v in parts.items():  # summed on the device: no GPU sync per step
                sums[k] = sums.get(k, 0.0) + v / len(loader)
            progress.update(loss=parts["loss"])
        progress.close()
        skipped_total += skipped

        # evaluate on the test set, write the metrics, a Fig. 3-style grid, the checkpoints
        joint = classifier if cfg.simplifier == "unet" else None  # l2: no classifier (S7)
        metrics, test_sim, sim_bpd = test_metrics(joint, simplify, glow_model, test_x, test_y,
                                                  device)
        row = dict(phase="train", epoch=epoch, **{f"train_{k}": float(v) for k, v in sums.items()},
                   skipped_steps=skipped, test_bpd=test_bpd.mean().item(), **metrics,
                   time_s=time.time() - t_start)
        history.append(row)
        nets.append_jsonl(metrics_path, row)
        save_grid(os.path.join(cfg.out, f"simplified_epoch{epoch:03d}.png"), test_x, test_sim,
                  test_bpd, sim_bpd)
        accuracy = "" if joint is None else \
            f"  test acc {row['test_acc']:.3f} (simplified {row['test_acc_simplified']:.3f})"
        print(f"epoch {epoch}/{epochs}  loss {row['train_loss']:.3f}{accuracy}  test bpd "
              f"{row['test_bpd']:.2f} -> {row['test_bpd_simplified']:.2f}  skipped {skipped}  "
              f"{row['time_s']:.0f}s", flush=True)
        nets.save_model(simplifier, os.path.join(cfg.out, "simplifier.pt"), epoch=epoch,
                        dataset=info.name)
        nets.save_model(classifier, os.path.join(cfg.out, "classifier.pt"), epoch=epoch,
                        dataset=info.name)
        save_checkpoint(ckpt_path, epoch, models, optimizers, history, skipped_total, args)

    # final evaluation (S5: PNG sizes of the 8-bit test images)
    joint = classifier if cfg.simplifier == "unet" else None
    metrics, test_sim, sim_bpd = test_metrics(joint, simplify, glow_model, test_x, test_y, device)
    results = dict(dataset=info.name, simplifier=cfg.simplifier, lambda_sim=cfg.lambda_sim,
                   epochs=epochs, test_bpd=test_bpd.mean().item(), **metrics,
                   png_bytes=png_bytes(to_uint8(test_x)), png_bytes_simplified=png_bytes(test_sim),
                   skipped_steps=skipped_total)
    save_grid(os.path.join(cfg.out, "simplified.png"), test_x, test_sim, test_bpd, sim_bpd, n=32)

    # retraining / finetuning on the simplified training images (Fig. 5); the baselines
    # are always retrained: their only classifier is the one trained on their outputs
    if cfg.retrain or cfg.finetune or cfg.save_simplified or cfg.simplifier != "unet":
        train_x, train_y = datasets.to_tensors(train_set)  # dataset order
        train_sim = simplify_all(simplify, train_x, device)  # uint8, computed once (authors)
        del train_x
    if cfg.save_simplified:
        for name, images, labels in (("test", test_sim, test_y), ("train", train_sim, train_y)):
            nets.atomic_save(dict(images=images, labels=labels),
                             os.path.join(cfg.out, f"simplified_{name}.pt"))
    test = {"orig": (test_x, test_y), "sim": (test_sim, test_y)}
    if cfg.retrain or cfg.simplifier != "unet":
        fresh = make_classifier(cfg, info, device)
        acc, acc_sim = retrain(fresh, train_sim, train_y, test, cfg, flip, device, "retrain")
        results.update(retrain_test_acc=acc, retrain_test_acc_simplified=acc_sim)
        if cfg.simplifier != "unet":
            results.update(test_acc=acc, test_acc_simplified=acc_sim)
            nets.save_model(fresh, os.path.join(cfg.out, "classifier.pt"), dataset=info.name)
    if cfg.finetune:
        acc, acc_sim = retrain(classifier, train_sim, train_y, test, cfg, flip, device, "finetune")
        results.update(finetune_test_acc=acc, finetune_test_acc_simplified=acc_sim)
    results["time_s"] = time.time() - t_start
    nets.write_json(os.path.join(cfg.out, "results.json"), results)
    nets.check_finite(results, f"the run in {cfg.out}")
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}, flush=True)
    return results


if __name__ == "__main__":
    try:
        main(get_args())
    except (datasets.DatasetError, nets.CheckpointError, glow.GlowCheckpointError,
            nets.RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command with --resume to continue from the last "
              "finished epoch.", file=sys.stderr)
        sys.exit(130)
