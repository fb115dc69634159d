"""Every import path a user had before the layered layout still works: the public names, and the old module
paths (the documented ones silently, the others with a FutureWarning naming the new place)."""
import json
import subprocess
import sys

import fastgan

PUBLIC = ["BACKENDS", "BackendUnavailable", "DCGAN", "Discriminator", "FusedSequential", "Generator", "StepResult",
          "UsageError", "functional", "fuse", "fused_conv", "load_checkpoint", "losses", "presets", "reference",
          "set_level", "strip_module_prefix", "use_backend"]

# What scripts and tests imported from the old flat modules, with the attribute they used.
OLD_PATHS = {
    "fastgan.functional": "batch_norm_act", "fastgan.fused_conv": "set_level", "fastgan.losses": "generator_loss",
    "fastgan.presets": "build", "fastgan.reference": "make_optimizers", "fastgan.backends": "resolve",
    "fastgan._build": "build", "fastgan.layers": "fuse", "fastgan.models": "DCGAN", "fastgan.step": "CapturedStep",
    "fastgan.checkpoint": "load_checkpoint", "fastgan.distributed": "sync_batchnorm", "fastgan.bench": "Config",
    "fastgan.profiling": "summarize", "fastgan.flops": "dcgan_step_flops", "fastgan.train": "Trainer",
    "fastgan.data": "epoch_loader", "fastgan.sample": "save_grid", "fastgan.interpolate": "slerp",
    "fastgan.demo": "run", "fastgan.build_ext": "run", "fastgan.ops": "bn_act", "fastgan.cli": "main",
}

_SCRIPT = """
import importlib, json, sys, warnings
import fastgan
result = {}
for old, attribute in json.loads(sys.argv[1]).items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
        again = importlib.import_module(old)
    new = fastgan.MOVED_MODULES.get(old, (old,))[0]
    result[old] = dict(same=module is again is sys.modules[new], spec=module.__spec__.name, new=new,
                       has=hasattr(module, attribute), warnings=[str(w.message) for w in caught])
print(json.dumps(result))
"""


def test_public_names():
    assert sorted(fastgan.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(fastgan, name) is not None
    assert fastgan.fuse is fastgan.nn.layers.fuse and fastgan.DCGAN is fastgan.nn.models.DCGAN
    assert fastgan.fused_conv.set_level is fastgan.set_level


def test_old_module_paths_still_import():
    out = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(OLD_PATHS)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) == set(OLD_PATHS)
    for old, r in result.items():
        assert r["same"] and r["has"], (old, r)
        assert r["spec"] == r["new"], f"{old}: the module's own spec must survive the alias, got {r['spec']}"
        documented = fastgan.MOVED_MODULES.get(old, (old, True))[1]
        if documented:
            assert r["warnings"] == [], (old, r["warnings"])
        else:
            assert r["warnings"] == [f"{old} moved to {r['new']}; import it from there"], (old, r["warnings"])
