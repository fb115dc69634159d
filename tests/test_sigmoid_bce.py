"""Sigmoid-BCE from logits and the GAN losses: triton backend against the torch reference."""
import pytest
import torch
import torch.nn.functional as F

from fastgan.nn import losses
from fastgan.ops.functional import sigmoid_bce
from parity import DEVICES, assert_close, needs_backend_here, needs_triton_here


def _loss_and_grad(fn, logits):
    logits = logits.detach().clone().requires_grad_()
    loss = fn(logits)
    loss.backward()
    return loss.detach(), logits.grad


def _reference(logits, target):
    return F.binary_cross_entropy_with_logits(logits.double(), torch.full_like(logits.double(), target))


@pytest.mark.interpreter
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("n", [1, 7, 5000])
@pytest.mark.parametrize("target", [1.0, 0.0, 0.9])
def test_matches_reference(device, backend, n, target):
    needs_backend_here(backend, device)
    logits = torch.randn(n, device=device) * 4
    loss, grad = _loss_and_grad(lambda l: sigmoid_bce(l, target, backend=backend), logits)
    ref_loss, ref_grad = _loss_and_grad(lambda l: _reference(l, target), logits)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, ref_loss.float(), what="loss")
    assert_close(grad.double(), ref_grad, what="grad", grad=True)


@pytest.mark.interpreter
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_extreme_logits_stay_finite(device, backend):
    if backend == "triton":
        needs_triton_here(device)
    logits = torch.tensor([1e4, -1e4, 3e4, -3e4, 0.0, 20.0, -20.0], device=device)
    for target in (1.0, 0.0, 0.9):
        loss, grad = _loss_and_grad(lambda l: sigmoid_bce(l, target, backend=backend), logits)
        ref_loss, ref_grad = _loss_and_grad(lambda l: _reference(l, target), logits)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad.double(), ref_grad.double(), rtol=1e-6, atol=1e-7)


@pytest.mark.interpreter
@pytest.mark.parametrize("device", DEVICES)
def test_gan_losses_with_label_smoothing(device):
    needs_triton_here(device)
    real, fake = torch.randn(9, device=device), torch.randn(9, device=device)
    for smoothing in (0.0, 0.1):
        got = losses.discriminator_loss(real, fake, label_smoothing=smoothing, backend="triton")
        ref = _reference(real, 1.0 - smoothing) + _reference(fake, 0.0)
        assert_close(got.double(), ref, what=f"d_loss smoothing={smoothing}")
    assert_close(losses.generator_loss(fake, backend="triton").double(), _reference(fake, 1.0), what="g_loss")


@pytest.mark.interpreter
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_fp64(device):
    needs_triton_here(device)
    logits = torch.randn(11, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l: sigmoid_bce(l, 0.9, backend="triton"), (logits,))


@pytest.mark.interpreter
@pytest.mark.parametrize("device", DEVICES)
def test_half_logits_give_fp32_loss(device):
    needs_triton_here(device)
    logits = torch.randn(33, device=device).half()
    loss, grad = _loss_and_grad(lambda l: sigmoid_bce(l, 1.0, backend="triton"), logits)
    ref_loss, ref_grad = _loss_and_grad(lambda l: _reference(l, 1.0), logits)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float16
    assert_close(loss.double(), ref_loss, "fp16", what="loss", grad=True)
    assert_close(grad.double(), ref_grad, "fp16", what="grad", grad=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_bf16_returns_fp32(backend):
    logits = torch.randn(64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits_bf16 = logits.bfloat16()
        loss = losses.generator_loss(logits_bf16, backend=backend)
    assert loss.dtype == torch.float32
    assert_close(loss.double(), _reference(logits_bf16.float(), 1.0), "bf16", what="loss", grad=True)
