"""Fault injection: `fastgan train` interrupted at 26 points (SIGINT, SIGTERM, a second Ctrl-C, SIGKILL; inside
steps, in the loader, inside torch.save, between the files of a save, before and after os.replace), then
resumed with --resume, ends bit for bit where the uninterrupted run ends, with no checkpoint lost or cut
short.  tests/fault_driver.py runs it all in one subprocess (the SIGKILLed runs in forked children)."""
import json
import os
import subprocess
import sys

import pytest

from fault_driver import SCENARIOS

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.slow  # one subprocess running 27 short trainings: about 25 s on 2 cores


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "fault_driver.py"), str(work)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(work / "results.json") as f:
        return json.load(f)


def test_reference_run(results):
    assert results["reference"] == 0
    assert len(SCENARIOS) >= 20 and sum(any(t[2] == "SIGKILL" for t in triggers)
                                        for triggers, _ in SCENARIOS.values()) >= 3


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_interrupted_run_resumes_bit_for_bit(results, name):
    result, (status, newest_step) = results["scenarios"][name], SCENARIOS[name][1]
    assert "error" not in result, result["error"]
    assert result["interrupted"] == status, "exit status of the interrupted run"
    assert result["newest_step"] == newest_step, "step of the newest whole checkpoint after the interruption"
    assert result["resumed"] == 0, "exit status of the resumed run"
    assert result["differences"] == [], "differences from the uninterrupted run"
    assert result["folder_problems"] == [], "cut-short sets or temporary files left behind"
