"""Dataset condensation with simplification (SimpleBits, Sec. 4, Eq. 6-7, Fig. 6, S10).

Condenses a training set into `ipc` synthetic images per class by gradient matching
(Zhao et al. 2021, "Dataset condensation with gradient matching") and, at the same time,
makes those images simple: their code length under a frozen Glow (bits per dimension)
is added to the matching loss with weight λ. The condensed set is evaluated the DC way:
fresh ConvNets are trained on it and tested on the real test set (mean ± std), next to
the same number of randomly chosen real images per class.

    # CPU quick start (~3-4 min, pretrains a tiny Glow on the fly), then the same without
    # the simplification term (λ = 0, plain DC), scored by the same cached quick Glow
    python condense.py --dataset shapes --quick
    python condense.py --dataset shapes --quick --lambda-sim 0
    # the paper's setting on a GPU (Fig. 6): CIFAR-10, 1 image per class, λ sweep
    python condense.py --dataset cifar10 --ipc 1 --lambda-sim 20 --glow glow-cifar10.pt
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import datasets
import glow
import nets


# Presets: the paper's setting (DC and the authors' code), and a CPU-sized one for --quick: one
# image update per fresh network, as DC does for ipc 1 (DC's (10, 50) loops for ipc 10 cost
# ~15x more per iteration, too slow for a CPU demo). outer/inner None: DC's get_loops(ipc).
# Any flag given explicitly wins.
FULL = dict(train_size=None, test_size=None, iterations=1000, batch_real=256, width=128,
            num_eval=5, eval_epochs=300, eval_at="0,500,1000", outer_loop=None, inner_loop=None)
QUICK = dict(train_size=2000, test_size=1000, iterations=400, batch_real=64, width=32,
             num_eval=3, eval_epochs=100, eval_at="", outer_loop=1, inner_loop=1)
# --resume may condense longer, evaluate elsewhere, and chunk the bpd term differently
RESUMABLE = ("iterations", "eval_at", "bpd_chunk")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=nets.HelpFormatter)
    nets.add_run_flags(p, datasets.DATASET_NAMES, QUICK, may_change=RESUMABLE,
                       out="runs/condense-<dataset>-ipc<ipc>-lam<λ>-seed<seed>[-quick]")
    # condensation (Sec. 4; the authors' repository, a fork of DC)
    p.add_argument("--ipc", type=nets.positive_int, default=10,
                   help="synthetic images per class (paper: 1 and 10)")
    p.add_argument("--iterations", type=int, default=None,
                   help="outer iterations, each with a fresh random ConvNet (default 1000; "
                        "quick 400)")
    p.add_argument("--outer-loop", type=nets.positive_int, default=None,
                   help="image updates per fresh ConvNet (default DC's get_loops: ipc 1 -> 1, "
                        "10 -> 10, 50 -> 50; quick 1)")
    p.add_argument("--inner-loop", type=nets.positive_int, default=None,
                   help="ConvNet epochs on the synthetic set between image updates (default "
                        "DC's: ipc 1 -> 1, 10 -> 50, 50 -> 10; quick 1)")
    p.add_argument("--lambda-sim", type=nets.finite_float, default=50.0,
                   help="simplification weight λ in L = Σ_c D_c + λ·mean bpd(X_syn), Eq. 7 "
                        "(ours = authors' λ·max(N//50,1)/(5C))")
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
                   help="epochs of each evaluation ConvNet, lr ÷10 at half (default 300; "
                        "quick 100)")
    p.add_argument("--eval-at", default=None,
                   help="comma-separated iterations to evaluate at; the last one always is "
                        "(default 0,500,1000; quick only the last)")
    args = p.parse_args(argv)
    if (args.iterations is not None and args.iterations < 0) or args.lambda_sim < 0:
        p.error("--iterations and --lambda-sim must not be negative.")
    if args.eval_at is not None and not all(v.strip().isdigit() for v in args.eval_at.split(",")
                                            if v.strip()):
        p.error(f"--eval-at must be comma-separated iterations, got {args.eval_at!r}.")
    return args


def resolve_config(args):
    """Quick-sensitive defaults, resolved once into a new namespace; args is never changed."""
    preset = QUICK if args.quick else FULL
    cfg = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in preset.items()}
    outer_loop, inner_loop = get_loops(args.ipc)
    cfg["outer_loop"] = cfg["outer_loop"] or outer_loop
    cfg["inner_loop"] = cfg["inner_loop"] or inner_loop
    at = {int(v) for v in cfg["eval_at"].split(",") if v.strip()}
    cfg["eval_at"] = {i for i in at if i <= cfg["iterations"]} | {cfg["iterations"]}
    name = Path(args.dataset).name
    cfg["out"] = Path(args.out or f"runs/condense-{name}-ipc{args.ipc}-lam{args.lambda_sim:g}"
                                  f"-seed{args.seed}" + ("-quick" if args.quick else ""))
    return argparse.Namespace(**{**vars(args), **cfg})


def get_loops(ipc):
    """(outer_loop, inner_loop) of DC's `get_loops`: image updates per network, and the
    network's epochs on the synthetic set between them. DC defines 1, 10, 20, ..., 50;
    for other ipc we keep outer = ipc and inner ≈ 500/ipc, the rule behind DC's table."""
    table = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
    return table.get(ipc, (ipc, max(1, round(500 / ipc))))


