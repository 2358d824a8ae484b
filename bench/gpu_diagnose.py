"""Numerical checks of the two library paths the first GPU check (2026-12-04, H200) found broken, one JSON line each.

1. ``gram``: the SparseGPT Hessian ``X^T X`` from fp16 activations, by ``torch.mm(out_dtype=fp32)`` with cuBLAS's
   reduced-precision reductions allowed (torch's default) and disallowed, and by the reference's fp32 SGEMM, each
   against float64: relative error of the diagonal and of the whole matrix, and whether ``H + 0.01 mean(diag) I``
   (rank-deficient X, as from few calibration tokens) factors.
2. ``cusparselt``: compress + ``_cslt_sparse_mm`` (default algorithm, result transposed or not) against the dense
   product, then the algorithm search; each in its own process, since a failing call can break the CUDA context.
Usage: ``python -m bench.gpu_diagnose`` (about 40 s on an H200: each case imports torch in a new process).
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

CUSPARSELT_CASE = """
import json, sys, torch
mode, n_tokens = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
w = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
w = w * torch.tensor([1, 1, 0, 0], device="cuda", dtype=w.dtype).repeat(1024)  # 2:4
x = torch.randn(n_tokens, 4096, device="cuda", dtype=torch.float16)
want = (x.float() @ w.float().T)
packed = torch._cslt_compress(w)
if mode == "search":
    alg = torch._cslt_sparse_mm_search(packed, x.t(), transpose_result=True)
    y = torch._cslt_sparse_mm(packed, x.t(), transpose_result=True, alg_id=alg)
elif mode == "transposed":
    alg, y = 0, torch._cslt_sparse_mm(packed, x.t(), transpose_result=True, alg_id=0)
else:
    alg, y = 0, torch._cslt_sparse_mm(packed, x.t(), alg_id=0).t()
torch.cuda.synchronize()
err = float((y.float() - want).abs().max() / want.abs().max())
print(json.dumps({"alg": alg, "max_rel_error": err}))
"""


def gram_report() -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    n_tokens, n_cols = 1024, 2048  # fewer tokens than columns: H is singular, damping makes it definite
    x = torch.randn(n_tokens, n_cols, generator=gen, device="cuda")
    x[:, :8] *= 100  # outlier channels, as LLM activations have
    x = x.half()
    exact = x.double().T @ x.double()
    matmul = torch.backends.cuda.matmul
    variants = {}
    for reduced in (True, False):
        matmul.allow_fp16_reduced_precision_reduction = reduced
        variants[f"mm_out_fp32_reduced_precision_{reduced}"] = torch.mm(x.T, x, out_dtype=torch.float32)
    matmul.allow_fp16_reduced_precision_reduction = True
    variants["fp32_sgemm"] = x.float().T @ x.float()
    report = {}
    for name, gram in variants.items():
        diag, diag_exact = torch.diagonal(gram).double(), torch.diagonal(exact)
        diag_error = float(((diag - diag_exact) / diag_exact).abs().max())
        rel_error = float((gram.double() - exact).norm() / exact.norm())
        damped = gram + 0.01 * torch.diagonal(gram).mean() * torch.eye(n_cols, device="cuda")
        _, info = torch.linalg.cholesky_ex(damped)
        report[name] = {"diag_rel_error": diag_error, "rel_error": rel_error, "cholesky_ok": int(info) == 0}
    from pruning.methods import sparsegpt

    report["probe_passes"] = sparsegpt._tensor_core_gram_supported(x.device, torch.float16)
    return report


def cusparselt_report() -> dict:
    report = {}
    for mode in ("plain", "transposed", "search"):
        for n_tokens in (2048,):
            run = subprocess.run(
                [sys.executable, "-c", CUSPARSELT_CASE, mode, str(n_tokens)], capture_output=True, text=True,
                timeout=120,
            )  # fmt: skip
            lines = run.stdout.strip().splitlines()
            report[f"{mode}_M{n_tokens}"] = (
                json.loads(lines[-1]) if run.returncode == 0 and lines else {"error": run.stderr.strip()[-400:]}
            )
    return report


def main() -> int:
    print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name()}))
    print(json.dumps({"gram": gram_report()}))
    print(json.dumps({"cusparselt": cusparselt_report()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
