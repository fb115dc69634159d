"""The input pipeline: every format, the decoded-image cache, and the Feeder's batches against epoch_loader's."""
import io
import os
import pathlib
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastgan.cli import data, feed, formats, imagecache


def _folder(root, n=11, broken=True):
    """n images of assorted sizes and formats in two subfolders, plus a file that does not decode."""
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(12, 40, 2)
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        image.save(sub / f"{i}.{('png', 'jpg', 'bmp')[i % 3]}")
    if broken:
        (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def _batches(iterable):
    """A Feeder epoch's batches, kept (a resident batch is overwritten by the next one)."""
    return [x.clone() for x in iterable]


def _loader_batches(loader):
    """epoch_loader's batches of a set whose every item decodes."""
    batches = []
    for x, failed in loader:
        assert failed == [] and x is not None
        batches.append(x.clone())
    return batches


def _assert_same(got, expected):
    assert len(got) == len(expected) > 0
    for x, y in zip(got, expected):
        assert x.dtype == torch.float32 and torch.equal(x, y)


PLANS = [dict(epoch=0, seed=1), dict(epoch=3, seed=7, skip_batches=1),
         dict(epoch=1, seed=2, rank=1, world_size=2), dict(epoch=2, seed=5, rank=2, world_size=3)]


def _compare(dataset, reference, batch_size, images=None, **feeder_args):
    """Feeder batches of ``dataset`` == epoch_loader batches of ``reference`` for every plan of PLANS."""
    for plan in PLANS:
        plan = dict(plan)
        epoch, skip = plan.pop("epoch"), plan.pop("skip_batches", 0)
        feeder = data.Feeder(dataset.images if images is None else images, batch_size, "cpu", **plan,
                             **feeder_args)
        got = _batches(feeder.epoch(epoch, skip))
        _assert_same(got, _loader_batches(data.epoch_loader(reference, batch_size, epoch, skip_batches=skip,
                                                            **plan)))
        assert len(feeder.epoch(epoch, skip)) == len(got)


@pytest.mark.parametrize("nc", [3, 1])
def test_folder_feeder_equals_todays_loader(tmp_path, nc, capfd):
    """The cached folder gives the per-file decode's images to the bit, in epoch_loader's order; the broken file
    has no place in it, and the build says so."""
    root = _folder(tmp_path / "images")
    dataset = data.make_dataset("folder", str(root), 16, nc)
    assert "1 of 12 images under" in capfd.readouterr().err
    reference = data.Folder(str(root), 16, nc)
    assert reference[reference.files.index(str(root / "b" / "broken.jpg"))][0] is None
    reference.files.remove(str(root / "b" / "broken.jpg"))
    assert len(dataset) == len(reference) == 11 and dataset.images.shape == (11, nc, 16, 16)
    for i in range(len(reference)):
        assert torch.equal(dataset[i][0], reference[i][0])
    _compare(dataset, reference, 3)
    _compare(dataset, reference, 3, resident=True)  # the device path's torch ops, on the CPU


def test_epoch_loader_fills_failed_places_with_the_batchs_good_images(tmp_path):
    """Folder decodes on access: collate gives a failed item's place to a repeat of the batch's good images and
    names it; a batch without a good image comes as (None, failed)."""
    root = tmp_path / "images"
    _folder(root, n=1, broken=False)
    for i in range(5):
        (root / f"broken{i}.png").write_bytes(b"\x89PNG nothing")
    folder = data.Folder(str(root), 8)
    good = [i for i in range(len(folder)) if folder[i][0] is not None]
    assert len(good) == 1
    batches = list(data.epoch_loader(folder, 2, epoch=0, seed=1))
    assert len(batches) == 3 and any(x is None for x, _ in batches)
    for x, failed in batches:
        assert good[0] not in failed and (x is None) == (len(failed) == 2)
        if x is not None:
            assert all(torch.equal(row, folder[good[0]][0]) for row in x)


def test_a_folder_that_does_not_decode_is_one_line(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(4):
        (root / f"broken{i}.png").write_bytes(b"\x89PNG nothing")
    with pytest.raises(formats.DataError, match=r"none of the 4 images under --dataroot .* decodes: broken0.png "
                                                r"\(not an image file pillow can read\), .* and 1 more; check"):
        data.make_dataset("folder", str(root), 8, 3)


def test_builtin_feeder_equals_todays_loader():
    dataset = data.Builtin(12, length=37, seed=4)
    _compare(dataset, dataset, 4)
    _compare(dataset, dataset, 4, resident=True)


def test_feeder_epochs_are_shuffles_and_resume_exactly():
    images = data.Builtin(8, length=40).images
    feeder = data.Feeder(images, 4, "cpu", seed=3, flip=True)
    whole = _batches(feeder.epoch(2))
    assert len(whole) == 10
    _assert_same(_batches(feeder.epoch(2, skip_batches=6)), whole[6:])
    other = _batches(feeder.epoch(3))
    assert not all(torch.equal(x, y) for x, y in zip(whole, other))


def test_flip_mirrors_half_the_images_the_same_way_every_time():
    images = data.Builtin(8, length=400, seed=1).images
    plain = _batches(data.Feeder(images, 8, "cpu", seed=3).epoch(1))
    flipped = _batches(data.Feeder(images, 8, "cpu", seed=3, flip=True).epoch(1))
    again = _batches(data.Feeder(images, 8, "cpu", seed=3, flip=True, resident=True).epoch(1))
    _assert_same(again, flipped)
    mirrored = 0
    for x, y in zip(plain, flipped):
        same = (x == y).flatten(1).all(1)
        mirror = (x.flip(3) == y).flatten(1).all(1)
        assert bool((same | mirror).all())
        mirrored += int((mirror & ~same).sum())
    assert 150 < mirrored < 250


def test_channels_last_batches():
    images = data.Builtin(8, length=16).images
    x = next(iter(data.Feeder(images, 4, "cpu", seed=0, memory_format=torch.channels_last).epoch(0)))
    y = next(iter(data.Feeder(images, 4, "cpu", seed=0).epoch(0)))
    assert x.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, y)


@pytest.mark.parametrize("n,world_size", [(37, 1), (37, 2), (40, 3), (5, 4)])
def test_epoch_indices_are_the_distributed_samplers(n, world_size):
    for rank in range(world_size):
        sampler = torch.utils.data.DistributedSampler(range(n), world_size, rank, shuffle=True, seed=9, drop_last=True)
        sampler.set_epoch(4)
        order = list(sampler)
        rows = feed.epoch_indices(n, 2, 4, 9, rank, world_size)
        assert rows.tolist() == [order[i:i + 2] for i in range(0, len(order) - 1, 2)]


def _idx_bytes(images):
    return b"\0\0\x08\x03" + np.array(images.shape, dtype=">u4").tobytes() + images.tobytes()


def test_mnist_feeder_equals_todays_loader(tmp_path):
    """At 28x28 the pixels are the file's; resized, the cache holds them rounded to uint8 (within half a level of
    today's float resize), and the shuffle is the same."""
    pixels = np.random.default_rng(0).integers(0, 256, (13, 28, 28), dtype=np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(pixels))
    native = data.make_dataset("mnist", str(tmp_path), 28, 1)
    assert torch.equal(native.images[:, 0], torch.from_numpy(pixels))
    _compare(native, native, 3)
    resized = data.make_dataset("mnist", str(tmp_path), 64, 1)
    today = F.interpolate(torch.from_numpy(pixels).float().div(127.5).sub(1.0)[:, None], size=(64, 64),
                          mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(resized.images.float() / 127.5 - 1, today, rtol=0, atol=0.5 / 127.5 + 1e-6)
    assert data.make_dataset("mnist", str(tmp_path), 28, 3).images.shape == (13, 3, 28, 28)


def _cifar(root, n=4, subfolder=True):
    folder = root / formats.CIFAR10_FOLDER if subfolder else root
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 256, (n, 3072), dtype=np.uint8) for _ in range(5)]
    for i, rows in enumerate(batches):
        with open(folder / f"data_batch_{i + 1}", "wb") as f:  # as the python download has them: bytes keys
            pickle.dump({b"batch_label": b"training batch", b"labels": [0] * n, b"data": rows,
                         b"filenames": [b"x.png"] * n}, f, protocol=2)
    (folder / "test_batch").write_bytes(b"not read")
    return np.concatenate(batches).reshape(-1, 3, 32, 32)


