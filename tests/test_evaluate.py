"""3_Predictor/4_evaluate.py: MAE and RMSE of the pipeline and of the baselines on the same rows."""
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from conftest import run
from utils import COLUMNS

OURS, GRPO = "Reason4Rec (Reasoner + Predictor)", "Reason4Rec + GRPO"
DIRECT = "Direct Predictor (authors' ablation, no reason)"


def frame(rows):
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "ratings", "unixReviewTime"])
    return df.assign(title=df.item_id, reviews="text")[COLUMNS]


def test_metrics_of_the_pipeline_and_the_baselines_on_valid_and_test(tmp_path):
    data = tmp_path / "Data" / "toy"
    (data / "raw_data").mkdir(parents=True)
    train = frame([("a", "x", 5.0, 1), ("a", "y", 3.0, 2), ("b", "x", 4.0, 3), ("b", "z", 2.0, 4)])
    valid = frame([("a", "x", 4.0, 6), ("b", "y", 2.0, 7)])
    test = frame([("a", "z", 4.0, 10), ("b", "y", 1.0, 11), ("c", "x", 5.0, 12), ("a", "w", 3.0, 13)])
    train.to_pickle(data / "raw_data" / "train.pkl")
    valid.to_pickle(data / "raw_data" / "valid.pkl")
    test.to_pickle(data / "raw_data" / "test.pkl")
    test.assign(reasoner_reply="r", pred=[4.0, 2.0, 4.5, 3.0]).to_pickle(data / "rating_for_test_by_predictor.pkl")
    test.assign(pred=[3.0, 3.0, 3.0, 3.0]).to_pickle(data / "rating_for_test_direct.pkl")
    test.assign(reasoner_reply="g", pred=[4.0, 1.0, 5.0, 3.5]).to_pickle(data / "rating_for_test_by_predictor_grpo.pkl")
    valid.assign(reasoner_reply="r", pred=[4.5, 2.5]).to_pickle(data / "rating_for_valid_by_predictor.pkl")
    valid.assign(pred=[4.0, 2.0]).to_pickle(data / "rating_for_valid_direct.pkl")  # the best on valid, the worst on test
    write_training_logs(tmp_path / "checkpoints" / "toy")
    out = run("3_Predictor/4_evaluate.py", "--dataset", "toy", cwd=tmp_path).stdout
    metrics = json.loads((data / "metrics.json").read_text())
    truth = np.array([4.0, 1.0, 5.0, 3.0])

    def check(name, pred, split="test", y=truth):
        got = metrics[split]["results"]["all"][name]
        assert got["MAE"] == round(np.abs(y - pred).mean(), 4)
        assert got["RMSE"] == round(np.sqrt(((y - pred) ** 2).mean()), 4)

    check(OURS, np.array([4.0, 2.0, 4.5, 3.0]))
    check(DIRECT, np.full(4, 3.0))
    check(GRPO, np.array([4.0, 1.0, 5.0, 3.5]))
    check("Global mean", np.full(4, 3.5))
    check("User mean", np.array([4.0, 3.0, 3.5, 4.0]))  # user c: no training rating -> the global mean
    check("Item mean", np.array([2.0, 3.0, 4.5, 3.5]))  # item w likewise
    check(OURS, np.array([4.5, 2.5]), "valid", np.array([4.0, 2.0]))
    check(DIRECT, np.array([4.0, 2.0]), "valid", np.array([4.0, 2.0]))
    assert set(metrics["valid"]["results"]["all"]) == {"Global mean", "User mean", "Item mean", "User+item bias",
                                                       "SVD", "SVD++", OURS, DIRECT}
    test_block = metrics["test"]
    assert test_block["rows_without_user_history"] == 1 and test_block["rows_without_item_history"] == 1
    assert test_block["results"]["with user and item history"]["Global mean"]["MAE"] == round((0.5 + 2.5) / 2, 4)
    # train: a and b each have an earlier review from their second on, item x from its second; valid: all; test: user
    # c and item w are new
    assert metrics["history"] == {
        "train": {"rows": 4, "with_user_history": 2, "with_item_history": 1, "with_both": 0},
        "valid": {"rows": 2, "with_user_history": 2, "with_item_history": 2, "with_both": 2},
        "test": {"rows": 4, "with_user_history": 3, "with_item_history": 3, "with_both": 2}}
    assert re.search(r"\ntest +4 +3 \(75%\) +3 \(75%\) +2 \(50%\)\n", out)  # the printed table
    # Reason4Rec is compared with the best other method on the validation rows (the Direct Predictor, exact there),
    # not with the best one on the test rows (a baseline: the Direct Predictor is the worst there)
    table = test_block["results"]["all"]
    assert min((k for k in table if k not in (OURS, GRPO)), key=lambda k: table[k]["MAE"]) != DIRECT
    ours_vs_best, grpo_vs_ours = test_block["comparisons"]
    assert (ours_vs_best["method"], ours_vs_best["against"]) == (OURS, DIRECT)
    assert metrics["valid"]["comparisons"][0]["against"] == DIRECT
    best = DIRECT
    assert ours_vs_best["difference"] == round(table[OURS]["MAE"] - table[best]["MAE"], 4)
    assert ours_vs_best["ci95"][0] <= ours_vs_best["difference"] <= ours_vs_best["ci95"][1]
    assert (grpo_vs_ours["method"], grpo_vs_ours["against"]) == (GRPO, OURS)
    assert grpo_vs_ours["difference"] == round(0.125 - 0.375, 4)
    assert metrics["verdict"] == ours_vs_best["verdict"] and "paired bootstrap 95% interval" in metrics["verdict"]
    assert "Reason4Rec + GRPO beats Reason4Rec (Reasoner + Predictor)" in out
    assert (data / "predictions.png").exists()
    assert metrics["methods"][OURS]["checkpoints"]["Predictor"] == {
        "adapter": str(Path("checkpoints") / "toy" / "Predictor" / "final_checkpoint"), "chosen": "checkpoint-2",
        "step": 2, "valid_metric": 0.9}
    # the training curves: each expert's loss (the GRPO Reasoner's policy loss aside), each validation metric per
    # candidate, the GRPO reward
    curves = out[out.index("training curves"):]
    assert "Predictor: training loss over 4 steps, 2.5000 -> 1.2000" in curves
    assert "Summarizer: training loss over 2 steps, 3.0000 -> 2.0000" in curves
    assert "Reasoner_GRPO: training loss" not in curves
    assert "Predictor: validation metric per candidate, step 2 0.9000, step 4 0.9500; kept step 2" in curves
    assert "Reasoner_GRPO: mean reward over 2 steps, -1.5000 -> -0.5000" in curves
    assert (data / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def write_training_logs(checkpoints: Path):
    """final_checkpoint/log_history.json and selection.json as training.finish writes them (transformers' log
    entries: a loss per logged step, then the run's summary; TRL's GRPO entries with the mean reward)."""
    def write(expert, log, candidates=None, chosen=None):
        folder = checkpoints / expert / "final_checkpoint"
        folder.mkdir(parents=True)
        (folder / "log_history.json").write_text(json.dumps(log))
        chosen = chosen or candidates[-1]
        (folder / "selection.json").write_text(json.dumps({
            "expert": expert, "metric": "MAE", "select_on_valid": True, "candidates": candidates,
            "chosen": chosen["candidate"], "chosen_step": chosen["step"], "why": "the lowest validation metric"}))

    def sft(losses):
        return [{"loss": loss, "grad_norm": 1.0, "learning_rate": 3e-4, "epoch": step / len(losses), "step": step}
                for step, loss in enumerate(losses, 1)] + [{"train_runtime": 1.0, "train_loss": 2.0, "step": len(losses)}]

    kept = {"candidate": "checkpoint-2", "step": 2, "valid_metric": 0.9}
    write("Summarizer", sft([3.0, 2.0]), [{"candidate": "final state", "step": 2, "valid_metric": None}])
    write("Predictor", sft([2.5, 2.0, 1.5, 1.2]), [kept, {"candidate": "final state", "step": 4, "valid_metric": 0.95}],
          kept)
    write("Reasoner_GRPO", [{"loss": 0.01, "reward": -1.5, "reward_std": 0.3, "step": 1},
                            {"loss": -0.02, "reward": -0.5, "reward_std": 0.2, "step": 2}],
          [{"candidate": "checkpoint-1", "step": 1, "valid_metric": 0.8},
           {"candidate": "final state", "step": 2, "valid_metric": 0.85}])


def test_history_shares_follow_the_boundary_the_prompts_were_built_with(tmp_path):
    """A test row whose user reviewed only after it (the authors' published splits have such rows): no user history
    where histories end before the target (the default), one where dataset.json records that test-time histories
    take every training review (--test_history_before_target false), as the prompts then showed."""
    data = tmp_path / "Data" / "toy"
    (data / "raw_data").mkdir(parents=True)
    frame([("a", "x", 5.0, 1), ("b", "y", 3.0, 20)]).to_pickle(data / "raw_data" / "train.pkl")
    test = frame([("b", "x", 4.0, 10), ("a", "y", 2.0, 11)])
    test.to_pickle(data / "raw_data" / "test.pkl")
    test.assign(pred=[4.0, 2.0]).to_pickle(data / "rating_for_test_by_predictor.pkl")
    shares = []
    for recorded in ({}, {"test_history_before_target": False}):
        (data / "dataset.json").write_text(json.dumps(recorded))
        run("3_Predictor/4_evaluate.py", "--dataset", "toy", cwd=tmp_path)
        metrics = json.loads((data / "metrics.json").read_text())
        shares.append(metrics["history"]["test"])
        assert metrics["test"]["rows_without_user_history"] == 2 - shares[-1]["with_user_history"]
    assert shares == [{"rows": 2, "with_user_history": 1, "with_item_history": 1, "with_both": 0},
                      {"rows": 2, "with_user_history": 2, "with_item_history": 2, "with_both": 2}]


def test_missing_predictions_name_the_step_to_run(tmp_path):
    (tmp_path / "Data" / "toy").mkdir(parents=True)
    result = run("3_Predictor/4_evaluate.py", "--dataset", "toy", cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert "rating_for_test_by_predictor.pkl not found" in result.stderr
    assert "3_Predictor/3_generate_predict_for_test.py" in result.stderr


def hand_written_bias(train, rows, lambda_i=25.0, lambda_u=10.0):
    """The user + item bias model as this project wrote it by hand before (Koren's regularized baseline estimates)."""
    mu = train["ratings"].mean()
    b_i = (train["ratings"] - mu).groupby(train["item_id"]).agg(lambda r: r.sum() / (lambda_i + len(r)))
    residual = train["ratings"] - mu - train["item_id"].map(b_i)
    b_u = residual.groupby(train["user_id"]).agg(lambda r: r.sum() / (lambda_u + len(r)))
    return (mu + rows["user_id"].map(b_u).fillna(0) + rows["item_id"].map(b_i).fillna(0)).clip(1, 5).to_numpy()


def test_baseline_only_is_the_hand_written_bias_model_and_mf_baselines_are_seeded():
    from baselines import baselines

    rng = np.random.default_rng(0)
    train = frame([(f"u{rng.integers(30)}", f"i{rng.integers(20)}", float(rng.integers(1, 6)), t) for t in range(400)])
    rows = frame([(f"u{rng.integers(35)}", f"i{rng.integers(25)}", 3.0, 1000 + t) for t in range(100)])  # some unseen
    (first,), (second,) = baselines(train, rows), baselines(train, rows)
    np.testing.assert_allclose(first["User+item bias"], hand_written_bias(train, rows), rtol=0, atol=1e-9)
    for name in ("SVD", "SVD++"):
        assert ((first[name] >= 1) & (first[name] <= 5)).all() and (first[name] == second[name]).all()
        assert np.abs(first[name] - first["Global mean"]).max() > 0.01  # fitted, not the mean
    head, tail = baselines(train, rows[:30], rows[30:])  # several row sets, fitted once: as each set alone
    for name, predicted in first.items():
        np.testing.assert_array_equal(np.concatenate([head[name], tail[name]]), predicted)


def test_llm_rows_are_matched_on_user_item_and_time(tmp_path):
    """Two test rows share a timestamp; the Direct Predictor's file lists the rows in another order: each prediction
    must still be compared with its own row's rating."""
    data = tmp_path / "Data" / "toy"
    (data / "raw_data").mkdir(parents=True)
    frame([("a", "x", 5.0, 1), ("b", "y", 3.0, 2)]).to_pickle(data / "raw_data" / "train.pkl")
    test = frame([("a", "y", 5.0, 10), ("b", "x", 1.0, 10), ("a", "z", 3.0, 11)])
    test.to_pickle(data / "raw_data" / "test.pkl")
    test.assign(pred=[5.0, 1.0, 3.0]).to_pickle(data / "rating_for_test_by_predictor.pkl")
    test.assign(pred=[4.0, 2.0, 3.0]).iloc[[1, 0, 2]].to_pickle(data / "rating_for_test_direct.pkl")
    run("3_Predictor/4_evaluate.py", "--dataset", "toy", cwd=tmp_path)
    metrics = json.loads((data / "metrics.json").read_text())
    assert metrics["test"]["results"]["all"][DIRECT]["MAE"] == round(2 / 3, 4)
    assert {"SVD", "SVD++", "User+item bias"} <= set(metrics["test"]["results"]["all"])
