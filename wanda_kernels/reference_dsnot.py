"""Plain-torch references (the spec) for RIA's score, the channel moments DSnoT reads, and DSnoT's swap loops.

* RIA (biomedical-cybernetics/Relative-importance-and-activation-pruning, ``prune_ria``):
  ``(|W| / colsum|W| + |W| / rowsum|W|) * sqrt(act_sq_norms) ** a``, in fp32.
* Moments, per input channel over x viewed as [samples, T, C]: the sum of squares (Wanda's norms), the sum, and
  the squared deviations from each sample's own mean (DSnoT's ``var`` is their mean over tokens).
* DSnoT (zyxxmu/DSnoT, ``prune_DSnoT``): each row repeatedly regrows one pruned weight and prunes one kept weight
  so that the row's reconstruction error ``sum over pruned j of W_j * mean_j`` shrinks. A row stops when
  ``|error| <= update_threshold``, when (N:M) the swap would flip the error's sign, or after ``max_cycles``.
  The published loop keeps writing the mask for stopped rows; those writes change nothing as long as each row's
  pointers stay on pruned (regrow) and kept (prune) entries, which holds whenever the published code runs
  without an index error. Here a row also stops when a pointer leaves its list or lands on the wrong kind of
  entry, so a swap always exchanges one pruned and one kept weight (sparsity and N:M are kept exactly).
"""

from __future__ import annotations

import torch

from wanda_kernels._validate import check_act_sq_norms, check_matrix


def ria_scores_torch(weight: torch.Tensor, act_sq_norms: torch.Tensor, a: float = 0.5) -> torch.Tensor:
    """RIA's score, fp32 [O, C]: relative importance in the row and in the column, times the activation norm ** a.
    An all-zero row or column gives NaN, as in the published code (NaN sorts last: never pruned first)."""
    check_matrix(weight, "weight")
    check_act_sq_norms(act_sq_norms, weight)
    w = weight.abs().float()
    return (w / w.sum(dim=0) + w / w.sum(dim=1, keepdim=True)) * torch.sqrt(act_sq_norms).pow(a)[None, :]


def accumulate_moments_torch(
    sq_norms: torch.Tensor, sums: torch.Tensor, sq_deviations: torch.Tensor, x: torch.Tensor, samples: int
) -> None:
    """With x [..., C] viewed as [samples, T, C] in fp32, per channel c (each accumulator fp32 [C], in place):
    ``sq_norms += sum x**2``, ``sums += sum x``, ``sq_deviations += sum_s sum_t (x[s, t] - mean_t x[s, :])**2``."""
    _check_moments(sq_norms, sums, sq_deviations, x, samples)
    xs = x.reshape(samples, -1, x.shape[-1]).float()
    sq_norms += xs.pow(2).sum(dim=(0, 1))
    sums += xs.sum(dim=(0, 1))
    sq_deviations += (xs - xs.mean(dim=1, keepdim=True)).pow(2).sum(dim=(0, 1))


def dsnot_unstructured_torch(
    mask: torch.Tensor,
    dsnot_metric: torch.Tensor,
    regrow_order: torch.Tensor,
    prune_order: torch.Tensor,
    prune_counts: torch.Tensor,
    error: torch.Tensor,
    update_threshold: float,
    max_cycles: int,
) -> torch.Tensor:
    """DSnoT's unstructured swaps; updates ``mask`` (bool [O, C], True = pruned) in place and returns it.

    ``dsnot_metric`` fp32 [O, C]: ``W * mean``. ``regrow_order`` int64 [O, C]: every column, ascending by the
    regrowing metric (pruned entries first and last, kept ones, at 0, between). ``prune_order`` int64 [O, C]: per
    row its ``prune_counts[r]`` kept columns first, negative ``dsnot_metric`` first and positive last.
    ``error`` fp32 [O]: the initial reconstruction error. Each cycle, per live row: regrow from the end of
    ``regrow_order`` (error > 0) or its start, prune from the start of ``prune_order`` (error >= 0) or the end of
    its kept part; swap if ``|error| > update_threshold`` (the published unstructured path has no sign check).
    """
    n_rows, n_cols = _check_dsnot(mask, dsnot_metric, regrow_order, error, max_cycles)
    if prune_order.shape != mask.shape or prune_counts.shape != (n_rows,):
        raise ValueError("prune_order must be [O, C] and prune_counts [O], like mask")
    rows = torch.arange(n_rows, device=mask.device)
    err = error.clone().float()
    regrow_lo = torch.zeros(n_rows, dtype=torch.long, device=mask.device)
    regrow_hi = torch.full_like(regrow_lo, n_cols - 1)
    prune_lo = torch.zeros_like(regrow_lo)
    prune_hi = prune_counts.long() - 1
    alive = torch.ones(n_rows, dtype=torch.bool, device=mask.device)
    for _ in range(max_cycles):
        if not bool(alive.any()):
            break
        from_end = err > 0
        r_pos = torch.where(from_end, regrow_hi, regrow_lo)
        regrow_hi = torch.where(from_end, regrow_hi - 1, regrow_hi)
        regrow_lo = torch.where(from_end, regrow_lo, regrow_lo + 1)
        from_kept_end = err < 0
        p_pos = torch.where(from_kept_end, prune_hi, prune_lo)
        prune_hi = torch.where(from_kept_end, prune_hi - 1, prune_hi)
        prune_lo = torch.where(from_kept_end, prune_lo, prune_lo + 1)
        in_range = (r_pos >= 0) & (r_pos < n_cols) & (p_pos >= 0) & (p_pos < prune_counts)
        r = regrow_order[rows, r_pos.clamp(0, n_cols - 1)]
        p = prune_order[rows, p_pos.clamp(0, n_cols - 1)]
        valid = in_range & mask[rows, r] & ~mask[rows, p] & (r != p)
        swap = alive & valid & (err.abs() > update_threshold)
        alive = swap
        err = (err + torch.where(swap, dsnot_metric[rows, p], 0.0)) - torch.where(swap, dsnot_metric[rows, r], 0.0)
        mask[rows[swap], p[swap]] = True
        mask[rows[swap], r[swap]] = False
    return mask


