"""A user's mistakes: the one exception every layer raises for them, and argparse types that check numbers.

``UsageError`` is a bad input (shape, dtype, device, flag, path, checkpoint, a missing compiler) with a
message that names what was expected and how to fix it.  The command line prints it as one line and exits
with status 1; anything else that escapes a command is a bug in fastgan and is reported as one.

This module imports nothing from fastgan, so that every layer can use it.
"""
import argparse
import math


class UsageError(ValueError):
    """A user's mistake; the message says what was expected and how to fix it."""


def one_line(text):
    """``text`` with its whitespace runs (newlines included) folded into single spaces."""
    return " ".join(str(text).split())


def _number(kind, check, expected):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (math.isfinite(value) and check(value)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value
    parse.__name__ = expected  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v > 0, "an integer >= 1")
natural_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a number > 0")
natural_float = _number(float, lambda v: v >= 0, "a number >= 0")
unit_float = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
