"""kth_smallest (device-wide radix select) against torch.sort, the selection magnitude and SparseGPT rely on."""

from __future__ import annotations

import pytest
import torch

from wanda_kernels import reference as ref
from wanda_kernels.select import kth_smallest


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("absolute", [False, True])
def test_matches_sort_at_every_kind_of_rank(dtype, absolute, device):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 211, generator=gen) * 3).to(dtype=dtype, device=device)
    x[3, :50] = 0.25  # a long run of ties
    x[5, :7] = -0.0
    numel = x.numel()
    for k in (0, 1, numel // 3, numel // 2, numel - 2, numel - 1):
        got = kth_smallest(x, k, absolute)
        want = ref.kth_smallest_torch(x, k, absolute)
        assert got.dtype == torch.float32 and got.shape == ()
        assert got.item() == want.item(), (k, got.item(), want.item())


def test_non_finite_order_and_non_contiguous(device):
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[nan, -inf, 3.0, inf], [0.0, -0.0, -2.0, nan]], device=device)
    expected = [-inf, -2.0, 0.0, 0.0, 3.0, inf]
    for k, want in enumerate(expected):
        assert kth_smallest(x, k).item() == want
    assert kth_smallest(x, 6).isnan() and kth_smallest(x, 7).isnan()
    base = torch.randn(64, 48, generator=torch.Generator().manual_seed(1)).to(device)
    strided = base.t()[::2]
    assert kth_smallest(strided, 500).item() == ref.kth_smallest_torch(strided, 500).item()


def test_bad_arguments(device):
    x = torch.randn(4, 4, device=device)
    with pytest.raises(ValueError, match="k must be"):
        kth_smallest(x, 16)
    with pytest.raises(ValueError, match="k must be"):
        kth_smallest(x, -1)
    with pytest.raises(ValueError, match="x must be"):
        kth_smallest(x.long(), 0)
