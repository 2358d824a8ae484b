"""SparseGPT's Triton block path against the plain-torch published loop.

Layer 1: ``wanda_kernels.sparsegpt_block_`` against its reference ``sparsegpt_block_torch`` (one block: masks
equal, Q and err equal within fp32 rounding, N:M ties to the lower column). Layer 2: ``prune_sparsegpt_`` with
``backend="triton"`` against ``backend="torch"`` (the code verified against IST-DASLab/sparsegpt): relative
Frobenius error of the pruned weights < 1e-5, identical masks; and the shared factorisation
(``sparsegpt_inverse_hessian`` + ``hinv=``) against the per-Linear one. Matrices stay small: under the
interpreter every column of a block is a few numpy ops on the whole row tile.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from pruning.methods import (
    InverseHessian,
    accumulate_hessian_,
    kernel_ops,
    prune_sparsegpt_,
    sparsegpt_inverse_hessian,
)
from wanda_kernels import reference, sparsegpt_block_
from wanda_kernels.reference import sparsegpt_block_torch

PATTERNS = [
    pytest.param(0.5, 0, 0, id="unstructured50"),
    pytest.param(0.0, 2, 4, id="2:4"),
    pytest.param(0.0, 4, 8, id="4:8"),
]
REL_FRO_TOL = 1e-5  # pruned weights, Triton path vs torch path: fp32 rounding of the lazy GEMM only


def _hessian(seed: int, n_cols: int, device: torch.device, dead: tuple[int, ...] = ()) -> torch.Tensor:
    """``2/N X^T X`` of heavy-tailed, correlated activations (so OBS updates matter), some channels dead."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(1.5 * torch.randn(n_cols, generator=gen))
    mixing = torch.eye(n_cols) + 0.3 * torch.randn(n_cols, n_cols, generator=gen) / math.sqrt(n_cols)
    x = (torch.randn(8, 32, n_cols, generator=gen) @ mixing) * scale
    x[..., list(dead)] = 0
    hessian = torch.zeros(n_cols, n_cols)
    accumulate_hessian_(hessian, x, 0)
    return hessian.to(device)


def _weight(seed: int, n_rows: int, n_cols: int, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_rows, n_cols, generator=gen).to(device=device, dtype=dtype)


