"""Shared pytest set-up: import the top-level modules from the repository root, and run on
one CPU thread unless OMP_NUM_THREADS says otherwise (the tests' many tiny steps do not
gain from a second thread, and two threads thrash when the machine is busy).

Tests that compare two float computations allow for another CPU's rounding. To see how
one rounds without such a machine, run torch's AVX2 kernels on an AVX-512 CPU, with a
torch.compile cache of their own (compiled kernels of another ISA must not be reused):

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
        TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-avx2 python -m pytest -q
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)
