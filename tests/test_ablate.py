"""Wanda's ablations of the weight update (``--prune_method ablate_{mag,wanda}_{seq,iter}``) against an
independent re-implementation of locuslab/wanda's ``prune_ablate`` and ``AblateGPT`` as published: one sample
per forward, one hook per Linear, the activation scaler with its ``1 / b`` sample weighting, cholesky ->
cholesky_inverse -> cholesky, the column loop. Our driver batches samples and shares the statistics of q/k/v,
so fp32 sums round differently; weights must agree to 1e-3 relative (as SparseGPT's) and masks but for a few
entries near ties.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_cli import prune_argv, run_main, tiny_opt  # noqa: F401 (tiny_opt: a fixture)
from test_pruner import MODELS, _call, _reference_layer_inputs, calibration_ids, linears
from torch import nn

import pruning
from pruning.adapters import get_adapter
from pruning.methods import accumulate_ablate_scaler_

METHODS = ["ablate_mag_seq", "ablate_wanda_seq", "ablate_mag_iter", "ablate_wanda_iter"]


class _PublishedAblateGPT:
    """locuslab/wanda lib/ablate.py ``AblateGPT``, on the CPU."""

    def __init__(self, layer: nn.Linear):
        self.layer = layer
        self.rows, self.columns = layer.weight.shape
        self.H = torch.zeros(self.columns, self.columns)
        self.nsamples = 0
        self.scaler_row = torch.zeros(self.columns)

    def add_batch(self, inp: torch.Tensor) -> None:
        inp = inp.unsqueeze(0) if inp.ndim == 2 else inp
        tmp = inp.shape[0]
        inp = inp.reshape(-1, inp.shape[-1]).t()
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples

    def get_wanda_mask(self, sparsity, prune_n, prune_m):
        metric = torch.abs(self.layer.weight.data) * torch.sqrt(self.scaler_row.reshape((1, -1)))
        mask = torch.zeros_like(metric) == 1
        if prune_n != 0:
            for ii in range(0, metric.shape[1], prune_m):
                tmp = metric[:, ii : ii + prune_m].float()
                mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
        else:
            indices = torch.sort(metric, dim=-1, stable=True)[1][:, : int(metric.shape[1] * sparsity)]
            mask.scatter_(1, indices, True)
        return mask

    def get_mag_mask(self, sparsity, prune_n, prune_m):
        metric = torch.abs(self.layer.weight.data)
        if prune_n != 0:
            mask = torch.zeros_like(metric) == 1
            for ii in range(0, metric.shape[1], prune_m):
                tmp = metric[:, ii : ii + prune_m].float()
                mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
            return mask
        return metric <= torch.sort(metric.flatten())[0][int(metric.numel() * sparsity)]

    def fasterprune(self, method, sparsity, mask=None, prune_n=0, prune_m=0, blocksize=128, percdamp=0.01):
        W = self.layer.weight.data.clone().float()
        H = self.H
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        diag = torch.arange(self.columns)
        H[diag, diag] += percdamp * torch.mean(torch.diag(H))
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            W1 = W[:, i1:i2].clone()
            Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            if prune_n == 0 or mask is not None:
                if mask is not None:
                    mask1 = mask[:, i1:i2]
                else:
                    if "wanda" in method:
                        tmp = torch.abs(W1) * torch.sqrt(self.scaler_row[i1:i2].reshape((1, -1)))
                    else:
                        tmp = torch.abs(W1)
                    mask1 = tmp <= torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            else:
                mask1 = torch.zeros_like(W1) == 1
            for i in range(i2 - i1):
                w, d = W1[:, i], Hinv1[i, i]
                if prune_n != 0 and i % prune_m == 0 and mask is None:
                    if "wanda" in method:
                        scale = torch.sqrt(self.scaler_row[(i + i1) : (i + i1 + prune_m)].reshape((1, -1)))
                        tmp = torch.abs(W1[:, i : (i + prune_m)]) * scale
                    else:
                        tmp = torch.abs(W1[:, i : (i + prune_m)])
                    mask1.scatter_(1, i + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            W[:, i1:i2] = Q1
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        self.layer.weight.data = W.to(self.layer.weight.data.dtype)


@torch.no_grad()
def published_prune_ablate(model, ids, method, sparsity, n=0, m=0):
    samples = _reference_layer_inputs(model, ids)
    for layer in get_adapter(model).layers(model):
        subset = {name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}
        gpts = {name: _PublishedAblateGPT(mod) for name, mod in subset.items()}
        handles = [
            subset[name].register_forward_hook(lambda _m, inp, _out, g=gpts[name]: g.add_batch(inp[0].data))
            for name in subset
        ]
        for hidden, kwargs in samples:
            _call(layer, hidden, kwargs)
        for h in handles:
            h.remove()
        for gpt in gpts.values():
            mask = None
            if method == "ablate_wanda_seq":
                mask = gpt.get_wanda_mask(sparsity, n, m)
            elif method == "ablate_mag_seq":
                mask = gpt.get_mag_mask(sparsity, n, m)
            gpt.fasterprune(method, sparsity, mask=mask, prune_n=n, prune_m=m)
        samples = [(_call(layer, hidden, kwargs), kwargs) for hidden, kwargs in samples]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("sparsity_type", ["unstructured", "2:4"])
def test_ablations_match_locuslab_prune_ablate(method, family, sparsity_type):
    ours, ref = MODELS[family](), MODELS[family]()
    ids = calibration_ids(nsamples=5)
    n, m = (2, 4) if sparsity_type == "2:4" else (0, 0)
    report = pruning.prune_model(ours, ids, method, 0.5, sparsity_type, calib_batch_size=2, backend="torch")
    published_prune_ablate(ref, ids, method, 0.5, n, m)
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
    published = _PublishedAblateGPT(nn.Linear(3, 2))
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
