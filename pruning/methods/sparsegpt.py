"""SparseGPT (Frantar & Alistarh 2023): prune with OBS error compensation, IST-DASLab/sparsegpt ``fasterprune``.

The layer-wise problem is ``min ||W X - W' X||`` over masked ``W'``, with Hessian ``H = 2/N * X^T X``
(``X`` [tokens, in], ``N`` = number of calibration *sequences*, as in the reference's ``add_batch``). Columns
are processed left to right in blocks; pruning column ``j`` adds ``-(w_j - q_j) / U_jj * U[j, j:]`` to the
remaining columns, ``U`` the upper Cholesky factor of ``(H + damp I)^-1``. Unstructured masks: one threshold per
block over ``w^2 / U_jj^2``; N:M masks: every ``m`` columns, from the updated weights. Work is in fp32, written
back into ``weight`` in its own dtype. ``backend="torch"`` is the published column loop; ``"triton"`` one kernel
per block (``wanda_kernels.sparsegpt_block_``) plus one in-place GEMM: equal within fp32 rounding.
Differences from the published code, the backends, the Hessian and factor arithmetic: docs/sparsegpt.md.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import NamedTuple

import torch

from pruning.methods.ops import BACKENDS, kernel_ops
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
    x2d = x.reshape(-1, n_cols)
    gram = _gram_on_tensor_cores(x2d)
    if gram is not None:
        hessian.add_(gram, alpha=2 / total)
        return total
    # Scale the inputs, not the product, exactly as the reference: H += (sqrt(2/n) x)^T (sqrt(2/n) x).
    x_scaled = x2d.to(torch.float32, copy=True).mul_(math.sqrt(2 / total))
    hessian.addmm_(x_scaled.T, x_scaled)
    return total


_DISABLED_GRAM_DEVICES: set[tuple[torch.device, torch.dtype]] = set()  # failed the per-batch diagonal check
GRAM_PROBE_ROWS = 4096  # the probe's K: long enough that a 16-bit accumulation or split-K reduction shows
GRAM_PROBE_RTOL = 3e-5  # fp32 sums of 4096 positive products: ~1e-6; any 16-bit rounding of a sum: ~2.4e-4
GRAM_CHUNK_ROWS = 4096  # rows per tensor-core product: long ones lose precision (H200: 7.7e-4 at 131072 rows)
GRAM_DIAGONAL_RTOL = 1e-4  # each batch's gram diagonal against an fp32 sum of squares (fp32 sums: ~1e-6)


@functools.cache
def _tensor_core_gram_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` on ``dtype`` inputs runs here (torch >= 2.8) *and* sums in
    fp32: probed once per device and dtype against a float64 product."""
    gen = torch.Generator().manual_seed(0)
    probe = (1 + torch.rand(GRAM_PROBE_ROWS, 16, generator=gen)).to(dtype)  # positive: no cancellation
    exact = probe.double().T @ probe.double()
    probe = probe.to(device)
    try:
        with _full_precision_reductions():
            got = torch.mm(probe.T, probe, out_dtype=torch.float32)
    except torch.OutOfMemoryError:
        raise  # a RuntimeError too, but no answer: not cached, asked again next time
    except (TypeError, RuntimeError, NotImplementedError) as err:
        logger.info("Hessian: no fp16-in/fp32-out GEMM here (%s); using fp32 SGEMM", str(err).splitlines()[0])
        return False
    error = float(((got.cpu().double() - exact) / exact).abs().max())
    if error > GRAM_PROBE_RTOL:
        logger.warning(
            "Hessian: the %s GEMM with fp32 output is off by %.3g (relative) on a probe: it does not sum in fp32 "
            "here; using fp32 SGEMM (slower, exact)", dtype, error,
        )  # fmt: skip
        return False
    return True


class _full_precision_reductions:
    """cuBLAS without its reduced-precision (16-bit) split-K reductions, for the duration of a Hessian product."""

    def __enter__(self):
        matmul = torch.backends.cuda.matmul
        self.saved = (matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction)
        matmul.allow_fp16_reduced_precision_reduction = False
        matmul.allow_bf16_reduced_precision_reduction = False

    def __exit__(self, *exc):
        matmul = torch.backends.cuda.matmul
        matmul.allow_fp16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction = self.saved


