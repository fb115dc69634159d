"""Test helpers: what runs here, the comparisons, and the tolerances of docs/design.md section 6
(fastgan.perf.tolerances, the table fastgan doctor uses too)."""
import contextlib
import os
import pathlib

import pytest
import torch
from torch import nn

from fastgan.nn.layers import FusedSequential
from fastgan.ops import backends
from fastgan.perf.tolerances import TOLERANCES, rel_l2

ROOT = pathlib.Path(__file__).resolve().parents[1]  # the repository
HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = backends.triton_import_error() is None
INTERPRETER = backends.interpreter_enabled()
# the devices of the op-level tests: the CUDA cases carry the gpu mark, so that `pytest -m gpu` selects them
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# the kernel backends every op test runs against the torch reference: triton (on CPU tensors in its interpreter)
# and the C++/CUDA extension (its CPU kernels on CPU tensors)
KERNEL_BACKENDS = [pytest.param("triton", marks=pytest.mark.interpreter), "cuda"]
# The op tests' tolerance per dtype: the row of docs/design.md section 6 it is compared with.  The kernels
# accumulate half and fp32 storage in fp32 and fp64 in fp64, so fp64 meets fp32's bound with room to spare.
DTYPE_TOLERANCE = {
    torch.float64: "fp32",
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
}


def assert_close(actual, expected, mode="fp32", what="output", grad=False):
    """Compare with the tolerances of docs/design.md section 6; NaN never passes."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{what}: NaN in the result"
    tol = TOLERANCES[mode]
    if tol["atol"] is not None and not grad:
        torch.testing.assert_close(actual.double(), expected.double(), atol=tol["atol"], rtol=tol["rtol"],
                                   msg=lambda m: f"{what}: {m}")
    else:
        err = rel_l2(actual, expected)
        assert err <= tol["rel_l2"], f"{what}: rel-L2 error {err:.2e} > {tol['rel_l2']:.0e}"


def assert_as_close_as_torch(actual, torch_same_precision, exact, mode, what):
    """Reduced precision (TF32, fp16, bf16) against the exact fp32 ``exact``: within the mode's rel-L2, or at
    most twice as far from it as torch's own computation in the same precision is.  Rounding alone takes
    torch's gradients past the mode's tolerance at some sizes (cancellation in sums such as dbias = sum(dy),
    ReLU masks flipped), so the tolerance alone would fail a kernel as good as torch's (docs/design.md
    section 6)."""
    assert not torch.isnan(actual).any(), f"{what}: NaN in the result"
    err, torch_err = rel_l2(actual.float(), exact.float()), rel_l2(torch_same_precision.float(), exact.float())
    bound = max(TOLERANCES[mode]["rel_l2"], 2 * torch_err)
    assert err <= bound, f"{what}: rel-L2 {err:.2e} > {bound:.2e} (torch in the same precision: {torch_err:.2e})"


@contextlib.contextmanager
def tf32_enabled(on):
    """cuDNN's and cuBLAS's TF32 flags (which fastgan's L2 kernels follow too) set to ``on`` in the block."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def needs_backend_here(backend, device):
    """Skip (with the reason) when ``backend`` cannot run on ``device`` here (test_cuda_ext.py checks that the
    extension builds)."""
    if backend == "triton":
        return needs_triton_here(device)
    try:
        backends.resolve(backend, torch.device(device))
    except backends.BackendUnavailable as exc:
        pytest.skip(str(exc))


def interpreter_problem():
    """Why Triton's interpreter cannot run in this environment (triton <= 3.7 with numpy >= 2.4), or None.  The
    tests that run it skip with this one reason (tests/conftest.py), as the GPU tests do without a GPU."""
    return backends.interpreter_error() if HAS_TRITON and INTERPRETER else None


def needs_triton_here(device):
    """Skip (with the reason) when triton cannot run on ``device`` in this process."""
    if not HAS_TRITON:
        pytest.skip("triton does not import")
    if device == "cpu" and not INTERPRETER:
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1 (set by conftest only on CPU-only machines)")
    if device == "cpu" and interpreter_problem():
        pytest.skip(interpreter_problem())


def python_env(**extra):
    """os.environ for a subprocess that imports this repository's fastgan, whatever the working folder."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **extra}


def init_params(model, seed):
    """Random parameters (weights N(0, 0.3), 1-d parameters 0.9 + N(0, 0.2)) from ``seed``; returns ``model``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 0.2) + (p.dim() == 1) * 0.9)
    return model


def gradcheck_chain(device="cpu"):
    """The fp64 L2 model of test_conv_gemm's gradcheck: every chain geometry in one run (1 -> 4 -> 2 -> 4 -> 1
    pixels), BN + activations between them.  tests/sm90.py records its launches for sm_90 as well, so that the
    tiles it takes on a GPU are checked to fit."""
    model = nn.Sequential(nn.ConvTranspose2d(3, 4, 4, 1, 0, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 4, 2, 1, bias=False), nn.BatchNorm2d(4), nn.LeakyReLU(0.2),
                          nn.ConvTranspose2d(4, 3, 4, 2, 1, bias=False), nn.BatchNorm2d(3, track_running_stats=False),
                          nn.Tanh(), nn.Conv2d(3, 2, 4, 1, 0, bias=False))
    return FusedSequential(*init_params(model, 0).to(device, torch.float64), backend="triton", level="L2")
