"""fastgan train never loses a checkpoint: it refuses to replace another run's or later ones (naming the ways
out), saves every --save-every steps, says in one line when a save fails, and resumes older train_state files;
the PyTorch DCGAN tutorial's checkpoints sample and interpolate."""
import hashlib
import math
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from fastgan import cli
from fastgan.cli import checkpoints, data, train
from fastgan.cli.lock import LOCK_FILE
from fastgan.cli.sample import save_grid
from fastgan.nn import reference

TINY = ["--batchSize", "4", "--ngf", "4", "--ndf", "4", "--builtin-images", "16", "--manualSeed", "1",
        "--device", "cpu"]


def _train(*argv):
    try:
        return cli.main(["train", *TINY, *argv])
    except SystemExit as exc:
        return exc.code


def _digests(folder):
    """Every file a run wrote (not its lock, which goes with it)."""
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder)) if name != LOCK_FILE}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """6 steps: the epoch 0 set at step 4, the epoch 1 set and checkpoint.pt at step 6."""
    folder = tmp_path_factory.mktemp("run")
    assert _train("--outf", str(folder), "--max-steps", "6") == 0
    return folder


def test_a_fresh_run_leaves_another_runs_folder_alone(run, tmp_path, capsys):
    before = _digests(run)
    message = _train("--outf", str(run), "--max-steps", "1", "--manualSeed", "2")
    assert message.startswith(f"fastgan train: error: --outf {run} holds checkpoints this run would replace: "
                              f"{run}/checkpoint.pt (run ")
    assert message.endswith(f"continue the newest with --resume {run}, write into another folder with --outf DIR, "
                            "or pass --force to replace them") and "\n" not in message
    assert _digests(run) == before
    assert "epoch 0/" not in capsys.readouterr().out  # refused before any training


