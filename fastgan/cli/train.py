"""Train a DCGAN, or one of its classic variants (--preset), on fastgan's fused kernels with examples/dcgan's flags.

    python -m fastgan train --max-steps 300                 # builtin data; without a GPU, CPU-sized defaults
    python -m fastgan train --dataset folder --dataroot ~/celeba --amp bf16 --channels-last
    python -m fastgan train --resume out                    # continue the run in out/ exactly where it stopped
    torchrun --nproc-per-node 8 -m fastgan train --dataset folder --dataroot ~/celeba --sync-bn

Writes into --outf: real_samples.png; fake_samples_epoch_NNN.png from fixed noise after each epoch;
netG_epoch_N.pth / netD_epoch_N.pth, plain state_dicts that load into the preset's reference modules
(dcgan64's into examples/dcgan's models), with train_state_epoch_N.pt beside them (optimizers, position,
loss history, run id), at each epoch's end and at the end of the run; checkpoint.pt, the whole run state
in one file, at each of those and every --save-every steps; loss_curve.png.

On a GPU each train step runs as CUDA graphs (fastgan.nn.step.CapturedStep; --graph auto, the default) after 3
eager warm-up steps per kind of step, its batches gathered inside the graph when the data set fits on the GPU;
where a run cannot be captured (several processes) it says why in one line and trains eagerly.

Ctrl-C or SIGTERM lets the running step finish, saves checkpoint.pt and exits (status 130 / 143); a
second Ctrl-C abandons the save and leaves the previous checkpoint whole.  --resume DIR (or --netG/--netD
with the train_state beside them) continues bit for bit as if the run had never stopped (on a GPU with
--deterministic, under the same --amp/--channels-last flags).  A run never
replaces checkpoints it did not write: not another run's, nor later ones of its own (--force does).  It holds
a lock on --outf (fastgan.cli.lock) from before its first look at the folder to its exit: a second run into
the folder, resumed or not, is refused with one line.  A run whose losses (read every --log-every steps and
before each save) or weights (checked before each save) are not finite stops without saving, keeps the last
good checkpoint and exits with status 3 (DIVERGED_EXIT).
"""
import argparse
import collections
import dataclasses
import gc
import math
import os
import random
import re
import signal
import sys
import threading
import time
import uuid

import torch

from ..nn import distributed, fused_conv, presets
from ..nn.checkpoint import CHECKPOINT, TRAIN_STATE, find_state_dict, is_train_state, load_checkpoint, read_file
from ..nn.layers import fuse
from ..nn.losses import LOSSES
from ..nn.plan import LEVELS
from ..nn.step import VALUES, CapturedStep, StepRecipe, TrainStep, capture_problem, placement_problem
from ..ops import backends
from ..usage import (UsageError, int_at_least_2, natural_float, natural_int, one_line, positive_float, positive_int,
                     seed_int, unit_float, width_int, writable_folder)
from . import checkpoints, data, progress
from .common import check_backend, read_checkpoint
from .lock import FolderLock
from .sample import sample_noise, save_grid

CPU_BATCH, CPU_WIDTH_DIVISOR = 16, 4  # defaults without a GPU: batch 16, a quarter of the preset's widths
N_FIXED = 64  # images in each sample grid
DIVERGED_EXIT = 3  # the exit status of a run whose losses or weights went non-finite
SAVE_EVERY = 1000  # default --save-every: at most this many steps are lost to a crash or SIGKILL
GRAPH_MODES = ("auto", "on", "off")
WINDOW_ROWS = 4096  # step values kept on the device between reads; a longer --log-every reads them in parts
D_ONLY_VALUES = [VALUES.index(v) for v in ("loss_d", "d_x", "d_g_z1")]  # what a step without G updates computes
DATA_DEFAULTS = dict(dataset="builtin", dataroot=None, classes=None, builtin_images=4096,
                     builtin_seed=0)  # resuming: the run's


