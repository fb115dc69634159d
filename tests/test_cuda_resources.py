"""The C++/CUDA extension's kernels fit an sm_90 (H100/H200) SM, checked without a GPU: registers, spills,
shared memory and the occupancy they leave, as cuobjdump reads them from the sm_90 code of the built library
(compiled, not run); and the kernels that stream z keep LOADS_IN_FLIGHT loads in flight per thread, as their
SASS issues them.  The build is the one test_cuda_ext.py makes (the extension cache), so this costs a few
seconds once it exists.

``python tests/test_cuda_resources.py`` prints the per-kernel table of benchmarks/RESULTS.md.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

from fastgan.ops import extension as ext_build

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")

# sm_90 (CUDA C Programming Guide, "Technical Specifications per Compute Capability"; the occupancy calculator)
REGS_PER_SM = 65536
REGS_PER_THREAD = 255
REG_ALLOC_UNIT = 256          # registers per warp are allocated in units of 256
WARPS_PER_SM = 64
BLOCKS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
SMEM_PER_BLOCK = 227 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
# Budgets: these are memory-bound elementwise and reduction kernels, none of which needs local memory, so a
# stack frame (where ptxas spills) is a regression; 25% occupancy (16 warps per SM) is the least that keeps
# enough 16-byte loads in flight.  fp64 runs only in gradchecks: there ptxas keeps 8 B of
# moments_kernel<double, 2> on the stack, which the fp64 budget allows.
SPILL_BUDGET = 0              # bytes of stack frame per thread, fp32/fp16/bf16 kernels
FP64_SPILL_BUDGET = 32        # the same for fp64 kernels
MIN_OCCUPANCY = 0.25
# The kernels that stream z (and dy): in every loop that loads from global memory, a thread issues this many
# loads before any instruction reads what the first brought (16-byte LDG.E.128 where VEC > 1), so that a memory
# latency overlaps this many loads rather than one.  csrc/bn_act.cu's kLoadsInFlight.
STREAMING_KERNELS = ("moments_kernel", "grad_sums_kernel", "bn_act_kernel", "bn_act_backward_kernel", "act_kernel",
                     "act_backward_kernel")
LOADS_IN_FLIGHT = 4


def _cuobjdump():
    """The CUDA toolkit's cuobjdump, else the one triton ships (triton/backends/nvidia/bin)."""
    home, _ = ext_build.cuda_toolkit()
    candidates = [os.path.join(home, "bin", "cuobjdump")] if home else []
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    candidates.append(shutil.which("cuobjdump"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def source_kernels():
    """{kernel name: (source file, threads per block from its __launch_bounds__)} of every __global__ in csrc/."""
    kernels = {}
    for name in sorted(os.listdir(CSRC)):
        if name.endswith(".cu"):
            with open(os.path.join(CSRC, name)) as f:
                text = f.read()
            constants = {k: int(v) for k, v in re.findall(r"constexpr int (\w+) = (\d+);", text)}
            for bound, kernel in re.findall(r"__global__\s+void\s+__launch_bounds__\((\w+)\)\s+(\w+)\s*\(", text):
                kernels[kernel] = (name, constants.get(bound) or int(bound))
    return kernels


def occupancy(regs, smem, threads):
    """Resident warps per SM over the 64 an sm_90 SM holds, as the occupancy calculator counts them."""
    warps = -(-threads // 32)
    regs_per_warp = -(-regs * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = REGS_PER_SM // (regs_per_warp * warps) if regs else BLOCKS_PER_SM
    by_smem = SMEM_PER_SM // (smem + SMEM_RESERVED_PER_BLOCK)
    blocks = min(BLOCKS_PER_SM, WARPS_PER_SM // warps, by_regs, by_smem)
    return blocks * warps / WARPS_PER_SM


def library_resources(library, cuobjdump):
    """[(source file, mangled kernel, {REG, STACK, SHARED, LOCAL, ...})] of the library's sm_90 code; SHARED is
    the kernel's own static shared memory (cuobjdump counts the 1 KiB sm_90 reserves per block in it, ptxas -v
    does not; this is ptxas's figure)."""
    out = subprocess.run([cuobjdump, "--dump-resource-usage", library], capture_output=True, text=True,
                         check=True).stdout
    found, arch, source, function = [], None, None, None
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("arch = "):
            arch = line.split(" = ")[1]
        elif line.startswith("identifier = "):
            source = os.path.basename(line.split(" = ")[1])
        elif line.startswith("Function "):
            function = line[len("Function "):].rstrip(":")
        elif function and line.startswith("REG:"):
            if arch == "sm_90":
                usage = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
                usage["SHARED"] = max(usage["SHARED"] - SMEM_RESERVED_PER_BLOCK, 0)
                found.append((source, function, usage))
            function = None
    return found


_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def library_sass(library, cuobjdump):
    """{mangled kernel: [(offset, instruction text)]} of the library's sm_90 code."""
    out = subprocess.run([cuobjdump, "-sass", library], capture_output=True, text=True, check=True).stdout
    found, arch, function = {}, None, None
    for line in out.splitlines():
        stripped = line.strip()
        if stripped.startswith("arch = "):
            arch = stripped.split(" = ")[1]
        elif stripped.startswith("Function : "):
            function = stripped[len("Function : "):] if arch == "sm_90" else None
            if function:
                found[function] = []
        elif function and (match := _SASS.search(line)):
            found[function].append((int(match[1], 16), match[2]))
    return found


def _opcode_and_operands(text):
    """("LDG.E.128.CONSTANT", ["R4", "desc[UR4][R4.64]"]) of an instruction, its predicate dropped."""
    opcode, _, rest = re.sub(r"^@!?U?P\w+\s+", "", text).partition(" ")
    return opcode, [o.strip() for o in rest.split(",")] if rest else []


def _registers(operand):
    """The registers an operand names: R12 -> {12}, R12.64 -> {12, 13}."""
    found = set()
    for first, width in re.findall(r"\bR(\d+)(\.64)?\b", operand):
        found.update(range(int(first), int(first) + (2 if width else 1)))
    return found


_LOAD_WIDTHS = {"128": 4, "64": 2}  # registers an LDG of that many bits writes; 1 for 32 bits and less


def loops(instructions):
    """The bodies of the loops: from the target of each backward branch to the branch."""
    index = {offset: i for i, (offset, _) in enumerate(instructions)}
    bodies = []
    for i, (offset, text) in enumerate(instructions):
        opcode, operands = _opcode_and_operands(text)
        if opcode == "BRA" and operands and int(operands[-1], 16) <= offset and int(operands[-1], 16) in index:
            bodies.append(instructions[index[int(operands[-1], 16)]:i + 1])
    return bodies


def _loads(text):
    return _opcode_and_operands(text)[0].startswith("LDG")


def loads_in_flight(body):
    """(global loads issued before the first instruction that reads a register one of them writes, of which
    16-byte ones), in program order through a loop body."""
    pending, loads, wide = set(), 0, 0
    for _, text in body:
        opcode, operands = _opcode_and_operands(text)
        read = set().union(*map(_registers, operands[0 if opcode.startswith("ST") else 1:]))
        if pending & read:
            break
        if _loads(text):
            bits = re.search(r"\.(128|64)\b", opcode)
            first = int(re.match(r"R(\d+)", operands[0])[1])
            pending.update(range(first, first + (_LOAD_WIDTHS[bits[1]] if bits else 1)))
            loads, wide = loads + 1, wide + (bits is not None and bits[1] == "128")
    return loads, wide


def vec_of(mangled):
    """VEC, the second template argument of a bn_act.cu kernel (`...kernelIfLi4E...` -> 4)."""
    match = re.search(r"kernelI\w+?Li(\d+)E", mangled)
    return int(match[1]) if match else None


def kernel_of(mangled, kernels):
    """The csrc/ kernel a mangled name instantiates (names appear length-prefixed in Itanium mangling)."""
    matches = [k for k in kernels if f"{len(k)}{k}" in mangled]
    return matches[0] if len(matches) == 1 else None


@pytest.fixture(scope="module")
def built():
    """(library, cuobjdump) of the extension with its sm_90 code."""
    home, reason = ext_build.cuda_toolkit()
    if home is None:
        pytest.skip(f"the extension's CUDA part is not built here: {reason}")
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (neither in the CUDA toolkit nor in triton's nvidia backend)")
    info = ext_build.build()
    assert "9.0" in info.cuda_archs or os.environ.get("TORCH_CUDA_ARCH_LIST"), info
    return info.library, cuobjdump


@pytest.fixture(scope="module")
def resources(built):
    return library_resources(*built)


def test_every_kernel_is_compiled_for_sm90(resources):
    kernels = source_kernels()
    assert {"moments_kernel", "bn_act_backward_kernel", "sigmoid_bce_kernel"} <= kernels.keys()
    seen = {kernel_of(mangled, kernels) for _, mangled, _ in resources}
    assert None not in seen, [m for _, m, _ in resources if kernel_of(m, kernels) is None]
    assert seen == kernels.keys(), f"no sm_90 code for {sorted(kernels.keys() - seen)}"


def test_every_kernel_fits_an_sm90_sm(resources):
    kernels = source_kernels()
    problems = []
    for source, mangled, usage in resources:
        kernel = kernel_of(mangled, kernels)
        assert kernel is not None, f"{mangled}: not a kernel of csrc/"
        threads = kernels[kernel][1]
        regs, stack, smem = usage["REG"], usage["STACK"], usage["SHARED"]
        warps = -(-threads // 32)
        if regs > REGS_PER_THREAD or -(-regs * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT * warps > REGS_PER_SM:
            problems.append(f"{mangled}: {regs} registers x {threads} threads do not fit an SM")
        budget = FP64_SPILL_BUDGET if f"{len(kernel)}{kernel}Id" in mangled else SPILL_BUDGET  # T = double
        if stack > budget or usage["LOCAL"]:
            problems.append(f"{mangled}: {stack} B stack frame, {usage['LOCAL']} B local memory (spills), "
                            f"budget {budget} B")
        if smem > SMEM_PER_BLOCK:
            problems.append(f"{mangled}: {smem} B shared memory, a block may have {SMEM_PER_BLOCK} B")
        if occupancy(regs, smem, threads) < MIN_OCCUPANCY:
            problems.append(f"{mangled}: occupancy {occupancy(regs, smem, threads):.0%} < {MIN_OCCUPANCY:.0%}")
    assert not problems, "\n".join(problems)


def test_streaming_loops_keep_loads_in_flight(built):
    """Every loop of the kernels that stream z issues LOADS_IN_FLIGHT global loads before it uses the first,
    16-byte loads in the vectorised (VEC > 1) instantiations."""
    kernels = source_kernels()
    assert set(STREAMING_KERNELS) <= kernels.keys()
    checked, problems = 0, []
    for mangled, instructions in library_sass(*built).items():
        if kernel_of(mangled, kernels) not in STREAMING_KERNELS:
            continue
        bodies = [body for body in loops(instructions) if any(_loads(t) for _, t in body)]
        if not bodies:
            problems.append(f"{mangled}: no loop that loads from global memory")
        for body in bodies:
            loads, wide = loads_in_flight(body)
            wanted_wide = LOADS_IN_FLIGHT if vec_of(mangled) > 1 else 0
            if loads < LOADS_IN_FLIGHT or wide < wanted_wide:
                problems.append(f"{mangled}: loop at {body[0][0]:#x} issues {loads} loads ({wide} of 16 bytes) "
                                f"before its first use of one, wanted {LOADS_IN_FLIGHT}")
        checked += 1
    assert checked >= 4 * len(STREAMING_KERNELS), checked  # fp32, fp16, bf16, fp64 at least
    assert not problems, "\n".join(problems)


def test_loads_in_flight_reads_the_dependencies():
    """One load used at once counts 1; four loads issued before the first use count 4 (16-byte ones apart)."""
    serial = [(0, "LDG.E.128 R4, desc[UR4][R2.64]"), (16, "FADD R8, R4, R5"), (32, "LDG.E.128 R12, desc[UR4][R2.64]")]
    assert loads_in_flight(serial) == (1, 1)
    batch = [(16 * i, f"@!P0 LDG.E.128.CONSTANT R{4 * i + 4}, desc[UR4][R30.64]") for i in range(3)]
    batch += [(48, "LDG.E R20, desc[UR4][R2.64]"), (64, "IMAD R2, R3, R0, R1"), (80, "FFMA R9, R7, R20, R9")]
    assert loads_in_flight(batch) == (4, 3)
    moved = [(0, "LDG.E.128 R4, desc[UR4][R2.64]"), (16, "MOV R11, R7"), (32, "@!P1 LDG.E.128 R8, [R36.64]")]
    assert loads_in_flight(moved) == (1, 1)  # a copy of a loaded register waits for the load as any use does
    loop = [(0x100, "LDG.E R4, desc[UR4][R2.64]"), (0x110, "@!P0 BRA 0x100"), (0x120, "BRA 0x200")]
    assert loops([(0xf0, "MOV R1, R2"), *loop]) == [loop[:2]]
    assert vec_of("_ZN11fastgan_ext14moments_kernelIN3c108BFloat16ELi8EfEEvPKT_") == 8


def test_occupancy_arithmetic():
    """The calculator's numbers for sm_90: register-, thread- and shared-memory-bound cases."""
    assert occupancy(32, 0, 256) == 1.0          # 8 blocks x 8 warps
    assert occupancy(80, 3072, 256) == 24 / 64   # 80 regs -> 2560 per warp -> 3 blocks of 8 warps
    assert occupancy(32, 0, 1024) == 1.0         # 2 blocks x 32 warps
    assert occupancy(64, 0, 1024) == 0.5         # 64 x 1024 registers: the whole register file
    assert occupancy(16, 100 * 1024, 128) == 2 * 4 / 64  # 2 blocks fit 228 KiB
    assert occupancy(255, 0, 256) == 1 * 8 / 64


def _demangle(names):
    filt = shutil.which("c++filt")
    if filt is None:
        return names
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return [re.sub(r"^void |fastgan_ext::\(anonymous namespace\)::|c10::|\(.*\)$", "", n) for n in out]


def main():
    home, reason = ext_build.cuda_toolkit()
    if home is None or _cuobjdump() is None:
        sys.exit(f"needs the extension's CUDA part and cuobjdump: {reason if home is None else 'no cuobjdump'}")
    info = ext_build.build()
    kernels = source_kernels()
    rows = library_resources(info.library, _cuobjdump())
    sass = library_sass(info.library, _cuobjdump())
    names = _demangle([mangled for _, mangled, _ in rows])
    print("| file | kernel (instantiation) | threads | registers | stack / spills (B) | static smem (B) | occupancy | "
          "loads in flight (16 B) |")
    print("|---|---|---|---|---|---|---|---|")
    for (source, mangled, usage), name in sorted(zip(rows, names), key=lambda r: (r[0][0], r[1])):
        threads = kernels[kernel_of(mangled, kernels)][1]
        flights = [loads_in_flight(body) for body in loops(sass.get(mangled, [])) if any(_loads(t) for _, t in body)]
        flight = "-" if kernel_of(mangled, kernels) not in STREAMING_KERNELS or not flights else \
            "%d (%d)" % min(flights)
        print(f"| {source} | `{name}` | {threads} | {usage['REG']} | {usage['STACK']} | {usage['SHARED']} | "
              f"{occupancy(usage['REG'], usage['SHARED'], threads):.1%} | {flight} |")


if __name__ == "__main__":
    main()
