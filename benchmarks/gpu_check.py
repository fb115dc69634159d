"""The GPU check: one command, at most 9 minutes on a fresh GPU machine, builds and compiles included.

    python -m benchmarks.gpu_check --out DIR        # from the checkout's root, installed or not

Names the machine (GPU, driver, versions: nvidia-smi under a 5 s timeout, no CUDA context), then runs the
stages below in order, each in a subprocess under a time limit, from the checkout (on PYTHONPATH, so an
install is optional), and writes what they found into DIR.  On a machine without CUDA (or with --dry-run) the
GPU stages are skipped with the reason and it exits 0; it exits 1 when a stage failed or ran out of time.

Plan of time budgets (seconds).  Each stage may run until the sum of its own and every earlier budget has
passed since the start, so time an earlier stage leaves unused goes to the later ones, and no stage takes
a later one's time.  At 10 s before its limit a stage gets SIGINT (pytest still writes its report), at its
limit SIGKILL.  The budgets are a plan, not measurements: no GPU has run this yet.  bench's first
configuration pays the cold compiles (torch.compile's and fastgan's Triton kernels not compiled by the tests).

    build-ext         80   python -m fastgan build-ext (C++/CUDA extension, cpu + sm_90; 5 files, in parallel)
    gpu-tests        160   pytest -m gpu tests, full size, every backend; the most decisive files first
    bench-g64-fp32    55   python -m fastgan bench --batch 128 --ngf 64 --ndf 64 --dtype fp32
    bench-g64-bf16    45   ... --dtype bf16 (autocast, channels_last)
    bench-g128-fp32   30   ... --ngf 128 --ndf 128 --dtype fp32
    bench-g128-bf16   30   ... --ngf 128 --ndf 128 --dtype bf16
    profile           25   python -m fastgan profile, b128 g64 bf16: per-category GPU time, Chrome traces
    train-loop        20   fastgan train's loop against the bare captured step (benchmarks/test_bench_data.py)
    gpu-sanitizer     35   the compute-sanitizer tests (racecheck, memcheck)
    doctor             0   python -m fastgan doctor --quick --json: only on time the stages above left unused
                     ---
                     480   8 minutes, leaving one of the 9 for start-up (an editable install, if wanted)

The GPU tests need some 450-600 cold Triton compilations (counted with tests/sm90.py's recorder), about a
second each on one CPU core: where pytest-xdist is installed (the GPU image has it) they run in
XDIST_WORKERS processes on the one GPU, so that the compilations share the host's cores.

bench runs every peer but torch.compile's max-autotune mode (minutes of autotuning per configuration), 30
timed steps after 5 warm-up steps.  If build-ext does not succeed, later stages do not build the extension
again: they see backend "cuda" as unavailable, and say so.

Files written into DIR (at most 8, the device tool's limit): summary.md (the environment, the stage table,
the bench, profile and train-loop tables and the end of each failed stage's log), gpu-tests.xml (junit),
bench.md, profile.md, traces.tar.gz (the profile's Chrome traces, for https://ui.perfetto.dev), train-loop.md
(pytest-benchmark's table), doctor.json and logs.tar.gz (every stage's full log).  A new stage is one more
Stage in STAGES; one whose standard output is a result names its file with ``stdout=``.
"""
import argparse
import dataclasses
import datetime
import importlib.util
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from fastgan.perf.environment import describe, environment