def make_convnet(num_classes, width, device):
    """A fresh randomly initialised DC ConvNet (depth 3, instance norm), seeded by the
    global RNG. mean 0.5, std 1 gives the input x − 0.5, the authors' glow-range input
    x·255/256 − 0.5 up to 0.4% (the authors' repository feeds the classifier that input)."""
    return nets.ConvNet(num_classes, width=width, depth=3,
                        mean=(0.5,) * 3, std=(1.0,) * 3).to(device)


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


def class_match_loss(net, x_real, x_syn, label):
    """Eq. 6 for one class c: D(∇θ l(f(X_real,c), c), ∇θ l(f(X_syn,c), c)).

    The real gradient is a constant target (detached); the synthetic gradient keeps its
    graph (create_graph=True) so that D can be differentiated w.r.t. the synthetic images.
    """
    params = list(net.parameters())
    y_real = torch.full((len(x_real),), label, dtype=torch.long, device=x_real.device)
    y_syn = torch.full((len(x_syn),), label, dtype=torch.long, device=x_syn.device)
    g_real = torch.autograd.grad(F.cross_entropy(net(x_real), y_real), params)
    g_real = [g.detach() for g in g_real]
    g_syn = torch.autograd.grad(F.cross_entropy(net(x_syn), y_syn), params, create_graph=True)
    return gradient_match_loss(g_real, g_syn)


def sample_real(real_by_class, c, batch_real):
    """A random batch of up to `batch_real` real images of class c (global RNG, on CPU so
    that the draw does not depend on the device)."""
    x = real_by_class[c]
    return x[torch.randperm(len(x))[:batch_real].to(x.device)]


def matching_loss(net, x_syn, real_by_class, ipc, batch_real):
    """Σ_c D_c of Eq. 6-7: the gradient-matching distance of every class, each against a
    fresh random batch of that class's real images. x_syn (N, 3, 32, 32) is class-major,
    ipc images per class."""
    return sum(class_match_loss(net, sample_real(real_by_class, c, batch_real),
                                x_syn[c * ipc:(c + 1) * ipc], c)
               for c in range(len(real_by_class)))


def simplicity_grad(glow_model, alpha, bpd_chunk):
    """Mean bpd of X_syn = synthetic_images(α) (Eq. 1) and its gradient w.r.t. α, computed
    `bpd_chunk` images at a time, so that Glow's saved activations (~44 MiB per image at
    the released size) stay bounded whatever the number of synthetic images; the authors
    backpropagated chunks of 50. The dequantization noise is drawn once for the whole set,
    so the result equals the one-graph computation (the same numbers, the same draws)."""
    x_syn = synthetic_images(alpha.detach())
    noise = torch.rand_like(x_syn) / glow.N_BINS  # u ~ U(0, 1/256), as bits_per_dim draws it
    bpd, grad = alpha.new_zeros(()), torch.zeros_like(alpha)
    for idx in torch.arange(len(alpha), device=alpha.device).split(bpd_chunk):
        chunk = alpha.detach()[idx].requires_grad_()
        part = glow.bits_per_dim(glow_model, synthetic_images(chunk), noise=noise[idx])
        part = part.sum() / len(alpha)  # this chunk's share of the mean
        grad[idx] = torch.autograd.grad(part, chunk)[0]
        bpd = bpd + part.detach()
    return bpd, grad


