"""Time one examples/dcgan train step of each implementation side by side, and print the table.

The peers run in this one process, one after another (docs/design.md section 7): "eager", the
reference models of fastgan.reference in eager PyTorch; "compile" and "compile-max-autotune",
torch.compile of the reference G and D in the default and max-autotune modes; and
"fastgan-<backend>", fastgan.DCGAN with the torch, triton or cuda backend; and on a GPU the
fusion plan's step-level peers: "fastgan-triton-graph" (the step as one CUDA graph),
"fastgan-triton-L2" (the fused Triton convolutions) and "fastgan-triton-L3" (both). With --dtype bf16
every peer runs channels_last under bf16 autocast (the reference's nn.BCELoss takes fp32
probabilities, as autocast requires). On CUDA every peer uses torch's fused Adam. The first
step (compilation, cuDNN autotuning) is reported apart; after the warm-up steps, each timed step
starts on an idle device and ends when the device is done (CUDA events). On CPU, torch.compile
uses backend="aot_eager", which needs no C++ toolchain.
"""
import argparse
import datetime
import gc
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import nn

from ..nn import fused_conv, reference
from ..nn.models import DCGAN
from ..nn.plan import FusedStep, plan
from ..nn.step import CapturedStep
from ..ops import backends
from ..usage import UsageError, natural_int, positive_float, positive_int, width_int, writable_folder
from . import flops
from .environment import describe, environment

FASTGAN_BACKENDS = tuple(b for b in backends.BACKENDS if b != "auto")
COMPILE_MODES = ("default", "max-autotune")
DTYPES = ("fp32", "bf16")
DEFAULT_RESULTS = Path("benchmarks") / "RESULTS.md"


@dataclass(frozen=True)
class Config:
    """One benchmark configuration: 64x64 images, nz=100, nc=3."""
    batch: int = 128
    ngf: int = 64
    ndf: int = 64
    dtype: str = "fp32"  # "fp32" | "bf16" (bf16 autocast, channels_last)
    nz: int = 100

    def __str__(self):
        return f"b{self.batch}-g{self.ngf}-d{self.ndf}-{self.dtype}"

    @property
    def autocast_dtype(self):
        return torch.bfloat16 if self.dtype == "bf16" else None

    @property
    def memory_format(self):
        return torch.channels_last if self.dtype == "bf16" else torch.contiguous_format


class Peer(NamedTuple):
    name: str
    compile_mode: Optional[str] = None  # torch.compile mode of the reference
    backend: Optional[str] = None  # fastgan backend; None for the reference models
    level: str = "L1"  # fastgan fusion level: "L2" runs the Triton convolutions of fastgan.fused_conv
    cuda_graph: bool = False  # fastgan's train step captured in one CUDA graph (fastgan.step)

    def __str__(self):
        return self.name


EAGER = Peer("eager")


def compile_peer(mode):
    return Peer("compile" if mode == "default" else f"compile-{mode}", compile_mode=mode)


def fastgan_peer(backend, level="L1", cuda_graph=False):
    """fastgan-<backend>; -graph for the CUDA-graph step, and -L2 / -L3 (L2 + graph) for the fused convolutions."""
    suffix = {("L1", False): "", ("L1", True): "-graph", ("L2", False): "-L2", ("L2", True): "-L3"}[level, cuda_graph]
    return Peer(f"fastgan-{backend}{suffix}", backend=backend, level=level, cuda_graph=cuda_graph)


def fusion_peers(fastgan_backends=FASTGAN_BACKENDS):
    """The step-level peers of the fusion plan (docs/design.md section 5), on the triton backend."""
    if "triton" not in fastgan_backends:
        return []
    return [fastgan_peer("triton", cuda_graph=True), fastgan_peer("triton", "L2"),
            fastgan_peer("triton", "L2", cuda_graph=True)]


def train_step_peers(fastgan_backends=FASTGAN_BACKENDS, compile_modes=COMPILE_MODES):
    return [EAGER, *map(compile_peer, compile_modes), *map(fastgan_peer, fastgan_backends),
            *fusion_peers(fastgan_backends)]


