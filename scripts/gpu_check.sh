#!/usr/bin/env bash
# The GPU proof in one call (scripts/gpu_check.py says what it runs and writes): unpacks the carried bundle of the
# packages the GPU machine lacks (Unsloth, TRL, datasets, bitsandbytes) where Unsloth is not installed, then runs
# scripts/gpu_check.py, timed from before the unpacking.  Results under $OUT (default ./gpu_check_out); extra
# arguments go to gpu_check.py (e.g. --optional valid,grpo).
#
# Prepare here, once per session (.gpu is ignored by git, so it must be named in the device run's carry):
#     bash ../shared/gpu/make_bundle.sh .gpu && cp ../shared/data/reviews_Musical_Instruments_5.json.gz .gpu/
# then on the GPU machine:   bash scripts/gpu_check.sh           (device tool: carry [".gpu"], see the README)
# On a CPU the same check runs on a tiny model and ends with "GPU proof: no — no CUDA device; ...".
set -euo pipefail
begin=$(date +%s.%N)
R="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$R/gpu_check_out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
if [ -f "$R/.gpu/bundle.tgz" ] && ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(not u.find_spec('unsloth'))"; then
    mkdir -p /tmp/pb && tar xzf "$R/.gpu/bundle.tgz" -C /tmp/pb
    export PYTHONPATH="/tmp/pb/site:$R${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check.sh: unpacked .gpu/bundle.tgz in $(awk -v a="$begin" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
fi
if [ -z "${REVIEWS_FILE:-}" ] && [ -f "$R/.gpu/reviews_Musical_Instruments_5.json.gz" ]; then
    export REVIEWS_FILE="$R/.gpu/reviews_Musical_Instruments_5.json.gz"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
"$PYTHON" "$R/scripts/gpu_check.py" --out "$OUT" --since "$begin" "$@" 2>&1 | tee "$OUT/gpu_check.log"