def dsnot_nm_torch(
    mask: torch.Tensor,
    dsnot_metric: torch.Tensor,
    prune_metric: torch.Tensor,
    regrow_order: torch.Tensor,
    error: torch.Tensor,
    m: int,
    update_threshold: float,
    max_cycles: int,
) -> torch.Tensor:
    """DSnoT's N:M swaps; updates ``mask`` in place and returns it. ``prune_metric`` fp32 [O, C] is a workspace,
    overwritten: the initial method's score with pruned entries at +inf. Each cycle, per live row: regrow as in
    :func:`dsnot_unstructured_torch`; prune the smallest ``prune_metric`` of the regrown entry's group of ``m``
    (lowest index on ties), then set it to +inf; swap if ``|error| > update_threshold`` and the swap keeps the
    sign of the initial error. A swap stays inside one group, so the mask stays N:M."""
    n_rows, n_cols = _check_dsnot(mask, dsnot_metric, regrow_order, error, max_cycles)
    if prune_metric.shape != mask.shape or prune_metric.dtype != torch.float32:
        raise ValueError("prune_metric must be float32 [O, C], like mask")
    if m <= 0 or n_cols % m:
        raise ValueError(f"in_features ({n_cols}) must be a multiple of m ({m})")
    rows = torch.arange(n_rows, device=mask.device)
    err = error.clone().float()
    sign0 = torch.sign(err)
    regrow_lo = torch.zeros(n_rows, dtype=torch.long, device=mask.device)
    regrow_hi = torch.full_like(regrow_lo, n_cols - 1)
    alive = torch.ones(n_rows, dtype=torch.bool, device=mask.device)
    in_group = torch.arange(m, device=mask.device)
    for _ in range(max_cycles):
        if not bool(alive.any()):
            break
        from_end = err > 0
        r_pos = torch.where(from_end, regrow_hi, regrow_lo)
        regrow_hi = torch.where(from_end, regrow_hi - 1, regrow_hi)
        regrow_lo = torch.where(from_end, regrow_lo, regrow_lo + 1)
        in_range = (r_pos >= 0) & (r_pos < n_cols)
        r = regrow_order[rows, r_pos.clamp(0, n_cols - 1)]
        start = r - r % m
        group = prune_metric[rows[:, None], start[:, None] + in_group]  # [O, m]
        p = start + torch.argmin(group, dim=1)  # argmin: the first minimum
        rv, pv = dsnot_metric[rows, r], dsnot_metric[rows, p]
        valid = in_range & mask[rows, r] & ~mask[rows, p]
        swap = alive & valid & (err.abs() > update_threshold) & (torch.sign(err + pv - rv) == sign0)
        alive = swap
        err = (err + torch.where(swap, pv, 0.0)) - torch.where(swap, rv, 0.0)  # published: += pv, then -= rv
        prune_metric[rows[swap], p[swap]] = float("inf")
        mask[rows[swap], p[swap]] = True
        mask[rows[swap], r[swap]] = False
    return mask


def _check_moments(sq_norms, sums, sq_deviations, x, samples) -> None:
    for name, acc in (("sq_norms", sq_norms), ("sums", sums), ("sq_deviations", sq_deviations)):
        if not isinstance(acc, torch.Tensor) or acc.ndim != 1 or acc.dtype != torch.float32:
            raise ValueError(f"{name} must be a 1-D float32 tensor, got {getattr(acc, 'shape', acc)!r}")
    if not (sq_norms.shape == sums.shape == sq_deviations.shape):
        raise ValueError("sq_norms, sums and sq_deviations must have the same shape [C]")
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[-1] != sums.shape[0]:
        raise ValueError(
            f"x must end in dim {sums.shape[0]} (= the accumulators), got {tuple(getattr(x, 'shape', ()))}"
        )
    rows = x.numel() // max(x.shape[-1], 1)
    if not isinstance(samples, int) or samples <= 0 or rows % samples:
        raise ValueError(f"samples must be a positive int dividing the {rows} rows of x, got {samples!r}")


def _check_dsnot(mask, dsnot_metric, regrow_order, error, max_cycles) -> tuple[int, int]:
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a 2-D bool tensor, got {getattr(mask, 'shape', mask)!r}")
    if dsnot_metric.shape != mask.shape or dsnot_metric.dtype != torch.float32:
        raise ValueError("dsnot_metric must be float32 [O, C], like mask")
    if regrow_order.shape != mask.shape or regrow_order.dtype != torch.int64:
        raise ValueError("regrow_order must be int64 [O, C], like mask")
    if error.shape != (mask.shape[0],):
        raise ValueError(f"error must have shape [O] = [{mask.shape[0]}], got {tuple(error.shape)}")
    if not isinstance(max_cycles, int) or max_cycles < 0:
        raise ValueError(f"max_cycles must be a non-negative int, got {max_cycles!r}")
    return mask.shape
