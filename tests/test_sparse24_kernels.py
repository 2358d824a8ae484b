"""2:4 packed format kernels (pack, fused Wanda select + pack, unpack, sparse GEMV) vs their torch references."""

from __future__ import annotations

import pytest
import torch

from wanda_kernels import reference as ref
from wanda_kernels.pack24 import pack_24, unpack_24, wanda_prune_pack_24
from wanda_kernels.sparse24_mm import sparse24_linear

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}


def assert_product_rounded_once(got, x, w, bias=None):
    """``got`` is F.linear(x, w, bias) accumulated in fp32 and rounded once to x's dtype: within 1 ulp of the
    exact (fp64) product, plus fp32 accumulation error (relative to sum |x||w|). One ulp also covers the CPU
    interpreter, which truncates fp32 -> bf16 where a GPU rounds to nearest. Accumulating in fp16/bf16, a
    wrong column or a dropped bias is off by several ulps."""
    exact = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
    scale = torch.nn.functional.linear(
        x.double().abs(), w.double().abs(), None if bias is None else bias.double().abs()
    )
    bound = 2.0 ** -MANTISSA_BITS[x.dtype] * exact.abs() + 2.0**-18 * scale
    excess = ((got.double() - exact).abs() - bound).max().item()
    assert got.dtype == x.dtype and excess <= 0, f"off by more than one rounding: worst excess {excess:.3g}"


def pruned_24(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen)
    ref.wanda_prune_torch(w, torch.rand(shape[1], generator=gen), 0.5, 2, 4)
    w[0, :4] = 0.0  # a group with 4 zeros
    w[-1, 4:8] = torch.tensor([0.0, 0.0, 1.5, 0.0])  # a group with 3 zeros
    return w.to(dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(9, 48), (1, 8), (33, 136)])
