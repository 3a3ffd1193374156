"""Stage 3, step 4 (new): rating accuracy, MAE and RMSE, of every method on the same rows, for the validation rows
(on which every model choice was made) and for the test set (reported, never used for a choice).

Methods (rows of the printed tables and of metrics.json):
  baselines.py, fitted on the training split (where every history comes from), nothing tuned: the global, user and
  item means; the user + item bias model (scikit-surprise's BaselineOnly: ALS, one epoch, reg_i 25, reg_u 10); the
  matrix factorisations SVD and SVD++ (seed 0);
  LLM_METHODS, wherever their predictions exist: the authors' direct-prediction ablation (3_Predictor/*.py
  --no_reason), Reason4Rec (Reasoner + Predictor), Reason4Rec + GRPO (4_GRPO); their predictions are matched to the
  rows on (user, item, time), and the checkpoint each expert kept (its selection.json) is reported beside them.
Histories: the share of each split's rows whose user and whose item have an earlier training review (the prompts
show N/A where not), as the prompts' histories are looked up (histories.history_coverage).
Tables: every row ("all"), then the rows whose user and item both have a history ("with user and item history").
Comparisons: Reason4Rec against the best other method on the validation rows (GRPO aside; chosen there, never on the
test set), and Reason4Rec + GRPO against Reason4Rec, by MAE, with a paired bootstrap 95% interval of the difference
(10,000 resamples of the rows, fixed seed): a small test set says so instead of crowning a winner.  The metrics.json
schema is in the README.
Training curves: each expert's training loss per step and each trainer's validation metric per candidate
checkpoint (final_checkpoint/log_history.json and selection.json), and the GRPO Reasoner's mean reward per step.

reads   Data/<dataset>/raw_data/{train,valid,test}.pkl, rating_for_{valid,test}_{by_predictor,direct,by_predictor_grpo}.pkl,
        dataset.json, checkpoints/<dataset>/*/final_checkpoint/{selection,log_history}.json
writes  Data/<dataset>/metrics.json (with its provenance), Data/<dataset>/predictions.png, training_curves.png
"""
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils, baselines

from baselines import baselines
from histories import history_coverage, history_shares, history_table
from settings import ValidArguments, checkpoint_dir_arg, parse_args, read_split, read_table
from stats import matched, paired_interval
from utils import COLUMNS, atomic_write, fail, producer, provenance, ratings_file, read_json, write_json

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OURS, GRPO = "Reason4Rec (Reasoner + Predictor)", "Reason4Rec + GRPO"
LLM_METHODS = {  # name: (whose reasons: None for none, the experts whose checkpoints it uses)
    "Direct Predictor (authors' ablation, no reason)": (None, ["Direct_Predictor"]),
    OURS: ("Reasoner", ["Reasoner", "Predictor"]),
    GRPO: ("Reasoner_GRPO", ["Reasoner_GRPO", "Predictor"]),
}
EXPERTS = ("Summarizer", "reason_reward_model", "Reasoner", "Predictor", "Direct_Predictor", "Reasoner_GRPO")
SUBSETS = ("all", "with user and item history")


@dataclass
class EvaluateArguments:
    checkpoint_dir: str = checkpoint_dir_arg()  # to report the checkpoint each expert kept, and its curves


def evaluate(split: str, rows, methods: dict, has_user, has_item) -> dict:
    """One split's tables, printed and returned in the metrics.json form (its comparisons are added by `compare`)."""
    truth = rows["ratings"].to_numpy(dtype=float)
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
    return report


def best_other(table: dict) -> str:
    """The method Reason4Rec is compared with: the best one by MAE but Reason4Rec and its GRPO refinement."""
    return min((k for k in table if k not in (OURS, GRPO)), key=lambda k: table[k]["MAE"])


def compare(split: str, rows, methods: dict, table: dict, against: str | None) -> list[dict]:
    """Reason4Rec against `against` (chosen on the validation rows), and Reason4Rec + GRPO against Reason4Rec: the
    paired bootstrap interval of the MAE difference on this split's rows, printed and returned."""
    truth = rows["ratings"].to_numpy(dtype=float)
    pairs = []
    if OURS in methods and against in methods:
        pairs.append((OURS, against))
    elif OURS in methods:
        print(f"note: no comparison of {OURS} on the {split} rows: "
              + (f"{against}, the best other method on the validation rows, has no {split} predictions" if against
                 else "there are no validation rows to choose the method it is compared with"))
    if OURS in methods and GRPO in methods:
        pairs.append((GRPO, OURS))
    comparisons = []
    for method, other in pairs:
        difference = np.abs(truth - methods[method]) - np.abs(truth - methods[other])  # < 0 where `method` is closer
        low, high = paired_interval(difference)
        noise = low <= 0 <= high
        verdict = (f"{method} {'beats' if difference.mean() < 0 else 'does not beat'} {other} by MAE "
                   f"({table[method]['MAE']:.4f} against {table[other]['MAE']:.4f}); difference "
                   f"{difference.mean():+.4f}, paired bootstrap 95% interval [{low:+.4f}, {high:+.4f}]: "
                   f"{'within noise' if noise else 'beyond noise'} on these {len(rows):,} {split} rows")
        comparisons.append({"method": method, "against": other, "difference": round(difference.mean(), 4),
                            "ci95": [round(low, 4), round(high, 4)], "within_noise": bool(noise), "verdict": verdict})
        print(verdict)
    return comparisons


def chosen_checkpoints(experts) -> dict:
    """What each expert kept, from its selection.json."""
    kept = {}
    for expert in experts:
        if expert in selections:
            selection = selections[expert]
            chosen = next(c for c in selection["candidates"] if c["candidate"] == selection["chosen"])
            kept[expert] = {"adapter": str(adapters / expert / "final_checkpoint"), "chosen": selection["chosen"],
                            "step": selection["chosen_step"], "valid_metric": chosen["valid_metric"]}
    return kept


