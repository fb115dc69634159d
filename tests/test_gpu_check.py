"""The GPU check (benchmarks/gpu_check.py): its plan fits one device call, and a dry run skips its GPU stages."""
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import time

import pytest

from fastgan import cli
from parity import HAS_CUDA, ROOT, python_env

_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def test_plan_leaves_margin_under_nine_minutes_and_is_the_documented_one():
    budgets = {stage.name: stage.budget_s for stage in gpu_check.STAGES}
    documented = {name: int(s) for name, s in re.findall(r"^    (\S+) +(\d+)\b", gpu_check.__doc__, re.M)}
    assert documented == budgets
    total = int(re.search(r"^ +(\d+)   \d+ minutes", gpu_check.__doc__, re.M).group(1))
    assert total == sum(budgets.values()) <= 9 * 60 - 60  # a minute for the editable install and start-up


def test_dry_run_skips_the_gpu_stages_and_exits_0(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)] + (["--dry-run"] if HAS_CUDA else [])
    result = subprocess.run(command, cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = (out / "summary.md").read_text()
    assert summary in result.stdout
    assert re.search(r"^- CUDA \S+, torch \S+, triton .*, fastgan from ", summary, re.M)
    reason = "--dry-run" if HAS_CUDA else "no CUDA device here"
    for stage in gpu_check.STAGES:
        assert re.search(rf"^\| {stage.name} \| skipped \| 0 \| 0 \| {re.escape(reason)}", summary, re.M), stage.name
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "summary.md"]


def test_unknown_stage_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--out", str(tmp_path), "--stages", "bench-g64-fp32,nope"])
    assert exc.value.code == 2
    assert "--stages: unknown nope; choose from build-ext, gpu-tests" in capsys.readouterr().err


def _check(tmp_path):
    check = gpu_check.Check(tmp_path, tmp_path / "work", None, dict(os.environ))
    check.logs.mkdir(parents=True)
    return check


@pytest.mark.slow  # runs stages that sleep past their time box
def test_stages_report_success_failure_and_overrun(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "GRACE_S", 1)
    check = _check(tmp_path)

    def stage(name, code):
        result = gpu_check.run_stage(gpu_check.Stage(name, 3, lambda c: ["-c", code]), check, time.monotonic() + 6)
        return result, (check.logs / f"{name}.log").read_text()

    result, log = stage("ok", "print('fine')")
    assert (result.status, result.detail) == ("ran", "fine") and "fine" in log
    result, _ = stage("fails", "raise SystemExit('broken')")
    assert (result.status, result.detail) == ("failed", "exit 1: broken")
    start = time.monotonic()
    result, log = stage("deaf", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                                "print('waiting', flush=True); time.sleep(60)")
    assert result.status == "timed out" and "last line: waiting" in result.detail
    assert time.monotonic() - start < 12  # SIGINT ignored: SIGKILL at the limit


def test_a_failed_build_is_not_retried_by_later_stages(tmp_path):
    check = _check(tmp_path)
    gpu_check.after_build(check, gpu_check.StageResult("timed out"))
    code = "from fastgan.ops import extension; print(extension.extension_problem('cpu'))"
    result = subprocess.run([sys.executable, "-c", code], env=check.env, capture_output=True, text=True, timeout=300)
    assert "cannot be built in" in result.stdout, result.stdout + result.stderr


def test_every_stage_command_parses(tmp_path, monkeypatch):
    """A stage's command line is one the CLI (or pytest) accepts: a typo would cost a GPU call to find."""
    check = _check(tmp_path)
    for stage in gpu_check.STAGES:
        argv = stage.command(check)
        if argv[:2] == ["-m", "fastgan"]:
            module = importlib.import_module(cli.COMMANDS[argv[2]])
            seen = []
            monkeypatch.setattr(module, "run", seen.append)
            cli.main(argv[2:])
            assert len(seen) == 1, stage.name
        else:
            assert argv[:2] == ["-m", "pytest"], stage.name
            files = [a for a in argv if a.startswith(("tests/", "benchmarks/"))]
            assert files and all((gpu_check.ROOT / f).is_file() for f in files), stage.name
