"""RIA scores, DSnoT moments and DSnoT swap loops: each Triton op against its reference (wanda_kernels.reference_dsnot).

Runs under the Triton interpreter on CPU (conftest) and unchanged on a GPU. The swap loops are compared exactly
(torch.equal on the mask and the N:M prune_metric): both sides do the same fp32 adds in the same order. RIA and
the moments differ from torch only in summation order (tolerances justified at each test).
"""

from __future__ import annotations

import pytest
import torch

import wanda_kernels as wk
import wanda_kernels.moments as moments_module
import wanda_kernels.ria as ria_module
from wanda_kernels import reference_dsnot as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --- ria_scores -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 300), (1, 7), (70, 600), (5, 1), (9, 2100)])  # 2100: several column tiles
def test_ria_scores_match_reference(dtype, shape, device):
    w = torch.randn(shape, generator=_gen(0)).to(dtype=dtype, device=device)
    norms = (torch.rand(shape[1], generator=_gen(1)) * 4).to(device)
    norms[::7] = 0.0  # dead channels: score 0
    for a in (0.5, 1.0):
        got, want = wk.ria_scores(w, norms, a), ref.ria_scores_torch(w, norms, a)
        assert got.dtype == torch.float32 and got.shape == shape and got.is_contiguous()
        # Same values summed in another order: each fp32 sum of <= 600 positive terms is within ~1e-6 relative.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide")  # 0 / 0 -> NaN, wanted
@pytest.mark.parametrize("a", [0.5, 1.0, 0.0, 2.0])
def test_ria_scores_exact_where_sums_are_exact(a, device):
    """Small integers sum exactly in any order: then every score is torch's bit for bit (divisions rounded
    as torch rounds them), including NaN for an all-zero row and column."""
    w = torch.randint(-4, 5, (45, 130), generator=_gen(2)).float()
    w[3] = 0.0
    w[:, 17] = 0.0
    w = w.to(device)
    norms = torch.randint(0, 9, (130,), generator=_gen(3)).float().to(device)
    got, want = wk.ria_scores(w, norms, a), ref.ria_scores_torch(w, norms, a)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert got[3].isnan().all() and got[:, 17].isnan().all()


def test_ria_scores_strided_and_row_splits(device, monkeypatch):
    """A transposed (column-major) weight, and column sums split over rows (partials added in fixed order)."""
    monkeypatch.setattr(ria_module, "target_programs", lambda dev: 5)
    base = torch.randint(-3, 4, (200, 150), generator=_gen(4)).to(torch.float16).to(device)
    w = base.t()  # [150, 200], stride (1, 150)
    norms = torch.rand(200, generator=_gen(5)).to(device) + 0.5
    got = wk.ria_scores(w, norms)
    torch.testing.assert_close(got, ref.ria_scores_torch(w, norms), rtol=0, atol=0)
    assert torch.equal(got, wk.ria_scores(w, norms))  # deterministic


def test_ria_scores_bad_arguments_raise(device):
    w = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="weight"):
        wk.ria_scores(w[0], torch.ones(8, device=device))
    with pytest.raises(ValueError, match="weight"):
        wk.ria_scores(w.to(torch.int32), torch.ones(8, device=device))
    with pytest.raises(ValueError, match="act_sq_norms"):
        wk.ria_scores(w, torch.ones(7, device=device))
    with pytest.raises(ValueError, match="act_sq_norms"):
        wk.ria_scores(w, torch.ones(8, device=device, dtype=torch.float16))


# --- accumulate_moments_ ----------------------------------------------------------------------------------
def _moments(op, x, samples, device, seed=7):
    start = torch.rand(3, x.shape[-1], generator=_gen(seed)).to(device)
    accs = [start[i].clone() for i in range(3)]
    op(*accs, x, samples)
    return accs


