"""Shared pytest set-up: import the top-level modules from the repository root, and run on
one CPU thread unless OMP_NUM_THREADS says otherwise (the tests' many tiny steps do not
gain from a second thread, and two threads thrash when the machine is busy)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)
