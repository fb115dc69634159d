"""BatchNorm + activation (and activation alone), forward and backward, in Triton.

A tensor z of shape (N, C, *spatial) is viewed as (N, L, C) with l running over the
flattened spatial positions; its strides (s_n, s_l, s_c) cover NCHW (s_l = 1) and
channels_last (s_c = 1) without a copy.  Kernels work on [BLOCK_N, BLOCK_L, BLOCK_C]
tiles, with no index division, so Triton sees (and vectorises) the contiguous axis:
the launcher makes the tile long in l for NCHW and wide in c for channels_last.

Statistics:         partial Welford moments per (batch split, channel) -> finalize
                    (mean, invstd, running-stat update).
Forward:            y = act(z*scale + shift), from batch or running statistics.
Backward:           reduce sum(g), sum(g*xhat) per split -> finalize (the per-channel sums, each
                    partial read once) -> apply dz, where g = dy*act'(pre) is recomputed from z;
                    y is never read.
Without BN the forward and backward are a single elementwise pass.  The elementwise passes run on a
1-D grid (axes y and z hold at most 65,535 programs); every index is int32, which the launchers check.

ACT (a constexpr): 0 none, 1 relu, 2 leaky_relu(slope), 3 tanh, as in fastgan.ops.ACTIVATIONS.
"""

import torch
import triton
import triton.language as tl

from . import outputs, tiling


@triton.jit
def _tanh(x):
    # exp-based so it also runs under the interpreter (no libdevice); stable for any |x|.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _activate(pre, slope, ACT: tl.constexpr):
    # Comparisons are ordered so that NaN propagates as in torch.
    if ACT == 1:
        return tl.where(pre < 0, 0.0, pre)
    elif ACT == 2:
        return tl.where(pre < 0, pre * slope, pre)
    elif ACT == 3:
        return _tanh(pre)
    else:
        return pre


