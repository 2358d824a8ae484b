"""The tile kernels (wanda_kernels.tiers) against their plain-torch references (wanda_kernels.reference_tiers).

Runs under the Triton interpreter on CPU (conftest) and unchanged on a GPU. Tiers and masks are compared exactly
(torch.equal); tile scores to fp32 rounding (their sums run in another order than torch's mean). Shapes are odd on
purpose: ragged edge tiles, block sizes that are not powers of two or not multiples of 4 (2:4 groups of the
flattened tile then cross tile rows), b = 1 and b = 64. Each case stays at a few dozen program instances.
"""

from __future__ import annotations

import pytest
import torch

import wanda_kernels as wk
from wanda_kernels import reference_tiers as ref
from wanda_kernels.reference_tiers import TIER_24, TIER_DENSE, TIER_TOPK

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rows, cols, block_size): ragged in both dimensions, b % 4 != 0 (6, 5), ragged widths % 4 != 0 (45 % 8 = 5,
# 70 % 16 = 6, 130 % 64 = 2), b = 1 and b = 64.
SHAPES = [(64, 96, 16), (50, 70, 16), (37, 45, 8), (30, 22, 6), (33, 18, 5), (40, 36, 12), (7, 9, 1), (70, 130, 64)]
VARIANTS = ["three_tier", "hybrid_2_4"]


def _weights(shape, dtype, device, kind="randn", seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "randn":
        w = torch.randn(shape, generator=gen)
    elif kind == "repeated":  # few distinct magnitudes: ties inside groups, tiles and at the k-th value
        w = torch.randint(-2, 3, shape, generator=gen).float()
    elif kind == "constant":
        w = torch.full(shape, -0.5)
    return w.to(dtype=dtype, device=device)


def _act_sq_norms(n_cols, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(n_cols, generator=gen) * 4
    a[::7] = 0.0  # dead input channels
    return a.to(device)


def _fork_tiers(weight, act_sq_norms, block_size):
    """Tiers as the fork assigns them by default: 35% dense, 45% 2:4, the rest top-k."""
    scores = ref.tile_scores_torch(weight, act_sq_norms, block_size)
    n = scores.numel()
    return ref.tile_tiers_torch(scores, int(n * 0.35), int(n * 0.45))


def _assert_mask_matches(weight, tiers, block_size, k, act_sq_norms, variant, rank_by_metric):
    got_mask, got_tiers = wk.tier_mask(weight, tiers, block_size, k, act_sq_norms, variant, rank_by_metric)
    want_mask, want_tiers = ref.tier_mask_torch(weight, tiers, block_size, k, act_sq_norms, variant, rank_by_metric)
    assert got_mask.dtype == torch.bool and got_tiers.dtype == torch.int8
    assert torch.equal(got_tiers, want_tiers)
    assert torch.equal(got_mask, want_mask)
    return got_mask, got_tiers


# --- tile_scores ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_norms", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_tile_scores_match_reference_to_fp32_rounding(shape, with_norms, dtype, device):
    rows, cols, b = shape
    w = _weights((rows, cols), dtype, device)
    a = _act_sq_norms(cols, device) if with_norms else None
    got = wk.tile_scores(w, a, b)
    want = ref.tile_scores_torch(w, a, b)
    assert got.dtype == torch.float32 and got.shape == want.shape
    # Same fp32 terms, another summation order: a sum of up to 4096 positive terms; observed <= 2 ulp apart.
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_tile_scores_non_contiguous_weight(device):
    base = _weights((45, 37), torch.float16, device)
    w = base.t()  # [37, 45] with strides (1, 37)
    assert not w.is_contiguous()
    a = _act_sq_norms(45, device)
    torch.testing.assert_close(wk.tile_scores(w, a, 8), ref.tile_scores_torch(w, a, 8), rtol=1e-6, atol=0)


def test_tile_scores_sqrt_of_norms_and_padded_mean(device):
    # |W| * a would give tile 0 the mean of [4, 1, 4, 1] = 2.5; |W| * sqrt(a): [2, 1, 2, 1] -> 1.5. The ragged
    # tile 1 has two valid entries (3 * sqrt(1)) and two of padding: mean 1.5, not 3 (mean over valid ones).
    w = torch.tensor([[1.0, 1.0, 3.0], [1.0, 1.0, 3.0]], device=device)
    a = torch.tensor([4.0, 1.0, 1.0], device=device)
    assert wk.tile_scores(w, a, 2).tolist() == [[1.5, 1.5]]


# --- tile_tiers -------------------------------------------------------------------------------------------


def _scores(kind, shape=(5, 7), device="cpu"):
    gen = torch.Generator().manual_seed(2)
    if kind == "randn":
        s = torch.randn(shape, generator=gen)
    elif kind == "repeated":  # ties at the boundaries; -0.0 and +0.0 mixed
        s = torch.randint(-2, 3, shape, generator=gen).float() / 2
        s[s == 0] = torch.tensor([-0.0, 0.0]).repeat(shape[0] * shape[1])[: int((s == 0).sum())]
    elif kind == "constant":
        s = torch.full(shape, 0.25)
    return s.to(device)


@pytest.mark.parametrize("per_band", [False, True])
@pytest.mark.parametrize("kind", ["randn", "repeated", "constant"])
def test_tile_tiers_equal_reference(kind, per_band, device):
    scores = _scores(kind, device=device)
    total = scores.numel()  # 35 tiles, 5 bands of 7
    counts = [(0, 0), (0, total), (total, 0), (12, 16), (1, total - 1), (7, 3), (13, 0), (0, 9)]
    for n_dense, n_24 in counts:
        got = wk.tile_tiers(scores, n_dense, n_24, per_band)
        assert got.dtype == torch.int8
        assert torch.equal(got, ref.tile_tiers_torch(scores, n_dense, n_24, per_band)), (n_dense, n_24)
        assert int((got == TIER_DENSE).sum()) == n_dense and int((got == TIER_24).sum()) == n_24


def test_tile_tiers_ties_go_to_the_lower_tile_index(device):
    scores = torch.full((2, 3), 1.0, device=device)
    assert wk.tile_tiers(scores, 2, 3).tolist() == [[0, 0, 1], [1, 1, 2]]
    assert wk.tile_tiers(scores, 2, 2, per_band=True).tolist() == [[0, 1, 2], [0, 1, 2]]


def test_tile_tiers_per_band_differs_from_global(device):
    # Band 0 holds every high score: globally all 4 dense tiles land there, per band 2 in each band.
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0], [1.0, 2.0, 3.0, 4.0]], device=device)
    global_tiers = wk.tile_tiers(scores, 4, 2)
    band_tiers = wk.tile_tiers(scores, 4, 2, per_band=True)
    assert global_tiers.tolist() == [[0, 0, 0, 0], [2, 2, 1, 1]]
    assert band_tiers.tolist() == [[0, 0, 1, 2], [2, 1, 0, 0]]
    assert torch.equal(band_tiers, ref.tile_tiers_torch(scores, 4, 2, per_band=True))


