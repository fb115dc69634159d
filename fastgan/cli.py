"""python -m fastgan [command]: each command is a module with add_arguments(parser) and run(args)."""
import argparse
import importlib
import sys

COMMANDS = {
    "train": "fastgan.train",
    "sample": "fastgan.sample",
    "interpolate": "fastgan.interpolate",
    "demo": "fastgan.demo",
    "bench": "fastgan.bench",
    "profile": "fastgan.profiling",
    "build-ext": "fastgan.build_ext",
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
    return importlib.import_module(COMMANDS[args.command]).run(args)
