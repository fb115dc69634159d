"""Profile a few train steps of the reference and of fastgan with torch.profiler: where the time goes.

For each implementation it prints, per train step: the kernel launches; the device time in each
category (conv/GEMM, BN+elementwise, loss, optimizer, copies, other); the host time to issue the
step; the CPU time spent in launch calls (cudaLaunchKernel, cuLaunchKernel, ...); and the device
busy time. Without a GPU, the CPU self time of the ops takes the place of device time, and leaf
ops the place of kernels. The implementations and options are those of ``bench``. Each run
writes a Chrome trace; open it in https://ui.perfetto.dev.

A kernel's category comes from the ops that launched it (the host op stack at its launch), then
from its own name: everything under an optimizer step is optimizer, everything under a BCE loss
is loss, copies and fills are copies; otherwise the outermost conv/GEMM or BN/elementwise op wins.
"""
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ..usage import writable_folder
from . import bench
from .environment import describe, environment

CATEGORIES = ("conv/GEMM", "BN+elementwise", "loss", "optimizer", "copies", "other")
STEP_MARK = "fastgan.train_step"

HOST_CATS = ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver")
RUNTIME_CATS = ("cuda_runtime", "cuda_driver")
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")

_OWNERS = (  # an op of these anywhere in the stack (or the kernel's name) owns the kernel
    ("optimizer", re.compile(r"optimizer\.|adam|_foreach_|multi_tensor", re.I)),
    ("loss", re.compile(r"binary_?cross_?entropy|sigmoid_?bce", re.I)),
)
_COPY_OP = re.compile(r"aten::(copy_|_to_copy|to|contiguous|clone|fill_|zero_|full|zeros|ones|zeros_like)")
_KINDS = (  # the outermost op that matches decides; the kernel's name is the last resort
    ("conv/GEMM", re.compile(r"conv|gemm|xmma|cutlass|fprop|dgrad|wgrad|(^|::)(mm|addmm|bmm|matmul|linear)$", re.I)),
    ("BN+elementwise", re.compile(r"norm|bn_|channel_stats|relu|tanh|sigmoid|threshold|accumulategrad|elementwise"
                                  r"|reduce|triton_(poi|red|per)_|aten::(add|mul|sub|div|neg|where|clamp|mean|sum)",
                                  re.I)),
)


def categorize(stack, kernel=None, copy=False):
    """The category of a kernel launched under ``stack`` (host op names, outermost first).

    ``kernel`` is its name; ``copy`` marks a memcpy/memset. On CPU, call it with the op's own stack."""
    names = [*stack, kernel] if kernel else list(stack)
    for category, pattern in _OWNERS:
        if any(pattern.search(name) for name in names):
            return category
    if copy or (stack and _COPY_OP.fullmatch(stack[-1])):
        return "copies"
    for name in names:
        for category, pattern in _KINDS:
            if pattern.search(name):
                return category
    return "other"


class _Host(NamedTuple):
    event: dict
    stack: tuple  # names, outermost first, the event's own last
    self_us: float


def host_stacks(events):
    """Each host event with the stack of host events enclosing it on its thread, and its self time."""
    by_thread = defaultdict(list)
    for e in events:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    found = []
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        open_ = []  # [event, end, stack, children_us]
        for e in thread_events:
            while open_ and open_[-1][1] <= e["ts"]:
                found.append(_close(open_.pop()))
            dur = e.get("dur", 0)
            if open_:
                open_[-1][3] += dur
            stack = (open_[-1][2] if open_ else ()) + (e["name"],)
            open_.append([e, e["ts"] + dur, stack, 0.0])
        found += [_close(item) for item in reversed(open_)]
    return found


def _close(item):
    event, _end, stack, children_us = item
    return _Host(event, stack, max(event.get("dur", 0) - children_us, 0.0))


def _union_us(intervals):
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


class Summary(NamedTuple):
    """Per-step figures of one profiled run; times in ms."""
    on_device: bool  # device times (else CPU self times)
    category_ms: dict
    launches: float  # kernels (CPU: leaf ops)
    host_ms: float  # the host's time to issue a step
    launch_api_ms: Optional[float]
    busy_ms: Optional[float]  # device busy (union of kernels and copies)