def add_arguments(parser):
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    a = parser.add_argument
    a("--dataset", choices=(*data.DATASETS, *data.FOLDER_ALIASES),
      help="builtin: generated, no download (default); fake: random images; folder (imagenet, lfw): any image "
           "tree; mnist: idx or npz files; cifar10: its python batches; lsun: its LMDB folders (resuming: the run's)")
    a("--dataroot", help="the folder (or mnist file) of the data; files are decoded once into a cache "
                         "(FASTGAN_CACHE_DIR, default ~/.cache/fastgan/data)")
    a("--classes", help="lsun: the categories, comma separated (default: bedroom)")
    a("--workers", type=natural_int,
      help="processes that decode the images into the cache on its first use (default: one per core; 0 and 1: "
           "one)")
    a("--batchSize", type=int_at_least_2, help=f"total over all processes (default: 64; {CPU_BATCH} without a GPU)")
    a("--imageSize", type=positive_int, help="must match the preset (default: the preset's)")
    a("--nz", type=width_int, help="latent size (default: the preset's, 100)")
    a("--ngf", type=width_int, help=f"G width (default: the preset's; divided by {CPU_WIDTH_DIVISOR} without a GPU)")
    a("--ndf", type=width_int, help=f"D width (default: the preset's; divided by {CPU_WIDTH_DIVISOR} without a GPU)")
    a("--niter", type=natural_int, default=25, help="epochs")
    a("--max-steps", type=natural_int, help="stop after this many batches in all (resumed ones included)")
    a("--lr", type=positive_float, help="Adam learning rate (default: the recipe's, 2e-4; 1e-4 for wgan-gp)")
    a("--beta1", type=unit_float, help="Adam beta1 (default: the recipe's, 0.5; 0 for wgan-gp)")
    a("--beta2", type=unit_float, help="Adam beta2 (default: 0.999; 0.9 for wgan-gp)")
    a("--outf", help="folder for images and checkpoints (default: the folder resumed from, else out)")
    a("--resume", metavar="DIR|FILE",
      help="continue a run: the newest whole checkpoint in DIR, or a checkpoint.pt / train_state_epoch_N.pt")
    a("--save-every", type=natural_int, default=SAVE_EVERY,
      help=f"steps between checkpoint.pt saves, besides each epoch's end (default {SAVE_EVERY}; 0: epochs only)")
    a("--force", action="store_true",
      help="replace the checkpoints in --outf that are in the way (another run's, or later ones of this run)")
    a("--netG", help="generator weights to start from; with --netD and the train_state beside them, resumes")
    a("--netD", help="discriminator weights to start from")
    a("--manualSeed", type=seed_int, help="default: random (printed)")
    a("--device", help="default: cuda if available, else cpu (under torchrun: cuda:LOCAL_RANK)")
    a("--backend", default="auto", choices=backends.BACKENDS,
      help="fused kernels: auto = on CUDA the C++/CUDA extension, else triton, else torch; torch on CPU")
    a("--amp", choices=("bf16", "fp16"), help="autocast dtype (fp32 master weights)")
    a("--channels-last", action="store_true", help="NHWC activations and weights")
    a("--graph", choices=GRAPH_MODES, default="auto",
      help="each train step as CUDA graphs, after 3 eager warm-up steps per kind of step: auto (default) where the "
           "run allows it (one process on a GPU), saying why not; on: refuse a run that cannot be captured; off")
    a("--level", choices=LEVELS, default="L1",
      help="fusion level: L1 (default) cuDNN's convolutions, everything around them fused; L2 fastgan's Triton "
           "convolution chains (needs --backend triton)")
    a("--deterministic", action="store_true",
      help="cuDNN's deterministic convolutions on a GPU, so that a resumed run matches an uninterrupted one bit "
           "for bit there too (fastgan's own kernels always are)")
    a("--preset", choices=presets.PRESETS, help="architecture and recipe (default: dcgan64, examples/dcgan's)")
    a("--loss", choices=LOSSES, help="default: the preset's")
    a("--label-smoothing", type=unit_float, help="one-sided: real target 1 - s (bce, lsgan)")
    a("--d-steps", type=positive_int, help="D updates, one batch each, per G round (default: the preset's; 5 for "
      "wgan-gp)")
    a("--g-steps", type=positive_int, help="G updates per G round (default: the preset's; avatar48 uses 2)")
    a("--noise", choices=("normal", "uniform"), help="z ~ N(0, 1) or U(-1, 1) (default: the preset's)")
    a("--gp-weight", type=natural_float, help="wgan-gp penalty weight, >= 0 (default 10)")
    a("--sync-bn", action="store_true", help="under torchrun: BatchNorm statistics over the global batch")
    a("--builtin-images", type=positive_int, help="size of the builtin dataset (default 4096)")
    a("--builtin-seed", type=seed_int, help="seed of the builtin dataset (default 0)")
    a("--log-every", type=positive_int, default=10,
      help="batches between progress updates (a line each when stdout is not a terminal); the only reads of "
           "the losses from the GPU")
    a("--dry-run", action="store_true",
      help="train one step to check that the setup works, and write nothing (refused where the real run would be: "
           "--outf in use, or holding checkpoints in the way)")
    a("--on-nan", type=on_nan, default="stop", metavar="stop",
      help="when a step's losses are not finite: stop without saving, keeping the last good checkpoint (exit "
           "status 3; the only choice: see docs/design.md)")
    a("--accel", action="store_true",
      help="examples/dcgan's: train on the accelerator if there is one (a CUDA GPU, the default anyway), else on the "
           "CPU")
    a("--cuda", action="store_true", help="examples/dcgan's: train on the GPU (the default when there is one)")
    a("--ngpu", type=positive_int, help="examples/dcgan's: for several GPUs use torchrun --nproc-per-node N")
    a("--mps", action="store_true", help="examples/dcgan's Apple GPU flag: not supported, fastgan runs on CUDA and CPU")


def on_nan(value):
    """--on-nan: "stop" only.  Skipping a non-finite step's update cannot be made exact without a sync per step:
    the D update lands before the G loss is known, and the poisoned forward has already moved the BatchNorm
    running statistics (see docs/design.md)."""
    if value == "stop":
        return value
    if value == "skip":
        raise argparse.ArgumentTypeError(
            "skip is not offered: dropping a non-finite step's update would mean copying D's weights, Adam's "
            "moments and the BatchNorm statistics every step; a run that goes non-finite stops and keeps its last "
            "good checkpoint (--on-nan stop, the default)")
    raise argparse.ArgumentTypeError(f"expected stop, got {value!r}")


@dataclasses.dataclass
class Settings:
    preset: str
    nz: int
    ngf: int
    ndf: int
    nc: int
    image_size: int
    batch_size: int
    loss: str
    lr: float
    beta1: float
    beta2: float
    weight_decay: float
    label_smoothing: float
    d_steps: int
    g_steps: int
    noise: str


