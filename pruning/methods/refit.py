"""The least-squares refit of a pruned weight on its support, by preconditioned conjugate gradients.

Per output row: ``min_w (w - w0)^T H (w - w0)`` with ``w_j = 0`` wherever the pruned weight is 0, ``w0`` the dense
row and ``H`` the layer's damped Hessian (SparseGPT's ``2/N X^T X + damp I``): on the support ``S``,
``H_SS w_S = (H w0)_S``. Every row at once, each CG step one GEMM with ``H``, preconditioned by ``diag(H)``, started
from the pruned weight (so a method's own update, e.g. SparseGPT's, is where it begins), for at most ``iters`` steps
or until every row's residual is below ``rtol`` times its right-hand side. The mask is unchanged. ALPS (Meng et al.
2024) ends with the same back-solve, unpreconditioned and with its own stopping test (``support_cg_`` options).
Why and what it measured: docs/pruning.md.
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
    w = weight.float()
    steps = support_cg_(w, dense.float() @ hessian, hessian, iters, rtol)
    weight.copy_(w)
    return steps


def support_cg_(
    w: torch.Tensor, target: torch.Tensor, hessian: torch.Tensor, iters: int, rtol: float,
    precondition: bool = True, stop: str = "support",
) -> int:  # fmt: skip
    """CG on ``w``'s support (its nonzeros) for ``w H = target`` there, row by row, in ``w``'s dtype; in place.

    ``stop="support"``: before each step, stop once every row's residual on its support is below ``rtol`` times its
    target there (ours). ``stop="alps"``: after each step, stop once for every input channel the full residual
    ``||(w H - target)_{:, j}||`` is below ``rtol * ||target_{:, j}||`` (ALPS's ``cg_batch`` as published, which
    rarely stops before ``iters``). Returns the steps taken."""
    support = (w != 0).to(w.dtype)
    target_norm = (target * support).norm(dim=1) if stop == "support" else target.norm(dim=0)
    residual = (target - w @ hessian) * support
    tiny = torch.finfo(w.dtype).tiny
    inverse_diag = 1.0 / torch.diagonal(hessian).clamp_min(tiny) if precondition else None
    z = residual * inverse_diag if precondition else residual
    direction = z.clone()
    rz = (residual * z).sum(dim=1)
    for step in range(1, iters + 1):
        if stop == "support" and bool((residual.norm(dim=1) <= rtol * target_norm).all()):
            return step - 1
        h_direction = (direction @ hessian) * support
        curvature = (direction * h_direction).sum(dim=1)
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(tiny), 0.0)
        w.add_(alpha[:, None] * direction)
        residual.sub_(alpha[:, None] * h_direction)
        z = residual * inverse_diag if precondition else residual
        rz_next = (residual * z).sum(dim=1)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(tiny), 0.0)
        direction = z + beta[:, None] * direction
        rz = rz_next
        if stop == "alps" and bool(((w @ hessian - target).norm(dim=0) <= rtol * target_norm).all()):
            return step
    return iters
