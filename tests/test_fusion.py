"""Fused RMSNorm and rotary kernels against their torch references (= transformers' formulas), and the model
glue that swaps them into LLaMA-family layers without changing the outputs."""

from __future__ import annotations

import collections
import copy
import functools

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from pruning.infer.fusion import FusedRMSNorm, _rotary_dispatch, fuse_small_ops_
from pruning.infer.runner import GreedyDecoder, PrefillRunner
from pruning.sparse24 import save_sparse
from wanda_kernels.kv_cache import write_kv_cache_
from wanda_kernels.policy import kernels_run_on
from wanda_kernels.reference import (
    add_rms_norm_torch,
    rms_norm_torch,
    rotary_torch,
    silu_mul_torch,
    write_kv_cache_torch,
)
from wanda_kernels.rmsnorm import add_rms_norm, rms_norm
from wanda_kernels.rope import rotary
from wanda_kernels.silu_mul import silu_mul

KERNELS = "triton"  # our kernels wherever Triton runs: here, the CPU under the interpreter

MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}


def assert_within_ulps(got: torch.Tensor, want: torch.Tensor, ulps: int) -> None:
    """|got - want| <= ulps units in the last place of want's dtype (relative: 2^-mantissa of the value)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    rel = 2.0 ** -MANTISSA_BITS[want.dtype]
    bound = ulps * rel * want.float().abs() + torch.finfo(want.dtype).tiny
    excess = ((got.float() - want.float()).abs() - bound).max().item()
    assert excess <= 0, f"off by more than {ulps} ulp(s): worst excess {excess:.3g}"


def interpreter_bf16_ulps(dtype: torch.dtype, device: torch.device) -> int:
    """Triton's CPU interpreter truncates fp32 -> bf16 (a GPU rounds to nearest): one more ulp per rounding."""
    return 1 if dtype == torch.bfloat16 and device.type == "cpu" else 0


# --- RMSNorm ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 5, 96), (7, 100)])
@pytest.mark.parametrize("eps", [1e-6, 0.25])
def test_rms_norm_matches_reference(device, dtype, shape, eps):
    gen = torch.Generator().manual_seed(sum(shape))
    x = (3 * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype)
    weight = torch.randn(shape[-1], generator=gen).to(device=device, dtype=dtype)
    got, want = rms_norm(x, weight, eps), rms_norm_torch(x, weight, eps)
    assert got.is_contiguous()
    if dtype == torch.float32:  # the fp32 sum's order and rsqrt's last bit
        torch.testing.assert_close(got, want, rtol=4e-7, atol=1e-7)
    else:  # then rounded to 16 bits twice, as the module does
        assert_within_ulps(got, want, 1 + 2 * interpreter_bf16_ulps(dtype, device))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 5, 96), (7, 100)])
def test_add_rms_norm_matches_reference(device, dtype, shape):
    """The residual sum is rounded as torch's (exact on a GPU), and the norm is of the rounded sum."""
    gen = torch.Generator().manual_seed(sum(shape))
    residual, delta = ((3 * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype) for _ in range(2))
    weight = torch.randn(shape[-1], generator=gen).to(device=device, dtype=dtype)
    (total, normed), (want_total, want_normed) = (
        add_rms_norm(residual, delta, weight, 1e-6),
        add_rms_norm_torch(residual, delta, weight, 1e-6),
    )
    if interpreter_bf16_ulps(dtype, device):  # the interpreter truncates the sum: compare the norm of ours
        assert_within_ulps(total, want_total, 1)
        want_normed = rms_norm_torch(total, weight, 1e-6)
    else:
        assert torch.equal(total, want_total)
    if dtype == torch.float32:
        torch.testing.assert_close(normed, want_normed, rtol=4e-7, atol=1e-7)
    else:
        assert_within_ulps(normed, want_normed, 1 + 2 * interpreter_bf16_ulps(dtype, device))


def test_add_rms_norm_refuses_bad_arguments(device):
    x = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match="share shape and dtype"):
        add_rms_norm(x, x[:, :4], torch.ones(8, device=device), 1e-6)
    with pytest.raises(ValueError, match="weight must be"):
        add_rms_norm(x, x, torch.ones(4, device=device), 1e-6)


