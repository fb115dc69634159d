"""Check this machine: does fastgan give the reference's numbers here, and is it faster here?

In about a minute:

- environment: the device, the driver, CUDA, cuDNN, torch, triton, Python and numpy versions, and whether the
  C++/CUDA extension builds or is found in the cache, with its compile time (a failed build is a finding);
- correctness: for every backend, fusion level and dtype that runs here, fastgan's Generator and
  Discriminator against the reference models (fastgan.nn.reference) with the same weights and inputs: the
  output, the input gradient, every parameter gradient and the BatchNorm running stats; and two train steps
  against reference.train_step (losses, D outputs, parameters and running stats after them; the CUDA-graph
  step replays from its second call).  Each tensor's rel-L2 error is held against the tolerance of
  fastgan.perf.tolerances, with kernel outputs NaN-filled before the kernels write them.  fp32 runs with
  TF32 off, and its train steps in float64 (see step_dtype).  Under bf16/fp16 autocast the error is against
  that exact reference, and a tensor's tolerance is the table's or twice the reference's own error on it under
  the same autocast, whichever is larger;
- speed: the median ms per train step of eager PyTorch, of the torch.compile peers that finish within
  --compile-timeout (each in a subprocess of its own, beside eager; --quick skips them) and of each fastgan
  configuration, as a ratio to eager, with peak memory (fastgan.perf.bench's peers and timer);
- the verdict: the fastest configuration that passed every check and beats eager, and why each other one is
  not recommended.

On a GPU the sizes are examples/dcgan's: batch 64, ngf = ndf = 64.  On a CPU they are smaller (batch 8,
ngf = ndf = 8); fp16 and triton (CPU tensors run only in the Triton interpreter, far too slowly for this) are
skipped there, and speed on a CPU is not what fastgan is for.  --batch and --size change the sizes.  The first
run on a machine also builds the extension and compiles the Triton kernels (minutes, once).
--json PATH writes the same report, for a bug report.  The exit status is 1 when a correctness check fails or
a configuration raises.
"""
import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..kernels import outputs
from ..nn import fused_conv, reference
from ..nn.models import DCGAN, Discriminator, Generator
from ..nn.step import CapturedStep
from ..ops import backends, extension
from ..usage import UsageError, one_line, positive_float, positive_int
from . import bench
from .environment import describe, environment
from .tolerances import TOLERANCES, rel_l2

NZ = 100
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
GROUPS = ("G out", "G dx", "G dW", "G stats", "D out", "D dx", "D dW", "D stats", "step")
TRAIN_STEPS = 2  # the CUDA-graph step (one eager warm-up step) replays from its second call
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds fastgan/


class Size(NamedTuple):
    batch: int
    width: int  # ngf = ndf

    def __str__(self):
        return f"batch {self.batch}, ngf=ndf={self.width}"


GPU_SIZE = Size(64, 64)
CPU_SIZE = Size(8, 8)
INTERPRETED = ("on a CPU Triton runs only in its interpreter (TRITON_INTERPRET=1), where these checks take minutes "
               "even at batch 2, ngf=ndf=4; the test suite runs them at tiny sizes")


class Check(NamedTuple):
    group: str  # one of GROUPS
    what: str  # the tensor: "output", "grad of main.0.weight", "G parameters", ...
    error: float  # rel-L2 to the reference; inf for an integer buffer that differs
    tolerance: float
    reference_error: float = None  # under autocast: the reference's own error in that dtype

    @property
    def passed(self):
        return self.error <= self.tolerance  # NaN never passes

    @property
    def ratio(self):
        return math.inf if math.isnan(self.error) else self.error / self.tolerance if self.tolerance else math.inf


