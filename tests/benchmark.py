"""Speed benchmarks, run by hand (not collected by pytest):

    python tests/benchmark.py --device cuda --full --compile   # the GPU check: every mode,
                                                               # every figure, eager vs compiled
    MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000 \
        python tests/benchmark.py glow --device cpu --threads 1 --compile --y0ast Glow-PyTorch
    python tests/benchmark.py data threads --device cpu

glow:         images/second of Glow scoring (bpd forward, and forward + backward to the
              input) at batch 32, small and (--full) the released K=32/hidden 512 Glow;
              eval, frozen in both memory layouts, with --compile frozen + torch.compile,
              and with --y0ast DIR y0ast's own code, in interleaved rounds; and the
              convolution bound (the frozen forward's convolutions alone, each at its
              best: no float32 path is faster) with each frozen path's share of it. On Linux,
              glibc's default malloc hands large freed tensors back to the system and
              page-faults them in again, by a process's allocation history: y0ast's code
              (many intermediate tensors) then runs at 150 or 210 img/s by chance, so
              compare with the two MALLOC_ settings above (level ground; README, Speed).
smoke:        every mode end to end on the device with tiny settings (the CUDA paths).
data:         ms per training batch of 32, item by item against datasets.Batches.
per_instance: one SimpleBits step at paper settings split into data, simplifier update,
              classifier update and Glow scoring, a plain classifier step, and the
              projected wall time of a 100-epoch CIFAR-10 run (tiny or --full Glow);
              with --compile the steps as --compile runs them, interleaved with eager.
condense:     seconds per outer iteration for ipc 1 and 10, with and without the bpd term,
              and the projected time of DC's evaluation (with and without its augmentation);
              with --compile each also as --compile runs it. With --versus-dc DIR (a
              checkout of VICO-UoE/DatasetCondensation at 53f63a6) instead: DC's own outer
              iteration against ours on the same tensors, interleaved in one process:
                  python tests/benchmark.py condense --device cpu --threads 1 --compile \
                      --versus-dc DatasetCondensation
posthoc:      seconds per Alg. 2 step (with --compile also compiled); torch.func
              per-example gate gradients vs a loop.
threads:      the quick demos' loops with 1 or 2 CPU threads, idle and beside a busy process.

Without names every benchmark but threads runs: on a GPU the first command above is the
one prepared check; it prints as it goes, and each benchmark's seconds.
"""
import argparse
import copy
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import condense  # noqa: E402
import glow  # noqa: E402
import nets  # noqa: E402
import per_instance  # noqa: E402
import posthoc  # noqa: E402

ROUNDS = 5  # glow: interleaved rounds of every scorer; medians over them