def test_rms_norm_strided_input_and_fp32_weight(device):
    """A non-contiguous row view, and an fp32 weight with fp16 input (torch promotes the product to fp32)."""
    base = torch.randn(6, 2, 80, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=torch.float16)
    x = base[:, 1, :]  # row stride 160
    weight = torch.randn(80, generator=torch.Generator().manual_seed(4)).to(device)
    got, want = rms_norm(x, weight, 1e-5), rms_norm_torch(x, weight, 1e-5)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=4e-7, atol=1e-7)


def test_rms_norm_matches_transformers_module(device):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    module = LlamaRMSNorm(64, eps=1e-5).to(device=device, dtype=torch.float16)
    module.weight.data.normal_(generator=torch.Generator(device=device).manual_seed(0))
    x = torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=torch.float16)
    with torch.no_grad():
        want = module(x)
    assert torch.equal(rms_norm_torch(x, module.weight, 1e-5), want)
    assert_within_ulps(rms_norm(x, module.weight, 1e-5), want, 1)


def test_rms_norm_refuses_bad_arguments(device):
    x = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match="weight must"):
        rms_norm(x, torch.ones(7, device=device), 1e-6)
    with pytest.raises(ValueError, match="x must"):
        rms_norm(x.long(), torch.ones(8, device=device), 1e-6)
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, torch.ones(8, device=device), -1.0)


# --- rotary ----------------------------------------------------------------------------------------------


