"""Post-training simplification (SimpleBits, "When less is more", Sec. 5, Alg. 1 and 2, S4).

Explains a trained classifier f on single images. f "forgets" when all its parameters are
scaled down by s < 1; we synthesise the simplest image (lowest Glow bpd) whose gradients
on those scaling gates match the original image's: the bits that f needs to relearn
what it forgot about that image. The simplified image is optimised in Glow's latent
space with Adam, starting from the priors' mode (the simplest image Glow describes);
Alg. 2 also interpolates z_sim with the original's latents z.

    # CPU, a few minutes: trains a small classifier and a tiny Glow on the synthetic shapes set
    python posthoc.py --dataset shapes --quick
    # the paper's Fig. 8: confidently misclassified CIFAR-10 test images, Alg. 2, for the
    # classifier of `python per_instance.py --dataset cifar10 --lambda-sim 0 --glow ...`
    python posthoc.py --dataset cifar10 --glow glow-cifar10.pt --select misclassified \
        --classifier runs/per_instance-cifar10-unet-lam0-seed0/classifier.pt
    # Alg. 1 (no interpolation) on chosen test images, with the classifier of the quick run
    python posthoc.py --dataset shapes --quick --algorithm 1 --indices 3 14 15 \
        --classifier runs/posthoc-shapes-alg2-seed0-quick/classifier.pt

Read it in this order: `posthoc_loss` (Alg. 1/2 and its parts below it), `simplify_step`
and `simplify` (S4's Adam on z_sim), the evaluation, then how f is trained and the images
chosen. Everything below the "running it" banner is presets, flags, checkpoints and `main`.
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import datasets
import glow
import nets


# ------------------------------------------------------------- Sec. 5: Alg. 1 and 2 (S4)
def posthoc_loss(model, glow_model, z_sim, z_orig, x, h, s, alpha, lambda_sim):
    """The simplification loss after training, Alg. 2 (S4) as the authors coded it.

        f_s     = f with every parameter tensor multiplied by s             ("forgetting")
        z_mix   = α·z_sim + (1 − α)·z,   x_mix = G⁻¹(z_mix),   x_sim = G⁻¹(z_sim)
        g_o[p]  = p_s ⊙ ∇_{p_s} KL(h ‖ f_s(x))              per example, a constant
        g_m[p]  = p_s ⊙ ∇_{p_s} KL(h_mix ‖ f_s(x_mix))      per example
        L_grad  = 1 − mean_{p, i} cos(M⊙g_o, M⊙g_m),   M = [g_o < 0]
        L_pred  = KL(h_s ‖ h_mix,s) + KL(h ‖ h_mix)
        L       = (10·L_grad + λ·mean_i bpd(x_sim,i) + L_pred) / (12 + λ)

    h = f(x) (precomputed), h_s = f_s(x), h_mix = f(x_mix), h_mix,s = f_s(x_mix).
    Alg. 2 writes the target of g_m as h; we use the authors' h_mix (the unscaled
    prediction on the mixed image). The weights 10, 1, 1 and the division by 12 + λ are
    the authors' (weighted sum normalised by its weights). Alg. 1 is α = 1: x_mix = x_sim.
    Returns (loss, dict of its parts: 0-dim tensors, detached, and the floats s and α).
    """
    # f_s: ONE global factor s on all parameters (weights, gains, biases, last Linear; authors)
    params = {name: p.detach() * s for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def f_s(inputs):
        return functional_call(model, (params, buffers), (inputs,))

    # the original image: h_s and g_o do not depend on z_sim, so no graph is kept for them
    # (torch.func.grad differentiates on its own: g_o is computed under no_grad too)
    with torch.no_grad():
        h_s = f_s(x)  # (B, K)
        g_orig = gate_gradients(model, params, buffers, x, h)
    # the mixed image decoded from interpolated latents (Alg. 2 lines 4-9). The classifier
    # sees it clamped to [0, 1] (straight-through); the authors feed it unclamped.
    z_mix = z_sim if alpha == 1 else [alpha * zs + (1 - alpha) * zo for zs, zo in zip(z_sim, z_orig)]
    x_mix = straight_through_clamp(glow.decode(glow_model, z_mix))  # (B, 3, 32, 32)
    h_mix, h_mix_s = model(x_mix), f_s(x_mix)  # (B, K) each
    g_mix = gate_gradients(model, params, buffers, x_mix, h_mix)  # target h_mix (authors), not h
    l_grad = masked_cosine_distance(g_orig, g_mix)
    l_pred = kl_divergence(h_s, h_mix_s).mean() + kl_divergence(h, h_mix).mean()
    # the bits of the simplified image itself (Eq. 1), scored as an actual 8-bit image
    x_sim = x_mix if alpha == 1 else straight_through_clamp(glow.decode(glow_model, z_sim))
    bpd = glow.bits_per_dim(glow_model, glow.quantize(x_sim)).mean()
    loss = (10 * l_grad + lambda_sim * bpd + l_pred) / (12 + lambda_sim)
    # the parts stay on the device, read only when printed
    parts = dict(loss=loss.detach(), l_grad=l_grad.detach(), l_pred=l_pred.detach(),
                 bpd=bpd.detach(), s=s, alpha=alpha)
    return loss, parts


def kl_divergence(logits_a, logits_b):
    """KL(p_a ‖ p_b) per example (B,) = Σ_k softmax(a)·(log softmax a − log softmax b)."""
    log_a, log_b = F.log_softmax(logits_a, dim=1), F.log_softmax(logits_b, dim=1)
    return (log_a.exp() * (log_a - log_b)).sum(dim=1)


def gate_gradients(model, params, buffers, x, target):
    """Per-example gradients on multiplicative gates of the scaled parameters p_s:

        g[p]_i = p_s ⊙ ∂ KL(target_i ‖ f_s(x_i)) / ∂p_s          (B, *p.shape) per tensor p

    i.e. the gradient w.r.t. a gate on each element of p_s, at gate 1 (the "scaling
    factors" of Alg. 2; the authors use BackPACK). grad of one example's KL, vmapped over
    the batch. Gradients flow on to x and target, so g_m can be differentiated w.r.t. z_sim.
    """
    def kl_one(p, x_i, target_i):  # x_i (3, 32, 32), target_i (K,) -> scalar
        logits = functional_call(model, (p, buffers), (x_i.unsqueeze(0),))  # (1, K)
        return kl_divergence(target_i.unsqueeze(0), logits).sum()
    grads = vmap(grad(kl_one), in_dims=(None, 0, 0))(params, x, target)  # name -> (B, *shape)
    return {name: params[name] * g for name, g in grads.items()}


def masked_cosine_distance(g_orig, g_mix, eps=1e-12):
    """L_grad = 1 − mean over (parameter tensors p × examples i) of cos(M⊙g_o, M⊙g_m).

    M = [g_o < 0] elementwise: only gates whose gradient is negative for the original,
    i.e. whose growth would bring f_s's prediction on x back towards f's (authors'
    cos_sim_neg_grads; "layerwise" = per parameter tensor). cos(a, b) = a·b / max(‖a‖‖b‖, eps),
    so a tensor with an empty mask counts cos = 0 (a constant, as in the authors' code).
    """
    cosines = []
    for name, a in g_orig.items():
        a, b = a.flatten(1), g_mix[name].flatten(1)  # (B, numel)
        mask = (a < 0).to(a.dtype)
        a, b = a * mask, b * mask
        norms = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1)  # (B,)
        cosines.append((a * b).sum(dim=1) / norms.clamp_min(eps))
    return 1 - torch.stack(cosines).mean()  # (tensors, B) -> scalar


def straight_through_clamp(x):
    """Forward: clamp to [0, 1]; backward: identity (like the authors' soft_clip). Decoded
    latents may leave [0, 1] slightly; every pixel keeps its gradient."""
    return x + (x.clamp(0, 1) - x).detach()


def simplify_step(model, glow_model, z_sim, z_orig, x, h, optimizer, cfg):
    """One Adam step on z_sim: draw s ~ U(scale_min, scale_max) and α = 1 − U[0, 1) (α = 1
    for Alg. 1), minimise posthoc_loss, and zero the gradient of every example whose
    gradient is not finite (authors)."""
    # drawn by the CPU generator: Python floats without a device sync
    s = cfg.scale_min + (cfg.scale_max - cfg.scale_min) * torch.rand(()).item()
    alpha = 1.0 if cfg.algorithm == 1 else 1.0 - torch.rand(()).item()  # α ∈ (0, 1]
    optimizer.zero_grad(set_to_none=True)
    loss, parts = posthoc_loss(model, glow_model, z_sim, z_orig, x, h, s, alpha, cfg.lambda_sim)
    loss.backward()
    bad = torch.stack([~torch.isfinite(z.grad.flatten(1)).all(dim=1) for z in z_sim]).any(dim=0)  # (B,)
    for z in z_sim:
        z.grad.masked_fill_(bad.view(-1, *[1] * (z.dim() - 1)), 0.0)  # on the device, no sync
    optimizer.step()
    return parts


def simplify(cfg, model, glow_model, x, log, resuming):
    """Sec. 5 on the images x (B, 3, 32, 32): z_sim starts at the priors' mode, the simplest
    image G describes, and takes cfg.steps Adam steps (S4) on Alg. 1/2's loss, with a
    checkpoint every cfg.log_every steps. Returns z_sim and the evaluation of the start
    point."""
    with torch.no_grad():
        h = model(x)  # (B, K), f(x) is fixed
        z_orig = glow.encode(glow_model, x)  # [(B, 6, 16, 16), (B, 12, 8, 8), (B, 48, 4, 4)] for L = 3
    z_sim = [z.clone().requires_grad_() for z in glow.prior_mode(glow_model, len(x))]
    start_point = predictions_and_bpd(model, glow_model, x, z_sim)
    optimizer = torch.optim.Adam(z_sim, lr=cfg.lr)
    parts = dict(optimizer=optimizer, **{f"z{i}": z for i, z in enumerate(z_sim)})
    ckpt_path, done = cfg.out / "checkpoint.pt", 0
    if resuming and ckpt_path.exists():
        ckpt = nets.load_state(ckpt_path, "a checkpoint of posthoc.py", parts,
                               keys=("step", "history"), map_location=x.device)
        done = ckpt["step"]
        if done > cfg.steps:
            raise nets.RunError(f"{ckpt_path} is at step {done}, beyond --steps {cfg.steps}; a "
                                "resume never shortens a run: raise --steps to continue it.")
        log.restart(ckpt["history"])
        print(f"resuming after step {done} from {ckpt_path}", flush=True)
    print(f"== simplify {len(x)} images: Alg. {cfg.algorithm}, {cfg.steps} steps, "
          f"λ = {cfg.lambda_sim:g}, start bpd {start_point['bpd_simplified'].mean():.3f} ==")
    progress = nets.Progress(cfg.steps - done, "simplify")
    for step in range(done + 1, cfg.steps + 1):
        # update z_sim: one Adam step on Alg. 2's loss (posthoc_loss)
        loss = simplify_step(model, glow_model, z_sim, z_orig, x, h, optimizer, cfg)
        progress.update(loss=loss["loss"], bpd=loss["bpd"])
        if step % cfg.log_every == 0 or step == cfg.steps:
            print(f"step {step}/{cfg.steps}: loss {loss['loss']:.4f}, L_grad {loss['l_grad']:.4f}, "
                  f"L_pred {loss['l_pred']:.4f}, bpd(x_sim) {loss['bpd']:.3f} "
                  f"(s {loss['s']:.3f}, α {loss['alpha']:.3f})", flush=True)
            log(dict(phase="simplify", step=step, **loss))
            nets.save_state(ckpt_path, parts, step=step, history=log.rows)
    progress.close()
    return z_sim, start_point


# ------------------------------------------------------- evaluation and figures (Fig. 8)
@torch.no_grad()
def predictions_and_bpd(model, glow_model, x, z_sim):
    """Predictions and bpd of the originals and of the simplified images (as 8-bit images)."""
    x_sim = torch.round(glow.decode(glow_model, z_sim).clamp(0, 1) * 255) / 255  # (B, 3, 32, 32)
    return dict(x_sim=x_sim, pred_original=model(x).argmax(1), pred_simplified=model(x_sim).argmax(1),
                bpd_original=glow.bits_per_dim(glow_model, x),
                bpd_simplified=glow.bits_per_dim(glow_model, x_sim))


def per_image_results(indices, labels, names, start_point, result):
    """One dict per explained image: label, predictions and bpd of the original, the start
    point and the simplified 8-bit image."""
    return [dict(index=i, label=int(labels[k]), label_name=names[int(labels[k])],
                 pred_original=int(result["pred_original"][k]),
                 pred_start=int(start_point["pred_simplified"][k]),
                 pred_simplified=int(result["pred_simplified"][k]),
                 bpd_original=float(result["bpd_original"][k]),
                 bpd_start=float(start_point["bpd_simplified"][k]),
                 bpd_simplified=float(result["bpd_simplified"][k]))
            for k, i in enumerate(indices.tolist())]


def save_triples(x, start_point, result, images, names, path):
    """A PNG of (original, start, simplified) per image, captioned with prediction and bpd."""
    kinds = ("original", "start", "simplified")
    tiles = torch.stack([x.cpu(), start_point["x_sim"].cpu(), result["x_sim"].cpu()], dim=1)
    tiles = F.interpolate(tiles.flatten(0, 1), scale_factor=5, mode="nearest")  # (3B, 3, 160, 160)
    short = dict(original="orig", start="start", simplified="simple")
    captions = [f"{short[kind]} {names[im['pred_' + kind]]} {im['bpd_' + kind]:.2f}bpd"
                for im in images for kind in kinds]
    datasets.save_image_grid(tiles, path, nrow=6 if len(images) > 1 else 3, captions=captions)


# ----------------------------------------------------- the classifier f and the images x
def train_classifier(train_set, cfg, device, log):
    """An NF-WRN (S2.1) trained with the authors' classifier optimizer (AdamW, betas
    (0.9, 0.995), weight decay 1e-5 on weights and gains, none on biases) and augmentation."""
    info = train_set.info
    model = nets.NFWideResNet(info.num_classes, cfg.depth, cfg.widen, mean=info.mean, std=info.std)
    model = model.to(device)
    optimizer = nets.classifier_optimizer(model, cfg.train_lr)
    fast = nets.compiled(model, getattr(cfg, "compile", False))  # --compile
    batches = datasets.Batches(train_set, device)  # the training images, on the device
    size = min(cfg.batch_size, len(batches))
    flip = info.name in ("cifar10", "cifar100")  # authors: flips only for CIFAR
    for epoch in range(1, cfg.train_epochs + 1):
        model.train()
        order = torch.randperm(len(batches))[:len(batches) // size * size]  # full batches only
        progress = nets.Progress(len(order) // size, f"classifier epoch {epoch}")
        loss_sum, correct, count = 0.0, 0, 0  # summed on the device, read once per epoch
        for idx in order.split(size):
            x, y = batches.get(idx)  # (B, 3, 32, 32), (B,)
            aug = nets.sample_crop_flip(len(x), 4, flip, device)
            logits = fast(nets.crop_flip(x, aug, 4, "reflect"))  # 4-px reflect crop (+ flip)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            count += len(y)
            progress.update(loss=loss.detach())
        progress.close()
        metrics = dict(phase="classifier", epoch=epoch, train_loss=float(loss_sum) / count,
                       train_acc=float(correct) / count)
        if not math.isfinite(metrics["train_loss"]):
            raise nets.RunError(f"classifier epoch {epoch}: the training loss is not finite, so "
                                "f was not saved; check the data (an image channel that never "
                                "varies?) or lower --train-lr.")
        print(f"classifier epoch {epoch}/{cfg.train_epochs}: train loss {metrics['train_loss']:.4f}, "
              f"train acc {metrics['train_acc']:.4f}", flush=True)
        log(metrics)
    return model.eval()


def select_images(probs, labels, cfg):
    """Test-set indices to explain: --indices, or the first --num-images confidently
    (max softmax > --confidence) misclassified / correct ones, in dataset order (authors,
    Fig. 8, S17/S18). If too few are that confident, the most confident ones of that kind
    are taken instead and the returned note says so."""
    if cfg.indices is not None:
        outside = [i for i in cfg.indices if not 0 <= i < len(labels)]
        if outside:
            raise nets.RunError(f"--indices {outside} are outside the test set of {len(labels)} images.")
        return torch.tensor(cfg.indices), "given by --indices"
    confidence, pred = probs.max(dim=1)
    wanted = (pred != labels) if cfg.select == "misclassified" else (pred == labels)
    candidates = wanted.nonzero().flatten()
    confident = candidates[confidence[candidates] > cfg.confidence]
    if len(confident) >= cfg.num_images:
        return confident[:cfg.num_images], f"{cfg.select}, confidence > {cfg.confidence}"
    if len(candidates) == 0:
        other = "correct" if cfg.select == "misclassified" else "misclassified"
        raise nets.RunError(f"the classifier has no {cfg.select} test images; "
                         f"use --select {other} or --indices.")
    chosen = candidates[confidence[candidates].argsort(descending=True)][:cfg.num_images]
    return chosen, (f"only {len(confident)} {cfg.select} images have confidence > {cfg.confidence}; "
                    f"took the {len(chosen)} most confident {cfg.select} ones")


# --- running it: presets, flags, checkpoints (not needed to follow the paper) -------------
# Presets: the paper's setting (the authors' code), and a CPU-sized one for --quick (a small
# NF-WRN trained 5 epochs at a higher learning rate, 300 steps). Any flag given explicitly wins.
FULL = dict(train_size=None, test_size=None, train_epochs=30, train_lr=5e-4, depth=16, widen=2,
            steps=5000, log_every=250)
QUICK = dict(train_size=2000, test_size=500, train_epochs=5, train_lr=2e-3, depth=10, widen=1,
             steps=300, log_every=50)
# --resume: the classifier this run trained, then the simplification from its last
# checkpoint (every --log-every steps); more --steps continue it
RESUMABLE = ("steps", "log_every")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=nets.HelpFormatter)
    nets.add_run_flags(p, datasets.DATASET_NAMES, QUICK, may_change=RESUMABLE,
                       out="runs/posthoc-<dataset>-alg<k>-seed<seed>[-quick]")
    # the classifier f: given, or trained here (S2.1 architecture, the authors' optimizer)
    p.add_argument("--classifier", default=None,
                   help="trained classifier f: the classifier.pt of a per_instance.py run "
                        "(NF-WRN or ConvNet) or of an earlier posthoc.py run; without it an "
                        "NF-WRN f is trained first and saved in --out")
    p.add_argument("--train-epochs", type=nets.positive_int, default=None,
                   help="epochs of training f when --classifier is not given (default 30; "
                        "quick 5)")
    p.add_argument("--train-lr", type=nets.finite_float, default=None,
                   help="AdamW learning rate of f (default 5e-4 as the authors; quick 2e-3, to "
                        "train in 5 epochs)")
    p.add_argument("--batch-size", type=nets.positive_int, default=32,
                   help="batch size of training f (the authors' 32)")
    p.add_argument("--depth", type=nets.positive_int, default=None,
                   help="depth of a new NF-WRN f (S2.1; default 16; quick 10)")
    p.add_argument("--widen", type=nets.positive_int, default=None,
                   help="widen factor of a new NF-WRN f (S2.1; default 2; quick 1)")
    # the simplification (Alg. 1/2, S4)
    p.add_argument("--algorithm", type=int, default=2, choices=[1, 2],
                   help="Alg. 2: z_mix = α·z_sim + (1−α)·z with α ~ U(0,1]; "
                        "Alg. 1: α = 1 (x_mix = x_sim)")
    p.add_argument("--steps", type=nets.positive_int, default=None,
                   help="Adam steps on z_sim (S4: default 5000; quick 300)")
    p.add_argument("--lr", type=nets.finite_float, default=1e-2,
                   help="Adam learning rate on z_sim (S4)")
    p.add_argument("--lambda-sim", type=nets.finite_float, default=1.0,
                   help="λ_sim, weight of bpd(x_sim) in Alg. 2's loss (the authors' value)")
    p.add_argument("--scale-min", type=nets.finite_float, default=0.8,
                   help="s ~ U(scale-min, scale-max), the forgetting factor of Alg. 2 (authors)")
    p.add_argument("--scale-max", type=nets.finite_float, default=0.95,
                   help="upper end of s (authors)")
    # which images (Fig. 8, S17/S18)
    p.add_argument("--indices", type=int, nargs="+", default=None,
                   help="indices into the (--test-size) test set to explain; overrides --select")
    p.add_argument("--select", default="misclassified", choices=["misclassified", "correct"],
                   help="confidently misclassified (Fig. 8, S17) or correct (S18) test images")
    p.add_argument("--confidence", type=nets.finite_float, default=0.99,
                   help="confident means max softmax > this (the authors' value)")
    p.add_argument("--num-images", type=nets.positive_int, default=8,
                   help="number of images, simplified as one batch")
    p.add_argument("--log-every", type=nets.positive_int, default=None,
                   help="print and log the loss parts, and save a checkpoint --resume continues "
                        "from, every N steps (default 250; quick 50)")
    args = p.parse_args(argv)
    if not 0 < args.scale_min <= args.scale_max < 1:
        p.error("the forgetting factor needs 0 < --scale-min <= --scale-max < 1")
    if args.lambda_sim < 0 or not 0 <= args.confidence < 1:
        p.error("--lambda-sim must be >= 0 and --confidence in [0, 1)")
    if args.lr <= 0 or (args.train_lr is not None and args.train_lr <= 0):
        p.error("--lr and --train-lr must be positive")
    if args.indices is not None and min(args.indices) < 0:
        p.error("--indices must not be negative")
    nets.refuse_unused(p, nets.given_flags(p, args, argv), {
        **dict.fromkeys(("train_epochs", "train_lr", "batch_size", "depth", "widen"),
                        args.classifier and "when f is trained here, without --classifier"),
        **dict.fromkeys(("select", "confidence", "num_images"),
                        args.indices is not None and "without --indices")})
    return args


def resolve_config(args):
    """Quick-sensitive defaults, resolved once into a new namespace; args is never changed."""
    preset = QUICK if args.quick else FULL
    cfg = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in preset.items()}
    name = Path(args.dataset).name
    cfg["out"] = Path(args.out or f"runs/posthoc-{name}-alg{args.algorithm}-seed{args.seed}"
                      + ("-quick" if args.quick else ""))
    return argparse.Namespace(**{**vars(args), **cfg})


def load_classifier(cfg, train_set, device, resuming):
    """f from --classifier, or the one this run trained before it was interrupted (--resume),
    with the metrics rows of that training and the random state after it (None for a given
    f); (None, [], None) when f is still to be trained."""
    own = cfg.out / "classifier.pt"
    if not (cfg.classifier or (resuming and own.exists())):
        return None, [], None
    path = Path(cfg.classifier) if cfg.classifier else own
    model = nets.load_model(path, kind=("NFWideResNet", "ConvNet"), map_location=device,
                            expect=datasets.identity(train_set))
    if model.config["num_classes"] != train_set.info.num_classes:
        raise nets.CheckpointError(f"the classifier predicts {model.config['num_classes']} classes "
                                   f"but {cfg.dataset} has {train_set.info.num_classes}; give one "
                                   "trained on it.")
    saved = dict(history=[], rng=None) if cfg.classifier else \
        nets.read_checkpoint(own, "a classifier", nets.RESUME_HINT, keys=("history", "rng"))
    print(f"classifier f: loaded {path}")
    return model, saved["history"], saved["rng"]


@nets.releases_held  # the run's folder, once it ends
def main(args):
    cfg = resolve_config(args)
    print(nets.settings_line(vars(cfg)), flush=True)
    resuming = nets.check_out(cfg.out, vars(args), cfg.resume, RESUMABLE,
                              length=dict(steps=cfg.steps))
    nets.seed_everything(cfg.seed)
    device = nets.resolve_device(cfg.device)
    nets.quick_threads(cfg.quick, device)
    start = time.time()

    # data: training images (for f and the quick Glow) and the test images to explain
    train_set, test_set = datasets.load_splits(cfg.dataset, cfg.data_root, cfg.train_size,
                                               cfg.test_size, cfg.seed)
    info = train_set.info
    if cfg.indices is not None and max(cfg.indices) >= len(test_set):
        raise nets.RunError(f"--indices {max(cfg.indices)} is outside the test set of "
                            f"{len(test_set)} images.")

    # models: the classifier f (given, trained earlier in this run, or below; a given one is
    # checked against the data before the quick Glow's pretraining), and the Glow G
    model, history, rng = load_classifier(cfg, train_set, device, resuming)  # history: rows
    glow_model, made_from = glow.glow_for_run(cfg, train_set, test_set, device)
    print(f"Glow ready ({time.time() - start:.0f} s)")
    made_from["classifier"] = nets.file_hash(cfg.classifier) if cfg.classifier else None
    nets.start_run(cfg.out, vars(args), made_from, resuming)  # the run starts: it holds its folder
    log = nets.Metrics(cfg.out / "metrics.jsonl", history)
    if model is None:
        print(f"== train the classifier f: NF-WRN-{cfg.depth}-{cfg.widen}, {cfg.train_epochs} epochs ==")
        model = train_classifier(train_set, cfg, device, log)
        nets.save_model(model, cfg.out / "classifier.pt", history=log.rows, rng=nets.rng_state(),
                        **datasets.identity(train_set))
        print(f"classifier f: saved {cfg.out / 'classifier.pt'} ({time.time() - start:.0f} s)")
    elif rng is not None:  # the classifier this run trained: go on as an uninterrupted run
        nets.set_rng_state(rng)
    model.eval().requires_grad_(False)  # f stays fixed; only z_sim is optimised

    # the images to explain (Fig. 8: confidently misclassified test images)
    test_x, test_y = datasets.to_tensors(test_set)
    with torch.no_grad():
        probs = torch.cat([model(b.to(device)).softmax(1).cpu() for b in test_x.split(256)])  # (N, K)
    test_acc = (probs.argmax(1) == test_y).float().mean().item()
    print(f"classifier f: test accuracy {test_acc:.4f} on {len(test_y)} images")
    indices, selection = select_images(probs, test_y, cfg)
    print(f"images {indices.tolist()}: {selection}")
    x, labels = test_x[indices].to(device), test_y[indices]  # (B, 3, 32, 32), (B,)

    # simplify: z_sim from the priors' mode, Adam on Alg. 1/2's loss (Sec. 5, S4)
    z_sim, start_point = simplify(cfg, model, glow_model, x, log, resuming)

    # final evaluation: predictions and bpd of the originals, the start point and the
    # simplified 8-bit images
    result = predictions_and_bpd(model, glow_model, x, z_sim)
    names = info.class_names
    images = per_image_results(indices, labels, names, start_point, result)
    results = dict(
        kept_prediction_rate=sum(im["pred_original"] == im["pred_simplified"] for im in images) / len(images),
        mean_bpd_original=sum(im["bpd_original"] for im in images) / len(images),
        mean_bpd_start=sum(im["bpd_start"] for im in images) / len(images),
        mean_bpd_simplified=sum(im["bpd_simplified"] for im in images) / len(images),
        classifier_test_acc=test_acc, algorithm=cfg.algorithm, steps=cfg.steps,
        lambda_sim=cfg.lambda_sim, selection=selection, class_names=names,
        seconds=time.time() - start, images=images)

    # save: results.json, simplified.pt and a PNG of (original, start, simplified) triples
    nets.check_finite(results, f"the run in {cfg.out}")  # before: a failed run has no results
    nets.write_json(cfg.out / "results.json", results)
    nets.atomic_save(dict(indices=indices, labels=labels, originals=datasets.to_uint8(x).cpu(),
                          images=datasets.to_uint8(result["x_sim"]).cpu(),
                          latents=[z.detach().cpu() for z in z_sim],
                          class_names=names), cfg.out / "simplified.pt")
    save_triples(x, start_point, result, images, names, cfg.out / "simplified.png")
    print(f"kept prediction {results['kept_prediction_rate']:.2f}, mean bpd original "
          f"{results['mean_bpd_original']:.3f} -> simplified {results['mean_bpd_simplified']:.3f} "
          f"(start {results['mean_bpd_start']:.3f}; {results['seconds']:.0f} s) -> {cfg.out}")
    return results


if __name__ == "__main__":
    nets.console()  # before --help: its text has λ
    args = get_args()
    try:
        main(args)
    except (datasets.DatasetError, nets.CheckpointError, glow.GlowCheckpointError,
            nets.RunError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (nets.console)
        print(nets.interrupted(resolve_config(args).out), file=sys.stderr)
        sys.exit(130)
