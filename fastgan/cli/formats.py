"""Readers of the formats fastgan trains on, each giving uint8 pixels (C, H, W) or (N, C, H, W).

    fit_image(file, size, nc)   one image file (a path or a file object) in 8 bits (see to_8bit), scaled so
                                that its shorter side is ``size`` and centre-cropped (PIL, bilinear), RGB or
                                greyscale; Unreadable (saying why) if it does not decode
    image_files(root)           every image file under a folder, recursively (links followed, each file once),
                                sorted
    mnist_file(root), read_mnist(path)       MNIST idx (optionally gzipped) or npz
    cifar10_files(root), read_cifar10(paths) CIFAR-10's python pickle batches
    lsun_databases(root, classes), lmdb_keys(path), open_lmdb(path)   LSUN's LMDB folders (needs ``lmdb``)

A file the user points at that is not what it should be raises DataError (a UsageError), with one line.
"""
import gzip
import os
import pickle

import numpy as np
from PIL import Image, ImageOps

from ..usage import UsageError

try:
    import lmdb
except ImportError:  # the optional extra fastgan[lsun]
    lmdb = None

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class DataError(UsageError):
    """The data cannot be used as asked; the message says why and what to do."""


class Unreadable(Exception):
    """An image file that does not decode, or has no range to read it in; the message says why."""



def to_8bit(image, nc):
    """An 8-bit RGB (nc=3) or L (nc=1) PIL image of ``image``, any mode PIL opens, read in its real range:

    - 1, L, P, RGB, CMYK, YCbCr, LAB, HSV: PIL's conversion (L -> RGB repeats the grey, RGB -> L is ITU-R 601-2).
    - I;16, I;16L, I;16B, I;16N (16-bit PNG, TIFF): round(v * 255 / 65535), so that 8-bit levels saved as 16 bits
      (v * 257) come back exactly and mid-grey 32768 is 128.
    - I: 16-bit levels too (PGM/PPM with a maxval over 255 open as I, scaled by PIL to 0..65535), except a TIFF
      that says 32 bits per sample: 32-bit integers have no range to scale from (a depth map in millimetres and
      a 12-bit sensor's counts look alike), so such a file, or an I image with values outside 0..65535, is
      Unreadable, saying so; convert it to 8 or 16 bits, or to floats in [0, 1].
    - F (32-bit float TIFF): values in [0, 1] times 255, rounded; values outside it (NaN, [0, 255], [-1, 1]) are
      Unreadable, with their range, for the same reason: guessing a scale would train on wrong images silently.
    - with alpha (RGBA, LA, PA, RGBa, or a transparency key): alpha dropped by PIL's conversion, as
      examples/dcgan's torchvision loader (``convert("RGB")``) does, so that both train on the same pixels."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        if mode == "I" and _bits_per_sample(image) == 32:
            raise Unreadable("32-bit integer pixels have no fixed range to read them in; save the images with 8 "
                             "or 16 bits per sample, or as floats in [0, 1]")
        levels = np.asarray(image).astype(np.int64)
        if levels.size and (levels.min() < 0 or levels.max() > 65535):
            raise Unreadable(f"integer pixels in [{levels.min()}, {levels.max()}], outside the 16-bit range "
                             "0..65535; save the images with 8 or 16 bits per sample")
        image = Image.fromarray(((levels * 255 + 32767) // 65535).astype(np.uint8))
    elif mode == "F":
        values = np.asarray(image)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not (0.0 <= low and high <= 1.0):  # NaN fails both
            raise Unreadable(f"float pixels in [{low:g}, {high:g}]; fastgan reads float images in [0, 1]: save "
                             "them scaled to [0, 1], or as 8- or 16-bit integers")
        image = Image.fromarray(np.rint(values * 255.0).astype(np.uint8))
    return image.convert("RGB" if nc == 3 else "L")


def _bits_per_sample(image):
    """A TIFF's BitsPerSample (tag 258), else None."""
    bits = getattr(image, "tag_v2", {}).get(258)
    return bits[0] if isinstance(bits, tuple) else bits


def _reason(exc):
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image file pillow can read"
    return " ".join(str(exc).split())[:160] or type(exc).__name__


def fit_image(file, size, nc):
    """uint8 (nc, size, size) from an image file; Unreadable, with the reason, when it does not decode."""
    try:
        with Image.open(file) as image:
            image = ImageOps.fit(to_8bit(image, nc), (size, size), Image.BILINEAR)
    except DECODE_ERRORS as exc:
        raise Unreadable(_reason(exc)) from None
    pixels = np.asarray(image)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def image_files(root):
    """Every image file under ``root``, sorted.  Links are followed, but each folder is walked once (a link
    back up the tree would repeat it without end) and each file counted once, by its first path in sorted
    order; a link that leads nowhere stays in the list (it is reported as unreadable when decoded)."""
    if not os.path.isdir(root):
        raise DataError(f"--dataroot {root} is not a directory; point it at a folder of images")
    folders, found = set(), []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in folders:
            subfolders.clear()
            continue
        folders.add((stat.st_dev, stat.st_ino))
        subfolders.sort()  # the walk, and so which path of a linked folder is kept, in a fixed order
        found += [os.path.join(folder, name) for name in names if name.lower().endswith(IMAGE_EXTENSIONS)]
    files, seen = [], set()
    for path in sorted(found):
        try:
            stat = os.stat(path)
            identity = (stat.st_dev, stat.st_ino)
        except OSError:
            identity = path
        if identity not in seen:
            seen.add(identity)
            files.append(path)
    if not files:
        raise DataError(f"--dataroot {root} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} "
                        "in it and its subfolders)")
    return files


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