def _assert_moments_close(got, want, x):
    # fp32 sums of the same terms in another order: error ~ rows * 2^-24 of the sum of |terms|; scale the
    # tolerance by that magnitude (a sum of signed x can be far smaller than its terms).
    xs = x.reshape(-1, x.shape[-1]).float()
    scales = (xs.pow(2).sum(0), xs.abs().sum(0), xs.pow(2).sum(0) + xs.abs().sum(0) ** 2 / xs.shape[0])
    for g, w, s in zip(got, want, scales, strict=True):
        assert ((g - w).abs() <= 1e-5 * (w.abs() + s) + 1e-5).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "x_shape,samples", [((3, 50, 200), 3), ((1, 7), 1), ((4, 33, 600), 2), ((6, 5), 6), ((2, 3, 1100), 2)]
)
def test_accumulate_moments_match_reference(dtype, x_shape, samples, device):
    x = (torch.randn(x_shape, generator=_gen(0)) * 3 + torch.randn(x_shape[-1], generator=_gen(1)) * 5).to(
        dtype=dtype, device=device
    )
    got = _moments(wk.accumulate_moments_, x, samples, device)
    want = _moments(ref.accumulate_moments_torch, x, samples, device)
    _assert_moments_close(got, want, x)


def test_accumulate_moments_strided_views_and_two_pass_accuracy(device):
    """A strided view flattening to [R, C] without a copy; a large common offset (two passes: no cancellation)."""
    big = (torch.randn(4, 40, 2, 96, generator=_gen(2)) * 0.01 + 1000.0).to(device)
    x = big[:, :, 1, :]  # [4, 40, 96], rows 192 elements apart
    assert x.reshape(-1, 96).data_ptr() == x.data_ptr()
    got = _moments(wk.accumulate_moments_, x, 4, device)
    want = _moments(ref.accumulate_moments_torch, x, 4, device)
    _assert_moments_close(got, want, x)
    sq_deviations = torch.zeros(96, device=device)
    wk.accumulate_moments_(torch.zeros(96, device=device), torch.zeros(96, device=device), sq_deviations, x, 4)
    true_dev = (x.double() - x.double().mean(dim=1, keepdim=True)).pow(2).sum((0, 1))  # ~0.016 per channel
    # One pass (sum x**2 - (sum x)**2 / T in fp32, terms ~4e7) would be off by more than the whole deviation.
    assert torch.allclose(sq_deviations.double(), true_dev, rtol=1e-3)


def test_accumulate_moments_row_splits_are_deterministic(device, monkeypatch):
    """Splitting each sample's rows (sums, host means, then deviations) gives the same moments, repeatably."""
    x = (torch.randn(2, 300, 40, generator=_gen(3)) + 2.0).to(device)
    want = _moments(ref.accumulate_moments_torch, x, 2, device)
    monkeypatch.setattr(moments_module, "target_programs", lambda dev: 8)  # 2 samples x 3 splits of 128 rows
    got = _moments(wk.accumulate_moments_, x, 2, device)
    _assert_moments_close(got, want, x)
    assert all(torch.equal(a, b) for a, b in zip(got, _moments(wk.accumulate_moments_, x, 2, device), strict=True))


def test_accumulate_moments_bad_arguments_raise(device):
    acc = torch.zeros(8, device=device)
    x = torch.randn(6, 8, device=device)
    with pytest.raises(ValueError, match="sq_norms"):
        wk.accumulate_moments_(acc.double(), acc.clone(), acc.clone(), x, 2)
    with pytest.raises(ValueError, match="sq_deviations"):
        wk.accumulate_moments_(acc.clone(), acc.clone(), torch.zeros(7, device=device), x, 2)
    with pytest.raises(ValueError, match="x must"):
        wk.accumulate_moments_(acc.clone(), acc.clone(), acc.clone(), x[:, :5], 2)
    with pytest.raises(ValueError, match="x must"):
        wk.accumulate_moments_(acc.clone(), acc.clone(), acc.clone(), x.to(torch.int32), 2)
    with pytest.raises(ValueError, match="samples"):
        wk.accumulate_moments_(acc.clone(), acc.clone(), acc.clone(), x, 4)
    with pytest.raises(ValueError, match="samples"):
        wk.accumulate_moments_(acc.clone(), acc.clone(), acc.clone(), x, 0)


