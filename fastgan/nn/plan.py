"""How a Sequential's children group into fused steps: conv/linear -> BatchNorm? -> activation.

``plan(modules)`` is shared by the level-L1 forward (fastgan.nn.layers) and the level-L2 one
(fastgan.nn.fused_conv), which both walk the same steps.
"""
from typing import NamedTuple, Optional

from torch import nn

from ..usage import UsageError

LEVELS = ("L1", "L2")  # fusion levels of a FusedSequential; see docs/design.md section 5


def check_level(level):
    if level not in LEVELS:
        raise UsageError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    return level


CONVS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)  # exact types: SyncBatchNorm and friends keep their own forward


class FusedStep(NamedTuple):
    conv: str
    bn: Optional[str]
    act: str
    slope: float
    last: int  # index of the last module the step covers


def _activation(module):
    if type(module) is nn.ReLU:
        return "relu", 0.0
    if type(module) is nn.LeakyReLU:
        return "leaky_relu", module.negative_slope
    if type(module) is nn.Tanh:
        return "tanh", 0.0
    return None


def _out_channels(conv):
    return conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels


def plan(modules):
    """Group an ordered list of (name, module) into FusedSteps and single module names."""
    steps, i = [], 0
    while i < len(modules):
        name, module = modules[i]
        if isinstance(module, CONVS):
            j, bn = i + 1, None
            follower = modules[j][1] if j < len(modules) else None
            if type(follower) in NORMS and follower.num_features == _out_channels(module):
                bn, j = modules[j][0], j + 1
            act = _activation(modules[j][1]) if j < len(modules) else None
            if act is not None:
                j += 1
            if bn is not None or act is not None:
                steps.append(FusedStep(name, bn, *(act or ("none", 0.0)), last=j - 1))
                i = j
                continue
        steps.append(name)
        i += 1
    return steps
