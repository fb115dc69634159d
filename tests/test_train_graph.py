"""fastgan train's captured step: --graph auto|on|off and --level, their refusals and fallbacks, the resident
batches a graph gathers itself, the host work of a replayed step, and (on a GPU) captured runs against eager
ones for every preset and loss, a captured run resumed after SIGKILL, graph launches counted by the profiler.

On the CPU the capture path runs with tests/fake_graphs.py's stand-in for torch.cuda's graphs."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fake_graphs import Replayer, fake_capture_everywhere
from fault_driver import GPU_SCENARIOS, differences
from fastgan import cli
from fastgan.cli import data, feed, train
from fastgan.nn import presets
from fastgan.nn.step import CapturedStep

TINY = ["--batchSize", "4", "--ngf", "2", "--ndf", "2", "--builtin-images", "16", "--manualSeed", "1",
        "--device", "cpu", "--log-every", "2"]
HERE = os.path.dirname(os.path.abspath(__file__))


def _train(out, *extra):
    try:
        return cli.main(["train", "--outf", str(out), *TINY, *extra])
    except SystemExit as exc:
        return exc.code


def _error(out, *extra):
    message = _train(out, *extra)
    assert isinstance(message, str) and "\n" not in message and message.startswith("fastgan train: error: "), message
    return message


def _same_files(a, b, names=("checkpoint.pt", "netG_epoch_1.pth", "netD_epoch_1.pth")):
    for name in names:
        assert differences(torch.load(a / name), torch.load(b / name)) == [], name


@pytest.fixture
def captured_on_cpu(monkeypatch):
    """fastgan train on the CPU taking the capture path (fake_graphs), with a resident data set."""
    monkeypatch.setattr(train, "capture_problem", lambda step: None)
    monkeypatch.setattr(train, "placement_problem", lambda device, distributed: None)
    feeder = data.Feeder
    monkeypatch.setattr(data, "Feeder", lambda *args, **kwargs: feeder(*args, resident=True, **kwargs))
    return monkeypatch


# ----------------------------------------------------------------------------- flags, refusals, fallbacks

def test_graph_on_without_a_gpu_is_refused_in_one_line(tmp_path):
    message = _error(tmp_path / "run", "--graph", "on", "--max-steps", "1")
    assert message == ("fastgan train: error: --graph on: CUDA graphs run on a CUDA device, and this step's models "
                       "are on cpu; drop --graph on to train with eager steps")
    assert not (tmp_path / "run").exists()


def test_graph_and_level_choices(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--graph", "sometimes"])
    assert info.value.code == 2
    assert "argument --graph: invalid choice: 'sometimes'" in capsys.readouterr().err
    assert _error(tmp_path, "--level", "L2") == (
        "fastgan train: error: --level L2 runs fastgan's Triton convolutions, and --backend auto is torch here; add "
        "--backend triton, or drop --level L2")


def test_auto_and_off_train_eagerly_on_the_cpu_without_a_word(tmp_path, capsys):
    assert _train(tmp_path / "auto", "--max-steps", "5") == 0
    assert _train(tmp_path / "off", "--max-steps", "5", "--graph", "off") == 0
    assert "--graph" not in capsys.readouterr().out
    _same_files(tmp_path / "auto", tmp_path / "off")


@pytest.mark.parametrize("extra", [[], ["--preset", "anime64", "--loss", "wgan-gp", "--d-steps", "2"]])
def test_a_captured_run_is_the_eager_run(tmp_path, captured_on_cpu, extra):
    """The CLI's captured path (resident batches gathered inside the step, a window of values, the reseed before
    each replay, one graph per kind of step) trains exactly as --graph off."""
    assert _train(tmp_path / "eager", "--max-steps", "10", "--graph", "off", *extra) == 0
    fake_capture_everywhere(captured_on_cpu)
    made = []
    init = CapturedStep.__init__
    captured_on_cpu.setattr(CapturedStep, "__init__", lambda self, *a, **k: made.append(self) or init(self, *a, **k))
    assert _train(tmp_path / "graph", "--max-steps", "10", *extra) == 0
    (step,) = made
    assert all(isinstance(e.graph, Replayer) and e.graph.replays > 0 and e.real is None
               for e in step._entries.values()), "captured, replayed, the batch gathered in the graph"
    _same_files(tmp_path / "eager", tmp_path / "graph")


def test_a_capture_that_fails_goes_on_eagerly_or_stops_with_graph_on(tmp_path, captured_on_cpu, capsys):
    assert _train(tmp_path / "eager", "--max-steps", "6", "--graph", "off") == 0
    fake_capture_everywhere(captured_on_cpu, fail=RuntimeError("CUDA error: operation not permitted when stream is "
                                                               "capturing\nCompile with TORCH_USE_CUDA_DSA"))
    assert _train(tmp_path / "auto", "--max-steps", "6") == 0
    out = capsys.readouterr().out
    assert ("fastgan train: --graph auto: capturing the train step as a CUDA graph failed (RuntimeError: CUDA error: "
            "operation not permitted when stream is capturing Compile with TORCH_USE_CUDA_DSA); going on with eager "
            "steps from step 3\n") in out
    _same_files(tmp_path / "eager", tmp_path / "auto")
    message = _error(tmp_path / "on", "--max-steps", "6", "--graph", "on", "--save-every", "2")
    assert message.startswith("fastgan train: error: --graph on: capturing the train step as a CUDA graph failed "
                              "(RuntimeError: CUDA error: operation not permitted")
    assert message.endswith("; --graph auto goes on with eager steps instead")
    assert torch.load(tmp_path / "on" / "checkpoint.pt")["step"] == 2  # the last save before it stays whole


def test_a_captured_run_resumed_is_the_uninterrupted_run(tmp_path, captured_on_cpu):
    fake_capture_everywhere(captured_on_cpu)
    assert _train(tmp_path / "whole", "--max-steps", "8", "--d-steps", "2") == 0
    assert _train(tmp_path / "parts", "--max-steps", "5", "--d-steps", "2") == 0
    assert _train(tmp_path / "parts", "--max-steps", "8", "--resume", str(tmp_path / "parts")) == 0
    _same_files(tmp_path / "whole", tmp_path / "parts")


def test_a_captured_run_that_goes_non_finite_stops_without_saving(tmp_path, captured_on_cpu, capsys):
    """A D weight turned NaN in place (the storage the graphs read) before step 6: the replayed step's values,
    read at the next window, stop the run (exit status 3) and the checkpoints stay as they were."""
    fake_capture_everywhere(captured_on_cpu)
    step, before = train.Trainer.step, {}

    def poisoning(self, *args):
        if self.train_step.batches == 5:
            assert self.captured is not None
            before.update({p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.suffix != ".lock"})
            next(self.d_module.parameters()).data[0, 0, 0, 0] = float("nan")
        return step(self, *args)

    captured_on_cpu.setattr(train.Trainer, "step", poisoning)
    assert _train(tmp_path / "run", "--max-steps", "12", "--save-every", "2") == 3
    assert before and {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    assert "fastgan train: error: the losses of step 6 are not finite (Loss_D nan, Loss_G nan): stopped at step 6 " \
           "without saving" in capsys.readouterr().err


# ----------------------------------------------------------------------------- resident batches

@pytest.mark.parametrize("flip", [False, True])
def test_resident_batches_in_place_are_the_feeders_batches(flip):
    """in_place hands out the ResidentBatch with its index filled: calling it gives the batch the Feeder yields,
    a resumed epoch's batches included."""
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    feeder = feed.Feeder(images, 4, "cpu", seed=3, flip=flip, resident=True)
    for skip in (0, 3):
        tensors = [b.clone() for b in feeder.epoch(1, skip)]
        in_place = [b().clone() for b in feeder.epoch(1, skip, in_place=True)]
        assert len(tensors) == len(in_place) == 10 - skip
        for want, got in zip(tensors, in_place):
            assert torch.equal(got, want)
    assert next(iter(feeder.epoch(0, in_place=True))) is feeder.resident_batch


