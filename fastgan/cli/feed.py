"""Batches built without per-image Python: a uint8 image set indexed, normalised and flipped in whole batches.

    feeder = Feeder(images, batch_size, device, seed, rank, world_size, flip=False)
    for real in feeder.epoch(epoch, skip_batches):  # real: float32 (B, C, S, S) in [-1, 1] on device
        ...
    for real in feeder.epoch(epoch, skip_batches, in_place=True):  # resident: real() makes the batch
        ...

The batches are epoch_loader's (fastgan.cli.data) to the bit: a DistributedSampler shuffle from (seed, epoch)
for this rank, incomplete batches dropped, the first ``skip_batches`` left out (a resumed epoch), x / 127.5 - 1
in fp32.  Every item is an image: the datasets behind a Feeder hold only images that decode (the image cache
leaves the others out).  ``flip``: each image mirrored left-right with probability 1/2, drawn from (seed,
epoch, rank), so a resumed epoch flips the same images.

Where a batch is built:
- resident (a GPU with room: the set takes under half its free memory): the whole uint8 set on the device; a
  batch is an index_select and three elementwise ops there, launched with no host sync.  The index is a static
  device tensor (ResidentBatch) that the Feeder fills from the epoch's order before each batch; ``in_place``
  hands out the ResidentBatch itself, whose call gathers the batch: a CUDA graph that calls it reads each
  batch from the set with no copy on the host's behalf (fastgan.nn.step.CapturedStep).
- on the host (the CPU; a GPU with less room): ``threads`` threads gather each batch's uint8 rows (numpy, which
  releases the GIL and runs no thread pool of its own: torch's OpenMP ops ran several times slower on a busy
  machine), ``prefetch`` batches ahead.
  For the CPU they also normalise; for a GPU the rows go into pinned memory, are copied on a side stream and
  normalised on the consumer's stream.  Host batches on the CPU are several MiB each, and glibc hands such a
  freed block back to the OS and faults fresh pages in for the next one (a third of a batch's cost); the
  Feeder asks glibc to keep them in the heap, as jemalloc or tcmalloc would (PyTorch's CPU tuning advice).
Either way can be forced with ``resident`` (resident on the CPU runs the device path's torch ops there).
"""
import collections
import concurrent.futures
import ctypes
import functools
import itertools
import platform

import numpy as np
import torch
from torch.utils.data import DistributedSampler

RESIDENT_SHARE = 0.5  # of the GPU's free memory that a resident set may take
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def keep_freed_blocks_in_heap():
    """glibc only: blocks under 32 MiB come from the heap, and up to 128 MiB of free heap stays mapped."""
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's own ceiling for its adaptive threshold
        libc.mallopt(M_TRIM_THRESHOLD, 128 << 20)


def epoch_indices(n, batch_size, epoch, seed, rank=0, world_size=1):
    """int64 (steps, batch_size): this rank's batches of one epoch of an n-item set, as epoch_loader orders them."""
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    order = np.fromiter(iter(sampler), dtype=np.int64)
    steps = len(order) // batch_size
    return order[:steps * batch_size].reshape(steps, batch_size)


