"""`glow.py train` under torchrun: DistributedDataParallel on CPU (gloo), two processes.

Two processes with the same global batch, seed and data take the same steps as one
(sharding, gradient averaging and the ActNorm initialisation); an interrupted two-process
run resumes on one process to the weights of an uninterrupted run.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import glow

ROOT = Path(__file__).resolve().parent.parent
TINY = ["train", "--dataset", "shapes", "--train-size", "96", "--test-size", "16",
        "--levels", "2", "--flow-steps", "1", "--hidden", "8", "--batch-size", "16",
        "--lr", "1e-3", "--device", "cpu"]  # 6 steps per epoch, warm-up 1 step


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process(*argv):
    proc = subprocess.run([sys.executable, "glow.py", *TINY, *argv], cwd=ROOT, text=True,
                          capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def assert_same_weights(a, b):
    """Two processes average two half-batch gradients where one process takes the mean over
    the whole batch: the same sum in another order, ~1e-7 relative. Adamax moves a weight
    by lr·m/u, a ratio of its gradients, so such a rounding moves it by ~lr·1e-7 a step
    (lr 1e-3): a few 1e-8 after 12 steps (seen 2.5e-8). Only a gradient of the order of
    ε = 1e-8, pure rounding noise, would be amplified to ~lr, and no Glow parameter has
    one (exact zeros, such as the top prior's weights on its zero input, stay exact). A
    lost shard or an unaveraged gradient moves weights by ~lr a step, far beyond 1e-5."""
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_two_processes_take_the_same_steps_as_one(tmp_path):
    """torchrun --nproc_per_node=2 against plain python, 2 epochs (12 steps)."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         "glow.py", *TINY, "--epochs", "2", "--out", str(tmp_path / "ddp.pt")],
        cwd=ROOT, text=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "global batch 16 = 2 process(es) × 8" in proc.stdout
    assert proc.stdout.count("glow epoch 2:") == 1  # only rank 0 prints
    single_process("--epochs", "2", "--out", str(tmp_path / "one.pt"))
    ddp, one = weights(tmp_path / "ddp.pt"), weights(tmp_path / "one.pt")
    assert "flow.layers.1.actnorm.bias" in ddp  # no "module." prefixes
    assert_same_weights(ddp, one)
    # and the checkpoint scores like any other
    model = glow.load_glow(tmp_path / "ddp.pt")
    assert torch.isfinite(glow.bits_per_dim(model, torch.rand(2, 3, 32, 32))).all()


def crash_in_epoch_two(rank, world, port, argv):
    """A torchrun-like worker whose run dies at the first step of epoch 2 (after the epoch-1
    checkpoint): sample_crop_flip is called once for the ActNorm init, then once a step."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    real, calls = glow.nets.sample_crop_flip, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1 + 6 + 1:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)
    glow.nets.sample_crop_flip = flaky
    glow.main(glow.get_args(argv))


def test_interrupted_two_process_run_resumes_on_one_process(tmp_path):
    out = tmp_path / "run.pt"
    argv = [*TINY, "--epochs", "2", "--out", str(out)]
    with pytest.raises(Exception, match="simulated crash"):  # both workers die in epoch 2
        mp.spawn(crash_in_epoch_two, args=(2, free_port(), argv), nprocs=2)
    state = torch.load(out, weights_only=True)
    assert state["epoch"] == 1 and "optimizer" in state  # an unfinished run
    log = single_process("--epochs", "2", "--out", str(out), "--resume")
    assert "resumed" in log
    single_process("--epochs", "2", "--out", str(tmp_path / "straight.pt"))
    assert_same_weights(weights(out), weights(tmp_path / "straight.pt"))


def test_global_batch_must_divide_over_the_processes(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         "glow.py", *TINY[:-6], "--batch-size", "15", "--epochs", "1", "--device", "cpu",
         "--out", str(tmp_path / "x.pt")],
        cwd=ROOT, text=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0
    assert "--batch-size 15 (the global batch) does not divide over 2 processes" in proc.stderr
