"""Tiles of the implicit-GEMM kernels (conv_gemm.py): the candidate configs, what each costs in shared memory
and registers, and the one a launch takes.  Plain Python, no triton: fastgan.nn.fused_conv asks
:func:`l2_problem` whether a layer's kernels fit the device before it runs the layer at L2.

A program multiplies an A tile [BLOCK_M, BLOCK_K] by a B tile [BLOCK_K, BLOCK_N] per K step.  An operand is
*mapped* when it goes through a per-channel map or activation in registers on its way to the dot (conv_gemm's
prologue); a mapped operand of the BN backward reads two tensors (g and z).  Shared memory, per operand, as
triton 3.8 lays it out for sm_90 (checked against compiled kernels by tests/test_sm90_resources.py, which also
asserts that the estimate is never below what the compiler allocates):

    unmapped:  stages copies (tensor-core dot: wgmma reads them in place), stages - 1 (fp64, exact fp32)
    mapped:    (stages - 1) * tensors copies in flight, one mapped copy, and for a tensor-core dot a
               layout-conversion buffer of the tile in fp32
    plus 8 KB for the epilogue's reductions and barriers (4.5 KB the most seen).

Registers: what the dot and the prologue hold per thread, the accumulator plus the mapped tiles (32-bit words;
a bf16 map holds two lanes a word, the others map in the accumulation dtype), must stay within half the 255
registers a thread may have; the rest goes to the gathered loads' addresses and masks.  Tiles over it compile
at the register cap and spill.  The dots on CUDA cores (fp64, exact fp32) keep their operand fragments in
registers too: there the accumulator alone stays within 32 words and the wgrad's BLOCK_N within 64.  Both
rules come from the static data (triton 3.8, sm_90): every exact-fp32 wgrad with a 128-wide B spilled, and tiles
with 64 accumulator words per thread spilled up to 6 KB (ptxas falling back to 32 registers).

``FASTGAN_AUTOTUNE=1`` makes conv_gemm benchmark every candidate that fits (the first call per shape compiles
them all); otherwise a launch compiles one kernel, the first candidate (:func:`pick_conv`'s for the conv).
"""
from typing import NamedTuple

import torch


class Device(NamedTuple):
    """What the tile choice needs to know about a GPU."""
    sms: int
    smem_per_block: int   # bytes of shared memory one block may use (opt-in)
    smem_per_sm: int
    regs_per_sm: int
    threads_per_sm: int


SM90 = Device(sms=132, smem_per_block=232_448, smem_per_sm=233_472, regs_per_sm=65_536, threads_per_sm=2_048)


_devices = {}  # plain dicts, not functools.cache: fastgan.nn.fused_conv's check runs under torch.compile too


def device_of(device):
    """The Device of a CUDA torch.device, or None (CPU tensors run in the interpreter, without limits)."""
    if device.type != "cuda":
        return None
    if device not in _devices:
        p = torch.cuda.get_device_properties(device)
        _devices[device] = Device(p.multi_processor_count, p.shared_memory_per_block_optin,
                                  p.shared_memory_per_multiprocessor, p.regs_per_multiprocessor,
                                  p.max_threads_per_multi_processor)
    return _devices[device]


