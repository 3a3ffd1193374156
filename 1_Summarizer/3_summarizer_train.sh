#!/usr/bin/env bash
# Stage 1, step 3: train the Summarizer on Summarizer_train_instruct.pkl, with the official hyper-parameters:
# LoRA r=16, alpha=32, dropout 0; 5 epochs; batch 16; lr 3e-4, 100 warmup steps; loss on the answer only.
#   env: DATASET, MODEL_PATH (the base model), DATA_DIR (default Data), OUTPUT_DIR (default checkpoints/$DATASET/Summarizer)
#   extra arguments go to qlora_finetune.py, e.g.  bash 1_Summarizer/3_summarizer_train.sh --max_steps 5
set -euo pipefail
: "${DATASET:?set DATASET}" "${MODEL_PATH:?set MODEL_PATH to the base model folder}"
source "$(dirname "$0")/../scripts/launch.sh"
launch qlora_finetune.py \
    --model_path "$MODEL_PATH" \
    --train_data_path "${DATA_DIR:-Data}/$DATASET/Summarizer_train_instruct.pkl" \
    --output_dir "${OUTPUT_DIR:-checkpoints/$DATASET/Summarizer}" \
    --lora_rank 16 --lora_alpha 32 --lora_dropout 0 --tune_last_layer false \
    --num_train_epochs 5 --per_device_train_batch_size 16 --gradient_accumulation_steps 1 \
    --learning_rate 3e-4 --warmup_steps 100 \
    "$@"
