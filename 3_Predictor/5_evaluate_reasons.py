"""Stage 3, step 5 (new): the quality of the reasons, the paper's second claim beside the ratings of 3_Predictor/4.

Every reason is compared with the review its user really wrote about the item afterwards (the verbalized feedback a
reason should anticipate), on the same test rows for every variant present:
  Reasoner (SFT)      reason_for_test_by_reasoner.pkl       (2_Reasoner/7_generate_reason_for_test.py)
  Reasoner (GRPO)     reason_for_test_by_reasoner_grpo.pkl  (4_GRPO/2, where it has been run)
  Teacher (<model>)   with --with_teacher: the teacher's own reasons for the test targets (the Reasoner's prompt,
                      temperature 0, through the cached teacher client), kept in reason_for_test_by_teacher.pkl
  No reason (control) the real review after GPTScore's instruction with an empty reason: each variant's
                      review|reason GPTScore reads as a gain over it
Metrics (higher is better):
  GPTScore   with the real review as its reference, both directions and their mean, as Fu et al. (2023) score
             against a reference: the evaluator's (--evaluator_model_path, default $MODEL_PATH, the base model) mean
             log-likelihood per token of the real review as the assistant's answer to prompts.gptscore_prompt(reason)
             ("review|reason"), of the reason as the answer to prompts.gptscore_reverse_prompt(review)
             ("reason|review"), and the mean of the two per row ("GPTScore"); this project's templates (the paper
             publishes neither its template nor its evaluator); llm.Expert.loglikelihood, batched and cached
  ROUGE-L    F1 of the reason against the real review (rouge-score, Porter stemming): a lexical reference
  judge      with --judge: the teacher grades each reason against the real review by prompts.judge_prompt's rubric,
             1-10, temperature 0, cached; an answer without a readable score is counted and left out
  tokens     each variant's mean reason length in the evaluator's tokens (the log-likelihoods are per token)
Every pair of variants gets, per metric, the paired bootstrap 95% interval of the mean difference over the rows, and
every variant its review|reason gain over no reason.
BLEURT (the paper's other metric) does not run on this project's stack: the reasons and the references are written,
one per line, as the original BLEURT reads them (README, "Quality of the reasons").

Test rows without review text have nothing to be compared with: they are left out of every metric, and counted.  An
empty or missing reason is counted, and scored as the empty text; it has no tokens to score in the reason|review
direction, so that direction and the mean leave its row out.  A reason file that covers other rows than the test set
is refused.

reads   Data/<dataset>/raw_data/test.pkl, the reason files above, [train_summarizer_generation_results.pkl]
writes  Data/<dataset>/reason_quality.json (with its provenance), bleurt/references.txt,
        bleurt/<variant>.candidates.txt, [reason_for_test_by_teacher.pkl]
"""
import os
import re
import sys
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
from rouge_score import rouge_scorer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: utils, prompts, llm

import parallel
from cache import ResultCache
from histories import load_histories, text
from llm import load_model
from prompts import (TestPromptArguments, gptscore_prompt, gptscore_reverse_prompt, judge_prompt, judge_score,
                     reason_prompt)
from settings import load_in_4bit_arg, parse_args, read_table
from stats import matched, paired_interval
from utils import COLUMNS, KEY, atomic_write, fail, producer, provenance, reasons_file, require_model, write_json

REASON = "reasoner_reply"
REASONERS = {"Reasoner (SFT)": reasons_file("test", "Reasoner"), "Reasoner (GRPO)": reasons_file("test", "Reasoner_GRPO")}
TEACHER_REASONS = "reason_for_test_by_teacher.pkl"
CONTROL = "No reason (control)"
FORWARD, REVERSE = "GPTScore review|reason", "GPTScore reason|review"


@dataclass
class ReasonQualityArguments:
    evaluator_model_path: str | None = field(default_factory=lambda: os.environ.get("MODEL_PATH"), metadata={
        "help": "the local model GPTScore runs on (default: $MODEL_PATH, the base model)"})
    load_in_4bit: str = load_in_4bit_arg()
    batch_size: int = field(default=8, metadata={"help": "reviews scored per forward pass"})
    with_teacher: bool = field(default=False, metadata={
        "help": "also ask the teacher for its own reasons for the test targets, and judge them too (paid, cached)"})
    judge: bool = field(default=False, metadata={"help": "also grade every reason with the teacher as judge "
                                                         "(paid, cached)"})


def reasons_in(name: str) -> np.ndarray:
    """The reasons of a reason file, in the order of the test rows; a file of other rows is refused."""
    table = read_table(args, name, COLUMNS + [REASON])
    found = matched(test, table, REASON)
    if found is None:
        common = len(table[KEY].merge(test[KEY].drop_duplicates(), on=KEY))
        fail(f"{args.file(name)} holds {len(table):,} rows, {common:,} of them rows of raw_data/test.pkl, which has "
             f"{len(test):,}{' (--limit ' + str(args.limit) + ')' if args.limit is not None else ''}: it covers other "
             f"rows than the test set. Rerun {producer(args.file(name))} on this test set.")
    return np.array([text(r) for r in found], dtype=object)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def one_line(value: str) -> str:
    return " ".join(value.splitlines())


