#!/usr/bin/env bash
# The paper's GPU path, checked in one call: the pipeline's own numbered scripts and *_train.sh scripts, in order
# (run_all.sh), through Unsloth in 4-bit, on a random-weight Llama-3.2-1B-shaped model with a Llama-3 chat template
# built on the spot, with a slice of the real Musical Instruments reviews and the local teacher; then LoRA training
# throughput and peak memory of Unsloth against transformers + PEFT + bitsandbytes on the same model and batches.
#
# On the GPU machine (device tool), after `bash ../shared/gpu/make_bundle.sh .gpu` and
# `cp ../shared/data/reviews_Musical_Instruments_5.json.gz .gpu/` here, with `.gpu` carried:
#     bash scripts/gpu_check.sh            (results under $OUT)
# On a CPU it runs the same steps on a tiny model without 4-bit (Unsloth, where installed, has a CPU fallback),
# so that the GPU call is a formality.  Writes to $OUT (default ./gpu_check_out): run_all.log, steps.tsv (per-step
# wall time and peak GPU memory), unsloth_vs_hf.txt, metrics.json, summary.md.
set -euo pipefail
R="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$R/gpu_check_out}"
WORK="${WORK:-$(mktemp -d)}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

if [ -f "$R/.gpu/bundle.tgz" ] && ! python3 -c "import unsloth" 2>/dev/null; then  # the packages the GPU machine lacks
    mkdir -p /tmp/pb && tar xzf "$R/.gpu/bundle.tgz" -C /tmp/pb
    export PYTHONPATH="/tmp/pb/site:$R${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PYTHON="$(command -v python || command -v python3)"
if "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    SIZE=1b QUANT=true
    nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 250 > "$OUT/gpu_memory.csv" &
    SAMPLER=$!
    trap 'kill $SAMPLER 2>/dev/null || true' EXIT
else
    SIZE=tiny QUANT=false
fi
"$PYTHON" -c "import importlib.util as u; print('backend:', 'unsloth' if u.find_spec('unsloth') else 'hf (Unsloth is not installed)')"

RAW="$R/.gpu/reviews_Musical_Instruments_5.json.gz"
[ -f "$RAW" ] || RAW="$("$PYTHON" "$R/scripts/demo_reviews.py")"
cd "$WORK"
"$PYTHON" "$R/scripts/build_random_llama.py" --output model --size "$SIZE"
"$PYTHON" "$R/Data/prepare_data.py" --input "$RAW" --dataset gpu_check --max_users 40 --max_his 5

STEP_LOG="$OUT/steps.tsv" DATASET=gpu_check MODEL_PATH="$WORK/model" PYTHON="$PYTHON" \
TEACHER=local TEACHER_MODEL_PATH="$WORK/model" TEACHER_MAX_TOKENS=32 TEACHER_BATCH_SIZE=32 \
SUMMARY_ARGS="--limit 32" DISTILL_ARGS="--max_sample_num 2" \
GEN_ARGS="--max_new_tokens 32 --batch_size 32 --load_in_4bit $QUANT" \
TRAIN_ARGS="--max_steps 3 --per_device_train_batch_size 4 --load_in_4bit $QUANT --save_strategy no" \
    bash "$R/run_all.sh" 2>&1 | tee "$OUT/run_all.log"
cp "Data/gpu_check/metrics.json" "$OUT/"

"$PYTHON" "$R/benchmarks/unsloth_vs_hf.py" --model_path "$WORK/model" --load_in_4bit "$QUANT" --out "$WORK/bench" \
    $([ "$SIZE" = tiny ] && echo --words 60) | tee "$OUT/unsloth_vs_hf.txt"

[ -n "${SAMPLER:-}" ] && kill "$SAMPLER" 2>/dev/null || true
"$PYTHON" - "$OUT" <<'PY'
import csv, datetime, json, sys, pathlib
out = pathlib.Path(sys.argv[1])
samples = []
if (out / "gpu_memory.csv").exists():
    for stamp, used in csv.reader(open(out / "gpu_memory.csv")):
        t = datetime.datetime.strptime(stamp.strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
        samples.append((t, float(used)))
lines = ["| step | wall time (s) | peak GPU memory used (MiB, nvidia-smi) |", "|---|---:|---:|"]
for number, name, start, end in csv.reader(open(out / "steps.tsv"), delimiter="\t"):
    peak = max((m for t, m in samples if float(start) <= t <= float(end) + 0.5), default=None)
    lines.append(f"| {number}. {name} | {float(end) - float(start):.0f} | {'-' if peak is None else f'{peak:,.0f}'} |")
metrics = json.loads((out / "metrics.json").read_text())
text = "\n".join(lines) + "\n\n" + (out / "unsloth_vs_hf.txt").read_text() + "\n" + metrics["verdict"] + "\n"
(out / "summary.md").write_text(text)
print(text)
PY
