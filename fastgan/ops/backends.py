"""Backend selection: "torch" | "triton" | "cuda" | "auto".

The backend in force for an op is, in order: the innermost ``use_backend(...)``
context, else the ``backend=`` the module or function was given, else the
``FASTGAN_BACKEND`` environment variable, else "auto".  "auto" picks, for CUDA
tensors, the C++/CUDA extension when it builds, else triton when it imports, else
torch; and torch for CPU tensors.
"""
import contextlib
import functools
import os
import re
import threading
import warnings

import numpy
import torch

from ..usage import UsageError
from . import extension
from .contract import BackendUnavailable

BACKENDS = ("auto", "torch", "triton", "cuda")

_override = threading.local()


def check_name(backend, source="backend"):
    if backend is None:
        return None
    if backend not in BACKENDS:
        raise UsageError(f"{source} must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


@contextlib.contextmanager
def use_backend(backend):
    """Force ``backend`` for every fused op run inside the block."""
    check_name(backend)
    previous = getattr(_override, "backend", None)
    _override.backend = backend
    try:
        yield
    finally:
        _override.backend = previous


def forced():
    """The backend forced from outside the modules (use_backend, then FASTGAN_BACKEND), or None."""
    return getattr(_override, "backend", None) or os.environ.get("FASTGAN_BACKEND") or None


def interpreter_enabled():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_triton_import_error = ...  # unknown until asked; a plain global (not functools.cache) so dynamo can trace it


def triton_import_error():
    """None when triton imports, else the reason it does not."""
    global _triton_import_error
    if _triton_import_error is ...:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _triton_import_error = None
        except Exception as exc:  # ImportError, or a broken install
            _triton_import_error = f"{type(exc).__name__}: {exc}"
    return _triton_import_error


def _major_minor(version):
    return tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", version).groups())


_interpreter_error = ...  # unknown until asked, as _triton_import_error


def interpreter_error():
    """None when triton's interpreter can run with this numpy, else the reason it cannot.

    The interpreter of triton <= 3.6 turns its (1,)-shaped scalars into ints with ``int(array)``, which numpy 2.4
    made a TypeError (deprecated since 1.25): every kernel that loops over a run-time ``range()`` fails with an
    InterpreterError.  triton 3.8 squeezes the array first; 3.7 is unchecked, so it counts as affected."""
    global _interpreter_error
    if _interpreter_error is ...:
        import triton

        _interpreter_error = None
        if _major_minor(triton.__version__) < (3, 8) and _major_minor(numpy.__version__) >= (2, 4):
            _interpreter_error = (f"triton {triton.__version__}'s interpreter needs numpy<2.4, found numpy "
                                  f"{numpy.__version__}: pip install 'numpy<2.4' (or triton>=3.8)")
    return _interpreter_error


# Under torch.compile: evaluated once while tracing (dynamo cannot trace re), as extension.extension_problem.
interpreter_error._dynamo_marked_constant = True


def _triton_problem(device):
    error = triton_import_error()
    if error is not None:
        return f"triton does not import ({error}); install triton, or use backend='torch'"
    if device.type == "cpu" and not interpreter_enabled():
        return ("Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 "
                "before importing fastgan, move the model to CUDA, or use backend='torch'")
    if interpreter_enabled() and interpreter_error():
        return f"{interpreter_error()}, or use backend='torch'"
    if device.type not in ("cpu", "cuda"):
        return f"triton backend supports CUDA (or interpreted CPU) tensors, got {device.type}"
    return None


_PROBLEMS = {"torch": lambda device: None, "triton": _triton_problem, "cuda": extension.extension_problem}


@functools.cache
def warn_once(message, stacklevel=2):
    """A RuntimeWarning, once per process and message; ``stacklevel`` as warnings.warn's, from the caller."""
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)


def resolve(backend, device):
    """The concrete backend ("torch" | "triton" | "cuda") to run on ``device``."""
    requested = getattr(_override, "backend", None) or check_name(backend) or "auto"
    if requested == "auto":
        requested = check_name(os.environ.get("FASTGAN_BACKEND") or "auto",
                               "the environment variable FASTGAN_BACKEND")
    if requested != "auto":
        problem = _PROBLEMS[requested](device)
        if problem:
            raise BackendUnavailable(f"backend={requested!r} cannot run here: {problem}")
        return requested
    if device.type != "cuda":
        return "torch"
    for candidate in ("cuda", "triton"):
        problem = _PROBLEMS[candidate](device)
        if problem is None:
            return candidate
        warn_once(f"fastgan: backend 'auto' cannot use {candidate}, falls back: {problem}")
    return "torch"


def kernel_ops(which):
    """The module holding the ops of kernel backend ``which`` ("triton" or "cuda").

    Imported here, on first use: importing fastgan.ops.ext_ops builds the C++/CUDA extension."""
    if which == "triton":
        from . import triton_ops

        return triton_ops
    from . import ext_ops

    return ext_ops


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(name, flag="--device"):
    """torch.device for a --device flag (default: cuda if available, else cpu); UsageError when it cannot be used."""
    try:
        device = torch.device(name) if name else default_device()
    except RuntimeError as exc:
        raise UsageError(f"{flag} {name}: {exc}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag} {name}: no CUDA device is available here; use {flag} cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"{flag} {name}: there are {torch.cuda.device_count()} CUDA device(s) here; "
                         f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag} {name}: fastgan runs on cpu and cuda devices, not {device.type}")
    return device
