"""Fused ops at the activation shapes of a DCGAN 64x64 train step, forward and forward+backward.

batch_norm_act runs at every fused layer (G1..G5, D1..D4) and the GAN losses on (batch,) logits;
the "eager" peer is the torch composite (backend="torch"), beside each kernel backend. Inputs
require grad, as in training. With bf16, z is bf16 (the conv output under autocast) and
channels_last, while BN parameters and running stats stay fp32.
"""
import pytest
import torch

from fastgan.nn import losses
from fastgan.ops import functional
from fastgan.perf import bench

pytestmark = pytest.mark.benchmark(timer=bench.device_timer, min_time=1e-3)

PEERS = [bench.EAGER, bench.fastgan_peer("triton"), bench.fastgan_peer("cuda")]
PASSES = ["forward", "forward+backward"]
LAYERS = [layer.name for layer in bench.fused_layers(bench.Config())]


def _dtype(config):
    return torch.bfloat16 if config.dtype == "bf16" else torch.float32


def _timed_call(forward, inputs, pass_):
    """forward, or forward and the gradients of ``inputs`` (torch.autograd.grad: nothing accumulates)."""
    if pass_ == "forward":
        return forward
    dy = None

    def forward_backward():
        nonlocal dy
        y = forward()
        if dy is None:
            dy = torch.randn_like(y)
        return torch.autograd.grad(y, inputs, dy)

    return forward_backward


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("peer", PEERS, ids=str)
@pytest.mark.parametrize("layer_name", LAYERS)
def test_batch_norm_act(run_benchmark, op_config, layer_name, peer, pass_, device):
    reason = bench.problem(peer, op_config, device)
    if reason:
        pytest.skip(reason)
    layer = next(layer for layer in bench.fused_layers(op_config) if layer.name == layer_name)
    channels = layer.shape[1]
    z = torch.randn(layer.shape, device=device, dtype=_dtype(op_config))
    z = z.contiguous(memory_format=op_config.memory_format).requires_grad_()
    inputs, bn = [z], {}
    if layer.normalize:
        weight = (1 + 0.02 * torch.randn(channels, device=device)).requires_grad_()
        bias = (0.1 * torch.randn(channels, device=device)).requires_grad_()
        bn = dict(weight=weight, bias=bias, running_mean=torch.zeros(channels, device=device),
                  running_var=torch.ones(channels, device=device))
        inputs += [weight, bias]
    backend = peer.backend or "torch"

    def forward():
        return functional.batch_norm_act(z, **bn, normalize=layer.normalize, act=layer.act, slope=layer.slope,
                                         backend=backend)

    run_benchmark(_timed_call(forward, inputs, pass_), f"bn_act {layer.name} {pass_} {op_config}", peer,
                  shape=list(layer.shape), act=layer.act, normalize=layer.normalize)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("peer", PEERS, ids=str)
@pytest.mark.parametrize("loss", ["discriminator", "generator"])
def test_loss(run_benchmark, loss_config, loss, peer, pass_, device):
    reason = bench.problem(peer, loss_config, device)
    if reason:
        pytest.skip(reason)
    real, fake = (3 * torch.randn(loss_config.batch, device=device, dtype=_dtype(loss_config)) for _ in range(2))
    real.requires_grad_()
    fake.requires_grad_()
    backend = peer.backend or "torch"
    if loss == "discriminator":
        def forward():
            return losses.discriminator_loss(real, fake, backend=backend)
        inputs = [real, fake]
    else:
        def forward():
            return losses.generator_loss(fake, backend=backend)
        inputs = [fake]
    run_benchmark(_timed_call(forward, inputs, pass_),
                  f"{loss}_loss {pass_} b{loss_config.batch}-{loss_config.dtype}", peer)
