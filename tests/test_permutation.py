"""Channel permutation for N:M: RIA's published reallocation and LSA, and the model keeping its function."""

from __future__ import annotations

import copy

import pytest
import torch

import pruning
from bench import baselines_dsnot as published
from pruning import permutation
from pruning.adapters import get_adapter
from pruning.methods.permute import head_permutation, kept_score, lsa_refine, reallocation_permutation
from tests.test_pruner import calibration_ids, linears, tiny_llama, tiny_opt
from wanda_kernels.reference import nm_mask_torch


def _scores(rows=64, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    return published.ria_metric(w, torch.rand(cols, generator=g) * 4)


@pytest.mark.parametrize("m", [4, 8])
def test_reallocation_equals_rias_heuristic(m):
    scores = _scores()
    assert torch.equal(reallocation_permutation(scores.sum(dim=0), m), published.ria_reallocation_index(scores, m))


def test_lsa_equals_rias_refinement_and_keeps_more_score():
    pytest.importorskip("scipy")
    scores = _scores(cols=128)
    start = reallocation_permutation(scores.sum(dim=0), 4)
    ours = lsa_refine(scores, start, 2, 4)
    assert torch.equal(ours, published.ria_lsa_refine(scores, start, 2, 4))
    assert kept_score(scores[:, ours], 2, 4) > kept_score(scores[:, start], 2, 4) > kept_score(scores, 2, 4)


def test_the_permuted_mask_in_the_original_order_equals_rias():
    scores = _scores()
    perm = reallocation_permutation(scores.sum(dim=0), 4)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[:, perm] = nm_mask_torch(scores[:, perm], 2, 4)
    assert torch.equal(mask, published.ria_reallocated_mask(scores, 2, 4))


def test_head_permutation_moves_dims_only_inside_heads_the_same_for_a_value_heads_queries():
    importance = torch.rand(8 * 16)
    perm = head_permutation(importance, head_dim=16, kv_heads=2, m=4)
    heads = perm.reshape(8, 16)
    assert torch.equal(heads // 16, torch.arange(8)[:, None].expand(8, 16))  # each head keeps its own dims
    inner = heads % 16
    assert all(torch.equal(inner[q], inner[(q // 4) * 4]) for q in range(8))  # 4 query heads per value head
    assert torch.equal(torch.sort(perm)[0], torch.arange(128))


def _carried_everywhere(monkeypatch):
    import functools

    import pruning.prune_group as prune_group

    carry = functools.partial(permutation.apply_permutation_, fold=False)
    monkeypatch.setattr(prune_group, "apply_permutation_", carry)


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("method", ["ria", "wanda", "sparsegpt", "ablate_wanda_iter"])
def test_a_folded_model_computes_what_the_unpermuted_dense_with_zeros_model_does(family, method, monkeypatch):
    """Folding reorders fc2/down_proj's columns with their producers' rows and o_proj's inside heads with
    v_proj's rows: the logits equal those of the same masks left in the original order (every Linear carried)."""
    make = {"opt": tiny_opt, "llama": tiny_llama}[family]
    ids = calibration_ids(nsamples=4)
    folded = make()
    report = pruning.prune_model(folded, ids, method, 0.5, "2:4", backend="torch", permute_channels=True)
    with monkeypatch.context() as patch:
        _carried_everywhere(patch)
        carried = make()
        pruning.prune_model(carried, ids, method, 0.5, "2:4", backend="torch", permute_channels=True)
    assert report.actual_sparsity == 0.5
    x = calibration_ids(nsamples=2, seed=1)
    torch.testing.assert_close(folded(x).logits, carried(x).logits, rtol=1e-4, atol=1e-5)  # fp32 sum order
    plain = make()
    pruning.prune_model(plain, ids, method, 0.5, "2:4", backend="torch")
    assert not torch.allclose(plain(x).logits, carried(x).logits)  # the permutation did change the masks
    for name, lin in linears(folded).items():
        perm = getattr(lin, permutation.PERMUTATION_ATTRIBUTE, None)
        weight = lin.weight if perm is None else lin.weight[:, perm]
        groups = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(dim=-1)
        assert (groups <= 2).all(), name  # 2:4 in stored order, or in the carried order
        consumer = name.split(".", 1)[1]
        assert (perm is None) == (consumer in permutation.PRODUCERS), name


def test_folding_is_exact_for_the_layer_function():
    model = tiny_llama()
    layer = get_adapter(model).layers(model)[0]
    reference = copy.deepcopy(layer)
    torch.manual_seed(0)
    hidden = torch.randn(1, 8, 64)
    rotary = model.model.rotary_emb(hidden, torch.arange(8)[None])
    for group in (["mlp.down_proj"], ["self_attn.o_proj"]):
        n_in = layer.get_submodule(group[0]).in_features
        if group[0] == "self_attn.o_proj":
            perm = head_permutation(torch.rand(n_in), 16, 2, 4)
        else:
            perm = torch.randperm(n_in)
        assert permutation.apply_permutation_(layer, group, perm)
    out, ref = layer(hidden, position_embeddings=rotary), reference(hidden, position_embeddings=rotary)
    out, ref = (o[0] if isinstance(o, tuple) else o for o in (out, ref))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_sparse24_stores_carried_permutations_and_computes_the_same_logits(tmp_path):
    from pruning.infer.sparse_linear import Sparse24Linear
    from pruning.sparse24 import PERMUTED_FORMAT_VERSION, load_sparse, save_sparse

    model = tiny_llama()
    pruning.prune_model(model, calibration_ids(nsamples=4), "ria", 0.5, "2:4", backend="torch", permute_channels=True)
    directory = save_sparse(model, None, tmp_path / "sparse")
    loaded = load_sparse(directory)
    assert loaded.config.sparsity_config["version"] == PERMUTED_FORMAT_VERSION
    assert len(loaded.config.sparsity_config["permuted_modules"]) == 2 * 5  # q, k, v, gate, up per layer
    x = calibration_ids(nsamples=2, seed=1)
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-5, atol=1e-6)
    q = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(q, Sparse24Linear) and q.input_perm is not None
    hidden = torch.randn(3, q.in_features)
    gathered = q._dense_linear(hidden.index_select(-1, q.input_perm))  # what CUDA runs: packed order, x gathered
    torch.testing.assert_close(gathered, torch.nn.functional.linear(hidden, q.to_dense()), rtol=1e-5, atol=1e-6)
    assert loaded.model.layers[0].mlp.down_proj.input_perm is None  # folded into gate/up's rows
