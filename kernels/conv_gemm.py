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

Operands load through a per-channel affine map and an activation (the prologue, see :class:`Operand`):
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

from . import outputs, tiling
from .bn_act import _activate, _activation_grad, update_running_stats
from .geometry import Geometry

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Prologue maps and epilogues (constexpr codes).
PRO_NONE, PRO_FORWARD, PRO_BACKWARD = 0, 1, 2
EPI_STORE, EPI_STATS, EPI_GRAD = 0, 1, 2


@triton.jit
def _channel_vec(ptr, chan, chan_mask, AXIS: tl.constexpr):
    v = tl.load(ptr + chan, mask=chan_mask, other=0.0)
    if AXIS == 0:
        out = v[:, None]
    else:
        out = v[None, :]
    return out


@triton.jit
def _load_operand(ptrs, q_ptrs, mask, coef_ptr, chan, chan_mask, C, slope,
                  PRO: tl.constexpr, ACT: tl.constexpr, AXIS: tl.constexpr, ACC: tl.constexpr):
    """A GEMM operand tile: act(t*u + q*v + w), (u, v, w) = coef[:, chan] with chan along AXIS of the tile.

    Zero where ``mask`` is false: the convolution's zero padding applies to the activation, not to t."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if PRO != 0 or ACT != 0:
        y = x.to(ACC)
        if PRO != 0:
            u = _channel_vec(coef_ptr, chan, chan_mask, AXIS)
            w = _channel_vec(coef_ptr + 2 * C, chan, chan_mask, AXIS)
            y = y * u + w
            if PRO == 2:
                q = tl.load(q_ptrs, mask=mask, other=0.0).to(ACC)
                y += q * _channel_vec(coef_ptr + C, chan, chan_mask, AXIS)
        y = _activate(y, slope, ACT)
        x = tl.where(mask, y, 0.0).to(x.dtype)
    return x


@triton.jit
def _conv_kernel(src_ptr, q_ptr, pro_coef_ptr, w_ptr, out_ptr, z_ptr, epi_coef_ptr, epi_stats_ptr, part_ptr,
                 C_in, H_in, W_in, C_out, H_out, W_out, ROWS, n_parts,
                 s_n, s_c, s_h, s_w, o_n, o_c, o_h, o_w, w_red, w_out, w_kh, w_kw, slope_in, slope_out,
                 UP: tl.constexpr, S: tl.constexpr, P: tl.constexpr, TAPS: tl.constexpr,
                 PRO: tl.constexpr, ACT_IN: tl.constexpr, EPI: tl.constexpr, ACT_OUT: tl.constexpr,
                 NORM_OUT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out = DOWN/UP(prologue(src), w), one (BLOCK_M output pixels) x (BLOCK_N channels) tile per program.

    Program axis 0 runs over (sub-pixel class, row tile), ROWS output pixels per class; axis 1 over channels.
    TAPS taps per dimension: 4 for DOWN, 4/S for UP.  q and z share the strides of src and out."""
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

    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    # One loop over (tap, channel block), so that the pipeliner overlaps loads across taps.
    k_blocks = tl.cdiv(C_in, BLOCK_K)
    for it in range(TAPS * TAPS * k_blocks):
        t = it // k_blocks
        ks = (it - t * k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        th = t // TAPS
        tw = t - th * TAPS
        if UP:
            # out[S*i + ph] takes the taps kh = (ph + P) mod S + S*th, from in[i + (ph + P) div S - th].
            kh = (ph + P) % S + S * th
            kw = (pw + P) % S + S * tw
            ih = i + (ph + P) // S - th
            iw = j + (pw + P) // S - tw
        else:
            kh = th
            kw = tw
            ih = S * i - P + kh
            iw = S * j - P + kw
        valid = row_mask & (ih >= 0) & (ih < H_in) & (iw >= 0) & (iw < W_in)
        k_mask = ks < C_in
        mask = valid[:, None] & k_mask[None, :]
        offs = (n * s_n + ih * s_h + iw * s_w)[:, None] + (ks * s_c)[None, :]
        a = _load_operand(src_ptr + offs, q_ptr + offs, mask, pro_coef_ptr, ks, k_mask, C_in, slope_in,
                          PRO, ACT_IN, 1, ACC)
        b = tl.load(w_ptr + kh * w_kh + kw * w_kw + (ks * w_red)[:, None] + (cols * w_out)[None, :],
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)

    if UP:
        oh = S * i + ph
        ow = S * j + pw
    else:
        oh = i
        ow = j
    offs = (n * o_n + oh * o_h + ow * o_w)[:, None] + (cols * o_c)[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    if EPI == 1:
        count = tl.minimum(ROWS - tile * BLOCK_M, BLOCK_M).to(ACC)
        mean = tl.sum(tl.where(mask, acc, 0.0), 0) / count
        d = tl.where(mask, acc - mean[None, :], 0.0)
        tl.store(part_ptr + slot * C_out + cols, mean, mask=col_mask)
        tl.store(part_ptr + (n_parts + slot) * C_out + cols, tl.sum(d * d, 0), mask=col_mask)
    elif EPI == 2:
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(ACC)
        if NORM_OUT:
            scale = tl.load(epi_coef_ptr + cols, mask=col_mask, other=0.0)
            shift = tl.load(epi_coef_ptr + 2 * C_out + cols, mask=col_mask, other=0.0)
            acc = _activation_grad(acc, z * scale[None, :] + shift[None, :], slope_out, ACT_OUT)
            acc = tl.where(mask, acc, 0.0)
            mean = tl.load(epi_stats_ptr + cols, mask=col_mask, other=0.0)
            invstd = tl.load(epi_stats_ptr + C_out + cols, mask=col_mask, other=0.0)
            xhat = (z - mean[None, :]) * invstd[None, :]
            tl.store(part_ptr + slot * C_out + cols, tl.sum(acc, 0), mask=col_mask)
            tl.store(part_ptr + (n_parts + slot) * C_out + cols, tl.sum(acc * xhat, 0), mask=col_mask)
        else:
            acc = _activation_grad(acc, z, slope_out, ACT_OUT)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _wgrad_kernel(lo_ptr, lo_q_ptr, lo_coef_ptr, hi_ptr, hi_q_ptr, hi_coef_ptr, dw_ptr,
                  C_lo, H_lo, W_lo, C_hi, H_hi, W_hi, K, k_per_split,
                  l_n, l_c, l_h, l_w, h_n, h_c, h_h, h_w, d_split, d_lo, d_hi, slope_lo, slope_hi,
                  S: tl.constexpr, P: tl.constexpr, PRO_LO: tl.constexpr, ACT_LO: tl.constexpr,
                  PRO_HI: tl.constexpr, ACT_HI: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dw[split, lo, hi, kh, kw] = sum over this split's K = N*H_lo*W_lo positions of
    prologue(lo)[n, lo, i, j] * prologue(hi)[n, hi, S*i - P + kh, S*j - P + kw].  Axis 2: split*16 + tap."""
    lo_c = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    hi_c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    lo_mask = lo_c < C_lo
    hi_mask = hi_c < C_hi
    split = tl.program_id(2) // 16
    tap = tl.program_id(2) % 16
    kh = tap // 4
    kw = tap % 4
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k0 in range(k_start, k_end, BLOCK_K):
        r = k0 + tl.arange(0, BLOCK_K)
        r_mask = r < k_end
        n = r // (H_lo * W_lo)
        rest = r - n * (H_lo * W_lo)
        i = rest // W_lo
        j = rest - i * W_lo
        a_mask = lo_mask[:, None] & r_mask[None, :]
        a_offs = (lo_c * l_c)[:, None] + (n * l_n + i * l_h + j * l_w)[None, :]
        a = _load_operand(lo_ptr + a_offs, lo_q_ptr + a_offs, a_mask, lo_coef_ptr, lo_c, lo_mask, C_lo, slope_lo,
                          PRO_LO, ACT_LO, 0, ACC)
        hh = S * i - P + kh
        hw = S * j - P + kw
        valid = r_mask & (hh >= 0) & (hh < H_hi) & (hw >= 0) & (hw < W_hi)
        b_mask = valid[:, None] & hi_mask[None, :]
        b_offs = (n * h_n + hh * h_h + hw * h_w)[:, None] + (hi_c * h_c)[None, :]
        b = _load_operand(hi_ptr + b_offs, hi_q_ptr + b_offs, b_mask, hi_coef_ptr, hi_c, hi_mask, C_hi, slope_hi,
                          PRO_HI, ACT_HI, 1, ACC)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
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


def _operand(pro, act):
    return tiling.Operand(2 if pro == PRO_BACKWARD else 1, pro != PRO_NONE or act != 0)


def _no_tile(what, dtype):
    return ValueError(f"conv_gemm: no {what} tile in {dtype} fits this GPU's shared memory; run the layer at "
                      "fusion level L1 (fastgan.nn.fused_conv does so when tiling.l2_problem says why)")


_candidates = {}  # by problem and device: choosing a tile costs more host time than a launch


def _conv_candidates(x, C_in, C_out, block_m, n_parts, pro, act, precision):
    """The conv tiles that fit, tiling.pick_conv's first: the one a launch takes without autotuning."""
    device = tiling.device_of(x.device)
    key = ("conv", x.dtype, C_in, C_out, block_m, n_parts, pro, act, precision, device)
    if key not in _candidates:
        g = tiling.gemm(x.element_size(), precision == "ieee", _operand(pro, act), tiling.Operand())
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
        g = tiling.gemm(lo.element_size(), precision == "ieee", _operand(pro_lo, act_lo), _operand(pro_hi, act_hi))
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
_WGRAD_KEY = ["C_lo", "C_hi", "K", "k_per_split", "S", "PRO_LO", "ACT_LO", "PRO_HI", "ACT_HI", "PRECISION",
              "BLOCK_M", "BLOCK_N"]

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


def _block_m(rows):
    """Output pixels per conv tile (fixed by the host: the statistics partials are laid out by it)."""
    if INTERPRETED:
        return min(1024, max(16, triton.next_power_of_2(rows)))  # few, large programs: the interpreter pays per op
    return 128 if rows >= 8192 else 64


def _sm_count(device):
    limits = tiling.device_of(device)
    return 2 if limits is None else limits.sms


# ----------------------------------------------------------------------------- launch helpers

class Operand(NamedTuple):
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


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision(dtype, allow_tf32):
    # Only fp32 operands read this: "ieee" is exact fp32, "tf32" (tl.dot's default) uses TF32 tensor cores.
    return "ieee" if dtype == torch.float32 and not allow_tf32 else "tf32"


def conv(src, weight, geometry, out, epilogue=EPI_STORE, below=None, allow_tf32=True):
    """out = DOWN/UP(src, weight) with src loaded through its prologue; returns the epilogue's Partials.

    src: Operand (N, C_in, H, W); weight: (C_out, C_in, 4, 4) for DOWN, (C_in, C_out, 4, 4) for UP, of
    src's dtype; out: (N, C_out, H', W') preallocated, any strides.  epilogue: EPI_STORE (no partials),
    EPI_STATS (Welford partials of out), or EPI_GRAD: ``below`` = (z, stats, coef, act, slope) of the layer
    whose output ``out`` is the gradient of; out becomes g = acc*act'(z*scale + shift) and the partials are
    (sum(g), sum(g*xhat)) when stats is not None (a BN layer), absent otherwise."""
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
    parts = outputs.empty((2, n_parts, C_out), device=x.device, dtype=_acc_dtype(x.dtype)) if normalize else out
    z, stats, coef, act, slope = below if epilogue == EPI_GRAD else (out, None, None, 0, 0.0)
    # DOWN reads the weight as [out, red, kh, kw] (Conv2d's layout), UP as [red, out, kh, kw] (ConvTranspose2d's).
    w_red, w_out = (weight.stride(0), weight.stride(1)) if geometry.up else (weight.stride(1), weight.stride(0))
    precision = _precision(x.dtype, allow_tf32)
    grid = lambda meta: (n_parts, triton.cdiv(C_out, meta["BLOCK_N"]))  # noqa: E731
    if INTERPRETED:  # the interpreter runs programs one at a time in numpy: few, large ones
        tile = tiling.Tile(block_m, 16, 16, 4, 1)
    else:
        tile = _conv_candidates(x, C_in, C_out, block_m, n_parts, src.pro, src.act, precision)[0]
    _launch(_conv_kernel, _conv_tuned, grid, tile, _CONV_TILE, (
        *src.args(), weight, out, z, out if coef is None else coef, out if stats is None else stats, parts,
        C_in, H_in, W_in, C_out, H_out, W_out, rows, n_parts,
        *x.stride(), *out.stride(), w_red, w_out, weight.stride(2), weight.stride(3), src.slope, slope), dict(
        UP=geometry.up, S=S, P=P, TAPS=4 // S if geometry.up else 4, PRO=src.pro, ACT_IN=src.act, EPI=epilogue,
        ACT_OUT=act, NORM_OUT=stats is not None, ACC=_tl_acc(x.dtype), PRECISION=precision, BLOCK_M=block_m))
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
    K = N * H_lo * W_lo
    precision = _precision(l.dtype, allow_tf32)
    if INTERPRETED:
        tile = tiling.Tile(16, 16, 1024, 4, 1)
    else:
        tile = _wgrad_candidates(l, C_lo, C_hi, lo.pro, lo.act, hi.pro, hi.act, precision)[0]
    block_m, block_n = tile.block_m, tile.block_n
    tiles = 16 * triton.cdiv(C_lo, block_m) * triton.cdiv(C_hi, block_n)
    # Split K so that the grid fills the device twice over, in steps of 256 positions.
    splits = max(1, min(triton.cdiv(K, 256), triton.cdiv(2 * _sm_count(l.device), tiles)))
    k_per_split = triton.cdiv(triton.cdiv(K, splits), 256) * 256
    splits = triton.cdiv(K, k_per_split)
    dw = outputs.empty((splits, C_lo, C_hi, 16), device=l.device, dtype=_acc_dtype(l.dtype))
    grid = (triton.cdiv(C_lo, block_m), triton.cdiv(C_hi, block_n), 16 * splits)
    _launch(_wgrad_kernel, _wgrad_tuned, lambda meta: grid, tile, _WGRAD_TILE, (
        *lo.args(), *hi.args(), dw, C_lo, H_lo, W_lo, C_hi, H_hi, W_hi, K, k_per_split,
        *l.stride(), *h.stride(), *dw.stride()[:3], lo.slope, hi.slope), dict(
        S=geometry.stride, P=geometry.padding, PRO_LO=lo.pro, ACT_LO=lo.act, PRO_HI=hi.pro, ACT_HI=hi.act,
        ACC=_tl_acc(l.dtype), PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n))
    dw = dw[0] if splits == 1 else dw.sum(0)
    return dw.view(C_lo, C_hi, 4, 4)


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
    _finalize_stats_kernel[(triton.cdiv(C, 32),)](
        parts, stats, coef, weight if affine else stats, bias if affine else stats,
        running_mean if update else stats, running_var if update else stats,
        C, partials.rows, parts.shape[1], momentum, eps,
        AFFINE=affine, UPDATE_RUNNING=update, ACC=_tl_acc(parts.dtype), TILE_ROWS=partials.tile_rows,
        BLOCK_P=32, BLOCK_C=32)
    return stats, coef


def finalize_grad(partials, stats, weight):
    """(dbeta, dgamma) = (sum(g), sum(g*xhat)) from GRAD partials, as sums (2, C), and the backward prologue
    map coef (3, C): dz = coef[0]*g + coef[1]*z + coef[2]."""
    parts = partials.parts
    C = parts.shape[2]
    sums = outputs.empty((2, C), device=parts.device, dtype=parts.dtype)
    coef = outputs.empty((3, C), device=parts.device, dtype=parts.dtype)
    affine = weight is not None
    _finalize_grad_kernel[(triton.cdiv(C, 32),)](
        parts, stats, weight if affine else stats, sums, coef, C, parts.shape[1], float(partials.count),
        AFFINE=affine, BLOCK_P=32, BLOCK_C=32)
    return sums, coef