def r4(x):
    return None if x is None or not np.isfinite(x) else round(float(x), 4)


args, prompt, quality = parse_args(TestPromptArguments, ReasonQualityArguments, data_parallel=True)
main = parallel.is_main_process()
evaluator_path = require_model(quality.evaluator_model_path or fail(
    "no evaluator: pass --evaluator_model_path or set MODEL_PATH to the base model"))
evaluator_name = Path(evaluator_path).resolve().name
if evaluator_name == "final_checkpoint":  # an adapter: name it by its expert
    evaluator_name = Path(evaluator_path).resolve().parent.name
test = read_table(args, "raw_data/test.pkl")
inputs = [args.file("raw_data/test.pkl")]
variants = {}
for name, file in REASONERS.items():
    if name == "Reasoner (SFT)" or args.file(file).exists():  # the SFT Reasoner's file is required
        variants[name] = reasons_in(file)
        inputs.append(args.file(file))

teacher = None
if quality.with_teacher or quality.judge:
    from teacher import Teacher

    teacher = Teacher(args.file("teacher_cache.sqlite"), temperatures=[0.0])
    teacher_name = Path(teacher.path).name if teacher.kind == "local" else teacher.model
if quality.with_teacher:
    histories = load_histories(args, prompt).for_rows(test, prompt.test_history_before_target)
    labels = [f"{i} of raw_data/test.pkl (user {r.user_id}, item {r.item_id})" for i, r in enumerate(test.itertuples())]
    replies = teacher.ask([reason_prompt(prompt.product_class, title, h) for title, h in zip(test.title, histories)],
                          temperature=0.0, samples=[0] * len(test), labels=labels, desc="teacher reasons")
    args.write(test.assign(**{REASON: replies}), TEACHER_REASONS)
    variants[f"Teacher ({teacher_name})"] = np.array([text(r) for r in replies], dtype=object)
    inputs.append(args.file(TEACHER_REASONS))
elif args.file(TEACHER_REASONS).exists() and main:
    print(f"note: {args.file(TEACHER_REASONS)} is left out; --with_teacher includes it (from the teacher's cache)")

# The rows every metric is computed on: those with a real review to compare with.
references = test["reviews"].map(text).to_numpy(dtype=object)
scored = np.array([bool(r.strip()) for r in references])
if not scored.any():
    fail(f"no row of {args.file('raw_data/test.pkl')} has review text: there is nothing to compare the reasons with")
references = references[scored]
variants = {name: reasons[scored] for name, reasons in variants.items()}
empty = {name: int(sum(not r.strip() for r in reasons)) for name, reasons in variants.items()}

evaluator = load_model(evaluator_path, load_in_4bit=quality.load_in_4bit, batch_size=quality.batch_size,
                       cache=ResultCache(args.file("generation_cache.sqlite")))
scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
scores = {"GPTScore": {}, FORWARD: {}, REVERSE: {}, "ROUGE-L": {}}
control = evaluator.loglikelihood([gptscore_prompt("")] * len(references), references, desc=f"GPTScore, {CONTROL}")
tokens = {}
for name, reasons in variants.items():
    forward = evaluator.loglikelihood([gptscore_prompt(r) for r in reasons], references, desc=f"GPTScore, {name}")
    reverse = evaluator.loglikelihood([gptscore_reverse_prompt(ref) for ref in references], reasons,
                                      desc=f"GPTScore reversed, {name}")  # NaN for an empty reason: no tokens
    scores["GPTScore"][name], scores[FORWARD][name], scores[REVERSE][name] = (forward + reverse) / 2, forward, reverse
    scores["ROUGE-L"][name] = np.array([scorer.score(ref, r)["rougeL"].fmeasure for ref, r in zip(references, reasons)])
    tokens[name] = float(np.mean([len(ids) for ids in evaluator.tokenizer(list(reasons), add_special_tokens=False)
                                  ["input_ids"]]))

unreadable = {}
if quality.judge:
    names = list(variants)
    answers = teacher.ask([judge_prompt(ref, r) for name in names for ref, r in zip(references, variants[name])],
                          temperature=0.0, desc="judge",
                          labels=[f"{name}, scored row {i}" for name in names for i in range(len(references))])
    values = np.array([np.nan if (v := judge_score(a)) is None else v for a in answers]).reshape(len(names), -1)
    scores["judge"] = dict(zip(names, values))
    unreadable = {name: int(np.isnan(v).sum()) for name, v in zip(names, values)}
if teacher is not None and main:
    print(teacher.report())

results = {CONTROL: {**{metric: None for metric in scores}, FORWARD: r4(control.mean()), "reason_tokens": 0,
                     "empty_or_missing": len(references), "rows": len(references)}}
