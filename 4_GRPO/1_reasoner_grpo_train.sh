#!/usr/bin/env bash
# Stage 4, step 1: refine the SFT Reasoner with GRPO, rewarded by the frozen Predictor (reasoner_grpo.yaml's settings).
#   env: DATASET, MODEL_PATH, DATA_DIR, CHECKPOINT_DIR, OUTPUT_DIR, NUM_GPUS; flags override the yaml
exec "${PYTHON:-python}" "$(dirname "$0")/1_reasoner_grpo_train.py" --config "$(dirname "$0")/reasoner_grpo.yaml" "$@"
