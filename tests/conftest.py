"""Shared pytest setup: deterministic seeds and small thread counts (CI has 2 cores).

Tiers: `pytest -m "not gpu and not interp"` (everywhere), `TRITON_INTERPRET=1 pytest -m interp`
(Triton kernels on CPU at tiny shapes), `pytest -m gpu` (needs CUDA; benchmarks/gpu_check.sh).
"""
import os
import sys

import pytest
import torch

# Let tests import tests.golden / tests.utils as packages regardless of the invocation directory.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from seed 0 and gets back the thread count it started with (trainers set their own)."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
