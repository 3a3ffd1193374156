"""Benchmark: batched generation (the project) against one prompt at a time (the official chat_with_LLM), greedy,
on the same 32 prompts with SmolLM2-135M-Instruct: the texts must be identical; prints the throughput ratio and
how much of each batch is padding, with the prompts sorted by length (the project) and in their given order.

The prompts are the Summarizer's, built from real reviews: $REVIEWS_FILE where set, else the tests' committed slice
of the Amazon 2014 Musical Instruments reviews.

    python benchmarks/generation.py [--prompts 32] [--batch_size 16] [--max_new_tokens 32]
"""
import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import llm  # noqa: E402
from prompts import summary_prompt  # noqa: E402
from utils import require_model  # noqa: E402

MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
REVIEWS = Path(os.environ.get("REVIEWS_FILE") or ROOT / "tests" / "fixtures" / "reviews_Musical_Instruments_5.60users.json.gz")


def review_texts(n: int) -> list[tuple[str, float, str]]:
    """(title, rating, review) of n real reviews with lengths spread over the file."""
    import pandas as pd

    df = pd.read_json(REVIEWS, lines=True).sort_values("unixReviewTime", kind="stable")
    df = df[df["reviewText"].str.len().between(50, 2500)].iloc[:: max(len(df) // n, 1)].head(n)
    return list(zip(df["asin"], df["overall"].astype(float), df["reviewText"]))


def padding_fraction(lengths, batch_size, sort=True) -> float:
    """The share of padding in the batches, formed as the project forms them (sorted by length) or in input order."""
    order = llm.batches(lengths, batch_size) if sort else \
        [list(range(i, min(i + batch_size, len(lengths)))) for i in range(0, len(lengths), batch_size)]
    padded = sum(max(lengths[i] for i in b) * len(b) for b in order)
    return 1 - sum(lengths) / padded


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--model", default=str(MODEL))
    args = parser.parse_args()
    model = llm.load_model(require_model(args.model))
    tokenizer = model.tokenizer
    questions = [summary_prompt("Musical Instruments", *r) for r in review_texts(args.prompts)]
    lengths = [len(ids) for ids in model.encode(llm.chat_text(tokenizer, q) for q in questions)]
    model.generate(questions[:2], max_new_tokens=4, batch_size=2, desc="warm-up")

    start = time.perf_counter()
    single = [model.generate([q], max_new_tokens=args.max_new_tokens, batch_size=1, desc="one")[0] for q in questions]
    single_s = time.perf_counter() - start
    start = time.perf_counter()
    batched = model.generate(questions, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, desc="batched")
    batched_s = time.perf_counter() - start
    new_tokens = sum(len(tokenizer(t, add_special_tokens=False).input_ids) for t in batched)

    print(f"\n{len(questions)} prompts of {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}), "
          f"greedy, up to {args.max_new_tokens} new tokens, {args.model}")
    print("| way | wall time (s) | prompts/s | new tokens/s |")
    print("|---|---:|---:|---:|")
    print(f"| one at a time (official) | {single_s:.1f} | {len(questions) / single_s:.2f} | {new_tokens / single_s:.1f} |")
    print(f"| batched, {args.batch_size} per batch, sorted by length | {batched_s:.1f} | {len(questions) / batched_s:.2f} "
          f"| {new_tokens / batched_s:.1f} |")
    print(f"\npadding: {padding_fraction(lengths, args.batch_size, True):.1%} of the batched tokens sorted by length, "
          f"{padding_fraction(lengths, args.batch_size, False):.1%} in the given order")
    print(f"identical texts: {batched == single}")
    print(f"speed-up (one at a time / batched): {single_s / batched_s:.2f}x")


if __name__ == "__main__":
    main()
