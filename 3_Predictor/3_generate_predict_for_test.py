"""Stage 3, step 3: the trained Predictor rates every test target from the histories and the Reasoner's reason:
softmax over the logits of "1".."5" after "Predicted Rating: ", expectation, clipped to [1, 5].

--no_reason scores the direct-prediction ablation instead (Direct_Predictor, prompts without an analysis).

reads   Data/<dataset>/reason_for_test_by_reasoner.pkl (or raw_data/test.pkl), the summaries, the Predictor
writes  Data/<dataset>/rating_for_test_by_predictor.pkl (or rating_for_test_direct.pkl)  (+ column pred)
"""
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils, prompts, llm

from histories import load_histories
from llm import ModelArguments, load_expert
from prompts import HistoryPromptArguments, rating_prompt
from utils import COLUMNS, parse_args, read_table, write_pickle


@dataclass
class PredictorArguments:
    no_reason: bool = False


args, prompt, model_args, predictor = parse_args(HistoryPromptArguments, ModelArguments, PredictorArguments,
                                                 data_parallel=True)
if predictor.no_reason:
    test = read_table(args, "raw_data/test.pkl")
    analyses = [None] * len(test)
else:
    test = read_table(args, "reason_for_test_by_reasoner.pkl", COLUMNS + ["reasoner_reply"])
    analyses = test["reasoner_reply"].tolist()
contexts = load_histories(args, prompt.max_his).for_rows(test)
predictor_model = load_expert(args, model_args, "Direct_Predictor" if predictor.no_reason else "Predictor")

test["pred"] = predictor_model.score([rating_prompt(prompt.product_class, title, h, analysis)
                                      for title, h, analysis in zip(test.title, contexts, analyses)], desc="Predictor")
write_pickle(test, args.file("rating_for_test_direct.pkl" if predictor.no_reason
                             else "rating_for_test_by_predictor.pkl"))
