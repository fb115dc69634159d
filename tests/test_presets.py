"""Presets (docs/design.md section 8): fastgan.fuse of each reference nn.Sequential against the reference itself,
after a train-mode forward and backward (output, input grad, every parameter grad, running stats) and
in eval mode; the torch backend at the recipes' widths, Triton (interpreted on CPU) at tiny ones."""
import copy

import pytest
import torch
from torch import nn

from fastgan.nn import presets, reference
from fastgan.nn.checkpoint import strip_module_prefix
from fastgan.nn.layers import FusedSequential, fuse
from parity import assert_close, needs_triton_here

BATCH = 4
TINY = dict(nz=6, ngf=2, ndf=2)


def _pass(model, x, dy):
    """Forward + backward in train mode; everything the parity compares."""
    x = x.clone().requires_grad_()
    y = model(x)
    y.backward(dy)
    out = {"output": y.detach(), "input grad": x.grad}
    out.update({f"grad {k}": p.grad for k, p in model.named_parameters()})
    out.update({f"buffer {k}": b.clone() for k, b in model.named_buffers()})
    return out


def _check(name, part, backend, sizes, device="cpu"):
    torch.manual_seed(0)
    G, D, recipe = presets.build(name, **sizes)
    ref = (G if part == "G" else D).to(device)
    fused = fuse(copy.deepcopy(ref), backend)
    gen = torch.Generator().manual_seed(1)
    image = (BATCH, recipe.nc, recipe.image_size, recipe.image_size)
    if part == "G":
        x, dy = torch.randn(BATCH, recipe.nz, generator=gen), torch.randn(image, generator=gen)
    else:
        x, dy = torch.rand(image, generator=gen) * 2 - 1, torch.randn(BATCH, generator=gen)
    x, dy = x.to(device), dy.to(device)
    got, expected = _pass(fused, x, dy), _pass(ref, x, dy)
    assert got.keys() == expected.keys()
    for key in expected:
        assert_close(got[key].double(), expected[key].double(), "fp32", what=f"{name} {part} {key}",
                     grad="grad" in key)
    fused.eval(), ref.eval()
    with torch.no_grad():
        assert_close(fused(x), ref(x), "fp32", what=f"{name} {part} eval output")


def _covered(model):
    """Names of the modules that the fused steps of ``model`` run."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, FusedSequential):
            for step in module.fused_steps:
                start = list(module._modules).index(step.conv)
                names.update(f"{prefix}.{n}".lstrip(".") for n in list(module._modules)[start:step.last + 1])
    return names


@pytest.mark.parametrize("name", presets.PRESETS)
def test_fuse_covers_every_bn_and_activation(name):
    G, D, _ = presets.build(name, **TINY)
    for model in (G, D):
        expected = {n for n, m in model.named_modules()
                    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.LeakyReLU, nn.Tanh))}
        keys = model.state_dict().keys()
        fused = fuse(model)
        assert expected and expected <= _covered(fused)
        assert fused.state_dict().keys() == keys


@pytest.mark.parametrize("part", ["G", "D"])
@pytest.mark.parametrize("name", presets.PRESETS)
def test_parity_torch_backend(name, part):
    _check(name, part, "torch", {})


@pytest.mark.interpreter
@pytest.mark.parametrize("part", ["G", "D"])
@pytest.mark.parametrize("name", [name if name == "dcgan64" else pytest.param(name, marks=pytest.mark.slow)
                                  for name in presets.PRESETS])  # dcgan64 in the fast tier, the rest slow
def test_parity_triton(name, part):
    needs_triton_here("cpu")
    _check(name, part, "triton", TINY)


@pytest.mark.gpu
@pytest.mark.parametrize("part", ["G", "D"])
@pytest.mark.parametrize("name", presets.PRESETS)
def test_parity_triton_cuda(name, part):
    needs_triton_here("cuda")
    _check(name, part, "triton", {}, device="cuda")


@pytest.mark.parametrize("name", presets.PRESETS)
def test_recipe_geometry(name):
    G, D, recipe = presets.build(name, **TINY)
    images = G(torch.randn(3, recipe.nz))
    assert images.shape == (3, recipe.nc, recipe.image_size, recipe.image_size)
    assert images.abs().max() <= 1
    assert D(images).shape == (3,)


def test_dcgan64_is_examples_dcgan():
    """dcgan64 checkpoints load into examples/dcgan's models and give the same images and logits."""
    torch.manual_seed(0)
    G, D, _ = presets.build("dcgan64", nz=20, ngf=4, ndf=4)
    ref_g, ref_d = reference.Generator(nz=20, ngf=4), reference.Discriminator(ndf=4)
    ref_g.load_state_dict(G.state_dict())
    ref_d.load_state_dict(D.state_dict())
    z = torch.randn(3, 20)
    images = G(z)
    assert torch.equal(images, ref_g(z[:, :, None, None]))
    assert torch.equal(torch.sigmoid(D(images)), ref_d(images))


@pytest.mark.parametrize("name", presets.PRESETS)
def test_generator_config_from_shapes(name):
    G, _, _ = presets.build(name, nz=7, ngf=3, nc=1)
    state = {f"module.{k}" if i % 2 else k: v for i, (k, v) in enumerate(G.state_dict().items())}
    assert presets.generator_config(strip_module_prefix(state)) == (name, dict(nz=7, ngf=3, nc=1))


def test_bad_preset_and_sizes():
    with pytest.raises(ValueError, match="unknown preset 'dcgan32'.*dcgan64"):
        presets.build("dcgan32")
    with pytest.raises(ValueError, match="preset dcgan64: ngf must be a positive integer, got 0"):
        presets.build("dcgan64", ngf=0)
    _, D, _ = presets.build("mnist28", **TINY)
    with pytest.raises(ValueError, match="fit no preset generator"):
        presets.generator_config(D.state_dict())