def test_tile_tiers_wide_bands_and_strided_scores(device):
    scores = _scores("repeated", (2, 130), device)  # 130 tiles a band: a 256-wide sort
    for per_band in (False, True):
        got = wk.tile_tiers(scores, 60, 100, per_band)
        assert torch.equal(got, ref.tile_tiers_torch(scores, 60, 100, per_band))
    strided = _scores("randn", (9, 6), device).t()  # [6, 9], not contiguous
    for per_band in (False, True):
        want = ref.tile_tiers_torch(strided, 20, 20, per_band)
        assert torch.equal(want, ref.tile_tiers_torch(strided.contiguous(), 20, 20, per_band))
        assert torch.equal(wk.tile_tiers(strided, 20, 20, per_band), want)


# --- tier_mask --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank_by_metric", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_tier_mask_equals_reference(shape, variant, rank_by_metric, device):
    rows, cols, b = shape
    w = _weights((rows, cols), torch.float32, device)
    a = _act_sq_norms(cols, device)
    k = 15  # the fork's k; above b * b (b = 1, 2, 3) every tile stays dense
    _assert_mask_matches(w, _fork_tiers(w, a, b), b, k, a, variant, rank_by_metric)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(37, 45, 8), (33, 18, 5)])
def test_tier_mask_half_precision_weights(shape, variant, dtype, device):
    rows, cols, b = shape
    w = _weights((rows, cols), dtype, device, seed=3)
    a = _act_sq_norms(cols, device)
    _assert_mask_matches(w, _fork_tiers(w, a, b), b, 7, a, variant, rank_by_metric=True)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["repeated", "constant"])
