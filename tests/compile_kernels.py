"""Compile every Triton kernel for real GPUs (sm_80, sm_90) without one: ``python tests/compile_kernels.py
[--json FILE]`` (FILE: JSON lines, one record per variant, appended).

The interpreter runs the kernels' semantics on the CPU but never sees the GPU compiler, which can reject
code the interpreter accepts. This script lowers each kernel, in the variants the launchers use, through
Triton's CUDA backend to PTX and cubin (ptxas ships in the triton wheel) and prints each kernel's registers,
spilled bytes (``ptxas -v``), shared memory and the SASS length of its longest loop (nvdisasm): a static look
at GPU resource use and per-step issue cost, made without a GPU.
It must run WITHOUT TRITON_INTERPRET (tests/test_kernels_compile.py starts it in a clean subprocess).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the GPU compiler needs real @triton.jit functions")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import wanda_kernels.dsnot as dsnot  # noqa: E402
import wanda_kernels.kv_cache as kv_cache  # noqa: E402
import wanda_kernels.magnitude as magnitude  # noqa: E402
import wanda_kernels.moments as moments  # noqa: E402
import wanda_kernels.nm as nm  # noqa: E402
import wanda_kernels.pack24 as pack24  # noqa: E402
import wanda_kernels.ria as ria  # noqa: E402
import wanda_kernels.rmsnorm as rmsnorm  # noqa: E402
import wanda_kernels.rope as rope  # noqa: E402
import wanda_kernels.scores as scores  # noqa: E402
import wanda_kernels.select as selection  # noqa: E402
import wanda_kernels.silu_mul as silu_mul  # noqa: E402
import wanda_kernels.sparse24_mm as sparse24_mm  # noqa: E402
import wanda_kernels.sparsegpt_block as sparsegpt_block  # noqa: E402
import wanda_kernels.sq_norms as sq_norms  # noqa: E402
import wanda_kernels.tiers as tiers  # noqa: E402
import wanda_kernels.unstructured as unstructured  # noqa: E402

I32 = "i32"


def variant(
    kernel, pointer_types: dict[str, str], constexprs: dict[str, object], num_warps: int, unaligned=(), **options
):
    """One compile of ``kernel``, specialized as Triton's launcher specializes a launch on contiguous tensors of
    real model shapes: column strides are 1 (a constant), and every pointer and every other integer argument
    is divisible by 16, except those named in ``unaligned`` (e.g. a block_size of 5); float scalars carry no
    divisibility. So the code compiled here has the vectorized loads that such a launch gets."""
    names = kernel.arg_names
    assert set(unaligned) <= set(names), unaligned
    constexprs = {**{n: 1 for n in names if n.startswith("stride_") and n.endswith("col")}, **constexprs}
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
        else:
            signature[name] = I32
    consts = {(names.index(k),): v for k, v in constexprs.items()}
    aligned = [n for n in names if n not in {*constexprs, *unaligned} and not signature[n].startswith(("fp", "bf"))]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return kernel, signature, consts, attrs, {"num_warps": num_warps, **options}


def variants():
    row = unstructured._row_select_kernel
    warp_candidates = [triton.Config({}, num_warps=w) for w in (4, 8, 16, 32)]
    for dtype, mode, prune, block, chunks in [
        ("fp32", 0, False, 8192, 1),
        ("fp16", 2, True, 4096, 1),
        ("bf16", 2, True, 32768, 1),
        ("fp16", 2, True, unstructured.CHUNK, 5),
    ]:
        ptrs = {"src_ptr": f"*{dtype}", "norm_ptr": "*fp32", "mask_ptr": "*u8"}
        consts = {"SCORE_MODE": mode, "PRUNE_WEIGHT": prune, "BLOCK_C": block, "NUM_CHUNKS": chunks}
        for config in unstructured._prune_warps(warp_candidates, {}, BLOCK_C=block):
            label = f"unstructured {dtype} mode{mode} C<={block * chunks} w{config.num_warps}"
            yield label, variant(row, ptrs, consts, config.num_warps)
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
        ptrs = {"x_ptr": "*fp16", "prefix_ptr": "*i64", "hist_ptr": "*i64"}
        consts = {"PASS": p, "ABSOLUTE": absolute, "BLOCK": 2048}
        yield f"kth_smallest pass {p}", variant(selection._digit_histogram_kernel, ptrs, consts, 4)
    ptrs = {"values_ptr": "*fp16", "meta_ptr": "*u8", "out_ptr": "*fp16"}
    yield "unpack_24", variant(pack24._unpack_24_kernel, ptrs, {"BLOCK_R": 4, "BLOCK_B": 64}, 4)
    candidates = [
        triton.Config({"BLOCK_O": o, "BLOCK_K": k, "PATH": path}, num_warps=w)
        for path, tiles in sparse24_mm._GPU_CONFIGS.items()
        for o, k, w in tiles
    ]
    for dtype, block_m in (("fp16", 1), ("bf16", 4), ("fp16", 16)):
        for config in sparse24_mm._prune_configs(candidates, {}, BLOCK_M=block_m):
            ptrs = {"x_ptr": f"*{dtype}", "values_ptr": f"*{dtype}", "meta_ptr": "*u8", "bias_ptr": f"*{dtype}",
                    "y_ptr": f"*{dtype}"}  # fmt: skip
            consts = {"HAS_BIAS": block_m == 1, "BLOCK_M": block_m, **config.kwargs}
            tile = "x".join(str(config.kwargs[k]) for k in ("BLOCK_O", "BLOCK_K"))
            label = f"sparse24_linear M{block_m} path{config.kwargs['PATH']} {tile} w{config.num_warps}"
            yield label, variant(sparse24_mm._sparse24_linear_kernel, ptrs, consts, config.num_warps)
    ptrs = {"x_ptr": "*fp32", "values_ptr": "*fp32", "meta_ptr": "*u8", "bias_ptr": "*fp32", "y_ptr": "*fp32"}
    consts = {"HAS_BIAS": False, "BLOCK_M": 2, "BLOCK_O": 16, "BLOCK_K": 64, "PATH": sparse24_mm.PATH_DOT}
    yield "sparse24_linear fp32 dot (ieee)", variant(sparse24_mm._sparse24_linear_kernel, ptrs, consts, 4)
    for dtype, block in (("fp16", 4096), ("bf16", 8192)):
        ptrs = {"x_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "eps": "fp32"}
        yield f"rms_norm {dtype} D<={block}", variant(rmsnorm._rms_norm_kernel, ptrs, {"BLOCK": block}, block // 512)
        ptrs = {n: f"*{dtype}" for n in ("residual_ptr", "delta_ptr", "weight_ptr", "sum_ptr", "y_ptr")}
        ptrs["eps"] = "fp32"
        kernel = rmsnorm._add_rms_norm_kernel
        yield f"add_rms_norm {dtype} D<={block}", variant(kernel, ptrs, {"BLOCK": block}, block // 512)
    for dtype in ("fp16", "bf16"):
        ptrs = {n: f"*{dtype}" for n in ("q_ptr", "k_ptr", "cos_ptr", "sin_ptr", "q_out_ptr", "k_out_ptr")}
        consts = {"BLOCK_D": 128, "BLOCK_H": 32}
        yield f"rotary {dtype} D128", variant(rope._rotary_kernel, ptrs, consts, 4, enable_fp_fusion=False)
    for dtype in ("fp16", "bf16"):
        ptrs = {n: f"*{dtype}" for n in ("gate_ptr", "up_ptr", "out_ptr")}
        yield f"silu_mul {dtype} I<=4096", variant(silu_mul._silu_mul_kernel, ptrs, {"BLOCK": 4096}, 4)
    for n_new, block_t in (("decode", 1), ("prefill", 32)):
        ptrs = {n: "*fp16" for n in ("keys_ptr", "values_ptr", "new_keys_ptr", "new_values_ptr")}
        ptrs.update(positions_ptr="*i64", length_ptr="*i64")
        consts = {"BLOCK_T": block_t, "BLOCK_D": 128}
        yield f"kv_cache_write fp16 D128 {n_new}", variant(kv_cache._write_kv_cache_kernel, ptrs, consts, 4)
    for select_nm, n, m in ((False, 0, 1), (True, 2, 4)):
        ptrs = {"w_ptr": "*fp32", "hinv_ptr": "*fp32", "mask_ptr": "*u8", "err_ptr": "*fp32"}
        block_c = 128
        consts = {"N": n, "M": m, "SELECT_NM": select_nm, "BLOCK_R": sparsegpt_block.TILE_ELEMS_GPU // block_c,
                  "BLOCK_C": block_c}  # fmt: skip
        kernel = sparsegpt_block._sparsegpt_block_kernel
        yield f"sparsegpt_block nm={select_nm}", variant(kernel, ptrs, consts, 1, enable_fp_fusion=False)
    yield from tier_variants()
    yield from refine_variants()


def refine_variants():
    """RIA's two kernels, the moments kernel (its three pass settings) and DSnoT's two swap loops."""
    for dt in ("fp32", "fp16", "bf16"):
        ptrs = {"weight_ptr": f"*{dt}", "col_partial_ptr": "*fp32", "row_partial_ptr": "*fp32"}
        yield f"ria_sums {dt}", variant(ria._abs_sums_partial_kernel, ptrs, {"BLOCK_R": 32, "BLOCK_C": 256}, 4)
        ptrs = {"weight_ptr": f"*{dt}", "col_sum_ptr": "*fp32", "row_sum_ptr": "*fp32", "act_factor_ptr": "*fp32",
                "out_ptr": "*fp32"}  # fmt: skip
        yield f"ria_scores {dt}", variant(ria._ria_scores_kernel, ptrs, {"BLOCK_R": 16, "BLOCK_C": 256}, 4)
        for sums, deviations in ((True, True), (True, False), (False, True)):
            ptrs = {"x_ptr": f"*{dt}", "mean_ptr": "*fp32", "sq_partial_ptr": "*fp32", "sum_partial_ptr": "*fp32",
                    "dev_partial_ptr": "*fp32"}  # fmt: skip
            consts = {"SUMS": sums, "DEVIATIONS": deviations, "BLOCK_R": 32, "BLOCK_C": 256}
            yield f"moments {dt} sums={sums} deviations={deviations}", variant(moments._moments_partial_kernel, ptrs,
                                                                                consts, 4)  # fmt: skip
    ptrs = {"mask_ptr": "*u8", "metric_ptr": "*fp32", "regrow_ptr": "*i64", "prune_ptr": "*i64", "counts_ptr": "*i64",
            "error_ptr": "*fp32", "update_threshold": "fp32"}  # fmt: skip
    yield "dsnot_unstructured", variant(dsnot._dsnot_unstructured_kernel, ptrs, {"BLOCK_R": 32}, 1)
    ptrs = {"mask_ptr": "*u8", "metric_ptr": "*fp32", "prune_metric_ptr": "*fp32", "regrow_ptr": "*i64",
            "error_ptr": "*fp32", "update_threshold": "fp32"}  # fmt: skip
    yield "dsnot_nm", variant(dsnot._dsnot_nm_kernel, ptrs, {"BLOCK_R": 32}, 1)


def tier_variants():
    """tiers.py's three kernels, set up as their launchers set them up (GPU: ``tiers._ELEMS`` entries a program)
    for a layer 4096 columns wide (``n_tc = cdiv(4096, b)`` tiles a row) and ``topk_per_block`` 10 (the default).
    Integers that such a launch does not pass as multiples of 16 (``b`` = 5, ``n_tc`` = 820, k = 10) are unaligned."""
    k = 10
    for dtype, b, norms in (("fp16", 16, True), ("bf16", 5, True), ("fp16", 64, True), ("fp32", 64, False)):
        # tile_scores; norms=False is the magnitude score, and (fp32) the by-cost tile sums of the pruned energy.
        n_tc = triton.cdiv(4096, b)
        unaligned = tuple(n for n, v in (("block_size", b), ("n_tile_cols", n_tc)) if v % 16)
        b_pad = triton.next_power_of_2(b)
        n_tiles = max(1, min(tiers._ELEMS // (b_pad * b_pad), triton.next_power_of_2(n_tc)))
        ptrs = {"weight_ptr": f"*{dtype}", "norm_ptr": "*fp32" if norms else f"*{dtype}", "out_ptr": "*fp32"}
        consts = {"HAS_NORMS": norms, "B_PAD": b_pad, "TILES": n_tiles}
        warps = min(8, max(1, b_pad * b_pad * n_tiles // 256))
        label = f"tile_scores {dtype} b{b} {'norms' if norms else 'no norms'} w{warps}"
        yield label, variant(tiers._tile_scores_kernel, ptrs, consts, warps, unaligned)
    for n_cols in (256, 2868, 7168):  # b 16 on 4096 columns; b 5 and b 2 on 14336 (BLOCK 4096, 8192 = the max)
        block = max(2, triton.next_power_of_2(n_cols))
        assert block <= tiers.MAX_BAND_TILES
        ptrs = {"scores_ptr": "*fp32", "dense_ptr": "*i64", "mid_ptr": "*i64", "tiers_ptr": "*i8"}
        warps = min(16, max(1, block // 256))
        unaligned = ("n_cols", "stride_row") if n_cols % 16 else ()
        label = f"band_tiers {n_cols} tiles BLOCK={block} w{warps}"
        yield label, variant(tiers._band_tiers_kernel, ptrs, {"BLOCK": block}, warps, unaligned)
    for dtype, b, norms, hybrid, by_metric in (
        ("fp16", 16, True, False, False),
        ("fp16", 16, True, False, True),
        ("fp16", 16, True, True, False),
        ("fp16", 16, True, True, True),
        ("fp16", 16, False, True, False),  # magnitude: no norms, the metric is |W|
        ("bf16", 5, True, False, True),
        ("bf16", 5, True, True, False),
        ("fp16", 64, True, False, True),
        ("fp16", 64, True, True, False),
    ):
        n_tc = triton.cdiv(4096, b)
        unaligned = tuple(n for n, v in (("block_size", b), ("topk", k), ("n_tile_cols", n_tc),
                                         ("stride_tier_row", n_tc)) if v % 16)  # fmt: skip
        b_pad = max(2, triton.next_power_of_2(b))
        n_tiles = max(1, min(tiers._ELEMS // (b_pad * b_pad), triton.next_power_of_2(n_tc)))
        ptrs = {"weight_ptr": f"*{dtype}", "norm_ptr": "*fp32" if norms else f"*{dtype}", "tiers_ptr": "*i8",
                "mask_ptr": "*u8", "resolved_ptr": "*i8", "score_threshold": "fp32"}  # fmt: skip
        consts = {"HAS_NORMS": norms, "RANK_BY_METRIC": by_metric and norms, "HYBRID": hybrid, "B_PAD": b_pad,
                  "TILES": n_tiles}  # fmt: skip
        warps = min(16, max(1, b_pad * b_pad * n_tiles // 128))
        name = "hybrid_2_4" if hybrid else "three_tier"
        rank = ("metric" if by_metric else "|w|") + ("" if norms else " no norms")
        label = f"tier_mask {name} {dtype} b{b} {rank} w{warps}"
        yield label, variant(tiers._tier_mask_kernel, ptrs, consts, warps, unaligned)


def register_use(ptx: str, capability: int) -> dict:
    """``ptxas -v``'s registers and spilled bytes for this PTX (the ptxas that ships in the triton wheel)."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    # Triton >= 3.6 compiles sm_90+ with the newer "ptxas-blackwell" it ships beside the legacy one.
    names = ("ptxas-blackwell", "ptxas") if capability >= 90 else ("ptxas",)
    ptxas = next((os.path.join(bin_dir, n) for n in names if os.access(os.path.join(bin_dir, n), os.X_OK)), None)
    if ptxas is None:
        return {}
    arch = "sm_90a" if capability == 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", os.devnull], capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spills = re.search(r"(\d+) bytes spill stores", out.stderr)
    if not regs or not spills:
        return {}
    return {"registers": int(regs.group(1)), "spilled_bytes": int(spills.group(1))}