@pytest.mark.parametrize("subfolder", [True, False])
def test_cifar10(tmp_path, subfolder):
    expected = _cifar(tmp_path, subfolder=subfolder)
    dataset = data.make_dataset("cifar10", str(tmp_path), 32, 3)
    assert len(dataset) == 20 and torch.equal(dataset.images, torch.from_numpy(expected))
    _compare(dataset, dataset, 3)
    grey = data.make_dataset("cifar10", str(tmp_path), 32, 1).images
    for i in (0, 7, 19):
        pil = np.asarray(Image.fromarray(expected[i].transpose(1, 2, 0)).convert("L"))
        assert np.array_equal(grey[i, 0].numpy(), pil)
    assert data.make_dataset("cifar10", str(tmp_path), 64, 3).images.shape == (20, 3, 64, 64)


def test_cifar10_bad_files_are_one_line(tmp_path):
    _cifar(tmp_path, subfolder=False)

    class Boom:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Boom()}, f)
    with pytest.raises(formats.DataError, match=r"data_batch_3 is not a CIFAR-10 python batch .*not allowed"):
        data.make_dataset("cifar10", str(tmp_path), 32, 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(formats.DataError, match="no CIFAR-10 python batches found"):
        data.make_dataset("cifar10", str(tmp_path / "empty"), 32, 3)


def test_fake_is_deterministic_per_seed():
    a, b = data.make_dataset("fake", None, 16, 3, length=8, seed=2), data.Fake(16, length=5, seed=2)
    assert a.images.shape == (8, 3, 16, 16) and torch.equal(a.images[:5], b.images)
    assert not torch.equal(a.images, data.Fake(16, length=8, seed=3).images)
    assert not torch.equal(a.images[0], a.images[1])
    assert a.images.min() == 0 and a.images.max() == 255 and abs(a.images.float().mean() - 127.5) < 5


def _image_bytes(pixels, kind):
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=kind)
    return out.getvalue()


