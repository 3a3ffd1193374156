"""3_Predictor/4_evaluate.py: MAE and RMSE of the pipeline and of the baselines on the same rows."""
import json

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
    assert set(metrics["valid"]["results"]["all"]) == {"Global mean", "User mean", "Item mean", "User+item bias",
                                                       "SVD", "SVD++", OURS}
    test_block = metrics["test"]
    assert test_block["rows_without_user_history"] == 1 and test_block["rows_without_item_history"] == 1
    assert test_block["results"]["with user and item history"]["Global mean"]["MAE"] == round((0.5 + 2.5) / 2, 4)
    table = test_block["results"]["all"]
    best = min((k for k in table if k not in (OURS, GRPO)), key=lambda k: table[k]["MAE"])
    ours_vs_best, grpo_vs_ours = test_block["comparisons"]
    assert (ours_vs_best["method"], ours_vs_best["against"]) == (OURS, best)
    assert ours_vs_best["difference"] == round(table[OURS]["MAE"] - table[best]["MAE"], 4)
    assert ours_vs_best["ci95"][0] <= ours_vs_best["difference"] <= ours_vs_best["ci95"][1]
    assert (grpo_vs_ours["method"], grpo_vs_ours["against"]) == (GRPO, OURS)
    assert grpo_vs_ours["difference"] == round(0.125 - 0.375, 4)
    assert metrics["verdict"] == ours_vs_best["verdict"] and "paired bootstrap 95% interval" in metrics["verdict"]
    assert "Reason4Rec + GRPO beats Reason4Rec (Reasoner + Predictor)" in out
    assert (data / "predictions.png").exists()


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
