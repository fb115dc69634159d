"""Triton kernels, one file per fused op, each with its launch helpers.

Installed as ``fastgan.kernels``.  Importing this package imports triton: set
TRITON_INTERPRET=1 before that to run the kernels on CPU tensors.
"""
