"""BatchNorm + activation (and activation alone), forward and backward, in Triton.

A tensor z of shape (N, C, *spatial) is viewed as (N, L, C) with l running over the
flattened spatial positions; its strides (s_n, s_l, s_c) cover NCHW (s_l = 1) and
channels_last (s_c = 1) without a copy.  Kernels work on [BLOCK_N, BLOCK_L, BLOCK_C]
tiles, with no index division, so Triton sees (and vectorises) the contiguous axis:
the launcher makes the tile long in l for NCHW and wide in c for channels_last.

Statistics:         partial moments (count, mean, M2) per (split, channel) -> finalize
                    (mean, invstd, running-stat update).
Forward:            y = act(z*scale + shift), from batch or running statistics.
Backward:           reduce sum(g), sum(g*xhat) per split -> finalize (the per-channel sums, each
                    partial read once) -> apply dz, where g = dy*act'(pre) is recomputed from z;
                    y is never read.
The reductions (Reduction, from reduction()) split each channel block's (n, l) tiles into ranges, enough
programs for 4 waves of the GPU's SMs where the tensor has the tiles; a program accumulates per lane of
its tile, in registers, and reduces across the tile once, after its loop.
Without BN the forward and backward are a single elementwise pass, over flat rows of z's memory when they
can be (16-byte vectors whatever the channel count).  The elementwise passes run on a 1-D grid (axes y and
z hold at most 65,535 programs); every index is int32, which the launchers check.

ACT (a constexpr): an activation code of kernels/activations.py, compared with the names below.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import activations, outputs, tiling

NO_ACTIVATION = tl.constexpr(activations.NONE)
RELU = tl.constexpr(activations.RELU)
LEAKY_RELU = tl.constexpr(activations.LEAKY_RELU)  # pre * slope below zero
TANH = tl.constexpr(activations.TANH)


@triton.jit
def _tanh(x):
    # exp-based so it also runs under the interpreter (no libdevice); stable for any |x|.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _activate(pre, slope, ACT: tl.constexpr):
    # ReLU and LeakyReLU in pre's own dtype (bf16: two lanes an instruction), as min/max that propagate NaN as
    # torch does; Tanh in fp32 or fp64.  act(0) = 0 for every activation (the convolutions' prologue relies on it).
    if ACT == RELU:
        return tl.maximum(pre, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == LEAKY_RELU:
        # pre*slope lies between 0 and pre for slope <= 1 (else beyond pre), so the larger (smaller) of the two
        # is pre above zero and pre*slope below it.
        scaled = pre * tl.cast(slope, pre.dtype)
        if slope <= 1.0:
            out = tl.maximum(pre, scaled, propagate_nan=tl.PropagateNan.ALL)
        else:
            out = tl.minimum(pre, scaled, propagate_nan=tl.PropagateNan.ALL)
        return out
    elif ACT == TANH:
        return _tanh(pre)
    else:
        return pre


@triton.jit
def _activation_grad(dy, pre, slope, ACT: tl.constexpr):
    if ACT == RELU:
        return tl.where(pre <= 0, 0.0, dy)
    elif ACT == LEAKY_RELU:
        return tl.where(pre > 0, dy, dy * slope)
    elif ACT == TANH:
        t = _tanh(pre)
        return dy * (1.0 - t * t)
    else:
        return dy


@triton.jit
def _tile(n0, l0, c0, N, L, C, s_n, s_l, s_c,
          BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets and mask of the [BLOCK_N, BLOCK_L, BLOCK_C] tile at (n0, l0, c0)."""
    n = n0 + tl.arange(0, BLOCK_N)[:, None, None]
    l = l0 + tl.arange(0, BLOCK_L)[None, :, None]
    c = c0 + tl.arange(0, BLOCK_C)[None, None, :]
    return n * s_n + l * s_l + c * s_c, (n < N) & (l < L) & (c < C)


