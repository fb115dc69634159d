"""Shared test setup: interpreter mode on CPU-only machines, GPU, interpreter and slow marks, NaN-poisoned kernel
outputs, a working folder of its own per test.

Without CUDA, TRITON_INTERPRET=1 is set here, before anything imports triton, so the Triton kernels run on CPU
tensors (slowly: keep their shapes tiny).  Where the interpreter cannot run (a triton that needs numpy<2.4 beside
numpy 2.4), the tests marked ``interpreter`` skip with that reason.  The helpers tests import live in parity.py
(a conftest cannot be imported by name: benchmarks/ has one too).
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from parity import HAS_CUDA, interpreter_problem  # noqa: E402


# The slow tier: what `pytest -m "not slow"` leaves out (CI runs everything).  The fast tier keeps the parity of
# every op on every backend and dtype, one model per backend, and the CLI; these cases repeat what it covers at
# larger cost, mostly in the Triton interpreter (node id prefixes: file::test[parameters).
SLOW = (
    "test_train_step.py::test_triton_steps_match_reference_loop",  # 5 DCGAN steps in the interpreter
    "test_library_ops.py::test_torch_compile_traces_the_fused_model[triton]",
    "test_ddp.py::",  # two gloo ranks and torchrun: process start-up
    "test_bn_act.py::test_gradcheck_fp64",  # fp64 gradcheck of every activation (test_bn_act_fp32 stays)
    "test_bn_act.py::test_more_splits_than_one_finalize_chunk[True]",
    "test_conv_gemm.py::test_gradcheck_fp64",
    "test_conv_gemm.py::test_tiny_dcgan_matches_reference",
    "test_conv_gemm.py::test_opcheck",
    "test_conv_gemm.py::test_torch_compile_traces_the_chain",
    "test_models.py::test_eval_mode_parity[triton-",  # train-mode fp32 parity on triton stays
    "test_models.py::test_train_mode_parity[triton-cpu-fp16-",
    "test_models.py::test_autocast_fp16_parity",
    "test_losses_gan.py::test_bce_step_is_examples_dcgan[triton]",
    "test_losses_gan.py::test_wgan_gp_step_matches_plain_torch[triton]",
    "test_losses_gan.py::test_gradient_penalty_matches_reference[dcgan64-triton]",  # the torch cases stay
    "test_losses_gan.py::test_gradient_penalty_matches_reference[anime64-triton]",
    "test_presets.py::test_parity_triton[avatar48",
    "test_presets.py::test_parity_triton[anime64",
    "test_presets.py::test_parity_triton[mnist28",
    "test_presets.py::test_parity_triton[mlp-mnist",
    "test_cuda_ext.py::test_a_builder_waits_for_the_lock",  # sleeps to hold a lock
    "test_cuda_ext.py::test_failed_build_warns_once_and_auto_falls_back",  # two failing builds
    "test_versions.py::test_the_check_traces_under_torch_compile",
    "test_gpu_check.py::test_stages_report_success_failure_and_overrun",
)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    no_interpreter = interpreter_problem()  # e.g. triton 3.6 with numpy 2.4: one reason, not a failure per test
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and no_interpreter:
            item.add_marker(pytest.mark.skip(reason=no_interpreter))
        path, _, name = item.nodeid.partition("::")
        if f"{os.path.basename(path)}::{name}".startswith(SLOW):
            item.add_marker(pytest.mark.slow)


def _poison(enabled):
    from fastgan.kernels import outputs

    outputs.POISON_OUTPUTS = enabled
    if "fastgan.ops.ext_ops" in sys.modules:  # once loaded, the extension reads the flag at import
        sys.modules["fastgan.ops.ext_ops"].poison_outputs(enabled)


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Every kernel output (Triton and the extension) starts as NaN, so an element no kernel wrote fails."""
    _poison(True)
    yield
    _poison(False)


@pytest.fixture(autouse=True)
def own_working_folder(tmp_path_factory, monkeypatch):
    """Each test runs in an empty folder of its own: none reads, or writes into, the folder pytest started in
    (README's first command writes out/ there)."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(autouse=True)
def exact_fp32():
    """Tests compare in exact fp32 unless they opt into TF32 themselves."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