# ----------------------------------------------------------------------------- the host's work per replay

class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_a_replayed_step_issues_no_allocation_and_no_read(tmp_path, captured_on_cpu):
    """What fastgan train's loop sends to the device around a replay: the resident batch's index, the values into
    the window; no allocation, no .item(), no per-parameter work."""
    fake_capture_everywhere(captured_on_cpu)
    made = []
    init = CapturedStep.__init__
    captured_on_cpu.setattr(CapturedStep, "__init__", lambda self, *a, **k: made.append(self) or init(self, *a, **k))
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    run = train.Run(parser.parse_args(["--outf", str(tmp_path), *TINY, "--builtin-images", "32"]),
                    train.distributed.Context())
    batches = iter(run.feeder.epoch(0, in_place=True))
    for _ in range(4):  # warm-up, capture, a replay
        run.rows[0].copy_(run.trainer.step(next(batches)))
    (captured,) = made
    (entry,) = captured._entries.values()
    entry.graph = Replayer(lambda: None)  # the device's work stubbed out
    with _Ops() as seen:
        real = next(batches)
        run.rows[1].copy_(run.trainer.step(real))
    assert seen.ops == ["aten.copy_", "aten.copy_"], seen.ops


# ----------------------------------------------------------------------------- GPU

GPU_CASES = [(preset, loss) for preset in presets.PRESETS for loss in ("bce", "lsgan", "hinge", "wgan-gp")]