GRACE_S = 10  # between SIGINT and SIGKILL
MIN_S = 5  # a stage left less time than this is skipped
MAX_FILES = 8
MAX_FILE_BYTES = 15 * 2**20  # the device tool returns files of at most 16 MiB
FAILED = ("failed", "timed out")
PYTEST = ("-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "--durations", "15")
# pytest -m gpu runs these first, breadth before detail: whole models at full size on every backend and dtype,
# 50 train steps, the fused convolutions (L2), then the op-level grid that locates a failure, CUDA graphs, the rest.
DECISIVE_TESTS = ("test_models.py", "test_train_step.py", "test_conv_gemm.py", "test_bn_act.py", "test_step.py",
                  "test_train_graph.py", "test_sigmoid_bce.py", "test_presets.py")
BENCH = ("--batch", "128", "--compile-modes", "default", "--steps", "30", "--warmup", "5")
XDIST_WORKERS = 8  # of the GPU machine's 16 cores; each worker holds a CUDA context (~0.5 GiB) on the one GPU


@dataclasses.dataclass
class Check:
    """What the stages share: the output folder, a scratch folder and the environment they run in."""
    out: Path
    work: Path
    gpu_reason: Optional[str]  # why the GPU stages are skipped, or None
    env: dict

    @property
    def logs(self):
        return self.work / "logs"


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    budget_s: int
    command: Callable[[Check], list]  # argv (without the python executable)
    needs_gpu: bool = True
    stdout: Optional[str] = None  # a file in DIR that receives the stage's stdout (stderr stays in its log)
    after: Optional[Callable[[Check, "StageResult"], None]] = None  # runs when the stage has ended


@dataclasses.dataclass
class StageResult:
    status: str  # "ran" | "failed" | "timed out" | "skipped"
    seconds: float = 0.0
    limit_s: float = 0.0
    detail: str = ""


ROOT = Path(__file__).resolve().parents[1]  # the checkout: tests/ is run from here


def tests_in_order(root):
    """tests/test_*.py, DECISIVE_TESTS first (pytest keeps the order of the files it is given)."""
    files = sorted(p.name for p in (root / "tests").glob("test_*.py"))
    ordered = [f for f in DECISIVE_TESTS if f in files] + [f for f in files if f not in DECISIVE_TESTS]
    return [str(Path("tests") / f) for f in ordered]


def parallel_tests():
    """pytest-xdist's options where it is installed: each test to the next free worker, in file order."""
    if importlib.util.find_spec("xdist") is None:
        return []
    return ["-n", str(XDIST_WORKERS), "--dist", "load"]


def bench_stage(ngf, dtype, budget_s):
    return Stage(f"bench-g{ngf}-{dtype}", budget_s, lambda c: [
        "-m", "fastgan", "bench", *BENCH, "--ngf", str(ngf), "--ndf", str(ngf), "--dtype", dtype,
        "--markdown", str(c.out / "bench.md")])


def after_build(check, result):
    if result.status in FAILED:  # later stages must not spend their time building it again
        blocked = check.work / "no-extension"
        blocked.write_text(f"build-ext {result.status}\n")
        check.env["FASTGAN_CACHE_DIR"] = str(blocked / "cache")  # under a file: "cannot be built", at once


def after_profile(check, result):
    traces = sorted((check.work / "traces").glob("*.json"), key=lambda p: p.stat().st_size)
    if not traces:
        return
    archive = check.out / "traces.tar.gz"
    while traces:
        with tarfile.open(archive, "w:gz") as tar:
            for path in traces:
                tar.add(path, arcname=path.name)
        if archive.stat().st_size <= MAX_FILE_BYTES:
            break
        dropped = traces.pop()  # the largest
        result.detail += f"; left out {dropped.name} (traces.tar.gz over {MAX_FILE_BYTES >> 20} MiB)"
    if not traces:
        archive.unlink()


STAGES = (
    Stage("build-ext", 80, lambda c: ["-m", "fastgan", "build-ext"], after=after_build),
    Stage("gpu-tests", 160, lambda c: [*PYTEST, *parallel_tests(), "-m", "gpu", "-k",
                                       "not compute_sanitizer and not test_doctor_gpu",
                                       "--junitxml", str(c.out / "gpu-tests.xml"), *tests_in_order(ROOT)]),
    bench_stage(64, "fp32", 55),
    bench_stage(64, "bf16", 45),
    bench_stage(128, "fp32", 30),
    bench_stage(128, "bf16", 30),
    Stage("profile", 25, lambda c: [
        "-m", "fastgan", "profile", "--batch", "128", "--ngf", "64", "--ndf", "64", "--dtype", "bf16", "--steps", "3",
        "--warmup", "3", "--trace-dir", str(c.work / "traces"),
        "--markdown", str(c.out / "profile.md")], after=after_profile),
    Stage("train-loop", 20, lambda c: ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-columns",
                                       "min,median,max,rounds", "-k", "train_loop_gpu",
                                       "benchmarks/test_bench_data.py"], stdout="train-loop.md"),
    Stage("gpu-sanitizer", 35, lambda c: [*PYTEST, "-m", "gpu", "-k", "compute_sanitizer",
                                          "--junitxml", str(c.logs / "gpu-sanitizer.xml"), "tests/test_cuda_ext.py"]),
    Stage("doctor", 0, lambda c: ["-m", "fastgan", "doctor", "--quick", "--json", str(c.out / "doctor.json")]),
)


def run_stage(stage, check, deadline):
    """Run one stage until ``deadline`` (time.monotonic()); returns its StageResult."""
    if stage.needs_gpu and check.gpu_reason:
        return StageResult("skipped", detail=check.gpu_reason)
    limit = deadline - time.monotonic()
    if limit < MIN_S:
        return StageResult("skipped", detail=f"{limit:.0f} s left of its budget, under {MIN_S} s")
    log_path = check.logs / f"{stage.name}.log"
    command = [sys.executable, *stage.command(check)]
    start = time.monotonic()
    with open(log_path, "w") as log, open(check.out / stage.stdout if stage.stdout else os.devnull, "w") as out:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(command, cwd=ROOT, env=check.env, stdout=out if stage.stdout else log,
                                stderr=log, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=max(1, limit - GRACE_S))
        except subprocess.TimeoutExpired:
            timed_out = True
            _signal_group(proc, signal.SIGINT)
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        _signal_group(proc, signal.SIGKILL)  # whatever it left running (a torchrun rank, a build) goes too
    seconds = time.monotonic() - start
    tail = _last_line(log_path, timed_out)
    if timed_out:
        return StageResult("timed out", seconds, limit, f"stopped at {limit:.0f} s; last line: {tail}")
    if proc.returncode != 0:
        return StageResult("failed", seconds, limit, f"exit {proc.returncode}: {tail}")
    return StageResult("ran", seconds, limit, tail)


