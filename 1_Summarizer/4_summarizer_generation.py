"""Stage 1, step 4: the trained Summarizer summarizes every training review (greedy); these summaries are the
histories that every later prompt shows.

reads   Data/<dataset>/raw_data/train.pkl, checkpoints/<dataset>/Summarizer/final_checkpoint
writes  Data/<dataset>/train_summarizer_generation_results.pkl  (+ column aspect_preference_summary)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils, prompts, llm

from histories import HISTORY_TABLE, SUMMARY
from llm import ModelArguments, load_expert
from prompts import PromptArguments, summary_prompt
from settings import parse_args, read_table

args, prompt, model_args = parse_args(PromptArguments, ModelArguments, data_parallel=True)
reviews = read_table(args, "raw_data/train.pkl")
summarizer = load_expert(args, model_args, "Summarizer")

prompts = [summary_prompt(prompt.product_class, r.title, r.ratings, r.reviews) for r in reviews.itertuples()]
reviews[SUMMARY] = summarizer.generate(prompts, desc="summarizing")
args.write(reviews, HISTORY_TABLE)
