"""Fault injection: kill every long loop and resume it, starve and break the teacher, feed the scripts bad state;
nothing is lost, nothing is paid twice, nothing leaks, and the same inputs give the same bytes."""
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from cache import ResultCache
from conftest import (DATASET, FAST, REPO, cut_short, environment, file_hashes, full_run, kill_training_after,
                      logged_steps, pipeline_env, plant_in_log, run)
from prompts import GPTSCORE_INSTRUCTION, GPTSCORE_REVERSE_INSTRUCTION, JUDGE_TEMPLATE
from teacher_server import TeacherServer

GEN, GRPO = FAST["GEN_ARGS"].split(), FAST["GRPO_ARGS"].split()
# The long loops that pay the teacher (script, arguments, output), and those that run a local model (the same, and
# what each answer becomes in the output: a column, or the Predictor's prompts, which quote the Reasoner's reasons).
TEACHER_LOOPS = [
    ("1_Summarizer/1_distilling_aspect_preference_summary.py", [], "train_aspect_preference_summary.pkl"),
    ("2_Reasoner/4_distilling_possible_reason.py", ["--batch_size", "2"], "distilling_high_quality_reasons.pkl"),
]
GENERATION_LOOPS = [
    ("1_Summarizer/4_summarizer_generation.py", ["--max_new_tokens", "12", "--batch_size", "2", "--limit", "80"],
     "train_summarizer_generation_results.pkl", "aspect_preference_summary"),
    ("2_Reasoner/7_generate_reason_for_test.py", ["--max_new_tokens", "12", "--batch_size", "1"],
     "reason_for_test_by_reasoner.pkl", "reasoner_reply"),
    ("3_Predictor/1_construct_predictor_train_data.py", ["--max_new_tokens", "12", "--batch_size", "1"],
     "Predictor_train_instruct.pkl", "messages"),
    ("3_Predictor/3_generate_predict_for_test.py", ["--batch_size", "1"], "rating_for_test_by_predictor.pkl", "pred"),
]


def copy_of(finished, dest: Path, output: str) -> Path:
    """The finished pipeline's working folder without this step's output and without any cache."""
    shutil.copytree(finished, dest, ignore=shutil.ignore_patterns("*.sqlite*", output))
    return dest


rows = ResultCache.count


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def data(folder: Path) -> Path:
    return folder / "Data" / DATASET


