"""NUM_GPUS=N runs a generating or scoring step as N data-parallel processes through `accelerate launch` (gloo
processes on a CPU): each computes a non-empty, disjoint share of whole batches, and the main process writes
exactly what a single process writes."""
import hashlib
import re
import shutil

import pandas as pd
import pytest

from conftest import DATASET, pipeline_env, run
from teacher_server import TeacherServer

PARALLEL = [  # script, its arguments, its output
    ("1_Summarizer/4_summarizer_generation.py", ["--max_new_tokens", "12", "--batch_size", "16"],
     "train_summarizer_generation_results.pkl"),
    ("3_Predictor/3_generate_predict_for_test.py", ["--batch_size", "4"], "rating_for_test_by_predictor.pkl"),
    ("3_Predictor/5_evaluate_reasons.py", ["--batch_size", "4"], "reason_quality.json"),
]


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("script, extra, output", PARALLEL, ids=[p[2] for p in PARALLEL])
def test_two_processes_share_the_work_and_write_what_one_writes(finished, tmp_path, tiny_model, script, extra, output):
    results = {}
    for processes in ("1", "2"):
        work = tmp_path / f"n{processes}"
        shutil.copytree(finished[0], work, ignore=shutil.ignore_patterns("*.sqlite*", output))
        done = run(script, *extra, cwd=work, env=pipeline_env(tiny_model, NUM_GPUS=processes))
        results[processes] = sha(work / "Data" / DATASET / output), done.stdout + done.stderr
    (one, _), (two, printed) = results["1"], results["2"]
    assert "as 2 data-parallel processes" in printed
    # per progress line: (what, process, computed, of); the first pass of a step starts from an empty cache
    lines = re.findall(r"^(.+?): process (\d) of 2 computed (\d+) of (\d+) prompts", printed, flags=re.M)
    first = [(int(k), int(n), int(total)) for what, k, n, total in lines if what == lines[0][0]]
    assert sorted(k for k, _, _ in first) == [0, 1] and all(n > 0 for _, n, _ in first)  # both worked
    assert sum(n for _, n, _ in first) == first[0][2]  # disjoint: every prompt computed once, by one process
    assert two == one  # gathered and written once, byte for byte the single process's output


def test_a_slow_paid_teacher_keeps_no_process_waiting_past_the_process_group_timeout(workspace, tiny_model):
    """Two gloo processes whose collectives time out after 2 s, and a teacher that takes 4 s per answer: the main
    process asks while the other waits outside the process group, and the step finishes."""
    server = TeacherServer(latency=4)
    env = pipeline_env(tiny_model, server, NUM_GPUS="2", PROCESS_GROUP_TIMEOUT="2", TEACHER_CONCURRENCY="4")
    done = run("1_Summarizer/1_distilling_aspect_preference_summary.py", "--limit", "8", cwd=workspace, env=env,
               check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "as 2 data-parallel processes" in done.stdout
    summaries = pd.read_pickle(workspace / "Data" / DATASET / "train_aspect_preference_summary.pkl")
    assert len(summaries) == 8 and server.answers == 8 and server.repeated == 0
    server.close()
