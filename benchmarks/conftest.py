"""pytest-benchmark suites: fastgan beside its peers, protocol of docs/design.md section 7.

On a GPU every configuration runs, timed by a timer that waits for the device (fastgan.bench.
device_timer), after a timed first call (compilation, reported as extra_info["first_call_s"]) and
a warm-up. Each group holds the peers of one configuration, so pytest-benchmark prints their
ratios, and the JSON gets each benchmark's speedup over the group's eager and compile peers.

Without CUDA this is a smoke test: benchmarks run in --benchmark-disable mode (once each, forced
here unless --benchmark-enable is given), at batch 2, ngf=ndf=4; Triton runs in its interpreter;
torch.compile uses backend="aot_eager"; bf16, max-autotune and the full-size configurations skip.
"""
import os
import time

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest  # noqa: E402

from fastgan.perf import bench  # noqa: E402
from fastgan.perf.environment import describe, environment  # noqa: E402

WARMUP_CALLS = 5
GPU_ONLY = "needs CUDA (without it the smoke size b2-g4-d4 runs instead)"
BF16_GPU_ONLY = "bf16 benchmarks need CUDA (and the Triton interpreter has no bf16)"


def _params(gpu_configs, smoke_configs, name=str):
    """pytest params: the GPU grid (skipped without CUDA), plus the smoke configs without CUDA."""
    if HAS_CUDA:
        return [pytest.param(c, id=name(c)) for c in gpu_configs]
    return ([pytest.param(c, id=name(c), marks=pytest.mark.skip(reason=GPU_ONLY)) for c in gpu_configs]
            + [pytest.param(c, id=name(c), marks=pytest.mark.skip(reason=BF16_GPU_ONLY) if c.dtype == "bf16" else ())
               for c in smoke_configs])


def _grid(batches, sizes):
    return [bench.Config(b, s, s, dtype) for dtype in bench.DTYPES for s in sizes for b in batches]


SMOKE = _grid([2], [4])
STEP_CONFIGS = _params(_grid([64, 128], [64, 128]), SMOKE)
OP_CONFIGS = _params(_grid([128], [64, 128]), SMOKE)
LOSS_CONFIGS = _params(_grid([64, 128], [64]), SMOKE, name=lambda c: f"b{c.batch}-{c.dtype}")


@pytest.fixture(params=STEP_CONFIGS)
def step_config(request):
    """Train-step and whole-network configurations: batch 64/128, ngf=ndf 64/128, fp32/bf16."""
    return request.param


@pytest.fixture(params=OP_CONFIGS)
def op_config(request):
    """Fused-op configurations: the activations of a batch-128 step, ngf=ndf 64/128, fp32/bf16."""
    return request.param


@pytest.fixture(params=LOSS_CONFIGS)
def loss_config(request):
    return request.param


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def release_memory(device):
    """On CUDA, free each benchmark's models, compiled code and cached blocks before the next one."""
    yield
    if device.type == "cuda":
        bench.release(device)


@pytest.fixture
def run_benchmark(benchmark, device):
    """run_benchmark(fn, group, peer, **extra_info): time fn in ``group`` as ``peer``.

    With timing on: a first call timed apart (compilation), WARMUP_CALLS more, then
    pytest-benchmark's rounds; peak CUDA memory over the rounds goes into extra_info["peak_mib"].
    In --benchmark-disable mode fn runs once."""

    def run(fn, group, peer, **extra_info):
        benchmark.group = group
        benchmark.extra_info.update(peer=peer.name, **extra_info)
        if benchmark.enabled:
            bench.synchronize(device)
            start = time.perf_counter()
            fn()
            bench.synchronize(device)
            benchmark.extra_info["first_call_s"] = round(time.perf_counter() - start, 4)
            for _ in range(WARMUP_CALLS):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
        result = benchmark(fn)
        if benchmark.enabled and device.type == "cuda":
            benchmark.extra_info["peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        return result

    return run


def pytest_configure(config):
    if not HAS_CUDA and not config.getoption("benchmark_enable"):
        config.option.benchmark_disable = True
        session = getattr(config, "_benchmarksession", None)  # already made when pytest-benchmark configured first
        if session is not None:
            session.disabled = True


def pytest_benchmark_update_machine_info(config, machine_info):
    name, versions = describe(environment(torch.device("cuda" if HAS_CUDA else "cpu")))
    machine_info["fastgan_device"] = name
    machine_info["fastgan_versions"] = versions


def pytest_benchmark_update_json(config, benchmarks, output_json):
    bench.add_speedups(output_json)
