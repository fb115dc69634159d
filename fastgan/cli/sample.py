"""Draw a grid of samples from a generator checkpoint.

    python -m fastgan sample --netG out/netG_epoch_24.pth --n 64 --out grid.png

The checkpoint may come from fastgan train (any preset), from examples/dcgan, or from a DataParallel/DDP
run (keys prefixed ``module.``); the preset and its sizes are read from the tensors' shapes unless
--preset is given.  BatchNorm uses the statistics of the sampled batch, as the training grids do
(--eval: the running statistics).
"""
import argparse
import math
import os

import numpy as np
import torch

from ..nn import presets
from ..nn.checkpoint import load_checkpoint, strip_module_prefix
from ..nn.layers import fuse
from ..ops import backends
from ..usage import UsageError


def save_grid(images, path, nrow=8, padding=2):
    """Write images (N, C, H, W) in [-1, 1] (C = 1 or 3) as one PNG, ``nrow`` to a row, black padding."""
    from PIL import Image

    images = images.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    n, c, h, w = images.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = torch.zeros(c, rows * (h + padding) + padding, cols * (w + padding) + padding, dtype=torch.uint8)
    for i, image in enumerate(images):
        top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        grid[:, top:top + h, left:left + w] = image
    array = grid.permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(array[..., 0] if c == 1 else array)).save(path)


def sample_noise(n, nz, kind, device, generator=None):
    """(n, nz) latents: ``normal`` N(0, 1) or ``uniform`` U(-1, 1)."""
    if kind == "uniform":
        return torch.rand(n, nz, generator=generator, device=device).mul_(2).sub_(1)
    return torch.randn(n, nz, generator=generator, device=device)


def load_generator(path, preset=None, nz=None, ngf=None, nc=None, device="cpu", backend="auto"):
    """(fused generator on ``device``, its recipe) from a generator checkpoint; UsageError when it does not fit."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"--netG {path} does not exist") from None
    except Exception as exc:  # pickle, zip and torch errors alike: the file is not a checkpoint
        raise UsageError(f"--netG {path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise UsageError(f"--netG {path} holds a {type(state).__name__}, not a state_dict")
    state = strip_module_prefix(state)
    sizes = {k: v for k, v in dict(nz=nz, ngf=ngf, nc=nc).items() if v is not None}
    try:
        if preset is None:
            preset, found = presets.generator_config(state)
            sizes = {**found, **sizes}
        G, _, recipe = presets.build(preset, **sizes)
        load_checkpoint(G, state)
    except ValueError as exc:
        raise UsageError(f"--netG {path}: {exc}") from None
    return fuse(G, backend).to(device), recipe


def add_common(parser):
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--netG", required=True, help="generator checkpoint (.pth state_dict)")
    parser.add_argument("--preset", choices=presets.PRESETS, help="default: found from the checkpoint")
    parser.add_argument("--nz", type=int)
    parser.add_argument("--ngf", type=int)
    parser.add_argument("--nc", type=int)
    parser.add_argument("--noise", choices=("normal", "uniform"), help="default: the preset's")
    parser.add_argument("--eval", action="store_true", help="BatchNorm with running statistics, not the batch's")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--backend", default="auto", choices=backends.BACKENDS)


def prepare(args, command, batch):
    """The generator (in the mode --eval asks for), its recipe and device; UsageError when it cannot be had."""
    if batch < 2 and not args.eval:
        raise UsageError(f"BatchNorm on batch statistics needs 2 or more images, got {batch}; "
                         "ask for more, or pass --eval")
    device = backends.parse_device(args.device)
    backends.resolve(args.backend, device)
    G, recipe = load_generator(args.netG, args.preset, args.nz, args.ngf, args.nc, device, args.backend)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    return G.train(not args.eval), recipe, device


def add_arguments(parser):
    add_common(parser)
    parser.add_argument("--n", type=int, default=64, help="how many samples")
    parser.add_argument("--nrow", type=int, default=8, help="images per row of the grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="samples.png")


def run(args):
    G, recipe, device = prepare(args, "sample", args.n)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    z = sample_noise(args.n, recipe.nz, args.noise or recipe.noise, "cpu", gen).to(device)
    with torch.no_grad():
        save_grid(G(z), args.out, nrow=args.nrow)
    print(f"wrote {args.out}: {args.n} samples of {args.netG} ({recipe.image_size}x{recipe.image_size})")
    return 0
