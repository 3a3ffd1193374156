"""Stage 2, step 4: distill reasons from the teacher and keep those that help the reward model (reason_filter.py):
    |r - pred_with_reason| - |r - pred_without_reason| < tau        (tau = 0.1)
else up to 10 hinted retries, rejecting reasons that give the rating away; targets with no kept reason are dropped.

reads   Data/<dataset>/train_12000.pkl, train_summarizer_generation_results.pkl, the reward model, the teacher
writes  Data/<dataset>/distilling_high_quality_reasons.pkl  (+ personalized_analysis, reason_attempt: 0 = unhinted)
        Data/<dataset>/distilling_report.json  (acceptance rates)
--dry_run prints the requests, tokens and cost of every round (the hinted ones at most), before any model is loaded.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils, prompts, llm, teacher

from histories import load_histories
from llm import ModelArguments, load_expert
from prompts import HistoryPromptArguments, rating_prompt, reason_prompt
from reason_filter import FilterArguments, keep_helpful_reasons
from teacher import Teacher, TeacherArguments
from settings import parse_args, read_table
from utils import fail, write_json

args, prompt, model_args, distill, teacher_args = parse_args(HistoryPromptArguments, ModelArguments, FilterArguments,
                                                             TeacherArguments, data_parallel=True)
teacher = Teacher(args.file("teacher_cache.sqlite"), teacher_args.dry_run,  # checks the settings before any work
                  temperatures=[distill.first_temperature, distill.temperature])
targets = read_table(args, "train_12000.pkl")
contexts = load_histories(args, prompt).for_rows(targets)
labels = [f"{i} of train_12000.pkl (user {t.user_id}, item {t.item_id})" for i, t in enumerate(targets.itertuples())]


def temperature(attempt):
    return distill.temperature if attempt else distill.first_temperature


def reason_prompts(rows, attempt):
    """The teacher's prompts for these targets: unhinted at attempt 0, with the true rating as a hint after."""
    return [reason_prompt(prompt.product_class, targets.title[i], contexts[i],
                          hint=targets.ratings[i] if attempt else None) for i in rows]


if teacher.dry_run:  # every round priced before any model is loaded; a hinted round asks only for the targets left
    everyone = range(len(targets))
    teacher.estimate([(f"teacher reasons, attempt {a}{' (at most)' if a else ''}", reason_prompts(everyone, a),
                       temperature(a), [a] * len(targets)) for a in range(distill.max_sample_num + 1)])
reward_model = load_expert(args, model_args, "reason_reward_model")


def ask(rows, attempt):
    """The teacher's reasons for these targets; each round is one call (one batch under TEACHER_BATCH=1)."""
    return teacher.ask(reason_prompts(rows, attempt), temperature=temperature(attempt), samples=[attempt] * len(rows),
                       labels=[labels[i] for i in rows], desc=f"teacher reasons, attempt {attempt}")


def score(rows, analyses=None):
    """The reward model's ratings for these targets, with the given analyses (or without any)."""
    analyses = [None] * len(rows) if analyses is None else analyses
    return reward_model.score([rating_prompt(prompt.product_class, targets.title[i], contexts[i], analysis)
                               for i, analysis in zip(rows, analyses)], desc="reward model")


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
args.write(result, "distilling_high_quality_reasons.pkl")
write_json(report, args.file("distilling_report.json"))
print(teacher.report())
