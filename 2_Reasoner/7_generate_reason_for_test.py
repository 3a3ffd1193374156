"""Stage 2, step 7: the trained Reasoner writes a reason for every test target (greedy).

reads   Data/<dataset>/raw_data/test.pkl, train_summarizer_generation_results.pkl, the Reasoner
writes  Data/<dataset>/reason_for_test_by_reasoner.pkl  (+ column reasoner_reply)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils, prompts, llm

from llm import ModelArguments, generate, load_expert
from prompts import reason_prompt
from utils import ResultCache, load_histories, parse_args, read_table

args, model_args = parse_args(ModelArguments)
product_class = args.resolve_product_class()
test = read_table(args, "raw_data/test.pkl")
histories = load_histories(args)
prompts = [reason_prompt(product_class, t.title, histories(t.user_id, t.item_id, t.unixReviewTime))
           for t in test.itertuples()]
model, tokenizer, model_id = load_expert(args, model_args, "Reasoner")

test, prompts = model_args.shard(tokenizer, test, prompts)
test["reasoner_reply"] = generate(model, tokenizer, prompts, max_new_tokens=model_args.max_new_tokens,
                                  batch_size=model_args.batch_size, model_id=model_id,
                                  cache=ResultCache(args.file("generation_cache.sqlite")), desc="Reasoner")
model_args.write(test, args.file("reason_for_test_by_reasoner.pkl"))