def _gram_on_tensor_cores(x2d: torch.Tensor) -> torch.Tensor | None:
    """``X^T X`` in fp32 straight from fp16/bf16 activations on CUDA (tensor cores, fp32 output), or None where that
    is not available. The rows go in chunks of ``GRAM_CHUNK_ROWS`` whose products are summed in fp32, and each result's
    diagonal is checked against an fp32 sum of squares; a mismatch switches the path off for the process.
    Why it matters for the pruning time, and what a GPU measured: docs/sparsegpt.md."""
    if x2d.device.type != "cuda" or x2d.dtype not in (torch.float16, torch.bfloat16):
        return None
    if (x2d.device, x2d.dtype) in _DISABLED_GRAM_DEVICES or not _tensor_core_gram_supported(x2d.device, x2d.dtype):
        return None
    with _full_precision_reductions():
        gram = None
        for chunk in x2d.split(GRAM_CHUNK_ROWS):  # short sums on tensor cores, added up in IEEE fp32
            part = torch.mm(chunk.T, chunk, out_dtype=torch.float32)
            gram = part if gram is None else gram.add_(part)
    squares = torch.linalg.vector_norm(x2d, dim=0, dtype=torch.float32).square()
    error = float(((torch.diagonal(gram) - squares).abs() / squares.clamp_min(torch.finfo(torch.float32).tiny)).max())
    if error > GRAM_DIAGONAL_RTOL:
        logger.warning(
            "Hessian: the tensor-core gram's diagonal is off by %.3g (relative) from an fp32 sum of squares; "
            "using fp32 SGEMM from now on", error,
        )  # fmt: skip
        _DISABLED_GRAM_DEVICES.add((x2d.device, x2d.dtype))
        return None
    return gram


def _upper_cholesky_of_inverse(hessian: torch.Tensor) -> torch.Tensor:
    """``U`` upper with ``U^T U = H^-1``: the factor the reference gets from cholesky -> cholesky_inverse ->
    cholesky(upper=True), here from one Cholesky of the reversed ``H`` and one triangular inverse.
    Derivation, flops and accuracy: docs/sparsegpt.md."""
    lower = torch.linalg.cholesky(hessian.flip(0, 1))
    identity = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    return torch.linalg.solve_triangular(lower, identity, upper=False).flip(0, 1)


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
            factor = _upper_cholesky_of_inverse(hessian)
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


class InverseHessian(NamedTuple):
    """The factorisation SparseGPT needs from a Hessian; shareable by every Linear that reads the same input."""

    hinv: torch.Tensor  # fp32 [in, in]: U, the upper Cholesky factor of (H + damp I)^-1 (dead diagonal set to 1)
    dead: torch.Tensor  # bool [in]: input columns never activated (H_jj == 0); their weights are zeroed
    damp: float  # the damping added to the diagonal, after any retries


def _check_hessian(hessian: torch.Tensor, n_cols: int | None = None) -> None:
    if not isinstance(hessian, torch.Tensor) or hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        got = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise ValueError(f"hessian must be a square float32 matrix, got {got}")
    if n_cols is not None and (hessian.shape != (n_cols, n_cols) or hessian.dtype != torch.float32):
        raise ValueError(
            f"hessian must be float32 [{n_cols}, {n_cols}] (in_features), got {tuple(hessian.shape)} {hessian.dtype}"
        )
    if hessian.dtype != torch.float32:
        raise ValueError(f"hessian must be float32, got {hessian.dtype}")


def _check_damping(percdamp: float, max_damp_retries: int) -> None:
    if not (isinstance(percdamp, (int, float)) and math.isfinite(percdamp) and percdamp > 0):
        raise ValueError(f"percdamp must be a positive number, got {percdamp!r}")
    if isinstance(max_damp_retries, bool) or not isinstance(max_damp_retries, int) or max_damp_retries < 0:
        raise ValueError(f"max_damp_retries must be a non-negative int, got {max_damp_retries!r}")


