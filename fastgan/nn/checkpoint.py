"""Checkpoint loading: plain state_dicts, DataParallel/DDP and torch.compile checkpoints (keys prefixed
``module.`` / ``_orig_mod.``), and the common nested layouts: ``{"state_dict": ...}``, ``{"model": ...}``,
``{"netG": ..., "netD": ...}``, ``{"generator": ...}``, the PyTorch DCGAN tutorial's
``{"g_model_state_dict": ..., "d_model_state_dict": ..., "epoch": ...}``, or a fastgan train checkpoint.

:func:`find_state_dict` says which entry it took; :func:`load_checkpoint` logs it on the ``fastgan`` logger.
fastgan train's ``train_state`` files (optimizer state and position, no weights) are refused with a message
saying so.
"""
import logging
import os
import pickle

import torch

from ..usage import UsageError

logger = logging.getLogger("fastgan")

TRAIN_STATE = "fastgan-train-state"  # train_state_epoch_N.pt: everything of a train checkpoint but the weights
CHECKPOINT = "fastgan-checkpoint"  # checkpoint.pt: a whole train checkpoint, weights ("netG", "netD") included
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile


def strip_module_prefix(state_dict):
    """The state_dict with the leading ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile)
    wrappers' prefixes removed from every key that has them."""
    def strip(key):
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        return key
    return {strip(key): value for key, value in state_dict.items()}


def is_state_dict(value):
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def is_train_state(record):
    """Whether a loaded file is a fastgan train_state: marked so, or (before the mark) with its keys."""
    return isinstance(record, dict) and (record.get("format") == TRAIN_STATE
                                         or {"trainer", "settings"} <= record.keys())


def describe(checkpoint):
    """What a loaded checkpoint that holds no model weights is, as a phrase; None when it may hold some."""
    if not isinstance(checkpoint, dict):
        return f"a {type(checkpoint).__name__}, not a state_dict"
    if checkpoint.get("format") == CHECKPOINT:
        return None
    if is_train_state(checkpoint):
        step = checkpoint.get("step")
        return ("a fastgan train_state file (optimizer state and position of a run"
                + (f", step {step}" if step is not None else "") + "; no weights): use the netG_epoch_N.pth "
                "saved beside it, or the run's checkpoint.pt")
    if {"state", "param_groups"} <= checkpoint.keys():
        return "an optimizer state_dict (torch.optim), not model weights"
    return None


def state_dicts(checkpoint):
    """[(key, state_dict)] of every state_dict in ``checkpoint``: itself (key None), or its entries one or two
    levels down (keys like ``"g_model_state_dict"`` or ``"state_dict.netG"``), wrapper prefixes removed."""
    if is_state_dict(checkpoint):
        return [(None, strip_module_prefix(checkpoint))]
    if not isinstance(checkpoint, dict):
        return []
    if checkpoint.get("format") == CHECKPOINT:
        checkpoint = {key: checkpoint[key] for key in ("netG", "netD") if key in checkpoint}
    found = []
    for key, value in checkpoint.items():
        if is_state_dict(value):
            found.append((str(key), strip_module_prefix(value)))
        elif isinstance(value, dict):
            found += [(f"{key}.{inner}", strip_module_prefix(v)) for inner, v in value.items() if is_state_dict(v)]
    return found


def find_state_dict(checkpoint, model):
    """(state_dict, key) of the state_dict in ``checkpoint`` whose keys are ``model``'s; ``key`` is None when
    ``checkpoint`` is a state_dict itself.  A single state_dict is returned whatever its keys (loading it then
    says what does not fit).  Raises UsageError when there is none, or several and none has the model's keys."""
    what = describe(checkpoint)
    if what and not is_state_dict(checkpoint):
        raise UsageError(f"the checkpoint is {what}")
    found = state_dicts(checkpoint)
    if not found:
        raise UsageError(f"the checkpoint holds no state_dict (its entries: {', '.join(map(str, checkpoint))}); "
                         "expected tensors by parameter name, or one of them under a key such as 'state_dict'")
    if len(found) == 1:
        return found[0][1], found[0][0]
    own = model.state_dict().keys()
    fits = [(state, key) for key, state in found if state.keys() == own]
    if not fits:
        raise UsageError(f"none of the checkpoint's state_dicts ({', '.join(key for key, _ in found)}) has the "
                         f"keys of {type(model).__name__}; check the sizes and which model it is")
    return fits[0]


def read_file(path, name=None, trusted=None, map_location="cpu"):
    """``torch.load(path, weights_only=True)``, or a UsageError in one line, naming the file as ``name``
    (default: its path): it is not a readable checkpoint, or it holds pickled objects other than tensors, which
    are never unpickled (that can run any code); ``trusted`` says how to load such a file if the user trusts it.
    ``path``: a path or a file object."""
    name = name or str(getattr(path, "name", path))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # zip, pickle and torch errors alike: the file is not a checkpoint
        if isinstance(exc, pickle.UnpicklingError) and "weights only load failed" in str(exc).lower():
            raise UsageError(f"{name} holds pickled Python objects, not just tensors (a model saved with "
                             "torch.save(model)?), and is not loaded: unpickling can run any code; "
                             + (trusted or "save model.state_dict() instead")) from None
        first = (str(exc).strip().splitlines() or ["empty or cut short"])[0].split(". ")[0]  # torch's are long
        raise UsageError(f"{name} is not a readable checkpoint ({type(exc).__name__}: {first[:200]})") from None


def load_checkpoint(model, checkpoint, map_location="cpu", strict=True):
    """Load a checkpoint (a dict, or a path or file to one) into ``model``; returns load_state_dict's result.

    The checkpoint may be a state_dict or hold one in a nested layout (see the module docstring); the entry
    used is logged on the ``fastgan`` logger (INFO).  A file is read with ``weights_only=True``: one that holds
    other pickled objects raises UsageError, unread.  Mismatched architectures raise UsageError listing the
    missing, unexpected and mis-shaped keys."""
    if isinstance(checkpoint, (str, os.PathLike)) or hasattr(checkpoint, "read"):
        checkpoint = read_file(checkpoint, map_location=map_location,
                               trusted="if you trust the file, load it yourself and pass what it holds: "
                                       "fastgan.load_checkpoint(model, torch.load(path, weights_only=False))")
    state, key = find_state_dict(checkpoint, model)
    if key is not None:
        logger.info("fastgan.load_checkpoint: loading the checkpoint's %r entry into %s", key, type(model).__name__)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if strict and (missing or unexpected or shapes):
        lines = ([f"missing keys: {', '.join(missing)}"] if missing else []) + (
            [f"unexpected keys: {', '.join(unexpected)}"] if unexpected else []) + (
            [f"shape mismatch: {'; '.join(shapes)}"] if shapes else [])
        raise UsageError(f"checkpoint does not fit {type(model).__name__} ({'; '.join(lines)}); "
                         "check --ngf/--ndf/--nz/--nc match the run that saved it")
    return model.load_state_dict(state, strict=strict)
