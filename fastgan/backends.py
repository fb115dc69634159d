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
import threading
import warnings

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")

_override = threading.local()


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run on the given tensors."""


def check_name(backend):
    if backend is None:
        return None
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
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


def _triton_problem(device):
    error = triton_import_error()
    if error is not None:
        return f"triton does not import ({error}); install triton, or use backend='torch'"
    if device.type == "cpu" and not interpreter_enabled():
        return ("Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 "
                "before importing fastgan, move the model to CUDA, or use backend='torch'")
    if device.type not in ("cpu", "cuda"):
        return f"triton backend supports CUDA (or interpreted CPU) tensors, got {device.type}"
    return None


def _cuda_problem(device):
    from . import _build  # the extension is built on first use

    return _build.extension_problem(device)


_PROBLEMS = {"torch": lambda device: None, "triton": _triton_problem, "cuda": _cuda_problem}


@functools.cache
def _warn_once(message):
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve(backend, device):
    """The concrete backend ("torch" | "triton" | "cuda") to run on ``device``."""
    requested = getattr(_override, "backend", None) or check_name(backend) or "auto"
    if requested == "auto":
        requested = check_name(os.environ.get("FASTGAN_BACKEND") or "auto")
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
        _warn_once(f"fastgan: backend 'auto' cannot use {candidate}, falls back: {problem}")
    return "torch"


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
