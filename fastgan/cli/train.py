"""Train a DCGAN, or one of its classic variants (--preset), on fastgan's fused kernels with examples/dcgan's flags.

    python -m fastgan train --max-steps 300                 # builtin data; without a GPU, CPU-sized defaults
    python -m fastgan train --dataset folder --dataroot ~/celeba --amp bf16 --channels-last
    torchrun --nproc-per-node 8 -m fastgan train --dataset folder --dataroot ~/celeba --sync-bn

Writes into --outf: real_samples.png; fake_samples_epoch_NNN.png from fixed noise after each epoch;
netG_epoch_N.pth / netD_epoch_N.pth, plain state_dicts that load into the preset's reference modules
(dcgan64's into examples/dcgan's models); train_state_epoch_N.pt beside them (optimizers, position,
loss history), which --netG/--netD read to resume; loss_curve.png.  Ctrl-C saves before it exits.
"""
import argparse
import contextlib
import dataclasses
import gc
import math
import os
import random
import re
import sys
import time

import torch

from ..nn import distributed, losses, presets
from ..nn.checkpoint import load_checkpoint
from ..nn.layers import fuse
from ..ops import backends
from ..usage import UsageError
from . import data
from .sample import sample_noise, save_grid

CPU_BATCH, CPU_WIDTH_DIVISOR = 16, 4  # defaults without a GPU: batch 16, a quarter of the preset's widths
N_FIXED = 64  # images in each sample grid


def add_arguments(parser):
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    a = parser.add_argument
    a("--dataset", default="builtin", choices=(*data.DATASETS, *data.FOLDER_ALIASES),
      help="builtin: generated, no download (default); folder: any image tree; mnist: idx or npz files")
    a("--dataroot", help="the folder (or mnist file) for --dataset folder|mnist")
    a("--workers", type=int, help="data loader processes (default: up to 8 for folder; 0 for the in-memory sets)")
    a("--batchSize", type=int, help=f"total over all processes (default: 64; {CPU_BATCH} without a GPU)")
    a("--imageSize", type=int, help="must match the preset (default: the preset's)")
    a("--nz", type=int, help="latent size (default: the preset's, 100)")
    a("--ngf", type=int, help=f"G width (default: the preset's; divided by {CPU_WIDTH_DIVISOR} without a GPU)")
    a("--ndf", type=int, help=f"D width (default: the preset's; divided by {CPU_WIDTH_DIVISOR} without a GPU)")
    a("--niter", type=int, default=25, help="epochs")
    a("--max-steps", type=int, help="stop after this many batches in all (resumed ones included)")
    a("--lr", type=float, help="Adam learning rate (default: the recipe's, 2e-4; 1e-4 for wgan-gp)")
    a("--beta1", type=float, help="Adam beta1 (default: the recipe's, 0.5; 0 for wgan-gp)")
    a("--beta2", type=float, help="Adam beta2 (default: 0.999; 0.9 for wgan-gp)")
    a("--outf", default="out", help="folder for images and checkpoints")
    a("--netG", help="generator checkpoint to start from; with --netD, resumes that run")
    a("--netD", help="discriminator checkpoint to start from")
    a("--manualSeed", type=int, help="default: random (printed)")
    a("--device", help="default: cuda if available, else cpu (under torchrun: cuda:LOCAL_RANK)")
    a("--backend", default="auto", choices=backends.BACKENDS,
      help="fused kernels: auto = triton on CUDA, torch on CPU")
    a("--amp", choices=("bf16", "fp16"), help="autocast dtype (fp32 master weights)")
    a("--channels-last", action="store_true", help="NHWC activations and weights")
    a("--preset", choices=presets.PRESETS, help="architecture and recipe (default: dcgan64, examples/dcgan's)")
    a("--loss", choices=("bce", "lsgan", "wgan-gp", "hinge"), help="default: the preset's")
    a("--label-smoothing", type=float, help="one-sided: real target 1 - s (bce, lsgan)")
    a("--d-steps", type=int, help="D updates, one batch each, per G round (default: the preset's; 5 for wgan-gp)")
    a("--g-steps", type=int, help="G updates per G round (default: the preset's; avatar48 uses 2)")
    a("--noise", choices=("normal", "uniform"), help="z ~ N(0, 1) or U(-1, 1) (default: the preset's)")
    a("--gp-weight", type=float, default=10.0, help="wgan-gp penalty weight")
    a("--sync-bn", action="store_true", help="under torchrun: BatchNorm statistics over the global batch")
    a("--builtin-images", type=int, default=4096, help="size of the builtin dataset")
    a("--builtin-seed", type=int, default=0, help="seed of the builtin dataset")
    a("--log-every", type=int, default=10, help="batches between progress-bar updates")


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
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.scaler_g.load_state_dict(state["scaler_g"])
        self.scaler_d.load_state_dict(state["scaler_d"])
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


