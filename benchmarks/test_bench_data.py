"""Input pipeline: images/s delivered at batch 128, 64x64, by today's epoch_loader and by the cached pipeline.

One epoch per timed call; extra_info["images_per_s"] is the delivered rate at the median.  Peers per group:
``epoch_loader`` (fastgan.cli.data.epoch_loader: a DataLoader with collate, 0 workers, per-image Python),
``epoch_loader-decode`` (its folder pass: every file decoded, as every epoch did before the cache),
``feeder`` (the cached uint8 set and fastgan.cli.feed.Feeder's batches; ``feeder-2-threads``: two host
threads instead of the CPU's default one), ``first-run`` (the cache built from the
files, then an epoch of the Feeder).  Folder: CelebA-sized (178x218) JPEGs made here.  On a GPU, device-resident
and streamed batches too, and fastgan train's loop beside the bare captured step.  In --benchmark-disable
mode (CI) every set is small and each call runs once.
"""
import argparse
import gzip
import math
import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from fastgan.cli import data, progress, train
from fastgan.nn import distributed

SIZE, BATCH = 64, 128
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def full(request):
    """Measuring (True), or a --benchmark-disable smoke run on small sets (False)."""
    return not request.config.option.benchmark_disable


def _rate(benchmark, images, **extra):
    benchmark.extra_info.update(images=images, batch=BATCH, size=SIZE, **extra)
    if benchmark.enabled and benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = round(images / benchmark.stats.stats.median)


def _epoch(batches, device=None):
    n = 0
    for real in batches:
        n += len(real[0] if isinstance(real, tuple) else real)  # epoch_loader's: (images, failed)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return n


def _feeder_epoch(dataset, device="cpu", **kwargs):
    feeder = data.Feeder(dataset.images, BATCH, device, seed=1, **kwargs)
    return lambda: _epoch(feeder.epoch(0), feeder.device)


@pytest.mark.parametrize("peer", ["epoch_loader", "feeder", "feeder-2-threads"])
def test_builtin(benchmark, full, peer):
    dataset = data.Builtin(SIZE, length=8192 if full else 2 * BATCH)
    run = (lambda: _epoch(data.epoch_loader(dataset, BATCH, 0, 1))) if peer == "epoch_loader" else \
        _feeder_epoch(dataset, threads=2 if peer == "feeder-2-threads" else None)
    benchmark.group = "data builtin b128 64x64 cpu"
    images = benchmark.pedantic(run, rounds=5 if full else 1, warmup_rounds=1 if full else 0)
    _rate(benchmark, images, peer=peer)


def _celeba_like(root, n):
    """n JPEGs of 178x218 (CelebA's aligned size): builtin's gradients and shapes, with sensor-like noise."""
    root.mkdir()
    rng = np.random.default_rng(0)
    pixels = data.Builtin(218, length=n, seed=5, chunk=64).images.permute(0, 2, 3, 1).numpy()[:, :, 20:198]
    for i, image in enumerate(pixels):
        noisy = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(root / f"{i:06d}.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory, full):
    return _celeba_like(tmp_path_factory.mktemp("celeba") / "img_align", 1600 if full else BATCH + 8)


@pytest.mark.parametrize("peer", ["epoch_loader-decode", "first-run", "feeder"])
def test_folder(benchmark, full, jpegs, tmp_path, peer):
    benchmark.group = "data folder 178x218 jpeg b128 64x64 cpu"
    cache = tmp_path / "cache"
    rounds = dict(rounds=3 if full else 1)
    if peer == "epoch_loader-decode":
        images = benchmark.pedantic(lambda: _epoch(data.epoch_loader(data.Folder(str(jpegs), SIZE), BATCH, 0, 1)),
                                    **rounds)
    elif peer == "first-run":
        def first_run():
            dataset = data.make_dataset("folder", str(jpegs), SIZE, 3, cache_dir=str(cache))
            return _feeder_epoch(dataset)()

        images = benchmark.pedantic(first_run, setup=lambda: shutil.rmtree(cache, ignore_errors=True), **rounds)
    else:
        data.make_dataset("folder", str(jpegs), SIZE, 3, cache_dir=str(cache))
        dataset = data.make_dataset("folder", str(jpegs), SIZE, 3, cache_dir=str(cache))  # a later run's start
        images = benchmark.pedantic(_feeder_epoch(dataset), rounds=20 if full else 1, warmup_rounds=int(full))
    _rate(benchmark, images, peer=peer, files=len(data.Folder(str(jpegs), SIZE)))


class _TodaysMnist(Dataset):
    """MNIST as fastgan read it before the cache: uint8 (N, 28, 28) in memory, resized on each access."""

    def __init__(self, images, size):
        self.images, self.size = images, size

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index].float().div(127.5).sub(1.0)[None]
        return F.interpolate(image[None], size=(self.size, self.size), mode="bilinear", antialias=True,
                             align_corners=False)[0], index


