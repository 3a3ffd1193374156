"""Stage 1, step 2: SFT data for the Summarizer: the summary prompt of each review -> the teacher's summary.

reads   Data/<dataset>/train_aspect_preference_summary.pkl
writes  Data/<dataset>/Summarizer_train_instruct.pkl  (a list of {"messages": [user, assistant]})
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils, prompts

from prompts import PromptArguments, summary_prompt, to_messages
from settings import parse_args, read_table
from utils import COLUMNS

args, prompt = parse_args(PromptArguments)
reviews = read_table(args, "train_aspect_preference_summary.pkl", COLUMNS + ["review_summary"])

examples = [to_messages(summary_prompt(prompt.product_class, r.title, r.ratings, r.reviews), r.review_summary)
            for r in reviews.itertuples()]
args.write(examples, "Summarizer_train_instruct.pkl")
