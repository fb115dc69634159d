"""Drop-in DCGAN models: the reference architectures with fused forward and backward."""
import weakref
from collections import OrderedDict

import torch
from torch import nn

from ..ops import backends
from ..usage import UsageError
from . import reference
from .layers import FusedSequential
from .losses import discriminator_loss, generator_loss
from .step import StepRecipe, StepResult, TrainStep, captured_step


class Generator(reference.Generator):
    """examples/dcgan's Generator, same init, same state_dict keys; conv->BN->ReLU and conv->Tanh fused.

    z (N, nz, 1, 1) -> image (N, nc, 64, 64)."""

    def __init__(self, nz=100, ngf=64, nc=3, backend="auto"):
        super().__init__(nz, ngf, nc)
        self.main = FusedSequential(OrderedDict(self.main.named_children()), backend=backend)


class Discriminator(reference.Discriminator):
    """examples/dcgan's Discriminator, same init, same state_dict keys; conv->BN->LeakyReLU fused.

    image (N, nc, 64, 64) -> probability (N,); :meth:`logits` gives the pre-sigmoid (N,) for fused losses."""

    def __init__(self, nc=3, ndf=64, backend="auto"):
        super().__init__(nc, ndf)
        self.main = FusedSequential(OrderedDict(self.main.named_children()), backend=backend)

    def logits(self, x):
        return self.main(x, end=len(self.main) - 1).view(-1)

    def forward(self, x):
        return torch.sigmoid(self.logits(x))


_checked_optimizers = weakref.WeakKeyDictionary()  # DCGAN -> (opt_g, opt_d as weak references, param group sizes)