# --- DSnoT inputs, built as the published method builds them ----------------------------------------------
def _dsnot_inputs(rows, cols, seed, nm=None):
    """W ~ N(0, 1), a random per-channel mean and positive var; the initial mask is Wanda's (per row the
    int(C/2) smallest |W| * norm, or 2 of each 4); prune_order: the kept columns by ascending score, negative
    dsnot_metric first in that order, then positive ones in reverse, then the pruned columns."""
    g = _gen(seed)
    w = torch.randn(rows, cols, generator=g)
    mean = torch.randn(cols, generator=g)
    var = torch.rand(cols, generator=g) + 0.05
    norm = (torch.rand(cols, generator=g) * 4 + 0.1).sqrt()
    score = w.abs() * norm
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    if nm:
        n, m = nm
        by_group = torch.sort(score.reshape(rows, -1, m), dim=2, stable=True)[1][:, :, :n]
        mask.view(rows, -1, m).scatter_(2, by_group, True)
    else:
        mask.scatter_(1, torch.sort(score, dim=1, stable=True)[1][:, : int(cols * 0.5)], True)
    dsnot_metric = w * mean
    error = (dsnot_metric * mask).sum(dim=1)
    regrow_order = torch.sort(torch.where(mask, dsnot_metric, 0.0) / var, dim=1, stable=True)[1]
    prune_order = torch.empty(rows, cols, dtype=torch.int64)
    for r in range(rows):
        by_score = torch.sort(score[r].masked_fill(mask[r], float("inf")), stable=True)[1]
        kept = by_score[~mask[r][by_score]]
        negative = dsnot_metric[r][kept] < 0
        prune_order[r] = torch.cat([kept[negative], kept[~negative].flip(0), torch.nonzero(mask[r])[:, 0]])
    return {
        "mask": mask,
        "dsnot_metric": dsnot_metric,
        "regrow_order": regrow_order,
        "prune_order": prune_order,
        "prune_counts": (~mask).sum(dim=1),
        "prune_metric": score.masked_fill(mask, float("inf")),
        "error": error,
    }


def _to(inputs, device):
    return {k: v.to(device) for k, v in inputs.items()}


def _unstructured_both(inputs, threshold, max_cycles):
    args = ("dsnot_metric", "regrow_order", "prune_order", "prune_counts", "error")
    out = []
    for op in (wk.dsnot_unstructured_, ref.dsnot_unstructured_torch):
        mask = inputs["mask"].clone()
        got = op(mask, *(inputs[k] for k in args), threshold, max_cycles)
        assert got is mask
        out.append(mask)
    return out


def _nm_both(inputs, m, threshold, max_cycles):
    out = []
    for op in (wk.dsnot_nm_, ref.dsnot_nm_torch):
        mask, prune_metric = inputs["mask"].clone(), inputs["prune_metric"].clone()
        got = op(
            mask,
            inputs["dsnot_metric"],
            prune_metric,
            inputs["regrow_order"],
            inputs["error"],
            m,
            threshold,
            max_cycles,
        )
        assert got is mask
        out.append((mask, prune_metric))
    return out


# --- dsnot_unstructured_ ----------------------------------------------------------------------------------
@pytest.mark.parametrize("rows,cols,seed", [(70, 128, 0), (33, 600, 1), (5, 12, 2)])
@pytest.mark.parametrize("threshold", [0.1, 0.0, 1e9])
@pytest.mark.parametrize("max_cycles", [0, 1, 50])
def test_dsnot_unstructured_matches_reference(rows, cols, seed, threshold, max_cycles, device):
    inputs = _to(_dsnot_inputs(rows, cols, seed), device)
    ours, want = _unstructured_both(inputs, threshold, max_cycles)
    assert torch.equal(ours, want)
    assert torch.equal(ours.sum(dim=1), inputs["mask"].sum(dim=1))  # each row keeps its pruned count
    if threshold == 1e9 or max_cycles == 0:
        assert torch.equal(ours, inputs["mask"])  # nothing moves
    elif cols >= 128:
        assert not torch.equal(ours, inputs["mask"])  # it did swap