class Row(NamedTuple):
    """The checks of one configuration (a fastgan peer of fastgan.perf.bench) in one dtype."""
    peer: bench.Peer
    dtype: str
    checks: list

    @property
    def failures(self):
        return [c for c in self.checks if not c.passed]

    def worst(self, group):
        """The check of ``group`` furthest from passing (largest error / tolerance), or None if there is none."""
        return max((c for c in self.checks if c.group == group), key=lambda c: c.ratio, default=None)


# ----------------------------------------------------------------------------------------------- environment

def check_extension():
    """Build the C++/CUDA extension, or find it in the cache: {"status": "compiled" | "cached" | "failed", ...}."""
    start = time.perf_counter()
    try:
        info = extension.build()
    except extension.BuildError as exc:
        return {"status": "failed", "reason": str(exc), "seconds": time.perf_counter() - start}
    except OSError as exc:  # e.g. a read-only cache folder
        return {"status": "failed", "seconds": time.perf_counter() - start,
                "reason": f"the C++/CUDA extension cannot be built in {extension.cache_dir()} ({exc}); "
                          "set FASTGAN_CACHE_DIR to a writable folder"}
    return {"status": "compiled" if info.compiled else "cached", "library": info.library, "parts": info.parts,
            "no_cuda_reason": info.no_cuda_reason, "compile_seconds": info.seconds,
            "seconds": time.perf_counter() - start}


def backend_problems(names, device, ext):
    """{backend: why it cannot run on ``device``} for the backends of ``names`` that cannot."""
    problems = {}
    for name in names:
        if name == "cuda" and ext["status"] == "failed":  # asking backends would build it a second time
            problems[name] = ext["reason"].splitlines()[0]
            continue
        try:
            backends.resolve(name, device)
        except backends.BackendUnavailable as exc:
            problems[name] = one_line(exc).split(": ", 1)[-1]  # without "backend='x' cannot run here: "
    return problems


def environment_lines(env, ext):
    device, versions = describe(env)
    settings = []
    if "tf32_cudnn" in env:
        on = {True: "on", False: "off"}
        settings = [f"TF32:      cuDNN {on[env['tf32_cudnn']]}, matmul {on[env['tf32_matmul']]} (the speed runs so; "
                    "correctness is checked with TF32 off)"]
    if ext["status"] == "not checked":
        built = f"not checked ({ext['reason']})"
    elif ext["status"] == "failed":
        built = f"FAILED after {ext['seconds']:.1f} s: {ext['reason'].splitlines()[0]}"
    else:
        how = "compiled now" if ext["status"] == "compiled" else f"found in the cache, loaded in {ext['seconds']:.2f} s"
        built = f"{', '.join(ext['parts'])}; {how} (compile time {ext['compile_seconds']:.0f} s)"
        if ext["no_cuda_reason"]:
            built += f"; no CUDA part: {ext['no_cuda_reason']}"
    return [f"device:    {device}", f"versions:  {versions}", *settings, f"extension: {built}"]


# ----------------------------------------------------------------------------------------------- correctness

class Inputs(NamedTuple):
    """The same random inputs for every configuration at one size (drawn on the CPU, then moved)."""
    g_in: torch.Tensor
    g_dy: torch.Tensor
    d_in: torch.Tensor
    d_dy: torch.Tensor
    batches: list  # TRAIN_STEPS (real, noise) pairs
    weights: tuple  # the reference G's and D's state_dicts, from one seed
    size: Size


def make_inputs(size, device, seed=0):
    torch.manual_seed(seed)
    weights = (reference.Generator(NZ, size.width).state_dict(), reference.Discriminator(ndf=size.width).state_dict())
    gen = torch.Generator().manual_seed(seed + 1)

    def images():
        return torch.tanh(2 * torch.randn(size.batch, 3, 64, 64, generator=gen)).to(device)

    def noise():
        return torch.randn(size.batch, NZ, 1, 1, generator=gen).to(device)

    return Inputs(noise(), torch.randn(size.batch, 3, 64, 64, generator=gen).to(device), images(),
                  torch.randn(size.batch, generator=gen).to(device), [(images(), noise()) for _ in range(TRAIN_STEPS)],
                  weights, size)


