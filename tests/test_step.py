"""Fusion level L3: DCGAN.train_step(..., cuda_graph=True) against the eager train_step.

On CPU the step runs eagerly on its static buffers; on a GPU it is captured once and replayed."""
import copy

import pytest
import torch

import fastgan
from fastgan.nn import fused_conv, reference
from fastgan.nn.step import CapturedStep
from parity import assert_close


def _pair(device, size=4, backend="torch", level="L1", capturable=False):
    """Two identical DCGANs with their optimizers."""
    torch.manual_seed(0)
    gans = [fastgan.DCGAN(nz=8, ngf=size, ndf=size, backend=backend).to(device) for _ in range(2)]
    gans[1].load_state_dict(gans[0].state_dict())
    opt_kwargs = dict(fused=True, capturable=True) if capturable else {}
    for gan in gans:
        fused_conv.set_level(gan, level)
    return [(gan, *reference.make_optimizers(gan.generator, gan.discriminator, **opt_kwargs)) for gan in gans]


def _batches(steps, batch, device, nz=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.tanh(2 * torch.randn(batch, 3, 64, 64, generator=gen)).to(device),
             torch.randn(batch, nz, 1, 1, generator=gen).to(device)) for _ in range(steps)]


def _assert_same_state(a, b, mode=None):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if mode is None or name.endswith("num_batches_tracked"):
            assert torch.equal(x, y), name
        else:
            assert_close(x, y, mode, name)


def test_cpu_falls_back_to_eager():
    """Same losses and same parameters, buffers and optimizer state as the eager step, bit for bit."""
    (eager, eager_g, eager_d), (graphed, opt_g, opt_d) = _pair("cpu")
    for real, noise in _batches(3, 2, "cpu"):
        expected = eager.train_step(real, eager_g, eager_d, noise=noise)
        result = graphed.train_step(real, opt_g, opt_d, noise=noise, cuda_graph=True)
        for name, got, want in zip(expected._fields, result, expected):
            assert torch.equal(got, want), name
    _assert_same_state(graphed, eager)
    for opt, ref_opt in ((opt_g, eager_g), (opt_d, eager_d)):
        for state, ref_state in zip(opt.state.values(), ref_opt.state.values()):
            assert torch.equal(state["exp_avg"], ref_state["exp_avg"])


def test_cpu_noise_drawn_like_eager():
    (eager, eager_g, eager_d), (graphed, opt_g, opt_d) = _pair("cpu")
    for real, _ in _batches(2, 2, "cpu"):
        torch.manual_seed(5)
        expected = eager.train_step(real, eager_g, eager_d)
        torch.manual_seed(5)
        result = graphed.train_step(real, opt_g, opt_d, cuda_graph=True)
        assert torch.equal(torch.stack(list(result)), torch.stack(list(expected)))
    _assert_same_state(graphed, eager)


def test_static_buffers_and_returned_losses():
    """Each call refills the static buffers; what it returns is that step's losses, not a view of the buffer."""
    (gan, opt_g, opt_d), _ = _pair("cpu")
    step = CapturedStep(gan, opt_g, opt_d)
    results = []
    for real, noise in _batches(3, 2, "cpu"):
        results.append(step(real, noise))
        (replay,) = step._replays.values()
        assert torch.equal(replay.real, real) and torch.equal(replay.noise, noise)
        assert torch.equal(torch.stack(list(results[-1])), replay.results)
    assert len({tuple(torch.stack(list(r)).tolist()) for r in results}) == 3, "results alias one buffer"
    step(*_batches(1, 3, "cpu")[0])  # a new batch size gets its own buffers (and graph)
    assert len(step._replays) == 2
    torch.backends.cudnn.allow_tf32 = True  # so does another TF32 setting (conftest restores it)
    step(*_batches(1, 3, "cpu")[0])
    assert len(step._replays) == 3


def test_one_step_per_optimizer_pair():
    (gan, opt_g, opt_d), _ = _pair("cpu")
    real, noise = _batches(1, 2, "cpu")[0]
    gan.train_step(real, opt_g, opt_d, noise=noise, cuda_graph=True)
    first = gan._captured_step
    gan.train_step(real, opt_g, opt_d, noise=noise, cuda_graph=True)
    assert gan._captured_step is first
    gan.train_step(real, opt_g, opt_d, noise=noise, label_smoothing=0.1, cuda_graph=True)
    assert gan._captured_step is not first and gan._captured_step.label_smoothing == 0.1


def test_bad_arguments():
    (gan, opt_g, opt_d), _ = _pair("cpu")
    with pytest.raises(ValueError, match="warmup"):
        CapturedStep(gan, opt_g, opt_d, warmup=0)
    with pytest.raises(TypeError, match="real must be a torch.Tensor"):
        CapturedStep(gan, opt_g, opt_d)([1.0])


