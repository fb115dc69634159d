"""CapturedStep's capture path on the CPU, for tests: a "graph" that replays by running the step's device work
again on the static buffers, as a CUDA graph replays its kernels on theirs.

    captured = fake_capture(CapturedStep(step), monkeypatch)
    fake_capture_everywhere(monkeypatch)          # every CapturedStep made from here on (a CLI run's)

The warm-up, capture and replay decisions, the static buffers, the reseed before each replay and the fallback
after a failed capture are then the real ones; only what torch.cuda does below them is replaced."""
from fastgan.nn import step as step_module
from fastgan.nn.step import CapturedStep


class Replayer:
    """Stands for a torch.cuda.CUDAGraph: ``replay()`` runs what the capture would have recorded."""

    def __init__(self, run):
        self.run, self.replays = run, 0

    def replay(self):
        self.replays += 1
        self.run()


def _patch(monkeypatch, fail):
    def capture(self, entry):
        if fail is not None:
            raise fail
        return Replayer(lambda: self._body(entry))

    monkeypatch.setattr(step_module, "capture_problem", lambda step: None)  # the CPU would be one
    monkeypatch.setattr(CapturedStep, "_warm_up", CapturedStep._body)
    monkeypatch.setattr(CapturedStep, "_capture", capture)


def fake_capture(captured, monkeypatch, fail=None):
    """``captured`` taking its capture path on the CPU.  ``fail``: an exception the capture raises instead."""
    _patch(monkeypatch, fail)
    captured.captures = True
    return captured


def fake_capture_everywhere(monkeypatch, fail=None):
    """fake_capture for every CapturedStep made from here on."""
    _patch(monkeypatch, fail)
    init = CapturedStep.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.captures = True

    monkeypatch.setattr(CapturedStep, "__init__", __init__)
