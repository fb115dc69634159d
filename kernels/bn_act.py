"""BatchNorm + activation (and activation alone), forward and backward, in Triton.

A tensor z of shape (N, C, *spatial) is viewed as rows m = (n, l) by channels c,
with l running over the flattened spatial positions; its strides (s_n, s_c, s_l)
cover both NCHW (s_l = 1) and channels_last (s_c = 1) without a copy.

Statistics:         partial Welford moments per (split, channel) -> finalize
                    (mean, invstd, running-stat update).
Forward:            y = act(z*scale + shift), from batch or running statistics.
Backward:           reduce sum(g), sum(g*xhat) per split -> apply dz, where
                    g = dy*act'(pre) is recomputed from z; y is never read.
Without BN the forward and backward are a single elementwise pass.

ACT (a constexpr): 0 none, 1 relu, 2 leaky_relu(slope), 3 tanh, as in fastgan.ops.ACTIVATIONS.
"""
import functools

import torch
import triton
import triton.language as tl

from . import outputs


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
def _tile_offsets(rows, cols, L, s_n, s_c, s_l):
    n = rows // L
    l = rows - n * L
    return (n * s_n + l * s_l)[:, None] + (cols * s_c)[None, :]


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
def _moments_kernel(z_ptr, mean_part_ptr, m2_part_ptr, C, L, M, s_n, s_c, s_l, rows_per_split,
                    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per (split, channel): mean and M2 of rows [split*rows_per_split, ...), merged tile by tile (Chan)."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, M)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mask = (rows < end)[:, None] & col_mask[None, :]
        x = tl.load(z_ptr + _tile_offsets(rows, cols, L, s_n, s_c, s_l), mask=mask, other=0.0).to(ACC)
        seen = (m0 - start).to(ACC)
        count = tl.minimum(end - m0, BLOCK_M).to(ACC)
        tile_mean = tl.sum(x, 0) / count
        d = tl.where(mask, x - tile_mean[None, :], 0.0)
        delta = tile_mean - mean
        mean += delta * (count / (seen + count))
        m2 += tl.sum(d * d, 0) + delta * delta * (seen * count / (seen + count))
    tl.store(mean_part_ptr + split * C + cols, mean, mask=col_mask)
    tl.store(m2_part_ptr + split * C + cols, m2, mask=col_mask)


@triton.jit
def _finalize_kernel(mean_part_ptr, m2_part_ptr, mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr,
                     C, M, rows_per_split, n_splits, momentum, eps,
                     UPDATE_RUNNING: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge the split moments; write mean, invstd (biased var) and update the running stats (unbiased var)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    splits = tl.arange(0, BLOCK_S)
    mask = (splits < n_splits)[:, None] & col_mask[None, :]
    offs = splits[:, None] * C + cols[None, :]
    part_mean = tl.load(mean_part_ptr + offs, mask=mask, other=0.0)
    part_m2 = tl.load(m2_part_ptr + offs, mask=mask, other=0.0)
    counts = tl.minimum(tl.maximum(M - splits * rows_per_split, 0), rows_per_split).to(part_mean.dtype)
    mean = tl.sum(counts[:, None] * part_mean, 0) / M
    d = tl.where(mask, part_mean - mean[None, :], 0.0)
    var = tl.sum(part_m2 + counts[:, None] * d * d, 0) / M
    tl.store(mean_ptr + cols, mean, mask=col_mask)
    tl.store(invstd_ptr + cols, 1.0 / tl.sqrt(var + eps), mask=col_mask)
    if UPDATE_RUNNING:
        running_mean = tl.load(running_mean_ptr + cols, mask=col_mask, other=0.0).to(mean.dtype)
        running_var = tl.load(running_var_ptr + cols, mask=col_mask, other=0.0).to(mean.dtype)
        running_mean = (1.0 - momentum) * running_mean + momentum * mean
        running_var = (1.0 - momentum) * running_var + momentum * var * (M / (M - 1.0))
        tl.store(running_mean_ptr + cols, running_mean.to(running_mean_ptr.dtype.element_ty), mask=col_mask)
        tl.store(running_var_ptr + cols, running_var.to(running_var_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _forward_kernel(z_ptr, y_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, C, L, M, s_n, s_c, s_l, slope,
                    NORMALIZE: tl.constexpr, AFFINE: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = act(z*scale + shift), scale = gamma*invstd, shift = beta - mean*scale (identity without BN)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_mask = cols < C
    mask = (rows < M)[:, None] & col_mask[None, :]
    offs = _tile_offsets(rows, cols, L, s_n, s_c, s_l)
    pre = tl.load(z_ptr + offs, mask=mask, other=0.0).to(ACC)
    if NORMALIZE:
        mean, invstd, gamma, beta = _channel_affine(mean_ptr, invstd_ptr, weight_ptr, bias_ptr, cols, col_mask,
                                                    AFFINE)
        scale = gamma * invstd
        pre = pre * scale[None, :] + (beta - mean * scale)[None, :]
    y = _activate(pre, slope, ACT)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_reduce_kernel(dy_ptr, z_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, sum_g_part_ptr,
                            sum_gx_part_ptr, C, L, M, s_n, s_c, s_l, g_n, g_c, g_l, slope, rows_per_split,
                            AFFINE: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per (split, channel): sum(g) and sum(g*xhat), g = dy*act'(pre) recomputed from z."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mean, invstd, gamma, beta = _channel_affine(mean_ptr, invstd_ptr, weight_ptr, bias_ptr, cols, col_mask, AFFINE)
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, M)
    sum_g = tl.zeros([BLOCK_C], mean.dtype)
    sum_gx = tl.zeros([BLOCK_C], mean.dtype)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mask = (rows < end)[:, None] & col_mask[None, :]
        z = tl.load(z_ptr + _tile_offsets(rows, cols, L, s_n, s_c, s_l), mask=mask, other=0.0).to(mean.dtype)
        dy = tl.load(dy_ptr + _tile_offsets(rows, cols, L, g_n, g_c, g_l), mask=mask, other=0.0).to(mean.dtype)
        xhat = (z - mean[None, :]) * invstd[None, :]
        g = _activation_grad(dy, xhat * gamma[None, :] + beta[None, :], slope, ACT)
        g = tl.where(mask, g, 0.0)
        sum_g += tl.sum(g, 0)
        sum_gx += tl.sum(g * xhat, 0)
    tl.store(sum_g_part_ptr + split * C + cols, sum_g, mask=col_mask)
    tl.store(sum_gx_part_ptr + split * C + cols, sum_gx, mask=col_mask)


@triton.jit
def _backward_kernel(dy_ptr, z_ptr, dz_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, sum_g_part_ptr,
                     sum_gx_part_ptr, dweight_ptr, dbias_ptr, C, L, M, s_n, s_c, s_l, g_n, g_c, g_l, slope, n_splits,
                     NORMALIZE: tl.constexpr, BATCH_STATS: tl.constexpr, AFFINE: tl.constexpr, ACT: tl.constexpr,
                     ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """dz = gamma*invstd*(g - sum(g)/M - xhat*sum(g*xhat)/M) (batch stats), gamma*invstd*g (running stats),
    or g (no BN). The first row block also writes dgamma = sum(g*xhat) and dbeta = sum(g)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_mask = cols < C
    mask = (rows < M)[:, None] & col_mask[None, :]
    offs = _tile_offsets(rows, cols, L, s_n, s_c, s_l)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + _tile_offsets(rows, cols, L, g_n, g_c, g_l), mask=mask, other=0.0).to(ACC)
    if NORMALIZE:
        mean, invstd, gamma, beta = _channel_affine(mean_ptr, invstd_ptr, weight_ptr, bias_ptr, cols, col_mask,
                                                    AFFINE)
        splits = tl.arange(0, BLOCK_S)
        part_offs = splits[:, None] * C + cols[None, :]
        part_mask = (splits < n_splits)[:, None] & col_mask[None, :]
        sum_g = tl.sum(tl.load(sum_g_part_ptr + part_offs, mask=part_mask, other=0.0), 0)
        sum_gx = tl.sum(tl.load(sum_gx_part_ptr + part_offs, mask=part_mask, other=0.0), 0)
        if AFFINE:
            if tl.program_id(1) == 0:
                tl.store(dweight_ptr + cols, sum_gx, mask=col_mask)
                tl.store(dbias_ptr + cols, sum_g, mask=col_mask)
        xhat = (z - mean[None, :]) * invstd[None, :]
        g = _activation_grad(dy, xhat * gamma[None, :] + beta[None, :], slope, ACT)
        if BATCH_STATS:
            g = g - (sum_g / M)[None, :] - xhat * (sum_gx / M)[None, :]
        dz = g * (gamma * invstd)[None, :]
    else:
        dz = _activation_grad(dy, z, slope, ACT)
    tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launch helpers

MAX_SPLITS = 128


def _acc_dtype(tensor):
    return tl.float64 if tensor.dtype == torch.float64 else tl.float32


def _as_rows(t):
    """(N, C, L) view of a (N, C, *spatial) tensor: spatial dims merge without a copy for NCHW and
    channels_last, and an expanded gradient keeps its zero strides."""
    return t.unsqueeze(2) if t.dim() == 2 else t.flatten(2)


def _tiles(s_c, C):
    """Tile (BLOCK_M, BLOCK_C): wide in channels for channels_last, tall in rows for NCHW."""
    if s_c == 1:
        block_c = min(triton.next_power_of_2(C), 64)
        return max(4096 // block_c, 16), block_c
    return 1024, 4


@functools.cache
def _target_programs(device):
    if device.type != "cuda":
        return 4  # the interpreter runs programs one at a time
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _splits(C, M, block_m, block_c, device):
    """How many row splits the reductions use, so that the grid fills the device."""
    target_programs = _target_programs(device)
    n_splits = max(1, min(MAX_SPLITS, triton.cdiv(M, block_m), target_programs // triton.cdiv(C, block_c)))
    rows_per_split = triton.cdiv(triton.cdiv(M, n_splits), block_m) * block_m
    return triton.cdiv(M, rows_per_split), rows_per_split


def _geometry(z):
    if z.numel() >= 2**31:
        raise ValueError(f"bn_act indexes with int32: a tensor of {z.numel()} elements is too large; "
                         "split the batch")
    N, C = z.shape[:2]
    M = z.numel() // max(C, 1)
    return C, M // max(N, 1), M


def _stat_dtype(z):
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def channel_stats(z, running_mean, running_var, momentum, eps):
    """Per-channel batch (mean, invstd) of z, fp32 (fp64 for fp64 z), shape (C,), from the biased variance.

    Updates running_mean/var in place (unbiased variance) when given."""
    C, L, M = _geometry(z)
    z = _as_rows(z)
    s_n, s_c, s_l = z.stride()
    block_m, block_c = _tiles(s_c, C)
    n_splits, rows_per_split = _splits(C, M, block_m, block_c, z.device)
    mean_part = outputs.empty((n_splits, C), device=z.device, dtype=_stat_dtype(z))
    m2_part = outputs.empty_like(mean_part)
    _moments_kernel[(triton.cdiv(C, block_c), n_splits)](
        z, mean_part, m2_part, C, L, M, s_n, s_c, s_l, rows_per_split,
        ACC=_acc_dtype(z), BLOCK_M=block_m, BLOCK_C=block_c)
    mean = outputs.empty((C,), device=z.device, dtype=_stat_dtype(z))
    invstd = outputs.empty_like(mean)
    update = running_mean is not None
    _finalize_kernel[(triton.cdiv(C, 64),)](
        mean_part, m2_part, mean, invstd, running_mean if update else mean, running_var if update else invstd,
        C, M, rows_per_split, n_splits, momentum, eps,
        UPDATE_RUNNING=update, BLOCK_S=triton.next_power_of_2(n_splits), BLOCK_C=64)
    return mean, invstd


def bn_act_forward(z, mean, invstd, weight, bias, act, slope):
    """y = act((z - mean)*invstd*weight + bias), or act(z) when mean is None; z's dtype and layout."""
    C, L, M = _geometry(z)
    y = outputs.empty_like(z)
    z, y_rows = _as_rows(z), _as_rows(y)
    s_n, s_c, s_l = z.stride()
    block_m, block_c = _tiles(s_c, C)
    normalize, affine = mean is not None, weight is not None
    dummy = z
    _forward_kernel[(triton.cdiv(C, block_c), triton.cdiv(M, block_m))](
        z, y_rows, mean if normalize else dummy, invstd if normalize else dummy, weight if affine else dummy,
        bias if affine else dummy, C, L, M, s_n, s_c, s_l, slope,
        NORMALIZE=normalize, AFFINE=affine, ACT=act, ACC=_acc_dtype(z), BLOCK_M=block_m, BLOCK_C=block_c)
    return y


def bn_act_backward(dy, z, mean, invstd, weight, bias, batch_stats, act, slope):
    """Returns (dz, dweight, dbias).  dz has z's dtype and layout; dweight/dbias have mean's dtype and
    shape (C,), or are empty without an affine BN.  ``batch_stats``: mean/invstd came from this batch."""
    C, L, M = _geometry(z)
    dz = outputs.empty_like(z)
    z, dy, dz_rows = _as_rows(z), _as_rows(dy), _as_rows(dz)
    s_n, s_c, s_l = z.stride()
    g_n, g_c, g_l = dy.stride()
    block_m, block_c = _tiles(s_c, C)
    normalize, affine = mean is not None, weight is not None
    stat_dtype = mean.dtype if normalize else _stat_dtype(z)
    dweight = outputs.empty((C if affine else 0,), device=z.device, dtype=stat_dtype)
    dbias = outputs.empty_like(dweight)
    dummy = z
    n_splits, sum_g_part, sum_gx_part = 1, dummy, dummy
    if normalize:
        n_splits, rows_per_split = _splits(C, M, block_m, block_c, z.device)
        sum_g_part = outputs.empty((n_splits, C), device=z.device, dtype=stat_dtype)
        sum_gx_part = outputs.empty_like(sum_g_part)
        _backward_reduce_kernel[(triton.cdiv(C, block_c), n_splits)](
            dy, z, mean, invstd, weight if affine else dummy, bias if affine else dummy, sum_g_part, sum_gx_part,
            C, L, M, s_n, s_c, s_l, g_n, g_c, g_l, slope, rows_per_split,
            AFFINE=affine, ACT=act, BLOCK_M=block_m, BLOCK_C=block_c)
    _backward_kernel[(triton.cdiv(C, block_c), triton.cdiv(M, block_m))](
        dy, z, dz_rows, mean if normalize else dummy, invstd if normalize else dummy, weight if affine else dummy,
        bias if affine else dummy, sum_g_part, sum_gx_part, dweight if affine else dummy, dbias if affine else dummy,
        C, L, M, s_n, s_c, s_l, g_n, g_c, g_l, slope, n_splits,
        NORMALIZE=normalize, BATCH_STATS=batch_stats, AFFINE=affine, ACT=act, ACC=_acc_dtype(z),
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_S=triton.next_power_of_2(n_splits))
    return dz, dweight, dbias
