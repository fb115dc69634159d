"""The geometry of fastgan's 4x4 convolutions (see conv_gemm.py), without triton: the op layer plans chains with it."""
from typing import NamedTuple


class Geometry(NamedTuple):
    """A 4x4 convolution as fastgan runs it: DOWN (conv) or UP (transposed conv), stride S, padding P."""
    up: bool
    stride: int
    padding: int

    def out_size(self, h, w):
        if self.up:
            return (h - 1) * self.stride - 2 * self.padding + 4, (w - 1) * self.stride - 2 * self.padding + 4
        return (h + 2 * self.padding - 4) // self.stride + 1, (w + 2 * self.padding - 4) // self.stride + 1

    def transposed(self):
        return Geometry(not self.up, self.stride, self.padding)
