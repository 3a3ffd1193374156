#!/usr/bin/env bash
# Stage 3, step 2: train the Predictor on Predictor_train_instruct.pkl, with the official hyper-parameters:
# LoRA r=8, alpha=16, dropout 0, lm_head trained too; 3 epochs; batch 16; lr 3e-5, warmup ratio 0.1 (transformers 5 reads --warmup_steps < 1 as a ratio).
# NAME=Direct_Predictor trains the no-reason ablation on Direct_Predictor_train_instruct.pkl instead.
#   env: DATASET, MODEL_PATH (the base model), DATA_DIR (default Data), NAME (default Predictor),
#        OUTPUT_DIR (default checkpoints/$DATASET/$NAME); extra arguments go to qlora_finetune.py
set -euo pipefail
: "${DATASET:?set DATASET}" "${MODEL_PATH:?set MODEL_PATH to the base model folder}"
NAME="${NAME:-Predictor}"
source "$(dirname "$0")/../scripts/launch.sh"
launch qlora_finetune.py \
    --model_path "$MODEL_PATH" \
    --train_data_path "${DATA_DIR:-Data}/$DATASET/${NAME}_train_instruct.pkl" \
    --output_dir "${OUTPUT_DIR:-checkpoints/$DATASET/$NAME}" \
    --lora_rank 8 --lora_alpha 16 --lora_dropout 0 --tune_last_layer true \
    --num_train_epochs 3 --per_device_train_batch_size 16 --gradient_accumulation_steps 1 \
    --learning_rate 3e-5 --warmup_steps 0.1 \
    "$@"
