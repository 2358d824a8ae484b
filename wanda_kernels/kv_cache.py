"""Writing new keys and values into a static KV cache, in one kernel.

Spec: ``wanda_kernels.reference.write_kv_cache_torch``: ``keys[:, :, positions] = new_keys`` and the same for
values, then ``length = positions[-1] + 1``. keys and values [B, H, L, D] (the cache, head dims contiguous),
new_keys and new_values [B, H, T, D] (any strides: attention hands over transposed projections), positions
int64 [T], length an int64 scalar tensor; all on one device. A pure copy: the result is exact. The position is
an input (not a device-side counter), so a captured decode step writes where its ``cache_position`` says; the
counter is set, not incremented. One program per (batch, head) and block of positions.
Design notes (vs transformers' five-kernel update): docs/kernels.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanda_kernels._runtime import check_kernel_device, interpreting, on_input_device


@triton.jit
def _write_kv_cache_kernel(
    keys_ptr, values_ptr, new_keys_ptr, new_values_ptr, positions_ptr, length_ptr,
    n_heads, n_new, head_dim,
    sc_b, sc_h, sc_l, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, BLOCK_D)
    t_ok = t < n_new
    ok = t_ok[:, None] & (dims < head_dim)[None, :]
    positions = tl.load(positions_ptr + t, mask=t_ok, other=0).to(tl.int64)
    cache_offsets = b * sc_b + h * sc_h + positions[:, None] * sc_l + dims[None, :]
    t64 = t.to(tl.int64)
    k = tl.load(new_keys_ptr + b * sk_b + h * sk_h + t64[:, None] * sk_t + dims[None, :], mask=ok)
    tl.store(keys_ptr + cache_offsets, k, mask=ok)
    v = tl.load(new_values_ptr + b * sv_b + h * sv_h + t64[:, None] * sv_t + dims[None, :], mask=ok)
    tl.store(values_ptr + cache_offsets, v, mask=ok)
    if pid_bh == 0 and pid_t == 0:
        tl.store(length_ptr, tl.load(positions_ptr + n_new - 1).to(tl.int64) + 1)


def _check(keys, values, new_keys, new_values, positions, length) -> None:
    tensors = {"keys": keys, "values": values, "new_keys": new_keys, "new_values": new_values}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            shape = getattr(t, "shape", t)
            raise ValueError(f"{name} must be a 4-D tensor [batch, heads, positions, head_dim], got {shape!r}")
    if values.shape != keys.shape or values.stride() != keys.stride() or keys.stride(3) != 1:
        raise ValueError(
            f"keys and values must be one cache layout with contiguous head dims, got {tuple(keys.shape)} "
            f"strides {keys.stride()} and {tuple(values.shape)} strides {values.stride()}"
        )
    batch, heads, _, head_dim = keys.shape
    n_new = new_keys.shape[2]
    for name, t in (("new_keys", new_keys), ("new_values", new_values)):
        if t.shape != (batch, heads, n_new, head_dim):
            raise ValueError(f"{name} must be [{batch}, {heads}, {n_new}, {head_dim}], got {tuple(t.shape)}")
    if len({keys.dtype, values.dtype, new_keys.dtype, new_values.dtype}) != 1:
        raise ValueError(f"the cache and the new keys/values must share one dtype, got {keys.dtype}, {new_keys.dtype}")
    if not isinstance(positions, torch.Tensor) or positions.dtype != torch.int64 or positions.shape != (n_new,):
        raise ValueError(f"positions must be an int64 tensor [{n_new}], got {getattr(positions, 'shape', positions)!r}")
    if not isinstance(length, torch.Tensor) or length.dtype != torch.int64 or length.numel() != 1:
        raise ValueError(f"length must be a one-element int64 tensor, got {length!r}")


@on_input_device
def write_kv_cache_(
    keys: torch.Tensor,
    values: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    positions: torch.Tensor,
    length: torch.Tensor,
) -> None:
    """``keys[:, :, positions] = new_keys``, ``values[:, :, positions] = new_values``, ``length = positions[-1] + 1``,
    in place. Positions must be within the cache (not checked on the device: this runs inside CUDA graphs)."""
    _check(keys, values, new_keys, new_values, positions, length)
    check_kernel_device(keys, values, new_keys, new_values, positions, length)
    batch, heads, _, head_dim = keys.shape
    n_new = new_keys.shape[2]
    if n_new == 0:
        return
    if batch * heads == 0:  # no program would run to set the length
        length.copy_(positions[-1] + 1)
        return
    positions = positions.contiguous()  # the kernel reads positions[t] at offset t
    if new_keys.stride(3) != 1 or new_values.stride(3) != 1:
        new_keys, new_values = new_keys.contiguous(), new_values.contiguous()
    block_d = triton.next_power_of_2(head_dim)
    block_t = max(1, min(triton.next_power_of_2(n_new), 4096 // block_d))
    grid = (batch * heads, triton.cdiv(n_new, block_t))
    _write_kv_cache_kernel[grid](
        keys, values, new_keys, new_values, positions, length, heads, n_new, head_dim,
        keys.stride(0), keys.stride(1), keys.stride(2),
        new_keys.stride(0), new_keys.stride(1), new_keys.stride(2),
        new_values.stride(0), new_values.stride(1), new_values.stride(2),
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=1 if interpreting() else 4,
    )  # fmt: skip
