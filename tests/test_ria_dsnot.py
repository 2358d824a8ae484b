"""RIA and DSnoT against their published code (bench/baselines_dsnot.py), per matrix and over whole models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pruning
from bench import baselines_dsnot as published
from bench.baselines import layer_output, per_sample_layer_inputs
from pruning.adapters import get_adapter
from pruning.errors import OptionError
from pruning.methods.dsnot import ChannelMoments, dsnot_mask
from pruning.methods.ria import prune_ria_, ria_mask
from tests.test_pruner import calibration_ids, linears, tiny_llama, tiny_opt
from wanda_kernels.reference import (
    accumulate_moments_torch,
    nm_mask_torch,
    ria_scores_torch,
    unstructured_mask_torch,
    wanda_scores_torch,
)


def _activations(samples=6, tokens=40, channels=128, seed=0):
    """Calibration-like inputs [samples, T, C]: channels with their own mean and scale, a few outliers."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(channels, generator=g) * 2 + 0.1
    shift = torch.randn(channels, generator=g) * 0.5
    x = torch.randn(samples, tokens, channels, generator=g) * scale + shift
    x[:, :, :3] *= 8
    return x


def _published_statistics(x):
    stats = published.DSnoTStatistics(x.shape[-1])
    for sample in x:
        stats.add_batch(sample.unsqueeze(0))
    return stats


def _weight(rows=96, cols=128, seed=1):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


# --- RIA -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a", [0.5, 1.0, 0.0])
def test_ria_scores_equal_the_published_metric(a):
    w, norms = _weight(), torch.rand(128) * 5
    assert torch.allclose(ria_scores_torch(w, norms, a), published.ria_metric(w, norms, a), rtol=1e-6, atol=0)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_ria_unstructured_is_one_threshold_per_matrix_as_published(sparsity):
    w, norms = _weight(), torch.rand(128) * 5
    scores = published.ria_metric(w, norms)
    assert torch.equal(ria_mask(scores, sparsity), published.ria_unstructured_mask(scores, sparsity))
    rows = ria_mask(scores, sparsity).sum(dim=1)
    assert rows.min() < rows.max()  # not per row: the counts differ between rows


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_ria_nm_equals_published(n, m):
    w, norms = _weight(), torch.rand(128) * 5
    scores = published.ria_metric(w, norms)
    assert torch.equal(ria_mask(scores, 0.5, n, m), published.ria_nm_mask(scores, n, m))


def test_prune_ria_zeroes_the_mask():
    w, norms = _weight(), torch.rand(128) * 5
    before = w.clone()
    mask = prune_ria_(w, norms, 0.5)
    assert torch.equal(w == 0, mask) and torch.equal(w[~mask], before[~mask])


# --- DSnoT statistics and swaps ----------------------------------------------------------------------------
def test_moments_give_dsnots_mean_and_variance():
    x = _activations()
    ref = _published_statistics(x)
    norms, sums, sq_dev = (torch.zeros(x.shape[-1]) for _ in range(3))
    accumulate_moments_torch(norms, sums, sq_dev, x[:4], 4)  # batches of any size give the same moments
    accumulate_moments_torch(norms, sums, sq_dev, x[4:].reshape(-1, x.shape[-1]), 2)
    moments = ChannelMoments.from_sums(sums, sq_dev, x.shape[0], x.shape[0] * x.shape[1])
    assert torch.allclose(moments.mean, ref.sum_metric_row, rtol=1e-5, atol=1e-5)
    assert torch.allclose(moments.var, ref.var.flatten(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(norms / x.shape[0], ref.scaler_row, rtol=1e-5)


def _dsnot_case(seed=0, rows=64, cols=512):
    x = _activations(channels=cols, seed=seed)
    stats = _published_statistics(x)
    return _weight(rows, cols, seed + 1), stats, ChannelMoments(stats.sum_metric_row, stats.var.flatten())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.1, 0.01])
@pytest.mark.parametrize("sparsity", [0.5, 0.6])
def test_dsnot_unstructured_equals_published(seed, threshold, sparsity):
    w, stats, moments = _dsnot_case(seed)
    scores = wanda_scores_torch(w, stats.scaler_row)
    initial = unstructured_mask_torch(scores, sparsity)
    ours = dsnot_mask(w, initial, scores, stats.scaler_row, moments, update_threshold=threshold)
    theirs = published.dsnot_prune_mask(w, stats, scores, sparsity, update_threshold=threshold)
    assert not torch.equal(ours, initial)  # it did swap
    assert torch.equal(ours, theirs)
    assert torch.equal(ours.sum(dim=1), initial.sum(dim=1))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_dsnot_nm_equals_published(seed, n, m):
    w, stats, moments = _dsnot_case(seed)
    scores = wanda_scores_torch(w, stats.scaler_row)
    initial = nm_mask_torch(scores, n, m)
    ours = dsnot_mask(w, initial, scores, stats.scaler_row, moments, n, m, update_threshold=0.01)
    theirs = published.dsnot_prune_mask(w, stats, scores, 0.5, n, m, update_threshold=0.01)
    assert not torch.equal(ours, initial)
    assert torch.equal(ours, theirs)
    assert (ours.reshape(w.shape[0], -1, m).sum(dim=-1) == n).all()


