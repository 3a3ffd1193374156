"""The files the steps pass to each other: their names (and which step writes each), checked reads (pickles through
a restricted unpickler), atomic writes and the provenance of what a step made; and how a step stops (`fail`, and
Ctrl-C / SIGTERM while it waits on others).

The steps talk through files under Data/<dataset>/ (DATA_DIR, DATASET) and adapters under
checkpoints/<dataset>/<Expert>/ (CHECKPOINT_DIR); a missing or damaged input names the step that writes it.
Arguments and recorded settings: settings.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import zipfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import pandas as pd
from pandas.compat import pickle_compat

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
    "reason_for_test_by_reasoner_grpo.pkl": "4_GRPO/2_generate_reason_for_test.sh",
    "reason_for_valid_by_reasoner_grpo.pkl": "4_GRPO/2_generate_reason_for_test.sh --split valid",
    "rating_for_test_by_predictor_grpo.pkl": "4_GRPO/3_generate_predict_for_test.sh",
    "rating_for_valid_by_predictor_grpo.pkl": "4_GRPO/3_generate_predict_for_test.sh --split valid",
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


class Stop(BaseException):
    """SIGINT or SIGTERM, raised in the main thread while the teacher works (see `stop_signals`).  A BaseException, as
    KeyboardInterrupt is, so that no library's `except Exception` swallows it (openai's, while it builds a response
    object, would)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stop_signals():
    """While in this block, SIGINT and SIGTERM (each one, a second one too) raise `Stop` in the main thread."""
    def handler(signum, frame):
        raise Stop(signum)

    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def exit_stopped(stop: Stop, message: str):
    print(f"\nstopped by {stop}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(128 + stop.signum)  # the shell's convention: 130 after SIGINT, 143 after SIGTERM


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
    if not weights.exists() and not (path / "adapter_model.bin").exists():
        fail(f"{path} holds no adapter weights (adapter_model.safetensors); {hint} again.")
    for f in (weights, path / "adapter_model.bin"):
        if f.exists() and (cause := damage(f)):
            fail(f"{f} cannot be read ({cause}); it is truncated or corrupted. {hint} again.")
    return str(path)


def damage(path: Path) -> str | None:
    """Why a weight or state file cannot be read whole (cut short by a kill or a power loss, or corrupted), or None:
    a safetensors file whose header lists tensors beyond its end; a file of torch.save (a zip archive) without its
    end.  Other files: None."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(path, "pt"):  # reads the header and checks that the file holds every tensor it lists
                return None
        except Exception as e:
            return f"{type(e).__name__}: {e}"
    if path.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(path):
        return "not a whole torch.save archive"
    return None


def producer(path: str | Path) -> str:
    name = Path(path).name
    key = f"raw_data/{name}" if Path(path).parent.name == "raw_data" else name
    return f"`{PRODUCERS[key]}`" if key in PRODUCERS else "the step that writes it"


# A pickle names the functions that rebuild it, and unpickling calls them: pandas.read_pickle runs whatever code a pickle
# holds (os.system, eval, open, ...).  Data/ may hold pickles made by others (the authors' archive, a colleague's
# folder), so every pickle is read by an unpickler that finds only what the pipeline's tables need: pandas' and numpy's
# own reconstructors (DataFrames and Series of numbers and strings, their indexes and blocks; pyarrow's, for pandas 3's
# strings) and builtin containers.  Anything else is refused before it runs.
PICKLE_GLOBALS = {
    "builtins": {"slice"},
    "numpy": {"dtype", "ndarray"},
    "numpy.core.multiarray": {"_reconstruct", "scalar"}, "numpy._core.multiarray": {"_reconstruct", "scalar"},
    "numpy.core.numeric": {"_frombuffer"}, "numpy._core.numeric": {"_frombuffer"},
    "pandas": {"DataFrame", "Series", "Index", "RangeIndex", "StringDtype"},
    "pandas.core.frame": {"DataFrame"}, "pandas.core.series": {"Series"},
    "pandas.core.indexes.base": {"Index", "_new_Index"}, "pandas.core.indexes.range": {"RangeIndex"},
    "pandas.core.indexes.numeric": {"Int64Index", "UInt64Index", "Float64Index"},  # pandas 1, renamed on reading
    "pandas.core.internals.managers": {"BlockManager", "SingleBlockManager"},
    "pandas.core.internals.blocks": {"new_block"},  # pandas 1, renamed on reading
    "pandas._libs.internals": {"_unpickle_block"},
    "pandas.arrays": {"ArrowStringArray", "StringArray"},
    "pandas.core.arrays.string_": {"StringArray", "StringDtype"},
    "pandas.core.arrays.string_arrow": {"ArrowStringArray"},
    "pyarrow.lib": {"_restore_array", "py_buffer", "type_for_alias"},
}


class UnsafePickle(Exception):
    pass


class _Restricted:
    def find_class(self, module: str, name: str):
        if name not in PICKLE_GLOBALS.get(module, ()):  # exact names: no dotted path reaches past them
            raise UnsafePickle(f"{module}.{name}")
        return super().find_class(module, name)


class _Unpickler(_Restricted, pickle.Unpickler):
    pass


class _CompatUnpickler(_Restricted, pickle_compat.Unpickler):  # pandas' own, for pickles of an older pandas
    pass


def load_pickle(path: Path):
    """pandas.read_pickle's two ways (the standard unpickler; for pickles of an older pandas, pandas' compatibility
    unpickler), both restricted to PICKLE_GLOBALS; UnsafePickle names what else a pickle asked for."""
    with open(path, "rb") as f:
        try:
            return _Unpickler(f).load()
        except (AttributeError, ImportError, TypeError, ValueError):  # what pandas.read_pickle retries on
            f.seek(0)
            return _CompatUnpickler(f).load()


def read_pickle(path: str | Path, columns=(), what="table"):
    """Load a pickle written by an earlier step (or by others: see PICKLE_GLOBALS) and check it, so that a bad input
    fails here with a clear message rather than deep inside pandas.  `columns`: required columns of a DataFrame;
    `what="table"` wants a DataFrame, `what="messages"` a list of {"messages": [...]} (SFT data), `what="any"`
    whatever it holds."""
    path = Path(path)
    if not path.exists():
        fail(f"{path} not found. Run {producer(path)} first.")
    try:
        obj = load_pickle(path)
    except UnsafePickle as e:
        fail(f"{path} asks to run {e} while it is read, which no table of this pipeline needs (only pandas' and "
             f"numpy's own objects): refused, and nothing of it ran. Do not open it with pandas.read_pickle either "
             f"(that would run it), unless you trust whoever made it; rerun {producer(path)} to make it afresh.")
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


def read_json(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        fail(f"{path} cannot be read ({type(e).__name__}: {e}); it is truncated or corrupted: repair it, or delete it "
             f"and rerun {producer(path)}.")


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