def test_pack_matches_reference_and_round_trips(dtype, shape, device):
    w = pruned_24(shape, dtype, device)
    values, meta = pack_24(w)
    values_ref, meta_ref = ref.pack_24_torch(w)
    assert torch.equal(values, values_ref) and torch.equal(meta, meta_ref)
    assert values.shape == (shape[0], shape[1] // 2) and meta.shape == (shape[0], shape[1] // 8)
    assert torch.equal(unpack_24(values, meta), w)
    assert torch.equal(ref.unpack_24_torch(values_ref, meta_ref), w)
    # 0.5625x the dense size for 16-bit weights: C*2/2 + C/8 bytes against C*2 per row.
    packed_bytes = values.numel() * values.element_size() + meta.numel()
    if dtype != torch.float32:
        assert packed_bytes / (w.numel() * w.element_size()) == 0.5625


def test_pack_layout_is_the_documented_one(device):
    w = torch.tensor([[0.0, 2.0, 0.0, 3.0, 4.0, 0.0, 0.0, 5.0]], device=device)
    values, meta = pack_24(w)
    assert values.tolist() == [[2.0, 3.0, 4.0, 5.0]]
    # kept columns 1, 3 | 0, 3 -> bits: 1 | 3<<2 | 0<<4 | 3<<6
    assert meta.tolist() == [[1 | 3 << 2 | 0 << 4 | 3 << 6]]


def test_pack_rejects_weights_that_are_not_24(device):
    w = torch.randn(4, 16, device=device)
    with pytest.raises(ValueError, match="not 2:4 sparse: 16 groups"):
        pack_24(w)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_24(torch.zeros(4, 12, device=device))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_wanda_select_and_pack(dtype, device):
    gen = torch.Generator().manual_seed(1)
    w = (torch.randint(-3, 4, (17, 64), generator=gen).float() / 2).to(dtype=dtype, device=device)  # many ties
    a = torch.rand(64, generator=gen).to(device)
    values, meta = wanda_prune_pack_24(w, a)
    values_ref, meta_ref = ref.wanda_prune_pack_24_torch(w, a)
    assert torch.equal(values, values_ref) and torch.equal(meta, meta_ref)
    pruned = w.clone()
    ref.wanda_prune_torch(pruned, a, 0.5, 2, 4)
    assert torch.equal(unpack_24(values, meta), pruned)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_tokens", [1, 3, 16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_sparse24_linear_matches_dense_linear(dtype, n_tokens, with_bias, device):
    w = pruned_24((40, 64), dtype, device)
    values, meta = pack_24(w)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(n_tokens, 64, generator=gen).to(dtype=dtype, device=device)
    bias = torch.randn(40, generator=gen).to(dtype=dtype, device=device) if with_bias else None
    assert_product_rounded_once(sparse24_linear(x, values, meta, bias), x, w, bias)
    assert torch.equal(ref.sparse24_linear_torch(x, values, meta, bias), torch.nn.functional.linear(x, w, bias))


def test_sparse24_linear_batched_leading_dims_and_errors(device):
    w = pruned_24((16, 32), torch.float32, device)
    values, meta = pack_24(w)
    x = torch.randn(2, 3, 32, device=device)
    torch.testing.assert_close(sparse24_linear(x, values, meta), x @ w.T, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="x must be"):
        sparse24_linear(x.half(), values, meta)
    with pytest.raises(ValueError, match="meta must be"):
        sparse24_linear(x, values, meta[:, :2])
    # C = 4: two kept values per row, half a meta byte; the kernel would read the next row's byte.
    with pytest.raises(ValueError, match="multiple of 8"):
        sparse24_linear(x[..., :4], values[:, :2], meta[:, :0])


def test_sparse24_linear_strided_bias(device):
    w = pruned_24((16, 32), torch.float32, device)
    values, meta = pack_24(w)
    x = torch.randn(3, 32, device=device)
    bias = torch.arange(32.0, device=device)[::2]  # stride 2: a kernel reading it as contiguous adds 0..15
    torch.testing.assert_close(sparse24_linear(x, values, meta, bias), torch.nn.functional.linear(x, w, bias))


def _every_gpu_config():
    import wanda_kernels.sparse24_mm as sparse24_mm

    return [
        pytest.param(triton_config(o, k, w, path), id=f"path{path}-O{o}-K{k}-w{w}")
        for path, tiles in sparse24_mm._GPU_CONFIGS.items()
        for o, k, w in tiles
    ]


def triton_config(o, k, w, path):
    import triton

    return triton.Config({"BLOCK_O": o, "BLOCK_K": k, "PATH": path}, num_warps=w)


@pytest.mark.parametrize("config", _every_gpu_config())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_gpu_candidate_config_computes_the_same_product(config, dtype, device, monkeypatch):
    # The autotuner may pick any candidate the pruning keeps on a GPU; each must be right, including tile edges
    # (40 rows, 136 columns: neither divides any tile) and token counts that only some paths take.
    import triton

    import wanda_kernels.sparse24_mm as sparse24_mm

    single = triton.autotune(configs=[config], key=["n_out"])(sparse24_mm._sparse24_linear_kernel)
    monkeypatch.setattr(sparse24_mm, "_sparse24_linear_tuned", single)
    w = pruned_24((40, 136), dtype, device)
    values, meta = pack_24(w)
    gen = torch.Generator().manual_seed(3)
    bias = torch.randn(40, generator=gen).to(dtype=dtype, device=device)
    for n_tokens in (1, 3, 16, 40):  # 40: three token tiles sharing each weight block
        block_m = min(triton.next_power_of_2(n_tokens), sparse24_mm.DOT_ROWS)
        offered = sparse24_mm._prune_configs([p.values[0] for p in _every_gpu_config()], {}, BLOCK_M=block_m)
        if (config.kwargs, config.num_warps) not in [(c.kwargs, c.num_warps) for c in offered]:
            continue  # never offered for this token count
        x = torch.randn(n_tokens, 136, generator=gen).to(dtype=dtype, device=device)
        assert_product_rounded_once(sparse24_linear(x, values, meta, bias), x, w, bias)


def test_candidate_pruning_by_token_count():
    import wanda_kernels.sparse24_mm as sparse24_mm

    configs = [triton_config(o, k, w, p) for p, tiles in sparse24_mm._GPU_CONFIGS.items() for o, k, w in tiles]
    for block_m in (1, 2, 4, 8, 16):
        kept = sparse24_mm._prune_configs(configs, {}, BLOCK_M=block_m)
        paths = {c.kwargs["PATH"] for c in kept}
        assert sparse24_mm.PATH_DOT in paths
        assert (sparse24_mm.PATH_GATHER in paths) == (block_m <= 4)
        assert (sparse24_mm.PATH_GATHER_REDUCE in paths) == (block_m <= 2)  # 32 products per thread per token
        assert (sparse24_mm.PATH_SELECT in paths) == (block_m == 1)
        for c in kept:
            if c.kwargs["PATH"] != sparse24_mm.PATH_DOT:
                assert block_m * c.kwargs["BLOCK_O"] * c.kwargs["BLOCK_K"] <= 64 * 32 * c.num_warps
    # (32, 256, 8) gathers 64 products per thread at one token, 256 at four: offered at 1 only.
    big_gather = triton_config(32, 256, 8, sparse24_mm.PATH_GATHER)
    assert sparse24_mm._prune_configs([big_gather, configs[0]], {}, BLOCK_M=4) == [configs[0]]
