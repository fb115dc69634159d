"""Sigmoid-BCE from logits and the GAN losses, by backend: triton and the C++/CUDA extension ("cuda") against the
torch reference (in float64), the loss and the logits' grad, within the tolerance of the logits' dtype
(parity.DTYPE_TOLERANCE)."""
import pytest
import torch
import torch.nn.functional as F

from fastgan.nn import losses
from fastgan.ops.functional import sigmoid_bce
from parity import DEVICES, DTYPE_TOLERANCE, KERNEL_BACKENDS, assert_close, needs_backend_here


def _loss_and_grad(fn, logits):
    logits = logits.detach().clone().requires_grad_()
    loss = fn(logits)
    loss.backward()
    return loss.detach(), logits.grad


def _reference(logits, target):
    return F.binary_cross_entropy_with_logits(logits.double(), torch.full_like(logits.double(), target))


def _compare(backend, logits, target):
    """``backend``'s loss (fp32; fp64 for fp64 logits) and grad (the logits' dtype) against the reference."""
    loss, grad = _loss_and_grad(lambda l: sigmoid_bce(l, target, backend=backend), logits)
    ref_loss, ref_grad = _loss_and_grad(lambda l: _reference(l, target), logits)
    assert loss.shape == () and loss.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert grad.dtype == logits.dtype
    mode = DTYPE_TOLERANCE[logits.dtype]
    assert_close(loss.double(), ref_loss, mode, what=f"{backend}: loss", grad=mode != "fp32")
    assert_close(grad.double(), ref_grad, mode, what=f"{backend}: grad", grad=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("n", [1, 7, 5000])
@pytest.mark.parametrize("target", [1.0, 0.0, 0.9])
def test_matches_reference(device, backend, n, target):
    needs_backend_here(backend, device)
    _compare(backend, torch.randn(n, device=device) * 4, target)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(device, backend, dtype):
    """Half logits give an fp32 loss and a grad in their dtype; fp64 logits an fp64 loss."""
    needs_backend_here(backend, device)
    _compare(backend, (torch.randn(33, device=device) * 4).to(dtype), 0.9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
def test_extreme_logits_stay_finite(device, backend):
    needs_backend_here(backend, device)
    logits = torch.tensor([1e4, -1e4, 3e4, -3e4, 0.0, 20.0, -20.0], device=device)
    for target in (1.0, 0.0, 0.9):
        loss, grad = _loss_and_grad(lambda l: sigmoid_bce(l, target, backend=backend), logits)
        ref_loss, ref_grad = _loss_and_grad(lambda l: _reference(l, target), logits)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad.double(), ref_grad.double(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gan_losses_with_label_smoothing(device, backend):
    needs_backend_here(backend, device)
    real, fake = torch.randn(9, device=device), torch.randn(9, device=device)
    for smoothing in (0.0, 0.1):
        got = losses.discriminator_loss(real, fake, label_smoothing=smoothing, backend=backend)
        ref = _reference(real, 1.0 - smoothing) + _reference(fake, 0.0)
        assert_close(got.double(), ref, what=f"{backend}: d_loss smoothing={smoothing}")
    assert_close(losses.generator_loss(fake, backend=backend).double(), _reference(fake, 1.0),
                 what=f"{backend}: g_loss")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradcheck_fp64(device, backend):
    needs_backend_here(backend, device)
    logits = torch.randn(11, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l: sigmoid_bce(l, 0.9, backend=backend), (logits,))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_many_blocks(backend, dtype):
    """4099 logits: several blocks of the reduction and a short last one."""
    needs_backend_here(backend, "cuda")
    _compare(backend, (torch.randn(4099, device="cuda") * 4).to(dtype), 0.9)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
def test_autocast_bf16_returns_fp32(backend):
    needs_backend_here(backend, "cuda")
    logits = torch.randn(64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits_bf16 = logits.bfloat16()
        loss = losses.generator_loss(logits_bf16, backend=backend)
    assert loss.dtype == torch.float32
    assert_close(loss.double(), _reference(logits_bf16.float(), 1.0), "bf16", what="loss", grad=True)