for name in variants:
    results[name] = {metric: r4(np.nanmean(per[name]) if np.isfinite(per[name]).any() else None)
                     for metric, per in scores.items()}
    results[name].update(reason_tokens=r4(tokens[name]), empty_or_missing=empty[name], rows=len(references))
    if quality.judge:
        results[name]["judge_unreadable"] = unreadable[name]
comparisons = []
for name in variants:  # each variant's gain over no reason: the review's likelihood after it, less after none
    difference = scores[FORWARD][name] - control
    low, high = paired_interval(difference)
    comparisons.append({"metric": FORWARD, "method": name, "against": CONTROL, "difference": r4(difference.mean()),
                        "ci95": [r4(low), r4(high)], "rows": len(difference)})
for metric, per in scores.items():
    for earlier, later in combinations(variants, 2):  # later variant minus earlier one: > 0 where the later is better
        difference = per[later] - per[earlier]
        difference = difference[np.isfinite(difference)]
        low, high = paired_interval(difference)
        comparisons.append({"metric": metric, "method": later, "against": earlier,
                            "difference": r4(difference.mean() if len(difference) else None),
                            "ci95": [r4(low), r4(high)], "rows": len(difference)})

if main:
    metrics = list(scores)
    width = max(24, *(len(name) + 2 for name in results))
    print(f"\n{args.dataset}: quality of the reasons on {len(references):,} test rows"
          + (f" ({(~scored).sum():,} without review text left out)" if (~scored).any() else ""))
    print(f"{'variant':<{width}}{'rows':>6}{'empty':>7}{'tokens':>8}"
          + "".join(f"{m.removeprefix('GPTScore '):>15}" for m in metrics) + "   evaluator")
    for name, result in results.items():
        cells = "".join(f"{'-' if result[m] is None else format(result[m], '.4f'):>15}" for m in metrics)
        print(f"{name:<{width}}{result['rows']:>6}{result['empty_or_missing']:>7}{result['reason_tokens']:>8.1f}{cells}"
              f"   {evaluator_name}")
    print(f"GPTScore: mean log-likelihood per token, by {evaluator_name} (this project's templates; the paper publishes "
          f"neither its template nor its evaluator, so these are not the paper's figures), of the real review given "
          f"the reason (review|reason), of the reason given the review (reason|review), and their mean; {CONTROL}: the "
          f"review given an empty reason; ROUGE-L: F1 against the real review"
          + (f"; judge: {teacher_name}, 1-10" if quality.judge else "")
          + "; tokens: mean reason length in the evaluator's tokens; empty: empty or missing reasons")
    if any(unreadable.values()):
        print(f"judge answers without a readable score (left out): {unreadable}")
    for c in comparisons:
        (low, high), difference = c["ci95"], c["difference"]
        if difference is None or low is None:
            print(f"{c['metric']}: {c['method']} minus {c['against']}: too few rows for an interval ({c['rows']})")
            continue
        print(f"{c['metric']}: {c['method']} minus {c['against']}: {difference:+.4f}, paired bootstrap 95% interval "
              f"[{low:+.4f}, {high:+.4f}]" + ("" if low > 0 or high < 0 else ": within noise"))

# For the original BLEURT, in a separate environment (README): one text per line, the same rows in the same order.
bleurt = args.file("bleurt")
if main:
    atomic_write(bleurt / "references.txt", lambda f: f.writelines(one_line(r) + "\n" for r in references), mode="w")
    for name, reasons in variants.items():
        atomic_write(bleurt / f"{slug(name)}.candidates.txt",
                     lambda f: f.writelines(one_line(r) + "\n" for r in reasons), mode="w")
    for stale in set(bleurt.glob("*.candidates.txt")) - {bleurt / f"{slug(name)}.candidates.txt" for name in variants}:
        stale.unlink()  # a variant of an earlier run, not scored now

report = {"dataset": args.dataset, "evaluator": evaluator_name, **({"judge": teacher_name} if quality.judge else {}),
          "test": {"rows": len(references), "rows_without_review_text": int((~scored).sum()), "results": results,
                   "comparisons": comparisons}}
settings = {"dataset": args.dataset, "limit": args.limit, "evaluator_model_path": evaluator_path,
            "evaluator_id": evaluator.model_id, "gptscore_prompt": gptscore_prompt("<reason>"),
            "gptscore_reverse_prompt": gptscore_reverse_prompt("<review>"),
            "rouge": "rougeL F1, Porter stemming", "with_teacher": quality.with_teacher, "judge": quality.judge,
            "teacher": teacher.model if teacher is not None else None, "product_class": prompt.product_class,
            "max_his": prompt.max_his}
report["provenance"] = provenance(settings, inputs)
write_json(report, args.file("reason_quality.json"))
if main:
    print(f"wrote {args.file('reason_quality.json')} and the BLEURT inputs in {bleurt}/")
