"""python -m fastgan COMMAND: each command is a module with add_arguments(parser) and run(args).

Flags without a command go to train, as examples/dcgan's ``python main.py --dataset ...`` would; no arguments
at all print the usage and the commands (exit status 2, argparse's for a missing argument) rather than start a
run.  A user's mistake ends the command with one line and never a traceback: a bad flag (argparse) with
``fastgan COMMAND: error: ...`` and exit status 2; a fastgan.usage.UsageError raised anywhere below, or
running out of memory, with ``fastgan COMMAND: error: ...`` and exit status 1.  Anything else that escapes a
command is a bug in fastgan: its traceback is printed, followed by a line asking for a report.
"""
import argparse
import importlib
import sys
import traceback

import torch

from ..usage import UsageError, one_line

COMMANDS = {
    "train": "fastgan.cli.train",
    "sample": "fastgan.cli.sample",
    "interpolate": "fastgan.cli.interpolate",
    "demo": "fastgan.cli.demo",
    "bench": "fastgan.perf.bench",
    "profile": "fastgan.perf.profiling",
    "build-ext": "fastgan.cli.build_ext",
    "doctor": "fastgan.perf.doctor",
}
DEFAULT_COMMAND = "train"  # of flags without a command
BUG_REPORTS = "the fastgan issue tracker"


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (the usage summary is left to --help); exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def _out_of_memory(exc):
    return isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and "not enough memory" in str(exc))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = [DEFAULT_COMMAND, *argv]
    parser = Parser(prog="fastgan", description="Fast DCGAN training with fused kernels.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=module.__doc__.strip().splitlines()[0],
                                            description=module.__doc__))
    if not argv:
        parser.print_help(sys.stderr)
        parser.error("no command given; run one of them, e.g. python -m fastgan train --max-steps 300 (a short "
                     "run on built-in images; COMMAND --help lists its flags)")
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's parser, so that the message names the command
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    prefix = f"fastgan {args.command}"
    try:
        return importlib.import_module(COMMANDS[args.command]).run(args)
    except UsageError as exc:
        raise SystemExit(f"{prefix}: error: {one_line(exc)}") from None
    except KeyboardInterrupt:
        print(f"\n{prefix}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as exc:  # noqa: BLE001 - the last line of defence: say what the user can do
        if _out_of_memory(exc):
            raise SystemExit(f"{prefix}: error: out of memory ({one_line(exc)[:200]}); lower --batchSize or the "
                             "model widths (--ngf/--ndf), or free the device") from None
        traceback.print_exc()
        print(f"{prefix}: this is a bug in fastgan: please report it with the command and the traceback above "
              f"at {BUG_REPORTS}", file=sys.stderr)
        raise SystemExit(1) from None