def test_lsun(tmp_path, capfd):
    if formats.lmdb is None:
        pytest.skip("the lmdb package is not installed (pip install 'fastgan[lsun]'); the missing-extra message "
                    "is tested in test_lsun_without_lmdb")
    rng = np.random.default_rng(2)
    values = {}
    for name, count in (("bedroom_train", 5), ("tower_train", 3)):
        env = formats.lmdb.open(str(tmp_path / f"{name}_lmdb"), map_size=1 << 24)
        with env.begin(write=True) as txn:
            for i in range(count):
                key = f"{name}-{i:04d}".encode()
                value = _image_bytes(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8), ("WEBP", "JPEG")[i % 2])
                value = b"broken" if (name, i) == ("tower_train", 1) else value
                txn.put(key, value)
                values[key] = value
        env.close()
    dataset = data.make_dataset("lsun", str(tmp_path), 16, 3, classes="bedroom,tower_train")
    assert ("1 of 8 images under" in capfd.readouterr().err and "tower_train_lmdb/tower_train-0001 (not an image "
            "file pillow can read)")
    good = [value for key, value in sorted(values.items()) if value != b"broken"]
    assert len(dataset) == len(good) == 7
    for i, value in enumerate(good):
        assert np.array_equal(dataset.images[i].numpy(), formats.fit_image(io.BytesIO(value), 16, 3))
    assert len(data.make_dataset("lsun", str(tmp_path / "tower_train_lmdb"), 16, 3)) == 2
    with pytest.raises(formats.DataError, match="--classes kitchen: no kitchen_lmdb or kitchen_train_lmdb .* "
                                                "present: bedroom_train_lmdb, tower_train_lmdb"):
        data.make_dataset("lsun", str(tmp_path), 16, 3, classes=["kitchen"])


def test_lsun_without_lmdb(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "lmdb", None)
    with pytest.raises(formats.DataError, match=r"needs the lmdb package: pip install 'fastgan\[lsun\]'"):
        data.make_dataset("lsun", str(tmp_path), 64, 3)


