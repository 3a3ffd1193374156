"""Stage 1, step 1: the teacher summarizes every training review into Positive Aspects / Negative Aspects /
User Preference Elements (temperature 0.2, as the official code).

reads   Data/<dataset>/raw_data/train.pkl
writes  Data/<dataset>/train_aspect_preference_summary.pkl  (+ column review_summary)
--dry_run prints the requests, tokens and cost it would send the teacher, and stops before sending any.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils, prompts, teacher

from prompts import PromptArguments, summary_prompt
from teacher import Teacher, TeacherArguments
from settings import parse_args, read_table

TEMPERATURE = 0.2  # as the official code

args, prompt, teacher_args = parse_args(PromptArguments, TeacherArguments, data_parallel=True)
# the teacher checks its settings (and the temperature) before any work
teacher = Teacher(args.file("teacher_cache.sqlite"), teacher_args.dry_run, temperatures=[TEMPERATURE])
reviews = read_table(args, "raw_data/train.pkl")

prompts = [summary_prompt(prompt.product_class, r.title, r.ratings, r.reviews) for r in reviews.itertuples()]
labels = [f"{i} of raw_data/train.pkl (user {r.user_id}, item {r.item_id})" for i, r in enumerate(reviews.itertuples())]
# (under --dry_run, this prints what the teacher would be sent and what it would cost, and stops)
reviews["review_summary"] = teacher.ask(prompts, temperature=TEMPERATURE, labels=labels, desc="teacher summaries")

args.write(reviews, "train_aspect_preference_summary.pkl")
print(teacher.report())
