"""Tile pruning (three_tier, hybrid_2_4) against Jiajun-Ji/wanda's published functions, kept verbatim in
bench/baselines_tiers.py, and our balanced selection against what each ingredient promises.

Per matrix the masks must equal the fork's exactly (continuous random weights: no ties, where the fork's
``torch.topk``/``argsort`` order is unspecified); ties follow our stated rule (the lower index first). Whole models
are compared with the fork's driver loop (one sample per forward, WrappedGPT's running mean), re-run here.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import pruning
from bench import baselines_tiers as fork
from bench.baselines import WrappedGPT, layer_output, per_sample_layer_inputs
from pruning.adapters import get_adapter
from pruning.methods.tiers import (
    TierCounts,
    TierSelection,
    expected_three_tier_sparsity,
    hybrid_24_mask,
    three_tier_counts,
    three_tier_mask,
)
from tests.test_pruner import calibration_ids, linears, tiny_llama, tiny_opt
from wanda_kernels import reference as ref

SHAPES = [(64, 96, 16), (50, 70, 16), (37, 45, 8), (30, 22, 6), (40, 36, 12), (16, 16, 16)]
THREE_TIER = [(0.4, 0.4, 0.2, 10), (0.35, 0.45, 0.2, 15), (0.1, 0.3, 0.6, 3), (0.5, 0.5, 0.5, 1)]


def _weight_and_norms(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen), torch.rand(shape[1], generator=gen) * 3


@pytest.mark.parametrize("rows,cols,block", SHAPES)
@pytest.mark.parametrize("top,mid,bottom,k", THREE_TIER)
def test_three_tier_equals_the_fork(rows, cols, block, top, mid, bottom, k):
    weight, norms = _weight_and_norms((rows, cols))
    metric = weight.abs() * torch.sqrt(norms)[None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fork warns when the ratios do not sum to 1
        want, stats = fork.apply_three_tier_block_pruning(weight, metric, block, top, mid, bottom, k)
    got, counts = three_tier_mask(weight, norms, block, top, mid, bottom, k)
    assert torch.equal(got, want)
    assert (counts.dense, counts.sparse_24, counts.topk) == (
        stats["fully_dense_blocks"], stats["sparse_2_4_blocks"], stats["topk_blocks"]
    )  # fmt: skip


@pytest.mark.parametrize("rows,cols,block", SHAPES)
@pytest.mark.parametrize("top_ratio,threshold,k", [(0.6, 0.8, 10), (0.9, 0.8, 10), (0.3, 0.95, 4), (0.0, 0.8, 10)])
def test_hybrid_2_4_equals_the_fork(rows, cols, block, top_ratio, threshold, k):
    weight, norms = _weight_and_norms((rows, cols), seed=1)
    metric = weight.abs() * torch.sqrt(norms)[None]
    want, stats = fork.apply_hybrid_block_pruning_with_2_4(weight, metric, 0.5, block, k, top_ratio, threshold)
    got, counts = hybrid_24_mask(weight, norms, block, k, top_ratio, threshold)
    assert torch.equal(got, want)
    assert (counts.dense, counts.sparse_24, counts.topk) == (
        stats["fully_dense_blocks"], stats["sparse_2_4_blocks"], stats["topk_blocks"]
    )  # fmt: skip


def test_the_forks_shipped_setting_gives_its_sparsity_on_full_tiles():
    """0.35 / 0.45 / 0.20 with k = 15 on 16x16 tiles: 41.33% (the fork's figure for LLaMA-2-7B)."""
    weight, norms = _weight_and_norms((256, 512), seed=2)
    mask, counts = three_tier_mask(weight, norms, 16, 0.35, 0.45, 0.2, 15)
    n_dense, n_24 = three_tier_counts(512, 0.35, 0.45, 0.2)
    assert (counts.dense, counts.sparse_24, counts.topk) == (n_dense, n_24, 512 - n_dense - n_24) == (179, 230, 103)
    assert int(mask.sum()) == 230 * 128 + 103 * (256 - 15)
    assert expected_three_tier_sparsity(16, 0.35, 0.45, 0.2, 15) == pytest.approx(0.41328125)


def test_ratios_that_do_not_sum_to_one_are_normalized_with_a_warning():
    weight, norms = _weight_and_norms((64, 64))
    with pytest.warns(UserWarning, match="normalizing"):
        from pruning.methods.tiers import normalized_tier_ratios

        assert normalized_tier_ratios(0.8, 0.8, 0.4) == pytest.approx((0.4, 0.4, 0.2))
    assert torch.equal(three_tier_mask(weight, norms, 16, 0.8, 0.8, 0.4)[0], three_tier_mask(weight, norms, 16)[0])


def test_ties_keep_the_lower_index_everywhere():
    """Equal tile scores: the first tiles in row-major order get the better tier. Equal weights in a group of 4:
    the two lower columns are kept. A constant top-k tile keeps everything (the fork's ``|W| < k-th`` rule),
    while hybrid_2_4's top-k keeps exactly k, the first k in row-major order."""
    scores = torch.ones(3, 4)
    tiers = ref.tile_tiers_torch(scores, 5, 4)
    assert tiers.flatten().tolist() == [0] * 5 + [1] * 4 + [2] * 3
    weight = torch.ones(16, 16)
    mask, _ = ref.tier_mask_torch(weight, torch.full((1, 1), 1, dtype=torch.int8), 16, 10)
    assert mask.reshape(16, 4, 4)[:, :, :2].logical_not().all() and mask.reshape(16, 4, 4)[:, :, 2:].all()
    mask, _ = ref.tier_mask_torch(weight, torch.full((1, 1), 2, dtype=torch.int8), 16, 10)
    assert not mask.any()
    mask, _ = ref.tier_mask_torch(weight, torch.full((1, 1), 2, dtype=torch.int8), 16, 10, variant="hybrid_2_4")
    assert (~mask).flatten().nonzero().flatten().tolist() == list(range(10))


def test_magnitude_scores_tiles_by_abs_weight():
    weight, _ = _weight_and_norms((48, 64), seed=3)
    mask, _ = three_tier_mask(weight, None, 16, 0.35, 0.45, 0.2, 15)
    want, _ = fork.apply_three_tier_block_pruning(weight, weight.abs(), 16, 0.35, 0.45, 0.2, 15)
    assert torch.equal(mask, want)


# --- balanced: each ingredient keeps the tier counts, so the sparsity and the bytes ----------------------


def _band_weight():
    """Rows 0..15 carry large weights, so a matrix-wide ranking gives that band all the dense tiles."""
    weight, norms = _weight_and_norms((64, 128), seed=4)
    weight[:16] *= 10
    return weight, norms


@pytest.mark.parametrize("selection", ["metric", "bands", "metric+bands", "balanced", "cost", "metric+bands+cost"])
def test_every_selection_keeps_the_tier_counts_and_the_sparsity(selection):
    weight, norms = _band_weight()
    fork_mask, fork_counts = three_tier_mask(weight, norms, 16, 0.35, 0.45, 0.2, 15)
    mask, counts = three_tier_mask(weight, norms, 16, 0.35, 0.45, 0.2, 15, TierSelection.parse(selection))
    assert counts == fork_counts
    assert int(mask.sum()) == int(fork_mask.sum())
    assert not torch.equal(mask, fork_mask)


def test_bands_give_every_row_band_the_same_tier_counts():
    weight, norms = _band_weight()
    scores = ref.tile_scores_torch(weight, norms, 16)
    n_dense, n_24 = three_tier_counts(scores.numel(), 0.35, 0.45, 0.2)
    matrix_wide = ref.tile_tiers_torch(scores, n_dense, n_24)
    assert (matrix_wide[0] == 0).sum() == 8 and (matrix_wide[1:] == 0).sum() == n_dense - 8  # band 0 hoards
    per_band = ref.tile_tiers_torch(scores, n_dense, n_24, per_band=True)
    dense_per_band = (per_band == 0).sum(dim=1)
    assert int(dense_per_band.sum()) == n_dense and int(dense_per_band.max() - dense_per_band.min()) <= 1
    assert int((per_band == 1).sum()) == n_24


def test_metric_ranks_inside_tiles_by_the_wanda_score():
    """A 2:4 tile whose large weights sit on a silent input column: |W| keeps them, the metric does not."""
    weight = torch.tensor([[4.0, 3.0, 1.0, 0.5] * 4] * 16)
    norms = torch.tensor([0.0, 1.0, 1.0, 1.0] * 4)
    tiers = torch.full((1, 1), 1, dtype=torch.int8)
    by_weight, _ = ref.tier_mask_torch(weight, tiers, 16, 10, norms)
    by_metric, _ = ref.tier_mask_torch(weight, tiers, 16, 10, norms, rank_by_metric=True)
    assert not by_weight[0, 0] and by_weight[0, 2]  # keeps 4.0 and 3.0
    assert by_metric[0, 0] and not by_metric[0, 2]  # keeps 3.0 and 1.0: 4.0 meets a zero activation


def test_cost_gives_top_k_to_the_tile_that_loses_least_by_it():
    """Two tiles: one uniform, one whose mass sits in 15 entries with a higher mean. The fork's mean score sends
    the uniform tile to top-k (losing 241 of its 256 entries); by cost the concentrated tile goes, losing little."""
    uniform = 1.0 + 0.01 * torch.rand(16, 16, generator=torch.Generator().manual_seed(0))  # no ties at the k-th
    concentrated = torch.full((16, 16), 0.01)
    concentrated.view(-1)[:15] = 30.0
    weight = torch.cat([uniform, concentrated], dim=1)  # [16, 32]: tile 0 uniform, tile 1 concentrated
    ratios = (0.0, 0.5, 0.5, 15)  # one 2:4 tile, one top-k tile
    fork_mask, _ = three_tier_mask(weight, None, 16, *ratios)
    cost_mask, _ = three_tier_mask(weight, None, 16, *ratios, TierSelection.parse("cost"))
    assert (int(fork_mask[:, :16].sum()), int(fork_mask[:, 16:].sum())) == (256 - 15, 128)  # uniform tile: top-k
    assert (int(cost_mask[:, :16].sum()), int(cost_mask[:, 16:].sum())) == (128, 256 - 15)  # concentrated: top-k

    def lost(mask):
        return float((weight**2 * mask).sum())

    assert lost(cost_mask) < lost(fork_mask) / 5
    assert int(cost_mask.sum()) == int(fork_mask.sum())


# --- the whole model, against the fork's driver loop ---------------------------------------------------------


def wrapped_statistics(layer: nn.Module, samples: list) -> tuple[dict, dict]:
    """(Linears by name, their WrappedGPT) after the layer ran on every sample, one per forward, as published."""
    subset = {name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}
    wrapped = {name: WrappedGPT(mod) for name, mod in subset.items()}
    handles = [
        subset[name].register_forward_hook(lambda _m, inp, out, w=wrapped[name]: w.add_batch(inp[0].data, out.data))
        for name in subset
    ]
    for hidden, kwargs in samples:
        layer_output(layer, hidden, kwargs)
    for h in handles:
        h.remove()
    return subset, wrapped


@torch.no_grad()
def fork_prune_three_tier(model, ids, variant="three_tier", **options):
    """prune_wanda_three_tier / prune_wanda_hybrid_2_4's loop: WrappedGPT statistics one sample at a time, the
    fork's tile function per Linear, then the layer's outputs recomputed with the pruned weights."""
    samples = per_sample_layer_inputs(model, ids)
    for layer in get_adapter(model).layers(model):
        subset, wrapped = wrapped_statistics(layer, samples)
        for name, mod in subset.items():
            w = mod.weight.data
            metric = torch.abs(w) * torch.sqrt(wrapped[name].scaler_row.reshape((1, -1)))
            if variant == "three_tier":
                mask, _ = fork.apply_three_tier_block_pruning(w, metric, **options)
            else:
                mask, _ = fork.apply_hybrid_block_pruning_with_2_4(w, metric, 0.5, **options)
            w[mask] = 0
        samples = [(layer_output(layer, hidden, kwargs), kwargs) for hidden, kwargs in samples]


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("variant", ["three_tier", "hybrid_2_4"])
def test_prune_model_equals_the_forks_driver(family, variant):
    model = {"opt": tiny_opt, "llama": tiny_llama}[family]()
    reference = copy.deepcopy(model)
    ids = calibration_ids(nsamples=4)
    if variant == "three_tier":
        options = dict(
            block_size=16, top_dense_ratio=0.35, mid_2_4_ratio=0.45, bottom_topk_ratio=0.2, topk_per_block=15
        )
    else:
        options = dict(block_size=16, topk_per_block=10, top_blocks_ratio=0.6, score_threshold=0.8)
    report = pruning.prune_model(model, ids, "wanda", sparsity_type=variant, backend="torch", **options)
    fork_prune_three_tier(reference, ids, variant, **options)
    for name, lin in linears(model).items():
        assert torch.equal(lin.weight == 0, linears(reference)[name].weight == 0), name
    assert report.tiers is not None and sum(report.tiers.values()) == sum(
        sum(layer.tiers.values()) for layer in report.layers
    )
    zeros = sum(int((lin.weight == 0).sum()) for lin in linears(model).values())
    total = sum(lin.weight.numel() for lin in linears(model).values())
    assert report.actual_sparsity == pytest.approx(zeros / total)


def test_balanced_on_a_model_keeps_the_forks_sparsity_and_lowers_the_layer_error():
    """The OBS update makes the pruned layer's output closer to the dense one's on the calibration data."""
    ids = calibration_ids(nsamples=8)
    options = dict(block_size=16, top_dense_ratio=0.35, mid_2_4_ratio=0.45, bottom_topk_ratio=0.2, topk_per_block=15)
    dense = tiny_llama()
    results = {}
    for selection in ("metric+bands", "balanced"):
        model = tiny_llama()
        report = pruning.prune_model(
            model, ids, "wanda", sparsity_type="three_tier", tier_selection=selection, **options
        )
        results[selection] = (model, report)
    assert results["balanced"][1].tiers == results["metric+bands"][1].tiers
    assert results["balanced"][1].actual_sparsity == pytest.approx(results["metric+bands"][1].actual_sparsity, abs=1e-3)

    def output_error(model):
        with torch.no_grad():
            return float((model(ids).logits - dense(ids).logits).pow(2).mean())

    assert output_error(results["balanced"][0]) < output_error(results["metric+bands"][0])


def test_tier_counts_reach_the_report_per_layer():
    model = tiny_llama()
    report = pruning.prune_model(model, None, "magnitude", sparsity_type="three_tier")
    assert all(layer.tiers and layer.target_sparsity is None for layer in report.layers)
    per_layer = [TierCounts(*layer.tiers.values()) for layer in report.layers]
    assert sum(per_layer, TierCounts()).to_dict() == report.tiers
    assert report.to_dict()["tiers"] == report.tiers


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(method="sparsegpt", sparsity_type="three_tier"), "use method wanda or magnitude"),
        (dict(sparsity_type="three_tier", block_size=0), "block_size must be an integer"),
        (dict(sparsity_type="three_tier", block_size=65), "block_size must be an integer"),
        (dict(sparsity_type="three_tier", topk_per_block=0), "topk_per_block must be a positive"),
        (dict(sparsity_type="three_tier", top_dense_ratio=-0.1), "non-negative with a positive sum"),
        (dict(sparsity_type="hybrid_2_4", top_blocks_ratio=1.5), "top_blocks_ratio must be in"),
        (dict(sparsity_type="hybrid_2_4", tier_selection="balanced"), "hybrid_2_4 runs as the fork does"),
        (dict(method="magnitude", sparsity_type="three_tier", tier_selection="balanced"), "tier_selection bands"),
        (dict(sparsity_type="three_tier", tier_selection="metric+nope"), "ingredients joined by '\\+'"),
        (dict(sparsity_type="three_tier", use_variant=True), "use_variant"),
    ],
)
def test_bad_tile_options_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        pruning.PruneConfig(**options)


@pytest.mark.parametrize("selection", ["fork", "metric+bands", "metric+bands+cost"])
@pytest.mark.parametrize("rows,cols,block", [(64, 96, 16), (37, 45, 8)])
def test_the_triton_backend_gives_the_same_masks(rows, cols, block, selection):
    """The Triton ops (under the interpreter on CPU) against the torch references, through the algorithms."""
    weight, norms = _weight_and_norms((rows, cols), seed=5)
    chosen = TierSelection.parse(selection)
    want = three_tier_mask(weight, norms, block, 0.35, 0.45, 0.2, 15, chosen, backend="torch")
    got = three_tier_mask(weight, norms, block, 0.35, 0.45, 0.2, 15, chosen, backend="triton")
    assert torch.equal(got[0], want[0]) and got[1] == want[1]
    want = hybrid_24_mask(weight, norms, block, 10, 0.6, 0.8, backend="torch")
    got = hybrid_24_mask(weight, norms, block, 10, 0.6, 0.8, backend="triton")
    assert torch.equal(got[0], want[0]) and got[1] == want[1]
