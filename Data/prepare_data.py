"""Turn a public review dump (Amazon 2014 / 2018 / 2023, or Yelp) into the splits that every later step reads.

    python Data/prepare_data.py --input reviews_Musical_Instruments_5.json.gz --dataset Musical_Instruments

writes Data/<NAME>/raw_data/{train,valid,test}.pkl (DataFrames with the columns utils.COLUMNS) and
Data/<NAME>/dataset.json (where the data came from, the split, the counts, and the settings that shape every later
prompt: the product class and the history length).  An existing Data/<NAME>/ (perhaps the authors' archive) is never
replaced unless asked (--overwrite); even then dataset.json is updated, keeping the settings that later steps recorded
there, and a prompt-shaping setting other than the recorded one is refused.

The split is chronological and global: all reviews are sorted by time and cut at two timestamps, so every test
review is later than every validation review, which is later than every training review.  No future information
leaks into training or into any history a prompt is built from, as in a real deployment.  Reviews that share a
timestamp always land in the same split.

The whole file is kept unless a slice is asked for: --max_users N (a random sample of users, sparse histories) or
--dense_slice N (a dense slice in which every held-out review's user and item have histories, the demo's; see
dense_slice).  The summary prints, for each split, the rows whose prompts will show a user and an item history.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils

import argparse
import ast
import gzip
import hashlib
import heapq
import json
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
from tqdm import tqdm

from histories import history_coverage, history_table
from utils import COLUMNS, fail, read_json, write_json, write_pickle

SPLITS = ("train", "valid", "test")
OUTPUTS = [f"raw_data/{name}.pkl" for name in SPLITS] + ["dataset.json"]
SPLIT_RULE = ("global chronological: all reviews sorted by (unixReviewTime, file order); train < t1 <= valid < t2 "
              "<= test, with t1 and t2 the timestamps at the train and train+valid fractions of the rows, so that "
              "reviews sharing a timestamp stay in one split")


class Fields(NamedTuple):
    user: str
    items: tuple[str, ...]  # the first one a record has is its item id
    rating: str
    text: str
    time: str
    seconds: Callable  # the time field's value -> unix seconds


def yelp_seconds(date: str) -> int:
    return int(datetime.fromisoformat(date).replace(tzinfo=timezone.utc).timestamp())


AMAZON = Fields("reviewerID", ("asin",), "overall", "reviewText", "unixReviewTime", int)
FORMATS = {
    "amazon2014": AMAZON,
    "amazon2018": AMAZON,  # adds verified, vote, style, which are not used
    "amazon2023": Fields("user_id", ("parent_asin", "asin"), "rating", "text", "timestamp", lambda ms: int(ms) // 1000),
    "yelp": Fields("user_id", ("business_id",), "stars", "text", "date", yelp_seconds),
}


def split_fractions(text: str) -> list[float]:
    try:
        fractions = [float(x) for x in text.split(",")]
    except ValueError:
        fractions = []
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"want three positive fractions that sum to 1, like 0.8,0.1,0.1; got {text!r}")
    return fractions


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--input", type=Path, required=True, help="the review file: JSON lines, plain or gzipped")
parser.add_argument("--meta", type=Path, help="Amazon meta_*.json(.gz), or the Yelp business file: the titles")
parser.add_argument("--dataset", required=True, help="the dataset's name: its folder under --data_dir")
parser.add_argument("--format", default="auto", choices=["auto", *FORMATS])
parser.add_argument("--product_class", help="what the items are, for the prompts (default: from the file name)")
parser.add_argument("--data_dir", type=Path, default=Path(os.environ.get("DATA_DIR", "Data")),
                    help="where the dataset's folder goes (default: $DATA_DIR, else Data)")
parser.add_argument("--max_his", type=int,
                    help="reviews shown per user / item history in every prompt (default 10, as the paper, or the "
                         "value recorded in an existing dataset.json); recorded in dataset.json, where every later "
                         "step reads it")
parser.add_argument("--max_users", type=int, help="keep a random sample of this many users (all their reviews)")
parser.add_argument("--dense_slice", type=int, metavar="N",
                    help="keep a dense slice of at most N reviews, in which users and items have histories, as in the "
                         "paper's 5-core data (see dense_slice; run_all.sh's demo: 345)")
parser.add_argument("--seed", type=int, default=0, help="for --max_users and --dense_slice")
parser.add_argument("--split", type=split_fractions, default="0.8,0.1,0.1", help="train,valid,test fractions")
parser.add_argument("--overwrite", action="store_true",
                    help="replace the splits of an existing Data/<dataset>/ (its dataset.json is updated, not rewritten)")
PROMPT_SETTINGS = ("product_class", "max_his")  # recorded here; every later step builds its prompts with them


# ---------------------------------------------------------------------------------------------- reading
def read_lines(path: Path):
    """(line number, line) for each non-blank line of a plain or gzipped text file."""
    with path.open("rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open if gzipped else open)(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(tqdm(f, desc=f"reading {path.name}", unit=" lines"), 1):
                if line.strip():
                    yield number, line
    except (OSError, EOFError, UnicodeDecodeError) as e:
        fail(f"{path} cannot be read ({type(e).__name__}: {e})")


def parse(line: str, path: Path, number: int, literal=False) -> dict:
    """One JSON object; with `literal`, a Python dict literal too (the 2014 Amazon meta files)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        if not literal:
            fail(f"{path}, line {number}: not valid JSON ({e})")
        try:
            record = ast.literal_eval(line)
        except (ValueError, SyntaxError, TypeError):
            fail(f"{path}, line {number}: neither JSON nor a Python dict literal ({e})")
    if not isinstance(record, dict):
        fail(f"{path}, line {number}: not a JSON object")
    return record


