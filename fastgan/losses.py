"""GAN losses on logits, fused: sigmoid + BCE with its gradient in one kernel, fp32 result."""
from .functional import sigmoid_bce


def discriminator_loss(real_logits, fake_logits, label_smoothing=0.0, backend=None):
    """BCE(real, 1 - label_smoothing) + BCE(fake, 0), each a mean over its logits.

    One-sided label smoothing (real target 0.9 for 0.1) as in Salimans et al."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if real_logits.device != fake_logits.device:
        raise ValueError(f"real_logits are on {real_logits.device} but fake_logits on {fake_logits.device}; "
                         "compute both on one device")
    return sigmoid_bce(real_logits, 1.0 - label_smoothing, backend) + sigmoid_bce(fake_logits, 0.0, backend)


def generator_loss(fake_logits, backend=None):
    """Non-saturating generator loss: BCE(fake, 1)."""
    return sigmoid_bce(fake_logits, 1.0, backend)
