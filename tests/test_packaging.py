"""What `import fastgan` exposes: the public names, and kernels/ and csrc/ as fastgan.kernels and fastgan.csrc
(links in fastgan/) in a source checkout, an editable install and a wheel, with nothing else of the checkout
under fastgan."""
import json
import os
import subprocess
import sys
import tomllib
import zipfile

import pytest

import fastgan
from parity import ROOT

PUBLIC = ["BACKENDS", "BackendUnavailable", "DCGAN", "Discriminator", "FusedSequential", "Generator", "StepResult",
          "UsageError", "functional", "fuse", "fused_conv", "load_checkpoint", "losses", "presets", "reference",
          "set_level", "strip_module_prefix", "use_backend"]

# Imports fastgan from SITE (a folder of .pth files: an installed wheel or an editable install's hook) or from
# the checkout on sys.path, with the test environment's own editable hook taken out of the way first.
_PROBE = """
import importlib, json, site, sys
def editable(thing):
    return getattr(thing, "__module__", "").startswith("__editable__")
sys.meta_path[:] = [f for f in sys.meta_path if not editable(f)]
sys.path_hooks[:] = [h for h in sys.path_hooks if not editable(getattr(h, "__self__", h))]
sys.path[:] = [p for p in sys.path if not p.startswith("__editable__")]
for name in [m for m in sys.modules if m.startswith("__editable__")]:
    del sys.modules[name]
sys.path_importer_cache.clear()
how, where = sys.argv[1:3]
sys.path.insert(0, where)
if how == "site":
    site.addsitedir(where)  # its .pth files, ahead of the environment's
import fastgan.kernels.geometry, fastgan.csrc
hidden = {}
for name in ("fastgan.tests", "fastgan.fastgan", "fastgan.benchmarks", "fastgan.docs"):
    try:
        importlib.import_module(name)
        hidden[name] = False
    except ModuleNotFoundError:
        hidden[name] = True
print(json.dumps(dict(fastgan=fastgan.__file__, kernels=fastgan.kernels.geometry.__file__,
                      csrc=list(fastgan.csrc.__path__), hidden=hidden)))
"""


def _probe(how, where):
    out = subprocess.run([sys.executable, "-c", _PROBE, how, str(where)], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _check(found, package_root):
    """fastgan, its kernels and its C++ sources come from ``package_root``; nothing else of the checkout does."""
    assert os.path.realpath(found["fastgan"]).startswith(os.path.realpath(package_root)), found
    kernels = os.path.dirname(os.path.realpath(found["kernels"]))
    csrc = os.path.realpath(found["csrc"][0])
    assert os.path.isfile(os.path.join(kernels, "bn_act.py")) and os.path.isfile(os.path.join(csrc, "ops.cpp"))
    assert all(found["hidden"].values()), found["hidden"]
    return kernels, csrc


def _unzip(wheel, folder):
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(folder)
    return folder


def test_public_names():
    assert sorted(fastgan.__all__) == sorted(PUBLIC)
    assert fastgan.fuse is fastgan.nn.layers.fuse and fastgan.DCGAN is fastgan.nn.models.DCGAN
    assert fastgan.fused_conv.set_level is fastgan.set_level


def test_a_source_checkout():
    kernels, csrc = _check(_probe("path", ROOT), ROOT)
    assert (kernels, csrc) == (str(ROOT / "kernels"), str(ROOT / "csrc"))


def _build_backend(folder):
    """pyproject.toml's build requirements installed into ``folder``, as pip's build isolation does (the test
    environment's own setuptools may be older: a Python 3.11 venv starts with setuptools 65)."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(folder), *requires],
                   check=True, capture_output=True, timeout=300)
    return dict(os.environ, PYTHONPATH=str(folder))


def test_an_editable_install(tmp_path):
    wheel = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                            "print(build_meta.build_editable(sys.argv[1]))", str(tmp_path)], cwd=ROOT,
                           env=_build_backend(tmp_path / "backend"), capture_output=True, text=True, timeout=300)
    assert wheel.returncode == 0, wheel.stderr
    site = _unzip(tmp_path / wheel.stdout.split()[-1], tmp_path / "site")
    kernels, csrc = _check(_probe("site", site), ROOT)
    assert (kernels, csrc) == (str(ROOT / "kernels"), str(ROOT / "csrc"))


@pytest.mark.slow
def test_a_wheel(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("fastgan-*.whl")
    site = _unzip(wheel, tmp_path / "site")
    kernels, csrc = _check(_probe("site", site), site)
    assert sorted(os.listdir(csrc)) == sorted(os.listdir(ROOT / "csrc"))
    assert {f for f in os.listdir(kernels) if f.endswith(".py")} == {
        f for f in os.listdir(ROOT / "kernels") if f.endswith(".py")}
