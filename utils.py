"""What every numbered script needs first: its arguments, the dataset's recorded settings, and checked reads and
atomic writes of the files that the steps pass to each other (with the provenance of what they made).

The steps talk through files under Data/<dataset>/ (DATA_DIR, DATASET) and adapters under
checkpoints/<dataset>/<Expert>/ (CHECKPOINT_DIR); a missing or damaged input names the step that writes it.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path

import pandas as pd

import parallel

REPO = Path(__file__).resolve().parent
COLUMNS = ["user_id", "item_id", "title", "ratings", "reviews", "unixReviewTime"]
KEY = ["user_id", "item_id", "unixReviewTime"]  # what names one review: its user, item and time

# Which step writes each file, so that a missing input can say what to run first (matched on the whole file name).
PRODUCERS = {
    "raw_data/train.pkl": "Data/prepare_data.py",
    "raw_data/valid.pkl": "Data/prepare_data.py",
    "raw_data/test.pkl": "Data/prepare_data.py",
    "dataset.json": "Data/prepare_data.py",
    "train_aspect_preference_summary.pkl": "1_Summarizer/1_distilling_aspect_preference_summary.py",
    "Summarizer_train_instruct.pkl": "1_Summarizer/2_construct_summarizer_train_data.py",
    "Summarizer": "1_Summarizer/3_summarizer_train.sh",
    "train_summarizer_generation_results.pkl": "1_Summarizer/4_summarizer_generation.py",
    "review_8000.pkl": "2_Reasoner/1_sample_train_data.py",
    "train_12000.pkl": "2_Reasoner/1_sample_train_data.py",
    "review_train_data.pkl": "2_Reasoner/2_construct_reward_train_data.py",
    "review_valid_data.pkl": "2_Reasoner/2_construct_reward_train_data.py",
    "reason_reward_model": "2_Reasoner/3_reward_model_train.sh",
    "distilling_high_quality_reasons.pkl": "2_Reasoner/4_distilling_possible_reason.py",
    "Reasoner_train_instruct.pkl": "2_Reasoner/5_construct_reasoner_train_data.py",
    "Reasoner": "2_Reasoner/6_reasoner_train.sh",
    "reason_for_test_by_reasoner.pkl": "2_Reasoner/7_generate_reason_for_test.py",
    "reason_for_valid_by_reasoner.pkl": "2_Reasoner/7_generate_reason_for_test.py --split valid",
    "Predictor_train_instruct.pkl": "3_Predictor/1_construct_predictor_train_data.py",
    "Predictor_valid_instruct.pkl": "3_Predictor/1_construct_predictor_train_data.py",
    "Direct_Predictor_train_instruct.pkl": "3_Predictor/1_construct_predictor_train_data.py --no_reason",
    "Direct_Predictor_valid_instruct.pkl": "3_Predictor/1_construct_predictor_train_data.py --no_reason",
    "Predictor": "3_Predictor/2_predictor_train.sh",
    "Direct_Predictor": "NAME=Direct_Predictor bash 3_Predictor/2_predictor_train.sh",
    "rating_for_test_by_predictor.pkl": "3_Predictor/3_generate_predict_for_test.py",
    "rating_for_valid_by_predictor.pkl": "3_Predictor/3_generate_predict_for_test.py --split valid",
    "rating_for_test_direct.pkl": "3_Predictor/3_generate_predict_for_test.py --no_reason",
    "rating_for_valid_direct.pkl": "3_Predictor/3_generate_predict_for_test.py --no_reason --split valid",
    "Reasoner_GRPO": "4_GRPO/1_reasoner_grpo_train.sh",
    "reason_for_test_by_reasoner_grpo.pkl": "4_GRPO/2_generate_reason_for_test.py",
    "reason_for_valid_by_reasoner_grpo.pkl": "4_GRPO/2_generate_reason_for_test.py --split valid",
    "rating_for_test_by_predictor_grpo.pkl": "4_GRPO/3_generate_predict_for_test.py",
    "rating_for_valid_by_predictor_grpo.pkl": "4_GRPO/3_generate_predict_for_test.py --split valid",
    "reason_for_test_by_teacher.pkl": "3_Predictor/5_evaluate_reasons.py --with_teacher",
}


REASONERS = ("Reasoner", "Reasoner_GRPO")  # the SFT Reasoner (2_Reasoner) and its GRPO refinement (4_GRPO)


def reasons_file(split: str, reasoner: str = "Reasoner") -> str:
    """Where a Reasoner's reasons for the test (or validation) targets go: reason_for_test_by_reasoner[_grpo].pkl."""
    if reasoner not in REASONERS:
        fail(f"--reasoner must be one of {', '.join(REASONERS)}, not {reasoner!r}")
    return f"reason_for_{split}_by_{reasoner.lower()}.pkl"


