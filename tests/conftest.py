"""Shared test setup: interpreter mode on CPU-only machines, GPU marks, NaN-poisoned kernel outputs.

Without CUDA, TRITON_INTERPRET=1 is set here, before anything imports triton, so the Triton
kernels run on CPU tensors (slowly: keep their shapes tiny).  The helpers tests import live in
parity.py (a conftest cannot be imported by name: benchmarks/ has one too).
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from parity import HAS_CUDA  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def _poison(enabled):
    from fastgan.kernels import outputs

    outputs.POISON_OUTPUTS = enabled
    if "fastgan.ops.ext_ops" in sys.modules:  # once loaded, the extension reads the flag at import
        sys.modules["fastgan.ops.ext_ops"].poison_outputs(enabled)


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Every kernel output (Triton and the extension) starts as NaN, so an element no kernel wrote fails."""
    _poison(True)
    yield
    _poison(False)


@pytest.fixture(autouse=True)
def exact_fp32():
    """Tests compare in exact fp32 unless they opt into TF32 themselves."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
