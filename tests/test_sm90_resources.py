"""The static sm_90 check (docs/design.md section 9), no GPU needed.

The Triton kernel variants fastgan's launchers pick for a DCGAN train step at the real shapes (B = 64/128/512,
ngf = ndf = 64/128, 64x64; fp32 with TF32 and exact, bf16 and fp16 autocast, fp64; NCHW and channels_last;
L1 and L2), autotune candidates included, and those of test_conv_gemm's fp64 gradcheck, compile for sm_90,
fit a block's shared memory and stay within the spill budget; a first train step compiles a bounded number
of kernels; L2's GEMMs and L1's reductions meet issue 18's efficiency targets, read from their SASS.
tests/sm90.py records and compiles (its docstring says how); one run of it, in a subprocess without
TRITON_INTERPRET, serves every test here: 2 min 40 s on 2 shared cores with an empty cache (.cache/sm90, which
CI starts empty) before the efficiency check, which compiles up to 99 variants more (the default GEMM and
reduction launches of its 8 steps that are no representative: 3.6 min of CPU with an empty cache here).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastgan.kernels import tiling
from parity import HAS_TRITON

pytestmark = pytest.mark.slow

# Spill stores per thread a compiled kernel may have: at most 16 words that ptxas moves out of the registers,
# reloaded from L1 a few times per K step, against the tens of KB of operands a step moves through shared
# memory.  What the audit found before the tiles were pruned were kilobytes (18-42 KB at 32 registers).  No
# representative spills at all with triton 3.8; the margin is for other triton versions' register allocation.
SPILL_BUDGET = 64
COLD_START = {"L1": 25, "L2": 40}  # Triton compilations before the first train step, per (shape, dtype, layout)
GRID_LIMITS = (2**31 - 1, 65_535, 65_535)
GEMMS = ("_conv_kernel", "_wgrad_kernel")


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    if not HAS_TRITON:
        pytest.skip("triton does not import")
    out = tmp_path_factory.mktemp("sm90") / "audit.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("sm90.py")
    subprocess.run([sys.executable, str(script), "--json", str(out)], env=env, check=True, timeout=3000)
    return json.loads(out.read_text())


def _name(v):
    ce = v["constexprs"]
    return f"{v['kernel']} {v['family']} {ce} warps={v['warps']} stages={v['stages']}"


def _compiled(audit):
    return [v for v in audit["variants"] if v["compiled"] is not None]


def test_every_chosen_variant_compiles(audit):
    failed = [f"{_name(v)}: {v['compiled']['error']}" for v in _compiled(audit) if "error" in v["compiled"]]
    assert not failed, "\n".join(failed)


def _ok(audit):
    return [v for v in _compiled(audit) if "error" not in v["compiled"]]


def test_shared_memory_fits_a_block(audit):
    over = [f"{_name(v)}: {v['compiled']['shared']} B" for v in _ok(audit)
            if v["compiled"]["shared"] > tiling.SM90.smem_per_block]
    assert not over, f"over the {tiling.SM90.smem_per_block} B of a block:\n" + "\n".join(over)


def test_spills_within_budget(audit):
    over = [f"{_name(v)}: {v['compiled']['registers']} registers, {v['compiled']['spill_bytes']} B spilled"
            for v in _ok(audit) if v["compiled"]["spill_bytes"] > SPILL_BUDGET]
    assert not over, f"over the {SPILL_BUDGET} B spill budget:\n" + "\n".join(over)


def test_ptxas_agrees_with_the_cubin(audit):
    """ptxas -v's report of each compilation (when it ran here, not from triton's cache) gives the same figures."""
    checked = [v for v in _ok(audit) if v["compiled"].get("ptxas")]
    differ = [_name(v) for v in checked if (v["compiled"]["ptxas"]["registers"], v["compiled"]["ptxas"]["stack"])
              != (v["compiled"]["registers"], v["compiled"]["spill_bytes"])]
    assert not differ, "\n".join(differ)


def test_shared_memory_estimate_is_an_upper_bound(audit):
    """The prune keeps a tile by tiling's estimate: it must never be below what triton allocates."""
    gemms = [v for v in _ok(audit) if v["kernel"] in GEMMS]
    assert gemms
    under = [f"{_name(v)}: estimated {v['estimate']['shared']} B, compiled {v['compiled']['shared']} B"
             for v in gemms if v["estimate"]["shared"] < v["compiled"]["shared"]]
    assert not under, "\n".join(under)