def _rotary_inputs(device, dtype, batch=2, q_heads=5, k_heads=2, n_pos=3, head_dim=64, cos_batch=1, seed=0):
    """q and k as attention builds them: [B, T, H, D] projections viewed as [B, H, T, D] (non-contiguous)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_pos, q_heads, head_dim, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(batch, n_pos, k_heads, head_dim, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
    angles = torch.rand(cos_batch, n_pos, head_dim // 2, generator=gen) * 6.3
    angles = torch.cat([angles, angles], dim=-1)  # as LlamaRotaryEmbedding: the two halves share frequencies
    return q, k, angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "dims", [{}, {"head_dim": 10, "q_heads": 3, "k_heads": 3}, {"batch": 3, "cos_batch": 3, "n_pos": 1}]
)
def test_rotary_is_torch_bit_for_bit(device, dtype, dims):
    q, k, cos, sin = _rotary_inputs(device, dtype, **dims)
    (q_got, k_got), (q_want, k_want) = rotary(q, k, cos, sin), rotary_torch(q, k, cos, sin)
    for got, want, x in ((q_got, q_want, q), (k_got, k_want, k)):
        # The attention's layout is kept (strides of size-1 dims carry no meaning).
        def strides(t):
            return [st for st, n in zip(t.stride(), t.shape, strict=True) if n > 1]

        assert strides(got) == strides(want)
        if interpreter_bf16_ulps(dtype, device):
            # Truncated products and sum: within 2 bf16 ulps of the terms' magnitudes (not of the result, which
            # can cancel to near zero).
            rotated = torch.cat([-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]], dim=-1)
            terms = (x.float() * cos.float()[:, None]).abs() + (rotated.float() * sin.float()[:, None]).abs()
            assert ((got.float() - want.float()).abs() <= 2 * 2.0**-7 * terms + 1e-30).all()
        else:
            assert torch.equal(got, want)


def test_rotary_reference_is_transformers_function(device):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k, cos, sin = _rotary_inputs(device, torch.float16)
    for got, want in zip(rotary_torch(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin), strict=True):
        assert torch.equal(got, want)


def test_rotary_refuses_bad_arguments(device):
    q, k, cos, sin = _rotary_inputs(device, torch.float16)
    with pytest.raises(ValueError, match="k must"):
        rotary(q, k[:, :, :2], cos, sin)
    with pytest.raises(ValueError, match="cos must"):
        rotary(q, k, cos[..., :32], sin)
    with pytest.raises(ValueError, match="share one float dtype"):
        rotary(q, k, cos.float(), sin.float())
    with pytest.raises(ValueError, match="even"):
        rotary(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7])


# --- silu(gate) * up ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 96), (3, 5, 344), (7, 5000)])
def test_silu_mul_matches_reference(device, dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    gate = (4 * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype)  # both tails of the sigmoid
    up = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    got, want = silu_mul(gate, up), silu_mul_torch(gate, up)
    assert got.is_contiguous()
    if dtype == torch.float32:  # exp's last bits (Triton's is not torch's)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # silu rounded to 16 bits, then the product: 1 ulp for exp's last bit
        assert_within_ulps(got, want, 1 + 2 * interpreter_bf16_ulps(dtype, device))


def test_silu_mul_reads_the_halves_of_a_fused_gate_up_product(device):
    """With gate/up fused, gate and up are column views of one [.., 2I] output: read in place, no copy."""
    fused = torch.randn(2, 3, 2 * 344, generator=torch.Generator().manual_seed(0)).to(device, torch.float16)
    gate, up = fused[..., :344], fused[..., 344:]
    assert_within_ulps(silu_mul(gate, up), silu_mul_torch(gate, up), 1)


def test_silu_mul_refuses_bad_arguments(device):
    gate = torch.randn(4, 8, device=device, dtype=torch.float16)
    with pytest.raises(ValueError, match="one shape"):
        silu_mul(gate, gate[:, :4])
    with pytest.raises(ValueError, match="one float dtype"):
        silu_mul(gate, gate.float())


# --- KV cache writes -------------------------------------------------------------------------------------


def _cache_and_states(device, dtype, batch=2, heads=3, cache_len=20, n_new=5, head_dim=24):
    gen = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(batch, heads, cache_len, head_dim, generator=gen).to(device, dtype) for _ in range(2))
    # As attention hands them over: [B, T, H, D] projections viewed as [B, H, T, D] (non-contiguous).
    new_keys, new_values = (
        torch.randn(batch, n_new, heads, head_dim, generator=gen).to(device, dtype).transpose(1, 2) for _ in range(2)
    )
    return keys, values, new_keys, new_values


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("n_new", "first"), [(1, 13), (5, 0), (200, 3)])
def test_kv_cache_write_equals_index_copy(device, dtype, n_new, first):
    keys, values, new_keys, new_values = _cache_and_states(device, dtype, cache_len=256, n_new=n_new)
    positions = torch.arange(first, first + n_new, device=device)
    length = torch.tensor(7, device=device)
    want = [t.clone() for t in (keys, values, length)]
    write_kv_cache_torch(*want[:2], new_keys, new_values, positions, want[2])
    write_kv_cache_(keys, values, new_keys, new_values, positions, length)
    for got, expected in zip((keys, values, length), want, strict=True):
        assert torch.equal(got, expected)  # a copy: exact
    assert int(length) == first + n_new


def test_kv_cache_write_takes_positions_in_any_order(device):
    keys, values, new_keys, new_values = _cache_and_states(device, torch.float16, n_new=3)
    positions = torch.tensor([9, 2, 17], device=device)
    length = torch.tensor(0, device=device)
    want = [t.clone() for t in (keys, values, length)]
    write_kv_cache_torch(*want[:2], new_keys, new_values, positions, want[2])
    write_kv_cache_(keys, values, new_keys, new_values, positions, length)
    assert torch.equal(keys, want[0]) and torch.equal(values, want[1]) and int(length) == 18


def test_kv_cache_write_strided_positions_and_empty_batch(device):
    keys, values, new_keys, new_values = _cache_and_states(device, torch.float16, n_new=2)
    positions = torch.tensor([5, 0, 6, 0], device=device)[::2]  # [5, 6], stride 2
    length = torch.tensor(0, device=device)
    want = [t.clone() for t in (keys, values, length)]
    write_kv_cache_torch(*want[:2], new_keys, new_values, positions, want[2])
    write_kv_cache_(keys, values, new_keys, new_values, positions, length)
    assert torch.equal(keys, want[0]) and torch.equal(values, want[1]) and int(length) == 7
    # No batch rows: nothing to copy, and still the length the reference sets.
    keys, values, new_keys, new_values = (t[:0] for t in _cache_and_states(device, torch.float16, n_new=4))
    write_kv_cache_(keys, values, new_keys, new_values, torch.arange(4, device=device), length)
    assert int(length) == 4


def test_kv_cache_write_refuses_bad_arguments(device):
    keys, values, new_keys, new_values = _cache_and_states(device, torch.float16)
    positions, length = torch.arange(5, device=device), torch.tensor(0, device=device)
    with pytest.raises(ValueError, match="new_keys must be"):
        write_kv_cache_(keys, values, new_keys[:, :2], new_values, positions, length)
    with pytest.raises(ValueError, match="one dtype"):
        write_kv_cache_(keys, values, new_keys.float(), new_values.float(), positions, length)
    with pytest.raises(ValueError, match="positions must be"):
        write_kv_cache_(keys, values, new_keys, new_values, positions.int(), length)
    with pytest.raises(ValueError, match="one cache layout"):
        write_kv_cache_(keys, values[..., :12], new_keys, new_values, positions, length)


# --- model glue ------------------------------------------------------------------------------------------


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    for module in model.modules():  # non-trivial norm weights, so a dropped weight product would show
        if type(module).__name__.endswith("RMSNorm"):
            module.weight.data.uniform_(0.5, 1.5)
    return model


class _OpCounts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_fused_llama_gives_the_same_outputs(device):
    """On the device the kernels run on (the CPU under the interpreter, else the GPU)."""
    from transformers.models.llama import modeling_llama

    plain, fused = tiny_llama().to(device), tiny_llama().to(device)
    original_rotary = modeling_llama.apply_rotary_pos_emb
    # Norms: 2 per layer and the final one; rotary embeddings, MLP activations, residual sums + norm: 1 per layer.
    counts = {"rms_norm": 5, "rotary": 2, "silu_mul": 2, "add_rms_norm": 2}
    assert fuse_small_ops_(fused, backend=KERNELS) == counts
    assert fuse_small_ops_(fused, backend=KERNELS) == counts  # idempotent: nothing wrapped twice
    rotary_forward = fused.model.layers[0].self_attn.forward
    assert not isinstance(rotary_forward.args[0], functools.partial)  # the original forward, wrapped once
    assert rotary_forward.args[0] == type(fused.model.layers[0].self_attn).forward.__get__(
        fused.model.layers[0].self_attn
    )
    assert sum(isinstance(m, FusedRMSNorm) for m in fused.modules()) == 5
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    dispatch = modeling_llama.apply_rotary_pos_emb  # installed once: the model's own function outside fused calls
    assert dispatch.func is _rotary_dispatch and dispatch.args == (
        getattr(original_rotary, "args", [original_rotary])[0],
    )
    prompt = ids[:, :5]
    decoders = [GreedyDecoder(m, batch=2, max_len=16, use_graph=False, backend=KERNELS) for m in (plain, fused)]
    for decoder in decoders:
        decoder.prefill(prompt)
    for _ in range(3):  # feed both the same token, compare the step's logits
        for decoder in decoders:
            decoder.token.copy_(decoders[0].token)
            decoder.position.fill_(decoder.length)
        with torch.no_grad():
            logits = [
                d.model(input_ids=d.token, attention_mask=d.attention_mask, position_ids=d.position.expand(2, 1),
                        cache_position=d.position, use_cache=True, **{d.cache_kwarg: d.cache}).logits
                for d in decoders
            ]  # fmt: skip
        torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
        for decoder in decoders:
            decoder.length += 1
    runners = [PrefillRunner(m, batch=2, seqlen=9, use_graph=False) for m in (plain, fused)]
    torch.testing.assert_close(runners[1](ids), runners[0](ids), rtol=1e-5, atol=1e-5)


def test_fused_decode_step_skips_the_elementwise_chains(device):
    """The torch ops of RMSNorm (pow, mean, rsqrt) and rotary (neg, cat) are gone from a fused decode step."""
    chains = ("pow", "mean", "rsqrt", "neg")
    counts = {}
    for fuse in (False, True):
        model = tiny_llama().to(device)
        if fuse:
            fuse_small_ops_(model, backend=KERNELS)
        decoder = GreedyDecoder(model, batch=1, max_len=16, use_graph=False, backend=KERNELS)
        decoder.prefill(torch.randint(0, 96, (1, 4), generator=torch.Generator().manual_seed(2)).to(device))
        with _OpCounts() as ops:
            decoder.step()
        counts[fuse] = {name: ops.counts[name] for name in chains}
    assert all(counts[False][name] > 0 for name in chains)
    assert counts[True] == dict.fromkeys(chains, 0)


def test_opt_has_nothing_to_fuse():
    config = OPTConfig(vocab_size=96, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=32)  # fmt: skip
    assert fuse_small_ops_(OPTForCausalLM(config), backend=KERNELS) == {
        "rms_norm": 0,
        "rotary": 0,
        "silu_mul": 0,
        "add_rms_norm": 0,
    }


# --- fused projections -----------------------------------------------------------------------------------


def tiny_opt() -> OPTForCausalLM:
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=96, hidden_size=64, word_embed_proj_dim=64, ffn_dim=128, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    return OPTForCausalLM(config).eval()


def _decode_logits(model, prompt, steps=3):
    """Logits of a prefill and a few greedy steps through GreedyDecoder's path (static cache)."""
    decoder = GreedyDecoder(model, batch=prompt.shape[0], max_len=16, use_graph=False, backend=KERNELS)
    decoder.prefill(prompt)
    out = []
    for _ in range(steps):
        decoder.position.fill_(decoder.length)
        with torch.no_grad():
            out.append(
                model(input_ids=decoder.token, attention_mask=decoder.attention_mask, cache_position=decoder.position,
                      position_ids=decoder.position.expand(prompt.shape[0], 1), use_cache=True,
                      **{decoder.cache_kwarg: decoder.cache}).logits
            )  # fmt: skip
        decoder.token.copy_(out[-1][:, -1].argmax(-1, keepdim=True))
        decoder.length += 1
    return torch.stack(out)