def ratings_file(split: str, reasoner: str | None = "Reasoner") -> str:
    """Where the Predictor's ratings given a Reasoner's reasons go (rating_for_test_by_predictor[_grpo].pkl), or, for
    `reasoner` None, the direct-prediction ablation's (rating_for_test_direct.pkl)."""
    if reasoner is None:
        return f"rating_for_{split}_direct.pkl"
    return reasons_file(split, reasoner).replace("reason_for_", "rating_for_").replace("_by_reasoner", "_by_predictor")


def fail(message: str):
    """Stop the script with one clear message (and a non-zero exit), never a deep traceback."""
    raise SystemExit(f"error: {message}")


# ----------------------------------------------------------------------------------------------- arguments
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

    @property
    def path(self) -> Path:
        if not self.dataset:
            fail("no dataset given: pass --dataset NAME or set DATASET")
        return Path(self.data_dir) / self.dataset

    def file(self, name: str) -> Path:
        return self.path / name


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
    resolve_recorded(*parsed)
    return parsed


_pending_records: dict[Path, dict] = {}  # settings to record, written with the step's first output pickle


def resolve_recorded(data: DataArguments, *objs):
    """Fill in the recorded settings (see `recorded`) of the parsed dataclasses `objs`."""
    for obj in objs:
        _resolve_recorded(data, obj)


def _resolve_recorded(data: DataArguments, obj):
    if not any(isinstance(f.default, Recorded) for f in fields(obj)):
        return
    path = data.file("dataset.json")
    info = read_json(path) if path.exists() else {}
    if not isinstance(info, dict):
        fail(f"{path} holds a JSON {type(info).__name__}, not the dataset's settings; rerun {producer(path)}.")
    info = {**info, **_pending_records.get(path, {})}
    new = {}
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
            new[f.name] = saved
        setattr(obj, f.name, saved)
    if new:  # recorded once the step writes an output: a step that fails first has used nothing
        _pending_records.setdefault(path, {}).update(new)


def _write_pending_records():
    while _pending_records:
        path, new = _pending_records.popitem()
        write_json({**(read_json(path) if path.exists() else {}), **new}, path)
        print(f"recorded {', '.join(f'{k}={v!r}' for k, v in new.items())} in {path}")


@dataclass
class ValidArguments:
    eval_limit: int | None = recorded(1000, help="validation rows used for every model choice: a fixed random subset "
                                                 "(seed 0) of raw_data/valid.pkl, in file order")


@dataclass
class SplitArguments(ValidArguments):
    split: str = field(default="test", metadata={"help": "test, or valid (the validation rows: see --eval_limit)"})


def read_split(args: DataArguments, split: str, eval_limit: int) -> pd.DataFrame:
    """The test set, or the validation rows that every model choice is made on (raw_data/valid.pkl, at most
    `eval_limit` of them: a fixed random subset, kept in file order).  --limit / --sample apply after."""
    if split not in ("test", "valid"):
        fail(f"--split must be test or valid, not {split!r}")
    rows = read_table(args, f"raw_data/{split}.pkl", limit=False)
    if split == "valid" and len(rows) > eval_limit:
        rows = rows.sample(eval_limit, random_state=0).sort_index().reset_index(drop=True)
    return limited(args, rows)


def require_model(path: str | Path) -> str:
    """A model folder (base model or LoRA adapter) that must exist before any work starts; an adapter must also be
    whole: a readable LoRA config, and weights whose every tensor is in the file."""
    path = Path(path)
    expert = path.parent.name if path.name == "final_checkpoint" else path.name
    hint = f"Run `{PRODUCERS[expert]}`" if expert in PRODUCERS else "Make it again"
    config = path / "adapter_config.json"
    if not config.exists():
        if (path / "config.json").exists():
            return str(path)
        fail(f"no model at {path}. {hint} first.")
    settings = read_json(config)
    if not isinstance(settings, dict) or "peft_type" not in settings or "base_model_name_or_path" not in settings:
        fail(f"{config} is not a LoRA adapter's config (it names no peft_type and base model); {hint} again.")
    weights = path / "adapter_model.safetensors"
    if weights.exists():
        from safetensors import safe_open

        try:
            with safe_open(weights, "pt"):  # reads the header and checks that the file holds every tensor it lists
                pass
        except Exception as e:
            fail(f"{weights} cannot be read ({type(e).__name__}: {e}); it is truncated or corrupted. {hint} again.")
    elif not (path / "adapter_model.bin").exists():
        fail(f"{path} holds no adapter weights (adapter_model.safetensors); {hint} again.")
    return str(path)