def condensation_grad(net, alpha, real_by_class, glow_model, *, lambda_sim, ipc, batch_real,
                      bpd_chunk):
    """The condensation objective with simplification, Eq. 7 (our λ, see the README):

        L = Σ_c D_c(X_real,c, X_syn,c) + λ · mean_{x ∈ X_syn} bpd(x),  X_syn = quantize(σ(α))

    and its gradient w.r.t. α. Eq. 7 adds Σ −log p_G(x_syn); we use the mean bpd (bits per
    dimension incl. the +8 of the 256-bin term), what the authors optimise. A non-finite
    bpd term is left out of L and of the gradient (authors' code), selected on the device
    without a host sync. Returns (∂L/∂α, L, Σ_c D_c, mean bpd; NaN when λ = 0 or left out).
    """
    match = matching_loss(net, synthetic_images(alpha), real_by_class, ipc, batch_real)
    grad = torch.autograd.grad(match, alpha)[0]
    if lambda_sim == 0:  # plain DC: Glow is not needed
        return grad, match.detach(), match.detach(), match.new_tensor(math.nan)
    bpd, bpd_grad = simplicity_grad(glow_model, alpha, bpd_chunk)
    use = torch.isfinite(bpd)  # a 0-dim bool on the device
    grad = grad + torch.where(use, lambda_sim * bpd_grad, 0.0)
    loss = match.detach() + torch.where(use, lambda_sim * bpd, 0.0)
    return grad, loss, match.detach(), torch.where(use, bpd, math.nan)


def synthetic_images(alpha):
    """X_syn = quantize(sigmoid(α)): straight-through 8-bit rounding, so the classifier
    and Glow both see an actual 8-bit image and gradients reach α unchanged. The
    classifier gets this image without dequantization noise, like the real images (the
    authors also fed it the +U(0, 1/255) noise); only Glow adds noise, in bits_per_dim.
    The saved synthetic.pt therefore holds exactly what the evaluation nets train on."""
    return glow.quantize(torch.sigmoid(alpha))


