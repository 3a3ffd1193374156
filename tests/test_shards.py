"""Generation and scoring split into shards (one per GPU or machine) and merged give exactly the single-run output."""
import shutil

import pandas as pd
import pytest

from conftest import DATASET, pipeline_env, run

SHARDED = [  # script, its arguments, its output
    ("1_Summarizer/4_generate_summary_for_train.py", ["--max_new_tokens", "12", "--batch_size", "16"],
     "train_summarizer_generation_results.pkl"),
    ("3_Predictor/1_construct_predictor_train_data.py", ["--max_new_tokens", "12", "--batch_size", "16"],
     "Predictor_train_instruct.pkl"),
    ("3_Predictor/3_generate_predict_for_test.py", ["--batch_size", "16"], "rating_for_test_by_predictor.pkl"),
]


@pytest.mark.parametrize("script, extra, output", SHARDED, ids=[s[2] for s in SHARDED])
def test_two_shards_merged_equal_one_run(finished, tmp_path, tiny_model, script, extra, output):
    work = tmp_path / "w"
    shutil.copytree(finished[0], work, ignore=shutil.ignore_patterns("*.sqlite*"))
    data = work / "Data" / DATASET
    single = pd.read_pickle(data / output)
    (data / output).unlink()
    for shard in ("0", "1"):
        run(script, *extra, "--num_shards", "2", "--shard_id", shard, cwd=work, env=pipeline_env(tiny_model))
    assert not (data / output).exists()
    incomplete = run("scripts/merge_shards.py", data / output, "--num_shards", "3", cwd=work, check=False)
    assert incomplete.returncode == 1 and "shard-2-of-3" in incomplete.stderr
    run("scripts/merge_shards.py", data / output, "--num_shards", "2", cwd=work)
    merged = pd.read_pickle(data / output)
    if isinstance(single, pd.DataFrame):  # exactly equal values, dtypes, index and column order
        pd.testing.assert_frame_equal(merged, single, check_exact=True)
    else:
        assert merged == single


def test_a_shard_id_out_of_range_is_refused(finished, tiny_model):
    result = run("2_Reasoner/7_generate_reason_for_test.py", "--num_shards", "2", "--shard_id", "2",
                 cwd=finished[0], env=pipeline_env(tiny_model), check=False)
    assert result.returncode == 1 and "--shard_id must be in 0..1" in result.stderr
