"""Batches built on the device they train on: a uint8 image set indexed, normalised and flipped there.

    feeder = Feeder(images, batch_size, device, seed, rank, world_size, failed={i: name}, flip=False)
    for real, failed in feeder.epoch(epoch, skip_batches):  # real: float32 (B, C, S, S) in [-1, 1] on device
        ...

The batches are epoch_loader's (fastgan.cli.data) to the bit: a DistributedSampler shuffle from (seed, epoch)
for this rank, incomplete batches dropped, the first ``skip_batches`` left out (a resumed epoch), x / 127.5 - 1
in fp32; a failed item's place goes to a repeat of the batch's good images (collate's rule) and its index into
``failed``; a batch without a good image comes as (None, failed).  ``flip``: each image mirrored left-right
with probability 1/2, drawn from (seed, epoch, rank), so a resumed epoch flips the same images.

Where the set lives:
- resident: on the CPU, and on a GPU when it takes under half its free memory: the whole uint8 set on the
  device; a batch is an index_select and three elementwise ops, with no host sync and no per-image Python.
- streamed: a GPU with less room.  A thread gathers each batch's uint8 rows into pinned host memory,
  ``prefetch`` batches ahead; the copy runs on a side stream, the normalisation on the consumer's stream.
"""
import queue
import threading

import numpy as np
import torch
from torch.utils.data import DistributedSampler

RESIDENT_SHARE = 0.5  # of the GPU's free memory that a resident set may take


def epoch_indices(n, batch_size, epoch, seed, rank=0, world_size=1):
    """int64 (steps, batch_size): this rank's batches of one epoch of an n-item set, as epoch_loader orders them."""
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    order = np.fromiter(iter(sampler), dtype=np.int64)
    steps = len(order) // batch_size
    return order[:steps * batch_size].reshape(steps, batch_size)


def fill_failed(rows, failed):
    """collate's rule on index batches (steps, B), in place: a failed item's place goes to the batch's good ones,
    good first, then repeats.  Returns ({step: failed indices}, {steps with no good item})."""
    bad = np.isin(rows, np.fromiter(failed, dtype=np.int64, count=len(failed)))
    lost, dead = {}, set()
    for step in np.flatnonzero(bad.any(axis=1)):
        good = rows[step][~bad[step]]
        lost[int(step)] = rows[step][bad[step]].tolist()
        if len(good):
            rows[step] = np.concatenate([good, good[np.arange(bad[step].sum()) % len(good)]])
        else:
            dead.add(int(step))
    return lost, dead


class Feeder:
    """This rank's batches of ``images`` (uint8 (N, C, S, S), CPU, e.g. memory-mapped) on ``device``.

    ``resident``: None decides (see the module); True/False force it (a set forced resident on a GPU must fit).
    ``memory_format``: the batches' (torch.channels_last for a channels-last model)."""

    def __init__(self, images, batch_size, device, seed, rank=0, world_size=1, failed=(), flip=False,
                 memory_format=torch.contiguous_format, resident=None, prefetch=4):
        self.device = torch.device(device)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.failed, self.flip, self.memory_format, self.prefetch = set(failed), flip, memory_format, prefetch
        self.n = len(images)
        self.steps_per_epoch = self.n // world_size // batch_size
        cuda = self.device.type == "cuda"
        if resident is None:
            resident = not cuda or images.nbytes < RESIDENT_SHARE * torch.cuda.mem_get_info(self.device)[0]
        self.resident = resident
        self.images = images.to(self.device) if resident else images
        self.copy_stream = torch.cuda.Stream(self.device) if cuda and not resident else None

    def describe(self):
        size = f"{self.images.nbytes / 2**20:.0f} MiB of uint8 images"
        if self.resident:
            return f"{size} in {self.device} memory, batches built there"
        return f"{size} streamed from pinned host memory to {self.device}, {self.prefetch} batches ahead"

    def epoch(self, epoch, skip_batches=0):
        """The batches of ``epoch`` from batch ``skip_batches`` on, as an iterable with a length."""
        return _Epoch(self, epoch, skip_batches)

    def _plan(self, epoch, skip_batches):
        rows = epoch_indices(self.n, self.batch_size, epoch, self.seed, self.rank, self.world_size)
        flips = None
        if self.flip:
            flips = np.random.default_rng([self.seed, epoch, self.rank]).random(rows.shape) < 0.5
            flips = torch.from_numpy(flips[skip_batches:])
        rows = rows[skip_batches:]
        lost, dead = fill_failed(rows, self.failed) if self.failed else ({}, set())
        return torch.from_numpy(rows), flips, lost, dead

    def _normalise(self, pixels, flips):
        """uint8 (B, C, S, S) on the device -> float32 x / 127.5 - 1, mirrored where ``flips``."""
        if flips is not None:
            pixels = torch.where(flips.view(-1, 1, 1, 1), pixels.flip(3), pixels)
        out = torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device, memory_format=self.memory_format)
        return out.copy_(pixels).div_(127.5).sub_(1.0)

    def _resident(self, rows, flips, lost, dead):
        rows = rows.to(self.device, non_blocking=True)
        flips = flips.to(self.device, non_blocking=True) if flips is not None else None
        for step in range(len(rows)):
            if step in dead:
                yield None, lost[step]
                continue
            pixels = self.images.index_select(0, rows[step])
            yield self._normalise(pixels, flips[step] if flips is not None else None), lost.get(step, [])

    def _streamed(self, rows, flips, lost, dead):
        ready, stop = queue.Queue(self.prefetch), threading.Event()
        shape, pin = (self.batch_size, *self.images.shape[1:]), self.device.type == "cuda"

        def put(item):
            while not stop.is_set():
                try:
                    return ready.put(item, timeout=0.1)
                except queue.Full:
                    pass

        def gather():
            try:
                for step in range(len(rows)):
                    if stop.is_set():
                        return
                    # a fresh block each time: the pinned-memory cache reuses it only after its copy has run
                    put(torch.index_select(self.images, 0, rows[step],
                                           out=torch.empty(shape, dtype=torch.uint8, pin_memory=pin)))
            except BaseException as exc:  # handed to the consumer, which raises it
                put(exc)

        thread = threading.Thread(target=gather, name="fastgan-feed", daemon=True)
        thread.start()
        flips = flips.to(self.device) if flips is not None else None
        try:
            for step in range(len(rows)):
                pixels = ready.get()
                if isinstance(pixels, BaseException):
                    raise pixels
                if step in dead:
                    yield None, lost[step]
                    continue
                yield self._normalise(self._to_device(pixels), flips[step] if flips is not None else None), \
                    lost.get(step, [])
        finally:
            stop.set()
            thread.join()

    def _to_device(self, pixels):
        if self.copy_stream is None:
            return pixels.to(self.device)
        with torch.cuda.stream(self.copy_stream):
            moved = pixels.to(self.device, non_blocking=True)
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_stream(self.copy_stream)
        moved.record_stream(consumer)  # allocated on the copy stream, used on the consumer's
        return moved


class _Epoch:
    def __init__(self, feeder, epoch, skip_batches):
        self.feeder, self.epoch, self.skip_batches = feeder, epoch, skip_batches

    def __len__(self):
        return max(0, self.feeder.steps_per_epoch - self.skip_batches)

    def __iter__(self):
        f = self.feeder
        plan = f._plan(self.epoch, self.skip_batches)
        return f._resident(*plan) if f.resident else f._streamed(*plan)