def problem(peer, config, device):
    """Why ``peer`` cannot run ``config`` on ``device``, or None when it can."""
    if peer.compile_mode == "max-autotune" and device.type != "cuda":
        return "mode='max-autotune' tunes GPU kernels: needs CUDA"
    if (peer.cuda_graph or peer.level != "L1") and device.type != "cuda":
        return "CUDA graphs and the L2 convolutions are GPU paths (their correctness is tested on CPU in tests/)"
    if peer.backend is not None:
        try:
            backends.resolve(peer.backend, device)
        except backends.BackendUnavailable as exc:
            return str(exc)
        if peer.backend == "triton" and device.type == "cpu" and config.dtype == "bf16":
            return "the Triton interpreter (CPU) does not handle bf16"
    return None


class Autocast(nn.Module):
    """``module`` run under autocast; ``fp32_output`` returns fp32 (nn.BCELoss refuses autocast)."""

    def __init__(self, module, dtype, fp32_output=False):
        super().__init__()
        self.module, self.dtype, self.fp32_output = module, dtype, fp32_output

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=self.dtype):
            y = self.module(x)
        return y.float() if self.fp32_output else y


def reference_networks(config, device, seed=0):
    """The reference (G, D), seeded, on ``device`` in the config's memory format."""
    torch.manual_seed(seed)
    g = reference.Generator(config.nz, config.ngf).to(device, memory_format=config.memory_format)
    d = reference.Discriminator(ndf=config.ndf).to(device, memory_format=config.memory_format)
    return g, d


def fastgan_model(backend, config, device, seed=0):
    """fastgan.DCGAN with ``backend``, seeded like :func:`reference_networks` (same initial weights)."""
    torch.manual_seed(seed)
    gan = DCGAN(config.nz, config.ngf, config.ndf, backend=backend)
    return gan.to(device, memory_format=config.memory_format)


def for_peer(module, peer, config, device, fp32_output=False):
    """``module`` as ``peer`` runs it: under autocast for bf16, then compiled for compile peers.

    Compiling resets torch._dynamo first, so that earlier configurations neither use up the
    recompile limit nor turn on dynamic shapes; peers are built and run one at a time."""
    if config.autocast_dtype is not None:
        module = Autocast(module, config.autocast_dtype, fp32_output)
    if peer.compile_mode is None:
        return module
    torch._dynamo.reset()
    mode = None if peer.compile_mode == "default" else peer.compile_mode
    return torch.compile(module, mode=mode, dynamic=False,
                         backend="inductor" if device.type == "cuda" else "aot_eager")


def optimizer_kwargs(device):
    return {"fused": True} if device.type == "cuda" else {}


def sample_batch(config, device):
    """Fixed random (real images in [-1, 1], noise): timing needs no dataset."""
    real = torch.rand(config.batch, 3, 64, 64, device=device).mul_(2).sub_(1)
    noise = torch.randn(config.batch, config.nz, 1, 1, device=device)
    return real.contiguous(memory_format=config.memory_format), noise


def make_train_step(peer, config, device, seed=0):
    """A no-argument callable that runs one train step of ``peer``: D on real, D on G(z).detach(),
    D on G(z), both Adam updates (reference.train_step; for fastgan peers DCGAN.train_step, and for the graph
    peers the DCGAN's TrainStep as an unguarded CapturedStep, as fastgan train runs it: the library's per-call
    guard is host time between the timing events).  Its first call compiles, for compile peers."""
    real, noise = sample_batch(config, device)
    if peer.backend is not None:
        gan = fastgan_model(peer.backend, config, device, seed)
        fused_conv.set_level(gan, peer.level)
        capturable = {"capturable": True} if peer.cuda_graph else {}
        opt_g, opt_d = reference.make_optimizers(gan.generator, gan.discriminator, **optimizer_kwargs(device),
                                                 **capturable)
        amp = config.autocast_dtype
        captured = CapturedStep(gan.step_for(opt_g, opt_d), guard=False) if peer.cuda_graph else None

        def fastgan_step():
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                if captured is not None:
                    return captured(real, noise)
                return gan.train_step(real, opt_g, opt_d, noise=noise)

        return fastgan_step
    g, d = reference_networks(config, device, seed)
    opt_g, opt_d = reference.make_optimizers(g, d, **optimizer_kwargs(device))
    run_g, run_d = for_peer(g, peer, config, device), for_peer(d, peer, config, device, fp32_output=True)
    cudagraphs = peer.compile_mode == "max-autotune"

    def reference_step():
        if cudagraphs:  # a new iteration: CUDA-graph outputs of the previous step may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        return reference.train_step(run_g, run_d, real, noise, opt_g, opt_d)

    return reference_step


