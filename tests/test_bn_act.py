"""BatchNorm + activation, by backend: triton and the C++/CUDA extension ("cuda") against the torch composite (the
reference), on CPU (triton in its interpreter, the extension's CPU kernels) and on a GPU; outputs, the input grad,
the weight and bias grads and the running stats, within the tolerance of the storage dtype (parity.DTYPE_TOLERANCE).
Then what only one backend has: triton's reduction plans, the extension's CPU vectors and threads, its GPU paths."""
import re

import pytest
import torch
import torch.nn.functional as F

from fastgan.kernels import activations
from fastgan.ops import ACTIVATIONS
from fastgan.ops.functional import batch_norm_act
from fastgan.perf import bench
from parity import (DEVICES, DTYPE_TOLERANCE, HAS_TRITON, KERNEL_BACKENDS, ROOT, assert_close, needs_backend_here,
                    needs_triton_here)

ACTS = [("relu", 0.0), ("leaky_relu", 0.2), ("tanh", 0.0), ("none", 0.0)]
# (backend, dtype): fp64 on triton is in the slow tier (with its gradcheck), the interpreter costing ~1 s a case
BACKEND_DTYPES = [
    pytest.param("triton", torch.float32, marks=pytest.mark.interpreter, id="triton-fp32"),
    pytest.param("triton", torch.float64, marks=[pytest.mark.interpreter, pytest.mark.slow], id="triton-fp64"),
    pytest.param("cuda", torch.float32, id="cuda-fp32"),
    pytest.param("cuda", torch.float64, id="cuda-fp64"),
]
HALF_DTYPES = [torch.float16, torch.bfloat16]


def _reference(z, weight, bias, running_mean, running_var, normalize, batch_stats, act, slope):
    y = z
    if normalize:
        y = F.batch_norm(z, running_mean, running_var, weight, bias, batch_stats, 0.1, 1e-5)
    return {"relu": F.relu, "leaky_relu": lambda t: F.leaky_relu(t, slope), "tanh": torch.tanh,
            "none": lambda t: t}[act](y)


def _case(shape, dtype, device, channels_last=False, affine=True, normalize=True, seed=0):
    """z (random, off zero mean), the BN parameters and buffers (fp32; fp64 for an fp64 z, as an fp64 model has
    them) and dy."""
    gen = torch.Generator().manual_seed(seed)
    C = shape[1]
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    z = (torch.randn(shape, generator=gen) * 2 + 0.5).to(device, dtype)
    if channels_last:
        z = z.to(memory_format=torch.channels_last)
    params = dict(weight=None, bias=None, running_mean=None, running_var=None)
    if normalize:
        params["running_mean"] = torch.randn(C, generator=gen).to(device, param_dtype)
        params["running_var"] = torch.rand(C, generator=gen).add(0.5).to(device, param_dtype)
        if affine:
            params["weight"] = torch.randn(C, generator=gen).add(1.0).to(device, param_dtype)
            params["bias"] = torch.randn(C, generator=gen).to(device, param_dtype)
    dy = torch.randn(shape, generator=gen).to(device, dtype)
    return z, params, dy


def _run(fn, z, params, dy, **kwargs):
    """Forward + backward; returns outputs, grads and the running stats afterwards (inputs untouched).  z stays
    in its storage, at its offset and strides (a misaligned z must reach the kernels misaligned)."""
    z = z.detach().requires_grad_()
    params = {k: (v.detach().clone().requires_grad_(k in ("weight", "bias")) if v is not None else None)
              for k, v in params.items()}
    y = fn(z, **params, **kwargs)
    y.backward(dy)
    out = {"y": y.detach(), "dz": z.grad}
    for k in ("weight", "bias"):
        if params[k] is not None:
            out["d" + k] = params[k].grad
    for k in ("running_mean", "running_var"):
        if params[k] is not None:
            out[k] = params[k]
    return out


def _compare(backend, z, params, dy, **kwargs):
    """``backend`` against the reference run in fp32 (fp64 for fp64) from the same inputs, as the fused op
    accumulates, within z's dtype's tolerance."""
    fused = _run(lambda z, **p: batch_norm_act(z, **p, **kwargs, backend=backend), z, params, dy)
    up = torch.float64 if z.dtype == torch.float64 else torch.float32
    ref = _run(lambda z, **p: _reference(z, **p, **kwargs), z.to(up), params, dy.to(up))
    assert fused["y"].dtype == z.dtype
    assert fused["y"].is_contiguous(memory_format=torch.channels_last) == z.is_contiguous(
        memory_format=torch.channels_last) or z.dim() != 4
    assert fused.keys() == ref.keys()
    for key in ref:
        assert_close(fused[key].to(ref[key].dtype), ref[key], DTYPE_TOLERANCE[z.dtype], what=f"{backend}: {key}",
                     grad=key.startswith("d"))


