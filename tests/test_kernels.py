"""Every Triton op against its plain-torch reference (wanda_kernels.reference), plus hand-made cases.

Runs under the Triton interpreter on CPU (conftest) and unchanged on a GPU. Masks and scores are
compared exactly (torch.equal): both sides do the same fp32 operations, so any difference is a bug.
Only the fp32 sums of accumulate_sq_norms_ differ in summation order (tolerance justified there).
"""

from __future__ import annotations

import pytest
import torch

import wanda_kernels as wk
import wanda_kernels.nm as nm_module
import wanda_kernels.sq_norms as sq_norms_module
import wanda_kernels.unstructured as unstructured_module
from wanda_kernels import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rows, cols): C not a power of two / not a multiple of the block, one row, C == m, a wide row.
SHAPES = [(13, 100), (1, 8), (4, 4), (7, 1000)]


def _weights(shape, dtype, device, kind="randn", seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "randn":
        w = torch.randn(shape, generator=gen)
    elif kind == "repeated":  # few distinct values: many ties inside rows and groups
        w = torch.randint(-3, 4, shape, generator=gen).float() / 2
    elif kind == "constant":
        w = torch.full(shape, 0.75)
    elif kind == "zeros":
        w = torch.zeros(shape)
    return w.to(dtype=dtype, device=device)


def _act_sq_norms(n_cols, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(n_cols, generator=gen) * 4
    a[::5] = 0.0  # dead input channels happen (padding tokens, ReLU)
    return a.to(device)


# --- accumulate_sq_norms_ ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape", [(3, 50, 200), (1, 7), (129, 64)])
def test_accumulate_sq_norms_matches_reference(dtype, x_shape, device):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(x_shape, generator=gen) * 3).to(dtype=dtype, device=device)
    start = torch.rand(x_shape[-1], generator=gen).to(device)
    got = wk.accumulate_sq_norms_(start.clone(), x)
    want = ref.accumulate_sq_norms_torch(start.clone(), x)
    # Both sum fp32 squares of the same values; only the summation order differs. Relative error of an
    # fp32 sum of R positive terms is bounded by ~R * 2^-24; R <= 150 here, so 1e-5 is ample.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_accumulate_sq_norms_accumulates_in_fp32_not_input_dtype(device):
    # 300^2 = 90000 overflows fp16 (max 65504): a kernel that squares or sums in fp16 returns inf.
    x = torch.full((2, 16, 8), 300.0, dtype=torch.float16, device=device)
    acc = torch.ones(8, device=device)
    wk.accumulate_sq_norms_(acc, x)
    assert torch.equal(acc, torch.full((8,), 1 + 32 * 90000.0, device=device))


def test_accumulate_sq_norms_non_contiguous_and_repeated_calls(device):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(40, 2, 96, generator=gen).to(device=device, dtype=torch.bfloat16)
    x = base[:, 1, :]  # strided rows
    assert not x.is_contiguous()
    acc, acc_ref = torch.zeros(96, device=device), torch.zeros(96, device=device)
    for _ in range(3):
        wk.accumulate_sq_norms_(acc, x)
        ref.accumulate_sq_norms_torch(acc_ref, x)
    torch.testing.assert_close(acc, acc_ref, rtol=1e-5, atol=1e-6)


def test_accumulate_sq_norms_row_splits_are_deterministic(device, monkeypatch):
    # Force the multi-split path (used on GPUs) even under the interpreter.
    monkeypatch.setattr(sq_norms_module, "target_programs", lambda dev: 6)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(300, 48, generator=gen).to(device)
    first = wk.accumulate_sq_norms_(torch.zeros(48, device=device), x)
    second = wk.accumulate_sq_norms_(torch.zeros(48, device=device), x)
    assert torch.equal(first, second)
    want = ref.accumulate_sq_norms_torch(torch.zeros(48, device=device), x)
    torch.testing.assert_close(first, want, rtol=1e-5, atol=0)


# --- wanda_scores -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_wanda_scores_bit_identical_to_reference(dtype, shape, device):
    w = _weights(shape, dtype, device)
    a = _act_sq_norms(shape[1], device)
    got = wk.wanda_scores(w, a)
    assert got.dtype == torch.float32
    assert torch.equal(got, ref.wanda_scores_torch(w, a))


def test_wanda_scores_uses_sqrt_of_act_sq_norms(device):
    # |W| * a would give [4, 3] and prune column 1; |W| * sqrt(a) gives [2, 3] and prunes column 0.
    w = torch.tensor([[1.0, 3.0]], device=device)
    a = torch.tensor([4.0, 1.0], device=device)
    assert torch.equal(wk.wanda_scores(w, a), torch.tensor([[2.0, 3.0]], device=device))
    mask = wk.wanda_prune_(w.clone(), a, 0.5)
    assert mask.tolist() == [[True, False]]


# --- unstructured_mask ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["randn", "repeated", "constant", "zeros"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99])
def test_unstructured_mask_matches_reference(dtype, shape, kind, sparsity, device):
    scores = _weights(shape, dtype, device, kind)
    got = wk.unstructured_mask(scores, sparsity)
    assert torch.equal(got, ref.unstructured_mask_torch(scores, sparsity))
    assert (got.sum(dim=1) == int(shape[1] * sparsity)).all()


def test_unstructured_ties_prune_lower_column_first(device):
    scores = torch.tensor(
        [[5.0, 5.0, 5.0, 5.0, 5.0, 5.0], [2.0, 1.0, 2.0, 1.0, 2.0, 0.0], [-0.0, 0.0, -0.0, 0.0, 1.0, 1.0]],
        device=device,
    )
    mask = wk.unstructured_mask(scores, 0.5)
    assert mask.tolist() == [
        [True, True, True, False, False, False],  # all equal: the first three columns
        [False, True, False, True, False, True],  # 0, then the two 1s
        [True, True, True, False, False, False],  # -0.0 ties with +0.0, in column order
    ]


def test_unstructured_ranks_per_row_not_per_matrix(device):
    # Row 0 is all large, row 1 all small: a per-matrix threshold would prune all of row 1.
    scores = torch.tensor([[10.0, 40.0, 20.0, 30.0], [0.4, 0.1, 0.3, 0.2]], device=device)
    mask = wk.unstructured_mask(scores, 0.5)
    assert mask.tolist() == [[True, False, True, False], [False, True, False, True]]


def test_unstructured_negative_and_non_finite_order_like_torch_sort(device):
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([[nan, -1.0, inf, 3.0, -inf, nan, 0.0, 2.0]], device=device)
    for sparsity in (0.25, 0.5, 0.75, 0.875):
        assert torch.equal(wk.unstructured_mask(scores, sparsity), ref.unstructured_mask_torch(scores, sparsity))
    # NaN ranks above +inf: at 7/8 the first NaN (lower column) is pruned and the second one kept.
    assert wk.unstructured_mask(scores, 0.875).tolist() == [[True, True, True, True, True, False, True, True]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_unstructured_long_rows_chunked_path(dtype, device, monkeypatch):
    # Rows longer than MAX_REGISTER_ROW are re-read in chunks; shrink the limits to test it on CPU.
    monkeypatch.setattr(unstructured_module, "MAX_REGISTER_ROW", 64)
    monkeypatch.setattr(unstructured_module, "CHUNK", 64)
    scores = _weights((6, 300), dtype, device, "repeated")
    scores[1] = 1.0
    scores[2] = torch.randn(300).to(device=device, dtype=dtype)
    for sparsity in (0.3, 0.5, 0.99):
        assert torch.equal(wk.unstructured_mask(scores, sparsity), ref.unstructured_mask_torch(scores, sparsity))
    w = _weights((6, 300), dtype, device)
    a = _act_sq_norms(300, device)
    w_ref = w.clone()
    assert torch.equal(wk.wanda_prune_(w, a, 0.5), ref.wanda_prune_torch(w_ref, a, 0.5))
    assert torch.equal(w, w_ref)


def test_unstructured_non_contiguous_scores(device):
    base = _weights((24, 40), torch.float32, device)
    for scores in (base.t(), base[::2, 1:37]):
        assert not scores.is_contiguous()
        assert torch.equal(wk.unstructured_mask(scores, 0.5), ref.unstructured_mask_torch(scores, 0.5))


# --- nm_mask ------------------------------------------------------------------------------------------


NM_CASES = [  # (shape, n, m) with C a multiple of m; m = 3 exercises the padded (non power of two) group
    (shape, n, m)
    for shape in [(13, 96), (1, 8), (3, 24)]
    for n, m in [(2, 4), (4, 8), (1, 4), (3, 4), (2, 3)]
    if shape[1] % m == 0
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["randn", "repeated", "constant", "zeros"])
@pytest.mark.parametrize("shape,n,m", NM_CASES)
def test_nm_mask_matches_reference(dtype, shape, kind, n, m, device):
    scores = _weights(shape, dtype, device, kind)
    got = wk.nm_mask(scores, n, m)
    assert torch.equal(got, ref.nm_mask_torch(scores, n, m))
    assert (got.reshape(shape[0], -1, m).sum(dim=2) == n).all()


def test_nm_mask_c_equals_m_and_ties(device):
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 1.0, 2.0, 1.0], [0.0, -0.0, 5.0, -2.0]], device=device)
    assert wk.nm_mask(scores, 2, 4).tolist() == [
        [True, True, False, False],
        [False, True, False, True],
        [True, False, False, True],  # -2, then the first of the two zeros
    ]