def training_curves(path: Path):
    """One picture: each expert's training loss per step (the GRPO Reasoner's policy loss is no likelihood: its mean
    reward is drawn instead), each trainer's validation metric per candidate checkpoint (the kept one ringed), and
    the GRPO Reasoner's mean reward per step; a line per curve is printed too."""
    logs = {e: read_json(adapters / e / "final_checkpoint" / "log_history.json") for e in EXPERTS
            if (adapters / e / "final_checkpoint" / "log_history.json").exists()}
    figure, (loss_ax, valid_ax, reward_ax) = plt.subplots(1, 3, figsize=(16, 4))
    print(f"\ntraining curves ({path}):")
    for expert, log in logs.items():
        curve = [(x["step"], x["loss"]) for x in log if "loss" in x and "step" in x]
        if expert != "Reasoner_GRPO" and curve:
            loss_ax.plot(*zip(*curve), marker=".", label=expert)
            print(f"  {expert}: training loss over {len(curve)} steps, {curve[0][1]:.4f} -> {curve[-1][1]:.4f}")
    for expert, selection in selections.items():
        scored = [(c["step"], c["valid_metric"]) for c in selection["candidates"] if c["valid_metric"] is not None]
        if scored:
            line, = valid_ax.plot(*zip(*scored), marker="o", label=expert)
            kept = [v for s, v in scored if s == selection["chosen_step"]]
            valid_ax.plot([selection["chosen_step"]] * len(kept), kept, "o", markersize=12, fillstyle="none",
                          color=line.get_color())
            print(f"  {expert}: validation metric per candidate, "
                  + ", ".join(f"step {s} {v:.4f}" for s, v in scored) + f"; kept step {selection['chosen_step']}")
    rewards = [(x["step"], x["reward"]) for x in logs.get("Reasoner_GRPO", []) if "reward" in x and "step" in x]
    if rewards:
        reward_ax.plot(*zip(*rewards), marker=".", color="C5")
        print(f"  Reasoner_GRPO: mean reward over {len(rewards)} steps, {rewards[0][1]:.4f} -> {rewards[-1][1]:.4f}")
    for ax, title, ylabel, drawn in (
            (loss_ax, "training loss", "loss (cross-entropy of the answer)", loss_ax.lines),
            (valid_ax, "validation metric per checkpoint (kept: ringed)", "validation MAE (lower is better)",
             valid_ax.lines),
            (reward_ax, "GRPO Reasoner: mean reward", "mean reward (higher is better)", rewards)):
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        if not drawn:
            ax.text(0.5, 0.5, f"no training log in\n{adapters}", ha="center", va="center", transform=ax.transAxes)
            print(f"  {title}: no training log in {adapters}")
        elif ax is not reward_ax:
            ax.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=100))


args, valid, extra = parse_args(ValidArguments, EvaluateArguments)
if not args.file(ratings_file("test")).exists():
    fail(f"{args.file(ratings_file('test'))} not found. Run {producer(ratings_file('test'))} first.")
adapters = Path(extra.checkpoint_dir) / args.dataset
selections = {e: read_json(adapters / e / "final_checkpoint" / "selection.json") for e in EXPERTS
              if (adapters / e / "final_checkpoint" / "selection.json").exists()}  # each read once
train = read_table(args, "raw_data/train.pkl", limit=False)
metrics = {"dataset": args.dataset, "methods": {}}
inputs, test_methods = [args.file("raw_data/train.pkl")], None
splits = {split: read_split(args, split, valid.eval_limit) for split in ("valid", "test")
          if split == "test" or args.file(f"raw_data/{split}.pkl").exists()}  # the validation rows where there are
# The held-out rows' history boundary that the prompts were built with (prompts.TestPromptArguments, recorded in
# dataset.json by the first step that built one; before the target's time by default).
recorded = read_json(args.file("dataset.json")) if args.file("dataset.json").exists() else {}
coverage = history_coverage(train, splits, recorded.get("test_history_before_target", True))
print(f"{args.dataset}: " + history_table(coverage))
metrics["history"] = history_shares(coverage)
against = None  # the method Reason4Rec is compared with: the best other one on the validation rows
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
        if name not in metrics["methods"]:
            metrics["methods"][name] = {"files": {}, "checkpoints": chosen_checkpoints(experts)}
        metrics["methods"][name]["files"][split] = str(file)
    if split == "test" and OURS not in methods:
        fail(f"{args.file(ratings_file('test'))} does not hold a prediction for every test row; rerun "
             f"`3_Predictor/3_generate_predict_for_test.py`")
    metrics[split] = evaluate(split, rows, methods, *coverage[split])
    table = metrics[split]["results"]["all"]
    if split == "valid":
        against = best_other(table)
    metrics[split]["comparisons"] = compare(split, rows, methods, table, against)
    if split == "test":
        test_methods, test_truth = methods, rows["ratings"].to_numpy(dtype=float)
for name, method in metrics["methods"].items():
    for expert, kept in method["checkpoints"].items():
        print(f"{name}: {expert} kept {kept['chosen']} (step {kept['step']}"
              + (f", validation {kept['valid_metric']:.4f})" if kept["valid_metric"] is not None else ")"))
comparisons = metrics["test"]["comparisons"]
metrics["verdict"] = comparisons[0]["verdict"] if comparisons and comparisons[0]["method"] == OURS else None
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
training_curves(args.file("training_curves.png"))
print(f"wrote {args.file('metrics.json')}, {args.file('predictions.png')} and {args.file('training_curves.png')}")
