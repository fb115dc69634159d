"""The static sm_90 check (docs/design.md section 9): which Triton kernel variants fastgan's launchers pick for
a DCGAN train step at the real shapes, and what each costs compiled for sm_90, without a GPU.

    python tests/sm90.py [--all] [--json PATH] [--markdown] [--efficiency [--write-results]] [--write-baseline]

Recording: fastgan.DCGAN's train step (L1, and L2 via fastgan.set_level) runs on fake tensors (torch's
FakeTensorMode) with the launchers' device queries answering for a 132-SM sm_90 GPU (kernels.tiling.SM90).
fastgan's custom ops run their real implementations instead of their fake kernels, and every Triton launch
meets a recording stand-in for the jitted kernel or autotuner: it works out the specialisation triton would
compile with triton's own binder and, for an autotuner, the configs the launcher's prune keeps.  A step is
recorded with FASTGAN_AUTOTUNE=1: the autotuner's candidates, of which conv_gemm launches the first when not
autotuning (tests/test_sm90_resources.py checks that against a recording without it).

Compiling: each chosen variant goes through triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)).
Registers and spills are read from the cubin (cuobjdump --dump-resource-usage; the spills are its stack
frame), shared memory from the compiled metadata; the bundled ptxas's -v report of the same compilation
("Used N registers", "N bytes stack frame") is kept as the cross-check.  Results are
cached by variant in .cache/sm90/ (and triton's own cache in .cache/sm90/triton), so reruns only compile what
changed.  By default the representatives are compiled (see :func:`representatives`: every config meets every
dtype family, at its heaviest variant) and every variant of the fp64 gradcheck chain; --all compiles every
variant, --cold-start the default variants of the steps named.

Efficiency: every default launch of L2's GEMMs and L1's reductions in EFFICIENCY_STEPS is compiled too and
read from its SASS (tests/sass.py): MMA kind, instructions per K-step, issue vs MMA cycles, load widths, waves,
spills, FLOP share (see :func:`efficiency`); --efficiency prints the tables.

Must run without TRITON_INTERPRET (jitted kernels, not interpreted ones); tests/test_sm90_resources.py
starts it in a subprocess and checks what it finds.
"""
import argparse
import collections
import contextlib
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("FASTGAN_SM90_CACHE", REPO / ".cache" / "sm90"))
os.environ.setdefault("TRITON_CACHE_DIR", str(CACHE / "triton"))
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v's report, the cross-check of the cubin's figures
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("tests/sm90.py compiles kernels for sm_90: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from torch._library.custom_ops import CustomOpDef  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import fastgan  # noqa: E402
import parity  # noqa: E402  (tests/ is on the path: this file's folder)
import sass  # noqa: E402
from fastgan.kernels import bn_act, conv_gemm, sigmoid_bce, tiling  # noqa: E402
from fastgan.ops import backends, conv_chain, triton_ops  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
_BACKEND = make_backend(TARGET)
KERNEL_MODULES = (bn_act, sigmoid_bce, conv_gemm)
BATCHES, WIDTHS = (64, 128, 512), (64, 128)
MODES = ("tf32", "fp32", "bf16", "fp16", "fp64")  # fp32 is exact fp32 (TF32 off); bf16/fp16 are autocast
LAYOUTS = ("nchw", "channels_last")
LEVELS = ("L1", "L2")
GEMMS = ("_conv_kernel", "_wgrad_kernel")
REDUCTIONS = ("_moments_kernel", "_backward_reduce_kernel")  # L1's BN statistics and backward sums
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


# ----------------------------------------------------------------------------- variants and launches

class Variant(NamedTuple):
    """One compilation: a kernel with triton's specialisation of its arguments and its launch options."""
    kernel: str
    spec: tuple      # per parameter: (type, specialisation), as triton's binder gives it
    options: tuple   # sorted (name, value): num_warps, num_stages

    def params(self):
        return [p.name for p in jit_function(self.kernel).params]

    def constexprs(self):
        return {name: value for name, (kind, value) in zip(self.params(), self.spec) if kind == "constexpr"}

    @property
    def warps(self):
        return dict(self.options).get("num_warps", 4)

    @property
    def stages(self):
        return dict(self.options).get("num_stages", 3)

    def dtype(self):
        """The element type of the first tensor argument (the data the kernel reads)."""
        return next(kind[1:] for kind, _ in self.spec if kind.startswith("*"))

    def dtype_family(self):
        """16-bit, tf32 or ieee (the GEMMs' fp32 precisions), fp32 (the other kernels) or fp64."""
        if self.dtype() in ("fp16", "bf16"):
            return "16-bit"
        if self.dtype() == "fp32" and self.kernel in GEMMS:
            return self.constexprs()["PRECISION"]
        return self.dtype()

    def config(self):
        """The GEMM config: (BLOCK_N, BLOCK_K, warps, stages) of a conv, (BLOCK_K, warps, stages) of a wgrad."""
        ce = self.constexprs()
        sizes = {"_conv_kernel": ("BLOCK_N", "BLOCK_K"), "_wgrad_kernel": ("BLOCK_K",)}.get(self.kernel)
        return None if sizes is None else (*(ce[k] for k in sizes), self.warps, self.stages)

    def describe(self):
        ce = {k: (str(v) if not isinstance(v, (bool, int)) else int(v)) for k, v in self.constexprs().items()}
        return dict(kernel=self.kernel, dtype=self.dtype(), warps=self.warps, stages=self.stages, constexprs=ce)

    def key(self):
        fn = jit_function(self.kernel)
        text = repr((fn.cache_key, self.spec, self.options, triton.__version__))
        return hashlib.sha256(text.encode()).hexdigest()[:24]


class Launch(NamedTuple):
    """One launch of a train step: the variant the launcher runs and, for an autotuner, every candidate."""
    variants: tuple  # the first is what runs by default (the autotuner benchmarks them all)
    grid: tuple
    work: dict  # what the launch computes, for the efficiency check (see :func:`work`)


END_CHANNELS = (1, 3, 100)  # DCGAN's end layers: the image's 3 channels, D's 1 logit, G's 100-d noise


def work(kernel, args):
    """What a launch of a GEMM or an L1 reduction computes, from its arguments (the default config's included):
    label (the problem), flops (2 x multiply-adds), iterations (of its main loop per program: K-steps of a GEMM,
    tiles of a reduction), contiguous (the GEMM operands whose channels are contiguous, A = src/lo, B = w/hi),
    end_layer.  {} for the other kernels."""
    a = args
    if kernel == "_conv_kernel":
        classes, taps = (a["S"] ** 2 if a["UP"] else 1), a["TAPS"]
        contiguous = "A" * (a["s_c"] == 1) + "B" * (1 in (a["w_red"], a["w_out"]))
        return dict(label=f"{'convT' if a['UP'] else 'conv'} s{a['S']} {a['C_in']}->{a['C_out']} "
                          f"{a['H_in']}x{a['W_in']}->{a['H_out']}x{a['W_out']}",
                    flops=2 * a["ROWS"] * classes * a["C_out"] * a["C_in"] * taps * taps,
                    iterations=a["taps_per_split"] * triton.cdiv(a["C_in"], a["BLOCK_K"]), contiguous=contiguous or "-",
                    end_layer=bool({a["C_in"], a["C_out"]} & set(END_CHANNELS)))
    if kernel == "_wgrad_kernel":
        contiguous = "A" * (a["l_c"] == 1) + "B" * (a["h_c"] == 1)
        return dict(label=f"wgrad s{a['S']} {a['C_lo']}x{a['C_hi']} {a['H_lo']}x{a['W_lo']}<-{a['H_hi']}x{a['W_hi']}",
                    flops=2 * a["C_lo"] * a["C_hi"] * 16 * a["N"] * a["H_lo"] * a["W_lo"],
                    iterations=(triton.cdiv(a["images_per_split"], a["BLOCK_K"] // (a["block_h"] * a["block_w"]))
                                * triton.cdiv(a["H_lo"], a["block_h"]) * triton.cdiv(a["W_lo"], a["block_w"])),
                    contiguous=contiguous or "-",
                    end_layer=bool({a["C_lo"], a["C_hi"]} & set(END_CHANNELS)))
    if kernel in REDUCTIONS:
        return dict(label=f"N={a['N']} C={a['C']} L={a['L']}", flops=0, iterations=a["tiles_per_split"])
    return {}


def jit_function(name):
    for module in KERNEL_MODULES:
        fn = vars(module).get(name)
        if isinstance(fn, JITFunction):
            return fn
    raise KeyError(name)


class _Pointer:
    """What triton's binder sees of a tensor: its dtype and an address as the caching allocator would give
    (a 512-byte aligned base plus the view's offset)."""

    def __init__(self, t):
        self.dtype = t.dtype
        self._address = 2**32 + t.storage_offset() * t.element_size()

    def data_ptr(self):
        return self._address


def _bindable(value):
    return _Pointer(value) if isinstance(value, torch.Tensor) else value


class _Recorder:
    """A stand-in for a jitted kernel or an autotuner: records each launch instead of running it."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log
        self.jit = fn.fn if isinstance(fn, Autotuner) else fn
        self.binder = create_function_from_signature(self.jit.signature, self.jit.params, _BACKEND)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _variant(self, args, kwargs):
        _, spec, options = self.binder(*map(_bindable, args), **{k: _bindable(v) for k, v in kwargs.items()})
        # An autotuner passes every option of its configs; only the ones that are set change the compilation.
        options = {k: v for k, v in options.items() if v is not None and (k, v) != ("num_ctas", 1)}
        return Variant(self.jit.fn.__name__, tuple(spec), tuple(sorted(options.items())))

    def _launch(self, grid, args, kwargs):
        if isinstance(self.fn, Autotuner):
            self.fn.nargs = dict(zip(self.fn.arg_names, args))
            configs = self.fn.prune_configs(kwargs)
            calls = [{**kwargs, **config.all_kwargs()} for config in configs]
        else:
            calls = [kwargs]
        named = {**dict(zip(self.jit.arg_names, args)), **calls[0]}
        if callable(grid):
            grid = grid(named)
        self.log.append(Launch(tuple(self._variant(args, call) for call in calls), tuple(grid),
                               work(self.jit.fn.__name__, named)))


class _RealOps(TorchDispatchMode):
    """Runs fastgan's custom ops (namespace ``fastgan``) by their Python implementations on fake tensors."""

    def __init__(self):
        super().__init__()
        modules = (triton_ops, conv_chain)
        self.impls = {op._qualname: op._init_fn for m in modules for op in vars(m).values()
                      if isinstance(op, CustomOpDef)}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        impl = self.impls.get(func._schema.name)
        return (impl or func)(*args, **(kwargs or {}))


@contextlib.contextmanager
def fake_sm90(log, autotune=False):
    """Fake tensors, launchers that see a 132-SM sm_90 GPU, and every Triton launch recorded into ``log``."""
    with contextlib.ExitStack() as stack:
        for module in KERNEL_MODULES:
            for name, fn in list(vars(module).items()):
                if isinstance(fn, (JITFunction, Autotuner)):
                    stack.enter_context(mock.patch.object(module, name, _Recorder(fn, log)))
        stack.enter_context(mock.patch.object(tiling, "device_of", lambda device: tiling.SM90))
        # The tensors are fake CPU tensors (the autograd engine needs a real device for fake CUDA ones).
        stack.enter_context(mock.patch.object(backends, "interpreter_enabled", lambda: True))
        # Nothing is interpreted (every launch meets a recorder), so triton <= 3.6 with numpy >= 2.4 records too.
        stack.enter_context(mock.patch.object(backends, "interpreter_error", lambda: None))
        stack.enter_context(mock.patch.object(conv_gemm, "AUTOTUNE", autotune))
        fake = stack.enter_context(FakeTensorMode())
        stack.enter_context(_RealOps())
        yield fake


def _convert(model, dtype, memory_format):
    """model.to(dtype, memory_format=...) for fake parameters (Module.to would swap them, which fake tensors
    refuse)."""
    for module in model.modules():
        for group in (module._parameters, module._buffers):
            for name, t in group.items():
                if t is None or not t.is_floating_point():
                    continue
                fmt = memory_format if t.dim() == 4 else torch.contiguous_format
                new = t.to(dtype, memory_format=fmt)
                group[name] = torch.nn.Parameter(new, t.requires_grad) if group is module._parameters else new


def _fakify(model, fake):
    """Replace ``model``'s parameters and buffers by fake copies."""
    for module in model.modules():
        for group in (module._parameters, module._buffers):
            for name, t in group.items():
                if t is not None:
                    new = fake.from_tensor(t)
                    group[name] = torch.nn.Parameter(new, t.requires_grad) if group is module._parameters else new


GRADCHECK = "test_conv_gemm::test_gradcheck_fp64 (parity.gradcheck_chain)"


def record_gradcheck():
    """The launches of test_conv_gemm's fp64 gradcheck chain, forward and backward, on sm_90."""
    log = []
    model = parity.gradcheck_chain()
    with fake_sm90(log, autotune=True) as fake:
        _fakify(model, fake)
        model(torch.randn(3, 3, 1, 1, dtype=torch.float64, requires_grad=True)).sum().backward()
    return log


class Step(NamedTuple):
    batch: int
    width: int    # ngf = ndf
    mode: str
    layout: str
    level: str

    def __str__(self):
        return f"B={self.batch} ngf=ndf={self.width} {self.mode} {self.layout} {self.level}"


def steps():
    return [Step(*s) for s in itertools.product(BATCHES, WIDTHS, MODES, LAYOUTS, LEVELS)]


class _NoUpdate(torch.optim.SGD):
    """The optimizers' updates launch no Triton kernel: a stand-in for them, to record a step faster."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)

    def step(self, closure=None):
        pass


def record(step, autotune=False):
    """The launches of one DCGAN train step (64x64 images) as fastgan would run it on an sm_90 GPU."""
    log = []
    dtype = torch.float64 if step.mode == "fp64" else torch.float32
    fmt = torch.channels_last if step.layout == "channels_last" else torch.contiguous_format
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(step.mode)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = step.mode != "fp32"
    try:
        with fake_sm90(log, autotune):
            gan = fastgan.DCGAN(ngf=step.width, ndf=step.width, backend="triton")
            _convert(gan, dtype, fmt)
            fastgan.set_level(gan, step.level)
            opt_g, opt_d = _NoUpdate(gan.generator.parameters()), _NoUpdate(gan.discriminator.parameters())
            real = torch.randn(step.batch, 3, 64, 64, dtype=dtype).to(memory_format=fmt)
            noise = torch.randn(step.batch, gan.nz, 1, 1, dtype=dtype)
            with torch.autocast("cpu", amp or torch.bfloat16, enabled=amp is not None):
                gan.train_step(real, opt_g, opt_d, noise)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return log


def compiles(launches):
    """The distinct compilations of a step's launches when not autotuning (each launch's first variant)."""
    return {launch.variants[0] for launch in launches}


# ----------------------------------------------------------------------------- compiling

_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
SASS_READER = hashlib.sha256(Path(sass.__file__).read_bytes()).hexdigest()[:12]  # a cached summary's reader


def _cuobjdump(cubin, *flags):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([str(_BIN / "cuobjdump"), *flags, str(path)], check=True, capture_output=True,
                              text=True).stdout


def _cubin_resources(cubin):
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", _cuobjdump(cubin, "--dump-resource-usage"))
    return int(found[1]), int(found[2]) + int(found[4])


def compile_variant(variant):
    """Compile ``variant`` for sm_90: {registers, spill_bytes, shared, seconds, sass} (cached in .cache/sm90;
    sass is tests/sass.py's summary of `cuobjdump -sass`)."""
    cached = CACHE / f"{variant.key()}.json"
    if cached.exists():
        result = json.loads(cached.read_text())
        if result.get("sass_reader") == SASS_READER:  # else compile again (triton's cache has the cubin)
            return result
    fn = jit_function(variant.kernel)
    signature = {p.name: kind for p, (kind, _) in zip(fn.params, variant.spec)}
    constexprs = {(i,): value for i, (kind, value) in enumerate(variant.spec) if kind == "constexpr"}
    attrs = {(i,): _BACKEND.parse_attr(value) for i, (kind, value) in enumerate(variant.spec)
             if kind != "constexpr" and isinstance(value, str)}
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()) as ptxas_log:
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET,
                                      options=dict(variant.options))
    except Exception as exc:  # reported per variant by the test
        return dict(error=f"{type(exc).__name__}: {str(exc)[:2000]}")
    seconds = time.perf_counter() - start
    registers, spills = _cubin_resources(compiled.asm["cubin"])
    ptxas = re.search(r"(\d+) bytes stack frame.*?Used (\d+) registers", ptxas_log.getvalue(), re.S)
    result = dict(registers=registers, spill_bytes=spills, shared=compiled.metadata.shared, seconds=seconds,
                  ptxas=None if ptxas is None else dict(registers=int(ptxas[2]), stack=int(ptxas[1])),
                  sass=sass.summarize(_cuobjdump(compiled.asm["cubin"], "-sass")), sass_reader=SASS_READER)
    CACHE.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result))
    return result


