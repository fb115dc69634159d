"""The C++/CUDA extension's kernels fit an sm_90 (H100/H200) SM, checked without a GPU: registers, spills,
shared memory and the occupancy they leave, as cuobjdump reads them from the sm_90 code of the built library
(compiled, not run).  The build is the one test_cuda_ext.py makes (the extension cache), so this costs well
under a second once it exists.

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
# enough 16-byte loads in flight.  fp64 runs only in gradchecks: there ptxas keeps one Sums<double> of
# grad_sums_kernel<double, 1> on the stack (16 B frame, 24 B of spill stores), which the fp64 budget allows.
SPILL_BUDGET = 0              # bytes of stack frame per thread, fp32/fp16/bf16 kernels
FP64_SPILL_BUDGET = 32        # the same for fp64 kernels
MIN_OCCUPANCY = 0.25


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


def kernel_of(mangled, kernels):
    """The csrc/ kernel a mangled name instantiates (names appear length-prefixed in Itanium mangling)."""
    matches = [k for k in kernels if f"{len(k)}{k}" in mangled]
    return matches[0] if len(matches) == 1 else None


@pytest.fixture(scope="module")
def resources():
    home, reason = ext_build.cuda_toolkit()
    if home is None:
        pytest.skip(f"the extension's CUDA part is not built here: {reason}")
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (neither in the CUDA toolkit nor in triton's nvidia backend)")
    info = ext_build.build()
    assert "9.0" in info.cuda_archs or os.environ.get("TORCH_CUDA_ARCH_LIST"), info
    return library_resources(info.library, cuobjdump)


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
    names = _demangle([mangled for _, mangled, _ in rows])
    print("| file | kernel (instantiation) | threads | registers | stack / spills (B) | static smem (B) | occupancy |")
    print("|---|---|---|---|---|---|---|")
    for (source, mangled, usage), name in sorted(zip(rows, names), key=lambda r: (r[0][0], r[1])):
        threads = kernels[kernel_of(mangled, kernels)][1]
        print(f"| {source} | `{name}` | {threads} | {usage['REG']} | {usage['STACK']} | {usage['SHARED']} | "
              f"{occupancy(usage['REG'], usage['SHARED'], threads):.1%} |")


if __name__ == "__main__":
    main()
