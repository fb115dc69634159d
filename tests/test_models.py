"""fastgan.Generator / Discriminator / DCGAN against the examples/dcgan reference models."""
import copy
import io

import pytest
import torch
from torch import nn

import fastgan
from fastgan.nn import reference
from parity import (KERNEL_BACKENDS, assert_as_close_as_torch, assert_close, needs_backend_here, needs_triton_here,
                    tf32_enabled)

# (backend, device, ngf=ndf, batch, dtype): the torch backend at the real size; triton under the
# interpreter at a tiny size on CPU, at full size on a GPU.
CASES = [
    pytest.param("torch", "cpu", 64, 8, torch.float32, id="torch-cpu-fp32"),
    pytest.param("triton", "cpu", 4, 3, torch.float32, id="triton-cpu-fp32", marks=pytest.mark.interpreter),
    pytest.param("triton", "cpu", 4, 3, torch.float16, id="triton-cpu-fp16", marks=pytest.mark.interpreter),
    pytest.param("triton", "cuda", 64, 64, torch.float32, id="triton-cuda-fp32", marks=pytest.mark.gpu),
    pytest.param("torch", "cuda", 64, 64, torch.float32, id="torch-cuda-fp32", marks=pytest.mark.gpu),
    pytest.param("cuda", "cpu", 64, 8, torch.float32, id="cuda-cpu-fp32"),  # the extension's CPU kernels
]


def _slow(cases, ids):
    """``cases`` with the slow mark on those whose id is in ``ids``."""
    return [pytest.param(*case.values, id=case.id, marks=[*case.marks, pytest.mark.slow]) if case.id in ids else case
            for case in cases]


def _pair(kind, size, backend, device, dtype, seed=0):
    """A fastgan model and a reference model with the same weights; the reference kept in fp32."""
    torch.manual_seed(seed)
    if kind == "G":
        fast, ref = fastgan.Generator(ngf=size, backend=backend), reference.Generator(ngf=size)
    else:
        fast, ref = fastgan.Discriminator(ndf=size, backend=backend), reference.Discriminator(ndf=size)
    ref.load_state_dict(fast.state_dict())
    return fast.to(device, dtype), ref.to(device)


def _inputs(kind, batch, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, 100, 1, 1) if kind == "G" else (batch, 3, 64, 64)
    return torch.randn(shape, generator=gen).to(device)


def _step(model, x, dy):
    """One training forward/backward: {name: tensor} of the output, input grad, parameter grads and buffers."""
    x = x.detach().clone().requires_grad_()
    out = model(x)
    out.backward(dy.to(out.dtype))
    results = {"output": out.detach(), "input grad": x.grad}
    results.update({f"grad of {name}": p.grad for name, p in model.named_parameters()})
    results.update({name: b.clone() for name, b in model.named_buffers()})
    return results


def _check_parity(fast, ref, x, mode):
    dtype = next(fast.parameters()).dtype
    out_shape = (x.shape[0], 3, 64, 64) if x.shape[1] == 100 else (x.shape[0],)
    dy = torch.randn(out_shape, generator=torch.Generator().manual_seed(2)).to(x.device)
    if dtype != torch.float32:
        return _check_reduced_parity(fast, ref, x, dy, mode)
    got, expected = _step(fast, x, dy), _step(ref, x, dy)
    assert got.keys() == expected.keys()
    for what, value in expected.items():
        if what.endswith("num_batches_tracked"):
            assert torch.equal(got[what], value), what
        else:
            assert_close(got[what], value, mode, what=what, grad=what.startswith(("grad", "input grad")))


