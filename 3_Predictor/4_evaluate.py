"""Stage 3, step 4 (new): rating accuracy, MAE and RMSE, of every method on the same rows, for the validation rows
(on which every model choice was made) and for the test set (reported, never used for a choice).

Methods (rows of the printed tables and of metrics.json):
  baselines.py, fitted on the training split (where every history comes from), nothing tuned: the global, user and
  item means; the user + item bias model (scikit-surprise's BaselineOnly: ALS, one epoch, reg_i 25, reg_u 10); the
  matrix factorisations SVD and SVD++ (seed 0);
  LLM_METHODS, wherever their predictions exist: the authors' direct-prediction ablation (3_Predictor/*.py
  --no_reason), Reason4Rec (Reasoner + Predictor), Reason4Rec + GRPO (4_GRPO); their predictions are matched to the
  rows on (user, item, time), and the checkpoint each expert kept (its selection.json) is reported beside them.
Tables: every row ("all"), then the rows whose user and item both have a training review ("with user and item
history"); rows without are counted (their prompts show N/A).
Comparisons: Reason4Rec against the best other method (GRPO aside), and Reason4Rec + GRPO against Reason4Rec, by MAE,
with a paired bootstrap 95% interval of the difference (10,000 resamples of the rows, fixed seed): a small test set
says so instead of crowning a winner.  The metrics.json schema is in the README.

reads   Data/<dataset>/raw_data/{train,valid,test}.pkl, rating_for_{valid,test}_{by_predictor,direct,by_predictor_grpo}.pkl,
        checkpoints/<dataset>/*/final_checkpoint/selection.json
writes  Data/<dataset>/metrics.json (with its provenance), Data/<dataset>/predictions.png
"""
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils, baselines

from baselines import baselines
from utils import (COLUMNS, ValidArguments, atomic_write, fail, matched, paired_interval, parse_args, producer,
                   provenance, ratings_file, read_json, read_split, read_table, write_json)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OURS, GRPO = "Reason4Rec (Reasoner + Predictor)", "Reason4Rec + GRPO"
LLM_METHODS = {  # name: (whose reasons: None for none, the experts whose checkpoints it uses)
    "Direct Predictor (authors' ablation, no reason)": (None, ["Direct_Predictor"]),
    OURS: ("Reasoner", ["Reasoner", "Predictor"]),
    GRPO: ("Reasoner_GRPO", ["Reasoner_GRPO", "Predictor"]),
}
SUBSETS = ("all", "with user and item history")


@dataclass
class EvaluateArguments:
    checkpoint_dir: str = field(default_factory=lambda: os.environ.get("CHECKPOINT_DIR", "checkpoints"), metadata={
        "help": "where the adapters are, to report the checkpoint each expert kept (default: $CHECKPOINT_DIR)"})


def evaluate(split: str, rows, methods: dict) -> dict:
    """One split's tables and comparisons, printed and returned in the metrics.json form."""
    truth = rows["ratings"].to_numpy(dtype=float)
    has_user, has_item = (rows[c].isin(train[c]).to_numpy() for c in ("user_id", "item_id"))
    report = {"rows": len(rows), "rows_without_user_history": int((~has_user).sum()),
              "rows_without_item_history": int((~has_item).sum()), "results": {}, "comparisons": []}
    for subset, mask in zip(SUBSETS, (np.ones(len(rows), bool), has_user & has_item)):
        if not mask.any():
            continue
        print(f"\n{args.dataset}, {split}: {mask.sum():,} rows ({subset})")
        print(f"{'method':<50}{'MAE':>8}{'RMSE':>8}")
        for name, pred in methods.items():
            error = truth[mask] - pred[mask]
            mae, rmse = np.abs(error).mean(), np.sqrt((error ** 2).mean())
            report["results"].setdefault(subset, {})[name] = {"MAE": round(mae, 4), "RMSE": round(rmse, 4)}
            print(f"{name:<50}{mae:>8.4f}{rmse:>8.4f}")
    print(f"{report['rows_without_user_history']:,} {split} rows have no earlier review of their user and "
          f"{report['rows_without_item_history']:,} none of their item (their prompts show N/A there).")

    table = report["results"]["all"]
    pairs = []
    if OURS in methods:
        pairs.append((OURS, min((k for k in table if k not in (OURS, GRPO)), key=lambda k: table[k]["MAE"])))
    if OURS in methods and GRPO in methods:
        pairs.append((GRPO, OURS))
    for method, against in pairs:
        difference = np.abs(truth - methods[method]) - np.abs(truth - methods[against])  # < 0 where `method` is closer
        low, high = paired_interval(difference)
        noise = low <= 0 <= high
        verdict = (f"{method} {'beats' if difference.mean() < 0 else 'does not beat'} {against} by MAE "
                   f"({table[method]['MAE']:.4f} against {table[against]['MAE']:.4f}); difference "
                   f"{difference.mean():+.4f}, paired bootstrap 95% interval [{low:+.4f}, {high:+.4f}]: "
                   f"{'within noise' if noise else 'beyond noise'} on these {len(rows):,} {split} rows")
        report["comparisons"].append({"method": method, "against": against, "difference": round(difference.mean(), 4),
                                      "ci95": [round(low, 4), round(high, 4)], "within_noise": bool(noise),
                                      "verdict": verdict})
        print(verdict)
    return report


