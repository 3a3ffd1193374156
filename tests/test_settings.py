"""One name per setting: prompt-shaping settings recorded with the data, options a step does not use refused, the
producer of each input named exactly, and every artifact's provenance."""
import json
import shutil

import pytest

from conftest import DATASET, pipeline_env, run
from utils import PRODUCERS, producer


def data_of(root):
    return root / "Data" / DATASET


def test_a_max_his_other_than_the_recorded_one_is_refused(finished, tmp_path, tiny_model):
    work = tmp_path / "w"
    shutil.copytree(finished[0], work, ignore=shutil.ignore_patterns("*.sqlite*"))
    recorded = json.loads((data_of(work) / "dataset.json").read_text())["max_his"]
    assert recorded == 10  # recorded by Data/prepare_data.py
    before = (data_of(work) / "review_8000.pkl").read_bytes()
    refused = run("2_Reasoner/1_sample_train_data.py", "--max_his", "3", cwd=work, env=pipeline_env(tiny_model),
                  check=False)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 1 and len(errors) == 1 and "Traceback" not in refused.stderr
    assert "--max_his 3 differs from the 10 recorded in" in errors[0] and "dataset.json" in errors[0]
    assert "fresh dataset folder" in errors[0]  # how to start over
    assert (data_of(work) / "review_8000.pkl").read_bytes() == before  # nothing written
    run("2_Reasoner/1_sample_train_data.py", "--max_his", "10", cwd=work, env=pipeline_env(tiny_model))


def test_authors_data_records_its_product_class_and_max_his_with_the_first_output(tmp_path):
    """The authors' datasets come without a dataset.json: the first step that writes an output records the product
    class (known from the dataset's name, or --product_class) and the history length; later steps use them, and
    refuse others.  A step that fails before writing anything records nothing."""
    from prompts import HistoryPromptArguments
    from settings import parse_args

    folder = tmp_path / "Data" / "Book_data"
    folder.mkdir(parents=True)
    common = ["--dataset", "Book_data", "--data_dir", str(tmp_path / "Data")]
    data, prompt = parse_args(HistoryPromptArguments, args=common)
    assert (prompt.product_class, prompt.max_his) == ("Book", 10)
    assert not (folder / "dataset.json").exists()  # nothing written yet: nothing used yet
    data.write([1], "output.pkl")
    assert json.loads((folder / "dataset.json").read_text()) == {"product_class": "Book", "max_his": 10,
                                                                 "drop_leaked_history_rows": False}
    parse_args(HistoryPromptArguments, args=common + ["--product_class", "Book"])
    with pytest.raises(SystemExit, match="--product_class 'Books' differs from the 'Book' recorded"):
        parse_args(HistoryPromptArguments, args=common + ["--product_class", "Books"])
    other = tmp_path / "Data" / "mine"
    other.mkdir()
    mine = ["--dataset", "mine", "--data_dir", str(tmp_path / "Data")]
    with pytest.raises(SystemExit, match=r"mine/dataset.json not found. Run `Data/prepare_data.py` first .*or pass --product_class"):
        parse_args(HistoryPromptArguments, args=mine)
    data, _ = parse_args(HistoryPromptArguments, args=mine + ["--product_class", "Gadget", "--max_his", "4"])
    data.write([1], "output.pkl")
    assert json.loads((other / "dataset.json").read_text())["max_his"] == 4


@pytest.mark.parametrize("script, flag", [
    ("3_Predictor/4_evaluate.py", "--max_his"), ("3_Predictor/4_evaluate.py", "--product_class"),
    ("3_Predictor/4_evaluate.py", "--batch_size"), ("1_Summarizer/1_distilling_aspect_preference_summary.py",
                                                     "--max_his")])
def test_an_option_a_step_does_not_use_is_refused(finished, tiny_model, script, flag):
    result = run(script, flag, "5", cwd=finished[0], env=pipeline_env(tiny_model), check=False)
    assert result.returncode == 1 and f"does not take {flag} 5" in result.stderr and "Traceback" not in result.stderr


def test_the_direct_ablation_refuses_a_reasoner_it_would_ignore(finished, tiny_model):
    data = data_of(finished[0])
    before = sorted(p.name for p in data.iterdir())
    result = run("3_Predictor/3_generate_predict_for_test.py", "--no_reason", "--reasoner", "Reasoner_GRPO",
                 cwd=finished[0], env=pipeline_env(tiny_model), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--no_reason rates without reasons, so --reasoner Reasoner_GRPO would be ignored" in result.stderr
    assert sorted(p.name for p in data.iterdir()) == before


def test_the_producer_of_each_input_is_matched_on_its_whole_name():
    assert producer("Data/x/Direct_Predictor_train_instruct.pkl") == \
        "`3_Predictor/1_construct_predictor_train_data.py --no_reason`"
    assert producer("Data/x/Predictor_train_instruct.pkl") == "`3_Predictor/1_construct_predictor_train_data.py`"
    assert producer("Data/x/raw_data/test.pkl") == "`Data/prepare_data.py`"
    for name, script in PRODUCERS.items():
        assert producer(f"Data/x/{name}") == f"`{script}`"


def test_adapters_and_metrics_carry_their_provenance(finished):
    root = finished[0]
    for expert in ("Summarizer", "reason_reward_model", "Reasoner", "Predictor", "Direct_Predictor"):
        record = json.loads((root / "checkpoints" / DATASET / expert / "final_checkpoint" / "provenance.json")
                            .read_text())
        assert record["git_commit"] and {"torch", "transformers", "trl", "peft"} <= set(record["packages"])
        assert record["settings"]["job"]["learning_rate"] > 0 and record["settings"]["backend"] == "hf"
        (train_file, digest), *valid = record["inputs"].items()  # the training data, and any validation data
        assert train_file.startswith(f"Data/{DATASET}/") and len(digest) == 64 and len(valid) <= 1
        assert record["settings"]["job"]["train_data_sha256"] == digest
        assert [f for f, _ in valid] == ([] if expert in ("Summarizer", "Reasoner") else
                                         [f"Data/{DATASET}/" + ("review_valid_data.pkl" if expert == "reason_reward_model"
                                                                else f"{expert}_valid_instruct.pkl")])
    metrics = json.loads((data_of(root) / "metrics.json").read_text())
    assert metrics["provenance"]["git_commit"] and f"Data/{DATASET}/rating_for_test_by_predictor.pkl" in \
        metrics["provenance"]["inputs"]
