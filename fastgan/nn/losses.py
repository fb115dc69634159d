"""GAN losses on D's raw outputs (logits, or critic values), each a 0-dim fp32 tensor (fp64 for fp64).

bce      sigmoid + binary cross-entropy, fused with its gradient in one kernel (DCGAN, non-saturating G)
lsgan    least squares (Mao et al.): 1/2 E[(D(x) - 1)^2] + 1/2 E[D(G(z))^2]; G: 1/2 E[(D(G(z)) - 1)^2]
hinge    E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]; G: -E[D(G(z))]
wgan-gp  E[D(G(z))] - E[D(x)] + gradient_penalty; G: -E[D(G(z))]
"""
import torch
import torch.nn.functional as F

from ..kernels.outputs import accumulator_dtype
from ..ops.backends import use_backend
from ..ops.functional import sigmoid_bce

LOSSES = ("bce", "lsgan", "wgan-gp", "hinge")


def _check_pair(real_logits, fake_logits, label_smoothing):
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if real_logits.device != fake_logits.device:
        raise ValueError(f"real_logits are on {real_logits.device} but fake_logits on {fake_logits.device}; "
                         "compute both on one device")


def widen(t):
    """``t`` in float32, or float64 when it is float64: the dtype the losses and the step's values take."""
    return t.to(accumulator_dtype(t.dtype))


def discriminator_loss(real_logits, fake_logits, label_smoothing=0.0, backend=None):
    """BCE(real, 1 - label_smoothing) + BCE(fake, 0), each a mean over its logits.

    One-sided label smoothing (real target 0.9 for 0.1) as in Salimans et al."""
    _check_pair(real_logits, fake_logits, label_smoothing)
    return sigmoid_bce(real_logits, 1.0 - label_smoothing, backend) + sigmoid_bce(fake_logits, 0.0, backend)


def generator_loss(fake_logits, backend=None):
    """Non-saturating generator loss: BCE(fake, 1)."""
    return sigmoid_bce(fake_logits, 1.0, backend)


def lsgan_discriminator_loss(real_out, fake_out, label_smoothing=0.0):
    """1/2 mean((real - (1 - label_smoothing))^2) + 1/2 mean(fake^2)."""
    _check_pair(real_out, fake_out, label_smoothing)
    real, fake = widen(real_out), widen(fake_out)
    return 0.5 * (real - (1.0 - label_smoothing)).square().mean() + 0.5 * fake.square().mean()


def lsgan_generator_loss(fake_out):
    """1/2 mean((fake - 1)^2)."""
    return 0.5 * (widen(fake_out) - 1.0).square().mean()


def hinge_discriminator_loss(real_out, fake_out):
    """mean(relu(1 - real)) + mean(relu(1 + fake))."""
    _check_pair(real_out, fake_out, 0.0)
    return F.relu(1.0 - widen(real_out)).mean() + F.relu(1.0 + widen(fake_out)).mean()


def wasserstein_discriminator_loss(real_out, fake_out):
    """mean(fake) - mean(real): the critic's loss of WGAN (add gradient_penalty for WGAN-GP)."""
    _check_pair(real_out, fake_out, 0.0)
    return widen(fake_out).mean() - widen(real_out).mean()


def wasserstein_generator_loss(fake_out):
    """-mean(fake): the generator loss of WGAN and of the hinge loss."""
    return -widen(fake_out).mean()


def gradient_penalty(critic, real, fake, weight=10.0, alpha=None):
    """WGAN-GP (Gulrajani et al.): weight * mean_i (||d critic(x_i)/d x_i||_2 - 1)^2, x = alpha*real + (1-alpha)*fake.

    critic: images (N, ...) -> (N,) scores.  alpha: (N,) in [0, 1], uniform random by default.  real and fake
    are detached: the penalty's gradient reaches the critic's parameters only.  Returns a 0-dim fp32 tensor.

    The penalty differentiates the critic's input gradient, a double backward, which the fused ops' first-order
    backward cannot do: the critic runs on the torch backend here, in fp32 (autocast off, so that fp16 input
    gradients cannot overflow), whatever its backend elsewhere.  A BatchNorm in the critic sees this batch
    of interpolates in training mode and updates its running stats, as the same code on a plain torch model does."""
    if not weight >= 0:
        raise ValueError(f"the gradient penalty's weight must be >= 0, got {weight} (a negative weight rewards "
                         "large critic gradients)")
    if real.shape != fake.shape:
        raise ValueError(f"real and fake must have one shape, got {tuple(real.shape)} and {tuple(fake.shape)}")
    n = real.shape[0]
    if alpha is None:
        alpha = torch.rand(n, device=real.device)
    alpha = alpha.to(widen(real).dtype).view(n, *[1] * (real.dim() - 1))
    x = torch.lerp(widen(fake.detach()), widen(real.detach()), alpha).requires_grad_(True)
    with use_backend("torch"), torch.autocast(x.device.type, enabled=False):
        scores = critic(x)
        (grad,) = torch.autograd.grad(scores.sum(), x, create_graph=True)
    return weight * (grad.flatten(1).norm(2, dim=1) - 1.0).square().mean()