class FusedLayer(NamedTuple):
    """The BN/activation part of one conv -> BN? -> act step of the reference DCGAN."""
    name: str  # G1..G5, D1..D4, in forward order
    shape: tuple  # the conv output, the fused op's input
    normalize: bool
    act: str
    slope: float


def fused_layers(config):
    """The fused BN+activation ops of a DCGAN train step with ``config``, with their input shapes."""
    nets = dict(zip("GD", flops.dcgan_networks(config.ngf, config.ndf, config.nz)))
    shape_in = {"G": (config.batch, config.nz, 1, 1), "D": (config.batch, 3, 64, 64)}
    found = []
    for prefix, net in nets.items():
        shapes = {layer.name: layer.output_shape for layer in flops.gemm_layers(net, shape_in[prefix])}
        steps = [s for s in plan(list(net.main.named_children())) if isinstance(s, FusedStep)]
        for i, step in enumerate(steps, 1):
            found.append(FusedLayer(f"{prefix}{i}", shapes[f"main.{step.conv}"], step.bn is not None, step.act,
                                    step.slope))
    return found


def device_timer():
    """time.perf_counter() once the queued CUDA work is done: a pytest-benchmark timer for device time."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn, device, steps):
    """Milliseconds of each of ``steps`` calls of fn, each started on an idle device (CUDA events on CUDA)."""
    if device.type != "cuda":
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return times
    events = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def matmul_tflops(device, dtype, size=None, reps=10):
    """Best TFLOP/s of a square matmul in ``dtype`` (fp32 as TF32 when cuDNN convs use TF32):
    the measured roof that the analytic floor is computed against."""
    size = size or (8192 if device.type == "cuda" else 512)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    try:
        torch.mm(a, b)
        best_ms = min(time_steps(lambda: torch.mm(a, b), device, reps))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return 2 * size**3 / (best_ms * 1e-3) / 1e12


def progress_bar(total, desc):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=None, leave=False)


class Measurement(NamedTuple):
    peer: Peer
    times_ms: list
    first_step_s: float  # compile (for compile peers) and the first step
    peak_bytes: Optional[int]  # the most allocated during the timed steps
    reserved_bytes: Optional[int]  # the most the caching allocator held, first step on (graph pools too)

    @property
    def median(self):
        return float(np.median(self.times_ms))

    @property
    def iqr(self):
        q1, q3 = np.percentile(self.times_ms, [25, 75])
        return float(q3 - q1)


def measure(peer, config, device, steps, warmup, bar=None):
    """Build ``peer``, run its first step (timed apart) and ``warmup`` more, then time ``steps`` steps."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = make_train_step(peer, config, device)
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    first_step_s = time.perf_counter() - start
    for _ in range(warmup):
        step()
        if bar is not None:
            bar.update()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_steps(step, device, steps)
    cuda = device.type == "cuda"
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    if bar is not None:
        bar.update(1 + steps)
    return Measurement(peer, times, first_step_s, peak, torch.cuda.max_memory_reserved(device) if cuda else None)


def release(device):
    """Free the last peer's models, compiled code and cached CUDA blocks before the next peer runs."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_peers(peers, device, measure_one, log):
    """``measure_one(peer)`` for each peer in turn, each followed by release(device).  Returns ({peer name:
    result}, [(peer, error line)], why the round stopped early or None).  A failing peer does not hide the
    others; Ctrl-C (a time box running out, say) or a device left unusable ends the round with what it has."""
    results, failed = {}, []
    for i, peer in enumerate(peers):
        try:
            results[peer.name] = measure_one(peer)
        except KeyboardInterrupt:
            return results, failed, f"interrupted during {peer}; not measured: " + ", ".join(p.name for p in peers[i:])
        except Exception as exc:  # a compile error, out of memory, a kernel fault
            failed.append((peer, error_line(exc)))
            log(f"{peer}: FAILED {failed[-1][1]}")
        try:
            release(device)
        except RuntimeError as exc:  # a sticky CUDA error: every later peer would fail the same way
            rest = ", ".join(p.name for p in peers[i + 1:]) or "none"
            return results, failed, f"the device is unusable after {peer} ({error_line(exc)}); not measured: {rest}"
    return results, failed, None


def error_line(exc):
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"


def speedup(baseline, median):
    return None if baseline is None or not median else baseline / median


def add_speedups(output_json):
    """pytest-benchmark JSON: give each benchmark the speedup of its group's "eager" and "compile" peers over it."""
    groups = {}
    for bench in output_json.get("benchmarks", []):
        groups.setdefault(bench.get("group"), []).append(bench)
    for members in groups.values():
        medians = {b["extra_info"].get("peer"): b["stats"]["median"] for b in members if b.get("stats")}
        for bench in members:
            median = bench["stats"]["median"] if bench.get("stats") else None
            info = bench["extra_info"]
            for baseline in ("eager", "compile"):
                ratio = speedup(medians.get(baseline), median)
                if ratio is not None:
                    info[f"speedup_over_{baseline}"] = round(ratio, 4)
            if "flop" in info and median:
                info["tflops"] = round(info["flop"] / median / 1e12, 4)
    return output_json


