"""Shared test setup: interpreter mode on CPU-only machines, the GPU and interpreter marks, NaN-poisoned kernel
outputs, a working folder of its own per test.

The slow tier (what `pytest -m "not slow"` leaves out; CI runs everything) is marked on the tests themselves, each
with why: the fast tier keeps the parity of every op on every backend and dtype, one model per backend, and the CLI.

Without CUDA, TRITON_INTERPRET=1 is set here, before anything imports triton, so the Triton kernels run on CPU
tensors (slowly: keep their shapes tiny).  Where the interpreter cannot run (a triton that needs numpy<2.4 beside
numpy 2.4), the tests marked ``interpreter`` skip with that reason.  The helpers tests import live in parity.py
(a conftest cannot be imported by name: benchmarks/ has one too).
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from parity import HAS_CUDA, interpreter_problem  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    no_interpreter = interpreter_problem()  # e.g. triton 3.6 with numpy 2.4: one reason, not a failure per test
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and no_interpreter:
            item.add_marker(pytest.mark.skip(reason=no_interpreter))


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
def own_working_folder(tmp_path_factory, monkeypatch):
    """Each test runs in an empty folder of its own: none reads, or writes into, the folder pytest started in
    (README's first command writes out/ there)."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(autouse=True)
def exact_fp32():
    """Tests compare in exact fp32 unless they opt into TF32 themselves."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
