"""Fused functional ops: each picks its backend, and the torch composite is the reference.

``conv_bn_act(x, conv, bn, act)``  conv (cuDNN; fusion level L1) -> BatchNorm (optional) -> activation
``batch_norm_act(z, ...)``          BatchNorm (optional) -> activation, the fused part
``sigmoid_bce(logits, target)``     mean BCE from logits with a constant target, fp32 result
"""
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..usage import UsageError
from . import backends
from .backends import kernel_ops
from .contract import ACTIVATIONS, stat_dtype, torch_act
from .sync_bn import sync_batch_norm_act

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be floating point (float32, float16, bfloat16 or float64), got {t.dtype}; "
                        f"convert it with .float()")


def check_device(name, t, device):
    if t.device != device:
        raise UsageError(f"{name} is on {t.device} but the layer's parameters are on {device}; "
                         f"move both to one device with .to(device)")


def batch_norm_act(z, weight=None, bias=None, running_mean=None, running_var=None, *, normalize=True,
                   batch_stats=True, momentum=0.1, eps=1e-5, act="none", slope=0.01, backend=None,
                   process_group=None):
    """act(BatchNorm(z)), or act(z) when ``normalize`` is False.

    z: (N, C, *spatial) or (N, C), any float dtype, NCHW or channels_last.  weight/bias: (C,) or None.
    ``batch_stats`` normalises with the batch statistics and updates the running stats given (in place);
    otherwise the running stats normalise.  Returns y with z's shape, dtype and memory format.
    ``process_group``: with batch statistics, take them over every rank of the group (SyncBatchNorm);
    see fastgan.ops.sync_bn."""
    check_float("z", z)
    if act not in ACTIVATIONS:
        raise UsageError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    which = backends.resolve(backend, z.device)
    if process_group is not None and normalize and batch_stats:
        return sync_batch_norm_act(z, weight, bias, running_mean, running_var, momentum, eps, act, slope, which,
                                   process_group)
    if which == "torch":
        if normalize:
            z = F.batch_norm(z, running_mean, running_var, weight, bias, batch_stats, momentum, eps)
        return torch_act(z, act, slope)
    ops = kernel_ops(which)
    if not (z.is_contiguous() or (z.dim() == 4 and z.is_contiguous(memory_format=torch.channels_last))):
        z = z.contiguous()
    mean = invstd = None
    if normalize and batch_stats:
        mean, invstd = ops.channel_stats(z.detach(), running_mean, running_var, float(momentum), float(eps))
    elif normalize:
        mean = running_mean.to(stat_dtype(z), copy=True)
        invstd = torch.rsqrt(running_var.to(stat_dtype(z)) + eps)
    return ops.bn_act(z, mean, invstd, weight, bias, batch_stats, ACTIVATIONS[act], float(slope))


def sigmoid_bce(logits, target, backend=None):
    """mean(BCE(sigmoid(logits), target)) for a constant target, as a 0-dim fp32 tensor (fp64 for fp64).
    ``target``: a number, the label of every element (1.0 real, 0.0 fake, 0.9 smoothed)."""
    check_float("logits", logits)
    if not isinstance(target, numbers.Real):
        raise TypeError(f"target must be a number, the label of every element (e.g. 1.0 for real), got "
                        f"{type(target).__name__}; for a target per element use "
                        "torch.nn.functional.binary_cross_entropy_with_logits")
    which = backends.resolve(backend, logits.device)
    if which == "torch":
        logits = logits.to(stat_dtype(logits))
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))
    return kernel_ops(which).sigmoid_bce(logits, float(target))[0]


def _layout(conv):
    """(the fused layout as text, its rank, the channel count) of ``conv``'s input."""
    if isinstance(conv, nn.Linear):
        return f"(N, {conv.in_features})", 2, conv.in_features
    return f"(N, {conv.in_channels}, H, W)", 4, conv.in_channels


def fused_layout(x, conv):
    """Whether x has the layout the fused ops take, (N, C, H, W) or (N, F) for a Linear; False for the other
    inputs ``conv`` itself accepts (a Linear on (*, F), an unbatched (C, H, W) convolution), which the
    caller runs through the modules' own forward."""
    _, rank, channels = _layout(conv)
    if not isinstance(x, torch.Tensor) or x.dim() == rank:
        return True
    if isinstance(conv, nn.Linear):
        return not (x.dim() >= 1 and x.shape[-1] == channels)
    return not (x.dim() == rank - 1 and x.shape[0] == channels)


def _check_input(x, conv):
    check_float("input", x)
    check_device("input", x, conv.weight.device)
    expected, rank, channels = _layout(conv)
    if x.dim() != rank or x.shape[1] != channels:
        raise UsageError(f"{type(conv).__name__} expects input of shape {expected}, got {tuple(x.shape)}")


def bn_module_args(bn, z):
    """What nn.BatchNorm's forward would use (and does to num_batches_tracked), as batch_norm_act kwargs."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    if batch_stats and z.numel() // z.shape[1] <= 1:
        raise UsageError(f"BatchNorm in training mode needs more than one value per channel, got input of shape "
                         f"{tuple(z.shape)}; use a batch of 2 or more, or call .eval()")
    return dict(weight=bn.weight, bias=bn.bias, running_mean=bn.running_mean if track else None,
                running_var=bn.running_var if track else None, batch_stats=batch_stats, momentum=momentum,
                eps=bn.eps, process_group=getattr(bn, "process_group", None))  # see fastgan.nn.distributed


def conv_bn_act(x, conv, bn=None, act="none", slope=0.01, backend=None):
    """act(bn(conv(x))) with the modules' own parameters and buffers; bn may be None.

    conv: nn.Conv2d, nn.ConvTranspose2d or nn.Linear (any kernel size, stride, padding);
    bn: nn.BatchNorm1d/2d or None.  Updates bn's running stats exactly as bn(conv(x)) would."""
    _check_input(x, conv)
    z = conv(x)
    if bn is None:
        return batch_norm_act(z, normalize=False, act=act, slope=slope, backend=backend)
    return batch_norm_act(z, act=act, slope=slope, backend=backend, **bn_module_args(bn, z))
