"""Sigmoid + binary cross-entropy from logits: loss and gradient in one pass, in Triton.

    loss  = mean(max(l, 0) - t*l + log1p(exp(-|l|)))
    dloss/dl = (sigmoid(l) - t) / n

Both stay finite for any finite l.  One program walks the whole (small) logit vector, so the
sum is deterministic and needs no second kernel.
"""
import torch
import triton
import triton.language as tl

from . import outputs


@triton.jit
def _log1p(x):
    # log1p without libdevice: corrects log(1+x) for the rounding of 1+x (exact enough for x in [0, 1]).
    u = 1.0 + x
    exact = u == 1.0
    return tl.where(exact, x, tl.log(u) * (x / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def _sigmoid_bce_kernel(logits_ptr, grad_ptr, loss_ptr, n, target, ACC: tl.constexpr, BLOCK: tl.constexpr):
    total = tl.zeros([BLOCK], ACC)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        logit = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(ACC)
        e = tl.exp(-tl.abs(logit))
        loss = tl.maximum(logit, 0.0) - target * logit + _log1p(e)
        total += tl.where(mask, loss, 0.0)
        sigmoid = tl.where(logit >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        tl.store(grad_ptr + offs, ((sigmoid - target) / n).to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(loss_ptr, tl.sum(total, 0) / n)


def sigmoid_bce(logits, target):
    """Mean BCE of ``logits`` (any shape, any float dtype) against the constant ``target``.

    Returns (loss, grad): loss is a 0-dim fp32 tensor (fp64 for fp64 logits), grad = dloss/dlogits
    with the logits' shape and dtype."""
    flat = logits.reshape(-1)
    loss = outputs.empty((), device=logits.device, dtype=outputs.accumulator_dtype(logits.dtype))
    grad = outputs.empty_like(flat)
    _sigmoid_bce_kernel[(1,)](flat, grad, loss, flat.numel(), float(target),
                              ACC=outputs.triton_accumulator(logits.dtype), BLOCK=1024)
    return loss, grad.view(logits.shape)