def timed(fn, device, repeats, warmup=2):
    """Median seconds per call after `warmup` warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def y0ast_glow(folder, config, device):
    """y0ast's own Glow (model.py of a checkout of y0ast/Glow-PyTorch in `folder`) at our
    `config`, ActNorm marked initialised, frozen for scoring; its forward takes the input
    in [−0.5, 0.5], adds the dequantisation noise itself and returns bpd as `nll`."""
    sys.path.insert(0, os.path.abspath(folder))
    torch.qr = lambda a: torch.linalg.qr(a)  # removed from torch; y0ast calls it at init
    import model as y0ast_model
    model = y0ast_model.Glow((32, 32, 3), config["hidden"], config["steps"], config["levels"],
                             1.0, "invconv", "affine", True, 10, True, False)
    for module in model.modules():
        if hasattr(module, "inited"):
            module.inited = True
    return model.to(device).eval().requires_grad_(False)


def convolution_seconds(model, x, repeats):
    """The convolution bound of one bpd forward + backward to the input: every convolution
    that forward runs, recorded, then timed alone at its best (forward, and backward to its
    input where that needs a gradient) on an input of the same shape in the layout the
    model's weights are stored in, and summed. No path that runs these convolutions in
    float32 can be faster; what a path takes beyond it is all its other work."""
    calls = []

    class Record(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.conv2d:
                calls.append((args, kwargs or {}))
            return func(*args, **(kwargs or {}))

    with Record():
        glow.bits_per_dim(model, x.clone().requires_grad_())
    layout = (torch.channels_last if model.flow.layers[1].block[0].weight.is_contiguous(
        memory_format=torch.channels_last) else torch.contiguous_format)
    total = 0.0
    for (inp, *rest), kwargs in calls:
        needs_grad = inp.requires_grad
        inp = torch.randn(inp.shape, device=inp.device).to(memory_format=layout)
        out_grad = torch.nn.functional.conv2d(inp, *rest, **kwargs).normal_()
        inp.requires_grad_(needs_grad)

        def convolution(inp=inp, rest=rest, kwargs=kwargs, out_grad=out_grad):
            out = torch.nn.functional.conv2d(inp, *rest, **kwargs)
            if inp.requires_grad:
                torch.autograd.grad(out, inp, out_grad)
        for _ in range(2):
            convolution()
        best = float("inf")
        for _ in range(repeats):
            _sync(x.device)
            start = time.perf_counter()
            convolution()
            _sync(x.device)
            best = min(best, time.perf_counter() - start)
        total += best
    return total, len(calls)


def bench_glow(device, full=False, batch=32, repeats=5, y0ast=None, compile=False):
    """bpd forward and forward + backward to the input, images per second: our Glow in eval
    mode and frozen (glow.freeze), with `compile` also the frozen one torch.compile'd (the
    mode scripts' --compile; the compile time is printed), and with `y0ast` (a checkout of
    y0ast/Glow-PyTorch) y0ast's own code at the same size, in the same run."""
    configs = [dict(levels=3, steps=8, hidden=128)]
    if full:
        configs.append(dict(levels=3, steps=32, hidden=512))
    for config in configs:
        torch.manual_seed(0)
        model = glow.Glow(**config).to(device)
        x = torch.rand(batch, 3, 32, 32, device=device)
        model.train()
        with torch.no_grad():
            model(glow.to_glow_range(x))  # ActNorm data init
        frozen = glow.freeze(model)  # channels_last on a CPU; both layouts are timed
        chosen = ("channels_last" if frozen.flow.layers[1].block[0].weight.is_contiguous(
            memory_format=torch.channels_last) else "default layout")
        layouts = {"channels_last": torch.channels_last, "default layout": torch.contiguous_format}
        models = {"eval (unfused)": model.eval().requires_grad_(False)}
        for name, layout in layouts.items():
            models[f"frozen (fused, {name}{', what freeze gives' if name == chosen else ''})"] = \
                copy.deepcopy(frozen).to(memory_format=layout)
        scores = {name: (lambda x, m=m: glow.bits_per_dim(m, x)) for name, m in models.items()}
        if compile:
            fast, start = glow.compiled(frozen), time.perf_counter()
            x_grad = x.clone().requires_grad_()
            glow.bits_per_dim(fast, x_grad).sum().backward()  # compiles forward and backward
            with torch.no_grad():
                glow.bits_per_dim(fast, x)  # and the no-grad forward
            _sync(device)
            print(f"glow {config} frozen + torch.compile: compiled in "
                  f"{time.perf_counter() - start:.0f} s  [{device}]")
            scores["frozen + compile"] = lambda x: glow.bits_per_dim(fast, x)
        if y0ast:
            if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
                print("glow: note: without MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ "
                      "set (see this file's docstring), y0ast's code may page-fault its "
                      "tensors in: its speed, and the ratios, then vary from run to run")
            theirs = y0ast_glow(y0ast, config, device)
            scores["y0ast's code"] = lambda x: theirs(glow.to_glow_range(x))[1]
        rounds = {name: [] for name in scores}  # interleaved: a slow spell hits all alike
        bound = []  # seconds: the frozen path's convolutions alone (convolution_seconds)
        for _ in range(ROUNDS):
            seconds, count = convolution_seconds(frozen, x, repeats)
            bound.append(seconds)
            for name, score in scores.items():
                def forward(score=score):
                    with torch.no_grad():
                        score(x)

                def forward_backward(score=score):
                    x_grad = x.clone().requires_grad_()
                    score(x_grad).sum().backward()
                rounds[name].append((batch / timed(forward, device, repeats),
                                     batch / timed(forward_backward, device, repeats)))
        rates = {}
        for name, values in rounds.items():
            fwd, rates[name] = (statistics.median(v) for v in zip(*values))
            print(f"glow {config} {name}: bpd forward {fwd:8.1f} img/s, "
                  f"forward+backward to input {rates[name]:8.1f} img/s  [{device}, batch "
                  f"{batch}, {torch.get_num_threads()} threads, median of {ROUNDS} "
                  f"interleaved rounds]")
        print(f"glow {config} convolution bound (its {count} convolutions alone, each at "
              f"its best): forward+backward to input {batch / statistics.median(bound):8.1f} "
              f"img/s")
        for name in [n for n in rates if n.startswith("frozen")]:  # each round's own ratio
            fractions = [b * seconds / batch for (_, b), seconds in zip(rounds[name], bound)]
            print(f"  {name}: {100 * statistics.median(fractions):.0f}% of the convolution "
                  f"bound, forward+backward (median of the rounds; "
                  f"{100 * min(fractions):.0f}-{100 * max(fractions):.0f}%)")
        if y0ast:  # each round's ratio: the two timings seconds apart, in the same spell
            reference = [b for _, b in rounds.pop("y0ast's code")]
            ratios = [batch / seconds / ref for seconds, ref in zip(bound, reference)]
            print(f"  convolution bound / y0ast's code, forward+backward: "
                  f"{statistics.median(ratios):.2f}x (rounds {min(ratios):.2f}-"
                  f"{max(ratios):.2f}x)")
            for name in [n for n in rates if n.startswith("frozen")]:
                ratios = [b / ref for (_, b), ref in zip(rounds[name], reference)]
                print(f"  {name} / y0ast's code, forward+backward: "
                      f"{statistics.median(ratios):.2f}x (median of the rounds' ratios; "
                      f"{min(ratios):.2f}-{max(ratios):.2f}x)")


