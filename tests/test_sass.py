"""tests/sass.py, the SASS reader of the static efficiency check, on small hand-written snippets in the two
spellings of cuobjdump (branch targets as addresses and as labels)."""
import pytest

import sass


def _sass(*lines, labels=None):
    """A cuobjdump -sass listing of ``lines`` (one instruction each, 16 bytes apart); ``labels``: {index: name}
    puts a label line before that instruction."""
    out = ["\tcode for sm_90a", "\t\tFunction : _kernel", "\t.headerflags\t@\"EF_CUDA_SM90\""]
    for n, text in enumerate(lines):
        if labels and n in labels:
            out.append(f"{labels[n]}:")
        out.append(f"        /*{16 * n:04x}*/                   {text} ;   /* 0x000000000000000000 */")
        out.append("                                                      /* 0x000fe20000000800 */")
    return "\n".join(out)


# A pipelined GEMM: a prologue load, a main loop (0x20..0x90) holding 2 wgmma and a barrier spin loop
# (0x50..0x60), then a remainder loop (0xb0..0xc0) with 1 wgmma, the epilogue and the trap at the end.
GEMM = _sass(
    "S2R R0, SR_CTAID.X",                                             # 0x00
    "LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64]",                     # 0x10
    "IMAD R4, R0, 0x2, R5",                                           # 0x20 main loop
    "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24",                  # 0x30
    "@!P0 LDGSTS.E [R3+0x100], desc[UR4][R6.64], P1",                 # 0x40
    "SYNCS.PHASECHK.TRANS64 P2, [UR4], R7",                           # 0x50 spin loop
    "@!P2 BRA 0x50",                                                  # 0x60
    "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR12], R24, gsb0",           # 0x70
    "LDG.E.LTC128B.64 R8, desc[UR4][R10.64]",                         # 0x80
    "@P1 BRA 0x20",                                                   # 0x90
    "BAR.SYNC.DEFER_BLOCKING 0x0",                                    # 0xa0
    "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24",                  # 0xb0 remainder loop
    "@P3 BRA 0xb0",                                                   # 0xc0
    "STG.E.128 desc[UR4][R12.64], R24",                               # 0xd0
    "EXIT",                                                           # 0xe0
    "BRA 0xf0",                                                       # 0xf0 the trap: no loop
)


def test_parse_reads_addresses_opcodes_and_predicates():
    instructions = sass.parse(GEMM)
    assert len(instructions) == 16
    assert [i.address for i in instructions[:3]] == [0x00, 0x10, 0x20]
    assert instructions[4].opcode == "LDGSTS.E" and instructions[4].predicated and instructions[4].base == "LDGSTS"
    assert instructions[3].opcode == "HGMMA.64x128x16.F32.BF16" and not instructions[3].predicated


def test_loops_are_backward_branches_and_not_the_trap():
    spans = [(loop.start, loop.end, len(loop.body)) for loop in sass.loops(sass.parse(GEMM))]
    assert spans == [(0x50, 0x60, 2), (0x20, 0x90, 8), (0xb0, 0xc0, 2)]


def test_main_loop_holds_the_most_mma_not_the_spin_or_remainder_loop():
    summary = sass.summarize(GEMM)
    loop = summary["mma_loop"]
    assert (loop["start"], loop["end"], loop["instructions"]) == (0x20, 0x90, 8)
    assert loop["mma"] == {"HGMMA.64x128x16.F32.BF16": 2}
    assert loop["loads"] == {"32": 1, "64": 1}  # LTC128B is an L2 prefetch hint, not the width
    assert not loop["straight"]
    assert summary["mma"] == {"HGMMA.64x128x16.F32.BF16": 3}
    assert sass.mma_kind(summary) == ("HGMMA", "64x128x16")


def test_an_outer_loop_with_as_many_mma_is_not_the_main_loop():
    persistent = _sass("NOP", "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24", "@P0 BRA 0x10", "STG.E [R2], R24",
                       "@P1 BRA 0x0", "EXIT")
    loop = sass.summarize(persistent)["mma_loop"]
    assert (loop["start"], loop["end"]) == (0x10, 0x20)


