"""Stage 2, step 4: distill reasons from the teacher and keep those that help the reward model.

For every target, the reward model predicts the rating without a reason once.  The teacher writes one reason
(temperature 1.0); it is kept if it brings the reward model's prediction closer to the truth:
    |r - pred_with_reason| - |r - pred_without_reason| < tau        (tau = 0.1)
Otherwise the teacher tries again, up to 10 times, with the true rating as a hint; a hinted reason that mentions
ratings or stars (any of the forbidden words) is rejected unseen, and the first that passes the test is kept.
Targets with no kept reason are dropped, and counted.

All targets go through each round together: the teacher's requests run concurrently (and are cached), and all
candidates of a round are scored by the reward model in batches.

reads   Data/<dataset>/train_12000.pkl, train_summarizer_generation_results.pkl, the reward model, the teacher
writes  Data/<dataset>/distilling_high_quality_reasons.pkl  (+ personalized_analysis, reason_attempt: 0 = unhinted)
        Data/<dataset>/distilling_report.json  (acceptance rates)
"""
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils, prompts, llm, teacher

from prompts import FORBIDDEN_WORDS, rating_prompt, reason_prompt
from utils import ResultCache, fail, load_histories, parse_args, read_table, write_json, write_pickle


@dataclass
class DistillArguments:
    tau: float = 0.1
    max_sample_num: int = 10
    temperature: float = 1.0


def keep_helpful_reasons(truth, without, ask, score, tau=0.1, max_sample_num=10):
    """The filter.  `truth[i]` and `without[i]`: target i's rating and the reward model's prediction without a reason;
    `ask(rows, attempt)`: the teacher's reasons for those targets (attempt 0 unhinted, 1.. hinted); `score(rows,
    reasons)`: the reward model's predictions with them.  Returns {target: (reason, attempt)} and a report."""
    truth, without = np.asarray(truth, dtype=float), np.asarray(without, dtype=float)
    kept, report = {}, {"targets": len(truth), "tau": tau, "accepted_per_attempt": {}, "forbidden_rejected": 0}
    for attempt in range(max_sample_num + 1):
        rows = [i for i in range(len(truth)) if i not in kept]
        if not rows:
            break
        reasons = ask(rows, attempt)
        if attempt:  # a hinted reason must not give the rating away
            clean = [k for k, text in enumerate(reasons) if not any(word in text for word in FORBIDDEN_WORDS)]
            report["forbidden_rejected"] += len(rows) - len(clean)
            rows, reasons = [rows[k] for k in clean], [reasons[k] for k in clean]
        gain = np.abs(truth[rows] - np.asarray(score(rows, reasons), dtype=float)) - np.abs(truth[rows] - without[rows])
        accepted = [(i, text) for i, text, g in zip(rows, reasons, gain) if g < tau]
        kept.update((i, (text, attempt)) for i, text in accepted)
        report["accepted_per_attempt"][attempt] = len(accepted)
        print(f"attempt {attempt}: kept {len(accepted):,} of {len(rows):,} candidates; {len(kept):,} targets done")
    n, first = max(len(truth), 1), report["accepted_per_attempt"].get(0, 0)
    report.update(kept=len(kept), dropped=len(truth) - len(kept), first_try_rate=first / n,
                  after_hints_rate=(len(kept) - first) / n, dropped_rate=(len(truth) - len(kept)) / n)
    return kept, report


if __name__ == "__main__":
    from llm import ModelArguments, load_expert, predict_ratings
    from teacher import Teacher

    args, model_args, distill = parse_args(ModelArguments, DistillArguments)
    teacher = Teacher(args.file("teacher_cache.sqlite"))  # checks the settings before any work
    product_class = args.resolve_product_class()
    targets = read_table(args, "train_12000.pkl")
    contexts = load_histories(args).for_rows(targets)
    reward_model, tokenizer, model_id = load_expert(args, model_args, "reason_reward_model")
    scores = ResultCache(args.file("generation_cache.sqlite"))
    labels = [f"{i} of train_12000.pkl (user {t.user_id}, item {t.item_id})" for i, t in enumerate(targets.itertuples())]

    def score(rows, analyses=None):
        analyses = analyses if analyses is not None else [None] * len(rows)
        prompts = [rating_prompt(product_class, targets.title[i], contexts[i], analysis)
                   for i, analysis in zip(rows, analyses)]
        return predict_ratings(reward_model, tokenizer, prompts, batch_size=model_args.batch_size, model_id=model_id,
                               cache=scores, desc="reward model")

    def ask(rows, attempt):
        prompts = [reason_prompt(product_class, targets.title[i], contexts[i],
                                 hint=targets.ratings[i] if attempt else None) for i in rows]
        return teacher.ask(prompts, temperature=distill.temperature, samples=[attempt] * len(rows),
                           labels=[labels[i] for i in rows], desc=f"teacher reasons, attempt {attempt}")

    without = score(range(len(targets)))  # once per target
    kept, report = keep_helpful_reasons(targets["ratings"], without, ask, score, distill.tau, distill.max_sample_num)
    print(f"kept reasons for {report['kept']:,} of {len(targets):,} targets: {report['accepted_per_attempt'].get(0, 0):,} "
          f"at the first try, the others after hints; {report['dropped']:,} dropped; "
          f"{report['forbidden_rejected']:,} hinted reasons rejected for forbidden words")
    if not kept:
        fail("no reason was kept for any target: nothing to train the Reasoner on")
    order = sorted(kept)
    result = targets.iloc[order].reset_index(drop=True)
    result["personalized_analysis"] = [kept[i][0] for i in order]
    result["reason_attempt"] = [kept[i][1] for i in order]
    write_pickle(result, args.file("distilling_high_quality_reasons.pkl"))
    write_json(report, args.file("distilling_report.json"))
    print(teacher.report())
