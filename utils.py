"""Plumbing shared by every numbered script: arguments, checked reads, atomic writes, and the history index.

Every stage builds the same context for a target review: the user's and the item's last 10 reviews strictly
before the target's time (with their summaries), and the averages over *all* earlier ratings.  `HistoryIndex`
builds it from per-user / per-item arrays sorted by time, looked up by binary search, instead of scanning the
whole frame for every row as the official scripts do.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import sqlite3
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

COLUMNS = ["user_id", "item_id", "title", "ratings", "reviews", "unixReviewTime"]
SUMMARY = "aspect_preference_summary"
RATING_PREFIX = "Predicted Rating: "

# Which step writes each file, so that a missing input can say what to run first.
PRODUCERS = {
    "raw_data/train.pkl": "Data/prepare_data.py",
    "raw_data/valid.pkl": "Data/prepare_data.py",
    "raw_data/test.pkl": "Data/prepare_data.py",
    "dataset.json": "Data/prepare_data.py",
    "train_aspect_preference_summary.pkl": "1_Summarizer/1_distilling_aspect_preference_summary.py",
    "Summarizer_train_instruct.pkl": "1_Summarizer/2_construct_summarizer_train_data.py",
    "Summarizer": "1_Summarizer/3_summarizer_train.sh",
    "train_summarizer_generation_results.pkl": "1_Summarizer/4_generate_summary_for_train.py",
    "review_8000.pkl": "2_Reasoner/1_sample_train_data.py",
    "train_12000.pkl": "2_Reasoner/1_sample_train_data.py",
    "review_train_data.pkl": "2_Reasoner/2_construct_reward_train_data.py",
    "reason_reward_model": "2_Reasoner/3_reward_model_train.sh",
    "distilling_high_quality_reasons.pkl": "2_Reasoner/4_distilling_possible_reason.py",
    "Reasoner_train_instruct.pkl": "2_Reasoner/5_construct_reasoner_train_data.py",
    "Reasoner": "2_Reasoner/6_reasoner_train.sh",
    "reason_for_test_by_reasoner.pkl": "2_Reasoner/7_generate_reason_for_test.py",
    "Predictor_train_instruct.pkl": "3_Predictor/1_construct_predictor_train_data.py",
    "Direct_Predictor_train_instruct.pkl": "3_Predictor/1_construct_predictor_train_data.py --no_reason",
    "Predictor": "3_Predictor/2_predictor_train.sh",
    "Direct_Predictor": "NAME=Direct_Predictor bash 3_Predictor/2_predictor_train.sh",
    "rating_for_test_by_predictor.pkl": "3_Predictor/3_generate_predict_for_test.py",
    "rating_for_test_direct.pkl": "3_Predictor/3_generate_predict_for_test.py --no_reason",
}


def fail(message: str):
    """Stop the script with one clear message (and a non-zero exit), never a deep traceback."""
    raise SystemExit(f"error: {message}")


# ----------------------------------------------------------------------------------------------- arguments
@dataclass
class DataArguments:
    dataset: str | None = field(default=None, metadata={"help": "dataset name under --data_dir (default: $DATASET)"})
    data_dir: str = field(default="Data", metadata={"help": "folder that holds one folder per dataset"})
    product_class: str | None = field(
        default=None, metadata={"help": "product class used in the prompts (default: from dataset.json)"})
    limit: int | None = field(default=None, metadata={"help": "only the first N rows, for quick runs"})
    checkpoint_dir: str = field(default="checkpoints", metadata={"help": "where the *_train.sh scripts save"})
    max_his: int = field(default=10, metadata={"help": "reviews shown per user / item history"})

    def __post_init__(self):
        self.dataset = self.dataset or os.environ.get("DATASET")
        if not self.dataset:
            fail("no dataset given: pass --dataset NAME or set DATASET")

    @property
    def path(self) -> Path:
        return Path(self.data_dir) / self.dataset

    def file(self, name: str) -> Path:
        return self.path / name

    def checkpoint(self, expert: str) -> Path:
        """The adapter that `<expert>`'s train script writes."""
        return Path(self.checkpoint_dir) / self.dataset / expert / "final_checkpoint"

    def resolve_product_class(self) -> str:
        if self.product_class:
            return self.product_class
        meta = self.file("dataset.json")
        if meta.exists():
            return json.loads(meta.read_text())["product_class"]
        fail(f"{meta} not found: pass --product_class, or prepare the dataset with Data/prepare_data.py")


