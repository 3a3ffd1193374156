"""Stage 3, step 1: SFT data for the Predictor: the rating prompt with the Reasoner's *own* reason for each target
(greedy, as in the paper; not the teacher's) -> "Predicted Rating: x.0".

--targets: which targets it learns from: "kept", those of distilling_high_quality_reasons.pkl (official HEAD), or
"all", every Reasoner target of train_12000.pkl (the authors' original code, a4fa718).

--no_reason builds the data of the authors' direct-prediction ablation instead (a4fa718,
step3_construct_direct_rating_train.ipynb): by default all of train_12000.pkl, their prompt without an analysis
(prompts.direct_prediction_prompt), no Reasoner needed -> Direct_Predictor_train_instruct.pkl.

reads   Data/<dataset>/distilling_high_quality_reasons.pkl (or train_12000.pkl), train_summarizer_generation_results.pkl,
        the Reasoner
writes  Data/<dataset>/Predictor_train_instruct.pkl  (or Direct_Predictor_train_instruct.pkl)
"""
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils, prompts, llm

from histories import load_histories
from llm import ModelArguments, load_expert
from prompts import (HistoryPromptArguments, direct_prediction_prompt, rating_answer, rating_prompt, reason_prompt,
                     to_messages)
from utils import fail, parse_args, read_table, write_pickle

TARGETS = {"kept": "distilling_high_quality_reasons.pkl", "all": "train_12000.pkl"}


@dataclass
class PredictorDataArguments:
    no_reason: bool = field(default=False, metadata={"help": "the direct-prediction ablation's data instead"})
    targets: str | None = field(default=None, metadata={
        "help": "kept (official HEAD; the default with a reason) or all (a4fa718; the default with --no_reason)"})


args, prompt, model_args, predictor = parse_args(HistoryPromptArguments, ModelArguments, PredictorDataArguments,
                                                 data_parallel=True)
targets_kind = predictor.targets or ("all" if predictor.no_reason else "kept")
if targets_kind not in TARGETS:
    fail(f"--targets must be kept or all, not {targets_kind!r}")
targets = read_table(args, TARGETS[targets_kind])
contexts = load_histories(args, prompt).for_rows(targets)

if predictor.no_reason:
    questions = [direct_prediction_prompt(prompt.product_class, t, h) for t, h in zip(targets.title, contexts)]
else:
    reasoner = load_expert(args, model_args, "Reasoner")
    analyses = reasoner.generate([reason_prompt(prompt.product_class, t, h) for t, h in zip(targets.title, contexts)],
                                 desc="Reasoner")
    questions = [rating_prompt(prompt.product_class, t, h, a) for t, h, a in zip(targets.title, contexts, analyses)]

examples = [to_messages(q, rating_answer(r)) for q, r in zip(questions, targets.ratings)]
write_pickle(examples, args.file("Direct_Predictor_train_instruct.pkl" if predictor.no_reason
                                 else "Predictor_train_instruct.pkl"))
