"""Fusion level L2 for a FusedSequential: which of its layers run as one fastgan.ops.conv_chain, and how.

A layer runs at L2 when its conv is a 4x4 Conv2d/ConvTranspose2d without bias, groups or dilation, with
stride 2 and padding 1 (even input size for Conv2d), or the end layers 4x4 -> 1x1 (Conv2d k4s1p0) and
1x1 -> 4x4 (ConvTranspose2d k4s1p0); its BatchNorm2d (if any) uses batch statistics; the backend is
triton; and the chain's kernels have a tile that fits the GPU in the chain's dtype (kernels.tiling.l2_problem;
otherwise the layers run at L1, with a warning that says why).  Maximal runs of such layers become chains;
everything else runs at L1 (fastgan.ops.functional.conv_bn_act).

    fastgan.fused_conv.set_level(gan, "L2")

The chain's ops are re-exported here (``conv_chain``, ``conv_chain_backward``, ``ConvChain``, ``Link``,
``encode``, ``decode``) from fastgan.ops.conv_chain, where they are defined.
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..kernels import tiling
from ..kernels.geometry import Geometry
from ..ops import backends, triton_ops
from ..ops.contract import ACTIVATIONS
from ..ops.conv_chain import (ConvChain, Link, conv_chain, conv_chain_backward, decode, encode, last_bn_stats,
                              saved_views)
from ..ops.functional import bn_module_args, conv_bn_act
from .plan import LEVELS, FusedStep, check_level

__all__ = ["ConvChain", "Link", "conv_chain", "conv_chain_backward", "decode", "encode", "saved_views",
           "sequential_forward", "set_level"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def set_level(model, level):
    """Set the fusion level ("L1" or "L2") of every FusedSequential in ``model``; returns ``model``."""
    check_level(level)
    for module in model.modules():
        if getattr(module, "level", None) in LEVELS:  # a FusedSequential (fastgan.nn.layers imports this module)
            module.level = level
    return model


class _Layer(NamedTuple):
    """A conv -> BN? -> activation step of a FusedSequential that runs in a chain."""
    conv: nn.Module
    bn: Optional[nn.BatchNorm2d]
    act: str
    slope: float
    geometry: Geometry
    out_hw: tuple


def _geometry(conv, hw):
    """The kernels' Geometry of ``conv`` on an input of spatial size ``hw`` when it runs at L2, else None."""
    if type(conv) not in (nn.Conv2d, nn.ConvTranspose2d) or conv.bias is not None or conv.groups != 1:
        return None
    if conv.kernel_size != (4, 4) or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        return None
    up = type(conv) is nn.ConvTranspose2d
    if up and conv.output_padding != (0, 0):
        return None
    if conv.stride == (2, 2) and conv.padding == (1, 1) and (up or (hw[0] % 2 == 0 and hw[1] % 2 == 0)):
        return Geometry(up, 2, 1)
    if conv.stride == (1, 1) and conv.padding == (0, 0) and tuple(hw) == ((1, 1) if up else (4, 4)):
        return Geometry(up, 4, 0)
    return None


def _batch_stats_bn(bn):
    return (bn is None or (type(bn) is nn.BatchNorm2d and getattr(bn, "process_group", None) is None
                           and (bn.training or (bn.running_mean is None and bn.running_var is None))))


def _chain_dtype(x):
    """The dtype a chain on x runs in (_run_chain's)."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def _fits(x):
    """Whether the chain's kernels fit x's device in the chain's dtype; warns once with the reason if not."""
    problem = tiling.l2_problem(_chain_dtype(x), x.device)
    if problem is not None:
        backends.warn_once(f"fastgan: these layers run at fusion level L1, not L2: {problem}", stacklevel=3)
    return problem is None


def _extension(seq, x, chain, conv, bn):
    """(Geometry, output size) with which ``conv`` (-> ``bn``) extends ``chain`` (or starts one on x), or None."""
    if chain:
        channels, hw = chain[-1].conv.out_channels, chain[-1].out_hw
    elif (isinstance(x, Tensor) and x.dim() == 4 and x.dtype in _FLOATS
          and backends.resolve(seq.backend, x.device) == "triton" and _fits(x)):
        channels, hw = x.shape[1], tuple(x.shape[2:])
    else:
        return None
    geometry = _geometry(conv, hw)
    if geometry is None or conv.in_channels != channels or not _batch_stats_bn(bn):
        return None
    return geometry, geometry.out_size(*hw)


def sequential_forward(seq, x, end):
    """FusedSequential.forward at level L2: maximal runs of eligible layers as chains, the rest at L1."""
    modules, chain = seq._modules, []
    for step in seq._steps:
        if isinstance(step, FusedStep):
            if step.last >= end:
                break
            conv, bn, act, slope = modules[step.conv], modules[step.bn] if step.bn else None, step.act, step.slope
        else:
            if seq._index[step] >= end:
                break
            conv, bn, act, slope = modules[step], None, "none", 0.0
        extension = _extension(seq, x, chain, conv, bn)
        if extension is not None:
            chain.append(_Layer(conv, bn, act, slope, *extension))
            continue
        x = _run_chain(x, chain)
        chain = []
        x = conv_bn_act(x, conv, bn, act, slope, seq.backend) if isinstance(step, FusedStep) else modules[step](x)
    return _run_chain(x, chain)


def _run_chain(x, chain):
    """Run the _Layers of ``chain`` on x with conv_chain, then the last layer's BN + activation."""
    if not chain:
        return x
    weights = [layer.conv.weight for layer in chain]
    dtype = _chain_dtype(x)
    # Under autocast the weights stay in their dtype: the kernels cast and pack each once per version.
    weight_dtypes = {dtype}
    if torch.is_autocast_enabled(x.device.type):
        x, weight_dtypes = x.to(dtype), {dtype, torch.float32}
    for i, w in enumerate(weights):
        if w.dtype not in weight_dtypes or w.device != x.device:
            raise ValueError(f"layer {i} of the chain has {w.dtype} weights on {w.device} but its input is {dtype} "
                             f"on {x.device}; convert the model and the input to one dtype and device")
    links, gammas, betas, running_means, running_vars = [], [], [], [], []
    for k, layer in enumerate(chain):
        act = ACTIVATIONS[layer.act]
        if layer.bn is None:
            links.append(Link(*layer.geometry, False, False, False, act, layer.slope, 0.0, 0.0))
            continue
        shape = (x.shape[0], layer.conv.out_channels, *layer.out_hw)
        args = bn_module_args(layer.bn, torch.empty(shape, device="meta"))
        affine = args["weight"] is not None and k < len(chain) - 1
        track = args["running_mean"] is not None
        if affine:
            gammas.append(args["weight"])
            betas.append(args["bias"])
        if track:
            running_means.append(args["running_mean"])
            running_vars.append(args["running_var"])
        links.append(Link(*layer.geometry, True, affine, track, act, layer.slope, args["momentum"], args["eps"]))
    z, zs, stats = ConvChain.apply(x, len(weights), len(gammas), running_means, running_vars, *encode(links),
                                   torch.backends.cudnn.allow_tf32, *weights, *gammas, *betas)
    last, C = chain[-1], chain[-1].conv.out_channels
    if last.bn is not None:
        mean, invstd = last_bn_stats(stats, C)
        return triton_ops.bn_act(z, mean, invstd, last.bn.weight, last.bn.bias, True, ACTIVATIONS[last.act],
                          float(last.slope))
    if last.act != "none":
        return triton_ops.bn_act(z, None, None, None, None, False, ACTIVATIONS[last.act], float(last.slope))
    return z
