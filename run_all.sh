#!/usr/bin/env bash
# Runs the whole Reason4Rec pipeline, every numbered step in order, and ends with the evaluation tables: the ratings,
# then the quality of the reasons.
#
#   bash run_all.sh                       the embedded default demo: a dense slice of real Amazon Musical
#                                         Instruments reviews, in which every held-out review's user and item have
#                                         histories (Data/prepare_data.py --dense_slice; the reviews:
#                                         $REVIEWS_FILE, see scripts/demo_reviews.py; downloaded where absent),
#                                         SmolLM2-135M-Instruct as base model and as local teacher, sizes that
#                                         finish in about half an hour on a 2-core CPU
#   DATASET=X MODEL_PATH=M bash run_all.sh     your prepared dataset (Data/X, see Data/prepare_data.py) and base
#                                         model, with the official sizes; the teacher from OPENAI_API_KEY etc.
#
# Extra arguments per kind of step, from the environment (empty unless the demo sets them):
#   DATA_ARGS (every Python step, e.g. --data_dir X), TRAIN_ARGS (every *_train.sh), GEN_ARGS (generating and
#   scoring steps), SUMMARY_ARGS (1_Summarizer/1), SAMPLE_ARGS (2_Reasoner/1), DISTILL_ARGS (2_Reasoner/4),
#   GRPO_ARGS (4_GRPO/1_reasoner_grpo_train.sh), JUDGE_ARGS (3_Predictor/5; default --judge unless TEACHER=local;
#   e.g. "--judge --with_teacher").
# Settings that shape prompts (the product class, the history length) are recorded in Data/<dataset>/dataset.json
# when the data is prepared (the demo: PREPARE_ARGS="--max_his 3"), and every step uses them.
# Data/ and checkpoints/ are read and written under the current folder, as by every step.  STEP_LOG=file appends a
# line per finished step (its label, "step N" or "demo setup", its name, start and end times), PYTHON=interpreter
# replaces `python`.
# Stops at the first failing step and names it.
set -euo pipefail
R="$(cd "$(dirname "$0")" && pwd)"  # the repository

if [ -z "${DATASET:-}" ]; then
    echo "== no DATASET set: running the embedded default demo"
    export DATASET=Musical_Instruments_demo
    export MODEL_PATH="${MODEL_PATH:-$R/models/SmolLM2-135M-Instruct}"
    export TEACHER="${TEACHER:-local}" TEACHER_MODEL_PATH="${TEACHER_MODEL_PATH:-$MODEL_PATH}"
    export TEACHER_MAX_TOKENS="${TEACHER_MAX_TOKENS:-48}" TEACHER_BATCH_SIZE="${TEACHER_BATCH_SIZE:-16}"
    # 345: at most 345 reviews, of which seed 0 keeps 283 (225 training, 28 validation, 30 test)
    DEMO_REVIEWS="${DEMO_REVIEWS:-345}"
    # every prompt of the dense slice carries histories, and their length is what a step costs on a CPU: 3 earlier
    # reviews of the user and 3 of the item, and texts (summaries, reasons) of at most 48 tokens
    PREPARE_ARGS="${PREPARE_ARGS-"--max_his 3"}"
    SUMMARY_ARGS="${SUMMARY_ARGS-"--sample 24"}"
    SAMPLE_ARGS="${SAMPLE_ARGS-"--num_samples 20 --num_reward_samples 8"}"  # 20 of the 105 eligible targets
    DISTILL_ARGS="${DISTILL_ARGS-"--max_sample_num 2"}"
    GEN_ARGS="${GEN_ARGS-"--max_new_tokens 48 --batch_size 16"}"
    TRAIN_ARGS="${TRAIN_ARGS-"--num_train_epochs 1 --max_steps 4 --per_device_train_batch_size 4 --warmup_steps 0 --save_strategy steps --save_steps 2"}"
    GRPO_ARGS="${GRPO_ARGS-"--max_steps 2 --num_generations 4 --per_device_train_batch_size 4 --gradient_accumulation_steps 1 --max_completion_length 48 --mask_truncated_completions false --save_strategy steps --save_steps 1 --per_device_eval_batch_size 16 --max_new_tokens 48"}"
    DEMO=1
fi
: "${MODEL_PATH:?set MODEL_PATH to the base model folder}"
DATA="${DATA_DIR:-Data}/$DATASET"

started=$SECONDS
step_number=0
timed() {  # timed LABEL NAME COMMAND...: run one command, timed; on failure, name it and stop
    local label="$1" name="$2"; shift 2
    local t0=$SECONDS start
    start=$(date +%s.%N)
    echo; echo "== $label: $name"
    if ! "$@"; then
        echo "run_all: $label ($name) failed: $*" >&2
        exit 1
    fi
    echo "== $label: $name took $((SECONDS - t0)) s"
    if [ -n "${STEP_LOG:-}" ]; then printf '%s\t%s\t%s\t%s\n' "$label" "$name" "$start" "$(date +%s.%N)" >> "$STEP_LOG"; fi
}
step() { step_number=$((step_number + 1)); timed "step $step_number" "$@"; }  # one of the pipeline's 27 steps
setup() { timed "demo setup" "$@"; }
python() { if [ -n "${PYTHON:-}" ]; then "$PYTHON" "$@"; else command python "$@"; fi; }