@pytest.mark.parametrize("family,groups", [("opt", 2), ("llama", 4)])
def test_fused_projections_give_the_same_outputs(family, groups):
    from pruning.infer.fusion import ProjectionSlice, fuse_projections_

    build = tiny_opt if family == "opt" else tiny_llama
    plain, fused = build(), build()
    assert fuse_projections_(fused) == groups  # q/k/v per layer, and gate/up for LLaMA
    assert fuse_projections_(fused) == 0  # nothing is fused twice
    slices_per_layer = 5 if family == "llama" else 3  # q, k, v (+ gate, up)
    assert sum(isinstance(m, ProjectionSlice) for m in fused.modules()) == 2 * slices_per_layer
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_decode_logits(fused, ids[:, :5]), _decode_logits(plain, ids[:, :5]), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    runners = [PrefillRunner(m, batch=2, seqlen=9, use_graph=False) for m in (plain, fused)]
    torch.testing.assert_close(runners[1](ids), runners[0](ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,saved_per_layer", [("opt", 2), ("llama", 3)])  # q/k/v: 3 -> 1, gate/up: 2 -> 1
def test_fused_projections_launch_one_product_per_group(family, saved_per_layer):
    from pruning.infer.fusion import fuse_projections_

    counts = {}
    for fuse in (False, True):
        model = tiny_llama() if family == "llama" else tiny_opt()
        if fuse:
            fuse_projections_(model)
        decoder = GreedyDecoder(model, batch=1, max_len=16, use_graph=False, backend=KERNELS)
        decoder.prefill(torch.randint(0, 96, (1, 4), generator=torch.Generator().manual_seed(2)))
        with _OpCounts() as ops:
            decoder.step()
        counts[fuse] = ops.counts["mm"] + ops.counts["addmm"]
    assert counts[False] - counts[True] == saved_per_layer * 2  # 2 layers


def test_slices_are_right_in_any_call_order():
    from pruning.infer.fusion import SharedInputLinears

    linears = [nn.Linear(8, n) for n in (3, 5, 2)]
    fused = nn.Linear(8, 10)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in linears]))
        fused.bias.copy_(torch.cat([m.bias for m in linears]))
    products = []
    fused.register_forward_hook(lambda module, args, out: products.append(out))
    shared = SharedInputLinears(fused, [3, 5, 2])
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    with torch.no_grad():
        for index in (1, 2, 0):  # the usual case: one product serves every part
            torch.testing.assert_close(shared.part(index, x), linears[index](x))
        assert len(products) == 1
        assert shared._output is None and shared._input is None  # released once every part was taken
        for index, inp in [(2, x), (0, x), (0, y), (1, x), (1, y), (2, y), (2, y)]:  # any order stays right
            torch.testing.assert_close(shared.part(index, inp), linears[index](inp))


