"""Implicit-GEMM convolutions with a BatchNorm/activation prologue and a statistics epilogue (fusion L2).

DCGAN's 4x4-kernel layers, as two geometries with stride S and padding P:

    DOWN(S, P), Conv2d(k4, S, P):
        out[n, o, y, x] = sum_{r, kh, kw} in[n, r, S*y - P + kh, S*x - P + kw] * w[o, r, kh, kw]
    UP(S, P), ConvTranspose2d(k4, S, P):
        out[n, o, S*i - P + kh, S*j - P + kw] += in[n, r, i, j] * w[r, o, kh, kw]   (for all n, r, i, j, kh, kw)

DOWN(2, 1) / UP(2, 1) are the k4s2p1 layers.  DOWN(4, 0) / UP(4, 0) are the end layers 4x4 -> 1x1 and
1x1 -> 4x4 (identical to k4s1p0 on those sizes): one tap per output pixel, i.e. plain GEMMs.  UP runs as S*S
sub-pixel convolutions of (4/S)x(4/S) taps, one class per program, so no multiply hits an inserted zero.

The dgrad of DOWN(S, P) is UP(S, P) over the same weight tensor and vice versa: DOWN reads w as [out, red],
UP as [red, out], which is exactly how Conv2d and ConvTranspose2d store their weights.  One kernel,
:func:`_conv_kernel`, serves the forward and the dgrad of both.  The wgrad of either is
dw[lo, hi, kh, kw] = sum_{n, i, j} lo[n, lo, i, j] * hi[n, hi, S*i - P + kh, S*j - P + kw], where lo is the
low-resolution side (the conv's output, the convT's input), which is w's first dimension in both cases.

Operands load through a per-channel affine map and an activation (the prologue, see :class:`GemmInput`):
    forward:  act(z*scale + shift), the previous layer's BN + activation; the activation never hits memory;
    backward: g*a + z*b + c, the BN backward of the layer above, from its g = dy*act' and statistics.
Epilogues: STATS writes per-tile Welford partials (mean, M2) of the output per channel; GRAD computes
g = acc*act'(pre) of the layer below from its saved z and writes g with the partials sum(g), sum(g*xhat).
Tiny finalize kernels merge the partials into (mean, invstd) / (dbeta, dgamma) and the next prologue's map.

Tensors are (N, C, H, W) with any strides (NCHW and channels_last without a copy); indexing is int32.
Accumulation is fp32 (fp64 for fp64); fp32 operands use TF32 unless ``allow_tf32`` is False.
On a GPU a launch takes the first of kernels.tiling's candidate tiles that fit the device (one compilation);
with FASTGAN_AUTOTUNE=1 the fastest of them, benchmarked on the first call per shape.  Under
TRITON_INTERPRET=1 the tiles are fixed.
"""
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from . import activations, outputs, tiling
from .bn_act import NO_ACTIVATION, TANH, _activate, _activation_grad, update_running_stats
from .geometry import Geometry

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The kernels' vocabulary: named constexprs, compared by name in the kernels; the host passes their .value.
PRO_NONE: tl.constexpr = tl.constexpr(0)      # the operand as stored
PRO_FORWARD: tl.constexpr = tl.constexpr(1)   # act(t*scale + shift): the BN + activation of the layer below
PRO_BACKWARD: tl.constexpr = tl.constexpr(2)  # g*a + z*b + c: the BN backward of the layer above, g in t, z in q
EPI_STORE: tl.constexpr = tl.constexpr(0)     # the output only
EPI_STATS: tl.constexpr = tl.constexpr(1)     # and the per-tile Welford partials of the output
EPI_GRAD: tl.constexpr = tl.constexpr(2)      # g = acc*act'(z) of the layer below, and its BN backward partials
KERNEL: tl.constexpr = tl.constexpr(4)        # DCGAN's kernels are KERNEL x KERNEL
KERNEL_TAPS: tl.constexpr = tl.constexpr(16)  # KERNEL * KERNEL
SPAN_PART: tl.constexpr = tl.constexpr(0)     # a wgrad K step's block of positions: part of a row
SPAN_ROWS: tl.constexpr = tl.constexpr(1)     # whole rows
SPAN_IMAGES: tl.constexpr = tl.constexpr(2)   # whole images


def _value(code):
    """A vocabulary constexpr (or a plain int) as the int a launch passes."""
    return getattr(code, "value", code)


@triton.jit
def _along(v, AXIS: tl.constexpr):
    """A vector laid along AXIS of a 2-D tile."""
    if AXIS == 0:
        out = v[:, None]
    else:
        out = v[None, :]
    return out


@triton.jit
def _channel_map(coef_ptr, chan, chan_mask, C, t_dtype, PRO: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr):
    """(t_scale, q_scale, shift) = coef[:, chan], the per-channel map of :func:`_load_operand`: 0 on masked-off
    channels, and all 0 without a map (PRO_NONE loads nothing).

    In the dtype the prologue maps in: bf16 for a bf16 operand, two lanes an instruction (HFMA2, HMUL2, HMNMX2),
    else the accumulation dtype.  fp16's range could not hold every shift (beta - mean*gamma*invstd of a channel
    with a large mean and a small spread overflows it), and Tanh needs fp32."""
    if t_dtype.is_bf16() and ACT != TANH:
        MATH: tl.constexpr = t_dtype
    else:
        MATH: tl.constexpr = ACC
    mapped = chan_mask & (PRO != PRO_NONE)
    t_scale = tl.load(coef_ptr + chan, mask=mapped, other=0.0).to(MATH)
    q_scale = tl.load(coef_ptr + C + chan, mask=mapped & (PRO == PRO_BACKWARD), other=0.0).to(MATH)
    shift = tl.load(coef_ptr + 2 * C + chan, mask=mapped, other=0.0).to(MATH)
    return t_scale, q_scale, shift