def detect(record: dict, path: Path) -> str:
    keys = set(record)
    if {"reviewerID", "asin"} <= keys:
        return "amazon2018" if keys & {"verified", "vote", "style"} else "amazon2014"
    if {"user_id", "business_id"} <= keys:
        return "yelp"
    if "user_id" in keys and keys & {"parent_asin", "asin"}:
        return "amazon2023"
    known = "; ".join(f"{name}: {f.user}, {' or '.join(f.items)}, {f.rating}, {f.text}, {f.time}"
                      for name, f in FORMATS.items() if name != "amazon2018")
    fail(f"{path}: unknown format; its first record has the keys {sorted(keys)}, but the known formats have "
         f"{known}; amazon2018: as amazon2014, plus verified, vote or style")


def read_reviews(path: Path, fmt: str) -> tuple[pd.DataFrame, str]:
    """The reviews in file order, and the format they were read as."""
    rows, has_text = [], False
    for number, line in read_lines(path):
        record = parse(line, path, number)
        if not rows:
            fmt = detect(record, path) if fmt == "auto" else fmt
            f = FORMATS[fmt]
        item = next((record[key] for key in f.items if record.get(key) is not None), None)
        for what, key, value in (("rating", f.rating, record.get(f.rating)), ("user id", f.user, record.get(f.user)),
                                 ("item id", " or ".join(f.items), item), ("time", f.time, record.get(f.time))):
            if value is None:
                fail(f"{path}, line {number}: no {what} (field {key}; the file is read as {fmt})")
        try:
            rating = float(record[f.rating])
        except (TypeError, ValueError):
            rating = None
        if rating is None or not 1 <= rating <= 5:
            fail(f"{path}, line {number}: rating {record[f.rating]!r} is outside 1-5")
        try:
            time = f.seconds(record[f.time])
        except (TypeError, ValueError, OverflowError):
            fail(f"{path}, line {number}: cannot read the time {record[f.time]!r} (field {f.time})")
        text = record.get(f.text)
        has_text = has_text or f.text in record
        rows.append((str(record[f.user]), str(item), rating, "" if text is None else str(text), time))
    if not rows:
        fail(f"{path} is empty: it holds no reviews")
    if not has_text:
        fail(f"{path} has ratings but no review text (no {f.text!r} field in any record); the pipeline learns "
             f"from the review texts")
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "ratings", "reviews", "unixReviewTime"])
    return df.astype({"ratings": "float64", "unixReviewTime": "int64"}), fmt