def _autocast(device, dtype):
    return torch.autocast(device.type, dtype=AUTOCAST[dtype] or torch.float32, enabled=AUTOCAST[dtype] is not None)


def _forward_backward(kind, model, inputs, device, dtype):
    """{group: {what: tensor}} of one training forward and backward of G or D."""
    x, dy = (inputs.g_in, inputs.g_dy) if kind == "G" else (inputs.d_in, inputs.d_dy)
    x = x.detach().clone().requires_grad_()
    with _autocast(device, dtype):
        out = model(x)
    out.backward(dy.to(out.dtype))
    return {f"{kind} out": {"output": out.detach()}, f"{kind} dx": {"input grad": x.grad},
            f"{kind} dW": {f"grad of {name}": p.grad for name, p in model.named_parameters()},
            f"{kind} stats": {name: b.clone() for name, b in model.named_buffers()}}


def _state(g, d):
    """The parameters and buffers of G and D, each kind concatenated, as the step group's tensors."""
    def cat(tensors):
        return torch.cat([t.detach().flatten() for t in tensors])

    state = {}
    for kind, net in (("G", g), ("D", d)):
        counts = {n: b for n, b in net.named_buffers() if n.endswith("num_batches_tracked")}
        state[f"{kind} parameters"] = cat(net.parameters())
        state[f"{kind} running stats"] = cat(b for n, b in net.named_buffers() if n not in counts)
        state[f"{kind} num_batches_tracked"] = cat(counts.values())
    return state


def step_dtype(dtype):
    """The parameters' dtype of the train steps checked for ``dtype``.  The fp32 rows run them in float64, as
    tests/test_train_step.py does: in fp32, Adam turns gradients at rounding level into lr-sized updates of
    either sign, so two correct implementations already differ by ~1e-3 after two steps at batch 32."""
    return torch.float64 if dtype == "fp32" else torch.float32


def _train(step, g, d, inputs, device, dtype):
    for real, noise in inputs.batches:
        with _autocast(device, dtype):
            values = step(real.to(step_dtype(dtype)), noise.to(step_dtype(dtype)))
    return {"step": {"losses and D outputs": torch.stack([v.float() for v in values]), **_state(g, d)}}


def reference_results(inputs, device, dtype):
    """The reference's results: for "fp32" the truth (exact fp32; the train steps in float64), else under that
    dtype's autocast."""
    g, d = reference.Generator(NZ, inputs.size.width), reference.Discriminator(ndf=inputs.size.width)
    results = {}
    for kind, model, state in (("G", g, inputs.weights[0]), ("D", d, inputs.weights[1])):
        model.load_state_dict(state)
        results.update(_forward_backward(kind, model.to(device), inputs, device, dtype))
    g.load_state_dict(inputs.weights[0])
    d.load_state_dict(inputs.weights[1])
    g, d = g.to(dtype=step_dtype(dtype)), d.to(dtype=step_dtype(dtype))
    opt_g, opt_d = reference.make_optimizers(g, d)
    run_g, run_d = g, d
    if AUTOCAST[dtype] is not None:  # nn.BCELoss takes fp32 probabilities under autocast
        run_g, run_d = bench.Autocast(g, AUTOCAST[dtype]), bench.Autocast(d, AUTOCAST[dtype], fp32_output=True)
    results.update(_train(lambda real, noise: reference.train_step(run_g, run_d, real, noise, opt_g, opt_d), g, d,
                          inputs, device, dtype))
    return results


