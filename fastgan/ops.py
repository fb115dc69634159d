"""The fused ops as ``torch.library`` custom ops, with fake kernels and autograd.

One contract, one schema per op, registered by each kernel backend under its own namespace
(``fastgan`` here for triton; ``fastgan_ext`` for the C++/CUDA extension):

``channel_stats(z, running_mean?, running_var?, momentum, eps) -> (mean, invstd)``
    Batch statistics per channel of z (N, C, *spatial): fp32 (fp64 for fp64 z), shape (C,), biased variance.
    Updates running_mean/var in place when given (unbiased variance).  Not differentiable: called on z.detach().
``bn_act(z, mean?, invstd?, weight?, bias?, batch_stats, act, slope) -> y``
    y = act((z - mean)*invstd*weight + bias), or act(z) without mean; z's dtype and memory format.
    Differentiable in z, weight, bias; when ``batch_stats`` its backward includes the path through the
    batch statistics.  Saved for backward: z, mean, invstd, weight, bias (never y).
``bn_act_backward(dy, z, mean?, invstd?, weight?, bias?, batch_stats, act, slope) -> (dz, dweight, dbias)``
    g = dy*act'(pre) recomputed from z; dbias = sum(g), dweight = sum(g*xhat) in mean's dtype (empty without
    weight); dz = weight*invstd*(g - dbias/n - xhat*dweight/n) with batch statistics, weight*invstd*g without.
``sigmoid_bce(logits, target) -> (loss, grad)``
    loss = mean BCE of sigmoid(logits) against the constant target, 0-dim fp32 (fp64 for fp64 logits);
    grad = dloss/dlogits, logits' dtype, saved for backward.

act: ACTIVATIONS[name]; slope: LeakyReLU's negative slope.
"""
from typing import Optional

import torch
from torch import Tensor

ACTIVATIONS = {"none": 0, "relu": 1, "leaky_relu": 2, "tanh": 3}


def _stat_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def channel_stats_fake(z, running_mean, running_var, momentum, eps):
    return z.new_empty((z.shape[1],), dtype=_stat_dtype(z)), z.new_empty((z.shape[1],), dtype=_stat_dtype(z))


def bn_act_fake(z, mean, invstd, weight, bias, batch_stats, act, slope):
    return torch.empty_like(z)


def bn_act_backward_fake(dy, z, mean, invstd, weight, bias, batch_stats, act, slope):
    params = z.shape[1] if weight is not None else 0
    dtype = mean.dtype if mean is not None else _stat_dtype(z)
    return torch.empty_like(z), z.new_empty((params,), dtype=dtype), z.new_empty((params,), dtype=dtype)


def sigmoid_bce_fake(logits, target):
    return logits.new_empty((), dtype=_stat_dtype(logits)), torch.empty_like(logits)


def register(bn_act_op, bn_act_backward_op, sigmoid_bce_op, channel_stats_op):
    """Fake kernels and autograd for one backend's ops; bn_act's backward calls that backend's bn_act_backward."""

    def bn_act_setup(ctx, inputs, output):
        z, mean, invstd, weight, bias, batch_stats, act, slope = inputs
        ctx.save_for_backward(z, mean, invstd, weight, bias)
        ctx.config = (batch_stats, act, slope)

    def bn_act_grad(ctx, dy):
        z, mean, invstd, weight, bias = ctx.saved_tensors
        dz, dweight, dbias = bn_act_backward_op(dy, z, mean, invstd, weight, bias, *ctx.config)
        if weight is None:
            return dz, None, None, None, None, None, None, None
        return dz, None, None, dweight.to(weight.dtype), dbias.to(bias.dtype), None, None, None

    def no_double_backward(ctx, *grads):
        raise RuntimeError("fastgan: the fused BatchNorm + activation has no double backward (create_graph=True, "
                           "e.g. a gradient penalty); run that part with backend='torch'")

    def sigmoid_bce_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1])

    def sigmoid_bce_grad(ctx, dloss, _dgrad):
        (grad,) = ctx.saved_tensors
        return (grad * dloss).to(grad.dtype), None

    torch.library.register_fake(channel_stats_op)(channel_stats_fake)
    torch.library.register_fake(bn_act_op)(bn_act_fake)
    torch.library.register_fake(bn_act_backward_op)(bn_act_backward_fake)
    torch.library.register_fake(sigmoid_bce_op)(sigmoid_bce_fake)
    torch.library.register_autograd(bn_act_op, bn_act_grad, setup_context=bn_act_setup)
    torch.library.register_autograd(sigmoid_bce_op, sigmoid_bce_grad, setup_context=sigmoid_bce_setup)
    # Without it autograd would only warn, and differentiate bn_act_backward as if it were constant.
    torch.library.register_autograd(bn_act_backward_op, no_double_backward)


# ----------------------------------------------------------------------------- triton backend
# The kernels import lazily: importing fastgan must not import triton.

@torch.library.custom_op("fastgan::channel_stats", mutates_args=("running_mean", "running_var"))
def channel_stats(z: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
                  eps: float) -> tuple[Tensor, Tensor]:
    from .kernels import bn_act as kernels

    return kernels.channel_stats(z, running_mean, running_var, momentum, eps)


@torch.library.custom_op("fastgan::bn_act", mutates_args=())
def bn_act(z: Tensor, mean: Optional[Tensor], invstd: Optional[Tensor], weight: Optional[Tensor],
           bias: Optional[Tensor], batch_stats: bool, act: int, slope: float) -> Tensor:
    from .kernels import bn_act as kernels

    return kernels.bn_act_forward(z, mean, invstd, weight, bias, act, slope)


@torch.library.custom_op("fastgan::bn_act_backward", mutates_args=())
def bn_act_backward(dy: Tensor, z: Tensor, mean: Optional[Tensor], invstd: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], batch_stats: bool, act: int,
                    slope: float) -> tuple[Tensor, Tensor, Tensor]:
    from .kernels import bn_act as kernels

    return kernels.bn_act_backward(dy, z, mean, invstd, weight, bias, batch_stats, act, slope)


@torch.library.custom_op("fastgan::sigmoid_bce", mutates_args=())
def sigmoid_bce(logits: Tensor, target: float) -> tuple[Tensor, Tensor]:
    from .kernels import sigmoid_bce as kernels

    return kernels.sigmoid_bce(logits, target)


register(bn_act, bn_act_backward, sigmoid_bce, channel_stats)