@pytest.mark.parametrize("script, extra, output", TEACHER_LOOPS, ids=[Path(x[0]).stem for x in TEACHER_LOOPS])
def test_a_killed_teacher_step_resumes_asking_only_what_is_missing(finished, tmp_path, tiny_model, script, extra,
                                                                    output):
    """SIGKILL after a random number of answers (none included), when no request is in flight; the rerun asks the
    server for exactly the requests it has not answered yet (it counts every request it bills) and writes the bytes
    of an uninterrupted run."""
    root = finished[0]
    whole, killed = copy_of(root, tmp_path / "whole", output), copy_of(root, tmp_path / "killed", output)
    server = TeacherServer()
    run(script, *extra, cwd=whole, env=pipeline_env(tiny_model, server))
    total = server.answers
    server.close()

    server = TeacherServer()
    cache = data(killed) / "teacher_cache.sqlite"
    stop_at = random.Random(script).randint(0, total // 2)
    server.hold(stop_at)  # then nothing the server would count is in flight at the kill
    child = subprocess.Popen([sys.executable, str(REPO / script), *extra], cwd=killed,
                             env=environment(pipeline_env(tiny_model, server)), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while rows(cache) < stop_at or rows(cache) < server.answers:
        assert child.poll() is None, f"{script} finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL and not (data(killed) / output).exists()
    assert server.answers == rows(cache) == stop_at
    server.release()
    run(script, *extra, cwd=killed, env=pipeline_env(tiny_model, server))

    assert sha(data(killed) / output) == sha(data(whole) / output)
    assert server.repeated == 0 and server.answers == total
    server.close()


def answers_in(path: Path, column: str) -> list:
    """What each row of a step's output holds of the model's answers."""
    if column == "messages":  # the Predictor's prompts, each quoting the Reasoner's reason
        return [x["messages"][0]["content"] for x in pickle.loads(path.read_bytes())]
    return pd.read_pickle(path)[column].tolist()


def plant(cache: Path) -> set:
    """Replace every answer a killed step committed to its cache by a marker no model writes: the text planted-<n>, or
    the rating 1 + (n + 1) / 1024.  Returns the markers."""
    with sqlite3.connect(cache) as db:
        stored = db.execute("SELECT key, value FROM results").fetchall()
        markers = {key: f"planted-{n}" if isinstance(json.loads(value), str) else 1 + (n + 1) / 1024
                   for n, (key, value) in enumerate(stored)}
        db.executemany("UPDATE results SET value = ? WHERE key = ?", [(json.dumps(m), k) for k, m in markers.items()])
    db.close()
    return set(markers.values())


def planted_in(value, markers: set):
    """The marker a row of the output holds, or None."""
    if isinstance(value, str):
        found = re.search(r"planted-\d+", value)
        return found and found.group()
    return value if value in markers else None


@pytest.fixture(scope="module")
def uninterrupted(finished, tmp_path_factory, tiny_model):
    """Each generation loop run once without a stop: (its output, how many answers its cache holds)."""
    done = {}

    def of(script, extra, output):
        if script not in done:
            whole = copy_of(finished[0], tmp_path_factory.mktemp("whole") / "w", output)
            run(script, *extra, cwd=whole, env=pipeline_env(tiny_model))
            done[script] = data(whole) / output, rows(data(whole) / "generation_cache.sqlite")
        return done[script]
    return of


@pytest.mark.parametrize("at", ["first batch", "random"])
@pytest.mark.parametrize("script, extra, output, column", GENERATION_LOOPS,
                         ids=[Path(x[0]).stem for x in GENERATION_LOOPS])
def test_a_killed_generation_step_computes_only_what_is_missing(uninterrupted, finished, tmp_path, tiny_model,
                                                                 script, extra, output, column, at):
    """SIGKILL while the first batch is computed (nothing committed yet), or after a random number of committed
    answers; then every committed answer is replaced by a marker.  The rerun's output holds every marker (the answers
    were taken from the cache, not computed again: a recomputed one would also have replaced its marker in the
    cache), and every other row as an uninterrupted run computes it."""
    whole, total = uninterrupted(script, extra, output)
    killed = copy_of(finished[0], tmp_path / "killed", output)
    cache = data(killed) / "generation_cache.sqlite"
    stop_at = 0 if at == "first batch" else random.Random(script).randint(1, total // 2)
    child = subprocess.Popen([sys.executable, str(REPO / script), *extra], cwd=killed,
                             env=environment(pipeline_env(tiny_model)), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    progress = []  # what the step printed: its progress bar shows once it starts on the first batch
    threading.Thread(target=lambda: progress.extend(iter(lambda: child.stderr.read1(4096), b"")), daemon=True).start()
    deadline = time.time() + 300
    while rows(cache) < stop_at or b"prompt/s]" not in b"".join(progress):
        assert child.poll() is None, f"{script} finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.002)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL and not (data(killed) / output).exists()
    committed = rows(cache)  # 0 at the first batch, unless it was done within the moment the kill took
    assert stop_at <= committed < total
    markers = plant(cache) if committed else set()
    run(script, *extra, cwd=killed, env=pipeline_env(tiny_model))

    got, want = answers_in(data(killed) / output, column), answers_in(whole, column)
    found = [planted_in(value, markers) for value in got]
    assert {m for m in found if m is not None} == markers and len(got) == len(want)
    assert [g for g, m in zip(got, found) if m is None] == [w for w, m in zip(want, found) if m is None]
    assert rows(cache) == total
    with sqlite3.connect(cache) as db:
        assert markers <= {json.loads(v) for (v,) in db.execute("SELECT value FROM results")}
    db.close()


TRAIN = ["--max_steps", "6", "--save_strategy", "steps", "--save_steps", "1", "--per_device_train_batch_size", "2"]
REASONER_TRAIN = "2_Reasoner/6_reasoner_train.sh"
FINAL = "final_checkpoint/adapter_model.safetensors"


def reasoner(work: Path) -> Path:
    return work / "checkpoints" / DATASET / "Reasoner"


@pytest.fixture(scope="module")
def trained_reasoner(finished, tmp_path_factory, tiny_model) -> Path:
    """The Reasoner trained for 6 steps without a stop, a checkpoint per step."""
    whole = copy_of(finished[0], tmp_path_factory.mktemp("whole") / "w", "checkpoints")
    run(REASONER_TRAIN, *TRAIN, cwd=whole, env=pipeline_env(tiny_model))
    return whole


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    a, b = load_file(a), load_file(b)
    return a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-6 for k in a)


def test_training_resumes_from_its_last_complete_checkpoint_after_cosmetic_changes(trained_reasoner, finished,
                                                                                  tmp_path, tiny_model):
    """Killed after three checkpoints while saving the fourth (planted: checkpoint-4 without its trainer_state.json),
    a mark planted in checkpoint-3's log history, then rerun with the flags in another order, a logging flag and a
    saving flag: the same job.  It resumes from checkpoint-3 (its log history goes on: the mark, then steps 4 to 6
    only; a run from scratch, or one resumed from checkpoint-2, has no mark), checkpoints 1-3 are byte for byte as they
    were, and the weights are those of an uninterrupted run."""
    killed = copy_of(finished[0], tmp_path / "killed", "checkpoints")
    out = reasoner(killed)
    kill_training_after(REASONER_TRAIN, TRAIN, killed, tiny_model, out, 3)
    plant_in_log(out / "checkpoint-3")
    cut_short(out / "checkpoint-3", out / "checkpoint-4")
    before = file_hashes(*(out / f"checkpoint-{n}" for n in (1, 2, 3)))
    reordered = TRAIN[4:] + TRAIN[:4] + ["--logging_steps", "2", "--save_total_limit", "10"]
    resumed = run(REASONER_TRAIN, *reordered, cwd=killed, env=pipeline_env(tiny_model)).stdout
    assert f"skipping {Path('checkpoints') / DATASET / 'Reasoner' / 'checkpoint-4'}: it was cut short" in resumed
    assert f"resuming from {Path('checkpoints') / DATASET / 'Reasoner' / 'checkpoint-3'}" in resumed
    history = json.loads((out / "final_checkpoint" / "log_history.json").read_text())
    assert logged_steps(history) == [1, 2, 3, "planted", 4, 5, 6]
    assert file_hashes(*(out / f"checkpoint-{n}" for n in (1, 2, 3))) == before
    assert same_weights(out / FINAL, reasoner(trained_reasoner) / FINAL)


def test_a_checkpoint_with_truncated_weights_is_not_resumed_from(trained_reasoner, tmp_path, tiny_model):
    """A checkpoint whose weights were cut short (power lost before the file system wrote them out, though
    trainer_state.json made it): the rerun resumes from the checkpoint before it."""
    work = tmp_path / "w"
    shutil.copytree(trained_reasoner, work, ignore=shutil.ignore_patterns("checkpoint-5", "checkpoint-6",
                                                                          "final_checkpoint"))
    out = reasoner(work)
    weights = out / "checkpoint-4" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    resumed = run(REASONER_TRAIN, *TRAIN, cwd=work, env=pipeline_env(tiny_model)).stdout
    assert f"resuming from {Path('checkpoints') / DATASET / 'Reasoner' / 'checkpoint-3'}" in resumed
    assert same_weights(out / FINAL, reasoner(trained_reasoner) / FINAL)


def test_another_job_in_the_same_folder_is_refused_and_deletes_nothing(finished, tmp_path, tiny_model):
    work = copy_of(finished[0], tmp_path / "w", "checkpoints")
    out = reasoner(work)
    kill_training_after(REASONER_TRAIN, TRAIN, work, tiny_model, out, 2)
    before = file_hashes(out)
    again = run(REASONER_TRAIN, *TRAIN, "--learning_rate", "1e-3", cwd=work, env=pipeline_env(tiny_model),
                check=False)
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert again.returncode == 1 and len(errors) == 1 and "Traceback" not in again.stderr
    assert "another training job" in errors[0] and "learning_rate 0.0003 -> 0.001" in errors[0]
    assert str(Path("checkpoints") / DATASET / "Reasoner") in errors[0] and "OUTPUT_DIR" in errors[0]
    assert file_hashes(out) == before
    elsewhere = run(REASONER_TRAIN, *TRAIN, "--learning_rate", "1e-3", cwd=work,
                    env=pipeline_env(tiny_model, OUTPUT_DIR="checkpoints/other")).stdout
    assert "resuming" not in elsewhere and (work / "checkpoints/other/final_checkpoint").is_dir()


# ------------------------------------------------------------------------------------------------ teacher faults
@pytest.mark.parametrize("fault, cause", [
    ("429", "RateLimitError"), ("500", "InternalServerError"), ("timeout", "APITimeoutError"),
    ("malformed", "JSONDecodeError"), ("empty", "the answer was empty")])
def test_teacher_faults_end_in_one_clear_error_naming_the_row_and_keep_the_answers(finished, tmp_path, tiny_model,
                                                                                      fault, cause):
    """Five answers, then the fault for good: the sixth row is asked three times in all (TEACHER_MAX_RETRIES=2 retries
    by the openai client for 429, 5xx and timeouts; two more asks for an unreadable or empty answer), then the step
    stops with one message naming the row and the cause, and keeps the five answers."""
    work = copy_of(finished[0], tmp_path / "w", "train_aspect_preference_summary.pkl")
    server = TeacherServer(faults=[None] * 5 + [fault] * 20)
    env = pipeline_env(tiny_model, server, TEACHER_CONCURRENCY="1", TEACHER_MAX_RETRIES="2", TEACHER_TIMEOUT="1")
    result = run("1_Summarizer/1_distilling_aspect_preference_summary.py", cwd=work, env=env, check=False)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "row 5 of raw_data/train.pkl (user " in errors[0] and f"failed: {cause}" in errors[0]
    assert "5 answers received so far are kept" in errors[0]
    assert server.received == 5 + 3 and rows(data(work) / "teacher_cache.sqlite") == 5
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
TINY_TRAIN = ["--max_steps", "1", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "16"]
HELD_OUT = ["raw_data/valid.pkl?", "raw_data/test.pkl?"]  # read by every step that builds histories (leakage check)
SUMMARIES = "train_summarizer_generation_results.pkl"
RUN = "dataset.json"  # the recorded settings that shape prompts
# Every step (as a user runs it, and the same run in this process: the .sh scripts exec qlora_finetune.py or
# 4_GRPO/1_reasoner_grpo_train.py with their yaml, or a generation step with --reasoner Reasoner_GRPO) and every input it reads: a file under Data/<dataset>/, or an
# expert's adapter, its final_checkpoint.  "?": optional (its absence is no error), so only truncated and wrong.
INPUTS = [
    ("1_Summarizer/1_distilling_aspect_preference_summary.py", [], None, ["raw_data/train.pkl", RUN]),
    ("1_Summarizer/2_construct_summarizer_train_data.py", [], None, ["train_aspect_preference_summary.pkl", RUN]),
    ("1_Summarizer/3_summarizer_train.sh", TINY_TRAIN,
     ("qlora_finetune.py", "--config", "1_Summarizer/summarizer.yaml"), ["Summarizer_train_instruct.pkl"]),
    ("1_Summarizer/4_summarizer_generation.py", GEN, None, ["raw_data/train.pkl", "Summarizer", RUN]),
    ("2_Reasoner/1_sample_train_data.py", [], None, ["raw_data/train.pkl", SUMMARIES, *HELD_OUT, RUN]),
    ("2_Reasoner/2_construct_reward_train_data.py", [], None, ["review_8000.pkl", SUMMARIES, *HELD_OUT, RUN]),
    ("2_Reasoner/3_reward_model_train.sh", TINY_TRAIN,
     ("qlora_finetune.py", "--config", "2_Reasoner/reward_model.yaml"),
     ["review_train_data.pkl", "review_valid_data.pkl"]),
    ("2_Reasoner/4_distilling_possible_reason.py", GEN, None,
     ["train_12000.pkl", SUMMARIES, *HELD_OUT, "reason_reward_model", RUN]),
    ("2_Reasoner/5_construct_reasoner_train_data.py", [], None,
     ["distilling_high_quality_reasons.pkl", SUMMARIES, *HELD_OUT, RUN]),
    ("2_Reasoner/6_reasoner_train.sh", TINY_TRAIN, ("qlora_finetune.py", "--config", "2_Reasoner/reasoner.yaml"),
     ["Reasoner_train_instruct.pkl"]),
    ("2_Reasoner/7_generate_reason_for_test.py", GEN, None, ["raw_data/test.pkl", "raw_data/valid.pkl?", SUMMARIES,
                                                             "Reasoner", RUN]),
    ("3_Predictor/1_construct_predictor_train_data.py", GEN, None,
     ["distilling_high_quality_reasons.pkl", SUMMARIES, "raw_data/valid.pkl?", "raw_data/test.pkl?", "Reasoner",
      "reason_for_valid_by_reasoner.pkl", RUN]),
    ("3_Predictor/1_construct_predictor_train_data.py", ["--no_reason"], None, ["train_12000.pkl"]),
    ("3_Predictor/2_predictor_train.sh", TINY_TRAIN,
     ("qlora_finetune.py", "--config", "3_Predictor/predictor.yaml", "--expert", "Predictor", "--train_data",
      "Predictor_train_instruct.pkl", "--valid_data", "Predictor_valid_instruct.pkl"),
     ["Predictor_train_instruct.pkl", "Predictor_valid_instruct.pkl"]),
    ("3_Predictor/3_generate_predict_for_test.py", GEN, None,
     ["reason_for_test_by_reasoner.pkl", SUMMARIES, *HELD_OUT, "Predictor", RUN]),
    ("3_Predictor/3_generate_predict_for_test.py", ["--no_reason", *GEN], None, ["raw_data/test.pkl",
                                                                                 "Direct_Predictor"]),
    ("3_Predictor/4_evaluate.py", [], None,
     ["rating_for_test_by_predictor.pkl", "raw_data/train.pkl", "raw_data/valid.pkl?", "raw_data/test.pkl",
      "rating_for_valid_by_predictor.pkl?", "rating_for_test_direct.pkl?", "rating_for_test_by_predictor_grpo.pkl?",
      RUN + "?"]),  # its one recorded setting, eval_limit, has a default
    ("3_Predictor/5_evaluate_reasons.py", [], None,
     ["raw_data/test.pkl", "reason_for_test_by_reasoner.pkl", "reason_for_test_by_reasoner_grpo.pkl?", RUN]),
    ("4_GRPO/1_reasoner_grpo_train.sh", GRPO + ["--max_steps", "1"],
     ("4_GRPO/1_reasoner_grpo_train.py", "--config", "4_GRPO/reasoner_grpo.yaml"),
     ["review_8000.pkl", SUMMARIES, "raw_data/valid.pkl", "raw_data/test.pkl?", "Reasoner", "Predictor", RUN]),
    ("4_GRPO/2_generate_reason_for_test.sh", GEN,
     ("2_Reasoner/7_generate_reason_for_test.py", "--reasoner", "Reasoner_GRPO"), ["Reasoner_GRPO"]),
    ("4_GRPO/3_generate_predict_for_test.sh", GEN,
     ("3_Predictor/3_generate_predict_for_test.py", "--reasoner", "Reasoner_GRPO"),
     ["reason_for_test_by_reasoner_grpo.pkl"]),
]
# What each kind of damage must be called, besides the input's name and the step that writes it.
SAYS = {"missing": ("not found", "no model at"), "truncated": ("truncated or corrupted",), "wrong": ()}


def damage(path: Path, kind: str, model: str):
    """Leave an input as a crash, a full disk or a mix-up would: missing, truncated (half of it), or wrong (a file of
    another kind: a table without the columns, a JSON list, a base model's config as an adapter's)."""
    adapter = path.name == "final_checkpoint"
    if kind == "missing":
        shutil.rmtree(path) if adapter else path.unlink()
    elif kind == "truncated":
        target = path / "adapter_model.safetensors" if adapter else path
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif adapter:
        shutil.copy(Path(model) / "config.json", path / "adapter_config.json")
    elif path.suffix == ".json":
        path.write_text(json.dumps(["Musical Instruments", 10]))
    else:
        pd.DataFrame({"x": [1]}).to_pickle(path)


def run_here(command, cwd: Path, env: dict) -> tuple[int, str]:
    """Run a step's script in this process, as `python script arguments` runs it from `cwd` with `env` (for the many
    runs below, far quicker than a new interpreter each): its exit status and what it wrote to stderr."""
    import contextlib
    import io
    import runpy
    import traceback

    script, *args = map(str, command)
    saved = dict(os.environ), os.getcwd(), sys.argv[:], sys.path[:]
    os.environ.update(environment(env))
    os.chdir(cwd)
    sys.argv = [str(REPO / script), *args]
    err, status = io.StringIO(), 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(str(REPO / script), run_name="__main__")
    except SystemExit as e:  # as the interpreter ends on it: a message goes to stderr, with status 1
        status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        err.write("" if isinstance(e.code, int) or e.code is None else f"{e.code}\n")
    except Exception:
        status = 1
        err.write(traceback.format_exc())
    finally:
        os.environ.clear()
        os.environ.update(saved[0])
        os.chdir(saved[1])
        sys.argv, sys.path[:] = saved[2], saved[3]
    return status, err.getvalue()


@pytest.mark.parametrize("script, args, execs, inputs", INPUTS,
                         ids=[Path(x[0]).stem + " --no_reason" * ("--no_reason" in x[1]) for x in INPUTS])
def test_missing_truncated_or_wrong_inputs_say_what_to_run(finished, tmp_path, tiny_model, teacher_server, script,
                                                            args, execs, inputs):
    """Each input of each step, damaged in each of three ways: the step stops with one line naming the input, the
    damage and the step that writes it (no traceback).  A .sh script runs as a user runs it for the
    first damage, and in this process as the script it execs for the others."""
    import llm
    from utils import PRODUCERS

    work = tmp_path / "w"
    shutil.copytree(finished[0], work)  # the caches too: whatever runs before the damage is found is not recomputed
    env = pipeline_env(tiny_model, teacher_server)
    for name in inputs:
        optional, name = name.endswith("?"), name.rstrip("?")
        expert = name in PRODUCERS and "." not in name
        path = work / "checkpoints" / DATASET / name / "final_checkpoint" if expert else data(work) / name
        pristine = finished[0] / path.relative_to(work)
        for kind in ("truncated", "wrong") if optional else ("missing", "truncated", "wrong"):
            damage(path, kind, tiny_model)
            if script.endswith(".sh") and kind == "missing":
                result = run(script, *args, cwd=work, env=env, check=False)
                status, stderr = result.returncode, result.stderr
            else:
                loads = len(llm.LOADS)
                command = [str(REPO / a) if a.endswith(".yaml") else a for a in execs or [script]]
                status, stderr = run_here([*command, *args], work, env)
                loaded = llm.LOADS[loads:]
                assert expert or not loaded, f"{script} loaded {loaded} before finding {name} {kind}"
            errors = [line for line in stderr.splitlines() if line.startswith("error:")]
            what = f"{script} {' '.join(args)}, {name} {kind}:\n{stderr[-3000:]}"
            assert status == 1 and "Traceback" not in stderr and len(errors) == 1, what
            assert name in errors[0] and PRODUCERS[name] in errors[0], what
            assert not SAYS[kind] or any(words in errors[0] for words in SAYS[kind]), what
            if path.is_dir():
                shutil.rmtree(path)
            shutil.copytree(pristine, path) if pristine.is_dir() else shutil.copy(pristine, path)


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


def outputs(root: Path) -> dict:
    """The hash of every file the pipeline wrote but the training logs (each run of a trainer logs its own runtime)."""
    return {str(p.relative_to(root)): sha(p) for p in sorted(root.rglob("*")) if p.is_file()
            and ".sqlite" not in p.name and p.name not in ("trainer_state.json", "log_history.json")}


def test_running_every_step_twice_never_duplicates_rows(finished, tmp_path, tiny_model):
    """run_all.sh again in a copy of the finished run, caches included, against the same teacher endpoint (the cache
    keys name it): every file it wrote is byte for byte what the first run wrote (no row duplicated, none changed),
    the teacher is asked nothing and no cache grows."""
    work = tmp_path / "w"
    shutil.copytree(finished[0], work)
    before, caches = outputs(work), {c.name: rows(c) for c in data(work).glob("*.sqlite")}
    assert len(before) > 100 and len(caches) == 2
    server = finished[2]
    asked = server.received
    out = run("run_all.sh", cwd=work, env=pipeline_env(tiny_model, server, **FAST), timeout=1800).stdout
    assert "all 27 steps done" in out and outputs(work) == before
    assert server.received == asked and {c.name: rows(c) for c in data(work).glob("*.sqlite")} == caches


# A step run with a kill at one moment of its first output's write: half way through the new bytes, or once they
# are all written but before the rename.
KILLED_WRITE = """
import os, pickle, runpy, signal, sys
when, script = sys.argv[1:3]
def die(*_, **__):
    os.kill(os.getpid(), signal.SIGKILL)
def half(obj, file, *args, **kwargs):
    data = pickle.dumps(obj, *args, **kwargs)
    file.write(data[: len(data) // 2])
    file.flush()
    die()
if when == "while writing":
    pickle.dump = half
else:
    os.replace = die
sys.argv = [script]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.parametrize("when", ["while writing", "before the rename"])
def test_a_write_killed_before_its_rename_leaves_the_old_file_whole(finished, tmp_path, tiny_model, when):
    """2_Reasoner/1 rewrites review_8000.pkl (here an older version of it, one row short) and is killed while writing
    or just before the rename: the old file is there byte for byte (a reader or a rerun sees it whole); the rerun
    then writes the new one."""
    work = copy_of(finished[0], tmp_path / "w", "__nothing__")
    target = data(work) / "review_8000.pkl"
    pd.read_pickle(target).iloc[:-1].to_pickle(target)
    old = target.read_bytes()
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, when, str(REPO / "2_Reasoner/1_sample_train_data.py")],
                            cwd=work, env=environment(pipeline_env(tiny_model)), capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert target.read_bytes() == old
    run("2_Reasoner/1_sample_train_data.py", cwd=work, env=pipeline_env(tiny_model))
    assert sha(target) == sha(data(finished[0]) / "review_8000.pkl")


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


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, real_slice, tiny_model):
    """A whole run on the same data with marked held-out rows: every test row gets the rating 9.0 (which no rating
    takes) and a review text that starts with its mark, HELD-OUT-test-<n>; every valid and test row a summary column
    holding its mark (the pipeline has no summary of a held-out row: one that showed would have come from there).  The
    users, items and times, which the leakage check reads, and the validation ratings and reviews, on which models are
    chosen, are unchanged.  Every conversation shown to a local model is logged (tests/prompt_spy)."""
    data = tmp_path_factory.mktemp("poisoned-data") / DATASET
    shutil.copytree(real_slice, data)
    for split in ("valid", "test"):
        rows = pd.read_pickle(data / "raw_data" / f"{split}.pkl")
        marks = [f"HELD-OUT-{split}-{n}" for n in range(len(rows))]
        rows = rows.assign(aspect_preference_summary=[f"{m} summary" for m in marks],
                           review_summary=[f"{m} summary" for m in marks])
        if split == "test":
            rows = rows.assign(ratings=9.0, reviews=[f"{m} review: {r[::-1]}" for m, r in zip(marks, rows["reviews"])])
        rows.to_pickle(data / "raw_data" / f"{split}.pkl")
    log = data.parent / "prompts.jsonl"
    spy = os.pathsep.join(filter(None, [str(REPO / "tests" / "prompt_spy"), os.environ.get("PYTHONPATH")]))
    root, _, server = full_run(tmp_path_factory.mktemp("poisoned"), data, tiny_model, PROMPT_LOG=str(log),
                               PYTHONPATH=spy)
    yield root, server, log
    server.close()


def test_training_and_selection_never_read_the_test_ratings_or_reviews(finished, poisoned):
    """The poisoned run trains the same adapters and makes the same choices as the clean one, on the same validation
    metrics (to the float noise of another process: the logging changes where tensors lie in memory)."""
    def chosen(run_root):
        folders = sorted((run_root / "checkpoints" / DATASET).glob("*/final_checkpoint"))
        return {f.parent.name: (sha(f / "adapter_model.safetensors"), json.loads((f / "selection.json").read_text()))
                for f in folders}

    clean, dirty = chosen(finished[0]), chosen(poisoned[0])
    assert len(clean) == 6 and clean.keys() == dirty.keys()
    for expert, (weights, selection) in clean.items():
        other = dirty[expert][1]
        assert dirty[expert][0] == weights and other["chosen"] == selection["chosen"], expert
        assert [(c["candidate"], c["step"]) for c in other["candidates"]] == \
            [(c["candidate"], c["step"]) for c in selection["candidates"]]
        assert [c["valid_metric"] for c in other["candidates"]] == pytest.approx(
            [c["valid_metric"] for c in selection["candidates"]], abs=1e-4)
    assert sha(data(poisoned[0]) / "raw_data" / "test.pkl") != sha(data(finished[0]) / "raw_data" / "test.pkl")


# What a test row's rating would look like in a prompt: in a history, as an answer, as a hint, or in an average (which
# no true rating puts above 5).
RATING_SEEN = re.compile(r", 9\.0;|Predicted Rating: 9\.0|rated the item 9\.0 stars|Average Rating[^:\n]*: "
                         r"(5\.[1-9]|[6-9]\.\d)")


def strings(obj) -> list[str]:
    """Every text in a conversation, however it is nested (a batch of conversations, content parts)."""
    if isinstance(obj, str):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else []
    return [text for value in values for text in strings(value)]


def test_no_test_or_valid_review_reaches_any_prompt(poisoned):
    """Every conversation of the poisoned run (each local model's: inference, the local scorers, SFT and GRPO
    training; the teacher's requests, as the server received them) and every SFT file (*_train_instruct,
    *_valid_instruct, Direct_Predictor_*, the reward model's) holds no mark and no test rating.  A validation review
    shows only where it is the reward model's input for its own row (review_valid_data.pkl, on which the reward model
    is chosen), as the real review of a training row is in its training data.  The judge of the reasons
    (3_Predictor/5, after everything else: the teacher's judge and the local GPTScore, both directions) is shown the test
    review by design: nothing is learnt or chosen from it."""
    root, server, log = poisoned
    files = sorted(data(root).glob("*_instruct.pkl")) + sorted(data(root).glob("review_*_data.pkl"))
    assert {f.name for f in files} >= {"Direct_Predictor_train_instruct.pkl", "Direct_Predictor_valid_instruct.pkl",
                                       "Predictor_valid_instruct.pkl", "review_valid_data.pkl"}
    scoring = (GPTSCORE_INSTRUCTION, GPTSCORE_REVERSE_INSTRUCTION)
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    conversations = [c for c in logged if not any(t.startswith(scoring) for t in strings(c))]
    assert len(conversations) < len(logged)  # GPTScore's conversations were logged, and are the ones set aside
    conversations += [b["messages"] for b in server.bodies
                      if not b["messages"][-1]["content"].startswith(JUDGE_TEMPLATE[:40])]
    conversations += [x["messages"] for f in files for x in pickle.loads(f.read_bytes())]
    texts = [text for c in conversations for text in strings(c)]
    assert len(log.read_text().splitlines()) > 100 and server.bodies
    valid = pd.read_pickle(data(root) / "raw_data" / "valid.pkl")
    valid_reviews = [r for r in valid["reviews"] if len(r) > 40]  # long enough to be unmistakable
    own_review = {x["messages"][0]["content"]
                  for x in pickle.loads((data(root) / "review_valid_data.pkl").read_bytes())}
    assert any(r in t for t in own_review for r in valid_reviews)
    for text in texts:
        assert "HELD-OUT-" not in text and not RATING_SEEN.search(text), text
        assert text in own_review or not any(r in text for r in valid_reviews), text


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


def test_a_refused_key_quoted_back_by_the_server_is_masked_and_never_written(finished, tmp_path, tiny_model):
    """The server refuses the key and quotes it back (401 "Incorrect API key provided: sk-...", as OpenAI words it).
    run_all.sh stops at its first step with one error naming the row and the refusal, the key masked; the key is in
    nothing it printed and in no file of the folder (the cache, the step log, every output)."""
    work = tmp_path / "w"
    shutil.copytree(finished[0], work, ignore=shutil.ignore_patterns("teacher_cache.sqlite*",
                                                                     "train_aspect_preference_summary.pkl"))
    server = TeacherServer(faults=["401"] * 100)
    key = server.env()["OPENAI_API_KEY"]
    result = run("run_all.sh", cwd=work, env=pipeline_env(tiny_model, server, STEP_LOG=str(work / "steps.log")),
                 check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and "step 1 (Summarizer 1: teacher summaries) failed" in result.stderr
    assert len(errors) == 1 and " of raw_data/train.pkl (user " in errors[0] and "AuthenticationError" in errors[0]
    assert "Incorrect API key provided: ***" in errors[0] and server.received >= 1
    assert key not in result.stdout + result.stderr
    for path in work.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
    server.close()
