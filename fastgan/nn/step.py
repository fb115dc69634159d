"""Fusion level L3: the whole DCGAN train step (D on real, D on fake, G, both backwards, both Adam
updates) captured once as a CUDA graph and replayed, one launch per step.

    opt_g, opt_d = fastgan.reference.make_optimizers(gan.generator, gan.discriminator,
                                                     fused=True, capturable=True)
    result = gan.train_step(real, opt_g, opt_d, cuda_graph=True)    # or: step = CapturedStep(gan, opt_g, opt_d)

Each call is one training step with the semantics of :meth:`fastgan.DCGAN.train_step`.  The batch (and the
noise, when given) is copied into static buffers; without noise, N(0, 1) noise is drawn inside the graph.
The first ``warmup`` calls for an input shape run eagerly on a side stream (Triton autotuning, optimizer
state, cuBLAS workspaces), the next one captures and replays.  A new shape, autocast or TF32 setting,
train/eval mode or fusion level gets a graph of its own.  The
losses come back as device tensors copied out of the graph's buffer: reading them (``.item()``) is the
only synchronisation.  On CPU the same step runs eagerly on the static buffers.

Between steps, leave the parameters' ``.grad`` alone: the graph owns them.  What replaces the tensors a
graph reads (``optimizer.load_state_dict``, ``gan.half()``, ``.to(memory_format=...)``, a new float ``lr``,
another backend) is noticed at the next call, which drops the graphs and warms up again.  To change the
learning rate every step without that, give the optimizers a tensor ``lr``.
"""
import warnings
from typing import NamedTuple

import torch

from ..ops import backends
from ..usage import UsageError


class StepResult(NamedTuple):
    """Losses and mean D outputs of one train step, as 0-dim tensors (read them with .item() when needed)."""
    loss_d: torch.Tensor
    loss_g: torch.Tensor
    d_x: torch.Tensor
    d_g_z1: torch.Tensor
    d_g_z2: torch.Tensor


def _check_capturable(optimizer, name):
    for group in optimizer.param_groups:
        if not group.get("capturable", False):
            raise UsageError(f"cuda_graph=True needs {name} built with capturable=True, e.g. "
                             f"torch.optim.Adam(params, lr=2e-4, betas=(0.5, 0.999), fused=True, capturable=True)")


def _check_momentum(model):
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.momentum is None:
            raise UsageError(f"cuda_graph=True needs a fixed BatchNorm momentum; {module} has momentum=None "
                             "(a cumulative average read on the host each step)")


class _Replay:
    """The static buffers of one input shape and, on CUDA, the graph that reads and writes them."""

    def __init__(self, real, noise, nz):
        self.real = torch.empty_like(real)
        self.sample_noise = noise is None
        self.noise = torch.empty((real.shape[0], nz, 1, 1), device=real.device) if noise is None else \
            torch.empty_like(noise)
        # loss_d, loss_g, d_x, d_g_z1, d_g_z2 of the last step
        self.results = torch.empty(5, device=real.device,
                                   dtype=torch.float64 if real.dtype == torch.float64 else torch.float32)
        self.graph = None
        self.eager_steps = 0


class CapturedStep:
    """DCGAN.train_step as a CUDA graph.  ``step(real, noise=None) -> StepResult`` of 0-dim device tensors."""

    def __init__(self, gan, opt_g, opt_d, label_smoothing=0.0, warmup=3):
        if warmup < 1:
            raise UsageError(f"warmup must be at least 1 eager step before the capture, got {warmup}")
        self.gan, self.opt_g, self.opt_d = gan, opt_g, opt_d
        self.label_smoothing = label_smoothing
        self.warmup = warmup
        self._replays = {}
        self._read = None  # what the graphs read: see _reads_the_same

    def matches(self, opt_g, opt_d, label_smoothing):
        return self.opt_g is opt_g and self.opt_d is opt_d and self.label_smoothing == label_smoothing

    def __call__(self, real, noise=None):
        if not isinstance(real, torch.Tensor):
            raise TypeError(f"real must be a torch.Tensor batch of images, got {type(real).__name__}")
        if real.device.type == "cuda" and not self._reads_the_same():
            self._replays = {}
        replay = self._replays.get(key := self._key(real, noise))
        if replay is None:
            if real.device.type == "cuda":
                _check_capturable(self.opt_g, "opt_g")
                _check_capturable(self.opt_d, "opt_d")
                _check_momentum(self.gan)
            replay = self._replays[key] = _Replay(real, noise, self.gan.nz)
        replay.real.copy_(real)
        if noise is not None:
            replay.noise.copy_(noise)
        if real.device.type != "cuda":
            self._step(replay)
        else:
            with torch.cuda.device(real.device):  # the capture's stream and synchronisation: the batch's device
                self._cuda_step(replay)
        return StepResult(*replay.results.clone().unbind())

    def _cuda_step(self, replay):
        if replay.graph is not None:
            replay.graph.replay()
        elif replay.eager_steps < self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), warnings.catch_warnings():
                # capturable Adam warns when it steps uncaptured: these steps are the capture's warm-up
                warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
                self._step(replay)
            torch.cuda.current_stream().wait_stream(side)
            replay.eager_steps += 1
        else:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step(replay)
            replay.graph = graph
            graph.replay()  # the capture recorded the step without running it

    def _reads_the_same(self):
        """Whether the graphs' inputs besides the static buffers are the ones they were captured with (and
        remember the current ones): the parameters' storages, the optimizers' state objects (held, so that a
        new one is never taken for the old at a reused address) and learning rates (a float lr is a constant
        in the graph)."""
        lrs = tuple(g["lr"].data_ptr() if torch.is_tensor(g["lr"]) else g["lr"]
                    for opt in (self.opt_g, self.opt_d) for g in opt.param_groups)
        read = (tuple(p.data_ptr() for p in self.gan.parameters()), lrs), (self.opt_g.state, self.opt_d.state)
        same = self._read is not None and read[0] == self._read[0] and all(
            new is old for new, old in zip(read[1], self._read[1]))
        self._read = read
        return same

    def _key(self, real, noise):
        """What a captured graph bakes in: shapes, autocast, TF32, train/eval modes, fusion levels, backends."""
        device = real.device.type
        # through vars(): a missing attribute costs nn.Module.__getattr__ an exception, 4 us a module and step
        modes = tuple((state["training"], state.get("level"), state.get("backend"))
                      for state in map(vars, self.gan.modules()))
        return (tuple(real.shape), real.dtype, real.device, None if noise is None else (noise.shape, noise.dtype),
                torch.is_autocast_enabled(device), torch.get_autocast_dtype(device),
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, modes, backends.forced())

    def _step(self, replay):
        if replay.sample_noise:
            replay.noise.normal_()
        result = self.gan.train_step(replay.real, self.opt_g, self.opt_d, replay.noise, self.label_smoothing)
        replay.results.copy_(torch.stack([value.to(replay.results.dtype) for value in result]))


def captured_step(gan, opt_g, opt_d, label_smoothing=0.0):
    """The CapturedStep of ``gan`` for these optimizers, made on first use and kept on ``gan``."""
    step = gan.__dict__.get("_captured_step")
    if step is None or not step.matches(opt_g, opt_d, label_smoothing):
        step = CapturedStep(gan, opt_g, opt_d, label_smoothing)
        gan.__dict__["_captured_step"] = step
    return step
