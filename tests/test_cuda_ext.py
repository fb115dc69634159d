"""The C++/CUDA extension, backend="cuda": its build and cache, its CPU kernels against the torch reference
(in CI), its CUDA kernels against the reference and the triton backend (on a GPU), opcheck, bad input, and
what a failed build leaves behind.

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

import fastgan
from fastgan.nn import losses
from fastgan.ops import backends
from fastgan.ops import extension as ext_build
from fastgan.ops.functional import batch_norm_act, sigmoid_bce
from parity import DEVICES, assert_close, needs_triton_here
from test_bn_act import ACTS, _case, _compare, _run
from test_models import _check_reduced_parity, _check_parity, _inputs, _pair, _step
from test_sigmoid_bce import _loss_and_grad, _reference as _bce_reference
from test_train_step import _check_converges_alike, _run as _run_train_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACT_CODES = fastgan.ops.ACTIVATIONS


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


# ----------------------------------------------------------------------------------------------- parity: BN + act

def _compare_cuda(*args, **kwargs):
    with fastgan.use_backend("cuda"):  # test_bn_act's _compare names triton; the innermost choice wins
        _compare(*args, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act,slope", ACTS)
@pytest.mark.parametrize("shape,channels_last", [((3, 5, 7, 6), False), ((3, 5, 7, 6), True), ((6, 10), False)])
@pytest.mark.parametrize("batch_stats", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bn_act(device, act, slope, shape, channels_last, batch_stats, dtype):
    z, params, dy = _case(shape, dtype, device, channels_last, affine=True, normalize=True)
    params = {k: v.to(dtype) for k, v in params.items()}  # an fp64 model has fp64 parameters and buffers
    _compare_cuda(z, params, dy, "fp32", normalize=True, batch_stats=batch_stats, act=act, slope=slope)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 48, 48), (64, 7, 9, 9)])
def test_many_splits(device, channels_last, shape):
    """Enough rows that the statistics and the backward reduce over several splits."""
    z, params, dy = _case(shape, torch.float32, device, channels_last, affine=True, normalize=True)
    _compare_cuda(z, params, dy, "fp32", normalize=True, batch_stats=True, act="relu", slope=0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act,slope", ACTS)
def test_activation_only(device, act, slope):
    z, params, dy = _case((2, 3, 9, 8), torch.float32, device, False, affine=False, normalize=False)
    _compare_cuda(z, params, dy, "fp32", normalize=False, batch_stats=False, act=act, slope=slope)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_stats", [True, False], ids=["train", "eval"])
def test_no_affine(device, batch_stats):
    z, params, dy = _case((3, 4, 5, 5), torch.float32, device, False, affine=False, normalize=True)
    _compare_cuda(z, params, dy, "fp32", normalize=True, batch_stats=batch_stats, act="leaky_relu", slope=0.2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_storage(device, dtype, channels_last):
    z, params, dy = _case((3, 16, 8, 8), dtype, device, channels_last, affine=True, normalize=True)
    _compare_cuda(z, params, dy, "fp16" if dtype == torch.float16 else "bf16", normalize=True, batch_stats=True,
                  act="relu", slope=0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_layouts(device):
    """dy in another memory format than z, and an expanded dy (stride 0), as autograd may hand them over."""
    z, params, _ = _case((2, 4, 6, 6), torch.float32, device, True, affine=True, normalize=True)
    for dy in (torch.randn(2, 4, 6, 6, device=device), torch.tensor(0.7, device=device).expand(2, 4, 6, 6),
               torch.randn(2, 4, 6, 6, device=device).transpose(2, 3)):
        _compare_cuda(z, params, dy, "fp32", normalize=True, batch_stats=True, act="leaky_relu", slope=0.2)


# C (channels_last) or H*W (NCHW) off the vector width, under it, several vectors plus a short one, and enough
# rows per channel for several reduction splits (4096 rows of a channel in NCHW, 4096/C rows in channels_last).
CPU_VECTOR_SHAPES = [((5, 13, 3, 7), True), ((5, 13, 3, 7), False), ((4, 3, 5, 5), True), ((2, 16, 4, 4), False),
                     ((9, 24, 23, 21), True), ((9, 5, 23, 21), False), ((40, 9), False)]


@pytest.mark.parametrize("shape,channels_last", CPU_VECTOR_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("act,slope", [("leaky_relu", 0.2), ("tanh", 0.0)])
def test_cpu_vector_tails_and_splits(shape, channels_last, dtype, act, slope):
    """The CPU kernels' vectors end at each row (an (n, c) plane, or a position's channels): short last vectors,
    rows shorter than a vector, and several reduction splits, against the reference."""
    z, params, dy = _case(shape, dtype, "cpu", channels_last, affine=True, normalize=True)
    if dtype == torch.float64:
        params = {k: v.double() for k, v in params.items()}
    mode = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp32"}[dtype]
    _compare_cuda(z, params, dy, mode, normalize=True, batch_stats=True, act=act, slope=slope)
    no_bn = dict.fromkeys(params)
    _compare_cuda(z, no_bn, dy, mode, normalize=False, batch_stats=False, act=act, slope=slope)


@pytest.mark.parametrize("shape,channels_last", [((16, 13, 29, 31), True), ((16, 5, 29, 31), False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_results_do_not_depend_on_the_thread_count(shape, channels_last, dtype):
    """One thread and two give the same bits: the reductions' splits and the vectors are fixed by the shape, and
    the splits merge in order (shapes above the kernels' grain, so that two threads do split the work)."""
    z, params, dy = _case(shape, dtype, "cpu", channels_last, affine=True, normalize=True)
    kwargs = dict(normalize=True, batch_stats=True, act="leaky_relu", slope=0.2, backend="cuda")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_run(lambda z, **p: batch_norm_act(z, **p, **kwargs), z, params, dy))
    finally:
        torch.set_num_threads(threads)
    assert results[0].keys() == results[1].keys() and "running_var" in results[0]
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


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


