"""python -m fastgan train | sample | interpolate end to end on CPU, the datasets, and bad input."""
import gzip
import os
import re
import signal
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from fastgan import cli
from fastgan.cli import data, sample, train
from fastgan.nn import presets, reference
from parity import python_env

TINY = ["--batchSize", "4", "--ngf", "4", "--ndf", "4", "--builtin-images", "16", "--manualSeed", "1",
        "--device", "cpu"]


def _train(out, *extra):
    return cli.main(["train", "--outf", str(out), *TINY, *extra])


def _error(argv):
    """The one-line message a bad command exits with."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    message = info.value.code
    assert isinstance(message, str) and "\n" not in message, message
    assert message.startswith(f"fastgan {argv[0]}: error: "), message
    return message


def _png(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_train_writes_samples_and_reference_checkpoints(tmp_path, capsys):
    assert _train(tmp_path, "--max-steps", "3") == 0
    assert "done: 3 steps" in capsys.readouterr().out
    G, D = reference.Generator(ngf=4), reference.Discriminator(ndf=4)  # examples/dcgan's models
    G.load_state_dict(torch.load(tmp_path / "netG_epoch_0.pth"))
    D.load_state_dict(torch.load(tmp_path / "netD_epoch_0.pth"))
    assert _png(tmp_path / "fake_samples_epoch_000.png").shape == (8 * 66 + 2, 8 * 66 + 2, 3)
    assert _png(tmp_path / "real_samples.png").shape == (68, 4 * 66 + 2, 3)
    curve = _png(tmp_path / "loss_curve.png")
    assert (curve != 255).any(axis=2).mean() > 0.01  # axes and lines drawn
    state = torch.load(tmp_path / "train_state_epoch_0.pt")
    assert state["step"] == 3 and [row[0] for row in state["history"]] == [0, 1, 2]


@pytest.mark.gpu
def test_train_on_gpu_uses_the_kernels(tmp_path, capsys):
    assert cli.main(["train", "--outf", str(tmp_path), "--max-steps", "3", "--amp", "bf16", "--channels-last",
                     "--builtin-images", "256", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"backend (cuda|triton),", out) and "ngf 64, ndf 64" in out and "batch 64" in out
    assert "done: 3 steps" in out
    state = torch.load(tmp_path / "netG_epoch_0.pth")  # examples/dcgan's line: no map_location
    assert {t.device.type for t in state.values()} == {"cpu"}  # so it loads on a machine without a GPU too
    reference.Generator().load_state_dict(state)


def _tensors_equal(a, b, where):
    """Every tensor of two saved objects equal bit for bit (torch.equal), the rest equal."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            if key != "run_id":
                _tensors_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _tensors_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def test_resume_continues_the_run_exactly(tmp_path):
    """3 steps, then a resume with --netG/--netD to 6 (across the epoch boundary at 4) equals 6 steps in one go,
    bit for bit: weights, buffers, optimizer state, RNG states, loss history."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _train(whole, "--max-steps", "6")
    _train(parts, "--max-steps", "3")
    assert _train(parts, "--max-steps", "6", "--netG", str(parts / "netG_epoch_0.pth"),
                  "--netD", str(parts / "netD_epoch_0.pth")) == 0
    for name in ("netG_epoch_1.pth", "netD_epoch_1.pth", "train_state_epoch_1.pt", "checkpoint.pt"):
        _tensors_equal(torch.load(whole / name), torch.load(parts / name), name)
    state = torch.load(parts / "train_state_epoch_1.pt")
    assert state["step"] == 6 and [row[0] for row in state["history"]] == list(range(6))


def test_ctrl_c_finishes_the_step_then_saves(tmp_path, monkeypatch, capsys):
    """SIGINT during the third step: the step ends, checkpoint.pt holds step 3 whole, exit status 130."""
    step = train.Trainer.step
    calls = []

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the handler only notes it: this step still runs to its end
        return step(self, *args)

    monkeypatch.setattr(train.Trainer, "step", interrupted)
    with pytest.raises(SystemExit) as info:
        _train(tmp_path, "--max-steps", "10")
    assert info.value.code == 130 and len(calls) == 3
    err = capsys.readouterr().err
    assert "SIGINT: stopping after this step" in err and f"continue with --resume {tmp_path}" in err
    state = torch.load(tmp_path / "checkpoint.pt")
    assert state["step"] == 3 and state["batch"] == 3 and len(state["history"]) == 3
    assert int(state["netD"]["main.3.num_batches_tracked"]) == 9  # three whole steps of three D passes each
    reference.Generator(ngf=4).load_state_dict(state["netG"])


def test_resume_past_a_damaged_checkpoint_pt(tmp_path, capsys):
    """A damaged checkpoint.pt gives way to the newest whole epoch set, saying so, and the run replaces it; with
    no epoch set to fall back to the message names the ways out, not --resume again."""
    run = tmp_path / "run"
    assert _train(run, "--max-steps", "6") == 0
    whole = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(whole[:len(whole) // 2])
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--max-steps", "8"]) == 0
    out, err = capsys.readouterr()
    assert (f"{run}/checkpoint.pt is not a readable checkpoint (RuntimeError: PytorchStreamReader failed reading zip "
            "archive: failed finding central directory); falling back to the newest whole epoch set, "
            f"{run}/train_state_epoch_1.pt (step 6)") in err
    assert "done: 8 steps" in out and torch.load(run / "checkpoint.pt")["step"] == 8
    (run / "checkpoint.pt").write_bytes(whole[:100])
    for path in run.glob("*_epoch_*.p*"):
        path.unlink()
    message = _error(["train", "--resume", str(run), "--max-steps", "9"])
    assert f"holds no whole epoch set (train_state_epoch_N.pt with its netG/netD files) to fall back to; start a " \
           f"new run with --outf DIR (or --force to replace {run}/checkpoint.pt)" in message


def test_resume_a_damaged_checkpoint_file_names_the_way_out(tmp_path):
    """--resume run/checkpoint.pt, damaged: --resume run falls back to the epoch set, so that is the way out (not
    --netG/--netD); with no epoch set left, a new run is."""
    run = tmp_path / "run"
    assert _train(run, "--max-steps", "4") == 0
    whole = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(whole[:len(whole) // 2])
    message = _error(["train", "--resume", str(run / "checkpoint.pt")])
    assert message.startswith(f"fastgan train: error: --resume {run}/checkpoint.pt is not a readable checkpoint (")
    assert message.endswith(f"; --resume {run} continues from the newest whole checkpoint there (the epoch sets "
                            "included)") and "--netG" not in message
    for path in run.glob("*_epoch_*.p*"):
        path.unlink()
    assert _error(["train", "--resume", str(run / "checkpoint.pt")]).endswith(
        f"and {run} holds no other whole checkpoint to continue; start a new run with --outf DIR")


def test_a_foreign_checkpoint_pt_is_not_met_with_resume(tmp_path):
    """A checkpoint.pt that is not fastgan's: the ways out are another folder or --force, not --resume (which would
    find nothing to continue)."""
    torch.save({"model": torch.zeros(2)}, tmp_path / "checkpoint.pt")
    message = _error(["train", "--outf", str(tmp_path), *TINY, "--max-steps", "1"])
    assert message == (f"fastgan train: error: --outf {tmp_path} holds checkpoints this run would replace: "
                       f"{tmp_path}/checkpoint.pt (not a fastgan checkpoint); write into another folder with --outf "
                       "DIR, or pass --force to replace them")


def test_a_checkpoint_of_before_the_cache_reported_unreadable_files_resumes(tmp_path):
    """Checkpoints used to carry the files that failed to decode ("failed"); they resume, and new ones do not."""
    assert _train(tmp_path, "--max-steps", "2") == 0
    state = torch.load(tmp_path / "checkpoint.pt")
    torch.save(dict(state, failed=[3, 5]), tmp_path / "checkpoint.pt")
    assert cli.main(["train", "--resume", str(tmp_path), "--max-steps", "3"]) == 0
    assert "failed" not in torch.load(tmp_path / "checkpoint.pt")


@pytest.mark.parametrize("accelerator,device,said", [
    (None, "cpu", "fastgan train: --accel: there is no accelerator here; training on the CPU"),
    ("mps", "cpu", "fastgan train: --accel: fastgan's kernels run on CUDA GPUs, not on this mps accelerator; "
                   "training on the CPU"),
    ("xpu", "cpu", "not on this xpu accelerator; training on the CPU"),
    ("cuda", "cuda", None),
])
def test_accel_is_examples_dcgans(monkeypatch, capsys, accelerator, device, said):
    """--accel: the accelerator if there is one, else the CPU; one fastgan's kernels do not run on gives the CPU,
    with a line that says so."""
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: accelerator is not None)
    monkeypatch.setattr(torch.accelerator, "current_accelerator",
                        lambda *a: torch.device(accelerator) if accelerator else None)
    parser = cli.Parser()
    train.add_arguments(parser)
    args = parser.parse_args(["--accel"])
    train.examples_dcgan_flags(args)
    assert args.device == device
    out = capsys.readouterr().out
    assert (said in out) if said else out == ""
    with pytest.raises(cli.UsageError, match="--accel and --device cpu disagree; drop one of them"):
        train.examples_dcgan_flags(parser.parse_args(["--accel", "--device", "cpu"]))


def test_accel_trains(tmp_path, capsys):
    assert cli.main(["train", "--accel", "--outf", str(tmp_path), *TINY[:-2], "--max-steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "done: 1 steps" in out
    if not torch.accelerator.is_available():
        assert "--accel: there is no accelerator here; training on the CPU" in out and "device cpu" in out


def test_sample_in_chunks(tmp_path, monkeypatch):
    """More than CHUNK images are generated in near-equal chunks: with --eval the grid is the same."""
    _train(tmp_path, "--max-steps", "1")
    ckpt = str(tmp_path / "netG_epoch_0.pth")
    assert cli.main(["sample", "--netG", ckpt, "--n", "11", "--eval", "--out", str(tmp_path / "one.png")]) == 0
    monkeypatch.setattr(sample, "CHUNK", 4)
    sizes = []
    write = sample.write_samples

    def recording(G, latents, *args):
        return write(G, lambda first, count: sizes.append(count) or latents(first, count), *args)

    monkeypatch.setattr(sample, "write_samples", recording)
    assert cli.main(["sample", "--netG", ckpt, "--n", "11", "--eval", "--out", str(tmp_path / "chunks.png")]) == 0
    assert sizes == [4, 4, 3] and np.array_equal(_png(tmp_path / "one.png"), _png(tmp_path / "chunks.png"))


@pytest.mark.parametrize("argv, message", [
    (["--n", "100000000"], "--n 100000000: a grid of 100000000 64x64 images is 530x825000002 pixels and needs "),
    (["--n", "10000", "--out", "{tmp}/grid.jpg"], "--n 10000: a grid of 10000 64x64 images, 8 a row, is 530x82502 "
                                                  "pixels; pillow writes JPEG images of at most 65500x65500: ask for "
                                                  "fewer images, or for more than 8 a row (--nrow)"),
])
def test_sample_refuses_a_grid_it_cannot_write_before_any_work(tmp_path, monkeypatch, argv, message):
    _train(tmp_path, "--max-steps", "1")
    monkeypatch.setattr(sample, "write_samples", None)  # generating anything would fail: TypeError
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert message in _error(["sample", "--netG", str(tmp_path / "netG_epoch_0.pth"), *argv])


@pytest.mark.parametrize("preset,extra", [
    ("dcgan64", ["--loss", "hinge", "--amp", "bf16", "--channels-last"]),
    ("avatar48", []),  # 1 D step : 2 G steps, uniform z
    ("mnist28", []),  # lsgan, weight decay
    ("mlp-mnist", []),  # bce with label smoothing 0.1
    ("anime64", ["--loss", "wgan-gp", "--d-steps", "2"]),
])
def test_each_preset_trains(tmp_path, preset, extra, capsys):
    assert _train(tmp_path, "--preset", preset, "--max-steps", "2", *extra) == 0
    out = capsys.readouterr().out
    assert f"preset {preset}" in out and "done: 2 steps" in out
    G, D, recipe = presets.build(preset, ngf=4, ndf=4, nc=None)
    G.load_state_dict(torch.load(tmp_path / "netG_epoch_0.pth"))
    D.load_state_dict(torch.load(tmp_path / "netD_epoch_0.pth"))
    history = torch.load(tmp_path / "train_state_epoch_0.pt")["history"]
    assert len(history) == 2 and all(np.isfinite(row[1]) for row in history)
    g_rounds = sum(np.isfinite(row[2]) for row in history)
    assert g_rounds == (1 if "--d-steps" in extra else 2)
    side = 8 * (recipe.image_size + 2) + 2
    assert _png(tmp_path / "fake_samples_epoch_000.png").shape == (side, side, 3)


def test_sample_and_interpolate(tmp_path, capsys):
    _train(tmp_path, "--preset", "avatar48", "--max-steps", "1")
    ckpt = str(tmp_path / "netG_epoch_0.pth")
    assert cli.main(["sample", "--netG", ckpt, "--n", "10", "--nrow", "5", "--out", str(tmp_path / "s.png")]) == 0
    assert _png(tmp_path / "s.png").shape == (2 * 50 + 2, 5 * 50 + 2, 3)
    # --eval: every frame depends on its latent only, so the walk's ends are the seeds' own samples
    walk = tmp_path / "walk.png"
    assert cli.main(["interpolate", "--netG", ckpt, "--seeds", "3", "7", "--steps", "5", "--eval",
                     "--out", str(walk)]) == 0
    frames = _png(walk)
    assert frames.shape == (52, 5 * 50 + 2, 3)
    for seed, column in ((3, 0), (7, 4)):
        one = tmp_path / f"seed{seed}.png"
        cli.main(["sample", "--netG", ckpt, "--n", "1", "--seed", str(seed), "--eval", "--out", str(one)])
        assert np.array_equal(frames[:, column * 50:column * 50 + 52], _png(one))
    assert "5 frames from seed 3 to seed 7" in capsys.readouterr().out


def test_sample_reference_dataparallel_checkpoint(tmp_path):
    """An examples/dcgan generator saved from nn.DataParallel: keys prefixed ``module.``, z (N, nz, 1, 1)."""
    torch.manual_seed(0)
    G = reference.Generator(nz=12, ngf=4)
    torch.save({f"module.{k}": v for k, v in G.state_dict().items()}, tmp_path / "netG.pth")
    out = tmp_path / "grid.png"
    assert cli.main(["sample", "--netG", str(tmp_path / "netG.pth"), "--n", "6", "--seed", "4",
                     "--out", str(out)]) == 0
    z = torch.randn(6, 12, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = tmp_path / "expected.png"
        from fastgan.cli.sample import save_grid

        save_grid(G(z[:, :, None, None]), str(expected))
    assert np.abs(_png(out).astype(int) - _png(expected).astype(int)).max() <= 1  # rounding at .5 only


def _png_header(width, height):
    """A PNG of a 1-bit width x height image, its pixels left out: all PIL reads when it opens one."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", b"") + chunk(b"IEND", b""))


