"""Stage 1, step 4: the trained Summarizer summarizes every training review (greedy); these summaries are the
histories that every later prompt shows.

reads   Data/<dataset>/raw_data/train.pkl, checkpoints/<dataset>/Summarizer/final_checkpoint
writes  Data/<dataset>/train_summarizer_generation_results.pkl  (+ column aspect_preference_summary)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils, prompts, llm

from llm import ModelArguments, generate, load_expert
from prompts import summary_prompt
from utils import SUMMARY, ResultCache, parse_args, read_table

args, model_args = parse_args(ModelArguments)
product_class = args.resolve_product_class()
reviews = read_table(args, "raw_data/train.pkl")
prompts = [summary_prompt(product_class, r.title, r.ratings, r.reviews) for r in reviews.itertuples()]
model, tokenizer, model_id = load_expert(args, model_args, "Summarizer")

reviews, prompts = model_args.shard(tokenizer, reviews, prompts)
reviews[SUMMARY] = generate(model, tokenizer, prompts, max_new_tokens=model_args.max_new_tokens,
                            batch_size=model_args.batch_size, cache=ResultCache(args.file("generation_cache.sqlite")),
                            model_id=model_id, desc="summarizing")

model_args.write(reviews, args.file("train_summarizer_generation_results.pkl"))
