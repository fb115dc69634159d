"""How close to the reference is close enough: the tolerances of docs/design.md section 6.

``TOLERANCES[mode]``: ``atol``/``rtol`` for outputs (None: compare by rel-L2 only) and ``rel_l2`` for
gradients (and for everything where atol is None), with rel-L2 = ||actual - expected|| / ||expected||.
Modes: "fp32" (exact fp32, TF32 off), "tf32" (TF32, or Triton's default fp32 dot), "fp16" and "bf16"
(autocast).  The tests (tests/parity.py) and ``python -m fastgan doctor`` use this one table.
"""

TOLERANCES = {
    "fp32": dict(atol=1e-4, rtol=1e-4, rel_l2=1e-3),
    "tf32": dict(atol=None, rtol=None, rel_l2=3e-3),
    "fp16": dict(atol=None, rtol=None, rel_l2=2e-2),
    "bf16": dict(atol=None, rtol=None, rel_l2=2e-2),
}


def rel_l2(actual, expected):
    """||actual - expected|| / ||expected||, computed in float64, as a Python float (NaN in: NaN out)."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()
