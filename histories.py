"""The context every Reasoner and Predictor prompt is built from, and the leakage boundary of the whole pipeline.

For a target review (user, item, time): the user's and the item's last `max_his` reviews strictly before the
target's time, each with its title, rating and summary, and the averages over *all* earlier ratings.  `HistoryIndex`
builds it from per-user / per-item arrays sorted by time, looked up by binary search, instead of scanning the whole
frame for every row as the official scripts do (benchmarks/history_prompts.py).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from settings import DataArguments, read_table
from utils import COLUMNS, KEY, atomic_write, fail, producer, read_pickle

SUMMARY = "aspect_preference_summary"  # the Summarizer's summaries, the column every history shows
HISTORY_TABLE = "train_summarizer_generation_results.pkl"


class Review(NamedTuple):
    title: str
    rating: float
    summary: str
    time: int


class History(NamedTuple):
    user: list[Review]  # the user's last `max_his` reviews before the target, oldest first
    item: list[Review]  # the item's, likewise
    user_avg: float | None  # mean of *all* the user's earlier ratings; None when there are none
    item_avg: float | None
    user_count: int  # how many earlier reviews there are in all
    item_count: int


class _Group:
    """One key column (user or item): rows sorted by (key, time), with where each key's run starts and ends."""

    def __init__(self, df: pd.DataFrame, key: str):
        order = np.lexsort((df["unixReviewTime"].to_numpy(), df[key].to_numpy()))  # stable: ties keep file order
        keys = df[key].to_numpy()[order]
        self.rows = order
        self.times = df["unixReviewTime"].to_numpy()[order]
        self.cumsum = np.concatenate([[0.0], np.cumsum(df["ratings"].to_numpy(dtype=float)[order])])
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.array([], int)
        ends = np.r_[starts[1:], len(keys)]
        self.span = dict(zip(keys[starts].tolist(), zip(starts.tolist(), ends.tolist())))

    def before(self, key, time, max_his):
        """Row numbers of the last `max_his` rows of `key` strictly before `time` (all of them where `time` is None),
        the count and rating sum of all."""
        start, end = self.span.get(key, (0, 0))
        cut = end if time is None else start + int(np.searchsorted(self.times[start:end], time, side="left"))
        return self.rows[max(start, cut - max_his): cut], cut - start, self.cumsum[cut] - self.cumsum[start]

    def any_before(self, keys: pd.Series, times: pd.Series | None) -> np.ndarray:
        """Whether `before` would find at least one row, for many (key, time) at once: the key's earliest row is
        before the time (the key has rows at all, where `times` is None)."""
        first = {key: self.times[start] for key, (start, _) in self.span.items()}
        earliest = keys.map(first)
        return earliest.notna().to_numpy() if times is None else (earliest < times).to_numpy()


