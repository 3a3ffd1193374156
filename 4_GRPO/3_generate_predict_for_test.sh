#!/usr/bin/env bash
# Stage 4, step 3: the (SFT) Predictor rates every test target given the GRPO-refined Reasoner's reasons, as
# 3_Predictor/3 does with the SFT Reasoner's: writes rating_for_test_by_predictor_grpo.pkl (--split valid: the
# validation rows).  env: DATASET, DATA_DIR, CHECKPOINT_DIR, NUM_GPUS; flags as 3_Predictor/3_generate_predict_for_test.py's
exec "${PYTHON:-python}" "$(dirname "$0")/../3_Predictor/3_generate_predict_for_test.py" --reasoner Reasoner_GRPO "$@"