def parse_args(*dataclass_types, args=None):
    """Parse command-line flags into the given dataclasses (TRL-style), always with DataArguments first."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser((DataArguments, *dataclass_types))
    return parser.parse_args_into_dataclasses(args=args)


def require_model(path: str | Path) -> str:
    """A model folder (base model or LoRA adapter) that must exist before any work starts."""
    path = Path(path)
    if (path / "adapter_config.json").exists() or (path / "config.json").exists():
        return str(path)
    expert = path.parent.name if path.name == "final_checkpoint" else path.name
    hint = f" Run `{PRODUCERS[expert]}` first." if expert in PRODUCERS else ""
    fail(f"no model at {path}.{hint}")


# ---------------------------------------------------------------------------------------------- reading files
def _producer(path: Path) -> str:
    for name, script in PRODUCERS.items():
        if str(path).replace(os.sep, "/").endswith(name):
            return f"`{script}`"
    return "the step that writes it"


def read_pickle(path: str | Path, columns=(), what="table"):
    """Load a pickle written by an earlier step and check it, so that a bad input fails here with a clear
    message rather than deep inside pandas.  `columns`: required columns of a DataFrame; `what="table"` wants a
    DataFrame, `what="messages"` a list of {"messages": [...]} (SFT data), `what="any"` whatever it holds."""
    path = Path(path)
    if not path.exists():
        fail(f"{path} not found. Run {_producer(path)} first.")
    try:
        obj = pd.read_pickle(path)
    except Exception as e:  # truncated, corrupted, or not a pickle at all
        fail(f"{path} cannot be read ({type(e).__name__}: {e}); it is truncated or corrupted: "
             f"delete it and rerun {_producer(path)}.")
    if what == "any":
        return obj
    if what == "messages":
        if not (isinstance(obj, list) and all(isinstance(x, dict) and "messages" in x for x in obj)):
            fail(f"{path} is not a list of {{'messages': [...]}} examples; rerun {_producer(path)}.")
        return obj
    if not isinstance(obj, pd.DataFrame):
        fail(f"{path} holds a {type(obj).__name__}, not a DataFrame; rerun {_producer(path)}.")
    missing = [c for c in columns if c not in obj.columns]
    if missing:
        fail(f"{path} lacks column(s) {missing} (it has {list(obj.columns)}); rerun {_producer(path)}.")
    return obj


def read_table(args: DataArguments, name: str, columns=COLUMNS, limit=True) -> pd.DataFrame:
    """Read `Data/<dataset>/<name>`, check its columns, and apply --limit."""
    df = read_pickle(args.file(name), columns)
    if limit and args.limit is not None:
        df = df.iloc[: args.limit]
    return df.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------- writing files
def atomic_write(path: str | Path, write, mode="wb"):
    """Write through a temporary file in the same folder and rename it into place: a reader (or a rerun after a
    crash) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as an ordinary new file would be, not mkstemp's 0600
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_pickle(obj, path: str | Path):
    atomic_write(path, lambda f: pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL))
    print(f"wrote {path} ({len(obj):,} rows)")


def shard_path(path: Path, shard_id: int, num_shards: int) -> Path:
    return path.with_name(f"{path.stem}.shard-{shard_id}-of-{num_shards}{path.suffix}")


def write_json(obj, path: str | Path):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=str) + "\n"), mode="w")


def to_messages(question: str, answer: str) -> dict:
    """One SFT example in the official format."""
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def rating_answer(rating) -> str:
    return f"{RATING_PREFIX}{float(rating):.1f}"


# ---------------------------------------------------------------------------------------------- histories
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
        """Row numbers of the last `max_his` rows of `key` strictly before `time`, the count and rating sum of all."""
        start, end = self.span.get(key, (0, 0))
        cut = start + int(np.searchsorted(self.times[start:end], time, side="left"))
        return self.rows[max(start, cut - max_his): cut], cut - start, self.cumsum[cut] - self.cumsum[start]