# ----------------------------------------------------------------------------- GPU: capture and replay

@pytest.fixture
def deterministic_cudnn(monkeypatch):
    """The eager and the graphed step must run the same cuDNN algorithms, deterministic ones: Adam turns a
    rounding-level difference in a gradient into an lr-sized step."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


@pytest.mark.gpu
@pytest.mark.usefixtures("deterministic_cudnn")
@pytest.mark.parametrize("level", ["L1", "L2"])
def test_replay_matches_eager_gpu(level):
    """3 eager warm-up steps, the capture, then replays: the same trajectory as the eager step."""
    (eager, eager_g, eager_d), (graphed, opt_g, opt_d) = _pair("cuda", size=16, backend="triton", level=level,
                                                               capturable=True)
    for i, (real, noise) in enumerate(_batches(6, 8, "cuda")):
        expected = eager.train_step(real, eager_g, eager_d, noise=noise)
        result = graphed.train_step(real, opt_g, opt_d, noise=noise, cuda_graph=True)
        (replay,) = graphed._captured_step._replays.values()
        assert (replay.graph is not None) == (i >= 3), f"step {i}: captured after 3 warm-up steps"
        for name, got, want in zip(expected._fields, result, expected):
            assert_close(got, want, "fp32", f"step {i} {name}")
    _assert_same_state(graphed, eager, "fp32")


@pytest.mark.gpu
def test_replay_draws_fresh_noise_gpu():
    (gan, opt_g, opt_d), _ = _pair("cuda", size=8, backend="triton", capturable=True)
    step = CapturedStep(gan, opt_g, opt_d, warmup=1)
    real = _batches(1, 4, "cuda")[0][0]
    noises = []
    for _ in range(4):
        result = step(real)
        noises.append(next(iter(step._replays.values())).noise.clone())
        assert torch.isfinite(torch.stack(list(result))).all()
    assert all(not torch.equal(a, b) for a, b in zip(noises, noises[1:]))


@pytest.mark.gpu
def test_needs_capturable_optimizers_gpu():
    (gan, opt_g, opt_d), _ = _pair("cuda", backend="triton")
    real, noise = _batches(1, 2, "cuda")[0]
    with pytest.raises(ValueError, match="capturable=True"):
        gan.train_step(real, opt_g, opt_d, noise=noise, cuda_graph=True)


def test_what_a_graph_reads_changes_with_a_loaded_state_new_parameters_or_a_float_lr():
    (gan, opt_g, opt_d), _ = _pair("cpu")
    step = CapturedStep(gan, opt_g, opt_d)
    real, noise = _batches(1, 2, "cpu")[0]
    step(real, noise)
    step._reads_the_same()
    assert step._reads_the_same()
    changes = [lambda: opt_d.load_state_dict(opt_d.state_dict()), lambda: opt_g.load_state_dict(opt_g.state_dict()),
               lambda: gan.to(memory_format=torch.channels_last),
               lambda: opt_d.param_groups[0].__setitem__("lr", 1e-4)]
    for change in changes:
        change()
        assert not step._reads_the_same()
        assert step._reads_the_same()


@pytest.mark.gpu
@pytest.mark.usefixtures("deterministic_cudnn")
def test_replaced_optimizer_state_and_parameters_are_captured_again_gpu():
    """A resume's optimizer.load_state_dict or a changed float lr between replays: the graphs are dropped and
    the step goes on from the new tensors, as the eager step does from the same state."""
    (eager, eager_g, eager_d), (graphed, opt_g, opt_d) = _pair("cuda", size=8, backend="triton", capturable=True)
    for i, (real, noise) in enumerate(_batches(15, 4, "cuda")):
        if i == 5:  # the graph is replaying by now
            for opt, twin in ((opt_g, eager_g), (opt_d, eager_d)):
                opt.load_state_dict(copy.deepcopy(twin.state_dict()))  # the same values, in new tensors
        if i == 10:
            for opt in (opt_g, opt_d, eager_g, eager_d):
                opt.param_groups[0]["lr"] = 1e-4
        expected = eager.train_step(real, eager_g, eager_d, noise=noise)
        result = graphed.train_step(real, opt_g, opt_d, noise=noise, cuda_graph=True)
        (replay,) = graphed._captured_step._replays.values()
        assert (replay.graph is not None) == (i in (3, 4, 8, 9, 13, 14)), f"step {i}: warm-up again after a change"
        for name, got, want in zip(expected._fields, result, expected):
            assert_close(got, want, "fp32", f"step {i} {name}")
    _assert_same_state(graphed, eager, "fp32")
    for twin, opt in ((eager_g, opt_g), (eager_d, opt_d)):
        for a, b in zip(twin.state.values(), opt.state.values()):
            assert_close(a["exp_avg"], b["exp_avg"], "fp32", "exp_avg")