def bench_per_instance(device, full=False, batch=32, repeats=5, compile=False):
    """The paper's networks (WRN-16-2 classifier, UNet ngf 64 simplifier) at batch 32.
    Glow: the quick tiny one (full=False) or the released size L3 K32 hidden 512 (full=True),
    at init (ActNorm data-initialised) -- its speed does not depend on its weights.
    "rest" = the SimpleBits step with λ = 0, where Glow is never called. With `compile`
    also the plain step and the SimpleBits step as --compile runs them."""
    glow_cfg = dict(levels=3, steps=32, hidden=512) if full else dict(glow.QUICK_GLOW)
    torch.manual_seed(0)
    g = glow.Glow(**glow_cfg).to(device)
    with torch.no_grad():
        g(glow.to_glow_range(torch.rand(64, 3, 32, 32, device=device)))  # ActNorm data init
    g = glow.freeze(g)
    classifier = nets.NFWideResNet(10).to(device)
    simplifier = nets.UNetSimplifier().to(device)
    opt_clf = nets.classifier_optimizer(classifier)
    opt_simp = torch.optim.Adam(simplifier.parameters(), lr=5e-4, betas=(0.5, 0.99), weight_decay=5e-5, fused=True)
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def plain():
        aug = nets.sample_crop_flip(batch, per_instance.PAD, True, device)
        per_instance.classifier_step(classifier, opt_clf, nets.crop_flip(x, aug, per_instance.PAD), y)

    def step(lambda_sim):
        return lambda: per_instance.simplebits_step(simplifier, classifier, opt_simp, opt_clf, g,
                                                    x, y, lambda_sim, True)

    def glow_scoring():  # bpd forward + backward to the input, as inside Eq. 5
        x_sim = x.clone().requires_grad_()
        glow.bits_per_dim(g, x_sim).mean().backward()

    def simplifier_update():  # Eq. 5 through the unrolled step, and its optimizer step
        aug = nets.sample_crop_flip(batch, per_instance.PAD, True, device)
        x_sim = glow.quantize(simplifier(x))
        loss, _ = per_instance.simplifier_loss(classifier, opt_clf, g, x, x_sim, y, aug, 2.0)
        per_instance.finite_step(opt_simp, loss, list(simplifier.parameters()))

    def classifier_update():  # f on the new simplified batch
        aug = nets.sample_crop_flip(batch, per_instance.PAD, True, device)
        with torch.no_grad():
            x_sim = glow.quantize(simplifier(x))
        per_instance.classifier_step(classifier, opt_clf, nets.crop_flip(x_sim, aug, per_instance.PAD), y)

    import datasets
    info = datasets.DatasetInfo("x", 10, [str(k) for k in range(10)], (0.5,) * 3, (0.25,) * 3)
    cifar = datasets.Batches(datasets.TensorImages(
        torch.randint(0, 256, (50000, 3, 32, 32), dtype=torch.uint8), torch.arange(50000) % 10,
        info), device)
    test_x = torch.rand(1000, 3, 32, 32)

    def evaluation_1000():  # what an evaluation does per 1000 test images (Fig. 3, Fig. 5)
        simplify = per_instance.simplification(SimpleNamespace(simplifier="unet"), simplifier)
        per_instance.simplified_test_metrics(classifier, simplify, g, dict(x=test_x, y=y.new_zeros(
            1000).cpu()), device)

    t_data = timed(lambda: cifar.get(torch.randint(50000, (batch,))), device, 5 * repeats)
    t_plain = timed(plain, device, repeats)
    t_rest = timed(step(0.0), device, repeats)
    t_glow = timed(glow_scoring, device, repeats)
    t_full = timed(step(2.0), device, repeats)
    t_simp = timed(simplifier_update, device, repeats)
    t_clf = timed(classifier_update, device, repeats)
    t_eval = timed(evaluation_1000, device, 2, warmup=1)
    steps = 50000 // batch
    total = 100 * steps * (t_data + t_full) + 20 * 10 * t_eval  # evaluations every 5 epochs
    print(f"per_instance [{device}, batch {batch}, threads {torch.get_num_threads()}, "
          f"Glow {glow_cfg}]")
    print(f"  data: a CIFAR-size batch      {t_data * 1e3:9.2f} ms")
    print(f"  SimpleBits step, λ = 2       {t_full * 1e3:9.1f} ms")
    print(f"    simplifier update (Eq. 5)  {t_simp * 1e3:9.1f} ms")
    print(f"    classifier update          {t_clf * 1e3:9.1f} ms")
    print(f"    Glow scoring (fwd+bwd)     {t_glow * 1e3:9.1f} ms")
    print(f"    rest (same step, λ = 0)    {t_rest * 1e3:9.1f} ms  = {t_rest / t_plain:.1f}x plain "
          f"(target <= 8x)")
    print(f"  plain classifier step        {t_plain * 1e3:9.1f} ms")
    print(f"  evaluation per 1000 images   {t_eval:9.2f} s")
    print(f"  projected CIFAR-10 run (100 epochs x {steps} steps, 20 evaluations of 10k images): "
          f"{total / 3600:.1f} h")
    if compile:  # --compile: the frozen Glow's scoring and the classifier's plain step
        fast, start = nets.compiled(classifier), time.perf_counter()
        fast_glow = glow.compiled(g)
        per_instance.simplebits_step(simplifier, classifier, opt_simp, opt_clf, fast_glow, x, y,
                                     2.0, True, fast)  # compiles both
        print(f"  --compile (compiled in {time.perf_counter() - start:.0f} s):")

        def fast_plain():
            aug = nets.sample_crop_flip(batch, per_instance.PAD, True, device)
            per_instance.classifier_step(fast, opt_clf, nets.crop_flip(x, aug, per_instance.PAD), y)
        def fast_full():
            per_instance.simplebits_step(simplifier, classifier, opt_simp, opt_clf, fast_glow,
                                         x, y, 2.0, True, fast)
        # eager and compiled in interleaved rounds (medians): a slow spell hits both alike
        rounds = {name: [] for name in ("full", "fast full", "plain", "fast plain")}
        for _ in range(3):
            for name, fn in (("full", step(2.0)), ("fast full", fast_full), ("plain", plain),
                             ("fast plain", fast_plain)):
                rounds[name].append(timed(fn, device, repeats, warmup=1))
        t = {name: sorted(values)[1] for name, values in rounds.items()}
        print(f"    SimpleBits step, λ = 2     {t['fast full'] * 1e3:9.1f} ms  "
              f"({t['full'] / t['fast full']:.2f}x eager, {t['full'] * 1e3:.1f} ms interleaved)")
        print(f"    plain classifier step      {t['fast plain'] * 1e3:9.1f} ms  "
              f"({t['plain'] / t['fast plain']:.2f}x eager, {t['plain'] * 1e3:.1f} ms interleaved)")
    return dict(plain=t_plain, full=t_full, glow=t_glow, rest=t_rest, ratio=t_rest / t_plain)