class DCGAN(nn.Module):
    """A Generator and a Discriminator with fused losses and the examples/dcgan train step."""

    def __init__(self, nz=100, ngf=64, ndf=64, nc=3, backend="auto"):
        reference.check_sizes("DCGAN", nz=nz, ngf=ngf, ndf=ndf, nc=nc)
        super().__init__()
        self.nz, self.nc = nz, nc
        self.backend = backends.check_name(backend)
        self.generator = Generator(nz, ngf, nc, backend)
        self.discriminator = Discriminator(nc, ndf, backend)

    def d_loss(self, real_images, fake_images, label_smoothing=0.0):
        """D's loss on a real and a fake batch; the fakes are detached, so no gradient reaches G."""
        d = self.discriminator
        return discriminator_loss(d.logits(real_images), d.logits(fake_images.detach()), label_smoothing,
                                  self.backend)

    def g_loss(self, fake_images):
        """G's non-saturating loss on its fakes (D is applied, gradients flow into G)."""
        return generator_loss(self.discriminator.logits(fake_images), self.backend)

    def sample_noise(self, batch_size, device=None):
        device = device if device is not None else next(self.generator.parameters()).device
        return torch.randn(batch_size, self.nz, 1, 1, device=device)

    def check_optimizers(self, opt_g, opt_d):
        """UsageError unless opt_g holds some of G's parameters and none of D's, and opt_d the reverse.  A pair
        checked before is not checked again (70 us of Python a step) while its param groups keep their sizes."""
        sizes = tuple(len(g["params"]) for opt in (opt_g, opt_d) for g in getattr(opt, "param_groups", ()))
        checked = _checked_optimizers.get(self)
        if checked is not None and checked[0]() is opt_g and checked[1]() is opt_d and checked[2] == sizes:
            return
        self._check_optimizers(opt_g, opt_d)
        _checked_optimizers[self] = (weakref.ref(opt_g), weakref.ref(opt_d), sizes)

    def _check_optimizers(self, opt_g, opt_d):
        own = {"generator": {id(p) for p in self.generator.parameters()},
               "discriminator": {id(p) for p in self.discriminator.parameters()}}
        for name, opt, net, other in (("opt_g", opt_g, "generator", "discriminator"),
                                      ("opt_d", opt_d, "discriminator", "generator")):
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"{name} must be a torch.optim.Optimizer over the {net}'s parameters, "
                                f"got {type(opt).__name__}")
            held = {id(p) for group in opt.param_groups for p in group["params"]}
            if held & own[other]:
                hint = " (opt_g and opt_d swapped?)" if not held & own[net] else ""
                raise UsageError(f"{name} holds the {other}'s parameters{hint}; call train_step(real, opt_g, opt_d) "
                                 f"with opt_g over gan.generator.parameters() and opt_d over "
                                 "gan.discriminator.parameters()")
            if not held & own[net]:
                raise UsageError(f"{name} holds none of the {net}'s parameters; build it over "
                                 f"gan.{net}.parameters() (e.g. fastgan.reference.make_optimizers)")

    def step_for(self, opt_g, opt_d, label_smoothing=0.0):
        """The TrainStep of examples/dcgan's recipe (bce, one-sided ``label_smoothing``) with these optimizers,
        made on first use and kept on the model while they stay the same (fastgan.nn.step)."""
        step = self.__dict__.get("_train_step")
        if step is None or step.opt_g is not opt_g or step.opt_d is not opt_d or \
                step.recipe.label_smoothing != label_smoothing:
            step = TrainStep(self.generator, self.discriminator, opt_g, opt_d,
                             StepRecipe(label_smoothing=label_smoothing), latent=(self.nz, 1, 1),
                             critic=self.discriminator.logits, backend=self.backend)
            self.__dict__["_train_step"] = step
        return step

    def check_batch(self, real):
        """UsageError unless ``real`` is a batch the networks take: (N, nc, 64, 64) in their dtype (any floating
        dtype under autocast) on their device."""
        if not isinstance(real, torch.Tensor):
            raise TypeError(f"real must be a torch.Tensor batch of images, got {type(real).__name__}")
        param = next(self.discriminator.parameters())
        float_ok = real.is_floating_point()
        dtype_ok = float_ok if torch.is_autocast_enabled(real.device.type) else real.dtype == param.dtype
        fixes = []
        if real.dim() != 4 or real.shape[0] < 1:
            fixes.append("give a batch (N, C, H, W) of N >= 1 images")
        else:
            if tuple(real.shape[2:]) != (64, 64):
                fixes.append("resize the images to 64x64 (examples/dcgan: transforms.Resize(64), CenterCrop(64))")
            if real.shape[1] != self.nc:
                fixes.append(f"give {self.nc}-channel images, or build the DCGAN with nc={real.shape[1]}")
        if not dtype_ok:
            fixes.append(f"convert it with real.to({param.dtype})" + ("" if float_ok else " / 127.5 - 1, for [-1, 1]"))
        if real.device != param.device:
            fixes.append(f"move it with real.to('{param.device}')")
        if fixes:
            raise UsageError(f"train_step: real must be a (N, {self.nc}, 64, 64) {param.dtype} batch on "
                             f"{param.device}, as the DCGAN's parameters, got {tuple(real.shape)} {real.dtype} on "
                             f"{real.device}; {'; '.join(fixes)}")

    def train_step(self, real, opt_g, opt_d, noise=None, label_smoothing=0.0, cuda_graph=False):
        """One step of the examples/dcgan loop: update D on real and on G(noise).detach(), then G.

        ``noise`` defaults to N(0, 1) of shape (N, nz, 1, 1) in the batch's dtype.  D's weight gradients are not
        computed during the G update, where the reference throws them away.  ``cuda_graph``: run the step as
        one CUDA graph (fastgan.nn.step; needs Adam(..., capturable=True)); on CPU it runs eagerly.  Each
        optimizer must hold parameters of the network it updates and none of the other's (UsageError otherwise:
        swapped optimizers would train garbage); ``real`` must be (N, nc, 64, 64) in the parameters' dtype."""
        self.check_optimizers(opt_g, opt_d)
        self.check_batch(real)
        step = self.step_for(opt_g, opt_d, label_smoothing)
        if cuda_graph:
            return StepResult(*captured_step(step)(real, noise).clone().unbind())
        return StepResult(*step(real, noise).unbind())
