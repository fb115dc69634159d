"""Triton kernels, one file per fused op, each with its launch helpers.

Installed as ``fastgan.kernels``.  The kernel modules (bn_act, sigmoid_bce, conv_gemm) import triton; set
TRITON_INTERPRET=1 before that to run them on CPU tensors.  geometry, activations and outputs do not import triton.
"""
