"""GAN losses beside BCE (lsgan, hinge, wgan-gp), the gradient penalty's double backward against a reference
penalty on the reference critic, the CLI's train step against examples/dcgan's and a plain-torch WGAN-GP step,
and every recipe of fastgan.nn.step (losses, label smoothing, D:G ratios, noise) against the same recipe written
out in plain torch on the unfused modules."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fastgan.cli.train import Settings, Trainer
from fastgan.nn import losses, presets, reference
from fastgan.nn.layers import fuse
from fastgan.nn.step import StepRecipe, TrainStep
from parity import assert_close, needs_triton_here

# the triton cases (whole DCGAN steps in the interpreter) are the slow tier; the torch ones keep the recipes fast
BACKENDS = ["torch", pytest.param("triton", marks=[pytest.mark.interpreter, pytest.mark.slow])]


def _backend(backend):
    if backend == "triton":
        needs_triton_here("cpu")
    return backend


def test_loss_formulas():
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(2, 7, generator=gen).half()
    r, f = real.float(), fake.float()
    cases = [
        (losses.lsgan_discriminator_loss(real, fake, 0.1), 0.5 * ((r - 0.9) ** 2).mean() + 0.5 * (f ** 2).mean()),
        (losses.lsgan_generator_loss(fake), 0.5 * ((f - 1) ** 2).mean()),
        (losses.hinge_discriminator_loss(real, fake), (1 - r).clamp(min=0).mean() + (1 + f).clamp(min=0).mean()),
        (losses.wasserstein_discriminator_loss(real, fake), f.mean() - r.mean()),
        (losses.wasserstein_generator_loss(fake), -f.mean()),
    ]
    for got, expected in cases:
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\)"):
        losses.lsgan_discriminator_loss(real, fake, 1.0)


def _reference_penalty(critic, real, fake, alpha, weight):
    x = (alpha.view(-1, 1, 1, 1) * real + (1 - alpha.view(-1, 1, 1, 1)) * fake).requires_grad_(True)
    out = critic(x)
    (grad,) = torch.autograd.grad(out, x, grad_outputs=torch.ones_like(out), create_graph=True)
    return weight * ((grad.reshape(len(x), -1).norm(dim=1) - 1) ** 2).mean()


def _critic_inputs(recipe, n=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, recipe.nc, recipe.image_size, recipe.image_size)
    return (torch.rand(shape, generator=gen) * 2 - 1, torch.rand(shape, generator=gen) * 2 - 1,
            torch.rand(n, generator=gen))


def _grads_and_buffers(model):
    out = {f"grad {k}": p.grad for k, p in model.named_parameters()}
    out.update({f"buffer {k}": b.clone() for k, b in model.named_buffers()})
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["anime64", "dcgan64"])
def test_gradient_penalty_matches_reference(name, backend):
    """WGAN-GP's critic loss with a fused critic (the penalty falls back to double-differentiable ops by
    itself) against the same loss on the reference critic: value, every parameter grad, running stats."""
    torch.manual_seed(0)
    _, ref, recipe = presets.build(name, nz=4, ngf=2, ndf=2)
    critic = fuse(copy.deepcopy(ref), _backend(backend))
    real, fake, alpha = _critic_inputs(recipe)
    fake_leaf = fake.clone().requires_grad_(True)  # as G(z) would be: the penalty must not reach it
    real_out, fake_out = critic(real), critic(fake)  # BN running stats: the order of the passes matters
    penalty = losses.gradient_penalty(critic, real, fake_leaf, 10.0, alpha)
    loss = losses.wasserstein_discriminator_loss(real_out, fake_out) + penalty
    loss.backward()
    ref_real, ref_fake = ref(real), ref(fake)
    ref_penalty = _reference_penalty(ref, real, fake, alpha, 10.0)
    ref_loss = ref_fake.mean() - ref_real.mean() + ref_penalty
    ref_loss.backward()
    assert penalty.dtype == torch.float32 and penalty.item() > 0
    assert_close(penalty, ref_penalty, what="penalty")
    assert_close(loss, ref_loss, what="critic loss")
    assert fake_leaf.grad is None
    got, expected = _grads_and_buffers(critic), _grads_and_buffers(ref)
    for key in expected:
        assert_close(got[key].double(), expected[key].double(), what=key, grad=key.startswith("grad"))


def test_gradient_penalty_ignores_autocast():
    """The penalty's critic pass runs in fp32 under autocast (fp16 input gradients could overflow)."""
    torch.manual_seed(0)
    _, critic, recipe = presets.build("anime64", nz=4, ngf=2, ndf=2)
    real, fake, alpha = _critic_inputs(recipe)
    real, fake = real.bfloat16(), fake.bfloat16()
    state = copy.deepcopy(critic.state_dict())
    plain = losses.gradient_penalty(critic, real.float(), fake.float(), 10.0, alpha)
    critic.load_state_dict(state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = losses.gradient_penalty(critic, real, fake, 10.0, alpha)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, rtol=0, atol=0)


