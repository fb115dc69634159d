"""Fusion level L2: the implicit-GEMM conv kernels and the conv chain against F.conv2d / F.conv_transpose2d
with the reference BatchNorm and activations."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastgan
from fastgan.nn import fused_conv, reference
from fastgan.nn.layers import FusedSequential
from fastgan.ops import conv_chain
from parity import (DEVICES, assert_as_close_as_torch, assert_close, gradcheck_chain, init_params,
                    needs_triton_here, tf32_enabled)

pytestmark = pytest.mark.interpreter

# name: (up, stride, padding, input size, activation of the layer below, its slope)
GEOMETRIES = {
    "conv_k4s2p1": (False, 2, 1, 8, "leaky_relu", 0.2),
    "convT_k4s2p1": (True, 2, 1, 4, "relu", 0.0),
    "convT_1to4": (True, 4, 0, 1, "relu", 0.0),
    "conv_4to1": (False, 4, 0, 4, "leaky_relu", 0.2),
    "conv_k4s2p1_steep_slope": (False, 2, 1, 8, "leaky_relu", 1.5),  # LeakyReLU as a min, not a max
    "convT_k4s2p1_tanh": (True, 2, 1, 4, "tanh", 0.0),  # mapped in fp32 whatever the operand's dtype
}


def _torch_conv(x, w, up, stride, padding):
    stride = 1 if stride == 4 else stride  # the end layers are k4s1p0 in torch
    return (F.conv_transpose2d if up else F.conv2d)(x, w, stride=stride, padding=padding)


def _act(t, act, slope):
    return {"relu": F.relu, "tanh": torch.tanh}.get(act, lambda t: F.leaky_relu(t, slope))(t)


def _randn(gen, *shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=gen) * scale + shift


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", GEOMETRIES)
def test_conv_kernels(name, dtype, device):
    """One layer of a chain: BN+act of the layer below in the prologue, statistics in the epilogue, the
    dgrad's activation/BN-backward epilogue with its finalize, and the wgrad through the prologue."""
    needs_triton_here(device)
    from fastgan.kernels import conv_gemm as cg

    up, stride, padding, size, act, slope = GEOMETRIES[name]
    geometry = cg.Geometry(up, stride, padding)
    code = fastgan.ops.ACTIVATIONS[act]
    gen = torch.Generator().manual_seed(0)
    c_in, c_out, eps = 6, 5, 1e-5
    batch = 8 if size == 1 else 2  # BN over 2 values per channel has dL/dz = 0: nothing to compare
    z = _randn(gen, batch, c_in, size, size, scale=2.0, shift=0.5).to(dtype).to(device)
    w = _randn(gen, *((c_in, c_out) if up else (c_out, c_in)), 4, 4, scale=0.3).to(dtype).to(device)
    gamma, beta = _randn(gen, c_in, scale=0.2, shift=1.0).to(device), _randn(gen, c_in).to(device)
    gamma2, beta2 = _randn(gen, c_out, scale=0.2, shift=1.0).to(device), _randn(gen, c_out).to(device)
    running = [torch.randn(c_out, generator=gen).to(device), torch.rand(c_out, generator=gen).add(0.5).to(device)]
    expected_running = [t.clone() for t in running]

    # Reference, in fp32 from the same (rounded) values: act(BN(z)) -> conv, and its gradients.
    z_ref, w_ref = z.float().requires_grad_(), w.float().requires_grad_()
    gamma_ref, beta_ref = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
    out_ref = _torch_conv(_act(F.batch_norm(z_ref, None, None, gamma_ref, beta_ref, True, 0.1, eps), act, slope),
                          w_ref, up, stride, padding)
    dy = torch.randn(out_ref.shape, generator=gen).to(dtype).to(device)
    out_ref.backward(dy.float())
    F.batch_norm(out_ref.detach(), *expected_running, None, None, True, 0.1, eps)

    # The layer below's statistics and prologue map, as its own finalize would have made them.
    mean, var = z.float().mean((0, 2, 3)), z.float().var((0, 2, 3), unbiased=False)
    stats_below = torch.stack([mean, torch.rsqrt(var + eps)])
    scale = gamma * stats_below[1]
    coef_below = torch.stack([scale, torch.zeros_like(scale), beta - mean * scale])
    activation = cg.GemmInput(z, coef_below, act=code, slope=slope)

    out = torch.full(out_ref.shape, float("nan"), dtype=dtype, device=device)
    partials = cg.conv(activation, w, geometry, out, cg.EPI_STATS, allow_tf32=False)
    mode = "fp32" if dtype == torch.float32 else "fp16"
    assert_close(out.float(), out_ref.detach(), mode, "conv output")
    stats, coef = cg.finalize_stats(partials, gamma2, beta2, *running, 0.1, eps)
    ref_mean, ref_var = out_ref.detach().mean((0, 2, 3)), out_ref.detach().var((0, 2, 3), unbiased=False)
    assert_close(stats[0], ref_mean, mode, "mean")
    assert_close(stats[1], torch.rsqrt(ref_var + eps), mode, "invstd")
    assert_close(coef[0], gamma2 * stats[1], "fp32", "prologue scale")
    assert_close(coef[2], beta2 - stats[0] * coef[0], "fp32", "prologue shift")
    assert_close(running[0], expected_running[0], mode, "running_mean")
    assert_close(running[1], expected_running[1], mode, "running_var")

    g = torch.full_like(z, float("nan"))
    partials = cg.conv(cg.GemmInput(dy), w, geometry.transposed(), g, cg.EPI_GRAD,
                       below=(z, stats_below, coef_below, code, slope), allow_tf32=False)
    sums, back = cg.finalize_grad(partials, stats_below, gamma)
    assert_close(sums[0], beta_ref.grad, mode, "dbeta", grad=True)
    assert_close(sums[1], gamma_ref.grad, mode, "dgamma", grad=True)
    # The next kernel's prologue turns g into dL/dz with the backward map.
    dz = back[0, :, None, None] * g.float() + back[1, :, None, None] * z.float() + back[2, :, None, None]
    assert_close(dz, z_ref.grad, mode, "dz", grad=True)

    lo, hi = (activation, cg.GemmInput(dy)) if up else (cg.GemmInput(dy), activation)
    assert_close(cg.wgrad(lo, hi, geometry, allow_tf32=False), w_ref.grad, mode, "dweight", grad=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size,batch,span", [(8, 64, "SPAN_IMAGES"), (16, 64, "SPAN_ROWS"), (8, 24, "SPAN_IMAGES")])
def test_wgrad_position_blocks(size, batch, span, device, monkeypatch):
    """The wgrad's K steps over blocks of whole images or whole rows, with splits of whole K steps (EVEN_N: the low
    side unmasked; batch 64 under the interpreter's BLOCK_K of 1024) and without (24 images), both sides mapped:
    lo as the BN backward of (g, z), hi through BN + LeakyReLU."""
    needs_triton_here(device)
    from fastgan.kernels import conv_gemm as cg

    launched = []
    launch = cg._launch
    monkeypatch.setattr(cg, "_launch", lambda *a: launched.append(a[-1]) or launch(*a))
    gen = torch.Generator().manual_seed(1)
    c_hi, c_lo = 3, 4
    x = _randn(gen, batch, c_hi, size, size, shift=0.5).to(device)
    g, z = (_randn(gen, batch, c_lo, size // 2, size // 2).to(device) for _ in range(2))
    hi_map = torch.stack([_randn(gen, c_hi, shift=1.0), torch.zeros(c_hi), _randn(gen, c_hi)]).to(device)
    lo_map = torch.stack([_randn(gen, c_lo, shift=1.0), _randn(gen, c_lo), _randn(gen, c_lo)]).to(device)
    hi = F.leaky_relu(x * hi_map[0, :, None, None] + hi_map[2, :, None, None], 0.2)
    lo = g * lo_map[0, :, None, None] + z * lo_map[1, :, None, None] + lo_map[2, :, None, None]
    expected = torch.nn.grad.conv2d_weight(hi, (c_lo, c_hi, 4, 4), lo, stride=2, padding=1)

    dw = cg.wgrad(cg.GemmInput(g, lo_map, q=z), cg.GemmInput(x, hi_map, act=fastgan.ops.ACTIVATIONS["leaky_relu"],
                                                              slope=0.2), cg.Geometry(False, 2, 1), allow_tf32=False)
    assert_close(dw, expected, "fp32", "dweight", grad=True)
    assert launched[-1]["SPAN"] == getattr(cg, span).value
    assert launched[-1]["EVEN_N"] == (batch % 64 == 0)


# ----------------------------------------------------------------------------- chains in a FusedSequential

def _generator_like(c=8, bn_last=False):
    layers = [nn.ConvTranspose2d(5, 2 * c, 4, 1, 0, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(True),
              nn.ConvTranspose2d(2 * c, c, 4, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(True)]
    if not bn_last:
        layers += [nn.ConvTranspose2d(c, 3, 4, 2, 1, bias=False), nn.Tanh()]
    return nn.Sequential(*layers)


def _discriminator_like(c=8):
    return nn.Sequential(nn.Conv2d(3, c, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True),
                         nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.2, True),
                         nn.Conv2d(2 * c, 1, 4, 1, 0, bias=False))


def _mixed():
    """An L1-only layer (k3) between two chains, the second with 20 channels (several tiles) and a
    BN without affine parameters or running stats inside it."""
    return nn.Sequential(nn.Conv2d(3, 6, 4, 2, 1, bias=False), nn.BatchNorm2d(6), nn.LeakyReLU(0.2),
                         nn.Conv2d(6, 6, 3, 1, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 20, 4, 2, 1, bias=False),
                         nn.BatchNorm2d(20, affine=False, track_running_stats=False), nn.ReLU(),
                         nn.ConvTranspose2d(20, 20, 4, 2, 1, bias=False), nn.BatchNorm2d(20), nn.ReLU())


CHAINS = {  # name: (model, input shape, conv_chain calls per forward)
    "generator": (_generator_like, (2, 5, 1, 1), 1),
    "generator_bn_last": (lambda: _generator_like(bn_last=True), (2, 5, 1, 1), 1),
    "discriminator": (_discriminator_like, (2, 3, 16, 16), 1),
    "mixed": (_mixed, (2, 3, 8, 8), 2),
}


def _check_chain(make, shape, calls, device, dtype=torch.float32, mode="fp32", channels_last=False,
                 monkeypatch=None, input_grad=True, seed=0):
    ref = init_params(make(), seed).to(device)
    fused = init_params(make(), seed).to(device, dtype)
    fused = FusedSequential(*fused, backend="triton", level="L2")
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(shape, generator=gen).to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x_ref = x.clone().requires_grad_(input_grad)
    x_fused = x.to(dtype).requires_grad_(input_grad)
    count = []
    if monkeypatch is not None:
        original = conv_chain.conv_chain
        monkeypatch.setattr(conv_chain, "conv_chain", lambda *args: count.append(1) or original(*args))
    y = fused(x_fused)
    y_ref = ref(x_ref)
    if monkeypatch is not None:
        assert len(count) == calls, f"{len(count)} conv_chain calls, expected {calls}"
    dy = torch.randn(y_ref.shape, generator=gen).to(device)
    y.backward(dy.to(dtype))
    y_ref.backward(dy)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y.float(), y_ref.detach(), mode, "output")
    if input_grad:
        assert_close(x_fused.grad.float(), x_ref.grad, mode, "input grad", grad=True)
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        if q.requires_grad:
            assert p.grad is not None, f"{name}: no gradient"
            assert_close(p.grad.float(), q.grad, mode, f"{name}.grad", grad=True)
        else:
            assert p.grad is None, f"{name}: gradient of a frozen parameter"
    for (name, b), c in zip(fused.named_buffers(), ref.buffers()):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(b, c), name
        else:
            assert_close(b, c, mode, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", CHAINS)
def test_chain_fp32(name, device, monkeypatch):
    needs_triton_here(device)
    make, shape, calls = CHAINS[name]
    _check_chain(make, shape, calls, device, monkeypatch=monkeypatch)


@pytest.mark.parametrize("device", DEVICES)
def test_chain_fp16_channels_last(device):
    needs_triton_here(device)
    _check_chain(_discriminator_like, (2, 3, 16, 16), 1, device, torch.float16, "fp16", channels_last=True)


@pytest.mark.parametrize("device", DEVICES)
def test_chain_partial_gradients(device):
    """No input gradient and frozen conv weights (D in the G step freezes all of them): only what is
    needed is computed, and it is right."""
    needs_triton_here(device)

    def make():
        model = _generator_like()
        model[3].weight.requires_grad_(False)
        return model

    _check_chain(make, (2, 5, 1, 1), 1, device, input_grad=False)


@pytest.mark.parametrize("device", DEVICES)
def test_chain_many_tiles(device, monkeypatch):
    """Small tiles and a split wgrad: statistics merged over many partials (several finalize chunks)."""
    needs_triton_here(device)
    from fastgan.kernels import conv_gemm as cg

    monkeypatch.setattr(cg, "_block_m", lambda rows: 32)
    monkeypatch.setattr(cg, "_sm_count", lambda device: 64)
    make = lambda: nn.Sequential(*_generator_like(c=4, bn_last=True),  # noqa: E731
                                 nn.ConvTranspose2d(4, 4, 4, 2, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    _check_chain(make, (2, 5, 1, 1), 1, device)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_fp64(device):
    """Every geometry in one chain (1 -> 4 -> 2 -> 4 -> 1 pixels), BN + activations between them."""
    needs_triton_here(device)
    torch.manual_seed(0)
    model = gradcheck_chain(device)
    names, params = zip(*model.named_parameters())
    # All parameters as one input: fast mode then probes them all with one random direction.
    flat = torch.cat([p.detach().flatten() for p in params]).requires_grad_()
    x = torch.randn(3, 3, 1, 1, dtype=torch.float64, device=device, requires_grad=True)

    def fn(x, flat):
        views = [v.view_as(p) for v, p in zip(flat.split([p.numel() for p in params]), params)]
        return torch.func.functional_call(model, dict(zip(names, views)), (x,))

    assert torch.autograd.gradcheck(fn, (x, flat), fast_mode=True)


@pytest.mark.slow
def test_tiny_dcgan_matches_reference():
    """fastgan.Generator / Discriminator (ngf = ndf = 4, batch 2) at L2 against examples/dcgan's models."""
    needs_triton_here("cpu")
    torch.manual_seed(0)
    for fused, ref, x in ((fastgan.Generator(nz=8, ngf=4, backend="triton"), reference.Generator(nz=8, ngf=4),
                           torch.randn(2, 8, 1, 1)),
                          (fastgan.Discriminator(ndf=4, backend="triton"), reference.Discriminator(ndf=4),
                           torch.randn(2, 3, 64, 64))):
        ref.load_state_dict(fused.state_dict())
        fused_conv.set_level(fused, "L2")
        x_fused, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        if isinstance(fused, fastgan.Discriminator):
            y, y_ref = fused.logits(x_fused), ref.main[:-1](x_ref).view(-1)
        else:
            y, y_ref = fused(x_fused), ref(x_ref)
        dy = torch.randn_like(y_ref)
        y.backward(dy)
        y_ref.backward(dy)
        what = type(fused).__name__
        assert_close(y, y_ref.detach(), "fp32", f"{what} output")
        assert_close(x_fused.grad, x_ref.grad, "fp32", f"{what} input grad", grad=True)
        for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
            assert_close(p.grad, q.grad, "fp32", f"{what} {name}.grad", grad=True)
        for (name, b), c in zip(fused.named_buffers(), ref.buffers()):
            assert_close(b.double(), c.double(), "fp32", f"{what} {name}")


# ----------------------------------------------------------------------------- what stays at L1

@pytest.mark.parametrize("device", DEVICES)
def test_other_layers_stay_at_l1(device, monkeypatch):
    """Other kernel sizes, strides and paddings, a bias, eval-mode BN, odd sizes: no chain, same numbers."""
    needs_triton_here(device)
    odd = lambda: nn.Sequential(nn.Conv2d(3, 4, 4, 2, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU())  # noqa: E731
    _check_chain(odd, (2, 3, 7, 7), 0, device, monkeypatch=monkeypatch)
    other = lambda: nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),  # noqa: E731
                                  nn.Conv2d(4, 4, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(4, 3, 5, 2, 2, 1))
    _check_chain(other, (2, 3, 8, 8), 0, device, monkeypatch=monkeypatch)
    # In eval mode only the last layer (no BN) forms a chain.
    _check_chain(lambda: _generator_like().eval(), (2, 5, 1, 1), 1, device, monkeypatch=monkeypatch)


def test_torch_backend_runs_l1():
    model = FusedSequential(*init_params(_discriminator_like(), 0), backend="torch", level="L2")
    ref = init_params(_discriminator_like(), 0)
    x = torch.randn(2, 3, 16, 16)
    assert_close(model(x), ref(x), "fp32")


def test_bad_level_and_dtype():
    with pytest.raises(ValueError, match="level must be"):
        FusedSequential(nn.Conv2d(3, 4, 4, 2, 1), level="L3")
    with pytest.raises(ValueError, match="level must be"):
        fused_conv.set_level(nn.Sequential(), "l2")
    needs_triton_here("cpu")
    model = FusedSequential(*_discriminator_like(), backend="triton", level="L2")
    with pytest.raises(ValueError, match="float32 weights on cpu but its input is torch.float64"):
        model(torch.randn(2, 3, 16, 16, dtype=torch.float64))


@pytest.mark.slow
def test_opcheck():
    needs_triton_here("cpu")
    torch.manual_seed(0)
    links = [conv_chain.Link(True, 4, 0, True, True, True, 1, 0.0, 0.1, 1e-5),
             conv_chain.Link(True, 2, 1, True, False, True, 1, 0.0, 0.1, 1e-5)]
    x = torch.randn(2, 6, 1, 1)
    weights = [torch.randn(6, 8, 4, 4) * 0.3, torch.randn(8, 4, 4, 4) * 0.3]
    gammas, betas = [torch.rand(8) + 0.5], [torch.randn(8)]
    running = [[torch.zeros(8), torch.zeros(4)], [torch.ones(8), torch.ones(4)]]
    layout, scalars = conv_chain.encode(links)
    torch.library.opcheck(conv_chain.conv_chain, (x, weights, gammas, betas, *running, layout, scalars, False))
    z, zs, stats = conv_chain.conv_chain(x, weights, gammas, betas, *running, layout, scalars, False)
    torch.library.opcheck(conv_chain.conv_chain_backward,
                          (torch.randn_like(z), x, weights, gammas, zs, stats, layout, scalars, [1, 1, 1, 1], False))


@pytest.mark.slow
def test_torch_compile_traces_the_chain():
    """fullgraph: the chain traces without a graph break (fake kernels, the running-stats mutation)."""
    needs_triton_here("cpu")
    models = [FusedSequential(*init_params(_generator_like(c=4), 0), backend="triton", level="L2") for _ in range(2)]
    x = torch.randn(2, 5, 1, 1)
    compiled = torch.compile(lambda x: models[0](x).square().sum(), backend="aot_eager", fullgraph=True)
    compiled(x).backward()
    models[1](x).square().sum().backward()
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{name}: {m}")
    for (name, a), b in zip(models[0].named_buffers(), models[1].buffers()):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------- GPU: real sizes, TF32, bf16

def _forward_backward(model, run, x):
    """{"output", "input grad", "<parameter>.grad"} of one step with a fixed random dy; grads reset after."""
    x = x.detach().clone().requires_grad_()
    y = run(model, x)
    y.float().backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.device))
    results = {"output": y.detach(), "input grad": x.grad}
    for n, p in model.named_parameters():
        results[f"{n}.grad"], p.grad = p.grad, None
    return results


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["generator", "discriminator"])
def test_dcgan64_fp32_gpu(name):
    """L2 against the reference in exact fp32; with TF32 on, as close to exact fp32 as cuDNN's TF32 is."""
    torch.manual_seed(0)
    if name == "generator":
        fused, ref, x = fastgan.Generator(backend="triton"), reference.Generator(), torch.randn(16, 100, 1, 1)
    else:
        fused, ref, x = fastgan.Discriminator(backend="triton"), reference.Discriminator(), torch.randn(16, 3, 64, 64)
    ref.load_state_dict(fused.state_dict())
    fused, ref, x = fused.cuda(), ref.cuda(), x.cuda()
    fused_conv.set_level(fused, "L2")
    run = (lambda m, t: m.logits(t)) if name == "discriminator" else (lambda m, t: m(t))
    run_ref = (lambda m, t: m.main[:-1](t).view(-1)) if name == "discriminator" else (lambda m, t: m(t))
    with tf32_enabled(False):
        exact, got = _forward_backward(ref, run_ref, x), _forward_backward(fused, run, x)
    for key, value in exact.items():
        assert_close(got[key], value, "fp32", key, grad=key != "output")
    with tf32_enabled(True):
        torch_tf32, got = _forward_backward(ref, run_ref, x), _forward_backward(fused, run, x)
    for key, value in exact.items():
        assert_as_close_as_torch(got[key], torch_tf32[key], value, "tf32", key)


@pytest.mark.gpu
def test_chain_bf16_autocast_gpu():
    """L2 under bf16 autocast, as close to the exact fp32 reference as torch's own bf16 autocast is."""
    torch.manual_seed(0)
    fused, ref = fastgan.Generator(backend="triton").cuda(), reference.Generator().cuda()
    ref.load_state_dict(fused.state_dict())
    fused_conv.set_level(fused, "L2")
    x = torch.randn(32, 100, 1, 1, device="cuda")
    plain = lambda m, t: m(t)  # noqa: E731
    exact = _forward_backward(ref, plain, x)
    with torch.autocast("cuda", torch.bfloat16):
        torch_bf16, got = _forward_backward(ref, plain, x), _forward_backward(fused, plain, x)
    assert got["output"].dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for k, v in got.items() if k.endswith(".grad"))
    for key, value in exact.items():
        assert_as_close_as_torch(got[key], torch_bf16[key], value, "bf16", key)


def test_packed_weight_follows_updates():
    """The conv packs a weight once per version counter: repeated forwards reuse the pack, and an in-place
    update (an optimizer step) is seen by the next launch."""
    needs_triton_here("cpu")
    from fastgan.kernels import conv_gemm as cg

    gen = torch.Generator().manual_seed(0)
    x, w = _randn(gen, 2, 16, 4, 4), _randn(gen, 4, 16, 4, 4, scale=0.3)
    geometry = cg.Geometry(False, 2, 1)
    pack = cg.packed_weight(w, torch.float32, False)
    assert cg.packed_weight(w, torch.float32, False) is pack
    torch.testing.assert_close(pack, w.permute(2, 3, 0, 1), rtol=0, atol=0)
    for _ in range(2):
        out = torch.full((2, 4, 2, 2), float("nan"))
        cg.conv(cg.GemmInput(x), w, geometry, out, allow_tf32=False)
        assert_close(out, F.conv2d(x, w, stride=2, padding=1), "fp32", "conv output")
        with torch.no_grad():
            w.mul_(-2.0).add_(0.5)
    assert cg.packed_weight(w, torch.float32, False) is not pack


def test_nothing_is_cached_under_capture(monkeypatch):
    """Under CUDA graph capture every use packs its weight (the pack kernel is then in the graph, so each replay
    packs the weights its optimizer step left) and split-K gets a buffer of its own (nothing from the graph's
    pool kept outside it); the caches stay as they were."""
    needs_triton_here("cpu")
    from fastgan.kernels import conv_gemm as cg

    w = torch.randn(4, 16, 4, 4)
    cached = cg.packed_weight(w, torch.float32, False)
    workspace = cg._workspace(64, torch.float32, w)
    packs, workspaces = dict(cg._packs), dict(cg._workspaces)
    monkeypatch.setattr(cg, "capturing", lambda device: True)
    first, second = (cg.packed_weight(w, torch.float32, False) for _ in range(2))
    assert first is not cached and second is not first
    torch.testing.assert_close(first, w.permute(2, 3, 0, 1), rtol=0, atol=0)
    assert cg._workspace(64, torch.float32, w).data_ptr() != workspace.data_ptr()
    assert cg._packs == packs and cg._workspaces == workspaces


def test_chain_backward_gets_no_zero_gradients(monkeypatch):
    """zs and stats (the saved activations and statistics) take no gradient: ConvChain's backward receives None
    for them, not zero tensors of their size that autograd would allocate and fill every step, and the
    gradients stay right."""
    needs_triton_here("cpu")
    seen = []
    backward = conv_chain.ConvChain.backward

    def spy(ctx, dz, dzs, dstats):
        seen.append((dz, dzs, dstats))
        return backward(ctx, dz, dzs, dstats)

    monkeypatch.setattr(conv_chain.ConvChain, "backward", staticmethod(spy))
    _check_chain(_discriminator_like, (2, 3, 16, 16), 1, "cpu")
    assert len(seen) == 1
    dz, dzs, dstats = seen[0]
    assert isinstance(dz, torch.Tensor) and dzs is None and dstats is None
