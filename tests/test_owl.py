"""OWL layer allocation against luuyin/OWL's published computation (bench/baselines_tiers.py, verbatim) and its
driver loop (one sample per forward, WrappedGPT statistics, the dense model's outliers first)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import pruning
from bench import baselines_tiers as owl
from bench.baselines import layer_output, locuslab_prune_, per_sample_layer_inputs
from pruning.adapters import get_adapter
from pruning.methods.owl import OWL_MIN_SPARSITY, OutlierCounter, owl_layer_sparsities
from tests.test_pruner import calibration_ids, linears, tiny_opt
from tests.test_tiers import wrapped_statistics


def llama(layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # layers of different outlier content, as trained models have
        for index, layer in enumerate(get_adapter(model).layers(model)):
            layer.mlp.down_proj.weight[:, : 8 * (index + 1)] *= 6
    return model


def test_outlier_ratio_equals_owls_check_outlier_mean():
    gen = torch.Generator().manual_seed(0)
    metrics = [torch.rand(32, 48, generator=gen) ** 4, torch.rand(16, 48, generator=gen) ** 3]
    counter = OutlierCounter(5.0)
    for x in metrics:
        counter.add_sum(x)
    for x in metrics:
        counter.add_count(x)
    want = owl.check_outlier_mean(torch.cat([x.flatten() for x in metrics]), 5.0)
    assert counter.ratio == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("sparsity,lam", [(0.5, 0.08), (0.7, 0.08), (0.6, 0.15)])
def test_layer_sparsities_equal_owls(sparsity, lam):
    gen = torch.Generator().manual_seed(1)
    layer_metrics = [[torch.rand(24, 40, generator=gen) ** (2 + i % 5)] for i in range(7)]
    want = owl.owl_layer_sparsities(layer_metrics, sparsity, Hyper_m=5, Lamda=lam)
    ratios = [owl.check_outlier_mean(m[0], 5) for m in layer_metrics]
    got = owl_layer_sparsities(ratios, sparsity, lam)
    assert got == pytest.approx(want, abs=1e-12)
    assert sum(got) / len(got) == pytest.approx(sparsity, abs=1e-12)
    assert max(got) - min(got) == pytest.approx(2 * lam, abs=1e-12)  # min-max scaled to [0, 2 lambda]


def test_degenerate_outlier_ratios():
    assert owl_layer_sparsities([3.0, 3.0, 3.0], 0.6, 0.08) == [0.6] * 3  # OWL would divide by zero
    assert owl_layer_sparsities([0.0, 10.0], 0.05, 0.2)[1] == OWL_MIN_SPARSITY  # 0.05 - 0.2 clamps as OWL does


@torch.no_grad()
def owl_prune_wanda(model, ids, sparsity, lam=0.08, m=5.0):
    """prune_wanda_outlier: a dense pass for the outlier ratios, then Wanda with each layer's own ratio."""
    layers = get_adapter(model).layers(model)
    samples = per_sample_layer_inputs(model, ids)
    per_layer = []
    for layer in layers:
        subset, wrapped = wrapped_statistics(layer, samples)
        per_layer.append([subset[n].weight.abs() * torch.sqrt(wrapped[n].scaler_row.reshape((1, -1))) for n in subset])
        samples = [(layer_output(layer, hidden, kwargs), kwargs) for hidden, kwargs in samples]
    targets = owl.owl_layer_sparsities(per_layer, sparsity, Hyper_m=m, Lamda=lam)
    samples = per_sample_layer_inputs(model, ids)
    for layer, target in zip(layers, targets, strict=True):
        subset, wrapped = wrapped_statistics(layer, samples)
        for name, mod in subset.items():
            locuslab_prune_(mod.weight.data, wrapped[name].scaler_row, float(target), 0, 0)
        samples = [(layer_output(layer, hidden, kwargs), kwargs) for hidden, kwargs in samples]
    return targets