@pytest.mark.parametrize("shape", [(30, 22, 6), (20, 23, 8)])
def test_tier_mask_ties_lower_flat_index(shape, kind, variant, device):
    """Ties inside groups, tiles and at the k-th value; every tier present, also in the ragged tiles."""
    rows, cols, b = shape
    w = _weights((rows, cols), torch.float32, device, kind)
    a = _act_sq_norms(cols, device).round()  # integer norms: ties in the metric too
    grid = ref.tile_grid((rows, cols), b)
    tiers = (torch.arange(grid[0] * grid[1]) % 3).reshape(grid).to(torch.int8).to(device)
    mask, _ = _assert_mask_matches(w, tiers, b, 3, a, variant, rank_by_metric=kind == "repeated")
    # A full top-k tile: three_tier keeps every entry >= the 3rd largest (all, when constant); hybrid exactly 3.
    kept = int((~mask[:b, 2 * b : 3 * b]).sum())
    assert kept == 3 if variant == "hybrid_2_4" else kept >= 3
    if kind == "constant" and variant == "hybrid_2_4":
        assert (~mask[:b, 2 * b : 3 * b]).reshape(-1).nonzero().flatten().tolist() == [0, 1, 2]


@pytest.mark.parametrize("variant", VARIANTS)
def test_tier_mask_non_contiguous_weight_and_tiers(variant, device):
    base = _weights((45, 33), torch.bfloat16, device, "repeated")
    w = base.t()  # [33, 45]
    a = _act_sq_norms(45, device)
    tiers = _fork_tiers(w, a, 5).t().contiguous().t()  # [7, 9] with column-major strides
    assert not w.is_contiguous() and not tiers.is_contiguous()
    _assert_mask_matches(w, tiers, 5, 4, a, variant, rank_by_metric=False)


@pytest.mark.parametrize("variant", VARIANTS)
def test_tier_mask_without_norms_and_random_tiers(variant, device):
    w = _weights((26, 30), torch.float16, device, seed=5)
    gen = torch.Generator().manual_seed(6)
    tiers = torch.randint(0, 3, ref.tile_grid(w.shape, 7), generator=gen, dtype=torch.int8).to(device)
    for rank_by_metric in (False, True):  # without norms the metric is |W|: both rankings agree
        _assert_mask_matches(w, tiers, 7, 5, None, variant, rank_by_metric)


@pytest.mark.parametrize("variant", VARIANTS)
def test_tier_mask_k_at_least_the_tile_size(variant, device):
    w = _weights((13, 11), torch.float32, device)
    tiers = torch.full(ref.tile_grid(w.shape, 4), TIER_TOPK, dtype=torch.int8, device=device)
    for k in (9, 12, 16):  # 12 = the right-edge tiles' entries (4 x 3), 16 = b * b
        mask, _ = _assert_mask_matches(w, tiers, 4, k, None, variant, rank_by_metric=False)
    assert not mask.any()  # at k = b * b every tile stays dense
    # k > b * b: the rule "a tile of at most k entries stays dense" keeps everything.
    got, _ = wk.tier_mask(w, tiers, 4, 17, variant=variant)
    assert not got.any()
    assert torch.equal(got, ref.tier_mask_torch(w, tiers, 4, 17, variant=variant)[0])


