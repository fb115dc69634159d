"""Training images: builtin and fake (generated), folder/imagenet/lfw (image trees), mnist, cifar10 and lsun.

    dataset = make_dataset("folder", "~/celeba", size=64, nc=3)   # Images: uint8 (N, 3, 64, 64), decoded once
    feeder = Feeder(dataset.images, batch, device, seed, rank, world_size)
    for real in feeder.epoch(epoch, skip_batches): ...  # float32 batches on the device (fastgan.cli.feed)

The datasets read from files are decoded once into a cache (fastgan.cli.imagecache) and memory-mapped from it
after; the cache holds the files that decode, and says, when it is built and at each load, which did not and
why.  Every dataset is also a torch Dataset of (image, index): image a float32 (nc, size, size) tensor in
[-1, 1], or None for an item that did not decode (Folder decodes each file when it is read);
:func:`epoch_loader` batches one through a DataLoader with :func:`collate`, which fills such places with repeats
of the batch's good images and hands their indices to the caller.  The Feeder gives the same batches, built on
the device, of a set whose every item decodes (an Images).
"""
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import formats, imagecache
from .feed import Feeder  # noqa: F401  (the batches of an Images set: data.Feeder)
from .formats import IMAGE_EXTENSIONS, MNIST_FILES, DataError  # noqa: F401  (their old home)


def _normalise(pixels):
    """uint8 (C, H, W) tensor -> float32 in [-1, 1]."""
    return pixels.float().div_(127.5).sub_(1.0)


class Images(Dataset):
    """Decoded images: ``images`` uint8 (N, C, S, S) on the CPU (in memory, or mapped from a cache file)."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return _normalise(self.images[index]), index

BUILTIN_DRAWS = 24  # uniform numbers behind one builtin image


def _render_builtin(draws, size):
    """Images (n, size, size, 3) in [0, 1] from uniform draws (n, BUILTIN_DRAWS); see Builtin."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    y, x = axis[None, :, None, None], axis[None, None, :, None]

    def col(j):
        return draws[:, None, None, j:j + 1]

    def colour(j):
        return draws[:, None, None, j:j + 3]

    image = (colour(0) * (1 - x) + colour(3) * x) * (1 - y) + (colour(6) * (1 - x) + colour(9) * x) * y
    edge = 1.5 / size  # shape edges are anti-aliased over about 1.5 pixels
    cx, cy, r = 0.25 + 0.5 * col(12), 0.25 + 0.5 * col(13), 0.12 + 0.14 * col(14)
    cover = np.clip((r - np.sqrt((x - cx) ** 2 + (y - cy) ** 2)) / edge + 0.5, 0, 1)
    image = image * (1 - cover) + colour(15) * cover
    cx, cy, half = 0.2 + 0.6 * col(18), 0.2 + 0.6 * col(19), 0.06 + 0.1 * col(20)
    cover = np.clip((half - np.maximum(abs(x - cx), abs(y - cy))) / edge + 0.5, 0, 1)
    return image * (1 - cover) + colour(21) * cover


class Builtin(Images):
    """Deterministic synthetic images, no download: image i depends only on (seed, i), whatever the length.

    Each is a smooth gradient between four random corner colours, with a disc and a square of random
    colours, sizes and positions on it: a GAN learns the colours and gradients first, then the shapes.
    All are rendered at construction (uint8, nc*size*size bytes each): a batch costs an index."""

    def __init__(self, size, nc=3, length=4096, seed=0, chunk=512):
        super().__init__(torch.empty(length, nc, size, size, dtype=torch.uint8))
        rng = np.random.default_rng(seed)
        for start in range(0, length, chunk):  # rng's stream runs row by row: chunking changes nothing
            n = min(chunk, length - start)
            image = _render_builtin(rng.random((n, BUILTIN_DRAWS), dtype=np.float32), size)
            if nc == 1:
                image = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)[:, None]
            pixels = torch.from_numpy(np.rint(image * 255).astype(np.uint8))
            self.images[start:start + n] = pixels.permute(0, 3, 1, 2)


class Fake(Images):
    """Uniform random images, like examples/dcgan's --dataset fake: image i depends only on (seed, i)."""

    def __init__(self, size, nc=3, length=4096, seed=0):
        images = torch.empty(length, nc, size, size, dtype=torch.uint8)
        for i in range(length):  # a generator per image: the same images whatever the length
            torch.randint(0, 256, images.shape[1:], generator=torch.Generator().manual_seed(seed * 1_000_003 + i),
                          dtype=torch.uint8, out=images[i])
        super().__init__(images)


