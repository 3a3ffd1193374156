"""Benchmark: building every Reasoner and Predictor prompt for a set of targets, with the project's history index
against the official per-row scan of the whole frame, on generated review logs of 10k, 100k and 1M reviews.

The log has realistic skew (Zipf-distributed users and items: a few heavy users and popular items, many light
ones) and day-granularity times (many ties).  The targets are 10% of the reviews (the size of a test split), all
with an earlier review of their user and of their item.  The project builds the prompts of every target; the
official way is timed on a sample of targets (said in the table) and its total extrapolated from it; on that sample
both must give the same prompts, byte for byte.  Peak memory: the process's peak resident set after each size.

    python benchmarks/history_prompts.py [--sizes 10000 100000 1000000] [--official_sample 300]
"""
import argparse
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from official_reference import official_predictor_prompts  # noqa: E402
from prompts import rating_prompt, reason_prompt  # noqa: E402
from histories import HistoryIndex  # noqa: E402

PRODUCT = "Musical Instruments"
ANALYSIS = "The user values a warm tone and sturdy build, which other buyers praise in this item."
WORDS = ("warm tone durable build bright sound sturdy stand easy setup good value clear output solid feel cheap "
         "price weak clamp noisy hum heavy weight fragile cable comfortable strap tuner accurate").split()


def review_log(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    users, items = max(n // 7, 10), max(n // 11, 10)
    words = np.array(WORDS)
    summaries = [f"Positive Aspects: {', '.join(words[rng.integers(0, len(words), 4)])}\n"
                 f"Negative Aspects: {', '.join(words[rng.integers(0, len(words), 2)])}\n"
                 f"User Preference Elements: {', '.join(words[rng.integers(0, len(words), 3)])}" for _ in range(500)]
    return pd.DataFrame({
        "user_id": [f"U{k}" for k in (rng.zipf(1.5, n) - 1) % users],
        "item_id": [f"I{k}" for k in (rng.zipf(1.3, n) - 1) % items],
        "title": [f"Product {k}" for k in rng.integers(0, items, n)],
        "ratings": rng.integers(1, 6, n).astype(float),
        "reviews": "text",
        "unixReviewTime": rng.integers(0, 3650, n) * 86400,
        "aspect_preference_summary": [summaries[k] for k in rng.integers(0, len(summaries), n)],
    })


def project(log: pd.DataFrame, targets: pd.DataFrame):
    index = HistoryIndex(log)
    prompts = []
    for title, h in zip(targets["title"], index.for_rows(targets)):
        prompts.append((reason_prompt(PRODUCT, title, h), rating_prompt(PRODUCT, title, h, ANALYSIS)))
    return prompts


def official(log: pd.DataFrame, targets: pd.DataFrame):
    return [official_predictor_prompts(PRODUCT, row, log, ANALYSIS) for row in targets.itertuples()]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--official_sample", type=int, default=300, help="targets the official way is timed on")
    args = parser.parse_args()

    rows = []
    for n in args.sizes:
        log = review_log(n)
        first = {key: log.groupby(key)["unixReviewTime"].transform("min") for key in ("user_id", "item_id")}
        eligible = np.flatnonzero((first["user_id"] < log["unixReviewTime"]) & (first["item_id"] < log["unixReviewTime"]))
        eligible = eligible.tolist()
        targets = log.iloc[sorted(random.Random(0).sample(eligible, min(n // 10, len(eligible))))]

        start = time.perf_counter()
        ours = project(log, targets)
        ours_s = time.perf_counter() - start

        sample = random.Random(1).sample(range(len(targets)), min(args.official_sample, len(targets)))
        start = time.perf_counter()
        theirs = official(log, targets.iloc[sample])
        per_target = (time.perf_counter() - start) / len(sample)
        same = all(ours[i] == t for i, t in zip(sample, theirs))
        rows.append((n, len(targets), ours_s, len(sample), per_target * len(targets), same, peak_rss_mb()))
        print(f"{n:>9,} reviews: {len(targets):,} targets, project {ours_s:.2f} s, official "
              f"{per_target * 1000:.1f} ms/target on {len(sample)}; identical prompts: {same}", flush=True)

    print("\n| reviews | targets | project (s) | official (s, extrapolated from a sample) | sample | speed-up | "
          "identical prompts | peak RSS (MB) |")
    print("|---:|---:|---:|---:|---:|---:|:---:|---:|")
    for n, t, ours_s, k, theirs_s, same, rss in rows:
        print(f"| {n:,} | {t:,} | {ours_s:.2f} | {theirs_s:,.0f} | {k} | {theirs_s / ours_s:,.0f}x | {same} | {rss:,.0f} |")
    ratio = {n: theirs_s / ours_s for n, _, ours_s, _, theirs_s, _, _ in rows}
    print("\nspeed-up (official / project): " + ", ".join(f"{n:,} reviews {r:,.0f}x" for n, r in ratio.items()))


if __name__ == "__main__":
    main()
