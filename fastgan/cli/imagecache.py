"""Decode once: a source's images as uint8 (N, C, S, S) in one file, built on the first run, memory-mapped after.

    images = load(source, size, nc)   # a uint8 tensor on the file: the items that decode, in order

Where: ``cache_dir`` if given, else $FASTGAN_CACHE_DIR/data (default ~/.cache/fastgan/data, as the extension's
builds).  Never beside the data: a folder inside an image tree would be a class of its own to torchvision's
ImageFolder (examples/dcgan's reader of the same dataroot), and a dataroot may be read-only or shared.

Three files per cache: NAME.u8, the pixels, row-major (N, C, S, S); NAME.json, what they were made from (the
source's stamp: every file's name, size and mtime; the transform; the format VERSION), how far the build got
and which items did not decode, with the reason; NAME.lock, which makes concurrent runs build it once.  NAME
holds the kind, the size and a hash of the source's real path, so each (source, size, nc) has one cache.

An item that does not decode has no row: the set is the items that do, in their order, so every count (the
run's header, its epochs) is of real images.  Each load says which were left out and why, in one line: every
one of them, drawn by a batch or not, the moment the cache is built.

The build writes chunks in order and records the finished prefix in NAME.json (after an fsync of the pixels),
so an interrupted build resumes where it stopped; NAME.json says "complete" only when every item is done.
A cache whose source, transform or version differs, or whose files are damaged, is rebuilt, with a line
saying why.  Image files decode in a process pool over every core; the array formats are resized in-process.
"""
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import signal
import sys
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import formats
from .progress import Counter

VERSION = 2  # 2: no rows for the items that fail; 16-bit and float images read in their range
CHUNK = 64          # images per decode task
SAVE_EVERY_S = 2.0  # how often the finished prefix is recorded
NAMED = 3           # unreadable items named in the report (all of them are in NAME.json)


@dataclasses.dataclass
class Source:
    """Where images come from.

    kind, root: what and where ("folder", "/data/celeba"); method: how an item becomes (nc, S, S), part of the
    cache's identity; stamp: (name, size, mtime_ns) of every file read.  File sources: ``items()`` lists what
    to decode (paths, or (LMDB folder, key) pairs) and ``name(item)`` names one for a report.  Array sources:
    ``read()`` gives uint8 (N, C, H, W).  Both are called only when the cache is built."""
    kind: str
    root: str
    method: str
    stamp: list
    items: Callable = None
    read: Callable = None

    @staticmethod
    def name(item):
        return item if isinstance(item, str) else f"{item[0]}/{item[1].decode(errors='replace')}"


def file_stamp(paths, root):
    """(name, size, mtime) of each file; (name, None, None) for one that cannot be looked at (a dangling link),
    which the build reports as unreadable."""
    def stat(path):
        try:
            info = os.stat(path)
        except OSError:
            return None, None
        return info.st_size, info.st_mtime_ns
    return [(os.path.relpath(p, root), *stat(p)) for p in paths]


def folder_source(kind, root):
    paths = formats.image_files(root)
    return Source(kind, root, "pil-fit-bilinear", file_stamp(paths, root), items=lambda: paths)


def lsun_source(root, classes):
    databases = formats.lsun_databases(root, classes)
    return Source("lsun", root, "pil-fit-bilinear",
                  file_stamp([os.path.join(db, "data.mdb") for db in databases], root),
                  items=lambda: [(db, key) for db in databases for key in formats.lmdb_keys(db)])


def array_source(kind, root, paths, read):
    return Source(kind, root, "torch-bilinear-antialias", file_stamp(paths, os.path.dirname(paths[0])),
                  read=lambda: read(paths[0] if len(paths) == 1 else paths))


def resize_array(pixels, size, nc):
    """uint8 (n, C, H, W) -> uint8 (n, nc, size, size): greyscale as PIL's convert("L") computes it, grey to
    RGB by repetition; bilinear with antialias (torch), rounded to the nearest level."""
    x = torch.from_numpy(np.array(pixels))  # a copy: the readers may give read-only arrays
    if x.shape[1] == 3 and nc == 1:
        weights = torch.tensor([19595, 38470, 7471], dtype=torch.int32)[:, None, None]  # ITU-R 601-2 in 16.16
        x = ((x.int() * weights).sum(1, keepdim=True) + 0x8000).bitwise_right_shift(16).to(torch.uint8)
    elif x.shape[1] == 1 and nc == 3:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    return x.contiguous().numpy()


def cache_folder(explicit=None):
    if explicit:
        return explicit
    home = os.environ.get("FASTGAN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fastgan")
    return os.path.join(home, "data")


def _say(text):
    print(f"fastgan: {text}", file=sys.stderr, flush=True)


