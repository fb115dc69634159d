"""Output allocation for the kernels, the dtype they accumulate in, and the int32 limit of their indexing."""
import torch

from ..usage import UsageError

INT32_MAX = 2**31 - 1


def accumulator_dtype(dtype):
    """The dtype in which the kernels accumulate data of ``dtype``, and hold statistics and losses: float64 for
    float64, float32 for float32 and half storage."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_accumulator(dtype):
    """accumulator_dtype(``dtype``) as a Triton dtype (the kernels' ACC constexpr); imports triton."""
    import triton.language as tl

    return getattr(tl, str(accumulator_dtype(dtype)).removeprefix("torch."))


# Tests set this to fill every kernel output with NaN first, so that an element no kernel wrote shows.
POISON_OUTPUTS = False


def empty_like(t, **kwargs):
    out = torch.empty_like(t, **kwargs)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def empty(*shape, **kwargs):
    out = torch.empty(*shape, **kwargs)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def check_int32(op, name, t, reach=True):
    """``op``'s kernels index with int32: t's elements, and (``reach``) the offset of its furthest one, must fit.
    ``reach=False`` for a tensor made dense before the kernels read it: then only its size counts."""
    if t.numel() > INT32_MAX:
        raise UsageError(f"{op} indexes with int32: {name} has {t.numel()} elements, more than 2**31 - 1; "
                         "split the batch")
    furthest = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) if t.numel() else 0
    if reach and furthest > INT32_MAX:
        raise UsageError(f"{op} indexes with int32: {name} (shape {tuple(t.shape)}, strides {t.stride()}) "
                         f"reaches element {furthest}, past 2**31 - 1; pass it contiguous, or split the batch")
