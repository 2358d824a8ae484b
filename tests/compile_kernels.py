"""Compile every Triton kernel for real GPUs (sm_80, sm_90) without one: ``python tests/compile_kernels.py``.

The interpreter runs the kernels' semantics on the CPU but never sees the GPU compiler, which can reject
code the interpreter accepts. This script lowers each kernel, in the variants the launchers use, through
Triton's CUDA backend to PTX and cubin (ptxas ships in the triton wheel) and prints each kernel's shared memory.
It must run WITHOUT TRITON_INTERPRET (tests/test_kernels_compile.py starts it in a clean subprocess).
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the GPU compiler needs real @triton.jit functions")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import wanda_kernels.magnitude as magnitude  # noqa: E402
import wanda_kernels.nm as nm  # noqa: E402
import wanda_kernels.pack24 as pack24  # noqa: E402
import wanda_kernels.scores as scores  # noqa: E402
import wanda_kernels.select as selection  # noqa: E402
import wanda_kernels.sparse24_mm as sparse24_mm  # noqa: E402
import wanda_kernels.sparsegpt_block as sparsegpt_block  # noqa: E402
import wanda_kernels.sq_norms as sq_norms  # noqa: E402
import wanda_kernels.unstructured as unstructured  # noqa: E402

I32 = "i32"


def variant(kernel, pointer_types: dict[str, str], constexprs: dict[str, object], num_warps: int, **options):
    names = kernel.arg_names
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
        else:
            signature[name] = I32
    consts = {(names.index(k),): v for k, v in constexprs.items()}
    return kernel, signature, consts, {"num_warps": num_warps, **options}


def variants():
    row = unstructured._row_select_kernel
    for dtype, mode, prune, block, chunks, warps in [
        ("fp32", 0, False, 8192, 1, 16),
        ("fp16", 2, True, 8192, 1, 16),
        ("bf16", 2, True, 32768, 1, 16),
        ("fp16", 2, True, unstructured.CHUNK, 5, 16),
    ]:
        ptrs = {"src_ptr": f"*{dtype}", "norm_ptr": "*fp32", "mask_ptr": "*u8"}
        consts = {"SCORE_MODE": mode, "PRUNE_WEIGHT": prune, "BLOCK_C": block, "NUM_CHUNKS": chunks}
        yield f"unstructured {dtype} mode{mode} C<={block * chunks}", variant(row, ptrs, consts, warps)
    for dtype, n, m, mode in [("fp16", 2, 4, 2), ("fp32", 4, 8, 0), ("bf16", 2, 3, 1)]:
        ptrs = {"src_ptr": f"*{dtype}", "norm_ptr": "*fp32", "mask_ptr": "*u8"}
        m_pad = triton.next_power_of_2(m)
        block_g = 1024 // m_pad
        consts = {"N": n, "M": m, "M_PAD": m_pad, "SCORE_MODE": mode, "PRUNE_WEIGHT": mode == 2,
                  "BLOCK_R": max(1, 2048 // (block_g * m_pad)), "BLOCK_G": block_g}  # fmt: skip
        yield f"nm {n}:{m} {dtype} mode{mode}", variant(nm._nm_select_kernel, ptrs, consts, 4)
    ptrs = {"weight_ptr": "*fp16", "norm_ptr": "*fp32", "out_ptr": "*fp32"}
    yield "wanda_scores fp16", variant(scores._wanda_scores_kernel, ptrs, {"BLOCK_R": 16, "BLOCK_C": 256}, 4)
    ptrs = {"x_ptr": "*bf16", "partial_ptr": "*fp32"}
    yield "sq_norms bf16", variant(sq_norms._sq_norms_partial_kernel, ptrs, {"BLOCK_R": 32, "BLOCK_C": 256}, 4)
    ptrs = {"weight_ptr": "*fp16", "threshold_ptr": "*fp16", "mask_ptr": "*u8"}
    yield "magnitude fp16", variant(magnitude._threshold_mask_kernel, ptrs, {"BLOCK_R": 16, "BLOCK_C": 256}, 4)
    for select in (False, True):
        ptrs = {"src_ptr": "*fp16", "norm_ptr": "*fp32", "values_ptr": "*fp16", "meta_ptr": "*u8", "bad_ptr": "*i32"}
        consts = {"SELECT": select, "BLOCK_R": 4, "BLOCK_B": 64}
        yield f"pack_24 select={select}", variant(pack24._pack_24_kernel, ptrs, consts, 4)
    for p, absolute in ((0, True), (3, False)):
        ptrs = {"x_ptr": "*fp16", "prefix_ptr": "*i64", "hist_ptr": "*i32"}
        consts = {"PASS": p, "ABSOLUTE": absolute, "BLOCK": 2048}
        yield f"kth_smallest pass {p}", variant(selection._digit_histogram_kernel, ptrs, consts, 4)
    ptrs = {"values_ptr": "*fp16", "meta_ptr": "*u8", "out_ptr": "*fp16"}
    yield "unpack_24", variant(pack24._unpack_24_kernel, ptrs, {"BLOCK_R": 4, "BLOCK_B": 64}, 4)
    for has_bias, block_m in ((True, 1), (False, 4)):
        ptrs = {"x_ptr": "*fp16", "values_ptr": "*fp16", "meta_ptr": "*u8", "bias_ptr": "*fp16", "y_ptr": "*fp16"}
        consts = {"HAS_BIAS": has_bias, "BLOCK_M": block_m, "BLOCK_O": 16, "BLOCK_K": 128}
        yield f"sparse24_linear M<={block_m}", variant(sparse24_mm._sparse24_linear_kernel, ptrs, consts, 4)
    for select_nm, n, m in ((False, 0, 1), (True, 2, 4)):
        ptrs = {"w_ptr": "*fp32", "hinv_ptr": "*fp32", "mask_ptr": "*u8", "err_ptr": "*fp32"}
        block_c = 128
        consts = {"N": n, "M": m, "SELECT_NM": select_nm, "BLOCK_R": sparsegpt_block.TILE_ELEMS_GPU // block_c,
                  "BLOCK_C": block_c}  # fmt: skip
        kernel = sparsegpt_block._sparsegpt_block_kernel
        yield f"sparsegpt_block nm={select_nm}", variant(kernel, ptrs, consts, 1, enable_fp_fusion=False)


def main() -> int:
    failures = 0
    for capability in (80, 90):
        target = GPUTarget("cuda", capability, 32)
        for label, (kernel, signature, consts, options) in variants():
            try:
                compiled = triton.compile(ASTSource(kernel, signature, consts), target=target, options=options)
                shared = getattr(compiled.metadata, "shared", None)
                print(
                    f"ok   sm_{capability} {label:34s} shared memory {shared} B, cubin {len(compiled.asm['cubin'])} B"
                )
            except Exception as err:  # report every kernel, not just the first failure
                failures += 1
                print(f"FAIL sm_{capability} {label}: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