def test_every_launch_keeps_a_fitting_config(audit):
    variants = audit["variants"]
    problems = []
    for step in audit["steps"]:
        for launch in step["launches"]:
            candidates = [variants[i] for i in launch["variants"]]
            if not candidates:
                problems.append(f"{step['step']}: a launch without a config")
            unfit = [_name(v) for v in candidates if v["estimate"] is not None and not v["estimate"]["fits"]]
            problems += [f"{step['step']}: kept a tile that does not fit: {name}" for name in unfit]
            grid = launch["grid"] + [1] * (3 - len(launch["grid"]))
            if any(g < 1 or g > limit for g, limit in zip(grid, GRID_LIMITS)):
                problems.append(f"{step['step']}: {candidates[0]['kernel']} grid {launch['grid']} out of limits")
    assert not problems, "\n".join(problems[:50])


def test_gradcheck_chain_compiles_and_fits(audit):
    """Every variant of test_conv_gemm's fp64 gradcheck (finding 1 of the first-contact issue: out of shared
    memory on an H100) is compiled here, so that the gradcheck fits a GPU by construction."""
    step = next(s for s in audit["steps"] if s["step"].startswith("test_conv_gemm::test_gradcheck_fp64"))
    variants = [audit["variants"][i] for launch in step["launches"] for i in launch["variants"]]
    assert any(v["kernel"] == "_conv_kernel" and v["dtype"] == "fp64" for v in variants)
    missing = [_name(v) for v in variants if v["compiled"] is None or "error" in v["compiled"]]
    assert not missing, "\n".join(missing)
    assert max(v["compiled"]["shared"] for v in variants) <= tiling.SM90.smem_per_block


def test_every_config_is_covered(audit):
    """Each config of tiling's lists is a candidate of some launch at the DCGAN shapes (none is dead weight), and
    wherever a dtype family launches it unclipped, its heaviest variant there was compiled."""
    elems = {"16-bit": 2, "tf32": 4, "ieee": 4, "fp64": 8}
    lists = {"_conv_kernel": tiling.CONV_TILES, "_wgrad_kernel": tiling.WGRAD_TILES}
    launched = {}
    for v in audit["variants"]:
        if v["kernel"] in GEMMS:
            launched.setdefault((v["kernel"], v["family"], tuple(v["config"])), []).append(v)
    for kernel, tiles in lists.items():
        for *sizes, k16, warps, stages in tiles:
            found = False
            for family, elem in elems.items():
                members = launched.get((kernel, family, (*sizes, tiling.block_k(k16, elem), warps, stages)), [])
                found |= bool(members)
                assert not members or any(m["representative"] and m["compiled"] for m in members), \
                    f"{kernel} {family} {(*sizes, k16, warps, stages)}: no compiled representative"
            assert found, f"{kernel} config {(*sizes, k16, warps, stages)} is never launched unclipped"


def test_default_launch_is_the_first_candidate(audit):
    """The audit records with FASTGAN_AUTOTUNE=1 and reads the first candidate as the default launch."""
    assert audit["default_checked"] and all(audit["default_checked"].values()), audit["default_checked"]


def test_cold_start_is_bounded(audit):
    """Distinct Triton compilations before the first train step, per (shape, dtype, layout), autotuning off."""
    counts = {}
    for step in audit["steps"]:
        if step["step"].startswith("B="):
            counts[step["step"]] = len({launch["variants"][0] for launch in step["launches"]})
    assert len(counts) == 120
    over = {name: n for name, n in counts.items() if n > COLD_START[name.rsplit(" ", 1)[1]]}
    assert not over, f"bounds {COLD_START}: {over}"


