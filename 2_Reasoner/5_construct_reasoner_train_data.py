"""Stage 2, step 5: SFT data for the Reasoner: the reason prompt (histories without ratings) -> the kept reason.

Also the starting point for users who resume from the authors' published pickles
(train_summarizer_generation_results.pkl, distilling_high_quality_reasons.pkl): pass --product_class when there is
no dataset.json (the authors': "Digital Music", "Book", "Yelp Business").

reads   Data/<dataset>/distilling_high_quality_reasons.pkl, train_summarizer_generation_results.pkl
writes  Data/<dataset>/Reasoner_train_instruct.pkl
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils, prompts

from prompts import reason_prompt
from utils import COLUMNS, load_histories, parse_args, read_table, to_messages, write_pickle

(args,) = parse_args()
product_class = args.resolve_product_class()
targets = read_table(args, "distilling_high_quality_reasons.pkl", COLUMNS + ["personalized_analysis"])
histories = load_histories(args)

examples = [to_messages(reason_prompt(product_class, t.title, histories(t.user_id, t.item_id, t.unixReviewTime)),
                        t.personalized_analysis)
            for t in targets.itertuples()]
write_pickle(examples, args.file("Reasoner_train_instruct.pkl"))
