"""DCGAN.train_step against the examples/dcgan loop (fastgan.reference.train_step), from one seed."""
import pytest
import torch

import fastgan
from fastgan.nn import reference
from fastgan.usage import UsageError
from parity import needs_backend_here, rel_l2


def _run(backend, device, steps, size, batch, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    gan = fastgan.DCGAN(ngf=size, ndf=size, backend=backend).to(device, dtype)
    ref_g = reference.Generator(ngf=size).to(device, dtype)
    ref_d = reference.Discriminator(ndf=size).to(device, dtype)
    ref_g.load_state_dict(gan.generator.state_dict())
    ref_d.load_state_dict(gan.discriminator.state_dict())
    fast_opts = reference.make_optimizers(gan.generator, gan.discriminator)
    ref_opts = reference.make_optimizers(ref_g, ref_d)
    data = torch.Generator().manual_seed(seed + 1)
    history = []
    for _ in range(steps):
        real = torch.tanh(torch.randn(batch, 3, 64, 64, generator=data) * 2).to(device, dtype)
        noise = torch.randn(batch, 100, 1, 1, generator=data).to(device, dtype)
        ref = reference.train_step(ref_g, ref_d, real, noise, *ref_opts)
        fast = gan.train_step(real, *fast_opts, noise=noise)
        history.append((torch.stack(ref).cpu(), torch.stack(list(fast)).cpu()))
    return gan, (ref_g, ref_d), history


def _check_converges_alike(gan, ref_models, history):
    for step, (ref, fast) in enumerate(history):
        assert torch.isfinite(fast).all(), f"step {step}: {fast}"
        torch.testing.assert_close(fast[:2], ref[:2], rtol=1e-3, atol=0, msg=lambda m: f"losses, step {step}: {m}")
        torch.testing.assert_close(fast[2:], ref[2:], rtol=1e-3, atol=1e-5,
                                   msg=lambda m: f"D outputs, step {step}: {m}")
    for fast_model, ref_model in zip((gan.generator, gan.discriminator), ref_models):
        fast_params = torch.cat([p.detach().flatten() for p in fast_model.parameters()])
        ref_params = torch.cat([p.detach().flatten() for p in ref_model.parameters()])
        assert rel_l2(fast_params, ref_params) <= 1e-2
        for (name, fast_buf), ref_buf in zip(fast_model.named_buffers(), ref_model.buffers()):
            if name.endswith("num_batches_tracked"):
                assert torch.equal(fast_buf, ref_buf), name
            else:
                assert rel_l2(fast_buf, ref_buf) <= 1e-2, name


# The trajectories are compared in float64.  In fp32 the reference loop is not reproducible against itself:
# scaling one weight of the reference by (1 + 1e-7) moves its losses by 1e-3 within ~15 steps, because Adam
# turns gradients that sit at rounding level into lr-sized updates of either sign.  In float64 the same two
# loops stay within 1e-15, so any difference in the step's semantics (labels, order, BN statistics, which
# gradients are kept) shows at once.

def test_50_steps_match_reference_loop():
    _check_converges_alike(*_run("torch", "cpu", steps=50, size=8, batch=8, dtype=torch.float64))


@pytest.mark.parametrize("backend,steps,size", [
    pytest.param("triton", 5, 4, marks=[pytest.mark.interpreter, pytest.mark.slow]),  # DCGAN steps in the interpreter
    ("cuda", 6, 8),  # the extension's CPU kernels
])
def test_kernel_backend_steps_match_reference_loop(backend, steps, size):
    needs_backend_here(backend, "cpu")
    _check_converges_alike(*_run(backend, "cpu", steps=steps, size=size, batch=size, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_gpu_50_steps_match_reference_loop(backend):
    needs_backend_here(backend, "cuda")
    _check_converges_alike(*_run(backend, "cuda", steps=50, size=64, batch=64, dtype=torch.float64))


def test_train_step_returns_the_step_values():
    torch.manual_seed(0)
    gan = fastgan.DCGAN(ngf=8, ndf=8, backend="torch")
    opts = reference.make_optimizers(gan.generator, gan.discriminator)
    real = torch.tanh(torch.randn(4, 3, 64, 64))
    result = gan.train_step(real, *opts)
    assert isinstance(result, fastgan.StepResult)
    assert all(v.shape == () and not v.requires_grad for v in result)
    assert 0 < result.d_x < 1 and 0 < result.d_g_z1 < 1 and 0 < result.d_g_z2 < 1
    # D's parameters still train after the G update turned their gradients off for a moment
    assert all(p.requires_grad for p in gan.discriminator.parameters())
    d_before = [p.detach().clone() for p in gan.discriminator.parameters()]
    gan.train_step(real, *opts)
    assert all(not torch.equal(a, b) for a, b in zip(d_before, gan.discriminator.parameters()))


def test_d_loss_and_g_loss_match_reference_criterion():
    torch.manual_seed(0)
    gan = fastgan.DCGAN(ngf=8, ndf=8, backend="torch")
    real, fake = torch.tanh(torch.randn(4, 3, 64, 64)), gan.generator(torch.randn(4, 100, 1, 1))
    bce = torch.nn.BCELoss()
    d = gan.discriminator
    expected_d = bce(d(real), torch.ones(4)) + bce(d(fake.detach()), torch.zeros(4))
    expected_g = bce(d(fake), torch.ones(4))
    torch.testing.assert_close(gan.d_loss(real, fake), expected_d)
    torch.testing.assert_close(gan.g_loss(fake), expected_g)
    smoothed = bce(d(real), torch.full((4,), 0.9)) + bce(d(fake), torch.zeros(4))
    torch.testing.assert_close(gan.d_loss(real, fake, label_smoothing=0.1), smoothed)


@pytest.mark.parametrize("batch,fix", [
    ((2, 3, 32, 32), "resize the images to 64x64 (examples/dcgan: transforms.Resize(64), CenterCrop(64))"),
    ((2, 1, 64, 64), "give 3-channel images, or build the DCGAN with nc=1"),
    ((3, 64, 64), "give a batch (N, C, H, W) of N >= 1 images"),
    ((2, 3, 64, 64, torch.float64), "convert it with real.to(torch.float32)"),
    ((2, 3, 64, 64, torch.uint8), "convert it with real.to(torch.float32) / 127.5 - 1, for [-1, 1]"),
])
def test_train_step_says_which_batch_it_takes(batch, fix):
    """A 32x32, 1-channel, unbatched, float64 or uint8 batch: one line naming what is expected and the fix,
    before anything trains (not a conv's or a dtype's error from deep inside)."""
    *shape, dtype = batch if isinstance(batch[-1], torch.dtype) else (*batch, torch.float32)
    gan = fastgan.DCGAN(ngf=4, ndf=4, backend="torch")
    before = {k: v.clone() for k, v in gan.state_dict().items()}
    with pytest.raises(UsageError) as info:
        gan.train_step(torch.zeros(shape, dtype=dtype), *reference.make_optimizers(gan.generator, gan.discriminator))
    message = str(info.value)
    assert message.startswith("train_step: real must be a (N, 3, 64, 64) torch.float32 batch on cpu, as the DCGAN's "
                              f"parameters, got {tuple(shape)} {dtype} on cpu; ") and "\n" not in message, message
    assert fix in message, message
    assert all(torch.equal(v, gan.state_dict()[k]) for k, v in before.items())
