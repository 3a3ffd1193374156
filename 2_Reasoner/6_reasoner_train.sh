#!/usr/bin/env bash
# Stage 2, step 6: train the Reasoner on Reasoner_train_instruct.pkl, with the official hyper-parameters:
# LoRA r=16, alpha=32, dropout 0.1; 3 epochs; batch 32; lr 3e-4, 100 warmup steps.
#   env: DATASET, MODEL_PATH (the base model), DATA_DIR (default Data),
#        OUTPUT_DIR (default checkpoints/$DATASET/Reasoner); extra arguments go to qlora_finetune.py
set -euo pipefail
: "${DATASET:?set DATASET}" "${MODEL_PATH:?set MODEL_PATH to the base model folder}"
source "$(dirname "$0")/../scripts/launch.sh"
launch qlora_finetune.py \
    --model_path "$MODEL_PATH" \
    --train_data_path "${DATA_DIR:-Data}/$DATASET/Reasoner_train_instruct.pkl" \
    --output_dir "${OUTPUT_DIR:-checkpoints/$DATASET/Reasoner}" \
    --lora_rank 16 --lora_alpha 32 --lora_dropout 0.1 --tune_last_layer false \
    --num_train_epochs 3 --per_device_train_batch_size 32 --gradient_accumulation_steps 1 \
    --learning_rate 3e-4 --warmup_steps 100 \
    "$@"
