"""The whole pipeline end to end on the tiny model, with the teacher over HTTP through the real openai client, on a
slice of the real data: every stage's outputs, the cache, and resuming from the authors' pickles."""
import json
import pickle
import shutil

import pandas as pd

from conftest import DATASET, FAST, REPO, pipeline_env, run
from utils import COLUMNS

FIXTURE = REPO / "tests" / "fixtures" / "Music_data"  # the authors' data's form (tests/fixtures/make_authors_data.py)


def load(root, name):
    return pd.read_pickle(root / "Data" / DATASET / name)


def test_run_all_runs_every_step_and_prints_the_table(finished):
    root, out, _ = finished
    assert "all 27 steps done" in out
    methods = ("Global mean", "User mean", "Item mean", "User+item bias", "SVD", "SVD++",
               "Direct Predictor (authors' ablation, no reason)", "Reason4Rec (Reasoner + Predictor)",
               "Reason4Rec + GRPO")
    for line in methods:
        assert line in out
    # the last step's table: the quality of the reasons (with the HTTP teacher as judge: it is not local)
    table = out[out.index("quality of the reasons"):]
    assert "GPTScore" in table and "ROUGE-L" in table and "judge" in table and "Reasoner (SFT)" in table
    quality = json.loads((root / "Data" / DATASET / "reason_quality.json").read_text())
    assert {"GPTScore", "ROUGE-L", "judge"} <= set(quality["test"]["results"]["Reasoner (SFT)"])
    metrics = json.loads((root / "Data" / DATASET / "metrics.json").read_text())
    for split in ("valid", "test"):
        assert set(metrics[split]["results"]["all"]) == set(methods), split
        assert [c["method"] for c in metrics[split]["comparisons"]] == [methods[-2], methods[-1]]
    for expert in ("Summarizer", "reason_reward_model", "Reasoner", "Predictor", "Direct_Predictor", "Reasoner_GRPO"):
        selection = json.loads((root / "checkpoints" / DATASET / expert / "final_checkpoint" / "selection.json")
                               .read_text())
        assert selection["chosen"] in [c["candidate"] for c in selection["candidates"]]
    assert (root / "Data" / DATASET / "predictions.png").stat().st_size > 1000
    # what the prompts carried, per split, and the training curves from the trainers' own logs
    assert set(metrics["history"]) == {"train", "valid", "test"}
    assert metrics["history"]["test"]["rows"] - metrics["history"]["test"]["with_user_history"] == \
        metrics["test"]["rows_without_user_history"] > 0  # the committed slice is sparse: "N/A" prompts
    curves = out[out.index("training curves"):]
    for expert in ("Summarizer", "reason_reward_model", "Reasoner", "Predictor", "Direct_Predictor"):
        assert f"{expert}: training loss over 2 steps" in curves
    for expert in ("reason_reward_model", "Predictor", "Direct_Predictor", "Reasoner_GRPO"):
        assert f"{expert}: validation metric per candidate, step " in curves
    assert "Reasoner_GRPO: mean reward over 2 steps" in curves
    assert (root / "Data" / DATASET / "training_curves.png").stat().st_size > 1000


def test_every_stage_writes_the_official_files_and_columns(finished):
    root, _, _ = finished
    train, test = load(root, "raw_data/train.pkl"), load(root, "raw_data/test.pkl")
    summaries = load(root, "train_summarizer_generation_results.pkl")
    assert list(summaries.columns[:6]) == COLUMNS and len(summaries) == len(train)
    assert summaries["aspect_preference_summary"].map(lambda s: isinstance(s, str)).all()
    assert load(root, "train_aspect_preference_summary.pkl")["review_summary"].str.startswith("Positive Aspects").all()
    reward, reasoner = load(root, "review_8000.pkl"), load(root, "train_12000.pkl")
    assert len(reward) and len(reasoner) and abs(len(reward) / (len(reward) + len(reasoner)) - 0.4) < 0.05
    assert not set(zip(reward.user_id, reward.item_id)) & set(zip(reasoner.user_id, reasoner.item_id))
    assert {"his_len", "direct_rating_prompt"} <= set(reward.columns)
    reasons = load(root, "distilling_high_quality_reasons.pkl")
    assert {"personalized_analysis", "reason_attempt"} <= set(reasons.columns) and len(reasons)
    assert load(root, "reason_for_test_by_reasoner.pkl")["reasoner_reply"].notna().all()
    preds = load(root, "rating_for_test_by_predictor.pkl")["pred"]
    assert len(preds) == len(test) and preds.between(1, 5).all()
    for name in ("Summarizer", "reason_reward_model", "Reasoner", "Predictor", "Direct_Predictor"):
        assert (root / "checkpoints" / DATASET / name / "final_checkpoint" / "adapter_model.safetensors").exists()
    report = json.loads((root / "Data" / DATASET / "distilling_report.json").read_text())
    assert report["kept"] + report["dropped"] == len(reasoner)
    # the authors' direct-prediction ablation: every Reasoner target (train_12000.pkl), their prompt, no analysis
    direct = pickle.loads((root / "Data" / DATASET / "Direct_Predictor_train_instruct.pkl").read_bytes())
    assert len(direct) == len(reasoner) >= len(reasons)  # every Reasoner target, kept reason or not
    question = direct[0]["messages"][0]["content"]
    assert "### Personalized Recommendation Analysis ###" not in question
    assert "\n\nBased on the above information, please predict the user's rating for" in question