def render_table(headers, rows, markdown=False):
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in cells]
        lines.insert(1, "|" + "|".join("---" for _ in headers) + "|")
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)


def command_line(args, names):
    """The ``python -m fastgan`` command that reproduces ``args`` (every option spelled out)."""
    words = ["python", "-m", "fastgan", args.command]
    for name in names:
        value = getattr(args, name)
        if isinstance(value, list):
            value = ",".join(value) or "none"
        if value is not None:
            words += [f"--{name.replace('_', '-')}", str(value)]
    return shlex.join(words)


def append_markdown(path, title, device, command, body):
    """Append a dated block (device, versions, command, body) to a markdown file."""
    name, versions = describe(environment(device))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = (f"\n### {title}, {stamp}\n\n- device: {name}\n- versions: {versions}\n"
             f"- command: `{command}`\n\n{body}\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(block)
    return path


def comma_list(allowed):
    """An argparse type: a comma separated subset of ``allowed``, or "none"."""
    def parse(text):
        items = [] if text in ("", "none") else [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}: choose from {', '.join(allowed)}, comma separated, "
                                             f"or 'none'")
        return items
    return parse


COMMON_OPTIONS = ("batch", "ngf", "ndf", "dtype", "backends", "compile_modes", "steps", "warmup", "device")


def add_common_arguments(parser, steps, warmup, compile_modes):
    parser.add_argument("--batch", type=int, default=128, help="2 or more (BatchNorm in training mode)")
    parser.add_argument("--ngf", type=width_int, default=64)
    parser.add_argument("--ndf", type=width_int, default=64)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="bf16: autocast and channels_last")
    parser.add_argument("--backends", type=comma_list(FASTGAN_BACKENDS), default=list(FASTGAN_BACKENDS),
                        help="fastgan backends to run, comma separated (default: all; unavailable ones are listed)")
    parser.add_argument("--compile-modes", type=comma_list(COMPILE_MODES), default=list(compile_modes),
                        help="torch.compile modes of the reference to run, comma separated, or 'none'")
    parser.add_argument("--steps", type=positive_int, default=steps, help="timed steps per implementation")
    parser.add_argument("--warmup", type=natural_int, default=warmup, help="steps run after the first one, untimed")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--markdown", nargs="?", const=str(DEFAULT_RESULTS), default=None, metavar="PATH",
                        help=f"append a dated block with the table to PATH (default {DEFAULT_RESULTS})")


def setup(args):
    """(device, config, peers, skipped) from the common arguments."""
    if args.batch < 2:
        raise UsageError(f"--batch must be at least 2 (BatchNorm in training mode), got {args.batch}")
    device = backends.parse_device(args.device)
    if args.markdown:
        if Path(args.markdown).is_dir():
            raise UsageError(f"--markdown {args.markdown} is a folder; give the markdown file to append to")
        writable_folder(str(Path(args.markdown).absolute().parent), f"the folder of --markdown {args.markdown}:")
    args.device = str(device)  # the recorded command names the device it ran on
    config = Config(args.batch, args.ngf, args.ndf, args.dtype)
    peers, skipped = [], []
    for peer in train_step_peers(args.backends, args.compile_modes):
        reason = problem(peer, config, device)
        (skipped.append((peer, reason)) if reason else peers.append(peer))
    return device, config, peers, skipped


