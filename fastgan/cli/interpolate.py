"""Walk the latent space between two seeds and write the frames as one grid PNG.

    python -m fastgan interpolate --netG out/netG_epoch_24.pth --seeds 3 7 --steps 10 --out walk.png

Each seed draws one latent as the sample command does; the walk is spherical (slerp, the path that
keeps Gaussian latents at their typical norm) or straight (--mode lerp).
"""
import torch

from ..usage import positive_int, seed_int
from .sample import add_common, check_grid, prepare, sample_noise, write_samples


def slerp(a, b, t):
    """Spherical interpolation between rows a and b (nz,) at fractions t (T,) -> (T, nz)."""
    cos = torch.dot(a / a.norm(), b / b.norm()).clamp(-1, 1)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-4:  # (anti)parallel to float precision: the straight line is the same path
        return torch.lerp(a, b, t[:, None])
    sin = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / sin)[:, None] * a + (torch.sin(t * omega) / sin)[:, None] * b


def add_arguments(parser):
    add_common(parser)
    parser.add_argument("--seeds", type=seed_int, nargs=2, default=(0, 1), metavar=("FROM", "TO"))
    parser.add_argument("--steps", type=positive_int, default=8, help="frames, both ends included")
    parser.add_argument("--mode", choices=("slerp", "lerp"), default="slerp")
    parser.add_argument("--nrow", type=positive_int, help="frames per row of the grid (default: all in one row)")
    parser.add_argument("--out", default="interpolation.png")


def run(args):
    G, recipe, device = prepare(args, "interpolate", args.steps)
    shape, nrow = (recipe.nc, recipe.image_size, recipe.image_size), args.nrow or args.steps
    check_grid(args.out, args.steps, shape, nrow, f"--steps {args.steps}")
    kind = args.noise or recipe.noise
    a, b = (sample_noise(1, recipe.nz, kind, "cpu", torch.Generator().manual_seed(s))[0] for s in args.seeds)
    t = torch.linspace(0, 1, args.steps)

    def latents(first, count):
        part = t[first:first + count]
        return slerp(a, b, part) if args.mode == "slerp" else torch.lerp(a, b, part[:, None])

    write_samples(G, latents, args.steps, shape, args.out, nrow, device)
    print(f"wrote {args.out}: {args.steps} frames from seed {args.seeds[0]} to seed {args.seeds[1]} ({args.mode})")
    return 0