class HistoryIndex:
    """Look up, for any (user, item, time), the histories every prompt is built from.

    `reviews` is the review log the histories come from (the training split with its summaries): only rows
    strictly earlier than the target's time are ever returned, so neither the target itself nor anything after
    it can leak into its prompt.  A lookup with `before_target=False` drops that rule and shows the latest reviews of
    the whole table, as the authors' original test-time code did (a4fa718, step2/step7_construct_stage2_test.ipynb):
    asked for explicitly, never by default."""

    def __init__(self, reviews: pd.DataFrame, max_his: int = 10, summary_column: str = SUMMARY):
        if summary_column not in reviews.columns:
            fail(f"the history table has no column {summary_column!r}; "
                 f"run `1_Summarizer/4_summarizer_generation.py` first.")
        self.max_his = max_his
        self.titles = reviews["title"].astype(str).to_numpy()
        self.ratings = reviews["ratings"].to_numpy(dtype=float)
        self.summaries = reviews[summary_column].map(text).to_numpy()
        self.times = reviews["unixReviewTime"].to_numpy().copy()
        self.users = _Group(reviews, "user_id")
        self.items = _Group(reviews, "item_id")

    def _reviews(self, rows) -> list[Review]:
        return [Review(self.titles[r], self.ratings[r], self.summaries[r], int(self.times[r])) for r in rows]

    def __call__(self, user_id, item_id, time, before_target: bool = True) -> History:
        cut = time if before_target else None
        u_rows, u_n, u_sum = self.users.before(user_id, cut, self.max_his)
        i_rows, i_n, i_sum = self.items.before(item_id, cut, self.max_his)
        history = History(self._reviews(u_rows), self._reviews(i_rows),
                          u_sum / u_n if u_n else None, i_sum / i_n if i_n else None, u_n, i_n)
        # Cannot happen; refuse rather than leak.  Checked against the table's own times, not the sorted copies the
        # lookup searched, so that a fault in the lookup or its arrays is caught here.
        if before_target and any(r.time >= time for r in history.user + history.item):
            raise ValueError(f"history entry at or after its target's time {time} (user {user_id}, item {item_id})")
        return history

    def for_rows(self, df: pd.DataFrame, before_target: bool = True) -> list[History]:
        return [self(u, i, t, before_target) for u, i, t in zip(df["user_id"], df["item_id"], df["unixReviewTime"])]

    def has_history(self, df: pd.DataFrame, before_target: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Whether each row of `df` has a user history and an item history (`for_rows`'s user_count and item_count
        above 0), without building them: vectorized, for whole splits."""
        times = df["unixReviewTime"] if before_target else None
        return self.users.any_before(df["user_id"], times), self.items.any_before(df["item_id"], times)


def load_histories(data: DataArguments, prompt) -> HistoryIndex:
    """The index over the Summarizer's summaries of the training reviews, which every Stage 2 and 3 prompt shows, with
    the dataset's recorded history settings (`prompt`: prompts.HistoryPromptArguments).

    Refuses a table that holds any review of the valid or test split (same user, item and time): those must never
    reach a prompt.  The authors' published splits share a few such rows: they are listed in leaked_history_rows.csv
    beside the data, and --drop_leaked_history_rows true (recorded like every prompt setting) drops them from the
    histories."""
    reviews = read_table(data, HISTORY_TABLE, COLUMNS + [SUMMARY], limit=False)
    held_out = [read_pickle(data.file(f"raw_data/{split}.pkl"), KEY)[KEY].assign(split=split)
                for split in ("valid", "test") if data.file(f"raw_data/{split}.pkl").exists()]
    leaked = reviews[KEY].reset_index().merge(pd.concat(held_out).drop_duplicates(KEY), on=KEY) if held_out else []
    if len(leaked):
        listing = data.file("leaked_history_rows.csv")
        atomic_write(listing, lambda f: leaked.rename(columns={"index": "row"}).to_csv(f, index=False), mode="w")
        counts = ", ".join(f"{n} of the {split} split" for split, n in leaked["split"].value_counts().items())
        if not prompt.drop_leaked_history_rows:
            fail(f"{data.file(HISTORY_TABLE)} holds {len(leaked)} review(s) that are also in a held-out split "
                 f"({counts}; e.g. user {leaked.user_id.iloc[0]}, item {leaked.item_id.iloc[0]}, time "
                 f"{leaked.unixReviewTime.iloc[0]}), listed in {listing}: histories may show training reviews only. "
                 f"Rerun {producer(HISTORY_TABLE)} on raw_data/train.pkl, or, for the authors' published data, pass "
                 f"--drop_leaked_history_rows true to leave those rows out of every history.")
        reviews = reviews.drop(index=leaked["index"].unique())
        print(f"left {len(leaked)} review(s) that are also held out ({counts}) out of the histories; see {listing}")
    return HistoryIndex(reviews, max_his=prompt.max_his)


def text(value) -> str:
    """A summary as text: a missing one (None/NaN) becomes "", never the string "nan"."""
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def history_coverage(train: pd.DataFrame, held_out: dict[str, pd.DataFrame],
                     before_target: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Which rows have a user history and which an item history, as every prompt's histories are looked up
    (HistoryIndex over the training reviews): {"train": (user, item), <split>: (user, item), ...}, boolean arrays
    in the rows' order.  A training row's histories are the training reviews before it; a held-out row's, those
    before it too unless `before_target` is false (prompts.TestPromptArguments.test_history_before_target)."""
    index = HistoryIndex(train, summary_column="reviews")  # no summary is shown: any text column will do
    return {split: index.has_history(rows, boundary) for split, rows, boundary in
            [("train", train, True), *((s, rows, before_target) for s, rows in held_out.items())]}


def history_shares(coverage: dict) -> dict:
    """history_coverage's arrays as counts: {split: {"rows", "with_user_history", "with_item_history", "with_both"}}."""
    return {split: {"rows": len(user), "with_user_history": int(user.sum()), "with_item_history": int(item.sum()),
                    "with_both": int((user & item).sum())} for split, (user, item) in coverage.items()}


def history_table(coverage: dict) -> str:
    """The share of each split's rows with a user history, an item history and both, as a printed table."""
    lines = ["rows with a user / item history (an earlier training review of the same user / item; else the prompt "
             "shows N/A there):", f"{'split':<7}{'rows':>7}{'user history':>16}{'item history':>16}{'both':>16}"]
    for split, counts in history_shares(coverage).items():
        n = counts["rows"]
        cells = "".join(f"{f'{k:,} ({k / n:.0%})' if n else '-':>16}" for k in
                        (counts["with_user_history"], counts["with_item_history"], counts["with_both"]))
        lines.append(f"{split:<7}{n:>7,}{cells}")
    return "\n".join(lines)