def test_dsnot_unstructured_column_major_inputs(device):
    inputs = _to(_dsnot_inputs(40, 96, 3), device)
    strided = {k: v.t().contiguous().t() if v.ndim == 2 else v for k, v in inputs.items()}
    ours, want = _unstructured_both(strided, 0.0, 50)
    assert torch.equal(ours, want) and not torch.equal(ours, inputs["mask"])
    assert ours.stride() == strided["mask"].stride()


def _random_inputs(rows, cols, seed):
    """Arbitrary (not DSnoT-built) inputs: random orders, masks, counts (negative and beyond C included) and
    ties in prune_metric, so that pointers run off both ends of their lists and every in_range rule matters."""
    g = _gen(seed)
    mask = torch.rand(rows, cols, generator=g) < 0.5
    metric = torch.randint(-3, 4, (rows, cols), generator=g).float() / 4
    prune_metric = torch.randint(0, 3, (rows, cols), generator=g).float()
    prune_metric[torch.rand(rows, cols, generator=g) < 0.3] = float("inf")
    return {
        "mask": mask,
        "dsnot_metric": metric,
        "regrow_order": torch.argsort(torch.rand(rows, cols, generator=g), dim=1),
        "prune_order": torch.argsort(torch.rand(rows, cols, generator=g), dim=1),
        "prune_counts": torch.randint(-1, cols + 3, (rows,), generator=g),
        "prune_metric": prune_metric,
        "error": torch.randint(-4, 5, (rows,), generator=g).float() / 4,
    }


@pytest.mark.parametrize("cols", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.25])
def test_dsnot_unstructured_arbitrary_inputs_match_reference(cols, threshold, device):
    inputs = _to(_random_inputs(200, cols, seed=cols), device)
    ours, want = _unstructured_both(inputs, threshold, 50)
    assert torch.equal(ours, want)


def test_dsnot_unstructured_pointers_run_off_both_ends(device):
    """Row 0 (error > 0) regrows from the end, down past position 0; row 1 (error < 0) regrows from the start up
    past C and prunes from the end of its kept part down past 0. Each row swaps exactly twice, then stops."""
    inputs = {
        "mask": torch.tensor([[True, False], [True, False]]),
        "dsnot_metric": torch.tensor([[0.0, 1.0], [0.0, -1.0]]),
        "regrow_order": torch.tensor([[1, 0], [0, 1]]),
        "prune_order": torch.tensor([[1, 0], [0, 1]]),
        "prune_counts": torch.tensor([2, 2]),
        "error": torch.tensor([1.0, -1.0]),
    }
    inputs = _to(inputs, device)
    once, want = _unstructured_both(inputs, 0.0, 1)
    assert torch.equal(once, want) and torch.equal(once.cpu(), torch.tensor([[False, True], [False, True]]))
    ours, want = _unstructured_both(inputs, 0.0, 50)
    assert torch.equal(ours, want)
    assert torch.equal(ours.cpu(), torch.tensor([[True, False], [True, False]]))  # swapped there and back


def test_dsnot_unstructured_error_update_rounds_as_written(device):
    """err = (err + pv) - rv, as published: with err = 2**-30 and pv == rv == 1 the error rounds to 0 and the row
    stops after one swap; err + (pv - rv) would keep 2**-30 and swap twice."""
    inputs = {
        "mask": torch.tensor([[True, False, True, False]]),
        "dsnot_metric": torch.ones(1, 4),
        "regrow_order": torch.tensor([[1, 3, 2, 0]]),
        "prune_order": torch.tensor([[1, 3, 0, 2]]),
        "prune_counts": torch.tensor([2]),
        "error": torch.tensor([2.0**-30]),
    }
    ours, want = _unstructured_both(_to(inputs, device), 0.0, 50)
    assert torch.equal(ours, want) and torch.equal(ours.cpu(), torch.tensor([[False, True, True, False]]))