if [ -n "${DEMO:-}" ]; then  # the demo's own setup
    if [ ! -f "$MODEL_PATH/config.json" ]; then
        setup "convert the embedded SmolLM2-135M-Instruct" python "$R/scripts/prepare_default_model.py" --output "$MODEL_PATH"
    fi
    if [ ! -f "$DATA/raw_data/train.pkl" ]; then
        RAW="$(python "$R/scripts/demo_reviews.py" --download)"
        setup "prepare a dense slice of at most $DEMO_REVIEWS reviews" python "$R/Data/prepare_data.py" --input "$RAW" \
            --dataset "$DATASET" --dense_slice "$DEMO_REVIEWS" ${PREPARE_ARGS:-}
    else
        echo "== $DATA/raw_data already prepared: not preparing it again"
    fi
fi
[ -f "$DATA/raw_data/train.pkl" ] || { echo "run_all: $DATA/raw_data/train.pkl not found; prepare it with Data/prepare_data.py" >&2; exit 1; }

# shellcheck disable=SC2086  # the *_ARGS are lists of arguments
{
step "Summarizer 1: teacher summaries"        python "$R/1_Summarizer/1_distilling_aspect_preference_summary.py" ${SUMMARY_ARGS:-} ${DATA_ARGS:-}
step "Summarizer 2: SFT data"                 python "$R/1_Summarizer/2_construct_summarizer_train_data.py" ${DATA_ARGS:-}
step "Summarizer 3: train"                    bash "$R/1_Summarizer/3_summarizer_train.sh" ${TRAIN_ARGS:-} ${DATA_ARGS:-}
step "Summarizer 4: summarize all training reviews" python "$R/1_Summarizer/4_summarizer_generation.py" ${GEN_ARGS:-} ${DATA_ARGS:-}
step "Reasoner 1: sample targets"             python "$R/2_Reasoner/1_sample_train_data.py" ${SAMPLE_ARGS:-} ${DATA_ARGS:-}
step "Reasoner 2: reward-model SFT data"      python "$R/2_Reasoner/2_construct_reward_train_data.py" ${DATA_ARGS:-}
step "Reasoner 3: train the reward model"     bash "$R/2_Reasoner/3_reward_model_train.sh" ${TRAIN_ARGS:-} ${DATA_ARGS:-}
step "Reasoner 4: distill and filter reasons" python "$R/2_Reasoner/4_distilling_possible_reason.py" ${GEN_ARGS:-} ${DISTILL_ARGS:-} ${DATA_ARGS:-}
step "Reasoner 5: SFT data"                   python "$R/2_Reasoner/5_construct_reasoner_train_data.py" ${DATA_ARGS:-}
step "Reasoner 6: train"                      bash "$R/2_Reasoner/6_reasoner_train.sh" ${TRAIN_ARGS:-} ${DATA_ARGS:-}
step "Reasoner 7: reasons for the test set"   python "$R/2_Reasoner/7_generate_reason_for_test.py" ${GEN_ARGS:-} ${DATA_ARGS:-}
step "Reasoner 7: reasons for the validation rows" python "$R/2_Reasoner/7_generate_reason_for_test.py" --split valid ${GEN_ARGS:-} ${DATA_ARGS:-}
step "Predictor 1: SFT data"                  python "$R/3_Predictor/1_construct_predictor_train_data.py" ${GEN_ARGS:-} ${DATA_ARGS:-}
step "Predictor 1: SFT data, no reason"       python "$R/3_Predictor/1_construct_predictor_train_data.py" --no_reason ${DATA_ARGS:-}
step "Predictor 2: train"                     bash "$R/3_Predictor/2_predictor_train.sh" ${TRAIN_ARGS:-} ${DATA_ARGS:-}
step "Predictor 2: train, no reason"          env NAME=Direct_Predictor bash "$R/3_Predictor/2_predictor_train.sh" ${TRAIN_ARGS:-} ${DATA_ARGS:-}
for split in valid test; do
step "Predictor 3: rate the $split rows"      python "$R/3_Predictor/3_generate_predict_for_test.py" --split $split ${GEN_ARGS:-} ${DATA_ARGS:-}
step "Predictor 3: rate the $split rows, no reason" python "$R/3_Predictor/3_generate_predict_for_test.py" --no_reason --split $split ${GEN_ARGS:-} ${DATA_ARGS:-}
done
step "GRPO 1: refine the Reasoner"            bash "$R/4_GRPO/1_reasoner_grpo_train.sh" ${GRPO_ARGS:-} ${DATA_ARGS:-}
for split in valid test; do
step "GRPO 2: reasons for the $split rows"    bash "$R/4_GRPO/2_generate_reason_for_test.sh" --split $split ${GEN_ARGS:-} ${DATA_ARGS:-}
step "GRPO 3: rate the $split rows"           bash "$R/4_GRPO/3_generate_predict_for_test.sh" --split $split ${GEN_ARGS:-} ${DATA_ARGS:-}
done
step "Evaluate: ratings"                      python "$R/3_Predictor/4_evaluate.py" ${DATA_ARGS:-}
# the teacher as judge where it is a remote LLM, not a local model (the demo's is SmolLM2-135M)
JUDGE_ARGS="${JUDGE_ARGS-$([ "${TEACHER:-openai}" = local ] || echo --judge)}"
step "Evaluate: reasons"                      python "$R/3_Predictor/5_evaluate_reasons.py" ${JUDGE_ARGS:-} ${DATA_ARGS:-}
}
echo; echo "run_all: all $step_number steps done in $((SECONDS - started)) s (the demo's setup included)"
