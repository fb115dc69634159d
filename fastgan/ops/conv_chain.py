"""Fusion level L2: a run of conv -> BatchNorm -> activation layers as one chain of implicit-GEMM kernels.

Inside a chain each conv loads its input through the previous layer's BN + activation (the prologue) and
writes only its raw output z with per-channel statistics partials (the epilogue), so no post-activation
tensor reaches memory.  Backward mirrors it: each dgrad writes g = dy*act' of the layer below with the BN
backward sums, and the next dgrad/wgrad apply the BN backward map on load.  The last layer's BN + activation
runs as fastgan's fused bn_act op, so the chain's output is what the Sequential would give.

Which layers of a model run as a chain is decided in fastgan.nn.fused_conv.

Ops (namespace ``fastgan``):

``conv_chain(x, weights, gammas, betas, running_means, running_vars, layout, scalars, allow_tf32) -> (z, zs, stats)``
    z: the last conv's raw output, x's dtype; contiguous unless x is channels_last.  zs: the other convs'
    outputs z_k, flat in one buffer (channels_last views, :func:`saved_views`); stats: per BN layer its
    (mean, invstd) (2, C) and prologue map (3, C), flat, fp32 (fp64 for fp64).  gammas/betas: the affine BN
    parameters of every layer but the last; running stats: those of every tracking BN layer (updated in
    place).  layout/scalars: :func:`encode`.  Differentiable (through :class:`ConvChain`) in x, weights,
    gammas, betas; what backward needs is the z_k and the stats only.
``conv_chain_backward(dz, x, weights, gammas, zs, stats, layout, scalars, needs, allow_tf32)``
    -> (dx, dweights, dgammas, dbetas), the gradients of the chain given dz = dL/dz.  ``needs`` = [x, each
    weight, the BN parameters] as 0/1; an unneeded gradient is an empty tensor.
"""
from typing import NamedTuple

import torch
from torch import Tensor

from ..kernels import outputs
from ..kernels.geometry import Geometry
from .contract import stat_dtype
from .triton_ops import launch_guard


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
        return Geometry(self.up, self.stride, self.padding)


_INTS, _REALS = 7, 3


def encode(links):
    """Links -> (layout: list[int], scalars: list[float]), the ops' schema-friendly form."""
    layout = [int(v) for link in links for v in link[:_INTS]]
    scalars = [float(v) for link in links for v in link[_INTS:]]
    return layout, scalars