def test_resuming_an_older_epoch_refuses_then_branches_elsewhere_or_with_force(run, tmp_path, capsys):
    older = str(run / "train_state_epoch_0.pt")
    before = _digests(run)
    message = _train("--resume", older, "--max-steps", "6")
    assert "(this run, later: step 6)" in message and "--force" in message
    assert _digests(run) == before
    branch = tmp_path / "branch"  # the same steps again from step 4, elsewhere: the same result, bit for bit
    assert _train("--resume", older, "--max-steps", "6", "--outf", str(branch)) == 0
    for name in ("netG_epoch_1.pth", "netD_epoch_1.pth"):
        a, b = torch.load(run / name), torch.load(branch / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    forced = tmp_path / "forced"
    forced.mkdir()
    for name in os.listdir(run):
        (forced / name).write_bytes((run / name).read_bytes())
    assert _train("--resume", str(forced / "train_state_epoch_0.pt"), "--max-steps", "5", "--force") == 0
    assert "--force: may replace" in capsys.readouterr().out
    assert torch.load(forced / "checkpoint.pt")["step"] == 5


def test_resume_defaults_outf_to_the_run_folder(tmp_path, capsys):
    folder = tmp_path / "run"
    assert _train("--outf", str(folder), "--max-steps", "2") == 0
    assert cli.main(["train", "--resume", str(folder), "--max-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {folder}/checkpoint.pt (step 2) at epoch 0, batch 2" in out
    assert torch.load(folder / "checkpoint.pt")["step"] == 3 and not os.path.exists("out/checkpoint.pt")


def test_save_every_and_the_epoch_sets(tmp_path, monkeypatch):
    written = []
    write = checkpoints.atomic_write

    def recording(path, data):
        written.append(os.path.basename(path))
        write(path, data)

    monkeypatch.setattr(checkpoints, "atomic_write", recording)
    assert _train("--outf", str(tmp_path), "--max-steps", "7", "--save-every", "3") == 0
    epoch_set = ["train_state_epoch_{}.pt", "netG_epoch_{}.pth", "netD_epoch_{}.pth"]
    assert written == (["checkpoint.pt"]  # step 3
                       + [f.format(0) for f in epoch_set] + ["checkpoint.pt"]  # step 4, the end of epoch 0
                       + ["checkpoint.pt"]  # step 6
                       + [f.format(1) for f in epoch_set] + ["checkpoint.pt"])  # step 7, the end of the run
    record = torch.load(tmp_path / "train_state_epoch_1.pt")
    assert record["step"] == 7 and record["run_id"] == torch.load(tmp_path / "checkpoint.pt")["run_id"]
    assert record["files"]["netG"]["sha256"] == checkpoints.file_sha256(tmp_path / "netG_epoch_1.pth")


def test_a_failed_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    fsync, calls = os.fsync, []

    def full_at_the_second_save(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full_at_the_second_save)
    message = _train("--outf", str(tmp_path), "--max-steps", "6", "--save-every", "2")
    assert message == (f"fastgan train: error: could not save step 4 into {tmp_path} (No space left on device); the "
                       f"newest whole checkpoint is {tmp_path}/checkpoint.pt (step 2); continue with --resume "
                       f"{tmp_path}")
    assert torch.load(tmp_path / "checkpoint.pt")["step"] == 2


def test_an_older_train_state_still_resumes(tmp_path):
    """A train_state from before run ids and checksums: resumed, with a new run id."""
    assert _train("--outf", str(tmp_path), "--max-steps", "4") == 0
    os.remove(tmp_path / "checkpoint.pt")
    state = torch.load(tmp_path / "train_state_epoch_0.pt")
    old = {k: state[k] for k in ("settings", "seed", "epoch", "batch", "step", "history", "fixed_noise", "trainer")}
    old["trainer"]["generator"] = torch.Generator().get_state()  # saved until the generator was reseeded per step
    torch.save(old, tmp_path / "train_state_epoch_0.pt")
    assert _train("--outf", str(tmp_path), "--max-steps", "6", "--netG", str(tmp_path / "netG_epoch_0.pth"),
                  "--netD", str(tmp_path / "netD_epoch_0.pth")) == 0
    new = torch.load(tmp_path / "checkpoint.pt")
    assert new["step"] == 6 and new["run_id"] and [row[0] for row in new["history"]] == list(range(6))


def _png(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_the_dcgan_tutorials_checkpoint_samples_and_interpolates(tmp_path, capsys):
    """The PyTorch CelebA DCGAN tutorial's layout: both networks under *_model_state_dict, DataParallel keys."""
    torch.manual_seed(0)
    G, D = reference.Generator(nz=12, ngf=4), reference.Discriminator(ndf=4)
    path = tmp_path / "tutorial.pth"
    torch.save({"epoch": 5, "g_model_state_dict": {f"module.{k}": v for k, v in G.state_dict().items()},
                "d_model_state_dict": {f"module.{k}": v for k, v in D.state_dict().items()}}, path)
    assert cli.main(["sample", "--netG", str(path), "--n", "4", "--seed", "3", "--out", str(tmp_path / "s.png")]) == 0
    assert f"fastgan sample: using the 'g_model_state_dict' entry of {path}" in capsys.readouterr().out
    z = torch.randn(4, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        save_grid(G(z[:, :, None, None]), str(tmp_path / "expected.png"))
    assert np.abs(_png(tmp_path / "s.png") - _png(tmp_path / "expected.png")).max() <= 1  # rounding at .5 only
    assert cli.main(["interpolate", "--netG", str(path), "--steps", "4", "--out", str(tmp_path / "w.png")]) == 0
    assert _png(tmp_path / "w.png").shape == (68, 4 * 66 + 2, 3)


def test_resuming_with_other_precision_flags_says_so_and_keeps_adams_moments_in_the_parameters_layout(tmp_path,
                                                                                                       capsys):
    assert _train("--outf", str(tmp_path), "--max-steps", "2") == 0
    capsys.readouterr()
    assert _train("--resume", str(tmp_path), "--max-steps", "3", "--amp", "fp16", "--channels-last") == 0
    assert ("note: the run being resumed trained with --amp None, --channels-last False: its steps from here on "
            "differ") in capsys.readouterr().out
    saved = torch.load(tmp_path / "checkpoint.pt")
    assert saved["step"] == 3 and saved["precision"] == dict(amp="fp16", channels_last=True)
    assert saved["trainer"]["scaler_g"]["scale"] > 0  # loss scaling started afresh
    weights = [v for k, v in saved["netG"].items() if k.endswith("weight") and v.dim() == 4]
    moments = [saved["trainer"]["opt_g"]["state"][i]["exp_avg"] for i in range(len(saved["trainer"]["opt_g"]["state"]))]
    assert [m.stride() for m in moments if m.dim() == 4] == [w.stride() for w in weights]
    assert all(m.is_contiguous(memory_format=torch.channels_last) for m in moments if m.dim() == 4)


def test_a_resumed_run_trains_with_the_learning_rate_it_is_given(tmp_path, capsys):
    """--resume with --lr: Adam takes the new rate (the saved optimizer's used to replace it, while the header
    and the saved settings said the new one); without it, the run's own."""
    assert _train("--outf", str(tmp_path), "--max-steps", "2") == 0
    assert _train("--resume", str(tmp_path), "--max-steps", "3", "--lr", "0.1", "--beta1", "0.2") == 0
    saved = torch.load(tmp_path / "checkpoint.pt")
    for name in ("opt_g", "opt_d"):
        (group,) = saved["trainer"][name]["param_groups"]
        assert group["lr"] == saved["settings"]["lr"] == 0.1 and group["betas"] == (0.2, 0.999)
    assert _train("--resume", str(tmp_path), "--max-steps", "4") == 0
    assert torch.load(tmp_path / "checkpoint.pt")["trainer"]["opt_g"]["param_groups"][0]["lr"] == 0.1


def test_checkpoints_hold_host_tensors_and_the_state_dicts_versions():
    state = torch.nn.BatchNorm2d(3).state_dict()
    state["nested"] = [torch.ones(2, requires_grad=True), (torch.zeros(1),)]
    loaded = torch.load(__import__("io").BytesIO(checkpoints.serialize(state)))
    assert loaded._metadata == state._metadata and isinstance(loaded["nested"][1], tuple)
    assert not loaded["nested"][0].requires_grad


def test_deterministic_asks_cudnn_for_deterministic_convolutions(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)  # restored after the test
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    assert _train("--outf", str(tmp_path), "--max-steps", "1", "--deterministic") == 0
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


# ----------------------------------------------------------------------------- a run that goes non-finite

def _poison_batch(monkeypatch, step, snapshot):
    """The batch of ``step`` (1-based; 4 steps an epoch) gets one Inf pixel; ``snapshot`` is called just before."""
    epoch = data.Feeder.epoch

    def poisoned(self, number, skip_batches=0, in_place=False):
        for index, batch in enumerate(epoch(self, number, skip_batches, in_place), start=skip_batches):
            if number * 4 + index + 1 == step:
                snapshot()
                batch = batch.clone()
                batch[0, 0, 0, 0] = math.inf
            yield batch

    monkeypatch.setattr(data.Feeder, "epoch", poisoned)


@pytest.mark.parametrize("flags,read", [
    (["--max-steps", "12", "--save-every", "2"], "at the save after it"),
    (["--max-steps", "12", "--log-every", "1"], "at the progress read after it"),
    (["--max-steps", "6"], "at the final save"),
])
def test_a_run_that_goes_non_finite_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys, flags, read):
    """One Inf pixel in step 6's batch: the run stops (exit status 3) with one line naming the step and the
    newest whole checkpoint, which is byte for byte as it was before that step; nothing non-finite is saved."""
    before = {}
    _poison_batch(monkeypatch, 6, lambda: before.update(_digests(tmp_path)))
    assert _train("--outf", str(tmp_path), *flags) == train.DIVERGED_EXIT == 3, read
    assert before and _digests(tmp_path) == before, read
    assert torch.load(tmp_path / "checkpoint.pt")["step"] == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastgan train: error: the losses of step 6 are not finite (Loss_D nan, Loss_G nan): "
                              "stopped at step "), err
    assert err[-1].endswith(f"without saving; the newest whole checkpoint, {tmp_path}/checkpoint.pt (step 4), is "
                            f"untouched: continue from it with --resume {tmp_path} and a lower --lr"), err


def test_non_finite_weights_are_not_saved(tmp_path, monkeypatch, capsys):
    """Finite losses, but a weight gone non-finite in the update of step 6 (which the losses of step 7 would
    show): the save at step 6 checks the weights and writes nothing."""
    step = train.Trainer.step
    before = {}

    def poisoning(self, *args):
        values = step(self, *args)
        if self.train_step.batches == 6:
            before.update(_digests(tmp_path))
            next(self.d_module.parameters()).data[0, 0, 0, 0] = math.nan
        return values

    monkeypatch.setattr(train.Trainer, "step", poisoning)
    assert _train("--outf", str(tmp_path), "--max-steps", "12", "--save-every", "6") == 3
    assert _digests(tmp_path) == before
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "fastgan train: error: the weights after step 6 are not finite (first: netD main.0.weight): stopped at step 6 "
        "without saving; the newest whole checkpoint")


def test_an_interrupt_after_a_non_finite_step_saves_nothing(tmp_path, monkeypatch, capsys):
    """SIGINT in step 6, whose batch holds an Inf: the interrupt's save reads the losses first and writes nothing."""
    before = {}
    _poison_batch(monkeypatch, 6, lambda: before.update(_digests(tmp_path)))
    step = train.Trainer.step

    def interrupted(self, *args):
        if self.train_step.batches == 5:
            os.kill(os.getpid(), signal.SIGINT)  # noted by the handler: the step runs, then the run saves (or not)
        return step(self, *args)

    monkeypatch.setattr(train.Trainer, "step", interrupted)
    assert _train("--outf", str(tmp_path), "--max-steps", "12") == 3
    assert _digests(tmp_path) == before
    assert "the losses of step 6 are not finite" in capsys.readouterr().err


def test_on_nan_offers_stop_only(tmp_path):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", *TINY, "--outf", str(tmp_path), "--on-nan", "skip"])
    assert info.value.code == 2
    assert _train("--outf", str(tmp_path), "--max-steps", "1", "--on-nan", "stop") == 0
