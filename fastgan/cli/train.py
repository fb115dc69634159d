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

Ctrl-C or SIGTERM lets the running step finish, saves checkpoint.pt and exits (status 130 / 143); a
second Ctrl-C abandons the save and leaves the previous checkpoint whole.  --resume DIR (or --netG/--netD
with the train_state beside them) continues bit for bit as if the run had never stopped (on a GPU with
--deterministic, under the same --amp/--channels-last flags).  A run never
replaces checkpoints it did not write: not another run's, nor later ones of its own (--force does).
"""
import argparse
import collections
import contextlib
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

from ..nn import distributed, losses, presets
from ..nn.checkpoint import CHECKPOINT, TRAIN_STATE, find_state_dict, is_train_state, load_checkpoint
from ..nn.layers import fuse
from ..ops import backends
from ..usage import (UsageError, int_at_least_2, natural_float, natural_int, positive_float, positive_int, seed_int,
                     unit_float, width_int, writable_folder)
from . import checkpoints, data, progress
from .common import check_backend, read_checkpoint
from .sample import sample_noise, save_grid

CPU_BATCH, CPU_WIDTH_DIVISOR = 16, 4  # defaults without a GPU: batch 16, a quarter of the preset's widths
N_FIXED = 64  # images in each sample grid
SAVE_EVERY = 1000  # default --save-every: at most this many steps are lost to a crash or SIGKILL
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
    a("--deterministic", action="store_true",
      help="cuDNN's deterministic convolutions on a GPU, so that a resumed run matches an uninterrupted one bit "
           "for bit there too (fastgan's own kernels always are)")
    a("--preset", choices=presets.PRESETS, help="architecture and recipe (default: dcgan64, examples/dcgan's)")
    a("--loss", choices=("bce", "lsgan", "wgan-gp", "hinge"), help="default: the preset's")
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
    a("--dry-run", action="store_true", help="train one step to check that the setup works, and write nothing")
    a("--cuda", action="store_true", help="examples/dcgan's: train on the GPU (the default when there is one)")
    a("--ngpu", type=positive_int, help="examples/dcgan's: for several GPUs use torchrun --nproc-per-node N")
    a("--mps", action="store_true", help="examples/dcgan's Apple GPU flag: not supported, fastgan runs on CUDA and CPU")


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


class Trainer:
    """The GAN update of one batch: a D step on it, then, after every ``d_steps``-th batch, ``g_steps``
    G steps.  With d_steps = g_steps = 1 it is examples/dcgan's step: D on real and on G(z).detach(),
    then G through the same G(z).

    G and D are fused modules (DDP-wrapped when distributed).  During G steps, D's parameters are frozen
    (their gradients would be thrown away) and D runs unwrapped, outside DDP's gradient sync."""

    def __init__(self, G, D, settings, context=distributed.Context(), backend="auto", amp=None, gp_weight=10.0,
                 seed=0):
        self.s, self.context, self.backend, self.gp_weight, self.seed = settings, context, backend, gp_weight, seed
        self.g_module, self.d_module = G, D
        self.G, self.D = distributed.wrap(G, context), distributed.wrap(D, context)
        device = context.device
        adam = dict(lr=settings.lr, betas=(settings.beta1, settings.beta2), weight_decay=settings.weight_decay,
                    fused=device.type == "cuda" or None)
        self.opt_g = torch.optim.Adam(G.parameters(), **adam)
        self.opt_d = torch.optim.Adam(D.parameters(), **adam)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[amp]
        self.scaler_g = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.scaler_d = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.batches = 0
        self.generator = torch.Generator(device)

    def state_dict(self):
        return dict(opt_g=self.opt_g.state_dict(), opt_d=self.opt_d.state_dict(), batches=self.batches,
                    scaler_g=self.scaler_g.state_dict(), scaler_d=self.scaler_d.state_dict())

    def load_state_dict(self, state):
        """The saved optimizers and loss scalers.  The generator is not saved: every step reseeds it (a CUDA
        generator's state would not load on the CPU, nor the other way round).  A run resumed with other
        --amp/--channels-last flags starts fresh loss scales and keeps Adam's moments in the parameters' layout
        (CUDA's fused Adam requires it)."""
        for opt, saved in ((self.opt_g, state["opt_g"]), (self.opt_d, state["opt_d"])):
            opt.load_state_dict(saved)
            for group in opt.param_groups:
                for p in group["params"]:
                    moments = opt.state.get(p, {})
                    for key, value in moments.items():
                        if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                            moments[key] = torch.empty_like(p).copy_(value)
        for scaler, saved in ((self.scaler_g, state["scaler_g"]), (self.scaler_d, state["scaler_d"])):
            if saved:  # {} from a run without fp16 loss scaling
                scaler.load_state_dict(saved)
        self.batches = state["batches"]

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.context.device.type, dtype=self.amp_dtype)

    def noise(self, n):
        return sample_noise(n, self.s.nz, self.s.noise, self.context.device, self.generator)

    def d_loss(self, real_out, fake_out, real, fake):
        s = self.s
        if s.loss == "bce":
            return losses.discriminator_loss(real_out, fake_out, s.label_smoothing, self.backend)
        if s.loss == "lsgan":
            return losses.lsgan_discriminator_loss(real_out, fake_out, s.label_smoothing)
        if s.loss == "hinge":
            return losses.hinge_discriminator_loss(real_out, fake_out)
        alpha = torch.rand(real.shape[0], generator=self.generator, device=real.device)
        return losses.wasserstein_discriminator_loss(real_out, fake_out) + losses.gradient_penalty(
            self.d_module, real, fake, self.gp_weight, alpha)

    def g_loss(self, fake_out):
        if self.s.loss == "bce":
            return losses.generator_loss(fake_out, self.backend)
        if self.s.loss == "lsgan":
            return losses.lsgan_generator_loss(fake_out)
        return losses.wasserstein_generator_loss(fake_out)

    def _score(self, out):
        """D(x) as examples/dcgan prints it: the mean probability for bce, the mean raw output otherwise."""
        return (torch.sigmoid(out.float()) if self.s.loss == "bce" else out.float()).mean().detach()

    def _update(self, loss, opt, scaler):
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def step(self, real, noise=None):
        """Train on one batch; ``noise`` (N, nz) feeds D's fake batch and the first G step (default: drawn).

        Returns 0-dim tensors [loss_D, loss_G, D(x), D(G(z)) in the D step, D(G(z)) in the last G step],
        NaN for the G entries when no G step ran.  The random draws (z, the penalty's alpha) come from
        (seed, rank, batch number): different on every rank, and the same after a resume."""
        self.generator.manual_seed(((self.seed * 65_537 + self.context.rank) * 1_000_003 + self.batches) % 2**63)
        g_round = (self.batches + 1) % self.s.d_steps == 0
        self.batches += 1
        noise = self.noise(real.shape[0]) if noise is None else noise
        with self.autocast():
            real_out = self.D(real)
            with torch.set_grad_enabled(g_round):  # G's graph is kept only when a G step will use it
                fake = self.G(noise)
            fake_out = self.D(fake.detach())
            loss_d = self.d_loss(real_out, fake_out, real, fake)
        self._update(loss_d, self.opt_d, self.scaler_d)
        nan = torch.full((), float("nan"), device=real.device)
        loss_g = d_g_z2 = nan
        if g_round:
            frozen = [p for p in self.d_module.parameters() if p.requires_grad]
            for p in frozen:
                p.requires_grad_(False)
            try:
                for i in range(self.s.g_steps):
                    with self.autocast():
                        if i:
                            fake = self.G(self.noise(real.shape[0]))
                        fake_out_g = self.d_module(fake)
                        loss_g = self.g_loss(fake_out_g)
                    self._update(loss_g, self.opt_g, self.scaler_g)
            finally:
                for p in frozen:
                    p.requires_grad_(True)
            loss_g, d_g_z2 = loss_g.detach().float(), self._score(fake_out_g)
        return torch.stack([loss_d.detach().float(), loss_g, self._score(real_out), self._score(fake_out), d_g_z2])


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
    """One `fastgan train` invocation: settings, data, models, the loop, checkpoints."""

    def __init__(self, args, context):
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
        self.trainer = Trainer(G, D, self.s, context, args.backend, args.amp, self.gp_weight, seed)
        # after the models are on the device, so that a set kept on the GPU fits beside them
        self.feeder = data.Feeder(self.dataset.images, self.per_rank, device, seed, context.rank, context.world_size,
                                  failed=self.dataset.failed, memory_format=fmt)
        self.fixed_noise = sample_noise(N_FIXED, self.s.nz, self.s.noise, "cpu",
                                        torch.Generator().manual_seed(seed)).to(device)
        self.epoch, self.batch, self.step, self.history, self.failed = 0, 0, 0, [], set()
        if saved:
            self.trainer.load_state_dict(saved["trainer"])
            self.fixed_noise = saved["fixed_noise"].to(device)
            self.history, self.step = saved["history"], saved["step"]
            self.epoch, self.batch = saved["epoch"], saved["batch"]
            self.failed = set(saved.get("failed", ()))
            if "rng" in saved:
                torch.set_rng_state(saved["rng"]["torch"])
            if self.batch >= self.steps_per_epoch:
                self.epoch, self.batch = self.epoch + 1, 0
        self.pending, self.arriving, self.last = [], collections.deque(), [math.nan] * 5
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
                f"device {c.device}, backend {which}, seed {self.seed}, run {self.run_id}"
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
                    trainer=self.trainer.state_dict(), rng=dict(torch=torch.get_rng_state()),
                    failed=sorted(self.failed), data=self.data_record(),
                    precision=dict(amp=self.args.amp, channels_last=self.args.channels_last))

    def data_record(self):
        a = self.args
        return dict(dataset=a.dataset, dataroot=a.dataroot and os.path.abspath(a.dataroot), classes=a.classes,
                    builtin_images=a.builtin_images, builtin_seed=a.builtin_seed, size=len(self.dataset))

    def save(self, kind):
        """Save the position reached; returns the paths written.  kind: "interval" writes checkpoint.pt;
        "interrupt" also the loss curve; "epoch" and "final" first the epoch's set, then checkpoint.pt, the
        sample grid and the loss curve.  Rank 0 writes; every rank draws the grid (sync-bn is collective).
        A --dry-run writes nothing."""
        self.collect(wait=True)
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
                written = self._epoch(iter(self.feeder.epoch(self.epoch, self.batch)), bar, max_steps) or written
            if self.batch == self.steps_per_epoch:
                written = self.save("epoch")
                self.epoch, self.batch = self.epoch + 1, 0
        finished = self.epoch >= args.niter or self.step >= max_steps
        if finished and self.saved_step != self.step:
            written = self.save("final")
        return written, finished

    def _epoch(self, batches, bar, max_steps):
        args, c = self.args, self.context
        window_start, window_images, written = time.perf_counter(), 0, None
        while self.batch < self.steps_per_epoch and not self.should_stop():
            real, failed = next(batches, (None, None))
            if failed is None or self.should_stop():
                break
            self.failed.update(failed)
            if real is None:
                raise UsageError("every image of a batch failed to decode; check the files under "
                                 f"--dataroot {args.dataroot}")
            if self.step == 0 and c.main and not args.dry_run:
                save_grid(real[:N_FIXED], os.path.join(self.outf, "real_samples.png"))
            self.pending.append(self.trainer.step(real))
            self.step, self.batch = self.step + 1, self.batch + 1
            window_images += self.s.batch_size
            bar.update(1)
            if len(self.pending) >= args.log_every or self.batch == self.steps_per_epoch or self.step >= max_steps:
                last = self.collect(wait=self.step >= max_steps)
                bar.report(last, window_images / (time.perf_counter() - window_start))
                window_start, window_images = time.perf_counter(), 0
                if c.distributed:
                    self.vote_stop()
            if self.step >= max_steps:
                break
            if (args.save_every and self.step % args.save_every == 0 and self.batch < self.steps_per_epoch
                    and not self.should_stop()):
                written = self.save("interval")
        return written

    def vote_stop(self):
        """Distributed: the ranks agree at each log window whether one of them was signalled, so that all stop
        at the same step.  On GPUs the vote is read one window later, when it has long arrived: reading it at
        once would stall the step stream."""
        c = self.context
        flag = torch.full((1,), float(self.stopping is not None), device=c.device)
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
        history (all of them when ``wait``); returns the latest value of each statistic.

        Only ``wait`` waits for the device: between checkpoints a window's losses are read when the next window
        is logged, by then long computed, so the step stream never stalls on them."""
        if self.pending:
            rows = torch.stack(self.pending)
            host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=rows.is_cuda).copy_(rows, non_blocking=True)
            arrived = torch.cuda.Event() if rows.is_cuda else None
            if arrived is not None:
                arrived.record(torch.cuda.current_stream(rows.device))
            self.arriving.append((self.step - len(self.pending), host, arrived))
            self.pending = []
        while self.arriving and (wait or self.arriving[0][2] is None or self.arriving[0][2].query()):
            first, host, arrived = self.arriving.popleft()
            if arrived is not None:
                arrived.synchronize()
            rows = host.tolist()
            self.history += [[first + i, r[0], r[1]] for i, r in enumerate(rows)]
            for r in rows:
                self.last = [v if math.isfinite(v) else old for v, old in zip(r, self.last)]
        return self.last

    def failed_files(self):
        failed = self.failed
        if self.context.distributed:
            parts = [None] * self.context.world_size
            torch.distributed.all_gather_object(parts, failed)
            failed = set().union(*parts)
        return failed


def _side_file(path, role):
    """train_state_epoch_N.pt beside ``path`` when it is named {role}_epoch_N.pth, else None."""
    match = re.fullmatch(rf"{role}_epoch_(\d+)\.pth", os.path.basename(path))
    return match and os.path.join(os.path.dirname(path), f"train_state_epoch_{match.group(1)}.pt")


def _origin(record):
    if record is None:
        return "unreadable"
    return f"run {record.get('run_id', 'without an id')}, step {record.get('step')}"


def examples_dcgan_flags(args):
    """examples/dcgan's --cuda, --mps and --ngpu, in terms of --device and torchrun."""
    if args.mps:
        raise UsageError("--mps: fastgan's kernels run on CUDA GPUs and on the CPU, not on Apple's MPS; drop --mps "
                         "to train on the CPU")
    if args.cuda:
        if args.device and backends.parse_device(args.device).type != "cuda":
            raise UsageError(f"--cuda and --device {args.device} disagree; drop one of them")
        if not torch.cuda.is_available():
            raise UsageError("--cuda: no CUDA device is available here; drop --cuda to train on the CPU")
        args.device = args.device or "cuda"
    if args.ngpu and args.ngpu > 1:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            print(f"fastgan train: --ngpu {args.ngpu} is ignored under torchrun: each process trains on one GPU "
                  "and --nproc-per-node sets how many", flush=True)
        else:
            raise UsageError(f"--ngpu {args.ngpu}: fastgan trains on several GPUs with one process each: "
                             f"torchrun --nproc-per-node {args.ngpu} -m fastgan train ... (and drop --ngpu)")


