"""The reference models: PyTorch examples/dcgan's Generator and Discriminator, as nn.Sequential.

fastgan's fused models are checked against these, and load their checkpoints.
"""
import torch
from torch import nn

from ..usage import UsageError


def check_sizes(owner, **sizes):
    """UsageError naming ``owner`` unless every size is a positive integer (bools are not sizes)."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{owner}: {name} must be a positive integer, got {value!r}")


def weights_init(module):
    """examples/dcgan's init: N(0, 0.02) for conv weights, N(1, 0.02) and zero bias for BatchNorm."""
    classname = type(module).__name__
    if classname.find("Conv") != -1:
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """z (N, nz, 1, 1) -> image (N, nc, 64, 64) in [-1, 1]."""

    def __init__(self, nz=100, ngf=64, nc=3):
        check_sizes(type(self).__name__, nz=nz, ngf=ngf, nc=nc)
        super().__init__()
        self.nz = nz
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * 8),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False),
            nn.Tanh(),
        )
        self.apply(weights_init)

    def forward(self, z):
        return self.main(z)


class Discriminator(nn.Module):
    """image (N, nc, 64, 64) -> probability (N,)."""

    def __init__(self, nc=3, ndf=64):
        check_sizes(type(self).__name__, nc=nc, ndf=ndf)
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 4),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False),
            nn.Sigmoid(),
        )
        self.apply(weights_init)

    def forward(self, x):
        return self.main(x).view(-1, 1).squeeze(1)


def make_optimizers(generator, discriminator, lr=2e-4, beta1=0.5, **adam_kwargs):
    """examples/dcgan's optimizers: Adam(lr=2e-4, betas=(0.5, 0.999)) for each network."""
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=(beta1, 0.999), **adam_kwargs)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(beta1, 0.999), **adam_kwargs)
    return opt_g, opt_d


def train_step(generator, discriminator, real, noise, opt_g, opt_d):
    """One iteration of examples/dcgan's loop (nn.BCELoss on D's probabilities).

    Returns (loss_d, loss_g, d_x, d_g_z1, d_g_z2) as 0-dim tensors."""
    criterion = nn.BCELoss()
    discriminator.zero_grad()
    output = discriminator(real)
    label = torch.full((real.shape[0],), 1.0, dtype=output.dtype, device=real.device)
    err_d_real = criterion(output, label)
    err_d_real.backward()
    d_x = output.mean()
    fake = generator(noise)
    label.fill_(0.0)
    output = discriminator(fake.detach())
    err_d_fake = criterion(output, label)
    err_d_fake.backward()
    d_g_z1 = output.mean()
    opt_d.step()

    generator.zero_grad()
    label.fill_(1.0)
    output = discriminator(fake)
    err_g = criterion(output, label)
    err_g.backward()
    opt_g.step()
    return (err_d_real + err_d_fake).detach(), err_g.detach(), d_x.detach(), d_g_z1.detach(), output.mean().detach()
