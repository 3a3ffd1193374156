"""Stage 4, step 3: the (SFT) Predictor rates every test target given the GRPO-refined Reasoner's reasons:
3_Predictor/3 with --reasoner Reasoner_GRPO.  --split valid: the validation rows.

reads   Data/<dataset>/reason_for_test_by_reasoner_grpo.pkl (or reason_for_valid_...), the summaries, the Predictor
writes  Data/<dataset>/rating_for_test_by_predictor_grpo.pkl (or rating_for_valid_...)  (+ column pred)
"""
import runpy
import sys
from pathlib import Path

sys.argv[1:1] = ["--reasoner", "Reasoner_GRPO"]
runpy.run_path(str(Path(__file__).resolve().parents[1] / "3_Predictor" / "3_generate_predict_for_test.py"),
               run_name="__main__")
