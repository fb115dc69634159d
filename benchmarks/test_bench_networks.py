"""Whole-network forward passes, G(z) and D(x), in training mode with autograd recording, per peer."""
import pytest

from fastgan.perf import bench, flops

pytestmark = pytest.mark.benchmark(timer=bench.device_timer, min_time=1e-3)

PEERS = [bench.EAGER, bench.compile_peer("default"), *map(bench.fastgan_peer, bench.FASTGAN_BACKENDS)]


@pytest.mark.parametrize("net", ["G", "D"])
@pytest.mark.parametrize("peer", PEERS, ids=str)
def test_forward(run_benchmark, step_config, peer, net, device):
    reason = bench.problem(peer, step_config, device)
    if reason:
        pytest.skip(reason)
    if peer.backend is None:
        g, d = bench.reference_networks(step_config, device)
    else:
        gan = bench.fastgan_model(peer.backend, step_config, device)
        g, d = gan.generator, gan.discriminator
    real, noise = bench.sample_batch(step_config, device)
    module, x = (g, noise) if net == "G" else (d, real)
    shapes = dict(zip("GD", flops.dcgan_networks(step_config.ngf, step_config.ndf, step_config.nz)))[net]
    forward_flop = sum(layer.flops for layer in flops.gemm_layers(shapes, tuple(x.shape)))
    module = bench.for_peer(module, peer, step_config, device)
    run_benchmark(lambda: module(x), f"{net} forward {step_config}", peer, flop=forward_flop)