def train_network(net, optimizer, x, y, epochs, batch_size):
    """Plain minibatch training on (x, y) for `epochs` epochs (no augmentation)."""
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(batch_size):
            idx = idx.to(x.device)
            loss = F.cross_entropy(net(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def outer_iteration(alpha, optimizer, real_by_class, glow_model, *, lambda_sim, ipc,
                    batch_real, width, outer_loop, inner_loop, batch_size, bpd_chunk):
    """One outer iteration of DC with the simplification term: a fresh ConvNet; then
    `outer_loop` times: one Adam step on α minimising Eq. 7, and (except after the last)
    `inner_loop` epochs of SGD (lr 0.01, momentum 0.5) of the net on the synthetic set.
    Returns the last step's loss, Σ_c D_c and mean bpd (None when left out)."""
    num_classes = len(real_by_class)
    labels = torch.arange(num_classes, device=alpha.device).repeat_interleave(ipc)
    net = make_convnet(num_classes, width, alpha.device)
    net_optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.5)
    for step in range(outer_loop):
        # update the synthetic images: minimise Eq. 7 w.r.t. α
        grad, loss, match, bpd = condensation_grad(
            net, alpha, real_by_class, glow_model, lambda_sim=lambda_sim, ipc=ipc,
            batch_real=batch_real, bpd_chunk=bpd_chunk)
        optimizer.zero_grad()
        alpha.grad = grad  # only α is updated here
        optimizer.step()
        if step == outer_loop - 1:
            break
        # update the network: inner_loop epochs on the current (detached) synthetic set
        train_network(net, net_optimizer, synthetic_images(alpha).detach(), labels,
                      inner_loop, batch_size)
    loss, match, bpd = torch.stack([loss, match, bpd]).tolist()  # one host sync
    return {"loss": loss, "match": match, "bpd": bpd if math.isfinite(bpd) else None}


@torch.no_grad()
def test_accuracy(net, x_test, y_test, batch_size=1000):
    net.eval()
    correct = sum((net(x).argmax(1) == y).sum().item()
                  for x, y in zip(x_test.split(batch_size), y_test.split(batch_size)))
    return correct / len(x_test)


def evaluate(x_train, y_train, x_test, y_test, *, num_classes, num_eval, epochs, width,
             batch_size, seed):
    """DC evaluation protocol (Sec. 4): `num_eval` fresh ConvNets, each trained on
    (x_train, y_train) with SGD lr 0.01, momentum 0.9, wd 5e-4, lr ÷10 at half the
    epochs; returns their test accuracies on the real test set. As in DC's
    `evaluate_synset`, the lr drop re-creates the optimizer, so the momentum restarts.
    Every evaluation (synthetic or random real, at any iteration) uses the same `seed`,
    hence the same network initialisations and batch orders."""
    device = x_train.device
    accs = []
    with nets.isolated_rng(device, seed):
        for _ in range(num_eval):
            net = make_convnet(num_classes, width, device)
            for epoch in range(epochs):
                if epoch in (0, epochs // 2):  # a fresh optimizer at lr 0.01, then at 0.001
                    lr = 0.01 if epoch == 0 else 0.001
                    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
                train_network(net, opt, x_train, y_train, 1, batch_size)
            accs.append(test_accuracy(net, x_test, y_test))
    return accs


@torch.no_grad()
def mean_bpd(glow_model, x, seed, batch_size=100):
    """Mean bpd of 8-bit images x (one dequantization draw from a seeded stream)."""
    with nets.isolated_rng(x.device, seed):
        return torch.cat([glow.bits_per_dim(glow_model, glow.quantize(b))
                          for b in x.split(batch_size)]).mean().item()


def mean_std(values):
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), t.std(correction=0).item()  # population std, as DC (np.std)


def save_grid(images, class_names, ipc, path):
    """Fig. 6 layout: one row per class (ipc > 1), or the whole set on one row (ipc = 1)."""
    captions = [class_names[i // ipc][:10] for i in range(len(images))]
    datasets.save_image_grid(images.cpu(), path, nrow=ipc if ipc > 1 else len(images),
                             captions=captions)


def save_checkpoint(path, iteration, alpha, optimizer, history):
    """Everything --resume needs in one atomic file: α, its Adam state, the RNG, the log."""
    cuda_rng = torch.cuda.get_rng_state(alpha.device) if alpha.device.type == "cuda" else None
    nets.atomic_save(dict(alpha=alpha.detach(), optimizer=optimizer.state_dict(),
                          iteration=iteration, history=history,
                          rng_cpu=torch.get_rng_state(), rng_cuda=cuda_rng), path)


def load_checkpoint(path, alpha, optimizer, iterations):
    """Restore what save_checkpoint wrote; returns (iteration, metrics history)."""
    try:
        ckpt = torch.load(path, map_location=alpha.device, weights_only=True)
    except Exception as e:  # truncated, empty, or not a torch file
        raise nets.CheckpointError(f"--resume: cannot read {path} ({type(e).__name__}); "
                                   "delete it to restart the run, or choose another --out.") from None
    if not isinstance(ckpt, dict) or not {"alpha", "optimizer", "iteration"} <= ckpt.keys():
        raise nets.CheckpointError(f"--resume: {path} is not a checkpoint of condense.py; "
                                   "choose another --out.")
    if ckpt["alpha"].shape != alpha.shape:
        raise nets.CheckpointError(f"{path} holds {len(ckpt['alpha'])} synthetic images, not "
                                   f"{len(alpha)}; use another --out or drop --resume.")
    if ckpt["iteration"] > iterations:
        raise nets.RunError(f"{path} is at iteration {ckpt['iteration']}, beyond --iterations "
                            f"{iterations}; raise --iterations to continue it.")
    with torch.no_grad():
        alpha.copy_(ckpt["alpha"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng_cpu"].cpu())
    if ckpt.get("rng_cuda") is not None and alpha.device.type == "cuda":
        torch.cuda.set_rng_state(ckpt["rng_cuda"].cpu(), alpha.device)
    print(f"resuming at iteration {ckpt['iteration']} from {path}", flush=True)
    return ckpt["iteration"], ckpt["history"]


def condense(cfg, alpha, optimizer, real_by_class, glow_model, evaluate_images, class_names,
             resuming):
    """Sec. 4: cfg.iterations outer iterations (Eq. 7), each with a fresh ConvNet; at the
    iterations in cfg.eval_at the DC evaluation, the bpd and a Fig. 6-style grid; a
    checkpoint every 10 iterations. Returns the last evaluation's accuracies."""
    ckpt_path, metrics_path = cfg.out / "checkpoint.pt", cfg.out / "metrics.jsonl"
    start, history = 0, []  # history: every metrics.jsonl row up to the checkpoint
    if resuming and ckpt_path.exists():
        start, history = load_checkpoint(ckpt_path, alpha, optimizer, cfg.iterations)
    nets.write_jsonl(metrics_path, history)  # rows after the checkpoint are dropped

    def log(row):
        history.append(row)
        nets.append_jsonl(metrics_path, row)

    labels = torch.arange(len(real_by_class), device=alpha.device).repeat_interleave(cfg.ipc)
    progress = nets.Progress(cfg.iterations - start, "condense")
    accs = []
    for it in range(start, cfg.iterations + 1):
        if it in cfg.eval_at:
            x_syn = synthetic_images(alpha).detach()
            accs = evaluate_images(x_syn, labels)
            acc, std = mean_std(accs)
            bpd = mean_bpd(glow_model, x_syn, cfg.seed)
            print(f"iteration {it}: test accuracy {100 * acc:.2f} ± {100 * std:.2f}% "
                  f"({cfg.num_eval} nets), bpd {bpd:.3f}", flush=True)
            log({"iteration": it, "test_acc_mean": acc, "test_acc_std": std, "bpd": bpd})
            save_grid(x_syn, class_names, cfg.ipc, cfg.out / "synthetic.png")
        if it == cfg.iterations:
            break
        t0 = time.time()
        metrics = outer_iteration(alpha, optimizer, real_by_class, glow_model,
                                  lambda_sim=cfg.lambda_sim, ipc=cfg.ipc,
                                  batch_real=cfg.batch_real, width=cfg.width,
                                  outer_loop=cfg.outer_loop, inner_loop=cfg.inner_loop,
                                  batch_size=cfg.batch_size, bpd_chunk=cfg.bpd_chunk)
        log({"iteration": it + 1, **metrics, "seconds": time.time() - t0})
        progress.update(1, **{k: v for k, v in metrics.items() if v is not None})
        if (it + 1) % 10 == 0:
            save_checkpoint(ckpt_path, it + 1, alpha, optimizer, history)
    progress.close()
    # with the last evaluation: a longer rerun keeps its row
    save_checkpoint(ckpt_path, cfg.iterations, alpha, optimizer, history)
    return accs


def main(args):
    cfg = resolve_config(args)
    print(vars(cfg), flush=True)
    resuming = nets.check_out(cfg.out, vars(args), cfg.resume, may_change=RESUMABLE)
    nets.seed_everything(cfg.seed)
    device = nets.resolve_device(cfg.device)

    # data: the real training set grouped by class, on the device
    train_set, test_set = datasets.load_splits(cfg.dataset, cfg.data_root, cfg.train_size,
                                               cfg.test_size, cfg.seed)
    info = train_set.info
    x_train, y_train = datasets.to_tensors(train_set)
    x_test, y_test = (t.to(device) for t in datasets.to_tensors(test_set))
    real_by_class = [x_train[y_train == c].to(device) for c in range(info.num_classes)]
    empty = [info.class_names[c] for c, x in enumerate(real_by_class) if len(x) == 0]
    if empty:
        raise nets.RunError(f"class {empty[0]} has no training images; raise --train-size.")

    # models: the frozen Glow that scores bpd, and the synthetic images X = sigmoid(α)
    made_from = dict(dataset=info.name, train_size=len(train_set), seed=cfg.seed)
    glow_model = glow.get_glow(cfg.glow, cfg.quick, train_set,
                               glow.quick_glow_path(cfg.out, made_from), device, made_from)
    nets.write_json(cfg.out / "args.json", vars(args))  # the run starts here
    alpha = (0.2 * torch.randn(info.num_classes * cfg.ipc, 3, 32, 32)).to(device)  # grey ≈ 0.5
    alpha.requires_grad_()

    # optimizer of the images (authors: Adam lr 0.1, betas (0.5, 0.99), eps 1e-6)
    optimizer = torch.optim.Adam([alpha], lr=0.1, betas=(0.5, 0.99), eps=1e-6)

    # condense, evaluating with fresh networks at cfg.eval_at
    def evaluate_images(x, y):
        return evaluate(x, y, x_test, y_test, num_classes=info.num_classes,
                        num_eval=cfg.num_eval, epochs=cfg.eval_epochs, width=cfg.width,
                        batch_size=cfg.batch_size, seed=cfg.seed)

    print(f"condensing {cfg.dataset} to {cfg.ipc} image(s) per class: {cfg.iterations} "
          f"iterations, loops (outer, inner) = ({cfg.outer_loop}, {cfg.inner_loop}), "
          f"λ = {cfg.lambda_sim:g}, {len(x_train)} real images, device {device}", flush=True)
    accs = condense(cfg, alpha, optimizer, real_by_class, glow_model, evaluate_images,
                    info.class_names, resuming)

    # final evaluation: the same number of random real images per class, same protocol
    gen = torch.Generator().manual_seed(cfg.seed)
    x_random = torch.cat([x[torch.randperm(len(x), generator=gen)[:cfg.ipc].to(device)]
                          for x in real_by_class])  # (≤ C·ipc, 3, 32, 32), class-major
    y_random = torch.cat([torch.full((min(cfg.ipc, len(x)),), c, device=device)
                          for c, x in enumerate(real_by_class)])
    random_accs = evaluate_images(x_random, y_random)
    real_sample = x_train[torch.randperm(len(x_train), generator=gen)[:500]].to(device)

    # save
    x_syn = synthetic_images(alpha).detach()
    acc, std = mean_std(accs)
    random_acc, random_std = mean_std(random_accs)
    results = {
        "ipc": cfg.ipc, "lambda_sim": cfg.lambda_sim, "iterations": cfg.iterations,
        "test_acc_mean": acc, "test_acc_std": std, "test_accs": accs,
        "random_real_acc_mean": random_acc, "random_real_acc_std": random_std,
        "random_real_accs": random_accs,
        "bpd_synthetic": mean_bpd(glow_model, x_syn, cfg.seed),
        "bpd_random_real": mean_bpd(glow_model, x_random, cfg.seed),
        "bpd_real": mean_bpd(glow_model, real_sample, cfg.seed),
    }
    labels = torch.arange(info.num_classes).repeat_interleave(cfg.ipc)
    nets.atomic_save({"images": x_syn.cpu(), "labels": labels,
                      "class_names": info.class_names}, cfg.out / "synthetic.pt")
    save_grid(x_syn, info.class_names, cfg.ipc, cfg.out / "synthetic.png")
    save_grid(x_random, info.class_names, cfg.ipc, cfg.out / "random_real.png")
    nets.write_json(cfg.out / "results.json", results)
    nets.check_finite(results, f"the run in {cfg.out}")
    print(f"condensed ({cfg.ipc}/class): {100 * acc:.2f} ± {100 * std:.2f}%, bpd "
          f"{results['bpd_synthetic']:.3f} | random real: {100 * random_acc:.2f} ± "
          f"{100 * random_std:.2f}%, bpd {results['bpd_random_real']:.3f} | "
          f"real training images: bpd {results['bpd_real']:.3f} -> {cfg.out}")
    return results


if __name__ == "__main__":
    args = get_args()
    try:
        main(args)
    except (datasets.DatasetError, nets.CheckpointError, glow.GlowCheckpointError,
            nets.RunError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"interrupted: the same command with --resume continues the run in "
              f"{resolve_config(args).out} from its last checkpoint (every 10 iterations).",
              file=sys.stderr)
        sys.exit(130)