@triton.jit
def _tile_origin(N, L, C, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """(n0, l0, c0) of this program's tile: the 1-D grid runs over the tiles with c fastest, then l, then n."""
    pid = tl.program_id(0)
    c_tiles = tl.cdiv(C, BLOCK_C)
    l_tiles = tl.cdiv(L, BLOCK_L)
    return (pid // (c_tiles * l_tiles)) * BLOCK_N, (pid // c_tiles % l_tiles) * BLOCK_L, (pid % c_tiles) * BLOCK_C


@triton.jit
def _per_channel(v):
    """[BLOCK_C] vector -> broadcastable against a tile."""
    return v[None, None, :]


@triton.jit
def _sum_nl(x):
    return tl.sum(tl.sum(x, 0), 0)


@triton.jit
def _channel_affine(mean_ptr, invstd_ptr, weight_ptr, bias_ptr, cols, col_mask, AFFINE: tl.constexpr):
    """(mean, invstd, gamma, beta) of a block of channels, in the accumulation dtype."""
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=col_mask, other=0.0)
    if AFFINE:
        gamma = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(mean.dtype)
        beta = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(mean.dtype)
    else:
        gamma = tl.full(mean.shape, 1.0, mean.dtype)
        beta = tl.zeros(mean.shape, mean.dtype)
    return mean, invstd, gamma, beta


@triton.jit
def _split_tiles(L, BLOCK_L: tl.constexpr, tiles_per_split, tiles):
    """(first, end, l_tiles): this program's split, tiles [first, end) of the `tiles` (n, l) tiles of a channel
    block, numbered n-block-major: tile t is n-block t // l_tiles, l-block t % l_tiles."""
    first = tl.program_id(1) * tiles_per_split
    return first, tl.minimum(first + tiles_per_split, tiles), tl.cdiv(L, BLOCK_L)


# tiles_per_split and tiles unspecialised: a value of 1 or a multiple of 16 would compile another variant.
@triton.jit(do_not_specialize=["tiles_per_split", "tiles"])
def _moments_kernel(z_ptr, part_ptr, N, L, C, s_n, s_l, s_c, tiles_per_split, tiles,
                    ACC: tl.constexpr, EVEN: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per (split, channel): count, mean and M2 of the split's tiles.  Each lane of the tile runs Welford over
    the values it meets (registers only); the lanes merge once, at the end, in the k-way form of Chan's update.
    EVEN: BLOCK_N divides N and BLOCK_L divides L, so every lane (of a channel < C) meets a value in every tile
    and one weight serves them all.  part_ptr: (3, splits, C), count, mean, M2."""
    c0 = tl.program_id(0) * BLOCK_C
    first, end, l_tiles = _split_tiles(L, BLOCK_L, tiles_per_split, tiles)
    count = tl.zeros([BLOCK_N, BLOCK_L, BLOCK_C], ACC)
    mean = tl.zeros([BLOCK_N, BLOCK_L, BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_N, BLOCK_L, BLOCK_C], ACC)
    for t in range(first, end):
        offs, mask = _tile(t // l_tiles * BLOCK_N, t % l_tiles * BLOCK_L, c0, N, L, C, s_n, s_l, s_c,
                           BLOCK_N, BLOCK_L, BLOCK_C)
        x = tl.load(z_ptr + offs, mask=mask, other=0.0).to(ACC)
        if EVEN:
            w = 1.0 / (t - first + 1).to(ACC)
            d = x - mean
        else:
            count += tl.where(mask, 1.0, 0.0)
            w = 1.0 / tl.maximum(count, 1.0)
            d = tl.where(mask, x - mean, 0.0)
        mean += d * w
        m2 += d * (x - mean)
    if EVEN:
        count += (end - first).to(ACC)
    total = _sum_nl(count)
    split_mean = _sum_nl(count * mean) / tl.maximum(total, 1.0)
    dev = mean - _per_channel(split_mean)
    split_m2 = _sum_nl(m2 + count * dev * dev)
    cols = c0 + tl.arange(0, BLOCK_C)
    at = tl.program_id(1) * C + cols
    splits_c = tl.num_programs(1) * C
    tl.store(part_ptr + at, total, mask=cols < C)
    tl.store(part_ptr + splits_c + at, split_mean, mask=cols < C)
    tl.store(part_ptr + 2 * splits_c + at, split_m2, mask=cols < C)


@triton.jit
def _partials(s0, n_splits, cols, col_mask, C, BLOCK_S: tl.constexpr):
    """Offsets and mask of the [BLOCK_S, BLOCK_C] (split, channel) partials of splits s0.. and channels cols."""
    splits = s0 + tl.arange(0, BLOCK_S)
    return splits[:, None] * C + cols[None, :], (splits < n_splits)[:, None] & col_mask[None, :]


@triton.jit
def update_running_stats(running_mean_ptr, running_var_ptr, cols, col_mask, mean, var, count, momentum):
    """running = (1 - momentum)*running + momentum*batch, with the unbiased variance, as nn.BatchNorm does."""
    running_mean = tl.load(running_mean_ptr + cols, mask=col_mask, other=0.0).to(mean.dtype)
    running_var = tl.load(running_var_ptr + cols, mask=col_mask, other=0.0).to(mean.dtype)
    running_mean = (1.0 - momentum) * running_mean + momentum * mean
    running_var = (1.0 - momentum) * running_var + momentum * var * (count / (count - 1.0))
    tl.store(running_mean_ptr + cols, running_mean.to(running_mean_ptr.dtype.element_ty), mask=col_mask)
    tl.store(running_var_ptr + cols, running_var.to(running_var_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _finalize_kernel(part_ptr, mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr, M, C, n_splits, momentum,
                     eps, UPDATE_RUNNING: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge the split moments in the k-way form (two passes over the partials, BLOCK_S splits at a time, summed
    per lane and reduced once); write mean, invstd (biased var) and update the running stats (unbiased var)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    weighted = tl.zeros([BLOCK_S, BLOCK_C], part_ptr.dtype.element_ty)  # count*mean of each split
    for s0 in range(0, n_splits, BLOCK_S):
        offs, mask = _partials(s0, n_splits, cols, col_mask, C, BLOCK_S)
        weighted += tl.load(part_ptr + offs, mask=mask, other=0.0) * tl.load(part_ptr + n_splits * C + offs,
                                                                             mask=mask, other=0.0)
    mean = tl.sum(weighted, 0) / M  # M = N*L, the sum of the counts
    m2 = tl.zeros([BLOCK_S, BLOCK_C], part_ptr.dtype.element_ty)
    for s0 in range(0, n_splits, BLOCK_S):
        offs, mask = _partials(s0, n_splits, cols, col_mask, C, BLOCK_S)
        count = tl.load(part_ptr + offs, mask=mask, other=0.0)
        d = tl.where(mask, tl.load(part_ptr + n_splits * C + offs, mask=mask, other=0.0) - mean[None, :], 0.0)
        m2 += tl.load(part_ptr + 2 * n_splits * C + offs, mask=mask, other=0.0) + count * d * d
    var = tl.sum(m2, 0) / M
    tl.store(mean_ptr + cols, mean, mask=col_mask)
    tl.store(invstd_ptr + cols, 1.0 / tl.sqrt(var + eps), mask=col_mask)
    if UPDATE_RUNNING:
        update_running_stats(running_mean_ptr, running_var_ptr, cols, col_mask, mean, var, M, momentum)


@triton.jit
def _forward_kernel(z_ptr, y_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, N, L, C, s_n, s_l, s_c, slope,
                    NORMALIZE: tl.constexpr, AFFINE: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = act(z*scale + shift), scale = gamma*invstd, shift = beta - mean*scale (identity without BN)."""
    n0, l0, c0 = _tile_origin(N, L, C, BLOCK_N, BLOCK_L, BLOCK_C)
    offs, mask = _tile(n0, l0, c0, N, L, C, s_n, s_l, s_c, BLOCK_N, BLOCK_L, BLOCK_C)
    pre = tl.load(z_ptr + offs, mask=mask, other=0.0).to(ACC)
    if NORMALIZE:
        cols = c0 + tl.arange(0, BLOCK_C)
        mean, invstd, gamma, beta = _channel_affine(mean_ptr, invstd_ptr, weight_ptr, bias_ptr, cols, cols < C,
                                                    AFFINE)
        scale = gamma * invstd
        pre = pre * _per_channel(scale) + _per_channel(beta - mean * scale)
    y = _activate(pre, slope, ACT)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["tiles_per_split", "tiles"])
def _backward_reduce_kernel(dy_ptr, z_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, sum_g_part_ptr,
                            sum_gx_part_ptr, N, L, C, s_n, s_l, s_c, g_n, g_l, g_c, slope, tiles_per_split, tiles,
                            AFFINE: tl.constexpr, ACT: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per (split, channel): sum(g) and sum(g*xhat), g = dy*act'(pre) recomputed from z, summed per lane over the
    split's tiles and across the lanes once, at the end."""
    c0 = tl.program_id(0) * BLOCK_C
    cols = c0 + tl.arange(0, BLOCK_C)
    mean, invstd, gamma, beta = _channel_affine(mean_ptr, invstd_ptr, weight_ptr, bias_ptr, cols, cols < C, AFFINE)
    first, end, l_tiles = _split_tiles(L, BLOCK_L, tiles_per_split, tiles)
    sum_g = tl.zeros([BLOCK_N, BLOCK_L, BLOCK_C], mean.dtype)
    sum_gx = tl.zeros([BLOCK_N, BLOCK_L, BLOCK_C], mean.dtype)
    for t in range(first, end):
        n0, l0 = t // l_tiles * BLOCK_N, t % l_tiles * BLOCK_L
        offs, mask = _tile(n0, l0, c0, N, L, C, s_n, s_l, s_c, BLOCK_N, BLOCK_L, BLOCK_C)
        g_offs, _ = _tile(n0, l0, c0, N, L, C, g_n, g_l, g_c, BLOCK_N, BLOCK_L, BLOCK_C)
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(mean.dtype)
        dy = tl.load(dy_ptr + g_offs, mask=mask, other=0.0).to(mean.dtype)
        xhat = (z - _per_channel(mean)) * _per_channel(invstd)
        g = _activation_grad(dy, xhat * _per_channel(gamma) + _per_channel(beta), slope, ACT)
        g = tl.where(mask, g, 0.0)
        sum_g += g
        sum_gx += g * xhat
    tl.store(sum_g_part_ptr + tl.program_id(1) * C + cols, _sum_nl(sum_g), mask=cols < C)
    tl.store(sum_gx_part_ptr + tl.program_id(1) * C + cols, _sum_nl(sum_gx), mask=cols < C)


@triton.jit
def _backward_finalize_kernel(sum_g_part_ptr, sum_gx_part_ptr, sum_g_ptr, sum_gx_ptr, C, n_splits,
                              BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """sum(g) and sum(g*xhat) per channel from the split partials, each partial read once (BLOCK_S splits at a time,
    summed per lane and reduced once)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    sum_g = tl.zeros([BLOCK_S, BLOCK_C], sum_g_ptr.dtype.element_ty)
    sum_gx = tl.zeros([BLOCK_S, BLOCK_C], sum_gx_ptr.dtype.element_ty)
    for s0 in range(0, n_splits, BLOCK_S):
        offs, mask = _partials(s0, n_splits, cols, col_mask, C, BLOCK_S)
        sum_g += tl.load(sum_g_part_ptr + offs, mask=mask, other=0.0)
        sum_gx += tl.load(sum_gx_part_ptr + offs, mask=mask, other=0.0)
    tl.store(sum_g_ptr + cols, tl.sum(sum_g, 0), mask=col_mask)
    tl.store(sum_gx_ptr + cols, tl.sum(sum_gx, 0), mask=col_mask)


@triton.jit
def _backward_kernel(dy_ptr, z_ptr, dz_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, sum_g_ptr, sum_gx_ptr,
                     N, L, C, s_n, s_l, s_c, g_n, g_l, g_c, slope,
                     NORMALIZE: tl.constexpr, BATCH_STATS: tl.constexpr, AFFINE: tl.constexpr, ACT: tl.constexpr,
                     ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """dz = gamma*invstd*(g - sum(g)/M - xhat*sum(g*xhat)/M) (batch stats), gamma*invstd*g (running stats),
    or g (no BN); sum(g), sum(g*xhat) per channel come from the finalize."""
    n0, l0, c0 = _tile_origin(N, L, C, BLOCK_N, BLOCK_L, BLOCK_C)
    offs, mask = _tile(n0, l0, c0, N, L, C, s_n, s_l, s_c, BLOCK_N, BLOCK_L, BLOCK_C)
    g_offs, _ = _tile(n0, l0, c0, N, L, C, g_n, g_l, g_c, BLOCK_N, BLOCK_L, BLOCK_C)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + g_offs, mask=mask, other=0.0).to(ACC)
    if NORMALIZE:
        cols = c0 + tl.arange(0, BLOCK_C)
        col_mask = cols < C
        mean, invstd, gamma, beta = _channel_affine(mean_ptr, invstd_ptr, weight_ptr, bias_ptr, cols, col_mask,
                                                    AFFINE)
        xhat = (z - _per_channel(mean)) * _per_channel(invstd)
        g = _activation_grad(dy, xhat * _per_channel(gamma) + _per_channel(beta), slope, ACT)
        if BATCH_STATS:
            M = N * L
            sum_g = tl.load(sum_g_ptr + cols, mask=col_mask, other=0.0)
            sum_gx = tl.load(sum_gx_ptr + cols, mask=col_mask, other=0.0)
            g = g - _per_channel(sum_g / M) - xhat * _per_channel(sum_gx / M)
        dz = g * _per_channel(gamma * invstd)
    else:
        dz = _activation_grad(dy, z, slope, ACT)
    tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launch helpers

MAX_SPLITS = 1024  # of a reduction's (n, l) tiles, per channel block
TILE = 2048  # elements per tile
FINALIZE_SPLITS = 32  # partials a finalize program loads at a time (BLOCK_S), whatever the split count
FLAT_ROW = 256  # elements per row when a pass without BN views z as flat rows


def _dense(z):
    """z itself when NCHW- or channels_last-contiguous (outputs allocated like it share its strides), else a copy."""
    if z.is_contiguous() or (z.dim() == 4 and z.is_contiguous(memory_format=torch.channels_last)):
        return z
    return z.contiguous()


def _nlc(t):
    """(t as (N, C, L), its strides (s_n, s_l, s_c)).  A view for NCHW, channels_last and expanded (zero-stride)
    gradients; a copy only for layouts whose spatial dims do not merge."""
    rows = t.unsqueeze(2) if t.dim() == 2 else t.flatten(2)
    return rows, (rows.stride(0), rows.stride(2), rows.stride(1))


def _flat(t):
    """Dense t's elements in memory order as (N, C, L) = (numel / FLAT_ROW, 1, FLAT_ROW) rows, with the strides
    (s_n, s_l, s_c), as _nlc gives them: how a pass without BN (no channels) reads 16-byte vectors whatever the
    channel count."""
    return t.as_strided((t.numel() // FLAT_ROW, 1, FLAT_ROW), (FLAT_ROW, FLAT_ROW, 1)), (FLAT_ROW, 1, FLAT_ROW)


def _can_flatten(z, dy=None):
    """Whether _flat applies to dense z (and dy): a positive multiple of FLAT_ROW elements, dy with z's strides."""
    return z.numel() > 0 and z.numel() % FLAT_ROW == 0 and (dy is None or dy.stride() == z.stride())


def _tiles(N, L, C, s_c):
    """[BLOCK_N, BLOCK_L, BLOCK_C] of about TILE elements, long along the contiguous axis.  Few shapes, so that a
    model's layers share compiled kernels: rows of 16 (or 256 from L = 256 on) positions in NCHW, blocks of 16
    positions x 64 channels in channels_last."""
    if s_c == 1 and C > 1:  # channels_last, or (N, C) input
        block_c = min(triton.next_power_of_2(C), 64)
        block_l = min(triton.next_power_of_2(L), 16 if block_c == 64 else TILE // block_c)
    else:  # NCHW
        block_c = 1
        block_l = min(triton.next_power_of_2(L), 16 if L < 256 else 256)
    block_n = min(triton.next_power_of_2(N), max(TILE // (block_c * block_l), 1))
    return block_n, block_l, block_c


def _target_programs(device):
    limits = tiling.device_of(device)
    return 4 if limits is None else 4 * limits.sms  # the interpreter runs programs one at a time


class Reduction(NamedTuple):
    """The plan of a reduction over z's (n, l) positions: programs (channel block, split), each split a range
    of tiles_per_split consecutive tiles of the channel block's `tiles` (n, l) tiles."""
    blocks: tuple  # (BLOCK_N, BLOCK_L, BLOCK_C)
    tiles: int
    tiles_per_split: int
    splits: int
    channel_blocks: int

    @property
    def grid(self):
        return self.channel_blocks, self.splits


def reduction(N, L, C, s_c, device):
    """The Reduction of z (N, C, L) with channel stride s_c on ``device``: as many splits as make
    _target_programs(device) programs (4 waves of a GPU's SMs) where there are tiles enough, MAX_SPLITS at most."""
    block_n, block_l, block_c = _tiles(N, L, C, s_c)
    tiles = triton.cdiv(N, block_n) * triton.cdiv(L, block_l)
    channel_blocks = triton.cdiv(C, block_c)
    wanted = max(1, min(MAX_SPLITS, tiles, triton.cdiv(_target_programs(device), channel_blocks)))
    per_split = triton.cdiv(tiles, wanted)
    return Reduction((block_n, block_l, block_c), tiles, per_split, triton.cdiv(tiles, per_split), channel_blocks)


def _geometry(z):
    """(N, L, C) of z; checks its size against int32 (before any copy of it is made: _dense follows)."""
    outputs.check_int32("bn_act", "z", z, reach=False)
    N, C = z.shape[:2]
    return N, (z.numel() // (N * C) if N * C else 0), C


def channel_stats(z, running_mean, running_var, momentum, eps):
    """Per-channel batch (mean, invstd) of z, fp32 (fp64 for fp64 z), shape (C,), from the biased variance.

    Updates running_mean/var in place (unbiased variance) when given."""
    N, L, C = _geometry(z)
    z = _dense(z)
    z, strides = _nlc(z)
    plan = reduction(N, L, C, strides[2], z.device)
    block_n, block_l, block_c = plan.blocks
    acc = outputs.accumulator_dtype(z.dtype)
    part = outputs.empty((3, plan.splits, C), device=z.device, dtype=acc)  # count, mean, M2
    _moments_kernel[plan.grid](
        z, part, N, L, C, *strides, plan.tiles_per_split, plan.tiles,
        ACC=outputs.triton_accumulator(z.dtype), EVEN=N % block_n == 0 and L % block_l == 0, BLOCK_N=block_n,
        BLOCK_L=block_l, BLOCK_C=block_c)
    mean = outputs.empty((C,), device=z.device, dtype=acc)
    invstd = outputs.empty_like(mean)
    update = running_mean is not None
    _finalize_kernel[(triton.cdiv(C, 16),)](
        part, mean, invstd, running_mean if update else mean, running_var if update else invstd,
        N * L, C, plan.splits, momentum, eps,
        UPDATE_RUNNING=update, BLOCK_S=FINALIZE_SPLITS, BLOCK_C=16)
    return mean, invstd


def _elementwise_grid(N, L, C, block_n, block_l, block_c):
    """One program per tile, all on axis 0: at most z.numel() programs, within its 2**31 - 1."""
    return (triton.cdiv(C, block_c) * triton.cdiv(L, block_l) * triton.cdiv(N, block_n),)


def bn_act_forward(z, mean, invstd, weight, bias, act, slope):
    """y = act((z - mean)*invstd*weight + bias), or act(z) when mean is None; z's dtype and layout."""
    N, L, C = _geometry(z)
    z = _dense(z)
    y = outputs.empty_like(z)
    normalize, affine = mean is not None, weight is not None
    view = _nlc
    if not normalize and _can_flatten(z):
        N, L, C, view = z.numel() // FLAT_ROW, FLAT_ROW, 1, _flat
    (z, strides), (y_rows, _) = view(z), view(y)
    blocks = _tiles(N, L, C, strides[2])
    dummy = z
    _forward_kernel[_elementwise_grid(N, L, C, *blocks)](
        z, y_rows, mean if normalize else dummy, invstd if normalize else dummy, weight if affine else dummy,
        bias if affine else dummy, N, L, C, *strides, slope,
        NORMALIZE=normalize, AFFINE=affine, ACT=act, ACC=outputs.triton_accumulator(z.dtype),
        BLOCK_N=blocks[0], BLOCK_L=blocks[1], BLOCK_C=blocks[2])
    return y


def bn_act_backward(dy, z, mean, invstd, weight, bias, batch_stats, act, slope):
    """Returns (dz, dweight, dbias).  dz has z's dtype and layout; dweight/dbias have mean's dtype and
    shape (C,), or are empty without an affine BN.  ``batch_stats``: mean/invstd came from this batch.

    With BN: the reduce writes sum(g), sum(g*xhat) per (batch split, channel), the finalize sums the splits
    once per channel (into dbias, dweight), and the elementwise pass reads those (C,) sums."""
    N, L, C = _geometry(z)
    outputs.check_int32("bn_act", "dy", dy)
    z = _dense(z)
    dz = outputs.empty_like(z)
    normalize, affine = mean is not None, weight is not None
    view = _nlc
    if not normalize and _can_flatten(z, dy):
        N, L, C, view = z.numel() // FLAT_ROW, FLAT_ROW, 1, _flat
    (dy, dy_strides), (z, strides), (dz_rows, _) = view(dy), view(z), view(dz)
    block_n, block_l, block_c = _tiles(N, L, C, strides[2])
    stat_dtype = mean.dtype if normalize else outputs.accumulator_dtype(z.dtype)
    dummy = z
    sum_g = sum_gx = dummy
    if normalize and (batch_stats or affine):
        plan = reduction(N, L, C, strides[2], z.device)
        sum_g, sum_gx = (outputs.empty((C,), device=z.device, dtype=stat_dtype) for _ in range(2))
        parts = (sum_g, sum_gx)  # one split: the reduce writes the sums themselves
        if plan.splits > 1:
            parts = tuple(outputs.empty((plan.splits, C), device=z.device, dtype=stat_dtype) for _ in range(2))
        _backward_reduce_kernel[plan.grid](
            dy, z, mean, invstd, weight if affine else dummy, bias if affine else dummy, *parts,
            N, L, C, *strides, *dy_strides, slope, plan.tiles_per_split, plan.tiles,
            AFFINE=affine, ACT=act, BLOCK_N=block_n, BLOCK_L=block_l, BLOCK_C=block_c)
        if plan.splits > 1:
            _backward_finalize_kernel[(triton.cdiv(C, 64),)](*parts, sum_g, sum_gx, C, plan.splits,
                                                               BLOCK_S=FINALIZE_SPLITS, BLOCK_C=64)
    _backward_kernel[_elementwise_grid(N, L, C, block_n, block_l, block_c)](
        dy, z, dz_rows, mean if normalize else dummy, invstd if normalize else dummy, weight if affine else dummy,
        bias if affine else dummy, sum_g, sum_gx, N, L, C, *strides, *dy_strides, slope,
        NORMALIZE=normalize, BATCH_STATS=batch_stats, AFFINE=affine, ACT=act, ACC=outputs.triton_accumulator(z.dtype),
        BLOCK_N=block_n, BLOCK_L=block_l, BLOCK_C=block_c)
    if not affine:
        return dz, *(outputs.empty((0,), device=z.device, dtype=stat_dtype) for _ in range(2))
    return dz, sum_gx, sum_g  # dweight = sum(g*xhat), dbias = sum(g)
