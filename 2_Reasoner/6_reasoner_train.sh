#!/usr/bin/env bash
# Stage 2, step 6: train the Reasoner on Reasoner_train_instruct.pkl with the hyper-parameters of reasoner.yaml.
#   env: DATASET, MODEL_PATH (the base model), DATA_DIR, CHECKPOINT_DIR, OUTPUT_DIR, NUM_GPUS; flags override the yaml
exec "${PYTHON:-python}" "$(dirname "$0")/../qlora_finetune.py" --config "$(dirname "$0")/reasoner.yaml" "$@"