def run(args):
    examples_dcgan_flags(args)
    if args.deterministic:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    context = distributed.setup(backends.parse_device(args.device))
    check_backend(args.backend, context.device)
    try:
        train = Run(args, context)
    except KeyboardInterrupt:  # while the image cache was being built: it said where it stopped
        raise SystemExit("fastgan train: interrupted before training started") from None
    try:
        return _run(args, context, train)
    finally:
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
    if args.dry_run:
        return _dry_run(train)
    blocked = checkpoints.blocking(train.outf, train.run_id if train.source else None, train.step, train.epoch,
                                   train.source.files if train.source else [])
    if blocked and not args.force:
        shown = ", ".join(blocked[:3]) + (f" and {len(blocked) - 3} more" if len(blocked) > 3 else "")
        raise UsageError(f"--outf {train.outf} holds checkpoints this run would replace: {shown}; continue the newest "
                         f"with --resume {train.outf}, write into another folder with --outf DIR, or pass --force "
                         "to replace them")
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
    failed = train.failed_files()
    if context.main:
        if failed:
            names = sorted(train.dataset.name(i) for i in failed)
            print(f"skipped {len(failed)} unreadable file(s), e.g. {names[0]}")
        print(f"done: {train.step} steps; wrote {', '.join(written)}")
    return 0
