"""Fusion level L2: a run of conv -> BatchNorm -> activation layers as one chain of implicit-GEMM kernels.

Inside a chain each conv loads its input through the previous layer's BN + activation (the prologue) and
writes only its raw output z with per-channel statistics partials (the epilogue), so no post-activation
tensor reaches memory.  Backward mirrors it: each dgrad writes g = dy*act' of the layer below with the BN
backward sums, and the next dgrad/wgrad apply the BN backward map on load.  The last layer's BN + activation
runs as fastgan's fused bn_act op, so the chain's output is what the Sequential would give.

A layer runs at L2 when its conv is a 4x4 Conv2d/ConvTranspose2d without bias, groups or dilation, with
stride 2 and padding 1 (even input size for Conv2d), or the end layers 4x4 -> 1x1 (Conv2d k4s1p0) and
1x1 -> 4x4 (ConvTranspose2d k4s1p0); its BatchNorm2d (if any) uses batch statistics; and the backend is
triton.  Everything else in the Sequential runs at L1 (fastgan.functional.conv_bn_act).

Ops (namespace ``fastgan``):

``conv_chain(x, weights, gammas, betas, running_means, running_vars, layout, scalars, allow_tf32) -> (z, saved)``
    z: the last conv's raw output, x's dtype; contiguous unless x is channels_last.  saved: the other convs'
    outputs z_k (channels_last), then per BN layer its stats (2, C) = (mean, invstd) and prologue map
    (3, C), fp32 (fp64 for fp64).  gammas/betas: the affine BN parameters of every layer but the last;
    running stats: those of every tracking BN layer (updated in place).  layout/scalars: :func:`encode`.
    Differentiable in x, weights, gammas, betas; saved tensors are the z_k and stats only.
``conv_chain_backward(dz, x, weights, gammas, saved, layout, scalars, needs, allow_tf32) -> (dx, dweights, dgammas, dbetas)``
    Gradients of the chain given dz = dL/dz; ``needs`` = [x, each weight, the BN parameters] as 0/1; an
    unneeded gradient is an empty tensor.
"""
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import backends
from .functional import bn_module_args, conv_bn_act
from .layers import FusedSequential, FusedStep
from .ops import ACTIVATIONS

LEVELS = ("L1", "L2")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class Link(NamedTuple):
    """One conv -> BN? -> activation layer of a chain, as the ops see it."""
    up: bool        # ConvTranspose2d
    stride: int     # 2 (k4s2p1), or 4 for the 1x1 <-> 4x4 end layers
    padding: int
    bn: bool        # a batch-statistics BatchNorm follows
    affine: bool    # its gamma/beta are passed (never for the last layer, whose BN runs outside the chain)
    track: bool     # its running stats are passed
    act: int        # ACTIVATIONS code
    slope: float
    momentum: float
    eps: float

    @property
    def geometry(self):
        from .kernels.conv_gemm import Geometry

        return Geometry(self.up, self.stride, self.padding)


_INTS, _REALS = 7, 3


def encode(links):
    """Links -> (layout: list[int], scalars: list[float]), the ops' schema-friendly form."""
    layout = [int(v) for link in links for v in link[:_INTS]]
    scalars = [float(v) for link in links for v in link[_INTS:]]
    return layout, scalars


