"""The classic DCGAN variants (docs/design.md section 8) as reference nn.Sequential builders with their recipes.

    G, D, recipe = fastgan.presets.build("avatar48")   # plain torch modules, DCGAN init
    G, D = fastgan.fuse(G), fastgan.fuse(D)              # same parameters, fused forward and backward

Every generator maps z (N, nz) to images (N, nc, S, S) in [-1, 1]; every discriminator maps images to
logits (N,) (no sigmoid: the losses take logits).  dcgan64's state_dict is examples/dcgan's (keys
``main.*``), so its checkpoints load into ``fastgan.reference.Generator``/``Discriminator`` and back.
"""
import dataclasses
from collections import OrderedDict

import torch
from torch import nn

from ..usage import UsageError
from .reference import check_sizes


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Image geometry, widths and the training recipe of a preset."""
    image_size: int
    nc: int
    nz: int = 100
    ngf: int = 64
    ndf: int = 64
    loss: str = "bce"  # bce | lsgan | hinge | wgan-gp
    lr: float = 2e-4
    betas: tuple = (0.5, 0.999)
    weight_decay: float = 0.0
    label_smoothing: float = 0.0  # one-sided: real target 1 - label_smoothing
    d_steps: int = 1  # D updates per G round (one batch each) ...
    g_steps: int = 1  # ... and G updates per G round
    noise: str = "normal"  # normal: N(0, 1); uniform: U(-1, 1)


def dcgan_init(module):
    """DCGAN init for every conv, conv-transpose and linear layer: weight N(0, 0.02), bias 0;
    BatchNorm weight N(1, 0.02), bias 0.  Same as fastgan.reference.weights_init on examples/dcgan."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def _convt_bn_relu(cin, cout, *args, **kwargs):
    return [nn.ConvTranspose2d(cin, cout, *args, bias=False, **kwargs), nn.BatchNorm2d(cout), nn.ReLU(True)]


def _conv_bn_lrelu(cin, cout, *args, bn=True, bias=None):
    layers = [nn.Conv2d(cin, cout, *args, bias=not bn if bias is None else bias)]
    return layers + ([nn.BatchNorm2d(cout)] if bn else []) + [nn.LeakyReLU(0.2, True)]


def _dcgan64(nz, ngf, ndf, nc):
    g = ngf
    G = nn.Sequential(OrderedDict(
        z=nn.Unflatten(1, (nz, 1, 1)),
        main=nn.Sequential(*_convt_bn_relu(nz, 8 * g, 4, 1, 0), *_convt_bn_relu(8 * g, 4 * g, 4, 2, 1),
                           *_convt_bn_relu(4 * g, 2 * g, 4, 2, 1), *_convt_bn_relu(2 * g, g, 4, 2, 1),
                           nn.ConvTranspose2d(g, nc, 4, 2, 1, bias=False), nn.Tanh())))
    d = ndf
    D = nn.Sequential(OrderedDict(
        main=nn.Sequential(*_conv_bn_lrelu(nc, d, 4, 2, 1, bn=False, bias=False), *_conv_bn_lrelu(d, 2 * d, 4, 2, 1),
                           *_conv_bn_lrelu(2 * d, 4 * d, 4, 2, 1), *_conv_bn_lrelu(4 * d, 8 * d, 4, 2, 1),
                           nn.Conv2d(8 * d, 1, 4, 1, 0, bias=False)),
        logits=nn.Flatten(0)))
    return G, D


def _avatar48(nz, ngf, ndf, nc):
    g, same = ngf, dict(padding=2, output_padding=1)  # k5 s2 "same": 3 -> 6 -> 12 -> 24 -> 48
    G = nn.Sequential(
        nn.Linear(nz, 3 * 3 * 8 * g, bias=False), nn.BatchNorm1d(3 * 3 * 8 * g), nn.ReLU(True),
        nn.Unflatten(1, (8 * g, 3, 3)),
        *_convt_bn_relu(8 * g, 4 * g, 5, 2, **same), *_convt_bn_relu(4 * g, 2 * g, 5, 2, **same),
        nn.ConvTranspose2d(2 * g, g, 5, 2, **same), nn.ReLU(True),
        nn.ConvTranspose2d(g, nc, 5, 2, **same), nn.Tanh())
    d = ndf  # 48 -> 24 -> 12 -> 6 -> 3
    D = nn.Sequential(
        *_conv_bn_lrelu(nc, d, 5, 2, 2, bn=False), *_conv_bn_lrelu(d, 2 * d, 5, 2, 2),
        *_conv_bn_lrelu(2 * d, 4 * d, 5, 2, 2), *_conv_bn_lrelu(4 * d, 8 * d, 5, 2, 2),
        nn.Flatten(), nn.Linear(8 * d * 3 * 3, 1), nn.Flatten(0))
    return G, D


