"""The triton backend's launches: on the tensors' device (not torch.cuda.current_device()), on grids within
CUDA's limits at any size the int32 indexing allows, and a clear error past that."""
import types

import pytest
import torch
from torch import nn

import fastgan
from fastgan.kernels import bn_act
from fastgan.nn.layers import FusedSequential
from fastgan.ops import ACTIVATIONS, conv_chain, triton_ops
from fastgan.ops.functional import batch_norm_act
from parity import assert_close, needs_triton_here

INT32_MAX = 2**31 - 1
GRID_YZ_MAX = 65535


def _cdiv(a, b):
    return -(-a // b)


def _like(device):
    return types.SimpleNamespace(device=torch.device(device))


class _DeviceRecorder:
    """Stands in for torch.cuda.device: records the index each guard selects and whether one is entered."""
    entered, active = [], []

    def __init__(self, index):
        self.index = index

    def __enter__(self):
        type(self).entered.append(self.index)
        type(self).active.append(self.index)

    def __exit__(self, *exc):
        type(self).active.pop()


@pytest.fixture
def device_recorder(monkeypatch):
    _DeviceRecorder.entered, _DeviceRecorder.active = [], []
    monkeypatch.setattr(torch.cuda, "device", _DeviceRecorder)
    return _DeviceRecorder


def test_the_guard_selects_the_tensors_device(device_recorder):
    with triton_ops.launch_guard("bn_act", _like("cuda:1"), None, [_like("cuda:1"), _like("cuda:1")]):
        assert device_recorder.active == [1]
    with triton_ops.launch_guard("bn_act", _like("cpu"), None):
        assert device_recorder.active == [-1]  # torch.cuda.device(-1) switches nothing
    assert device_recorder.entered == [1, -1]


def test_the_guard_rejects_tensors_on_several_devices():
    with pytest.raises(fastgan.UsageError) as info:
        triton_ops.launch_guard("conv_chain", _like("cuda:0"), [_like("cuda:1")], None)
    message = str(info.value)
    assert message == ("fastgan::conv_chain: all tensors must be on one device, got cuda:0, cuda:1; "
                       "move them to one device with .to(device)")


def _chain_args():
    links = [conv_chain.Link(True, 4, 0, True, True, True, ACTIVATIONS["relu"], 0.0, 0.1, 1e-5),
             conv_chain.Link(True, 2, 1, True, False, False, ACTIVATIONS["relu"], 0.0, 0.1, 1e-5)]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 1, 1, generator=gen)
    weights = [torch.randn(3, 4, 4, 4, generator=gen) * 0.3, torch.randn(4, 2, 4, 4, generator=gen) * 0.3]
    gammas, betas = [torch.rand(4, generator=gen) + 0.5], [torch.randn(4, generator=gen)]
    layout, scalars = conv_chain.encode(links)
    return x, weights, gammas, betas, [torch.zeros(4)], [torch.ones(4)], layout, scalars, False


@pytest.mark.interpreter
def test_every_launch_runs_inside_the_guard(device_recorder, monkeypatch):
    """Each op of the triton backend (BN, loss and the L2 chain) launches every kernel inside launch_guard."""
    needs_triton_here("cpu")
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    run = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run",
                        lambda self, *a, **k: launches.append(list(device_recorder.active)) or run(self, *a, **k))
    gen = torch.Generator().manual_seed(0)
    z, dy = torch.randn(3, 4, 5, 5, generator=gen), torch.randn(3, 4, 5, 5, generator=gen)
    w, b = torch.rand(4, generator=gen) + 0.5, torch.randn(4, generator=gen)
    chain = _chain_args()
    chain_out = []
    calls = {
        "channel_stats": lambda: triton_ops.channel_stats(z, torch.zeros(4), torch.ones(4), 0.1, 1e-5),
        "bn_act": lambda: triton_ops.bn_act(z, *triton_ops.channel_stats(z, None, None, 0.1, 1e-5), w, b, True,
                                            ACTIVATIONS["relu"], 0.0),
        "bn_act_backward": lambda: triton_ops.bn_act_backward(
            dy, z, *triton_ops.channel_stats(z, None, None, 0.1, 1e-5), w, b, True, ACTIVATIONS["relu"], 0.0),
        "sigmoid_bce": lambda: triton_ops.sigmoid_bce(torch.randn(5, generator=gen), 0.9),
        "conv_chain": lambda: chain_out.extend(conv_chain.conv_chain(*chain)),
        "conv_chain_backward": lambda: conv_chain.conv_chain_backward(
            torch.randn_like(chain_out[0]), chain[0], chain[1], chain[2], chain_out[1], chain_out[2], chain[6],
            chain[7], [1, 1, 1, 1], False),
    }
    for name, call in calls.items():
        launches.clear()
        call()
        assert launches, f"{name}: no Triton launch seen"
        assert all(active == [-1] for active in launches), f"{name}: launches outside the guard: {launches}"


