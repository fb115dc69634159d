"""The kernel backends' torch.library ops (triton's and the extension's): opcheck, and torch.compile tracing a
model that uses them."""
import pytest
import torch

import fastgan
from fastgan.ops import ACTIVATIONS, backends
from parity import needs_backend_here


def _samples(ops, device, dtype):
    """Calls of every op of the kernel-ops module ``ops``: both layouts, with and without running stats, an
    affine transform and a normalisation, each activation, and an expanded dy."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 5, 5, generator=gen).to(device, dtype).requires_grad_()
    z_cl = z.detach().to(memory_format=torch.channels_last)
    w = torch.randn(4, generator=gen).add(1).to(device).requires_grad_()
    b = torch.randn(4, generator=gen).to(device).requires_grad_()
    mean, invstd = ops.channel_stats(z.detach(), None, None, 0.1, 1e-5)
    dy = torch.randn(3, 4, 5, 5, generator=gen).to(device, dtype)
    running = (torch.zeros(4, device=device), torch.ones(4, device=device))
    return [
        (ops.channel_stats, (z.detach(), *running, 0.1, 1e-5)),
        (ops.channel_stats, (z_cl.detach(), None, None, 0.1, 1e-5)),
        (ops.bn_act, (z, mean, invstd, w, b, True, ACTIVATIONS["leaky_relu"], 0.2)),
        (ops.bn_act, (z_cl.requires_grad_(), mean, invstd, None, None, False, ACTIVATIONS["relu"], 0.0)),
        (ops.bn_act, (z, None, None, None, None, False, ACTIVATIONS["tanh"], 0.0)),
        (ops.bn_act_backward, (dy, z.detach(), mean, invstd, w.detach(), b.detach(), True, ACTIVATIONS["relu"], 0.0)),
        (ops.bn_act_backward, (dy.expand_as(z), z_cl.detach(), mean, invstd, None, None, False,
                               ACTIVATIONS["leaky_relu"], 0.2)),
        (ops.bn_act_backward, (dy, z.detach(), None, None, None, None, False, ACTIVATIONS["tanh"], 0.0)),
        (ops.sigmoid_bce, (torch.randn(7, generator=gen).to(device, dtype).requires_grad_(), 0.9)),
    ]


# (backend, device, dtype): fp32 and fp64 on CPU, fp32 and fp16 on a GPU; triton's fp64 on CPU is in the slow tier
# (opcheck runs each op several times: ~30 s in the interpreter)
OPCHECK_CASES = [
    pytest.param("triton", "cpu", torch.float32, marks=pytest.mark.interpreter),
    pytest.param("triton", "cpu", torch.float64, marks=[pytest.mark.interpreter, pytest.mark.slow]),
    pytest.param("triton", "cuda", torch.float32, marks=pytest.mark.gpu),
    pytest.param("triton", "cuda", torch.float16, marks=pytest.mark.gpu),
    ("cuda", "cpu", torch.float32),
    ("cuda", "cpu", torch.float64),
    pytest.param("cuda", "cuda", torch.float32, marks=pytest.mark.gpu),
    pytest.param("cuda", "cuda", torch.float16, marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("backend,device,dtype", OPCHECK_CASES)
def test_opcheck(backend, device, dtype):
    needs_backend_here(backend, device)
    for op, args in _samples(backends.kernel_ops(backend), device, dtype):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=[pytest.mark.interpreter, pytest.mark.slow]), "cuda"])
def test_torch_compile_traces_the_fused_model(backend):
    """fullgraph: the fused ops must trace without a graph break (fake kernels, autograd, mutation)."""
    needs_backend_here(backend, "cpu")
    torch.manual_seed(0)
    gan = fastgan.DCGAN(ngf=4, ndf=4, backend=backend)
    reference = fastgan.DCGAN(ngf=4, ndf=4, backend=backend)
    reference.load_state_dict(gan.state_dict())
    real, noise = torch.tanh(torch.randn(2, 3, 64, 64)), torch.randn(2, 100, 1, 1)

    def losses(model):
        fake = model.generator(noise)
        return model.d_loss(real, fake) + model.g_loss(fake)

    compiled = torch.compile(losses, backend="aot_eager", fullgraph=True)
    loss = compiled(gan)
    loss.backward()
    expected = losses(reference)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for (name, p), q in zip(gan.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{name}: {m}")
    for (name, a), b in zip(gan.named_buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")
