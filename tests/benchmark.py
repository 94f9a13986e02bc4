"""Speed benchmarks, run by hand (not collected by pytest):

    python tests/benchmark.py                 # every benchmark on the default device
    python tests/benchmark.py glow --device cuda --full

glow: images/second of Glow scoring (bpd forward, and forward + backward to the input) at
batch 32, for a small and (with --full) the released K=32/hidden 512 configuration.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import glow  # noqa: E402
import nets  # noqa: E402


def timed(fn, device, repeats):
    """Median seconds per call after two warm-up calls."""
    for _ in range(2):
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


def bench_glow(device, full=False, batch=32, repeats=5):
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
        for frozen in (False, True):
            if frozen:
                glow.freeze(model)
            else:
                model.eval().requires_grad_(False)

            def forward():
                with torch.no_grad():
                    glow.bits_per_dim(model, x)

            def forward_backward():
                x_grad = x.clone().requires_grad_()
                glow.bits_per_dim(model, x_grad).sum().backward()

            mode = "frozen (fused)" if frozen else "eval (unfused)"
            fwd = batch / timed(forward, device, repeats)
            both = batch / timed(forward_backward, device, repeats)
            print(f"glow {config} {mode}: bpd forward {fwd:8.1f} img/s, "
                  f"forward+backward to input {both:8.1f} img/s  [{device}, batch {batch}]")


BENCHMARKS = {"glow": bench_glow}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="SimpleBits speed benchmarks")
    parser.add_argument("which", nargs="*", default=list(BENCHMARKS), help="benchmarks to run")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="device")
    parser.add_argument("--full", action="store_true", help="also the full-size configurations")
    args = parser.parse_args()
    device = nets.resolve_device(args.device)
    torch.backends.cudnn.benchmark = True
    for name in args.which:
        BENCHMARKS[name](device, full=args.full)