def test_tier_mask_rank_by_metric_differs_from_magnitude(device):
    # One 2:4 group: by |W| keep columns 0, 1; by |W| * sqrt(a) = [1, 1.5, 4, 4] keep columns 2, 3.
    w = torch.tensor([[4.0, 3.0, 2.0, 1.0]], device=device)
    a = torch.tensor([0.0625, 0.25, 4.0, 16.0], device=device)
    tiers = torch.tensor([[TIER_24]], dtype=torch.int8, device=device)
    by_magnitude, _ = wk.tier_mask(w, tiers, 4, 1, a)
    by_metric, _ = wk.tier_mask(w, tiers, 4, 1, a, rank_by_metric=True)
    assert by_magnitude.tolist() == [[False, False, True, True]]
    assert by_metric.tolist() == [[True, True, False, False]]
    topk_tiers = torch.tensor([[TIER_TOPK]], dtype=torch.int8, device=device)
    assert wk.tier_mask(w, topk_tiers, 4, 1, a)[0].tolist() == [[False, True, True, True]]
    # The k-th largest metric, 4, is tied: three_tier keeps both entries, hybrid_2_4 exactly k = 1 (the lower).
    assert wk.tier_mask(w, topk_tiers, 4, 1, a, rank_by_metric=True)[0].tolist() == [[True, True, False, False]]
    hybrid, _ = wk.tier_mask(w, topk_tiers, 4, 1, a, "hybrid_2_4", rank_by_metric=True)
    assert hybrid.tolist() == [[True, True, False, True]]


def test_tier_mask_groups_cross_tile_rows_when_b_is_not_a_multiple_of_4(device):
    # b = 3: the flattened 3 x 3 tile groups entries (0..3), (4..7), (8); a per-row 2:4 would differ. The values
    # are the flat indices, so each group keeps its two last entries: flat 2, 3, 6, 7 and the lone 8.
    w = torch.arange(1.0, 10.0, device=device).reshape(3, 3)
    tiers = torch.tensor([[TIER_24]], dtype=torch.int8, device=device)
    for variant in VARIANTS:
        mask, _ = _assert_mask_matches(w, tiers, 3, 1, None, variant, rank_by_metric=False)
    three_tier, _ = wk.tier_mask(w, tiers, 3, 1)
    assert (~three_tier).reshape(-1).nonzero().flatten().tolist() == [2, 3, 6, 7, 8]


def test_tier_mask_hybrid_threshold_resolves_tiers(device):
    # Tile 0: each group [10, 10, 0, 0] keeps all of its metric under 2:4 -> stays 2:4. Tile 1: constant, 2:4 keeps
    # half (< 0.8) -> dense. Tile 2 (top-k) and tile 3 (dense) are left as they are.
    w = torch.ones(4, 16, device=device)
    w[:, 0:4] = torch.tensor([10.0, 10.0, 0.0, 0.0], device=device)
    tiers = torch.tensor([[TIER_24, TIER_24, TIER_TOPK, TIER_DENSE]], dtype=torch.int8, device=device)
    mask, resolved = _assert_mask_matches(w, tiers, 4, 3, None, "hybrid_2_4", rank_by_metric=False)
    assert resolved.tolist() == [[TIER_24, TIER_DENSE, TIER_TOPK, TIER_DENSE]]
    assert not mask[:, 4:8].any() and not mask[:, 12:].any()
    assert int((~mask[:, 8:12]).sum()) == 3
    three_tier_mask, unchanged = wk.tier_mask(w, tiers, 4, 3)
    assert torch.equal(unchanged, tiers) and int(three_tier_mask[:, 4:8].sum()) == 8
    loose, resolved = wk.tier_mask(w, tiers, 4, 3, variant="hybrid_2_4", score_threshold=0.4)
    assert resolved.tolist() == [[TIER_24, TIER_24, TIER_TOPK, TIER_DENSE]] and int(loose[:, 4:8].sum()) == 8


