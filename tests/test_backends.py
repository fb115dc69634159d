"""Backend selection: auto, explicit, FASTGAN_BACKEND, use_backend, and the errors that name the fix."""
import os
import subprocess
import sys

import pytest
import torch

import fastgan
from fastgan.ops import backends
from fastgan.ops.functional import batch_norm_act
from parity import HAS_CUDA, needs_triton_here

CPU = torch.device("cpu")
TRITON_DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")  # CPU only under the interpreter (conftest)


def test_auto_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTGAN_BACKEND", raising=False)
    assert backends.resolve("auto", CPU) == "torch"
    assert backends.resolve(None, CPU) == "torch"


@pytest.mark.interpreter  # resolves to triton on the CPU
def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv("FASTGAN_BACKEND", "triton")
    assert backends.resolve("auto", TRITON_DEVICE) == "triton"
    assert backends.resolve("torch", TRITON_DEVICE) == "torch"  # an explicit choice wins over the environment
    monkeypatch.setenv("FASTGAN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="the environment variable FASTGAN_BACKEND must be one of"):
        backends.resolve("auto", CPU)


@pytest.mark.interpreter  # resolves to triton on the CPU
def test_context_manager_overrides_everything(monkeypatch):
    monkeypatch.setenv("FASTGAN_BACKEND", "triton")
    with fastgan.use_backend("torch"):
        assert backends.resolve("triton", TRITON_DEVICE) == "torch"
        with fastgan.use_backend("triton"):
            assert backends.resolve("torch", TRITON_DEVICE) == "triton"
        assert backends.resolve("auto", TRITON_DEVICE) == "torch"
    assert backends.resolve("auto", TRITON_DEVICE) == "triton"


def test_explicit_cuda_backend_runs_or_names_the_fix():
    try:
        assert backends.resolve("cuda", CPU) == "cuda"
    except fastgan.BackendUnavailable as exc:
        assert str(exc).startswith("backend='cuda' cannot run here: ")
        assert "backend='triton'" in str(exc) or "backend='torch'" in str(exc)


def test_triton_on_cpu_without_the_interpreter_says_how_to_fix_it():
    code = ("import torch, fastgan\n"
            "from fastgan.ops.functional import batch_norm_act\n"
            "try:\n"
            "    batch_norm_act(torch.randn(2, 3, 4, 4), act='relu', backend='triton')\n"
            "except fastgan.BackendUnavailable as exc:\n"
            "    print(exc)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "set TRITON_INTERPRET=1" in out.stdout and "backend='torch'" in out.stdout


def test_module_backend_is_used():
    needs_triton_here("cpu")
    g = fastgan.Generator(ngf=4, backend="torch")
    assert g.main.backend == "torch"
    reference = fastgan.reference.Generator(ngf=4)
    reference.load_state_dict(g.state_dict())
    z = torch.randn(2, 100, 1, 1)
    with fastgan.use_backend("triton"):  # the same weights through the triton kernels
        fused = g(z)
    torch.testing.assert_close(fused, reference(z), atol=1e-4, rtol=1e-4)


def test_importing_fastgan_does_not_import_triton():
    code = "import sys, fastgan; fastgan.DCGAN(ngf=4, ndf=4); print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_batch_norm_act_accepts_backend_argument():
    needs_triton_here("cpu")
    z = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(batch_norm_act(z, act="relu", backend="triton"),
                               batch_norm_act(z, act="relu", backend="torch"), atol=1e-5, rtol=1e-5)