def _mnist28(nz, ngf, ndf, nc):
    h = 2 * ngf  # 7 -> 14 -> 28
    G = nn.Sequential(
        nn.Linear(nz, h * 7 * 7, bias=False), nn.BatchNorm1d(h * 7 * 7), nn.ReLU(True), nn.Unflatten(1, (h, 7, 7)),
        *_convt_bn_relu(h, h // 2, 4, 2, 1), nn.ConvTranspose2d(h // 2, nc, 4, 2, 1), nn.Tanh())
    d = ndf  # 28 -> 14 -> 7 -> 3
    D = nn.Sequential(
        *_conv_bn_lrelu(nc, d, 4, 2, 1), *_conv_bn_lrelu(d, 2 * d, 4, 2, 1), *_conv_bn_lrelu(2 * d, 4 * d, 4, 2, 1),
        nn.Flatten(), nn.Linear(4 * d * 3 * 3, 1), nn.Flatten(0))
    return G, D


def _mlp_mnist(nz, ngf, ndf, nc):
    pixels = nc * 28 * 28
    G = nn.Sequential(nn.Linear(nz, ngf), nn.LeakyReLU(0.01), nn.Linear(ngf, pixels), nn.Tanh(),
                      nn.Unflatten(1, (nc, 28, 28)))
    D = nn.Sequential(nn.Flatten(), nn.Linear(pixels, ndf), nn.LeakyReLU(0.01), nn.Linear(ndf, 1), nn.Flatten(0))
    return G, D


def _anime64(nz, ngf, ndf, nc):
    g = ngf  # 3 -> 9 -> 21 -> 64, no padding
    G = nn.Sequential(
        nn.Linear(nz, 3 * 3 * 8 * g), nn.LeakyReLU(0.2, True), nn.Unflatten(1, (8 * g, 3, 3)),
        nn.ConvTranspose2d(8 * g, 4 * g, 3, 3, bias=False), nn.BatchNorm2d(4 * g), nn.LeakyReLU(0.2, True),
        nn.ConvTranspose2d(4 * g, 2 * g, 5, 2, bias=False), nn.BatchNorm2d(2 * g), nn.LeakyReLU(0.2, True),
        nn.ConvTranspose2d(2 * g, nc, 4, 3), nn.Tanh())
    d = ndf  # 64 -> 20 -> 6 -> 1
    D = nn.Sequential(
        *_conv_bn_lrelu(nc, d, 5, 3, bn=False), *_conv_bn_lrelu(d, 2 * d, 5, 3), *_conv_bn_lrelu(2 * d, 4 * d, 5, 3),
        nn.Flatten(), nn.Linear(4 * d, 1), nn.Flatten(0))
    return G, D


PRESETS = {
    "dcgan64": (_dcgan64, Recipe(image_size=64, nc=3)),
    "avatar48": (_avatar48, Recipe(image_size=48, nc=3, g_steps=2, noise="uniform")),
    "mnist28": (_mnist28, Recipe(image_size=28, nc=1, loss="lsgan", weight_decay=1e-4)),
    "mlp-mnist": (_mlp_mnist, Recipe(image_size=28, nc=1, ngf=128, ndf=128, label_smoothing=0.1)),
    "anime64": (_anime64, Recipe(image_size=64, nc=3)),
}


def recipe(name):
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name][1]


def build(name, nz=None, ngf=None, ndf=None, nc=None):
    """(G, D, recipe): the preset's reference modules, DCGAN-initialised, and its recipe with the
    widths actually used.  Unset sizes take the recipe's defaults."""
    sizes = {k: v for k, v in dict(nz=nz, ngf=ngf, ndf=ndf, nc=nc).items() if v is not None}
    check_sizes(f"preset {name}", **sizes)
    used = dataclasses.replace(recipe(name), **sizes)
    G, D = PRESETS[name][0](used.nz, used.ngf, used.ndf, used.nc)
    dcgan_init(G)
    dcgan_init(D)
    return G, D, used


def _generator_shapes(name, **sizes):
    with torch.device("meta"):
        G, _, _ = build(name, **{"nz": 1, "ngf": 1, "ndf": 1, "nc": 1, **sizes})
    return {k: tuple(v.shape) for k, v in G.state_dict().items()}


def generator_config(state_dict):
    """(preset name, dict(nz=, ngf=, nc=)) of the preset generator with exactly these keys and shapes.

    Every size in a generator's shapes is affine in one of nz, ngf, nc, so probing each at 1 and 2 solves
    for it; the answer is then checked against every shape.  Raises ValueError when no preset fits."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    for name in PRESETS:
        base = _generator_shapes(name)
        if base.keys() != shapes.keys():
            continue
        sizes = {}
        for var in ("nz", "ngf", "nc"):
            probe = _generator_shapes(name, **{var: 2})
            for key in base:
                for b, p, s in zip(base[key], probe[key], shapes[key]):
                    if p != b and (s - b) % (p - b) == 0:
                        sizes.setdefault(var, 1 + (s - b) // (p - b))
        if len(sizes) == 3 and min(sizes.values()) > 0 and _generator_shapes(name, **sizes) == shapes:
            return name, sizes
    raise UsageError(f"the checkpoint's {len(shapes)} tensors fit no preset generator ({', '.join(PRESETS)}); "
                     "pass --preset and its sizes, or check that it is a generator checkpoint")
