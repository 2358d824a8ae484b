#!/usr/bin/env bash
# The one GPU check, prepared for a session with ~15 minutes of device time and no network.
# With no arguments it runs, in priority order (open issues first), each step capped by the time left:
#   1. the tests that need CUDA: every test marked `gpu`, and the 2:4 GEMV and decode-fusion kernel tests on the GPU
#      (GPU_CHECK_ALL_TESTS=1 adds tests/test_kernels.py, which the CPU interpreter already covers);
#   2. python -m bench inference e2e --e2e-run sparsegpt: 2:4 per-Linear and whole-model prefill/decode,
#      then SparseGPT on OPT-1.3B against the reference code path;
#   3. python -m bench kernels e2e: the mask kernels on real layer shapes, Wanda on OPT-6.7B (unstructured,
#      2:4) against locuslab/wanda's code path;
#   4. python -m bench e2e --e2e-run opt-6.7b:sparsegpt:unstructured --no-reference (the reference would
#      take minutes there).
# With arguments, step 1 and then one `python -m bench ARGS` (e.g. `kernels e2e`, `--e2e-run all`).
# Usage, from anywhere:  bash bench/gpu_check.sh [ARGS]
# Results: $OUT/bench.jsonl and $OUT/log.txt when $OUT is set (the device tool fetches $OUT), else bench/results/.
# A deadline (GPU_CHECK_BUDGET_S, default 540 s) caps every step, so the script ends in about 9 minutes (give
# the device call a timeout of ~590 s); the tests may use only what leaves BENCH_RESERVE_S (380 s) for the
# benchmarks, which write each record as soon as it is measured, so a step cut off still leaves its results.
set -uo pipefail # no -e: a failing step is reported and the next one still runs

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"

BUDGET=${GPU_CHECK_BUDGET_S:-540}
BENCH_RESERVE=${BENCH_RESERVE_S:-380}
START=$SECONDS
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" # the checkout, even if the editable install fails
failed=()

# step NAME CAP_SECONDS RESERVE OK_CODES COMMAND...: run COMMAND for at most min(CAP, time left - RESERVE);
# OK_CODES: the exit codes that count as success, e.g. "0 5".
step() {
    local name=$1 cap=$2 reserve=$3 ok=$4 left rc t0
    shift 4
    left=$((BUDGET - (SECONDS - START) - reserve))
    ((cap > left)) && cap=$left
    if ((cap < 20)); then
        echo "=== SKIPPED $name: the ${BUDGET}s budget is spent (${reserve}s kept for later steps)"
        failed+=("$name(skipped)")
        return
    fi
    echo "=== $name (at most ${cap}s): $*"
    t0=$SECONDS
    timeout --signal=INT --kill-after=15 "$cap" "$@"
    rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0))s"
    [[ " $ok " == *" $rc "* ]] || failed+=("$name(exit $rc)")
}

main() {
    echo "=== gpu_check $(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), python $PY"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"

    missing=()
    for module in torch triton transformers tqdm pytest safetensors accelerate datasets pytest_benchmark; do
        "$PY" -c "import $module" 2>/dev/null || missing+=("$module")
    done
    echo "=== missing python packages: ${missing[*]:-none}"
    "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'gpu', torch.cuda.is_available(), 'triton', triton.__version__, 'transformers', transformers.__version__)" || {
        echo "=== torch, triton and transformers are all needed; stopping"
        return 2
    }
    if [[ " ${missing[*]} " == *" tqdm "* ]]; then
        echo "=== the pruning package imports tqdm; stopping"
        return 2
    fi

    # No network: no build isolation, no index; PEP 668 system Pythons also need --break-system-packages.
    if [[ -n "${GPU_CHECK_SKIP_INSTALL:-}" ]]; then
        echo "=== editable install skipped (GPU_CHECK_SKIP_INSTALL)"
    elif timeout 90 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . ||
        timeout 90 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --break-system-packages -e .; then
        echo "=== pip install --no-deps -e . done"
    else
        echo "=== editable install failed; running from the checkout (PYTHONPATH)"
    fi

    if [[ " ${missing[*]} " == *" pytest "* ]]; then
        echo "=== SKIPPED the tests: pytest is not installed"
        failed+=("tests(skipped: no pytest)")
    else
        mapfile -t gpu_files < <(grep -l "mark.gpu" tests/test_*.py)
        if ((${#gpu_files[@]})); then
            # Exit 5 = no test selected. Files whose imports need a missing package are reported, not fatal.
            step "gpu-marked tests" 120 "$BENCH_RESERVE" "0 5" "$PY" -m pytest -q -p no:cacheprovider -m gpu \
                --continue-on-collection-errors "${gpu_files[@]}"
        else
            echo "=== no test file has gpu-marked tests"
        fi
        kernel_tests=(tests/test_sparse24_kernels.py tests/test_fusion.py)
        [[ -n "${GPU_CHECK_ALL_TESTS:-}" ]] && kernel_tests=(tests/test_kernels.py "${kernel_tests[@]}")
        step "kernel tests on the GPU" 120 "$BENCH_RESERVE" "0" "$PY" -m pytest -q -p no:cacheprovider "${kernel_tests[@]}"
    fi

    local bench=("$PY" -m bench --out "$OUT_DIR/bench.jsonl")
    if (($#)); then
        step "python -m bench $*" 600 0 "0" "${bench[@]}" "$@"
    else
        step "bench: 2:4 inference, SparseGPT OPT-1.3B" 600 0 "0" "${bench[@]}" inference e2e --e2e-run sparsegpt
        step "bench: kernels, Wanda OPT-6.7B" 600 0 "0" "${bench[@]}" kernels e2e
        step "bench: SparseGPT OPT-6.7B (ours only)" 600 0 "0" "${bench[@]}" e2e \
            --e2e-run opt-6.7b:sparsegpt:unstructured --no-reference
    fi

    echo "=== done in $((SECONDS - START))s; results in $OUT_DIR/bench.jsonl, log in $OUT_DIR/log.txt"
    if ((${#failed[@]})); then
        echo "=== FAILED: ${failed[*]}"
        return 1
    fi
    echo "=== all steps passed"
}

main "$@" 2>&1 | tee -a "$OUT_DIR/log.txt" # pipefail: the script's status is main's
