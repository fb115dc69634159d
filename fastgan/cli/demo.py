"""A few examples/dcgan train steps of fastgan beside the reference, from one seed.

Prints the losses side by side, how far apart they are, and the time per step.
"""
import time

import torch

from ..nn import reference
from ..nn.models import DCGAN
from ..ops import backends
from ..usage import int_at_least_2, positive_int, seed_int, width_int
from .common import check_backend


def add_arguments(parser):
    parser.add_argument("--steps", type=positive_int, default=5)
    parser.add_argument("--batch", type=int_at_least_2, default=8, help="2 or more (BatchNorm in training mode)")
    parser.add_argument("--ngf", type=width_int, default=64)
    parser.add_argument("--ndf", type=width_int, default=64)
    parser.add_argument("--backend", default="auto", choices=backends.BACKENDS)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--seed", type=seed_int, default=0)


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def run(args):
    device = backends.parse_device(args.device)
    which = check_backend(args.backend, device)
    torch.manual_seed(args.seed)
    gan = DCGAN(ngf=args.ngf, ndf=args.ndf, backend=args.backend).to(device)
    ref_g = reference.Generator(ngf=args.ngf).to(device)
    ref_d = reference.Discriminator(ndf=args.ndf).to(device)
    ref_g.load_state_dict(gan.generator.state_dict())
    ref_d.load_state_dict(gan.discriminator.state_dict())
    fast_opts = reference.make_optimizers(gan.generator, gan.discriminator)
    ref_opts = reference.make_optimizers(ref_g, ref_d)
    print(f"fastgan demo: device={device}, backend={which}, batch={args.batch}, ngf={args.ngf}, ndf={args.ndf}")
    header = ("step", "loss_D ref", "loss_D fast", "loss_G ref", "loss_G fast", "max rel diff")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (4, 11, 11, 11, 11, 12))))
    times = {"reference": [], "fastgan": []}
    worst = 0.0
    for step in range(args.steps):
        gen = torch.Generator(device="cpu").manual_seed(args.seed + 1 + step)
        real = torch.tanh(torch.randn(args.batch, 3, 64, 64, generator=gen)).to(device)
        noise = torch.randn(args.batch, 100, 1, 1, generator=gen).to(device)
        ref, t_ref = _timed(lambda: reference.train_step(ref_g, ref_d, real, noise, *ref_opts), device)
        fast, t_fast = _timed(lambda: gan.train_step(real, *fast_opts, noise=noise), device)
        pairs = [(float(ref[0]), float(fast.loss_d)), (float(ref[1]), float(fast.loss_g))]
        diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in pairs)
        worst = max(worst, diff)
        times["reference"].append(t_ref)
        times["fastgan"].append(t_fast)
        print(f"{step:>4} {pairs[0][0]:>11.6f} {pairs[0][1]:>11.6f} {pairs[1][0]:>11.6f} {pairs[1][1]:>11.6f} "
              f"{diff:>12.2e}")
    # The first step includes warm-up (kernel compilation, cuDNN autotuning): report the rest when there is one.
    for name, ts in times.items():
        kept = sorted(ts[1:] or ts)
        print(f"{name:>9}: {1e3 * kept[len(kept) // 2]:8.1f} ms/step (median of {len(kept)})")
    print(f"largest relative loss difference: {worst:.2e}")
    return 0
