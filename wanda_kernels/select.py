"""k-th smallest value of a whole tensor: a device-wide radix select, four passes of 8 bits.

Spec: ``wanda_kernels.reference.kth_smallest_torch`` = ``torch.sort(x.flatten().float())[0][k]`` (optionally of
|x|), with ``torch.sort``'s order: NaN above +inf, -0.0 equal to +0.0. x: any shape, fp16/bf16/fp32, any strides
that flatten without a copy; returns an fp32 0-d tensor on x's device (no host synchronization).
Each pass is a grid over all elements that histograms one 8-bit digit of the order-preserving key (``_keys``)
among the elements whose higher digits match the prefix found so far; four reads of x.
Design notes (why not ``torch.kthvalue``): docs/kernels.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanda_kernels._keys import load_scores, ordered_keys
from wanda_kernels._runtime import check_kernel_device, interpreting, on_input_device
from wanda_kernels._validate import FLOAT_DTYPES

RADIX_BITS = 8
N_BINS = 1 << RADIX_BITS


@triton.jit
def _digit_histogram_kernel(
    x_ptr, prefix_ptr, hist_ptr, numel, PASS: tl.constexpr, ABSOLUTE: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < numel
    keys = ordered_keys(load_scores(x_ptr, x_ptr, offs, offs, valid, 1 if ABSOLUTE else 0))
    unsigned = keys.to(tl.int64) + 2147483648  # signed key order -> 0 .. 2^32 - 1
    digit = ((unsigned >> (24 - 8 * PASS)) & 255).to(tl.int32)
    if PASS > 0:
        prefix = tl.load(prefix_ptr)  # the higher digits chosen by the earlier passes
        valid = valid & ((unsigned >> (32 - 8 * PASS)) == prefix)
    # Elements outside the candidate set go to bin 256+ (the upper half, never stored): no masked histogram.
    counts = tl.histogram(tl.where(valid, digit, 256), 512)
    bins = tl.arange(0, 512)
    # int64 totals: past 2^31 elements one bin's count would wrap in int32.
    tl.atomic_add(hist_ptr + bins, counts.to(tl.int64), mask=bins < 256)


@on_input_device
def kth_smallest(x: torch.Tensor, k: int, absolute: bool = False) -> torch.Tensor:
    """fp32 0-d tensor: the value at index ``k`` of ``sort(x.flatten())`` (of ``|x|`` when ``absolute``)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be a float16, bfloat16 or float32 tensor, got {getattr(x, 'dtype', type(x))}")
    numel = x.numel()
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < numel:
        raise ValueError(f"k must be an int in [0, {numel}) (x has {numel} elements), got {k!r}")
    check_kernel_device(x)
    flat = x.reshape(-1)  # a view for contiguous x; a copy in x's dtype otherwise
    device = x.device
    hist = torch.empty(N_BINS, dtype=torch.int64, device=device)
    prefix = torch.zeros((), dtype=torch.int64, device=device)
    rank = torch.full((), k, dtype=torch.int64, device=device)  # rank of the target among the candidates
    block = 4096 if interpreting() else 2048
    grid = (triton.cdiv(numel, block),)
    for p in range(32 // RADIX_BITS):
        hist.zero_()
        _digit_histogram_kernel[grid](flat, prefix, hist, numel, PASS=p, ABSOLUTE=absolute, BLOCK=block)
        cumulative = hist.cumsum(0)
        digit = torch.searchsorted(cumulative, rank.reshape(1), right=True).reshape(())  # first bin past rank
        below = torch.where(digit > 0, cumulative.gather(0, (digit - 1).clamp_min(0).reshape(1)).reshape(()), 0)
        rank = rank - below
        prefix = (prefix << RADIX_BITS) | digit
    key = (prefix - 2**31).to(torch.int32)  # back to the signed order-preserving key, then to float bits
    bits = key ^ ((key >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32)
