"""Stage 3, step 3: the trained Predictor rates every test target from the histories and the Reasoner's reason:
softmax over the logits of "1".."5" after "Predicted Rating: ", expectation, clipped to [1, 5].

--no_reason scores the authors' direct-prediction ablation instead (Direct_Predictor, their prompt without an
analysis: prompts.direct_prediction_prompt).

reads   Data/<dataset>/reason_for_test_by_reasoner.pkl (or raw_data/test.pkl), the summaries, the Predictor
writes  Data/<dataset>/rating_for_test_by_predictor.pkl (or rating_for_test_direct.pkl)  (+ column pred)
"""
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils, prompts, llm

from histories import load_histories
from llm import ModelArguments, load_expert
from prompts import TestPromptArguments, direct_prediction_prompt, rating_prompt
from utils import COLUMNS, parse_args, read_table, write_pickle


@dataclass
class PredictorArguments:
    no_reason: bool = field(default=False, metadata={"help": "score the direct-prediction ablation instead"})


args, prompt, model_args, predictor = parse_args(TestPromptArguments, ModelArguments, PredictorArguments,
                                                 data_parallel=True)
test = read_table(args, "raw_data/test.pkl") if predictor.no_reason else \
    read_table(args, "reason_for_test_by_reasoner.pkl", COLUMNS + ["reasoner_reply"])
contexts = load_histories(args, prompt, prompt.test_history_before_target).for_rows(test)
predictor_model = load_expert(args, model_args, "Direct_Predictor" if predictor.no_reason else "Predictor")

if predictor.no_reason:
    questions = [direct_prediction_prompt(prompt.product_class, t, h) for t, h in zip(test.title, contexts)]
else:
    questions = [rating_prompt(prompt.product_class, t, h, a) for t, h, a in zip(test.title, contexts,
                                                                                 test.reasoner_reply)]
test["pred"] = predictor_model.score(questions, desc="Predictor")
write_pickle(test, args.file("rating_for_test_direct.pkl" if predictor.no_reason
                             else "rating_for_test_by_predictor.pkl"))
