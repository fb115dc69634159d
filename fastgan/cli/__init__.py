"""python -m fastgan [command]: each command is a module with add_arguments(parser) and run(args).

A user's mistake (fastgan.usage.UsageError, raised anywhere below) ends the command with one line,
``fastgan COMMAND: error: ...``, and exit status 1, never a traceback.
"""
import argparse
import importlib
import sys

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
DEFAULT_COMMAND = "train"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = [DEFAULT_COMMAND, *argv]
    parser = argparse.ArgumentParser(prog="fastgan", description="Fast DCGAN training with fused kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=module.__doc__.strip().splitlines()[0],
                                            description=module.__doc__))
    args = parser.parse_args(argv)
    try:
        return importlib.import_module(COMMANDS[args.command]).run(args)
    except UsageError as exc:
        raise SystemExit(f"fastgan {args.command}: error: {one_line(exc)}") from None
