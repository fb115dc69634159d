"""Fused layers: an nn.Sequential that runs conv -> BatchNorm -> activation runs as fused ops.

FusedSequential keeps the very same child modules as the Sequential it replaces, so its
state_dict keys, ``.apply(init_fn)``, optimizers and checkpoints are unchanged; only its
forward differs.
"""
from collections import OrderedDict

from torch import nn

from ..ops import backends
from ..ops.functional import conv_bn_act, fused_layout
from . import fused_conv
from .plan import FusedStep, check_level, plan

class FusedSequential(nn.Sequential):
    """nn.Sequential whose conv/linear -> BatchNorm -> ReLU|LeakyReLU|Tanh runs are fused.

    The fusion is planned at construction: call :func:`fuse` again after editing the children.
    ``level``: "L1" (cuDNN convolutions) or "L2" (fastgan.fused_conv: Triton convolutions carrying BN and
    activation, for the layers it covers); settable later, e.g. with fastgan.fused_conv.set_level."""

    def __init__(self, *args, backend="auto", level="L1"):
        super().__init__(*args)
        self.backend = backends.check_name(backend)
        self.level = check_level(level)
        self._steps = plan(list(self._modules.items()))
        self._index = {name: i for i, name in enumerate(self._modules)}

    @property
    def fused_steps(self):
        return [step for step in self._steps if isinstance(step, FusedStep)]

    def forward(self, x, end=None):
        """Run the children with index < ``end`` (all by default)."""
        end = len(self) if end is None else end
        if self.level == "L2":
            return fused_conv.sequential_forward(self, x, end)
        modules = self._modules
        for step in self._steps:
            if isinstance(step, FusedStep):
                if step.last >= end:
                    break
                if not fused_layout(x, modules[step.conv]):  # e.g. a Linear on (N, L, F), an unbatched conv
                    for name in list(modules)[self._index[step.conv]:step.last + 1]:
                        x = modules[name](x)
                    continue
                bn = modules[step.bn] if step.bn is not None else None
                x = conv_bn_act(x, modules[step.conv], bn, step.act, step.slope, self.backend)
            else:
                if self._index[step] >= end:
                    break
                x = modules[step](x)
        return x

    def extra_repr(self):
        return f"backend={self.backend!r}, level={self.level!r}, fused={len(self.fused_steps)}"


def fuse(model, backend="auto"):
    """Make every nn.Sequential in ``model`` (and ``model`` itself) a FusedSequential sharing its modules.

    Parameters, buffers and state_dict keys stay the same.  Returns the fused model; it is ``model``
    itself unless ``model`` is an nn.Sequential.  A fused step runs its ops on the layouts they take,
    (N, C, H, W) for convolutions and (N, F) for Linear; other inputs the modules accept (a Linear on
    (N, L, F), an unbatched (C, H, W) convolution) run through the modules' own forward, as before fusing."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastgan.fuse expects a torch.nn.Module, got {type(model).__name__}; pass the model "
                        "(e.g. an nn.Sequential), not its parameters or output")
    backends.check_name(backend)
    if isinstance(model, nn.Sequential):
        return _fused(model, backend)
    for name, child in model.named_children():
        fused = fuse(child, backend)
        if fused is not child:
            setattr(model, name, fused)
    return model


def _fused(seq, backend):
    children = OrderedDict((name, fuse(child, backend)) for name, child in seq.named_children())
    fused = FusedSequential(children, backend=backend)
    fused.training = seq.training  # not .train(), which would reset the children's modes
    return fused
