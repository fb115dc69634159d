"""One examples/dcgan train step (D on real, D on G(z).detach(), D on G(z), both Adam updates) per peer."""
import pytest

from fastgan.perf import bench, flops

pytestmark = pytest.mark.benchmark(timer=bench.device_timer, min_time=1e-3)


@pytest.mark.parametrize("peer", bench.train_step_peers(), ids=str)
def test_train_step(run_benchmark, step_config, peer, device):
    reason = bench.problem(peer, step_config, device)
    if reason:
        pytest.skip(reason)
    step = bench.make_train_step(peer, step_config, device)
    step_flops = flops.dcgan_step_flops(step_config.batch, step_config.ngf, step_config.ndf, step_config.nz)
    run_benchmark(step, f"train_step {step_config}", peer, flop=step_flops.total)
