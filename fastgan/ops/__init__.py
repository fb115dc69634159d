"""The op layer: the fused ops' contract and everything behind it.

    contract      the schemas, fake kernels and autograd every kernel backend registers; BackendUnavailable
    backends      "auto" | "torch" | "triton" | "cuda": selection, availability, use_backend, FASTGAN_BACKEND
    functional    conv_bn_act, batch_norm_act, sigmoid_bce: input checks and dispatch; the torch composite
                  is the reference
    triton_ops    the triton backend's custom ops (namespace ``fastgan``), over kernels/
    extension     the C++/CUDA extension (csrc/): JIT build with ninja, cache, lock, warn-once fallback
    ext_ops       the extension's ops (namespace ``fastgan_ext``)
    sync_bn       BatchNorm + activation with statistics over a process group
    conv_chain    fusion level L2: implicit-GEMM conv chains carrying BN and activation, over kernels/conv_gemm.py

Everything here depends only on torch, kernels/ and csrc/; fastgan.nn builds modules on it.
The names below are the triton backend's ops, importable as ``fastgan.ops.bn_act`` etc. as before.
"""
from .contract import ACTIVATIONS, BackendUnavailable, register
from .triton_ops import bn_act, bn_act_backward, channel_stats, sigmoid_bce

__all__ = ["ACTIVATIONS", "BackendUnavailable", "bn_act", "bn_act_backward", "channel_stats", "register",
           "sigmoid_bce"]