def _nm_row(error, metric):
    """One row, m = 2: cycle 1 regrows column 0 and prunes 1, cycle 2 regrows 2 and prunes 3 (if still live); the
    tests stop there (later cycles would swap back)."""
    return {
        "mask": torch.tensor([[True, False, True, False]]),
        "dsnot_metric": torch.tensor([metric], dtype=torch.float32),
        "prune_metric": torch.tensor([[float("inf"), 0.0, float("inf"), 0.0]]),
        "regrow_order": torch.tensor([[1, 3, 2, 0]]),
        "error": torch.tensor([error], dtype=torch.float32),
    }


@pytest.mark.parametrize(
    "error,metric,threshold,want_mask",
    [
        # The sign check reads (err + pv) - rv = (2**-30 + 1) - 1 = 0: sign 0 != +1, no swap (err + (pv - rv) would).
        (2.0**-30, [1.0, 1.0, 0.0, 0.0], 0.0, [True, False, True, False]),
        # The update (err + pv) - rv rounds to 1, not above the threshold 1: one swap (err + (pv - rv) would go on).
        (1.0 + 2.0**-23, [-14 * 2.0**-25, -15 * 2.0**-25, 0.0, 0.0], 1.0, [False, True, True, False]),
    ],
)
def test_dsnot_nm_rounds_as_written(error, metric, threshold, want_mask, device):
    (ours, ours_metric), (want, want_metric) = _nm_both(_to(_nm_row(error, metric), device), 2, threshold, 2)
    assert torch.equal(ours, want) and torch.equal(ours_metric, want_metric)
    assert torch.equal(ours.cpu(), torch.tensor([want_mask]))


def test_dsnot_threshold_compares_in_fp32_like_torch(device):
    """error == fp32(0.1) is not > 0.1 for torch (the threshold is rounded to fp32); a float64 compare would swap."""
    inputs = _to(_dsnot_inputs(4, 16, 5), device)
    inputs["error"] = torch.full((4,), 0.1, device=device)
    ours, want = _unstructured_both(inputs, 0.1, 50)
    assert torch.equal(ours, want) and torch.equal(ours, inputs["mask"])
    inputs["error"] = torch.full((4,), 0.1, device=device).nextafter(torch.tensor(1.0, device=device))
    ours, want = _unstructured_both(inputs, 0.1, 50)
    assert torch.equal(ours, want) and not torch.equal(ours, inputs["mask"])


def test_dsnot_unstructured_bad_arguments_raise(device):
    inputs = _to(_dsnot_inputs(4, 8, 6), device)
    args = ["mask", "dsnot_metric", "regrow_order", "prune_order", "prune_counts", "error"]

    def call(thr=0.1, cyc=50, **changes):
        values = {**inputs, **changes}
        return wk.dsnot_unstructured_(*(values[k] for k in args), thr, cyc)

    cases = {
        "mask": {"mask": inputs["mask"].to(torch.uint8)},
        "dsnot_metric": {"dsnot_metric": inputs["dsnot_metric"].double()},
        "regrow_order": {"regrow_order": inputs["regrow_order"].int()},
        "prune_order": {"prune_order": inputs["prune_order"][:, :4]},
        "prune_counts": {"prune_counts": inputs["prune_counts"].float()},
        "error": {"error": inputs["error"][:3]},
        "max_cycles": {"cyc": -1},
        "update_threshold": {"thr": "0.1"},
    }
    for name, change in cases.items():
        with pytest.raises(ValueError, match=name):
            call(**change)


# --- dsnot_nm_ --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows,cols,seed", [(70, 128, 0), (33, 600, 1), (3, 8, 2)])
@pytest.mark.parametrize("threshold", [0.1, 0.0, 1e9])
@pytest.mark.parametrize("max_cycles", [0, 1, 50])
def test_dsnot_nm_matches_reference(rows, cols, seed, threshold, max_cycles, device):
    inputs = _to(_dsnot_inputs(rows, cols, seed, nm=(2, 4)), device)
    (ours, ours_metric), (want, want_metric) = _nm_both(inputs, 4, threshold, max_cycles)
    assert torch.equal(ours, want) and torch.equal(ours_metric, want_metric)
    assert (ours.reshape(rows, -1, 4).sum(dim=-1) == 2).all()  # still exactly 2:4
    if threshold == 1e9 or max_cycles == 0:
        assert torch.equal(ours, inputs["mask"]) and torch.equal(ours_metric, inputs["prune_metric"])
    elif cols >= 128:
        assert not torch.equal(ours, inputs["mask"])


