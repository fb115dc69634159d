"""What a user of the Python API tries: each gets a clear error (names the argument and the fix) or the right
result.  Sizes, optimizers handed to train_step, fuse's inputs, the gradient penalty's weight, checkpoint
layouts, the argparse checks and the file checks of fastgan.usage."""
import argparse
import logging
import os

import pytest
import torch
from torch import nn

import fastgan
from fastgan import usage
from fastgan.cli import checkpoints
from fastgan.cli.common import check_backend
from fastgan.cli.sample import save_grid
from fastgan.nn import checkpoint, losses, presets, reference


@pytest.mark.parametrize("make, message", [
    (lambda: fastgan.DCGAN(ngf=0), "DCGAN: ngf must be a positive integer, got 0"),
    (lambda: fastgan.DCGAN(nz=-1), "DCGAN: nz must be a positive integer, got -1"),
    (lambda: fastgan.DCGAN(nc=True), "DCGAN: nc must be a positive integer, got True"),
    (lambda: fastgan.Generator(nz=0), "Generator: nz must be a positive integer, got 0"),
    (lambda: fastgan.Generator(ngf=2.5), "Generator: ngf must be a positive integer, got 2.5"),
    (lambda: fastgan.Discriminator(ndf=0), "Discriminator: ndf must be a positive integer, got 0"),
    (lambda: fastgan.Discriminator(nc=0), "Discriminator: nc must be a positive integer, got 0"),
    (lambda: reference.Generator(ngf=0), "Generator: ngf must be a positive integer, got 0"),
    (lambda: presets.build("avatar48", nz=0), "preset avatar48: nz must be a positive integer, got 0"),
    (lambda: presets.build("mnist28", ndf="8"), "preset mnist28: ndf must be a positive integer, got '8'"),
])
def test_sizes_fail_at_construction(make, message):
    with pytest.raises(fastgan.UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


@pytest.mark.parametrize("model", [[nn.Linear(2, 2)], None, "model", torch.randn(2)])
def test_fuse_wants_a_module(model):
    with pytest.raises(TypeError, match=f"fastgan.fuse expects a torch.nn.Module, got {type(model).__name__}"):
        fastgan.fuse(model)


def test_fuse_rejects_parameters():
    with pytest.raises(TypeError, match="got generator; pass the model"):
        fastgan.fuse(nn.Linear(2, 2).parameters())


@pytest.fixture
def gan():
    torch.manual_seed(0)
    return fastgan.DCGAN(nz=8, ngf=2, ndf=2, backend="torch")


def test_train_step_refuses_swapped_optimizers(gan):
    opt_g, opt_d = reference.make_optimizers(gan.generator, gan.discriminator)
    before = [p.clone() for p in gan.parameters()]
    with pytest.raises(fastgan.UsageError, match=r"opt_g holds the discriminator's parameters \(opt_g and opt_d "
                                                 r"swapped\?\); call train_step\(real, opt_g, opt_d\)"):
        gan.train_step(torch.randn(2, 3, 64, 64), opt_d, opt_g)
    assert all(torch.equal(a, b) for a, b in zip(before, gan.parameters()))  # refused before any update


def test_train_step_refuses_an_optimizer_over_both(gan):
    both = torch.optim.Adam(gan.parameters())
    _, opt_d = reference.make_optimizers(gan.generator, gan.discriminator)
    with pytest.raises(fastgan.UsageError, match="opt_g holds the discriminator's parameters;"):
        gan.train_step(torch.randn(2, 3, 64, 64), both, opt_d)


def test_train_step_refuses_an_unrelated_optimizer(gan):
    opt_g, _ = reference.make_optimizers(gan.generator, gan.discriminator)
    with pytest.raises(fastgan.UsageError, match="opt_d holds none of the discriminator's parameters"):
        gan.train_step(torch.randn(2, 3, 64, 64), opt_g, torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    with pytest.raises(TypeError, match="opt_g must be a torch.optim.Optimizer over the generator's parameters, "
                                        "got NoneType"):
        gan.train_step(torch.randn(2, 3, 64, 64), None, opt_g)


def test_train_step_takes_an_optimizer_over_part_of_g(gan):
    """Freezing layers by leaving them out of the optimizer is allowed: only they stay as they were."""
    first = gan.generator.main[0].weight
    rest = [p for p in gan.generator.parameters() if p is not first]
    opt_g, opt_d = torch.optim.Adam(rest, lr=1e-3), torch.optim.Adam(gan.discriminator.parameters(), lr=1e-3)
    kept = first.clone()
    result = gan.train_step(torch.randn(2, 3, 64, 64), opt_g, opt_d)
    assert torch.isfinite(result.loss_d) and torch.equal(first, kept)


def test_gradient_penalty_weight():
    critic = nn.Sequential(nn.Flatten(), nn.Linear(12, 1), nn.Flatten(0))
    real, fake = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    with pytest.raises(ValueError, match="the gradient penalty's weight must be >= 0, got -1"):
        losses.gradient_penalty(critic, real, fake, weight=-1)
    with pytest.raises(ValueError, match="must be >= 0, got nan"):
        losses.gradient_penalty(critic, real, fake, weight=float("nan"))
    assert losses.gradient_penalty(critic, real, fake, weight=0.0).item() == 0


def _same_as_unfused(model, x):
    """fuse(model) gives model's own output on x, or raises its own error with the same message."""
    torch.manual_seed(0)
    try:
        expected = model(x)
    except Exception as exc:  # noqa: BLE001
        with pytest.raises(type(exc), match=str(exc).replace("(", r"\(").replace(")", r"\)")):
            fastgan.fuse(model, backend="torch")(x)
        return None
    got = fastgan.fuse(model, backend="torch")(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    return got


def test_fuse_keeps_a_linear_on_3d_input():
    model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2), nn.Tanh())
    assert _same_as_unfused(model, torch.randn(4, 7, 5)).shape == (4, 7, 2)
    assert _same_as_unfused(model, torch.randn(5)).shape == (2,)  # unbatched too


def test_fuse_keeps_an_unbatched_conv():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.LeakyReLU(0.2), nn.ConvTranspose2d(4, 2, 4, 2, 1))
    assert _same_as_unfused(model, torch.randn(3, 8, 8)).shape == (2, 16, 16)


