"""Training images: builtin (generated, no download), folder (any image tree), mnist (idx or npz files).

Every dataset yields (image, index): image is a float32 (nc, size, size) tensor in [-1, 1], or None for a
file that does not decode; :func:`collate` fills such places with repeats of the batch's good images and
hands their indices to the training loop, which counts them.
"""
import gzip
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..usage import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DataError(UsageError):
    """The data cannot be used as asked; the message says why and what to do."""


def _to_tensor(pixels):
    """uint8 (H, W) or (H, W, C) array -> float32 (C, H, W) in [-1, 1]."""
    t = torch.from_numpy(np.array(pixels))  # a copy: PIL's arrays are read-only
    t = t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)
    return t.float().div_(127.5).sub_(1.0)


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


class Builtin(Dataset):
    """Deterministic synthetic images, no download: image i depends only on (seed, i), whatever the length.

    Each is a smooth gradient between four random corner colours, with a disc and a square of random
    colours, sizes and positions on it: a GAN learns the colours and gradients first, then the shapes.
    All are rendered at construction (uint8, nc*size*size bytes each): a batch costs an index."""

    def __init__(self, size, nc=3, length=4096, seed=0, chunk=512):
        self.images = torch.empty(length, nc, size, size, dtype=torch.uint8)
        rng = np.random.default_rng(seed)
        for start in range(0, length, chunk):  # rng's stream runs row by row: chunking changes nothing
            n = min(chunk, length - start)
            image = _render_builtin(rng.random((n, BUILTIN_DRAWS), dtype=np.float32), size)
            if nc == 1:
                image = image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)[:, None]
            pixels = torch.from_numpy(np.rint(image * 255).astype(np.uint8))
            self.images[start:start + n] = pixels.permute(0, 3, 1, 2)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index].float().div_(127.5).sub_(1.0), index


class Folder(Dataset):
    """Every image file under ``root`` (recursively, sorted), scaled so that its shorter side is ``size``,
    centre-cropped to size x size, RGB (nc=3) or greyscale (nc=1).  A file that does not decode yields None."""

    def __init__(self, root, size, nc=3):
        if not os.path.isdir(root):
            raise DataError(f"--dataroot {root} is not a directory; point it at a folder of images")
        self.files = sorted(os.path.join(d, f) for d, _, files in os.walk(root, followlinks=True) for f in files
                            if f.lower().endswith(IMAGE_EXTENSIONS))
        if not self.files:
            raise DataError(f"--dataroot {root} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} "
                            "in it and its subfolders)")
        self.size, self.mode = size, "RGB" if nc == 3 else "L"

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        from PIL import Image, ImageOps

        try:
            with Image.open(self.files[index]) as image:
                image = ImageOps.fit(image.convert(self.mode), (self.size, self.size), Image.BILINEAR)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None, index
        return _to_tensor(np.asarray(image)), index


class Tensors(Dataset):
    """uint8 images (N, H, W) in memory, resized on access to size x size."""

    def __init__(self, images, size):
        self.images, self.size = images, size

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index].float().div(127.5).sub(1.0)[None]
        if image.shape[-1] != self.size:
            image = F.interpolate(image[None], size=(self.size, self.size), mode="bilinear", antialias=True,
                                  align_corners=False)[0]
        return image, index


def _read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:3] != b"\0\0\x08" or data[3] != 3:
        raise DataError(f"{path} is not an idx file of uint8 images (magic 0x00000803)")
    n, h, w = np.frombuffer(data, dtype=">u4", count=3, offset=4)
    if len(data) != 16 + int(n) * int(h) * int(w):
        raise DataError(f"{path} holds {len(data) - 16} bytes of pixels, expected {n}x{h}x{w}: the file is cut short")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(int(n), int(h), int(w))


def _read_npz(path):
    with np.load(path) as archive:
        for key in ("x_train", "images", *archive.files):
            if key in archive.files and archive[key].ndim == 3:
                return archive[key]
    raise DataError(f"{path} has no (N, H, W) image array (looked for x_train, images, then any 3-d array)")


MNIST_FILES = ("train-images-idx3-ubyte", "train-images.idx3-ubyte", "train-images-idx3-ubyte.gz", "mnist.npz")


def mnist(root, size):
    """MNIST (or any greyscale set) from an idx file, optionally gzipped, or an npz (Keras' mnist.npz):
    ``root`` is the file, or a folder holding one of MNIST_FILES (also under raw/ or MNIST/raw/)."""
    candidates = [root] if os.path.isfile(root) else [
        os.path.join(root, sub, name) for sub in ("", "raw", os.path.join("MNIST", "raw")) for name in MNIST_FILES]
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
        raise DataError(f"--dataroot {root}: no MNIST file found; expected one of {', '.join(MNIST_FILES)} "
                        "(in it, raw/ or MNIST/raw/), or the path of an idx/npz file")
    images = _read_npz(path) if path.endswith(".npz") else _read_idx(path)
    if images.dtype != np.uint8:
        images = np.clip(images * (255.0 if images.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return Tensors(torch.from_numpy(np.array(images)), size)  # a copy: np.frombuffer arrays are read-only


DATASETS = ("builtin", "folder", "mnist")
FOLDER_ALIASES = ("imagenet", "lfw")  # examples/dcgan's ImageFolder datasets


def make_dataset(name, dataroot, size, nc, length=4096, seed=0):
    if name == "builtin":
        return Builtin(size, nc, length, seed)
    if dataroot is None:
        raise DataError(f"--dataset {name} needs --dataroot")
    if not os.path.exists(dataroot):
        raise DataError(f"--dataroot {dataroot} does not exist")
    if name in ("folder", *FOLDER_ALIASES):
        return Folder(dataroot, size, nc)
    if name == "mnist":
        return mnist(dataroot, size)
    raise DataError(f"--dataset {name} is not supported; use one of {', '.join(DATASETS)} "
                    "(for cifar10/lsun, export the images to a folder and use --dataset folder)")


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
