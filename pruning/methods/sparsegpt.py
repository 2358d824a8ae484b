"""SparseGPT (Frantar & Alistarh 2023): prune with OBS error compensation, IST-DASLab/sparsegpt ``fasterprune``.

The layer-wise problem is ``min ||W X - W' X||`` over masked ``W'``, with Hessian ``H = 2/N * X^T X``
(``X`` [tokens, in], ``N`` = number of calibration *sequences*, as in the reference's ``add_batch``). Columns
are processed left to right in blocks; pruning column ``j`` adds ``-(w_j - q_j) / U_jj * U[j, j:]`` to the
remaining columns, where ``U`` is the upper Cholesky factor of ``(H + damp I)^-1``. The unstructured mask is
chosen per block of columns with one threshold over the block's ``w^2 / U_jj^2`` (all rows together); N:M
masks are chosen every ``m`` columns from the already-updated weights. Work is in fp32; the result is written
back into ``weight`` in its own dtype.

Deliberate differences from the published code (results are otherwise the same):

* N:M picks the ``n`` smallest of each group with a stable sort (ties to the lower column, as
  ``wanda_kernels.reference.nm_mask_torch``) where the reference calls ``topk``, whose tie order is unspecified.
* If the Cholesky factorisations fail (or produce NaN), the damping is multiplied by 10 and retried, with a
  warning; the reference crashes. ``sparsity == 0`` (or ``n == 0`` with N:M) prunes nothing and leaves the
  weight untouched, where the reference would still prune the smallest entry of every block.
* The caller's Hessian is not modified unless ``inplace_hessian=True`` (the reference consumes it).
"""

from __future__ import annotations

import logging
import math

import torch

from wanda_kernels._validate import check_matrix, check_nm, check_sparsity

logger = logging.getLogger(__name__)


@torch.no_grad()
def accumulate_hessian_(hessian: torch.Tensor, x: torch.Tensor, n_seen: int) -> int:
    """Fold a batch of inputs ``x`` [..., C] into the running ``hessian`` (fp32 [C, C]); return the new count.

    A *sample* is a calibration sequence, as in the reference's ``add_batch``: ``x`` of shape [S, T, C]
    (or [S, ..., C]) holds ``S`` samples; a 2-D ``x`` [T, C] is one sample. After all batches
    ``hessian == 2 / n_seen * X^T X`` over every token seen. One GEMM per batch, no per-sample loop.
    """
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1] or hessian.dtype != torch.float32:
        raise ValueError(f"hessian must be a square float32 matrix, got shape {tuple(hessian.shape)} {hessian.dtype}")
    n_cols = hessian.shape[0]
    if x.ndim < 2 or x.shape[-1] != n_cols:
        raise ValueError(f"x must be [tokens, {n_cols}] or [samples, ..., {n_cols}], got shape {tuple(x.shape)}")
    if x.device != hessian.device:
        raise ValueError(f"x is on {x.device} but hessian is on {hessian.device}")
    if isinstance(n_seen, bool) or not isinstance(n_seen, int) or n_seen < 0:
        raise ValueError(f"n_seen must be a non-negative int, got {n_seen!r}")
    n_new = 1 if x.ndim == 2 else x.shape[0]
    if n_new == 0:
        return n_seen
    total = n_seen + n_new
    hessian *= n_seen / total
    # Scale the inputs, not the product, exactly as the reference: H += (sqrt(2/n) x)^T (sqrt(2/n) x).
    x_scaled = x.reshape(-1, n_cols).to(torch.float32, copy=True).mul_(math.sqrt(2 / total))
    hessian.addmm_(x_scaled.T, x_scaled)
    return total


def _inverse_hessian_cholesky(
    hessian: torch.Tensor, percdamp: float, max_damp_retries: int
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp I)^-1``, raising damp 10x on failure. ``hessian`` is modified."""
    diag = torch.diagonal(hessian)
    base_diag = diag.clone()
    mean_diag = torch.mean(base_diag)
    damp_ratio = percdamp
    for attempt in range(max_damp_retries + 1):
        damp = float(damp_ratio * mean_diag)  # fp32 product, as the reference's ``percdamp * torch.mean(...)``
        diag.copy_(base_diag + damp)
        try:
            factor = torch.linalg.cholesky(hessian)
            factor = torch.cholesky_inverse(factor)
            factor = torch.linalg.cholesky(factor, upper=True)
            if bool(torch.isfinite(factor).all()):
                return factor, damp
            reason = "non-finite result"
        except torch.linalg.LinAlgError as err:
            reason = str(err).splitlines()[0]
        if attempt < max_damp_retries:
            logger.warning(
                "sparsegpt: Cholesky failed with damp %.3g (%.3g x mean diag): %s; retrying with %.3g x mean diag",
                damp,
                damp_ratio,
                reason,
                damp_ratio * 10,
            )
        damp_ratio *= 10
    raise ValueError(
        f"sparsegpt: Hessian is not positive definite even with damp {damp:.3g} "
        f"({damp_ratio / 10:.3g} x mean diag) after {max_damp_retries} retries; check the calibration data"
    )


def _smallest_n_per_group(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Column indices (within ``scores`` [O, m]) of each row's ``n`` smallest scores, ties to the lower index."""
    return torch.sort(scores, dim=1, stable=True)[1][:, :n]


