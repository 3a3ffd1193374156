"""Stage 3, step 1: SFT data for the Predictor: the rating prompt with the Reasoner's *own* reason for each target
(greedy, as in the paper; not the teacher's) -> "Predicted Rating: x.0".  The targets are those of
distilling_high_quality_reasons.pkl.

--no_reason builds the data of the direct-prediction ablation instead: the same targets, the rating prompt without
an analysis (no Reasoner needed) -> Direct_Predictor_train_instruct.pkl.

reads   Data/<dataset>/distilling_high_quality_reasons.pkl, train_summarizer_generation_results.pkl, the Reasoner
writes  Data/<dataset>/Predictor_train_instruct.pkl  (or Direct_Predictor_train_instruct.pkl)
"""
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils, prompts, llm

from histories import load_histories
from llm import ModelArguments, load_expert
from prompts import HistoryPromptArguments, rating_answer, rating_prompt, reason_prompt, to_messages
from utils import parse_args, read_table, write_pickle


@dataclass
class PredictorArguments:
    no_reason: bool = False


args, prompt, model_args, predictor = parse_args(HistoryPromptArguments, ModelArguments, PredictorArguments,
                                                 data_parallel=True)
targets = read_table(args, "distilling_high_quality_reasons.pkl")
contexts = load_histories(args, prompt.max_his).for_rows(targets)

if predictor.no_reason:
    analyses = [None] * len(targets)
else:
    reasoner = load_expert(args, model_args, "Reasoner")
    analyses = reasoner.generate([reason_prompt(prompt.product_class, t, h) for t, h in zip(targets.title, contexts)],
                                 desc="Reasoner")

examples = [to_messages(rating_prompt(prompt.product_class, title, h, analysis), rating_answer(r))
            for title, h, analysis, r in zip(targets.title, contexts, analyses, targets.ratings)]
write_pickle(examples, args.file("Direct_Predictor_train_instruct.pkl" if predictor.no_reason
                                 else "Predictor_train_instruct.pkl"))
