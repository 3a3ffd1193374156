#!/usr/bin/env bash
# The GPU proof in one command (scripts/gpu_check.py says what it runs and writes).  Where Unsloth is not installed,
# it first unpacks $PACKAGES (default .gpu/bundle.tgz), the bundle that scripts/gpu_packages.sh makes of what a GPU
# machine without a package registry lacks (Unsloth, TRL, datasets, bitsandbytes); then it runs scripts/gpu_check.py,
# timed from before the unpacking.  The review file: $REVIEWS_FILE (or --reviews).  Results under $GPU_CHECK_OUT
# (default ./gpu_check_out); extra arguments go to gpu_check.py (e.g. --optional valid,grpo).
#
#     bash scripts/gpu_packages.sh                  # once, where a registry can be reached
#     REVIEWS_FILE=/path/to/reviews_Musical_Instruments_5.json.gz bash scripts/gpu_check.sh
#
# On a CPU the same check runs on a tiny model and ends with "GPU proof: no — no CUDA device; ...".
set -euo pipefail
begin=$(date +%s.%N)
R="$(cd "$(dirname "$0")/.." && pwd)"
GPU_CHECK_OUT="${GPU_CHECK_OUT:-$R/gpu_check_out}"
PACKAGES="${PACKAGES:-$R/.gpu/bundle.tgz}"
mkdir -p "$GPU_CHECK_OUT"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
if ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(not u.find_spec('unsloth'))"; then
    if [ -f "$PACKAGES" ]; then
        site=$(mktemp -d)
        tar xzf "$PACKAGES" -C "$site"
        export PYTHONPATH="$site/site:$R${PYTHONPATH:+:$PYTHONPATH}"
        echo "gpu_check.sh: unpacked $PACKAGES in $(awk -v a="$begin" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
    else
        echo "gpu_check.sh: Unsloth is not installed and there is no $PACKAGES: the check runs without it"
    fi
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
"$PYTHON" "$R/scripts/gpu_check.py" --out "$GPU_CHECK_OUT" --since "$begin" "$@" 2>&1 | tee "$GPU_CHECK_OUT/gpu_check.log"