def _check_reduced_parity(fast, ref, x, dy, mode, autocast=None, tf32=False):
    """Half storage, ``autocast`` to a half dtype, or fp32 with ``tf32`` on, against the exact fp32 reference
    (run with TF32 off): parity.assert_as_close_as_torch for the output, the input grad, all parameter grads
    and all running stats, against the torch composite of ``fast`` in the same precision."""
    dtype = autocast or next(fast.parameters()).dtype
    composite = copy.deepcopy(fast)
    for module in composite.modules():
        if isinstance(module, fastgan.FusedSequential):
            module.backend = "torch"
    with torch.autocast(x.device.type, dtype=dtype, enabled=autocast is not None), tf32_enabled(tf32):
        results = [_step(model, x.to(next(model.parameters()).dtype), dy) for model in (fast, composite)]
    with tf32_enabled(False):
        results.append(_step(ref, x, dy))
    got, torch_same, expected = [
        {"output": r["output"], "input grad": r["input grad"],
         "parameter grads": torch.cat([v.float().flatten() for k, v in r.items() if k.startswith("grad")]),
         "running stats": torch.cat([v.float().flatten() for k, v in r.items() if "running" in k])}
        for r in results]
    assert got["output"].dtype == dtype
    for what, value in expected.items():
        assert_as_close_as_torch(got[what], torch_same[what], value, mode, what)


@pytest.mark.parametrize("kind", ["G", "D"])
@pytest.mark.parametrize("backend,device,size,batch,dtype", _slow(CASES, {"triton-cpu-fp16"}))
def test_train_mode_parity(kind, backend, device, size, batch, dtype):
    """Output, input grad, every parameter grad, the running stats."""
    needs_backend_here(backend, device)
    fast, ref = _pair(kind, size, backend, device, dtype)
    _check_parity(fast, ref, _inputs(kind, batch, device), "fp32" if dtype == torch.float32 else "fp16")


@pytest.mark.parametrize("kind", ["G", "D"])
# train-mode fp32 parity on triton stays in the fast tier; eval mode repeats it on triton at the same cost
@pytest.mark.parametrize("backend,device,size,batch,dtype",
                         _slow(CASES, {"triton-cpu-fp32", "triton-cpu-fp16", "triton-cuda-fp32"}))
def test_eval_mode_parity(kind, backend, device, size, batch, dtype):
    needs_backend_here(backend, device)
    fast, ref = _pair(kind, size, backend, device, dtype)
    x = _inputs(kind, batch, device)
    for _ in range(2):  # give the running stats non-trivial values first
        fast(x.to(dtype))
        ref(x)
    fast.eval()
    ref.eval()
    with torch.no_grad():
        out = fast(_inputs(kind, batch, device, seed=5).to(dtype))
        expected = ref(_inputs(kind, batch, device, seed=5))
    assert_close(out.float(), expected, "fp32" if dtype == torch.float32 else "fp16", what="eval output",
                 grad=dtype != torch.float32)


@pytest.mark.parametrize("kind", ["G", "D"])
@pytest.mark.parametrize("backend,size,batch", [pytest.param("triton", 4, 2, marks=pytest.mark.interpreter),
                                                ("cuda", 16, 4)])
def test_channels_last_parity(kind, backend, size, batch):
    """A channels_last model and input, in train mode, then in eval mode."""
    needs_backend_here(backend, "cpu")
    fast, ref = _pair(kind, size, backend, "cpu", torch.float32)
    fast.to(memory_format=torch.channels_last)
    x = _inputs(kind, batch, "cpu").contiguous(memory_format=torch.channels_last)
    _check_parity(fast, ref, x, "fp32")
    fast.eval()
    ref.eval()
    with torch.no_grad():
        assert_close(fast(x), ref(x), "fp32", what="eval output")


@pytest.mark.parametrize("kind", ["G", "D"])
@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_fp64_parity(kind, backend):
    """An fp64 model (real size, batch 8) against the fp64 reference at fp64's default tolerance: the kernels
    accumulate fp64 in fp64."""
    needs_backend_here(backend, "cpu")
    fast, ref = _pair(kind, 64, backend, "cpu", torch.float64)
    ref.double()
    x = _inputs(kind, 8, "cpu").double()
    dy = torch.randn((8, 3, 64, 64) if kind == "G" else (8,), generator=torch.Generator().manual_seed(2)).double()
    got, expected = _step(fast, x, dy), _step(ref, x, dy)
    assert got.keys() == expected.keys()
    for what, value in expected.items():
        torch.testing.assert_close(got[what], value, msg=lambda m: f"{what}: {m}")


