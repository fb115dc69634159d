"""Fault injection for `fastgan train` (used by tests/test_resume_faults.py): python fault_driver.py WORKDIR.
With --gpu NAME (tests/test_train_graph.py): the captured GPU run of GPU_SCENARIOS[NAME] killed after its step-10
checkpoint and resumed, against the uninterrupted captured run (the killed run is forked first, before CUDA is
initialised in this process).

Runs one uninterrupted reference run, then every scenario of SCENARIOS: a run into its own folder with signals
sent to itself at chosen calls (torch.optim.Adam.step, Tensor.backward, the loader's next batch, inside
torch.save, os.fsync, before or after os.replace), then `--resume FOLDER` to the same step count.  SIGKILL
scenarios run in a forked child.  Nothing in fastgan knows about this: the hooks wrap torch and os functions
from outside.  Writes WORKDIR/results.json: per scenario the exit codes, the newest whole checkpoint after the
interruption, and every difference from the reference (tensors compared with torch.equal).
"""
import json
import os
import signal
import sys
import time
import traceback

import torch
import tqdm

from fastgan import cli
from fastgan.cli import checkpoints, data, train as train_command

ARGS = ["--batchSize", "4", "--ngf", "2", "--ndf", "2", "--builtin-images", "16", "--manualSeed", "1",
        "--device", "cpu", "--max-steps", "6", "--save-every", "2", "--log-every", "1"]
INT, TERM, KILL = "SIGINT", "SIGTERM", "SIGKILL"

# The run: 4 batches an epoch; checkpoint.pt at step 2 (--save-every), the epoch 0 set and checkpoint.pt at
# step 4, the epoch 1 set and checkpoint.pt at the end, step 6.  Each step calls: the loader once (fetch),
# backward twice and Adam.step twice (D, then G).  A save serialises with torch.save (the epoch set: netG,
# netD, train_state; then checkpoint.pt) and writes each file with fsync + os.replace (train_state first).
# A trigger: (hooked call, its number, signal, "before"|"after" the real call, counted from the first signal).
# expected: (exit status, step of the newest whole checkpoint after the interruption).
SCENARIOS = {
    "int-in-d-adam-step-1": ([("adam", 1, INT, "before", False)], (130, 1)),
    "int-in-g-adam-step-1": ([("adam", 2, INT, "before", False)], (130, 1)),
    "int-after-d-backward-step-2": ([("backward", 3, INT, "after", False)], (130, 2)),
    "int-in-g-adam-step-3": ([("adam", 6, INT, "before", False)], (130, 3)),
    "int-in-g-adam-epoch-end": ([("adam", 8, INT, "before", False)], (130, 4)),
    "int-in-last-step": ([("adam", 11, INT, "before", False)], (0, 6)),  # the run ends there: it is done
    "int-in-loader-fetch": ([("fetch", 3, INT, "before", False)], (130, 2)),
    "term-in-loader-next-epoch": ([("fetch", 5, TERM, "before", False)], (143, 4)),
    "term-in-d-adam-step-3": ([("adam", 5, TERM, "before", False)], (143, 3)),
    "term-after-d-backward-step-4": ([("backward", 7, TERM, "after", False)], (143, 4)),
    "term-in-d-adam-step-5": ([("adam", 10, TERM, "before", False)], (143, 5)),
    "int-inside-torch-save-interval": ([("save", 1, INT, "before", False)], (130, 2)),
    "term-before-replace-train-state": ([("replace", 2, TERM, "before", False)], (143, 4)),
    "int-after-fsync-netG": ([("fsync", 3, INT, "after", False)], (130, 4)),
    "int-after-replace-checkpoint": ([("replace", 5, INT, "after", False)], (130, 4)),
    "int-twice-inside-torch-save": ([("adam", 5, INT, "before", False), ("save", 1, INT, "before", True)],
                                    (130, 2)),
    "int-twice-before-replace": ([("adam", 5, INT, "before", False), ("replace", 1, INT, "before", True)],
                                 (130, 2)),
    "int-twice-after-replace": ([("adam", 5, INT, "before", False), ("replace", 1, INT, "after", True)],
                                (130, 3)),
    "int-twice-in-step": ([("adam", 5, INT, "before", False), ("adam", 1, INT, "before", True)], (130, 2)),
    "int-twice-in-epoch-set-write": ([("adam", 7, INT, "before", False), ("fsync", 1, INT, "after", True)],
                                     (130, 2)),
    "int-twice-between-epoch-files": ([("adam", 7, INT, "before", False), ("replace", 2, INT, "after", True)],
                                      (130, 2)),
    "kill-in-d-adam-step-4": ([("adam", 7, KILL, "before", False)], (-9, 2)),
    "kill-between-epoch-files": ([("fsync", 3, KILL, "after", False)], (-9, 2)),
    "kill-inside-torch-save-train-state": ([("save", 4, KILL, "before", False)], (-9, 2)),
    "kill-after-epoch-set-before-checkpoint": ([("replace", 4, KILL, "after", False)], (-9, 4)),
    "kill-inside-torch-save-final": ([("save", 6, KILL, "before", False)], (-9, 4)),
}


# --gpu: 8 steps an epoch, the epoch sets at 8, 16 and 24 (4 files replaced each), checkpoint.pt at 10 (the 5th
# replace).  Each kind of step warms up 3 times, then its graph is captured and replays until the kill; the
# resumed run warms up and captures again.  NAME: (extra flags, triggers, (exit status, newest step)).
GPU_ARGS = ["--device", "cuda", "--deterministic", "--graph", "on", "--batchSize", "16", "--ngf", "16", "--ndf", "16",
            "--builtin-images", "128", "--max-steps", "24", "--save-every", "10"]
