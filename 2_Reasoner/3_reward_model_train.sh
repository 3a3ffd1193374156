#!/usr/bin/env bash
# Stage 2, step 3: train the reward model on review_train_data.pkl with the hyper-parameters of reward_model.yaml.
#   env: DATASET, MODEL_PATH (the base model), DATA_DIR, CHECKPOINT_DIR, OUTPUT_DIR, NUM_GPUS; flags override the yaml
exec "${PYTHON:-python}" "$(dirname "$0")/../qlora_finetune.py" --config "$(dirname "$0")/reward_model.yaml" "$@"
