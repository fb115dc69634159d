"""The op contract: the fused ops every kernel backend implements, their fake kernels and autograd.

One schema per op, registered by each kernel backend under its own namespace (``fastgan`` for triton,
fastgan.ops.triton_ops; ``fastgan_ext`` for the C++/CUDA extension, fastgan.ops.ext_ops):

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

act: ACTIVATIONS[name]; slope: LeakyReLU's negative slope.  The torch composite of the same maths
(fastgan.ops.functional with backend="torch") is the reference every backend is tested against.
"""
import torch
import torch.nn.functional as F

from ..kernels import activations
from ..kernels.outputs import accumulator_dtype
from ..usage import UsageError

ACTIVATIONS = activations.CODES  # name -> the code the kernels take


class BackendUnavailable(UsageError, RuntimeError):
    """An explicitly requested backend cannot run on the given tensors; the message says why and the fix."""


def stat_dtype(t):
    """The dtype of statistics and accumulators for ``t`` (kernels.outputs.accumulator_dtype)."""
    return accumulator_dtype(t.dtype)


def torch_act(y, act, slope):
    """The activation ``act`` (a name of ACTIVATIONS) in torch ops."""
    if act == "relu":
        return F.relu(y)
    if act == "leaky_relu":
        return F.leaky_relu(y, slope)
    if act == "tanh":
        return torch.tanh(y)
    return y


def channel_stats_fake(z, running_mean, running_var, momentum, eps):
    return z.new_empty((z.shape[1],), dtype=stat_dtype(z)), z.new_empty((z.shape[1],), dtype=stat_dtype(z))


def bn_act_fake(z, mean, invstd, weight, bias, batch_stats, act, slope):
    return torch.empty_like(z)


def bn_act_backward_fake(dy, z, mean, invstd, weight, bias, batch_stats, act, slope):
    params = z.shape[1] if weight is not None else 0
    dtype = mean.dtype if mean is not None else stat_dtype(z)
    return torch.empty_like(z), z.new_empty((params,), dtype=dtype), z.new_empty((params,), dtype=dtype)


def sigmoid_bce_fake(logits, target):
    return logits.new_empty((), dtype=stat_dtype(logits)), torch.empty_like(logits)


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