def bench_condense(device, full=False, repeats=2, compile=False):
    """full=False: CPU-sized (5 classes, ConvNet width 32, 32 real images per class and
    step, the quick tiny Glow); full=True: the paper's setting (10 classes, width 128,
    batch_real 256, Glow L3 K32 hidden 512). Loop counts are DC's (ipc 10: 10 × 50).
    With `compile` each figure also as --compile runs it (its networks' first-order steps
    and the Glow compiled; the compile itself is left out of the timing)."""
    if full:
        classes, width, batch_real, glow_cfg = 10, 128, 256, dict(levels=3, steps=32, hidden=512)
    else:
        classes, width, batch_real, glow_cfg = 5, 32, 32, dict(glow.QUICK_GLOW)
    torch.manual_seed(0)
    g = glow.Glow(**glow_cfg).to(device)
    with torch.no_grad():
        g(glow.to_glow_range(torch.rand(64, 3, 32, 32, device=device)))  # ActNorm data init
    g = glow.freeze(g)
    real = [torch.rand(500, 3, 32, 32, device=device) for _ in range(classes)]
    results = {}
    for ipc in (1, 10):
        outer_loop, inner_loop = condense.get_loops(ipc)
        for lambda_sim in (0.0, 1.0):
            for fast in (False, True)[:1 + compile]:
                alpha = 0.2 * torch.randn(classes * ipc, 3, 32, 32, device=device)
                alpha.requires_grad_()
                opt = torch.optim.Adam([alpha], lr=0.1, betas=(0.5, 0.99), eps=1e-6)
                scorer = glow.compiled(g) if fast else g

                def iteration():
                    condense.outer_iteration(alpha, opt, real, scorer, lambda_sim=lambda_sim,
                                             ipc=ipc, batch_real=batch_real, width=width,
                                             outer_loop=outer_loop, inner_loop=inner_loop,
                                             batch_size=256, bpd_chunk=50, compile=fast)

                results[ipc, lambda_sim, fast] = timed(iteration, device, repeats, warmup=1)
        for fast in (False, True)[:1 + compile]:
            plain, simple = results[ipc, 0.0, fast], results[ipc, 1.0, fast]
            print(f"condense ipc {ipc:2d}{' --compile' if fast else ''} (loops {outer_loop}x"
                  f"{inner_loop}, {classes} classes, width {width}, batch_real {batch_real}, "
                  f"Glow {glow_cfg}): plain DC {plain:7.3f} s/iter, with bpd term {simple:7.3f} "
                  f"s/iter (+{100 * (simple / plain - 1):.0f}%)  [{device}]")
    # DC's evaluation: one network's epoch on the condensed set, and the projected time of
    # a full evaluation (5 networks; 301 epochs, or 1001 with MNIST's augmentation)
    x_test, y_test = torch.rand(1000, 3, 32, 32, device=device), torch.arange(1000) % classes
    for ipc in (1, 10):
        x, y = torch.rand(classes * ipc, 3, 32, 32, device=device), torch.arange(classes * ipc) % classes
        for augment in (False, True):
            for fast in (False, True)[:1 + compile]:
                def evaluation(x=x, y=y, augment=augment, fast=fast):  # 10 (+ 1) epochs, a test
                    condense.evaluate_synset([(x, y)], x_test, y_test.to(device),
                                             num_classes=classes, epochs=10, width=width,
                                             batch_size=256, seed=0, augment=augment,
                                             compile=fast)
                epoch = timed(evaluation, device, repeats, warmup=1) / 11
                epochs = 1001 if augment else 301
                results["eval", ipc, augment, fast] = epoch
                print(f"condense evaluation ipc {ipc:2d}{' + DC augmentation' if augment else ''}"
                      f"{' --compile' if fast else ''}: {1000 * epoch:7.1f} ms/epoch, {epochs} "
                      f"epochs x 5 networks = {5 * epochs * epoch / 60:5.1f} min per evaluation"
                      f"  [{device}]")
    return results


