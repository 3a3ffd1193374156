"""Stage 2, step 2: SFT data for the reward model: the histories (with ratings and averages) plus the target's
real review as the analysis -> "Predicted Rating: x.0"; and the same for the validation rows, on which the reward
model's trainer picks its best checkpoint.

The official script reads the teacher's summaries (column review_summary) but asks for aspect_preference_summary,
and dies.  The reward model later scores prompts whose histories show the Summarizer's summaries, so it is trained
on those too.

reads   Data/<dataset>/review_8000.pkl, raw_data/valid.pkl, train_summarizer_generation_results.pkl
writes  Data/<dataset>/review_train_data.pkl, review_valid_data.pkl
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils, prompts

from histories import load_histories
from prompts import TestPromptArguments, rating_answer, rating_prompt, to_messages
from settings import ValidArguments, parse_args, read_split, read_table

args, prompt, valid = parse_args(TestPromptArguments, ValidArguments)


def examples(rows, before_target=True):
    return [to_messages(rating_prompt(prompt.product_class, t.title, h, analysis=t.reviews), rating_answer(t.ratings))
            for t, h in zip(rows.itertuples(), histories.for_rows(rows, before_target))]


histories = load_histories(args, prompt)
args.write(examples(read_table(args, "review_8000.pkl")), "review_train_data.pkl")
if args.file("raw_data/valid.pkl").exists():  # histories as the test set's
    args.write(examples(read_split(args, "valid", valid.eval_limit), prompt.test_history_before_target),
               "review_valid_data.pkl")