def test_tier_ops_chain_like_the_fork(device):
    """tile_scores -> tile_tiers -> tier_mask with the fork's defaults (0.35 / 0.45, k = 15, b = 16)."""
    w = _weights((48, 80), torch.float16, device, seed=9)
    a = _act_sq_norms(80, device)
    scores = wk.tile_scores(w, a, 16)
    n = scores.numel()
    tiers = wk.tile_tiers(scores, int(n * 0.35), int(n * 0.45))
    assert torch.equal(tiers, _fork_tiers(w, a, 16))
    _assert_mask_matches(w, tiers, 16, 15, a, "three_tier", rank_by_metric=False)


def test_empty_weight(device):
    w = torch.zeros(0, 5, device=device)
    assert torch.equal(wk.tile_scores(w, None, 4), ref.tile_scores_torch(w, None, 4))
    assert wk.tile_scores(w, None, 4).shape == (0, 2)
    tiers = torch.zeros(0, 2, dtype=torch.int8, device=device)
    for op in (wk.tier_mask, ref.tier_mask_torch):
        mask, resolved = op(w, tiers, 4, 3)
        assert mask.shape == (0, 5) and resolved.shape == (0, 2)
    for op in (wk.tile_tiers, ref.tile_tiers_torch):
        assert op(torch.zeros(0, 2, device=device), 0, 0, per_band=True).shape == (0, 2)


def test_kernel_ops_find_the_tile_ops():
    from pruning.methods.ops import kernel_ops

    ops = kernel_ops("triton")
    assert (ops.tile_scores, ops.tile_tiers, ops.tier_mask) == (wk.tile_scores, wk.tile_tiers, wk.tier_mask)
    torch_ops = kernel_ops("torch")
    assert torch_ops.tier_mask is ref.tier_mask_torch


# --- validation -------------------------------------------------------------------------------------------


def _same_error(ours, reference, args, kwargs, match):
    """Our op and its reference both raise a ValueError matching ``match``."""
    for op in (ours, reference):
        with pytest.raises(ValueError, match=match):
            op(*args, **kwargs)


@pytest.mark.parametrize("block_size", [0, 65, 2.0, True, -4])
def test_bad_block_size(block_size, device):
    w = torch.ones(8, 8, device=device)
    tiers = torch.zeros(1, 1, dtype=torch.int8, device=device)
    _same_error(wk.tile_scores, ref.tile_scores_torch, (w, None, block_size), {}, "block_size")
    _same_error(wk.tier_mask, ref.tier_mask_torch, (w, tiers, block_size, 3), {}, "block_size")


def test_bad_tier_mask_arguments(device):
    w = torch.ones(8, 12, device=device)
    good = torch.zeros(2, 3, dtype=torch.int8, device=device)
    cases = [
        ((w, good.to(torch.int32), 4, 3), {}, "tiers must be an int8"),
        ((w, good[:, :2], 4, 3), {}, r"tile grid \(2, 3\)"),
        ((w, good, 4, 0), {}, "topk_per_block"),
        ((w, good, 4, 3), {"variant": "four_tier"}, "variant"),
        ((w, good, 4, 3), {"act_sq_norms": torch.ones(8, device=device)}, "act_sq_norms"),
        ((w.long(), good, 4, 3), {}, "weight"),
    ]
    for args, kwargs, match in cases:
        _same_error(wk.tier_mask, ref.tier_mask_torch, args, kwargs, match)


@pytest.mark.parametrize("per_band", [False, True])
def test_bad_tile_counts(per_band, device):
    scores = torch.rand(3, 4, device=device)
    cases = [
        ((scores, 8, 5), "exceeds the 12 tiles"),
        ((scores, -1, 0), "n_dense"),
        ((scores, 0, 1.5), "n_24"),
        ((scores.half(), 1, 1), "float32"),
        ((scores[0], 1, 1), "2-D"),
    ]
    for args, match in cases:
        _same_error(wk.tile_tiers, ref.tile_tiers_torch, (*args, per_band), {}, match)