def _palette(colours, transparent=None):
    image = Image.new("P", (6, 4), 0)
    image.putpalette([v for colour in colours for v in colour])
    if transparent is not None:
        image.info["transparency"] = transparent
    return image


def _pgm16(path, value):
    path.write_bytes(b"P5 6 4 65535\n" + np.full(24, value, ">u2").tobytes())


# (name, how the file is made, its mode when PIL opens it, RGB it must decode to): uniform 6x4 images
MODES = [
    ("1", lambda p: Image.new("1", (6, 4), 1).save(p / "x.png"), "1", (255, 255, 255)),
    ("L", lambda p: Image.new("L", (6, 4), 100).save(p / "x.png"), "L", (100, 100, 100)),
    ("P", lambda p: _palette([(10, 20, 30)]).save(p / "x.png"), "P", (10, 20, 30)),
    ("P transparent", lambda p: _palette([(10, 20, 30)], 0).save(p / "x.gif"), "P", (10, 20, 30)),
    ("RGB", lambda p: Image.new("RGB", (6, 4), (10, 200, 30)).save(p / "x.png"), "RGB", (10, 200, 30)),
    ("RGBA opaque", lambda p: Image.new("RGBA", (6, 4), (10, 200, 30, 255)).save(p / "x.png"), "RGBA", (10, 200, 30)),
    ("RGBA transparent", lambda p: Image.new("RGBA", (6, 4), (10, 200, 30, 0)).save(p / "x.png"), "RGBA",
     (10, 200, 30)),
    ("RGBA half", lambda p: Image.new("RGBA", (6, 4), (0, 100, 255, 128)).save(p / "x.png"), "RGBA",
     (0, 100, 255)),
    ("CMYK", lambda p: Image.new("CMYK", (6, 4), (255, 0, 0, 0)).save(p / "x.tif"), "CMYK", (0, 255, 255)),
    ("LA", lambda p: Image.new("LA", (6, 4), (100, 0)).save(p / "x.png"), "LA", (100, 100, 100)),
    ("PA", lambda p: _palette([(10, 20, 30)]).convert("PA").save(p / "x.tif"), "PA", (10, 20, 30)),
    ("I;16 mid-grey", lambda p: Image.fromarray(np.full((4, 6), 32768, np.uint16)).save(p / "x.png"), "I;16",
     (128, 128, 128)),
    ("I;16 levels", lambda p: Image.fromarray(np.full((4, 6), 100 * 257, np.uint16)).save(p / "x.tif"), "I;16",
     (100, 100, 100)),
    ("I;16B", lambda p: Image.frombytes("I;16B", (6, 4), np.full(24, 65535, ">u2").tobytes()).save(p / "x.tif"),
     "I;16B", (255, 255, 255)),
    ("I (16-bit PGM)", lambda p: _pgm16(p / "x.pgm", 32768), "I", (128, 128, 128)),
    ("F", lambda p: Image.fromarray(np.full((4, 6), 0.5, np.float32)).save(p / "x.tif"), "F", (128, 128, 128)),
    ("F quarter", lambda p: Image.fromarray(np.full((4, 6), 0.25, np.float32)).save(p / "x.tif"), "F", (64, 64, 64)),
]


@pytest.mark.parametrize("name, make, mode, rgb", MODES, ids=[m[0] for m in MODES])
def test_every_mode_decodes_in_its_range(tmp_path, name, make, mode, rgb):
    make(tmp_path)
    path = next(tmp_path.iterdir())
    with Image.open(path) as image:
        assert image.mode == mode
    pixels = formats.fit_image(path, 4, 3)
    assert pixels.shape == (3, 4, 4) and (np.abs(pixels.reshape(3, -1).astype(int) - np.array(rgb)[:, None]) <= 1).all()
    grey = formats.fit_image(path, 4, 1)
    expected = (19595 * rgb[0] + 38470 * rgb[1] + 7471 * rgb[2] + 0x8000) >> 16  # ITU-R 601-2, as PIL
    assert grey.shape == (1, 4, 4) and (np.abs(grey.astype(int) - expected) <= 1).all()


