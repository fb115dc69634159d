"""Build the C++/CUDA extension (backend="cuda") now rather than on first use.

Prints where the library is and the parts it holds: cpu, and cuda with its GPU archs.
TORCH_CUDA_ARCH_LIST, CUDA_HOME and FASTGAN_CACHE_DIR change what is built and where."""
from ..ops import extension
from ..usage import UsageError, writable_folder


def add_arguments(parser):
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands and their output")


def run(args):
    writable_folder(extension.cache_dir(), "the build cache (FASTGAN_CACHE_DIR, else ~/.cache/fastgan)")
    try:
        info = extension.build(verbose=args.verbose)
    except extension.BuildError as exc:  # the compiler's last lines are the useful part: keep them
        raise SystemExit(f"fastgan build-ext: error: {exc}") from None
    except OSError as exc:
        raise UsageError(f"cannot build into {extension.cache_dir()} ({exc.strerror or exc}); set "
                         "FASTGAN_CACHE_DIR to a writable folder") from None
    print(f"library: {info.library}")
    print(f"parts:   {', '.join(info.parts)}")
    if info.no_cuda_reason:
        print(f"no cuda: {info.no_cuda_reason}")
    print(f"{'compiled now' if info.compiled else 'found in the cache'} (compile time {info.seconds:.0f} s)")
    return 0
