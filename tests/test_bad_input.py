"""Bad input gets a clear ValueError/TypeError that names what was expected."""
import numpy as np
import pytest
import torch

import fastgan
from fastgan.nn import losses
from fastgan.ops.functional import batch_norm_act, sigmoid_bce
from parity import needs_triton_here


@pytest.fixture
def gan():
    return fastgan.DCGAN(ngf=4, ndf=4, backend="torch")


def test_wrong_rank(gan):
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 100, H, W\), got \(4, 100\)"):
        gan.generator(torch.randn(4, 100))
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 3, H, W\), got \(2, 64, 64\)"):
        gan.discriminator(torch.randn(2, 64, 64))  # 3-D, but not an unbatched image: its channels are not 3


def test_unbatched_image_fails_as_in_the_reference(gan):
    """An unbatched (C, H, W) image runs through the modules' own forward, as in examples/dcgan's D: its first
    conv takes it, and the BatchNorm after the second refuses it with torch's own message."""
    ref = fastgan.reference.Discriminator(ndf=4)
    ref.load_state_dict(gan.discriminator.state_dict())
    x = torch.randn(3, 64, 64)
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        ref(x)
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        gan.discriminator(x)


def test_wrong_channel_count(gan):
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\), got \(2, 1, 64, 64\)"):
        gan.discriminator(torch.randn(2, 1, 64, 64))
    with pytest.raises(ValueError, match=r"\(N, 100, H, W\), got \(2, 64, 1, 1\)"):
        gan.generator(torch.randn(2, 64, 1, 1))


def test_integer_dtype(gan):
    with pytest.raises(TypeError, match="floating point .* got torch.int64"):
        gan.discriminator(torch.randint(0, 255, (2, 3, 64, 64)))
    with pytest.raises(TypeError, match="floating point .* got torch.int32"):
        losses.generator_loss(torch.ones(4, dtype=torch.int32))


@pytest.mark.gpu
def test_mixed_devices(gan):
    with pytest.raises(ValueError, match="on cuda:0 but the layer's parameters are on cpu"):
        gan.discriminator(torch.randn(2, 3, 64, 64, device="cuda"))
    with pytest.raises(ValueError, match="real_logits are on cpu but fake_logits on cuda"):
        losses.discriminator_loss(torch.randn(2), torch.randn(2, device="cuda"))


def test_mixed_devices_meta(gan):
    """The same check without a GPU: parameters on CPU, input on the meta device."""
    with pytest.raises(ValueError, match="on meta but the layer's parameters are on cpu"):
        gan.discriminator(torch.randn(2, 3, 64, 64, device="meta"))
    with pytest.raises(ValueError, match="real_logits are on cpu but fake_logits on meta"):
        losses.discriminator_loss(torch.randn(2), torch.randn(2, device="meta"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_batch_too_small_for_batch_statistics(backend):
    if backend == "triton":
        needs_triton_here("cpu")
    d = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.BatchNorm1d(3), torch.nn.ReLU())
    fused = fastgan.fuse(d, backend=backend)
    with pytest.raises(ValueError, match="more than one value per channel.*batch of 2 or more, or call .eval"):
        fused(torch.randn(1, 5))
    fused.eval()
    assert fused(torch.randn(1, 5)).shape == (1, 3)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_batch_norm_act_wants_floats(dtype):
    with pytest.raises(TypeError, match=f"z must be floating point .* got {dtype}; convert it with .float()"):
        batch_norm_act(torch.zeros(2, 3, 4, 4, dtype=dtype), torch.ones(3), torch.zeros(3), backend="torch")


def test_sigmoid_bce_wants_a_number_target():
    logits = torch.randn(4)
    with pytest.raises(TypeError, match="target must be a number, the label of every element .* got Tensor; for a "
                                        "target per element use torch.nn.functional.binary_cross_entropy_with_logits"):
        sigmoid_bce(logits, torch.ones(4), backend="torch")
    assert torch.allclose(sigmoid_bce(logits, np.float32(1.0), backend="torch"),
                          sigmoid_bce(logits, 1, backend="torch"))


def test_bad_activation_and_backend_names():
    with pytest.raises(ValueError, match="act must be one of"):
        batch_norm_act(torch.randn(2, 3, 4, 4), act="gelu", backend="torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        fastgan.Generator(backend="cudnn")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\)"):
        losses.discriminator_loss(torch.randn(2), torch.randn(2), label_smoothing=1.5)


def test_nan_inputs_propagate_like_the_reference(gan):
    x = torch.randn(2, 3, 64, 64)
    x[0, 0, 10, 10] = float("nan")
    ref = fastgan.reference.Discriminator(ndf=4)
    ref.load_state_dict(gan.discriminator.state_dict())
    assert torch.equal(torch.isnan(gan.discriminator(x)), torch.isnan(ref(x)))
