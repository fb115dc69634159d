"""The GAN train step: one recipe, run eagerly (TrainStep) or as CUDA graphs (CapturedStep, fusion level L3).
fastgan.DCGAN.train_step, the benchmarks and `fastgan train` all run it.

    step = TrainStep(G, D, opt_g, opt_d, StepRecipe(loss="hinge"), latent=(100,))
    values = step(real)             # one step: a (5,) tensor, see VALUES
    graphed = CapturedStep(step)    # the same step as CUDA graphs (needs Adam(..., capturable=True))
    values = graphed(real)          # a static buffer the next call overwrites: copy what you keep

A step is the recipe's D update on one batch (D on real and on G(z).detach()) and, after every ``d_steps``-th
batch, ``g_steps`` G updates through D (D's parameters frozen meanwhile: their gradients, which the reference
computes and throws away, are not computed).  ``TrainStep.begin`` is the host's part of a step (reseeding the
draws, choosing the kind of step); ``TrainStep.run`` is the device work, which never waits for the device:
that is what a graph captures.

CapturedStep: the first ``warmup`` calls of each kind of step (D only, D and G) and input signature run
eagerly on a side stream (autotuning, optimizer state, workspaces), the next captures and replays.  The batch
is copied into a static buffer, or read inside the graph when ``real`` is a callable that gathers it from
static device tensors (fastgan.cli.feed's resident batches: no copy).  The noise is drawn inside the graph from
the step's generator, which ``begin`` reseeds before each replay: torch's replay reads a registered
generator's seed and offset on the host (CUDAGraph.register_generator_state), so the reseed takes effect and
a resumed run draws what the uninterrupted one drew.  A new shape, autocast or TF32 setting, train/eval mode,
fusion level or backend gets a graph of its own.  Between steps, leave the parameters' ``.grad`` alone: the
graphs own them.  What replaces the tensors a graph reads (``optimizer.load_state_dict``, ``gan.half()``,
``.to(memory_format=...)``, a new float ``lr``) is noticed at the next call, which drops the graphs and warms
up again; a tensor ``lr`` changes without that.  On CPU the same step runs eagerly on the static buffers.
"""
import contextlib
import dataclasses
import math
import operator
import warnings
from typing import NamedTuple, Optional

import torch

from ..kernels.outputs import accumulator_dtype
from ..ops import backends
from ..usage import UsageError
from . import losses
from .layers import FusedSequential

VALUES = ("loss_d", "loss_g", "d_x", "d_g_z1", "d_g_z2")
NOISES = ("normal", "uniform")


class StepResult(NamedTuple):
    """Losses and mean D outputs of one train step, as 0-dim tensors (read them with .item() when needed)."""
    loss_d: torch.Tensor
    loss_g: torch.Tensor
    d_x: torch.Tensor
    d_g_z1: torch.Tensor
    d_g_z2: torch.Tensor


