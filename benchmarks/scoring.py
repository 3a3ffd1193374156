"""Benchmark: batched logits-weighted rating prediction (the project) against one prompt at a time (the official
logits_weighted_predict), on the same 32 Predictor prompts with SmolLM2-135M-Instruct: the ratings must agree to
1e-5; prints the throughput ratio.

The prompts are rating prompts with histories and an analysis, built by the project's history index from a
generated review log (benchmarks/history_prompts.py).

    python benchmarks/scoring.py [--prompts 32] [--batch_sizes 4 8 16]
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import llm  # noqa: E402
from generation import padding_fraction  # noqa: E402
from history_prompts import ANALYSIS, PRODUCT, review_log  # noqa: E402
from prompts import rating_prompt  # noqa: E402
from histories import HistoryIndex  # noqa: E402
from utils import require_model  # noqa: E402

MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--max_his", type=int, default=10)
    parser.add_argument("--model", default=str(MODEL))
    args = parser.parse_args()
    model = llm.load_model(require_model(args.model))
    tokenizer = model.tokenizer
    log = review_log(3000)
    index = HistoryIndex(log, max_his=args.max_his)
    targets = log.sample(args.prompts, random_state=0)
    questions = [rating_prompt(PRODUCT, t.title, index(t.user_id, t.item_id, t.unixReviewTime), ANALYSIS)
                 for t in targets.itertuples()]
    lengths = [len(ids) for ids in model.encode(llm.chat_text(tokenizer, q) for q in questions)]
    model.score(questions[:2], batch_size=2, desc="warm-up")

    start = time.perf_counter()
    single = np.array([model.score([q], batch_size=1, desc="one")[0] for q in questions])
    single_s = time.perf_counter() - start
    rows = []
    for size in args.batch_sizes:
        start = time.perf_counter()
        batched = model.score(questions, batch_size=size, desc="batched")
        rows.append((size, time.perf_counter() - start, np.abs(batched - single).max(), padding_fraction(lengths, size)))

    print(f"\n{len(questions)} rating prompts of {min(lengths)}-{max(lengths)} tokens, {args.model}")
    print("| way | wall time (s) | prompts/s | padding | largest difference from one at a time |")
    print("|---|---:|---:|---:|---:|")
    print(f"| one at a time (official) | {single_s:.1f} | {len(questions) / single_s:.2f} | 0% | - |")
    for size, seconds, diff, padding in rows:
        print(f"| batched, {size} per batch, sorted by length | {seconds:.1f} | {len(questions) / seconds:.2f} | "
              f"{padding:.0%} | {diff:.1e} |")
    worst = max(diff for _, _, diff, _ in rows)
    print(f"\nall batched ratings within 1e-5 of one at a time: {worst < 1e-5} (largest difference {worst:.1e})")
    best = min(rows, key=lambda r: r[1])
    print("speed-up (one at a time / batched): " + ", ".join(f"{size} per batch {single_s / s:.2f}x" for size, s, _, _ in rows)
          + f"; best {single_s / best[1]:.2f}x")


if __name__ == "__main__":
    main()
