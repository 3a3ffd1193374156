"""Fault injection: kill every long loop and resume it, starve and break the teacher, feed the scripts bad state;
nothing is lost, nothing is paid twice, nothing leaks, and the same inputs give the same bytes."""
import hashlib
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from cache import ResultCache
from conftest import DATASET, FAST, REPO, environment, full_run, pipeline_env, run
from teacher_server import TeacherServer

GEN = FAST["GEN_ARGS"].split()
# Every long loop: the script, its arguments, its output, the cache it keeps its progress in, and whether it pays
# the teacher.
LOOPS = [
    ("1_Summarizer/1_distilling_aspect_preference_summary.py", [], "train_aspect_preference_summary.pkl", "teacher"),
    ("1_Summarizer/4_summarizer_generation.py", ["--max_new_tokens", "12", "--batch_size", "2"],
     "train_summarizer_generation_results.pkl", "generation"),
    ("2_Reasoner/4_distilling_possible_reason.py", ["--batch_size", "2"], "distilling_high_quality_reasons.pkl",
     "teacher"),
    ("2_Reasoner/7_generate_reason_for_test.py", ["--max_new_tokens", "12", "--batch_size", "1"],
     "reason_for_test_by_reasoner.pkl", "generation"),
    ("3_Predictor/1_construct_predictor_train_data.py", ["--max_new_tokens", "12", "--batch_size", "1"],
     "Predictor_train_instruct.pkl", "generation"),
    ("3_Predictor/3_generate_predict_for_test.py", ["--batch_size", "1"], "rating_for_test_by_predictor.pkl",
     "generation"),
]


def copy_of(finished, dest: Path, output: str) -> Path:
    """The finished pipeline's working folder without this step's output and without any cache."""
    shutil.copytree(finished, dest, ignore=shutil.ignore_patterns("*.sqlite*", output))
    return dest


