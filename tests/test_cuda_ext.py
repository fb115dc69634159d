"""The C++/CUDA extension, backend="cuda": its build and cache, what a failed build leaves behind, its CPU flags,
bad input, and its CUDA kernels under compute-sanitizer.  Its ops' parity with the torch reference is tested
with the other backends' (test_bn_act.py, test_sigmoid_bce.py, test_library_ops.py's opcheck, test_models.py,
test_train_step.py).

The extension is built once per session (the ``extension`` fixture) and shared by every test here.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from fastgan.ops import backends
from fastgan.ops import extension as ext_build
from fastgan.ops.functional import batch_norm_act

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def extension():
    """Two `python -m fastgan build-ext` at once, as two processes starting on a cold cache would (one compiles,
    the other waits for it), then the library loaded here."""
    command = [sys.executable, "-m", "fastgan", "build-ext"]
    procs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [proc.communicate(timeout=1200) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, f"build-ext failed:\n{out}\n{err}"
    ext = backends.kernel_ops("cuda")
    return SimpleNamespace(ext=ext, info=ext_build.build(), outputs=[out for out, _ in outputs])


def _cuda_part_expected():
    home, _ = ext_build.cuda_toolkit()
    return home is not None


# ----------------------------------------------------------------------------------------------- build and cache

def test_build_holds_the_cpu_and_cuda_parts(extension):
    info = extension.info
    assert os.path.isfile(info.library)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastgan_ext::bn_act", "CPU")
    if not _cuda_part_expected():
        assert info.parts == ["cpu"] and info.no_cuda_reason
        return
    # A CUDA torch and nvcc: the CUDA kernels are compiled and registered, with or without a GPU.
    assert info.cuda_archs and not info.no_cuda_reason
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        assert "9.0" in info.cuda_archs
    with open(info.library, "rb") as f:
        binary = f.read()
    assert b".nv_fatbin" in binary and b"moments_kernel" in binary and b"sigmoid_bce_kernel" in binary
    for op in ("channel_stats", "bn_act", "bn_act_backward", "sigmoid_bce"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastgan_ext::{op}", "CUDA"), op


def test_concurrent_builds_compile_once(extension):
    compiled = [out for out in extension.outputs if "compiled now" in out]
    assert len(compiled) <= 1, extension.outputs
    for out in extension.outputs:
        assert f"library: {extension.info.library}" in out
        assert "parts:   cpu" in out
    folder = os.path.dirname(extension.info.library)
    siblings = os.listdir(os.path.dirname(folder))
    assert not [name for name in siblings if name.startswith(os.path.basename(folder) + ".tmp-")], siblings


def test_second_process_loads_from_the_cache(extension):
    code = ("import torch\n"
            "from fastgan.ops import backends, extension\n"
            "ext = backends.kernel_ops('cuda')\n"
            "y = ext.bn_act(torch.randn(2, 3, 4, 4), None, None, None, None, False, 1, 0.0)\n"
            "print(extension.build().compiled, bool((y >= 0).all()))\n")
    mtime = os.path.getmtime(extension.info.library)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]
    assert "building" not in out.stderr
    assert os.path.getmtime(extension.info.library) == mtime


@pytest.mark.slow  # sleeps to hold a lock
def test_a_builder_waits_for_the_lock_then_loads_what_the_holder_built(extension, tmp_path, monkeypatch):
    import fcntl

    monkeypatch.setenv("FASTGAN_CACHE_DIR", str(tmp_path))
    directory = ext_build._plan().directory
    os.makedirs(os.path.dirname(directory))
    code = "from fastgan.ops import extension; info = extension.build(); print(info.compiled, info.library)"
    with open(directory + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a process that is compiling does
        waiter = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        time.sleep(8)  # the waiter imports, finds no library, and blocks on the lock
        assert waiter.poll() is None, waiter.communicate()
        shutil.copytree(os.path.dirname(extension.info.library), directory)  # what the holder built
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err
    assert out.split() == ["False", os.path.join(directory, "fastgan_ext.so")]
    name = os.path.basename(directory)
    assert sorted(os.listdir(tmp_path / "ext")) == [name, name + ".lock"]  # no staging folder: nothing compiled


def _broken_source_tree(tmp_path):
    """A copy of the package whose csrc/ does not compile."""
    for name in ("fastgan", "kernels", "csrc"):
        # symlinks=True: fastgan/csrc stays a link to the (broken) csrc/, not a copy of the good one
        shutil.copytree(os.path.join(ROOT, name), tmp_path / "tree" / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    header = tmp_path / "tree" / "csrc" / "fastgan_ext.h"
    # a missing include is fatal at once, where #error would let the compiler read on through ATen's headers
    header.write_text("#include <fastgan_test_broken_on_purpose.h>\n" + header.read_text())
    return str(tmp_path / "tree")


_FAILED_BUILD_SCRIPT = """
import json, sys, warnings
import torch, fastgan
from fastgan.ops import backends, extension
assert fastgan.__file__.startswith(sys.argv[1]), fastgan.__file__
compile_calls = []
compile_ = extension._compile
extension._compile = lambda *args: (compile_calls.append(1), compile_(*args))[1]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    picks = [backends.resolve("auto", torch.device("cuda")) for _ in range(3)]
    try:
        backends.resolve("cuda", torch.device("cpu"))
        explicit = "no error"
    except fastgan.BackendUnavailable as exc:
        explicit = str(exc)
    gan = fastgan.DCGAN(ngf=4, ndf=4)
    loss = gan.g_loss(gan.generator(torch.randn(2, 100, 1, 1)))
    loss.backward()
