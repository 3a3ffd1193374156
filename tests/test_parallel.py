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
    shares = {int(k): (int(n), int(total)) for k, n, total in
              re.findall(r"process (\d) of 2 computed (\d+) of (\d+) prompts", printed)}
    assert set(shares) == {0, 1} and all(n > 0 for n, _ in shares.values())  # both worked
    (n0, total), (n1, _) = shares[0], shares[1]
    assert n0 + n1 == total  # disjoint: every prompt computed once, by one process
    assert two == one  # gathered and written once, byte for byte the single process's output
