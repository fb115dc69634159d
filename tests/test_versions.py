"""The versions fastgan declares are the versions CI runs, and a known bad combination says so in one line."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch

import fastgan
from fastgan.ops import backends

ROOT = Path(__file__).resolve().parent.parent


def test_declared_torch_floor_is_the_version_ci_runs_second():
    pyproject = (ROOT / "pyproject.toml").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    floor = re.search(r'"torch>=([\d.]+)"', pyproject).group(1)
    pinned = re.search(r"torch==([\d.]+)", ci).group(1)
    assert f"{pinned}.".startswith(f"{floor}."), f"pyproject.toml: torch>={floor}; CI's second run: torch {pinned}"
    triton_floor = re.search(r'"triton>=([\d.]+)', pyproject).group(1)
    triton_pinned = re.search(r"triton.__version__ == '([\d.]+)'", ci).group(1)
    assert f"{triton_pinned}.".startswith(f"{triton_floor}."), (triton_floor, triton_pinned)


@pytest.mark.parametrize("triton_version, numpy_version, broken", [
    ("3.6.0", "2.4.6", True),
    ("3.7.1", "2.4.0", True),
    ("3.6.0", "2.3.5", False),
    ("3.8.0", "2.4.6", False),
])
def test_interpreter_numpy_clash_is_one_line(monkeypatch, triton_version, numpy_version, broken):
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    monkeypatch.setattr(backends, "_interpreter_error", ...)  # forget the real versions' answer
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not broken:
        assert backends.resolve("triton", torch.device("cpu")) == "triton"
        return
    with pytest.raises(fastgan.BackendUnavailable) as exc:
        backends.resolve("triton", torch.device("cpu"))
    message = str(exc.value)
    assert "\n" not in message
    assert f"triton {triton_version}'s interpreter needs numpy<2.4, found numpy {numpy_version}" in message
    assert "backend='torch'" in message


@pytest.mark.slow
def test_the_check_traces_under_torch_compile():
    """In a fresh process the first resolve may come while dynamo traces: the version check must not break it."""
    pytest.importorskip("triton")
    if backends.interpreter_error():
        pytest.skip(backends.interpreter_error())
    code = ("import torch\n"
            "from fastgan.ops import backends\n"
            "@torch.compile(fullgraph=True, backend='eager')\n"
            "def shifted(x):\n"
            "    return x + (1 if backends.resolve('triton', x.device) == 'triton' else 2)\n"
            "print(shifted(torch.ones(2)).tolist())\n")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TRITON_INTERPRET="1"),
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "[2.0, 2.0]", out.stderr[-3000:]