class HistoryIndex:
    """Look up, for any (user, item, time), the histories every prompt is built from.

    `reviews` is the review log the histories come from (the training split with its summaries): only rows
    strictly earlier than the target's time are ever returned, so neither the target itself nor anything after
    it can leak into its prompt."""

    def __init__(self, reviews: pd.DataFrame, max_his: int = 10, summary_column: str = SUMMARY):
        if summary_column not in reviews.columns:
            fail(f"the history table has no column {summary_column!r}; "
                 f"run `1_Summarizer/4_generate_summary_for_train.py` first.")
        self.max_his = max_his
        self.titles = reviews["title"].astype(str).to_numpy()
        self.ratings = reviews["ratings"].to_numpy(dtype=float)
        self.summaries = reviews[summary_column].map(_text).to_numpy()
        self.times = reviews["unixReviewTime"].to_numpy()
        self.users = _Group(reviews, "user_id")
        self.items = _Group(reviews, "item_id")

    def _reviews(self, rows) -> list[Review]:
        return [Review(self.titles[r], self.ratings[r], self.summaries[r], int(self.times[r])) for r in rows]

    def __call__(self, user_id, item_id, time) -> History:
        u_rows, u_n, u_sum = self.users.before(user_id, time, self.max_his)
        i_rows, i_n, i_sum = self.items.before(item_id, time, self.max_his)
        history = History(self._reviews(u_rows), self._reviews(i_rows),
                          u_sum / u_n if u_n else None, i_sum / i_n if i_n else None, u_n, i_n)
        if any(r.time >= time for r in history.user + history.item):  # cannot happen; refuse rather than leak
            raise ValueError(f"history entry at or after its target's time {time} (user {user_id}, item {item_id})")
        return history

    def for_rows(self, df: pd.DataFrame) -> list[History]:
        return [self(u, i, t) for u, i, t in zip(df["user_id"], df["item_id"], df["unixReviewTime"])]


def load_histories(args: DataArguments) -> HistoryIndex:
    """The index over the Summarizer's summaries of the training reviews, which every Stage 2 and 3 prompt shows.
    Refuses a table that holds any review of the valid or test split: those must never reach a prompt."""
    name = "train_summarizer_generation_results.pkl"
    reviews = read_table(args, name, COLUMNS + [SUMMARY], limit=False)
    key = ["user_id", "item_id", "unixReviewTime"]
    for split in ("valid", "test"):
        if args.file(f"raw_data/{split}.pkl").exists():
            held_out = read_pickle(args.file(f"raw_data/{split}.pkl"), key)
            leaked = reviews[key].merge(held_out[key].drop_duplicates(), on=key)
            if len(leaked):
                fail(f"{args.file(name)} holds {len(leaked)} review(s) of the {split} split (e.g. user "
                     f"{leaked.user_id.iloc[0]}, item {leaked.item_id.iloc[0]}): histories may show training reviews "
                     f"only. Rerun {_producer(Path(name))} on raw_data/train.pkl.")
    return HistoryIndex(reviews, max_his=args.max_his)


def _text(value) -> str:
    """A summary as text: a missing one (None/NaN) becomes "", never the string "nan"."""
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


# ---------------------------------------------------------------------------------------------- result cache
class ResultCache:
    """Answers already paid for (teacher calls) or computed (generations, scores), one SQLite file, key -> JSON.

    Each answer is committed as soon as it arrives, so a rerun after a crash, a kill or a Ctrl-C asks again for
    nothing it already has.  Keys are hashes of everything that determines the answer (see `key`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=60)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, value TEXT, meta TEXT)")
        except sqlite3.DatabaseError as e:
            fail(f"the cache {self.path} is corrupted ({e}); move it away to start it afresh "
                 f"(its answers would then be asked for again).")

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get_many(self, keys) -> dict:
        found, keys = {}, list(dict.fromkeys(keys))
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start:start + 500]
                rows = self._db.execute(
                    f"SELECT key, value FROM results WHERE key IN ({','.join('?' * len(chunk))})", chunk)
                found.update((k, json.loads(v)) for k, v in rows)
        return found

    def put_many(self, items: dict, meta: dict | None = None):
        """Store {key: value} in one transaction: all of a batch is kept, or none of it."""
        meta = json.dumps(meta or {})
        with self._lock:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?)",
                                     [(k, json.dumps(v, ensure_ascii=False), meta) for k, v in items.items()])

    def metas(self):
        with self._lock:
            return [json.loads(m) for (m,) in self._db.execute("SELECT meta FROM results")]

    def __len__(self):
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
