"""kernels/tiling.py, the tile choice of the L2 kernels: what fits which GPU, and the L1 fallback of
fastgan.nn.fused_conv when nothing does.  The compiled check of the same estimates is test_sm90_resources.py."""
import pytest
import torch
from torch import nn

from fastgan.kernels import tiling
from fastgan.nn import fused_conv
from fastgan.nn.layers import FusedSequential
from fastgan.ops import backends, conv_chain
from parity import assert_close, init_params, needs_triton_here

HEAVIEST = tiling.Operand(2, True)  # the dgrad's A: the BN backward map of g and z


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_l2_kernel_fits_sm90(dtype, monkeypatch):
    monkeypatch.setattr(tiling, "device_of", lambda device: tiling.SM90)
    assert tiling.l2_problem(dtype, torch.device("cuda")) is None
    elem = torch.empty((), dtype=dtype).element_size()
    for exact in (False, True):
        g = tiling.gemm(elem, exact, HEAVIEST, tiling.Operand())
        for block_m in (64, 128):
            for c_in, c_out in ((3, 64), (64, 3), (512, 1024), (4, 4)):
                tiles = tiling.conv_candidates(block_m, c_in, c_out, g, tiling.SM90)
                assert tiles and all(tiling.fits(t, g, tiling.SM90) for t in tiles)
                assert all(t.block_n <= max(16, c_out * 2) and t.block_k <= max(16, c_in * 2) for t in tiles)
        wgrad = tiling.gemm(elem, exact, HEAVIEST, tiling.Operand(1, True))
        assert tiling.wgrad_candidates(1024, 1024, wgrad, tiling.SM90)


def test_finding_1_tile_is_pruned():
    """The fp64 dgrad tile that needed 258,560 B on an H100 (BLOCK_N 16, BLOCK_K 64, 4 warps, 4 stages)."""
    g = tiling.gemm(8, False, HEAVIEST, tiling.Operand())
    tile = tiling.Tile(64, 16, 64, 4, 4)
    assert tiling.shared_memory(tile, g) > tiling.SM90.smem_per_block
    assert tile not in tiling.conv_candidates(64, 4, 4, g, tiling.SM90)


def test_pick_fills_the_device():
    g = tiling.gemm(2, False, tiling.Operand(1, True), tiling.Operand())
    tiles = tiling.conv_candidates(64, 512, 512, g, tiling.SM90)
    assert tiles[0].block_n == 128
    assert tiling.pick_conv(tiles, lambda t: 10**6 // t.block_n, tiling.SM90) == tiles[0]
    # 32 row tiles: 128-wide column tiles make 128 programs, 0.97 of a wave of 132 SMs: that fills it.
    assert tiling.pick_conv(tiles, lambda t: 32 * (512 // t.block_n), tiling.SM90).block_n == 128
    # 16 row tiles: 64 programs at 128 wide (half a wave), 128 at 64 wide.
    assert tiling.pick_conv(tiles, lambda t: 16 * (512 // t.block_n), tiling.SM90).block_n == 64
    assert tiling.pick_conv(tiles, lambda t: 512 // t.block_n, tiling.SM90).block_n == 16  # none fills: most


SMALL_GPU = tiling.SM90._replace(smem_per_block=16 * 1024)


def test_too_small_a_gpu_has_a_reason(monkeypatch):
    monkeypatch.setattr(tiling, "device_of", lambda device: SMALL_GPU)
    problem = tiling.l2_problem(torch.float64, torch.device("cuda"))
    assert problem is not None and "16384 bytes of shared memory" in problem


def test_l2_falls_back_to_l1_with_the_reason(monkeypatch):
    """When no tile fits, the layers run at L1 (no conv_chain), say why once, and give the same numbers."""
    needs_triton_here("cpu")
    monkeypatch.setattr(tiling, "device_of", lambda device: SMALL_GPU)
    backends.warn_once.cache_clear()
    calls = []
    original = conv_chain.conv_chain
    monkeypatch.setattr(conv_chain, "conv_chain", lambda *args: calls.append(1) or original(*args))
    make = lambda: nn.Sequential(nn.Conv2d(3, 4, 4, 2, 1, bias=False), nn.BatchNorm2d(4), nn.LeakyReLU(0.2))  # noqa
    fused = FusedSequential(*init_params(make(), 0), backend="triton", level="L2")
    ref = init_params(make(), 0)
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(RuntimeWarning, match="run at fusion level L1, not L2: no conv tile"):
        y = fused(x)
    assert not calls
    assert_close(y, ref(x), "fp32")
