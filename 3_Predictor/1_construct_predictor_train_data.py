"""Stage 3, step 1: SFT data for the Predictor: the rating prompt with the Reasoner's *own* reason for each target
(greedy, as in the paper; not the teacher's) -> "Predicted Rating: x.0".  The targets are those of
distilling_high_quality_reasons.pkl (the official script names a file distilling_gpt_reasons.pkl that no step writes).

--no_reason builds the data of the paper's direct-prediction ablation instead: the same targets, the rating prompt
without an analysis (no Reasoner needed) -> Direct_Predictor_train_instruct.pkl.

reads   Data/<dataset>/distilling_high_quality_reasons.pkl, train_summarizer_generation_results.pkl, the Reasoner
writes  Data/<dataset>/Predictor_train_instruct.pkl  (or Direct_Predictor_train_instruct.pkl)
"""
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils, prompts, llm


from llm import ModelArguments, generate, load_expert
from prompts import rating_prompt, reason_prompt
from utils import ResultCache, fail, load_histories, parse_args, rating_answer, read_table, to_messages


@dataclass
class PredictorArguments:
    no_reason: bool = False


args, model_args, predictor = parse_args(ModelArguments, PredictorArguments)
product_class = args.resolve_product_class()
targets = read_table(args, "distilling_high_quality_reasons.pkl")
contexts = load_histories(args).for_rows(targets)

if predictor.no_reason:
    if model_args.num_shards > 1:
        fail("--no_reason generates nothing: run it once, without shards")
    analyses = [None] * len(targets)
else:
    questions = [reason_prompt(product_class, t, h) for t, h in zip(targets.title, contexts)]
    model, tokenizer, model_id = load_expert(args, model_args, "Reasoner")
    targets, questions = model_args.shard(tokenizer, targets, questions)
    contexts = [contexts[i] for i in targets.index]
    analyses = generate(model, tokenizer, questions, max_new_tokens=model_args.max_new_tokens,
                        batch_size=model_args.batch_size, model_id=model_id,
                        cache=ResultCache(args.file("generation_cache.sqlite")), desc="Reasoner")

examples = [to_messages(rating_prompt(product_class, title, h, analysis), rating_answer(r))
            for title, h, analysis, r in zip(targets.title, contexts, analyses, targets.ratings)]
model_args.write(examples, args.file("Direct_Predictor_train_instruct.pkl" if predictor.no_reason
                                     else "Predictor_train_instruct.pkl"), index=targets.index)
