"""Stage 2, step 2: SFT data for the reward model: the histories (with ratings and averages) plus the target's
real review as the analysis -> "Predicted Rating: x.0".

The official script reads the teacher's summaries (column review_summary) but asks for aspect_preference_summary,
and dies.  The reward model later scores prompts whose histories show the Summarizer's summaries, so it is trained
on those too.

reads   Data/<dataset>/review_8000.pkl, train_summarizer_generation_results.pkl
writes  Data/<dataset>/review_train_data.pkl
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils, prompts

from prompts import rating_prompt
from utils import load_histories, parse_args, rating_answer, read_table, to_messages, write_pickle

(args,) = parse_args()
product_class = args.resolve_product_class()
targets = read_table(args, "review_8000.pkl")
histories = load_histories(args)

examples = [to_messages(rating_prompt(product_class, t.title, histories(t.user_id, t.item_id, t.unixReviewTime),
                                      analysis=t.reviews), rating_answer(t.ratings))
            for t in targets.itertuples()]
write_pickle(examples, args.file("review_train_data.pkl"))