@torch.no_grad()
def prune_sparsegpt_(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    max_damp_retries: int = 3,
    inplace_hessian: bool = False,
) -> torch.Tensor:
    """Prune ``weight`` [out, in] in place with SparseGPT; return the bool mask (True = pruned).

    ``hessian`` is fp32 [in, in] from :func:`accumulate_hessian_`. ``n``/``m`` non-zero selects N:M sparsity
    (``sparsity`` is then ignored; ``blocksize`` must be a multiple of ``m``). ``percdamp`` times the mean
    diagonal is added to the diagonal; on a failed factorisation that fraction is multiplied by 10, at most
    ``max_damp_retries`` times, before a ValueError. Input columns never activated (``H_jj == 0``) are zeroed
    in ``weight`` whether or not the mask selects them. With ``inplace_hessian=True`` the hessian's storage is
    reused as workspace (saves one [in, in] copy) and left modified.
    """
    check_matrix(weight, "weight")
    n_rows, n_cols = weight.shape
    if hessian.shape != (n_cols, n_cols) or hessian.dtype != torch.float32:
        raise ValueError(
            f"hessian must be float32 [{n_cols}, {n_cols}] (in_features), got {tuple(hessian.shape)} {hessian.dtype}"
        )
    if hessian.device != weight.device:
        raise ValueError(f"hessian is on {hessian.device} but weight is on {weight.device}")
    structured = bool(n or m)
    if structured:
        check_nm(n, m, n_cols)
    else:
        check_sparsity(sparsity)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if structured and blocksize % m != 0:
        raise ValueError(f"blocksize ({blocksize}) must be a multiple of m ({m}) so N:M groups do not straddle blocks")
    if not (isinstance(percdamp, (int, float)) and math.isfinite(percdamp) and percdamp > 0):
        raise ValueError(f"percdamp must be a positive number, got {percdamp!r}")
    if isinstance(max_damp_retries, bool) or not isinstance(max_damp_retries, int) or max_damp_retries < 0:
        raise ValueError(f"max_damp_retries must be a non-negative int, got {max_damp_retries!r}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("hessian contains NaN or inf: the calibration activations overflowed or are corrupt")

    mask = torch.zeros(n_rows, n_cols, dtype=torch.bool, device=weight.device)
    if (n == 0) if structured else (sparsity == 0):
        return mask

    w_work = weight.detach().to(torch.float32, copy=True)
    h_work = hessian if inplace_hessian else hessian.clone()
    dead = torch.diagonal(h_work) == 0
    h_work[dead, dead] = 1
    w_work[:, dead] = 0
    hinv, damp = _inverse_hessian_cholesky(h_work, percdamp, max_damp_retries)  # upper factor U
    del h_work

    losses = torch.zeros(n_rows, dtype=torch.float32, device=weight.device)
    for i1 in range(0, n_cols, blocksize):
        i2 = min(i1 + blocksize, n_cols)
        w_block = w_work[:, i1:i2].clone()
        q_block = torch.zeros_like(w_block)
        err_block = torch.zeros_like(w_block)
        loss_block = torch.zeros_like(w_block)
        hinv_block = hinv[i1:i2, i1:i2]
        hinv_diag = torch.diagonal(hinv_block)
        mask_block = mask[:, i1:i2]  # a view: selections land in ``mask`` directly

        if not structured:  # OBS saliency w^2 / [H^-1]_jj with [H^-1]_jj = U_jj^2; one threshold per block
            saliency = w_block**2 / hinv_diag.reshape((1, -1)) ** 2
            threshold = torch.sort(saliency.flatten())[0][int(saliency.numel() * sparsity)]
            mask_block.copy_(saliency <= threshold)

        for i in range(i2 - i1):
            w = w_block[:, i]
            d = hinv_block[i, i]
            if structured and i % m == 0:  # N:M groups chosen from the weights updated so far
                saliency = w_block[:, i : i + m] ** 2 / hinv_diag[i : i + m].reshape((1, -1)) ** 2
                mask_block.scatter_(1, i + _smallest_n_per_group(saliency, n), True)
            q = w.masked_fill(mask_block[:, i], 0)  # = ``q = w.clone(); q[mask] = 0`` without a host sync
            q_block[:, i] = q
            loss_block[:, i] = (w - q) ** 2 / d**2
            err = (w - q) / d
            # same rounding as the reference's [O, 1] @ [1, k] product, then a subtraction
            w_block[:, i:] -= err.unsqueeze(1).matmul(hinv_block[i, i:].unsqueeze(0))
            err_block[:, i] = err

        w_work[:, i1:i2] = q_block
        losses += torch.sum(loss_block, 1) / 2
        w_work[:, i2:] -= err_block.matmul(hinv[i1:i2, i2:])  # lazy batch update of the columns to the right

    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("sparsegpt: %dx%d damp %.3g error %.6g", n_rows, n_cols, damp, float(losses.sum()))
    weight.copy_(w_work)  # fp32 -> weight.dtype, round to nearest like the reference's .to(dtype)
    return mask