# ----------------------------------------------------------------------------- grid and int32 limits


class _GridRecorder:
    """Stands in for a kernel: records the grid of each launch, runs nothing."""

    def __init__(self, name, grids):
        self.name, self.grids = name, grids

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.grids.append((self.name, grid))


@pytest.fixture
def grids(monkeypatch):
    recorded = []
    for name in ("_moments_kernel", "_finalize_kernel", "_forward_kernel", "_backward_reduce_kernel",
                 "_backward_finalize_kernel", "_backward_kernel"):
        monkeypatch.setattr(bn_act, name, _GridRecorder(name, recorded))
    return recorded


@pytest.mark.parametrize("shape,channels_last", [
    ((2**20, 1, 32, 32), False),      # NCHW: 2**19 tiles along the batch (axis z was limited to 65,535)
    ((2**21 - 1, 64, 4, 4), True),    # channels_last, 2**31 - 1024 elements: 2**20 tiles
    ((1, 1, 2**30, 1), False),        # 2**19 tiles along the positions (axis y was limited to 65,535)
    ((2**26, 31), False),             # (N, C) input
])
def test_grids_stay_within_cuda_limits_at_any_int32_size(grids, shape, channels_last):
    """The launchers' grids, at sizes up to the int32 limit (meta tensors: nothing is allocated or run)."""
    z = torch.empty(shape, device="meta")
    if channels_last:
        z = z.to(memory_format=torch.channels_last)
    C = shape[1]
    mean, invstd, w, b = (torch.empty(C, device="meta") for _ in range(4))
    bn_act.channel_stats(z, None, None, 0.1, 1e-5)
    bn_act.bn_act_forward(z, mean, invstd, w, b, ACTIVATIONS["relu"], 0.0)
    bn_act.bn_act_backward(torch.empty_like(z), z, mean, invstd, w, b, True, ACTIVATIONS["relu"], 0.0)
    assert {name for name, _ in grids} >= {"_moments_kernel", "_forward_kernel", "_backward_reduce_kernel",
                                           "_backward_kernel"}
    for name, grid in grids:
        assert 1 <= len(grid) <= 3 and grid[0] <= INT32_MAX, (name, grid)
        assert all(axis <= GRID_YZ_MAX for axis in grid[1:]), (name, grid)


@pytest.mark.interpreter
def test_several_tiles_along_every_axis_match_the_reference():
    """The 1-D grid's program -> tile map, with several tiles along N, L and C (channels_last), against torch."""
    needs_triton_here("cpu")
    tiles = bn_act._tiles(3, 36, 70, 1)
    assert all(_cdiv(size, block) > 1 for size, block in zip((3, 36, 70), tiles)), tiles
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(3, 70, 6, 6, generator=gen) * 2 + 0.5).to(memory_format=torch.channels_last)
    w, b = torch.rand(70, generator=gen) + 0.5, torch.randn(70, generator=gen)
    dy = torch.randn(3, 70, 6, 6, generator=gen)
    results = []
    for backend in ("triton", "torch"):
        z_, w_, b_ = (t.clone().requires_grad_() for t in (z, w, b))
        y = batch_norm_act(z_, w_, b_, act="leaky_relu", slope=0.2, backend=backend)
        y.backward(dy)
        results.append((y, z_.grad, w_.grad, b_.grad))
    for what, fused, ref in zip(("y", "dz", "dweight", "dbias"), *results):
        assert_close(fused.detach(), ref.detach(), what=what, grad=what != "y")