def dc_loop_body(folder, ipc, outer_loop, inner_loop, real, batch_real, device):
    """DC's own outer iteration (main.py of a checkout of VICO-UoE/DatasetCondensation in
    `folder`, 53f63a6, method DC, `dis_metric='ours'`), written as its loop body: a fresh
    `get_network('ConvNet', ...)`; `outer_loop` times: per class a real batch
    (`get_images`), its gradient, the synthetic gradient (create_graph) and `match_loss`,
    then SGD on the images; between them `inner_loop` epochs of `epoch('train', ...)` on
    the synthetic set. Returns a function that runs one such iteration."""
    import types
    import numpy as np
    sys.path.insert(0, os.path.abspath(folder))
    try:
        import scipy.ndimage.interpolation  # noqa: F401  (DC's utils imports it for rotate)
    except ImportError:  # only its DSA/augment paths use scipy; the loop body does not
        stub = types.ModuleType("scipy.ndimage.interpolation")
        stub.rotate = None
        sys.modules.update({"scipy": types.ModuleType("scipy"),
                            "scipy.ndimage": types.ModuleType("scipy.ndimage"),
                            "scipy.ndimage.interpolation": stub})
    import utils as dc
    num_classes = len(real)
    args = SimpleNamespace(device=str(device), dis_metric="ours", dsa=False, batch_real=batch_real,
                           ipc=ipc, lr_net=0.01, batch_train=256, dc_aug_param=None)
    images_all = torch.cat(real)
    indices_class = [list(range(c * len(real[0]), (c + 1) * len(real[0])))
                     for c in range(num_classes)]
    image_syn = torch.randn(num_classes * ipc, 3, 32, 32, device=device, requires_grad=True)
    label_syn = torch.arange(num_classes, device=device).repeat_interleave(ipc)
    optimizer_img = torch.optim.SGD([image_syn], lr=0.1, momentum=0.5)
    criterion = torch.nn.CrossEntropyLoss().to(device)

    def get_images(c, n):
        return images_all[np.random.permutation(indices_class[c])[:n]]

    def iteration():
        net = dc.get_network("ConvNet", 3, num_classes, (32, 32)).to(device)
        net.train()
        net_parameters = list(net.parameters())
        optimizer_net = torch.optim.SGD(net.parameters(), lr=args.lr_net)
        for ol in range(outer_loop):
            loss = torch.tensor(0.0).to(device)
            for c in range(num_classes):
                img_real = get_images(c, batch_real)
                lab_real = torch.ones((img_real.shape[0],), device=device, dtype=torch.long) * c
                img_syn = image_syn[c * ipc:(c + 1) * ipc]
                lab_syn = torch.ones((ipc,), device=device, dtype=torch.long) * c
                gw_real = torch.autograd.grad(criterion(net(img_real), lab_real), net_parameters)
                gw_real = [g.detach().clone() for g in gw_real]
                gw_syn = torch.autograd.grad(criterion(net(img_syn), lab_syn), net_parameters,
                                             create_graph=True)
                loss += dc.match_loss(gw_syn, gw_real, args)
            optimizer_img.zero_grad()
            loss.backward()
            optimizer_img.step()
            loss.item()
            if ol == outer_loop - 1:
                break
            dst = torch.utils.data.TensorDataset(image_syn.detach().clone(), label_syn.clone())
            loader = torch.utils.data.DataLoader(dst, batch_size=args.batch_train, shuffle=True,
                                                 num_workers=0)
            for _ in range(inner_loop):
                dc.epoch("train", loader, net, optimizer_net, criterion, args, aug=False)
    return iteration