# ---------------------------------------------------------------------------------------------- reading files
def producer(path: str | Path) -> str:
    name = Path(path).name
    key = f"raw_data/{name}" if Path(path).parent.name == "raw_data" else name
    return f"`{PRODUCERS[key]}`" if key in PRODUCERS else "the step that writes it"


def read_pickle(path: str | Path, columns=(), what="table"):
    """Load a pickle written by an earlier step and check it, so that a bad input fails here with a clear
    message rather than deep inside pandas.  `columns`: required columns of a DataFrame; `what="table"` wants a
    DataFrame, `what="messages"` a list of {"messages": [...]} (SFT data), `what="any"` whatever it holds."""
    path = Path(path)
    if not path.exists():
        fail(f"{path} not found. Run {producer(path)} first.")
    try:
        obj = pd.read_pickle(path)
    except Exception as e:  # truncated, corrupted, or not a pickle at all
        fail(f"{path} cannot be read ({type(e).__name__}: {e}); it is truncated or corrupted: "
             f"delete it and rerun {producer(path)}.")
    if what == "any":
        return obj
    if what == "messages":
        if not (isinstance(obj, list) and all(isinstance(x, dict) and "messages" in x for x in obj)):
            fail(f"{path} is not a list of {{'messages': [...]}} examples; rerun {producer(path)}.")
        return obj
    if not isinstance(obj, pd.DataFrame):
        fail(f"{path} holds a {type(obj).__name__}, not a DataFrame; rerun {producer(path)}.")
    missing = [c for c in columns if c not in obj.columns]
    if missing:
        fail(f"{path} lacks column(s) {missing} (it has {list(obj.columns)}); rerun {producer(path)}.")
    return obj


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


def read_json(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        fail(f"{path} cannot be read ({type(e).__name__}: {e}); it is truncated or corrupted: repair it, or delete it "
             f"and rerun {producer(path)}.")


def matched(rows: pd.DataFrame, other: pd.DataFrame, column: str):
    """`other[column]` for each of `rows`, matched on (user, item, time) (and the order among equal keys), as an
    array; None if `other` does not cover exactly these rows.  Missing values in `column` are kept as they are."""
    def keyed(df):
        return df[KEY].assign(nth=df.groupby(KEY).cumcount().to_numpy())

    if len(other) != len(rows):
        return None
    joined = keyed(rows).merge(keyed(other).assign(value=other[column].to_numpy()), how="left", on=KEY + ["nth"],
                               indicator=True)
    return None if (joined["_merge"] != "both").any() else joined["value"].to_numpy()


def paired_interval(differences, seed: int = 0) -> tuple[float, float]:
    """The 95% interval of the mean of per-row differences between two methods on the same rows: a percentile
    bootstrap over the rows, 10,000 resamples, fixed seed (so reruns give the same interval)."""
    import numpy as np
    from scipy.stats import bootstrap

    differences = np.asarray(differences, dtype=float)
    if len(differences) < 2:
        return float("nan"), float("nan")
    low, high = bootstrap((differences,), np.mean, n_resamples=10_000, method="percentile",
                          rng=np.random.default_rng(seed)).confidence_interval
    return float(low), float(high)


# ---------------------------------------------------------------------------------------------- writing files
def atomic_write(path: str | Path, write, mode="wb"):
    """Write through a temporary file in the same folder and rename it into place: a reader (or a rerun after a
    crash) sees the old file or the new one, never half of one.  Only the main process of a data-parallel run
    writes."""
    if not parallel.is_main_process():
        return
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
    """A step's output (and, with the first one, the settings it was made with: see `recorded`)."""
    if parallel.is_main_process():
        _write_pending_records()
    atomic_write(path, lambda f: pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL))
    if parallel.is_main_process():
        print(f"wrote {path} ({len(obj):,} rows)")


def write_json(obj, path: str | Path):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=str) + "\n"), mode="w")


# ---------------------------------------------------------------------------------------------- provenance
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "unsloth", "bitsandbytes", "pandas",
            "numpy", "scikit-surprise", "openai", "rouge-score")


def sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def provenance(settings: dict, inputs) -> dict:
    """What an artifact was made from, saved beside it (as nanoGPT saves its config with a checkpoint): the resolved
    settings, the code's git commit, the versions of the main packages, and the sha256 of every input file."""
    def git(*command):
        try:
            return subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"settings": settings, "git_commit": git("rev-parse", "HEAD"),
            "git_uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
            "python": sys.version.split()[0], "packages": versions,
            "inputs": {str(p): sha256(p) for p in inputs}}