class _Cache:
    """The three files of one cache and the build's state."""

    def __init__(self, source, size, nc, folder):
        real = os.path.realpath(source.root)
        key = hashlib.sha256(json.dumps([source.kind, real, size, nc]).encode()).hexdigest()[:16]
        label = os.path.basename(real.rstrip(os.sep)) or "root"
        self.base = os.path.join(folder, f"{source.kind}-{label}-{size}x{size}x{nc}-{key}")
        self.data, self.index = self.base + ".u8", self.base + ".json"
        digest = hashlib.sha256(json.dumps(source.stamp).encode()).hexdigest()
        self.identity = dict(version=VERSION, kind=source.kind, root=real, method=source.method, size=size, nc=nc,
                             stamp=digest, files=len(source.stamp))
        self.item_bytes = nc * size * size
        self.shape = (nc, size, size)

    def read_index(self):
        """(index, None) for a usable cache (complete, or partial and resumable), else (None, why not).

        index: count (items), done (items decoded so far), rows (of pixels written: the items that decode),
        failed {item: (name, reason)}, complete."""
        if not os.path.exists(self.index):
            return None, None
        try:
            with open(self.index) as f:
                index = json.load(f)
            old, new = index.get("identity", {}), self.identity
            if old.get("version") != new["version"]:
                return None, f"it was written in cache format {old.get('version')}, this fastgan writes {VERSION}"
            count, done, rows = int(index["count"]), int(index["done"]), int(index["rows"])
            failed = {int(item): (str(name), str(why)) for item, name, why in index["failed"]}
            complete = index["complete"] is True
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return None, f"its index {self.index} is unreadable ({type(exc).__name__}: {exc})"
        if old.get("stamp") != new["stamp"]:
            return None, (f"the source changed since it was built ({old.get('files')} file(s) then, {new['files']} "
                          f"now{', some of them modified' if old.get('files') == new['files'] else ''})")
        changed = [k for k in new if old.get(k) != new[k]]
        if changed:
            return None, f"it was made with other settings ({', '.join(f'{k} {old.get(k)}' for k in changed)})"
        size = os.path.getsize(self.data) if os.path.exists(self.data) else None
        expected = (rows if complete else count) * self.item_bytes  # a build allocates every item's row first
        if size != expected:
            return None, (f"its pixel file {self.data} is {'missing' if size is None else f'{size} bytes'}, "
                          f"expected {expected}")
        if not 0 <= done <= count or rows + len(failed) != done or (complete and done != count):
            return None, f"its index {self.index} is inconsistent (done {done} of {count}, {rows} rows)"
        return dict(count=count, done=done, rows=rows, failed=failed, complete=complete), None

    def write_index(self, count, done, rows, failed, complete=False):
        tmp = self.index + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dict(identity=self.identity, count=count, done=done, rows=rows, complete=complete,
                           failed=[[item, *failed[item]] for item in sorted(failed)]), f)
        os.replace(tmp, self.index)

    def tensor(self, rows):
        # copy-on-write: a writable array (torch wants one) whose changes never reach the file
        return torch.from_numpy(np.memmap(self.data, dtype=np.uint8, mode="c", shape=(rows, *self.shape)))


def load(source, size, nc, cache_dir=None, workers=None):
    """uint8 tensor (N, nc, size, size) mapped from the cache: the source's items that decode, in order.  Builds
    or finishes the cache first if needed, with ``workers`` decode processes (default: one per core), and says
    which items were left out and why.  DataError when the cache cannot be written or no item decodes."""
    import fcntl

    cache = _Cache(source, size, nc, cache_folder(cache_dir))
    try:
        os.makedirs(os.path.dirname(cache.base), exist_ok=True)
        lock = open(cache.base + ".lock", "w")
    except OSError as exc:
        raise formats.DataError(f"cannot write the image cache in {os.path.dirname(cache.base)} ({exc}); point "
                                "FASTGAN_CACHE_DIR at a writable folder") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held until the file closes; another run waits, then finds it built
        index, why = cache.read_index()
        if index is None or not index["complete"]:
            try:
                index = _build(cache, source, index, why, workers)
            except OSError as exc:
                raise formats.DataError(f"cannot write the image cache {cache.data} ({exc}); free some space, "
                                        "or set FASTGAN_CACHE_DIR to another folder") from None
    failed, count = index["failed"], index["count"]
    if index["rows"] == 0:
        raise formats.DataError(f"none of the {count} images under --dataroot {source.root} decodes: "
                                f"{_examples(source, failed)}; check the files (the cache index {cache.index} "
                                "lists every one)")
    if failed and int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one rank says it
        _say(f"{len(failed)} of {count} images under {source.root} do not decode and are left out (training on "
             f"{index['rows']}): {_examples(source, failed)}; {cache.index} lists every one with its reason")
    return cache.tensor(index["rows"])