def _gpu_step(preset, loss, graph, seed=0, amp=None, d_steps=None):
    from fastgan.cli.train import Settings, Trainer
    from fastgan.nn import distributed
    from fastgan.nn.layers import fuse
    torch.manual_seed(seed)
    G, D, r = presets.build(preset, ngf=16, ndf=16)
    device = torch.device("cuda")
    G, D = fuse(G).to(device), fuse(D).to(device)
    s = Settings(preset=preset, nz=r.nz, ngf=r.ngf, ndf=r.ndf, nc=r.nc, image_size=r.image_size, batch_size=16,
                 loss=loss, lr=r.lr, beta1=r.betas[0], beta2=r.betas[1], weight_decay=r.weight_decay,
                 label_smoothing=r.label_smoothing if loss in ("bce", "lsgan") else 0.0, d_steps=d_steps or r.d_steps,
                 g_steps=r.g_steps, noise=r.noise)
    trainer = Trainer(G, D, s, distributed.Context(device=device), amp=amp, seed=seed, graph=graph)
    shape = (16, r.nc, r.image_size, r.image_size)
    return trainer, torch.rand((20, *shape), generator=torch.Generator().manual_seed(1)).to(device) * 2 - 1


@pytest.mark.gpu
@pytest.mark.parametrize("preset,loss", GPU_CASES)
def test_captured_matches_eager_gpu(preset, loss, monkeypatch):
    """20 steps captured (after 3 warm-up steps per kind) and 20 eager, deterministic cuDNN: identical weights,
    buffers and values."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    (eager, batches), (graphed, _) = _gpu_step(preset, loss, "off"), _gpu_step(preset, loss, "on")
    assert graphed.captured is not None and eager.captured is None
    for i, real in enumerate(batches):
        want, got = eager.step(real).clone(), graphed.step(real).clone()
        assert torch.equal(want.nan_to_num(), got.nan_to_num()), f"step {i}: {got} != {want}"
    assert all(e.graph is not None for e in graphed.captured._entries.values())
    for a, b in ((eager.g_module, graphed.g_module), (eager.d_module, graphed.d_module)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_captured_amp_matches_eager_gpu(amp, monkeypatch):
    """bf16 autocast, and fp16 with its GradScalers (torch's fused Adam takes the scale and found_inf on the
    device): captured, the same values as eager, and no fallback."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    runs = []
    for graph in ("off", "on"):
        trainer, batches = _gpu_step("dcgan64", "bce", graph, amp=amp)
        runs.append(torch.stack([trainer.step(real).clone() for real in batches]))
    assert trainer.captured is not None and not trainer.captured.eager
    assert torch.equal(runs[0].nan_to_num(), runs[1].nan_to_num())


@pytest.mark.gpu
@pytest.mark.parametrize("preset,loss,d_steps", [(p, loss, None) for p, loss in GPU_CASES] + [("dcgan64", "hinge", 2)])
def test_one_graph_launch_per_step_gpu(preset, loss, d_steps):
    """torch.profiler counts one graph launch per replayed step, for 1:1 (one graph) and 2:1 (two)."""
    from torch.profiler import ProfilerActivity, profile
    trainer, batches = _gpu_step(preset, loss, "on", d_steps=d_steps)
    for real in batches[:10]:  # the warm-up and capture of each kind of step
        trainer.step(real)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for real in batches[10:16]:
            trainer.step(real)
        torch.cuda.synchronize()
    launches = sum(e.count for e in prof.key_averages() if "GraphLaunch" in e.key)
    assert launches == 6, sorted((e.key, e.count) for e in prof.key_averages())[:60]
    assert len(trainer.captured._entries) == (2 if d_steps == 2 else 1)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(GPU_SCENARIOS))
def test_captured_cli_run_resumed_after_sigkill_gpu(tmp_path, name):
    """fastgan train --graph on killed (SIGKILL) after its step-10 checkpoint, its graphs replaying by then, and
    resumed (3 eager warm-up steps per kind, captures, replays) ends bit for bit where the uninterrupted captured
    run ends (--deterministic): tests/fault_driver.py --gpu NAME."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "fault_driver.py"), str(tmp_path), "--gpu", name],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    result, (status, newest) = results["scenarios"][name], GPU_SCENARIOS[name][2]
    assert "error" not in result, result["error"]
    assert results["reference"] == 0 and result["interrupted"] == status and result["newest_step"] == newest
    assert result["resumed"] == 0 and result["differences"] == [] and result["folder_problems"] == []