def test_fuse_keeps_batchnorm_errors_on_odd_layouts():
    _same_as_unfused(nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3), nn.ReLU()), torch.randn(5))
    _same_as_unfused(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), torch.randn(3, 8, 8))


def test_fuse_still_names_the_expected_shape():
    fused = fastgan.fuse(nn.Sequential(nn.Linear(5, 3), nn.ReLU()), backend="torch")
    with pytest.raises(ValueError, match=r"Linear expects input of shape \(N, 5\), got \(4, 6\)"):
        fused(torch.randn(4, 6))
    conv = fastgan.fuse(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), backend="torch")
    with pytest.raises(ValueError, match=r"Conv2d expects input of shape \(N, 3, H, W\), got \(2, 8, 8\)"):
        conv(torch.randn(2, 8, 8))


@pytest.fixture
def generator():
    torch.manual_seed(1)
    return reference.Generator(nz=8, ngf=2)


@pytest.mark.parametrize("layout, key", [
    (lambda g, d: {"g_model_state_dict": {f"module.{k}": v for k, v in g.items()}, "epoch": 5,
                   "d_model_state_dict": {f"module.{k}": v for k, v in d.items()}}, "g_model_state_dict"),
    (lambda g, d: {"state_dict": g, "epoch": 1}, "state_dict"),
    (lambda g, d: {"netG": g, "netD": d}, "netG"),
    (lambda g, d: {"generator": g, "discriminator": d, "step": 10}, "generator"),
    (lambda g, d: {"model": g}, "model"),
    (lambda g, d: {"state_dict": {"netG": g, "netD": d}}, "state_dict.netG"),
    (lambda g, d: {f"_orig_mod.{k}": v for k, v in g.items()}, None),
])
def test_load_checkpoint_nested_layouts(generator, layout, key, tmp_path, caplog):
    d = reference.Discriminator(ndf=2).state_dict()
    saved = layout(generator.state_dict(), d)
    torch.save(saved, tmp_path / "ckpt.pth")
    fresh = fastgan.Generator(nz=8, ngf=2)
    with caplog.at_level(logging.INFO, logger="fastgan"):
        fastgan.load_checkpoint(fresh, str(tmp_path / "ckpt.pth"))
    for name, value in generator.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    assert checkpoint.find_state_dict(saved, fresh)[1] == key
    assert (f"loading the checkpoint's {key!r} entry into Generator" in caplog.text) == (key is not None)


def test_load_checkpoint_picks_the_discriminator(generator):
    d = reference.Discriminator(ndf=2)
    fresh = fastgan.Discriminator(ndf=2)
    fastgan.load_checkpoint(fresh, {"netG": generator.state_dict(), "netD": d.state_dict()})
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in d.state_dict().items())


@pytest.mark.parametrize("saved, message", [
    ({"format": checkpoint.TRAIN_STATE, "step": 4, "trainer": {}}, "is a fastgan train_state file .* step 4; no "
                                                                   "weights"),
    ({"trainer": {}, "settings": {}, "history": []}, "is a fastgan train_state file"),
    ("optimizer", "is an optimizer state_dict"),
    ({"epoch": 3, "loss": 0.5}, "holds no state_dict .*epoch, loss"),
    ([1, 2], "is a list, not a state_dict"),
])
def test_load_checkpoint_says_what_it_got(generator, saved, message):
    if saved == "optimizer":
        saved = torch.optim.Adam(generator.parameters()).state_dict()
    with pytest.raises(fastgan.UsageError, match=message):
        fastgan.load_checkpoint(fastgan.Generator(nz=8, ngf=2), saved)


