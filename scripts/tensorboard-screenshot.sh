#!/usr/bin/env bash
# TensorBoard's scalars page on a directory of kiln runs, captured by headless Chromium.
# Needs `pip install tensorboard` and Chromium (Debian: apt-get install chromium).
# Usage: bash scripts/tensorboard-screenshot.sh RUNS_DIR OUT.png
# (docs/images/tensorboard-scalars.png: two `kiln train cnn-mnist --epochs 3` runs, --ranks 1
# and --ranks 2, in one directory.)
set -euo pipefail
runs=${1:?give the directory of runs}
out=${2:?give the PNG to write}
port=${TENSORBOARD_PORT:-6006}
tensorboard --logdir "$runs" --port "$port" >/dev/null 2>&1 &
server=$!
trap 'kill $server' EXIT
for _ in $(seq 60); do
    curl -sf "localhost:$port/data/runs" >/dev/null && break
    sleep 0.5
done
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1100 \
    --virtual-time-budget=20000 --screenshot="$out" \
    "http://localhost:$port/?darkMode=false#scalars&_smoothingWeight=0&tagFilter=loss%7Caccuracy%7Cparallel" \
    2>/dev/null
echo "$out"