def test_nm_mask_non_contiguous(device):
    base = _weights((32, 24), torch.float16, device, "repeated")
    scores = base.t()  # [24, 32]
    assert torch.equal(wk.nm_mask(scores, 2, 4), ref.nm_mask_torch(scores, 2, 4))


# --- magnitude_mask -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["randn", "repeated", "zeros"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99])
def test_magnitude_mask_unstructured_matches_reference(dtype, kind, sparsity, device):
    w = _weights((9, 100), dtype, device, kind)
    assert torch.equal(wk.magnitude_mask(w, sparsity), ref.magnitude_mask_torch(w, sparsity))


@pytest.mark.parametrize("dtype", DTYPES)
def test_magnitude_mask_nm_matches_reference(dtype, device):
    w = _weights((9, 96), dtype, device, "repeated")
    assert torch.equal(wk.magnitude_mask(w, 0.5, 2, 4), ref.magnitude_mask_torch(w, 0.5, 2, 4))


def test_magnitude_threshold_is_per_matrix_and_prunes_ties(device):
    w = torch.tensor([[1.0, -2.0, 3.0, 4.0], [0.1, 0.2, -0.3, 0.4]], device=device)
    # sorted |W| = [.1 .2 .3 .4 1 2 3 4]; index int(8 * 0.5) = 4 -> threshold 1.0; |w| <= 1 pruned.
    assert wk.magnitude_mask(w, 0.5).tolist() == [[True, False, False, False], [True, True, True, True]]
    ties = torch.ones(2, 4, device=device)
    assert wk.magnitude_mask(ties, 0.25).all()  # every |w| equals the threshold


