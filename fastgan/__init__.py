"""fastgan: fused Triton/CUDA kernels for fast DCGAN training in PyTorch.

    import fastgan
    gan = fastgan.DCGAN(backend="auto").cuda()        # or fastgan.Generator / fastgan.Discriminator
    model = fastgan.fuse(my_sequential_model)          # fuse conv -> BN -> act in your own model
"""
import os as _os

# From a source checkout (PYTHONPATH=.), kernels/ sits beside the package instead of inside it.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and _os.path.isfile(
        _os.path.join(_root, "kernels", "bn_act.py")):
    __path__.append(_root)

from . import functional, losses, reference  # noqa: E402
from .backends import BACKENDS, BackendUnavailable, use_backend  # noqa: E402
from .checkpoint import load_checkpoint, strip_module_prefix  # noqa: E402
from .layers import FusedSequential, fuse  # noqa: E402
from .models import DCGAN, Discriminator, Generator, StepResult  # noqa: E402
from . import fused_conv, presets  # noqa: E402

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendUnavailable", "DCGAN", "Discriminator", "FusedSequential", "Generator",
           "StepResult", "functional", "fuse", "fused_conv", "load_checkpoint", "losses", "presets", "reference",
           "strip_module_prefix", "use_backend"]
