import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture(autouse=True)
def _one_thread_per_test():
    # Tiny models: intra-op threads only add contention on a 2-core machine (OpenMP makes
    # CPU BatchNorm ~100x slower under load), and divergence tests need reproducible sums.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