def _examples(source, failed):
    """The first NAMED of ``failed`` as 'name (why)', names relative to the source's root."""
    def short(name):
        return os.path.relpath(name, source.root) if name.startswith(source.root) else name
    shown = [f"{short(name)} ({why})" for name, why in (failed[item] for item in sorted(failed)[:NAMED])]
    return ", ".join(shown) + (f" and {len(failed) - NAMED} more" if len(failed) > NAMED else "")


def _build(cache, source, index, why, workers):
    """Write (or finish) the cache; returns its index.  ``index``: a resumable partial build, or None.  The rows
    of the items that decode are written one after another; the file, sized for every item while the build
    runs, is cut to them at its end."""
    items = source.items() if source.items else None
    arrays = None if items is not None else source.read()
    count = len(items) if items is not None else len(arrays)
    if count == 0:
        raise formats.DataError(f"--dataroot {source.root} holds no images")
    if index is not None and index["count"] == count:
        start, rows, failed = index["done"], index["rows"], index["failed"]
        _say(f"resuming the image cache {cache.data} at {start} of {count} images")
    else:
        start, rows, failed = 0, 0, {}
        if why:
            _say(f"rebuilding the image cache {cache.data} ({count} images): {why}")
        else:
            _say(f"decoding {count} images of {source.root} once, into {cache.data} "
                 f"({count * cache.item_bytes / 2**20:.0f} MiB); later runs read them from there")
        cache.write_index(count, 0, 0, {})  # before a byte of the old pixels is overwritten
        with open(cache.data, "wb") as f:
            f.truncate(count * cache.item_bytes)
    fd = os.open(cache.data, os.O_WRONLY)
    saved_at = time.perf_counter()
    done = start
    chunks = _decode_files(items, start, cache.shape, workers) if items is not None else (
        (a, resize_array(arrays[a:a + 1024], cache.shape[1], cache.shape[0]), {}) for a in range(start, count, 1024))
    try:
        with Counter(count, start, desc="caching images", unit="img") as counter:
            for first, pixels, bad in chunks:
                good = np.delete(pixels, list(bad), axis=0) if bad else pixels
                os.pwrite(fd, good.tobytes(), rows * cache.item_bytes)
                rows += len(good)
                failed.update((first + i, (source.name(items[first + i]), reason)) for i, reason in bad.items())
                done = first + len(pixels)
                counter.update(len(pixels))
                if time.perf_counter() - saved_at > SAVE_EVERY_S:
                    os.fsync(fd)
                    cache.write_index(count, done, rows, failed)
                    saved_at = time.perf_counter()
        os.ftruncate(fd, rows * cache.item_bytes)
        os.fsync(fd)
    except KeyboardInterrupt:
        os.fsync(fd)
        cache.write_index(count, done, rows, failed)
        _say(f"interrupted: the image cache {cache.data} holds {done} of {count} images; the next run resumes it")
        raise
    finally:
        chunks.close()  # stops the decode processes now, not when the generator is collected
        os.close(fd)
    cache.write_index(count, count, rows, failed, complete=True)
    return dict(count=count, done=count, rows=rows, failed=failed, complete=True)


def _cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _decode_files(items, start, shape, workers=None):
    """(first index, uint8 (k, C, S, S), {failed offset: why}) per chunk of ``items[start:]``, in order."""
    starts = range(start, len(items), CHUNK)
    workers = min(workers or _cores(), len(starts))
    with concurrent.futures.ProcessPoolExecutor(workers, initializer=signal.signal,
                                                initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        try:
            results = pool.map(_decode_chunk, [items[a:a + CHUNK] for a in starts],
                               [shape] * len(starts))
            for a, (pixels, bad) in zip(starts, results):
                yield a, pixels, bad
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


_lmdb = {}  # LMDB folder -> (environment, read transaction), per decode process


def _read_item(item):
    if isinstance(item, str):
        return item
    if item[0] not in _lmdb:
        env = formats.open_lmdb(item[0])
        _lmdb[item[0]] = env, env.begin()
    value = _lmdb[item[0]][1].get(item[1])
    return io.BytesIO(value if value is not None else b"")


def _decode_chunk(items, shape):
    """Runs in a decode process: uint8 (len(items), C, S, S), zeros where an item fails, and {offset: why} of
    those that fail."""
    nc, size, _ = shape
    pixels = np.zeros((len(items), *shape), dtype=np.uint8)
    bad = {}
    for i, item in enumerate(items):
        try:
            pixels[i] = formats.fit_image(_read_item(item), size, nc)
        except formats.Unreadable as exc:
            bad[i] = str(exc)
    return pixels, bad
