"""Argument checks shared by the ops and their references: each raises a ValueError naming the argument."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_matrix(t: torch.Tensor, name: str, float64: bool = False) -> None:
    """A 2-D float tensor; ``float64`` also admits double (the optimization methods' exactness tests)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [out_features, in_features] tensor, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES and not (float64 and t.dtype == torch.float64):
        also = " (or float64)" if float64 else ""
        raise ValueError(f"{name} must be float16, bfloat16 or float32{also}, got {t.dtype}")


def check_act_sq_norms(act_sq_norms: torch.Tensor, weight: torch.Tensor) -> None:
    if not isinstance(act_sq_norms, torch.Tensor):
        raise ValueError(f"act_sq_norms must be a torch.Tensor, got {type(act_sq_norms).__name__}")
    if act_sq_norms.ndim != 1 or act_sq_norms.shape[0] != weight.shape[1]:
        raise ValueError(
            f"act_sq_norms must have shape [in_features] = [{weight.shape[1]}], got {tuple(act_sq_norms.shape)}"
        )
    if act_sq_norms.dtype != torch.float32:
        raise ValueError(f"act_sq_norms must be float32 (accumulate in fp32), got {act_sq_norms.dtype}")
    if act_sq_norms.device != weight.device:
        raise ValueError(f"act_sq_norms is on {act_sq_norms.device} but weight is on {weight.device}")
    # One host sync on a [C] vector: cheap next to the [O, C] pass, and a NaN here would silently
    # turn every score of a column into NaN.
    if not bool(torch.isfinite(act_sq_norms).all()):
        raise ValueError("act_sq_norms contains NaN or inf: the calibration activations overflowed or are corrupt")
    if bool((act_sq_norms < 0).any()):
        raise ValueError("act_sq_norms must be non-negative (they are sums of squares)")


def check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not math.isfinite(sparsity):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


def check_nm(n: int, m: int, n_cols: int) -> None:
    if not isinstance(n, int) or not isinstance(m, int):
        raise ValueError(f"n and m must be ints, got n={n!r}, m={m!r}")
    if n < 0 or m <= 0 or n >= m:
        raise ValueError(f"N:M sparsity needs 0 <= n < m, got n={n}, m={m}")
    if n_cols % m != 0:
        raise ValueError(f"in_features ({n_cols}) must be a multiple of m ({m}) for {n}:{m} sparsity")


def check_sparsegpt_block(
    w_block: torch.Tensor, hinv_block: torch.Tensor, mask: torch.Tensor | None, n: int, m: int
) -> None:
    """Arguments of ``sparsegpt_block_``: fp32 [O, B] block, fp32 [B, B] factor, and a mask xor N:M."""
    if not isinstance(w_block, torch.Tensor) or w_block.ndim != 2 or w_block.dtype != torch.float32:
        got = f"shape {tuple(w_block.shape)} {w_block.dtype}" if isinstance(w_block, torch.Tensor) else type(w_block)
        raise ValueError(f"w_block must be a 2-D float32 tensor [rows, block] (the fp32 working copy), got {got}")
    width = w_block.shape[1]
    if not isinstance(hinv_block, torch.Tensor) or hinv_block.shape != (width, width):
        got = tuple(hinv_block.shape) if isinstance(hinv_block, torch.Tensor) else type(hinv_block)
        raise ValueError(f"hinv_block must be [{width}, {width}] (w_block's width), got {got}")
    if hinv_block.dtype != torch.float32:
        raise ValueError(f"hinv_block must be float32, got {hinv_block.dtype}")
    if hinv_block.device != w_block.device:
        raise ValueError(f"hinv_block is on {hinv_block.device} but w_block is on {w_block.device}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != w_block.shape:
            got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask)
            raise ValueError(f"mask must be a bool tensor of w_block's shape {tuple(w_block.shape)}, got {got}")
        if mask.device != w_block.device:
            raise ValueError(f"mask is on {mask.device} but w_block is on {w_block.device}")
        if n or m:
            raise ValueError(f"pass either mask (unstructured) or n and m (N:M), not both; got n={n}, m={m}")
        return
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, int) or not isinstance(m, int):
        raise ValueError(f"n and m must be ints, got n={n!r}, m={m!r}")
    if m <= 0:
        raise ValueError(f"mask is None, so n and m (N:M) are required; got n={n}, m={m}")
    if not 0 <= n < m:
        raise ValueError(f"N:M sparsity needs 0 <= n < m, got n={n}, m={m}")
    if width % m:
        raise ValueError(f"w_block width ({width}) must be a multiple of m ({m}) so N:M groups do not straddle blocks")
