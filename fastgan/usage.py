"""A user's mistakes: the one exception every layer raises for them, and argparse types that check numbers.

``UsageError`` is a bad input (shape, dtype, device, flag, path, checkpoint, a missing compiler) with a
message that names what was expected and how to fix it.  The command line prints it as one line and exits
with status 1; anything else that escapes a command is a bug in fastgan and is reported as one.

This module imports nothing from fastgan, so that every layer can use it.
"""
import argparse
import math
import os
import tempfile


class UsageError(ValueError):
    """A user's mistake; the message says what was expected and how to fix it."""


def one_line(text):
    """``text`` with its whitespace runs (newlines included) folded into single spaces."""
    return " ".join(str(text).split())


def _number(kind, check, expected):
    """An argparse type: ``kind(text)``, finite and passing ``check``, else an error saying ``expected``."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if (isinstance(value, float) and not math.isfinite(value)) or not check(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value
    parse.__name__ = expected  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v > 0, "an integer >= 1")
natural_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a number > 0")
natural_float = _number(float, lambda v: v >= 0, "a number >= 0")
unit_float = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
int_at_least_2 = _number(int, lambda v: v >= 2, "an integer >= 2")
width_int = _number(int, lambda v: 1 <= v <= 2**16, "an integer in [1, 65536]")  # model widths and sizes
seed_int = _number(int, lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)")


def _unwritable(folder, create=True):
    """Why no file can be written into ``folder``, or None when one can.  ``create``: make the folder (and its
    parents) if missing; else only check that they could be made, probing the nearest existing ancestor."""
    try:
        if create:
            os.makedirs(folder, exist_ok=True)
        else:
            folder = os.path.abspath(folder)
            while not os.path.exists(folder):
                folder = os.path.dirname(folder)
            if not os.path.isdir(folder):
                return f"{folder} is a file"
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fastgan-probe-"):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def writable_folder(path, flag, create=True):
    """Check that files can be written into the folder ``path``, creating it (and its parents) if missing, or
    with ``create=False`` only checking that it could be; UsageError if not.  Returns ``path``."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a file, not a folder; pick a folder (it is created if missing)")
    problem = _unwritable(path, create)
    if problem:
        raise UsageError(f"{flag} {path} is not a writable folder ({problem}); pick a folder you can write to")
    return path


def image_path(path, flag):
    """Check, before any work starts, that pillow can write an image to ``path``: its extension names a format
    pillow saves and its folder (created if missing) is writable.  Returns ``path``."""
    from PIL import Image

    extension = os.path.splitext(path)[1].lower()
    if Image.registered_extensions().get(extension) not in Image.SAVE:
        raise UsageError(f"{flag} {path}: pillow cannot write {extension or 'a file without an extension'}; "
                         "end the name in .png (or .jpg, .webp)")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder; give a file name such as {os.path.join(path, 'grid.png')}")
    folder = os.path.dirname(os.path.abspath(path))
    problem = _unwritable(folder)
    if problem:
        raise UsageError(f"{flag} {path}: cannot write into {folder} ({problem}); pick a writable folder")
    return path