def mnist_file(root):
    """``root`` if it is a file, else the first of MNIST_FILES in it, raw/ or MNIST/raw/."""
    candidates = [root] if os.path.isfile(root) else [
        os.path.join(root, sub, name) for sub in ("", "raw", os.path.join("MNIST", "raw")) for name in MNIST_FILES]
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
        raise DataError(f"--dataroot {root}: no MNIST file found; expected one of {', '.join(MNIST_FILES)} "
                        "(in it, raw/ or MNIST/raw/), or the path of an idx/npz file")
    return path


def read_mnist(path):
    """uint8 (N, 1, H, W) from an idx, idx.gz or npz file (Keras' mnist.npz; values in [0, 1] are scaled)."""
    images = _read_npz(path) if path.endswith(".npz") else _read_idx(path)
    if images.dtype != np.uint8:
        images = np.clip(images * (255.0 if images.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return images[:, None]


CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_FOLDER = "cifar-10-batches-py"


def cifar10_files(root):
    """The five training batches, in ``root`` or in its cifar-10-batches-py/."""
    for folder in (root, os.path.join(root, CIFAR10_FOLDER)):
        paths = [os.path.join(folder, name) for name in CIFAR10_BATCHES]
        if all(os.path.isfile(p) for p in paths):
            return paths
    raise DataError(f"--dataroot {root}: no CIFAR-10 python batches found; expected {CIFAR10_BATCHES[0]} .. "
                    f"{CIFAR10_BATCHES[-1]} in it or in its {CIFAR10_FOLDER}/ (the 'python version' download)")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays only: a data file cannot run code."""
    CORE = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"  # numpy 2 renamed it
    ALLOWED = {(f"{CORE}.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # protocol 2 pickles of bytes written by Python 3 use _codecs.encode

    def find_class(self, module, name):
        for core in ("numpy._core.", "numpy.core."):  # pickles name either, whichever numpy wrote them
            module = self.CORE + "." + module[len(core):] if module.startswith(core) else module
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in an image batch")
        return super().find_class(module, name)


def read_cifar10(paths):
    """uint8 (N, 3, 32, 32) from CIFAR-10 python batches: dicts whose b"data" is (n, 3072), the red, green
    and blue 32x32 planes of each image."""
    parts = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                batch = _ArrayUnpickler(f, encoding="bytes").load()
            rows = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
            rows = np.asarray(rows) if rows is not None else None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
            raise DataError(f"{path} is not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from None
        if rows is None or rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != 3 * 32 * 32:
            raise DataError(f"{path} is not a CIFAR-10 python batch: expected a dict with b'data', uint8 (n, 3072)")
        parts.append(rows.reshape(-1, 3, 32, 32))
    return np.concatenate(parts)


LSUN_INSTALL = "pip install 'fastgan[lsun]' (or pip install lmdb)"


def _need_lmdb():
    if lmdb is None:
        raise DataError(f"--dataset lsun reads LMDB folders and needs the lmdb package: {LSUN_INSTALL}")


def _is_lmdb(path):
    return os.path.isfile(os.path.join(path, "data.mdb"))


def lsun_databases(root, classes=None):
    """The LMDB folders of ``classes`` under ``root``, examples/dcgan's way: class c is the folder c_lmdb, else
    c_train_lmdb (so "bedroom" and "bedroom_train" both find bedroom_train_lmdb).  ``classes``: a list, or
    names separated by commas; None: ``root`` itself when it is an LMDB folder, else "bedroom"."""
    _need_lmdb()
    if classes is None and _is_lmdb(root):
        return [root]
    names = classes.split(",") if isinstance(classes, str) else list(classes or ["bedroom"])
    if not os.path.isdir(root):
        raise DataError(f"--dataroot {root} is not a directory; point it at the folder holding the *_lmdb folders")
    databases = []
    for name in (n.strip() for n in names):
        found = [p for p in (os.path.join(root, f"{name}_lmdb"), os.path.join(root, f"{name}_train_lmdb"))
                 if _is_lmdb(p)]
        if not found:
            present = sorted(d for d in os.listdir(root) if d.endswith("_lmdb")) or ["none"]
            raise DataError(f"--classes {name}: no {name}_lmdb or {name}_train_lmdb folder (with data.mdb) in "
                            f"{root}; present: {', '.join(present)}")
        databases.append(found[0])
    return databases


def open_lmdb(path):
    _need_lmdb()
    try:
        return lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False, max_readers=1)
    except lmdb.Error as exc:
        raise DataError(f"{path} is not a readable LMDB folder ({exc})") from None


def lmdb_keys(path):
    """The keys of an LMDB folder, in its (sorted) order."""
    with open_lmdb(path) as env, env.begin() as txn:
        return list(txn.cursor().iternext(keys=True, values=False))