def _bn(act="relu", slope=0.0, batch_stats=True):
    return dict(normalize=True, batch_stats=batch_stats, act=act, slope=slope)


def test_activation_codes_are_the_extensions():
    """The codes of kernels/activations.py (the triton kernels' ACT, the ops' ``act``) are csrc/fastgan_ext.h's
    Activation enum, name for name: kLeakyRelu is "leaky_relu"."""
    header = (ROOT / "csrc" / "fastgan_ext.h").read_text()
    enum = re.search(r"enum Activation : int \{([^}]*)\}", header).group(1)
    in_cpp = {re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower(): int(value)
              for name, value in re.findall(r"k(\w+) = (\d+)", enum)}
    assert in_cpp == activations.CODES == ACTIVATIONS, (in_cpp, activations.CODES)
    assert sorted(activations.CODES) == sorted(name for name, _ in ACTS)


# ----------------------------------------------------------------------------------------------- every backend

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("act,slope", ACTS)
@pytest.mark.parametrize("shape,channels_last", [((3, 5, 7, 6), False), ((3, 5, 7, 6), True), ((6, 10), False)])
@pytest.mark.parametrize("batch_stats", [True, False], ids=["train", "eval"])
def test_bn_act(device, backend, dtype, act, slope, shape, channels_last, batch_stats):
    needs_backend_here(backend, device)
    z, params, dy = _case(shape, dtype, device, channels_last)
    _compare(backend, z, params, dy, **_bn(act, slope, batch_stats))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 48, 48), (64, 7, 9, 9)])
def test_many_splits(device, backend, channels_last, shape):
    """Enough rows that the statistics and the backward reduce over several splits."""
    needs_backend_here(backend, device)
    z, params, dy = _case(shape, torch.float32, device, channels_last)
    _compare(backend, z, params, dy, **_bn())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("act,slope", ACTS + [("leaky_relu", 1.5), ("leaky_relu", -0.3)])
def test_activation_only(device, backend, act, slope):
    needs_backend_here(backend, device)
    z, params, dy = _case((2, 3, 9, 8), torch.float32, device, affine=False, normalize=False)
    _compare(backend, z, params, dy, normalize=False, batch_stats=False, act=act, slope=slope)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("batch_stats", [True, False], ids=["train", "eval"])
def test_no_affine(device, backend, batch_stats):
    needs_backend_here(backend, device)
    z, params, dy = _case((3, 4, 5, 5), torch.float32, device, affine=False)
    _compare(backend, z, params, dy, **_bn("leaky_relu", 0.2, batch_stats))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("channels", [6, 16])
def test_half_storage(device, backend, dtype, channels_last, channels):
    if (backend, device, dtype) == ("triton", "cpu", torch.bfloat16):
        pytest.skip("the Triton interpreter mishandles bf16 in these kernels")
    needs_backend_here(backend, device)
    z, params, dy = _case((3, channels, 8, 8), dtype, device, channels_last)
    _compare(backend, z, params, dy, **_bn())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradient_layouts(device, backend):
    """dy in another memory format than z, expanded (stride 0), or with H and W swapped in memory, as autograd
    may hand them over."""
    needs_backend_here(backend, device)
    z, params, _ = _case((2, 4, 6, 6), torch.float32, device, channels_last=True)
    for dy in (torch.randn(2, 4, 6, 6, device=device), torch.tensor(0.7, device=device).expand(2, 4, 6, 6),
               torch.randn(2, 4, 6, 6, device=device).transpose(2, 3)):
        _compare(backend, z, params, dy, **_bn("leaky_relu", 0.2))