print(json.dumps(dict(picks=picks, explicit=explicit, compile_calls=len(compile_calls),
                      finite=bool(torch.isfinite(loss)),
                      warnings=[str(w.message) for w in caught if "backend 'auto' cannot use cuda" in str(w.message)])))
"""


@pytest.mark.slow  # two failing builds
@pytest.mark.parametrize("failure", ["missing compiler", "compile error"])
def test_failed_build_warns_once_and_auto_falls_back(failure, tmp_path, extension):
    cache = tmp_path / "cache"
    # CUDA_HOME pointing nowhere: no CUDA toolkit, so the (failing) build is the quick CPU-only one.
    env = dict(os.environ, FASTGAN_CACHE_DIR=str(cache), CUDA_HOME=str(tmp_path / "no-cuda"))
    tree = ROOT
    if failure == "missing compiler":
        env["CXX"] = str(tmp_path / "no-compiler" / "c++")
    else:
        tree = _broken_source_tree(tmp_path)
        env["PYTHONPATH"] = os.pathsep.join([tree, env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", _FAILED_BUILD_SCRIPT, tree], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["compile_calls"] == 1, "a failed build must not be retried"
    assert len(set(result["picks"])) == 1 and result["picks"][0] in ("triton", "torch")
    assert len(result["warnings"]) == 1, result["warnings"]
    message = result["warnings"][0]
    assert "failed to build" in message and str(cache) in message and "backend='triton'" in message
    assert result["explicit"].startswith("backend='cuda' cannot run here: ")
    assert result["explicit"].split(": ", 1)[1] in message  # the same message
    if failure == "missing compiler":
        assert "no-compiler" in message
    else:
        assert "fastgan_test_broken_on_purpose.h" in message
    assert result["finite"]
    assert not [p for p in cache.glob("ext/*") if p.is_dir()], "a failed build leaves no folder in the cache"


def test_cpu_flags_follow_the_cpu_and_key_the_cache(monkeypatch):
    """AVX2 code where ATen's own kernels run AVX2 or AVX512, portable code elsewhere, each in its own cache
    folder (a cache shared by two machines must not hand AVX2 code to a CPU without it)."""
    folders = {}
    for capability in ("DEFAULT", "AVX2", "AVX512"):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        flags = ext_build.cpu_flags()
        x86 = ext_build.platform.machine().lower() in ("x86_64", "amd64")
        assert ("-mavx2" in flags) == (x86 and capability != "DEFAULT"), (capability, flags)
        folders[capability] = ext_build._plan().directory
    if ext_build.platform.machine().lower() in ("x86_64", "amd64"):
        assert folders["DEFAULT"] != folders["AVX2"] == folders["AVX512"]


# ----------------------------------------------------------------------------------------------- bad input

def _bad_inputs():
    z = torch.randn(2, 3, 4, 4)
    mean, invstd = torch.zeros(3), torch.ones(3)
    w, b = torch.ones(3), torch.zeros(3)
    case = pytest.param
    return [
        case("bn_act", (z.int(), None, None, None, None, False, 1, 0.0), TypeError,
             r"z must be float32, float16, bfloat16 or float64, got Int", id="dtype"),
        case("sigmoid_bce", (torch.ones(4, dtype=torch.int64), 1.0), TypeError, r"logits must be float32.* got Long",
             id="dtype-logits"),
        case("bn_act", (z[..., ::2], mean, invstd, w, b, True, 1, 0.0), ValueError,
             r"z must be dense, contiguous \(NCHW\) or channels_last, got sizes \[2, 3, 4, 2\]", id="non-dense"),
        case("channel_stats", (z.transpose(0, 1), None, None, 0.1, 1e-5), ValueError, r"z must be dense",
             id="non-dense-transposed"),
        case("sigmoid_bce", (torch.randn(4, 2)[:, 0], 1.0), ValueError, r"logits must be dense",
             id="non-dense-logits"),
        case("bn_act", (z, mean, invstd, torch.ones(4), torch.zeros(4), True, 1, 0.0), ValueError,
             r"weight must have shape \(3,\) to match the channels of z \(shape \[2, 3, 4, 4\]\), got \[4\]",
             id="channels-weight"),
        case("channel_stats", (z, torch.zeros(5), torch.ones(5), 0.1, 1e-5), ValueError,
             r"running_mean must have shape \(3,\)", id="channels-running-stats"),
        case("bn_act_backward", (torch.randn(2, 3, 4, 4), z, torch.zeros(2), invstd, None, None, True, 1, 0.0),
             ValueError, r"mean must have shape \(3,\)", id="channels-mean"),
        # 2^31 elements, without allocating them: the limit is checked on the sizes, before anything is read
        case("channel_stats", (torch.zeros(1, 1, 1, 1).expand(2**11, 2**10, 2**5, 2**5), None, None, 0.1, 1e-5),
             ValueError, r"has 2147483648 elements, more than the 2\^31 - 1 that the kernels' int32 indexing allows",
             id="int32-limit"),
        case("sigmoid_bce", (torch.zeros(1).expand(2**31), 1.0), ValueError, r"int32 indexing",
             id="int32-limit-logits"),
        case("bn_act", (z, mean.half(), invstd, None, None, True, 1, 0.0), TypeError,
             r"mean must be Float for Float z \(as channel_stats returns it\), got Half", id="dtype-mean"),
        case("bn_act", (z, mean, invstd, None, None, True, 7, 0.0), ValueError,
             r"act must be 0 \(none\), 1 \(relu\), 2 \(leaky_relu\) or 3 \(tanh\), got 7", id="act"),
        case("bn_act", (z, mean, None, None, None, True, 1, 0.0), ValueError, r"give both mean and invstd",
             id="mean-without-invstd"),
        case("bn_act_backward", (torch.randn(2, 3, 4, 5), z, mean, invstd, w, b, True, 1, 0.0), ValueError,
             r"dy must have z's shape \[2, 3, 4, 4\], got \[2, 3, 4, 5\]", id="dy-shape"),
        case("channel_stats", (torch.randn(1, 3), torch.zeros(3), torch.ones(3), 0.1, 1e-5), ValueError,
             r"needs more than one value per channel", id="one-value-per-channel"),
    ]


@pytest.mark.parametrize("op,args,error,match", _bad_inputs())
def test_bad_input_names_what_was_expected(extension, op, args, error, match):
    with pytest.raises(error, match=match):
        getattr(extension.ext, op)(*args)


def test_explicit_cuda_backend_on_cpu_runs_the_cpu_kernels(extension):
    assert backends.resolve("cuda", torch.device("cpu")) == "cuda"
    assert backends.resolve("auto", torch.device("cpu")) == "torch"
    z = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(batch_norm_act(z, act="relu", backend="cuda"),
                               batch_norm_act(z, act="relu", backend="torch"), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- GPU

_RACECHECK_SCRIPT = """
import torch
from fastgan.ops.functional import batch_norm_act, sigmoid_bce
for channels_last in (False, True):
    z = torch.randn(8, 64, 8, 8, device="cuda", requires_grad=True)
    if channels_last:
        z = z.detach().to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(64, device="cuda", requires_grad=True)
    b = torch.randn(64, device="cuda", requires_grad=True)
    y = batch_norm_act(z, w, b, torch.zeros(64, device="cuda"), torch.ones(64, device="cuda"), act="relu",
                       backend="cuda")
    (y.square().sum() + sigmoid_bce(y.flatten()[:100], 1.0, backend="cuda")).backward()
torch.cuda.synchronize()
print("done")
"""


@pytest.mark.gpu
@pytest.mark.parametrize("tool", ["racecheck", "memcheck"])
def test_gpu_compute_sanitizer(extension, tool):
    sanitizer = shutil.which("compute-sanitizer") or os.path.join(ext_build.cuda_toolkit()[0] or "", "bin",
                                                                     "compute-sanitizer")
    if not os.path.isfile(sanitizer):
        pytest.skip("compute-sanitizer is not installed (it comes with the CUDA toolkit)")
    # --report-api-errors no: torch's own probing calls (a device query that may fail) are not kernel errors
    out = subprocess.run([sanitizer, "--tool", tool, "--error-exitcode", "1", "--report-api-errors", "no",
                          sys.executable, "-c",
                          _RACECHECK_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "done" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
