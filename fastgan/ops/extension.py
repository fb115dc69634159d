"""The C++/CUDA extension (csrc/): built just in time with ninja, cached, loaded once per process.

    extension_problem(device)  None when backend="cuda" can run on ``device``, else why not, with the fix
    load_library()             build it if needed and load it into this process (fastgan.ops.ext_ops does)
    build(verbose=False)       build the extension, or find it in the cache: what ``python -m fastgan build-ext`` runs

The cache (FASTGAN_CACHE_DIR, else $XDG_CACHE_HOME/fastgan or ~/.cache/fastgan) holds one folder per build,
named by a hash of the sources, the torch and CUDA versions and the CUDA archs; a process that finds the folder
loads its library without compiling.  A build compiles in a subprocess, into a temporary folder that is renamed
into place when it succeeds, under a file lock: concurrent builds neither repeat the work nor corrupt the cache.

The CUDA part is built when torch is a CUDA build and a CUDA toolkit of the same major version is found
(CUDA_HOME, else nvcc on PATH, else /usr/local/cuda), with or without a GPU.  It targets sm_90 (H100/H200) and
the GPUs present, or TORCH_CUDA_ARCH_LIST.  A failed build is remembered for the life of the process: fastgan
reports it once and does not retry.
"""
import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import torch

from .contract import BackendUnavailable

NAME = "fastgan_ext"
CPU_SOURCES = ("fastgan_ext.h", "ops.cpp", "bn_act.cpp", "sigmoid_bce.cpp")
CUDA_SOURCES = ("bn_act.cu", "sigmoid_bce.cu")
DEFAULT_ARCHS = ("9.0",)
CFLAGS = ["-O3", "-fopenmp"]
# at::vec's AVX2 code for the CPU kernels (csrc/bn_act.cpp), where ATen's own kernels run AVX2 or AVX512 here
AVX2_CFLAGS = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
LDFLAGS = ["-fopenmp"]
CUDA_CFLAGS = ["-O3", "-lineinfo"]
ERROR_LINES = 15
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # fastgan/


class BuildError(RuntimeError):
    """The extension could not be built or loaded; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class BuildInfo:
    library: str             # path of the shared library
    cuda_archs: tuple        # e.g. ("9.0",); empty without the CUDA part
    no_cuda_reason: str      # why the CUDA part is missing, else ""
    compiled: bool           # compiled by this call (False: found in the cache)
    seconds: float           # how long its compilation took

    @property
    def parts(self):
        return ["cpu"] + ([f"cuda ({', '.join('sm_' + a.replace('.', '') for a in self.cuda_archs)})"]
                          if self.cuda_archs else [])


def cache_dir():
    root = os.environ.get("FASTGAN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fastgan")
    return os.path.join(root, "ext")


def csrc_dir():
    """fastgan/csrc: the sources in a wheel, a link to the checkout's csrc/ otherwise."""
    folder = os.path.join(_PACKAGE, "csrc")
    if os.path.isfile(os.path.join(folder, "ops.cpp")):
        return folder
    raise BuildError("the C++/CUDA sources (csrc/) are not installed with fastgan; install fastgan from a source "
                     "checkout (pip install -e .), or use backend='triton' or 'torch'")


