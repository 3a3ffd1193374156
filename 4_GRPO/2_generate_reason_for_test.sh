#!/usr/bin/env bash
# Stage 4, step 2: the GRPO-refined Reasoner writes a reason for every test target (greedy), as 2_Reasoner/7 does for
# the SFT Reasoner: writes reason_for_test_by_reasoner_grpo.pkl (--split valid: reason_for_valid_by_reasoner_grpo.pkl).
#   env: DATASET, DATA_DIR, CHECKPOINT_DIR, NUM_GPUS; flags as 2_Reasoner/7_generate_reason_for_test.py's
exec "${PYTHON:-python}" "$(dirname "$0")/../2_Reasoner/7_generate_reason_for_test.py" --reasoner Reasoner_GRPO "$@"