def test_fused_projections_compress_and_stack_as_2_4():
    """Fuse then compress (the bench's order), or compress then fuse (a loaded checkpoint): same outputs."""
    from pruning.infer.fusion import fuse_projections_
    from pruning.methods import prune_magnitude_
    from pruning.sparse24 import Sparse24Linear, compress_model_24

    def pruned_llama():
        model = tiny_llama()
        for layer in model.model.layers:
            for module in layer.modules():
                if isinstance(module, nn.Linear):
                    prune_magnitude_(module.weight.data, 0.5, 2, 4, backend="torch")
        return model

    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(5))
    reference = pruned_llama()
    with torch.no_grad():
        want = reference(ids).logits
    fuse_then_compress, compress_then_fuse = pruned_llama(), pruned_llama()
    fuse_projections_(fuse_then_compress)
    compressed = compress_model_24(fuse_then_compress)
    assert sum("shared.fused" in name for name in compressed) == 4  # 2 fused groups per layer
    compress_model_24(compress_then_fuse)
    assert fuse_projections_(compress_then_fuse) == 4
    qkv = compress_then_fuse.model.layers[0].self_attn.q_proj.shared.fused
    assert isinstance(qkv, Sparse24Linear) and qkv.out_features == 64 + 2 * 32
    with torch.no_grad(), pytest.warns(UserWarning, match="dense"):
        for model in (fuse_then_compress, compress_then_fuse):
            torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_a_fused_model_is_not_saved(tmp_path):
    from pruning.cli.outputs import save_model_atomically
    from pruning.infer.fusion import fuse_projections_

    model = tiny_opt()
    fuse_projections_(model)
    with pytest.raises(ValueError, match="fused for inference"):
        save_model_atomically(model, None, tmp_path / "out", overwrite=False)
    with pytest.raises(ValueError, match="fused for inference"):
        save_sparse(model, None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_deep_copy_of_a_fused_model_runs_its_own_weights():
    plain = tiny_llama()
    fused = copy.deepcopy(plain)
    fuse_small_ops_(fused, backend=KERNELS)
    twin = copy.deepcopy(fused)
    with torch.no_grad():
        for module in (plain, twin):
            module.model.layers[0].self_attn.o_proj.weight.mul_(-2)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)


