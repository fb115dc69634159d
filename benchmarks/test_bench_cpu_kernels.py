"""The extension's CPU kernels (backend="cuda" on CPU tensors) against eager PyTorch, peers interleaved.

- Train step: the examples/dcgan reference step ("eager"), fastgan.DCGAN with backend="torch" and with
  backend="cuda", fp32 NCHW, at b16-g16-d16 and b64-g32-d32 (the convolutions are torch's in all three).
- batch_norm_act, forward and forward+backward, at the shape of every fused layer of those steps (G1..G5,
  D1..D4), NCHW and channels_last: the torch composite (backend="torch") against backend="cuda".

One benchmark per case; each of its rounds calls every peer once (the same number of times in the per-op
cases, so that a sample lasts a few milliseconds), the peers' order rotating from round to round, so that the
load of a shared machine falls on them alike.  extra_info gets each peer's median (ms per call) and ``ratio``, the
eager (or torch) median over the cuda one: above 1 means the extension is faster.  pytest-benchmark's own
statistics are of a whole round.

    python -m pytest benchmarks/test_bench_cpu_kernels.py --benchmark-enable -s   (prints a line per case)

In --benchmark-disable mode (CI) each case runs one round at batch 2.
"""
import time

import numpy as np
import pytest
import torch

from fastgan.ops import extension, functional
from fastgan.perf import bench

CONFIGS = [bench.Config(16, 16, 16), bench.Config(64, 32, 32)]
SMOKE = bench.Config(2, 4, 4)
ROUNDS, WARMUP = 15, 2
SAMPLE_S = 2e-3  # per-op samples repeat the call to last about this long
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def full(request):
    """Measuring (True), or a --benchmark-disable smoke run (False)."""
    return not request.config.option.benchmark_disable


@pytest.fixture(autouse=True)
def extension_built():
    problem = extension.extension_problem(CPU)
    if problem:
        pytest.skip(problem)


def _warm_up(peers, full):
    """WARMUP calls of each peer; then the calls per sample that make the slowest peer's last about SAMPLE_S."""
    if not full:
        return 1
    for _ in range(WARMUP):
        for fn in peers.values():
            fn()
    slowest = 0.0
    for fn in peers.values():
        start = time.perf_counter()
        fn()
        slowest = max(slowest, time.perf_counter() - start)
    return max(1, round(SAMPLE_S / slowest))


def interleaved(benchmark, peers, rounds, repeats=1):
    """Times ``peers`` ({name: fn}) round robin; returns {name: median ms per call}, also in extra_info."""
    times = {name: [] for name in peers}
    names = list(peers)
    done = [0]

    def one_round():
        first = done[0] % len(names)
        for name in names[first:] + names[:first]:
            start = time.perf_counter()
            for _ in range(repeats):
                peers[name]()
            times[name].append(1e3 * (time.perf_counter() - start) / repeats)
        done[0] += 1

    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=0, iterations=1)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    benchmark.extra_info.update(rounds=rounds, repeats=repeats, **{f"{k}_ms": round(v, 4) for k, v in medians.items()})
    return medians


def _report(benchmark, case, medians, baseline):
    ratio = medians[baseline] / medians["cuda"]
    benchmark.extra_info["ratio"] = round(ratio, 3)
    print(f"\n{case}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in medians.items()) + f"; {baseline}/cuda {ratio:.2f}x")


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_train_step(benchmark, full, config):
    config = config if full else SMOKE
    peers = {"eager": bench.make_train_step(bench.EAGER, config, CPU),
             "torch": bench.make_train_step(bench.fastgan_peer("torch"), config, CPU),
             "cuda": bench.make_train_step(bench.fastgan_peer("cuda"), config, CPU)}
    _warm_up(peers, full)
    benchmark.group = f"cpu train_step {config}"
    _report(benchmark, f"train step {config}", interleaved(benchmark, peers, ROUNDS if full else 1), "eager")


def _op(layer, memory_format, backend, pass_):
    gen = torch.Generator().manual_seed(0)
    channels = layer.shape[1]
    z = torch.randn(layer.shape, generator=gen).contiguous(memory_format=memory_format).requires_grad_()
    inputs, bn = [z], {}
    if layer.normalize:
        weight = (1 + 0.02 * torch.randn(channels, generator=gen)).requires_grad_()
        bias = (0.1 * torch.randn(channels, generator=gen)).requires_grad_()
        bn = dict(weight=weight, bias=bias, running_mean=torch.zeros(channels), running_var=torch.ones(channels))
        inputs += [weight, bias]
    dy = torch.randn(layer.shape, generator=gen).contiguous(memory_format=memory_format)

    def forward():
        return functional.batch_norm_act(z, **bn, normalize=layer.normalize, act=layer.act, slope=layer.slope,
                                         backend=backend)

    if pass_ == "forward":
        return forward
    return lambda: torch.autograd.grad(forward(), inputs, dy)


LAYERS = [(config, layer.name) for config in CONFIGS for layer in bench.fused_layers(config)]


@pytest.mark.parametrize("pass_", ["forward", "forward+backward"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("config,layer_name", LAYERS, ids=[f"{c}-{n}" for c, n in LAYERS])
def test_batch_norm_act(benchmark, full, config, layer_name, layout, pass_):
    config = config if full else SMOKE
    layer = next(layer for layer in bench.fused_layers(config) if layer.name == layer_name)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    peers = {backend: _op(layer, memory_format, backend, pass_) for backend in ("torch", "cuda")}
    repeats = _warm_up(peers, full)
    benchmark.group = f"cpu bn_act {config} {layer.name} {layout} {pass_}"
    benchmark.extra_info.update(shape=list(layer.shape), act=layer.act, normalize=layer.normalize)
    medians = interleaved(benchmark, peers, ROUNDS if full else 1, repeats)
    _report(benchmark, f"bn_act {config} {layer.name} {tuple(layer.shape)} {layout} {pass_}", medians, "torch")
