"""fastgan train's checkpoints in --outf: written so that none is ever half-written, mistaken or lost.

A checkpoint is a run's state at a step boundary: G's and D's weights and buffers, the optimizers and grad
scalers, the position (epoch, batch, step), the loss history, the fixed noise, the RNG states, the settings,
and the run's id (drawn when the run starts, kept by every resume) with the step.  It has two forms:

``checkpoint.pt``
    the whole checkpoint in one file (format CHECKPOINT), rewritten at every save: each --save-every steps,
    each epoch's end, the end of the run and on Ctrl-C/SIGTERM.  ``--resume DIR`` starts from it.
``netG_epoch_N.pth``, ``netD_epoch_N.pth``, ``train_state_epoch_N.pt``
    at the end of epoch N, and at the end of the run in its last epoch: plain state_dicts (they load into the
    reference models) and the rest (format TRAIN_STATE) with the SHA-256 of the two weight files.  The
    train_state is written first, so a set whose checksums do not match is a save that was cut short (or a
    file replaced since), and it is never taken as a checkpoint.

Every file is written under a temporary name, flushed to disk and renamed over its target (os.replace): a
file is the old one or the new one, whole.  checkpoint.pt is written after the epoch's set, so a save that
dies leaves the previous checkpoint.pt, or an epoch set newer than it, complete.  A run replaces only its
own earlier checkpoints (same run id, an earlier or the same step), its own cut-short sets, and the
checkpoint it resumed from; anything else in the way is refused before training starts (see
:func:`blocking`), unless --force.
"""
import dataclasses
import glob
import hashlib
import io
import os
import re
import sys

import torch

from ..nn.checkpoint import CHECKPOINT, is_train_state, read_file
from ..usage import UsageError

CHECKPOINT_FILE = "checkpoint.pt"
_EPOCH_FILE = re.compile(r"(netG|netD)_epoch_(\d+)\.pth|train_state_epoch_(\d+)\.pt")
_TEMP_SUFFIX = ".fastgan-tmp"


def epoch_files(folder, epoch):
    """{"netG": path, "netD": path, "train_state": path} of epoch ``epoch`` in ``folder``."""
    return {"netG": os.path.join(folder, f"netG_epoch_{epoch}.pth"),
            "netD": os.path.join(folder, f"netD_epoch_{epoch}.pth"),
            "train_state": os.path.join(folder, f"train_state_epoch_{epoch}.pt")}


def serialize(obj):
    """torch.save's bytes of ``obj`` with every tensor on the host: examples/dcgan's plain torch.load (no
    map_location) of a file saved on a GPU must work on a machine without one."""
    buffer = io.BytesIO()
    torch.save(_on_host(obj), buffer)
    return buffer.getvalue()