def test_fused_rotary_falls_back_for_what_it_does_not_cover(device):
    """Partial rotary (cos narrower than the head), another unsqueeze_dim: the model's own function runs."""
    from pruning.infer.fusion import fused_apply_rotary_pos_emb

    calls = []

    def fallback(q, k, cos, sin, unsqueeze_dim):
        calls.append(unsqueeze_dim)
        return q, k

    q, k, cos, sin = _rotary_inputs(device, torch.float32)
    fused_apply_rotary_pos_emb(q, k, cos[..., :32], sin[..., :32], fallback=fallback, backend=KERNELS)
    fused_apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin, 2, fallback=fallback, backend=KERNELS)
    assert calls == [1, 2]
    got = fused_apply_rotary_pos_emb(q, k, cos, sin, fallback=fallback, backend=KERNELS)
    assert calls == [1, 2] and torch.equal(got[0], rotary_torch(q, k, cos, sin)[0])


def test_other_architectures_are_refused_not_fused_silently():
    """GLM has what the swap looks for (q_proj/k_proj, a module-level ``apply_rotary_pos_emb``, RMSNorms) with
    other semantics (a partial, interleaved rotary embedding). Fusion is tested on the LLaMA family only, so
    anything else is refused, and left untouched, rather than trusted to name matching."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pruning.adapters import UnsupportedModelError

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "glm", vocab_size=96, pad_token_id=0, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    before = {name: type(module) for name, module in model.named_modules()}
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'glm'"):
        fuse_small_ops_(model, backend=KERNELS)
    assert {name: type(module) for name, module in model.named_modules()} == before
    assert not any(isinstance(m.forward, functools.partial) for m in model.modules())


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_other_llama_family_models_fuse_to_the_same_outputs(model_type, device):
    """The LLaMA adapter's other types have the same layer structure (Qwen3 adds per-head q/k RMSNorms, fused too)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type, vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    plain = AutoModelForCausalLM.from_config(config).eval().to(device)
    fused = AutoModelForCausalLM.from_config(config).eval().to(device)
    fused.load_state_dict(plain.state_dict())
    counts = fuse_small_ops_(fused, backend=KERNELS)
    assert counts["rotary"] == counts["silu_mul"] == counts["add_rms_norm"] == 2
    assert counts["rms_norm"] == (9 if model_type == "qwen3" else 5)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    prompt = ids[:, :5]
    got = GreedyDecoder(fused, batch=2, max_len=16, use_graph=False, backend=KERNELS).generate(prompt, 6)
    assert torch.equal(
        got, GreedyDecoder(plain, batch=2, max_len=16, use_graph=False, backend=KERNELS).generate(prompt, 6)
    )