class Folder(Dataset):
    """Every image file under ``root`` (recursively, sorted), scaled so that its shorter side is ``size``,
    centre-cropped to size x size, RGB (nc=3) or greyscale (nc=1), decoded on each access (make_dataset's
    "folder" decodes once, into a cache, the same way).  A file that does not decode yields None."""

    def __init__(self, root, size, nc=3):
        self.files, self.size, self.nc = formats.image_files(root), size, nc

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        try:
            pixels = formats.fit_image(self.files[index], self.size, self.nc)
        except formats.Unreadable:
            return None, index
        return _normalise(torch.from_numpy(pixels.copy())), index


def cached(source, size, nc, cache_dir=None, workers=None):
    """The Images of ``source`` (an imagecache.Source), decoded into the cache once (``workers`` processes): the
    items that decode (the cache says which did not, and why)."""
    return Images(imagecache.load(source, size, nc, cache_dir, workers))


def mnist(root, size, nc=1, cache_dir=None):
    """MNIST (or any greyscale set) from an idx file, optionally gzipped, or an npz (Keras' mnist.npz):
    ``root`` is the file, or a folder holding one of MNIST_FILES (also under raw/ or MNIST/raw/)."""
    path = formats.mnist_file(root)
    return cached(imagecache.array_source("mnist", root, [path], formats.read_mnist), size, nc, cache_dir)


def cifar10(root, size, nc=3, cache_dir=None):
    """CIFAR-10's 50,000 training images from its python batches (data_batch_1 .. 5, in root or in
    root/cifar-10-batches-py)."""
    paths = formats.cifar10_files(root)
    return cached(imagecache.array_source("cifar10", root, paths, formats.read_cifar10), size, nc, cache_dir)


DATASETS = ("builtin", "fake", "folder", "mnist", "cifar10", "lsun")
FOLDER_ALIASES = ("imagenet", "lfw")  # examples/dcgan's ImageFolder datasets


def make_dataset(name, dataroot, size, nc, length=4096, seed=0, classes=None, cache_dir=None, workers=None):
    """The Images of --dataset ``name``.  length, seed: builtin's and fake's; classes: lsun's (a list, or names
    separated by commas; see formats.lsun_databases); cache_dir: where decoded images are cached (default:
    see fastgan.cli.imagecache); workers: the processes that decode image files into it (default: one per core)."""
    if name == "builtin":
        return Builtin(size, nc, length, seed)
    if name == "fake":
        return Fake(size, nc, length, seed)
    if name not in (*DATASETS, *FOLDER_ALIASES):
        raise DataError(f"--dataset {name} is not supported; use one of {', '.join(DATASETS + FOLDER_ALIASES)}")
    if dataroot is None:
        raise DataError(f"--dataset {name} needs --dataroot")
    if not os.path.exists(dataroot):
        raise DataError(f"--dataroot {dataroot} does not exist")
    if name == "mnist":
        return mnist(dataroot, size, nc, cache_dir)
    if name == "cifar10":
        return cifar10(dataroot, size, nc, cache_dir)
    source = imagecache.lsun_source(dataroot, classes) if name == "lsun" else imagecache.folder_source(name, dataroot)
    return cached(source, size, nc, cache_dir, workers)


def collate(batch):
    """(images (B, nc, S, S), [indices of the files that failed]).  A failed file's place is taken by a
    repeat of a good image of the batch, so that every batch (on every DDP rank) keeps its size; the
    images are None when the whole batch failed."""
    images = [image for image, _ in batch if image is not None]
    failed = [index for image, index in batch if image is None]
    if not images:
        return None, failed
    return torch.stack(images + [images[i % len(images)] for i in range(len(failed))]), failed


def epoch_loader(dataset, batch_size, epoch, seed, rank=0, world_size=1, skip_batches=0, workers=0,
                 pin_memory=False):
    """This rank's batches of one epoch: a DistributedSampler shuffle from (seed, epoch), incomplete batches
    dropped, the first ``skip_batches`` left out (to resume mid-epoch)."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    indices = list(sampler)[skip_batches * batch_size:]
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, drop_last=True, collate_fn=collate,
                      num_workers=workers, pin_memory=pin_memory)