def test_double_backward_raises_a_clear_error():
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = batch_norm_act(z, act="relu", backend="cuda")
    (grad,) = torch.autograd.grad(y.square().sum(), z, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward .* backend='torch'"):
        grad.sum().backward()


# ----------------------------------------------------------------------------------------------- parity: losses

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_sigmoid_bce_dtypes(device, dtype):
    logits = (torch.randn(33, device=device) * 4).to(dtype)
    loss, grad = _loss_and_grad(lambda l: sigmoid_bce(l, 0.9, backend="cuda"), logits)
    ref_loss, ref_grad = _loss_and_grad(lambda l: _bce_reference(l, 0.9), logits)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and grad.dtype == dtype
    mode = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp32"}[dtype]
    assert_close(loss.double(), ref_loss, mode, what="loss", grad=mode != "fp32")
    assert_close(grad.double(), ref_grad, mode, what="grad", grad=True)


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_logits_and_gan_losses(device):
    logits = torch.tensor([1e4, -1e4, 3e4, -3e4, 0.0, 20.0, -20.0], device=device)
    for target in (1.0, 0.0, 0.9):
        loss, grad = _loss_and_grad(lambda l: sigmoid_bce(l, target, backend="cuda"), logits)
        ref_loss, ref_grad = _loss_and_grad(lambda l: _bce_reference(l, target), logits)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad.double(), ref_grad.double(), rtol=1e-6, atol=1e-7)
    real, fake = torch.randn(9, device=device), torch.randn(9, device=device)
    got = losses.discriminator_loss(real, fake, label_smoothing=0.1, backend="cuda")
    assert_close(got.double(), _bce_reference(real, 0.9) + _bce_reference(fake, 0.0), what="d_loss")
    assert_close(losses.generator_loss(fake, backend="cuda").double(), _bce_reference(fake, 1.0), what="g_loss")


