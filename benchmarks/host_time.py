"""The host's work per captured train step, on the CPU, the device's work stubbed out.

    PYTHONPATH=. python benchmarks/host_time.py [--repeat 50] [--number 200]

fastgan train's Run (dcgan64, batch 64, a resident data set, --graph on) is built on the CPU; its CapturedStep
warms up and "captures" with a stand-in graph whose replay does nothing, so what is timed is the Python and
the torch calls a replayed step makes on the host: Trainer.step alone (the reseed, the guards on what the graph
reads, the key, the replay call), and one iteration of the loop (Run._epoch: the Feeder's index fill, the step,
the values into the device window, the bookkeeping; an epoch of steps, divided by its length).  On a GPU the
two tensor copies per iteration are launches instead of tiny memcpys, which this does not measure.  Prints the
min and the median over ``--repeat`` timeit runs of ``--number`` steps each, in microseconds per step.
"""
import argparse
import math
import statistics
import sys
import tempfile
import timeit

import torch

from fastgan.cli import data, progress, train
from fastgan.nn import distributed, step as step_module
from fastgan.nn.step import CapturedStep


class _NoDeviceWork:
    def replay(self):
        pass


def build(outf, steps):
    """fastgan train's Run on the CPU, its step captured (stand-in graph) and replaying."""
    init, feeder = CapturedStep.__init__, data.Feeder

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.captures = True

    # every CapturedStep takes its capture path on the CPU, its graph replaying nothing; the data set resident
    for owner, name, value in [
            (train, "capture_problem", lambda step: None), (train, "placement_problem", lambda device, dist: None),
            (step_module, "capture_problem", lambda step: None), (CapturedStep, "__init__", __init__),
            (CapturedStep, "_warm_up", CapturedStep._body), (CapturedStep, "_capture", lambda self, e: _NoDeviceWork()),
            (data, "Feeder", lambda *args, **kwargs: feeder(*args, resident=True, **kwargs))]:
        setattr(owner, name, value)
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--outf", outf, "--batchSize", "64", "--ngf", "8", "--ndf", "8", "--device", "cpu",
                              "--builtin-images", str(64 * steps), "--manualSeed", "1", "--graph", "on", "--dry-run",
                              "--save-every", "0"])
    run = train.Run(args, distributed.Context())
    batch = run.feeder.resident_batch
    for _ in range(4):  # 3 warm-up steps and the capture: from here on every step replays
        run.trainer.step(batch)
    assert all(isinstance(e.graph, _NoDeviceWork) for e in run.trainer.captured._entries.values())
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--number", type=int, default=200, help="steps per timed run (the loop: its epoch length)")
    a = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as outf:
        run = build(outf, a.number)
        batch = run.feeder.resident_batch
        step = timeit.repeat(lambda: run.trainer.step(batch), number=a.number, repeat=a.repeat)

        def epoch():
            run.step, run.batch = 1, 0
            with progress.EpochProgress(a.number, 0, 0, 1, enabled=False) as bar:
                run._epoch(iter(run.feeder.epoch(0, in_place=True)), bar, math.inf)

        loop = timeit.repeat(epoch, number=1, repeat=a.repeat)
    for name, times, per in (("Trainer.step (captured, replayed)", step, a.number),
                             ("fastgan train loop iteration", loop, a.number)):
        us = [t / per * 1e6 for t in times]
        print(f"{name}: min {min(us):.1f} us, median {statistics.median(us):.1f} us per step "
              f"({a.repeat} runs of {per} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