def summarize(trace, steps):
    """Summary per step of a Chrome trace written by torch.profiler over ``steps`` train steps."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "ts" in e]
    hosts = host_stacks([e for e in events if e.get("cat") in HOST_CATS])
    device = [e for e in events if e.get("cat") in DEVICE_CATS]
    per_step = 1e-3 / steps  # us in total -> ms per step
    step_marks = [h.event["dur"] for h in hosts if h.event["name"] == STEP_MARK]
    host_ms = sum(step_marks) / len(step_marks) * 1e-3 if step_marks else 0.0
    category_us = dict.fromkeys(CATEGORIES, 0.0)
    if device:
        launch_stack = {h.event["args"]["correlation"]: h.stack[:-1] for h in hosts
                        if h.event.get("cat") in RUNTIME_CATS and "correlation" in h.event.get("args", {})}
        for e in device:
            stack = launch_stack.get(e.get("args", {}).get("correlation"), ())
            category = categorize(stack, e["name"], copy=e["cat"] != "kernel")
            category_us[category] += e.get("dur", 0)
        launch_us = sum(e["dur"] for e in events if e.get("cat") in RUNTIME_CATS and "Launch" in e["name"])
        busy_us = _union_us((e["ts"], e["ts"] + e.get("dur", 0)) for e in device)
        kernels = sum(e["cat"] == "kernel" for e in device)
        return Summary(True, {c: v * per_step for c, v in category_us.items()}, kernels / steps, host_ms,
                       launch_us * per_step, busy_us * per_step)
    ops = [h for h in hosts if h.event.get("cat") in ("cpu_op", "user_annotation")]
    for h in ops:
        category_us[categorize(h.stack)] += h.self_us
    leaves = sum(h.event["cat"] == "cpu_op" and h.self_us >= h.event.get("dur", 0) for h in ops)
    return Summary(False, {c: v * per_step for c, v in category_us.items()}, leaves / steps, host_ms, None, None)


def profile_peer(peer, config, device, steps, warmup, trace_path):
    """Run ``peer``'s train step 1 + ``warmup`` times, profile ``steps`` more, write the Chrome trace.

    Returns the :class:`Summary` of the trace."""
    step = bench.make_train_step(peer, config, device)
    for _ in range(1 + warmup):
        step()
    bench.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    # The profiler's own warm-up step absorbs its start-up cost; the trace holds the active steps only.
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=steps, repeat=1)
    with profile(activities=activities, schedule=schedule,
                 on_trace_ready=lambda prof: prof.export_chrome_trace(str(trace_path))) as prof:
        for _ in range(1 + steps):
            with record_function(STEP_MARK):
                step()
            bench.synchronize(device)  # each step starts on an idle device, as in bench
            prof.step()
    with trace_path.open() as f:
        return summarize(json.load(f), steps)


def summary_table(summaries, markdown=False):
    """One column per implementation, one row per figure."""
    names = list(summaries)
    on_device = next(iter(summaries.values())).on_device
    where = "GPU" if on_device else "CPU self"
    rows = [["kernel launches" if on_device else "leaf ops", *(f"{s.launches:.0f}" for s in summaries.values())]]
    rows += [[f"{c} ms ({where})", *(f"{s.category_ms[c]:.3f}" for s in summaries.values())] for c in CATEGORIES]
    rows.append([f"total ms ({where})", *(f"{sum(s.category_ms.values()):.3f}" for s in summaries.values())])
    if on_device:
        rows.append(["GPU busy ms", *(f"{s.busy_ms:.3f}" for s in summaries.values())])
        rows.append(["launch calls ms (CPU)", *(f"{s.launch_api_ms:.3f}" for s in summaries.values())])
    rows.append(["host ms to issue", *(f"{s.host_ms:.3f}" for s in summaries.values())])
    return bench.render_table(["per train step", *names], rows, markdown)


def add_arguments(parser):
    bench.add_common_arguments(parser, steps=5, warmup=3, compile_modes=())
    parser.add_argument("--trace-dir", default="fastgan-traces", help="where the Chrome traces go")


def run(args):
    device, config, peers, skipped = bench.setup(args)
    writable_folder(args.trace_dir, "--trace-dir")
    name, versions = describe(environment(device))
    print(f"fastgan profile {config} on {name}; {versions}; {args.steps} profiled steps after {2 + args.warmup}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    traces = {peer.name: Path(args.trace_dir) / f"{config}-{peer.name}.json" for peer in peers}
    summaries, failed, stopped = bench.run_peers(
        peers, device, lambda peer: profile_peer(peer, config, device, args.steps, args.warmup, traces[peer.name]),
        print)
    notes = [f"trace: {traces[name]}" for name in summaries]
    notes += [f"skipped {peer}: {reason}" for peer, reason in skipped]
    notes += [f"FAILED {peer}: {reason}" for peer, reason in failed]
    notes += [f"STOPPED: {stopped}"] if stopped else []
    if summaries:
        print(summary_table(summaries))
    print("\n".join(notes))
    if args.markdown and summaries:
        body = summary_table(summaries, markdown=True) + "\n\n" + "\n".join(f"- {n}" for n in notes)
        command = bench.command_line(args, bench.COMMON_OPTIONS + ("trace_dir",))
        path = bench.append_markdown(args.markdown, f"profile {config}", device, command, body)
        print(f"appended to {path}")
    if stopped and stopped.startswith("interrupted"):
        return 130
    return 1 if failed or stopped or not summaries else 0