def cuda_arch_list():
    """TORCH_CUDA_ARCH_LIST, else sm_90 and the capability of every GPU present, as "8.0;9.0"."""
    requested = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(" ", ";")
    archs = [a for a in requested.split(";") if a]
    if not archs:
        archs = set(DEFAULT_ARCHS)
        if torch.cuda.is_available():
            archs.update("%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))
        archs = sorted(archs)
    return ";".join(archs)


def cpu_flags():
    """CFLAGS for this CPU: AVX2 code where ATen's kernels use AVX2 or AVX512 (ATEN_CPU_CAPABILITY=default
    turns it off), else at::vec's portable code.  They are part of the cache key, so a cache shared with a CPU
    without AVX2 keeps the two builds apart."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return CFLAGS + (AVX2_CFLAGS if x86 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else [])


def _toolkit_release(home):
    out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else "unknown"


def cuda_toolkit():
    """(CUDA_HOME, nvcc release) of the toolkit that builds the CUDA part, or (None, why there is none)."""
    if torch.version.cuda is None:
        return None, "torch is a CPU-only build"
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        candidates = [explicit]
    else:
        nvcc = shutil.which("nvcc")  # may be a wrapper script outside the toolkit: check what it points at
        candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None, "/usr/local/cuda"]
    for home in filter(None, candidates):
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
                os.path.join(home, "include", "cuda_runtime.h")):
            release = _toolkit_release(home)
            if release.split(".")[0] != torch.version.cuda.split(".")[0]:
                return None, (f"the CUDA toolkit at {home} is CUDA {release}, but torch was built with CUDA "
                              f"{torch.version.cuda}; point CUDA_HOME at a CUDA {torch.version.cuda.split('.')[0]}.x "
                              "toolkit")
            return home, release
    where = f"CUDA_HOME={explicit}" if explicit else "neither nvcc on PATH nor /usr/local/cuda"
    return None, (f"no CUDA toolkit found ({where} has bin/nvcc and include/cuda_runtime.h); install one or "
                  "set CUDA_HOME")


def _wheel_cuda_includes(home):
    """The CUDA wheel's nvidia/cuXX/include, where the toolkit lacks the cuBLAS/cuSPARSE headers ATen includes."""
    if os.path.isfile(os.path.join(home, "include", "cublas_v2.h")):
        return []
    major = torch.version.cuda.split(".")[0]
    for path in sys.path:
        include = os.path.join(path, "nvidia", f"cu{major}", "include")
        if os.path.isfile(os.path.join(include, "cublas_v2.h")):
            return [include]
    return []


@dataclasses.dataclass(frozen=True)
class _Plan:
    directory: str           # the cache folder of this build
    sources: dict            # file name -> contents
    cuda_home: str           # "" without the CUDA part
    cuda_archs: str          # "9.0;8.0", or ""
    cflags: tuple            # the C++ compiler's flags (cpu_flags())
    no_cuda_reason: str
    include_dirs: tuple


def _plan():
    src = csrc_dir()
    cuda_home, release_or_reason = cuda_toolkit()
    names = CPU_SOURCES + (CUDA_SOURCES if cuda_home else ())
    sources = {}
    for name in names:
        with open(os.path.join(src, name), "rb") as f:
            sources[name] = f.read()
    archs = cuda_arch_list() if cuda_home else ""
    cflags = cpu_flags()
    key = hashlib.sha256()
    for name in names:
        key.update(name.encode() + b"\0" + sources[name] + b"\0")
    key.update(repr((torch.__version__, torch.version.cuda, sys.version_info[:2], cuda_home and release_or_reason,
                     archs, cflags, LDFLAGS, CUDA_CFLAGS)).encode())
    folder = f"{NAME}-{'cuda' if cuda_home else 'cpu'}-{key.hexdigest()[:16]}"
    return _Plan(directory=os.path.join(cache_dir(), folder), sources=sources, cuda_home=cuda_home or "",
                 cuda_archs=archs, cflags=tuple(cflags), no_cuda_reason="" if cuda_home else release_or_reason,
                 include_dirs=tuple(_wheel_cuda_includes(cuda_home)) if cuda_home else ())


def _library(directory):
    return os.path.join(directory, NAME + ".so")


def _compiler_tail(output):
    """The last lines of a failed build's output that are compiler messages (not ninja's commands)."""
    skip = re.compile(r"^(\[\d+/\d+\]|FAILED:|ninja: |Error building extension|Emitting ninja|Building extension|"
                      r"Allowing ninja|Loading extension|Traceback|  File |[WIE]\d{4} )")
    lines = [line.rstrip() for line in output.splitlines()
             if line.strip() and len(line) < 400 and not skip.match(line)]
    return "\n".join("    " + line for line in lines[-ERROR_LINES:])


def _compile(plan, staging, verbose):
    """Compile into ``staging`` in a subprocess that sees the toolkit's CUDA_HOME and the arch list."""
    src = os.path.join(staging, "src")
    os.makedirs(src)
    for name, text in plan.sources.items():
        with open(os.path.join(src, name), "wb") as f:
            f.write(text)
    job = dict(build_dir=staging, include_dirs=[src, *plan.include_dirs], cuda=bool(plan.cuda_home),
               sources=[os.path.join(src, n) for n in plan.sources if n.endswith((".cpp", ".cu"))], verbose=verbose,
               cflags=list(plan.cflags))
    # pip's ninja lies beside the interpreter, which is not on PATH when a venv's python runs unactivated
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(_PACKAGE), os.environ.get("PYTHONPATH", "")]),
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    if plan.cuda_home:
        env.update(CUDA_HOME=plan.cuda_home, TORCH_CUDA_ARCH_LIST=plan.cuda_archs)
    command = [sys.executable, "-c", f"import {__name__} as m; m.compile_job()", json.dumps(job)]
    result = subprocess.run(command, env=env, stdout=None if verbose else subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        log = os.path.join(os.path.dirname(staging), os.path.basename(plan.directory) + ".failed.log")
        with open(log, "w") as f:
            f.write(result.stdout or "(the output went to the terminal: --verbose)\n")
        raise BuildError(f"the C++/CUDA extension failed to build (full log: {log}); fix the cause, or clear the "
                         f"cache folder {cache_dir()} if it persists; backend='triton' and 'torch' work meanwhile. "
                         f"Compiler output, last lines:\n{_compiler_tail(result.stdout or '')}")


def build(verbose=False):
    """Build the extension into the cache unless it is there; returns its BuildInfo.  Raises BuildError."""
    import fcntl

    plan = _plan()
    os.makedirs(cache_dir(), exist_ok=True)
    compiled, start = False, time.perf_counter()
    if not os.path.isfile(_library(plan.directory)):
        with open(plan.directory + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when a crashed builder exits
            if not os.path.isfile(_library(plan.directory)):  # else another process built it while we waited
                parts = "cpu, cuda" if plan.cuda_home else "cpu"
                print(f"fastgan: building the C++/CUDA extension ({parts}) into {plan.directory}; this takes a "
                      "few minutes, once", file=sys.stderr, flush=True)
                staging = tempfile.mkdtemp(prefix=os.path.basename(plan.directory) + ".tmp-", dir=cache_dir())
                try:
                    _compile(plan, staging, verbose)
                    with open(os.path.join(staging, "build.json"), "w") as f:
                        json.dump(dict(cuda_archs=plan.cuda_archs, no_cuda_reason=plan.no_cuda_reason,
                                       seconds=round(time.perf_counter() - start, 1), torch=torch.__version__), f)
                    os.rename(staging, plan.directory)
                    compiled = True
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
    with open(os.path.join(plan.directory, "build.json")) as f:
        meta = json.load(f)
    return BuildInfo(library=_library(plan.directory), cuda_archs=tuple(a for a in meta["cuda_archs"].split(";") if a),
                     no_cuda_reason=meta["no_cuda_reason"], compiled=compiled, seconds=meta["seconds"])


# ----------------------------------------------------------------------------- once per process

_lock = threading.Lock()
_loaded = None    # BuildInfo of the library loaded into this process
_failure = None   # why it could not be built or loaded


def _ensure_loaded():
    global _loaded, _failure
    with _lock:
        if _loaded is None and _failure is None:
            try:
                info = build()
                try:
                    torch.ops.load_library(info.library)
                except (OSError, RuntimeError) as exc:
                    raise BuildError(f"the C++/CUDA extension {info.library} does not load ({exc}); clear the cache "
                                     f"folder {cache_dir()} to rebuild it") from exc
                _loaded = info
            except BuildError as exc:
                _failure = str(exc)
            except OSError as exc:  # e.g. a read-only cache folder
                _failure = (f"the C++/CUDA extension cannot be built in {cache_dir()} ({exc}); set FASTGAN_CACHE_DIR "
                            "to a writable folder")
        return _loaded, _failure


def _covers(archs, capability):
    """Whether code built for ``archs`` ("8.0", "9.0+PTX", "9.0a") runs on a GPU of ``capability``."""
    for arch in archs:
        match = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", arch)
        if not match:
            continue
        major, minor = int(match.group(1)), int(match.group(2))
        if match.group(4) and (major, minor) <= capability:
            return True
        if major == capability[0] and (minor == capability[1] or not match.group(3) and minor <= capability[1]):
            return True
    return False


def _device_problem(device):
    if device.type not in ("cpu", "cuda"):
        return f"the C++/CUDA extension runs on CPU and CUDA tensors, not {device.type}; use backend='torch'"
    info, failure = _ensure_loaded()
    if failure:
        return failure
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is available; use CPU tensors, or backend='torch'"
        if not info.cuda_archs:
            return f"the C++/CUDA extension was built without its CUDA part: {info.no_cuda_reason}"
        capability = torch.cuda.get_device_capability(device)
        if not _covers(info.cuda_archs, capability):
            return (f"the C++/CUDA extension holds code for {', '.join(info.cuda_archs)} but {device} is "
                    f"{capability[0]}.{capability[1]}; add {capability[0]}.{capability[1]} to TORCH_CUDA_ARCH_LIST")
    return None


_problems = {}  # str(device) -> problem


def extension_problem(device):
    """None when the extension can run on ``device`` (building it on first use), else a reason with the fix."""
    key = str(device)
    if key not in _problems:
        _problems[key] = _device_problem(torch.device(device))
    return _problems[key]


# Under torch.compile: evaluated (and the extension built) while tracing.  This is what
# torch.compiler.assume_constant_result sets; calling that at import time would import torch._dynamo (and triton).
extension_problem._dynamo_marked_constant = True


def load_library():
    """Build (if needed) and load the extension into this process; raises BackendUnavailable if it cannot."""
    if _loaded is None:  # only the first call takes the lock, which dynamo could not trace
        _ensure_loaded()
    if _failure is not None:
        raise BackendUnavailable(f"backend='cuda' cannot run here: {_failure}")


def compile_job():
    """The build subprocess: compile the job given as JSON in argv[1]; on failure print the compiler's output
    (without a traceback) and exit 1."""
    from torch.utils import cpp_extension

    job = json.loads(sys.argv[1])
    try:
        cpp_extension.load(name=NAME, sources=job["sources"], extra_cflags=job["cflags"], extra_ldflags=LDFLAGS,
                           extra_cuda_cflags=CUDA_CFLAGS, extra_include_paths=job["include_dirs"],
                           build_directory=job["build_dir"], with_cuda=job["cuda"], is_python_module=False,
                           verbose=job["verbose"])
    except Exception as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
