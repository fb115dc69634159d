"""python -m fastgan doctor on CPU end to end, with a parity failure injected on purpose, and its pieces."""
import json
import re

import pytest
import torch

import parity
from fastgan import cli
from fastgan.nn import reference
from fastgan.ops import contract, functional
from fastgan.perf import bench, doctor, tolerances

TINY = ["--batch", "2", "--size", "4", "--steps", "1", "--device", "cpu", "--quick"]


def _doctor(tmp_path, capsys, *extra):
    path = tmp_path / "doctor.json"
    code = cli.main(["doctor", *TINY, "--json", str(path), *extra])
    return code, capsys.readouterr().out, json.loads(path.read_text())


def _row(out, name):
    """The first table row of ``name`` (progress lines are indented)."""
    return next(line.split() for line in out.splitlines() if line.startswith(f"{name} "))


def test_doctor_cpu_end_to_end(tmp_path, capsys):
    code, out, report = _doctor(tmp_path, capsys)
    assert code == 0, out
    rows = {(r["config"], r["dtype"]): r for r in report["correctness"]["rows"]}
    assert {("fastgan-torch", "fp32"), ("fastgan-torch", "bf16")} <= rows.keys()
    for row in rows.values():
        assert row["passed"] and {c["group"] for c in row["checks"]} == set(doctor.GROUPS), row["config"]
        assert (row["batch"], row["ngf"]) == (2, 4)
    checked = {c["what"] for c in rows["fastgan-torch", "fp32"]["checks"] if c["group"] == "G dW"}
    assert checked == {f"grad of {name}" for name, _ in reference.Generator(ngf=4).named_parameters()}
    assert all(c["tolerance"] == 1e-3 for c in rows["fastgan-torch", "fp32"]["checks"])
    skipped = {(s["config"], s["dtype"]) for s in report["correctness"]["skipped"]}
    assert {("fastgan-torch", "fp16"), ("fastgan-triton", None), ("fastgan-triton-L3", None)} <= skipped

    speed = {r["peer"]: r for r in report["speed"]["rows"]}
    assert {"eager", "fastgan-torch"} <= speed.keys() and "compile" not in speed
    assert speed["eager"]["vs_eager"] == 1.0 and speed["eager"]["peak_bytes"] is None
    verdict = report["verdict"]
    assert verdict["passed"] and verdict["line"].startswith("recommended: ") and verdict["line"] in out
    assert "Triton runs only in its interpreter" in verdict["not_recommended"]["fastgan-triton"]
    assert report["environment"]["torch"] == torch.__version__
    assert report["extension"]["status"] in ("cached", "compiled", "failed")
    if ("fastgan-cuda", "fp32") not in rows:  # the extension did not build: that is the reason given
        assert report["extension"]["status"] == "failed" and "fastgan-cuda" in verdict["not_recommended"]

    assert "fp32, the train steps in float64; batch 2, ngf=ndf=4" in out
    assert "bf16 autocast, against the fp32/float64 reference above" in out
    assert _row(out, "fastgan-torch")[-1] == "pass" and not re.search(r"e[+-]\d\d!", out)  # no value marked
    assert "--quick: the torch.compile peers were skipped" in out
    assert "speed on a CPU is not what fastgan is for" in out


def test_doctor_flags_a_backend_that_fails_parity(tmp_path, capsys, monkeypatch):
    """The torch backend's activations off by 1%: its rows fail, the verdict says why, the exit status is 1."""
    def off_by_one_percent(y, act, slope):
        return contract.torch_act(y, act, slope) * 1.01

    monkeypatch.setattr(functional, "torch_act", off_by_one_percent)
    code, out, report = _doctor(tmp_path, capsys)
    assert code == 1
    (torch_fp32,) = [r for r in report["correctness"]["rows"] if (r["config"], r["dtype"]) == ("fastgan-torch", "fp32")]
    failed = {c["group"] for c in torch_fp32["checks"] if not c["passed"]}
    assert {"G out", "G dx", "D dx", "step"} <= failed
    why_not = report["verdict"]["not_recommended"]
    assert why_not["fastgan-torch"].startswith("parity failed: fp32 G out output ")
    assert "parity failed" not in why_not.get("fastgan-cuda", "")  # the other backends are not blamed
    assert (report["verdict"]["recommended"] or {}).get("backend") != "torch" and not report["verdict"]["passed"]
    row = _row(out, "fastgan-torch")
    assert row[1].endswith("!") and "FAIL:" in row
    assert f"not recommended: fastgan-torch: {why_not['fastgan-torch']}" in out