def test_labels_resolve_to_addresses():
    labelled = _sass("S2R R0, SR_TID.X", "HMMA.16816.F32.BF16 R4, R8, R12, R4", "IADD3 R0, R0, 0x1, RZ",
                     "@P0 BRA `(.L_x_1)", "EXIT", labels={1: ".L_x_1"})
    loop = sass.summarize(labelled)["mma_loop"]
    assert (loop["start"], loop["end"], loop["instructions"]) == (0x10, 0x30, 3)
    assert sass.mma_kind(sass.summarize(labelled)) == ("HMMA", "16816")


def test_mma_outside_any_loop_is_one_straight_k_step():
    straight = _sass("LDG.E.128 R4, desc[UR4][R2.64]", "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24", "EXIT")
    loop = sass.summarize(straight)["mma_loop"]
    assert loop["straight"] and loop["instructions"] == 3


def test_no_mma_is_ffma():
    fma = _sass("FFMA R0, R1, R2, R0", "@P0 BRA 0x0", "EXIT")
    summary = sass.summarize(fma)
    assert summary["mma_loop"] is None and sass.mma_kind(summary) == ("FFMA", "")


@pytest.mark.parametrize("opcode, shape, macs", [
    ("HGMMA.64x128x16.F32.BF16", (64, 128, 16), 64 * 128 * 16 // 4),
    ("HGMMA.64x64x8.F32.TF32", (64, 64, 8), 64 * 64 * 8 // 4),
    ("HMMA.16816.F32.BF16", (16, 8, 16), 16 * 8 * 16),
    ("HMMA.1688.F32.TF32", (16, 8, 8), 16 * 8 * 8),
    ("DMMA.8x8x4", (8, 8, 4), 8 * 8 * 4),
])
def test_mma_shapes_and_work_per_warp(opcode, shape, macs):
    assert sass.mma_shape(opcode) == shape
    assert sass.macs_per_warp(opcode) == macs


def test_unknown_mma_shape_is_an_error():
    with pytest.raises(ValueError, match="unknown MMA shape"):
        sass.mma_shape("HMMA.999.F32")


@pytest.mark.parametrize("opcode, width", [
    ("LDG.E.128", 128), ("LDG.E.128.CONSTANT", 128), ("LDG.E.64", 64), ("LDG.E", 32), ("LDG.E.U16", 16),
    ("LDG.E.S8", 8), ("LDGSTS.E.BYPASS.LTC128B.128", 128), ("LDGSTS.E.LTC128B", 32), ("UTMALDG.2D", "tma"),
])
def test_load_widths(opcode, width):
    assert sass.load_width(sass.Instruction(0, opcode, "", False)) == width


def test_k_steps_of_unrolled_and_plain_loops():
    one = {"mma": {"HGMMA.64x128x16.F32.BF16": 2}}
    # 128x128x32 on 8 warps (two warpgroups of 64 rows): 2 wgmma of k16 per warp make one K-step.
    assert sass.k_steps(one, 128, 128, 32, 8) == 1
    # The same loop unrolled twice holds 4: two K-steps per iteration.
    assert sass.k_steps({"mma": {"HGMMA.64x128x16.F32.BF16": 4}}, 128, 128, 32, 8) == 2
    # mma.sync: 16x128x128 on 8 warps, each 16x16 of N: 8 k16 steps x 2 n8 halves per warp.
    assert sass.k_steps({"mma": {"HMMA.16816.F32.BF16": 16}}, 16, 128, 128, 8) == 1
    assert sass.k_steps({"mma": {}}, 64, 64, 64, 4) is None


def test_reduction_loop_with_a_block_reduction_per_iteration_is_seen():
    per_iteration = _sass("LDG.E.128 R4, desc[UR4][R2.64]", "FADD R0, R0, R4", "SHFL.BFLY PT, R5, R0, 0x10, 0x1f",
                          "BAR.SYNC.DEFER_BLOCKING 0x0", "@P0 BRA 0x0", "EXIT")
    once = _sass("LDG.E.128 R4, desc[UR4][R2.64]", "FADD R0, R0, R4", "@P0 BRA 0x0",
                 "SHFL.BFLY PT, R5, R0, 0x10, 0x1f", "BAR.SYNC.DEFER_BLOCKING 0x0", "EXIT")
    assert sass.summarize(per_iteration)["load_loop"]["block_syncs"] == {"BAR": 1, "SHFL": 1}
    assert sass.summarize(once)["load_loop"]["block_syncs"] == {}


def test_empty_listing_is_an_error():
    with pytest.raises(ValueError, match="no SASS"):
        sass.summarize("\tcode for sm_90a\n")