def test_magnitude_nan_weights(device):
    w = torch.tensor([[float("nan"), 1.0, 2.0, 3.0]], device=device)
    assert wk.magnitude_mask(w, 0.25).tolist() == [[False, True, True, False]]  # threshold 2.0
    # The threshold index lands on the NaN: the reference's float compare then prunes nothing.
    assert not wk.magnitude_mask(w, 0.75).any()
    assert torch.equal(wk.magnitude_mask(w, 0.75), ref.magnitude_mask_torch(w, 0.75))


# --- wanda_prune_ (fused) -----------------------------------------------------------------------------


FUSED_CASES = [
    (shape, sparsity, n, m)
    for shape in [(13, 100), (1, 8), (5, 1000)]
    for sparsity, n, m in [(0.5, 0, 0), (0.0, 0, 0), (0.99, 0, 0), (0.5, 2, 4), (0.5, 4, 8)]
    if not m or shape[1] % m == 0
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,sparsity,n,m", FUSED_CASES)
def test_wanda_prune_equals_composed_ops(dtype, shape, sparsity, n, m, device):
    w = _weights(shape, dtype, device, "repeated" if shape[0] == 13 else "randn")
    a = _act_sq_norms(shape[1], device)
    w_fused, w_ref = w.clone(), w.clone()
    mask = wk.wanda_prune_(w_fused, a, sparsity, n, m)
    scores = wk.wanda_scores(w, a)
    composed = wk.nm_mask(scores, n, m) if m else wk.unstructured_mask(scores, sparsity)
    assert torch.equal(mask, composed)
    assert torch.equal(mask, ref.wanda_prune_torch(w_ref, a, sparsity, n, m))
    assert torch.equal(w_fused, w_ref)
    assert torch.equal(w_fused, w.masked_fill(mask, 0))


def test_wanda_prune_non_contiguous_weight_in_place(device):
    base = _weights((48, 32), torch.float16, device)
    w = base.t()  # [32, 48] view: zeroing must land in `base`
    a = _act_sq_norms(48, device)
    expected = w.clone()
    mask = ref.wanda_prune_torch(expected, a, 0.5, 2, 4)
    assert torch.equal(wk.wanda_prune_(w, a, 0.5, 2, 4), mask)
    assert torch.equal(base.t(), expected)


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # inf * 0, on purpose
def test_wanda_prune_nan_and_inf_weights(device):
    # Documented behaviour: scores order like torch.sort, NaN above +inf, so non-finite weights are
    # pruned last and stay visible; 0 * inf = NaN scores the same way.
    nan, inf = float("nan"), float("inf")
    w = torch.tensor([[nan, 1.0, inf, 0.5], [2.0, inf, 1.0, nan]], device=device)
    a = torch.tensor([1.0, 1.0, 0.0, 1.0], device=device)
    w_ref = w.clone()
    mask = wk.wanda_prune_(w, a, 0.5)
    assert torch.equal(mask, ref.wanda_prune_torch(w_ref, a, 0.5))
    assert mask.tolist() == [[False, True, False, True], [True, False, True, False]]
    assert torch.equal(w.isnan(), w_ref.isnan()) and torch.equal(w.nan_to_num(), w_ref.nan_to_num())


# --- input validation -----------------------------------------------------------------------------


def test_bad_inputs_raise_value_error_naming_the_argument(device):
    w = torch.randn(4, 8, device=device)
    a = torch.rand(8, device=device)
    cases = [
        (lambda: wk.wanda_scores(w[0], a), "weight"),
        (lambda: wk.wanda_scores(w.long(), a), "weight"),
        (lambda: wk.wanda_scores(w, a[:4]), "act_sq_norms"),
        (lambda: wk.wanda_scores(w, a.half()), "act_sq_norms"),
        (lambda: wk.wanda_prune_(w, torch.full_like(a, float("nan"))), "act_sq_norms"),
        (lambda: wk.wanda_prune_(w, torch.full_like(a, float("inf"))), "act_sq_norms"),
        (lambda: wk.wanda_prune_(w, -a), "act_sq_norms"),
        (lambda: wk.unstructured_mask(w, 1.0), "sparsity"),
        (lambda: wk.unstructured_mask(w, -0.1), "sparsity"),
        (lambda: wk.unstructured_mask(w, float("nan")), "sparsity"),
        (lambda: wk.unstructured_mask(w.unsqueeze(0), 0.5), "scores"),
        (lambda: wk.nm_mask(w, 4, 4), "n < m"),
        (lambda: wk.nm_mask(w, -1, 4), "n < m"),
        (lambda: wk.nm_mask(w, 2, 3), "multiple of m"),
        (lambda: wk.magnitude_mask(w, 0.5, 2, 0), "n < m"),
        (lambda: wk.wanda_prune_(w, a, 0.5, 2, 5), "multiple of m"),
        (lambda: wk.accumulate_sq_norms_(torch.zeros(8, device=device, dtype=torch.float16), w), "acc"),
        (lambda: wk.accumulate_sq_norms_(torch.zeros(7, device=device), w), "x"),
    ]
    for call, needle in cases:
        with pytest.raises(ValueError, match=needle):
            call()


def test_old_triton_interpreter_with_new_numpy_is_named_not_crashed(monkeypatch):
    # triton <= 3.6's interpreter calls int() on shape-(1,) arrays for loop bounds; numpy >= 2.4 refuses.
    import numpy as np
    import triton

    from wanda_kernels import _runtime

    try:
        int(np.zeros(1, dtype=np.int32))
        numpy_refuses = False
    except TypeError:
        numpy_refuses = True
    for version, broken in (("3.6.0", numpy_refuses), ("3.7.0", False), ("3.10.1", False)):
        monkeypatch.setattr(triton, "__version__", version)
        _runtime.interpreter_incompatibility.cache_clear()
        problem = _runtime.interpreter_incompatibility()
        assert (problem is not None) == broken, version
        if broken:
            assert "numpy<2.4" in problem and "triton>=3.7" in problem
    _runtime.interpreter_incompatibility.cache_clear()
    monkeypatch.undo()

    monkeypatch.setattr(_runtime, "interpreting", lambda: True)
    monkeypatch.setattr(_runtime, "interpreter_incompatibility", lambda: "install 'numpy<2.4'")
    with pytest.raises(ImportError, match="numpy<2.4"):
        wk.accumulate_sq_norms_(torch.zeros(8), torch.ones(2, 8))


@pytest.mark.parametrize("tile", [pytest.param(t, id="R{}-G{}-w{}".format(*t)) for t in nm_module._GPU_TILES])
def test_nm_every_gpu_tile_matches_reference(tile, device, monkeypatch):
    # The autotuner may pick any of these on a GPU; the tests otherwise run one fixed tile. 37 rows and
    # 30 groups of 4 divide none of them, so every tile has ragged edges in both directions.
    import triton

    block_r, block_g, warps = tile
    config = triton.Config({"BLOCK_R": block_r, "BLOCK_G": block_g}, num_warps=warps)
    single = triton.autotune([config], key=["n_rows"])(nm_module._nm_select_kernel)
    monkeypatch.setattr(nm_module, "_nm_select_tuned", single)
    for dtype in (torch.float32, torch.float16):
        scores = _weights((37, 120), dtype, device, "repeated")
        assert torch.equal(wk.nm_mask(scores, 2, 4), ref.nm_mask_torch(scores, 2, 4))
        weight = _weights((37, 120), dtype, device, "randn")
        norms = torch.rand(120, device=device) + 0.1
        pruned, want = weight.clone(), weight.clone()
        mask = wk.wanda_prune_(pruned, norms, 0.5, 2, 4)
        want_mask = ref.wanda_prune_torch(want, norms, 0.5, 2, 4)
        assert torch.equal(mask, want_mask) and torch.equal(pruned, want)


def test_unstructured_warp_candidates_follow_the_row_block():
    import triton

    configs = [triton.Config({}, num_warps=w) for w in (4, 8, 16, 32)]

    def warps(block_c):
        return [c.num_warps for c in unstructured_module._prune_warps(configs, {}, BLOCK_C=block_c)]

    assert warps(32768) == [8, 16, 32]  # 128, 64 and 32 keys per thread; 4 warps (256 keys) spill
    assert warps(16384) == [4, 8, 16, 32]
    assert warps(8192) == [4, 8, 16]
    assert warps(2048) == [4]
    assert warps(256) == [4]  # short rows: the fewest warps offered
