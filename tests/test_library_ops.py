"""The triton backend's torch.library ops: opcheck, and torch.compile tracing a model that uses them."""
import pytest
import torch

import fastgan
from fastgan import ops
from fastgan.ops import backends
from parity import DEVICES, needs_triton_here


def _samples(device):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 5, 5, generator=gen).to(device).requires_grad_()
    w = torch.randn(4, generator=gen).add(1).to(device).requires_grad_()
    b = torch.randn(4, generator=gen).to(device).requires_grad_()
    mean, invstd = ops.channel_stats(z.detach(), None, None, 0.1, 1e-5)
    dy = torch.randn(3, 4, 5, 5, generator=gen).to(device)
    running = (torch.zeros(4, device=device), torch.ones(4, device=device))
    return [
        (ops.channel_stats, (z.detach(), *running, 0.1, 1e-5)),
        (ops.channel_stats, (z.detach().to(memory_format=torch.channels_last), None, None, 0.1, 1e-5)),
        (ops.bn_act, (z, mean, invstd, w, b, True, ops.ACTIVATIONS["leaky_relu"], 0.2)),
        (ops.bn_act, (z, mean, invstd, None, None, False, ops.ACTIVATIONS["relu"], 0.0)),
        (ops.bn_act, (z, None, None, None, None, False, ops.ACTIVATIONS["tanh"], 0.0)),
        (ops.bn_act_backward, (dy, z.detach(), mean, invstd, w.detach(), b.detach(), True, 1, 0.0)),
        (ops.sigmoid_bce, (torch.randn(7, generator=gen).to(device).requires_grad_(), 0.9)),
    ]


@pytest.mark.interpreter
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    needs_triton_here(device)
    for op, args in _samples(device):
        torch.library.opcheck(op, args)


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.slow), "cuda"])
def test_torch_compile_traces_the_fused_model(backend):
    """fullgraph: the fused ops must trace without a graph break (fake kernels, autograd, mutation)."""
    if backend == "triton":
        needs_triton_here("cpu")
    else:
        try:  # test_cuda_ext.py checks that the extension builds; here it only has to trace
            backends.resolve("cuda", torch.device("cpu"))
        except fastgan.BackendUnavailable as exc:
            pytest.skip(str(exc))
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
