#!/usr/bin/env bash
# Stage 3, step 2: train the Predictor on Predictor_train_instruct.pkl with the hyper-parameters of predictor.yaml;
# NAME=Direct_Predictor trains the no-reason ablation on Direct_Predictor_train_instruct.pkl instead.
#   env: DATASET, MODEL_PATH (the base model), DATA_DIR, CHECKPOINT_DIR, OUTPUT_DIR, NUM_GPUS; flags override the yaml
exec "${PYTHON:-python}" "$(dirname "$0")/../qlora_finetune.py" --config "$(dirname "$0")/predictor.yaml" \
    --expert "${NAME:-Predictor}" --train_data "${NAME:-Predictor}_train_instruct.pkl" \
    --valid_data "${NAME:-Predictor}_valid_instruct.pkl" "$@"
