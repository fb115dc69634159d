"""torchrun / DistributedDataParallel helpers, and BatchNorm statistics synchronised across ranks.

``setup()``                 reads torchrun's environment, starts the process group, picks the device
``wrap(model, context)``    DDP with ``broadcast_buffers=False`` (see below)
``sync_batchnorm(model)``   make every BatchNorm fused by fastgan.fuse synchronise its batch statistics
                            (the op behind it: fastgan.ops.sync_bn)

A GAN step runs D several times before one backward (real, then fake).  DDP's default
``broadcast_buffers=True`` overwrites the BN running stats in place at each forward, and the torch
backward saved them: the second forward breaks the first one's backward (pytorch#175024).  fastgan wraps
with ``broadcast_buffers=False``.  Nothing is lost: rank 0 is the broadcast's source, so its running stats
(the ones checkpoints hold) evolve the same either way; the other ranks' are never saved, and train-mode
BatchNorm does not read them.  With sync_batchnorm they are identical on every rank anyway.
"""
import dataclasses
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..ops import backends
from ..usage import UsageError


@dataclasses.dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def main(self):
        return self.rank == 0


def setup(device=None):
    """The process's Context.  Under torchrun (WORLD_SIZE > 1) it starts the process group: nccl on CUDA,
    gloo on CPU, and each rank takes cuda:LOCAL_RANK (``device`` may say "cuda", not which one).  A CUDA
    device becomes the current one, for what runs on the current device's stream."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device) if device else backends.default_device()
    if world_size > 1 and device.type == "cuda":
        if device.index is not None:
            raise UsageError(f"device {device}: under torchrun each process takes cuda:LOCAL_RANK; ask for cuda "
                             "without an index (CUDA_VISIBLE_DEVICES chooses the GPUs)")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1:
        return Context(device=device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(dist.get_rank(), dist.get_world_size(), device)


def wrap(model, context):
    """``model`` in DistributedDataParallel when distributed, else ``model``."""
    if not context.distributed:
        return model
    device_ids = [context.device] if context.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def sync_batchnorm(model, process_group=None):
    """Synchronise the batch statistics of every BatchNorm in ``model`` over ``process_group`` (all ranks
    by default): each normalises with the statistics of the whole global batch, as nn.SyncBatchNorm does.

    The modules keep their type and state_dict; fastgan's fused layers (fastgan.fuse, fastgan.Generator,
    ...) read the group from them.  Returns ``model``."""
    group = process_group if process_group is not None else dist.group.WORLD
    for module in model.modules():
        if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d):
            module.process_group = group
    return model
