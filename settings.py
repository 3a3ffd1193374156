"""A numbered script's arguments (TRL-style dataclasses), the dataset's recorded settings, and the rows a step works
on.

Every step reads the same names: DataArguments (`--dataset`/DATASET, `--data_dir`/DATA_DIR, `--limit`, `--sample`);
ModelPlaces (`--model_path`/MODEL_PATH, `--checkpoint_dir`/CHECKPOINT_DIR, `--load_in_4bit`) for a step that loads a
model.  A setting that shapes prompts is `recorded`: written into Data/<dataset>/dataset.json with the first output of
the first step that uses it, and the same for every later step.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import pandas as pd

import parallel
from utils import COLUMNS, fail, producer, read_json, read_pickle, write_json, write_pickle


@dataclass
class DataArguments:
    dataset: str | None = field(default_factory=lambda: os.environ.get("DATASET"), metadata={
        "help": "the dataset: its folder under --data_dir (default: $DATASET)"})
    data_dir: str = field(default_factory=lambda: os.environ.get("DATA_DIR", "Data"), metadata={
        "help": "the folder that holds one folder per dataset (default: $DATA_DIR, else Data)"})
    limit: int | None = field(default=None, metadata={"help": "only the first N rows of the input, for quick runs"})
    sample: int | None = field(default=None, metadata={
        "help": "a random sample of N rows of the input (in the sampled order), e.g. the Summarizer's 8,000 training "
                "summaries of the authors' original code: --sample 8000 --sample_seed 42"})
    sample_seed: int = field(default=42, metadata={"help": "the seed of --sample (pandas' random_state)"})
    unrecorded: dict = field(default_factory=dict, init=False, repr=False)  # see `recorded`: written by `write`

    @property
    def path(self) -> Path:
        if not self.dataset:
            fail("no dataset given: pass --dataset NAME or set DATASET")
        return Path(self.data_dir) / self.dataset

    def file(self, name: str) -> Path:
        return self.path / name

    def write(self, obj, name: str):
        """Write a step's output `name` (a pickle under the dataset's folder), atomically; with the first one, record
        the settings the step resolved (see `recorded`): a step that fails before any output has used nothing."""
        if self.unrecorded and parallel.is_main_process():
            path = self.file("dataset.json")
            write_json({**(read_json(path) if path.exists() else {}), **self.unrecorded}, path)
            print(f"recorded {', '.join(f'{k}={v!r}' for k, v in self.unrecorded.items())} in {path}")
        self.unrecorded = {}
        write_pickle(obj, self.file(name))


def checkpoint_dir_arg():
    return field(default_factory=lambda: os.environ.get("CHECKPOINT_DIR", "checkpoints"), metadata={
        "help": "where the *_train.sh scripts write the adapters: <checkpoint_dir>/<dataset>/<Expert>/ (default: "
                "$CHECKPOINT_DIR, else checkpoints)"})


def load_in_4bit_arg():
    return field(default="auto", metadata={"help": "true/false; auto: on a CUDA GPU (QLoRA)"})


@dataclass
class ModelPlaces:
    """Where a step finds its models, and how it loads them: the arguments of every step that loads a model."""
    model_path: str | None = field(default=None, metadata={
        "help": "the base model. Training: default $MODEL_PATH. An adapter: default the base it records (else "
                "$MODEL_PATH); give this where that record is out of date, e.g. the base model has moved"})
    checkpoint_dir: str = checkpoint_dir_arg()
    load_in_4bit: str = load_in_4bit_arg()


# ---------------------------------------------------------------------------------------------- recorded settings
class Recorded:
    """The default of a setting that shapes prompts (see `recorded`): what the first step records where the command
    line gives nothing; a value, or a function of the DataArguments."""

    def __init__(self, first_use=None):
        self.first_use = first_use

    def __repr__(self):
        return "the value recorded in dataset.json"


def recorded(first_use=None, help: str = ""):
    """A setting that shapes prompts.  Its value is recorded in Data/<dataset>/dataset.json by the first step that uses
    it (`first_use` where the command line gives none), and every later step uses the recorded value: one that asks
    for another is refused, so that training and test prompts can never silently differ."""
    return field(default=Recorded(first_use), metadata={"help": help})


def parse_args(*dataclass_types, args=None, data_parallel: bool = False):
    """Parse the command line into DataArguments and the given dataclasses (TRL-style), resolve the recorded settings
    (see `recorded`), and, for a step that runs a model (`data_parallel`), relaunch it on NUM_GPUS processes."""
    from transformers import HfArgumentParser

    if data_parallel:
        parallel.relaunch()
    parser = HfArgumentParser((DataArguments, *dataclass_types))
    return checked_args(parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True))


def checked_args(parsed_and_unknown) -> list:
    """What a parser returned (DataArguments, the other dataclasses, the strings it did not know), checked: an option
    the step does not take is refused, and the recorded settings (see `recorded`) are resolved."""
    *parsed, unknown = parsed_and_unknown
    if unknown:
        fail(f"{Path(sys.argv[0]).name} does not take {' '.join(unknown)}; --help lists what it takes")
    data, *objs = parsed
    for obj in objs:
        resolve_recorded(data, obj)
    return parsed


def resolve_recorded(data: DataArguments, obj):
    """Fill in the recorded settings of the parsed dataclass `obj`: the value in dataset.json (or, where there is
    none yet, the one given or the first-use default, kept in `data.unrecorded` until the step writes an output)."""
    if not any(isinstance(f.default, Recorded) for f in fields(obj)):
        return
    path = data.file("dataset.json")
    info = read_json(path) if path.exists() else {}
    if not isinstance(info, dict):
        fail(f"{path} holds a JSON {type(info).__name__}, not the dataset's settings; rerun {producer(path)}.")
    info = {**info, **data.unrecorded}
    for f in fields(obj):
        if not isinstance(f.default, Recorded):
            continue
        given, saved = getattr(obj, f.name), info.get(f.name)
        given = None if isinstance(given, Recorded) else given
        if saved is not None and given is not None and given != saved:
            fail(f"--{f.name} {given!r} differs from the {saved!r} recorded in {path}: every step of a dataset must "
                 f"build its prompts alike. Leave --{f.name} out to use the recorded value, or start over with this "
                 f"value in a fresh dataset folder (prepare it again under another --dataset name).")
        if saved is None:
            first_use = f.default.first_use
            saved = given if given is not None else first_use(data) if callable(first_use) else first_use
            if saved is None and not path.exists():
                fail(f"{path} not found. Run {producer(path)} first (it records the dataset's settings there), or "
                     f"pass --{f.name} for data prepared otherwise.")
            if saved is None:
                fail(f"{path} records no {f.name}: pass --{f.name} (it is recorded there for the later steps)")
            data.unrecorded[f.name] = saved
        setattr(obj, f.name, saved)


# ---------------------------------------------------------------------------------------------- the rows of a step
@dataclass
class ValidArguments:
    eval_limit: int | None = recorded(1000, help="validation rows used for every model choice: a fixed random subset "
                                                 "(seed 0) of raw_data/valid.pkl, in file order")


@dataclass
class SplitArguments(ValidArguments):
    split: str = field(default="test", metadata={"help": "test, or valid (the validation rows: see --eval_limit)"})


def read_table(args: DataArguments, name: str, columns=COLUMNS, limit=True) -> pd.DataFrame:
    """Read `Data/<dataset>/<name>`, check its columns, and apply --sample, then --limit (unless `limit` is False)."""
    df = read_pickle(args.file(name), columns)
    return limited(args, df) if limit else df.reset_index(drop=True)


def limited(args: DataArguments, df: pd.DataFrame) -> pd.DataFrame:
    """--sample (a random sample, in the sampled order), then --limit (the first N rows)."""
    if args.sample is not None:
        if args.sample > len(df):
            print(f"--sample {args.sample}: only {len(df):,} rows; taking them all, shuffled")
        df = df.sample(min(args.sample, len(df)), random_state=args.sample_seed)
    if args.limit is not None:
        df = df.iloc[: args.limit]
    return df.reset_index(drop=True)


def read_split(args: DataArguments, split: str, eval_limit: int) -> pd.DataFrame:
    """The test set, or the validation rows that every model choice is made on (raw_data/valid.pkl, at most
    `eval_limit` of them: a fixed random subset, kept in file order).  --limit / --sample apply after."""
    if split not in ("test", "valid"):
        fail(f"--split must be test or valid, not {split!r}")
    rows = read_table(args, f"raw_data/{split}.pkl", limit=False)
    if split == "valid" and len(rows) > eval_limit:
        rows = rows.sample(eval_limit, random_state=0).sort_index().reset_index(drop=True)
    return limited(args, rows)
