"""Stage 3, step 3: the trained Predictor rates every test target from the histories and the Reasoner's reason:
softmax over the logits of "1".."5" after "Predicted Rating: ", expectation, clipped to [1, 5].  --split valid rates
the validation rows instead.

--no_reason scores the authors' direct-prediction ablation instead (Direct_Predictor, their prompt without an
analysis: prompts.direct_prediction_prompt).  --reasoner Reasoner_GRPO (run by 4_GRPO/3) rates with the reasons of
the GRPO-refined Reasoner.

reads   Data/<dataset>/reason_for_test_by_reasoner.pkl (or raw_data/test.pkl), the summaries, the Predictor
writes  Data/<dataset>/rating_for_test_by_predictor.pkl (or rating_for_test_direct.pkl)  (+ column pred)
        (test -> valid with --split valid; by_predictor -> by_predictor_grpo with --reasoner Reasoner_GRPO)
"""
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils, prompts, llm

from histories import load_histories
from llm import ModelArguments, load_expert
from prompts import TestPromptArguments, predictor_prompts
from settings import SplitArguments, parse_args, read_split, read_table
from utils import COLUMNS, fail, ratings_file, reasons_file


@dataclass
class PredictorArguments:
    no_reason: bool = field(default=False, metadata={"help": "score the direct-prediction ablation instead"})
    reasoner: str = field(default="Reasoner", metadata={"help": "whose reasons: Reasoner (SFT) or Reasoner_GRPO"})


args, prompt, split, model_args, predictor = parse_args(TestPromptArguments, SplitArguments, ModelArguments,
                                                        PredictorArguments, data_parallel=True)
if predictor.no_reason and predictor.reasoner != "Reasoner":
    fail(f"--no_reason rates without reasons, so --reasoner {predictor.reasoner} would be ignored: pass one of the two")
if predictor.no_reason:
    rows = read_split(args, split.split, split.eval_limit)
else:
    rows = read_table(args, reasons_file(split.split, predictor.reasoner), COLUMNS + ["reasoner_reply"])
contexts = load_histories(args, prompt).for_rows(rows, prompt.test_history_before_target)
predictor_model = load_expert(args, model_args, "Direct_Predictor" if predictor.no_reason else "Predictor")

questions = predictor_prompts(prompt.product_class, rows.title, contexts,
                              None if predictor.no_reason else rows.reasoner_reply)
rows["pred"] = predictor_model.score(questions, desc="Predictor")
args.write(rows, ratings_file(split.split, None if predictor.no_reason else predictor.reasoner))
