"""Stage 4, step 2: the GRPO-refined Reasoner writes a reason for every test target (greedy): 2_Reasoner/7 with
--reasoner Reasoner_GRPO.  --split valid: for the validation rows.

reads   Data/<dataset>/raw_data/test.pkl (or valid.pkl), the summaries, checkpoints/<dataset>/Reasoner_GRPO/...
writes  Data/<dataset>/reason_for_test_by_reasoner_grpo.pkl (or reason_for_valid_...)  (+ column reasoner_reply)
"""
import runpy
import sys
from pathlib import Path

sys.argv[1:1] = ["--reasoner", "Reasoner_GRPO"]
runpy.run_path(str(Path(__file__).resolve().parents[1] / "2_Reasoner" / "7_generate_reason_for_test.py"),
               run_name="__main__")
