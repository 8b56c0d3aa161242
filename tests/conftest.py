"""Test session setup.

* Without a CUDA device, Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` must
  be set before any ``@triton.jit`` kernel is created (``ptune_fast``'s Triton modules are
  imported lazily, so setting it here, before collection, is early enough). With a GPU the
  variable is left alone so that the ``gpu`` tests run the compiled kernels.
* Markers: ``gpu`` (skipped without CUDA), ``slow``.
"""
import os

import pytest

try:
    import torch

    _CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _CUDA = False

if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Tiny models: one intra-op thread is as fast, and immune to oversubscription when other
    # processes share the cores (measured here: 64x64 linears 10x slower with 2 threads under load).
    torch.set_num_threads(int(os.environ.get("PTUNE_FAST_TEST_THREADS", "1")))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: slow on CPU (interpreter / compilers); deselect with -m 'not slow'")


def pytest_collection_modifyitems(config, items):
    if _CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
