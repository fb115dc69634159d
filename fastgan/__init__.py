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
import importlib
import importlib.abc
import importlib.util
import os as _os
import sys as _sys
import warnings as _warnings

# From a source checkout (PYTHONPATH=.), kernels/ sits beside the package instead of inside it.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and _os.path.isfile(
        _os.path.join(_root, "kernels", "bn_act.py")):
    __path__.append(_root)

from .nn import fused_conv, losses, presets, reference  # noqa: E402
from .nn.checkpoint import load_checkpoint, strip_module_prefix  # noqa: E402
from .nn.fused_conv import set_level  # noqa: E402
from .nn.layers import FusedSequential, fuse  # noqa: E402
from .nn.models import DCGAN, Discriminator, Generator  # noqa: E402
from .nn.step import StepResult  # noqa: E402
from .ops import functional  # noqa: E402
from .ops.backends import BACKENDS, use_backend  # noqa: E402
from .ops.contract import BackendUnavailable  # noqa: E402
from .usage import UsageError  # noqa: E402

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendUnavailable", "DCGAN", "Discriminator", "FusedSequential", "Generator",
           "StepResult", "UsageError", "functional", "fuse", "fused_conv", "load_checkpoint", "losses", "presets",
           "reference", "set_level", "strip_module_prefix", "use_backend"]

# Module paths from before the layered layout: old name -> (new name, still a documented path).
# The documented ones keep working silently; the others warn (FutureWarning: users' scripts should see it).
MOVED_MODULES = {
    "fastgan.functional": ("fastgan.ops.functional", True),
    "fastgan.fused_conv": ("fastgan.nn.fused_conv", True),
    "fastgan.losses": ("fastgan.nn.losses", True),
    "fastgan.presets": ("fastgan.nn.presets", True),
    "fastgan.reference": ("fastgan.nn.reference", True),
    "fastgan.backends": ("fastgan.ops.backends", False),
    "fastgan._build": ("fastgan.ops.extension", False),
    "fastgan.ext_ops": ("fastgan.ops.ext_ops", False),
    "fastgan.layers": ("fastgan.nn.layers", False),
    "fastgan.models": ("fastgan.nn.models", False),
    "fastgan.step": ("fastgan.nn.step", False),
    "fastgan.checkpoint": ("fastgan.nn.checkpoint", False),
    "fastgan.distributed": ("fastgan.nn.distributed", False),
    "fastgan.bench": ("fastgan.perf.bench", False),
    "fastgan.profiling": ("fastgan.perf.profiling", False),
    "fastgan.flops": ("fastgan.perf.flops", False),
    "fastgan.train": ("fastgan.cli.train", False),
    "fastgan.data": ("fastgan.cli.data", False),
    "fastgan.sample": ("fastgan.cli.sample", False),
    "fastgan.interpolate": ("fastgan.cli.interpolate", False),
    "fastgan.demo": ("fastgan.cli.demo", False),
    "fastgan.build_ext": ("fastgan.cli.build_ext", False),
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import fastgan.<old>`` gives the module at its new place (the same module object, not a copy)."""

    def __init__(self):
        self._specs = {}  # alias -> the module's own spec, which the import machinery overwrites with the alias's

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED_MODULES else None

    def create_module(self, spec):
        new, documented = MOVED_MODULES[spec.name]
        if not documented:
            _warnings.warn(f"{spec.name} moved to {new}; import it from there", FutureWarning, stacklevel=2)
        module = importlib.import_module(new)
        self._specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._specs.pop(module.__spec__.name)


_sys.meta_path.append(_MovedModuleFinder())