def tiling_configs(kernel, elem):
    """The configs of conv_gemm's candidate lists (kernels.tiling) for ``elem``-byte operands, unclipped."""
    if kernel == "_conv_kernel":
        return {(n, tiling.block_k(k, elem), w, s) for n, k, w, s in tiling.CONV_TILES}
    return {(tiling.block_k(k, elem), w, s) for k, w, s in tiling.WGRAD_TILES}


def _heaviest(members):
    """The member with the largest tile, then the widest elements, then the most constexprs at their largest
    value (the heaviest prologue, epilogue and activation)."""
    def features(m):
        return {(k, v) for k, v in m.constexprs().items() if k.isupper() and isinstance(v, (bool, int))}

    top = {}
    for m in members:
        for k, v in features(m):
            top[k] = max(top.get(k, v), v)

    def weight(m):
        area = 1
        for k, v in m.constexprs().items():
            area *= v if k.startswith("BLOCK") else 1
        return area, TORCH_DTYPES[m.dtype()].itemsize, len(features(m) & set(top.items())), repr(m.spec)

    return max(members, key=weight)


def representatives(variants):
    """The variants to compile so that every config meets every dtype family: for the GEMMs one per kernel,
    dtype family (16-bit, tf32, ieee, fp64) and config of tiling's candidate lists; for the other kernels one per
    kernel and dtype family (16-bit, fp32, fp64) and one per kernel and tile (block sizes).  Each is its group's
    heaviest.  GEMM variants whose tile a problem's width clipped are left out: smaller versions of a config."""
    groups = collections.defaultdict(list)
    for v in variants:
        config = v.config()
        if config is None:
            blocks = tuple((k, x) for k, x in v.constexprs().items() if k.startswith("BLOCK"))
            groups[v.kernel, "tile", blocks].append(v)
            groups[v.kernel, v.dtype_family()].append(v)
        elif config in tiling_configs(v.kernel, TORCH_DTYPES[v.dtype()].itemsize):
            groups[v.kernel, v.dtype_family(), config].append(v)
    chosen = {_heaviest(members): None for _, members in sorted(groups.items(), key=lambda kv: repr(kv[0]))}
    return list(chosen)


