"""The triton backend: the op contract (fastgan.ops.contract) as ``torch.library`` custom ops in the
``fastgan`` namespace, over the kernels of kernels/bn_act.py and kernels/sigmoid_bce.py.

The kernels are imported inside the ops, on first use: importing fastgan must not import triton.
Every op launches its kernels inside :func:`launch_guard`.
"""
from typing import Optional

import torch
from torch import Tensor

from ..usage import UsageError
from .contract import register


def launch_guard(op, *tensors):
    """``torch.cuda.device`` of the tensors' one device (a no-op for CPU tensors), to enter around an op's
    Triton launches: Triton launches on ``torch.cuda.current_device()`` and its current stream, which need not
    be the tensors' (a model on cuda:1 without ``torch.cuda.set_device(1)``).  ``tensors``: tensors, None or
    lists of tensors.  UsageError when they are on more than one device."""
    flat = [t for item in tensors for t in (item if isinstance(item, (list, tuple)) else [item]) if t is not None]
    devices = sorted({str(t.device) for t in flat})
    if len(devices) > 1:
        raise UsageError(f"fastgan::{op}: all tensors must be on one device, got {', '.join(devices)}; "
                         "move them to one device with .to(device)")
    device = flat[0].device
    return torch.cuda.device(device.index if device.type == "cuda" else -1)  # -1: no device switch


@torch.library.custom_op("fastgan::channel_stats", mutates_args=("running_mean", "running_var"))
def channel_stats(z: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
                  eps: float) -> tuple[Tensor, Tensor]:
    from ..kernels import bn_act as kernels

    with launch_guard("channel_stats", z, running_mean, running_var):
        return kernels.channel_stats(z, running_mean, running_var, momentum, eps)


@torch.library.custom_op("fastgan::bn_act", mutates_args=())
def bn_act(z: Tensor, mean: Optional[Tensor], invstd: Optional[Tensor], weight: Optional[Tensor],
           bias: Optional[Tensor], batch_stats: bool, act: int, slope: float) -> Tensor:
    from ..kernels import bn_act as kernels

    with launch_guard("bn_act", z, mean, invstd, weight, bias):
        return kernels.bn_act_forward(z, mean, invstd, weight, bias, act, slope)


@torch.library.custom_op("fastgan::bn_act_backward", mutates_args=())
def bn_act_backward(dy: Tensor, z: Tensor, mean: Optional[Tensor], invstd: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], batch_stats: bool, act: int,
                    slope: float) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels import bn_act as kernels

    with launch_guard("bn_act_backward", dy, z, mean, invstd, weight, bias):
        return kernels.bn_act_backward(dy, z, mean, invstd, weight, bias, batch_stats, act, slope)


@torch.library.custom_op("fastgan::sigmoid_bce", mutates_args=())
def sigmoid_bce(logits: Tensor, target: float) -> tuple[Tensor, Tensor]:
    from ..kernels import sigmoid_bce as kernels

    with launch_guard("sigmoid_bce", logits):
        return kernels.sigmoid_bce(logits, target)


register(bn_act, bn_act_backward, sigmoid_bce, channel_stats)