def fastgan_results(peer, inputs, device, dtype):
    """fastgan's results for ``peer`` (its backend, level and CUDA graph), in ``dtype``."""
    results, width = {}, inputs.size.width
    if not peer.cuda_graph:  # the graph changes the step, not the networks: the L1/L2 rows check those
        for kind, model, state in (("G", Generator(NZ, width, backend=peer.backend), inputs.weights[0]),
                                   ("D", Discriminator(ndf=width, backend=peer.backend), inputs.weights[1])):
            model.load_state_dict(state)
            fused_conv.set_level(model, peer.level)
            results.update(_forward_backward(kind, model.to(device), inputs, device, dtype))
    gan = DCGAN(NZ, width, width, backend=peer.backend)
    gan.generator.load_state_dict(inputs.weights[0])
    gan.discriminator.load_state_dict(inputs.weights[1])
    fused_conv.set_level(gan.to(device, step_dtype(dtype)), peer.level)
    capturable = {"capturable": True} if peer.cuda_graph else {}
    opt_g, opt_d = reference.make_optimizers(gan.generator, gan.discriminator, **bench.optimizer_kwargs(device),
                                             **capturable)
    if peer.cuda_graph:
        step = CapturedStep(gan.step_for(opt_g, opt_d), warmup=1)
    else:
        def step(real, noise):
            return gan.train_step(real, opt_g, opt_d, noise=noise)
    results.update(_train(step, gan.generator, gan.discriminator, inputs, device, dtype))
    return results


def _error(actual, expected):
    if actual.shape != expected.shape:
        return math.inf
    if not actual.is_floating_point():
        return 0.0 if torch.equal(actual, expected) else math.inf
    return rel_l2(actual, expected)


def compare(results, truth, baseline, dtype):
    """The Checks of ``results`` against ``truth``, tensor by tensor.  With a ``baseline`` (the reference under
    the same autocast), a tensor's tolerance is at least twice the baseline's error on that tensor."""
    checks = []
    for group, tensors in results.items():
        for what, t in tensors.items():
            tolerance, reference_error = TOLERANCES[dtype]["rel_l2"], None
            if baseline is not None:
                reference_error = _error(baseline[group][what], truth[group][what])
                tolerance = max(tolerance, 2 * reference_error)
            checks.append(Check(group, what, _error(t, truth[group][what]), tolerance, reference_error))
    return checks


