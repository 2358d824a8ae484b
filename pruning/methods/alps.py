"""ALPS (Meng, Behdin, Wang, Mazumder, NeurIPS 2024; mazumder-lab/ALPS ``alps.py``, ``ALPS_admm``): the layer's
reconstruction problem ``min ||X W^T - X What^T||^2`` over a sparsity pattern, by ADMM, then a CG refit.

With ``G = H + 0.01 mean(diag H) I`` normalized to a unit diagonal (``s = sqrt(diag G)``, ``Gn = G / s s^T``) and
``B0 = W s`` the scaled weight, ADMM alternates ``B = (B0 Gn - V + rho D) (Gn + rho I)^-1`` (one eigendecomposition
of ``Gn`` serves every rho), ``D = P(B + V / rho)`` (``P`` keeps the largest ``|.|``: globally over the matrix for
unstructured, per group of M inputs for N:M) and ``V += rho (B - D)``. Every ``update_iter`` steps rho grows with
how much the support still changes (x1.3 above 10%, x1.2 above 0.5%, ...), as published; it stops when the support
is stable. Then ``P(B)`` is refit on its support by 10 unpreconditioned CG steps (``support_cg_``, ALPS's stopping
test) and ``W = B / s``. Every rule and constant is the published one; the layout is ours ([out, in], not its
transpose), which changes rounding only. Reference transcription: bench/baselines_alps.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pruning.methods.refit import support_cg_
from wanda_kernels._validate import check_matrix

RIDGE = 0.01  # ALPS's damp1 = 0.01 * mean(diag(X^T X))
RHO_CAP = 1e6


@dataclass(frozen=True)
class AlpsGram:
    """ALPS's normalized Gram of one input group and its eigendecomposition, shared by the group's Linears."""

    gram: torch.Tensor  # [C, C] Gn, unit diagonal
    scale: torch.Tensor  # [C] s
    eigenvalues: torch.Tensor  # float64 [C]
    eigenvectors: torch.Tensor  # [C, C], from a float64 eigh, stored in the Gram's dtype

    def inverse(self, rho: float) -> torch.Tensor:
        """``(Gn + rho I)^-1`` in the Gram's dtype from the float64 eigendecomposition; the product is formed in
        the Gram's dtype (the published code forms it in float64 and rounds; float32 halves its cost)."""
        q = self.eigenvectors
        return q @ ((1.0 / (self.eigenvalues + rho)).to(q.dtype) * q).T


@torch.no_grad()
def alps_gram(hessian: torch.Tensor, dtype: torch.dtype = torch.float32) -> AlpsGram:
    """The ridge, the normalization and the float64 eigendecomposition of ``hessian`` [C, C] (any positive scale
    of ``X^T X``: SparseGPT's ``2/N X^T X`` gives the same ALPS problem)."""
    check_matrix(hessian, "hessian", float64=True)
    if hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be square, got {tuple(hessian.shape)}")
    gram = hessian.to(dtype).clone()
    gram.diagonal().add_(RIDGE * gram.diagonal().mean())
    scale = gram.diagonal().sqrt() + 1e-8
    gram = gram / scale
    gram = (gram.T / scale).T
    eigenvalues, eigenvectors = torch.linalg.eigh(gram.double())
    return AlpsGram(gram, scale, eigenvalues, eigenvectors.to(dtype))  # cast once, not at every rho


@dataclass(frozen=True)
class AlpsResult:
    iterations: int  # ADMM steps run
    rho: float  # its final rho
    cg_steps: int


def _project(values: torch.Tensor, n_keep: int, n: int, m: int) -> torch.Tensor:
    """``values`` with all but the largest ``|.|`` zeroed: ``n_keep`` over the matrix, or ``n`` per M inputs."""
    if m:
        groups = values.reshape(-1, m)
        drop = torch.topk(-groups.pow(2), m - n, dim=1).indices
        return groups.scatter(1, drop, 0.0).reshape(values.shape)
    n_drop = values.numel() - n_keep
    if n_drop == 0:
        return values.clone()
    squares = values.pow(2)
    keep = squares > squares.reshape(-1).kthvalue(n_drop).values  # a selection, not a sort: cheaper than top-k
    if int(keep.sum()) != n_keep:  # a tie at the threshold: top-k decides which of the tied entries stay
        flat = values.reshape(-1).clone()
        flat[torch.topk(-squares.reshape(-1), n_drop).indices] = 0.0
        return flat.reshape(values.shape)
    return values * keep


@torch.no_grad()
def prune_alps_(
    weight: torch.Tensor,
    gram: AlpsGram,
    sparsity: float = 0.5,
    n: int = 0,
    m: int = 0,
    rho: float = 0.1,
    max_iter: int = 300,
    update_iter: int = 3,
    switch_iter: int = 30,
    cg_iters: int = 10,
    cg_rtol: float = 1e-4,
) -> AlpsResult:
    """Prune ``weight`` [O, C] in place by ALPS under ``gram`` (:func:`alps_gram` of its input Hessian): at
    ``sparsity`` unstructured (over the whole matrix, as published), or N:M when ``m``; returns what it ran."""
    check_matrix(weight, "weight", float64=True)
    n_out, n_in = weight.shape
    if gram.gram.shape != (n_in, n_in):
        raise ValueError(f"gram must be [{n_in}, {n_in}] (in_features), got {tuple(gram.gram.shape)}")
    if m and n_in % m:
        raise ValueError(f"N:M {n}:{m} needs in_features ({n_in}) divisible by {m}")
    dtype = gram.gram.dtype
    b_orig = weight.to(dtype) * gram.scale
    target = b_orig @ gram.gram  # YtX
    n_keep = round((1 - sparsity) * weight.numel()) if not m else None
    kept_count = weight.numel() * n / m if m else n_keep  # k_spar

    def project(values: torch.Tensor) -> torch.Tensor:
        return _project(values, n_keep, n, m)

    inverse = gram.inverse(rho)
    b = b_orig.clone()
    v = torch.zeros_like(b)
    d = project(b)
    d_init = d.clone()
    support_prev = d == 0
    init_rho = False
    iteration = 0
    for iteration in range(1, max_iter + 1):
        b = (target - v + rho * d) @ inverse
        d = project((v + rho * b) / rho)
        v = v + rho * (b - d)
        if iteration % update_iter:
            continue
        support = d == 0
        change = int((support != support_prev).sum())
        ratio = change / kept_count
        if ratio > 0.1:
            init_rho, rho = True, rho * 1.3
        elif ratio > 0.005:
            init_rho, rho = True, rho * 1.2
        elif change > 0.5:
            if init_rho:
                rho *= 1.1
            else:
                rho /= 5
                b, d, v = b_orig.clone(), d_init.clone(), torch.zeros_like(b)
        elif init_rho:
            break
        else:
            rho /= 5
        support_prev = support
        rho = min(rho, RHO_CAP)
        inverse = gram.inverse(rho)
        if iteration - 1 >= switch_iter and ratio < 0.0003:
            break
    b = project(b)
    cg_steps = support_cg_(b, target, gram.gram, cg_iters, cg_rtol, precondition=False, stop="alps")
    weight.copy_((b / gram.scale).to(weight.dtype))
    return AlpsResult(iterations=iteration, rho=rho, cg_steps=cg_steps)