def _signal_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


TRACEBACK = "Traceback (most recent call last):"


def _log_lines(path, timed_out):
    """The log's non-empty lines; of a stopped stage's KeyboardInterrupt traceback only where SIGINT landed."""
    lines = [line.rstrip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if timed_out and TRACEBACK in lines:
        cut = len(lines) - 1 - lines[::-1].index(TRACEBACK)
        lines = lines[:cut] + [f"(SIGINT in: {lines[-3].strip() if len(lines) - cut > 3 else '?'})"]
    return lines


def _last_line(path, timed_out):
    lines = [line.strip() for line in _log_lines(path, timed_out) if not line.startswith(("appended to ", "(SIGINT"))]
    return (lines[-1][:200] if lines else "(no output)").replace("|", "/")


def _tail(path, timed_out, n=25):
    return "\n".join(_log_lines(path, timed_out)[-n:])


def stage_table(results):
    rows = ["| stage | status | seconds | limit s | result |", "|---|---|---|---|---|"]
    rows += [f"| {stage.name} | {r.status} | {r.seconds:.0f} | {r.limit_s:.0f} | {r.detail} |"
             for stage, r in results]
    return "\n".join(rows) + "\n"


def summary(check, machine, results, started):
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"# fastgan GPU check, {stamp}, {time.monotonic() - started:.0f} s\n",
             "\n".join(f"- {line}" for line in machine) + "\n"]
    parts.append(stage_table(results))
    for name in ("bench.md", "profile.md", "train-loop.md"):
        if (check.out / name).exists():
            parts.append(f"## {name}\n{(check.out / name).read_text()}")
    for stage, r in results:
        if r.status in ("failed", "timed out"):
            log = _tail(check.logs / f"{stage.name}.log", r.status == "timed out")
            parts.append(f"## {stage.name}: the end of its log\n\n```\n{log}\n```\n")
    return "\n".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the result files (created; at most 8 files)")
    parser.add_argument("--dry-run", action="store_true", help="skip the GPU stages even where CUDA is available")
    parser.add_argument("--stages", type=lambda s: s.split(","), default=None, metavar="NAME,...",
                        help=f"run only these stages (of {', '.join(s.name for s in STAGES)}), e.g. to rerun one")
    args = parser.parse_args(argv)
    unknown = set(args.stages or ()) - {s.name for s in STAGES}
    if unknown:
        parser.error(f"--stages: unknown {', '.join(sorted(unknown))}; choose from {', '.join(s.name for s in STAGES)}")
    stages = [s for s in STAGES if args.stages is None or s.name in args.stages]
    started = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu_reason = ("--dry-run" if args.dry_run else
                  None if torch.cuda.is_available() else "no CUDA device here (torch.cuda.is_available() is False)")
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    device, versions = describe(environment())
    machine = [versions + f", fastgan from {ROOT}", device]
    print("\n".join(machine), flush=True)
    with tempfile.TemporaryDirectory(prefix="fastgan-gpu-check-") as work:
        check = Check(out, Path(work), gpu_reason, env)
        check.logs.mkdir()
        results, deadline = [], started
        for stage in stages:
            deadline += stage.budget_s
            print(f"== {stage.name} (until {deadline - started:.0f} s)", flush=True)
            result = run_stage(stage, check, deadline)
            if stage.after:
                stage.after(check, result)
            results.append((stage, result))
            print(f"   {result.status}, {result.seconds:.0f} s: {result.detail}", flush=True)
        with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
            tar.add(check.logs, arcname="logs")
        text = summary(check, machine, results, started)
    (out / "summary.md").write_text(text)
    print("\n" + text)
    print(stage_table(results))  # again, at the end: a device call returns only the end of the output
    written = sorted(p.name for p in out.iterdir())
    print(f"{len(written)} files in {out}: {', '.join(written)}")
    if len(written) > MAX_FILES:
        print(f"more than {MAX_FILES} files in {out}: the device tool returns only {MAX_FILES}", file=sys.stderr)
        return 1
    for name in written:
        if (out / name).stat().st_size > MAX_FILE_BYTES:
            print(f"{name} is over {MAX_FILE_BYTES >> 20} MiB: the device tool may not return it", file=sys.stderr)
    return 1 if any(r.status in FAILED for _, r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
