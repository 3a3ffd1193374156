"""Join the parts that sharded runs of a generation or scoring script wrote (--num_shards N --shard_id K) into the
one output the next step reads, in the original row order: the same file a single run writes.

    python scripts/merge_shards.py Data/<dataset>/train_summarizer_generation_results.pkl --num_shards 2
"""
import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils

from utils import fail, read_pickle, shard_path, write_pickle

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("output", type=Path, help="the output a single run would write")
parser.add_argument("--num_shards", type=int, required=True)
args = parser.parse_args()

paths = [shard_path(args.output, k, args.num_shards) for k in range(args.num_shards)]
missing = [str(p) for p in paths if not p.exists()]
if missing:
    fail(f"missing part(s) {missing}: run those shards (--shard_id) first")
parts = [read_pickle(p, what="any") for p in paths]
if all(isinstance(p, pd.DataFrame) for p in parts):  # each part keeps its rows' original index
    merged = pd.concat(parts).sort_index()
elif all(isinstance(p, dict) for p in parts):  # lists are written as {row: item}
    merged = pd.Series({row: item for p in parts for row, item in p.items()}).sort_index()
else:
    fail(f"the parts of {args.output} are not all of one kind (DataFrame, or list written as a dict)")
if sum(map(len, parts)) != len(merged) or not merged.index.equals(pd.RangeIndex(len(merged))):
    fail(f"the parts of {args.output} overlap or leave rows out: were they written with different --num_shards?")
merged = merged.reset_index(drop=True) if isinstance(merged, pd.DataFrame) else merged.tolist()
write_pickle(merged, args.output)
