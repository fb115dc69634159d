"""One `fastgan train` writes into a folder at a time: a second run into it, fresh or resumed, is refused with
one line naming the running one while that one trains on; a lock left by a SIGKILLed run is taken over."""
import fcntl
import hashlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from fastgan import cli
from fastgan.cli import lock
from fastgan.cli.lock import LOCK_FILE, FolderLock
from fastgan.usage import UsageError
from parity import python_env

TINY = ["--batchSize", "4", "--ngf", "4", "--ndf", "4", "--builtin-images", "16", "--manualSeed", "1",
        "--device", "cpu"]

# Run A: fastgan train, held at the start of step HOLD (a step count) until GO appears or it is killed: a run
# that is still writing into its folder, however slow the machine; READY says that it got there.
RUN_A = textwrap.dedent("""
    import os, sys, time
    from fastgan import cli
    from fastgan.cli import train
    ready, go, hold = sys.argv[1], sys.argv[2], int(sys.argv[3])
    step = train.Trainer.step

    def held(self, *args):
        if self.train_step.batches == hold:
            open(ready, "w").close()
            while not os.path.exists(go):
                time.sleep(0.05)
        return step(self, *args)

    train.Trainer.step = held
    sys.exit(cli.main(["train", *sys.argv[4:]]))
""")


def _digests(folder):
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))
            if name != LOCK_FILE}


def _start_a(tmp_path, hold, *argv):
    ready, go = tmp_path / "ready", tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", RUN_A, str(ready), str(go), str(hold), *argv], env=python_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"run A did not reach its third step: {proc.communicate()}")
        time.sleep(0.05)
    return proc, go


def _error(argv):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return info.value.code


def test_a_second_run_into_a_running_runs_folder_is_refused_and_the_first_trains_on(tmp_path):
    """B starts while A is in its second step, before A's first checkpoint (so the check for checkpoints in the
    way finds none): B is refused, and A ends with its own checkpoints, whole."""
    outf = tmp_path / "run"
    a, go = _start_a(tmp_path, 1, "--outf", str(outf), *TINY, "--max-steps", "6", "--save-every", "2")
    try:
        run_id = re.search(r", run (\w+)", a.stdout.readline()).group(1)  # A's header
        before = _digests(outf)
        assert list(before) == ["real_samples.png"]
        b = subprocess.run([sys.executable, "-m", "fastgan", "train", "--outf", str(outf), *TINY, "--max-steps", "3",
                            "--manualSeed", "2"], env=python_env(), capture_output=True, text=True, timeout=240)
        assert b.returncode == 1 and "Traceback" not in b.stderr
        (line,) = b.stderr.strip().splitlines()
        assert line.startswith(f"fastgan train: error: {outf} is in use by run {run_id} (PID {a.pid}, started ")
        assert line.endswith(f"which is writing into it; wait for it to end (or stop it, saving first: kill -INT "
                             f"{a.pid}), or write into another folder with --outf DIR")
        dry = _error(["train", "--outf", str(outf), *TINY, "--dry-run"])  # a dry run is not fooled
        assert dry.startswith(f"fastgan train: error: {outf} is in use by run {run_id}")
        assert _digests(outf) == before
        go.touch()
        out, err = a.communicate(timeout=240)
    finally:
        a.kill()
    assert a.returncode == 0, err
    assert "done: 6 steps" in out and not (outf / LOCK_FILE).exists()
    for name in ("checkpoint.pt", "train_state_epoch_0.pt", "train_state_epoch_1.pt"):
        saved = torch.load(outf / name)
        assert saved["run_id"] == run_id and saved["seed"] == 1
    assert torch.load(outf / "checkpoint.pt")["step"] == 6