# ----------------------------------------------------------------------------- the whole audit

def _same_default(step):
    """Whether ``step`` recorded without FASTGAN_AUTOTUNE launches the first candidate of each autotuned launch."""
    plain = [launch.variants for launch in record(step)]
    return plain == [launch.variants[:1] for launch in record(step, autotune=True)]


def audit(targets="representatives", jobs=2, cold_start=(), log=print):
    """Record every step (and the fp64 gradcheck chain); compile ``targets`` ("representatives" or "all") and
    every default variant of the ``cold_start`` steps.  Returns a JSON-able dict."""
    start = time.perf_counter()
    recorded = [(str(step), step.level, record(step, autotune=True)) for step in steps()]
    recorded.append((GRADCHECK, "L2", record_gradcheck()))
    record_seconds = time.perf_counter() - start
    sample = [Step(128, 64, mode, layout, "L2") for mode in MODES for layout in LAYOUTS]
    default_checked = {str(step): _same_default(step) for step in sample}
    variants = sorted({v for _, _, launches in recorded for launch in launches for v in launch.variants},
                      key=lambda v: (v.kernel, repr(v.spec), v.options))
    reps = set(representatives(variants))
    chosen = set(variants) if targets == "all" else set(reps)
    efficiency_steps = {str(step) for step in EFFICIENCY_STEPS}
    for name, level, launches in recorded:
        if name in efficiency_steps:
            chosen |= {launch.variants[0] for launch in launches if launch.variants[0].kernel in _checked(level)}
        if name == GRADCHECK:  # small, clipped tiles that the representatives leave out: all of them
            chosen |= {v for launch in launches for v in launch.variants}
        elif name in cold_start:
            chosen |= compiles(launches)
    chosen = sorted(chosen, key=variants.index)
    index = {v: i for i, v in enumerate(variants)}
    results = {}
    start = time.perf_counter()
    # Forked workers (no CUDA here to trip on): ptxas and triton's passes keep a core each busy.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        for n, (v, result) in enumerate(zip(chosen, pool.map(compile_variant, chosen)), 1):
            results[index[v]] = result
            log(f"[{n}/{len(chosen)}] {v.kernel} {v.describe()['constexprs']} warps={v.warps} "
                f"stages={v.stages}: {result}")
    compiled_of = lambda v: results.get(index[v])  # noqa: E731
    rows = [row for name, level, launches in recorded if name in efficiency_steps
            for row in efficiency(name, level, launches, compiled_of)]
    return dict(
        efficiency=rows, issue_ratios=issue_ratios(rows),
        triton=triton.__version__, torch=torch.__version__, target="cuda sm_90", device=tiling.SM90._asdict(),
        record_seconds=record_seconds, compile_seconds=time.perf_counter() - start,
        default_checked=default_checked, cold_start=list(cold_start),
        variants=[dict(v.describe(), family=v.dtype_family(), config=v.config(), estimate=estimate(v),
                       compiled=results.get(i), representative=v in reps) for i, v in enumerate(variants)],
        steps=[dict(step=name, level=level, launches=[dict(variants=[index[v] for v in launch.variants],
                                                           grid=launch.grid, work=launch.work)
                                                      for launch in launches])
               for name, level, launches in recorded])


