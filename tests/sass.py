"""Reading sm_90 SASS (the text of `cuobjdump -sass`) for the static efficiency check of tests/sm90.py.

The method (docs/design.md, "Static efficiency, from the SASS"): a GEMM's main loop is the backward branch that encloses
its MMA instructions; its SASS instructions per warp per K-step, times the warps of a CTA over the SM's 4
schedulers, are the cycles the CTA needs to issue a K-step, against the cycles its tensor cores need for the
K-step's multiply-adds.  A reduction's loop is the backward branch that encloses the most global loads; a block
reduction inside it (a barrier or a warp shuffle) runs once per iteration instead of once per program.

Pure text processing, no compiler: tests/test_sass.py checks it on small snippets.
"""
import collections
import re
from typing import NamedTuple

# `/*0a30*/   @!P0 HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 ;   /* 0x... */`
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(@!?U?P[0-9T]\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_[A-Za-z0-9_]+):")
_BRANCH_TARGET = re.compile(r"`?\(?(\.L_[A-Za-z0-9_]+)\)?|\b(0x[0-9a-fA-F]+)\b")

# Multiply-adds per warp per issued instruction: a wgmma (HGMMA) is issued by each of its warpgroup's 4 warps.
MMA_OPCODES = ("HGMMA", "HMMA", "DMMA")
FMA_OPCODES = ("FFMA", "DFMA")
GLOBAL_LOADS = ("LDG", "LDGSTS", "UTMALDG")
BLOCK_SYNCS = ("BAR", "SHFL", "REDUX")  # a cross-lane or cross-warp reduction step


class Instruction(NamedTuple):
    address: int
    opcode: str     # with its modifiers: "HGMMA.64x128x16.F32.BF16", "LDGSTS.E.BYPASS.128"
    operands: str
    predicated: bool

    @property
    def base(self):
        """The opcode without modifiers: "HGMMA", "LDGSTS"."""
        return self.opcode.split(".", 1)[0]


def parse(text):
    """The instructions of the first function in ``text`` (cuobjdump -sass output), in address order.

    Branch targets given as labels (`.L_x_5`) are resolved to addresses in the operands ("0x..."), so that
    :func:`loops` reads both spellings cuobjdump versions use."""
    instructions, labels, pending, started = [], {}, [], False
    for line in text.splitlines():
        if "Function :" in line:
            if started:
                break
            started = True
            continue
        label = _LABEL.match(line)
        if label:
            pending.append(label[1])
            continue
        found = _INSTRUCTION.match(line)
        if not found:
            continue
        address = int(found[1], 16)
        for name in pending:
            labels[name] = address
        pending = []
        instructions.append(Instruction(address, found[3], found[4].strip(), bool(found[2])))
    return [i._replace(operands=_resolve(i.operands, labels)) if i.base in ("BRA", "JMP") else i
            for i in instructions]


def _resolve(operands, labels):
    return re.sub(r"`?\((\.L_[A-Za-z0-9_]+)\)", lambda m: hex(labels[m[1]]) if m[1] in labels else m[0], operands)


def branch_target(instruction):
    """The target address of a direct branch (BRA/JMP to an address), else None."""
    if instruction.base not in ("BRA", "JMP"):
        return None
    found = re.search(r"\b0x([0-9a-fA-F]+)\b", instruction.operands)
    return None if found is None else int(found[1], 16)


class Loop(NamedTuple):
    start: int  # address of the first instruction (the branch target)
    end: int    # address of the backward branch
    body: tuple  # the instructions from start to end, both included

    def count(self, bases):
        return sum(i.base in bases for i in self.body)


def loops(instructions):
    """Every loop: a backward branch (target at or before it) and the instructions from its target to it.
    A branch to itself (the trap at a function's end) is no loop."""
    found = []
    for n, branch in enumerate(instructions):
        target = branch_target(branch)
        if target is None or target >= branch.address:
            continue
        body = tuple(i for i in instructions[:n + 1] if i.address >= target)
        found.append(Loop(target, branch.address, body))
    return found


def _enclosing(all_loops, bases):
    """The loop with the most ``bases`` instructions, the innermost (shortest) of those with as many; None when
    no loop holds one."""
    counted = [(loop.count(bases), -len(loop.body), loop) for loop in all_loops]
    counted = [c for c in counted if c[0] > 0]
    return max(counted, key=lambda c: c[:2])[2] if counted else None


