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

from llm import ModelArguments, load_expert, predict_ratings
from prompts import rating_prompt
from utils import COLUMNS, RATING_PREFIX, ResultCache, load_histories, parse_args, read_table


@dataclass
class PredictorArguments:
    no_reason: bool = False


args, model_args, predictor = parse_args(ModelArguments, PredictorArguments)
product_class = args.resolve_product_class()
if predictor.no_reason:
    test = read_table(args, "raw_data/test.pkl")
    analyses = [None] * len(test)
else:
    test = read_table(args, "reason_for_test_by_reasoner.pkl", COLUMNS + ["reasoner_reply"])
    analyses = test["reasoner_reply"].tolist()
contexts = load_histories(args).for_rows(test)
prompts = [rating_prompt(product_class, title, h, analysis) for title, h, analysis in zip(test.title, contexts, analyses)]
model, tokenizer, model_id = load_expert(args, model_args, "Direct_Predictor" if predictor.no_reason else "Predictor")

test, prompts = model_args.shard(tokenizer, test, prompts, prefix=RATING_PREFIX)
test["pred"] = predict_ratings(model, tokenizer, prompts, batch_size=model_args.batch_size, model_id=model_id,
                               cache=ResultCache(args.file("generation_cache.sqlite")), desc="Predictor")
model_args.write(test, args.file("rating_for_test_direct.pkl" if predictor.no_reason
                                 else "rating_for_test_by_predictor.pkl"))