@triton.jit
def _load_operand(ptrs, q_ptrs, pix_ok, chan_mask, t_scale, q_scale, shift, slope,
                  PRO: tl.constexpr, ACT: tl.constexpr, AXIS: tl.constexpr):
    """A GEMM operand tile: act(t*t_scale + q*q_scale + shift), the channels' map from :func:`_channel_map` and in
    its dtype, with the channels along AXIS of the tile and the pixels along the other; zero where a pixel or
    channel is masked off.

    The convolution's zero padding applies to the activation, not to t: a masked element loads 0, a masked-off
    channel's map is 0 and the shift is zeroed where the pixel is masked, so y = 0 and act(0) = 0, without a
    select per element (a non-finite shift, from non-finite statistics, makes the padding NaN too).  A bf16 map
    rounds the map and the LeakyReLU slope to bf16: a relative error of at most 2**-9 per channel, below half a
    bf16 step of the output, of the size that storing t in bf16 already has."""
    if AXIS == 0:
        mask = chan_mask[:, None] & pix_ok[None, :]
    else:
        mask = pix_ok[:, None] & chan_mask[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0)
    MATH: tl.constexpr = t_scale.dtype
    if PRO != PRO_NONE:
        y = tl.fma(x.to(MATH), _along(t_scale, AXIS), _along(shift, AXIS) * _along(pix_ok.to(MATH), 1 - AXIS))
        if PRO == PRO_BACKWARD:
            y = tl.fma(tl.load(q_ptrs, mask=mask, other=0.0).to(MATH), _along(q_scale, AXIS), y)
        x = _activate(y, slope, ACT).to(x.dtype)
    elif ACT != NO_ACTIVATION:
        x = _activate(x.to(MATH), slope, ACT).to(x.dtype)
    return x