def test_rerunning_a_teacher_step_pays_for_nothing(finished, tiny_model):
    root, _, server = finished
    received = server.received
    run("1_Summarizer/1_distilling_aspect_preference_summary.py", cwd=root, env=pipeline_env(tiny_model, server))
    run("2_Reasoner/4_distilling_possible_reason.py", *FAST["GEN_ARGS"].split(), cwd=root,
        env=pipeline_env(tiny_model, server))
    assert server.received == received and server.repeated == 0


def test_resume_from_the_authors_pickles(tmp_path, tiny_model):
    """Users who download the authors' data (pickled by pandas 2.2.2 / numpy 1.26.3, no dataset.json) start at
    2_Reasoner/5, as the official README says, and end with the evaluation.  Their splits share a (user, item, time)
    row: refused with the row listed, then left out of the histories on request, for every later step."""
    data = tmp_path / "Data" / "Music_data"
    shutil.copytree(FIXTURE, data)
    env = pipeline_env(tiny_model, DATASET="Music_data")
    gen = ["--max_new_tokens", "8"]
    refused = run("2_Reasoner/5_construct_reasoner_train_data.py", cwd=tmp_path, env=env, check=False)
    assert refused.returncode == 1 and "1 of the test split" in refused.stderr and "user A3, item B0, time 420" in \
        refused.stderr and "--drop_leaked_history_rows true" in refused.stderr
    leaked = pd.read_csv(data / "leaked_history_rows.csv")
    assert leaked[["user_id", "item_id", "unixReviewTime", "split"]].values.tolist() == [["A3", "B0", 420, "test"]]
    assert not (data / "dataset.json").exists()  # the failed step recorded nothing
    run("2_Reasoner/5_construct_reasoner_train_data.py", "--drop_leaked_history_rows", "true", cwd=tmp_path, env=env)
    assert json.loads((data / "dataset.json").read_text()) == {
        "product_class": "Digital Music", "max_his": 10, "drop_leaked_history_rows": True}
    run("2_Reasoner/6_reasoner_train.sh", "--max_steps", "1", cwd=tmp_path, env=env)
    run("2_Reasoner/7_generate_reason_for_test.py", "--split", "valid", *gen, cwd=tmp_path, env=env)
    run("3_Predictor/1_construct_predictor_train_data.py", *gen, cwd=tmp_path, env=env)
    run("3_Predictor/2_predictor_train.sh", "--max_steps", "1", cwd=tmp_path, env=env)
    run("2_Reasoner/7_generate_reason_for_test.py", *gen, cwd=tmp_path, env=env)
    run("3_Predictor/3_generate_predict_for_test.py", cwd=tmp_path, env=env)
    out = run("3_Predictor/4_evaluate.py", cwd=tmp_path, env=env).stdout
    examples = pickle.loads((data / "Reasoner_train_instruct.pkl").read_bytes())
    reasons = pd.read_pickle(FIXTURE / "distilling_high_quality_reasons.pkl")
    assert [x["messages"][1]["content"] for x in examples] == reasons["personalized_analysis"].tolist()
    assert 'new Digital Music "Moanin\'"' in examples[0]["messages"][0]["content"]
    assert "1. Blue Train\nPositive Aspects: Warm Tone" in examples[0]["messages"][0]["content"]
    assert pd.read_pickle(data / "rating_for_test_by_predictor.pkl")["pred"].between(1, 5).all()
    assert "Reason4Rec (Reasoner + Predictor)" in out
