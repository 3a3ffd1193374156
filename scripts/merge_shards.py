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
    if merged.index.has_duplicates:
        fail(f"the parts of {args.output} overlap: were they written with different --num_shards?")
    merged = merged.reset_index(drop=True)
elif all(isinstance(p, list) for p in parts):  # part k holds rows k, k+N, k+2N, ...: interleave them back
    if not all(len(parts[0]) - 1 <= len(p) <= len(parts[0]) for p in parts):
        fail(f"the parts of {args.output} do not have the sizes of one split into {args.num_shards}")
    merged = [p[i] for i in range(len(parts[0])) for p in parts if i < len(p)]
else:
    fail(f"the parts of {args.output} are not all DataFrames or all lists")
write_pickle(merged, args.output)
