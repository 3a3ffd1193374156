"""NUM_GPUS=N runs a generating or scoring step as N data-parallel processes through `accelerate launch` (gloo
processes on this CPU): each computes a non-empty, disjoint share of whole batches, and the main process writes
exactly what a single process writes."""
import hashlib
import re
import shutil

import pytest

from conftest import DATASET, pipeline_env, run

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