def test_two_resumes_of_one_folder_and_the_lock_of_a_killed_run(tmp_path, capsys):
    """A resumes the run in a folder; B, resuming it too, is refused; A is SIGKILLed, and C takes its lock over and
    continues the run from its newest checkpoint."""
    outf = tmp_path / "run"
    assert cli.main(["train", "--outf", str(outf), *TINY, "--max-steps", "2"]) == 0
    run_id = torch.load(outf / "checkpoint.pt")["run_id"]
    before = _digests(outf)
    a, _ = _start_a(tmp_path, 2, "--resume", str(outf), "--max-steps", "6")
    try:
        resumed = _error(["train", "--resume", str(outf), "--max-steps", "8"])
        assert resumed.startswith(f"fastgan train: error: {outf} is in use by run {run_id} (PID {a.pid}")
        assert _digests(outf) == before
    finally:
        a.send_signal(signal.SIGKILL)
        a.communicate(timeout=60)
    assert (outf / LOCK_FILE).exists()  # left behind, unlocked: the kernel dropped the flock with the process
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(outf), "--max-steps", "4"]) == 0
    err = capsys.readouterr().err
    assert f"fastgan train: {outf}: taking over the lock of run {run_id} (PID {a.pid}, started " in err
    assert "which ended without releasing it" in err
    assert torch.load(outf / "checkpoint.pt")["step"] == 4 and not (outf / LOCK_FILE).exists()


# ----------------------------------------------------------------------------- the lock itself

def test_take_refuse_release(tmp_path):
    folder = tmp_path / "out"
    held = FolderLock.take(str(folder), "aaaa")
    assert folder.is_dir() and (folder / LOCK_FILE).exists()
    with pytest.raises(UsageError, match=rf"{folder} is in use by run aaaa \(PID {os.getpid()}, started "):
        FolderLock.take(str(folder), "bbbb")  # another open file: flock refuses it within one process too
    with pytest.raises(UsageError, match="is in use by run aaaa"):
        FolderLock.check(str(folder))
    (folder / "kept").write_text("")
    held.release()
    assert not (folder / LOCK_FILE).exists() and (folder / "kept").exists()
    FolderLock.check(str(folder))
    FolderLock.take(str(folder), "bbbb").release()


def test_a_folder_the_lock_made_goes_with_it_when_empty(tmp_path):
    FolderLock.take(str(tmp_path / "new"), "aaaa").release()
    assert not (tmp_path / "new").exists()
    FolderLock.check(str(tmp_path / "missing"))  # checks, makes nothing
    assert not (tmp_path / "missing").exists()


def test_a_check_does_not_turn_a_run_away(tmp_path):
    """A --dry-run's check holds a shared lock for a moment: a run that meets it tries again and gets the lock."""
    fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_SH)
    timer = threading.Timer(0.2, os.close, (fd,))
    timer.start()
    try:
        FolderLock.take(str(tmp_path), "aaaa").release()
    finally:
        timer.join()
    assert lock.RETRY_SECONDS > 0.2


def test_a_stale_lock_file_is_taken_over_with_a_line(tmp_path, capsys):
    (tmp_path / LOCK_FILE).write_text('{"pid": 99999999, "run_id": "dead", "host": "h", "started": "then"}\n')
    FolderLock.take(str(tmp_path), "aaaa").release()
    assert (f"fastgan train: {tmp_path}: taking over the lock of run dead (PID 99999999 on h, started then), which "
            "ended without releasing it") in capsys.readouterr().err


def test_a_run_that_fails_to_start_releases_the_lock(tmp_path):
    """The lock is taken before the data is read: a run refused after it leaves no lock (nor an empty folder)."""
    message = _error(["train", "--outf", str(tmp_path / "out"), *TINY, "--batchSize", "64"])
    assert "fewer than one batch of 64" in message and not (tmp_path / "out").exists()


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    """The image cache's decode workers are forked: one that outlives a killed run must not hold its folder."""
    held = FolderLock.take(str(tmp_path), "aaaa")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the run's lock fd is closed here; wait until the parent has let go
        os.close(write)
        os.read(read, 1)
        held.release()  # a child never removes the parent's lock file
        os._exit(0)
    os.close(read)
    try:
        lock._held.discard(held.fd)
        os.close(held.fd)  # the parent "dies": its descriptor closes, the child's copy was closed at the fork
        held.fd = None
        FolderLock.take(str(tmp_path), "bbbb").release()
    finally:
        os.write(write, b"x")
        os.close(write)
        os.waitpid(pid, 0)
