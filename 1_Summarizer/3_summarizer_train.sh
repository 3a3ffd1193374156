#!/usr/bin/env bash
# Stage 1, step 3: train the Summarizer on Summarizer_train_instruct.pkl with the hyper-parameters of summarizer.yaml.
#   env: DATASET, MODEL_PATH (the base model), DATA_DIR, CHECKPOINT_DIR, OUTPUT_DIR, NUM_GPUS; flags override the yaml
exec "${PYTHON:-python}" "$(dirname "$0")/../qlora_finetune.py" --config "$(dirname "$0")/summarizer.yaml" "$@"