def _settings(recipe, loss, **kw):
    base = dict(preset="dcgan64", nz=recipe.nz, ngf=recipe.ngf, ndf=recipe.ndf, nc=recipe.nc,
                image_size=recipe.image_size, batch_size=4, loss=loss, lr=recipe.lr, beta1=recipe.betas[0],
                beta2=recipe.betas[1], weight_decay=0.0, label_smoothing=0.0, d_steps=1, g_steps=1, noise="normal")
    return Settings(**{**base, **kw})


def _params_and_buffers(model):
    return {**{k: p.detach() for k, p in model.named_parameters()}, **dict(model.named_buffers())}


def _compare_models(got, expected, what):
    got, expected = _params_and_buffers(got), _params_and_buffers(expected)
    for key in expected:
        assert_close(got[key].double(), expected[key].double(), what=f"{what} {key}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bce_step_is_examples_dcgan(backend):
    """The CLI's Trainer step (dcgan64, bce) against examples/dcgan's step on its own models."""
    sizes = dict(nz=8, ngf=4, ndf=4) if backend == "torch" else dict(nz=4, ngf=2, ndf=2)
    torch.manual_seed(0)
    G, D, recipe = presets.build("dcgan64", **sizes)
    ref_g, ref_d = reference.Generator(recipe.nz, recipe.ngf), reference.Discriminator(ndf=recipe.ndf)
    ref_g.load_state_dict(G.state_dict())
    ref_d.load_state_dict(D.state_dict())
    G, D = fuse(G, _backend(backend)), fuse(D, backend)
    real, _, _ = _critic_inputs(recipe)
    noise = torch.randn(4, recipe.nz, generator=torch.Generator().manual_seed(2))
    result = Trainer(G, D, _settings(recipe, "bce"), backend=backend).step(real, noise)
    ref = reference.train_step(ref_g, ref_d, real, noise[:, :, None, None], *reference.make_optimizers(ref_g, ref_d))
    for got, expected, what in zip(result, ref, ("loss_D", "loss_G", "D(x)", "D(G(z)) 1", "D(G(z)) 2")):
        assert_close(got, expected.float(), what=what)
    _compare_models(G, ref_g, "G")
    _compare_models(D, ref_d, "D")


@pytest.mark.parametrize("backend", BACKENDS)
def test_wgan_gp_step_matches_plain_torch(backend, monkeypatch):
    """A wgan-gp Trainer step (D step with the penalty, then G step) against the same step written in
    plain torch on the reference modules."""
    torch.manual_seed(0)
    G, D, recipe = presets.build("anime64", nz=4, ngf=2, ndf=2)
    ref_g, ref_d = copy.deepcopy(G), copy.deepcopy(D)
    G, D = fuse(G, _backend(backend)), fuse(D, backend)
    s = _settings(recipe, "wgan-gp", preset="anime64", lr=1e-4, beta1=0.0, beta2=0.9)
    real, _, _ = _critic_inputs(recipe)
    noise = torch.randn(4, recipe.nz, generator=torch.Generator().manual_seed(2))
    alphas, penalty = [], losses.gradient_penalty
    monkeypatch.setattr(losses, "gradient_penalty", lambda *a: alphas.append(a[-1]) or penalty(*a))
    Trainer(G, D, s, backend=backend, seed=5).step(real, noise)
    (alpha,) = alphas

    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=1e-4, betas=(0.0, 0.9)) for m in (ref_g, ref_d))
    real_out = ref_d(real)
    fake = ref_g(noise)
    loss_d = ref_d(fake.detach()).mean() - real_out.mean() + _reference_penalty(ref_d, real, fake.detach(), alpha, 10)
    loss_d.backward()
    opt_d.step()
    ref_g.zero_grad()
    (-ref_d(fake).mean()).backward()
    opt_g.step()
    _compare_models(G, ref_g, "G")
    _compare_models(D, ref_d, "D")