@pytest.mark.parametrize("device", DEVICES)
def test_sigmoid_bce_gradcheck_fp64(device):
    logits = torch.randn(11, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l: sigmoid_bce(l, 0.9, backend="cuda"), (logits,))


# ----------------------------------------------------------------------------------------------- parity: models

@pytest.mark.parametrize("kind", ["G", "D"])
def test_model_parity_fp32(kind):
    """Real size (ngf=ndf=64, batch 8): output, input grad, every parameter grad, the running stats."""
    fast, ref = _pair(kind, 64, "cuda", "cpu", torch.float32)
    _check_parity(fast, ref, _inputs(kind, 8, "cpu"), "fp32")


@pytest.mark.parametrize("kind", ["G", "D"])
def test_model_parity_fp64(kind):
    fast, ref = _pair(kind, 64, "cuda", "cpu", torch.float64)
    ref.double()
    x = _inputs(kind, 8, "cpu").double()
    dy = torch.randn((8, 3, 64, 64) if kind == "G" else (8,), generator=torch.Generator().manual_seed(2)).double()
    got, expected = _step(fast, x, dy), _step(ref, x, dy)
    assert got.keys() == expected.keys()
    for what, value in expected.items():
        torch.testing.assert_close(got[what], value, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("kind", ["G", "D"])
def test_model_parity_channels_last_eval(kind):
    fast, ref = _pair(kind, 16, "cuda", "cpu", torch.float32)
    fast.to(memory_format=torch.channels_last)
    x = _inputs(kind, 4, "cpu").contiguous(memory_format=torch.channels_last)
    _check_parity(fast, ref, x, "fp32")
    fast.eval()
    ref.eval()
    with torch.no_grad():
        assert_close(fast(x), ref(x), "fp32", what="eval output")


def test_train_steps_match_reference_loop():
    """DCGAN.train_step (fused BN + act and the fused losses) against the examples/dcgan loop, in fp64."""
    _check_converges_alike(*_run_train_steps("cuda", "cpu", steps=6, size=8, batch=8, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------- opcheck

def _op_samples(ext, device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 5, 5, generator=gen).to(device, dtype).requires_grad_()
    z_cl = z.detach().to(memory_format=torch.channels_last)
    w = torch.randn(4, generator=gen).add(1).to(device).requires_grad_()
    b = torch.randn(4, generator=gen).to(device).requires_grad_()
    mean, invstd = ext.channel_stats(z.detach(), None, None, 0.1, 1e-5)
    dy = torch.randn(3, 4, 5, 5, generator=gen).to(device, dtype)
    running = (torch.zeros(4, device=device), torch.ones(4, device=device))
    return [
        (ext.channel_stats, (z.detach(), *running, 0.1, 1e-5)),
        (ext.channel_stats, (z_cl, None, None, 0.1, 1e-5)),
        (ext.bn_act, (z, mean, invstd, w, b, True, ACT_CODES["leaky_relu"], 0.2)),
        (ext.bn_act, (z_cl.requires_grad_(), mean, invstd, None, None, False, ACT_CODES["relu"], 0.0)),
        (ext.bn_act, (z, None, None, None, None, False, ACT_CODES["tanh"], 0.0)),
        (ext.bn_act_backward, (dy, z.detach(), mean, invstd, w.detach(), b.detach(), True, 1, 0.0)),
        (ext.bn_act_backward, (dy.expand_as(z), z_cl.detach(), mean, invstd, None, None, False, 2, 0.2)),
        (ext.bn_act_backward, (dy, z.detach(), None, None, None, None, False, 3, 0.0)),
        (ext.sigmoid_bce, (torch.randn(7, generator=gen).to(device, dtype).requires_grad_(), 0.9)),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(extension, device, dtype):
    for op, args in _op_samples(extension.ext, device, dtype):
        torch.library.opcheck(op, args)


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

# Activation shapes of DCGAN 64x64 (ngf=ndf=64) at batch 16, both layouts, and shapes that take the
# unvectorised paths (C or H*W not a multiple of the vector width).
GPU_SHAPES = [(shape, channels_last) for shape in [(16, 512, 4, 4), (16, 256, 8, 8), (16, 128, 16, 16),
                                                   (16, 64, 32, 32), (16, 3, 64, 64), (5, 6, 7, 7), (3, 13, 1, 1)]
              for channels_last in (False, True)] + [((300, 10), False), ((64, 24), False)]
GPU_MODES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(GPU_MODES))
@pytest.mark.parametrize("shape,channels_last,act,slope",
                         [(*case, *ACTS[i % len(ACTS)]) for i, case in enumerate(GPU_SHAPES)])
def test_gpu_matches_reference_and_triton(dtype, shape, channels_last, act, slope):
    z, params, dy = _case(shape, dtype, "cuda", channels_last, affine=True, normalize=True)
    kwargs = dict(normalize=True, batch_stats=True, act=act, slope=slope)
    _compare_cuda(z, params, dy, GPU_MODES[dtype], **kwargs)
    needs_triton_here("cuda")
    cuda = _run(lambda z, **p: batch_norm_act(z, **p, **kwargs, backend="cuda"), z, params, dy)
    triton = _run(lambda z, **p: batch_norm_act(z, **p, **kwargs, backend="triton"), z, params, dy)
    for key in cuda:
        mode = "tf32" if dtype == torch.float32 else GPU_MODES[dtype]  # two fp32 orders of summation
        assert_close(cuda[key].double(), triton[key].double(), mode, what=f"cuda vs triton: {key}", grad=True)


def _shifted(t):
    """t's values and strides in a storage one element off 16-byte alignment."""
    out = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].as_strided(t.shape, t.stride()).copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(GPU_MODES))
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("misaligned", ["z", "dy"])
def test_gpu_misaligned_storage_takes_the_scalar_path(dtype, channels_last, misaligned):
    """z, or only dy, at an odd storage offset: no 16-byte loads are possible there, the results must not
    change."""
    z, params, dy = _case((4, 8, 6, 6), dtype, "cuda", channels_last, affine=True, normalize=True)
    z, dy = (_shifted(z), dy) if misaligned == "z" else (z, _shifted(dy))
    _compare_cuda(z, params, dy, GPU_MODES[dtype], normalize=True, batch_stats=True, act="relu", slope=0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_results_are_deterministic(channels_last):
    """Run twice, bitwise equal: the reductions have a fixed order (and no race changes them)."""
    z, params, dy = _case((64, 128, 16, 16), torch.float32, "cuda", channels_last, affine=True, normalize=True)
    kwargs = dict(normalize=True, batch_stats=True, act="leaky_relu", slope=0.2, backend="cuda")
    first, second = (_run(lambda z, **p: batch_norm_act(z, **p, **kwargs), z, params, dy) for _ in range(2))
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_opcheck(extension, dtype):
    for op, args in _op_samples(extension.ext, "cuda", dtype):
        torch.library.opcheck(op, args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(GPU_MODES))
def test_gpu_sigmoid_bce(dtype):
    logits = (torch.randn(4099, device="cuda") * 4).to(dtype)
    loss, grad = _loss_and_grad(lambda l: sigmoid_bce(l, 0.9, backend="cuda"), logits)
    ref_loss, ref_grad = _loss_and_grad(lambda l: _bce_reference(l, 0.9), logits)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_close(loss.double(), ref_loss, GPU_MODES[dtype], what="loss", grad=dtype != torch.float32)
    assert_close(grad.double(), ref_grad, GPU_MODES[dtype], what="grad", grad=True)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["G", "D"])
def test_gpu_fp16_storage_model(kind):
    fast, ref = _pair(kind, 64, "cuda", "cuda", torch.float16)
    x = _inputs(kind, 32, "cuda")
    dy = torch.randn((32, 3, 64, 64) if kind == "G" else (32,), device="cuda")
    _check_reduced_parity(fast, ref, x, dy, "fp16")


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
