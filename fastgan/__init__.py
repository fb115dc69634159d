"""fastgan: fused Triton/CUDA kernels for fast DCGAN training in PyTorch.

    import fastgan
    gan = fastgan.DCGAN(backend="auto").cuda()        # or fastgan.Generator / fastgan.Discriminator
    model = fastgan.fuse(my_sequential_model)          # fuse conv -> BN -> act in your own model

The package is layered, each layer importing only the ones below it:

    fastgan.cli       python -m fastgan: train, sample, interpolate, demo, build-ext (and bench, profile)
    fastgan.perf      FLOPs, benchmarks, profiles, the doctor, the one-call GPU check
    fastgan.nn        modules: fused layers, models, losses, presets, the reference, the L3 step, DDP
    fastgan.ops       the op contract, backends, dispatch, the extension's build, the L2 conv chain
    fastgan.kernels   Triton kernels (kernels/ in the source tree); the C++/CUDA sources are in csrc/

fastgan.usage (UsageError and argparse checks) sits below them all.
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
