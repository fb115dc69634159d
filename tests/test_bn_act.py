"""BatchNorm + activation: the triton backend against the torch composite (the reference)."""
import pytest
import torch
import torch.nn.functional as F

from fastgan.ops.functional import batch_norm_act
from fastgan.perf import bench
from parity import DEVICES, HAS_CUDA, HAS_TRITON, assert_close, needs_backend_here, needs_triton_here

ACTS = [("relu", 0.0), ("leaky_relu", 0.2), ("tanh", 0.0), ("none", 0.0)]


def _reference(z, weight, bias, running_mean, running_var, normalize, batch_stats, act, slope):
    y = z
    if normalize:
        y = F.batch_norm(z, running_mean, running_var, weight, bias, batch_stats, 0.1, 1e-5)
    return {"relu": F.relu, "leaky_relu": lambda t: F.leaky_relu(t, slope), "tanh": torch.tanh,
            "none": lambda t: t}[act](y)


def _case(shape, dtype, device, channels_last, affine, normalize, seed=0):
    gen = torch.Generator().manual_seed(seed)
    C = shape[1]
    z = (torch.randn(shape, generator=gen) * 2 + 0.5).to(device, dtype)
    if channels_last:
        z = z.to(memory_format=torch.channels_last)
    params = dict(weight=None, bias=None, running_mean=None, running_var=None)
    if normalize:
        params["running_mean"] = torch.randn(C, generator=gen).to(device)
        params["running_var"] = torch.rand(C, generator=gen).add(0.5).to(device)
        if affine:
            params["weight"] = torch.randn(C, generator=gen).add(1.0).to(device)
            params["bias"] = torch.randn(C, generator=gen).to(device)
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


def _compare(z, params, dy, mode, **kwargs):
    fused = _run(lambda z, **p: batch_norm_act(z, **p, **kwargs, backend="triton"), z, params, dy)
    # Reference in fp32 (fp64 for fp64) from the same inputs: the fused op accumulates in fp32 too.
    up = torch.float64 if z.dtype == torch.float64 else torch.float32
    ref_kwargs = {k: kwargs[k] for k in ("normalize", "batch_stats", "act", "slope")}
    ref = _run(lambda z, **p: _reference(z, **p, **ref_kwargs), z.to(up), params, dy.to(up))
    assert fused["y"].dtype == z.dtype
    assert fused["y"].is_contiguous(memory_format=torch.channels_last) == z.is_contiguous(
        memory_format=torch.channels_last) or z.dim() != 4
    assert fused.keys() == ref.keys()
    for key in ref:
        assert_close(fused[key].to(ref[key].dtype), ref[key], mode, what=key, grad=key.startswith("d"))


@pytest.mark.interpreter
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act,slope", ACTS)
@pytest.mark.parametrize("shape,channels_last", [((3, 5, 7, 6), False), ((3, 5, 7, 6), True), ((6, 10), False)])
@pytest.mark.parametrize("batch_stats", [True, False], ids=["train", "eval"])
def test_bn_act_fp32(device, act, slope, shape, channels_last, batch_stats):
    needs_triton_here(device)
    z, params, dy = _case(shape, torch.float32, device, channels_last, affine=True, normalize=True)
    _compare(z, params, dy, "fp32", normalize=True, batch_stats=batch_stats, act=act, slope=slope)


@pytest.mark.interpreter
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_many_splits(device, channels_last):
    """Enough rows that the statistics and the backward reduce over several split programs."""
    needs_triton_here(device)
    z, params, dy = _case((2, 3, 48, 48), torch.float32, device, channels_last, affine=True, normalize=True)
    _compare(z, params, dy, "fp32", normalize=True, batch_stats=True, act="relu", slope=0.0)


@pytest.mark.interpreter
@pytest.mark.parametrize("channels_last", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_more_splits_than_one_finalize_chunk(channels_last, monkeypatch):
    """More splits than a finalize program loads at once: both finalizes merge their partials over several chunks;
    small tiles and a large device make the launchers split that finely, with a short last split."""
    needs_triton_here("cpu")
    from fastgan.kernels import bn_act

    monkeypatch.setattr(bn_act, "TILE", 16)
    monkeypatch.setattr(bn_act, "_target_programs", lambda device: 100)
    z, params, dy = _case((67, 3, 5, 3), torch.float32, "cpu", channels_last, affine=True, normalize=True)
    plan = bn_act.reduction(67, 15, 3, 1 if channels_last else 15, z.device)
    assert plan.splits > bn_act.FINALIZE_SPLITS and plan.tiles % plan.tiles_per_split != 0, plan
    _compare(z, params, dy, "fp32", normalize=True, batch_stats=True, act="tanh", slope=0.0)


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
@pytest.mark.parametrize("act,slope", ACTS)
def test_activation_only(device, act, slope):
    needs_triton_here(device)
    z, params, dy = _case((2, 3, 9, 8), torch.float32, device, False, affine=False, normalize=False)
    _compare(z, params, dy, "fp32", normalize=False, batch_stats=False, act=act, slope=slope)


@pytest.mark.interpreter
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_activation_only_on_flat_rows(device, channels_last):
    """Without BN the passes read z in memory order, FLAT_ROW elements a row (3 channels: no 16-byte vectors
    along C), the last tile short; dy in another layout than z takes the per-channel view instead."""
    needs_triton_here(device)
    from fastgan.kernels import bn_act

    z, params, dy = _case((4, 3, 16, 20), torch.float32, device, channels_last, affine=False, normalize=False)
    assert bn_act._can_flatten(z, dy.contiguous(memory_format=torch.channels_last if channels_last else
                                                torch.contiguous_format))
    for grad in (dy.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format),
                 dy.contiguous(memory_format=torch.contiguous_format if channels_last else torch.channels_last)):
        _compare(z, params, grad, "fp32", normalize=False, batch_stats=False, act="tanh", slope=0.0)


@pytest.mark.interpreter
@pytest.mark.parametrize("device", DEVICES)
def test_no_affine(device):
    needs_triton_here(device)
    z, params, dy = _case((3, 4, 5, 5), torch.float32, device, False, affine=False, normalize=True)
    _compare(z, params, dy, "fp32", normalize=True, batch_stats=True, act="leaky_relu", slope=0.2)


@pytest.mark.interpreter
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if HAS_CUDA else []))
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_storage(device, dtype, channels_last):
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter mishandles bf16")
    needs_triton_here(device)
    z, params, dy = _case((3, 6, 8, 8), dtype, device, channels_last, affine=True, normalize=True)
    _compare(z, params, dy, "fp16" if dtype == torch.float16 else "bf16", normalize=True, batch_stats=True,
             act="relu", slope=0.0)


@pytest.mark.interpreter
@pytest.mark.parametrize("device", DEVICES)
def test_gradient_layouts(device):
    """dy in another memory format than z, expanded (stride 0), or with H and W swapped in memory, as autograd
    may hand them over."""
    needs_triton_here(device)
    z, params, _ = _case((2, 4, 6, 6), torch.float32, device, True, affine=True, normalize=True)
    for dy in (torch.randn(2, 4, 6, 6, device=device), torch.tensor(0.7, device=device).expand(2, 4, 6, 6),
               torch.randn(2, 4, 6, 6, device=device).transpose(2, 3)):
        _compare(z, params, dy, "fp32", normalize=True, batch_stats=True, act="leaky_relu", slope=0.2)


@pytest.mark.slow  # fp64 gradcheck of every activation (test_bn_act_fp32 stays in the fast tier)
@pytest.mark.interpreter
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
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


@pytest.mark.interpreter
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
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