@contextlib.contextmanager
def checking(with_extension):
    """Exact fp32 (TF32 off) and NaN-filled kernel outputs (the extension's too, if loaded), as the tests run;
    restored afterwards."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    poison = outputs.POISON_OUTPUTS
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    outputs.POISON_OUTPUTS = True
    ext = backends.kernel_ops("cuda") if with_extension else None
    ext_poison = ext.poison_outputs(True) if ext else None
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        outputs.POISON_OUTPUTS = poison
        if ext:
            ext.poison_outputs(ext_poison)


def dtype_problem(dtype, device):
    if device.type == "cpu" and dtype == "fp16":
        return "fp16 is a GPU dtype: PyTorch's fp16 convolutions on CPU are slow (CPU autocast is for bf16)"
    if device.type == "cuda" and dtype == "bf16" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16 (compute capability below 8.0)"
    return None


def peer_problem(peer, device, problems):
    """Why the configuration ``peer`` is not checked on ``device`` at all, or None."""
    if peer.backend == "triton" and device.type == "cpu":
        return INTERPRETED
    if peer.backend in problems:
        return problems[peer.backend]
    if peer.cuda_graph and device.type != "cuda":
        return "CUDA graphs need a GPU (on a CPU the step runs eagerly)"
    return None


def parity_plan(peers, device, problems):
    """([(peer, dtype)] to check, [(peer name, dtype or None for all, why not)])."""
    plan, skipped = [], []
    for peer in peers:
        reason = peer_problem(peer, device, problems)
        if reason:
            skipped.append((peer.name, None, reason))
            continue
        for dtype in AUTOCAST:
            reason = dtype_problem(dtype, device)
            (skipped.append((peer.name, dtype, reason)) if reason else plan.append((peer, dtype)))
    return plan, skipped


def check_parity(plan, size, device, log):
    """Run the planned checks: a Row each, or a Row with a single failed check when the configuration raises."""
    inputs = make_inputs(size, device)
    references, rows = {}, []
    for peer, dtype in plan:
        for needed in {"fp32", dtype} - references.keys():
            references[needed] = reference_results(inputs, device, needed)
        start = time.perf_counter()
        try:
            results = fastgan_results(peer, inputs, device, dtype)
            checks = compare(results, references["fp32"], references[dtype] if dtype != "fp32" else None, dtype)
        except Exception as exc:  # a kernel that does not compile or run here is a finding, not a crash
            checks = [Check("step", f"ran: {bench.error_line(exc)}", math.nan, 0.0)]
        rows.append(Row(peer, dtype, checks))
        log(f"  {peer.name} {dtype}: {'pass' if not rows[-1].failures else 'FAIL'} "
            f"({time.perf_counter() - start:.1f} s)")
    return rows


def _number(value):
    return "" if value is None else f"{value:.1e}"


def parity_tables(rows, size, device):
    """One table per dtype, a row per configuration: in each group the check furthest from passing.
    Its tolerance is in a row of its own under it, or once at the top where every check has the same."""
    lines = ["rel-L2 to the reference (fastgan.nn.reference, same weights and inputs): per group the tensor "
             "furthest from its tolerance; '!' marks a value above it"]
    for dtype in dict.fromkeys(r.dtype for r in rows):
        table = [r for r in rows if r.dtype == dtype]
        if dtype == "fp32":
            title = f"fp32{' (TF32 off)' if device.type == 'cuda' else ''}, the train steps in float64"
        else:
            title = (f"{dtype} autocast, against the fp32/float64 reference above; a tensor's tolerance is "
                     f"{TOLERANCES[dtype]['rel_l2']:.0e} or twice the reference's own error under {dtype} autocast")
        lines += ["", f"{title}; {size}"]
        uniform = len({c.tolerance for r in table for c in r.checks}) == 1
        body = [["tolerance", *(_number(table[0].checks[0].tolerance) for _ in GROUPS), ""]] if uniform else []
        for r in table:
            worst = [r.worst(g) for g in GROUPS]
            failed = dict.fromkeys(c.what if c.what.startswith("ran: ") else c.group for c in r.failures)
            body.append([r.peer.name, *("" if c is None else _number(c.error) + ("" if c.passed else "!")
                                        for c in worst), "pass" if not failed else "FAIL: " + ", ".join(failed)])
            if not uniform:
                body.append(["  tolerance", *(_number(c and c.tolerance) for c in worst), ""])
        lines.append(bench.render_table(["config", *GROUPS, "result"], body))
    return lines


def by_reason(prefix, items, said=()):
    """One line per reason: ``prefix name, name: reason`` for (name, reason) pairs; "as above" for those ``said``."""
    names = {}
    for name, reason in items:
        names.setdefault(reason, []).append(name)
    return [f"{prefix}{', '.join(group)}: {'as above' if reason in said else reason}"
            for reason, group in names.items()]


# ----------------------------------------------------------------------------------------------- speed

def speed_row(name, m):
    """A speed row of the report from a fastgan.perf.bench Measurement."""
    q1, q3 = np.percentile(m.times_ms, [25, 75])
    return dict(peer=name, median_ms=m.median, q1_ms=float(q1), q3_ms=float(q3), first_step_s=m.first_step_s,
                peak_bytes=m.peak_bytes)


def compile_worker():
    """The subprocess that times one torch.compile peer beside eager: job as JSON in argv[1], result on stdout."""
    job = json.loads(sys.argv[1])
    device, config = torch.device(job["device"]), bench.Config(**job["config"])
    result = {}
    for peer in (bench.EAGER, bench.compile_peer(job["mode"])):
        result[peer.name] = speed_row(peer.name, bench.measure(peer, config, device, job["steps"], job["warmup"]))
        bench.release(device)
    print(json.dumps(result))


def time_compile_peer(peer, config, device, steps, warmup, timeout):
    """(speed row, None) of ``peer`` timed in a subprocess within ``timeout`` seconds, or (None, why not)."""
    job = json.dumps(dict(mode=peer.compile_mode, config=dataclasses.asdict(config), device=str(device), steps=steps,
                          warmup=warmup))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen([sys.executable, "-c", f"import {__name__} as m; m.compile_worker()", job], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: inductor's compile workers go with it
        proc.communicate()
        return None, f"did not finish within {timeout:g} s (--compile-timeout)"
    if proc.returncode != 0:
        lines = [line for line in err.splitlines() if line.strip()]
        return None, f"failed: {lines[-1] if lines else f'exit status {proc.returncode}'}"
    result = json.loads(out.strip().splitlines()[-1])
    row = result[peer.name]
    row.update(vs_eager=result["eager"]["median_ms"] / row["median_ms"],
               eager_ms_in_subprocess=result["eager"]["median_ms"])
    return row, None


def speed_problem(peer, config, device, problems):
    return (peer.backend and peer_problem(peer, device, problems)) or bench.problem(peer, config, device)


def measure_speed(peers, config, device, steps, warmup, problems, compile_timeout, log):
    """({peer name: speed row}, [(peer name, why not timed)], [(peer name, error)])."""
    rows, skipped, failed = {}, [], []
    for peer in peers:
        reason = speed_problem(peer, config, device, problems)
        if reason:
            skipped.append((peer.name, reason))
            continue
        start, stopped = time.perf_counter(), None
        if peer.compile_mode is not None:
            row, reason = time_compile_peer(peer, config, device, steps, warmup, compile_timeout)
            if row is None:
                skipped.append((peer.name, reason))
        else:
            measured, errors, stopped = bench.run_peers(
                [peer], device, lambda p: speed_row(p.name, bench.measure(p, config, device, steps, warmup)), log)
            row = measured.get(peer.name)
            failed += [(p.name, line) for p, line in errors]
        if row is not None:
            rows[peer.name] = row
        if stopped:  # the device is unusable (or Ctrl-C): no later peer is timed
            failed.append((peer.name, stopped))
            break
        timed = f"{row['median_ms']:.2f} ms/step" if row else "not timed"
        log(f"  {peer.name}: {timed} ({time.perf_counter() - start:.1f} s)")
    eager = rows.get("eager")
    for row in rows.values():
        row.setdefault("vs_eager", eager and eager["median_ms"] / row["median_ms"])
    return rows, skipped, failed


def speed_table(rows):
    headers = ["implementation", "ms/step", "IQR ms", "vs eager", "peak MiB", "1st step s"]
    return bench.render_table(headers, [
        [name, f"{r['median_ms']:.2f}", f"{r['q3_ms'] - r['q1_ms']:.2f}",
         "-" if r["vs_eager"] is None else f"{r['vs_eager']:.2f}",
         "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}", f"{r['first_step_s']:.2f}"]
        for name, r in rows.items()])


# ----------------------------------------------------------------------------------------------- verdict

def _failure_text(rows):
    worst = [(r.dtype, c) for r in rows for c in r.failures]
    text = ", ".join(f"{dtype} {c.group} {c.what} {c.error:.1e} > {c.tolerance:.1e}" if not c.what.startswith("ran")
                     else f"{dtype} {c.what}" for dtype, c in worst[:3])
    return text + (f" and {len(worst) - 3} more" if len(worst) > 3 else "")


def verdict(peers, rows, parity_skipped, speed, speed_skipped, speed_failed):
    """(the recommended peer or None, its line, {peer name: why not recommended})."""
    why_not, candidates = {}, []
    skipped_whole = {name: reason for name, dtype, reason in parity_skipped if dtype is None}
    not_timed = dict(speed_skipped + speed_failed)
    eager = speed.get("eager")
    for peer in peers:
        mine = [r for r in rows if r.peer == peer]
        reasons = []
        if peer.name in skipped_whole:
            reasons.append(skipped_whole[peer.name])
        elif any(r.failures for r in mine):
            reasons.append(f"parity failed: {_failure_text(mine)}")
        if peer.name in not_timed and not_timed[peer.name] not in reasons:
            reasons.append(f"not timed: {not_timed[peer.name]}")
        elif peer.name in speed and eager is not None:
            timing = speed[peer.name]
            if timing["vs_eager"] <= 1:
                reasons.append(f"slower than eager ({timing['vs_eager']:.2f}x)")
            elif timing["q3_ms"] >= eager["q1_ms"]:
                reasons.append(f"not measurably faster than eager ({timing['vs_eager']:.2f}x, but the interquartile "
                               "ranges of their step times overlap)")
        if reasons:
            why_not[peer.name] = "; ".join(reasons)
        elif peer.name in speed:
            candidates.append(peer)
    best = max(candidates, key=lambda p: speed[p.name]["vs_eager"], default=None)
    if best is None:
        line = ("recommended: eager PyTorch (the reference models): no fastgan configuration passed its checks "
                "and beat eager here")
    else:
        line = (f"recommended: backend={best.backend} level={best.level} cuda_graph={best.cuda_graph}, "
                f"{speed[best.name]['vs_eager']:.2f}x eager")
    return best, line, why_not


# ----------------------------------------------------------------------------------------------- the command

def add_arguments(parser):
    parser.add_argument("--quick", action="store_true", help="skip the torch.compile peers")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the report as JSON to PATH")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--backends", type=bench.comma_list(bench.FASTGAN_BACKENDS),
                        default=list(bench.FASTGAN_BACKENDS), help="fastgan backends to check, comma separated "
                        "(default: all; the extension is built only when cuda is among them)")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help=f"batch size (default {GPU_SIZE.batch} on a GPU, {CPU_SIZE.batch} on a CPU)")
    parser.add_argument("--size", type=positive_int, default=None,
                        help=f"ngf = ndf (default {GPU_SIZE.width} on a GPU, {CPU_SIZE.width} on a CPU)")
    parser.add_argument("--dtype", choices=bench.DTYPES, default="fp32",
                        help="the speed runs' dtype (bf16: autocast and channels_last); correctness checks all")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="timed steps per implementation (default 20 on a GPU, 5 on a CPU)")
    parser.add_argument("--compile-timeout", type=positive_float, default=60.0, metavar="SECONDS",
                        help="time box of each torch.compile peer, compilation included (default 60)")


def _check_json_path(path):
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--json {path}: is a folder; give a file name, e.g. --json {path / 'doctor.json'}")
    if not path.parent.is_dir():
        raise UsageError(f"--json {path}: the folder {path.parent} does not exist; create it or choose another path")
    if not os.access(path.parent, os.W_OK):
        raise UsageError(f"--json {path}: the folder {path.parent} is not writable; choose another path")
    return path


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _row_json(row, size):
    return dict(config=row.peer.name, backend=row.peer.backend, level=row.peer.level, cuda_graph=row.peer.cuda_graph,
                dtype=row.dtype, batch=size.batch, ngf=size.width, ndf=size.width, passed=not row.failures,
                checks=[c._asdict() | {"passed": c.passed} for c in row.checks])


def run(args):
    start = time.perf_counter()
    device = backends.parse_device(args.device)
    json_path = _check_json_path(args.json)
    default = GPU_SIZE if device.type == "cuda" else CPU_SIZE
    size = Size(args.batch or default.batch, args.size or default.width)
    if size.batch < 2:
        raise UsageError(f"--batch {size.batch}: BatchNorm in training mode needs a batch of at least 2")
    steps, warmup = (args.steps or 20, 5) if device.type == "cuda" else (args.steps or 5, 1)

    def log(line=""):
        print(line, flush=True)

    log(f"fastgan doctor: does fastgan give the reference's numbers here, and is it faster? ({device})")
    env = environment(device)
    ext = check_extension() if "cuda" in args.backends else {"status": "not checked",
                                                              "reason": "--backends leaves out cuda"}
    problems = backend_problems(args.backends, device, ext)
    for line in environment_lines(env, ext):
        log(line)

    peers = [p for p in bench.train_step_peers(args.backends, ()) if p.backend is not None]
    plan, parity_skipped = parity_plan(peers, device, problems)
    log(f"\ncorrectness: {len(plan)} configuration x dtype checks, {size}")
    with checking("cuda" in args.backends and "cuda" not in problems):
        rows = check_parity(plan, size, device, log)
    skipped = [(name if dtype is None else f"{name} {dtype}", why) for name, dtype, why in parity_skipped]
    for line in ["", *parity_tables(rows, size, device), *by_reason("skipped ", skipped)]:
        log(line)

    config = bench.Config(size.batch, size.width, size.width, args.dtype)
    speed_peers = [bench.EAGER, *map(bench.compile_peer, () if args.quick else bench.COMPILE_MODES), *peers]
    log(f"\nspeed: train step, {config}, median of {steps} steps after {warmup} warm-up")
    speed, speed_skipped, speed_failed = measure_speed(speed_peers, config, device, steps, warmup, problems,
                                                       args.compile_timeout, log)
    log("\n" + speed_table(speed))
    said = {why for _, why in skipped}
    for line in by_reason("skipped ", speed_skipped, said) + by_reason("FAILED ", speed_failed):
        log(line)
    if args.quick:
        log("--quick: the torch.compile peers were skipped")
    else:
        beside = "; ".join(f"{name}: eager {r['eager_ms_in_subprocess']:.2f} ms/step there" for name, r in speed.items()
                           if "eager_ms_in_subprocess" in r)
        log("each torch.compile peer ran in a subprocess of its own with eager beside it; its 'vs eager' is against "
            "that eager" + (f" ({beside})" if beside else ""))

    best, line, why_not = verdict(peers, rows, parity_skipped, speed, speed_skipped, speed_failed)
    log("\n" + line)
    for text in by_reason("not recommended: ", why_not.items()):
        log(text)
    if device.type != "cuda":
        log("note: this is a CPU.  fastgan's kernels are for NVIDIA GPUs and speed on a CPU is not what fastgan is "
            "for; the correctness checks above are what this run tells you")
    seconds = time.perf_counter() - start
    log(f"doctor took {seconds:.0f} s")

    failed = any(r.failures for r in rows) or bool(speed_failed)
    if json_path is not None:
        report = dict(
            options={k: v for k, v in vars(args).items() if k != "command"}, seconds=seconds, environment=env,
            extension=ext, backend_problems=problems,
            correctness=dict(rows=[_row_json(r, size) for r in rows],
                             skipped=[dict(config=n, dtype=d, reason=why) for n, d, why in parity_skipped]),
            speed=dict(config=dataclasses.asdict(config), steps=steps, warmup=warmup, rows=list(speed.values()),
                       skipped=[dict(peer=n, reason=why) for n, why in speed_skipped],
                       failed=[dict(peer=n, error=why) for n, why in speed_failed]),
            verdict=dict(line=line, passed=not failed, not_recommended=why_not,
                         recommended=best and dict(config=best.name, backend=best.backend, level=best.level,
                                                   cuda_graph=best.cuda_graph)))
        try:
            json_path.write_text(json.dumps(_jsonable(report), indent=1) + "\n")
        except OSError as exc:
            raise UsageError(f"--json {json_path}: cannot write it ({exc.strerror}); choose another path") from None
        log(f"wrote {json_path}")
    return 1 if failed else 0