def test_the_rotary_swap_affects_only_fused_attention_in_its_own_thread():
    """The module global stays the model's own function for unfused models and for other threads, even while a
    fused attention runs (a context variable, not a swap per call)."""
    import threading

    from transformers.models.llama import modeling_llama

    from pruning.infer import fusion

    fuse_small_ops_(tiny_llama(), backend=KERNELS)  # installs the dispatcher
    dispatch = modeling_llama.apply_rotary_pos_emb
    calls = []
    own = functools.partial(lambda tag, *args, **kwargs: calls.append(tag) or args[:2], "own")
    q = k = torch.randn(1, 2, 3, 8)
    cos = sin = torch.randn(1, 3, 8)
    seen_elsewhere = []

    def other_thread():
        dispatch.func(own, q, k, cos, sin)
        seen_elsewhere.append(list(calls))

    token = fusion._FUSED_ROTARY_BACKEND.set("torch")  # as inside a fused attention's forward, in this thread
    try:
        dispatch.func(own, q, k, cos, sin)  # here: fused, so "torch" runs the model's own function as fallback
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    finally:
        fusion._FUSED_ROTARY_BACKEND.reset(token)
    assert seen_elsewhere == [["own", "own"]]
    calls.clear()
    fused_calls = []
    token = fusion._FUSED_ROTARY_BACKEND.set(KERNELS)
    try:
        original_rotary = fusion.fused_apply_rotary_pos_emb
        fusion.fused_apply_rotary_pos_emb = lambda *a, **kw: fused_calls.append(kw["backend"])
        dispatch.func(own, q, k, cos, sin)
    finally:
        fusion.fused_apply_rotary_pos_emb = original_rotary
        fusion._FUSED_ROTARY_BACKEND.reset(token)
    assert fused_calls == [KERNELS] and calls == []
    dispatch.func(own, q, k, cos, sin)  # outside: the model's own function
    assert calls == ["own"]


def test_auto_backend_runs_the_references_off_cuda(monkeypatch):
    """``wanda_kernels.policy``: "auto" never picks the interpreter (the references run, same outputs); "triton"
    runs our kernels under it; an unknown name is refused up front."""
    import wanda_kernels.rmsnorm as rmsnorm_module

    def kernel_called(*args, **kwargs):
        raise AssertionError("the RMSNorm kernel ran")

    monkeypatch.setattr(rmsnorm_module, "rms_norm", kernel_called)
    monkeypatch.setattr(rmsnorm_module, "add_rms_norm", kernel_called)
    plain, fused, with_kernels = tiny_llama(), tiny_llama(), tiny_llama()
    fuse_small_ops_(fused)  # backend "auto"
    fuse_small_ops_(with_kernels, backend=KERNELS)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=0, atol=0)
        if kernels_run_on("cpu"):
            with pytest.raises(AssertionError, match="RMSNorm kernel ran"):
                with_kernels(ids)
        else:  # a CUDA machine runs no interpreter: "triton" refuses CPU tensors and names the fix
            with pytest.raises(ValueError, match="use backend 'torch'"):
                with_kernels(ids)
    with pytest.raises(ValueError, match="backend must be one of"):
        fuse_small_ops_(tiny_llama(), backend="cuda")


def test_fusing_again_takes_the_new_backend():
    model = tiny_llama()
    fuse_small_ops_(model, backend="torch")
    fuse_small_ops_(model, backend=KERNELS)
    assert {m.backend for m in model.modules() if isinstance(m, FusedRMSNorm)} == {KERNELS}
    attention = model.model.layers[0].self_attn
    assert attention.forward.args[1] == KERNELS and not isinstance(attention.forward.args[0], functools.partial)
    assert model.model.layers[0].mlp.forward.args[1] == KERNELS
