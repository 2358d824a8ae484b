"""The least-squares refit on a fixed mask (``pruning.methods.refit``): the exact per-row solve, the mask kept, and
``--refit`` through ``prune_model`` and the CLI."""

from __future__ import annotations

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

import pruning
from pruning.methods.refit import refit_on_support_


def _problem(n_rows=6, n_cols=32, n_tokens=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, n_cols, generator=gen) * (3 * torch.rand(n_cols, generator=gen))
    hessian = 2 / n_tokens * x.T @ x
    hessian += 0.01 * hessian.diagonal().mean() * torch.eye(n_cols)
    dense = torch.randn(n_rows, n_cols, generator=gen)
    pruned = dense.masked_fill(torch.rand(n_rows, n_cols, generator=gen) < 0.5, 0.0)
    return dense, pruned, hessian


def _objective(weight, dense, hessian):
    delta = (weight - dense).double()
    return float((delta @ hessian.double() * delta).sum())


def test_refit_reaches_the_exact_least_squares_solution_on_the_mask():
    """Against an independent solve: per row, H_SS w_S = (H w0)_S (torch.linalg.solve in float64)."""
    dense, pruned, hessian = _problem()
    mask = pruned == 0
    exact = torch.zeros_like(dense, dtype=torch.float64)
    for row in range(dense.shape[0]):
        keep = ~mask[row]
        h = hessian.double()
        exact[row, keep] = torch.linalg.solve(h[keep][:, keep], (h @ dense[row].double())[keep])
    got = pruned.clone()
    steps = refit_on_support_(got, dense, hessian, iters=200, rtol=1e-7)
    assert 0 < steps < 200  # stopped by the tolerance
    assert torch.equal(got == 0, mask)  # the mask is unchanged
    # fp32 CG from a float64 solution: rtol 1e-7 on the residual, the system's condition number ~1e3
    torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=1e-4)


def test_each_refit_step_lowers_the_layer_error_and_zero_steps_change_nothing():
    dense, pruned, hessian = _problem(seed=1)
    before = _objective(pruned, dense, hessian)
    errors = []
    for iters in (1, 2, 5, 20):
        w = pruned.clone()
        refit_on_support_(w, dense, hessian, iters=iters, rtol=1e-9)
        errors.append(_objective(w, dense, hessian))
    assert before > errors[0] >= errors[1] >= errors[2] >= errors[3]
    w = pruned.clone()
    assert refit_on_support_(w, dense, hessian, iters=0) == 0 and torch.equal(w, pruned)


def test_refit_rejects_what_it_cannot_solve():
    dense, pruned, hessian = _problem()
    with pytest.raises(ValueError, match="dense must have the weight's shape"):
        refit_on_support_(pruned, dense[:, :8], hessian)
    with pytest.raises(ValueError, match="hessian must be float32"):
        refit_on_support_(pruned, dense, hessian.double())
    with pytest.raises(ValueError, match="iters must be a non-negative int"):
        refit_on_support_(pruned, dense, hessian, iters=-1)


def _tiny_opt():
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=32)  # fmt: skip
    return OPTForCausalLM(config).eval()


def _linears(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and ".layers." in n}  # fmt: skip


@pytest.mark.parametrize(
    "method,sparsity_type", [("sparsegpt", "unstructured"), ("wanda", "2:4"), ("wanda", "three_tier")]
)
def test_prune_model_refit_keeps_the_methods_mask_and_moves_its_weights(method, sparsity_type):
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))
    plain, refit = _tiny_opt(), _tiny_opt()
    pruning.prune_model(plain, ids, method, 0.5, sparsity_type=sparsity_type, backend="torch")
    pruning.prune_model(refit, ids, method, 0.5, sparsity_type=sparsity_type, backend="torch", refit=True)
    a, b = _linears(plain), _linears(refit)
    moved = 0
    for name in a:
        # Layer 0 sees the same inputs in both runs, so its masks must agree; later layers see refit inputs.
        if ".layers.0." in name:
            assert torch.equal(a[name] == 0, b[name] == 0), name
        moved += int(not torch.equal(a[name], b[name]))
    assert moved == len(a)
    assert abs(pruning.check_sparsity(refit, log_layers=False) - pruning.check_sparsity(plain, log_layers=False)) < 1e-6


def test_refit_options_are_checked():
    with pytest.raises(ValueError, match="refit_iters"):
        pruning.PruneConfig(method="wanda", refit=True, refit_iters=0)
