"""Stage 2, step 1: sample the training targets: 20,000 reviews that have at least one earlier review of the same
user and of the same item; 8,000 of them train the reward model, the other 12,000 the Reasoner (official numbers
and seeds).  On a dataset with fewer eligible targets, all of them are used, split in the same 2:3 proportion.

The official script also computes a `his_len >= 5` filter and then samples from the unfiltered frame; the authors'
published data were made that way, so the default keeps it off (--min_his_len 5 turns it on).

reads   Data/<dataset>/raw_data/train.pkl, train_summarizer_generation_results.pkl
writes  Data/<dataset>/review_8000.pkl (reward model), train_12000.pkl (Reasoner)  (+ his_len, direct_rating_prompt)
"""
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils, prompts

from histories import load_histories
from prompts import HistoryPromptArguments, rating_prompt
from settings import parse_args, read_table
from utils import fail


@dataclass
class SampleArguments:
    num_samples: int = 20000
    num_reward_samples: int = 8000
    min_his_len: int = 0
    seed: int = 0


args, prompt, sample_args = parse_args(HistoryPromptArguments, SampleArguments)
train = read_table(args, "raw_data/train.pkl")
histories = load_histories(args, prompt)

contexts = histories.for_rows(train)
train["his_len"] = [len(h.user) + len(h.item) for h in contexts]
train["direct_rating_prompt"] = [rating_prompt(prompt.product_class, title, h) for title, h in zip(train.title, contexts)]
eligible = train[[h.user_count > 0 and h.item_count > 0 and len(h.user) + len(h.item) >= sample_args.min_his_len
                  for h in contexts]]

total, n_reward = sample_args.num_samples, sample_args.num_reward_samples
if len(eligible) < total:
    n_reward = round(len(eligible) * n_reward / total)
    total = len(eligible)
    print(f"only {total:,} of {len(train):,} training reviews have an earlier review of their user and of their "
          f"item: using all of them, {n_reward:,} for the reward model and {total - n_reward:,} for the Reasoner")
if n_reward < 1 or total - n_reward < 1:
    fail(f"{len(eligible)} eligible targets are too few to train a reward model and a Reasoner; "
         f"prepare more data (e.g. a larger --max_users in Data/prepare_data.py)")

sample = eligible.sample(total, random_state=sample_args.seed).reset_index(drop=True)
reward = sample.sample(n_reward, random_state=sample_args.seed)
reasoner = sample.drop(reward.index)
args.write(reward.sample(frac=1, random_state=sample_args.seed).reset_index(drop=True), "review_8000.pkl")
args.write(reasoner.sample(frac=1, random_state=sample_args.seed).reset_index(drop=True), "train_12000.pkl")
