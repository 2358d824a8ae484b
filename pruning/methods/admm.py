"""The ADMM weight update with gradual mask selection (Boža 2024, arXiv 2401.02938; fmfi-compbio/admm-pruning
``lib/admm.py``, ``AdmmPruner.fasterprune``).

With ``s = sqrt(diag H) + 1e-8``, ``Gn = H / s s^T`` plus ``percdamp * mean(diag Gn)`` on the diagonal and ``W0 = W s``:
ADMM on ``min ||(W - W0) Gn^(1/2)||^2`` s.t. ``W`` on the mask, with rho = 1 fixed and one inverse ``(Gn + I)^-1``:
``Z = (W + U) * mask``, ``U += W - Z``, ``W = (W0 Gn + rho (Z - U)) (Gn + rho I)^-1``, ``iters`` times; the result
is the last ``Z / s``. During the first ``iterative_prune`` steps the mask is chosen again from ``|W + U|``: for 2:4,
growing to the full pattern on the cubic schedule ``s_t = 0.5 (1 - (1 - t / T)^3)``; unstructured, the published code
takes the full sparsity from the first step (its schedule is computed but not used; ``per_out`` uses it). With a
given mask (``--refine admm``) only the weight update runs. Reference transcription: bench/baselines_alps.py.
"""

from __future__ import annotations

import torch

from wanda_kernels._validate import check_matrix


@torch.no_grad()
def admm_gram(hessian: torch.Tensor, percdamp: float = 0.1, dtype: torch.dtype = torch.float32):
    """(``Gn`` damped, ``s``): the normalized, damped Gram of one input group, shared by its Linears."""
    check_matrix(hessian, "hessian", float64=True)
    gram = hessian.to(dtype).clone()
    scale = gram.diagonal().sqrt() + 1e-8
    gram = gram / scale
    gram = (gram.T / scale).T
    gram.diagonal().add_(percdamp * gram.diagonal().mean())
    return gram, scale


def _magnitude_keep(values: torch.Tensor, sparsity: float, n: int, m: int, per_out: bool) -> torch.Tensor:
    """The published masks (True = kept) from ``|values|`` [O, C], at the full pattern."""
    if m:
        return _nm_keep(values, n, m)
    if per_out:
        return _per_out_keep(values, sparsity)
    keep = torch.ones(values.numel(), dtype=torch.bool, device=values.device)
    keep[torch.topk(values.abs().reshape(-1), k=int(values.numel() * sparsity), largest=False).indices] = False
    return keep.reshape(values.shape)


def _nm_keep(values: torch.Tensor, n: int, m: int) -> torch.Tensor:
    groups = values.abs().reshape(-1, m)
    order = groups.sort(dim=1)[1]
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, order[:, m - n :], True)
    return keep.reshape(values.shape)


def _per_out_keep(values: torch.Tensor, sparsity: float) -> torch.Tensor:
    magnitude = values.abs()
    threshold = magnitude.sort(dim=1)[0][:, int(values.shape[1] * sparsity)]
    return magnitude >= threshold[:, None]


def _scheduled_keep(values: torch.Tensor, sparsity: float, n: int, m: int, per_out: bool, step: int, steps: int):
    """The mask at ADMM step ``step`` (0-based) of ``steps`` with mask selection, as published."""
    grown = 1 - (1 - (step + 1) / steps) ** 3
    if m:
        current = (m - n) / m * grown  # published: 2:4 only, sparsity 0.5
        magnitude = values.abs()
        magnitude[_nm_keep(values, n, m)] = torch.inf
        threshold = magnitude.reshape(-1).kthvalue(int(values.numel() * current) + 1)[0]
        return magnitude >= threshold
    if per_out:
        return _per_out_keep(values, sparsity * grown)
    return _magnitude_keep(values, sparsity, n, m, per_out)


@torch.no_grad()
def prune_admm_(
    weight: torch.Tensor,
    gram: torch.Tensor,
    scale: torch.Tensor,
    sparsity: float = 0.5,
    n: int = 0,
    m: int = 0,
    iterative_prune: int = 15,
    iters: int = 20,
    per_out: bool = False,
    rho: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prune ``weight`` [O, C] in place by the ADMM update under ``(gram, scale)`` from :func:`admm_gram`; with
    ``mask`` (bool, True = pruned) only update the weights on it. Returns the pruned mask."""
    check_matrix(weight, "weight", float64=True)
    n_in = weight.shape[1]
    if gram.shape != (n_in, n_in) or scale.shape != (n_in,):
        raise ValueError(f"gram must be [{n_in}, {n_in}] and scale [{n_in}], got {tuple(gram.shape)}")
    if m and n_in % m:
        raise ValueError(f"N:M {n}:{m} needs in_features ({n_in}) divisible by {m}")
    if mask is not None and mask.shape != weight.shape:
        raise ValueError(f"mask must have the weight's shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
    w = weight.to(gram.dtype) * scale
    select = mask is None and iterative_prune > 0
    if mask is not None:
        keep = ~mask
    elif not select:
        keep = _magnitude_keep(w, sparsity, n, m, per_out)
    if iters == 0:
        z = w * keep
    else:
        target = w @ gram
        system = gram.clone()
        system.diagonal().add_(rho)
        inverse = torch.linalg.inv(system)
        u = torch.zeros_like(w)
        for step in range(iters):
            if select and step < iterative_prune:
                keep = _scheduled_keep(w + u, sparsity, n, m, per_out, step, iterative_prune)
            z = (w + u) * keep
            u = u + (w - z)
            w = (target + rho * (z - u)) @ inverse
        z = (w + u) * keep
    weight.copy_((z / scale).to(weight.dtype))
    return ~keep
