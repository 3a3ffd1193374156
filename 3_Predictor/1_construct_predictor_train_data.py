"""Stage 3, step 1: SFT data for the Predictor: the rating prompt with the Reasoner's *own* reason for each target
(greedy, as in the paper; not the teacher's) -> "Predicted Rating: x.0".

--targets: which targets it learns from: "kept", those of distilling_high_quality_reasons.pkl (official HEAD), or
"all", every Reasoner target of train_12000.pkl (the authors' original code, a4fa718).

--no_reason builds the data of the authors' direct-prediction ablation instead (a4fa718,
step3_construct_direct_rating_train.ipynb): by default all of train_12000.pkl, their prompt without an analysis
(prompts.direct_prediction_prompt), no Reasoner needed -> Direct_Predictor_train_instruct.pkl.

Also the validation examples the trainer picks its best checkpoint on: the validation rows with the Reasoner's
reasons for them (2_Reasoner/7 --split valid), or without a reason for the ablation.

reads   Data/<dataset>/distilling_high_quality_reasons.pkl (or train_12000.pkl), train_summarizer_generation_results.pkl,
        the Reasoner, reason_for_valid_by_reasoner.pkl (or raw_data/valid.pkl)
writes  Data/<dataset>/Predictor_train_instruct.pkl, Predictor_valid_instruct.pkl
        (or Direct_Predictor_train_instruct.pkl, Direct_Predictor_valid_instruct.pkl)
"""
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils, prompts, llm

from histories import load_histories
from llm import ModelArguments, load_expert
from prompts import TestPromptArguments, predictor_prompts, rating_answer, reason_prompt, to_messages
from settings import ValidArguments, parse_args, read_split, read_table
from utils import COLUMNS, fail, reasons_file

TARGETS = {"kept": "distilling_high_quality_reasons.pkl", "all": "train_12000.pkl"}


@dataclass
class PredictorDataArguments:
    no_reason: bool = field(default=False, metadata={"help": "the direct-prediction ablation's data instead"})
    targets: str | None = field(default=None, metadata={
        "help": "kept (official HEAD; the default with a reason) or all (a4fa718; the default with --no_reason)"})


args, prompt, valid, model_args, predictor = parse_args(TestPromptArguments, ValidArguments, ModelArguments,
                                                        PredictorDataArguments, data_parallel=True)
name = "Direct_Predictor" if predictor.no_reason else "Predictor"
targets_kind = predictor.targets or ("all" if predictor.no_reason else "kept")
if targets_kind not in TARGETS:
    fail(f"--targets must be kept or all, not {targets_kind!r}")


def examples(rows, contexts, analyses=None) -> list:
    """Rating prompts (with the analyses, or the ablation's without) -> "Predicted Rating: x.0"."""
    questions = predictor_prompts(prompt.product_class, rows.title, contexts, analyses)
    return [to_messages(q, rating_answer(r)) for q, r in zip(questions, rows.ratings)]


targets = read_table(args, TARGETS[targets_kind])
histories = load_histories(args, prompt)
contexts = histories.for_rows(targets)
rows = None  # the validation rows, read (and checked) before the Reasoner is loaded
if args.file("raw_data/valid.pkl").exists():
    rows = read_split(args, "valid", valid.eval_limit) if predictor.no_reason else \
        read_table(args, reasons_file("valid"), COLUMNS + ["reasoner_reply"])
analyses = None
if not predictor.no_reason:
    reasoner = load_expert(args, model_args, "Reasoner")
    analyses = reasoner.generate([reason_prompt(prompt.product_class, t, h) for t, h in zip(targets.title, contexts)],
                                 desc="Reasoner")
args.write(examples(targets, contexts, analyses), f"{name}_train_instruct.pkl")

if rows is not None:  # their histories built as the test set's
    args.write(examples(rows, histories.for_rows(rows, prompt.test_history_before_target),
                        None if predictor.no_reason else rows.reasoner_reply), f"{name}_valid_instruct.pkl")