@pytest.mark.parametrize("make, why", [
    (lambda p: Image.fromarray(np.full((4, 6), 1000, np.int32)).save(p / "x.tif"),
     "32-bit integer pixels have no fixed range"),
    (lambda p: Image.fromarray(np.full((4, 6), 200.0, np.float32)).save(p / "x.tif"),
     r"float pixels in \[200, 200\]; fastgan reads float images in \[0, 1\]"),
    (lambda p: Image.fromarray(np.array([[np.nan, 0.5]], np.float32)).save(p / "x.tif"), "float pixels in"),
    (lambda p: (p / "x.png").write_bytes(b"\x89PNG not really"), "not an image file pillow can read"),
])
def test_images_without_a_range_are_unreadable_saying_why(tmp_path, make, why):
    make(tmp_path)
    with pytest.raises(formats.Unreadable, match=why):
        formats.fit_image(next(tmp_path.iterdir()), 4, 3)


def test_a_folder_of_16_bit_and_float_images(tmp_path, capfd):
    """Through the cache (the decode processes): mid-grey is 128 in every form, and a file with no range to read
    it in is left out and reported with its reason."""
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(root / "a.png")
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(root / "b.tif")
    Image.new("L", (8, 8), 128).save(root / "c.png")
    Image.fromarray(np.full((8, 8), 3.0, np.float32)).save(root / "d.tif")
    dataset = data.make_dataset("folder", str(root), 8, 3)
    assert len(dataset) == 3 and bool((dataset.images == 128).all())
    assert "1 of 4 images under" in (err := capfd.readouterr().err) and "d.tif (float pixels in [3, 3]" in err


def test_linked_folders_are_walked_once_and_files_counted_once(tmp_path):
    """A link back up the tree (a loop) and two links to one file: each real file once."""
    root = _folder(tmp_path / "images", n=6, broken=False)
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)
    (root / "b" / "again").symlink_to(root / "a", target_is_directory=True)
    (root / "twin.jpg").symlink_to(root / "a" / "1.jpg")
    (root / "dangling.png").symlink_to(root / "nowhere.png")
    files = formats.image_files(str(root))
    assert len(files) == 7 and str(root / "dangling.png") in files  # 6 images and the dangling link
    assert len({os.path.realpath(f) for f in files}) == 7
    dataset = data.make_dataset("folder", str(root), 8, 3)
    assert len(dataset) == 6


def test_unknown_dataset():
    with pytest.raises(formats.DataError, match="--dataset svhn is not supported; use one of builtin, fake, folder"):
        data.make_dataset("svhn", "x", 64, 3)


# ----------------------------------------------------------------------------- the cache


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    """Each test's caches in a folder of its own (FASTGAN_CACHE_DIR/data)."""
    monkeypatch.setenv("FASTGAN_CACHE_DIR", str(tmp_path / "cache-home"))


def _cache_files():
    folder = pathlib.Path(os.environ["FASTGAN_CACHE_DIR"]) / "data"
    return sorted(folder.iterdir()) if folder.exists() else []


def test_the_cache_is_built_once_away_from_the_data(tmp_path, capfd):
    root = _folder(tmp_path / "images")
    before = sorted(root.rglob("*"))
    first = data.make_dataset("folder", str(root), 16, 3)
    assert "decoding 12 images" in capfd.readouterr().err
    names = [p.name for p in _cache_files()]
    assert len(names) == 3 and {n.rsplit(".", 1)[1] for n in names} == {"u8", "json", "lock"}
    assert all(n.startswith("folder-images-16x16x3-") for n in names)
    pixels = next(p for p in _cache_files() if p.suffix == ".u8")
    stamp = pixels.stat().st_mtime_ns
    again = data.make_dataset("folder", str(root), 16, 3)
    said = capfd.readouterr().err.splitlines()  # the broken file, again: every run says what it trains on
    assert len(said) == 1 and "1 of 12 images under" in said[0] and pixels.stat().st_mtime_ns == stamp
    assert torch.equal(first.images, again.images)
    data.make_dataset("folder", str(root), 8, 1)  # another transform: a cache of its own
    assert len(_cache_files()) == 6
    assert sorted(root.rglob("*")) == before  # nothing written beside the data
    data.make_dataset("folder", str(root), 16, 3, cache_dir=str(tmp_path / "elsewhere"))
    assert len(list((tmp_path / "elsewhere").glob("folder-images-16x16x3-*.u8"))) == 1