class Tile(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int


class Operand(NamedTuple):
    """How a GEMM operand tile reaches the dot."""
    tensors: int = 1      # global tensors read per element: 2 for the BN backward map (g and z)
    mapped: bool = False  # through a per-channel map or activation in registers
    packed: bool = False  # mapped in bf16, two lanes a 32-bit register (else in the accumulation dtype)


class Gemm(NamedTuple):
    """The dtypes and operands of a launch, as the estimates need them."""
    elem: int             # operand element bytes
    acc: int              # accumulator element bytes: 8 for fp64, else 4
    tensor_cores: bool    # 16-bit or TF32 operands; fp64 and exact ("ieee") fp32 run on CUDA cores here
    a: Operand
    b: Operand


def gemm(elem, exact, a, b):
    """The Gemm of operands of ``elem`` bytes; ``exact``: fp32 without TF32."""
    return Gemm(elem, 8 if elem == 8 else 4, elem <= 2 or (elem == 4 and not exact), a, b)


MAX_REGISTERS = 255
_SCRATCH = 8192


def _operand_smem(op, elems, g, stages):
    size = elems * g.elem
    if not op.mapped:
        return (stages if g.tensor_cores else stages - 1) * size
    return (stages - 1) * op.tensors * size + size + (elems * 4 if g.tensor_cores else 0)


def shared_memory(tile, g):
    """Estimated bytes of shared memory of ``tile`` (an upper bound of what triton allocates on sm_90)."""
    m, n, k = tile.block_m, tile.block_n, tile.block_k
    main_loop = _operand_smem(g.a, m * k, g, tile.stages) + _operand_smem(g.b, k * n, g, tile.stages) + _SCRATCH
    # The epilogue may convert the accumulator's layout through shared memory, reusing the main loop's buffers.
    return max(main_loop, m * n * g.acc)


def _words(elems, elem_bytes, tile):
    return elems * elem_bytes // (4 * 32 * tile.warps)


def live_words(tile, g):
    """32-bit words per thread of the accumulator and the mapped operand tiles."""
    m, n, k = tile.block_m, tile.block_n, tile.block_k
    mapped = sum(_words(op.tensors * elems, 2 if op.packed else g.acc, tile)
                 for op, elems in ((g.a, m * k), (g.b, k * n)) if op.mapped)
    return _words(m * n, g.acc, tile) + mapped


LIVE_WORDS = MAX_REGISTERS // 2
CUDA_CORE_ACCUMULATOR = 32


def fits(tile, g, device):
    """Whether ``tile`` fits the device's shared memory and the register estimates."""
    return (shared_memory(tile, g) <= device.smem_per_block and live_words(tile, g) <= LIVE_WORDS
            and (g.tensor_cores or _words(tile.block_m * tile.block_n, g.acc, tile) <= CUDA_CORE_ACCUMULATOR))


# ----------------------------------------------------------------------------- the candidates

def block_k(block_k16, elem):
    """BLOCK_K for ``elem``-byte operands from a BLOCK_K given for 16-bit ones: the same bytes per row."""
    return max(16, block_k16 * 2 // elem)


# (BLOCK_N, BLOCK_K for 16-bit operands, warps, stages), in order of preference; BLOCK_M is the host's.
# The first fits where the problem clips BLOCK_M or BLOCK_N to 64 (or A takes no map): a K step twice as deep
# halves the loop's fixed instructions per multiply-add.
CONV_TILES = ((128, 128, 8, 3), (128, 64, 8, 3), (128, 32, 8, 4), (64, 64, 4, 3), (64, 32, 4, 4), (32, 64, 4, 4),
              (16, 64, 4, 4), (16, 32, 4, 2))
# (BLOCK_K for 16-bit operands, warps, stages); BLOCK_M x BLOCK_N come from the channel counts.
WGRAD_TILES = ((128, 8, 3), (64, 8, 3), (64, 4, 4), (32, 4, 4), (32, 4, 2))


def conv_candidates(block_m, c_in, c_out, g, device):
    """The conv tiles that fit, in order of preference.  BLOCK_N is capped by the output channels rounded up to a
    power of two, BLOCK_K by the input channels rounded down (no K step deeper than the channels it reduces);
    both caps are 16 at least."""
    widest_n = max(16, 1 << (c_out - 1).bit_length())
    widest_k = max(16, 1 << (c_in.bit_length() - 1))
    tiles = dict.fromkeys(Tile(block_m, min(n, widest_n), min(block_k(k, g.elem), widest_k), w, s)
                          for n, k, w, s in CONV_TILES)
    return [t for t in tiles if fits(t, g, device)]


# A grid fills the device from this fraction of one wave on: 128 programs on 132 SMs run as one wave with 4 SMs
# idle, where the next smaller tile would run twice the programs at half the tensor-core work per K step.
WAVE_FILL = 0.95


def pick_conv(candidates, programs_of, device):
    """The first candidate (the largest tile) whose grid fills at least a wave (WAVE_FILL), else the one with the
    most programs."""
    for tile in candidates:
        if programs_of(tile) >= WAVE_FILL * device.sms:
            return tile
    return max(candidates, key=programs_of)


def wgrad_candidates(c_lo, c_hi, g, device):
    """(BLOCK_M, BLOCK_N) from the channel counts, halved (the larger first) until a tile fits; the tiles that
    fit at that size, in order of preference."""
    m = min(128, max(16, 1 << (c_lo - 1).bit_length()))
    n = min(128 if g.tensor_cores else 64, max(16, 1 << (c_hi - 1).bit_length()))
    while True:
        tiles = dict.fromkeys(Tile(m, n, block_k(k, g.elem), w, s) for k, w, s in WGRAD_TILES)
        kept = [t for t in tiles if fits(t, g, device)]
        if kept or m == n == 16:
            return kept
        m, n = (m // 2, n) if m >= n and m > 16 else (m, max(16, n // 2))


# ----------------------------------------------------------------------------- what runs at L2

_HEAVIEST = Operand(2, True)  # the BN backward map of g and z
_problems = {}


def l2_problem(dtype, device):
    """None when every kernel of an L2 layer in ``dtype`` has a tile that fits ``device``, else the reason.

    Checks the heaviest operands of each kernel (the dgrad's BN-backward A; the wgrad's, with a mapped B) at
    either BLOCK_M; the smallest tiles always make the cut where anything does."""
    limits = device_of(device)
    if limits is None:
        return None
    if (dtype, limits) not in _problems:
        _problems[dtype, limits] = _problem(dtype, limits)
    return _problems[dtype, limits]


def _problem(dtype, limits):
    elem = dtype.itemsize
    for exact in (False, True) if elem == 4 else (False,):
        conv = gemm(elem, exact, _HEAVIEST, Operand())
        wgrad = gemm(elem, exact, _HEAVIEST, Operand(1, True))
        for block_m in (64, 128):
            if not conv_candidates(block_m, 1 << 16, 1 << 16, conv, limits):
                return f"no conv tile in {dtype} fits the GPU's {limits.smem_per_block} bytes of shared memory"
        if not wgrad_candidates(1 << 16, 1 << 16, wgrad, limits):
            return f"no wgrad tile in {dtype} fits the GPU's {limits.smem_per_block} bytes of shared memory"
    return None