def _rel_fro(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return float(torch.linalg.norm(actual.double() - expected) / torch.linalg.norm(expected))


def _block_inputs(seed: int, n_rows: int, width: int, pattern: tuple[float, int, int], device: torch.device):
    """A block of a real problem: U's diagonal tile from a factorisation, the unstructured mask as the method
    chooses it (one threshold over the block, ``<=``), and a [n_rows, width] view inside a wider matrix."""
    sparsity, n, m = pattern
    hinv_block = sparsegpt_inverse_hessian(_hessian(seed, width, device)).hinv
    wide = _weight(seed + 1, n_rows, width + 16, device)
    mask = None
    if not n:
        block = wide[:, 8 : 8 + width]
        saliency = block**2 / torch.diagonal(hinv_block) ** 2
        mask = saliency <= torch.sort(saliency.flatten())[0][int(saliency.numel() * sparsity)]
    return wide, hinv_block, mask, n, m


# ----------------------------------------------------------------------------------------------- block op


def test_kernel_ops_route_the_block_op() -> None:
    assert kernel_ops("torch").sparsegpt_block_ is reference.sparsegpt_block_torch
    assert kernel_ops("triton").sparsegpt_block_ is sparsegpt_block_


@pytest.mark.parametrize("width", [128, 72])
@pytest.mark.parametrize("sparsity,n,m", PATTERNS)
def test_block_op_matches_reference(sparsity: float, n: int, m: int, width: int, device: torch.device) -> None:
    n_rows = 40  # not a power of two: the row tile has padding rows
    wide, hinv_block, mask, n, m = _block_inputs(20, n_rows, width, (sparsity, n, m), device)
    wide_ref = wide.clone()
    mask_in = None if mask is None else mask.clone()
    err, mask_out = sparsegpt_block_(wide[:, 8 : 8 + width], hinv_block, mask, n, m)
    err_ref, mask_ref = sparsegpt_block_torch(wide_ref[:, 8 : 8 + width], hinv_block, mask_in, n, m)

    assert torch.equal(mask_out, mask_ref)
    if mask is not None:
        assert mask_out is mask  # the caller's selection, used as given
    else:
        per_group = mask_out.reshape(n_rows, -1, m).sum(dim=2)
        assert torch.equal(per_group, torch.full_like(per_group, n))
    assert err.shape == (n_rows, width) and err.dtype == torch.float32
    q, q_ref = wide[:, 8 : 8 + width], wide_ref[:, 8 : 8 + width]
    assert bool((q[mask_out] == 0).all())
    assert torch.equal(wide[:, :8], wide_ref[:, :8]) and torch.equal(wide[:, 8 + width :], wide_ref[:, 8 + width :])
    # Same operations in the same order (IEEE divisions, no FMA): measured bit-identical under the interpreter.
    assert _rel_fro(q, q_ref) < 1e-6
    assert _rel_fro(err, err_ref) < 1e-6


def test_block_op_nm_ties_go_to_the_lower_column(device: torch.device) -> None:
    # U = I: no cross-column updates, so the saliencies w^2 are exact and tie exactly.
    weight = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0],  # all equal: the first two of each group
            [2.0, -1.0, 1.0, -2.0, 3.0, 3.0, -3.0, 1.0],  # (-1)^2 == 1^2; 9 == 9 == 9 after the 1
            [0.0, -0.0, 0.0, 7.0, -4.0, 4.0, 0.5, -0.5],  # -0.0 ties with +0.0
        ],
        device=device,
    )
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 1, 1, 0, 0],
            [0, 1, 1, 0, 1, 0, 0, 1],
            [1, 1, 0, 0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
        device=device,
    )
    eye = torch.eye(8, device=device)
    q, q_ref = weight.clone(), weight.clone()
    err, mask = sparsegpt_block_(q, eye, None, 2, 4)
    err_ref, mask_ref = sparsegpt_block_torch(q_ref, eye, None, 2, 4)
    assert torch.equal(mask, expected) and torch.equal(mask_ref, expected)
    assert torch.equal(q, weight.masked_fill(expected, 0)) and torch.equal(q, q_ref)
    assert torch.equal(err, weight.masked_fill(~expected, 0)) and torch.equal(err, err_ref)


def test_block_op_empty_and_width_limit(device: torch.device) -> None:
    err, mask = sparsegpt_block_(torch.zeros(0, 32, device=device), torch.eye(32, device=device), None, 2, 4)
    assert err.shape == (0, 32) and mask.shape == (0, 32)
    with pytest.raises(ValueError, match="exceeds 512"):
        sparsegpt_block_(torch.zeros(2, 520, device=device), torch.eye(520, device=device), None, 2, 4)


def _bad_block_args(device: torch.device):
    w, h = torch.zeros(4, 8, device=device), torch.eye(8, device=device)
    mask = torch.zeros(4, 8, dtype=torch.bool, device=device)
    return [
        ((w.half(), h, None, 2, 4), "w_block"),
        ((w[0], h, None, 2, 4), "w_block"),
        ((w, h[:4], None, 2, 4), "hinv_block"),
        ((w, h.double(), None, 2, 4), "hinv_block"),
        ((w, h, mask.float(), 0, 0), "mask"),
        ((w, h, mask[:2], 0, 0), "mask"),
        ((w, h, mask, 2, 4), "not both"),
        ((w, h, None, 0, 0), "n and m"),
        ((w, h, None, 4, 4), "0 <= n < m"),
        ((w, h, None, 2, 3), "multiple of m"),
    ]


@pytest.mark.parametrize("op", [sparsegpt_block_, sparsegpt_block_torch], ids=["triton", "reference"])
def test_block_op_rejects_bad_arguments(op, device: torch.device) -> None:
    for args, message in _bad_block_args(device):
        with pytest.raises(ValueError, match=message):
            op(*args)


# ----------------------------------------------------------------------------------------------- method