@pytest.mark.parametrize("n,m", [(4, 8), (8, 16), (1, 3)])
def test_dsnot_nm_other_group_sizes(n, m, device):
    inputs = _to(_dsnot_inputs(40, 96, 4, nm=(n, m)), device)
    (ours, ours_metric), (want, want_metric) = _nm_both(inputs, m, 0.0, 50)
    assert torch.equal(ours, want) and torch.equal(ours_metric, want_metric)
    assert (ours.reshape(40, -1, m).sum(dim=-1) == n).all()
    assert not torch.equal(ours, inputs["mask"])


@pytest.mark.parametrize("cols,m", [(1, 1), (2, 2), (6, 3), (8, 4), (12, 4)])
@pytest.mark.parametrize("threshold", [-1.0, 0.0])
def test_dsnot_nm_arbitrary_inputs_match_reference(cols, m, threshold, device):
    """Ties and +inf in prune_metric (all-+inf groups pick the group's first entry, like torch.argmin)."""
    inputs = _to(_random_inputs(200, cols, seed=cols + m), device)
    (ours, ours_metric), (want, want_metric) = _nm_both(inputs, m, threshold, 50)
    assert torch.equal(ours, want) and torch.equal(ours_metric, want_metric)


def test_dsnot_nm_argmin_with_nan_picks_the_first_nan_like_torch(device):
    inputs = _random_inputs(200, 8, seed=11)
    inputs["prune_metric"][torch.rand(200, 8, generator=_gen(12)) < 0.2] = float("nan")
    inputs = _to(inputs, device)
    (ours, ours_metric), (want, want_metric) = _nm_both(inputs, 4, -1.0, 50)
    assert torch.equal(ours, want)
    torch.testing.assert_close(ours_metric, want_metric, rtol=0, atol=0, equal_nan=True)


def test_dsnot_nm_column_major_inputs(device):
    inputs = _to(_dsnot_inputs(40, 96, 3, nm=(2, 4)), device)
    strided = {k: v.t().contiguous().t() if v.ndim == 2 else v for k, v in inputs.items()}
    (ours, ours_metric), (want, want_metric) = _nm_both(strided, 4, 0.0, 50)
    assert torch.equal(ours, want) and torch.equal(ours_metric, want_metric)
    assert not torch.equal(ours, inputs["mask"])


def test_dsnot_nm_bad_arguments_raise(device):
    inputs = _to(_dsnot_inputs(4, 8, 6, nm=(2, 4)), device)

    def call(m=4, thr=0.1, cyc=50, **changes):
        v = {**inputs, **changes}
        return wk.dsnot_nm_(v["mask"], v["dsnot_metric"], v["prune_metric"], v["regrow_order"], v["error"], m, thr, cyc)

    with pytest.raises(ValueError, match="mask"):
        call(mask=inputs["mask"].to(torch.uint8))
    with pytest.raises(ValueError, match="prune_metric"):
        call(prune_metric=inputs["prune_metric"].half())
    with pytest.raises(ValueError, match="regrow_order"):
        call(regrow_order=inputs["regrow_order"].float())
    with pytest.raises(ValueError, match="error"):
        call(error=inputs["error"][None])
    with pytest.raises(ValueError, match="multiple of m"):
        call(m=3)
    with pytest.raises(ValueError, match="multiple of m"):
        call(m=0)
    with pytest.raises(ValueError, match="max_cycles"):
        call(cyc=2.5)
    with pytest.raises(ValueError, match="update_threshold"):
        call(thr=None)
