"""FLOP counts from layer shapes: the analytic floor of a DCGAN train step (docs/design.md section 5).

Only convolutions and linear layers (the GEMMs) count, at 2 FLOPs per multiply-add. BatchNorm,
activations, losses and Adam are memory-bound and add well under 1% to the total. Per layer:

    Conv            2 * out.numel() * (C_in / groups) * prod(kernel)
    ConvTranspose   2 * in.numel() * (C_out / groups) * prod(kernel)
    Linear          2 * in.numel() * out_features

Its input gradient (dgrad) and its weight gradient (wgrad) each cost as much again. The shapes
come from running the model on the meta device, so any layer sizes and batch are covered.
"""
import copy
import math
from typing import NamedTuple

import torch
from torch import nn

from ..nn import reference

GEMM_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


class Layer(NamedTuple):
    name: str
    input_shape: tuple
    output_shape: tuple
    flops: int  # forward


class StepFlops(NamedTuple):
    forward: int
    backward: int

    @property
    def total(self):
        return self.forward + self.backward


def layer_flops(module, input_shape, output_shape):
    """Forward FLOPs of one Conv*/ConvTranspose*/Linear module with these input and output shapes."""
    if isinstance(module, nn.Linear):
        return 2 * math.prod(input_shape) * module.out_features
    kernel = math.prod(module.kernel_size)
    if module.transposed:
        return 2 * math.prod(input_shape) * (module.out_channels // module.groups) * kernel
    return 2 * math.prod(output_shape) * (module.in_channels // module.groups) * kernel


def gemm_layers(model, input_shape):
    """The conv and linear layers of ``model`` in the order a forward on ``input_shape`` runs them.

    The forward runs on a meta-device copy (no memory, no compute); ``model`` is left untouched."""
    meta = model if all(p.is_meta for p in model.parameters()) else copy.deepcopy(model).to("meta")
    found, hooks = [], []

    def record(name):
        def hook(module, args, output):
            shape_in, shape_out = tuple(args[0].shape), tuple(output.shape)
            found.append(Layer(name, shape_in, shape_out, layer_flops(module, shape_in, shape_out)))
        return hook

    for name, module in meta.named_modules():
        if isinstance(module, GEMM_LAYERS):
            hooks.append(module.register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            meta(torch.empty(input_shape, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return found


def pass_flops(layers, input_grad, weight_grad):
    """FLOPs of one forward and its backward through ``layers`` (a sequential net).

    A layer needs its dgrad when the net's input needs a gradient, or when an earlier layer's
    weights do; it needs its wgrad when ``weight_grad``."""
    forward = sum(layer.flops for layer in layers)
    wgrad = forward if weight_grad else 0
    dgrad = sum(layer.flops for i, layer in enumerate(layers) if input_grad or (weight_grad and i > 0))
    return StepFlops(forward, wgrad + dgrad)


def train_step_flops(generator, discriminator, batch, d_weight_grads_in_g_step=True):
    """FLOPs of one examples/dcgan train step: D(real), G(z), D(G(z).detach()), D(G(z)), their backwards.

    ``d_weight_grads_in_g_step=False`` drops D's weight gradients in the G step, which the reference
    computes and throws away. ``generator.nz`` sets the noise shape (batch, nz, 1, 1); D takes G's output."""
    g_layers = gemm_layers(generator, (batch, generator.nz, 1, 1))
    d_layers = gemm_layers(discriminator, g_layers[-1].output_shape)
    passes = [
        pass_flops(d_layers, input_grad=False, weight_grad=True),   # D(real)
        pass_flops(g_layers, input_grad=False, weight_grad=True),   # G(z)
        pass_flops(d_layers, input_grad=False, weight_grad=True),   # D(G(z).detach())
        pass_flops(d_layers, input_grad=True, weight_grad=d_weight_grads_in_g_step),  # D(G(z)), G step
    ]
    return StepFlops(sum(p.forward for p in passes), sum(p.backward for p in passes))


def dcgan_networks(ngf=64, ndf=64, nz=100, nc=3):
    """The reference 64x64 (Generator, Discriminator) on the meta device: shapes, no memory."""
    with torch.device("meta"):
        return reference.Generator(nz, ngf, nc), reference.Discriminator(nc, ndf)


def dcgan_step_flops(batch, ngf=64, ndf=64, nz=100, nc=3, d_weight_grads_in_g_step=True):
    """:func:`train_step_flops` of the reference 64x64 DCGAN with these sizes."""
    return train_step_flops(*dcgan_networks(ngf, ndf, nz, nc), batch, d_weight_grads_in_g_step)