def _prune_both(weight, hessian, sparsity, n, m, blocksize):
    w_torch, w_triton = weight.clone(), weight.clone()
    mask_torch = prune_sparsegpt_(w_torch, hessian, sparsity, n, m, blocksize, backend="torch")
    mask_triton = prune_sparsegpt_(w_triton, hessian, sparsity, n, m, blocksize, backend="triton")
    return w_torch, mask_torch, w_triton, mask_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("blocksize", [128, 32])
@pytest.mark.parametrize("sparsity,n,m", PATTERNS)
def test_triton_backend_matches_torch(
    sparsity: float, n: int, m: int, blocksize: int, dtype: torch.dtype, device: torch.device
) -> None:
    n_rows, n_cols, dead = 48, 192, (5, 130)  # 192 = 128 + a partial block of 64
    hessian = _hessian(21, n_cols, device, dead)
    hessian_before = hessian.clone()
    weight = _weight(22, n_rows, n_cols, device, dtype)
    w_torch, mask_torch, w_triton, mask_triton = _prune_both(weight, hessian, sparsity, n, m, blocksize)

    assert torch.equal(hessian, hessian_before)
    assert w_triton.dtype == dtype
    # Random data has no exact saliency ties; the lazy-GEMM rounding (~1e-7) moves no near-tie here.
    assert torch.equal(mask_triton, mask_torch)
    assert _rel_fro(w_triton, w_torch) < REL_FRO_TOL
    assert bool((w_triton[mask_triton] == 0).all()) and bool((w_triton[:, list(dead)] == 0).all())


