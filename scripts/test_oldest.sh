#!/usr/bin/env bash
# The core tests again on the oldest transformers hetero_llm supports (5.17.0; the GPU machines run it),
# in a throwaway virtualenv that sees this environment's packages (torch, hetero_llm, the test extras)
# behind its own transformers. Run by scripts/test.sh; on its own: bash scripts/test_oldest.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
OLDEST=5.17.0
CORE=(tests/integrations tests/decode tests/test_save_load.py tests/test_selfcheck.py tests/planner/test_swaps.py
      tests/evaluate/test_agreement.py tests/serving/test_concurrency.py tests/serving/test_http_example.py
      tests/test_docs.py "tests/test_real_model.py::test_chat_answers_like_the_original")
VENV="$(mktemp -d)/transformers-$OLDEST"
trap 'rm -rf "$(dirname "$VENV")"' EXIT
python -m venv "$VENV"
# This environment's site-packages go after the venv's own: its transformers (and the huggingface_hub
# it needs) shadow the newer ones, everything else is shared. site.addsitedir, not a bare path line,
# so that the .pth files there run too (an editable install of hetero_llm is one).
python -c "import site; print(''.join(f'import site; site.addsitedir({d!r})\n' for d in site.getsitepackages() + [site.getusersitepackages()]))" \
    > "$(echo "$VENV"/lib/python3*/site-packages)/parent-environment.pth"
"$VENV/bin/python" -m pip install -q "transformers==$OLDEST"
"$VENV/bin/python" -c "import transformers, hetero_llm; print('core tests on transformers', transformers.__version__)"
"$VENV/bin/python" -m pytest -q -ra -p no:cacheprovider "${CORE[@]}" "$@"