rows = ResultCache.count


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("script, extra, output, kind", LOOPS, ids=[Path(x[0]).stem for x in LOOPS])
def test_kill_at_a_random_point_and_resume(finished, tmp_path, tiny_model, script, extra, output, kind):
    root = finished[0]
    data = lambda folder: folder / "Data" / DATASET  # noqa: E731
    whole, killed = copy_of(root, tmp_path / "whole", output), copy_of(root, tmp_path / "killed", output)

    server = TeacherServer()
    run(script, *extra, cwd=whole, env=pipeline_env(tiny_model, server))
    total = server.answers
    server.close()

    server = TeacherServer()
    env = environment(pipeline_env(tiny_model, server))
    cache = data(killed) / f"{kind}_cache.sqlite"
    stop_at = random.Random(script).randint(1, max(1, total // 2)) if kind == "teacher" else 2
    if kind == "teacher":
        server.hold(stop_at)  # then nothing the server would count is in flight at the kill
    child = subprocess.Popen([sys.executable, str(REPO / script), *extra], cwd=killed, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while rows(cache) < stop_at or (kind == "teacher" and rows(cache) < server.answers):
        assert child.poll() is None, f"{script} finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL and not (data(killed) / output).exists()
    server.release()
    run(script, *extra, cwd=killed, env=pipeline_env(tiny_model, server))

    assert sha(data(killed) / output) == sha(data(whole) / output)
    assert server.repeated == 0 and server.answers == total
    server.close()


def kill_training_after(args, work, tiny_model, checkpoint: int) -> Path:
    """Start the Reasoner's training with `args` in `work` and SIGKILL it once `checkpoint` is complete."""
    child = subprocess.Popen(["bash", str(REPO / "2_Reasoner/6_reasoner_train.sh"), *args], cwd=work,
                             env=environment(pipeline_env(tiny_model)), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    out = work / "checkpoints" / DATASET / "Reasoner"
    while not (out / f"checkpoint-{checkpoint}" / "trainer_state.json").exists():
        assert child.poll() is None, "training finished before it could be killed"
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    return out


TRAIN = ["--max_steps", "6", "--save_strategy", "steps", "--save_steps", "1", "--per_device_train_batch_size", "2"]


def test_training_resumes_from_its_last_checkpoint_after_cosmetic_changes(finished, tmp_path, tiny_model):
    """Killed after three checkpoints, then rerun with the flags in another order and a logging flag added: the same
    job, so it resumes (no checkpoint deleted) and ends with the weights of an uninterrupted run."""
    root = finished[0]
    whole, killed = (copy_of(root, tmp_path / name, "checkpoints") for name in ("whole", "killed"))
    run("2_Reasoner/6_reasoner_train.sh", *TRAIN, cwd=whole, env=pipeline_env(tiny_model))
    out = kill_training_after(TRAIN, killed, tiny_model, 3)
    before = {p.name for p in out.glob("checkpoint-*")}
    reordered = TRAIN[4:] + TRAIN[:4] + ["--logging_steps", "2", "--save_total_limit", "10"]
    resumed = run("2_Reasoner/6_reasoner_train.sh", *reordered, cwd=killed, env=pipeline_env(tiny_model)).stdout
    assert "resuming from" in resumed and "checkpoint-" in resumed
    assert before <= {p.name for p in out.glob("checkpoint-*")}  # nothing deleted
    final = "final_checkpoint/adapter_model.safetensors"
    from safetensors.torch import load_file

    a, b = load_file(out / final), load_file(whole / "checkpoints" / DATASET / "Reasoner" / final)
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-6 for k in a)


def test_another_job_in_the_same_folder_is_refused_and_deletes_nothing(finished, tmp_path, tiny_model):
    work = copy_of(finished[0], tmp_path / "w", "checkpoints")
    out = kill_training_after(TRAIN, work, tiny_model, 2)
    before = {p.name: sha(p / "trainer_state.json") for p in out.glob("checkpoint-*")
              if (p / "trainer_state.json").exists()}
    again = run("2_Reasoner/6_reasoner_train.sh", *TRAIN, "--learning_rate", "1e-3", cwd=work,
                env=pipeline_env(tiny_model), check=False)
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert again.returncode == 1 and len(errors) == 1 and "Traceback" not in again.stderr
    assert "another training job" in errors[0] and "learning_rate 0.0003 -> 0.001" in errors[0]
    assert str(Path("checkpoints") / DATASET / "Reasoner") in errors[0] and "OUTPUT_DIR" in errors[0]
    assert {p.name: sha(p / "trainer_state.json") for p in out.glob("checkpoint-*")
            if (p / "trainer_state.json").exists()} == before
    elsewhere = run("2_Reasoner/6_reasoner_train.sh", *TRAIN, "--learning_rate", "1e-3", cwd=work,
                    env=pipeline_env(tiny_model, OUTPUT_DIR="checkpoints/other")).stdout
    assert "resuming" not in elsewhere and (work / "checkpoints/other/final_checkpoint").is_dir()


# ------------------------------------------------------------------------------------------------ teacher faults
@pytest.mark.parametrize("faults, cause", [
    (["429"] * 20, "RateLimitError"), (["500"] * 20, "InternalServerError"), (["timeout"] * 20, "APITimeoutError"),
    (["malformed"] * 20, ""), (["empty"] * 20, "the answer was empty")])
def test_teacher_faults_end_in_one_clear_error_naming_the_row_and_keep_the_answers(finished, tmp_path, tiny_model,
                                                                                      faults, cause):
    work = copy_of(finished[0], tmp_path / "w", "train_aspect_preference_summary.pkl")
    server = TeacherServer()
    env = pipeline_env(tiny_model, server, TEACHER_CONCURRENCY="1", TEACHER_MAX_RETRIES="2", TEACHER_TIMEOUT="1")
    server.hold(5)
    child = subprocess.Popen([sys.executable, str(REPO / "1_Summarizer/1_distilling_aspect_preference_summary.py")],
                             cwd=work, env=environment(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    while server.answers < 5:
        time.sleep(0.01)
    server.faults = faults
    server.release()
    _, err = child.communicate(timeout=300)
    assert child.returncode == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "row 5 of raw_data/train.pkl (user " in errors[0] and cause in errors[0]
    assert "5 answers received so far are kept" in errors[0]
    assert rows(work / "Data" / DATASET / "teacher_cache.sqlite") == 5
    server.close()


def test_a_429_storm_that_passes_is_survived(finished, tmp_path, tiny_model):
    work = copy_of(finished[0], tmp_path / "w", "train_aspect_preference_summary.pkl")
    server = TeacherServer(faults=["429"] * 4 + ["500"] * 2 + ["timeout"])
    run("1_Summarizer/1_distilling_aspect_preference_summary.py", cwd=work,
        env=pipeline_env(tiny_model, server, TEACHER_MAX_RETRIES="8", TEACHER_TIMEOUT="1"))
    assert sha(work / "Data" / DATASET / "train_aspect_preference_summary.pkl") == \
        sha(finished[0] / "Data" / DATASET / "train_aspect_preference_summary.pkl")
    server.close()


# ------------------------------------------------------------------------------------------------ bad state
STEPS = [  # script, an input it needs, the step that writes that input
    ("1_Summarizer/1_distilling_aspect_preference_summary.py", "raw_data/train.pkl", "Data/prepare_data.py"),
    ("1_Summarizer/2_construct_summarizer_train_data.py", "train_aspect_preference_summary.pkl", "1_Summarizer/1_"),
    ("1_Summarizer/4_summarizer_generation.py", "raw_data/train.pkl", "Data/prepare_data.py"),
    ("2_Reasoner/1_sample_train_data.py", "train_summarizer_generation_results.pkl", "1_Summarizer/4_"),
    ("2_Reasoner/2_construct_reward_train_data.py", "review_8000.pkl", "2_Reasoner/1_"),
    ("2_Reasoner/4_distilling_possible_reason.py", "train_12000.pkl", "2_Reasoner/1_"),
    ("2_Reasoner/5_construct_reasoner_train_data.py", "distilling_high_quality_reasons.pkl", "2_Reasoner/4_"),
    ("2_Reasoner/7_generate_reason_for_test.py", "train_summarizer_generation_results.pkl", "1_Summarizer/4_"),
    ("3_Predictor/1_construct_predictor_train_data.py", "distilling_high_quality_reasons.pkl", "2_Reasoner/4_"),
    ("3_Predictor/3_generate_predict_for_test.py", "reason_for_test_by_reasoner.pkl", "2_Reasoner/7_"),
    ("3_Predictor/4_evaluate.py", "rating_for_test_by_predictor.pkl", "3_Predictor/3_"),
    ("3_Predictor/5_evaluate_reasons.py", "reason_for_test_by_reasoner.pkl", "2_Reasoner/7_"),
]


@pytest.mark.parametrize("script, needed, producer", STEPS, ids=[Path(s[0]).stem for s in STEPS])
def test_missing_truncated_or_wrong_inputs_say_what_to_run(finished, tmp_path, tiny_model, teacher_server, script,
                                                            needed, producer):
    work = copy_of(finished[0], tmp_path / "w", "__nothing__")
    path = work / "Data" / DATASET / needed
    env = pipeline_env(tiny_model, teacher_server)
    original = path.read_bytes()
    for damage, message in [(lambda: path.unlink(), "not found"),
                            (lambda: path.write_bytes(original[: len(original) // 2]), "truncated or corrupted"),
                            (lambda: pd.DataFrame({"x": [1]}).to_pickle(path), "lacks column")]:
        damage()
        result = run(script, cwd=work, env=env, check=False)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert len(errors) == 1 and message in errors[0] and needed in errors[0] and producer in errors[0]
        path.write_bytes(original)


class WritesAFile:
    """What a crafted pickle may hold: unpickling it calls exec, which writes a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('ran')",)


def test_a_pickle_that_would_run_code_is_refused_and_nothing_of_it_runs(tmp_path):
    """A table from others (an archive like the authors') holding, in one cell, an object whose unpickling writes a
    file: the step refuses it, naming what it asked for, and the file is never written."""
    data, written = tmp_path / "Data" / "Music_data", tmp_path / "written"
    (data / "raw_data").mkdir(parents=True)
    reviews = pd.read_pickle(REPO / "tests" / "fixtures" / "Music_data" / "raw_data" / "train.pkl")
    reviews["review_summary"] = [WritesAFile(str(written))] + ["Positive Aspects: fine"] * (len(reviews) - 1)
    reviews.to_pickle(data / "train_aspect_preference_summary.pkl")
    refused = run("1_Summarizer/2_construct_summarizer_train_data.py", "--dataset", "Music_data", cwd=tmp_path,
                  check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "asks to run builtins.exec while it is read" in refused.stderr and "nothing of it ran" in refused.stderr
    assert not written.exists() and not (data / "Summarizer_train_instruct.pkl").exists()


def test_the_authors_pickles_read_as_pandas_reads_them():
    from utils import read_pickle

    for path in sorted((REPO / "tests" / "fixtures" / "Music_data").rglob("*.pkl")):
        assert read_pickle(path).equals(pd.read_pickle(path)), path


def test_running_a_stage_twice_never_duplicates_rows(finished, tmp_path, tiny_model):
    work = copy_of(finished[0], tmp_path / "w", "__nothing__")
    data = work / "Data" / DATASET
    before = {name: sha(data / name) for name in ("review_8000.pkl", "train_12000.pkl", "review_train_data.pkl")}
    for _ in range(2):
        run("2_Reasoner/1_sample_train_data.py", cwd=work, env=pipeline_env(tiny_model))
        run("2_Reasoner/2_construct_reward_train_data.py", cwd=work, env=pipeline_env(tiny_model))
    assert {name: sha(data / name) for name in before} == before


# ------------------------------------------------------------------------------------------------ leakage
def test_a_history_table_holding_test_reviews_is_refused(finished, tmp_path, tiny_model):
    work = copy_of(finished[0], tmp_path / "w", "__nothing__")
    data = work / "Data" / DATASET
    summaries = pd.read_pickle(data / "train_summarizer_generation_results.pkl")
    test = pd.read_pickle(data / "raw_data" / "test.pkl").head(1).assign(aspect_preference_summary="leak")
    pd.concat([summaries, test]).to_pickle(data / "train_summarizer_generation_results.pkl")
    result = run("2_Reasoner/7_generate_reason_for_test.py", *GEN, cwd=work, env=pipeline_env(tiny_model), check=False)
    assert result.returncode == 1
    assert "holds 1 review(s) that are also in a held-out split (1 of the test split" in result.stderr


def test_the_history_index_refuses_an_entry_at_or_after_its_target():
    from histories import HistoryIndex

    log = pd.DataFrame({"user_id": ["u", "u"], "item_id": ["a", "b"], "title": ["A", "B"], "ratings": [4.0, 5.0],
                        "reviews": ["", ""], "unixReviewTime": [10, 20], "aspect_preference_summary": ["s", "t"]})
    index = HistoryIndex(log)
    assert [r.summary for r in index("u", "c", 20).user] == ["s"] and index("u", "c", 10).user == []
    # Break the lookup itself: the sorted times it searches now claim that the review at 20 came first, so a
    # binary search for "before 20" lets that very review through.  The guard must refuse it.
    index.users.times = index.users.times - 15
    with pytest.raises(ValueError, match="at or after"):
        index("u", "c", 20)


# ------------------------------------------------------------------------------------------------ determinism, secrets
def test_same_inputs_and_seeds_give_byte_identical_outputs(finished, tmp_path_factory, real_slice, tiny_model):
    """A second whole run, its teacher through the Batch API (TEACHER_BATCH=1 bash run_all.sh against the test
    server): every output, byte for byte, that of the first (one by one)."""
    again, _, server = full_run(tmp_path_factory.mktemp("again"), real_slice, tiny_model, TEACHER_BATCH="1",
                                TEACHER_BATCH_POLL="0.05")
    assert server.batches_created >= 2  # the Summarizer's teacher step and at least one round of the reason filter
    server.close()

    def hashes(root):
        files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in (".pkl", ".json", ".png", ".safetensors")
                 and "checkpoint-" not in str(p) and p.name not in ("trainer_state.json", "log_history.json")]
        return {str(p.relative_to(root)): sha(p) for p in files}

    first, second = hashes(finished[0]), hashes(again)
    assert len(first) > 25 and first == second


def test_training_and_selection_never_read_the_test_ratings_or_reviews(finished, tmp_path_factory, real_slice,
                                                                     tiny_model):
    """A whole run on the same data whose test set holds other ratings and other review texts (its users, items and
    times, which the leakage check reads, unchanged) trains the same adapters and makes the same choices."""
    poisoned = tmp_path_factory.mktemp("poisoned-data") / DATASET
    shutil.copytree(real_slice, poisoned)
    test = pd.read_pickle(poisoned / "raw_data" / "test.pkl")
    test.assign(ratings=6.0 - test["ratings"], reviews="poisoned: " + test["reviews"].str[::-1]).to_pickle(
        poisoned / "raw_data" / "test.pkl")
    root, _, server = full_run(tmp_path_factory.mktemp("poisoned"), poisoned, tiny_model)
    server.close()

    def chosen(run_root):
        folders = sorted((run_root / "checkpoints" / DATASET).glob("*/final_checkpoint"))
        return {f.parent.name: (sha(f / "adapter_model.safetensors"), (f / "selection.json").read_text())
                for f in folders}

    clean, dirty = chosen(finished[0]), chosen(root)
    assert len(clean) == 6 and clean == dirty
    assert sha(root / "Data" / DATASET / "raw_data" / "test.pkl") != sha(finished[0] / "Data" / DATASET / "raw_data"
                                                                         / "test.pkl")


def test_the_api_key_is_never_written_anywhere(finished):
    root, out, server = finished
    key = server.env()["OPENAI_API_KEY"].encode()
    assert key not in out.encode()
    for path in root.rglob("*"):
        if path.is_file():
            assert key not in path.read_bytes(), path


def _open_cache(path, barrier, results):
    barrier.wait()  # every process at once, as the processes of a data-parallel step start
    try:
        ResultCache(path)
        results.put("opened")
    except SystemExit as e:
        results.put(str(e))


def test_processes_opening_a_new_cache_at_once_all_open_it(tmp_path):
    """The processes of a data-parallel step open the step's cache at the same moment; on a new file, SQLite answers
    one of them "database is locked" while another switches it to WAL, without waiting (seen: 7 of 1,200 opens failed
    here as "corrupted").  Each must open it."""
    import multiprocessing

    context, failed = multiprocessing.get_context("fork"), []
    for attempt in range(150):
        barrier, results = context.Barrier(8), context.Queue()
        workers = [context.Process(target=_open_cache, args=(tmp_path / f"{attempt}.sqlite", barrier, results))
                   for _ in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        failed += [r for r in (results.get() for _ in workers) if r != "opened"]
    assert not failed, failed[:3]
