"""Every CLI probe of tests/cli_probes.py gets its answer: a one-line error naming the flag or file and the fix,
or the right result; a few run as real processes to show that no traceback reaches stderr."""
import subprocess
import sys

import pytest

from cli_probes import BUSY_LOCK, PROBES, make_fixtures, run_probe
from fastgan import cli
from fastgan.cli import lock
from parity import python_env


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return make_fixtures(str(tmp_path_factory.mktemp("probes")))


def test_there_are_enough_probes():
    assert len(PROBES) >= 60 and len({name for name, *_ in PROBES}) == len(PROBES)
    assert BUSY_LOCK == lock.LOCK_FILE  # the probes' running run locks the file fastgan train looks at


@pytest.mark.parametrize("probe", PROBES, ids=[probe[0] for probe in PROBES])
def test_cli_probe(paths, probe):
    name, argv, env, (kind, text) = probe
    got, message = run_probe(cli.main, argv, env, paths)
    assert got == kind, message
    assert text.format(**paths) in message, message
    if kind == "error":
        assert message.startswith(f"fastgan {argv[0] if argv and argv[0] in cli.COMMANDS else ''}".rstrip()), message
        assert ": error: " in message and "\n" not in message.strip(), message


@pytest.mark.parametrize("argv", [
    ["train", "--lr", "-1"],
    ["sample", "--netG", "{run}/train_state_epoch_0.pt", "--out", "{scratch}/s.png"],
])
def test_no_traceback_reaches_stderr(paths, argv):
    proc = subprocess.run([sys.executable, "-m", "fastgan", *(a.format(**paths) for a in argv)], capture_output=True,
                          text=True, timeout=300, env=python_env())
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fastgan {argv[0]}: error: "), proc.stderr


def test_a_bug_says_so_after_its_traceback(monkeypatch, capsys):
    """An unexpected exception is not a user's mistake: its traceback stays, then one line asks for a report."""
    def broken(args):
        raise RuntimeError("an internal invariant does not hold")

    monkeypatch.setattr(cli.importlib.import_module("fastgan.cli.sample"), "run", broken)
    with pytest.raises(SystemExit) as info:
        cli.main(["sample", "--netG", "x.pth"])
    err = capsys.readouterr().err
    assert info.value.code == 1 and "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1] == ("fastgan sample: this is a bug in fastgan: please report it with the "
                                            f"command and the traceback above at {cli.BUG_REPORTS}")


def test_out_of_memory_is_one_line(monkeypatch):
    def hungry(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:119] DefaultCPUAllocator: not enough memory: you tried "
                           "to allocate 68719476736 bytes.")

    monkeypatch.setattr(cli.importlib.import_module("fastgan.cli.demo"), "run", hungry)
    with pytest.raises(SystemExit) as info:
        cli.main(["demo"])
    assert info.value.code.startswith("fastgan demo: error: out of memory (") and "lower --batchSize" in info.value.code
