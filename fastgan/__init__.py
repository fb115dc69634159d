"""fastgan: fused Triton/CUDA kernels for fast DCGAN training in PyTorch.

    import fastgan
    gan = fastgan.DCGAN(backend="auto").cuda()        # or fastgan.Generator / fastgan.Discriminator
    model = fastgan.fuse(my_sequential_model)          # fuse conv -> BN -> act in your own model

The public names are below; the layers (cli -> perf -> nn -> ops -> kernels) and their modules are in
docs/design.md section 2.
"""
from .nn import fused_conv, losses, presets, reference
from .nn.checkpoint import load_checkpoint, strip_module_prefix
from .nn.fused_conv import set_level
from .nn.layers import FusedSequential, fuse
from .nn.models import DCGAN, Discriminator, Generator
from .nn.step import StepResult
from .ops import functional
from .ops.backends import BACKENDS, use_backend
from .ops.contract import BackendUnavailable
from .usage import UsageError

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendUnavailable", "DCGAN", "Discriminator", "FusedSequential", "Generator",
           "StepResult", "UsageError", "functional", "fuse", "fused_conv", "load_checkpoint", "losses", "presets",
           "reference", "set_level", "strip_module_prefix", "use_backend"]
