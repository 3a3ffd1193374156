"""How reasons are judged: the paper's reason filter (2_Reasoner/4), and the GRPO reward (4_GRPO/1).

The filter keeps a teacher's reason only if it helps the reward model.

For every target the reward model predicts the rating once without a reason.  The teacher writes one reason; it is
kept if it brings the reward model's prediction closer to the truth:
    |r - pred_with_reason| - |r - pred_without_reason| < TAU
Otherwise the teacher tries again, up to MAX_SAMPLE_NUM times, with the true rating as a hint; a hinted reason that
gives the rating away (any of FORBIDDEN_WORDS) is rejected unseen, and the first that passes the test is kept.
Targets with no kept reason are dropped.  All targets go through each round together, so that the teacher's
requests of a round run concurrently and its candidates are scored in batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from prompts import predictor_prompts

TAU = 0.1
MAX_SAMPLE_NUM = 10
FORBIDDEN_WORDS = ["1.0", "2.0", "3.0", "4.0", "5.0", "rating ", "star ", "stars "]


def gives_rating_away(text: str) -> bool:
    """The official test of a hinted reason: does it mention a rating or stars?"""
    return any(word in text for word in FORBIDDEN_WORDS)


@dataclass
class FilterArguments:
    tau: float = field(default=TAU, metadata={"help": "keep a reason if it cuts the reward model's error by more "
                                                      "than -tau"})
    max_sample_num: int = field(default=MAX_SAMPLE_NUM, metadata={"help": "hinted retries per target"})
    first_temperature: float = field(default=1.0, metadata={
        "help": "the teacher's temperature for the first, unhinted reason: 1.0 (official HEAD) or 0.2 (a4fa718)"})
    temperature: float = field(default=1.0, metadata={"help": "the teacher's temperature for the hinted retries"})


def keep_helpful_reasons(truth, without, ask, score, tau=TAU, max_sample_num=MAX_SAMPLE_NUM):
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
            clean = [k for k, text in enumerate(reasons) if not gives_rating_away(text)]
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


def grpo_reward(predicted, truth, reasons, cut_off, forbidden_penalty: float = 1.0, cutoff_penalty: float = 1.0):
    """The GRPO reward of each sampled reason (4_GRPO/1): minus the frozen Predictor's absolute error given the reason
    (the GRPO fork's reward), minus `forbidden_penalty` where the reason gives the rating away (as the filter's
    hinted retries are judged) and `cutoff_penalty` where it is empty or was cut off (`cut_off[i]`)."""
    forbidden = np.array([gives_rating_away(r) for r in reasons], dtype=bool)
    cut = np.array([bool(c) or not r.strip() for r, c in zip(reasons, cut_off)], dtype=bool)
    error = np.abs(np.asarray(predicted, dtype=float) - np.asarray(truth, dtype=float))
    return -error - forbidden_penalty * forbidden - cutoff_penalty * cut, forbidden, cut


def predictor_reward(predictor, product_class: str, titles, histories, reasons, truth, cut_off,
                     forbidden_penalty: float = 1.0, cutoff_penalty: float = 1.0):
    """4_GRPO/1's reward of a batch of sampled reasons: `grpo_reward`, given the frozen Predictor's logits-weighted
    rating of each target (`titles[i]`, `histories[i]`) with its reason, all scored in one batched pass (each process
    of a data-parallel run scores its own)."""
    ratings = predictor.score(predictor_prompts(product_class, titles, histories, reasons), batch_size=len(reasons),
                              desc=None, share=False)
    return grpo_reward(ratings, truth, reasons, cut_off, forbidden_penalty, cutoff_penalty)