# (preset, recipe): each loss, label smoothing, D:G 2:1 and 3:1, two G updates a round with uniform z
RECIPES = {
    "dcgan64-bce-smoothed": ("dcgan64", StepRecipe(label_smoothing=0.1)),
    "mnist28-lsgan-smoothed": ("mnist28", StepRecipe(loss="lsgan", label_smoothing=0.2)),
    "anime64-hinge-d2": ("anime64", StepRecipe(loss="hinge", d_steps=2)),
    "anime64-wgan-gp-d3": ("anime64", StepRecipe(loss="wgan-gp", d_steps=3, gp_weight=5.0)),
    "avatar48-bce-g2-uniform": ("avatar48", StepRecipe(g_steps=2, noise="uniform")),
    "mlp-mnist-bce": ("mlp-mnist", StepRecipe(label_smoothing=0.1)),
}


def _plain_step(G, D, opt_g, opt_d, r, real, draws, g_round):
    """The recipe in plain torch, the reference's way (D's weight gradients computed in the G update and thrown
    away), with the z and alpha TrainStep drew (``draws``, consumed in order)."""
    bce = torch.nn.BCEWithLogitsLoss()
    real_out = D(real)
    fake = G(draws.pop(0))
    fake_out = D(fake.detach())
    if r.loss == "bce":
        real_target = torch.full_like(real_out, 1 - r.label_smoothing)
        loss_d = bce(real_out, real_target) + bce(fake_out, torch.zeros_like(fake_out))
    elif r.loss == "lsgan":
        loss_d = 0.5 * ((real_out - (1 - r.label_smoothing)) ** 2).mean() + 0.5 * (fake_out ** 2).mean()
    elif r.loss == "hinge":
        loss_d = F.relu(1 - real_out).mean() + F.relu(1 + fake_out).mean()
    else:
        alpha = draws.pop(0).to(real.dtype)
        loss_d = fake_out.mean() - real_out.mean() + _reference_penalty(D, real, fake.detach(), alpha, r.gp_weight)
    opt_d.zero_grad()
    loss_d.backward()
    opt_d.step()
    values = [loss_d, torch.tensor(float("nan"), dtype=real.dtype), real_out, fake_out, None]
    for i in range(r.g_steps if g_round else 0):
        if i:
            fake = G(draws.pop(0))
        out = D(fake)
        loss_g = (bce(out, torch.ones_like(out)) if r.loss == "bce" else
                  0.5 * ((out - 1) ** 2).mean() if r.loss == "lsgan" else -out.mean())
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        values[1], values[4] = loss_g, out
    score = (lambda o: torch.sigmoid(o).mean()) if r.loss == "bce" else (lambda o: o.mean())
    with torch.no_grad():
        return torch.stack([values[0], values[1], score(real_out), score(fake_out),
                            values[1] if values[4] is None else score(values[4])])


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_matches_plain_torch(name, monkeypatch):
    """6 steps of TrainStep (fused models, torch backend) against the recipe written out in plain torch on the
    unfused modules, in float64: values, parameters, running stats and Adam's moments agree to rounding."""
    preset, recipe = RECIPES[name]
    torch.manual_seed(0)
    ref_g, ref_d, used = presets.build(preset, nz=6, ngf=4, ndf=4)
    ref_g, ref_d = ref_g.double(), ref_d.double()
    G, D = fuse(copy.deepcopy(ref_g), "torch"), fuse(copy.deepcopy(ref_d), "torch")
    adam = dict(lr=2e-3, betas=(0.5, 0.9), weight_decay=used.weight_decay)
    opts, ref_opts = [[torch.optim.Adam(m.parameters(), **adam) for m in pair] for pair in ((G, D), (ref_g, ref_d))]
    step = TrainStep(G, D, *opts, recipe, latent=(used.nz,), seed=3, backend="torch")
    draws, noise, penalty = [], step.noise, losses.gradient_penalty
    monkeypatch.setattr(step, "noise", lambda *a: draws.append(noise(*a)) or draws[-1])
    monkeypatch.setattr(losses, "gradient_penalty", lambda *a: draws.append(a[-1]) or penalty(*a))
    shape = (4, used.nc, used.image_size, used.image_size)
    batches = torch.rand((6, *shape), generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    for i, real in enumerate(batches):
        got = step(real)
        expected = _plain_step(ref_g, ref_d, *ref_opts, recipe, real, draws, (i + 1) % recipe.d_steps == 0)
        assert not draws, "every draw used"
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12, equal_nan=True,
                                   msg=lambda m: f"step {i}: {m}")
    for model, ref in ((G, ref_g), (D, ref_d)):
        for (key, x), y in zip(_params_and_buffers(model).items(), _params_and_buffers(ref).values()):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12, msg=lambda m: f"{key}: {m}")
    for opt, ref_opt in zip(opts, ref_opts):
        for state, ref_state in zip(opt.state.values(), ref_opt.state.values()):
            torch.testing.assert_close(state["exp_avg"], ref_state["exp_avg"], rtol=1e-9, atol=1e-12)
