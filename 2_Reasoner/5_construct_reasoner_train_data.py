"""Stage 2, step 5: SFT data for the Reasoner: the reason prompt (histories without ratings) -> the kept reason.

Also the starting point for users who resume from the authors' published pickles
(train_summarizer_generation_results.pkl, distilling_high_quality_reasons.pkl): their product class is known from the
dataset's name (Music_data, Book_data, Yelp_data) and recorded in dataset.json on first use.

reads   Data/<dataset>/distilling_high_quality_reasons.pkl, train_summarizer_generation_results.pkl
writes  Data/<dataset>/Reasoner_train_instruct.pkl
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils, prompts

from histories import load_histories
from prompts import HistoryPromptArguments, reason_prompt, to_messages
from settings import parse_args, read_table
from utils import COLUMNS

args, prompt = parse_args(HistoryPromptArguments)
targets = read_table(args, "distilling_high_quality_reasons.pkl", COLUMNS + ["personalized_analysis"])
histories = load_histories(args, prompt)

examples = [to_messages(reason_prompt(prompt.product_class, t.title, histories(t.user_id, t.item_id, t.unixReviewTime)),
                        t.personalized_analysis)
            for t in targets.itertuples()]
args.write(examples, "Reasoner_train_instruct.pkl")
