"""The least-squares refit of a pruned weight on its support, by preconditioned conjugate gradients.

Per output row: ``min_w (w - w0)^T H (w - w0)`` with ``w_j = 0`` wherever the pruned weight is 0, ``w0`` the dense
row and ``H`` the layer's damped Hessian (SparseGPT's ``2/N X^T X + damp I``): on the support ``S``,
``H_SS w_S = (H w0)_S``. Every row at once, each CG step one GEMM with ``H``, preconditioned by ``diag(H)``, started
from the pruned weight (so a method's own update, e.g. SparseGPT's, is where it begins), for at most ``iters`` steps
or until every row's residual is below ``rtol`` times its right-hand side. The mask is unchanged. The same back-solve
as ALPS's (Meng et al. 2024) after its ADMM. Why and what it measured: docs/pruning.md.
"""

from __future__ import annotations

import torch

from wanda_kernels._validate import check_matrix


@torch.no_grad()
def refit_on_support_(
    weight: torch.Tensor, dense: torch.Tensor, hessian: torch.Tensor, iters: int = 10, rtol: float = 1e-4
) -> int:
    """Refit ``weight`` [O, C] (pruned: its zeros are the mask) in place towards ``dense`` [O, C] under the fp32
    ``hessian`` [C, C] (damped, symmetric positive definite); returns the CG steps taken."""
    check_matrix(weight, "weight")
    if dense.shape != weight.shape:
        raise ValueError(f"dense must have the weight's shape {tuple(weight.shape)}, got {tuple(dense.shape)}")
    n_cols = weight.shape[1]
    if hessian.shape != (n_cols, n_cols) or hessian.dtype != torch.float32:
        raise ValueError(f"hessian must be float32 [{n_cols}, {n_cols}], got {tuple(hessian.shape)} {hessian.dtype}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a non-negative int, got {iters!r}")
    if not rtol > 0:
        raise ValueError(f"rtol must be positive, got {rtol!r}")
    support = (weight != 0).float()
    w = weight.float()
    target = dense.float() @ hessian * support  # (H w0)_S, rows as row vectors (H is symmetric)
    target_norm = target.norm(dim=1)
    residual = target - (w @ hessian) * support
    inverse_diag = 1.0 / torch.diagonal(hessian).clamp_min(torch.finfo(torch.float32).tiny)
    z = residual * inverse_diag
    direction = z.clone()
    rz = (residual * z).sum(dim=1)
    steps = 0
    for steps in range(1, iters + 1):
        if bool((residual.norm(dim=1) <= rtol * target_norm).all()):
            steps -= 1
            break
        h_direction = (direction @ hessian) * support
        curvature = (direction * h_direction).sum(dim=1)
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        w.add_(alpha[:, None] * direction)
        residual.sub_(alpha[:, None] * h_direction)
        z = residual * inverse_diag
        rz_next = (residual * z).sum(dim=1)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        direction = z + beta[:, None] * direction
        rz = rz_next
    weight.copy_(w * support)
    return steps
