"""The triton backend: the op contract (fastgan.ops.contract) as ``torch.library`` custom ops in the
``fastgan`` namespace, over the kernels of kernels/bn_act.py and kernels/sigmoid_bce.py.

The kernels are imported inside the ops, on first use: importing fastgan must not import triton.
"""
from typing import Optional

import torch
from torch import Tensor

from .contract import register

@torch.library.custom_op("fastgan::channel_stats", mutates_args=("running_mean", "running_var"))
def channel_stats(z: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
                  eps: float) -> tuple[Tensor, Tensor]:
    from ..kernels import bn_act as kernels

    return kernels.channel_stats(z, running_mean, running_var, momentum, eps)


@torch.library.custom_op("fastgan::bn_act", mutates_args=())
def bn_act(z: Tensor, mean: Optional[Tensor], invstd: Optional[Tensor], weight: Optional[Tensor],
           bias: Optional[Tensor], batch_stats: bool, act: int, slope: float) -> Tensor:
    from ..kernels import bn_act as kernels

    return kernels.bn_act_forward(z, mean, invstd, weight, bias, act, slope)


@torch.library.custom_op("fastgan::bn_act_backward", mutates_args=())
def bn_act_backward(dy: Tensor, z: Tensor, mean: Optional[Tensor], invstd: Optional[Tensor],
                    weight: Optional[Tensor], bias: Optional[Tensor], batch_stats: bool, act: int,
                    slope: float) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels import bn_act as kernels

    return kernels.bn_act_backward(dy, z, mean, invstd, weight, bias, batch_stats, act, slope)


@torch.library.custom_op("fastgan::sigmoid_bce", mutates_args=())
def sigmoid_bce(logits: Tensor, target: float) -> tuple[Tensor, Tensor]:
    from ..kernels import sigmoid_bce as kernels

    return kernels.sigmoid_bce(logits, target)


register(bn_act, bn_act_backward, sigmoid_bce, channel_stats)
