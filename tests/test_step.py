"""Fusion level L3: DCGAN.train_step(..., cuda_graph=True) and CapturedStep against the eager step.

On CPU the step runs eagerly on its static buffers, and fake_graphs' stand-in takes the capture path (warm-up,
capture, replay, fallback) with the real decisions; on a GPU it is captured once and replayed."""
import copy

import pytest
import torch

import fastgan
from fake_graphs import fake_capture
from fastgan.nn import fused_conv, presets, reference
from fastgan.nn.layers import fuse
from fastgan.nn.step import CapturedStep, StepRecipe, TrainStep
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
    """Each call refills the static buffers; what train_step returns is that step's losses, not a view of the
    buffer, which CapturedStep itself returns."""
    (gan, opt_g, opt_d), _ = _pair("cpu")
    step = CapturedStep(gan.step_for(opt_g, opt_d))
    results = []
    for real, noise in _batches(3, 2, "cpu"):
        values = step(real, noise)
        (entry,) = step._entries.values()
        assert values is entry.results
        assert torch.equal(entry.real, real) and torch.equal(entry.noise, noise)
        results.append(values.clone())
    assert len({tuple(r.tolist()) for r in results}) == 3
    step(*_batches(1, 3, "cpu")[0])  # a new batch size gets its own buffers (and graph)
    assert len(step._entries) == 2
    torch.backends.cudnn.allow_tf32 = True  # so does another TF32 setting (conftest restores it)
    step(*_batches(1, 3, "cpu")[0])
    assert len(step._entries) == 3
    gan.discriminator.eval()  # and a module in another mode
    step(*_batches(1, 3, "cpu")[0])
    assert len(step._entries) == 4
    returned = gan.train_step(*_batches(1, 2, "cpu")[0][:1], opt_g, opt_d, cuda_graph=True)
    (entry,) = gan.step_for(opt_g, opt_d).captured._entries.values()
    assert torch.equal(torch.stack(list(returned)), entry.results)
    assert returned.loss_d.untyped_storage().data_ptr() != entry.results.untyped_storage().data_ptr()


def test_one_step_per_optimizer_pair():
    (gan, opt_g, opt_d), _ = _pair("cpu")
    real, noise = _batches(1, 2, "cpu")[0]
    gan.train_step(real, opt_g, opt_d, noise=noise, cuda_graph=True)
    first = gan.step_for(opt_g, opt_d)
    assert first.captured is not None
    gan.train_step(real, opt_g, opt_d, noise=noise, cuda_graph=True)
    assert gan.step_for(opt_g, opt_d) is first
    gan.train_step(real, opt_g, opt_d, noise=noise, label_smoothing=0.1, cuda_graph=True)
    smoothed = gan.step_for(opt_g, opt_d, 0.1)
    assert smoothed is not first and smoothed.recipe.label_smoothing == 0.1


def test_bad_arguments():
    (gan, opt_g, opt_d), _ = _pair("cpu")
    with pytest.raises(ValueError, match="warmup"):
        CapturedStep(gan.step_for(opt_g, opt_d), warmup=0)
    with pytest.raises(TypeError, match=r"CapturedStep takes a fastgan.nn.step.TrainStep, got DCGAN .*step_for"):
        CapturedStep(gan)
    with pytest.raises(TypeError, match="real must be a torch.Tensor"):
        CapturedStep(gan.step_for(opt_g, opt_d))([1.0])
    with pytest.raises(ValueError, match=r"loss must be one of bce, lsgan, wgan-gp, hinge, got 'wgan'"):
        StepRecipe(loss="wgan")
    with pytest.raises(ValueError, match=r"label smoothing applies to the bce and lsgan losses, not hinge"):
        StepRecipe(loss="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"d_steps must be an integer >= 1, got 0"):
        StepRecipe(d_steps=0)


# ----------------------------------------------------------------------------- the capture path on the CPU

RECIPES = {
    "bce-smoothed": StepRecipe(label_smoothing=0.1),
    "lsgan": StepRecipe(loss="lsgan", label_smoothing=0.1),
    "hinge-d2": StepRecipe(loss="hinge", d_steps=2),
    "wgan-gp-d3": StepRecipe(loss="wgan-gp", d_steps=3, gp_weight=5.0),
    "bce-g2-uniform": StepRecipe(g_steps=2, noise="uniform"),
}


def _recipe_steps(recipe, preset="mnist28", seed=7):
    """Two identical TrainSteps of ``recipe`` on a small fused preset, drawing from ``seed``."""
    steps = []
    for _ in range(2):
        torch.manual_seed(0)
        G, D, used = presets.build(preset, nz=4, ngf=2, ndf=2)
        G, D = fuse(G, "torch"), fuse(D, "torch")
        opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.5, 0.9)) for m in (G, D))
        steps.append(TrainStep(G, D, opt_g, opt_d, recipe, latent=(used.nz,), seed=seed, backend="torch"))
    shape = (4, used.nc, used.image_size, used.image_size)
    return steps, torch.rand((9, *shape), generator=torch.Generator().manual_seed(1)) * 2 - 1