def bench_condense_versus_dc(device, folder, rounds=3, compile=False, ipcs=(1, 10)):
    """DC's own outer iteration (dc_loop_body) against condense.outer_iteration on the same
    tensors (10 classes of 400 images 3×32×32, ConvNet width 128, batch_real 256, λ = 0), in
    interleaved rounds in one process; the ratio is the median of the rounds' ratios. ipc
    1 runs DC's loops 1×1; ipc 10 runs 2 of DC's 10 outer steps (two image updates and
    the 50 inner epochs between them: every outer step costs the same, so the ratio is
    that of the whole iteration, in a fifth of the time)."""
    torch.manual_seed(0)
    real = [torch.rand(400, 3, 32, 32, device=device) for _ in range(10)]
    for ipc in ipcs:
        outer_loop, inner_loop = min(condense.get_loops(ipc)[0], 2), condense.get_loops(ipc)[1]
        theirs = dc_loop_body(folder, ipc, outer_loop, inner_loop, real, 256, device)
        paths = {"default": False, "--compile": True} if compile else {"default": False}
        ours = {}
        for name, fast in paths.items():
            alpha = (0.2 * torch.randn(10 * ipc, 3, 32, 32, device=device)).requires_grad_()
            opt = torch.optim.Adam([alpha], lr=0.1, betas=(0.5, 0.99), eps=1e-6)
            ours[name] = lambda alpha=alpha, opt=opt, fast=fast: condense.outer_iteration(
                alpha, opt, real, None, lambda_sim=0.0, ipc=ipc, batch_real=256, width=128,
                outer_loop=outer_loop, inner_loop=inner_loop, batch_size=256, bpd_chunk=50,
                compile=fast)["loss"].item()
        for fn in [theirs, *ours.values()]:
            fn()  # warm-up (and --compile's compilation)
        times = {name: [] for name in ["DC", *ours]}
        for _ in range(rounds):
            for name, fn in [("DC", theirs), *ours.items()]:
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - start)
        what = (f"loops {outer_loop}x{inner_loop}" if outer_loop == condense.get_loops(ipc)[0]
                else f"{outer_loop} of {condense.get_loops(ipc)[0]} outer steps, {inner_loop} "
                     "inner epochs")
        print(f"condense versus DC, ipc {ipc} ({what}): DC's loop body "
              f"{statistics.median(times['DC']):.2f} s  [{device}]")
        for name in ours:
            ratios = [d / o for d, o in zip(times["DC"], times[name])]
            print(f"  {name:10s} {statistics.median(times[name]):7.2f} s: "
                  f"{statistics.median(ratios):.2f}x DC's speed (rounds {min(ratios):.2f}-"
                  f"{max(ratios):.2f}x)")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_posthoc(device, full=False, compile=False):
    """Seconds per Alg. 2 step (with `compile` also with the Glow's scoring compiled, as
    --compile runs it), and per-example gate gradients with torch.func against a loop."""
    configs = [("quick: NF-WRN-10-1, Glow L3 K4 h32, 8 images", dict(depth=10, widen=1), dict(glow.QUICK_GLOW), 8),
               ("paper: NF-WRN-16-2, Glow L3 K32 h512, 32 images", dict(depth=16, widen=2),
                dict(levels=3, steps=32, hidden=512), 32)][:2 if full else 1]
    step_args = SimpleNamespace(scale_min=0.8, scale_max=0.95, algorithm=2, lambda_sim=1.0)
    for name, clf_cfg, glow_cfg, batch in configs:
        torch.manual_seed(0)
        model = nets.NFWideResNet(10, **clf_cfg).to(device).eval().requires_grad_(False)
        g = glow.Glow(**glow_cfg).to(device)
        with torch.no_grad():
            g(glow.to_glow_range(torch.rand(batch, 3, 32, 32, device=device)))  # ActNorm init
        g = glow.freeze(g)
        x = torch.rand(batch, 3, 32, 32, device=device)
        with torch.no_grad():
            h, z_orig = model(x), glow.encode(g, x)
        z_sim = [torch.zeros_like(z, requires_grad=True) for z in z_orig]
        optimizer = torch.optim.Adam(z_sim, lr=1e-2)
        repeats = 5 if device.type == "cuda" or batch <= 8 else 2

        def step(scorer=g):
            posthoc.simplify_step(model, scorer, z_sim, z_orig, x, h, optimizer, step_args)
        per_step = timed(step, device, repeats, warmup=1)
        print(f"posthoc {name} on {device}: {per_step:.3f} s/step "
              f"(5000 steps: {5000 * per_step / 60:.1f} min)", flush=True)
        if compile:  # --compile: the Glow's scoring compiled (the gate gradients cannot be)
            fast, start = glow.compiled(g), time.perf_counter()
            step(fast)
            compile_s = time.perf_counter() - start
            eager, compiled = [], []
            for _ in range(ROUNDS):  # interleaved: a slow spell hits both alike
                eager.append(timed(step, device, repeats, warmup=1))
                compiled.append(timed(lambda: step(fast), device, repeats, warmup=1))
            ratios = [e / c for e, c in zip(eager, compiled)]
            print(f"  --compile (compiled in {compile_s:.0f} s): "
                  f"{statistics.median(compiled):.3f} s/step against eager "
                  f"{statistics.median(eager):.3f} in {ROUNDS} interleaved rounds "
                  f"({statistics.median(ratios):.2f}x; rounds {min(ratios):.2f}-"
                  f"{max(ratios):.2f}x)", flush=True)

        # per-example gate gradients: torch.func (vmap over grad) vs a Python loop
        params = {n: p.detach() * 0.9 for n, p in model.named_parameters()}
        buffers = dict(model.named_buffers())
        times = {}
        for method in ("vmap", "loop"):
            _sync(device)
            start = time.perf_counter()
            if method == "vmap":
                posthoc.gate_gradients(model, params, buffers, x, h)
            else:
                for i in range(batch):
                    p = {n: v.clone().requires_grad_(True) for n, v in params.items()}
                    out = torch.func.functional_call(model, (p, buffers), (x[i:i + 1],))
                    torch.autograd.grad(posthoc.kl_divergence(h[i:i + 1], out).sum(), list(p.values()))
            _sync(device)
            times[method] = time.perf_counter() - start
        print(f"  gate gradients of {batch} images: vmap {times['vmap']:.3f} s, loop {times['loop']:.3f} s",
              flush=True)


