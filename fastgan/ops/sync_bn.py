"""BatchNorm + activation with batch statistics over every rank of a process group (SyncBatchNorm), on
fastgan's kernels: what fastgan.ops.functional.batch_norm_act runs when its BatchNorm carries a process group
(fastgan.nn.distributed.sync_batchnorm sets one).
"""
import torch
import torch.distributed as dist

from .backends import kernel_ops
from .contract import ACTIVATIONS, stat_dtype, torch_act


def _gather_moments(count, mean, var, group):
    """Chan's merge of per-rank (count, mean, biased var) into the global (count, mean, biased var)."""
    local = torch.stack([torch.full_like(mean, count), mean, var * count])
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    counts, means, m2s = torch.stack(parts).unbind(1)
    total = counts.sum(0)
    global_mean = (counts * means).sum(0) / total
    m2 = (m2s + counts * (means - global_mean).square()).sum(0)
    return total, global_mean, m2 / total


def _channel_view(t, z):
    return t.view(1, -1, *[1] * (z.dim() - 2))


class _SyncBatchNormAct(torch.autograd.Function):
    """act(BN(z)) with batch statistics over all ranks.  Forward: the local count/mean/M2 are gathered and
    merged; backward: the per-channel sum(g) and sum(g*xhat) are all-reduced.  On the triton and cuda
    backends the kernels compute the local statistics, the apply, and g with its sums; only the
    cross-rank correction of dz is one extra elementwise torch pass."""

    @staticmethod
    def forward(ctx, z, weight, bias, running_mean, running_var, momentum, eps, act, slope, which, group):
        dims = [0, *range(2, z.dim())]
        count = z.numel() // z.shape[1]
        if which == "torch":
            var, mean = torch.var_mean(z.to(stat_dtype(z)), dim=dims, correction=0)
        else:
            if not (z.is_contiguous() or (z.dim() == 4 and z.is_contiguous(memory_format=torch.channels_last))):
                z = z.contiguous()
            # eps 0: var = invstd^-2 exactly
            mean, invstd = kernel_ops(which).channel_stats(z.detach(), None, None, 0.0, 0.0)
            var = invstd.pow(-2)
        total, mean, var = _gather_moments(count, mean, var, group)
        if running_mean is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * (total / (total - 1))).to(running_var.dtype), momentum)
        invstd = torch.rsqrt(var + eps)
        ctx.affine = weight is not None
        if not ctx.affine:  # unit affine parameters, so that the backward kernels still return the sums
            weight, bias = torch.ones_like(mean), torch.zeros_like(mean)
        if which == "torch":
            scale = weight.to(mean.dtype) * invstd
            pre = z.to(mean.dtype) * _channel_view(scale, z) + _channel_view(bias - mean * scale, z)
            y = torch_act(pre, act, slope).to(z.dtype)
        else:
            y = kernel_ops(which).bn_act(z, mean, invstd, weight, bias, False, ACTIVATIONS[act], float(slope))
        ctx.save_for_backward(z, mean, invstd, weight, bias)
        ctx.config = (act, slope, which, group, total)
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            raise RuntimeError("synchronised BatchNorm has a first-order backward only: a double backward "
                               "(create_graph=True, e.g. a gradient penalty) needs it off")
        z, mean, invstd, weight, bias = ctx.saved_tensors
        act, slope, which, group, total = ctx.config
        dims = [0, *range(2, z.dim())]
        xhat = (z.to(mean.dtype) - _channel_view(mean, z)) * _channel_view(invstd, z)
        if which == "torch":
            pre = (xhat * _channel_view(weight.to(mean.dtype), z) + _channel_view(bias.to(mean.dtype), z))
            with torch.enable_grad():
                pre.requires_grad_(True)
                (g,) = torch.autograd.grad(torch_act(pre, act, slope), pre, dy.to(mean.dtype))
            sums = torch.stack([g.sum(dims), (g * xhat).sum(dims)])
            dz_local = g * _channel_view(weight.to(mean.dtype) * invstd, z)
        else:
            dz_local, dweight, dbias = kernel_ops(which).bn_act_backward(
                dy, z, mean, invstd, weight, bias, False, ACTIVATIONS[act], float(slope))
            sums = torch.stack([dbias, dweight]).to(mean.dtype)
        local_sums = sums.clone()
        dist.all_reduce(sums, group=group)
        k = weight.to(mean.dtype) * invstd / total
        dz = dz_local - xhat * _channel_view(k * sums[1], z) - _channel_view(k * sums[0], z)
        dweight, dbias = (local_sums[1].to(weight.dtype), local_sums[0].to(bias.dtype)) if ctx.affine else (None, None)
        return dz.to(z.dtype), dweight, dbias, None, None, None, None, None, None, None, None


def sync_batch_norm_act(z, weight, bias, running_mean, running_var, momentum, eps, act, slope, which, group):
    """act(BatchNorm(z)) in training mode, normalised with the statistics of z over every rank of ``group``.

    Gradients: dz is exact for the global batch; dweight and dbias are this rank's share (DDP averages them).
    Running stats are updated identically on every rank.  See fastgan.ops.functional.batch_norm_act for the
    arguments."""
    return _SyncBatchNormAct.apply(z, weight, bias, running_mean, running_var, momentum, eps, act, slope, which,
                                   group)