def test_too_many_elements_is_refused_before_any_copy():
    """An expanded (zero-stride) z of 2**31 elements: a clear error, not an 8 GiB contiguous copy."""
    z = torch.zeros(1, 1, 1, 1).expand(2**11, 2**10, 2**5, 2**5)
    for call in (lambda: bn_act.channel_stats(z, None, None, 0.1, 1e-5),
                 lambda: bn_act.bn_act_forward(z, None, None, None, None, ACTIVATIONS["relu"], 0.0),
                 lambda: bn_act.bn_act_backward(z, z, None, None, None, None, False, ACTIVATIONS["relu"], 0.0)):
        with pytest.raises(ValueError, match=r"^bn_act indexes with int32: z has 2147483648 elements, more than "
                                             r"2\*\*31 - 1; split the batch$"):
            call()


def test_a_gradient_reaching_past_int32_is_refused(grids):
    """dy with few elements but strides that reach past 2**31 (a view into a huge buffer; meta: nothing allocated)."""
    z = torch.empty(2, 4, 6, 6, device="meta")
    dy = torch.empty_strided((2, 4, 6, 6), (2**31, 36, 6, 1), device="meta")
    stats = [torch.empty(4, device="meta") for _ in range(4)]
    with pytest.raises(ValueError, match=r"^bn_act indexes with int32: dy \(shape \(2, 4, 6, 6\), strides "
                                         r"\(2147483648, 36, 6, 1\)\) reaches element 2147483791, past 2\*\*31 - 1; "
                                         r"pass it contiguous, or split the batch$"):
        bn_act.bn_act_backward(dy, z, *stats, True, ACTIVATIONS["relu"], 0.0)
    assert not grids
    # An expanded dy reaches nothing: accepted (and launched).
    bn_act.bn_act_backward(torch.empty(1, device="meta").expand(2, 4, 6, 6), z, *stats, True,
                           ACTIVATIONS["relu"], 0.0)
    assert grids


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_mixed_devices_are_refused_on_gpu():
    z = torch.randn(2, 3, 4, 4, device="cuda")
    with pytest.raises(fastgan.UsageError, match="^fastgan::bn_act: all tensors must be on one device, got cpu, "
                                                  "cuda:0; move them to one device with .to\\(device\\)$"):
        triton_ops.bn_act(z, torch.zeros(3), torch.ones(3), None, None, True, ACTIVATIONS["relu"], 0.0)


def _second_gpu_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.ConvTranspose2d(8, 16, 4, 1, 0, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.ConvTranspose2d(16, 8, 4, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4), nn.LeakyReLU(0.2))


@pytest.mark.gpu
@pytest.mark.parametrize("level", ["L1", "L2"])
def test_a_model_on_the_second_gpu_runs_there(level):
    """A model on cuda:1 while cuda:0 is current: every kernel runs on cuda:1 and matches the reference there."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs two CUDA devices, found {torch.cuda.device_count()}")
    torch.cuda.set_device(0)
    ref = _second_gpu_model().to("cuda:1")
    fused = FusedSequential(*_second_gpu_model().to("cuda:1"), backend="triton", level=level)
    x = torch.randn(4, 8, 1, 1, device="cuda:1")
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = fused(x_fused), ref(x_ref)
    dy = torch.randn_like(y_ref)
    y.backward(dy)
    y_ref.backward(dy)
    logits = y.detach().flatten(1).mean(1)
    loss, loss_ref = (fastgan.losses.generator_loss(logits, backend=backend) for backend in ("triton", "torch"))
    assert torch.cuda.current_device() == 0
    assert y.device == torch.device("cuda:1") and loss.device == torch.device("cuda:1")
    assert_close(y.detach(), y_ref.detach(), what="output")
    assert_close(x_fused.grad, x_ref.grad, what="input grad", grad=True)
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, what=f"{name}.grad", grad=True)
    for (name, a), b in zip(fused.named_buffers(), ref.buffers()):
        assert_close(a.double(), b.double(), what=name)
    assert_close(loss, loss_ref, what="loss")