def mma_shape(opcode):
    """(m, n, k) of an MMA opcode: "HGMMA.64x128x16.F32.BF16" -> (64, 128, 16), "HMMA.16816.F32.BF16" ->
    (16, 8, 16), "HMMA.1688.F32.TF32" -> (16, 8, 8), "DMMA.8x8x4" -> (8, 8, 4)."""
    shape = opcode.split(".")[1]
    if "x" in shape:
        m, n, k = map(int, shape.split("x"))
        return m, n, k
    found = re.fullmatch(r"(16)(8)(\d+)|(8)(8)(4)", shape)
    if not found:
        raise ValueError(f"unknown MMA shape in {opcode!r}")
    return tuple(int(g) for g in found.groups() if g is not None)


def macs_per_warp(opcode):
    """Multiply-adds one warp's issue of ``opcode`` does: a wgmma's are shared by the 4 warps that issue it."""
    base = opcode.split(".", 1)[0]
    if base in FMA_OPCODES:
        return 32
    m, n, k = mma_shape(opcode)
    return m * n * k // 4 if base == "HGMMA" else m * n * k


def load_width(instruction):
    """Bits per thread of a global load: LDG.E.128 -> 128, LDGSTS.E.BYPASS.LTC128B.128 -> 128, LDG.E -> 32,
    LDG.E.U16 -> 16; "tma" for a tensor-memory-accelerator copy (UTMALDG)."""
    if instruction.base == "UTMALDG":
        return "tma"
    widths = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}
    found = [widths[m] for m in instruction.opcode.split(".")[1:] if m in widths]
    return found[-1] if found else 32


def _loop_summary(loop):
    loads = collections.Counter(str(load_width(i)) for i in loop.body if i.base in GLOBAL_LOADS)
    mma = collections.Counter(i.opcode for i in loop.body if i.base in MMA_OPCODES)
    return dict(start=loop.start, end=loop.end, instructions=len(loop.body), mma=dict(mma), loads=dict(loads),
                block_syncs={b: loop.count((b,)) for b in BLOCK_SYNCS if loop.count((b,))},
                ffma=loop.count(("FFMA",)))


def summarize(text):
    """What the efficiency check needs of a kernel's SASS, JSON-able:
    mma: {opcode: count} over the whole kernel (HGMMA/HMMA/DMMA); mma_loop: the loop enclosing the most MMA
    instructions (the whole kernel, straight=True, when its MMAs are in no loop: a GEMM whose K fits one
    K-step); load_loop: the loop enclosing the most global loads; each loop as {start, end, instructions
    (per warp, one iteration), mma, loads ({width: count}), block_syncs ({BAR/SHFL/REDUX: count}), ffma}."""
    instructions = parse(text)
    if not instructions:
        raise ValueError("no SASS instructions found")
    all_loops = loops(instructions)
    mma_loop, load_loop = _enclosing(all_loops, MMA_OPCODES), _enclosing(all_loops, GLOBAL_LOADS)
    straight = mma_loop is None and any(i.base in MMA_OPCODES for i in instructions)
    if straight:
        mma_loop = Loop(instructions[0].address, instructions[-1].address, tuple(instructions))
    mma = collections.Counter(i.opcode for i in instructions if i.base in MMA_OPCODES)
    return dict(instructions=len(instructions), mma=dict(mma),
                mma_loop=None if mma_loop is None else dict(_loop_summary(mma_loop), straight=straight),
                load_loop=None if load_loop is None else _loop_summary(load_loop))


def mma_kind(summary):
    """("HGMMA", "64x128x16") / ("HMMA", "16816") / ("FFMA", "") of a summary: the MMA its main loop runs, else
    the kernel's most frequent, else FFMA (the multiply-adds run on the CUDA cores)."""
    mma = (summary["mma_loop"] or {}).get("mma") or summary["mma"]
    if not mma:
        return "FFMA", ""
    opcode = max(mma, key=lambda o: (mma[o], o))
    return opcode.split(".")[0], opcode.split(".")[1]


def k_steps(loop, block_m, block_n, block_k, warps):
    """K-steps one iteration of ``loop`` covers: its MMA work per warp, times the warps, over the tile's
    BLOCK_M x BLOCK_N x BLOCK_K (2 for a loop unrolled twice or pipelined over two K-steps).  None without MMA."""
    if not loop or not loop["mma"]:
        return None
    macs = sum(n * macs_per_warp(opcode) for opcode, n in loop["mma"].items()) * warps
    return macs / (block_m * block_n * block_k)