def bench_data(device, full=False, batch=32, repeats=200):
    """ms to build one training batch of 32: item by item (a DataLoader over the dataset's
    items, the old path) against datasets.Batches (indexing on the device), for CIFAR-size
    data in memory and for the composites, on random stand-in images (no download)."""
    import datasets
    from torch.utils.data import DataLoader
    torch.manual_seed(0)
    info = datasets.DatasetInfo("x", 10, [str(k) for k in range(10)], (0.5,) * 3, (0.25,) * 3)

    def images(n, channels):
        return datasets.TensorImages(torch.randint(0, 256, (n, channels, 32, 32), dtype=torch.uint8),
                                     torch.arange(n) % 10, info)
    mnist, fashion, cifar = images(60000, 1), images(60000, 1), images(50000, 3)
    cases = {"cifar10-size, in memory": cifar}
    for kind, target, other in (("mnist-fashion", mnist, fashion), ("mnist-noise", mnist, None),
                                ("mnist-cifar", mnist, cifar), ("cifar-stripes", cifar, None)):
        cases[kind] = datasets.Composite(kind, target, other, True, info)
    print(f"data: ms per training batch of {batch} [{device}, threads {torch.get_num_threads()}]")
    for name, dataset in cases.items():
        loader = iter(DataLoader(dataset, batch_size=batch, shuffle=True))
        fast = datasets.Batches(dataset, device)
        item = timed(lambda: next(loader)[0].to(device), device, repeats // 4)
        new = timed(lambda: fast.get(torch.randint(len(fast), (batch,))), device, repeats)
        print(f"  {name:24s} item by item {item * 1e3:7.2f}   Batches {new * 1e3:6.3f}", flush=True)


def bench_smoke(device, full=False, compile=False):
    """Every mode end to end on `device` with tiny settings (seconds): the CUDA paths of
    training, checkpoints, --resume and evaluation, not just the maths; with `compile`,
    each mode once more with --compile."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        glow_path = os.path.join(tmp, "glow.pt")
        glow.save_glow(glow.Glow(levels=1, steps=1, hidden=8), glow_path)
        common = ["--dataset", "shapes", "--glow", glow_path, "--device", str(device)]
        runs = {per_instance: ["--train-size", "64", "--test-size", "32", "--epochs", "2",
                               "--batch-size", "16", "--arch", "convnet", "--width", "8",
                               "--ngf", "4", "--retrain", "--retrain-epochs", "1"],
                condense: ["--train-size", "60", "--test-size", "40", "--ipc", "2",
                           "--iterations", "2", "--width", "8", "--num-eval", "1",
                           "--eval-epochs", "2", "--lambda-sim", "1"],
                posthoc: ["--train-size", "64", "--test-size", "40", "--steps", "3",
                          "--num-images", "2", "--train-epochs", "1", "--depth", "10",
                          "--widen", "1", "--select", "correct", "--confidence", "0"]}
        for flags in [[]] + [["--compile"]] * compile:
            for module, argv in runs.items():
                out = os.path.join(tmp, module.__name__ + "".join(flags))
                start = time.perf_counter()
                module.main(module.get_args(common + argv + flags + ["--out", out]))
                if module is not condense:  # --resume of a finished run: reloads onto the device
                    module.main(module.get_args(common + argv + flags + ["--out", out, "--resume"]))
                print(f"smoke {module.__name__} {' '.join(flags)} on {device}: ok "
                      f"({time.perf_counter() - start:.1f} s)", flush=True)


def quick_steps():
    """Seconds per tiny-Glow training step (batch 64) and per quick per-instance step
    (ConvNet 32, UNet ngf 16, batch 16, tiny Glow): the two loops of the quick demos."""
    device = torch.device("cpu")
    torch.manual_seed(0)
    g = glow.Glow(**glow.QUICK_GLOW)
    x = torch.rand(64, 3, 32, 32)
    with torch.no_grad():
        g(glow.to_glow_range(x))  # ActNorm data init
    opt = torch.optim.Adamax(g.parameters(), lr=glow.QUICK_LR)

    def glow_step():
        opt.zero_grad()
        glow.bits_per_dim(g, x).mean().backward()
        opt.step()

    frozen = glow.freeze(g)
    classifier, simplifier = nets.ConvNet(5, width=32), nets.UNetSimplifier(ngf=16)
    opt_clf = nets.classifier_optimizer(classifier, 5e-3)
    opt_simp = torch.optim.Adam(simplifier.parameters(), lr=5e-3, betas=(0.5, 0.99), fused=True)
    xb, yb = torch.rand(16, 3, 32, 32), torch.randint(0, 5, (16,))

    def simplebits_step():
        per_instance.simplebits_step(simplifier, classifier, opt_simp, opt_clf, frozen, xb, yb,
                                     50.0, False)

    return timed(glow_step, device, 15), timed(simplebits_step, device, 10)


def bench_threads(device, full=False):
    """The quick demos' two loops in a fresh process per setting: torch's default threads,
    OMP_NUM_THREADS=1 and OMP_WAIT_POLICY=PASSIVE, on this machine as it is and with one
    busy-looping process beside (a laptop that is never idle)."""
    import subprocess
    settings = {"default": {}, "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
                "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}}
    code = ("import sys; sys.path.insert(0, 'tests'); import benchmark, torch; "
            "g, s = benchmark.quick_steps(); print(torch.get_num_threads(), g, s)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print(f"quick loops, ms per step ({os.cpu_count()} CPUs): tiny-Glow training step | "
          "per-instance quick step")
    for load in ("as is", "one busy process beside"):
        hog = None
        if load != "as is":
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            for name, env in settings.items():
                env = {k: v for k, v in os.environ.items()
                       if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")} | env
                out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                                     capture_output=True, text=True, check=True).stdout.split()
                threads, g, s = int(out[0]), float(out[1]), float(out[2])
                print(f"  {load:24s} {name:24s} ({threads} threads): {g * 1e3:7.1f} | "
                      f"{s * 1e3:7.1f}", flush=True)
        finally:
            if hog is not None:
                hog.kill()


BENCHMARKS = {"smoke": bench_smoke, "data": bench_data, "glow": bench_glow, "per_instance": bench_per_instance, "condense": bench_condense,
              "posthoc": bench_posthoc, "threads": bench_threads}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="SimpleBits speed benchmarks")
    parser.add_argument("which", nargs="*", choices=list(BENCHMARKS),
                        default=[b for b in BENCHMARKS if b != "threads"],
                        help="benchmarks to run (default: all but threads, which is CPU-only)")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda, then mps, then cpu) or a torch device: cpu, cuda:1, mps")
    parser.add_argument("--full", action="store_true", help="also the full-size configurations")
    parser.add_argument("--y0ast", default=None, metavar="DIR",
                        help="glow: also time y0ast's own Glow from a checkout of "
                             "y0ast/Glow-PyTorch in DIR, at the same size in the same run")
    parser.add_argument("--compile", action="store_true",
                        help="glow: also time the torch.compile'd frozen Glow; per_instance, "
                             "condense, posthoc: also time each figure as --compile runs it; "
                             "smoke: also run every mode with --compile")
    parser.add_argument("--versus-dc", default=None, metavar="DIR",
                        help="condense: instead, time DC's own outer iteration from a checkout "
                             "of VICO-UoE/DatasetCondensation (53f63a6) in DIR against ours, "
                             "interleaved on the same tensors (paper size, lambda 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default torch's)")
    args = parser.parse_args()
    for flag, folder, benchmark, repository, files in (  # the reference code's checkouts
            ("--y0ast", args.y0ast, "glow", "y0ast/Glow-PyTorch", ("model.py", "modules.py")),
            ("--versus-dc", args.versus_dc, "condense", "VICO-UoE/DatasetCondensation",
             ("utils.py", "networks.py"))):
        if folder and benchmark not in args.which:
            parser.error(f"{flag} goes with the {benchmark} benchmark")
        if folder and not all(os.path.isfile(os.path.join(folder, f)) for f in files):
            parser.error(f"{flag} {folder}: not a checkout of {repository} (it needs "
                         f"{' and '.join(files)} there)")
    sys.stdout.reconfigure(line_buffering=True)  # a run cut off by a time limit keeps its lines
    device = nets.resolve_device(args.device)
    torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.which:
        extra = ({"y0ast": args.y0ast, "compile": args.compile} if name == "glow" else
                 {"compile": args.compile} if name in ("smoke", "per_instance", "condense",
                                                       "posthoc") else {})
        start = time.perf_counter()
        if name == "condense" and args.versus_dc:
            bench_condense_versus_dc(device, args.versus_dc, compile=args.compile)
        else:
            BENCHMARKS[name](device, full=args.full, **extra)
        print(f"[{name}: {time.perf_counter() - start:.0f} s]")
