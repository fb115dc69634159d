"""Measuring fastgan, over fastgan.nn: FLOPs, tolerances, bench, profile, the doctor (docs/design.md
sections 2 and 7)."""