@triton.jit
def _activation_grad(dy, pre, slope, ACT: tl.constexpr):
    if ACT == 1:
        return tl.where(pre <= 0, 0.0, dy)
    elif ACT == 2:
        return tl.where(pre > 0, dy, dy * slope)
    elif ACT == 3:
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
def _moments_kernel(z_ptr, mean_part_ptr, m2_part_ptr, N, L, C, s_n, s_l, s_c, n_per_split,
                    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per (split, channel): mean and M2 over samples [split*n_per_split, ...) and all positions, merged
    tile by tile with Chan's formula."""
    c0 = tl.program_id(0) * BLOCK_C
    split = tl.program_id(1)
    n_start = split * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for n0 in range(n_start, n_end, BLOCK_N):
        n_count = tl.minimum(n_end - n0, BLOCK_N)
        for l0 in range(0, L, BLOCK_L):
            offs, mask = _tile(n0, l0, c0, n_end, L, C, s_n, s_l, s_c, BLOCK_N, BLOCK_L, BLOCK_C)
            x = tl.load(z_ptr + offs, mask=mask, other=0.0).to(ACC)
            seen = ((n0 - n_start) * L + n_count * l0).to(ACC)
            count = (n_count * tl.minimum(L - l0, BLOCK_L)).to(ACC)
            tile_mean = _sum_nl(x) / count
            d = tl.where(mask, x - _per_channel(tile_mean), 0.0)
            delta = tile_mean - mean
            mean += delta * (count / (seen + count))
            m2 += _sum_nl(d * d) + delta * delta * (seen * count / (seen + count))
    cols = c0 + tl.arange(0, BLOCK_C)
    tl.store(mean_part_ptr + split * C + cols, mean, mask=cols < C)
    tl.store(m2_part_ptr + split * C + cols, m2, mask=cols < C)


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
def _finalize_kernel(mean_part_ptr, m2_part_ptr, mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr,
                     N, L, C, n_per_split, n_splits, momentum, eps,
                     UPDATE_RUNNING: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge the split moments; write mean, invstd (biased var) and update the running stats (unbiased var)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    splits = tl.arange(0, BLOCK_S)
    mask = (splits < n_splits)[:, None] & col_mask[None, :]
    offs = splits[:, None] * C + cols[None, :]
    part_mean = tl.load(mean_part_ptr + offs, mask=mask, other=0.0)
    part_m2 = tl.load(m2_part_ptr + offs, mask=mask, other=0.0)
    counts = (tl.minimum(tl.maximum(N - splits * n_per_split, 0), n_per_split) * L).to(part_mean.dtype)
    M = N * L
    mean = tl.sum(counts[:, None] * part_mean, 0) / M
    d = tl.where(mask, part_mean - mean[None, :], 0.0)
    var = tl.sum(part_m2 + counts[:, None] * d * d, 0) / M
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


@triton.jit
def _backward_reduce_kernel(dy_ptr, z_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, sum_g_part_ptr,
                            sum_gx_part_ptr, N, L, C, s_n, s_l, s_c, g_n, g_l, g_c, slope, n_per_split,
                            AFFINE: tl.constexpr, ACT: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per (split, channel): sum(g) and sum(g*xhat), g = dy*act'(pre) recomputed from z."""
    c0 = tl.program_id(0) * BLOCK_C
    split = tl.program_id(1)
    cols = c0 + tl.arange(0, BLOCK_C)
    mean, invstd, gamma, beta = _channel_affine(mean_ptr, invstd_ptr, weight_ptr, bias_ptr, cols, cols < C, AFFINE)
    n_start = split * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    sum_g = tl.zeros([BLOCK_C], mean.dtype)
    sum_gx = tl.zeros([BLOCK_C], mean.dtype)
    for n0 in range(n_start, n_end, BLOCK_N):
        for l0 in range(0, L, BLOCK_L):
            offs, mask = _tile(n0, l0, c0, n_end, L, C, s_n, s_l, s_c, BLOCK_N, BLOCK_L, BLOCK_C)
            g_offs, _ = _tile(n0, l0, c0, n_end, L, C, g_n, g_l, g_c, BLOCK_N, BLOCK_L, BLOCK_C)
            z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(mean.dtype)
            dy = tl.load(dy_ptr + g_offs, mask=mask, other=0.0).to(mean.dtype)
            xhat = (z - _per_channel(mean)) * _per_channel(invstd)
            g = _activation_grad(dy, xhat * _per_channel(gamma) + _per_channel(beta), slope, ACT)
            g = tl.where(mask, g, 0.0)
            sum_g += _sum_nl(g)
            sum_gx += _sum_nl(g * xhat)
    tl.store(sum_g_part_ptr + split * C + cols, sum_g, mask=cols < C)
    tl.store(sum_gx_part_ptr + split * C + cols, sum_gx, mask=cols < C)


@triton.jit
def _backward_finalize_kernel(sum_g_part_ptr, sum_gx_part_ptr, sum_g_ptr, sum_gx_ptr, C, n_splits,
                              BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """sum(g) and sum(g*xhat) per channel from the split partials, each partial read once."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    sum_g = tl.zeros([BLOCK_C], sum_g_ptr.dtype.element_ty)
    sum_gx = tl.zeros([BLOCK_C], sum_gx_ptr.dtype.element_ty)
    for s0 in range(0, n_splits, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        offs = splits[:, None] * C + cols[None, :]
        mask = (splits < n_splits)[:, None] & col_mask[None, :]
        sum_g += tl.sum(tl.load(sum_g_part_ptr + offs, mask=mask, other=0.0), 0)
        sum_gx += tl.sum(tl.load(sum_gx_part_ptr + offs, mask=mask, other=0.0), 0)
    tl.store(sum_g_ptr + cols, sum_g, mask=col_mask)
    tl.store(sum_gx_ptr + cols, sum_gx, mask=col_mask)


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

MAX_SPLITS = 128
TILE = 2048  # elements per tile


def _acc_dtype(tensor):
    return tl.float64 if tensor.dtype == torch.float64 else tl.float32


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


def _splits(N, C, block_n, block_c, device):
    """(n_splits, n_per_split): the batch split of the reductions, so that the grid fills the device."""
    wanted = max(1, min(MAX_SPLITS, triton.cdiv(N, block_n), _target_programs(device) // triton.cdiv(C, block_c)))
    n_per_split = triton.cdiv(triton.cdiv(N, wanted), block_n) * block_n
    return triton.cdiv(N, n_per_split), n_per_split


def _geometry(z):
    """(N, L, C) of z; checks its size against int32 (before any copy of it is made: _dense follows)."""
    outputs.check_int32("bn_act", "z", z, reach=False)
    N, C = z.shape[:2]
    return N, (z.numel() // (N * C) if N * C else 0), C


def _stat_dtype(z):
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def channel_stats(z, running_mean, running_var, momentum, eps):
    """Per-channel batch (mean, invstd) of z, fp32 (fp64 for fp64 z), shape (C,), from the biased variance.

    Updates running_mean/var in place (unbiased variance) when given."""
    N, L, C = _geometry(z)
    z = _dense(z)
    z, strides = _nlc(z)
    block_n, block_l, block_c = _tiles(N, L, C, strides[2])
    n_splits, n_per_split = _splits(N, C, block_n, block_c, z.device)
    mean_part = outputs.empty((n_splits, C), device=z.device, dtype=_stat_dtype(z))
    m2_part = outputs.empty_like(mean_part)
    _moments_kernel[(triton.cdiv(C, block_c), n_splits)](
        z, mean_part, m2_part, N, L, C, *strides, n_per_split,
        ACC=_acc_dtype(z), BLOCK_N=block_n, BLOCK_L=block_l, BLOCK_C=block_c)
    mean = outputs.empty((C,), device=z.device, dtype=_stat_dtype(z))
    invstd = outputs.empty_like(mean)
    update = running_mean is not None
    # BLOCK_S covers any split count (a masked tile), so that the layers of a model share one compiled finalize.
    _finalize_kernel[(triton.cdiv(C, 16),)](
        mean_part, m2_part, mean, invstd, running_mean if update else mean, running_var if update else invstd,
        N, L, C, n_per_split, n_splits, momentum, eps,
        UPDATE_RUNNING=update, BLOCK_S=MAX_SPLITS, BLOCK_C=16)
    return mean, invstd


def _elementwise_grid(N, L, C, block_n, block_l, block_c):
    """One program per tile, all on axis 0: at most z.numel() programs, within its 2**31 - 1."""
    return (triton.cdiv(C, block_c) * triton.cdiv(L, block_l) * triton.cdiv(N, block_n),)


def bn_act_forward(z, mean, invstd, weight, bias, act, slope):
    """y = act((z - mean)*invstd*weight + bias), or act(z) when mean is None; z's dtype and layout."""
    N, L, C = _geometry(z)
    z = _dense(z)
    y = outputs.empty_like(z)
    (z, strides), (y_rows, _) = _nlc(z), _nlc(y)
    blocks = _tiles(N, L, C, strides[2])
    normalize, affine = mean is not None, weight is not None
    dummy = z
    _forward_kernel[_elementwise_grid(N, L, C, *blocks)](
        z, y_rows, mean if normalize else dummy, invstd if normalize else dummy, weight if affine else dummy,
        bias if affine else dummy, N, L, C, *strides, slope,
        NORMALIZE=normalize, AFFINE=affine, ACT=act, ACC=_acc_dtype(z),
        BLOCK_N=blocks[0], BLOCK_L=blocks[1], BLOCK_C=blocks[2])
    return y


def bn_act_backward(dy, z, mean, invstd, weight, bias, batch_stats, act, slope):
    """Returns (dz, dweight, dbias).  dz has z's dtype and layout; dweight/dbias have mean's dtype and
    shape (C,), or are empty without an affine BN.  ``batch_stats``: mean/invstd came from this batch.

    With BN: the reduce writes sum(g), sum(g*xhat) per (batch split, channel), the finalize sums the splits
    once per channel (into dbias, dweight), and the elementwise pass reads those (C,) sums."""
    N, L, C = _geometry(z)
    outputs.check_int32("bn_act", "dy", dy)
    dy, dy_strides = _nlc(dy)
    z = _dense(z)
    dz = outputs.empty_like(z)
    (z, strides), (dz_rows, _) = _nlc(z), _nlc(dz)
    block_n, block_l, block_c = _tiles(N, L, C, strides[2])
    normalize, affine = mean is not None, weight is not None
    stat_dtype = mean.dtype if normalize else _stat_dtype(z)
    dummy = z
    sum_g = sum_gx = dummy
    if normalize and (batch_stats or affine):
        n_splits, n_per_split = _splits(N, C, block_n, block_c, z.device)
        sum_g, sum_gx = (outputs.empty((C,), device=z.device, dtype=stat_dtype) for _ in range(2))
        parts = (sum_g, sum_gx)  # one split: the reduce writes the sums themselves
        if n_splits > 1:
            parts = tuple(outputs.empty((n_splits, C), device=z.device, dtype=stat_dtype) for _ in range(2))
        _backward_reduce_kernel[(triton.cdiv(C, block_c), n_splits)](
            dy, z, mean, invstd, weight if affine else dummy, bias if affine else dummy, *parts,
            N, L, C, *strides, *dy_strides, slope, n_per_split,
            AFFINE=affine, ACT=act, BLOCK_N=block_n, BLOCK_L=block_l, BLOCK_C=block_c)
        if n_splits > 1:
            _backward_finalize_kernel[(triton.cdiv(C, 64),)](*parts, sum_g, sum_gx, C, n_splits, BLOCK_S=32, BLOCK_C=64)
    _backward_kernel[_elementwise_grid(N, L, C, block_n, block_l, block_c)](
        dy, z, dz_rows, mean if normalize else dummy, invstd if normalize else dummy, weight if affine else dummy,
        bias if affine else dummy, sum_g, sum_gx, N, L, C, *strides, *dy_strides, slope,
        NORMALIZE=normalize, BATCH_STATS=batch_stats, AFFINE=affine, ACT=act, ACC=_acc_dtype(z),
        BLOCK_N=block_n, BLOCK_L=block_l, BLOCK_C=block_c)
    if not affine:
        return dz, *(outputs.empty((0,), device=z.device, dtype=stat_dtype) for _ in range(2))
    return dz, sum_gx, sum_g  # dweight = sum(g*xhat), dbias = sum(g)