def longest_loop(cubin: bytes) -> int | None:
    """SASS instructions in the kernel's longest loop body (nvdisasm from the triton wheel): per-step issue
    cost, the bound that a memory-bound kernel must stay under."""
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    if not os.access(nvdisasm, os.X_OK):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True).stdout
    label_at, branches, count = {}, [], 0
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            label_at[label.group(1)] = count
        elif re.search(r"/\*[0-9a-f]{4}\*/\s+\S", line):
            target = re.search(r"BRA.*`\((\.L_x_\d+)\)", line)
            if target:
                branches.append((target.group(1), count))
            count += 1
    # A 1-instruction "loop" is the BRA-to-self that ends every kernel.
    lengths = [at - label_at[name] + 1 for name, at in branches if label_at.get(name, at) < at]
    return max(lengths) if lengths else 0


def dense_weights_per_step(kernel, consts: dict) -> int | None:
    """For the 2:4 GEMV: dense weights one program covers per loop step (BLOCK_O x 2 BLOCK_K)."""
    if kernel is not sparse24_mm._sparse24_linear_kernel:
        return None
    by_name = {kernel.arg_names[index[0]]: value for index, value in consts.items()}
    return by_name["BLOCK_O"] * 2 * by_name["BLOCK_K"]


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, metavar="FILE", help="append one JSON line per compiled variant")
    json_path = parser.parse_args(argv).json
    failures, records = 0, []
    for capability in (80, 90):
        target = GPUTarget("cuda", capability, 32)
        for label, (kernel, signature, consts, attrs, options) in variants():
            try:
                compiled = triton.compile(ASTSource(kernel, signature, consts, attrs), target=target, options=options)
            except Exception as err:  # report every kernel, not just the first failure
                failures += 1
                print(f"FAIL sm_{capability} {label}: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
                continue
            record = {"suite": "static", "op": label, "capability": capability, "num_warps": options["num_warps"],
                      "shared_bytes": getattr(compiled.metadata, "shared", None),
                      **register_use(compiled.asm["ptx"], capability),
                      "loop_instructions": longest_loop(compiled.asm["cubin"])}  # fmt: skip
            per_step = dense_weights_per_step(kernel, consts)
            if per_step and record["loop_instructions"]:
                # warp-instructions issued per dense weight: every warp runs the loop body once per step
                record["warp_instr_per_dense_weight"] = record["loop_instructions"] * options["num_warps"] / per_step
            records.append(record)
            registers = f"{record.get('registers', '?'):>3} registers, {record.get('spilled_bytes', '?')} B spilled"
            loop = f"loop {record['loop_instructions']} instr" if record["loop_instructions"] else "no loop"
            per_weight = record.get("warp_instr_per_dense_weight")
            extra = f", {per_weight:.3f} warp-instr/dense weight" if per_weight else ""
            print(f"ok   sm_{capability} {label:44s} {registers}, shared {record['shared_bytes']} B, {loop}{extra}")
    if json_path:
        import datetime
        import json

        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        stamp = {"date": datetime.date.today().isoformat(), "triton": triton.__version__,
                 "git_sha": git.stdout.strip() or None}  # fmt: skip
        with open(json_path, "a") as f:
            for record in records:
                f.write(json.dumps({**record, **stamp}, sort_keys=True) + "\n")
        print(f"{len(records)} records appended to {json_path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