def add_arguments(parser):
    add_common_arguments(parser, steps=50, warmup=10, compile_modes=COMPILE_MODES)
    parser.add_argument("--peak-tflops", type=positive_float, default=None,
                        help="the device's roof in TFLOP/s for the floor (default: measured with a matmul)")


def _fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def run(args):
    device, config, peers, skipped = setup(args)
    if device.type == "cuda":  # CUDA events and graph captures use the current device
        torch.cuda.set_device(device)
    step_flops = flops.dcgan_step_flops(config.batch, config.ngf, config.ndf, config.nz)
    lean_flops = flops.dcgan_step_flops(config.batch, config.ngf, config.ndf, config.nz,
                                        d_weight_grads_in_g_step=False)
    dtype = torch.bfloat16 if config.dtype == "bf16" else torch.float32
    roof = args.peak_tflops or matmul_tflops(device, dtype)
    floor_ms = step_flops.total / (roof * 1e12) * 1e3
    tf32 = device.type == "cuda" and dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    roof_kind = "given" if args.peak_tflops else f"measured {'TF32' if tf32 else config.dtype} matmul"
    floor_line = (f"floor: {step_flops.total / 1e9:.4g} GFLOP/step ({lean_flops.total / 1e9:.4g} without D "
                  f"weight-grads in the G step) at a roof of {roof:.3g} TFLOP/s ({roof_kind}) = {floor_ms:.3f} ms")
    name, versions = describe(environment(device))
    print(f"fastgan bench {config} on {name}; {versions}")
    print(floor_line)

    bar = progress_bar(len(peers) * (1 + args.warmup + args.steps), "bench")
    def measure_one(peer):
        bar.set_postfix_str(peer.name)
        m = measure(peer, config, device, args.steps, args.warmup, bar)
        bar.write(f"{peer}: {m.median:.3f} ms/step, first step {m.first_step_s:.2f} s")
        return m

    measured, failed, stopped = run_peers(peers, device, measure_one, bar.write)
    results = list(measured.values())
    bar.close()

    medians = {m.peer.name: m.median for m in results}
    headers = ["implementation", "ms/step", "IQR ms", "vs eager", "vs compile", "peak MiB", "reserved MiB",
               "TFLOP/s", "% floor", "1st step s"]
    rows = [[m.peer.name, f"{m.median:.3f}", f"{m.iqr:.3f}",
             _fmt(speedup(medians.get("eager"), m.median), ".2f"),
             _fmt(speedup(medians.get("compile"), m.median), ".2f"),
             _fmt(m.peak_bytes and m.peak_bytes / 2**20, ".0f"),
             _fmt(m.reserved_bytes and m.reserved_bytes / 2**20, ".0f"),
             f"{step_flops.total / (m.median * 1e-3) / 1e12:.3g}", f"{100 * floor_ms / m.median:.1f}",
             f"{m.first_step_s:.2f}"] for m in results]
    notes = [f"{args.steps} timed steps after {args.warmup} warm-up steps; median and interquartile range. "
             f"TFLOP/s counts the reference step's {step_flops.total / 1e9:.4g} GFLOP for every row; "
             f"% floor = {floor_ms:.3f} ms / ms per step. "
             f"Adam: {'fused' if device.type == 'cuda' else 'foreach'}, all peers. "
             "peak MiB: the most allocated in the timed steps; reserved MiB: the most the caching allocator held "
             "from the peer's first step (a CUDA graph's private pool counts only there; so does compile's "
             "autotuning)."]
    notes += [f"skipped {peer}: {reason}" for peer, reason in skipped]
    notes += [f"FAILED {peer}: {reason}" for peer, reason in failed]
    notes += [f"STOPPED: {stopped}"] if stopped else []
    print(render_table(headers, rows))
    print("\n".join(notes))
    if args.markdown:
        body = (floor_line + "\n\n" + render_table(headers, rows, markdown=True) + "\n\n"
                + "\n".join(f"- {n}" for n in notes))
        command = command_line(args, COMMON_OPTIONS + ("peak_tflops",))
        path = append_markdown(args.markdown, f"bench {config}", device, command, body)
        print(f"appended to {path}")
    if stopped and stopped.startswith("interrupted"):
        return 130
    return 1 if failed or stopped or not results else 0