class Feeder:
    """This rank's batches of ``images`` (uint8 (N, C, S, S), CPU, e.g. memory-mapped) on ``device``.

    ``resident``: None decides (see the module), True/False force it (a set forced resident on a GPU must fit).
    ``memory_format``: the batches' (torch.channels_last for a channels-last model)."""

    def __init__(self, images, batch_size, device, seed, rank=0, world_size=1, flip=False,
                 memory_format=torch.contiguous_format, resident=None, threads=None, prefetch=None):
        self.device = torch.device(device)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.flip, self.memory_format = flip, memory_format
        self.n = len(images)
        self.steps_per_epoch = self.n // world_size // batch_size
        cuda = self.device.type == "cuda"
        if resident is None:
            resident = cuda and images.nbytes < RESIDENT_SHARE * torch.cuda.mem_get_info(self.device)[0]
        self.resident = resident
        self.images = images.to(self.device) if resident else images
        self.pixels = None if resident else images.numpy()
        # the CPU: one thread overlaps the consumer; more contend for the cores the consumer trains on
        self.threads = threads or (2 if cuda else 1)
        self.prefetch = prefetch or 2 * self.threads + 2
        self.copy_stream = torch.cuda.Stream(self.device) if cuda and not resident else None
        self.resident_batch = ResidentBatch(self) if resident else None
        # a device tensor, not the number: CUDA divides by a Python scalar as a multiply by its reciprocal, which
        # leaves x / 127.5 - 1 one ulp off the CPU's for 111 of the 256 values
        self.half_range = torch.tensor(127.5, device=self.device)
        if not cuda and not resident:
            keep_freed_blocks_in_heap()

    def describe(self):
        size = f"{self.images.nbytes / 2**20:.0f} MiB of uint8 images"
        if self.resident:
            return f"{size} in {self.device} memory, batches built there"
        pinned = ", pinned, copied asynchronously" if self.copy_stream is not None else ""
        return f"{size} in host memory, batches built by {self.threads} threads{pinned}, {self.prefetch} ahead"

    def epoch(self, epoch, skip_batches=0, in_place=False):
        """The batches of ``epoch`` from batch ``skip_batches`` on, as an iterable with a length.  ``in_place``
        (a resident set): each batch as the ResidentBatch, filled for it, instead of a tensor."""
        return _Epoch(self, epoch, skip_batches, in_place)

    def _plan(self, epoch, skip_batches):
        rows = epoch_indices(self.n, self.batch_size, epoch, self.seed, self.rank, self.world_size)
        flips = None
        if self.flip:
            flips = np.random.default_rng([self.seed, epoch, self.rank]).random(rows.shape)[skip_batches:] < 0.5
        return rows[skip_batches:], flips

    def _normalise(self, pixels, flips):
        """uint8 (B, C, S, S) tensor on the device -> float32 x / 127.5 - 1, mirrored where ``flips``."""
        if flips is not None:
            pixels = torch.where(flips.view(-1, 1, 1, 1), pixels.flip(3), pixels)
        out = torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device, memory_format=self.memory_format)
        return out.copy_(pixels).div_(self.half_range).sub_(1.0)

    def _resident(self, rows, flips, in_place):
        batch = self.resident_batch
        rows = torch.from_numpy(rows).to(self.device).unbind(0)
        flips = torch.from_numpy(flips).to(self.device).unbind(0) if flips is not None else None
        for step in range(len(rows)):
            batch.index.copy_(rows[step], non_blocking=True)
            if flips is not None:
                batch.flips.copy_(flips[step], non_blocking=True)
            yield batch if in_place else batch()

    def _host_batch(self, rows, flips):
        """Runs in a thread: the batch's uint8 rows, mirrored where ``flips``; for the CPU, normalised (numpy)."""
        cuda = self.copy_stream is not None
        out = torch.empty((len(rows), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=cuda)
        pixels = np.take(self.pixels, rows, axis=0, out=out.numpy(), mode="clip")  # clip: unbuffered; rows are valid
        if flips is not None:
            pixels[flips] = pixels[flips][..., ::-1]
        if cuda:
            return out
        batch = torch.empty(out.shape, dtype=torch.float32, memory_format=self.memory_format)
        values = batch.numpy()  # a view, with the batch's strides
        np.divide(pixels, np.float32(127.5), out=values, dtype=np.float32)
        np.subtract(values, np.float32(1.0), out=values)
        return batch

    def _on_host(self, rows, flips):
        todo = iter(range(len(rows)))
        with concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="fastgan-feed") as pool:
            ahead = collections.deque()  # the futures of the next batches, in order
            try:
                for _ in range(len(rows)):
                    for s in itertools.islice(todo, self.prefetch - len(ahead)):
                        ahead.append(pool.submit(self._host_batch, rows[s], None if flips is None else flips[s]))
                    batch = ahead.popleft().result()
                    yield self._to_device(batch) if self.copy_stream is not None else batch
            finally:
                for future in ahead:
                    future.cancel()

    def _to_device(self, pixels):
        """Pinned uint8 rows -> the normalised batch on the GPU; the copy overlaps the consumer's work."""
        with torch.cuda.stream(self.copy_stream):
            moved = pixels.to(self.device, non_blocking=True)
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_stream(self.copy_stream)
        moved.record_stream(consumer)  # allocated on the copy stream, used on the consumer's
        return self._normalise(moved, None)


class ResidentBatch:
    """A resident set's current batch as static device tensors: ``index`` (B,) int64 and ``flips`` (B,) bool (or
    None without flipping), which the Feeder fills before each batch.  Calling it gathers the batch from the set
    and normalises it on the device: inside a CUDA graph, each replay reads the batch the Feeder selected."""

    def __init__(self, feeder):
        self.feeder = feeder
        self.index = torch.zeros(feeder.batch_size, dtype=torch.int64, device=feeder.device)
        self.flips = torch.zeros(feeder.batch_size, dtype=torch.bool, device=feeder.device) if feeder.flip else None

    def __call__(self):
        return self.feeder._normalise(self.feeder.images.index_select(0, self.index), self.flips)


class _Epoch:
    def __init__(self, feeder, epoch, skip_batches, in_place):
        self.feeder, self.epoch, self.skip_batches, self.in_place = feeder, epoch, skip_batches, in_place

    def __len__(self):
        return max(0, self.feeder.steps_per_epoch - self.skip_batches)

    def __iter__(self):
        f = self.feeder
        plan = f._plan(self.epoch, self.skip_batches)
        return f._resident(*plan, self.in_place) if f.resident else f._on_host(*plan)