def _check_finite(hessian: torch.Tensor) -> None:
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("hessian contains NaN or inf: the calibration activations overflowed or are corrupt")


def _factorize(hessian: torch.Tensor, percdamp: float, max_damp_retries: int, inplace: bool) -> InverseHessian:
    h_work = hessian if inplace else hessian.clone()
    dead = torch.diagonal(h_work) == 0
    h_work[dead, dead] = 1
    hinv, damp = _inverse_hessian_cholesky(h_work, percdamp, max_damp_retries)  # upper factor U
    return InverseHessian(hinv, dead, damp)


@torch.no_grad()
def sparsegpt_inverse_hessian(
    hessian: torch.Tensor, percdamp: float = 0.01, max_damp_retries: int = 3, inplace: bool = False
) -> InverseHessian:
    """Dead columns, damping and U = upper Cholesky factor of ``(H + damp I)^-1``, for ``prune_sparsegpt_(hinv=)``.

    ``hessian`` is fp32 [in, in] from :func:`accumulate_hessian_`. Columns with ``H_jj == 0`` get a unit
    diagonal (and are reported in ``dead``); ``percdamp`` times the mean diagonal is added, and on a failed
    factorisation that fraction is multiplied by 10, at most ``max_damp_retries`` times, before a ValueError.
    With ``inplace=True`` the hessian's storage is reused as workspace and left modified.
    """
    _check_hessian(hessian)
    _check_damping(percdamp, max_damp_retries)
    _check_finite(hessian)
    return _factorize(hessian, percdamp, max_damp_retries, inplace)


def _check_inverse_hessian(hinv: InverseHessian, weight: torch.Tensor) -> None:
    n_cols = weight.shape[1]
    if not isinstance(hinv, InverseHessian):
        raise ValueError(f"hinv must be an InverseHessian from sparsegpt_inverse_hessian, got {type(hinv).__name__}")
    if hinv.hinv.shape != (n_cols, n_cols) or hinv.hinv.dtype != torch.float32:
        raise ValueError(
            f"hinv.hinv must be float32 [{n_cols}, {n_cols}] (in_features), got {tuple(hinv.hinv.shape)} "
            f"{hinv.hinv.dtype}"
        )
    if hinv.dead.shape != (n_cols,) or hinv.dead.dtype != torch.bool:
        raise ValueError(f"hinv.dead must be bool [{n_cols}], got {tuple(hinv.dead.shape)} {hinv.dead.dtype}")
    if hinv.hinv.device != weight.device or hinv.dead.device != weight.device:
        raise ValueError(f"hinv is on {hinv.hinv.device} but weight is on {weight.device}")