def test_dsnot_keeps_the_sparsity_where_the_published_loop_lets_it_drift():
    """With few pruned weights of one sign, the published loop keeps moving a stopped row's pointer into the kept
    weights and prunes them (sparsity drifts up); ours stops the row there."""
    w, stats, moments = _dsnot_case(0, rows=96, cols=128)
    scores = wanda_scores_torch(w, stats.scaler_row)
    initial = unstructured_mask_torch(scores, 0.5)
    ours = dsnot_mask(w, initial, scores, stats.scaler_row, moments)
    theirs = published.dsnot_prune_mask(w, stats, scores, 0.5)
    assert torch.equal(ours.sum(dim=1), initial.sum(dim=1))
    assert theirs.sum() > initial.sum()


def test_dsnot_lowers_the_reconstruction_error_it_targets():
    w, stats, moments = _dsnot_case(0)
    scores = wanda_scores_torch(w, stats.scaler_row)
    initial = unstructured_mask_torch(scores, 0.5)
    refined = dsnot_mask(w, initial, scores, stats.scaler_row, moments, update_threshold=0.0)

    def error(mask):
        return (w * moments.mean).masked_fill(~mask, 0).sum(dim=1).abs().sum()

    assert error(refined) < 0.5 * error(initial)


# --- whole models against the published drivers ------------------------------------------------------------
@torch.no_grad()
def published_prune(model, ids, method, sparsity, n=0, m=0, skip_layer="mlp", reallocation=False):
    """prune_ria / prune_DSnoT (initial_method wanda): statistics one sample per forward, then every Linear
    pruned by the published per-matrix code, then the layer's outputs recomputed."""
    samples = per_sample_layer_inputs(model, ids)
    for layer in get_adapter(model).layers(model):
        subset = {name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}
        stats = {name: published.DSnoTStatistics(mod.in_features) for name, mod in subset.items()}
        handles = [
            subset[name].register_forward_hook(lambda _m, inp, _o, s=stats[name]: s.add_batch(inp[0].data))
            for name in subset
        ]
        for hidden, kwargs in samples:
            layer_output(layer, hidden, kwargs)
        for h in handles:
            h.remove()
        for name, mod in subset.items():
            w, s = mod.weight.data, stats[name]
            if method == "ria":
                metric = published.ria_metric(w, s.scaler_row)
                if reallocation:
                    mask = published.ria_reallocated_mask(metric, n, m)
                elif n:
                    mask = published.ria_nm_mask(metric, n, m)
                else:
                    mask = published.ria_unstructured_mask(metric, sparsity)
            else:
                metric = torch.abs(w) * torch.sqrt(s.scaler_row.reshape((1, -1)))
                if name.split(".")[0] == skip_layer:
                    mask = nm_mask_torch(metric, n, m) if n else unstructured_mask_torch(metric, sparsity)
                else:
                    mask = published.dsnot_prune_mask(w, s, metric, sparsity, n, m)
            w[mask] = 0
        samples = [(layer_output(layer, hidden, kwargs), kwargs) for hidden, kwargs in samples]


def wide_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=512, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _agreement(model, reference) -> float:
    ours, theirs = linears(model), linears(reference)
    same = sum(int(((lin.weight == 0) == (theirs[k].weight == 0)).sum()) for k, lin in ours.items())
    return same / sum(lin.weight.numel() for lin in ours.values())


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("sparsity_type", ["unstructured", "2:4"])
def test_ria_on_a_model_equals_the_published_driver(family, sparsity_type):
    model = {"opt": tiny_opt, "llama": tiny_llama}[family]()
    reference = copy.deepcopy(model)
    ids = calibration_ids(nsamples=4)
    n, m = (2, 4) if sparsity_type == "2:4" else (0, 0)
    pruning.prune_model(model, ids, "ria", 0.5, sparsity_type, backend="torch")
    published_prune(reference, ids, "ria", 0.5, n, m)
    for name, lin in linears(model).items():
        assert torch.equal(lin.weight == 0, linears(reference)[name].weight == 0), name


@pytest.mark.parametrize("sparsity_type", ["unstructured", "2:4"])
def test_dsnot_on_a_model_matches_the_published_driver(sparsity_type):
    """The published DSnoT driver is LLaMA's. Masks agree except where a running mean's rounding (theirs) and a
    sum's (ours) put a swap decision on the other side of a threshold: well under 0.1% of the weights. Wide
    enough (512) that 50 cycles keep every pointer inside its list (see the drift test)."""
    model = wide_llama()
    reference = copy.deepcopy(model)
    ids = calibration_ids(nsamples=4)
    n, m = (2, 4) if sparsity_type == "2:4" else (0, 0)
    pruning.prune_model(model, ids, "wanda", 0.5, sparsity_type, backend="torch", refine="dsnot")
    published_prune(reference, ids, "dsnot", 0.5, n, m)
    assert _agreement(model, reference) > 0.999
    plain = wide_llama()
    pruning.prune_model(plain, ids, "wanda", 0.5, sparsity_type, backend="torch")
    assert _agreement(model, plain) < 0.999  # DSnoT changed the attention masks
    for name, lin in linears(model).items():
        if name.startswith("0.mlp."):  # skip_layer mlp: layer 0's MLP (same inputs) keeps Wanda's mask
            assert torch.equal(lin.weight == 0, linears(plain)[name].weight == 0), name


