#!/usr/bin/env bash
# Everything this project must measure on a GPU, as ONE command that ends within 10 minutes on a bare
# lent machine (hetero_llm not installed: it runs from src/; no internet; that machine's own python3,
# torch, Triton and transformers). It prints as it goes and stops each part at its time budget, so a
# slow part costs its own result, never the others':
#
#   1. env        GPU, driver, versions, what hetero_llm sees (inspect_hardware)
#   2. e2e-tiny   every GPU path end to end on a tiny model (eager, static+compile, hetero bf16/int8)
#   3. e2e-8b-b1  the batch-1 Llama-3-8B-shape targets of docs/benchmarks.md, with MET/MISSED lines
#   4. gpu-tests  the GPU tests: kernels (Triton wiring), decode graph capture, placement, INT8 backends
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine; logs and JSON under $OUT (or ./gpu_out)
#   bash benchmarks/gpu_check.sh --smoke    # every part on this CPU with tiny sizes (CI runs it): a typo
#                                           # here must not cost GPU time
#
# GPU_CHECK_LIMIT_S (default 570) is the whole budget; the device tool's command limit is 600 s.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
rm -f "$OUT"/*.log "$OUT"/e2e_*.json  # this run's results only
PY="${PYTHON:-python3}"
LIMIT="${GPU_CHECK_LIMIT_S:-570}"
START=$SECONDS
export PYTHONPATH="$PWD/src:$PWD/tests:$PWD/benchmarks:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
SUMMARY=()

stage() {  # stage NAME SECONDS COMMAND...: run with at most SECONDS (and what is left), stream and log
  local name=$1 want=$2; shift 2
  local left=$((LIMIT - (SECONDS - START)))
  local budget=$((want < left ? want : left))
  if [ "$budget" -lt 15 ]; then
    echo "== $name: SKIPPED, ${left} s left of ${LIMIT}"; SUMMARY+=("$name: skipped (no time left)"); return
  fi
  echo "== $name (up to ${budget} s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$budget" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  local verdict="rc=$rc"
  [ "$rc" -eq 124 ] && verdict="TIMED OUT after ${budget} s (its output so far is above and in $OUT/$name.log)"
  echo "== $name: $verdict in $((SECONDS - t0)) s"
  SUMMARY+=("$name: $verdict in $((SECONDS - t0)) s")
}

env_report() {
  if [ "$SMOKE" = 1 ]; then echo "smoke run on the CPU: figures mean nothing"; else
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader; fi
  "$PY" -c "import torch, transformers; print('python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.version.cuda)"
  "$PY" -c "import triton; print('triton', triton.__version__)" || echo "triton: not importable"
  "$PY" -m hetero_llm.cli inspect
}
export -f env_report
export SMOKE PY

if [ "$SMOKE" = 1 ]; then
  E2E=(--smoke --rounds 1)
  BIG=(--smoke --models tiny --batches 1 --rounds 1)  # the 8B stage's code path, at toy size
else
  E2E=(--rounds 1)
  BIG=(--models llama3-8b --batches 1 --rounds 2)
fi
# Graph capture, placement and INT8 backends first (quick), then every kernel test compiled for this
# GPU. On the CPU the kernel tests run under Triton's interpreter in the main suite already: the smoke
# run keeps the same paths and selects only the gpu-marked tests (which skip there).
GPU_TESTS=(tests/decode/test_decode_gpu.py tests/parallel/test_placement_gpu.py tests/quant/test_gpu_backends.py
           tests/prune/test_semi_sparse.py tests/kernels)
[ "$SMOKE" = 1 ] && GPU_TESTS+=(-m gpu)

stage env 60 bash -c env_report
stage e2e-tiny 100 "$PY" benchmarks/e2e_gpu.py --models tiny "${E2E[@]}" --json "$OUT/e2e_tiny.json"
stage e2e-8b-b1 330 "$PY" benchmarks/e2e_gpu.py "${BIG[@]}" --json "$OUT/e2e_8b_b1.json"
stage gpu-tests 600 "$PY" -m pytest -q -ra -p no:cacheprovider "${GPU_TESTS[@]}"

echo
echo "== gpu_check summary ($((SECONDS - START)) s of ${LIMIT})"
printf '   %s\n' "${SUMMARY[@]}"
grep -h -E "^(MET|MISSED) " "$OUT"/e2e-*.log 2>/dev/null | sed 's/^/   /'
for s in "${SUMMARY[@]}"; do case "$s" in *rc=0*) ;; *) exit 1 ;; esac; done
