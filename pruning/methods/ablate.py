"""Wanda's ablations of the weight update (locuslab/wanda ``prune_ablate`` / ``AblateGPT``): SparseGPT's OBS
updates with the mask chosen by Wanda's or the magnitude metric instead of the OBS saliency.

* ``ablate_{wanda,mag}_seq``: the mask is chosen once, from the weights before any update (Wanda's per-row
  ranking of ``|W| * sqrt(s_j)``, or the magnitude baseline's per-matrix threshold; N:M per group); the OBS
  updates run with it.
* ``ablate_{wanda,mag}_iter``: the mask is chosen during the updates, per block of 128 columns (one threshold
  over the block) or per N:M group, from the weights updated so far, by ``|w| * sqrt(s_j)`` or ``|w|``.
``s_j`` is ``AblateGPT.add_batch``'s ``scaler_row``, ``s_j = 2/N * sum_b ||x_bj||^2 / b`` (sample ``b`` 1-based,
in calibration order), reproduced up to the factor ``2/N``, which changes no ranking. Why 1/b: docs/pruning.md.
"""

from __future__ import annotations

import torch

from pruning.methods.ops import kernel_ops
from pruning.methods.sparsegpt import InverseHessian, prune_sparsegpt_

ABLATE_METHODS: tuple[str, ...] = ("ablate_mag_seq", "ablate_wanda_seq", "ablate_mag_iter", "ablate_wanda_iter")


@torch.no_grad()
def accumulate_ablate_scaler_(scaler: torch.Tensor, x: torch.Tensor, n_seen: int) -> None:
    """``scaler`` fp32 [C] += sum over the samples of ``x`` [S, T, C] (or one sample [T, C]) of
    ``||x_b[:, j]||^2 / b``, where ``b = n_seen + 1, n_seen + 2, ...`` numbers the samples from the first."""
    n_new = 1 if x.ndim == 2 else x.shape[0]
    if x.shape[-1] != scaler.shape[0]:
        raise ValueError(f"x has {x.shape[-1]} features, scaler {scaler.shape[0]}")
    samples = x.reshape(n_new, -1, x.shape[-1]).float()
    per_sample = (samples * samples).sum(dim=1)  # [S, C]
    numbers = torch.arange(n_seen + 1, n_seen + n_new + 1, device=x.device, dtype=torch.float32)
    scaler += (per_sample / numbers[:, None]).sum(dim=0)


@torch.no_grad()
def prune_ablate_(
    weight: torch.Tensor,
    method: str,
    hinv: InverseHessian,
    scaler: torch.Tensor | None,
    sparsity: float,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    backend: str = "torch",
) -> torch.Tensor:
    """Prune ``weight`` [out, in] in place by ``method`` (one of :data:`ABLATE_METHODS`); return the mask.
    ``hinv``: the layer input's factorised Hessian (``sparsegpt_inverse_hessian``); ``scaler``: fp32 [in] from
    :func:`accumulate_ablate_scaler_` (the Wanda variants only)."""
    if method not in ABLATE_METHODS:
        raise ValueError(f"method must be one of {', '.join(ABLATE_METHODS)}, got {method!r}")
    wanda = "wanda" in method
    if wanda and scaler is None:
        raise ValueError(f"{method} needs the activation scaler (accumulate_ablate_scaler_)")
    ops = kernel_ops(backend)
    options = dict(hinv=hinv, backend=backend)
    if method.endswith("_seq"):
        if wanda:
            scores = ops.wanda_scores(weight, scaler)
            mask = ops.nm_mask(scores, n, m) if m else ops.unstructured_mask(scores, sparsity)
        else:
            mask = ops.magnitude_mask(weight, sparsity, n, m)
        options["mask"] = mask
    else:
        options["column_saliency"] = scaler if wanda else torch.ones_like(weight[0], dtype=torch.float32)
    return prune_sparsegpt_(weight, None, sparsity, n, m, blocksize, **options)