def _smallest_n_per_group(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Column indices (within ``scores`` [O, m]) of each row's ``n`` smallest scores, ties to the lower index."""
    return torch.sort(scores, dim=1, stable=True)[1][:, :n]


@torch.no_grad()
def prune_sparsegpt_(
    weight: torch.Tensor,
    hessian: torch.Tensor | None = None,
    sparsity: float = 0.5,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    max_damp_retries: int = 3,
    inplace_hessian: bool = False,
    *,
    hinv: InverseHessian | None = None,
    backend: str = "torch",
    mask: torch.Tensor | None = None,
    column_saliency: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prune ``weight`` [out, in] in place with SparseGPT; return the bool mask (True = pruned).

    ``hessian`` is fp32 [in, in] from :func:`accumulate_hessian_`; or pass ``hessian=None`` and ``hinv``, the
    factorisation from :func:`sparsegpt_inverse_hessian` (shared by Linears with the same input; then
    ``percdamp``, ``max_damp_retries`` and ``inplace_hessian`` are unused). ``n``/``m`` non-zero selects N:M
    sparsity (``sparsity`` is then ignored; ``blocksize`` must be a multiple of ``m``). ``percdamp`` times the
    mean diagonal is added to the diagonal; on a failed factorisation that fraction is multiplied by 10, at most
    ``max_damp_retries`` times, before a ValueError. Input columns never activated (``H_jj == 0``) are zeroed
    in ``weight`` whether or not the mask selects them. With ``inplace_hessian=True`` the hessian's storage is
    reused as workspace (saves one [in, in] copy) and left modified. ``backend``: ``"torch"`` (the published
    column loop) or ``"triton"`` (one kernel per block of columns; same result within fp32 rounding).

    Wanda's ablations of the selection (locuslab/wanda ``AblateGPT``): ``mask`` bool [out, in] fixes the
    pruned entries in advance (its "seq" methods); ``column_saliency`` fp32 [in] replaces the OBS saliency
    ``w^2 / U_jj^2`` by ``w^2 * column_saliency[j]`` when the mask is chosen during the updates, per block (or
    per N:M group) from the weights updated so far (its "iter" methods: Wanda's ``|w| * sqrt(s_j)`` squared,
    or magnitude with ones; squaring keeps the order).
    """
    check_matrix(weight, "weight")
    n_rows, n_cols = weight.shape
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if (hessian is None) == (hinv is None):
        raise ValueError("pass exactly one of hessian (factorised here) or hinv (from sparsegpt_inverse_hessian)")
    if hessian is not None:
        _check_hessian(hessian, n_cols)
        if hessian.device != weight.device:
            raise ValueError(f"hessian is on {hessian.device} but weight is on {weight.device}")
    else:
        _check_inverse_hessian(hinv, weight)
    structured = bool(n or m)
    if structured:
        check_nm(n, m, n_cols)
    else:
        check_sparsity(sparsity)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if structured and blocksize % m != 0:
        raise ValueError(f"blocksize ({blocksize}) must be a multiple of m ({m}) so N:M groups do not straddle blocks")
    _check_damping(percdamp, max_damp_retries)
    if hessian is not None:
        _check_finite(hessian)
    fixed_mask = mask
    if fixed_mask is not None and (fixed_mask.shape != weight.shape or fixed_mask.dtype != torch.bool):
        raise ValueError(f"mask must be bool {tuple(weight.shape)}, got {fixed_mask.dtype} {tuple(fixed_mask.shape)}")
    if column_saliency is not None and (column_saliency.shape != (n_cols,) or fixed_mask is not None):
        raise ValueError(f"column_saliency must be [{n_cols}], and is for masks chosen during the updates (no mask)")

    mask = torch.zeros(n_rows, n_cols, dtype=torch.bool, device=weight.device)
    if (n == 0) if structured else (sparsity == 0):
        return mask
    if fixed_mask is not None:
        mask.copy_(fixed_mask)

    w_work = weight.detach().to(torch.float32, copy=True)
    if hinv is None:
        hinv = _factorize(hessian, percdamp, max_damp_retries, inplace_hessian)
    w_work[:, hinv.dead] = 0
    selection = _Selection(fixed_mask is not None, column_saliency)
    if backend == "triton" and structured and column_saliency is not None:
        backend = "torch"  # the block kernel chooses N:M groups by the OBS saliency only
    if backend == "torch":
        losses = _prune_columns_torch(w_work, hinv.hinv, mask, sparsity, n, m, blocksize, selection)
    else:
        losses = _prune_blocks_triton(w_work, hinv.hinv, mask, sparsity, n, m, blocksize, selection)

    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("sparsegpt: %dx%d damp %.3g error %.6g", n_rows, n_cols, hinv.damp, float(losses.sum()))
    weight.copy_(w_work)  # fp32 -> weight.dtype, round to nearest like the reference's .to(dtype)
    return mask


class _Selection(NamedTuple):
    """How the mask is chosen: given in advance (``mask`` holds it), or during the updates by the OBS saliency
    ``w^2 / U_jj^2`` (``column_saliency`` None) or by ``w^2 * column_saliency[j]``."""

    fixed: bool = False
    column_saliency: torch.Tensor | None = None

    def saliency(self, w: torch.Tensor, hinv_diag: torch.Tensor, start: int) -> torch.Tensor:
        """Of the columns ``w`` [O, k] starting at input column ``start``; ``hinv_diag`` their ``U_jj``."""
        if self.column_saliency is None:
            return w**2 / hinv_diag.reshape((1, -1)) ** 2  # the published expression, op for op
        return w**2 * self.column_saliency[start : start + w.shape[1]].reshape((1, -1))


def _prune_columns_torch(
    w_work: torch.Tensor,
    hinv: torch.Tensor,
    mask: torch.Tensor,
    sparsity: float,
    n: int,
    m: int,
    blocksize: int,
    selection: _Selection,
) -> torch.Tensor:
    """The published loop, one column at a time; prunes ``w_work`` in place, fills ``mask`` (or applies it, if
    ``selection.fixed``), returns row losses."""
    n_rows, n_cols = w_work.shape
    structured = bool(n or m)
    losses = torch.zeros(n_rows, dtype=torch.float32, device=w_work.device)
    for i1 in range(0, n_cols, blocksize):
        i2 = min(i1 + blocksize, n_cols)
        w_block = w_work[:, i1:i2].clone()
        q_block = torch.zeros_like(w_block)
        err_block = torch.zeros_like(w_block)
        loss_block = torch.zeros_like(w_block)
        hinv_block = hinv[i1:i2, i1:i2]
        hinv_diag = torch.diagonal(hinv_block)
        mask_block = mask[:, i1:i2]  # a view: selections land in ``mask`` directly

        if not structured and not selection.fixed:  # OBS: w^2 / [H^-1]_jj, [H^-1]_jj = U_jj^2; one threshold
            saliency = selection.saliency(w_block, hinv_diag, i1)
            threshold = torch.sort(saliency.flatten())[0][int(saliency.numel() * sparsity)]
            mask_block.copy_(saliency <= threshold)

        for i in range(i2 - i1):
            w = w_block[:, i]
            d = hinv_block[i, i]
            if structured and not selection.fixed and i % m == 0:  # N:M groups from the weights updated so far
                saliency = selection.saliency(w_block[:, i : i + m], hinv_diag[i : i + m], i1 + i)
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
    return losses


def _prune_blocks_triton(
    w_work: torch.Tensor,
    hinv: torch.Tensor,
    mask: torch.Tensor,
    sparsity: float,
    n: int,
    m: int,
    blocksize: int,
    selection: _Selection,
) -> torch.Tensor:
    """One ``sparsegpt_block_`` kernel per block plus one in-place GEMM; same contract as the torch loop (N:M
    chosen during the updates by the OBS saliency only)."""
    ops = kernel_ops("triton")
    sparsegpt_block_ = ops.sparsegpt_block_
    n_rows, n_cols = w_work.shape
    structured = bool(n or m)
    losses = torch.zeros(n_rows, dtype=torch.float32, device=w_work.device)
    for i1 in range(0, n_cols, blocksize):
        i2 = min(i1 + blocksize, n_cols)
        w_block = w_work[:, i1:i2]  # a view: the kernel overwrites it with the pruned block Q
        hinv_block = hinv[i1:i2, i1:i2]
        if selection.fixed:
            err, _ = sparsegpt_block_(w_block, hinv_block, mask[:, i1:i2], 0, 0)
        elif structured:
            err, mask_block = sparsegpt_block_(w_block, hinv_block, None, n, m)
            mask[:, i1:i2] = mask_block
        else:
            # The reference's threshold, sort(saliency.flatten())[int(numel * sparsity)]: a device-wide
            # radix select (torch.kthvalue of one long slice runs in a single thread block on CUDA).
            saliency = selection.saliency(w_block, torch.diagonal(hinv_block), i1)
            k = int(saliency.numel() * sparsity)
            threshold = ops.kth_smallest(saliency, k)
            mask_block = mask[:, i1:i2]
            mask_block.copy_(saliency <= threshold)
            err, _ = sparsegpt_block_(w_block, hinv_block, mask_block, 0, 0)
        if logger.isEnabledFor(logging.DEBUG):
            losses += torch.sum(err * err, 1) / 2  # (w - q)^2 / d^2 = err^2
        if i2 < n_cols:
            w_work[:, i2:].addmm_(err, hinv[i1:i2, i2:], alpha=-1)  # lazy batch update, in place (cuBLAS)
    return losses
