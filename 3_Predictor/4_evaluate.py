"""Stage 3, step 4 (new): MAE and RMSE of the pipeline on the test set, beside baselines on the same rows.

Methods (rows of the printed tables and of metrics.json):
  baselines.py, all fitted on the training split (where every test target's history comes from), nothing tuned on
  the test set: the global mean; the user mean and the item mean; the user + item bias model (scikit-surprise's
  BaselineOnly: ALS, one epoch, reg_i 25, reg_u 10); the matrix factorisations SVD and SVD++ (seed 0);
  LLM_METHODS: the Direct Predictor (the direct-prediction ablation, 3_Predictor/*.py --no_reason) where it has
  been run, and Reason4Rec (Reasoner + Predictor).  An LLM method's predictions are matched to the pipeline's rows
  on (user, item, time).
Tables: every test row ("all"), then the rows whose user and item both have a training review ("with user and item
history"); rows without are counted (their prompts show N/A).
The verdict compares Reason4Rec with the best other method by MAE, with a paired bootstrap 95% interval of the
difference (10,000 resamples of the test rows, fixed seed): a small test set says so instead of crowning a winner.

reads   Data/<dataset>/rating_for_test_by_predictor.pkl, raw_data/train.pkl, [rating_for_test_direct.pkl]
writes  Data/<dataset>/metrics.json (with its provenance), Data/<dataset>/predictions.png
"""
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from sklearn.metrics import mean_absolute_error, root_mean_squared_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils, baselines

from baselines import baselines
from utils import COLUMNS, atomic_write, fail, matched, paired_interval, parse_args, provenance, read_table, write_json

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OURS = "Reason4Rec (Reasoner + Predictor)"
LLM_METHODS = {"Direct Predictor (no reason)": "rating_for_test_direct.pkl", OURS: "rating_for_test_by_predictor.pkl"}

(args,) = parse_args()
result = read_table(args, LLM_METHODS[OURS], COLUMNS + ["pred"])
train = read_table(args, "raw_data/train.pkl", limit=False)
if result["pred"].isna().any():
    fail(f"{args.file(LLM_METHODS[OURS])} has {result['pred'].isna().sum()} rows without a prediction; "
         f"rerun 3_Predictor/3_generate_predict_for_test.py")

methods = baselines(train, result)
inputs = [args.file("raw_data/train.pkl")]
for name, file in LLM_METHODS.items():
    if not args.file(file).exists():
        continue
    pred = matched(result, read_table(args, file, COLUMNS + ["pred"]), "pred")
    if pred is None or pd.isna(pred).any():
        print(f"note: {args.file(file)} covers other rows than {args.file(LLM_METHODS[OURS])}; {name} left out")
        continue
    methods[name] = pred
    inputs.append(args.file(file))

seen_before = lambda column: result[column].isin(train[column]).to_numpy()  # noqa: E731
has_user, has_item = seen_before("user_id"), seen_before("item_id")
truth = result["ratings"].to_numpy(dtype=float)
subsets = {"all": np.ones(len(result), bool), "with user and item history": has_user & has_item}
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
best = min((k for k in table if k != OURS), key=lambda k: table[k]["MAE"])
difference = np.abs(truth - methods[OURS]) - np.abs(truth - methods[best])  # per row: < 0 where ours is closer
low, high = paired_interval(difference)
metrics["mae_difference_to_best"] = {"best": best, "difference": round(difference.mean(), 4),
                                     "ci95": [round(low, 4), round(high, 4)]}
metrics["verdict"] = (f"Reason4Rec {'beats' if difference.mean() < 0 else 'does not beat'} the best other method by "
                      f"MAE ({table[OURS]['MAE']:.4f} against {best}: {table[best]['MAE']:.4f}); difference "
                      f"{difference.mean():+.4f}, paired bootstrap 95% interval [{low:+.4f}, {high:+.4f}]: "
                      + ("within noise on this test set" if low <= 0 <= high else "beyond noise"))
print(metrics["verdict"])
metrics["provenance"] = provenance({"dataset": args.dataset, "limit": args.limit}, inputs)
write_json(metrics, args.file("metrics.json"))

plotted = [name for name in LLM_METHODS if name in methods]
figure, axes = plt.subplots(1, len(plotted), figsize=(5 * len(plotted), 4), squeeze=False)
for ax, name in zip(axes[0], plotted):
    ax.boxplot([methods[name][truth == r] for r in range(1, 6)], positions=range(1, 6))
    ax.plot([1, 5], [1, 5], "--", color="grey", linewidth=1)
    ax.set(title=name, xlabel="true rating", ylabel="predicted rating", ylim=(0.8, 5.2))
figure.tight_layout()
atomic_write(args.file("predictions.png"), lambda f: figure.savefig(f, format="png", dpi=100))
print(f"wrote {args.file('metrics.json')} and {args.file('predictions.png')}")