def _same(a, b):
    """Bit for bit, NaN where the other has NaN (the G values of a step without G updates)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _assert_same_training(a, b):
    for net_a, net_b in ((a.generator, b.generator), (a.discriminator, b.discriminator)):
        for (name, x), y in zip(net_a.state_dict().items(), net_b.state_dict().values()):
            assert torch.equal(x, y), name
    for opt_a, opt_b in ((a.opt_g, b.opt_g), (a.opt_d, b.opt_d)):
        for state_a, state_b in zip(opt_a.state.values(), opt_b.state.values()):
            assert all(torch.equal(state_a[k], state_b[k]) for k in ("exp_avg", "exp_avg_sq")), "Adam's moments"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_captured_recipe_matches_eager_bit_for_bit(name, monkeypatch):
    """Warm-up, capture and replays (one graph per kind of step: D only, D and G) give the eager step's values
    and training exactly, the noise and the penalty's alpha drawn inside the "graph" after each reseed."""
    (eager, twin), batches = _recipe_steps(RECIPES[name])
    graphed = fake_capture(CapturedStep(twin, warmup=2), monkeypatch)
    for i, real in enumerate(batches):
        expected, got = eager(real), graphed(real)
        assert _same(got, expected), f"step {i}: {got} != {expected}"
    d_only = RECIPES[name].d_steps > 1
    assert sorted(e.g_round for e in graphed._entries.values()) == ([False, True] if d_only else [True])
    assert all(e.graph.replays > 0 for e in graphed._entries.values())
    _assert_same_training(eager, twin)
    assert twin.batches == len(batches)


def test_replays_count_per_kind_of_step(monkeypatch):
    """d_steps 3: two D-only steps, then a D and G step; each kind warms up twice, then replays."""
    (_, step), batches = _recipe_steps(StepRecipe(loss="hinge", d_steps=3))
    graphed = fake_capture(CapturedStep(step, warmup=2), monkeypatch)
    for real in batches:  # 9 steps: kinds D D G D D G D D G
        graphed(real)
    kinds = {e.g_round: e for e in graphed._entries.values()}
    assert (kinds[False].eager_steps, kinds[False].graph.replays) == (2, 4)  # 6 D-only steps
    assert (kinds[True].eager_steps, kinds[True].graph.replays) == (2, 1)  # 3 D and G steps


def test_replaced_optimizer_state_warms_up_and_captures_again(monkeypatch):
    """An optimizer.load_state_dict between replays (a resume) drops the graphs: the step warms up and captures
    again, and trains on as the eager step does from the same state."""
    (eager, twin), batches = _recipe_steps(StepRecipe(loss="hinge"))
    graphed = fake_capture(CapturedStep(twin, warmup=1), monkeypatch)
    captured_at = []
    for i, real in enumerate(batches):
        if i == 4:
            for opt, source in ((twin.opt_g, eager.opt_g), (twin.opt_d, eager.opt_d)):
                opt.load_state_dict(copy.deepcopy(source.state_dict()))  # the same values in new tensors
        assert _same(graphed(real), eager(real)), f"step {i}"
        (entry,) = graphed._entries.values()
        captured_at.append(entry.graph is not None)
    assert captured_at == [False, True, True, True, False, True, True, True, True]
    _assert_same_training(eager, twin)


