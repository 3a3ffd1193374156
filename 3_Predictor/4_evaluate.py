"""Stage 3, step 4 (new): MAE and RMSE of the pipeline on the test set, beside baselines on the same rows.

Baselines, all fitted on the training split (where every test target's history comes from):
  global mean; user mean and item mean (the global mean for a user / item with no training rating);
  user + item bias (r = mu + b_u + b_i, Koren's regularized baseline estimates, lambda_i = 25, lambda_u = 10,
  fixed in advance: nothing is tuned on the test set);
  Direct Predictor: the paper's direct-prediction ablation (3_Predictor/*.py --no_reason), where it has been run.
Rows whose user or item has no earlier review get their own count and their own table.
The verdict compares Reason4Rec with the best other method by MAE, with a paired bootstrap 95% interval of the
difference (10,000 resamples of the test rows, fixed seed): a small test set says so instead of crowning a winner.

reads   Data/<dataset>/rating_for_test_by_predictor.pkl, raw_data/train.pkl, [rating_for_test_direct.pkl]
writes  Data/<dataset>/metrics.json, Data/<dataset>/predictions.png
"""
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from scipy.stats import bootstrap
from sklearn.metrics import mean_absolute_error, root_mean_squared_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils

from utils import COLUMNS, atomic_write, fail, parse_args, read_table, write_json

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def bias_model(train: pd.DataFrame, test: pd.DataFrame, lambda_i=25.0, lambda_u=10.0) -> np.ndarray:
    mu = train["ratings"].mean()
    b_i = (train["ratings"] - mu).groupby(train["item_id"]).agg(lambda r: r.sum() / (lambda_i + len(r)))
    residual = train["ratings"] - mu - train["item_id"].map(b_i)
    b_u = residual.groupby(train["user_id"]).agg(lambda r: r.sum() / (lambda_u + len(r)))
    return (mu + test["user_id"].map(b_u).fillna(0) + test["item_id"].map(b_i).fillna(0)).clip(1, 5).to_numpy()


(args,) = parse_args()
result = read_table(args, "rating_for_test_by_predictor.pkl", COLUMNS + ["pred"], limit=False)
train = read_table(args, "raw_data/train.pkl", limit=False)
if result["pred"].isna().any():
    fail(f"{args.file('rating_for_test_by_predictor.pkl')} has {result['pred'].isna().sum()} rows without a "
         f"prediction; rerun 3_Predictor/3_generate_predict_for_test.py")

mu = train["ratings"].mean()
seen_before = lambda column: result[column].isin(train[column]).to_numpy()  # noqa: E731
has_user, has_item = seen_before("user_id"), seen_before("item_id")
methods = {
    "Global mean": np.full(len(result), mu),
    "User mean": result["user_id"].map(train.groupby("user_id")["ratings"].mean()).fillna(mu).to_numpy(),
    "Item mean": result["item_id"].map(train.groupby("item_id")["ratings"].mean()).fillna(mu).to_numpy(),
    "User+item bias": bias_model(train, result),
}
direct_file = args.file("rating_for_test_direct.pkl")
if direct_file.exists():
    direct = read_table(args, "rating_for_test_direct.pkl", COLUMNS + ["pred"], limit=False)
    if len(direct) == len(result) and (direct["unixReviewTime"].to_numpy() == result["unixReviewTime"].to_numpy()).all():
        methods["Direct Predictor (no reason)"] = direct["pred"].to_numpy()
    else:
        print(f"note: {direct_file} covers other rows than the pipeline's predictions; left out")
methods["Reason4Rec (Reasoner + Predictor)"] = result["pred"].to_numpy()

truth = result["ratings"].to_numpy(dtype=float)
warm = has_user & has_item
subsets = {"all": np.ones(len(result), bool), "with user and item history": warm}
metrics = {"dataset": args.dataset, "test_rows": len(result), "rows_without_user_history": int((~has_user).sum()),
           "rows_without_item_history": int((~has_item).sum()), "results": {}}
for subset, mask in subsets.items():
    if not mask.any():
        continue
    print(f"\n{args.dataset}: {mask.sum():,} test rows ({subset})")
    print(f"{'method':<36}{'MAE':>8}{'RMSE':>8}")
    for name, pred in methods.items():
        mae, rmse = mean_absolute_error(truth[mask], pred[mask]), root_mean_squared_error(truth[mask], pred[mask])
        metrics["results"].setdefault(subset, {})[name] = {"MAE": round(mae, 4), "RMSE": round(rmse, 4)}
        print(f"{name:<36}{mae:>8.4f}{rmse:>8.4f}")
print(f"\n{metrics['rows_without_user_history']:,} test rows have no earlier review of their user and "
      f"{metrics['rows_without_item_history']:,} none of their item (their prompts show N/A there).")

table = metrics["results"]["all"]
ours = "Reason4Rec (Reasoner + Predictor)"
best = min((k for k in table if k != ours), key=lambda k: table[k]["MAE"])
difference = np.abs(truth - methods[ours]) - np.abs(truth - methods[best])  # per row: < 0 where ours is closer
low, high = bootstrap((difference,), np.mean, n_resamples=10_000, method="percentile",
                      rng=np.random.default_rng(0)).confidence_interval
metrics["mae_difference_to_best"] = {"best": best, "difference": round(difference.mean(), 4),
                                     "ci95": [round(low, 4), round(high, 4)]}
metrics["verdict"] = (f"Reason4Rec {'beats' if difference.mean() < 0 else 'does not beat'} the best other method by "
                      f"MAE ({table[ours]['MAE']:.4f} against {best}: {table[best]['MAE']:.4f}); difference "
                      f"{difference.mean():+.4f}, paired bootstrap 95% interval [{low:+.4f}, {high:+.4f}]: "
                      + ("within noise on this test set" if low <= 0 <= high else "beyond noise"))
print(metrics["verdict"])
write_json(metrics, args.file("metrics.json"))

figure, axes = plt.subplots(1, len(methods) - 4, figsize=(5 * (len(methods) - 4), 4), squeeze=False)
for ax, name in zip(axes[0], list(methods)[4:]):
    ax.boxplot([methods[name][truth == r] for r in range(1, 6)], positions=range(1, 6))
    ax.plot([1, 5], [1, 5], "--", color="grey", linewidth=1)
    ax.set(title=name, xlabel="true rating", ylabel="predicted rating", ylim=(0.8, 5.2))
figure.tight_layout()
atomic_write(args.file("predictions.png"), lambda f: figure.savefig(f, format="png", dpi=100))
print(f"wrote {args.file('metrics.json')} and {args.file('predictions.png')}")
