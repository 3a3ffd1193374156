"""Stage 2, step 7: the trained Reasoner writes a reason for every test target (greedy); with --split valid, for the
validation rows every model choice is made on (at most --eval_limit of them).

reads   Data/<dataset>/raw_data/test.pkl (or valid.pkl), train_summarizer_generation_results.pkl, the Reasoner
writes  Data/<dataset>/reason_for_test_by_reasoner.pkl (or reason_for_valid_by_reasoner.pkl)  (+ column reasoner_reply)
        (4_GRPO/2 runs this with --reasoner Reasoner_GRPO: reason_for_<split>_by_reasoner_grpo.pkl)
"""
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils, prompts, llm

from histories import load_histories
from llm import ModelArguments, load_expert
from prompts import TestPromptArguments, reason_prompt
from settings import SplitArguments, parse_args, read_split
from utils import reasons_file


@dataclass
class ReasonerArguments:
    reasoner: str = field(default="Reasoner", metadata={"help": "Reasoner (SFT), or Reasoner_GRPO (4_GRPO)"})


args, prompt, split, model_args, which = parse_args(TestPromptArguments, SplitArguments, ModelArguments,
                                                    ReasonerArguments, data_parallel=True)
output = reasons_file(split.split, which.reasoner)
rows = read_split(args, split.split, split.eval_limit)
contexts = load_histories(args, prompt).for_rows(rows, prompt.test_history_before_target)
reasoner = load_expert(args, model_args, which.reasoner)

rows["reasoner_reply"] = reasoner.generate([reason_prompt(prompt.product_class, title, h)
                                            for title, h in zip(rows.title, contexts)], desc=which.reasoner)
args.write(rows, output)