def decode(layout, scalars):
    links = []
    for i in range(len(layout) // _INTS):
        up, stride, padding, bn, affine, track, act = layout[i * _INTS:(i + 1) * _INTS]
        links.append(Link(bool(up), stride, padding, bool(bn), bool(affine), bool(track), act,
                          *scalars[i * _REALS:(i + 1) * _REALS]))
    return links


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


# The flat stats buffer holds, layer after layer, BN_ROWS x C per BN layer of C channels: its STATS_ROWS
# (mean, invstd), then its MAP_ROWS (the next prologue's map).
STATS_ROWS, MAP_ROWS = 2, 3
BN_ROWS = STATS_ROWS + MAP_ROWS


def _saved_sizes(links, shapes):
    """Elements of the flat zs and stats buffers."""
    zs = sum(N * C * H * W for N, C, H, W in shapes[:-1])
    return zs, sum(BN_ROWS * shape[1] for link, shape in zip(links, shapes) if link.bn)


def saved_views(links, shapes, zs, stats):
    """The flat buffers as ([z_k (N, C, H, W) channels_last], {layer: ((2, C) mean/invstd, (3, C) map)})."""
    views, offset = [], 0
    for N, C, H, W in shapes[:-1]:
        views.append(zs[offset:offset + N * C * H * W].view(N, H, W, C).permute(0, 3, 1, 2))
        offset += N * C * H * W
    bn, offset = {}, 0
    for k, (link, shape) in enumerate(zip(links, shapes)):
        if link.bn:
            C = shape[1]
            rows = stats[offset:offset + BN_ROWS * C].view(BN_ROWS, C)
            bn[k] = rows[:STATS_ROWS], rows[STATS_ROWS:]
            offset += BN_ROWS * C
    return views, bn


def last_bn_stats(stats, C):
    """The (2, C) mean/invstd of the chain's last layer, a BN of C channels: the buffer's last BN_ROWS x C."""
    return stats[stats.numel() - BN_ROWS * C:].view(BN_ROWS, C)[:STATS_ROWS]


# ----------------------------------------------------------------------------- the ops

@torch.library.custom_op("fastgan::conv_chain", mutates_args=("running_means", "running_vars"))
def conv_chain(x: Tensor, weights: list[Tensor], gammas: list[Tensor], betas: list[Tensor],
               running_means: list[Tensor], running_vars: list[Tensor], layout: list[int], scalars: list[float],
               allow_tf32: bool) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels import conv_gemm as cg

    with launch_guard("conv_chain", x, weights, gammas, betas, running_means, running_vars):
        links = decode(layout, scalars)
        shapes = _shapes(x, weights, links)
        n_zs, n_stats = _saved_sizes(links, shapes)
        zs = outputs.empty(n_zs, device=x.device, dtype=x.dtype)
        stats = outputs.empty(n_stats, device=x.device, dtype=stat_dtype(x))
        z_views, bn = saved_views(links, shapes, zs, stats)
        z_views.append(outputs.empty(shapes[-1], device=x.device, dtype=x.dtype, memory_format=_last_format(x)))
        gammas, betas, running_means, running_vars = map(iter, (gammas, betas, running_means, running_vars))
        src = cg.GemmInput(x)
        for k, (link, weight, z) in enumerate(zip(links, weights, z_views)):
            partials = cg.conv(src, weight, link.geometry, z, cg.EPI_STATS if link.bn else cg.EPI_STORE,
                               allow_tf32=allow_tf32)
            coef = None
            if link.bn:
                gamma, beta = (next(gammas), next(betas)) if link.affine else (None, None)
                running = (next(running_means), next(running_vars)) if link.track else (None, None)
                coef = cg.finalize_stats(partials, gamma, beta, *running, link.momentum, link.eps, out=bn[k])[1]
            src = cg.GemmInput(z, coef, act=link.act, slope=link.slope)
        return z_views[-1], zs, stats


@conv_chain.register_fake
def _conv_chain_fake(x, weights, gammas, betas, running_means, running_vars, layout, scalars, allow_tf32):
    links = decode(layout, scalars)
    shapes = _shapes(x, weights, links)
    n_zs, n_stats = _saved_sizes(links, shapes)
    z = torch.empty(shapes[-1], dtype=x.dtype, device=x.device, memory_format=_last_format(x))
    return z, x.new_empty(n_zs), x.new_empty(n_stats, dtype=stat_dtype(x))


@torch.library.custom_op("fastgan::conv_chain_backward", mutates_args=())
def conv_chain_backward(dz: Tensor, x: Tensor, weights: list[Tensor], gammas: list[Tensor], zs: Tensor,
                        stats: Tensor, layout: list[int], scalars: list[float], needs: list[int],
                        allow_tf32: bool) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    from ..kernels import conv_gemm as cg

    with launch_guard("conv_chain_backward", dz, x, weights, gammas, zs, stats):
        links = decode(layout, scalars)
        zs, bn = saved_views(links, _shapes(x, weights, links), zs, stats)
        need_x, need_w, need_bn = bool(needs[0]), [bool(n) for n in needs[1:-1]], bool(needs[-1])
        affine = [k for k, link in enumerate(links) if link.affine]  # the layers whose gamma/beta were passed
        gamma_of = dict(zip(affine, gammas))
        # The lowest layer that wants a gradient: the dgrads stop above it.
        lowest = -1 if need_x else min([k for k, link in enumerate(links) if need_w[k] or (need_bn and link.affine)],
                                       default=len(links))

        def activation(k):
            """Link k's output as the next layer loads it (forward prologue)."""
            if k < 0:
                return cg.GemmInput(x)
            coef = bn[k][1] if links[k].bn else None
            return cg.GemmInput(zs[k], coef, act=links[k].act, slope=links[k].slope)

        dx = x.new_empty(0)
        dweights = [w.new_empty(0) for w in weights]
        dgammas, dbetas = [g.new_empty(0) for g in gammas], [g.new_empty(0) for g in gammas]
        grad = cg.GemmInput(dz)
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
            below, z_below = links[k - 1], zs[k - 1]
            stats_below, coef_below = bn.get(k - 1, (None, None))
            g = outputs.empty_like(z_below)
            partials = cg.conv(grad, weight, link.geometry.transposed(), g, cg.EPI_GRAD,
                               below=(z_below, stats_below, coef_below, below.act, below.slope), allow_tf32=allow_tf32)
            if below.bn:
                sums, back = cg.finalize_grad(partials, stats_below, gamma_of.get(k - 1))
                if below.affine:
                    i = affine.index(k - 1)
                    dbetas[i], dgammas[i] = (row.to(gammas[i].dtype, copy=True) for row in sums)
                grad = cg.GemmInput(g, back, q=z_below)
            else:
                grad = cg.GemmInput(g)
        return dx, dweights, dgammas, dbetas


@conv_chain_backward.register_fake
def _conv_chain_backward_fake(dz, x, weights, gammas, zs, stats, layout, scalars, needs, allow_tf32):
    dx = torch.empty_like(x) if needs[0] else x.new_empty(0)
    dweights = [w.new_empty(w.shape if need else 0) for w, need in zip(weights, needs[1:-1])]
    return dx, dweights, *([g.new_empty(g.shape if needs[-1] else 0) for g in gammas] for _ in range(2))


# ConvChain.apply's *weights, *gammas, *betas: after x and the 7 arguments that take no gradient.
APPLY_PARAMS = slice(8, None)


class ConvChain(torch.autograd.Function):
    """Autograd for conv_chain.  (torch.library registers no autograd formula for an op that mutates its
    inputs, and conv_chain updates the running stats in its finalize kernels.)

    apply(x, n_weights, n_gammas, running_means, running_vars, layout, scalars, allow_tf32, *weights, *gammas,
    *betas) -> (z, zs, stats)"""

    @staticmethod
    def forward(ctx, x, n_weights, n_gammas, running_means, running_vars, layout, scalars, allow_tf32, *params):
        weights, gammas = params[:n_weights], params[n_weights:n_weights + n_gammas]
        betas = params[n_weights + n_gammas:]
        z, zs, stats = conv_chain(x, list(weights), list(gammas), list(betas), running_means, running_vars, layout,
                                  scalars, allow_tf32)
        ctx.mark_non_differentiable(zs, stats)
        # zs and stats take no gradient: autograd passes None for them instead of zero tensors of their size.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, zs, stats, *weights, *gammas)
        ctx.config = (n_weights, layout, scalars, allow_tf32)
        return z, zs, stats

    @staticmethod
    def backward(ctx, dz, _dzs, _dstats):
        if dz is None:  # grads are not materialised: z took none either
            return (None,) * len(ctx.needs_input_grad)
        n_weights, layout, scalars, allow_tf32 = ctx.config
        x, zs, stats, *params = ctx.saved_tensors
        need_x, need_params = ctx.needs_input_grad[0], ctx.needs_input_grad[APPLY_PARAMS]
        need_w, need_bn = need_params[:n_weights], any(need_params[n_weights:])
        dx, dweights, dgammas, dbetas = conv_chain_backward(
            dz, x, params[:n_weights], params[n_weights:], zs, stats, layout, scalars,
            [int(need_x), *map(int, need_w), int(need_bn)], allow_tf32)
        grads = [*dweights, *dgammas, *dbetas]
        return (dx if need_x else None, *[None] * (APPLY_PARAMS.start - 1),
                *(g if need else None for g, need in zip(grads, need_params)))