def resolve_settings(args, context, saved=None):
    """Explicit flags first, then the resumed run's settings, then the preset's recipe.

    Without a GPU the batch and the widths default smaller (CPU_BATCH, widths / CPU_WIDTH_DIVISOR)."""
    saved = saved or {}
    preset = args.preset or saved.get("preset", "dcgan64")
    recipe = presets.recipe(preset)
    small = context.device.type != "cuda"

    def pick(flag, key, default):
        return flag if flag is not None else saved.get(key, default)

    loss = pick(args.loss, "loss", recipe.loss)
    wgan = loss == "wgan-gp" and recipe.loss != "wgan-gp"  # Gulrajani et al.'s Adam and 5 critic steps
    nc = 1 if args.dataset == "mnist" else recipe.nc
    s = Settings(
        preset=preset, nz=pick(args.nz, "nz", recipe.nz),
        ngf=pick(args.ngf, "ngf", max(1, recipe.ngf // CPU_WIDTH_DIVISOR) if small else recipe.ngf),
        ndf=pick(args.ndf, "ndf", max(1, recipe.ndf // CPU_WIDTH_DIVISOR) if small else recipe.ndf),
        nc=pick(None, "nc", nc), image_size=args.imageSize or recipe.image_size,
        batch_size=pick(args.batchSize, "batch_size", CPU_BATCH if small else 64), loss=loss,
        lr=pick(args.lr, "lr", 1e-4 if wgan else recipe.lr),
        beta1=pick(args.beta1, "beta1", 0.0 if wgan else recipe.betas[0]),
        beta2=pick(args.beta2, "beta2", 0.9 if wgan else recipe.betas[1]),
        weight_decay=pick(None, "weight_decay", recipe.weight_decay),
        label_smoothing=pick(args.label_smoothing, "label_smoothing", recipe.label_smoothing),
        d_steps=pick(args.d_steps, "d_steps", 5 if wgan else recipe.d_steps),
        g_steps=pick(args.g_steps, "g_steps", recipe.g_steps), noise=pick(args.noise, "noise", recipe.noise))
    if s.image_size != recipe.image_size:
        raise UsageError(f"preset {preset} makes {recipe.image_size}x{recipe.image_size} images, not "
                           f"--imageSize {s.image_size}; drop --imageSize or pick another --preset")
    if s.nc != nc:
        raise UsageError(f"the run being resumed has {s.nc} channel(s) but --dataset {args.dataset} gives {nc}")
    if s.batch_size % context.world_size or s.batch_size // context.world_size < 2:
        raise UsageError(f"--batchSize {s.batch_size} must split into {context.world_size} process batches "
                           "of 2 or more images (BatchNorm needs 2)")
    if args.gp_weight is not None and s.loss != "wgan-gp":
        raise UsageError(f"--gp-weight applies to --loss wgan-gp, not {s.loss}; drop it or add --loss wgan-gp")
    if args.dataroot and args.dataset == "builtin":
        raise UsageError(f"--dataroot {args.dataroot} is not read by --dataset builtin (the default); add "
                         "--dataset folder (or mnist) to train on it")
    if s.label_smoothing and s.loss not in ("bce", "lsgan"):
        raise UsageError(f"--label-smoothing applies to the bce and lsgan losses, not {s.loss}")
    if not 0 <= s.label_smoothing < 1:
        raise UsageError(f"--label-smoothing must be in [0, 1), got {s.label_smoothing}")
    if min(s.d_steps, s.g_steps) < 1:
        raise UsageError("--d-steps and --g-steps must be 1 or more")
    if args.sync_bn and context.distributed and s.loss == "wgan-gp":
        raise UsageError("--sync-bn cannot be combined with --loss wgan-gp: the gradient penalty needs a "
                           "double backward, which the synchronised BatchNorm does not have")
    return s


AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}


class Trainer:
    """A run's models, optimizers and train step: fastgan.nn.step's TrainStep with the run's recipe, as CUDA
    graphs where ``graph`` ("auto", "on", "off") asks for them and the step can be captured
    (fastgan.nn.step.capture_problem).  ``why_eager`` says why a step that could be captured runs eagerly
    (None when it is captured or --graph off); "on" refuses what "auto" would run eagerly, and a capture that
    fails at run time stops an "on" run with one line, where "auto" goes on eagerly from the same step.

    G and D are fused modules (DDP-wrapped when distributed; the G update and the gradient penalty run D
    unwrapped, its parameters frozen, outside DDP's gradient sync)."""

    def __init__(self, G, D, settings, context=distributed.Context(), backend="auto", amp=None, gp_weight=10.0,
                 seed=0, graph="off"):
        self.s, self.context, self.graph = settings, context, graph
        self.g_module, self.d_module = G, D
        wrapped = (distributed.wrap(G, context), distributed.wrap(D, context)) if context.distributed else None
        cuda = context.device.type == "cuda"
        # the run's Adam flags, kept over a resumed optimizer's: capturable only where a capture may follow
        self.adam_flags = dict(fused=cuda or None, capturable=cuda and graph != "off" and not context.distributed)
        adam = dict(lr=settings.lr, betas=(settings.beta1, settings.beta2), weight_decay=settings.weight_decay,
                    **self.adam_flags)
        self.opt_g = torch.optim.Adam(G.parameters(), **adam)
        self.opt_d = torch.optim.Adam(D.parameters(), **adam)
        recipe = StepRecipe(loss=settings.loss, label_smoothing=settings.label_smoothing, d_steps=settings.d_steps,
                            g_steps=settings.g_steps, gp_weight=gp_weight, noise=settings.noise, amp=AMP[amp])
        self.train_step = TrainStep(G, D, self.opt_g, self.opt_d, recipe, latent=(settings.nz,), wrapped=wrapped,
                                    seed=seed, rank=context.rank, backend=backend)
        self.why_eager = None if graph == "off" else capture_problem(self.train_step)
        if graph == "on" and self.why_eager:
            raise UsageError(f"--graph on: {self.why_eager}; drop --graph on to train with eager steps")
        self.captured = None
        if graph != "off" and self.why_eager is None:
            # unguarded: nothing the graphs bake in or read changes between a run's steps
            self.captured = CapturedStep(self.train_step, on_failure=self.capture_failed, guard=False)
        else:
            self._uncapturable()

    def step(self, real, noise=None):
        """Train on one batch: a tensor, or the Feeder's resident batch that gathers itself on the device.  Returns
        the step's (5,) values (fastgan.nn.step.VALUES); captured, in a static buffer that the next step
        overwrites."""
        return (self.captured or self.train_step)(real, noise)

    def capture_failed(self, exc):
        """CapturedStep's on_failure: one line; --graph on stops there, auto goes on eagerly from this step."""
        what = one_line(f"{type(exc).__name__}: {exc}")[:300]
        if self.graph == "on":
            raise UsageError(f"--graph on: capturing the train step as a CUDA graph failed ({what}); --graph auto "
                             "goes on with eager steps instead") from exc
        if self.context.main:
            print(f"fastgan train: --graph auto: capturing the train step as a CUDA graph failed ({what}); going on "
                  f"with eager steps from step {self.train_step.batches}", flush=True)
        self.captured = None
        self._uncapturable()

    def _uncapturable(self):
        """Eager steps: Adam without its capturable mode (which warns when it steps uncaptured)."""
        self.adam_flags["capturable"] = False
        for opt in (self.opt_g, self.opt_d):
            for group in opt.param_groups:
                group["capturable"] = False

    def state_dict(self):
        return dict(opt_g=self.opt_g.state_dict(), opt_d=self.opt_d.state_dict(), **self.train_step.state_dict())

    def load_state_dict(self, state):
        """The saved optimizers, batch count and loss scalers.  The step's generator is not saved: every step
        reseeds it.  The run's own Adam flags (fused, capturable) and hyper-parameters (--lr, --beta1, --beta2:
        the resumed run's unless given) replace the saved ones.  A run resumed with other
        --amp/--channels-last flags starts fresh loss scales and keeps Adam's moments in the parameters' layout
        (CUDA's fused Adam requires it)."""
        s = self.s
        for opt, saved in ((self.opt_g, state["opt_g"]), (self.opt_d, state["opt_d"])):
            opt.load_state_dict(saved)
            for group in opt.param_groups:
                group.update(self.adam_flags, lr=s.lr, betas=(s.beta1, s.beta2), weight_decay=s.weight_decay)
                for p in group["params"]:
                    moments = opt.state.get(p, {})
                    for key, value in moments.items():
                        if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                            moments[key] = torch.empty_like(p).copy_(value)
        self.train_step.load_state_dict(state)


def save_loss_curve(path, history):
    """Loss_D and Loss_G against the step, drawn with pillow.  history: rows (step, loss_d, loss_g)."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 720, 360, 64, 16, 28, 32
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    rows = [r for r in history if math.isfinite(r[1])]
    values = [v for r in rows for v in r[1:] if math.isfinite(v)]
    if not values:
        image.save(path)
        return
    values.sort()
    lo, hi = values[0], values[(len(values) - 1) * 99 // 100]  # the top 1% (loss spikes) is clipped
    hi = hi if hi > lo else lo + 1.0
    s0, s1 = rows[0][0], max(rows[-1][0], rows[0][0] + 1)

    def xy(step, value):
        return (left + (step - s0) / (s1 - s0) * (width - left - right),
                height - bottom - (min(value, hi) - lo) / (hi - lo) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(5):
        value = lo + (hi - lo) * i / 4
        y = xy(s0, value)[1]
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((4, y - 6), f"{value:.3g}", fill="black")
    draw.text((left, height - bottom + 6), f"step {s0}", fill="black")
    draw.text((width - right - 80, height - bottom + 6), f"step {s1}", fill="black")
    for column, (name, colour) in enumerate((("Loss_D", (31, 119, 180)), ("Loss_G", (214, 39, 40)))):
        points = [xy(r[0], r[1 + column]) for r in rows if math.isfinite(r[1 + column])]
        if len(points) > 1:
            draw.line(points, fill=colour, width=1)
        draw.text((left + 8 + 90 * column, 8), name, fill=colour)
    image.save(path)


class Run:
    """One `fastgan train` invocation: settings, data, models, the loop, checkpoints.

    ``lock``: hold the lock on --outf (fastgan.cli.lock) from here to ``release()``, taken on rank 0 before
    the data and the models are built, so that a second run is turned away at once; a --dry-run only checks
    that no run holds it."""

    def __init__(self, args, context, lock=False):
        self.args, self.context = args, context
        self.source = self._resume_source()  # a checkpoints.Source, or None for a fresh run
        saved = self.source.record if self.source else None
        for key, default in DATA_DEFAULTS.items():  # the data flags: given, else the resumed run's, else defaults
            if getattr(args, key) is None:
                setattr(args, key, (saved or {}).get("data", {}).get(key, default))
        self.s = resolve_settings(args, context, saved and saved["settings"])
        self.outf = args.outf or (os.path.dirname(self.source.files[-1]) or "." if self.source else "out")
        writable_folder(self.outf, "--outf", create=False)  # made when training starts
        seed = args.manualSeed if args.manualSeed is not None else (
            saved["seed"] if saved else random.randint(1, 10000))
        run_id = (saved or {}).get("run_id") or uuid.uuid4().hex[:12]
        if context.distributed:  # one seed for all: the data shards and the fixed noise depend on it
            shared = [seed, run_id]
            torch.distributed.broadcast_object_list(shared, src=0)
            seed, run_id = shared
        self.seed, self.run_id = seed, run_id
        self.lock = self._lock(probe=args.dry_run) if lock else None
        try:
            self._build(saved)
        except BaseException:
            self.release()
            raise

    def _lock(self, probe):
        """Rank 0 takes the lock on --outf (``probe``: checks that nobody holds it); every rank hears a refusal."""
        held, refused = None, None
        if self.context.main:
            try:
                if probe:
                    FolderLock.check(self.outf)
                else:
                    held = FolderLock.take(self.outf, self.run_id)
            except UsageError as exc:
                refused = str(exc)
        if self.context.distributed:
            shared = [refused]
            torch.distributed.broadcast_object_list(shared, src=0)
            refused = shared[0]
        if refused:
            raise UsageError(refused)
        return held

    def release(self):
        """Let another run write into --outf."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _build(self, saved):
        """The data, the models, the trainer and the position reached."""
        args, context, seed = self.args, self.context, self.seed
        torch.manual_seed(seed)
        self.dataset = data.make_dataset(args.dataset, args.dataroot, self.s.image_size, self.s.nc,
                                         args.builtin_images, args.builtin_seed, classes=args.classes,
                                         workers=args.workers and max(1, args.workers))
        precision = dict(amp=args.amp, channels_last=args.channels_last)
        if saved and saved.get("precision", precision) != precision and context.main:
            before = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in saved["precision"].items())
            print(f"fastgan train: note: the run being resumed trained with {before}: its steps from here on differ "
                  "from an uninterrupted run's", flush=True)
        trained_on = (saved or {}).get("data", {}).get("size", len(self.dataset))
        if trained_on != len(self.dataset) and context.main:
            print(f"fastgan train: note: the run being resumed trained on {trained_on} images, this data has "
                  f"{len(self.dataset)}: its epochs from here on differ from an uninterrupted run's", flush=True)
        self.per_rank = self.s.batch_size // context.world_size
        self.steps_per_epoch = len(self.dataset) // context.world_size // self.per_rank
        if self.steps_per_epoch == 0:
            raise UsageError(f"the dataset has {len(self.dataset)} images, fewer than one batch of "
                             f"{self.s.batch_size}; lower --batchSize")
        G, D, _ = presets.build(self.s.preset, self.s.nz, self.s.ngf, self.s.ndf, self.s.nc)
        self.weights_from = []
        for flag, model, role in (("--netG", G, "netG"), ("--netD", D, "netD")):
            if self.source:
                self._load_state(flag, self.source.label, getattr(self.source, role), model)
            elif getattr(args, role):
                self._load_weights(flag, getattr(args, role), model)
        device = context.device
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        G, D = fuse(G, args.backend).to(device, memory_format=fmt), fuse(D, args.backend).to(device,
                                                                                              memory_format=fmt)
        if args.sync_bn and context.distributed:
            distributed.sync_batchnorm(G)
            distributed.sync_batchnorm(D)
        fused_conv.set_level(G, args.level)
        fused_conv.set_level(D, args.level)
        self.trainer = Trainer(G, D, self.s, context, args.backend, args.amp, self.gp_weight, seed, args.graph)
        if self.trainer.why_eager and device.type == "cuda" and context.main:
            print(f"fastgan train: --graph auto: eager steps: {self.trainer.why_eager}", flush=True)
        # after the models are on the device, so that a set kept on the GPU fits beside them
        self.feeder = data.Feeder(self.dataset.images, self.per_rank, device, seed, context.rank, context.world_size,
                                  memory_format=fmt)
        self.fixed_noise = sample_noise(N_FIXED, self.s.nz, self.s.noise, "cpu",
                                        torch.Generator().manual_seed(seed)).to(device)
        self.epoch, self.batch, self.step, self.history = 0, 0, 0, []
        if saved:
            self.trainer.load_state_dict(saved["trainer"])
            self.fixed_noise = saved["fixed_noise"].to(device)
            self.history, self.step = saved["history"], saved["step"]
            self.epoch, self.batch = saved["epoch"], saved["batch"]
            if "rng" in saved:
                torch.set_rng_state(saved["rng"]["torch"])
            if self.batch >= self.steps_per_epoch:
                self.epoch, self.batch = self.epoch + 1, 0
        # the values of the steps not yet sent to the host, one row a step, written without allocating
        self.window = torch.empty(min(args.log_every, WINDOW_ROWS), len(VALUES), device=device)
        self.rows, self.pending = self.window.unbind(0), 0
        self.arriving, self.last = collections.deque(), [math.nan] * len(VALUES)
        self.nonfinite = None  # (step index, values) of the first step read back with values that are not finite
        self.max_steps = self.step + 1 if args.dry_run else (math.inf if args.max_steps is None else args.max_steps)
        self.saved_step = self.step if saved else None  # the step of the newest checkpoint of this run
        self.stopping = None  # the signal that asked the run to stop
        self.agreed_stop = False  # distributed: every rank stops at the same step
        self.vote = None  # distributed on GPUs: the last window's stop vote, on its way to the host

    @property
    def gp_weight(self):
        return 10.0 if self.args.gp_weight is None else self.args.gp_weight

    # ------------------------------------------------------------------ where the run starts from

    def _resume_source(self):
        """The checkpoint to continue (--resume, or --netG/--netD with a train_state beside them), or None."""
        a = self.args
        if a.resume:
            if a.netG or a.netD:
                raise UsageError("--resume takes G and D from the checkpoint: drop --netG/--netD, or drop --resume "
                                 "to start from those weights with fresh optimizers")
            return self._resume_path(a.resume)
        for flag in ("--netG", "--netD"):
            path = getattr(a, flag[2:])
            if path:
                record = checkpoints.peek(path) if os.path.isfile(path) else None
                if record is not None and record.get("format") == CHECKPOINT:
                    raise UsageError(f"{flag} {path} is a whole fastgan checkpoint: continue its run with --resume "
                                     f"{path}")
        if not (a.netG and a.netD):
            return None
        return self._pair_source(a.netG, a.netD)

    @staticmethod
    def _resume_path(path):
        if os.path.isdir(path):
            source = checkpoints.newest(path)
            if source is None:
                raise UsageError(f"--resume {path} holds no whole fastgan checkpoint (checkpoint.pt, or a "
                                 "train_state_epoch_N.pt with its netG/netD files); give the folder a run wrote "
                                 "into, or start a new run without --resume")
            return source
        if not os.path.exists(path):
            raise UsageError(f"--resume {path} does not exist; give the run's folder (its --outf) or a checkpoint")
        record = checkpoints.peek(path)
        if record is not None and record.get("format") == CHECKPOINT:
            return checkpoints.read_checkpoint_file(path)
        if is_train_state(record):
            return checkpoints.read_epoch_set(path)
        if record is None and os.path.isfile(path):  # a damaged checkpoint (or not one at all)
            try:
                read_file(path, f"--resume {path}")
            except UsageError as exc:
                damage = str(exc)
            else:
                damage = f"--resume {path} is not a fastgan checkpoint"
            folder = os.path.dirname(path) or "."
            if checkpoints.resumable(folder):
                raise UsageError(f"{damage}; --resume {folder} continues from the newest whole checkpoint there "
                                 "(the epoch sets included)")
            raise UsageError(f"{damage}, and {folder} holds no other whole checkpoint to continue; start a new run "
                             "with --outf DIR")
        raise UsageError(f"--resume {path} is not a fastgan checkpoint (checkpoint.pt or train_state_epoch_N.pt); "
                         "to start from a generator's or discriminator's weights use --netG/--netD")

    def _pair_source(self, netG, netD):
        """The epoch set of --netG and --netD, when a train_state lies beside them: both files must be the
        ones it was saved with.  None when neither has one (then the weights are a starting point)."""
        sides = {flag: _side_file(path, role) for flag, path, role in (("--netG", netG, "netG"),
                                                                          ("--netD", netD, "netD"))}
        records = {flag: checkpoints.peek(side) for flag, side in sides.items() if side and os.path.isfile(side)}
        if not records:
            return None
        flag, record = next(iter(records.items()))
        side = sides[flag]
        if record is None:
            raise UsageError(f"cannot read {side}, the train_state beside {flag}; delete it to start the epochs "
                             "over with these weights")
        pair = ("pass a netG/netD pair saved together, or continue the newest with --resume "
                f"{os.path.dirname(side) or '.'}")
        other = records.get("--netD" if flag == "--netG" else "--netG")
        if other is not None and sides["--netG"] != sides["--netD"] and _origin(other) != _origin(record):
            raise UsageError(f"--netG {netG} and --netD {netD} come from different checkpoints ("
                             f"{_origin(records['--netG'])} vs {_origin(records['--netD'])}); {pair}")
        for role, path in (("netG", netG), ("netD", netD)):
            expected = record.get("files", {}).get(role, {}).get("sha256")
            if expected is not None and checkpoints.file_sha256(path) != expected:
                raise UsageError(f"--{role} {path} is not the file {side} ({_origin(record)}) was saved with (a "
                                 f"file from another run or step, or replaced since); {pair}")
        return checkpoints.read_epoch_set(side, netG=netG, netD=netD)

    def _load_state(self, flag, where, state, model):
        try:
            load_checkpoint(model, state)
        except ValueError as exc:
            raise UsageError(f"{flag} {where} does not fit preset {self.s.preset} with nz={self.s.nz} "
                             f"ngf={self.s.ngf} ndf={self.s.ndf} nc={self.s.nc}: {exc}") from None

    def _load_weights(self, flag, path, model):
        checkpoint = read_checkpoint(path, flag)
        try:
            state, key = find_state_dict(checkpoint, model)
        except UsageError as exc:
            raise UsageError(f"{flag} {path}: {exc}") from None
        if key is not None:
            self.weights_from.append(f"{flag}: the {key!r} entry of {path}")
        self._load_state(flag, path, state, model)

    # ------------------------------------------------------------------ reporting

    def describe(self):
        s, c, a = self.s, self.context, self.args
        which = backends.resolve(a.backend, c.device)
        small = c.device.type != "cuda" and not self.source and (
            a.batchSize is None or a.ngf is None or a.ndf is None)
        return (f"fastgan train: preset {s.preset} (nz {s.nz}, ngf {s.ngf}, ndf {s.ndf}), "
                f"{s.image_size}x{s.image_size}x{s.nc} {a.dataset} ({len(self.dataset)} images), batch {s.batch_size}"
                f"{f' over {c.world_size} processes' if c.distributed else ''}, loss {s.loss}, "
                f"Adam lr {s.lr:g} betas ({s.beta1:g}, {s.beta2:g}), D:G steps {s.d_steps}:{s.g_steps}, "
                f"device {c.device}, backend {which}{', level L2' if a.level == 'L2' else ''}"
                f"{', CUDA-graph steps' if self.trainer.captured else ''}, seed {self.seed}, run {self.run_id}"
                + (f"{', amp ' + a.amp if a.amp else ''}{', channels_last' if a.channels_last else ''}")
                + (" [no GPU: smaller defaults, set --batchSize/--ngf/--ndf to change them]" if small else "")
                + (f"; resuming {self.source.label} at epoch {self.epoch}, batch {self.batch}" if self.source else "")
                + (f"; {'; '.join(self.weights_from)}" if self.weights_from else "")
                + ("; starting from the given weights (no train_state beside --netG/--netD: epoch 0, fresh "
                   "optimizers)" if (a.netG or a.netD) and not self.source else ""))

    def newest_label(self):
        """How to name the newest whole checkpoint in --outf, for the messages of a run that stops."""
        try:
            newest = checkpoints.newest(self.outf)
        except (UsageError, OSError):
            newest = None
        return f"{newest.label}; continue with --resume {self.outf}" if newest else "none was saved"

    # ------------------------------------------------------------------ checkpoints

    def sample_grid(self):
        """G(fixed noise) with batch statistics, as examples/dcgan draws it; G's running stats stay untouched."""
        G = self.trainer.g_module
        buffers = [b.clone() for b in G.buffers()]
        with torch.no_grad():
            images = G(self.fixed_noise)
            for b, saved in zip(G.buffers(), buffers):
                b.copy_(saved)
        return images

    def record(self):
        """The run's state at this step boundary, all but the weights (see fastgan.cli.checkpoints)."""
        return dict(run_id=self.run_id, step=self.step, epoch=self.epoch, batch=self.batch,
                    complete=self.batch == self.steps_per_epoch, settings=dataclasses.asdict(self.s),
                    seed=self.seed, history=self.history, fixed_noise=self.fixed_noise.cpu(),
                    trainer=self.trainer.state_dict(), rng=dict(torch=torch.get_rng_state()), data=self.data_record(),
                    precision=dict(amp=self.args.amp, channels_last=self.args.channels_last))

    def data_record(self):
        a = self.args
        return dict(dataset=a.dataset, dataroot=a.dataroot and os.path.abspath(a.dataroot), classes=a.classes,
                    builtin_images=a.builtin_images, builtin_seed=a.builtin_seed, size=len(self.dataset))

    def save(self, kind):
        """Save the position reached; returns the paths written.  kind: "interval" writes checkpoint.pt;
        "interrupt" also the loss curve; "epoch" and "final" first the epoch's set, then checkpoint.pt, the
        sample grid and the loss curve.  Rank 0 writes; every rank draws the grid (sync-bn is collective).
        Nothing is written when the steps since the last read or the weights are not finite (Diverged), nor by a
        --dry-run."""
        self.collect(wait=True)
        self.check_finite()
        if self.args.dry_run:
            return []
        images = self.sample_grid() if kind in ("epoch", "final") else None
        if not self.context.main:
            self.saved_step = self.step
            return []
        record, written = self.record(), []
        g, d = self.trainer.g_module.state_dict(), self.trainer.d_module.state_dict()
        try:
            if kind in ("epoch", "final"):
                files = checkpoints.epoch_files(self.outf, self.epoch)
                blobs = {"netG": checkpoints.serialize(g), "netD": checkpoints.serialize(d)}
                manifest = {role: dict(name=os.path.basename(files[role]), sha256=checkpoints.sha256(blob))
                            for role, blob in blobs.items()}
                checkpoints.atomic_write(files["train_state"],
                                         checkpoints.serialize(dict(record, format=TRAIN_STATE, files=manifest)))
                for role, blob in blobs.items():
                    checkpoints.atomic_write(files[role], blob)
                written += [files["netG"], files["netD"], files["train_state"]]
            path = os.path.join(self.outf, checkpoints.CHECKPOINT_FILE)
            checkpoints.atomic_write(path, checkpoints.serialize(dict(record, format=CHECKPOINT, netG=g, netD=d)))
            written.append(path)
            self.saved_step = self.step
            if images is not None:
                written.append(os.path.join(self.outf, f"fake_samples_epoch_{self.epoch:03d}.png"))
                save_grid(images, written[-1])
            if kind != "interval":
                written.append(os.path.join(self.outf, "loss_curve.png"))
                save_loss_curve(written[-1], self.history)
        except OSError as exc:
            raise UsageError(f"could not save step {self.step} into {self.outf} ({exc.strerror or exc}); the newest "
                             f"whole checkpoint is {self.newest_label()}") from None
        return written

    # ------------------------------------------------------------------ the loop

    def on_signal(self, signum, frame):
        """SIGINT/SIGTERM: the first is acted on at the end of the running step; a second one abandons what runs."""
        if self.stopping is None:
            self.stopping = signum
            if self.context.main:
                print(f"\nfastgan train: {signal.Signals(signum).name}: stopping after this step, saving first "
                      "(press Ctrl-C again to abandon the save)", file=sys.stderr, flush=True)
            return
        raise KeyboardInterrupt

    def should_stop(self):
        return self.agreed_stop if self.context.distributed else self.stopping is not None

    def loop(self):
        """Epochs until --niter or --max-steps, or a signal; returns (the paths the last save wrote, whether the
        run reached its end).  The batches are the Feeder's from where the run stands; its shuffle draws from
        (seed, epoch) only, so a resumed run's RNG states are the uninterrupted run's."""
        args, c = self.args, self.context
        max_steps = self.max_steps
        written = []
        while self.epoch < args.niter and self.step < max_steps and not self.should_stop():
            with progress.EpochProgress(self.steps_per_epoch, self.batch, self.epoch, args.niter,
                                        enabled=c.main) as bar:
                batches = self.feeder.epoch(self.epoch, self.batch, in_place=self.trainer.captured is not None)
                written = self._epoch(iter(batches), bar, max_steps) or written
            if self.batch == self.steps_per_epoch:
                written = self.save("epoch")
                self.epoch, self.batch = self.epoch + 1, 0
        finished = self.epoch >= args.niter or self.step >= max_steps
        if finished and self.saved_step != self.step:
            written = self.save("final")
        return written, finished

    def _epoch(self, batches, bar, max_steps):
        """The steps of one epoch from where the run stands.  Each step's values go into a row of the device
        window; they are read on the host (collect) at each progress report and before each save."""
        args, c = self.args, self.context
        window_start, window_steps, written = time.perf_counter(), 0, None
        while self.batch < self.steps_per_epoch and not self.should_stop():
            real = next(batches, None)
            if real is None or self.should_stop():
                break
            if self.step == 0 and c.main and not args.dry_run:
                images = real if isinstance(real, torch.Tensor) else real()  # the Feeder's resident batch
                save_grid(images[:N_FIXED], os.path.join(self.outf, "real_samples.png"))
            self.rows[self.pending].copy_(self.trainer.step(real))
            self.pending += 1
            self.step, self.batch = self.step + 1, self.batch + 1
            window_steps += 1
            bar.update(1)
            if window_steps >= args.log_every or self.batch == self.steps_per_epoch or self.step >= max_steps:
                last = self.collect(wait=self.step >= max_steps)
                bar.report(last, window_steps * self.s.batch_size / (time.perf_counter() - window_start))
                window_start, window_steps = time.perf_counter(), 0
                if c.distributed:
                    self.vote_stop()
            elif self.pending == len(self.rows):
                self.collect(wait=False)
            if self.step >= max_steps:
                break
            if (args.save_every and self.step % args.save_every == 0 and self.batch < self.steps_per_epoch
                    and not self.should_stop()):
                written = self.save("interval")
        return written

    def vote_stop(self):
        """Distributed: the ranks agree at each log window whether one of them was signalled or read values
        that are not finite, so that all stop at the same step (and then at the save, for values that are not
        finite).  On GPUs the vote is read one window later, when it has long arrived: reading it at once would
        stall the step stream."""
        c = self.context
        flag = torch.full((1,), float(self.stopping is not None or self.nonfinite is not None), device=c.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if not flag.is_cuda:
            self.agreed_stop = bool(flag.item())
            return
        if self.vote is not None:
            host, arrived = self.vote
            arrived.synchronize()
            self.agreed_stop = bool(host.item())
        host = torch.empty(1, pin_memory=True).copy_(flag, non_blocking=True)
        arrived = torch.cuda.Event()
        arrived.record(torch.cuda.current_stream(c.device))
        self.vote = host, arrived

    def collect(self, wait):
        """Start copying the pending step results to the host, and move the copies that have arrived into the
        history (all of them when ``wait``); returns the latest value of each statistic.  Values that are not
        finite stop the run (Diverged; distributed: at the next save, which all ranks reach together).

        Only ``wait`` waits for the device: between checkpoints a window's losses are read when the next window
        is logged, by then long computed, so the step stream never stalls on them."""
        if self.pending:
            rows = self.window[:self.pending]
            host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=rows.is_cuda).copy_(rows, non_blocking=True)
            arrived = torch.cuda.Event() if rows.is_cuda else None
            if arrived is not None:
                arrived.record(torch.cuda.current_stream(rows.device))
            self.arriving.append((self.step - self.pending, host, arrived))
            self.pending = 0  # the window's rows are written again after the copy, in stream order
        while self.arriving and (wait or self.arriving[0][2] is None or self.arriving[0][2].query()):
            first, host, arrived = self.arriving.popleft()
            if arrived is not None:
                arrived.synchronize()
            rows = host.tolist()
            self.history += [[first + i, r[0], r[1]] for i, r in enumerate(rows)]
            for r in rows:
                self.last = [v if math.isfinite(v) else old for v, old in zip(r, self.last)]
            if self.nonfinite is None:
                self.nonfinite = self._first_nonfinite(first, rows)
        if self.nonfinite is not None and not self.context.distributed:
            raise self.diverged(*self.nonfinite)
        return self.last

    def _first_nonfinite(self, first, rows):
        """(step index, values) of the first of ``rows`` (steps ``first``, ``first`` + 1, ...) with a value that
        is not finite, or None.  A step without G updates has NaN G values by design (TrainStep.run)."""
        for index, values in enumerate(rows, start=first):
            computed = values if self._g_round(index) else [values[i] for i in D_ONLY_VALUES]
            if not all(map(math.isfinite, computed)):
                return index, values
        return None

    def _g_round(self, index):
        """Whether step ``index`` (0-based) ends with G updates: TrainStep.begin's rule."""
        return (index + 1) % self.s.d_steps == 0

    def check_finite(self):
        """Before a save: Diverged when a step read back or a weight or buffer of G or D is not finite (on any
        rank: distributed, the ranks agree here).  One read of the device, which a save waits for anyway."""
        nets = (("netG", self.trainer.g_module), ("netD", self.trainer.d_module))
        names, tensors = zip(*[(f"{net} {key}", t) for net, module in nets for key, t in module.state_dict().items()
                               if t.is_floating_point()])
        finite = torch.stack([torch.isfinite(t).all() for t in tensors])
        index = torch.arange(len(tensors), dtype=torch.float64, device=finite.device)
        step = math.inf if self.nonfinite is None else self.nonfinite[0]
        # the first tensor and the first step that are not finite (inf: none), over all ranks
        found = torch.stack([index.masked_fill(finite, math.inf).min(), torch.tensor(step, dtype=index.dtype,
                                                                                     device=index.device)])
        if self.context.distributed:
            torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MIN)
        weight, step = found.tolist()
        if step < math.inf:
            ours = self.nonfinite is not None and self.nonfinite[0] == step
            raise self.diverged(int(step), self.nonfinite[1] if ours else None)
        if weight < math.inf:
            raise Diverged(f"the weights after step {self.step} are not finite (first: {names[int(weight)]})"
                           f"{self._stopped()}")

    def diverged(self, index, values):
        """The Diverged error of step ``index`` (0-based) with ``values`` (None: read on another rank)."""
        shown = "" if values is None else f" (Loss_D {values[0]:.4g}" + (
            f", Loss_G {values[1]:.4g})" if self._g_round(index) else ")")
        return Diverged(f"the losses of step {index + 1} are not finite{shown}{self._stopped()}")

    def _stopped(self):
        """What a run that diverged did, and the way out."""
        try:
            newest = checkpoints.newest(self.outf, quiet=True)
        except (UsageError, OSError):
            newest = None
        kept = (f"the newest whole checkpoint, {newest.label}, is untouched: continue from it with --resume "
                f"{self.outf} and a lower --lr" if newest else
                "no checkpoint was saved before it: start again with a lower --lr")
        return f": stopped at step {self.step} without saving; {kept}"


class Diverged(Exception):
    """A run's losses or weights are not finite: it stops without saving (exit status DIVERGED_EXIT)."""


def _side_file(path, role):
    """train_state_epoch_N.pt beside ``path`` when it is named {role}_epoch_N.pth, else None."""
    match = re.fullmatch(rf"{role}_epoch_(\d+)\.pth", os.path.basename(path))
    return match and os.path.join(os.path.dirname(path), f"train_state_epoch_{match.group(1)}.pt")


def _origin(record):
    if record is None:
        return "unreadable"
    return f"run {record.get('run_id', 'without an id')}, step {record.get('step')}"


def examples_dcgan_flags(args):
    """examples/dcgan's --accel, --cuda, --mps and --ngpu, in terms of --device and torchrun.  --accel, as there:
    the accelerator if there is one, else the CPU; one fastgan does not run on (MPS, XPU) gives the CPU, saying
    so."""
    if args.mps:
        raise UsageError("--mps: fastgan's kernels run on CUDA GPUs and on the CPU, not on Apple's MPS; drop --mps "
                         "to train on the CPU")
    if args.cuda:
        if args.device and backends.parse_device(args.device).type != "cuda":
            raise UsageError(f"--cuda and --device {args.device} disagree; drop one of them")
        if not torch.cuda.is_available():
            raise UsageError("--cuda: no CUDA device is available here; drop --cuda to train on the CPU")
        args.device = args.device or "cuda"
    if args.accel and not args.cuda:
        if args.device and backends.parse_device(args.device).type != "cuda":
            raise UsageError(f"--accel and --device {args.device} disagree; drop one of them")
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        if accelerator is not None and accelerator.type == "cuda":
            args.device = args.device or "cuda"
        else:
            if int(os.environ.get("RANK", "0")) == 0:
                why = ("there is no accelerator here" if accelerator is None else
                       f"fastgan's kernels run on CUDA GPUs, not on this {accelerator.type} accelerator")
                print(f"fastgan train: --accel: {why}; training on the CPU", flush=True)
            args.device = "cpu"
    if args.ngpu and args.ngpu > 1:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            print(f"fastgan train: --ngpu {args.ngpu} is ignored under torchrun: each process trains on one GPU "
                  "and --nproc-per-node sets how many", flush=True)
        else:
            raise UsageError(f"--ngpu {args.ngpu}: fastgan trains on several GPUs with one process each: "
                             f"torchrun --nproc-per-node {args.ngpu} -m fastgan train ... (and drop --ngpu)")


def check_graph_and_level(args, context):
    """--graph on where the run cannot be captured, and --level L2 without the Triton backend, before any work."""
    problem = placement_problem(context.device, context.distributed)
    if args.graph == "on" and problem:
        raise UsageError(f"--graph on: {problem}; drop --graph on to train with eager steps")
    which = backends.resolve(args.backend, context.device)
    if args.level == "L2" and which != "triton":
        raise UsageError(f"--level L2 runs fastgan's Triton convolutions, and --backend {args.backend} is {which} "
                         "here; add --backend triton, or drop --level L2")


def run(args):
    examples_dcgan_flags(args)
    if args.deterministic:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    context = distributed.setup(backends.parse_device(args.device))
    check_backend(args.backend, context.device)
    check_graph_and_level(args, context)
    try:
        train = Run(args, context, lock=True)
    except KeyboardInterrupt:  # while the image cache was being built: it said where it stopped
        raise SystemExit("fastgan train: interrupted before training started") from None
    try:
        return _run(args, context, train)
    except Diverged as exc:
        if context.main:
            print(f"fastgan train: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(DIVERGED_EXIT) from None
    finally:
        train.release()
        if context.distributed:
            # The DDP models go first: freed after the group, their Reducer's last reference to the gloo group
            # joins its worker thread while that thread waits for the GIL (a shutdown hang on torch 2.8-2.11).
            del train
            gc.collect()
            torch.distributed.destroy_process_group()


def _dry_run(train):
    """--dry-run: one step, nothing written."""
    train.loop()
    if train.context.main:
        print(f"dry run: one step of {train.s.batch_size} images trained; nothing written")
    return 0


def _run(args, context, train):
    if context.main:
        print(train.describe(), flush=True)
        if args.sync_bn and not context.distributed:
            print("fastgan train: --sync-bn has no effect in a single process (run under torchrun)")
    if train.step >= train.max_steps or train.epoch >= args.niter:
        if context.main:
            print(f"nothing to do: the run is at step {train.step}, epoch {train.epoch} (raise --max-steps/--niter)")
        return 0
    blocked = checkpoints.blocking(train.outf, train.run_id if train.source else None, train.step, train.epoch,
                                   train.source.files if train.source else [])
    if blocked and not args.force:
        shown = ", ".join(blocked[:3]) + (f" and {len(blocked) - 3} more" if len(blocked) > 3 else "")
        resume = f"continue the newest with --resume {train.outf}, " if checkpoints.resumable(train.outf) else ""
        raise UsageError(f"--outf {train.outf} holds checkpoints this run would replace: {shown}; {resume}write into "
                         "another folder with --outf DIR, or pass --force to replace them")
    if args.dry_run:  # after the checks a real run makes: it is refused where this run would be
        return _dry_run(train)
    if context.main:
        writable_folder(train.outf, "--outf")
        if blocked:
            print(f"fastgan train: --force: may replace {len(blocked)} file(s) in {train.outf}", flush=True)
        checkpoints.remove_stale_temporaries(train.outf)
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, train.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        written, finished = train.loop()
        if not finished and train.saved_step != train.step:  # stopped by a signal
            written = train.save("interrupt")
    except KeyboardInterrupt:  # a second signal, or one before the handlers were in place
        if context.main:
            print(f"\nfastgan train: interrupted again at step {train.step}: stopped at once (a save under way was "
                  f"abandoned); the newest whole checkpoint is {train.newest_label()}", file=sys.stderr, flush=True)
        raise SystemExit(128 + (train.stopping or signal.SIGINT)) from None
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if not finished:
        signum = train.stopping or signal.SIGTERM  # a rank without the signal stops with the others
        if context.main:
            saved = f"saved {', '.join(written)}" if written else f"the newest checkpoint is {train.newest_label()}"
            print(f"\nfastgan train: stopped at step {train.step} ({signal.Signals(signum).name}): {saved}; "
                  f"continue with --resume {train.outf}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)
    if context.main:
        print(f"done: {train.step} steps; wrote {', '.join(written)}")
    return 0