# ----------------------------------------------------------------------------- efficiency (issue 18)
# tests/sm90.py reads each default launch of L2's GEMMs and L1's reductions at B = 128, ngf = ndf 64/128, bf16
# channels_last and TF32 NCHW from its SASS; a row's "missed" names the targets it misses (sm90.missed).

def _efficiency(audit, level):
    rows = [r for r in audit["efficiency"] if r["level"] == level]
    assert {r["step"].split()[1] for r in rows} == {"ngf=ndf=64", "ngf=ndf=128"}
    return rows


def _misses(rows, target):
    return [f"{r['step']}: {r['label']} ({r['kernel']}, tile {r.get('block')}, {r['launches']} launches): "
            f"{r['missed'][target]}" for r in rows if target in r["missed"]]


def test_efficiency_reads_every_gemm_launch(audit):
    rows = _efficiency(audit, "L2")
    assert not _misses(rows, "compiles"), "\n".join(_misses(rows, "compiles"))
    for step in {r["step"] for r in rows}:
        assert sum(r["share"] for r in rows if r["step"] == step) == pytest.approx(1.0)
        assert all(r["per_k_step"] for r in rows if r["step"] == step), step


# Issue 18's targets that today's kernels do not meet yet: strict, so the day they are met the suite fails
# until these marks come off.  The figures are in benchmarks/RESULTS.md's "Static, sm_90" section.
def _not_met_yet(why):
    return pytest.mark.xfail(strict=True, reason=f"issue 18, open: {why} (RESULTS.md, Static, sm_90)")


# (level, target as sm90.missed names it): L2's GEMMs run on tensor cores; launches carrying >= 5% of a step's
# FLOPs issue a K-step in no more cycles than its MMAs take; every SM gets a program (tiling.WAVE_FILL of them)
# outside the end layers, which are judged by their time (3 or 1 channels or the 100-d noise: at most 20 us
# each by the issue/MMA estimate); no spills.  L1's reductions run >= 2 waves of the SMs.
TARGETS = [
    ("L2", "tensor cores"),
    pytest.param("L2", "issue", marks=_not_met_yet(
        "the BN map in the operand load still costs more issue cycles per K-step than the MMAs take")),
    ("L2", "waves"),
    ("L2", "spills"),
    pytest.param("L2", "end layer", marks=_not_met_yet(
        "the 3-channel layers (D's first conv in TF32, G's last convT and its wgrad) run over 20 us")),
    ("L1", "waves"),
]


@pytest.mark.parametrize("level,target", TARGETS)
def test_efficiency_target(audit, level, target):
    missed = _misses(_efficiency(audit, level), target)
    assert not missed, f"{len(missed)} {level} launches miss '{target}':\n" + "\n".join(missed)


def test_heavy_launches_issue_no_more_than_their_baseline(audit):
    """The ratchet under the "issue" target: no heavy launch's issue : MMA ratio grows past the one recorded in
    tests/sm90_issue_baseline.json for this triton version (written by `python tests/sm90.py --write-baseline`),
    so a kernel change that costs instructions per K-step shows here even while the target itself is not met."""
    baselines = json.loads(Path(__file__).with_name("sm90_issue_baseline.json").read_text())
    version = f"triton {audit['triton']}"
    assert version in baselines, f"no baseline for {version}: record one with tests/sm90.py --write-baseline"
    baseline, now = baselines[version], audit["issue_ratios"]
    assert now.keys() == baseline.keys(), "heavy launches changed: record the baseline again (--write-baseline)"
    worse = [f"{key}: {now[key]:.2f} > {baseline[key]:.2f}" for key in now if now[key] > baseline[key] + 0.02]
    assert not worse, "issue : MMA cycles grew:\n" + "\n".join(worse)


def test_l1_reductions_reduce_across_the_block_once(audit):
    """No barrier or shuffle inside the reduction loop: each program reduces across its block once, at the end."""
    rows = _efficiency(audit, "L1")
    assert {r["kernel"] for r in rows} == {"_moments_kernel", "_backward_reduce_kernel"}
    assert all(r["loop"] and r["loop"]["loads"] for r in rows)
    missed = _misses(rows, "reduction per iteration")
    assert not missed, "\n".join(missed)