def read_titles(path: Path, items: set) -> dict:
    """item id -> title for the given items, from an Amazon meta file (asin / parent_asin -> title) or the Yelp
    business file (business_id -> name)."""
    titles = {}
    for number, line in read_lines(path):
        record = parse(line, path, number, literal=True)
        title = record.get("title") or record.get("name")
        if not title:
            continue
        for key in ("parent_asin", "asin", "business_id"):
            if str(record.get(key)) in items:
                titles[str(record[key])] = str(title)
    if not titles:
        fail(f"{path} has a title for none of the {len(items):,} items: is it the metadata of this review file?")
    return titles


def default_product_class(fmt: str, path: Path) -> str:
    """"Yelp Business" as in the official code; for Amazon the category in the file name
    (reviews_Musical_Instruments_5.json.gz, Musical_Instruments.jsonl.gz -> "Musical Instruments")."""
    if fmt == "yelp":
        return "Yelp Business"
    match = re.fullmatch(r"(?:reviews_)?([A-Z][A-Za-z]*(?:_[A-Za-z]+)*?)(?:_\d+)?", path.name.split(".")[0])
    return match[1].replace("_", " ") if match else "Product"


def md5(path: Path | None) -> str | None:
    if path is None:
        return None
    with path.open("rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


# ---------------------------------------------------------------------------------------------- splitting
def sample_users(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    users = np.array(sorted(df["user_id"].unique()), dtype=object)
    if n >= len(users):
        print(f"--max_users {n}: the file has only {len(users):,} users; keeping them all")
        return df
    chosen = users[np.random.default_rng(seed).choice(len(users), size=n, replace=False)]
    kept = df[df["user_id"].isin(chosen)].reset_index(drop=True)
    print(f"--max_users {n} --seed {seed}: kept {n:,} of {len(users):,} users, {len(kept):,} of {len(df):,} reviews")
    return kept


def dense_slice(df: pd.DataFrame, n: int, seed: int, fractions: list[float]) -> pd.DataFrame:
    """At most `n` reviews in which most rows have a user and an item history, chosen from who reviewed what and when,
    never from the ratings or the texts:

    1. the densest part: drop the user or item with the fewest reviews left, one at a time (ties in a random order
       drawn from `seed`), until at most `n` reviews remain: the greedy peeling that finds k-cores and dense subgraphs;
    2. warm held-out rows: split that part by time (split_by_time) and drop the users and items with no review in its
       training split, which have validation or test reviews only, again until there are none (dropping reviews moves
       the cut times).  Every validation and test review then has an earlier review of its user and of its item, as
       the histories of every prompt look for (histories.HistoryIndex); a training review has one where it is not its
       user's (item's) first."""
    users, user_of = np.unique(df["user_id"].to_numpy(dtype=str), return_inverse=True)
    items, item_of = np.unique(df["item_id"].to_numpy(dtype=str), return_inverse=True)
    ends = np.stack([user_of, len(users) + item_of], axis=1)  # each review's two nodes: its user and its item
    degree = np.bincount(ends.ravel(), minlength=len(users) + len(items))
    order = np.argsort(ends.ravel(), kind="stable") // 2
    reviews_of = np.split(order, np.cumsum(degree)[:-1])  # node -> its reviews
    tie = np.random.default_rng(seed).permutation(len(degree))
    heap = [(d, t, node) for node, (d, t) in enumerate(zip(degree.tolist(), tie.tolist()))]
    heapq.heapify(heap)
    kept, left = np.ones(len(df), bool), len(df)
    while left > n:
        d, _, node = heapq.heappop(heap)
        if d != degree[node]:  # an outdated entry: the node has lost reviews since
            continue
        for review in reviews_of[node][kept[reviews_of[node]]]:
            kept[review], left = False, left - 1
            other = ends[review].sum() - node
            degree[other] -= 1
            heapq.heappush(heap, (int(degree[other]), int(tie[other]), other))
        degree[node] = -1  # gone
    part = df[kept]
    advice = (f"--dense_slice {n} --seed {seed} left too few reviews once the held-out reviews of users and items "
              f"without a training review were dropped; ask for more (a larger --dense_slice) or another --seed")
    while True:
        if part.empty:
            fail(f"no review is left: {advice}")
        train = split_by_time(part, fractions, advice)[0]["train"]
        warm = part["user_id"].isin(train["user_id"]) & part["item_id"].isin(train["item_id"])
        if warm.all():
            break
        part = part[warm]
    part = part.reset_index(drop=True)
    print(f"--dense_slice {n} --seed {seed}: kept {part['user_id'].nunique():,} of {len(users):,} users, "
          f"{part['item_id'].nunique():,} of {len(items):,} items, {len(part):,} of {len(df):,} reviews")
    return part


def date(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def split_by_time(df: pd.DataFrame, fractions: list[float],
                  advice: str = "use more reviews or other --split fractions") -> tuple[dict, list[int]]:
    """Train, valid and test (see the module docstring), and the two cut timestamps; `advice`: what to do where a
    split would be empty."""
    df = df.sort_values("unixReviewTime", kind="stable", ignore_index=True)
    times = df["unixReviewTime"].to_numpy()
    positions = np.round(np.cumsum(fractions[:2]) * len(times)).astype(int)
    cuts = [int(times[p]) if p < len(times) else int(times[-1]) + 1 for p in positions]
    edges = [0, *np.searchsorted(times, cuts, side="left").tolist(), len(times)]
    splits = {name: df.iloc[a:b].reset_index(drop=True) for name, a, b in zip(SPLITS, edges, edges[1:])}
    for name, part in splits.items():
        if part.empty:
            fail(f"the {name} split would be empty: {len(df):,} reviews from {date(times[0])} to {date(times[-1])}, "
                 f"cut at {date(cuts[0])} and {date(cuts[1])} (reviews sharing a timestamp stay in one split); "
                 f"{advice}")
    return splits, cuts


def counts(df: pd.DataFrame) -> dict:
    return {"rows": len(df), "users": df["user_id"].nunique(), "items": df["item_id"].nunique()}


# ---------------------------------------------------------------------------------------------- writing
def write_dataset(target: Path, splits: dict, info: dict):
    """Write into a temporary folder next to `target` and move the files into place only once all are written, so
    a failed run leaves no partial dataset and an earlier one untouched.  Other files in `target` (the outputs of
    later steps) are kept, with a warning where the splits they were made from have changed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        for name, part in splits.items():
            write_pickle(part, staging / "raw_data" / f"{name}.pkl")
        write_json(info, staging / "dataset.json")
        changed = any(not (target / file).exists() or (target / file).read_bytes() != (staging / file).read_bytes()
                      for file in OUTPUTS[:3])
        later = sorted(p.name for p in target.glob("*") if p.name not in ("raw_data", "dataset.json"))
        if changed and later:
            print(f"warning: {target} holds outputs of later steps made from other splits ({', '.join(later)}); "
                  f"they are stale now: delete them, or rerun the steps that make them")
        (target / "raw_data").mkdir(parents=True, exist_ok=True)
        for file in OUTPUTS:
            os.replace(staging / file, target / file)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def refuse_to_replace(target: Path):
    """An existing dataset folder (perhaps the only copy of someone's splits) is not prepared again unasked."""
    held = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) if target.is_dir() else []
    if held:
        shown = ", ".join(held[:4]) + (f" and {len(held) - 4:,} more files" if len(held) > 4 else "")
        fail(f"{target} already exists and holds {shown}: preparing it again would replace its raw_data/*.pkl, "
             f"which may be the only copy of those splits. Pass --overwrite to replace them (dataset.json is updated, "
             f"keeping the settings recorded there), or choose another --dataset to start afresh.")


def keep_recorded(path: Path, recorded: dict, args):
    """A prompt-shaping setting given that differs from the one recorded in dataset.json is refused."""
    for name in PROMPT_SETTINGS:
        given = getattr(args, name)
        if given is not None and recorded.get(name) is not None and given != recorded[name]:
            fail(f"--{name} {given!r} differs from the {recorded[name]!r} recorded in {path}: the steps run there built "
                 f"their prompts with it. Give the recorded value (or leave --{name} out), or prepare a fresh dataset "
                 f"folder under another --dataset name.")


def main():
    args = parser.parse_args()
    if not args.dataset or args.dataset.startswith(".") or Path(args.dataset).name != args.dataset:
        fail(f"--dataset {args.dataset!r} must be a plain folder name")
    target = args.data_dir / args.dataset
    if not args.overwrite:
        refuse_to_replace(target)
    recorded = read_json(target / "dataset.json") if (target / "dataset.json").exists() else {}
    keep_recorded(target / "dataset.json", recorded, args)
    for flag, value in (("--max_users", args.max_users), ("--dense_slice", args.dense_slice)):
        if value is not None and value < 1:
            fail(f"{flag} must be at least 1, not {value}")
    if args.max_users is not None and args.dense_slice is not None:
        fail("--max_users and --dense_slice are two ways to cut a slice: pass one of them")
    for flag, path in (("--input", args.input), ("--meta", args.meta)):
        if path is not None and not path.is_file():
            fail(f"{flag} file {path} not found")

    df, fmt = read_reviews(args.input, args.format)
    print(f"read {len(df):,} reviews ({fmt}): {df['user_id'].nunique():,} users, {df['item_id'].nunique():,} items")
    if args.max_users is not None:
        df = sample_users(df, args.max_users, args.seed)
    if args.dense_slice is not None:
        df = dense_slice(df, args.dense_slice, args.seed, args.split)

    items = set(df["item_id"])
    titles = read_titles(args.meta, items) if args.meta else {}
    if not args.meta:
        print(f"warning: no --meta given: the item id stands in as the title of all {len(items):,} items")
    elif len(titles) < len(items):
        print(f"warning: {len(items) - len(titles):,} of {len(items):,} items have no title in {args.meta}; "
              f"their id stands in as the title")
    df.insert(2, "title", [titles.get(item, item) for item in df["item_id"]])
    empty = int((df["reviews"].str.strip() == "").sum())
    if empty:
        print(f"warning: {empty:,} reviews have no text (kept, with an empty review)")

    splits, cuts = split_by_time(df[COLUMNS], args.split)
    product_class = args.product_class or recorded.get("product_class") or default_product_class(fmt, args.input)
    info = {
        "name": args.dataset,
        "product_class": product_class,
        "max_his": args.max_his or recorded.get("max_his") or 10,
        "source": str(args.input),
        "source_md5": md5(args.input),
        "meta": str(args.meta) if args.meta else None,
        "meta_md5": md5(args.meta),
        "format": fmt,
        "split": {"rule": SPLIT_RULE, "fractions": args.split, "cut_times": cuts, "cut_dates": [date(t) for t in cuts]},
        "max_users": args.max_users,
        "dense_slice": args.dense_slice,
        "seed": args.seed,
        "splits": {name: counts(part) for name, part in splits.items()},
        "total": counts(df),
        "empty_reviews": empty,
        "items_without_title": len(items) - len(titles),
    }
    write_dataset(target, splits, {**recorded, **info})  # updated: the settings later steps recorded are kept

    print(f"\n{target} ({fmt}, product class {product_class!r}); train < {date(cuts[0])} <= valid < "
          f"{date(cuts[1])} <= test (UTC)")
    print(f"{'split':<6}{'rows':>10}{'users':>8}{'items':>8}  time span")
    for name, part in splits.items():
        times = part["unixReviewTime"]
        print(f"{name:<6}{len(part):>10,}{part['user_id'].nunique():>8,}{part['item_id'].nunique():>8,}  "
              f"{date(times.iloc[0])} .. {date(times.iloc[-1])}")
    print(history_table(history_coverage(splits["train"], {s: splits[s] for s in SPLITS[1:]})))


if __name__ == "__main__":
    main()
