"""python -m fastgan bench / profile end to end on CPU at tiny sizes, and the helpers behind them."""
import json

import pytest
import torch

from fastgan import cli
from fastgan.perf import bench, profiling

TINY = ["--batch", "2", "--ngf", "4", "--ndf", "4", "--device", "cpu"]


def _row(out, name):
    return next(line.split() for line in out.splitlines() if line.split()[:1] == [name])


def test_bench_cpu_end_to_end(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    code = cli.main(["bench", *TINY, "--steps", "2", "--warmup", "0", "--backends", "torch",
                     "--compile-modes", "default,max-autotune", "--markdown", str(results)])
    out = capsys.readouterr().out
    assert code == 0, out
    eager, compiled, fast = _row(out, "eager"), _row(out, "compile"), _row(out, "fastgan-torch")
    # columns: name, ms, IQR, vs eager, vs compile, peak MiB, reserved MiB, TFLOP/s, % floor, first step s
    assert eager[3] == "1.00" and compiled[4] == "1.00"
    for row in (eager, compiled, fast):
        ms, vs_eager, tflops = float(row[1]), float(row[3]), float(row[7])
        assert ms > 0 and vs_eager > 0 and tflops > 0
        assert row[5] == row[6] == "-"  # no CUDA memory statistics on CPU
        assert vs_eager == pytest.approx(float(eager[1]) / ms, rel=0.02, abs=0.006)
    assert "skipped compile-max-autotune: mode='max-autotune' tunes GPU kernels: needs CUDA" in out
    assert f"floor: {bench.flops.dcgan_step_flops(2, 4, 4).total / 1e9:.4g} GFLOP/step" in out
    block = results.read_text()
    assert "### bench b2-g4-d4-fp32, " in block and "UTC" in block
    assert ("`python -m fastgan bench --batch 2 --ngf 4 --ndf 4 --dtype fp32 --backends torch "
            "--compile-modes default,max-autotune --steps 2 --warmup 0 --device cpu`") in block
    assert "| fastgan-torch |" in block and f"torch {torch.__version__}" in block


@pytest.mark.parametrize("argv, message", [
    (["--batch", "1"], "fastgan bench: error: --batch must be at least 2 (BatchNorm in training mode), got 1"),
    (["--steps", "0"], "fastgan bench: error: argument --steps: expected an integer >= 1, got 0"),
    (["--warmup", "-1"], "fastgan bench: error: argument --warmup: expected an integer >= 0, got -1"),
])
def test_bench_rejects_bad_sizes(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", *TINY, *argv])
    assert message in f"{info.value.code}{capsys.readouterr().err}"


def test_bench_rejects_unknown_backend(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", *TINY, "--backends", "torch,tpu"])
    assert "unknown ['tpu']: choose from torch, triton, cuda, comma separated" in capsys.readouterr().err


@pytest.mark.interpreter  # the triton peer's reason on the CPU is bf16's, not the interpreter's
def test_problem_names_the_reason():
    cpu = torch.device("cpu")
    assert "needs CUDA" in bench.problem(bench.compile_peer("max-autotune"), bench.Config(), cpu)
    assert bench.problem(bench.compile_peer("default"), bench.Config(), cpu) is None
    assert bench.problem(bench.EAGER, bench.Config(dtype="bf16"), cpu) is None
    assert "bf16" in bench.problem(bench.fastgan_peer("triton"), bench.Config(dtype="bf16"), cpu)


def test_fused_layers_are_the_dcgan_activations():
    layers = {layer.name: layer for layer in bench.fused_layers(bench.Config(batch=128, ngf=64, ndf=128))}
    assert list(layers) == ["G1", "G2", "G3", "G4", "G5", "D1", "D2", "D3", "D4"]
    assert layers["G1"] == ("G1", (128, 512, 4, 4), True, "relu", 0.0)
    assert layers["G4"].shape == (128, 64, 32, 32)
    assert layers["G5"][1:] == ((128, 3, 64, 64), False, "tanh", 0.0)
    assert layers["D1"][1:] == ((128, 128, 32, 32), False, "leaky_relu", 0.2)
    assert layers["D4"][1:] == ((128, 1024, 4, 4), True, "leaky_relu", 0.2)


def test_add_speedups_per_group():
    def entry(group, peer, median, **info):
        return {"group": group, "stats": {"median": median}, "extra_info": {"peer": peer, **info}}

    data = {"benchmarks": [entry("a", "eager", 4.0), entry("a", "compile", 2.0), entry("a", "fastgan-triton", 1.0,
                                                                                       flop=3e12),
                           entry("b", "fastgan-torch", 5.0)]}
    bench.add_speedups(data)
    a_eager, a_compile, a_fast, b_fast = (b["extra_info"] for b in data["benchmarks"])
    assert a_fast == {"peer": "fastgan-triton", "flop": 3e12, "speedup_over_eager": 4.0, "speedup_over_compile": 2.0,
                      "tflops": 3.0}
    assert a_eager["speedup_over_eager"] == 1.0 and a_eager["speedup_over_compile"] == 0.5
    assert a_compile["speedup_over_compile"] == 1.0
    assert b_fast == {"peer": "fastgan-torch"}  # no baseline in its group


def test_profile_cpu_end_to_end(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    code = cli.main(["profile", *TINY, "--steps", "2", "--warmup", "0", "--backends", "torch",
                     "--trace-dir", str(tmp_path / "traces"), "--markdown", str(results)])
    out = capsys.readouterr().out
    assert code == 0, out
    header = next(line.split() for line in out.splitlines() if line.startswith("per train step"))
    assert header[3:] == ["eager", "fastgan-torch"]
    for category in ("conv/GEMM", "BN+elementwise", "loss", "optimizer"):
        row = _row(out, category)
        assert all(float(v) > 0 for v in row[-2:]), row  # every step does some of each
    leaf_ops = _row(out, "leaf")
    assert all(float(v) > 10 for v in leaf_ops[-2:])
    for peer in ("eager", "fastgan-torch"):
        trace = json.loads((tmp_path / "traces" / f"b2-g4-d4-fp32-{peer}.json").read_text())
        assert sum(e["name"] == profiling.STEP_MARK for e in trace["traceEvents"]) == 2
    assert "### profile b2-g4-d4-fp32" in results.read_text()


@pytest.mark.parametrize("stack, kernel, category", [
    (("aten::conv2d", "aten::convolution", "aten::cudnn_convolution"), "sm90_xmma_fprop_implicit_gemm", "conv/GEMM"),
    (("autograd::engine::evaluate_function: ConvolutionBackward0", "aten::convolution_backward"), "wgrad_alg1",
     "conv/GEMM"),
    (("aten::linear", "aten::addmm"), "ampere_sgemm_128x64_tn", "conv/GEMM"),
    (("aten::batch_norm", "aten::cudnn_batch_norm"), "cudnn::bn_fw_tr_1C11_kernel_NCHW", "BN+elementwise"),
    (("fastgan::bn_act",), "_bn_act_forward_kernel", "BN+elementwise"),
    (("aten::leaky_relu_",), "vectorized_elementwise_kernel", "BN+elementwise"),
    (("aten::binary_cross_entropy",), "reduce_kernel", "loss"),
    (("autograd::engine::evaluate_function: BinaryCrossEntropyBackward0",), "elementwise_kernel", "loss"),
    (("fastgan::sigmoid_bce",), "_sigmoid_bce_kernel", "loss"),
    (("Optimizer.step#Adam.step", "aten::_fused_adam_"), "multi_tensor_apply_kernel", "optimizer"),
    (("Optimizer.step#Adam.step", "aten::copy_"), "elementwise_kernel", "optimizer"),
    (("aten::to", "aten::_to_copy", "aten::copy_"), "elementwise_kernel", "copies"),
    (("aten::full", "aten::fill_"), "vectorized_elementwise_kernel", "copies"),
    (("Torch-Compiled Region: 0/0", "CompiledFunction"), "triton_poi_fused__native_batch_norm_legit_relu_0",
     "BN+elementwise"),
    (("Torch-Compiled Region: 0/0", "CompiledFunction"), "triton_per_fused_binary_cross_entropy_0", "loss"),
    ((), "some_other_kernel", "other"),
])
def test_categorize(stack, kernel, category):
    assert profiling.categorize(stack, kernel) == category


def test_summarize_gpu_trace():
    """A trace shaped like torch.profiler's on CUDA: launches correlate kernels to the ops that made them."""
    def x(cat, name, ts, dur, tid=1, **args):
        return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur, "args": args}

    events = []
    for step, t0 in enumerate((0.0, 1000.0)):
        c = 10 * step
        events += [
            x("user_annotation", profiling.STEP_MARK, t0, 100.0),
            x("cpu_op", "aten::conv2d", t0 + 1, 20.0), x("cpu_op", "aten::cudnn_convolution", t0 + 2, 10.0),
            x("cuda_runtime", "cudaLaunchKernel", t0 + 3, 4.0, correlation=c + 1),
            x("cpu_op", "fastgan::bn_act", t0 + 30, 10.0),
            x("cuda_driver", "cuLaunchKernel", t0 + 31, 5.0, correlation=c + 2),
            x("user_annotation", "Optimizer.step#Adam.step", t0 + 50, 20.0),
            x("cpu_op", "aten::_fused_adam_", t0 + 51, 10.0),
            x("cuda_runtime", "cudaLaunchKernel", t0 + 52, 3.0, correlation=c + 3),
            x("cpu_op", "aten::copy_", t0 + 80, 5.0),
            x("cuda_runtime", "cudaMemcpyAsync", t0 + 81, 2.0, correlation=c + 4),
            # the device: conv 40us, bn 10us (overlapping the conv by 5us), adam 8us, a 2us copy
            x("kernel", "sm90_xmma_fprop", t0 + 10, 40.0, tid=7, correlation=c + 1),
            x("kernel", "_bn_act_fwd", t0 + 45, 10.0, tid=8, correlation=c + 2),
            x("kernel", "multi_tensor_apply_kernel", t0 + 60, 8.0, tid=7, correlation=c + 3),
            x("gpu_memcpy", "Memcpy DtoD", t0 + 90, 2.0, tid=7, correlation=c + 4),
        ]
    events.append({"ph": "s", "cat": "ac2g", "name": "flow", "id": 1, "pid": 1, "tid": 1, "ts": 3.0})
    summary = profiling.summarize({"traceEvents": events}, steps=2)
    assert summary.on_device
    assert summary.category_ms == pytest.approx({"conv/GEMM": 0.040, "BN+elementwise": 0.010, "loss": 0.0,
                                                 "optimizer": 0.008, "copies": 0.002, "other": 0.0})
    assert summary.launches == 3  # kernels only, per step
    assert summary.launch_api_ms == pytest.approx(0.012)  # cudaLaunchKernel x2 + cuLaunchKernel
    assert summary.busy_ms == pytest.approx(0.055)  # 40 + 10 - 5 overlap + 8 + 2
    assert summary.host_ms == pytest.approx(0.100)


def test_bench_interrupted_or_on_a_broken_device_still_reports_what_it_measured(tmp_path, monkeypatch, capsys):
    measure, calls = bench.measure, []

    def interrupted_at_the_second_peer(peer, *args, **kwargs):
        calls.append(peer.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measure(peer, *args, **kwargs)

    monkeypatch.setattr(bench, "measure", interrupted_at_the_second_peer)
    results = tmp_path / "RESULTS.md"
    argv = ["bench", *TINY, "--steps", "1", "--warmup", "0", "--backends", "torch", "--compile-modes", "default",
            "--markdown", str(results)]
    assert cli.main(argv) == 130
    out = capsys.readouterr().out
    assert _row(out, calls[0]) and f"STOPPED: interrupted during {calls[1]}; not measured: {calls[1]}, " in out
    assert f"| {calls[0]} |" in results.read_text()

    def broken(peer, *args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def release(device):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(bench, "measure", broken)
    monkeypatch.setattr(bench, "release", release)
    assert cli.main(argv[:-2]) == 1
    out = capsys.readouterr().out
    assert f"FAILED {calls[0]}: RuntimeError: CUDA error" in out
    assert f"STOPPED: the device is unusable after {calls[0]} (RuntimeError: CUDA error: an illegal" in out