@pytest.mark.parametrize("argv, message", [
    (["--batch", "1"], "--batch 1: BatchNorm in training mode needs a batch of at least 2"),
    (["--device", "tpu"], "--device tpu: "),
    (["--json", "{tmp}/missing/report.json"], "the folder {tmp}/missing does not exist"),
    (["--json", "{tmp}"], "is a folder; give a file name"),
] + ([] if parity.HAS_CUDA else [(["--device", "cuda"], "no CUDA device is available here; use --device cpu")]))
def test_doctor_user_errors_are_one_line(tmp_path, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as info:
        cli.main(["doctor", *argv])
    text = info.value.code
    assert isinstance(text, str) and "\n" not in text and text.startswith("fastgan doctor: error: "), text
    assert message.format(tmp=tmp_path) in text


def test_compare_nan_integers_and_the_autocast_baseline():
    truth = {"G out": {"output": torch.ones(4)}, "G stats": {"main.1.num_batches_tracked": torch.tensor(3)}}
    nan = {"G out": {"output": torch.full((4,), float("nan"))},
           "G stats": {"main.1.num_batches_tracked": torch.tensor(2)}}
    assert [c.passed for c in doctor.compare(nan, truth, None, "fp32")] == [False, False]
    # under autocast the tolerance is twice the reference's own error on that tensor, where that is larger
    baseline = {"G out": {"output": torch.full((4,), 1.1)}, "G stats": truth["G stats"]}
    close = {"G out": {"output": torch.full((4,), 1.15)}, "G stats": truth["G stats"]}
    out, stats = doctor.compare(close, truth, baseline, "bf16")
    assert out.tolerance == pytest.approx(0.2) and out.passed and out.reference_error == pytest.approx(0.1)
    assert stats.tolerance == tolerances.TOLERANCES["bf16"]["rel_l2"] and stats.passed
    (far,) = doctor.compare({"G out": {"output": torch.full((4,), 1.3)}}, truth, baseline, "bf16")
    assert not far.passed


def _speed(name, median, spread=0.5):
    return dict(peer=name, median_ms=median, q1_ms=median - spread, q3_ms=median + spread, vs_eager=10.0 / median)


def test_verdict_picks_the_fastest_that_passes():
    peers = [bench.fastgan_peer("torch"), bench.fastgan_peer("cuda"), bench.fastgan_peer("triton", "L2"),
             bench.fastgan_peer("triton")]
    passing = [doctor.Check("G out", "output", 1e-7, 1e-3)]
    rows = [doctor.Row(peers[0], "fp32", passing), doctor.Row(peers[1], "fp32", passing),
            doctor.Row(peers[2], "fp32", passing), doctor.Row(peers[2], "bf16", [doctor.Check("step", "G parameters",
                                                                                              0.5, 0.02)]),
            doctor.Row(peers[3], "fp32", passing)]
    speed = {"eager": _speed("eager", 10.0), "fastgan-torch": _speed("fastgan-torch", 10.5),
             "fastgan-cuda": _speed("fastgan-cuda", 5.0), "fastgan-triton-L2": _speed("fastgan-triton-L2", 2.0),
             "fastgan-triton": _speed("fastgan-triton", 9.2)}
    best, line, why_not = doctor.verdict(peers, rows, [], speed, [], [])
    assert best == peers[1] and line == "recommended: backend=cuda level=L1 cuda_graph=False, 2.00x eager"
    assert why_not["fastgan-torch"] == "slower than eager (0.95x)"
    assert why_not["fastgan-triton-L2"] == "parity failed: bf16 step G parameters 5.0e-01 > 2.0e-02"
    assert why_not["fastgan-triton"].startswith("not measurably faster than eager (1.09x")
    best, line, _ = doctor.verdict(peers[:1], rows[:1], [], speed, [], [])
    assert best is None and line.startswith("recommended: eager PyTorch")


def test_compile_peer_time_box():
    row, reason = doctor.time_compile_peer(bench.compile_peer("default"), bench.Config(2, 4, 4), torch.device("cpu"),
                                           steps=1, warmup=0, timeout=0.5)
    assert row is None and reason == "did not finish within 0.5 s (--compile-timeout)"


@pytest.mark.gpu
def test_doctor_gpu(tmp_path, capsys):
    """On a GPU, at examples/dcgan's size: every backend, L2 and the graph steps, in fp32, bf16 and fp16."""
    path = tmp_path / "doctor.json"
    code = cli.main(["doctor", "--quick", "--steps", "5", "--json", str(path)])
    out = capsys.readouterr().out
    report = json.loads(path.read_text())
    rows = {(r["config"], r["dtype"]) for r in report["correctness"]["rows"]}
    assert {("fastgan-triton-L3", "bf16"), ("fastgan-triton-L2", "fp16"), ("fastgan-torch", "fp32")} <= rows, out
    assert code == 0, out
