"""Checks the commands share, run before any work starts: the backend (flag or FASTGAN_BACKEND) and
reading a checkpoint file."""
import os

from ..nn.checkpoint import read_file
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
    return read_file(path, f"{flag} {path}",
                     trusted="fastgan loads state_dicts only: if you trust the file, save the weights it holds "
                             "with torch.save(torch.load(path, weights_only=False).state_dict(), 'weights.pth') "
                             "and pass that")