@pytest.mark.parametrize("peer", ["epoch_loader", "feeder"])
def test_mnist(benchmark, full, tmp_path, peer):
    benchmark.group = "data mnist 28->64 b128 cpu"
    pixels = np.random.default_rng(0).integers(0, 256, (60_000 if full else 2 * BATCH, 28, 28), dtype=np.uint8)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\0\0\x08\x03" + np.array(pixels.shape, dtype=">u4").tobytes() + pixels.tobytes())
    if peer == "epoch_loader":
        dataset = _TodaysMnist(torch.from_numpy(pixels), SIZE)
        run = lambda: _epoch(data.epoch_loader(dataset, BATCH, 0, 1))  # noqa: E731
    else:
        run = _feeder_epoch(data.make_dataset("mnist", str(tmp_path), SIZE, 1, cache_dir=str(tmp_path / "cache")))
    images = benchmark.pedantic(run, rounds=3 if full else 1)
    _rate(benchmark, images, peer=peer)


@pytest.mark.parametrize("peer", ["epoch_loader", "feeder"])
def test_cifar10(benchmark, full, tmp_path, peer):
    """CIFAR-10 was not readable before; epoch_loader here batches the cached set the DataLoader way."""
    benchmark.group = "data cifar10 32->64 b128 cpu"
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        rows = rng.integers(0, 256, (10_000 if full else BATCH // 2, 3072), dtype=np.uint8)
        with open(tmp_path / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": rows, b"labels": [0] * len(rows)}, f, protocol=2)
    dataset = data.make_dataset("cifar10", str(tmp_path), SIZE, 3, cache_dir=str(tmp_path / "cache"))
    run = (lambda: _epoch(data.epoch_loader(dataset, BATCH, 0, 1))) if peer == "epoch_loader" else \
        _feeder_epoch(dataset)
    images = benchmark.pedantic(run, rounds=3 if full else 1)
    _rate(benchmark, images, peer=peer)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA: device-resident and streamed batches")
@pytest.mark.parametrize("peer", ["feeder-resident", "feeder-streamed"])
def test_builtin_gpu(benchmark, peer):
    benchmark.group = "data builtin b128 64x64 cuda"
    dataset = data.Builtin(SIZE, length=65_536)
    run = _feeder_epoch(dataset, torch.device("cuda"), resident=peer == "feeder-resident",
                        memory_format=torch.channels_last)
    images = benchmark.pedantic(run, rounds=10, warmup_rounds=1)
    _rate(benchmark, images, peer=peer)


def _train_run(outf, steps, device, *flags):
    """fastgan train's Run for ``steps`` batches of BATCH builtin images, built but not started (--dry-run: it
    writes nothing)."""
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--outf", str(outf), "--batchSize", str(BATCH), "--builtin-images", str(BATCH * steps),
                              "--manualSeed", "1", "--device", str(device), "--dry-run", "--save-every", "0", *flags])
    return train.Run(args, distributed.Context(device=device))


def _loop(run, steps):
    """Run._epoch over one epoch from step 1 (step 0 would write real_samples.png), the values read at the end."""
    def epoch():
        run.step, run.batch = 1, 0
        with progress.EpochProgress(steps, 0, 0, 1, enabled=False) as bar:
            run._epoch(iter(run.feeder.epoch(0, in_place=run.trainer.captured is not None)), bar, math.inf)
        run.collect(wait=True)
        return BATCH * steps
    return epoch


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA: fastgan train's loop against the bare step on a GPU")
@pytest.mark.parametrize("peer", ["bare-captured-step", "train-loop", "train-loop-eager"])
def test_train_loop_gpu(benchmark, tmp_path, peer):
    """fastgan train's loop (Run._epoch: the Feeder's resident batches gathered inside the captured step, the
    values into the device window, read every --log-every 10 steps) beside the bare captured step replayed on
    one resident batch: the loop's cost to a training run (the goal: within 10%).  train-loop-eager: --graph off."""
    device, steps = torch.device("cuda"), 50
    run = _train_run(tmp_path, steps, device, "--graph", "off" if peer == "train-loop-eager" else "on")
    assert run.feeder.resident and (run.trainer.captured is None) == (peer == "train-loop-eager")
    batch = run.feeder.resident_batch

    def bare():
        for _ in range(steps):
            run.trainer.step(batch)
        torch.cuda.synchronize(device)
        return BATCH * steps

    benchmark.group = "fastgan train loop b128 64x64 cuda"
    images = benchmark.pedantic(bare if peer == "bare-captured-step" else _loop(run, steps), rounds=5,
                                warmup_rounds=1)
    _rate(benchmark, images, peer=peer, resident=run.feeder.resident)