def test_state_dict_matches_reference_both_ways():
    torch.manual_seed(0)
    g, d = fastgan.Generator(), fastgan.Discriminator()
    torch.manual_seed(0)
    ref_g, ref_d = reference.Generator(), reference.Discriminator()
    for fast, ref in ((g, ref_g), (d, ref_d)):
        assert list(fast.state_dict()) == list(ref.state_dict())
        assert "main.0.weight" in fast.state_dict() and "main.1.running_mean" in ref_g.state_dict()
        for key, value in ref.state_dict().items():  # same init from the same seed
            assert torch.equal(fast.state_dict()[key], value), key
        buffer = io.BytesIO()
        torch.save(fast.state_dict(), buffer)
        buffer.seek(0)
        ref.load_state_dict(torch.load(buffer))
        fast.load_state_dict(ref.state_dict())


def test_discriminator_outputs_probabilities_and_logits():
    d = fastgan.Discriminator(ndf=8, backend="torch")
    x = torch.randn(5, 3, 64, 64)
    probs, logits = d(x), d.logits(x)
    assert probs.shape == (5,) and logits.shape == (5,)
    torch.testing.assert_close(probs, torch.sigmoid(logits))


def test_fusion_plan_covers_every_block():
    g, d = fastgan.Generator(ngf=8), fastgan.Discriminator(ndf=8)
    assert [(s.conv, s.bn, s.act) for s in g.main.fused_steps] == [
        ("0", "1", "relu"), ("3", "4", "relu"), ("6", "7", "relu"), ("9", "10", "relu"), ("12", None, "tanh")]
    assert [(s.conv, s.bn, s.act) for s in d.main.fused_steps] == [
        ("0", None, "leaky_relu"), ("2", "3", "leaky_relu"), ("5", "6", "leaky_relu"), ("8", "9", "leaky_relu")]


def _examples_dcgan_loop(netG, netD, steps, batch, seed):
    """The body of examples/dcgan main.py, unchanged but for the data: weights_init via .apply, nn.BCELoss,
    Adam(2e-4, 0.5), and a checkpoint at the end."""
    def weights_init(m):  # verbatim logic of main.py's weights_init
        classname = m.__class__.__name__
        if classname.find('Conv') != -1:
            torch.nn.init.normal_(m.weight, 0.0, 0.02)
        elif classname.find('BatchNorm') != -1:
            torch.nn.init.normal_(m.weight, 1.0, 0.02)
            torch.nn.init.zeros_(m.bias)

    torch.manual_seed(seed)
    netG.apply(weights_init)
    netD.apply(weights_init)
    criterion = nn.BCELoss()
    fixed_noise = torch.randn(batch, 100, 1, 1)
    optimizerD = torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optimizerG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
    losses = []
    for i in range(steps):
        real_cpu = torch.tanh(torch.randn(batch, 3, 64, 64))
        netD.zero_grad()
        label = torch.full((batch,), 1.0)
        output = netD(real_cpu)
        errD_real = criterion(output, label)
        errD_real.backward()
        noise = torch.randn(batch, 100, 1, 1)
        fake = netG(noise)
        label.fill_(0.0)
        output = netD(fake.detach())
        errD_fake = criterion(output, label)
        errD_fake.backward()
        errD = errD_real + errD_fake
        optimizerD.step()
        netG.zero_grad()
        label.fill_(1.0)
        output = netD(fake)
        errG = criterion(output, label)
        errG.backward()
        optimizerG.step()
        losses.append((errD.item(), errG.item()))
    fake = netG(fixed_noise)
    checkpoint = io.BytesIO()
    torch.save(netG.state_dict(), checkpoint)
    checkpoint.seek(0)
    return losses, checkpoint