def test_load_checkpoint_with_no_fitting_entry(generator):
    with pytest.raises(fastgan.UsageError, match=r"none of the checkpoint's state_dicts \(a, b\) has the keys of "
                                                 "Generator"):
        fastgan.load_checkpoint(fastgan.Generator(nz=8, ngf=2), {"a": {"x": torch.ones(1)}, "b": {"y": torch.ones(1)}})


class _Planted:
    """A pickle that would make a folder if unpickled with weights_only=False."""

    def __init__(self, folder):
        self.folder = folder

    def __reduce__(self):
        return os.makedirs, (self.folder,)


def test_load_checkpoint_never_unpickles_other_objects(tmp_path):
    torch.save({"main.0.weight": torch.ones(1), "hook": _Planted(str(tmp_path / "ran"))}, tmp_path / "evil.pth")
    with pytest.raises(fastgan.UsageError, match=r"evil.pth holds pickled Python objects, not just tensors .* is "
                                                 r"not loaded: unpickling can run any code; if you trust the file, "
                                                 r"load it yourself .*torch.load\(path, weights_only=False\)"):
        fastgan.load_checkpoint(fastgan.Generator(nz=8, ngf=2), str(tmp_path / "evil.pth"))
    assert not (tmp_path / "ran").exists()
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(fastgan.UsageError, match="junk.pth is not a readable checkpoint"):
        fastgan.load_checkpoint(fastgan.Generator(nz=8, ngf=2), str(tmp_path / "junk.pth"))


def test_strip_module_prefix_nested_wrappers():
    assert list(fastgan.strip_module_prefix({"module._orig_mod.main.0.weight": 1, "main.1.bias": 2})) == [
        "main.0.weight", "main.1.bias"]


@pytest.mark.parametrize("parse, text, message", [
    (usage.positive_int, "0", "expected an integer >= 1, got 0"),
    (usage.positive_int, "1.5", "expected an integer >= 1, got '1.5'"),
    (usage.natural_int, "-1", "expected an integer >= 0, got -1"),
    (usage.positive_float, "inf", "expected a number > 0, got inf"),
    (usage.natural_float, "-0.5", "expected a number >= 0, got -0.5"),
    (usage.unit_float, "1", r"expected a number in \[0, 1\), got 1"),
    (usage.int_at_least_2, "1", "expected an integer >= 2, got 1"),
    (usage.width_int, "9" * 40, r"expected an integer in \[1, 65536\]"),
    (usage.seed_int, str(2**63), r"expected an integer in \[0, 2\*\*63\)"),
])
def test_argparse_checks(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse(text)


def test_argparse_checks_pass_good_values():
    assert usage.positive_int("3") == 3 and usage.unit_float("0") == 0.0 and usage.seed_int(str(2**63 - 1)) == 2**63 - 1


def test_file_checks(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(fastgan.UsageError, match="--outf .* is a file, not a folder"):
        usage.writable_folder(str(tmp_path / "afile"), "--outf")
    with pytest.raises(fastgan.UsageError, match="--outf .* is not a writable folder"):
        usage.writable_folder(str(tmp_path / "afile" / "sub"), "--outf", create=False)
    usage.writable_folder(str(tmp_path / "new" / "sub"), "--outf", create=False)
    assert not (tmp_path / "new").exists()  # only checked
    assert usage.writable_folder(str(tmp_path / "new" / "sub"), "--outf") and (tmp_path / "new" / "sub").is_dir()
    with pytest.raises(fastgan.UsageError, match=r"--out .*\.psd: pillow cannot write \.psd; end the name in \.png"):
        usage.image_path(str(tmp_path / "a.psd"), "--out")
    assert usage.image_path(str(tmp_path / "deep" / "a.webp"), "--out")


def test_backend_from_the_environment(monkeypatch):
    monkeypatch.setenv("FASTGAN_BACKEND", "bogus")
    with pytest.raises(fastgan.UsageError, match="the environment variable FASTGAN_BACKEND must be one of"):
        check_backend("auto", torch.device("cpu"))
    assert check_backend("torch", torch.device("cpu")) == "torch"  # an explicit --backend wins
    monkeypatch.setenv("FASTGAN_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(fastgan.UsageError, match=r"FASTGAN_BACKEND=triton \(set in the environment\) cannot be used: "
                                                 ".*unset FASTGAN_BACKEND or pass --backend"):
        check_backend("auto", torch.device("cpu"))


def test_save_grid_into_a_missing_folder_is_one_line(tmp_path):
    with pytest.raises(fastgan.UsageError, match="cannot write .*grid.png"):
        save_grid(torch.zeros(1, 3, 4, 4), str(tmp_path / "gone" / "grid.png"))


def test_atomic_write_keeps_the_old_file_when_it_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    checkpoints.atomic_write(path, b"old")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        checkpoints.atomic_write(path, b"new")
    assert open(path, "rb").read() == b"old" and os.listdir(tmp_path) == ["checkpoint.pt"]
