"""The op layer: the fused ops' contract, the backends behind it and their dispatch (docs/design.md
sections 2 and 4).  The names below are the triton backend's ops.
"""
from .contract import ACTIVATIONS, BackendUnavailable, register
from .triton_ops import bn_act, bn_act_backward, channel_stats, sigmoid_bce

__all__ = ["ACTIVATIONS", "BackendUnavailable", "bn_act", "bn_act_backward", "channel_stats", "register",
           "sigmoid_bce"]