def chosen_checkpoints(experts) -> dict:
    """What each expert kept, from its final_checkpoint/selection.json."""
    kept = {}
    for expert in experts:
        selection_file = Path(extra.checkpoint_dir) / args.dataset / expert / "final_checkpoint" / "selection.json"
        if selection_file.exists():
            selection = read_json(selection_file)
            chosen = next(c for c in selection["candidates"] if c["candidate"] == selection["chosen"])
            kept[expert] = {"adapter": str(selection_file.parent), "chosen": selection["chosen"],
                            "step": selection["chosen_step"], "valid_metric": chosen["valid_metric"]}
    return kept


args, valid, extra = parse_args(ValidArguments, EvaluateArguments)
if not args.file(ratings_file("test")).exists():
    fail(f"{args.file(ratings_file('test'))} not found. Run {producer(ratings_file('test'))} first.")
train = read_table(args, "raw_data/train.pkl", limit=False)
metrics = {"dataset": args.dataset, "methods": {}}
inputs, test_methods = [args.file("raw_data/train.pkl")], None
splits = {split: read_split(args, split, valid.eval_limit) for split in ("valid", "test")
          if split == "test" or args.file(f"raw_data/{split}.pkl").exists()}  # the validation rows where there are
for (split, rows), methods in zip(splits.items(), baselines(train, *splits.values())):
    for name, (reasoner, experts) in LLM_METHODS.items():
        file = args.file(ratings_file(split, reasoner))
        if not file.exists():
            continue
        pred = matched(rows, read_table(args, file.name, COLUMNS + ["pred"]), "pred")
        if pred is None or np.isnan(pred.astype(float)).any():
            print(f"note: {file} covers other rows than {split}'s {len(rows):,} (or lacks predictions); {name} left out")
            continue
        methods[name] = pred.astype(float)
        inputs.append(file)
        if name not in metrics["methods"]:  # each expert's selection.json read once
            metrics["methods"][name] = {"files": {}, "checkpoints": chosen_checkpoints(experts)}
        metrics["methods"][name]["files"][split] = str(file)
    if split == "test" and OURS not in methods:
        fail(f"{args.file(ratings_file('test'))} does not hold a prediction for every test row; rerun "
             f"`3_Predictor/3_generate_predict_for_test.py`")
    metrics[split] = evaluate(split, rows, methods)
    if split == "test":
        test_methods, test_truth = methods, rows["ratings"].to_numpy(dtype=float)
for name, method in metrics["methods"].items():
    for expert, kept in method["checkpoints"].items():
        print(f"{name}: {expert} kept {kept['chosen']} (step {kept['step']}"
              + (f", validation {kept['valid_metric']:.4f})" if kept["valid_metric"] is not None else ")"))
metrics["verdict"] = metrics["test"]["comparisons"][0]["verdict"]
metrics["provenance"] = provenance({"dataset": args.dataset, "limit": args.limit, "eval_limit": valid.eval_limit},
                                   inputs)
write_json(metrics, args.file("metrics.json"))

plotted = [name for name in LLM_METHODS if name in test_methods]
figure, axes = plt.subplots(1, len(plotted), figsize=(5 * len(plotted), 4), squeeze=False)
for ax, name in zip(axes[0], plotted):
    ax.boxplot([test_methods[name][test_truth == r] for r in range(1, 6)], positions=range(1, 6))
    ax.plot([1, 5], [1, 5], "--", color="grey", linewidth=1)
    ax.set(title=name, xlabel="true rating", ylabel="predicted rating", ylim=(0.8, 5.2))
figure.tight_layout()
atomic_write(args.file("predictions.png"), lambda f: figure.savefig(f, format="png", dpi=100))
print(f"wrote {args.file('metrics.json')} and {args.file('predictions.png')}")