def test_dsnot_skip_layer_no_skip_refines_the_mlp_too():
    ids = calibration_ids(nsamples=4)
    plain, refined = tiny_llama(), tiny_llama()
    pruning.prune_model(plain, ids, "wanda", 0.5, backend="torch")
    pruning.prune_model(
        refined, ids, "wanda", 0.5, backend="torch", refine="dsnot", dsnot_skip_layer="no_skip",
        dsnot_update_threshold=0.0,
    )  # fmt: skip
    down = "0.mlp.down_proj"
    assert not torch.equal(linears(plain)[down].weight == 0, linears(refined)[down].weight == 0)


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt", "ria"])
def test_dsnot_refines_every_mask_method_and_keeps_its_sparsity(method):
    ids = calibration_ids(nsamples=4)
    plain, refined = tiny_opt(), tiny_opt()
    a = pruning.prune_model(plain, ids, method, 0.5, "2:4", backend="torch")
    b = pruning.prune_model(refined, ids, method, 0.5, "2:4", backend="torch", refine="dsnot")
    assert a.actual_sparsity == b.actual_sparsity == 0.5
    assert _agreement(plain, refined) < 1.0


def test_reconstruction_updates_the_kept_weights_of_a_fixed_mask():
    ids = calibration_ids(nsamples=4)
    plain, updated = tiny_llama(), tiny_llama()
    pruning.prune_model(plain, ids, "ria", 0.5, "2:4", backend="torch")
    pruning.prune_model(updated, ids, "ria", 0.5, "2:4", backend="torch", reconstruction=True)
    first = "0.self_attn.q_proj"  # layer 0's inputs are the same for both, so its mask is too
    p, u = linears(plain)[first].weight, linears(updated)[first].weight
    assert torch.equal(p == 0, u == 0) and not torch.allclose(p, u)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(method="wanda", sparsity_type="unstructured", permute_channels=True), "N:M"),
        (dict(method="magnitude", sparsity_type="2:4", permute_channels=True), "wanda, ria, sparsegpt"),
        (dict(method="wanda", sparsity_type="2:4", lsa=True), "permute_channels"),
        (dict(method="ria", sparsity_type="three_tier"), "Wanda's metric"),
        (dict(method="wanda", refine="dsnot", use_variant=True), "use_variant"),
        (dict(method="sparsegpt", reconstruction=True), "already updates"),
        (dict(method="wanda", refine="bogus"), "refine"),
        (dict(method="wanda", refine="dsnot", dsnot_skip_layer="attn"), "dsnot_skip_layer"),
        (dict(method="wanda", refine="dsnot", dsnot_max_cycles=-1), "dsnot_max_cycles"),
        (dict(method="ria", ria_a=-1.0), "ria_a"),
    ],
)
def test_bad_mask_options_are_refused_by_name(options, message):
    options.setdefault("sparsity_ratio", 0.5 if options.get("sparsity_type", "unstructured") != "three_tier" else 0.5)
    with pytest.raises((OptionError, ValueError), match=message):
        pruning.PruneConfig(**options)


def test_a_method_without_the_statistics_it_needs_is_an_error_naming_them():
    from pruning.prune_group import MissingStatisticsError, prune_group_

    model = tiny_opt()
    layer = get_adapter(model).layers(model)[0]
    config = pruning.PruneConfig(method="wanda", refine="dsnot")
    with pytest.raises(MissingStatisticsError, match="means and variances|squared input norms"):
        prune_group_(layer, ["fc1"], None, config, "torch")


@pytest.mark.parametrize(
    "options",
    [
        dict(method="ria", sparsity_type="unstructured", refine="dsnot", dsnot_skip_layer="no_skip"),
        dict(method="wanda", sparsity_type="2:4", refine="dsnot", dsnot_skip_layer="no_skip"),
        dict(method="ria", sparsity_type="2:4", permute_channels=True),
    ],
)
def test_the_triton_backend_gives_the_same_masks(options):
    ids = calibration_ids(nsamples=4)
    ratio = 0.5
    torch_model, triton_model = tiny_opt(), tiny_opt()
    pruning.prune_model(torch_model, ids, sparsity_ratio=ratio, backend="torch", **options)
    pruning.prune_model(triton_model, ids, sparsity_ratio=ratio, backend="triton", **options)
    for name, lin in linears(torch_model).items():
        assert torch.equal(lin.weight == 0, linears(triton_model)[name].weight == 0), name