def _atomic_save(obj, path):
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
        self.resumed = self._read_resume_state()
        self.s = resolve_settings(args, context, self.resumed and self.resumed["settings"])
        seed = args.manualSeed if args.manualSeed is not None else (
            self.resumed["seed"] if self.resumed else random.randint(1, 10000))
        if context.distributed:  # one seed for all: the data shards and the fixed noise depend on it
            shared = [seed]
            torch.distributed.broadcast_object_list(shared, src=0)
            seed = shared[0]
        self.seed = seed
        torch.manual_seed(seed)
        folder = args.dataset in ("folder", *data.FOLDER_ALIASES)
        self.workers = args.workers if args.workers is not None else (min(8, os.cpu_count() or 1) if folder else 0)
        try:
            self.dataset = data.make_dataset(args.dataset, args.dataroot, self.s.image_size, self.s.nc,
                                             args.builtin_images, args.builtin_seed)
        except data.DataError as exc:
            raise UsageError(str(exc)) from None
        self.per_rank = self.s.batch_size // context.world_size
        self.steps_per_epoch = len(self.dataset) // context.world_size // self.per_rank
        if self.steps_per_epoch == 0:
            raise UsageError(f"the dataset has {len(self.dataset)} images, fewer than one batch of "
                               f"{self.s.batch_size}; lower --batchSize")
        G, D, _ = presets.build(self.s.preset, self.s.nz, self.s.ngf, self.s.ndf, self.s.nc)
        for flag, model in (("--netG", G), ("--netD", D)):
            path = getattr(args, flag[2:])
            if path:
                self._load_weights(flag, path, model)
        device = context.device
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        G, D = fuse(G, args.backend).to(device, memory_format=fmt), fuse(D, args.backend).to(device,
                                                                                              memory_format=fmt)
        if args.sync_bn and context.distributed:
            distributed.sync_batchnorm(G)
            distributed.sync_batchnorm(D)
        self.trainer = Trainer(G, D, self.s, context, args.backend, args.amp, args.gp_weight, seed)
        self.fixed_noise = sample_noise(N_FIXED, self.s.nz, self.s.noise, "cpu",
                                        torch.Generator().manual_seed(seed)).to(device)
        self.epoch, self.batch, self.step, self.history = 0, 0, 0, []
        if self.resumed:
            self.trainer.load_state_dict(self.resumed["trainer"])
            self.fixed_noise = self.resumed["fixed_noise"].to(device)
            self.history, self.step = self.resumed["history"], self.resumed["step"]
            self.epoch, self.batch = self.resumed["epoch"], self.resumed["batch"]
            if self.batch >= self.steps_per_epoch:
                self.epoch, self.batch = self.epoch + 1, 0
        self.failed, self.pending, self.last = set(), [], [math.nan] * 5

    def _read_resume_state(self):
        """The side file of the --netG/--netD checkpoints (both needed), or None."""
        args = self.args
        if not (args.netG and args.netD):
            return None
        match = re.fullmatch(r"netG_epoch_(\d+)\.pth", os.path.basename(args.netG))
        path = match and os.path.join(os.path.dirname(args.netG), f"train_state_epoch_{match.group(1)}.pt")
        if not path or not os.path.isfile(path):
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged side file: say which and why
            raise UsageError(f"cannot read {path} ({type(exc).__name__}: {exc}); delete it to start the "
                               "epochs over with these weights") from None

    def _load_weights(self, flag, path, model):
        if not os.path.isfile(path):
            raise UsageError(f"{flag} {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle, zip and torch errors alike: the file is not a checkpoint
            raise UsageError(f"{flag} {path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from None
        if not isinstance(state, dict):
            raise UsageError(f"{flag} {path} holds a {type(state).__name__}, not a state_dict")
        try:
            load_checkpoint(model, state)
        except ValueError as exc:
            raise UsageError(f"{flag} {path} does not fit preset {self.s.preset} with nz={self.s.nz} "
                               f"ngf={self.s.ngf} ndf={self.s.ndf} nc={self.s.nc}: {exc}") from None

    def describe(self):
        s, c, a = self.s, self.context, self.args
        which = backends.resolve(a.backend, c.device)
        small = c.device.type != "cuda" and not self.resumed and (
            a.batchSize is None or a.ngf is None or a.ndf is None)
        return (f"fastgan train: preset {s.preset} (nz {s.nz}, ngf {s.ngf}, ndf {s.ndf}), "
                f"{s.image_size}x{s.image_size}x{s.nc} {a.dataset} ({len(self.dataset)} images), batch {s.batch_size}"
                f"{f' over {c.world_size} processes' if c.distributed else ''}, loss {s.loss}, "
                f"Adam lr {s.lr:g} betas ({s.beta1:g}, {s.beta2:g}), D:G steps {s.d_steps}:{s.g_steps}, "
                f"device {c.device}, backend {which}, seed {self.seed}"
                + (f"{', amp ' + a.amp if a.amp else ''}{', channels_last' if a.channels_last else ''}")
                + (" [no GPU: smaller defaults, set --batchSize/--ngf/--ndf to change them]" if small else "")
                + (f"; resuming at epoch {self.epoch}, batch {self.batch}" if self.resumed else "")
                + ("; starting from the given weights (no train_state file beside --netG/--netD: epoch 0, "
                   "fresh optimizers)" if (a.netG or a.netD) and not self.resumed else ""))

    def sample_grid(self):
        """G(fixed noise) with batch statistics, as examples/dcgan draws it; G's running stats stay untouched."""
        G = self.trainer.g_module
        buffers = [b.clone() for b in G.buffers()]
        with torch.no_grad():
            images = G(self.fixed_noise)
            for b, saved in zip(G.buffers(), buffers):
                b.copy_(saved)
        return images

    def save(self, complete, with_grid=True):
        """Checkpoints of the position reached (rank 0 writes; every rank draws the grid: sync-bn is collective)."""
        images = self.sample_grid() if with_grid else None
        if not self.context.main:
            return []
        out, e = self.args.outf, self.epoch
        written = [os.path.join(out, f"netG_epoch_{e}.pth"), os.path.join(out, f"netD_epoch_{e}.pth")]
        _atomic_save(self.trainer.g_module.state_dict(), written[0])
        _atomic_save(self.trainer.d_module.state_dict(), written[1])
        _atomic_save(dict(settings=dataclasses.asdict(self.s), seed=self.seed, epoch=e,
                          batch=self.steps_per_epoch if complete else self.batch, step=self.step,
                          history=self.history, fixed_noise=self.fixed_noise.cpu(),
                          trainer=self.trainer.state_dict()), os.path.join(out, f"train_state_epoch_{e}.pt"))
        if images is not None:
            written.append(os.path.join(out, f"fake_samples_epoch_{e:03d}.png"))
            save_grid(images, written[-1])
        written.append(os.path.join(out, "loss_curve.png"))
        save_loss_curve(written[-1], self.history)
        return written

    def loop(self):
        """Epochs until --niter or --max-steps; returns the paths the last save wrote."""
        from tqdm import tqdm

        args, c = self.args, self.context
        max_steps = args.max_steps if args.max_steps is not None else math.inf
        written = []
        while self.epoch < args.niter and self.step < max_steps:
            loader = data.epoch_loader(self.dataset, self.per_rank, self.epoch, self.seed, c.rank, c.world_size,
                                       self.batch, self.workers, pin_memory=c.device.type == "cuda")
            with tqdm(total=self.steps_per_epoch, initial=self.batch, desc=f"epoch {self.epoch}/{args.niter}",
                      disable=not c.main, dynamic_ncols=True, file=sys.stdout) as bar:
                self._epoch(loader, bar, max_steps)
            complete = self.batch == self.steps_per_epoch
            written = self.save(complete)
            if complete:
                self.epoch, self.batch = self.epoch + 1, 0
        return written

    def _epoch(self, loader, bar, max_steps):
        args, c = self.args, self.context
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        window_start, window_images = time.perf_counter(), 0
        for real, failed in loader:
            self.failed.update(failed)
            if real is None:
                raise UsageError("every image of a batch failed to decode; check the files under "
                                   f"--dataroot {args.dataroot}")
            if self.step == 0 and c.main:
                save_grid(real[:N_FIXED], os.path.join(args.outf, "real_samples.png"))
            real = real.to(c.device, memory_format=fmt, non_blocking=True)
            self.pending.append(self.trainer.step(real))
            self.step, self.batch = self.step + 1, self.batch + 1
            window_images += self.s.batch_size
            bar.update(1)
            if len(self.pending) >= args.log_every or self.batch == self.steps_per_epoch or self.step >= max_steps:
                last = self.flush()
                rate = window_images / (time.perf_counter() - window_start)
                v = [f"{x:.3f}" if math.isfinite(x) else "-" for x in last]  # "-": no G step yet
                bar.set_postfix(dict(Loss_D=v[0], Loss_G=v[1], D_x=v[2], D_G_z=f"{v[3]}/{v[4]}", img_s=f"{rate:.0f}"),
                                refresh=False)
                window_start, window_images = time.perf_counter(), 0
            if self.step >= max_steps:
                break

    def flush(self):
        """Move the pending step results into the history; returns the latest value of each statistic."""
        if self.pending:
            rows = torch.stack(self.pending).cpu().tolist()
            first = self.step - len(rows)
            self.history += [[first + i, r[0], r[1]] for i, r in enumerate(rows)]
            for r in rows:
                self.last = [v if math.isfinite(v) else old for v, old in zip(r, self.last)]
            self.pending = []
        return self.last

    def failed_files(self):
        failed = self.failed
        if self.context.distributed:
            parts = [None] * self.context.world_size
            torch.distributed.all_gather_object(parts, failed)
            failed = set().union(*parts)
        return failed


def run(args):
    context = distributed.setup(backends.parse_device(args.device))
    backends.resolve(args.backend, context.device)
    train = Run(args, context)
    try:
        return _run(args, context, train)
    finally:
        if context.distributed:
            # The DDP models go first: freed after the group, their Reducer's last reference to the gloo group
            # joins its worker thread while that thread waits for the GIL (a shutdown hang on torch 2.8-2.11).
            del train
            gc.collect()
            torch.distributed.destroy_process_group()


def _run(args, context, train):
    if context.main:
        os.makedirs(args.outf, exist_ok=True)
        print(train.describe(), flush=True)
        if args.sync_bn and not context.distributed:
            print("fastgan train: --sync-bn has no effect in a single process (run under torchrun)")
    if train.step >= (args.max_steps if args.max_steps is not None else math.inf) or train.epoch >= args.niter:
        if context.main:
            print(f"nothing to do: the run is at step {train.step}, epoch {train.epoch} (raise --max-steps/--niter)")
        return 0
    try:
        written = train.loop()
    except KeyboardInterrupt:
        train.flush()
        written = train.save(complete=False, with_grid=not context.distributed)
        if context.main:
            print(f"\ninterrupted at step {train.step}: saved {', '.join(written)}", file=sys.stderr)
        raise SystemExit(130) from None
    failed = train.failed_files()
    if context.main:
        if failed:
            names = sorted(train.dataset.files[i] for i in failed)
            print(f"skipped {len(failed)} unreadable file(s), e.g. {names[0]}")
        print(f"done: {train.step} steps; wrote {', '.join(written)}")
    return 0