GPU_SCENARIOS = {
    "dcgan64-one-graph": ([], [("replace", 5, KILL, "after", False)], (-9, 10)),
    "anime64-wgan-gp-d2-two-graphs": (["--preset", "anime64", "--loss", "wgan-gp", "--d-steps", "2"],
                                      [("replace", 5, KILL, "after", False)], (-9, 10)),
}


class Injector:
    """Counts the hooked calls and sends the signals of the triggers at theirs."""

    def __init__(self, triggers):
        self.triggers, self.counts, self.after_first, self.fired = triggers, {}, None, []

    def __call__(self, hook, when):
        self.counts[hook] = self.counts.get(hook, 0) + (when == "before")
        if self.after_first is not None and when == "before":
            self.after_first[hook] = self.after_first.get(hook, 0) + 1
        for trigger in self.triggers:
            name, number, sig, moment, relative = trigger
            counts = self.after_first if relative else self.counts
            if trigger in self.fired or name != hook or moment != when or counts is None:
                continue
            if counts.get(hook, 0) == number:
                self.fired.append(trigger)
                if self.after_first is None:
                    self.after_first = {}
                os.kill(os.getpid(), getattr(signal, sig))  # the handler runs here, in this frame


def _wrap(owner, name, hook, injector):
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        injector(hook, "before")
        result = original(*args, **kwargs)
        injector(hook, "after")
        return result

    setattr(owner, name, wrapped)
    return owner, name, original


def _hooked_loader(injector):
    original = data.Feeder.epoch

    def epoch(self, *args, **kwargs):
        batches = iter(original(self, *args, **kwargs))

        def hooked():
            for item in batches:
                injector("fetch", "before")
                yield item
        return hooked()

    data.Feeder.epoch = epoch
    return data.Feeder, "epoch", original


def install(injector):
    return [_wrap(torch.optim.Adam, "step", "adam", injector), _wrap(torch.Tensor, "backward", "backward", injector),
            _wrap(torch.serialization, "_save", "save", injector), _wrap(os, "fsync", "fsync", injector),
            _wrap(os, "replace", "replace", injector), _hooked_loader(injector)]


def train(outf, *extra):
    try:
        return cli.main(["train", "--outf", outf, *ARGS, *extra])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


def interrupted(outf, triggers, extra=()):
    """The exit status of a run with these triggers (-9 when SIGKILL ended it)."""
    injector = Injector(triggers)
    if any(sig == KILL for _, _, sig, _, _ in triggers):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            install(injector)
            os._exit(train(outf, *extra) + 100)  # not reached when the kill works
        _, status = os.waitpid(pid, 0)
        return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    patches = install(injector)
    try:
        return train(outf, *extra)
    finally:
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)


def differences(a, b, path=""):
    """Where two checkpoints differ: tensors by torch.equal (dtype and shape included), the rest by == (NaN
    equal to NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path} keys {sorted(map(str, a.keys() ^ b.keys()))}"]
        return [d for k in a if (path, k) != ("", "run_id") for d in differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path} length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    same = a == b or (isinstance(a, float) and a != a and b != b)  # NaN: the G values of a step without G updates
    return [] if same and type(a) is type(b) else [f"{path}: {a!r} vs {b!r}"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def folder_problems(outf):
    """Cut-short sets, temporary files and anything that is not whole in a finished run's folder."""
    problems = [f"temporary file {name}" for name in os.listdir(outf) if name.endswith(".fastgan-tmp")]
    for epoch in (0, 1):
        files = checkpoints.epoch_files(outf, epoch)
        record = checkpoints.peek(files["train_state"]) if os.path.isfile(files["train_state"]) else None
        problem = "missing" if record is None else checkpoints.set_problem(record, files)
        if problem:
            problems.append(f"epoch {epoch} set: {problem}")
    return problems


def compare(reference, outf):
    found = differences(load(os.path.join(reference, "checkpoint.pt")), load(os.path.join(outf, "checkpoint.pt")))
    for epoch in (0, 1):
        for name in (f"netG_epoch_{epoch}.pth", f"netD_epoch_{epoch}.pth", f"train_state_epoch_{epoch}.pt"):
            found += [f"{name}{d}" for d in differences(load(os.path.join(reference, name)),
                                                          load(os.path.join(outf, name)))]
    return found


def main(work, gpu=None):
    torch.set_num_threads(1)
    tqdm.tqdm.monitor_interval = 0  # no monitor thread: the SIGKILL scenarios fork
    train_command.N_FIXED = 4  # sample grids of 4 images: encoding 64 as PNG would take most of the time
    extra, scenarios = (), SCENARIOS
    if gpu:
        flags, triggers, expected = GPU_SCENARIOS[gpu]
        extra, scenarios = (*GPU_ARGS, *flags), {gpu: (triggers, expected)}
    reference = os.path.join(work, "reference")
    results = {"scenarios": {}}
    if not gpu:  # on the GPU the reference runs after the fork
        results["reference"] = train(reference)
    for name, (triggers, _) in scenarios.items():
        outf = os.path.join(work, name)
        result = results["scenarios"][name] = {}
        start = time.perf_counter()
        try:
            result["interrupted"] = interrupted(outf, [tuple(t) for t in triggers], extra)
            if gpu:
                results["reference"] = train(reference, *extra)
            newest = checkpoints.newest(outf)
            result["newest_step"] = None if newest is None else newest.step
            result["resumed"] = train(outf, "--resume", outf, *extra)
            result["differences"] = compare(reference, outf)
            result["folder_problems"] = folder_problems(outf)
        except Exception:  # noqa: BLE001 - reported to the test, which fails with it
            result["error"] = traceback.format_exc()
        result["seconds"] = round(time.perf_counter() - start, 2)
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], gpu=sys.argv[3] if sys.argv[2:3] == ["--gpu"] else None)
