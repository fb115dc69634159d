"""fastgan.flops: the analytic FLOP count against docs/design.md section 5 and against torch's FlopCounterMode."""
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fastgan
from fastgan.nn import reference
from fastgan.perf import flops


def test_dcgan_floor_is_the_design_figure():
    # docs/design.md section 5: batch 128, 64x64, ngf=ndf=64: about 318 GFLOP, about 291 without D wgrads in the G step.
    full = flops.dcgan_step_flops(128)
    lean = flops.dcgan_step_flops(128, d_weight_grads_in_g_step=False)
    assert full.total / 1e9 == pytest.approx(318, abs=1)
    assert lean.total / 1e9 == pytest.approx(291, abs=1)
    assert lean.forward == full.forward
    # "with ngf=ndf=128, it is 4x that": the inner layers scale 4x, the first and last only 2x.
    assert 3.9 < flops.dcgan_step_flops(128, 128, 128).total / full.total < 4.0


def _counted(fn):
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("module, shape", [
    (nn.Conv2d(4, 6, (3, 5), stride=2, padding=1, groups=2, bias=False), (2, 4, 9, 11)),
    (nn.ConvTranspose2d(4, 6, 4, stride=2, padding=1, output_padding=1, groups=2, bias=False), (2, 4, 5, 7)),
    (nn.Linear(12, 5), (3, 2, 12)),
], ids=["conv", "conv_transpose", "linear"])
def test_layer_flops_match_flop_counter(module, shape):
    x = torch.randn(shape)
    (layer,) = flops.gemm_layers(module, shape)
    assert layer.input_shape == shape and layer.output_shape == tuple(module(x).shape)
    assert layer.flops == _counted(lambda: module(x))


def _batch(seed, batch=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.tanh(torch.randn(batch, 3, 64, 64, generator=gen)), torch.randn(batch, 100, 1, 1, generator=gen)


def test_reference_step_flops_match_flop_counter():
    g, d = reference.Generator(ngf=4), reference.Discriminator(ndf=4)
    opt_g, opt_d = reference.make_optimizers(g, d)
    real, noise = _batch(0)
    measured = _counted(lambda: reference.train_step(g, d, real, noise, opt_g, opt_d))
    assert flops.train_step_flops(g, d, batch=2).total == measured


def test_fastgan_step_skips_d_weight_grads_in_g_step():
    gan = fastgan.DCGAN(ngf=4, ndf=4, backend="torch")
    opt_g, opt_d = reference.make_optimizers(gan.generator, gan.discriminator)
    real, noise = _batch(1)
    measured = _counted(lambda: gan.train_step(real, opt_g, opt_d, noise=noise))
    assert flops.dcgan_step_flops(2, 4, 4, d_weight_grads_in_g_step=False).total == measured
    assert flops.dcgan_step_flops(2, 4, 4).total > measured


def test_gemm_layers_leaves_the_model_alone():
    g = reference.Generator(ngf=4)
    before = {k: v.clone() for k, v in g.state_dict().items()}
    layers = flops.gemm_layers(g, (3, 100, 1, 1))
    assert [layer.name for layer in layers] == [f"main.{i}" for i in (0, 3, 6, 9, 12)]
    assert layers[-1].output_shape == (3, 3, 64, 64)
    assert all(not p.is_meta for p in g.parameters())
    for k, v in g.state_dict().items():
        assert torch.equal(v, before[k]), k