def decode(layout, scalars):
    return [Link(*(bool(v) for v in layout[i * _INTS:i * _INTS + 3]), bool(layout[i * _INTS + 3]),
                 bool(layout[i * _INTS + 4]), bool(layout[i * _INTS + 5]), layout[i * _INTS + 6],
                 *scalars[i * _REALS:(i + 1) * _REALS])
            for i in range(len(layout) // _INTS)]


def _out_channels(link, weight):
    return weight.shape[1] if link.up else weight.shape[0]


def _shapes(x, weights, links):
    """(N, C, H, W) of each link's output."""
    shapes, (N, _, h, w) = [], x.shape
    for link, weight in zip(links, weights):
        h, w = link.geometry.out_size(h, w)
        shapes.append((N, _out_channels(link, weight), h, w))
    return shapes


def _last_format(x):
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _stat_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _unpack(saved, links):
    """saved -> (zs, {link index: (stats, coef)})."""
    zs, rest, bn = saved[:len(links) - 1], iter(saved[len(links) - 1:]), {}
    for k, link in enumerate(links):
        if link.bn:
            bn[k] = (next(rest), next(rest))
    return zs, bn


# ----------------------------------------------------------------------------- the ops

@torch.library.custom_op("fastgan::conv_chain", mutates_args=("running_means", "running_vars"))
def conv_chain(x: Tensor, weights: list[Tensor], gammas: list[Tensor], betas: list[Tensor],
               running_means: list[Tensor], running_vars: list[Tensor], layout: list[int], scalars: list[float],
               allow_tf32: bool) -> tuple[Tensor, list[Tensor]]:
    from .kernels import conv_gemm as cg
    from .kernels import outputs

    links = decode(layout, scalars)
    gammas, betas, running_means, running_vars = map(iter, (gammas, betas, running_means, running_vars))
    src, zs, bn_saved = cg.Operand(x), [], []
    for k, (link, weight, shape) in enumerate(zip(links, weights, _shapes(x, weights, links))):
        last = k == len(links) - 1
        z = outputs.empty(shape, device=x.device, dtype=x.dtype,
                          memory_format=_last_format(x) if last else torch.channels_last)
        partials = cg.conv(src, weight, link.geometry, z, cg.EPI_STATS if link.bn else cg.EPI_STORE,
                           allow_tf32=allow_tf32)
        coef = None
        if link.bn:
            gamma, beta = (next(gammas), next(betas)) if link.affine else (None, None)
            running = (next(running_means), next(running_vars)) if link.track else (None, None)
            stats, coef = cg.finalize_stats(partials, gamma, beta, *running, link.momentum, link.eps)
            bn_saved += [stats, coef]
        src = cg.Operand(z, coef, act=link.act, slope=link.slope)
        if not last:
            zs.append(z)
    return z, zs + bn_saved


@conv_chain.register_fake
def _conv_chain_fake(x, weights, gammas, betas, running_means, running_vars, layout, scalars, allow_tf32):
    links = decode(layout, scalars)
    shapes = _shapes(x, weights, links)
    zs = [x.new_empty(shape).contiguous(memory_format=torch.channels_last) for shape in shapes[:-1]]
    bn_saved = []
    for link, shape in zip(links, shapes):
        if link.bn:
            bn_saved += [x.new_empty((2, shape[1]), dtype=_stat_dtype(x)), x.new_empty((3, shape[1]),
                                                                                       dtype=_stat_dtype(x))]
    z = x.new_empty(shapes[-1]).contiguous(memory_format=_last_format(x))
    return z, zs + bn_saved


@torch.library.custom_op("fastgan::conv_chain_backward", mutates_args=())
def conv_chain_backward(dz: Tensor, x: Tensor, weights: list[Tensor], gammas: list[Tensor], saved: list[Tensor],
                        layout: list[int], scalars: list[float], needs: list[int],
                        allow_tf32: bool) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    from .kernels import conv_gemm as cg
    from .kernels import outputs

    links = decode(layout, scalars)
    zs, bn = _unpack(saved, links)
    need_x, need_w, need_bn = bool(needs[0]), [bool(n) for n in needs[1:-1]], bool(needs[-1])
    gamma_of = dict(zip([k for k, link in enumerate(links) if link.affine], gammas))
    # The lowest layer that wants a gradient: the dgrads stop above it.
    lowest = -1 if need_x else min([k for k, link in enumerate(links) if need_w[k] or (need_bn and link.affine)],
                                   default=len(links))

    def activation(k):
        """Link k's output as the next layer loads it (forward prologue)."""
        if k < 0:
            return cg.Operand(x)
        coef = bn[k][1] if links[k].bn else None
        return cg.Operand(zs[k], coef, act=links[k].act, slope=links[k].slope)

    dx = x.new_empty(0)
    dweights = [w.new_empty(0) for w in weights]
    dgammas, dbetas = {}, {}
    grad = cg.Operand(dz)
    for k in reversed(range(len(links))):
        link, weight = links[k], weights[k]
        if need_w[k]:
            lo, hi = (activation(k - 1), grad) if link.up else (grad, activation(k - 1))
            dweights[k] = cg.wgrad(lo, hi, link.geometry, allow_tf32).to(weight.dtype)
        if k - 1 < lowest:
            break
        if k == 0:
            dx = outputs.empty_like(x)
            cg.conv(grad, weight, link.geometry.transposed(), dx, allow_tf32=allow_tf32)
            break
        below = links[k - 1]
        stats, coef = bn.get(k - 1, (None, None))
        g = outputs.empty_like(zs[k - 1])
        partials = cg.conv(grad, weight, link.geometry.transposed(), g, cg.EPI_GRAD,
                           below=(zs[k - 1], stats, coef, below.act, below.slope), allow_tf32=allow_tf32)
        if below.bn:
            sums, back = cg.finalize_grad(partials, stats, gamma_of.get(k - 1))
            if below.affine:
                gamma = gamma_of[k - 1]
                dbetas[k - 1], dgammas[k - 1] = sums[0].to(gamma.dtype, copy=True), sums[1].to(gamma.dtype, copy=True)
            grad = cg.Operand(g, back, q=zs[k - 1])
        else:
            grad = cg.Operand(g)
    order = sorted(gamma_of)
    return (dx, dweights, [dgammas.get(k, gamma_of[k].new_empty(0)) for k in order],
            [dbetas.get(k, gamma_of[k].new_empty(0)) for k in order])


@conv_chain_backward.register_fake
def _conv_chain_backward_fake(dz, x, weights, gammas, saved, layout, scalars, needs, allow_tf32):
    dx = torch.empty_like(x) if needs[0] else x.new_empty(0)
    dweights = [w.new_empty(w.shape) if need else w.new_empty(0) for w, need in zip(weights, needs[1:-1])]
    dgammas = [g.new_empty(g.shape) if needs[-1] else g.new_empty(0) for g in gammas]
    return dx, dweights, dgammas, [g.new_empty(g.shape) if needs[-1] else g.new_empty(0) for g in gammas]


def _chain_setup(ctx, inputs, output):
    x, weights, gammas, betas, running_means, running_vars, layout, scalars, allow_tf32 = inputs
    saved = output[1]
    ctx.mark_non_differentiable(*saved)
    ctx.save_for_backward(x, *weights, *gammas, *saved)
    ctx.config = (len(weights), len(gammas), len(running_means), layout, scalars, allow_tf32)


def _chain_grad(ctx, dz, _dsaved):
    n_weights, n_gammas, n_running, layout, scalars, allow_tf32 = ctx.config
    x, *rest = ctx.saved_tensors
    weights, gammas, saved = rest[:n_weights], rest[n_weights:n_weights + n_gammas], rest[n_weights + n_gammas:]
    need_x, need_w, need_gammas, need_betas = ctx.needs_input_grad[:4]
    need_bn = any(need_gammas) or any(need_betas)
    dx, dweights, dgammas, dbetas = conv_chain_backward(
        dz, x, list(weights), list(gammas), list(saved), layout, scalars,
        [int(need_x), *map(int, need_w), int(need_bn)], allow_tf32)

    def keep(grads, needed):
        return [g if n else None for g, n in zip(grads, needed)]

    return (dx if need_x else None, keep(dweights, need_w), keep(dgammas, need_gammas), keep(dbetas, need_betas),
            [None] * n_running, [None] * n_running, None, None, None)


torch.library.register_autograd("fastgan::conv_chain", _chain_grad, setup_context=_chain_setup)


# ----------------------------------------------------------------------------- FusedSequential at L2

def set_level(model, level):
    """Set the fusion level ("L1" or "L2") of every FusedSequential in ``model``; returns ``model``."""
    check_level(level)
    for module in model.modules():
        if isinstance(module, FusedSequential):
            module.level = level
    return model


def check_level(level):
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    return level


def _geometry(conv, hw):
    """(up, stride, padding) when ``conv`` on an input of spatial size ``hw`` runs at L2, else None."""
    if type(conv) not in (nn.Conv2d, nn.ConvTranspose2d) or conv.bias is not None or conv.groups != 1:
        return None
    if conv.kernel_size != (4, 4) or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        return None
    up = type(conv) is nn.ConvTranspose2d
    if up and conv.output_padding != (0, 0):
        return None
    if conv.stride == (2, 2) and conv.padding == (1, 1) and (up or (hw[0] % 2 == 0 and hw[1] % 2 == 0)):
        return up, 2, 1
    if conv.stride == (1, 1) and conv.padding == (0, 0) and tuple(hw) == ((1, 1) if up else (4, 4)):
        return up, 4, 0
    return None


def _batch_stats_bn(bn):
    return (bn is None or (type(bn) is nn.BatchNorm2d and getattr(bn, "process_group", None) is None
                           and (bn.training or (bn.running_mean is None and bn.running_var is None))))


def sequential_forward(seq, x, end):
    """FusedSequential.forward at level L2: maximal runs of eligible layers as chains, the rest at L1."""
    modules = seq._modules
    chain, channels, hw = [], None, None
    fused = (isinstance(x, Tensor) and x.dim() == 4 and x.dtype in _FLOATS
             and backends.resolve(seq.backend, x.device) == "triton")
    for step in seq._steps:
        if isinstance(step, FusedStep):
            if step.last >= end:
                break
            conv, bn, act, slope = modules[step.conv], modules[step.bn] if step.bn else None, step.act, step.slope
        else:
            if seq._index[step] >= end:
                break
            conv, bn, act, slope = modules[step], None, "none", 0.0
        if not chain:
            channels, hw = (x.shape[1], x.shape[2:]) if fused else (None, None)
        geometry = _geometry(conv, hw) if fused and conv.in_channels == channels else None
        if geometry is not None and _batch_stats_bn(bn) and conv.weight.dtype in _FLOATS:
            chain.append((conv, bn, act, slope, geometry))
            channels = conv.out_channels
            hw = Link(*geometry, *(False,) * 3, 0, 0.0, 0.0, 0.0).geometry.out_size(*hw)
            continue
        x = _run_chain(x, chain)
        chain = []
        x = conv_bn_act(x, conv, bn, act, slope, seq.backend) if isinstance(step, FusedStep) else modules[step](x)
        fused = fused and isinstance(x, Tensor) and x.dim() == 4 and x.dtype in _FLOATS
    return _run_chain(x, chain)


def _run_chain(x, chain):
    """Run ``chain`` [(conv, bn, act, slope, (up, stride, padding))] on x; then the last BN + activation."""
    if not chain:
        return x
    from . import ops

    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    x = x.to(dtype)
    weights = [conv.weight.to(dtype) for conv, *_ in chain]
    for i, w in enumerate(weights):
        if w.dtype != dtype or w.device != x.device:
            raise ValueError(f"layer {i} of the chain has {w.dtype} weights on {w.device} but its input is {dtype} "
                             f"on {x.device}; convert the model and the input to one dtype and device")
    links, gammas, betas, running_means, running_vars = [], [], [], [], []
    shape = x.shape
    for k, (conv, bn, act, slope, geometry) in enumerate(chain):
        shape = (shape[0], conv.out_channels, *Link(*geometry, *(False,) * 3, 0, 0.0, 0.0, 0.0).geometry.out_size(
            *shape[2:]))
        last = k == len(chain) - 1
        if bn is None:
            links.append(Link(*geometry, False, False, False, ACTIVATIONS[act], slope, 0.0, 0.0))
            continue
        args = bn_module_args(bn, torch.empty(shape, device="meta"))
        affine = args["weight"] is not None and not last
        track = args["running_mean"] is not None
        if affine:
            gammas.append(args["weight"])
            betas.append(args["bias"])
        if track:
            running_means.append(args["running_mean"])
            running_vars.append(args["running_var"])
        links.append(Link(*geometry, True, affine, track, ACTIVATIONS[act], slope, args["momentum"], args["eps"]))
    z, saved = conv_chain(x, weights, gammas, betas, running_means, running_vars, *encode(links),
                          torch.backends.cudnn.allow_tf32)
    conv, bn, act, slope, _ = chain[-1]
    if bn is not None:
        mean, invstd = saved[-2]
        return ops.bn_act(z, mean, invstd, bn.weight, bn.bias, True, ACTIVATIONS[act], float(slope))
    if act != "none":
        return ops.bn_act(z, None, None, None, None, False, ACTIVATIONS[act], float(slope))
    return z
