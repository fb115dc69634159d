"""The C++/CUDA backend: the op contract (fastgan.ops.contract) as the extension's ops, namespace ``fastgan_ext``.

Same schemas as fastgan.ops.triton_ops, with the same fake kernels and autograd; the CPU and CUDA kernels live
in csrc/.  Importing this module builds the extension on first use (fastgan.ops.extension) and raises
fastgan.BackendUnavailable, with the reason, when it cannot be built.
"""
import torch

from ..kernels import outputs
from . import extension
from .contract import register

extension.load_library()

channel_stats = torch.ops.fastgan_ext.channel_stats.default
bn_act = torch.ops.fastgan_ext.bn_act.default
bn_act_backward = torch.ops.fastgan_ext.bn_act_backward.default
sigmoid_bce = torch.ops.fastgan_ext.sigmoid_bce.default

register(bn_act, bn_act_backward, sigmoid_bce, channel_stats)


def poison_outputs(enabled):
    """Fill every output of the extension's kernels with NaN first (tests do, to catch unwritten elements).

    Returns the previous setting."""
    return torch.ops.fastgan_ext._poison_outputs(bool(enabled))


poison_outputs(outputs.POISON_OUTPUTS)  # the Triton kernels' switch, so that tests set one flag for both