@pytest.mark.slow  # fp64 gradcheck of every activation (test_bn_act stays in the fast tier)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("act,slope", ACTS)
@pytest.mark.parametrize("batch_stats", [True, False], ids=["train", "eval"])
def test_gradcheck_fp64(device, backend, act, slope, batch_stats):
    needs_backend_here(backend, device)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(3, 2, 3, 2, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(2, generator=gen, dtype=torch.float64).add(1).to(device).requires_grad_()
    b = torch.randn(2, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    rm = torch.randn(2, dtype=torch.float64, device=device)
    rv = torch.rand(2, dtype=torch.float64, device=device) + 0.5

    def fn(z, w, b):
        # batch statistics with no running stats to update, so that repeated calls are pure
        return batch_norm_act(z, w, b, None if batch_stats else rm, None if batch_stats else rv,
                              batch_stats=batch_stats, act=act, slope=slope, backend=backend)

    assert torch.autograd.gradcheck(fn, (z, w, b))


def test_torch_backend_gradcheck_fp64():
    z = torch.randn(3, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda z, w, b: batch_norm_act(z, w, b, act="leaky_relu", slope=0.2, backend="torch"), (z, w, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_nan_propagates(device, backend):
    needs_backend_here(backend, device)
    z = torch.randn(2, 3, 4, 4, device=device)
    z[0, 1, 2, 2] = float("nan")
    for act in ("relu", "leaky_relu", "tanh"):
        fused = batch_norm_act(z, normalize=False, act=act, backend=backend)
        ref = batch_norm_act(z, normalize=False, act=act, backend="torch")
        assert torch.equal(torch.isnan(fused), torch.isnan(ref))
    fused = batch_norm_act(z, act="relu", backend=backend)
    assert torch.isnan(fused[:, 1]).all() and not torch.isnan(fused[:, [0, 2]]).any()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_double_backward_raises_a_clear_error(backend):
    needs_backend_here(backend, "cpu")
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = batch_norm_act(z, act="relu", backend=backend)
    (grad,) = torch.autograd.grad(y.square().sum(), z, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward .* backend='torch'"):
        grad.sum().backward()


# ----------------------------------------------------------------------------------------------- triton's plans

@pytest.mark.interpreter
@pytest.mark.parametrize("channels_last", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_more_splits_than_one_finalize_chunk(channels_last, monkeypatch):
    """More splits than a finalize program loads at once: both finalizes merge their partials over several chunks;
    small tiles and a large device make the launchers split that finely, with a short last split."""
    needs_triton_here("cpu")
    from fastgan.kernels import bn_act

    monkeypatch.setattr(bn_act, "TILE", 16)
    monkeypatch.setattr(bn_act, "_target_programs", lambda device: 100)
    z, params, dy = _case((67, 3, 5, 3), torch.float32, "cpu", channels_last)
    plan = bn_act.reduction(67, 15, 3, 1 if channels_last else 15, z.device)
    assert plan.splits > bn_act.FINALIZE_SPLITS and plan.tiles % plan.tiles_per_split != 0, plan
    _compare("triton", z, params, dy, **_bn("tanh"))


@pytest.mark.parametrize("width", [64, 128])
@pytest.mark.parametrize("channels_last", [False, True])
def test_reductions_fill_an_h100_twice(width, channels_last, monkeypatch):
    """The statistics and backward reductions of every BN layer of a batch-128 DCGAN step (G and D, ngf = ndf =
    width) launch at least two waves of programs on a 132-SM sm_90 GPU, as the launchers plan them (the plan
    depends on the shape and layout, not on the dtype)."""
    if not HAS_TRITON:
        pytest.skip("triton does not import")
    from fastgan.kernels import bn_act, tiling

    monkeypatch.setattr(tiling, "device_of", lambda device: tiling.SM90)
    layers = [layer for layer in bench.fused_layers(bench.Config(128, width, width)) if layer.normalize]
    assert len(layers) == 7
    for layer in layers:
        N, C, H, W = layer.shape
        plan = bn_act.reduction(N, H * W, C, 1 if channels_last else H * W, torch.device("cuda"))
        programs = plan.grid[0] * plan.grid[1]
        assert programs >= 2 * tiling.SM90.sms, (layer, plan)
        assert plan.tiles_per_split * plan.splits >= plan.tiles > plan.tiles_per_split * (plan.splits - 1), plan


@pytest.mark.interpreter
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_activation_only_on_flat_rows(device, channels_last):
    """Without BN the passes read z in memory order, FLAT_ROW elements a row (3 channels: no 16-byte vectors
    along C), the last tile short; dy in another layout than z takes the per-channel view instead."""
    needs_triton_here(device)
    from fastgan.kernels import bn_act

    z, params, dy = _case((4, 3, 16, 20), torch.float32, device, channels_last, affine=False, normalize=False)
    own, other = ((torch.channels_last, torch.contiguous_format) if channels_last else
                  (torch.contiguous_format, torch.channels_last))
    assert bn_act._can_flatten(z, dy.contiguous(memory_format=own))
    for grad in (dy.contiguous(memory_format=own), dy.contiguous(memory_format=other)):
        _compare("triton", z, params, grad, normalize=False, batch_stats=False, act="tanh", slope=0.0)


# ----------------------------------------------------------------------------------------------- the extension's
# CPU kernels: C (channels_last) or H*W (NCHW) off the vector width, under it, several vectors plus a short one,
# and enough rows per channel for several reduction splits (4096 rows of a channel in NCHW, 4096/C rows in
# channels_last).
CPU_VECTOR_SHAPES = [((5, 13, 3, 7), True), ((5, 13, 3, 7), False), ((4, 3, 5, 5), True), ((2, 16, 4, 4), False),
                     ((9, 24, 23, 21), True), ((9, 5, 23, 21), False), ((40, 9), False)]


@pytest.mark.parametrize("shape,channels_last", CPU_VECTOR_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("act,slope", [("leaky_relu", 0.2), ("tanh", 0.0)])
def test_cpu_vector_tails_and_splits(shape, channels_last, dtype, act, slope):
    """The CPU kernels' vectors end at each row (an (n, c) plane, or a position's channels): short last vectors,
    rows shorter than a vector, and several reduction splits, against the reference."""
    needs_backend_here("cuda", "cpu")
    z, params, dy = _case(shape, dtype, "cpu", channels_last)
    _compare("cuda", z, params, dy, **_bn(act, slope))
    _compare("cuda", z, dict.fromkeys(params), dy, normalize=False, batch_stats=False, act=act, slope=slope)


def _same_bits(results):
    first, second = results
    assert first.keys() == second.keys() and "running_var" in first
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("shape,channels_last", [((16, 13, 29, 31), True), ((16, 5, 29, 31), False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_results_do_not_depend_on_the_thread_count(shape, channels_last, dtype):
    """One thread and two give the same bits: the reductions' splits and the vectors are fixed by the shape, and
    the splits merge in order (shapes above the kernels' grain, so that two threads do split the work)."""
    needs_backend_here("cuda", "cpu")
    z, params, dy = _case(shape, dtype, "cpu", channels_last)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_run(lambda z, **p: batch_norm_act(z, **p, **_bn("leaky_relu", 0.2), backend="cuda"),
                                z, params, dy))
    finally:
        torch.set_num_threads(threads)
    _same_bits(results)


# ----------------------------------------------------------------------------------------------- GPU
# Activation shapes of DCGAN 64x64 (ngf=ndf=64) at batch 16, both layouts, and shapes that take the extension's
# unvectorised paths (C or H*W not a multiple of the vector width), each with one of the activations.
GPU_SHAPES = [(shape, channels_last) for shape in [(16, 512, 4, 4), (16, 256, 8, 8), (16, 128, 16, 16),
                                                   (16, 64, 32, 32), (16, 3, 64, 64), (5, 6, 7, 7), (3, 13, 1, 1)]
              for channels_last in (False, True)] + [((300, 10), False), ((64, 24), False)]
GPU_CASES = [(*case, *ACTS[i % len(ACTS)]) for i, case in enumerate(GPU_SHAPES)]
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape,channels_last,act,slope", GPU_CASES)
def test_gpu_dcgan_shapes(backend, dtype, shape, channels_last, act, slope):
    needs_backend_here(backend, "cuda")
    z, params, dy = _case(shape, dtype, "cuda", channels_last)
    _compare(backend, z, params, dy, **_bn(act, slope))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape,channels_last,act,slope", GPU_CASES)
def test_gpu_cuda_matches_triton(dtype, shape, channels_last, act, slope):
    """The two kernel backends against each other, at the TF32 bound for fp32: two orders of fp32 summation."""
    needs_backend_here("cuda", "cuda")
    needs_triton_here("cuda")
    z, params, dy = _case(shape, dtype, "cuda", channels_last)
    cuda, triton = (_run(lambda z, **p: batch_norm_act(z, **p, **_bn(act, slope), backend=backend), z, params, dy)
                    for backend in ("cuda", "triton"))
    mode = "tf32" if dtype == torch.float32 else DTYPE_TOLERANCE[dtype]
    for key in cuda:
        assert_close(cuda[key].double(), triton[key].double(), mode, what=f"cuda vs triton: {key}", grad=True)


def _shifted(t):
    """t's values and strides in a storage one element off 16-byte alignment."""
    out = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].as_strided(t.shape, t.stride()).copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("misaligned", ["z", "dy"])
def test_gpu_misaligned_storage_takes_the_scalar_path(dtype, channels_last, misaligned):
    """The extension with z, or only dy, at an odd storage offset: no 16-byte loads are possible there, the
    results must not change."""
    needs_backend_here("cuda", "cuda")
    z, params, dy = _case((4, 8, 6, 6), dtype, "cuda", channels_last)
    z, dy = (_shifted(z), dy) if misaligned == "z" else (z, _shifted(dy))
    _compare("cuda", z, params, dy, **_bn())


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_results_are_deterministic(channels_last):
    """The extension run twice, bitwise equal: the reductions have a fixed order (and no race changes them)."""
    needs_backend_here("cuda", "cuda")
    z, params, dy = _case((64, 128, 16, 16), torch.float32, "cuda", channels_last)
    _same_bits([_run(lambda z, **p: batch_norm_act(z, **p, **_bn("leaky_relu", 0.2), backend="cuda"), z, params, dy)
                for _ in range(2)])