def test_folder_dataset_reports_unreadable_files_once(tmp_path, capsys, monkeypatch):
    """Every unreadable file, drawn by a batch or not (a decompression bomb), is reported once, when the cache is
    built, and none is counted as an image."""
    monkeypatch.setenv("FASTGAN_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "images" / "sub"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (root / "bomb.png").write_bytes(_png_header(13500, 13500))  # over twice PIL's MAX_IMAGE_PIXELS
    (root / "notes.txt").write_text("not an image")
    assert _train(tmp_path / "out", "--dataset", "folder", "--dataroot", str(tmp_path / "images"),
                  "--batchSize", "2", "--max-steps", "1", "--workers", "0") == 0
    out, err = capsys.readouterr()
    assert "64x64x3 folder (5 images)" in out and "skipped" not in out
    said = [line for line in err.splitlines() if "do not decode" in line]
    assert len(said) == 1 and "2 of 7 images under" in said[0] and "training on 5" in said[0], err
    assert "sub/bomb.png (Image size (182250000 pixels) exceeds limit" in said[0], said
    assert "sub/broken.jpg (not an image file pillow can read)" in said[0], said


def test_folder_scales_and_centre_crops(tmp_path):
    """A 2:1 image, left half red and right half blue, becomes a square of its middle: half red, half blue."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20, 0] = 255
    pixels[:, 20:, 2] = 255
    Image.fromarray(pixels).save(tmp_path / "a.png")
    image, index = data.Folder(str(tmp_path), 8)[0]
    assert index == 0 and image.shape == (3, 8, 8) and image.min() >= -1 and image.max() <= 1
    assert torch.equal(image[:, :, :3], torch.tensor([1.0, -1, -1])[:, None, None].expand(3, 8, 3))
    assert torch.equal(image[:, :, 5:], torch.tensor([-1.0, -1, 1])[:, None, None].expand(3, 8, 3))
    grey, _ = data.Folder(str(tmp_path), 8, nc=1)[0]
    assert grey.shape == (1, 8, 8)


def _idx_bytes(images):
    return b"\0\0\x08\x03" + np.array(images.shape, dtype=">u4").tobytes() + images.tobytes()


@pytest.mark.parametrize("layout", ["idx", "idx.gz", "npz"])
def test_mnist_files(tmp_path, layout):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    if layout == "idx":
        (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(images))
    elif layout == "idx.gz":
        (tmp_path / "raw").mkdir()
        with gzip.open(tmp_path / "raw" / "train-images-idx3-ubyte.gz", "wb") as f:
            f.write(_idx_bytes(images))
    else:
        np.savez(tmp_path / "mnist.npz", x_train=images, y_train=np.zeros(5))
    dataset = data.make_dataset("mnist", str(tmp_path), 28, 1)
    assert len(dataset) == 5
    image, _ = dataset[3]
    torch.testing.assert_close(image, torch.from_numpy(images[3]).float()[None] / 127.5 - 1)
    assert dataset[2][0].shape == (1, 28, 28) and data.make_dataset("mnist", str(tmp_path), 64, 1)[2][0].shape == (
        1, 64, 64)


def test_builtin_is_deterministic_and_varied():
    a, b = data.Builtin(32, seed=3), data.Builtin(32, length=9, seed=3, chunk=4)
    assert torch.equal(a[5][0], b[5][0]) and torch.equal(a.images[:9], b.images)
    assert not torch.equal(a[5][0], a[6][0]) and not torch.equal(a[5][0], data.Builtin(32, seed=4)[5][0])
    image = a[5][0]
    assert image.shape == (3, 32, 32) and image.min() >= -1 and image.max() <= 1 and image.std() > 0.1
    assert data.Builtin(28, nc=1)[0][0].shape == (1, 28, 28)


def test_each_test_runs_in_an_empty_folder_of_its_own(tmp_path):
    """README's first command writes out/ into the current folder; no test may see it (tests/conftest.py)."""
    assert os.listdir(".") == [] and os.path.realpath(".") != os.path.realpath(tmp_path)


def test_no_command_prints_the_commands(monkeypatch, capsys):
    monkeypatch.setattr(train, "run", None)  # starting a run would fail: TypeError
    with pytest.raises(SystemExit) as info:
        cli.main([])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("usage: fastgan [-h] COMMAND ...")
    assert all(f"    {name}" in err for name in cli.COMMANDS)
    assert err.strip().splitlines()[-1].startswith("fastgan: error: no command given; run one of them, e.g. python "
                                                   "-m fastgan train --max-steps 300")


def test_bad_input_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "does not exist" in _error(["train", "--dataset", "folder", "--dataroot", str(tmp_path / "nope")])
    assert "holds no images" in _error(["train", "--dataset", "folder", "--dataroot", str(tmp_path / "empty")])
    assert "no MNIST file found" in _error(["train", "--dataset", "mnist", "--dataroot", str(tmp_path / "empty")])
    assert "needs --dataroot" in _error(["train", "--dataset", "folder"])
    assert "--imageSize 32" in _error(["train", "--imageSize", "32", *TINY])
    assert "--label-smoothing applies" in _error(["train", "--loss", "hinge", "--label-smoothing", "0.1", *TINY])
    _train(tmp_path, "--max-steps", "1")
    ckpt = str(tmp_path / "netG_epoch_0.pth")
    wider = _error(["train", "--netG", ckpt, *TINY[:2], "--ngf", "8", *TINY[4:]])
    assert "shape mismatch: main.0.weight: checkpoint (100, 32, 4, 4) vs model (100, 64, 4, 4)" in wider
    other = _error(["train", "--preset", "mnist28", "--netG", ckpt, *TINY])
    assert "missing keys: 0.weight" in other and "unexpected keys: main.0.weight" in other
    assert "does not exist" in _error(["train", "--netD", str(tmp_path / "nope.pth"), *TINY])
    assert "fit no preset generator" in _error(["sample", "--netG", str(tmp_path / "netD_epoch_0.pth")])
    (tmp_path / "junk.pth").write_text("junk")
    assert "not a readable checkpoint" in _error(["sample", "--netG", str(tmp_path / "junk.pth")])


def test_bad_input_exit_status_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastgan", "--dataset", "folder", "--dataroot",
                           str(tmp_path / "nope")], capture_output=True, text=True, timeout=120,
                          env=python_env())
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"fastgan train: error: --dataroot {tmp_path / 'nope'} does not exist"]