@triton.jit
def _conv_kernel(src_ptr, q_ptr, pro_coef_ptr, w_ptr, out_ptr, z_ptr, epi_coef_ptr, epi_stats_ptr, part_ptr,
                 C_in, H_in, W_in, C_out, H_out, W_out, ROWS, n_parts, taps_per_split,
                 s_n, s_c, s_h, s_w, o_split, o_n, o_c, o_h, o_w, w_red, w_out, w_kh, w_kw,
                 UP: tl.constexpr, S: tl.constexpr, P: tl.constexpr, TAPS: tl.constexpr,
                 PRO: tl.constexpr, ACT_IN: tl.constexpr, SLOPE_IN: tl.constexpr, EPI: tl.constexpr,
                 ACT_OUT: tl.constexpr, SLOPE_OUT: tl.constexpr,
                 NORM_OUT: tl.constexpr, EVEN_K: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out = DOWN/UP(prologue(src), w), one (BLOCK_M output pixels) x (BLOCK_N channels) tile per program.

    Program axis 0 runs over (sub-pixel class, row tile), ROWS output pixels per class; axis 1 over channels;
    axis 2 over splits of the K loop, taps_per_split taps each (split-K, EPI_STORE only: split s writes its
    partial sum at out + s*o_split).  TAPS taps per dimension: KERNEL for DOWN, KERNEL/S for UP.  q and z share
    the strides of src and out.
    EVEN_K: BLOCK_K divides C_in (no channel mask in the K loop).

    The K loop runs tap-outer, channel-inner: the tile's input rows and their validity for every tap are
    worked out once (a bit per tap and row), so a K step moves the tile's pointers by a scalar."""
    tiles = tl.cdiv(ROWS, BLOCK_M)
    slot = tl.program_id(0)
    cls = slot // tiles
    tile = slot - cls * tiles
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < ROWS
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < C_out
    if UP:
        grid_h = H_out // S
        grid_w = W_out // S
        ph = cls // S
        pw = cls - ph * S
    else:
        grid_h = H_out
        grid_w = W_out
    n = rows // (grid_h * grid_w)
    rest = rows - n * (grid_h * grid_w)
    i = rest // grid_w
    j = rest - i * grid_w
    if UP:
        # out[S*i + ph] takes the taps kh = (ph + P) mod S + S*th, from in[i + (ph + P) div S - th].
        ih0 = i + (ph + P) // S
        iw0 = j + (pw + P) // S
        kh0 = (ph + P) % S
        kw0 = (pw + P) % S
        TAP_DIR: tl.constexpr = -1  # input pixels per tap
        TAP_KERNEL: tl.constexpr = S  # kernel taps per tap
    else:
        ih0 = S * i - P
        iw0 = S * j - P
        kh0 = 0
        kw0 = 0
        TAP_DIR: tl.constexpr = 1
        TAP_KERNEL: tl.constexpr = 1
    tap_ok = tl.zeros([BLOCK_M], tl.int32)  # bit th*TAPS + tw: tap (th, tw) of the row reads inside the image
    for tap_h in tl.static_range(TAPS):
        ih = ih0 + TAP_DIR * tap_h
        h_ok = row_mask & (ih >= 0) & (ih < H_in)
        for tap_w in tl.static_range(TAPS):
            iw = iw0 + TAP_DIR * tap_w
            tap_ok |= (h_ok & (iw >= 0) & (iw < W_in)).to(tl.int32) << (tap_h * TAPS + tap_w)
    ks = tl.arange(0, BLOCK_K)
    a_offs = (n * s_n + ih0 * s_h + iw0 * s_w)[:, None] + (ks * s_c)[None, :]
    a_ptrs = src_ptr + a_offs
    q_ptrs = q_ptr + a_offs
    b_ptrs = w_ptr + kh0 * w_kh + kw0 * w_kw + (ks * w_red)[:, None] + (cols * w_out)[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    # One loop over (tap, channel block), so that the pipeliner overlaps loads across taps.
    tap = tl.program_id(2) * taps_per_split
    k0 = 0
    k_steps = taps_per_split * tl.cdiv(C_in, BLOCK_K)
    for _ in range(k_steps):
        th = tap // TAPS
        tw = tap - th * TAPS
        a_step = TAP_DIR * (th * s_h + tw * s_w) + k0 * s_c
        b_step = TAP_KERNEL * (th * w_kh + tw * w_kw) + k0 * w_red
        row_ok = ((tap_ok >> tap) & 1) != 0
        chans = k0 + ks
        if EVEN_K:
            k_mask = ks < BLOCK_K
            b_mask = col_mask[None, :]
        else:
            k_mask = chans < C_in
            b_mask = k_mask[:, None] & col_mask[None, :]
        t_scale, q_scale, shift = _channel_map(pro_coef_ptr, chans, k_mask, C_in, src_ptr.dtype.element_ty, PRO,
                                               ACT_IN, ACC)
        a = _load_operand(a_ptrs + a_step, q_ptrs + a_step, row_ok, k_mask, t_scale, q_scale, shift, SLOPE_IN, PRO,
                          ACT_IN, 1)
        b = tl.load(b_ptrs + b_step, mask=b_mask, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
        k0 += BLOCK_K
        next_tap = k0 >= C_in
        tap += next_tap.to(tl.int32)
        k0 = tl.where(next_tap, 0, k0)

    if UP:
        oh = S * i + ph
        ow = S * j + pw
    else:
        oh = i
        ow = j
    offs = tl.program_id(2) * o_split + (n * o_n + oh * o_h + ow * o_w)[:, None] + (cols * o_c)[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    if EPI == EPI_STATS:
        count = tl.minimum(ROWS - tile * BLOCK_M, BLOCK_M).to(ACC)
        mean = tl.sum(tl.where(mask, acc, 0.0), 0) / count
        d = tl.where(mask, acc - mean[None, :], 0.0)
        tl.store(part_ptr + slot * C_out + cols, mean, mask=col_mask)
        tl.store(part_ptr + (n_parts + slot) * C_out + cols, tl.sum(d * d, 0), mask=col_mask)
    elif EPI == EPI_GRAD:
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(ACC)
        if NORM_OUT:
            scale = tl.load(epi_coef_ptr + cols, mask=col_mask, other=0.0)
            shift = tl.load(epi_coef_ptr + 2 * C_out + cols, mask=col_mask, other=0.0)
            acc = _activation_grad(acc, z * scale[None, :] + shift[None, :], SLOPE_OUT, ACT_OUT)
            acc = tl.where(mask, acc, 0.0)
            mean = tl.load(epi_stats_ptr + cols, mask=col_mask, other=0.0)
            invstd = tl.load(epi_stats_ptr + C_out + cols, mask=col_mask, other=0.0)
            xhat = (z - mean[None, :]) * invstd[None, :]
            tl.store(part_ptr + slot * C_out + cols, tl.sum(acc, 0), mask=col_mask)
            tl.store(part_ptr + (n_parts + slot) * C_out + cols, tl.sum(acc * xhat, 0), mask=col_mask)
        else:
            acc = _activation_grad(acc, z, SLOPE_OUT, ACT_OUT)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _wgrad_kernel(lo_ptr, lo_q_ptr, lo_coef_ptr, hi_ptr, hi_q_ptr, hi_coef_ptr, dw_ptr,
                  C_lo, H_lo, W_lo, C_hi, H_hi, W_hi, N, images_per_split, block_h, block_w,
                  l_n, l_c, l_h, l_w, h_n, h_c, h_h, h_w, d_split, d_lo, d_hi,
                  S: tl.constexpr, P: tl.constexpr, EVEN_N: tl.constexpr, EVEN_HW: tl.constexpr,
                  SPAN: tl.constexpr,
                  PRO_LO: tl.constexpr, ACT_LO: tl.constexpr, SLOPE_LO: tl.constexpr,
                  PRO_HI: tl.constexpr, ACT_HI: tl.constexpr, SLOPE_HI: tl.constexpr,
                  ACC: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dw[split, lo, hi, kh, kw] = sum over this split's images n of
    prologue(lo)[n, lo, i, j] * prologue(hi)[n, hi, S*i - P + kh, S*j - P + kw].  Axis 2: split*KERNEL_TAPS + tap.

    A K step covers a block of BLOCK_K positions: BLOCK_K / (block_h*block_w) images x block_h rows x block_w
    columns (powers of two; block_h*block_w <= BLOCK_K).  A lane's place in the block is worked out once, so a
    K step moves three scalar block coordinates and no lane divides.
    EVEN_N: every split holds images_per_split images, whole K steps of them (no lane past the split's images).
    EVEN_HW: block_h divides H_lo and block_w divides W_lo (no block reaches past the image).
    SPAN: SPAN_ROWS where a block spans whole rows (block_w >= W_lo: the block's column never moves), SPAN_IMAGES
    where it spans whole images (its row and column never move), else SPAN_PART."""
    lo_c = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    hi_c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    lo_mask = lo_c < C_lo
    hi_mask = hi_c < C_hi
    split = tl.program_id(2) // KERNEL_TAPS
    tap = tl.program_id(2) - split * KERNEL_TAPS
    kh = tap // KERNEL
    kw = tap - kh * KERNEL
    lane = tl.arange(0, BLOCK_K)
    block_images = BLOCK_K // (block_h * block_w)
    lane_n = lane // (block_h * block_w)
    lane_i = (lane // block_w) % block_h
    lane_j = lane % block_w
    a_ptrs = lo_ptr + (lo_c * l_c)[:, None] + (lane_n * l_n + lane_i * l_h + lane_j * l_w)[None, :]
    a_q_ptrs = lo_q_ptr + (lo_c * l_c)[:, None] + (lane_n * l_n + lane_i * l_h + lane_j * l_w)[None, :]
    hi_lane = lane_n * h_n + (S * lane_i - P + kh) * h_h + (S * lane_j - P + kw) * h_w
    b_ptrs = hi_ptr + hi_lane[:, None] + (hi_c * h_c)[None, :]
    b_q_ptrs = hi_q_ptr + hi_lane[:, None] + (hi_c * h_c)[None, :]
    # The channels' maps are the same for every K step: loaded once.
    lo_scale, lo_q_scale, lo_shift = _channel_map(lo_coef_ptr, lo_c, lo_mask, C_lo, lo_ptr.dtype.element_ty, PRO_LO,
                                                  ACT_LO, ACC)
    hi_scale, hi_q_scale, hi_shift = _channel_map(hi_coef_ptr, hi_c, hi_mask, C_hi, hi_ptr.dtype.element_ty, PRO_HI,
                                                  ACT_HI, ACC)
    n_start = split * images_per_split
    n_end = tl.minimum(n_start + images_per_split, N)
    blocks_h = tl.cdiv(H_lo, block_h)
    blocks_w = tl.cdiv(W_lo, block_w)
    k_steps = tl.cdiv(n_end - n_start, block_images) * blocks_h * blocks_w
    n0 = n_start
    i0 = 0
    j0 = 0
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for _ in range(k_steps):
        i = i0 + lane_i
        j = j0 + lane_j
        hh = S * i - P + kh
        hw = S * j - P + kw
        if EVEN_N:
            lo_ok = tl.full([BLOCK_K], 1, tl.int1)
        else:
            lo_ok = n0 + lane_n < n_end
        if not EVEN_HW:
            lo_ok &= (i < H_lo) & (j < W_lo)
        hi_ok = lo_ok & (hh >= 0) & (hh < H_hi) & (hw >= 0) & (hw < W_hi)
        lo_step = n0 * l_n + i0 * l_h + j0 * l_w
        hi_step = n0 * h_n + S * (i0 * h_h + j0 * h_w)
        a = _load_operand(a_ptrs + lo_step, a_q_ptrs + lo_step, lo_ok, lo_mask, lo_scale, lo_q_scale, lo_shift,
                          SLOPE_LO, PRO_LO, ACT_LO, 0)
        b = _load_operand(b_ptrs + hi_step, b_q_ptrs + hi_step, hi_ok, hi_mask, hi_scale, hi_q_scale, hi_shift,
                          SLOPE_HI, PRO_HI, ACT_HI, 1)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
        # The next block: along the row, then down the image, then the next images.  A coordinate that never
        # moves stays a constant, so the validity of the lanes along it is worked out once, before the loop.
        if SPAN == SPAN_PART:
            j0 += block_w
            row_done = j0 >= W_lo
            j0 = tl.where(row_done, 0, j0)
            i0 += tl.where(row_done, block_h, 0)
        elif SPAN == SPAN_ROWS:
            i0 += block_h
        if SPAN == SPAN_IMAGES:
            n0 += block_images
        else:
            image_done = i0 >= H_lo
            i0 = tl.where(image_done, 0, i0)
            n0 += tl.where(image_done, block_images, 0)
    offs = split * d_split + (lo_c * d_lo)[:, None] + (hi_c * d_hi)[None, :] + tap
    tl.store(dw_ptr + offs, acc, mask=lo_mask[:, None] & hi_mask[None, :])


@triton.jit
def _finalize_stats_kernel(part_ptr, stats_ptr, coef_ptr, gamma_ptr, beta_ptr, running_mean_ptr, running_var_ptr,
                           C, ROWS, n_parts, momentum, eps, AFFINE: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
                           ACC: tl.constexpr, TILE_ROWS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge the tile partials (Chan et al.) into mean and invstd (biased variance), the forward prologue map
    (scale, 0, shift) and the running statistics (unbiased variance).  Part p covers row tile p mod tiles."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    tiles = tl.cdiv(ROWS, TILE_ROWS)
    count = tl.zeros([BLOCK_C], ACC)
    mean = tl.zeros_like(count)
    m2 = tl.zeros_like(count)
    for p0 in range(0, n_parts, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        mask = (parts < n_parts)[:, None] & col_mask[None, :]
        offs = parts[:, None] * C + cols[None, :]
        part_mean = tl.load(part_ptr + offs, mask=mask, other=0.0)
        part_m2 = tl.load(part_ptr + n_parts * C + offs, mask=mask, other=0.0)
        tile = parts % tiles
        part_count = tl.where(parts < n_parts, tl.minimum(ROWS - tile * TILE_ROWS, TILE_ROWS), 0)
        part_count = part_count.to(mean.dtype)[:, None]
        chunk_count = tl.sum(part_count, 0)
        chunk_mean = tl.sum(part_count * part_mean, 0) / chunk_count
        d = tl.where(mask, part_mean - chunk_mean[None, :], 0.0)
        chunk_m2 = tl.sum(part_m2 + part_count * d * d, 0)
        total = count + chunk_count
        delta = chunk_mean - mean
        mean += delta * (chunk_count / total)
        m2 += chunk_m2 + delta * delta * (count * chunk_count / total)
        count = total
    var = m2 / count
    invstd = 1.0 / tl.sqrt(var + eps)
    tl.store(stats_ptr + cols, mean, mask=col_mask)
    tl.store(stats_ptr + C + cols, invstd, mask=col_mask)
    if AFFINE:
        scale = tl.load(gamma_ptr + cols, mask=col_mask, other=0.0).to(mean.dtype) * invstd
        shift = tl.load(beta_ptr + cols, mask=col_mask, other=0.0).to(mean.dtype) - mean * scale
    else:
        scale = invstd
        shift = -mean * invstd
    tl.store(coef_ptr + cols, scale, mask=col_mask)
    tl.store(coef_ptr + C + cols, tl.zeros_like(scale), mask=col_mask)
    tl.store(coef_ptr + 2 * C + cols, shift, mask=col_mask)
    if UPDATE_RUNNING:
        update_running_stats(running_mean_ptr, running_var_ptr, cols, col_mask, mean, var, count, momentum)


@triton.jit
def _finalize_grad_kernel(part_ptr, stats_ptr, gamma_ptr, sums_ptr, coef_ptr, C, n_parts, count,
                          AFFINE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """sums = (sum(g), sum(g*xhat)) = (dbeta, dgamma), and the backward prologue map (a, b, c) with
    dz = a*g + b*z + c = gamma*invstd*(g - sum(g)/n - xhat*sum(g*xhat)/n)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mean = tl.load(stats_ptr + cols, mask=col_mask, other=0.0)
    invstd = tl.load(stats_ptr + C + cols, mask=col_mask, other=0.0)
    sum_g = tl.zeros_like(mean)
    sum_gx = tl.zeros_like(mean)
    for p0 in range(0, n_parts, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        mask = (parts < n_parts)[:, None] & col_mask[None, :]
        offs = parts[:, None] * C + cols[None, :]
        sum_g += tl.sum(tl.load(part_ptr + offs, mask=mask, other=0.0), 0)
        sum_gx += tl.sum(tl.load(part_ptr + n_parts * C + offs, mask=mask, other=0.0), 0)
    tl.store(sums_ptr + cols, sum_g, mask=col_mask)
    tl.store(sums_ptr + C + cols, sum_gx, mask=col_mask)
    a = invstd
    if AFFINE:
        a *= tl.load(gamma_ptr + cols, mask=col_mask, other=0.0).to(mean.dtype)
    b = -a * invstd * (sum_gx / count)
    tl.store(coef_ptr + cols, a, mask=col_mask)
    tl.store(coef_ptr + C + cols, b, mask=col_mask)
    tl.store(coef_ptr + 2 * C + cols, -a * (sum_g / count) - b * mean, mask=col_mask)


# ----------------------------------------------------------------------------- tuning

_CONV_TILE = ("BLOCK_N", "BLOCK_K")  # the conv's BLOCK_M is the host's (the statistics partials are laid out by it)
_WGRAD_TILE = ("BLOCK_K",)          # the wgrad's BLOCK_M x BLOCK_N too (the split of K is sized by them)


def _config(tile, names):
    return triton.Config({name: getattr(tile, name.lower()) for name in names}, num_warps=tile.warps,
                         num_stages=tile.stages)


def _operand(pro, act, dtype):
    """How an operand of ``dtype`` with prologue ``pro`` and activation ``act`` reaches the dot (_channel_map's
    rule for the map's dtype)."""
    mapped = bool(pro != PRO_NONE or act != 0)
    packed = mapped and dtype == torch.bfloat16 and act != activations.TANH
    return tiling.Operand(2 if pro == PRO_BACKWARD else 1, mapped, packed)


def _no_tile(what, dtype):
    return ValueError(f"conv_gemm: no {what} tile in {dtype} fits this GPU's shared memory; run the layer at "
                      "fusion level L1 (fastgan.nn.fused_conv does so when tiling.l2_problem says why)")


_candidates = {}  # by problem and device: choosing a tile costs more host time than a launch


def _conv_candidates(x, C_in, C_out, block_m, n_parts, pro, act, precision):
    """The conv tiles that fit, tiling.pick_conv's first: the one a launch takes without autotuning."""
    device = tiling.device_of(x.device)
    key = ("conv", x.dtype, C_in, C_out, block_m, n_parts, pro, act, precision, device)
    if key not in _candidates:
        g = tiling.gemm(x.element_size(), precision == "ieee", _operand(pro, act, x.dtype), tiling.Operand())
        tiles = tiling.conv_candidates(block_m, C_in, C_out, g, device)
        if not tiles:
            raise _no_tile("conv", x.dtype)
        first = tiling.pick_conv(tiles, lambda t: n_parts * triton.cdiv(C_out, t.block_n), device)
        _candidates[key] = [first] + [t for t in tiles if t != first]
    return _candidates[key]


def _wgrad_candidates(lo, C_lo, C_hi, pro_lo, act_lo, pro_hi, act_hi, precision):
    """The wgrad tiles that fit, the one a launch takes without autotuning first."""
    device = tiling.device_of(lo.device)
    key = ("wgrad", lo.dtype, C_lo, C_hi, pro_lo, act_lo, pro_hi, act_hi, precision, device)
    if key not in _candidates:
        g = tiling.gemm(lo.element_size(), precision == "ieee", _operand(pro_lo, act_lo, lo.dtype),
                        _operand(pro_hi, act_hi, lo.dtype))
        tiles = tiling.wgrad_candidates(C_lo, C_hi, g, device)
        if not tiles:
            raise _no_tile("wgrad", lo.dtype)
        _candidates[key] = tiles
    return _candidates[key]


def _prune_conv(configs, named_args, **kw):
    return [_config(t, _CONV_TILE) for t in _conv_candidates(
        named_args["src_ptr"], named_args["C_in"], named_args["C_out"], kw["BLOCK_M"], named_args["n_parts"],
        kw["PRO"], kw["ACT_IN"], kw["PRECISION"])]


def _prune_wgrad(configs, named_args, **kw):
    return [_config(t, _WGRAD_TILE) for t in _wgrad_candidates(
        named_args["lo_ptr"], named_args["C_lo"], named_args["C_hi"], kw["PRO_LO"], kw["ACT_LO"], kw["PRO_HI"],
        kw["ACT_HI"], kw["PRECISION"])]


def _autotuned(kernel, tiles, names, key, prune):
    # The configs listed are the tuning space at 16-bit BLOCK_K; the prune returns the ones that fit the launch.
    configs = [_config(t, names) for t in tiles]
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune},
                           cache_results=True)(kernel)


_CONV_KEY = ["C_in", "H_in", "W_in", "C_out", "ROWS", "UP", "S", "PRO", "ACT_IN", "EPI", "PRECISION", "BLOCK_M"]
_WGRAD_KEY = ["C_lo", "C_hi", "N", "H_lo", "W_lo", "images_per_split", "S", "PRO_LO", "ACT_LO", "PRO_HI", "ACT_HI",
              "PRECISION", "BLOCK_M", "BLOCK_N"]

# FASTGAN_AUTOTUNE=1: benchmark every tile that fits on the first call per shape (triton keeps the winners in
# its cache directory).  Otherwise a launch compiles one tile, the first candidate.
AUTOTUNE = os.environ.get("FASTGAN_AUTOTUNE", "0") == "1"
_conv_tuned = _wgrad_tuned = None  # under the interpreter every launch takes the fixed tiles of conv() / wgrad()
if not INTERPRETED:
    _conv_tuned = _autotuned(_conv_kernel, [tiling.Tile(0, n, k, w, s) for n, k, w, s in tiling.CONV_TILES],
                             _CONV_TILE, _CONV_KEY, _prune_conv)
    _wgrad_tuned = _autotuned(_wgrad_kernel, [tiling.Tile(0, 0, k, w, s) for k, w, s in tiling.WGRAD_TILES],
                              _WGRAD_TILE, _WGRAD_KEY, _prune_wgrad)


def _launch(kernel, tuned, grid, tile, names, args, meta):
    """kernel[grid](*args, **meta) with ``tile``'s sizes, warps and stages, or through the autotuner."""
    if AUTOTUNE and tuned is not None:
        tuned[grid](*args, **meta)
    else:
        config = _config(tile, names)
        kernel[grid(config.kwargs)](*args, **meta, **config.kwargs, num_warps=config.num_warps,
                                    num_stages=config.num_stages)


_MIN_BLOCK_K = 16  # tiling.block_k's floor: the smallest BLOCK_K of any candidate


def _block_m(rows):
    """Output pixels per conv tile (fixed by the host: the statistics partials are laid out by it)."""
    if INTERPRETED:
        return min(1024, max(16, triton.next_power_of_2(rows)))  # few, large programs: the interpreter pays per op
    return 128 if rows >= 8192 else 64


def _conv_splits(programs, taps, epilogue, device):
    """Splits of a conv's K loop (a power of two dividing its taps): enough for a wave where the grid is below
    one and every split keeps 1 tap at least (D's last conv, 512x4x4 -> 1, is 2 programs at B=128).  Only an
    EPI_STORE epilogue splits: the others need the whole sum."""
    splits = 1
    if epilogue == EPI_STORE:
        while splits < taps and 2 * splits * programs <= _sm_count(device):
            splits *= 2
    return splits


_workspaces = {}  # (device, dtype): the split-K partial sums' buffer, grown on demand and reused by every launch


def capturing(device):
    """Whether work on ``device`` is being captured into a CUDA graph: then nothing may be cached across calls,
    since a cached tensor's kernel would not be in the graph and a graph-pool tensor would leak out of it."""
    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


def _workspace(numel, dtype, like):
    """A reused buffer of at least ``numel`` elements on ``like``'s device (a fresh one when ``like`` is fake, as a
    fake buffer cannot be kept, and under capture).  Its contents live until the next split launch on the device:
    callers reduce it before returning."""
    device = like.device
    if is_fake(like) or capturing(device):
        return torch.empty(numel, device=device, dtype=dtype)
    key = (str(device), dtype)
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < numel:
        buf = _workspaces[key] = torch.empty(numel, device=device, dtype=dtype)
    buf = buf[:numel]
    return buf.fill_(float("nan")) if outputs.POISON_OUTPUTS else buf


def _slope(act, slope):
    """The slope constexpr of a launch: LeakyReLU's (a compile-time constant, so the prologue's activation is two
    instructions per lane pair, see bn_act._activate), else 0.0 (one compilation whatever the unused slope)."""
    return float(slope) if act == activations.LEAKY_RELU else 0.0


def _sm_count(device):
    limits = tiling.device_of(device)
    return 2 if limits is None else limits.sms


# ----------------------------------------------------------------------------- launch helpers

class GemmInput(NamedTuple):
    """A tensor as a GEMM loads it: act(t*u + q*v + w) per channel, (u, v, w) = coef[:, c].

    t: (N, C, H, W), any strides.  coef: (3, C) in the accumulation dtype, or None for no affine map.
    q: the second input of the backward map (BN backward: g in t, z in q), with t's strides; else None.
    act/slope: fastgan.ops.ACTIVATIONS code and LeakyReLU slope, applied after the map."""
    t: torch.Tensor
    coef: Optional[torch.Tensor] = None
    q: Optional[torch.Tensor] = None
    act: int = 0
    slope: float = 0.0

    @property
    def pro(self):
        return PRO_NONE if self.coef is None else (PRO_FORWARD if self.q is None else PRO_BACKWARD)

    def args(self):
        """(t, q, coef) pointers for a launch; unused ones point at t."""
        return self.t, self.t if self.q is None else self.q, self.t if self.coef is None else self.coef


class Partials(NamedTuple):
    """Per-tile, per-channel partials (2, n_parts, C) of an epilogue, and the tiling that produced them."""
    parts: torch.Tensor
    rows: int       # output pixels per sub-pixel class
    tile_rows: int  # output pixels per tile
    count: int      # output pixels in all, n of the statistics


def _even(channels):
    """Whether every candidate BLOCK_K divides ``channels`` (a power of two >= 16: BLOCK_K is one, between 16
    and the channel count)."""
    return channels >= 16 and channels & (channels - 1) == 0


def _precision(dtype, allow_tf32):
    # Only fp32 operands read this: "ieee" is exact fp32, "tf32" (tl.dot's default) uses TF32 tensor cores.
    return "ieee" if dtype == torch.float32 and not allow_tf32 else "tf32"


_PACK_CACHE = 64  # packed weights kept: a DCGAN step packs 20 (each conv weight for its forward and its dgrad)
_packs = {}


def packed_weight(weight, dtype, up):
    """``weight`` as the conv GEMM reads it: (KERNEL, KERNEL, out, red) contiguous in ``dtype`` (K-major B
    tiles, cast once), where DOWN reads weight as [out, red, kh, kw] and UP as [red, out, kh, kw].

    Cached per weight tensor and version counter: a training step packs each weight once per use (forward,
    dgrad) however many times it runs the layer, and an in-place update (the optimizer's) packs anew.  Not
    cached for inference tensors (no version counter) nor under CUDA graph capture: there each use packs, so
    that every replay packs the weights its own optimizer step left."""
    permuted = weight.permute(2, 3, 0, 1) if not up else weight.permute(2, 3, 1, 0)
    if weight.is_inference() or capturing(weight.device):
        return permuted.to(dtype, memory_format=torch.contiguous_format)
    key = (id(weight), dtype, up)
    entry = _packs.get(key)
    if entry is None or entry[0] is not weight or entry[1] != weight._version:
        if len(_packs) >= _PACK_CACHE:
            del _packs[next(iter(_packs))]
        # The entry holds the weight itself: its id cannot be reused by another tensor while cached.
        entry = _packs[key] = (weight, weight._version, permuted.to(dtype, memory_format=torch.contiguous_format))
    return entry[2]


def conv(src, weight, geometry, out, epilogue=EPI_STORE, below=None, allow_tf32=True):
    """out = DOWN/UP(src, weight) with src loaded through its prologue; returns the epilogue's Partials.

    src: GemmInput (N, C_in, H, W); weight: (C_out, C_in, 4, 4) for DOWN, (C_in, C_out, 4, 4) for UP, any
    dtype (packed into src's by :func:`packed_weight`); out: (N, C_out, H', W') preallocated, any strides.
    epilogue: EPI_STORE (no partials), EPI_STATS (Welford partials of out), or EPI_GRAD: ``below`` = (z, stats,
    coef, act, slope) of the layer whose output ``out`` is the gradient of; out becomes g = acc*act'(z*scale +
    shift) and the partials are (sum(g), sum(g*xhat)) when stats is not None (a BN layer), absent otherwise."""
    x = src.t
    N, C_in, H_in, W_in = x.shape
    C_out, H_out, W_out = out.shape[1:]
    for name, t in (("src", x), ("out", out)):
        outputs.check_int32("conv_gemm", name, t)
    S, P = geometry.stride, geometry.padding
    classes = S * S if geometry.up else 1
    rows = N * H_out * W_out // classes
    block_m = _block_m(rows)
    n_parts = classes * triton.cdiv(rows, block_m)
    normalize = epilogue == EPI_STATS or (epilogue == EPI_GRAD and below[1] is not None)
    acc = outputs.accumulator_dtype(x.dtype)
    parts = outputs.empty((2, n_parts, C_out), device=x.device, dtype=acc) if normalize else out
    z, stats, coef, act, slope = below if epilogue == EPI_GRAD else (out, None, None, 0, 0.0)
    w = packed_weight(weight, x.dtype, geometry.up)
    w_kh, w_kw, w_out, w_red = w.stride()
    precision = _precision(x.dtype, allow_tf32)
    if INTERPRETED:  # the interpreter runs programs one at a time in numpy: few, large ones
        tile = tiling.Tile(block_m, 16, 16, 4, 1)
    else:
        tile = _conv_candidates(x, C_in, C_out, block_m, n_parts, src.pro, src.act, precision)[0]
    taps = (KERNEL.value // S if geometry.up else KERNEL.value) ** 2
    splits = _conv_splits(n_parts * triton.cdiv(C_out, tile.block_n), taps, epilogue, x.device)
    target = out
    if splits > 1:  # fp32 partial sums, added in split order below
        target = _workspace(splits * out.numel(), acc, x).view(splits, *out.shape)
    grid = lambda meta: (n_parts, triton.cdiv(C_out, meta["BLOCK_N"]), splits)  # noqa: E731
    _launch(_conv_kernel, _conv_tuned, grid, tile, _CONV_TILE, (
        *src.args(), w, target, z, out if coef is None else coef, out if stats is None else stats, parts,
        C_in, H_in, W_in, C_out, H_out, W_out, rows, n_parts, taps // splits,
        *x.stride(), *(target.stride() if splits > 1 else (0, *out.stride())), w_red, w_out, w_kh, w_kw), dict(
        UP=geometry.up, S=S, P=P, TAPS=KERNEL.value // S if geometry.up else KERNEL.value, PRO=_value(src.pro),
        ACT_IN=src.act, SLOPE_IN=_slope(src.act, src.slope), EPI=_value(epilogue), ACT_OUT=act,
        SLOPE_OUT=_slope(act, slope), NORM_OUT=stats is not None, EVEN_K=_even(C_in),
        ACC=outputs.triton_accumulator(x.dtype), PRECISION=precision, BLOCK_M=block_m))
    if splits > 1:
        out.copy_(target.sum(0))  # a fixed order: deterministic
    return Partials(parts, rows, block_m, rows * classes) if normalize else None


def wgrad(lo, hi, geometry, allow_tf32=True):
    """dw[lo_c, hi_c, kh, kw] = sum_{n,i,j} lo[n, lo_c, i, j] * hi[n, hi_c, S*i - P + kh, S*j - P + kw], both
    through their prologues: the weight gradient of a conv (lo = dz, hi = x) or convT (lo = x, hi = dz).

    Returns (C_lo, C_hi, 4, 4) contiguous in the accumulation dtype (fp32, fp64 for fp64)."""
    l, h = lo.t, hi.t
    N, C_lo, H_lo, W_lo = l.shape
    C_hi, H_hi, W_hi = h.shape[1:]
    for name, t in (("lo", l), ("hi", h)):
        outputs.check_int32("conv_gemm", name, t)
    precision = _precision(l.dtype, allow_tf32)
    if INTERPRETED:
        candidates = [tiling.Tile(16, 16, 1024, 4, 1)]
    else:
        candidates = _wgrad_candidates(l, C_lo, C_hi, lo.pro, lo.act, hi.pro, hi.act, precision)
    tile = candidates[0]
    block_m, block_n = tile.block_m, tile.block_n
    tiles = KERNEL_TAPS.value * triton.cdiv(C_lo, block_m) * triton.cdiv(C_hi, block_n)
    # K steps of BLOCK_K positions: blocks of whole rows where they fit the smallest BLOCK_K (16), then images.
    block_w = min(triton.next_power_of_2(W_lo), _MIN_BLOCK_K)
    block_h = min(triton.next_power_of_2(H_lo), _MIN_BLOCK_K // block_w)
    # Split K (by images) so that the grid fills the device twice over, each split 256 positions at least.  A split
    # holds a power of two of images, at least the most a K step of any candidate covers: where that divides N,
    # every K step of every split is whole images (EVEN_N) and no lane of the low side is masked.
    splits = max(1, min(triton.cdiv(N * H_lo * W_lo, 256), triton.cdiv(2 * _sm_count(l.device), tiles), N))
    most_images = max(t.block_k for t in candidates) // (block_h * block_w)
    images_per_split = max(most_images, triton.next_power_of_2(triton.cdiv(N, splits)))
    splits = triton.cdiv(N, images_per_split)
    shape = (splits, C_lo, C_hi, KERNEL_TAPS.value)
    acc = outputs.accumulator_dtype(l.dtype)
    if splits > 1:  # partial sums, added in split order below
        dw = _workspace(C_lo * C_hi * KERNEL_TAPS.value * splits, acc, l).view(shape)
    else:
        dw = outputs.empty(shape, device=l.device, dtype=acc)
    grid = (triton.cdiv(C_lo, block_m), triton.cdiv(C_hi, block_n), KERNEL_TAPS.value * splits)
    _launch(_wgrad_kernel, _wgrad_tuned, lambda meta: grid, tile, _WGRAD_TILE, (
        *lo.args(), *hi.args(), dw, C_lo, H_lo, W_lo, C_hi, H_hi, W_hi, N, images_per_split, block_h, block_w,
        *l.stride(), *h.stride(), *dw.stride()[:3]), dict(
        S=geometry.stride, P=geometry.padding, EVEN_N=N % images_per_split == 0,
        EVEN_HW=H_lo % block_h == 0 and W_lo % block_w == 0,
        SPAN=_value(SPAN_PART if block_w < W_lo else SPAN_ROWS if block_h < H_lo else SPAN_IMAGES),
        PRO_LO=_value(lo.pro), ACT_LO=lo.act,
        SLOPE_LO=_slope(lo.act, lo.slope), PRO_HI=_value(hi.pro), ACT_HI=hi.act, SLOPE_HI=_slope(hi.act, hi.slope),
        ACC=outputs.triton_accumulator(l.dtype), PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n))
    dw = dw[0] if splits == 1 else dw.sum(0)  # a fixed order: deterministic
    return dw.view(C_lo, C_hi, KERNEL.value, KERNEL.value)


# The finalize kernels read the partials 128 rows x 16 channels at a time: the rows in parallel, 8x fewer serial
# iterations than 32 x 32 (1024 partial rows of G's last BN layer: 8), and twice the programs.
_FINALIZE_P, _FINALIZE_C = 128, 16


def finalize_stats(partials, weight, bias, running_mean, running_var, momentum, eps, out=None):
    """Batch statistics from STATS partials.  Returns stats (2, C) = (mean, invstd) and the forward prologue
    map coef (3, C) = (gamma*invstd, 0, beta - mean*gamma*invstd), in the partials' dtype, written into
    ``out`` = (stats, coef) (contiguous) when given.  Updates running_mean/var in place (unbiased variance)
    when given."""
    parts = partials.parts
    C = parts.shape[2]
    if out is None:
        out = outputs.empty((2, C), device=parts.device, dtype=parts.dtype), \
            outputs.empty((3, C), device=parts.device, dtype=parts.dtype)
    stats, coef = out
    affine, update = weight is not None, running_mean is not None
    _finalize_stats_kernel[(triton.cdiv(C, _FINALIZE_C),)](
        parts, stats, coef, weight if affine else stats, bias if affine else stats,
        running_mean if update else stats, running_var if update else stats,
        C, partials.rows, parts.shape[1], momentum, eps,
        AFFINE=affine, UPDATE_RUNNING=update, ACC=outputs.triton_accumulator(parts.dtype), TILE_ROWS=partials.tile_rows,
        BLOCK_P=_FINALIZE_P, BLOCK_C=_FINALIZE_C)
    return stats, coef


def finalize_grad(partials, stats, weight):
    """(dbeta, dgamma) = (sum(g), sum(g*xhat)) from GRAD partials, as sums (2, C), and the backward prologue
    map coef (3, C): dz = coef[0]*g + coef[1]*z + coef[2]."""
    parts = partials.parts
    C = parts.shape[2]
    sums = outputs.empty((2, C), device=parts.device, dtype=parts.dtype)
    coef = outputs.empty((3, C), device=parts.device, dtype=parts.dtype)
    affine = weight is not None
    _finalize_grad_kernel[(triton.cdiv(C, _FINALIZE_C),)](
        parts, stats, weight if affine else stats, sums, coef, C, parts.shape[1], float(partials.count),
        AFFINE=affine, BLOCK_P=_FINALIZE_P, BLOCK_C=_FINALIZE_C)
    return sums, coef