@pytest.mark.parametrize("sparsity,n,m", PATTERNS)
def test_triton_backend_exact_ties(sparsity: float, n: int, m: int, device: torch.device) -> None:
    # A diagonal Hessian makes U diagonal: no OBS updates, so many saliencies tie exactly. Unstructured prunes
    # every tie at the block threshold (``<=``); N:M prunes the lower columns of a tie.
    n_rows, n_cols = 16, 64
    hessian = torch.diag(torch.tensor([1.0, 4.0] * (n_cols // 2), device=device))
    gen = torch.Generator().manual_seed(23)
    weight = (torch.randint(-3, 4, (n_rows, n_cols), generator=gen).float() / 2).to(device)
    w_torch, mask_torch, w_triton, mask_triton = _prune_both(weight, hessian, sparsity, n, m, 32)
    assert torch.equal(mask_triton, mask_torch)
    assert torch.equal(w_triton, w_torch)
    assert torch.equal(w_torch, weight.masked_fill(mask_torch, 0))


# ----------------------------------------------------------------------------------------------- shared factor


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("sparsity,n,m", PATTERNS[:2])
def test_shared_inverse_hessian_equals_per_linear(sparsity: float, n: int, m: int, backend: str, device) -> None:
    n_cols = 128
    hessian = _hessian(24, n_cols, device, dead=(3,))
    hessian_before = hessian.clone()
    inv = sparsegpt_inverse_hessian(hessian)
    assert isinstance(inv, InverseHessian) and bool(inv.dead[3]) and int(inv.dead.sum()) == 1
    hinv_before = inv.hinv.clone()
    for seed, n_rows in [(25, 16), (26, 16), (27, 24)]:  # q, k, v of one attention block
        weight = _weight(seed, n_rows, n_cols, device)
        per_linear, shared = weight.clone(), weight.clone()
        mask = prune_sparsegpt_(per_linear, hessian, sparsity, n, m, 64, backend=backend)
        mask_shared = prune_sparsegpt_(shared, None, sparsity, n, m, 64, hinv=inv, backend=backend)
        assert torch.equal(mask_shared, mask)
        assert torch.equal(shared, per_linear)
    assert torch.equal(hessian, hessian_before) and torch.equal(inv.hinv, hinv_before)

    in_place = hessian.clone()
    inv_in_place = sparsegpt_inverse_hessian(in_place, inplace=True)
    assert torch.equal(inv_in_place.hinv, inv.hinv) and inv_in_place.damp == inv.damp
    assert not torch.equal(in_place, hessian)  # its storage was the workspace


def test_shared_factor_keeps_the_damping_retry(caplog: pytest.LogCaptureFixture, device: torch.device) -> None:
    n_cols = 64
    gen = torch.Generator().manual_seed(12)
    q, _ = torch.linalg.qr(torch.randn(n_cols, n_cols, generator=gen, dtype=torch.float64))
    eigs = torch.ones(n_cols, dtype=torch.float64)
    eigs[0] = -0.05  # mean diagonal ~0.98: 1% damping fails, 10% works
    hessian = ((q * eigs) @ q.T).float().to(device)
    with caplog.at_level(logging.WARNING, logger="pruning.methods.sparsegpt"):
        inv = sparsegpt_inverse_hessian(hessian, percdamp=0.01)
    assert len(caplog.records) == 1 and "retrying" in caplog.records[0].getMessage()
    assert inv.damp == pytest.approx(0.1 * float(torch.diagonal(hessian).mean()), rel=1e-6)
    weight = _weight(28, 16, n_cols, device)
    direct, shared = weight.clone(), weight.clone()
    mask = prune_sparsegpt_(direct, hessian, 0.5, blocksize=32, percdamp=0.1, backend="triton")
    assert torch.equal(prune_sparsegpt_(shared, None, 0.5, blocksize=32, hinv=inv, backend="triton"), mask)
    assert torch.equal(shared, direct)
    with pytest.raises(ValueError, match="not positive definite"):
        sparsegpt_inverse_hessian(hessian * 0 - torch.eye(n_cols, device=device), max_damp_retries=1)


def test_method_rejects_bad_arguments(device: torch.device) -> None:
    weight, hessian = _weight(29, 8, 64, device), torch.eye(64, device=device)
    inv = sparsegpt_inverse_hessian(hessian)
    with pytest.raises(ValueError, match="backend"):
        prune_sparsegpt_(weight, hessian, 0.5, backend="cuda")
    with pytest.raises(ValueError, match="exactly one of hessian"):
        prune_sparsegpt_(weight, hessian, 0.5, hinv=inv)
    with pytest.raises(ValueError, match="exactly one of hessian"):
        prune_sparsegpt_(weight, None, 0.5)
    with pytest.raises(ValueError, match="InverseHessian"):
        prune_sparsegpt_(weight, None, 0.5, hinv=tuple(inv))
    small = sparsegpt_inverse_hessian(torch.eye(32, device=device))
    with pytest.raises(ValueError, match=r"hinv.hinv must be float32 \[64, 64\]"):
        prune_sparsegpt_(weight, None, 0.5, hinv=small)
    with pytest.raises(ValueError, match="hinv.dead"):
        prune_sparsegpt_(weight, None, 0.5, hinv=inv._replace(dead=inv.dead.float()))
    with pytest.raises(ValueError, match="square"):
        sparsegpt_inverse_hessian(torch.zeros(4, 8, device=device))
    with pytest.raises(ValueError, match="float32"):
        sparsegpt_inverse_hessian(hessian.double())
    with pytest.raises(ValueError, match="NaN or inf"):
        sparsegpt_inverse_hessian(torch.full((8, 8), float("nan"), device=device))
    with pytest.raises(ValueError, match="percdamp"):
        sparsegpt_inverse_hessian(hessian, percdamp=0)
    before = weight.clone()  # sparsity 0: nothing pruned, the weight untouched, on either path
    assert not prune_sparsegpt_(weight, None, 0.0, hinv=inv, backend="triton").any()
    assert torch.equal(weight, before)


@pytest.mark.gpu
@pytest.mark.parametrize("sparsity,n,m", PATTERNS[:2])
def test_triton_backend_matches_torch_at_model_scale(sparsity: float, n: int, m: int) -> None:
    n_rows, n_cols = 1024, 2048
    device = torch.device("cuda")
    hessian = _hessian(30, n_cols, device, dead=(7,))
    weight = _weight(31, n_rows, n_cols, device, torch.float16)
    w_torch, mask_torch, w_triton, mask_triton = _prune_both(weight, hessian, sparsity, n, m, 128)
    mismatch = float((mask_triton != mask_torch).float().mean())
    assert mismatch < 1e-4  # near-ties may move with the GEMM's rounding; exact ones cannot
    assert _rel_fro(w_triton, w_torch) < REL_FRO_TOL