def test_owl_wanda_equals_owls_driver():
    model = llama()
    reference = copy.deepcopy(model)
    ids = calibration_ids(nsamples=4)
    report = pruning.prune_model(model, ids, "wanda", 0.6, allocation="owl", backend="torch")
    targets = owl_prune_wanda(reference, ids, 0.6)
    assert [layer.target_sparsity for layer in report.layers] == pytest.approx(targets, abs=1e-9)
    assert len({round(t, 6) for t in targets}) == len(targets)  # a real allocation, not a uniform one
    assert all(layer.outlier_ratio is not None for layer in report.layers) and report.allocation == "owl"
    differing = sum(int(((a.weight == 0) != (b.weight == 0)).sum()) for a, b in
                    zip(linears(model).values(), linears(reference).values(), strict=True))  # fmt: skip
    assert differing <= 4  # batched fp32 statistics: only near-ties may differ
    for layer in report.layers:
        assert layer.sparsity == pytest.approx(layer.target_sparsity, abs=1 / 64)  # int(C * s) per row


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_owl_allocates_for_magnitude_and_sparsegpt_from_the_same_outliers(method):
    ids = calibration_ids(nsamples=4)
    wanda_report = pruning.prune_model(llama(), ids, "wanda", 0.6, allocation="owl")
    report = pruning.prune_model(llama(), ids, method, 0.6, allocation="owl")
    assert [x.target_sparsity for x in report.layers] == pytest.approx([x.target_sparsity for x in wanda_report.layers])
    assert report.actual_sparsity == pytest.approx(0.6, abs=0.01)


def test_owl_on_opt():
    report = pruning.prune_model(tiny_opt(), calibration_ids(nsamples=4), "wanda", 0.5, allocation="owl")
    assert sorted(x.target_sparsity for x in report.layers) == pytest.approx([0.42, 0.58])  # two layers: S -+ lambda


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(sparsity_type="2:4"), "sparsity_type unstructured"),
        (dict(sparsity_type="hybrid_2_4"), "sparsity_type unstructured or three_tier"),
        (dict(owl_lambda=0.3, sparsity_ratio=0.5), "smaller owl_lambda"),
        (dict(owl_m=0.0), "owl_m must be a positive"),
        (dict(sparsity_ratio=0.0), "give it a value above 0"),
        (dict(method="ablate_wanda_seq"), "wanda, ria, magnitude, sparsegpt, alps or admm"),
    ],
)
def test_bad_owl_options_are_refused_by_name(options, message):
    options = {"method": "wanda", "sparsity_ratio": 0.5, **options}
    with pytest.raises(ValueError, match=message):
        pruning.PruneConfig(allocation="owl", **options)


def test_owl_moves_three_tier_tiles_between_dense_and_top_k_per_layer():
    """The mean target is three_tier's full-tile sparsity; each layer keeps the 2:4 share and reaches its own
    target by trading dense tiles for top-k ones, so the layer with the most outliers keeps the most dense tiles."""
    from pruning.methods.tiers import expected_three_tier_sparsity

    options = dict(sparsity_type="three_tier", top_dense_ratio=0.35, mid_2_4_ratio=0.45, bottom_topk_ratio=0.2,
                   topk_per_block=15)  # fmt: skip
    ids = calibration_ids(nsamples=4)
    report = pruning.prune_model(llama(), ids, "wanda", allocation="owl", **options)
    uniform = pruning.prune_model(llama(), ids, "wanda", **options)
    targets = [layer.target_sparsity for layer in report.layers]
    assert sum(targets) / len(targets) == pytest.approx(expected_three_tier_sparsity(16, 0.35, 0.45, 0.2, 15))
    assert report.tiers["2:4"] == uniform.tiers["2:4"] and report.tiers != uniform.tiers or len(set(targets)) > 1
    most = max(range(len(targets)), key=lambda i: report.layers[i].outlier_ratio)
    least = min(range(len(targets)), key=lambda i: report.layers[i].outlier_ratio)
    assert report.layers[most].tiers["dense"] > report.layers[least].tiers["dense"]
    for layer in report.layers:  # full tiles of random weights: each tier prunes its share exactly
        pruned = layer.tiers["2:4"] * 128 + layer.tiers["topk"] * (256 - 15)
        assert layer.sparsity == pytest.approx(pruned / (sum(layer.tiers.values()) * 256))
    # int(T * ratio) per matrix of 8 to 24 tiles: the layers follow their targets to a few percent
    assert sorted(range(4), key=lambda i: report.layers[i].sparsity) == sorted(range(4), key=lambda i: targets[i])
