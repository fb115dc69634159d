"""The activations the fused kernels apply, by code: the ``act`` argument of the ops (fastgan.ops.ACTIVATIONS
names them) and the ACT constexpr of the Triton kernels.  Defined here once; csrc/fastgan_ext.h's
``Activation`` enum holds the same values (tests/test_bn_act.py checks that it does).  No triton import."""
NONE = 0
RELU = 1
LEAKY_RELU = 2  # with the op's ``slope``
TANH = 3

CODES = {"none": NONE, "relu": RELU, "leaky_relu": LEAKY_RELU, "tanh": TANH}
