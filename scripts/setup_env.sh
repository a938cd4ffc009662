#!/usr/bin/env bash
# Create (or reuse) ./.venv and put torch in it first. Sourced by .ci/run and scripts/quickstart.sh.
# pyproject only asks for a torch lower bound: users bring their own CUDA build. Here torch 2.14.1 and torchvision
# 0.29.1 are pinned together (PyPI's torchvision does not import beside other torch builds).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
source .venv/bin/activate
python -m pip install --quiet --upgrade pip
if ! python -c "import torch, torchvision" 2>/dev/null; then
    python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
fi
