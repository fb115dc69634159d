"""Checks the commands share, run before any work starts: the backend (flag or FASTGAN_BACKEND) and
reading a checkpoint file."""
import os
import pickle

import torch

from ..ops import backends
from ..usage import UsageError, one_line


def check_backend(name, device):
    """The concrete backend ``--backend name`` runs on ``device``; a UsageError that names the environment
    variable when FASTGAN_BACKEND chose it and it cannot run here."""
    env = os.environ.get("FASTGAN_BACKEND")
    try:
        return backends.resolve(name, device)
    except UsageError as exc:
        if name in (None, "auto") and env:
            raise UsageError(f"FASTGAN_BACKEND={env} (set in the environment) cannot be used: {one_line(exc)}; "
                             "unset FASTGAN_BACKEND or pass --backend") from None
        raise


def read_checkpoint(path, flag):
    """What ``torch.load(path, weights_only=True)`` gives, or a UsageError saying why the file cannot be read."""
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder; give the checkpoint file in it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip, pickle and torch errors alike: the file is not a checkpoint
        if isinstance(exc, pickle.UnpicklingError) and "weights only load failed" in str(exc).lower():
            raise UsageError(f"{flag} {path} holds pickled Python objects, not just tensors (a model saved with "
                             "torch.save(model)?); fastgan loads state_dicts only: save model.state_dict() "
                             "instead") from None  # never unpickled here
        raise UsageError(f"{flag} {path} is not a readable checkpoint ({_first_line(exc)})") from None


def _first_line(exc):
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else f"{type(exc).__name__}: empty or cut short"