def test_a_changed_source_rebuilds_the_cache(tmp_path, capfd):
    root = _folder(tmp_path / "images")
    data.make_dataset("folder", str(root), 16, 3)
    capfd.readouterr()
    Image.fromarray(np.full((20, 20, 3), 7, np.uint8)).save(root / "a" / "new.png")
    grown = data.make_dataset("folder", str(root), 16, 3)
    assert "rebuilding the image cache" in (err := capfd.readouterr().err) and "(12 file(s) then, 13 now)" in err
    assert len(grown) == 12  # 13 files, one of them broken
    os.utime(root / "a" / "new.png", ns=(1, 1))
    Image.fromarray(np.full((20, 20, 3), 9, np.uint8)).save(root / "a" / "new.png")
    changed = data.make_dataset("folder", str(root), 16, 3)
    assert "13 file(s) then, 13 now, some of them modified" in capfd.readouterr().err
    files = [f for f in data.Folder(str(root), 16).files if not f.endswith("broken.jpg")]
    index = files.index(str(root / "a" / "new.png"))
    assert int(changed.images[index].max()) == 9


@pytest.mark.parametrize("damage,why", [("truncate", "bytes, expected"), ("index", "is unreadable"),
                                         ("delete", "is missing")])
def test_a_damaged_cache_is_rebuilt(tmp_path, capfd, damage, why):
    root = _folder(tmp_path / "images")
    good = data.make_dataset("folder", str(root), 16, 3).images.clone()
    capfd.readouterr()
    pixels, index = (next(p for p in _cache_files() if p.suffix == suffix) for suffix in (".u8", ".json"))
    if damage == "truncate":
        os.truncate(pixels, 100)
    elif damage == "index":
        index.write_text("{not json")
    else:
        pixels.unlink()
    rebuilt = data.make_dataset("folder", str(root), 16, 3)
    err = capfd.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("fastgan: ")]
    assert len(said) == 2 and "rebuilding the image cache" in said[0] and why in said[0]
    assert "1 of 12 images under" in said[1]  # the broken file
    assert torch.equal(rebuilt.images, good)


def test_an_interrupted_build_resumes(tmp_path, monkeypatch, capfd):
    root = _folder(tmp_path / "images", n=23)
    clean = data.make_dataset("folder", str(root), 16, 3, cache_dir=str(tmp_path / "clean"))
    monkeypatch.setattr(imagecache, "CHUNK", 4)
    monkeypatch.setattr(imagecache, "SAVE_EVERY_S", 0.0)
    writes, pwrite = [], os.pwrite

    def interrupted(fd, chunk, offset):
        writes.append(offset)
        if len(writes) == 3:
            raise KeyboardInterrupt
        return pwrite(fd, chunk, offset)

    monkeypatch.setattr(imagecache.os, "pwrite", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.make_dataset("folder", str(root), 16, 3)
    assert "holds 8 of 24 images; the next run resumes it" in capfd.readouterr().err
    monkeypatch.setattr(imagecache.os, "pwrite", pwrite)
    resumed = data.make_dataset("folder", str(root), 16, 3)
    err = capfd.readouterr().err
    assert "resuming the image cache" in err and "at 8 of 24 images" in err
    assert torch.equal(resumed.images, clean.images) and len(resumed) == 23


def test_an_unwritable_cache_folder_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    root = _folder(tmp_path / "images")
    with pytest.raises(formats.DataError, match="cannot write the image cache in .*; point FASTGAN_CACHE_DIR at"):
        data.make_dataset("folder", str(root), 16, 3, cache_dir=str(tmp_path / "file" / "cache"))


@pytest.mark.gpu
@pytest.mark.parametrize("resident", [True, False])
def test_gpu_batches_equal_the_cpus(resident):
    images = data.Builtin(16, length=300, seed=2).images
    cpu = _batches(data.Feeder(images, 32, "cpu", seed=4, flip=True).epoch(1, 2))
    gpu = data.Feeder(images, 32, "cuda", seed=4, flip=True, resident=resident)
    assert gpu.resident == resident
    got = [x.cpu() for x in _batches(gpu.epoch(1, 2))]
    _assert_same(got, cpu)
