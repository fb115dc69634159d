"""Draw a grid of samples from a generator checkpoint.

    python -m fastgan sample --netG out/netG_epoch_24.pth --n 64 --out grid.png

The checkpoint may come from fastgan train (any preset; netG_epoch_N.pth or checkpoint.pt), from
examples/dcgan, from a DataParallel/DDP run (keys prefixed ``module.``), or hold the generator in a nested
layout (``{"netG": ...}``, ``{"state_dict": ...}``, the PyTorch DCGAN tutorial's
``{"g_model_state_dict": ...}``; the entry used is printed); the preset and its sizes are read from the
tensors' shapes unless --preset is given.  BatchNorm uses the statistics of the sampled batch, as the training
grids do (--eval: the running statistics); more than CHUNK (512) images are generated in near-equal chunks,
each with its own statistics.  A grid that cannot be written (too large for the format, pillow or the
memory) is refused before any image is generated.
"""
import argparse
import os

import torch
from PIL import Image

from ..nn import presets
from ..nn.checkpoint import describe, is_state_dict, load_checkpoint, state_dicts
from ..nn.layers import fuse
from ..ops import backends
from ..usage import UsageError, image_path, positive_int, seed_int, width_int
from .common import check_backend, read_checkpoint


CHUNK = 512  # images generated at once: a larger --n is generated in near-equal chunks of at most this many
FORMAT_SIDE = {"JPEG": 65500, "WEBP": 16383, "GIF": 65535}  # the longest side each format stores
PIL_SIDES = ((2**31 - 1) // 4 - 1, 2**31 - 1)  # the widest and the tallest image pillow allocates


def grid_shape(n, shape, nrow, padding=2):
    """(height, width, C) of the grid of n images of ``shape`` (C, H, W), ``nrow`` to a row."""
    c, h, w = shape
    cols = min(nrow, n)
    rows = -(-n // cols)
    return rows * (h + padding) + padding, cols * (w + padding) + padding, c


def _available_memory():
    """Bytes of memory the machine can give (Linux's MemAvailable), or None where it does not say."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_grid(path, n, shape, nrow, what, padding=2):
    """UsageError, before any image is generated, when the grid of n images of ``shape`` (C, H, W) cannot be
    written to ``path``: a side longer than its format or pillow stores, or more memory than the machine has
    (the grid, and pillow's copy of it: 4 bytes a pixel for RGB).  ``what``: the flag that asked for n."""
    height, width, c = grid_shape(n, shape, nrow, padding)
    fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "")
    side = FORMAT_SIDE.get(fmt, PIL_SIDES[1])
    widest, tallest = min(side, PIL_SIDES[0]), min(side, PIL_SIDES[1])
    if height > tallest or width > widest:
        fix = f"ask for fewer images, or for {'more' if height > tallest else 'fewer'} than {nrow} a row (--nrow)"
        raise UsageError(f"{what}: a grid of {n} {shape[1]}x{shape[2]} images, {min(nrow, n)} a row, is "
                         f"{width}x{height} pixels; pillow writes {fmt} images of at most {widest}x{tallest}: {fix}")
    per_pixel = c + (4 if c == 3 else 1)
    free = _available_memory()
    if free is not None and height * width * per_pixel > free:
        row = (shape[1] + padding) * width * per_pixel
        most = max(0, (free - padding * width * per_pixel) // row) * min(nrow, n)
        raise UsageError(f"{what}: a grid of {n} {shape[1]}x{shape[2]} images is {width}x{height} pixels and "
                         f"needs {height * width * per_pixel / 2**30:.1f} GiB of memory to write; "
                         f"{free / 2**30:.1f} GiB is available: ask for at most {most} images, and for more in "
                         "further grids (another --seed)")


def _chunks(n):
    """(first, count) of near-equal chunks of at most CHUNK that cover n (each of 2 or more when n is)."""
    k = -(-n // CHUNK)
    size, extra = divmod(n, k)
    first = 0
    for i in range(k):
        count = size + (i < extra)
        yield first, count
        first += count


def _place(grid, images, first, nrow, padding=2):
    """Draw images (N, C, H, W) in [-1, 1] into ``grid`` (uint8 (height, width, C)) from place ``first`` on."""
    images = images.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    n, c, h, w = images.shape
    cols = min(nrow, (grid.shape[1] - padding) // (w + padding))
    for i, image in enumerate(images, first):
        top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        grid[top:top + h, left:left + w] = image.permute(1, 2, 0)


def _write(grid, path):
    try:
        Image.fromarray(grid.numpy()[..., 0] if grid.shape[2] == 1 else grid.numpy()).save(path)
    except OSError as exc:  # the folder went away or filled up after the checks at the start
        raise UsageError(f"cannot write {path} ({exc.strerror or exc})") from None


def save_grid(images, path, nrow=8, padding=2):
    """Write images (N, C, H, W) in [-1, 1] (C = 1 or 3) as one PNG, ``nrow`` to a row, black padding."""
    grid = torch.zeros(grid_shape(len(images), images.shape[1:], nrow, padding), dtype=torch.uint8)
    _place(grid, images, 0, nrow, padding)
    _write(grid, path)


def write_samples(G, latents, n, shape, path, nrow, device):
    """Write the grid of G's images of n latents, ``latents(first, count)`` -> (count, nz) on the CPU, generated
    in chunks (see CHUNK): BatchNorm on batch statistics then uses each chunk's.  ``shape``: (C, H, W)."""
    grid = torch.zeros(grid_shape(n, shape, nrow), dtype=torch.uint8)
    with torch.no_grad():
        for first, count in _chunks(n):
            _place(grid, G(latents(first, count).to(device)), first, nrow)
    _write(grid, path)


def sample_noise(n, nz, kind, device, generator=None):
    """(n, nz) latents: ``normal`` N(0, 1) or ``uniform`` U(-1, 1)."""
    if kind == "uniform":
        return torch.rand(n, nz, generator=generator, device=device).mul_(2).sub_(1)
    return torch.randn(n, nz, generator=generator, device=device)


GENERATOR_KEYS = ("netG", "generator", "g_model_state_dict", "G", "gen", "state_dict", "model", "model_state_dict")


def _generator_first(found):
    """The (key, state_dict) pairs with the names that say "generator" (or nothing) first."""
    def rank(item):
        name = (item[0] or "").rpartition(".")[2]
        return GENERATOR_KEYS.index(name) if name in GENERATOR_KEYS else len(GENERATOR_KEYS)
    return sorted(found, key=rank)


def load_generator(path, preset=None, nz=None, ngf=None, nc=None, device="cpu", backend="auto"):
    """(fused generator on ``device``, its recipe, the checkpoint entry used or None) from a generator checkpoint:
    a state_dict, or one in a nested layout (fastgan.nn.checkpoint).  UsageError when none fits."""
    checkpoint = read_checkpoint(path, "--netG")
    what = describe(checkpoint)
    if what and not is_state_dict(checkpoint):
        raise UsageError(f"--netG {path} is {what}")
    found = _generator_first(state_dicts(checkpoint))
    if not found:
        raise UsageError(f"--netG {path} holds no state_dict (its entries: {', '.join(map(str, checkpoint))}); "
                         "expected a generator's tensors by parameter name, or them under a key such as 'netG'")
    given = {k: v for k, v in dict(nz=nz, ngf=ngf, nc=nc).items() if v is not None}
    problems = []
    for key, state in found:
        try:
            name, sizes = (preset, given) if preset else presets.generator_config(state)
            G, _, recipe = presets.build(name, **{**sizes, **given})
            load_checkpoint(G, state)
        except ValueError as exc:
            problems.append((key, exc))
            continue
        return fuse(G, backend).to(device), recipe, key
    if len(found) == 1:
        raise UsageError(f"--netG {path}: {problems[0][1]}") from None
    raise UsageError(f"--netG {path}: none of its state_dicts ({', '.join(k for k, _ in found)}) is a preset "
                     f"generator (for {problems[0][0]}: {problems[0][1]})") from None


def add_common(parser):
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--netG", required=True, help="generator checkpoint: a state_dict (.pth), one nested "
                        "under a key such as netG or g_model_state_dict, or fastgan train's checkpoint.pt")
    parser.add_argument("--preset", choices=presets.PRESETS, help="default: found from the checkpoint")
    parser.add_argument("--nz", type=width_int)
    parser.add_argument("--ngf", type=width_int)
    parser.add_argument("--nc", type=width_int)
    parser.add_argument("--noise", choices=("normal", "uniform"), help="default: the preset's")
    parser.add_argument("--eval", action="store_true", help="BatchNorm with running statistics, not the batch's")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--backend", default="auto", choices=backends.BACKENDS)


def prepare(args, command, batch):
    """The generator (in the mode --eval asks for), its recipe and device; UsageError when it cannot be had.
    Every flag is checked before the checkpoint is read."""
    image_path(args.out, "--out")
    if batch < 2 and not args.eval:
        raise UsageError(f"BatchNorm on batch statistics needs 2 or more images, got {batch}; "
                         "ask for more, or pass --eval")
    device = backends.parse_device(args.device)
    check_backend(args.backend, device)
    G, recipe, key = load_generator(args.netG, args.preset, args.nz, args.ngf, args.nc, device, args.backend)
    if key is not None:
        print(f"fastgan {command}: using the {key!r} entry of {args.netG}")
    return G.train(not args.eval), recipe, device


def add_arguments(parser):
    add_common(parser)
    parser.add_argument("--n", type=positive_int, default=64, help="how many samples")
    parser.add_argument("--nrow", type=positive_int, default=8, help="images per row of the grid")
    parser.add_argument("--seed", type=seed_int, default=0)
    parser.add_argument("--out", default="samples.png")


def run(args):
    G, recipe, device = prepare(args, "sample", args.n)
    shape = (recipe.nc, recipe.image_size, recipe.image_size)
    check_grid(args.out, args.n, shape, args.nrow, f"--n {args.n}")
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    write_samples(G, lambda first, count: sample_noise(count, recipe.nz, args.noise or recipe.noise, "cpu", gen),
                  args.n, shape, args.out, args.nrow, device)
    print(f"wrote {args.out}: {args.n} samples of {args.netG} ({recipe.image_size}x{recipe.image_size})")
    return 0
