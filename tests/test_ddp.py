"""Distributed training on CPU with gloo: 2 ranks with synchronised BatchNorm, each on half the batch,
equal one process on the whole batch; and the CLI under torchrun."""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastgan.cli.train import Settings, Trainer
from fastgan.nn import distributed, presets, reference
from fastgan.nn.layers import fuse
from fastgan.ops.functional import batch_norm_act
from fastgan.usage import UsageError
from parity import HAS_TRITON, INTERPRETER, assert_close

pytestmark = pytest.mark.slow  # two gloo ranks and torchrun: process start-up

WORLD = 2
# (backend, sizes, global batch): the torch backend at a modest size, Triton (interpreted) tiny.
CASES = [("torch", dict(nz=16, ngf=8, ndf=8), 8)] + (
    [("triton", dict(nz=4, ngf=2, ndf=2), 4)] if HAS_TRITON and INTERPRETER else [])


def _inputs(sizes, batch):
    gen = torch.Generator().manual_seed(1)
    return torch.rand(batch, 3, 64, 64, generator=gen) * 2 - 1, torch.randn(batch, sizes["nz"], generator=gen)


def _train_step(backend, sizes, real, noise, context):
    """One Trainer step of dcgan64 from seed 0; returns params, grads and buffers of G and D afterwards."""
    torch.manual_seed(0)
    G, D, recipe = presets.build("dcgan64", **sizes)
    G, D = fuse(G, backend), fuse(D, backend)
    if context.distributed:
        distributed.sync_batchnorm(G)
        distributed.sync_batchnorm(D)
    s = Settings(preset="dcgan64", nz=recipe.nz, ngf=recipe.ngf, ndf=recipe.ndf, nc=3, image_size=64,
                 batch_size=real.shape[0] * context.world_size, loss="bce", lr=recipe.lr, beta1=recipe.betas[0],
                 beta2=recipe.betas[1], weight_decay=0.0, label_smoothing=0.0, d_steps=1, g_steps=1, noise="normal")
    Trainer(G, D, s, context, backend).step(real, noise)
    out = {}
    for tag, model in (("G", G), ("D", D)):
        out.update({f"{tag}.{k}": p.detach().clone() for k, p in model.named_parameters()})
        out.update({f"{tag}.{k}.grad": p.grad.clone() for k, p in model.named_parameters()})
        out.update({f"{tag}.{k}": b.clone() for k, b in model.named_buffers()})
    return out


def _op_case(backend, shape, channels_last):
    """batch_norm_act on this rank's half, synchronised, against the whole batch in one call."""
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(shape, generator=gen) * 2 + 0.5
    dy = torch.randn(shape, generator=gen)
    if channels_last:
        z, dy = z.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    C = shape[1]
    params = [torch.randn(C, generator=gen) + 1, torch.randn(C, generator=gen)]
    stats = [torch.randn(C, generator=gen), torch.rand(C, generator=gen) + 0.5]

    def run(z, dy, group):
        z = z.clone().requires_grad_()
        w, b = (p.clone().requires_grad_() for p in params)
        rm, rv = (t.clone() for t in stats)
        y = batch_norm_act(z, w, b, rm, rv, act="leaky_relu", slope=0.2, backend=backend, process_group=group)
        y.backward(dy)
        return y.detach(), z.grad, w.grad, b.grad, rm, rv

    half = shape[0] // WORLD
    part = slice(dist.get_rank() * half, (dist.get_rank() + 1) * half)
    mine = run(z[part], dy[part], dist.group.WORLD)
    whole = run(z, dy, None)
    for t in mine[2:4]:  # each rank's share of dweight/dbias: their sum is the whole batch's
        dist.all_reduce(t)
    for name, a, b in zip(("y", "dz", "dweight", "dbias", "running_mean", "running_var"), mine,
                          (whole[0][part], whole[1][part], *whole[2:])):
        assert_close(a, b, "fp32", what=f"{backend} {tuple(shape)} {name}", grad=name.startswith("d"))


def _worker(rank, store, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        for backend, _, _ in CASES:
            for shape, channels_last in (((6, 3, 5, 4), False), ((4, 5, 3, 3), True), ((8, 6), False)):
                _op_case(backend, shape, channels_last)
        context = distributed.Context(rank, WORLD, torch.device("cpu"))
        results = {}
        for backend, sizes, batch in CASES:
            real, noise = _inputs(sizes, batch)
            half = slice(rank * batch // WORLD, (rank + 1) * batch // WORLD)
            results[backend] = _train_step(backend, sizes, real[half], noise[half], context)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sync_bn_two_ranks_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for backend, sizes, batch in CASES:
        real, noise = _inputs(sizes, batch)
        whole = _train_step(backend, sizes, real, noise, distributed.Context())
        for rank, results in enumerate(ranks):
            got = results[backend]
            assert got.keys() == whole.keys()
            for key, expected in whole.items():
                assert_close(got[key].double(), expected.double(), "fp32", what=f"{backend} rank {rank} {key}",
                             grad=key.endswith(".grad"))


def test_cli_under_torchrun(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", "-m", "fastgan",
           "train", "--max-steps", "2", "--sync-bn", "--batchSize", "8", "--ngf", "4", "--ndf", "4",
           "--builtin-images", "32", "--niter", "1", "--outf", str(tmp_path), "--device", "cpu", "--manualSeed", "3"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "over 2 processes" in proc.stdout
    G, D = reference.Generator(ngf=4), reference.Discriminator(ndf=4)
    G.load_state_dict(torch.load(tmp_path / "netG_epoch_0.pth"))
    D.load_state_dict(torch.load(tmp_path / "netD_epoch_0.pth"))
    state = torch.load(tmp_path / "train_state_epoch_0.pt")
    assert state["step"] == 2 and len(state["history"]) == 2
    assert (tmp_path / "fake_samples_epoch_000.png").is_file()
    # one G forward per step (the G step reuses the D step's fakes); the sample grid leaves the buffers alone
    assert int(G.main[1].num_batches_tracked) == 2


def test_a_numbered_gpu_under_torchrun_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match=r"device cuda:1: under torchrun each process takes "
                                                     r"cuda:LOCAL_RANK; ask for cuda without an index"):
        distributed.setup("cuda:1")