def _on_host(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        moved = type(obj)((k, _on_host(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a state_dict's module versions
            moved._metadata = obj._metadata
        return moved
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_host(v) for v in obj)
    return obj


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path, data):
    """Write ``data`` (bytes) to ``path`` so that ``path`` is never seen half-written: a temporary file in the
    same folder, flushed to disk, then renamed over ``path``.  The temporary file goes whatever happens."""
    temp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}{_TEMP_SUFFIX}")
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def remove_stale_temporaries(folder):
    """Remove the temporary files of saves that were killed (they are never checkpoints)."""
    for path in glob.glob(os.path.join(glob.escape(folder), f".*{_TEMP_SUFFIX}")):
        os.remove(path)


def _load(path, mmap=False):
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def peek(path):
    """The record in a train_state or checkpoint file (tensors memory-mapped, so cheap to look at), or None."""
    try:
        record = _load(path, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable: not a checkpoint of ours
        return None
    return record if isinstance(record, dict) else None


@dataclasses.dataclass
class Source:
    """A checkpoint to resume from: its record, G's and D's state_dicts, the files it is made of."""
    record: dict
    netG: dict
    netD: dict
    files: list
    label: str  # how messages name it

    @property
    def run_id(self):
        return self.record.get("run_id")

    @property
    def step(self):
        return self.record["step"]


def set_problem(record, files):
    """Why the epoch set of ``record`` (a train_state) with these weight files is not a whole checkpoint, or
    None.  Records from before run ids and checksums have no checksums to check."""
    for role in ("netG", "netD"):
        path = files[role]
        if not os.path.isfile(path):
            return f"{os.path.basename(path)} is missing"
        expected = record.get("files", {}).get(role, {}).get("sha256")
        if expected is not None and file_sha256(path) != expected:
            return (f"{os.path.basename(path)} is not the file {os.path.basename(files['train_state'])} was saved "
                    "with (its save was cut short, or it was replaced since)")
    return None


def read_checkpoint_file(path):
    """A Source from a checkpoint.pt file; UsageError when it is not one."""
    record = read_file(path)
    if not (isinstance(record, dict) and record.get("format") == CHECKPOINT):
        raise UsageError(f"{path} is not a fastgan checkpoint.pt (resume from a folder with --resume DIR, or "
                         "a train_state_epoch_N.pt)")
    return Source(record, record["netG"], record["netD"], [path], f"{path} (step {record['step']})")


def read_epoch_set(train_state_path, netG=None, netD=None):
    """A Source from a train_state file and its weight files (by default the netG/netD_epoch_N.pth beside it);
    UsageError naming the file when the set is not whole."""
    record = peek(train_state_path)
    if not is_train_state(record):
        raise UsageError(f"{train_state_path} is not a readable fastgan train_state file")
    folder = os.path.dirname(train_state_path)
    files = epoch_files(folder, record["epoch"])
    files["train_state"] = train_state_path
    for role, path in (("netG", netG), ("netD", netD)):
        if path is not None:
            files[role] = path
        elif "files" in record:
            files[role] = os.path.join(folder, record["files"][role]["name"])
    problem = set_problem(record, files)
    if problem:
        raise UsageError(f"{train_state_path} is not a whole checkpoint: {problem}")
    record = _load(train_state_path)  # the whole record, not memory-mapped: the file may be replaced later
    weights = [_load(files[role]) for role in ("netG", "netD")]
    return Source(record, *weights, [files["netG"], files["netD"], train_state_path],
                  f"{train_state_path} (step {record['step']})")


def _epoch_records(folder):
    """[(step, train_state path, record)] of the readable train_state files in ``folder``, newest first."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(folder), "train_state_epoch_*.pt")):
        record = peek(path)
        if record is not None and "step" in record:
            found.append((record["step"], path, record))
    return sorted(found, key=lambda item: -item[0])


def _newest_epoch_set(folder, after):
    """The newest whole epoch set in ``folder`` with a step after ``after``, as a Source, or None."""
    for step, state_path, record in _epoch_records(folder):
        if step <= after:
            return None
        if set_problem(record, {**epoch_files(folder, record["epoch"]), "train_state": state_path}) is None:
            return read_epoch_set(state_path)
    return None


def newest(folder, quiet=False):
    """The newest whole checkpoint in ``folder`` as a Source, or None: checkpoint.pt, or an epoch set with a
    later step (a save that died between the two).

    A checkpoint.pt that does not load (damaged on disk, cut short by a copy) gives way to the newest whole
    epoch set, with a line on stderr saying so (unless ``quiet``); it is then among the Source's files, which
    the resumed run may replace.  UsageError when there is no epoch set to fall back to."""
    path = os.path.join(folder, CHECKPOINT_FILE)
    if not os.path.isfile(path):
        return _newest_epoch_set(folder, -1)
    record = peek(path)
    if record is not None:
        if record.get("format") != CHECKPOINT:  # another kind of file, not ours to replace (blocking() says so)
            return _newest_epoch_set(folder, -1)
        later = _newest_epoch_set(folder, record["step"])
        if later is not None:
            return later
    try:
        return read_checkpoint_file(path)
    except UsageError as exc:
        damage = str(exc)
    fallback = _newest_epoch_set(folder, -1)
    if fallback is None:
        raise UsageError(f"{damage}, and {folder} holds no whole epoch set (train_state_epoch_N.pt with its "
                         "netG/netD files) to fall back to; start a new run with --outf DIR (or --force to "
                         f"replace {path})")
    if not quiet:
        print(f"fastgan train: {damage}; falling back to the newest whole epoch set, {fallback.label} (the damaged "
              f"{CHECKPOINT_FILE} is replaced at this run's first save)", file=sys.stderr, flush=True)
    fallback.files.append(path)
    return fallback


def resumable(folder):
    """Whether ``--resume folder`` finds a whole checkpoint to continue (see newest)."""
    try:
        return newest(folder, quiet=True) is not None
    except UsageError:
        return False


def blocking(folder, run_id, step, epoch, source_files):
    """The files in ``folder`` that a run must not replace, as "path (why)" strings.

    The run is ``run_id`` (None for a fresh run) at ``step``, about to train epoch ``epoch`` on: it writes
    checkpoint.pt and the epoch sets of ``epoch`` and later.  It may replace its own checkpoints from an
    earlier or the same step, its own cut-short sets, and ``source_files`` (what it resumes from)."""
    source = {os.path.abspath(p) for p in source_files}
    found = []

    def ours(record):
        return run_id is not None and record is not None and record.get("run_id") == run_id

    path = os.path.join(folder, CHECKPOINT_FILE)
    if os.path.exists(path) and os.path.abspath(path) not in source:
        record = peek(path)
        if not (ours(record) and record["step"] <= step):
            found.append(f"{path} ({_whose(record, run_id)})")
    epochs = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        match = _EPOCH_FILE.fullmatch(name)
        if match and int(match.group(2) or match.group(3)) >= epoch:
            epochs.setdefault(int(match.group(2) or match.group(3)), []).append(os.path.join(folder, name))
    for number, paths in sorted(epochs.items()):
        paths = [p for p in paths if os.path.abspath(p) not in source]
        if not paths:
            continue
        files = epoch_files(folder, number)
        record = peek(files["train_state"]) if os.path.isfile(files["train_state"]) else None
        if ours(record) and (record["step"] <= step or set_problem(record, files) is not None):
            continue
        why = _whose(record, run_id) if record is not None else "no train_state beside it: not this run's"
        found += [f"{p} ({why})" for p in sorted(paths)]
    return found


def _whose(record, run_id):
    if record is None:
        return "not a readable fastgan checkpoint"
    if "step" not in record:
        return "not a fastgan checkpoint"
    if record.get("run_id") is None:
        return f"a run without an id, step {record['step']}"
    if record.get("run_id") != run_id:
        return f"run {record['run_id']}, step {record['step']}"
    return f"this run, later: step {record['step']}"