def test_examples_dcgan_script_runs_unchanged():
    fast_losses, fast_ckpt = _examples_dcgan_loop(fastgan.Generator(ngf=16), fastgan.Discriminator(ndf=16), 4, 6, 3)
    ref_losses, _ = _examples_dcgan_loop(reference.Generator(ngf=16), reference.Discriminator(ndf=16), 4, 6, 3)
    for (fd, fg), (rd, rg) in zip(fast_losses, ref_losses):
        assert fd == pytest.approx(rd, rel=1e-3) and fg == pytest.approx(rg, rel=1e-3)
    reference.Generator(ngf=16).load_state_dict(torch.load(fast_ckpt))


def test_load_checkpoint_strips_dataparallel_prefix():
    ref = reference.Generator(ngf=8)
    wrapped = {"module." + k: v for k, v in ref.state_dict().items()}
    fast = fastgan.Generator(ngf=8)
    fastgan.load_checkpoint(fast, wrapped)
    for key, value in ref.state_dict().items():
        assert torch.equal(fast.state_dict()[key], value)


def test_load_checkpoint_lists_mismatched_keys():
    with pytest.raises(ValueError, match=r"shape mismatch: main\.0\.weight"):
        fastgan.load_checkpoint(fastgan.Generator(ngf=8), reference.Generator(ngf=16).state_dict())
    with pytest.raises(ValueError, match="missing keys: .*unexpected keys"):
        fastgan.load_checkpoint(fastgan.Generator(ngf=8), reference.Discriminator(ndf=8).state_dict())


def test_fuse_shares_parameters_and_keeps_state_dict():
    ref = reference.Discriminator(ndf=8)
    before = copy.deepcopy(ref.state_dict())
    fused = fastgan.fuse(ref, backend="torch")
    assert fused is ref and isinstance(ref.main, fastgan.FusedSequential)
    assert len(ref.main.fused_steps) == 4
    assert list(ref.state_dict()) == list(before)
    x = torch.randn(2, 3, 64, 64)
    expected = reference.Discriminator(ndf=8)
    expected.load_state_dict(before)
    torch.testing.assert_close(ref(x), expected(x))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["G", "D"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_gpu_full_size_parity(kind, backend, precision):
    """Full size (ngf=ndf=64, batch 128) on the GPU: fp32 with TF32 off, TF32, and bf16 autocast."""
    needs_backend_here(backend, "cuda")
    fast, ref = _pair(kind, 64, backend, "cuda", torch.float32)
    x = _inputs(kind, 128, "cuda")
    if precision == "fp32":
        _check_parity(fast, ref, x, precision)
    else:  # against the exact fp32 reference, as close as torch's own TF32 / bf16 step
        dy = torch.randn((128, 3, 64, 64) if kind == "G" else (128,), device="cuda")
        _check_reduced_parity(fast, ref, x, dy, precision, autocast=torch.bfloat16 if precision == "bf16" else None,
                              tf32=precision == "tf32")


@pytest.mark.slow
@pytest.mark.interpreter
@pytest.mark.parametrize("kind", ["G", "D"])
def test_autocast_fp16_parity(kind):
    needs_triton_here("cpu")
    fast, ref = _pair(kind, 4, "triton", "cpu", torch.float32)
    x = _inputs(kind, 3, "cpu")
    dy = torch.randn((3, 3, 64, 64) if kind == "G" else (3,), generator=torch.Generator().manual_seed(2))
    _check_reduced_parity(fast, ref, x, dy, "fp16", autocast=torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["G", "D"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gpu_fp16_storage_model(kind, backend):
    """An fp16 model (real size, batch 32) against the exact fp32 reference, as close as torch's fp16 step."""
    needs_backend_here(backend, "cuda")
    fast, ref = _pair(kind, 64, backend, "cuda", torch.float16)
    x = _inputs(kind, 32, "cuda")
    dy = torch.randn((32, 3, 64, 64) if kind == "G" else (32,), device="cuda")
    _check_reduced_parity(fast, ref, x, dy, "fp16")