# ----------------------------------------------------------------------------- efficiency (from the SASS)

# The steps whose L2 GEMMs and L1 reductions the efficiency check reads, and its targets (issue 18).
EFFICIENCY_STEPS = tuple(Step(128, width, mode, layout, level) for level in LEVELS for width in WIDTHS
                         for mode, layout in (("bf16", "channels_last"), ("tf32", "nchw")))
MMA_RATE = {"16-bit": 2048, "tf32": 1024, "ieee": 128, "fp64": 128}  # multiply-adds per SM per clock (H100)
CLOCK_HZ = 1.83e9      # an H100 SXM's SM clock under load
HEAVY_SHARE = 0.05     # a GEMM launch carrying this share of the step's FLOPs may not be issue bound
END_LAYER_US = 20.0    # the end layers' (3 or 1 channels, the 100-d noise) estimated time
REDUCTION_WAVES = 2    # an L1 reduction's programs, in waves of the SMs


def _checked(level):
    """The kernels the efficiency check reads at ``level``: L2's GEMMs, L1's reductions."""
    return GEMMS if level == "L2" else REDUCTIONS


def efficiency(name, level, launches, compiled_of):
    """The efficiency rows of one recorded step: its default launches of _checked(level) kernels, identical
    launches (variant, grid, problem) merged into one row (``launches`` counts them, flops and share are
    theirs together).  A row's ``missed`` names each target it misses, with by how much."""
    total = sum(launch.work.get("flops", 0) for launch in launches)
    groups = {}
    for launch in launches:
        v = launch.variants[0]
        if v.kernel in _checked(level):
            groups.setdefault((v, launch.grid, launch.work["label"]), []).append(launch)
    rows = []
    for (v, grid, _), members in groups.items():
        row = dict(step=name, level=level, kernel=v.kernel, family=v.dtype_family(), warps=v.warps,
                   stages=v.stages, launches=len(members), programs=int(torch.tensor(grid).prod()),
                   **members[0].work)
        row["flops"] = row["flops"] * len(members)
        compiled = compiled_of(v)
        if compiled is None or "error" in compiled:
            rows.append(dict(row, missed={"compiles": "not compiled"}))
            continue
        ce = v.constexprs()
        row.update(spills=compiled["spill_bytes"], ctas_per_sm=blocks_per_sm(compiled, v.warps),
                   block=[ce[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_L", "BLOCK_C") if k in ce])
        row["waves"] = row["programs"] / (tiling.SM90.sms * row["ctas_per_sm"])
        row["sm_waves"] = row["programs"] / tiling.SM90.sms
        if v.kernel in GEMMS:
            row.update(_gemm_efficiency(ce, v.warps, compiled["sass"], row), share=row["flops"] / total)
        else:
            row.update(loop=compiled["sass"]["load_loop"])
        row["missed"] = missed(row)
        rows.append(row)
    return rows


def _gemm_efficiency(ce, warps, summary, row):
    """A GEMM variant's main loop from its SASS summary: MMA kind, instructions per warp per K-step, issue and MMA
    cycles per K-step for one CTA, and the launch's time estimated from them (no memory latency: a lower
    bound) with the busiest SM running its programs one after another."""
    block_m, block_n, block_k = ce["BLOCK_M"], ce["BLOCK_N"], ce["BLOCK_K"]
    loop = summary["mma_loop"]
    kind, shape = sass.mma_kind(summary)
    steps = sass.k_steps(loop, block_m, block_n, block_k, warps)
    mma_cycles = block_m * block_n * block_k / MMA_RATE[row["family"]]
    out = dict(mma=kind, mma_shape=shape, mma_cycles=mma_cycles, loop=loop, k_steps_per_iteration=steps,
               per_k_step=None, issue_cycles=None, estimate_us=None)
    if steps:
        out["per_k_step"] = loop["instructions"] / steps
        out["issue_cycles"] = out["per_k_step"] * warps / 4
        busiest = -(-row["programs"] // tiling.SM90.sms)
        cycles = busiest * row["iterations"] * max(out["issue_cycles"], mma_cycles)
        out["estimate_us"] = cycles / CLOCK_HZ * 1e6
    return out


def missed(row):
    """{target: how it is missed} for an efficiency row (empty when it meets them all)."""
    out = {}
    if row["kernel"] in GEMMS:
        if row["mma"] not in ("HGMMA", "HMMA"):
            out["tensor cores"] = f"{row['mma']} main loop"
        if row["issue_cycles"] is not None and row["share"] >= HEAVY_SHARE and row["issue_cycles"] > row["mma_cycles"]:
            out["issue"] = f"issue bound {row['issue_cycles'] / row['mma_cycles']:.1f}x"
        # The tile picker's rule, every SM gets a program; the end layers are judged by their time instead.
        if not row["end_layer"] and row["sm_waves"] < tiling.WAVE_FILL:
            out["waves"] = f"{row['programs']} programs on {tiling.SM90.sms} SMs"
        if row["spills"]:
            out["spills"] = f"{row['spills']} B spilled"
        if row["end_layer"] and (row["estimate_us"] is None or row["estimate_us"] > END_LAYER_US):
            out["end layer"] = f"{row['estimate_us']:.0f} us" if row["estimate_us"] else "no estimate"
    else:
        if row["sm_waves"] < REDUCTION_WAVES:
            out["waves"] = f"{row['sm_waves']:.2f} waves of {tiling.SM90.sms} SMs"
        syncs = (row["loop"] or {}).get("block_syncs") or {}
        if syncs:
            out["reduction per iteration"] = ", ".join(f"{n} {op}" for op, n in sorted(syncs.items()))
    return out


ISSUE_BASELINE = Path(__file__).with_name("sm90_issue_baseline.json")


def issue_ratios(rows):
    """{"<step> | <launch>": issue : MMA cycles} of the L2 GEMM launches carrying >= HEAVY_SHARE of the FLOPs (the
    worst of a launch's variants), rounded to 0.01: the ratchet tests/test_sm90_resources.py holds them to."""
    ratios = {}
    for r in rows:
        if r["level"] == "L2" and r.get("issue_cycles") and r["share"] >= HEAVY_SHARE:
            key = f"{_step_short(r['step'])} | {r['label']}"
            ratios[key] = max(ratios.get(key, 0.0), round(r["issue_cycles"] / r["mma_cycles"], 2))
    return dict(sorted(ratios.items()))


def write_issue_baseline(result, path=ISSUE_BASELINE):
    """Record the audit's issue ratios in ``path`` under its triton version (each compiles its own SASS; CI runs
    two), keeping the other versions' entries."""
    baselines = json.loads(path.read_text()) if path.exists() else {}
    baselines[f"triton {result['triton']}"] = result["issue_ratios"]
    path.write_text(json.dumps(dict(sorted(baselines.items())), indent=1) + "\n")


def _step_short(name):
    """"B=128 ngf=ndf=64 bf16 channels_last L2" -> "64 bf16 CL"."""
    _, width, mode, layout, _ = name.split()
    return f"{width.split('=')[-1]} {mode} {'CL' if layout == 'channels_last' else 'NCHW'}"


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _loads(loop):
    return " ".join(f"{w}x{n}" for w, n in sorted((loop or {}).get("loads", {}).items(), key=lambda kv: kv[0]))


def efficiency_markdown(result):
    """The efficiency tables of benchmarks/RESULTS.md from an audit."""
    rows = result["efficiency"]
    lines = [f"| ngf, dtype, layout | launch (identical ones: n) | tile MxNxK, warps, stages | MMA | instr./K-step "
             "| issue : MMA cycles | loads in loop (bits x n) | ch.-contig. | programs (CTAs/SM) | waves | spills "
             "| FLOP share | est. us | misses |", "|" + "---|" * 14]
    for r in rows:
        if "spills" not in r:  # not compiled
            lines.append(f"| {_step_short(r['step'])} | {r['label']} `{r['kernel']}` | not compiled |")
            continue
        if r["level"] != "L2":
            continue
        lines.append(
            f"| {_step_short(r['step'])} | {r['label']} ({r['launches']}) | {'x'.join(map(str, r['block']))}, "
            f"{r['warps']}, {r['stages']} | {r['mma']} {r['mma_shape']} | {_fmt(r['per_k_step'], '.0f')} | "
            f"{_fmt(r['issue_cycles'], '.0f')} : {r['mma_cycles']:.0f} | {_loads(r['loop'])} | {r['contiguous']} | "
            f"{r['programs']} ({r['ctas_per_sm']}) | {r['waves']:.2f} | {r['spills']} | {100 * r['share']:.1f}% | "
            f"{_fmt(r['estimate_us'], '.1f')} | {'; '.join(r['missed'].values()) or 'ok'} |")
    lines += ["", "| ngf, dtype, layout | kernel | problem (identical ones: n) | block NxLxC, warps | programs "
              "(CTAs/SM) | waves of 132 SMs | tiles/program | instr./iteration | loads in loop (bits x n) "
              "| block syncs in loop | misses |", "|" + "---|" * 11]
    for r in rows:
        if r["level"] != "L1":
            continue
        loop = r["loop"] or {}
        syncs = ", ".join(f"{op} {n}" for op, n in sorted(loop.get("block_syncs", {}).items())) or "none"
        lines.append(
            f"| {_step_short(r['step'])} | `{r['kernel']}` | {r['label']} ({r['launches']}) | "
            f"{'x'.join(map(str, r['block']))}, {r['warps']} | {r['programs']} ({r['ctas_per_sm']}) | "
            f"{r['sm_waves']:.2f} | {r['iterations']} | {loop.get('instructions', '-')} | {_loads(loop)} | {syncs} | "
            f"{'; '.join(r['missed'].values()) or 'ok'} |")
    return "\n".join(lines)


RESULTS = REPO / "benchmarks" / "RESULTS.md"
_SECTION = "## Static, sm_90 (compiled, not run)"
_BEGIN, _END = "<!-- tests/sm90.py --efficiency: begin -->", "<!-- tests/sm90.py --efficiency: end -->"


def efficiency_section(result, date):
    """The efficiency subsection of RESULTS.md's "Static, sm_90" section: how it was made, then the tables."""
    return f"""### Main-loop efficiency (SASS)

{date}, torch {result['torch']}, triton {result['triton']}, a CPU-only machine: compiled for sm_90, not run.
Produced by `python tests/sm90.py --efficiency --write-results`; `tests/test_sm90_resources.py` asserts the
targets of issue 18 in CI.  Every default launch of L2's GEMMs (`_conv_kernel`, `_wgrad_kernel`) in a DCGAN
train step at B = 128, 64x64, ngf = ndf = 64 and 128, bf16 autocast channels_last and TF32 NCHW, and of L1's BN
reductions (`_moments_kernel`, `_backward_reduce_kernel`) in the same steps at L1, read from `cuobjdump -sass`
of the compiled cubin by tests/sass.py (docs/design.md, "Static efficiency, from the SASS", has the method).
The main loop is the backward branch enclosing the most MMA instructions (a reduction's: the most global
loads); instr./K-step is its SASS instructions per warp over the K-steps one iteration covers.  Issue
cycles = instr./K-step x warps / 4 schedulers; MMA cycles = BLOCK_M x BLOCK_N x BLOCK_K / 2048 (bf16) or
/ 1024 (TF32) per SM and clock.  Waves = programs / (132 SMs x CTAs per SM).  FLOP share: of all the step's
GEMM launches, the row's identical launches together.  est. us: the busiest SM's programs x K-steps x
max(issue, MMA cycles) at 1.83 GHz, a lower bound (no memory latency).  Targets: HGMMA/HMMA; issue <= MMA
cycles where the share is >= 5%; a program on every SM (95%: tiling.WAVE_FILL) but in the end layers; no
spills; end layers (3 or 1 channels, the 100-d noise) <= 20 us; reductions >= 2 waves of 132 SMs with no
barrier or shuffle (block reduction) inside the loop.
"misses" names each target missed.

{efficiency_markdown(result)}"""


def write_results(result, path=RESULTS):
    """Replace (or create) the efficiency subsection of ``path``'s first "Static, sm_90" section."""
    text = path.read_text()
    block = f"{_BEGIN}\n{efficiency_section(result, time.strftime('%Y-%m-%d', time.gmtime()))}\n{_END}"
    if _BEGIN in text:
        head, rest = text.split(_BEGIN, 1)
        text = head + block + rest.split(_END, 1)[1]
    elif _SECTION in text:
        head, rest = text.split(_SECTION, 1)
        following = rest.find("\n## ")
        body, tail = (rest, "") if following < 0 else (rest[:following], rest[following:])
        text = f"{head}{_SECTION}{body.rstrip()}\n\n{block}\n{tail}"
    else:
        text = f"{text.rstrip()}\n\n{_SECTION}\n\n{block}\n"
    path.write_text(text)


def estimate(variant):
    """tiling's estimates for a conv_gemm GEMM variant (None for the other kernels)."""
    ce = variant.constexprs()
    if variant.kernel not in GEMMS:
        return None
    dtype = TORCH_DTYPES[variant.dtype()]
    if variant.kernel == "_conv_kernel":
        a, b = conv_gemm._operand(ce["PRO"], ce["ACT_IN"], dtype), tiling.Operand()
    else:
        a = conv_gemm._operand(ce["PRO_LO"], ce["ACT_LO"], dtype)
        b = conv_gemm._operand(ce["PRO_HI"], ce["ACT_HI"], dtype)
    g = tiling.gemm(dtype.itemsize, ce["PRECISION"] == "ieee", a, b)
    tile = tiling.Tile(ce["BLOCK_M"], ce["BLOCK_N"], ce["BLOCK_K"], variant.warps, variant.stages)
    return dict(shared=tiling.shared_memory(tile, g), live_words=tiling.live_words(tile, g),
                fits=tiling.fits(tile, g, tiling.SM90))


def blocks_per_sm(compiled, warps, device=tiling.SM90):
    """Resident blocks per SM: registers are allocated per warp in units of 256 (8 per thread), and the driver
    keeps 1 KB of shared memory per block."""
    threads = 32 * warps
    registers = -(-max(compiled["registers"], 1) // 8) * 8
    return min(device.smem_per_sm // (compiled["shared"] + 1024), device.regs_per_sm // (registers * threads),
               device.threads_per_sm // threads, 32)


def markdown(result):
    """The "Static, sm_90" figures of benchmarks/RESULTS.md from an audit."""
    variants = result["variants"]
    compiled = [v for v in variants if v["compiled"] and "error" not in v["compiled"]]
    lines = ["| kernel | dtype | variants recorded | compiled | registers | spills (B) | shared (KB) | blocks/SM |",
             "|---|---|---|---|---|---|---|---|"]
    groups = collections.defaultdict(list)
    for v in variants:
        groups[v["kernel"], v["family"]].append(v)
    for (kernel, family), members in sorted(groups.items()):
        done = [v for v in members if v in compiled]
        if not done:
            continue
        regs = [v["compiled"]["registers"] for v in done]
        spills = [v["compiled"]["spill_bytes"] for v in done]
        shared = [v["compiled"]["shared"] / 1024 for v in done]
        occ = [blocks_per_sm(v["compiled"], v["warps"]) for v in done]
        lines.append(f"| `{kernel}` | {family} | {len(members)} | {len(done)} | {min(regs)}-{max(regs)} | "
                     f"{max(spills)} | {min(shared):.1f}-{max(shared):.1f} | {min(occ)}-{max(occ)} |")
    lines += ["", "GEMM configs, each at its heaviest recorded variant (default launches: how many of the recorded "
              "launches take the config when not autotuning):", "",
              "| kernel | dtype | tile (MxNxK) | warps | stages | registers | spills (B) | shared (KB) | estimate (KB) "
              "| blocks/SM | default launches |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    defaults = collections.Counter(launch["variants"][0] for step in result["steps"] for launch in step["launches"])
    for v in variants:
        if v["config"] is None or v not in compiled or not v["representative"]:
            continue
        ce, c = v["constexprs"], v["compiled"]
        picks = sum(n for j, n in defaults.items() if variants[j]["kernel"] == v["kernel"]
                    and variants[j]["family"] == v["family"] and variants[j]["config"] == v["config"])
        lines.append(f"| `{v['kernel']}` | {v['family']} | {ce['BLOCK_M']}x{ce['BLOCK_N']}x{ce['BLOCK_K']} | "
                     f"{v['warps']} | {v['stages']} | {c['registers']} | {c['spill_bytes']} | "
                     f"{c['shared'] / 1024:.1f} | {v['estimate']['shared'] / 1024:.1f} | "
                     f"{blocks_per_sm(c, v['warps'])} | {picks} |")
    lines += ["", "Compilations before the first train step (distinct variants of one step, over the 60 steps of a "
              "level):", "", "| level | default | FASTGAN_AUTOTUNE=1 |", "|---|---|---|"]
    for level in LEVELS:
        runs = [s for s in result["steps"] if s["level"] == level and s["step"].startswith("B=")]
        default = [len({launch["variants"][0] for launch in s["launches"]}) for s in runs]
        tuned = [len({i for launch in s["launches"] for i in launch["variants"]}) for s in runs]
        lines.append(f"| {level} | {min(default)}-{max(default)} | {min(tuned)}-{max(tuned)} |")
    for step in result["steps"]:
        if step["step"] in result["cold_start"]:
            done = [variants[i]["compiled"] for i in {launch["variants"][0] for launch in step["launches"]}]
            seconds = sum(c["seconds"] for c in done if c and "seconds" in c)
            lines.append(f"\n{step['step']}: {len(done)} compilations, {seconds:.0f} s compiling them one after "
                         "another here.")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="compile every variant, not only representatives")
    parser.add_argument("--cold-start", nargs="*", default=(), metavar="STEP",
                        help='also compile every default variant of these steps, e.g. "B=128 ngf=ndf=64 bf16 nchw L2"')
    parser.add_argument("--json", help="write the audit here (else print it)")
    parser.add_argument("--markdown", action="store_true", help="print the figures for benchmarks/RESULTS.md")
    parser.add_argument("--efficiency", action="store_true",
                        help="print the main-loop efficiency tables (MMA kind, instructions per K-step, issue vs "
                             "MMA cycles, waves, FLOP share) of the L2 GEMMs and L1 reductions")
    parser.add_argument("--write-results", action="store_true",
                        help="with --efficiency: write them into benchmarks/RESULTS.md's \"Static, sm_90\" section")
    parser.add_argument("--write-baseline", action="store_true",
                        help=f"write the heavy launches' issue : MMA ratios into tests/{ISSUE_BASELINE.name}, "
                             "under this triton version (the ratchet of tests/test_sm90_resources.py)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compiling processes")
    args = parser.parse_args(argv)
    result = audit("all" if args.all else "representatives", args.jobs, args.cold_start,
                   log=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        Path(args.json).write_text(json.dumps(result))
    if args.markdown:
        print(markdown(result))
    if args.efficiency:
        print(efficiency_markdown(result))
        if args.write_results:
            write_results(result)
    if args.write_baseline:
        write_issue_baseline(result)
    if not (args.json or args.markdown or args.efficiency or args.write_baseline):
        print(json.dumps(result))


if __name__ == "__main__":
    main()