def test_a_failed_capture_goes_on_eagerly_from_the_same_step(monkeypatch):
    """on_failure hears of the error once; the failed step and the rest run eagerly with the uninterrupted
    eager run's numbers.  Without on_failure the error propagates."""
    (eager, twin), batches = _recipe_steps(StepRecipe(loss="wgan-gp", d_steps=2))
    failures = []
    graphed = fake_capture(CapturedStep(twin, warmup=1, on_failure=failures.append), monkeypatch,
                           fail=RuntimeError("operation not permitted when stream is capturing"))
    for i, real in enumerate(batches):
        assert _same(graphed(real), eager(real)), f"step {i}"
    assert [str(e) for e in failures] == ["operation not permitted when stream is capturing"]
    assert graphed.eager and graphed._entries == {}
    assert all(p.requires_grad for p in twin.d_params)
    _assert_same_training(eager, twin)
    (_, other), _ = _recipe_steps(StepRecipe())
    unhandled = fake_capture(CapturedStep(other, warmup=1), monkeypatch, fail=RuntimeError("capture failed"))
    unhandled(batches[0])
    with pytest.raises(RuntimeError, match="capture failed"):
        unhandled(batches[1])


def test_a_batch_gathered_inside_the_graph(monkeypatch):
    """A callable batch (the Feeder's resident one) is read inside the step: no static copy, same numbers."""
    (eager, twin), batches = _recipe_steps(StepRecipe(loss="lsgan"))
    graphed = fake_capture(CapturedStep(twin, warmup=1), monkeypatch)
    index = torch.zeros((), dtype=torch.int64)

    def gather():
        return batches.index_select(0, index.view(1))[0]

    for i, real in enumerate(batches):
        index.fill_(i)
        assert _same(graphed(gather), eager(real)), f"step {i}"
    (entry,) = graphed._entries.values()
    assert entry.real is None and entry.source is gather and entry.graph.replays == len(batches) - 1


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
        (entry,) = graphed.step_for(opt_g, opt_d).captured._entries.values()
        assert (entry.graph is not None) == (i >= 3), f"step {i}: captured after 3 warm-up steps"
        for name, got, want in zip(expected._fields, result, expected):
            assert_close(got, want, "fp32", f"step {i} {name}")
    _assert_same_state(graphed, eager, "fp32")


@pytest.mark.gpu
def test_replay_draws_fresh_noise_gpu():
    (gan, opt_g, opt_d), _ = _pair("cuda", size=8, backend="triton", capturable=True)
    step = CapturedStep(gan.step_for(opt_g, opt_d), warmup=1)
    real = _batches(1, 4, "cuda")[0][0]
    values = [step(real).clone() for _ in range(4)]  # the same batch: the losses differ by the noise drawn
    assert all(torch.isfinite(v).all() for v in values)
    assert len({tuple(v.tolist()) for v in values}) == 4


@pytest.mark.gpu
def test_needs_capturable_optimizers_gpu():
    (gan, opt_g, opt_d), _ = _pair("cuda", backend="triton")
    real, noise = _batches(1, 2, "cuda")[0]
    with pytest.raises(ValueError, match="capturable=True"):
        gan.train_step(real, opt_g, opt_d, noise=noise, cuda_graph=True)


def test_what_a_graph_reads_changes_with_a_loaded_state_new_parameters_or_a_float_lr():
    (gan, opt_g, opt_d), _ = _pair("cpu")
    step = CapturedStep(gan.step_for(opt_g, opt_d))
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
        (entry,) = graphed.step_for(opt_g, opt_d).captured._entries.values()
        assert (entry.graph is not None) == (i in (3, 4, 8, 9, 13, 14)), f"step {i}: warm-up again after a change"
        for name, got, want in zip(expected._fields, result, expected):
            assert_close(got, want, "fp32", f"step {i} {name}")
    _assert_same_state(graphed, eager, "fp32")
    for twin, opt in ((eager_g, opt_g), (eager_d, opt_d)):
        for a, b in zip(twin.state.values(), opt.state.values()):
            assert_close(a["exp_avg"], b["exp_avg"], "fp32", "exp_avg")
