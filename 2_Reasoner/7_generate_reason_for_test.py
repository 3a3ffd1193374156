"""Stage 2, step 7: the trained Reasoner writes a reason for every test target (greedy).

reads   Data/<dataset>/raw_data/test.pkl, train_summarizer_generation_results.pkl, the Reasoner
writes  Data/<dataset>/reason_for_test_by_reasoner.pkl  (+ column reasoner_reply)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils, prompts, llm

from histories import load_histories
from llm import ModelArguments, load_expert
from prompts import TestPromptArguments, reason_prompt
from utils import parse_args, read_table, write_pickle

args, prompt, model_args = parse_args(TestPromptArguments, ModelArguments, data_parallel=True)
test = read_table(args, "raw_data/test.pkl")
contexts = load_histories(args, prompt, prompt.test_history_before_target).for_rows(test)
reasoner = load_expert(args, model_args, "Reasoner")

test["reasoner_reply"] = reasoner.generate([reason_prompt(prompt.product_class, title, h)
                                            for title, h in zip(test.title, contexts)], desc="Reasoner")
write_pickle(test, args.file("reason_for_test_by_reasoner.pkl"))
