"""Wanda's ablations of the weight update (``--prune_method ablate_{mag,wanda}_{seq,iter}``) against an
independent re-implementation of locuslab/wanda's ``prune_ablate`` and ``AblateGPT`` as published
(``bench.baselines``): one sample per forward, one hook per Linear, the activation scaler with its ``1 / b``
sample weighting, cholesky -> cholesky_inverse -> cholesky, the column loop. Our driver batches samples and
shares the statistics of q/k/v, so fp32 sums round differently; weights must agree to 1e-3 relative (as
SparseGPT's) and masks but for a few entries near ties.
"""

from __future__ import annotations

import pytest
import torch
from test_cli import prune_argv, run_main, tiny_opt  # noqa: F401 (tiny_opt: a fixture)
from test_pruner import MODELS, calibration_ids, linears
from torch import nn

import pruning
from bench.baselines import AblateGPT, locuslab_prune_ablate
from pruning.methods import accumulate_ablate_scaler_

METHODS = ["ablate_mag_seq", "ablate_wanda_seq", "ablate_mag_iter", "ablate_wanda_iter"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("sparsity_type", ["unstructured", "2:4"])
def test_ablations_match_locuslab_prune_ablate(method, family, sparsity_type):
    ours, ref = MODELS[family](), MODELS[family]()
    ids = calibration_ids(nsamples=5)
    n, m = (2, 4) if sparsity_type == "2:4" else (0, 0)
    report = pruning.prune_model(ours, ids, method, 0.5, sparsity_type, calib_batch_size=2, backend="torch")
    locuslab_prune_ablate(ref, ids, method, 0.5, n, m)
    assert abs(report.actual_sparsity - 0.5) < 0.01
    for name, lin in linears(ours).items():
        w, w_ref = lin.weight, linears(ref)[name].weight
        rel = (w - w_ref).norm() / w_ref.norm()  # batched vs per-sample fp32 sums, through the OBS updates
        assert rel < 1e-3, f"{name}: relative Frobenius error {rel:.2e}"
        assert ((w == 0) != (w_ref == 0)).float().mean() < 0.002, name


@pytest.mark.parametrize("method", ["ablate_wanda_seq", "ablate_wanda_iter"])
def test_triton_backend_gives_the_torch_result(method):
    """Under the interpreter on the CPU (a GPU where there is one): the block kernel with the given or per-block
    mask; N:M chosen during the updates stays on the torch loop."""
    ids = calibration_ids(nsamples=4)
    results = []
    for backend in ("torch", "triton"):
        model = MODELS["llama"]()
        pruning.prune_model(model, ids, method, 0.5, "unstructured", calib_batch_size=2, backend=backend)
        results.append(linears(model))
    for name, lin in results[0].items():
        torch.testing.assert_close(results[1][name].weight, lin.weight, rtol=1e-5, atol=1e-6)


def test_the_scaler_weights_sample_b_by_one_over_b():
    """Fed in batches of any size, the scaler is the published one up to its factor 2 / N."""
    x = torch.randn(5, 7, 3, generator=torch.Generator().manual_seed(0))
    published = AblateGPT(nn.Linear(3, 2))
    for b in range(5):
        published.add_batch(x[b : b + 1])
    ours, seen = torch.zeros(3), 0
    for batch in x.split([2, 1, 2]):
        accumulate_ablate_scaler_(ours, batch, seen)
        seen += batch.shape[0]
    torch.testing.assert_close(ours * 2 / 5, published.scaler_row, rtol=1e-5, atol=0)
    uniform = (x**2).sum(dim=(0, 1))  # what Wanda's own running mean ranks by: a different weighting
    assert not torch.allclose(ours / ours.sum(), uniform / uniform.sum(), rtol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_cli_accepts_wanda_ablation_methods(method, tiny_opt, tmp_path):  # noqa: F811 (tiny_opt: a fixture)
    import json

    save = tmp_path / "out"
    assert run_main(prune_argv(tiny_opt, "--save", str(save), method=method, kind="2:4")) == 0
    (metrics_file,) = save.glob(f"metrics_{method}_2-4_*.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["prune"]["method"] == method and metrics["actual_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert (save / f"log_{method}.txt").exists()
