"""3_Predictor/4_evaluate.py: MAE and RMSE of the pipeline and of the baselines on the same rows."""
import json

import numpy as np
import pandas as pd

from conftest import run
from utils import COLUMNS


def frame(rows):
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "ratings", "unixReviewTime"])
    return df.assign(title=df.item_id, reviews="text")[COLUMNS]


def test_metrics_of_the_pipeline_and_the_baselines(tmp_path):
    data = tmp_path / "Data" / "toy"
    (data / "raw_data").mkdir(parents=True)
    train = frame([("a", "x", 5.0, 1), ("a", "y", 3.0, 2), ("b", "x", 4.0, 3), ("b", "z", 2.0, 4)])
    test = frame([("a", "z", 4.0, 10), ("b", "y", 1.0, 11), ("c", "x", 5.0, 12), ("a", "w", 3.0, 13)])
    train.to_pickle(data / "raw_data" / "train.pkl")
    test.assign(reasoner_reply="r", pred=[4.0, 2.0, 4.5, 3.0]).to_pickle(data / "rating_for_test_by_predictor.pkl")
    test.assign(pred=[3.0, 3.0, 3.0, 3.0]).to_pickle(data / "rating_for_test_direct.pkl")
    out = run("3_Predictor/4_evaluate.py", "--dataset", "toy", cwd=tmp_path).stdout
    metrics = json.loads((data / "metrics.json").read_text())
    truth = np.array([4.0, 1.0, 5.0, 3.0])

    def check(name, pred):
        got = metrics["results"]["all"][name]
        assert got["MAE"] == round(np.abs(truth - pred).mean(), 4)
        assert got["RMSE"] == round(np.sqrt(((truth - pred) ** 2).mean()), 4)

    check("Reason4Rec (Reasoner + Predictor)", np.array([4.0, 2.0, 4.5, 3.0]))
    check("Direct Predictor (no reason)", np.full(4, 3.0))
    check("Global mean", np.full(4, 3.5))
    check("User mean", np.array([4.0, 3.0, 3.5, 4.0]))  # user c: no training rating -> the global mean
    check("Item mean", np.array([2.0, 3.0, 4.5, 3.5]))  # item w likewise
    assert metrics["rows_without_user_history"] == 1 and metrics["rows_without_item_history"] == 1
    assert metrics["results"]["with user and item history"]["Global mean"]["MAE"] == round((0.5 + 2.5) / 2, 4)
    assert "Reason4Rec beats the best other method" in metrics["verdict"] and "Reason4Rec" in out
    gap = metrics["mae_difference_to_best"]  # ours (MAE 0.375) against the best other: the user mean (1.125)
    assert gap["best"] == "User mean" and gap["difference"] == -0.75
    assert gap["ci95"][0] <= -0.75 <= gap["ci95"][1] and "paired bootstrap 95% interval" in metrics["verdict"]
    assert (data / "predictions.png").exists()


def test_missing_predictions_name_the_step_to_run(tmp_path):
    (tmp_path / "Data" / "toy").mkdir(parents=True)
    result = run("3_Predictor/4_evaluate.py", "--dataset", "toy", cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert "rating_for_test_by_predictor.pkl not found" in result.stderr
    assert "3_Predictor/3_generate_predict_for_test.py" in result.stderr