@dataclasses.dataclass(frozen=True)
class StepRecipe:
    """What a step does.  loss: one of losses.LOSSES; label_smoothing: one-sided, real target 1 - s (bce,
    lsgan); d_steps: D updates, one batch each, per G round; g_steps: G updates per G round (the first through
    the D update's fakes, the others through fresh ones); gp_weight: wgan-gp's penalty weight; noise: z ~ N(0, 1)
    or U(-1, 1); amp: the autocast dtype of the forward passes (None: the caller's autocast state), float16
    with loss scaling."""
    loss: str = "bce"
    label_smoothing: float = 0.0
    d_steps: int = 1
    g_steps: int = 1
    gp_weight: float = 10.0
    noise: str = "normal"
    amp: Optional[torch.dtype] = None

    def __post_init__(self):
        if self.loss not in losses.LOSSES:
            raise UsageError(f"loss must be one of {', '.join(losses.LOSSES)}, got {self.loss!r}")
        if self.noise not in NOISES:
            raise UsageError(f"noise must be one of {', '.join(NOISES)}, got {self.noise!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UsageError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.label_smoothing and self.loss not in ("bce", "lsgan"):
            raise UsageError(f"label smoothing applies to the bce and lsgan losses, not {self.loss}")
        for name in ("d_steps", "g_steps"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) \
                    or getattr(self, name) < 1:
                raise UsageError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not self.gp_weight >= 0:
            raise UsageError(f"gp_weight must be >= 0, got {self.gp_weight}")
        if self.amp not in (None, torch.bfloat16, torch.float16):
            raise UsageError(f"amp must be None, torch.bfloat16 or torch.float16, got {self.amp}")


@contextlib.contextmanager
def _frozen(params):
    """``params`` without gradients for the span (restored however it ends)."""
    frozen = [p for p in params if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


class TrainStep:
    """The recipe applied to a G/D pair and their optimizers.  ``step(real, noise=None)`` trains on one batch
    and returns the (5,) VALUES: loss_D, loss_G, D(x), D(G(z)) in the D update, D(G(z)) in the last G update;
    D's outputs as probabilities for bce, raw otherwise; NaN for the G entries of a step without a G round;
    float32 (float64 for a float64 batch).

    generator: noise (N, *latent) -> images.  discriminator: the module opt_d updates.  critic: images -> (N,)
    raw outputs (logits for bce); default the discriminator itself (DCGAN's: its ``logits``).  wrapped: (G, D)
    to call in the D update instead, e.g. DistributedDataParallel wrappers; the G update and the gradient
    penalty call the critic unwrapped.  seed: z and the penalty's alpha come from a generator seeded from
    (seed, rank, batch number) at every step, so that a run resumed at batch ``batches`` draws what the
    uninterrupted one drew; None: from torch's default generator, unseeded.  backend: the fused BCE's.
    The recipe's float16 autocast brings a GradScaler per network (``scaler_g``, ``scaler_d``)."""

    def __init__(self, generator, discriminator, opt_g, opt_d, recipe=StepRecipe(), *, latent, critic=None,
                 wrapped=None, seed=None, rank=0, backend=None):
        param = next(iter(generator.parameters()), None)
        if param is None:
            raise UsageError("the generator has no parameters to train")
        self.generator, self.discriminator, self.opt_g, self.opt_d = generator, discriminator, opt_g, opt_d
        self.recipe, self.latent, self.backend = recipe, tuple(latent), backend
        self.critic = discriminator if critic is None else critic
        self.wrapped = wrapped is not None
        self.g_run, self.d_run = wrapped if wrapped is not None else (generator, self.critic)
        self.d_params = tuple(discriminator.parameters())
        self.device = param.device
        self.seed, self.rank = seed, rank
        self.rng = None if seed is None else torch.Generator(self.device)
        self.scaler_g, self.scaler_d = self._scalers()
        self.batches = 0  # steps taken: the next one's number
        self.captured = None  # its CapturedStep, once fastgan.nn.step.captured_step made one

    def _scalers(self):
        return [torch.amp.GradScaler(self.device.type, enabled=self.recipe.amp == torch.float16) for _ in "gd"]

    def state_dict(self):
        return dict(batches=self.batches, scaler_g=self.scaler_g.state_dict(), scaler_d=self.scaler_d.state_dict())

    def load_state_dict(self, state):
        """The batch count and the loss scales (in place: a captured graph reads them)."""
        self.batches = state["batches"]
        for scaler, saved in ((self.scaler_g, state["scaler_g"]), (self.scaler_d, state["scaler_d"])):
            if saved:  # {} from a run without fp16 loss scaling: fresh scales
                scaler.load_state_dict(saved)

    def reset_scalers(self):
        """Fresh GradScalers with the same scales: after a capture that failed half-way through a scaler step."""
        state = self.state_dict()
        self.scaler_g, self.scaler_d = self._scalers()
        self.load_state_dict(state)

    def __call__(self, real, noise=None):
        return self.advance(self.run, real, noise)

    def advance(self, run, real, noise=None):
        """One step through ``run(real, noise, g_round)``, this step's device work (``self.run``, or a graph's
        replay of it): the host's part first, then the batch count."""
        values = run(real, noise, self.begin())
        self.batches += 1
        return values

    def begin(self):
        """The host's part of the next step: reseed the draws from its number; whether it ends with G updates."""
        if self.rng is not None:
            self.rng.manual_seed(((self.seed * 65_537 + self.rank) * 1_000_003 + self.batches) % 2**63)
        return (self.batches + 1) % self.recipe.d_steps == 0

    def run(self, real, noise, g_round):
        """The device work of a step: what a CUDA graph captures (no host synchronisation, no reseeding).

        real: the batch, or a callable that makes it on the device; noise: (N, *latent), or None to draw it;
        g_round: whether the G updates follow the D update.  Returns the (5,) VALUES."""
        real = real if isinstance(real, torch.Tensor) else real()
        n = real.shape[0]
        if noise is None:
            noise = self.noise(n, real)
        with self.autocast():
            real_out = self.d_run(real)
            with torch.set_grad_enabled(g_round):  # G's graph is kept only when a G update will use it
                fake = self.g_run(noise)
            fake_out = self.d_run(fake.detach())
            loss_d = self.d_loss(real_out, fake_out, real, fake)
        self._update(loss_d, self.opt_d, self.scaler_d)
        loss_g = fake_out_g = None
        if g_round:
            with _frozen(self.d_params):
                for i in range(self.recipe.g_steps):
                    with self.autocast():
                        if i:
                            fake = self.g_run(self.noise(n, real))
                        fake_out_g = self.critic(fake)
                        loss_g = self.g_loss(fake_out_g)
                    self._update(loss_g, self.opt_g, self.scaler_g)
        with torch.no_grad():
            nan = torch.full((), math.nan, dtype=loss_d.dtype, device=loss_d.device)
            values = [loss_d, nan if loss_g is None else loss_g, self._score(real_out), self._score(fake_out),
                      nan if fake_out_g is None else self._score(fake_out_g)]
            return torch.stack([v.to(loss_d.dtype) for v in values])

    def autocast(self):
        if self.recipe.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.recipe.amp)

    def noise(self, n, like):
        """(n, *latent) latents in ``like``'s dtype on its device, from the step's generator."""
        options = dict(generator=self.rng, device=like.device, dtype=like.dtype)
        if self.recipe.noise == "uniform":
            return torch.rand((n, *self.latent), **options).mul_(2).sub_(1)
        return torch.randn((n, *self.latent), **options)

    def d_loss(self, real_out, fake_out, real, fake):
        r = self.recipe
        if r.loss == "bce":
            return losses.discriminator_loss(real_out, fake_out, r.label_smoothing, self.backend)
        if r.loss == "lsgan":
            return losses.lsgan_discriminator_loss(real_out, fake_out, r.label_smoothing)
        if r.loss == "hinge":
            return losses.hinge_discriminator_loss(real_out, fake_out)
        alpha = torch.rand(real.shape[0], generator=self.rng, device=real.device)
        return losses.wasserstein_discriminator_loss(real_out, fake_out) + losses.gradient_penalty(
            self.critic, real, fake, r.gp_weight, alpha)

    def g_loss(self, fake_out):
        if self.recipe.loss == "bce":
            return losses.generator_loss(fake_out, self.backend)
        if self.recipe.loss == "lsgan":
            return losses.lsgan_generator_loss(fake_out)
        return losses.wasserstein_generator_loss(fake_out)

    def _score(self, out):
        out = losses.widen(out)
        return (torch.sigmoid(out) if self.recipe.loss == "bce" else out).mean()

    @staticmethod
    def _update(loss, opt, scaler):
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def placement_problem(device, distributed=False):
    """Why a step on ``device`` (under DistributedDataParallel when ``distributed``) cannot run as CUDA graphs,
    or None."""
    if device.type != "cuda":
        return f"CUDA graphs run on a CUDA device, and this step's models are on {device}"
    if distributed:
        return ("DistributedDataParallel's all-reduce is captured by torch only with DDP built on a side stream "
                "and 11 eager warm-up steps; fastgan runs DDP steps eagerly")
    return None


def capture_problem(step):
    """Why ``step`` cannot run as CUDA graphs, in words, or None when it can."""
    problem = placement_problem(step.device, step.wrapped)
    if problem is not None:
        return problem
    if step.rng is not None and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        return (f"torch {torch.__version__} cannot reseed a generator between replays "
                "(no CUDAGraph.register_generator_state): update torch")
    for name, opt, scaler in (("opt_g", step.opt_g, step.scaler_g), ("opt_d", step.opt_d, step.scaler_d)):
        if not all(group.get("capturable", False) for group in opt.param_groups):
            return (f"{name} was built without capturable=True; build it as torch.optim.Adam(params, lr=2e-4, "
                    "betas=(0.5, 0.999), fused=True, capturable=True)")
        if scaler.is_enabled() and not getattr(opt, "_step_supports_amp_scaling", False):
            return (f"float16 loss scaling reads the scale on the host unless the optimizer takes it on the "
                    f"device: build {name} with fused=True")
    for net in (step.generator, step.discriminator):
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.momentum is None:
                return (f"{module} has momentum=None (a cumulative average read on the host each step); give "
                        "every BatchNorm a fixed momentum")
    return None


class _Entry:
    """One graph's static inputs and outputs: one kind of step (D only, D and G) and input signature."""

    def __init__(self, real, noise, g_round, device):
        tensor = isinstance(real, torch.Tensor)
        self.real = torch.empty_like(real) if tensor else None  # copied into; None: ``source`` gathers it
        self.source = None if tensor else real
        self.noise = None if noise is None else torch.empty_like(noise)  # None: drawn inside the step
        self.g_round = g_round
        self.results = torch.empty(len(VALUES), device=device,
                                   dtype=accumulator_dtype(real.dtype) if tensor else torch.float32)
        self.graph = None
        self.eager_steps = 0


_DATA_PTR = torch.Tensor.data_ptr
_TRAINING = operator.attrgetter("training")
_FUSION = operator.attrgetter("level", "backend")


class CapturedStep:
    """A TrainStep as CUDA graphs.  ``step(real, noise=None)`` -> the (5,) VALUES in a static device buffer
    that the next call overwrites (see the module).  ``on_failure(exc)``: called when a capture fails; it may
    raise, else the TrainStep runs eagerly from this step on.  Without it the error propagates.

    ``guard``: check at every call what the graphs bake in or read beyond their static buffers (modes, fusion
    levels, backends, autocast, TF32 and cuDNN settings; parameter storages, optimizer states, float learning
    rates), some 20-40 us of Python a step.  A caller that changes none of it between calls (fastgan train)
    passes False, and calls ``reset()`` if it ever does."""

    def __init__(self, step, warmup=3, on_failure=None, guard=True):
        if not isinstance(step, TrainStep):
            raise TypeError(f"CapturedStep takes a fastgan.nn.step.TrainStep, got {type(step).__name__} (for a "
                            "DCGAN: gan.train_step(..., cuda_graph=True), or CapturedStep(gan.step_for(opt_g, opt_d)))")
        if warmup < 1:
            raise UsageError(f"warmup must be at least 1 eager step before the capture, got {warmup}")
        self.step, self.warmup, self.on_failure, self.guard = step, warmup, on_failure, guard
        self.captures = step.device.type == "cuda"  # False: eagerly, on the static buffers
        self.eager = False  # after a failed capture: the TrainStep as it is
        nets = (step.generator, step.discriminator)
        self._params = tuple(p for net in nets for p in net.parameters())
        self._modules = tuple(m for net in nets for m in net.modules())
        self._fused = tuple(m for m in self._modules if isinstance(m, FusedSequential))
        self._entries = {}
        self._read = None  # what the graphs read: see _reads_the_same

    def __call__(self, real, noise=None):
        return self.step.advance(self._run, real, noise)

    def _run(self, real, noise, g_round):
        if self.eager:
            return self.step.run(real, noise, g_round)
        if self.guard and not self._reads_the_same():
            self.reset()
        key = self._key(real, noise, g_round)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = self._entry(real, noise, g_round)
        if entry.real is not None:
            entry.real.copy_(real)
        if noise is not None:
            entry.noise.copy_(noise)
        if entry.graph is not None:
            entry.graph.replay()
        elif not self.captures:
            self._body(entry)
        elif entry.eager_steps < self.warmup:
            self._warm_up(entry)
            entry.eager_steps += 1
        else:
            try:
                entry.graph = self._capture(entry)
            except Exception as exc:  # noqa: BLE001 - handed to on_failure, or raised again
                self._fall_back(exc)
                self.step.begin()  # this step's draws once more
                return self.step.run(real, noise, g_round)
            entry.graph.replay()  # the capture recorded the step without running it
        return entry.results

    def reset(self):
        """Drop the graphs: the next calls warm up and capture again."""
        self._entries = {}

    def _body(self, entry):
        entry.results.copy_(self.step.run(entry.real if entry.source is None else entry.source, entry.noise,
                                             entry.g_round))

    def _entry(self, real, noise, g_round):
        device = self.step.device
        if isinstance(real, torch.Tensor) and real.device != device:
            raise UsageError(f"the batch is on {real.device} but the models on {device}; move it with "
                             f"real.to('{device}')")
        if self.captures:
            problem = capture_problem(self.step)
            if problem is not None:
                raise UsageError(f"a CUDA-graph step: {problem}")
        return _Entry(real, noise, g_round, device)

    def _warm_up(self, entry):
        device = self.step.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.device(device), torch.cuda.stream(side), warnings.catch_warnings():
            # capturable Adam warns when it steps uncaptured: these steps are the capture's warm-up
            warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
            self._body(entry)
        torch.cuda.current_stream(device).wait_stream(side)

    def _capture(self, entry):
        """The step recorded as a CUDA graph (not run).  thread_local: the Feeder's host threads may allocate
        pinned memory meanwhile."""
        graph = torch.cuda.CUDAGraph()
        if self.step.rng is not None:
            graph.register_generator_state(self.step.rng)
        with torch.cuda.device(self.step.device), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._body(entry)
        return graph

    def _fall_back(self, exc):
        """After a failed capture: the TrainStep runs eagerly from now on.  The capture ran nothing on the
        device (parameters, optimizer state and buffers are as before it); what it left on the host is undone:
        D's parameters train again (TrainStep.run's finally), the loss scalers start clean."""
        if self.on_failure is None:
            raise exc
        self.on_failure(exc)
        self.eager = True
        self.reset()
        self.step.reset_scalers()

    def _reads_the_same(self):
        """Whether the graphs' inputs besides the static buffers are the ones they were captured with (and
        remember the current ones): the parameters' storages, the optimizers' state objects (held, so that a
        new one is never taken for the old at a reused address) and learning rates (a float lr is a constant
        in the graph)."""
        step = self.step
        lrs = tuple(g["lr"].data_ptr() if torch.is_tensor(g["lr"]) else g["lr"]
                    for opt in (step.opt_g, step.opt_d) for g in opt.param_groups)
        read = (tuple(map(_DATA_PTR, self._params)), lrs), (step.opt_g.state, step.opt_d.state)
        old, self._read = self._read, read
        return old is not None and read[0] == old[0] and read[1][0] is old[1][0] and read[1][1] is old[1][1]

    def _key(self, real, noise, g_round):
        """What a captured graph bakes in: the kind of step, the inputs' shapes; guarded, also autocast, TF32,
        cuDNN's determinism, train/eval modes, fusion levels, backends."""
        if isinstance(real, torch.Tensor):
            batch = (real.shape, real.dtype)
        elif callable(real):
            batch = real
        else:
            raise TypeError(f"real must be a torch.Tensor batch of images, or a callable that makes it on the "
                            f"device, got {type(real).__name__}")
        key = (g_round, batch, None if noise is None else (noise.shape, noise.dtype))
        if not self.guard:
            return key
        device = self.step.device.type
        return (*key, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device),
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.deterministic, tuple(map(_TRAINING, self._modules)),
                tuple(map(_FUSION, self._fused)), backends.forced())


def captured_step(step):
    """The CapturedStep of ``step`` (a TrainStep), made on first use and kept on it."""
    if step.captured is None:
        step.captured = CapturedStep(step)
    return step.captured
