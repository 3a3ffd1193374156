"""The bill before paying: what `run_all.sh` will ask of the models and of the teacher for a prepared dataset, step by
step, without loading a model or calling anyone.

    python scripts/plan.py --dataset Music_data [--data_dir Data] [--prompts_per_step 32]
                           [--generate_tokens_per_s N --prompt_tokens_per_s N --train_tokens_per_s N]

For every step: the prompts to generate for or to score, their tokens, and the tokens to generate (an estimate, and
the most the length limits allow); for every trainer: the training examples, optimizer steps and tokens; for the
teacher: the requests and their cost at list prices, one by one and through the Batch API (teacher.Teacher's prices,
TEACHER_MODEL and TEACHER_PRICES as for the real run).  The settings are the run's: the dataset's recorded prompt
settings, the experts' YAML files, the steps' defaults; the flags below change the ones that size the work.

Prompts are built with the real templates from the dataset's real titles and histories; text not written yet (the
summaries, the reasons) is counted at --answer_tokens tokens, and every text at 4 characters a token, as the
teacher's --dry_run counts.  Where a step's output is already there (the summaries, the sampled targets), it is used.
The targets a step keeps depend on answers not yet given (the reason filter keeps 0 to all of them): the plan counts
them all, an upper bound.  GPU hours need throughputs of the base model on the GPU at hand: the project has measured
none for the paper's base model, so they come from the flags, or are left out.
"""
from __future__ import annotations

import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from histories import HISTORY_TABLE, SUMMARY, HistoryIndex, load_histories  # noqa: E402
from llm import ModelArguments  # noqa: E402
from prompts import (TestPromptArguments, direct_prediction_prompt, gptscore_prompt, judge_prompt,  # noqa: E402
                     rating_answer, rating_prompt, reason_prompt, summary_prompt)
from reason_filter import FilterArguments  # noqa: E402
from teacher import CHARS_PER_TOKEN, GUESSED_ANSWER_TOKENS, Teacher  # noqa: E402
from settings import ValidArguments, parse_args, read_split, read_table  # noqa: E402
from utils import REPO  # noqa: E402

JUDGE_ANSWER_TOKENS = 40  # "Score: N" and one sentence, as prompts.JUDGE_TEMPLATE asks


@dataclass
class PlanArguments:
    summary_sample: int | None = field(default=None, metadata={
        "help": "1_Summarizer/1's --sample: the training reviews the teacher summarizes (default: all)"})
    num_samples: int = field(default=20000, metadata={"help": "2_Reasoner/1's: the targets sampled"})
    num_reward_samples: int = field(default=8000, metadata={"help": "2_Reasoner/1's: those of the reward model"})
    prompts_per_step: int | None = field(default=None, metadata={
        "help": "GRPO's targets per optimizer step (default: 4_GRPO/reasoner_grpo.yaml's)"})
    answer_tokens: float | None = field(default=None, metadata={
        "help": "the length of a summary or a reason not yet written (default: the mean of the teacher's answers in "
                "the dataset's cache, else 200)"})
    judge: bool = field(default=True, metadata={"help": "3_Predictor/5 asks the teacher to judge the reasons"})
    generate_tokens_per_s: float | None = field(default=None, metadata={
        "help": "generated tokens per second on your GPU (batched decoding): for GPU hours"})
    prompt_tokens_per_s: float | None = field(default=None, metadata={
        "help": "prompt tokens per second (the forward pass that scores, or starts a generation)"})
    train_tokens_per_s: float | None = field(default=None, metadata={
        "help": "training tokens per second (forward and backward)"})


def yaml_settings(path: str) -> dict:
    return yaml.safe_load((REPO / path).read_text())


def tokens(texts) -> float:
    return sum(len(t) for t in texts) / CHARS_PER_TOKEN


class Plan:
    """The table of work, a line per step, and its totals."""

    def __init__(self, rates: PlanArguments):
        self.rates, self.lines, self.gpu_s, self.teacher = rates, [], 0.0, []

    def infer(self, step: str, prompts: float, prompt_tokens: float, generated: float = 0, most: float = 0):
        """A step that generates for (`generated` tokens, at most `most`) or scores `prompts` prompts."""
        work = f"{prompts:>9,.0f} prompts {prompt_tokens / 1e6:>8.2f}M tokens"
        if most:
            work += f", generating ~{generated / 1e6:.2f}M tokens (at most {most / 1e6:.2f}M)"
        self._line(step, work, prompt_tokens, generated, 0)

    def train(self, step: str, examples: int, epochs: float, batch: int, example_tokens: float):
        steps = math.ceil(examples / batch) * epochs
        train_tokens = example_tokens * epochs
        self._line(step, f"{examples:>9,} examples x {epochs:g} epochs, batch {batch}: {steps:,.0f} optimizer steps, "
                         f"{train_tokens / 1e6:.2f}M training tokens", 0, 0, train_tokens)

    def ask(self, step: str, requests: float, prompt_tokens: float, completion_tokens: float, teacher: Teacher):
        one = teacher.usd(prompt_tokens, completion_tokens)
        batch = teacher.usd(prompt_tokens, completion_tokens, batch=True)
        self.teacher.append((requests, prompt_tokens, completion_tokens))
        self.lines.append((step, f"{requests:>9,.0f} teacher requests, {prompt_tokens / 1e6:.2f}M prompt + "
                                 f"{completion_tokens / 1e6:.2f}M completion tokens: {teacher.cost(one)} one by one, "
                                 f"{teacher.cost(batch)} through the Batch API", ""))

    def _line(self, step, work, prompt_tokens, generated, train_tokens):
        r = self.rates
        parts = [(prompt_tokens, r.prompt_tokens_per_s), (generated, r.generate_tokens_per_s),
                 (train_tokens, r.train_tokens_per_s)]
        known = all(rate for amount, rate in parts if amount)
        seconds = sum(amount / rate for amount, rate in parts if amount) if known else None
        self.gpu_s = None if seconds is None or self.gpu_s is None else self.gpu_s + seconds
        self.lines.append((step, work, f"{seconds / 3600:8.2f} GPU h" if seconds is not None else ""))


def main(argv=None):
    data, prompt, valid, model, distill, plan_args = parse_args(TestPromptArguments, ValidArguments, ModelArguments,
                                                                FilterArguments, PlanArguments, args=argv)
    grpo = yaml_settings("4_GRPO/reasoner_grpo.yaml")
    experts = {name: yaml_settings(path) for name, path in [
        ("Summarizer", "1_Summarizer/summarizer.yaml"), ("reward model", "2_Reasoner/reward_model.yaml"),
        ("Reasoner", "2_Reasoner/reasoner.yaml"), ("Predictor", "3_Predictor/predictor.yaml")]}
    cache = data.file("teacher_cache.sqlite")
    with tempfile.TemporaryDirectory() as scratch:  # a dataset without a teacher cache gets none from the plan
        teacher = Teacher(cache if cache.exists() else Path(scratch) / "cache.sqlite", dry_run=True)
        mean, n = teacher.cache.average("completion_tokens")
    answer = plan_args.answer_tokens or (mean if n else GUESSED_ANSWER_TOKENS)
    answer_chars = "x" * int(answer * CHARS_PER_TOKEN)

    train = read_table(data, "raw_data/train.pkl", limit=False)
    test = read_table(data, "raw_data/test.pkl", limit=False)
    rows = read_split(data, "valid", valid.eval_limit)
    if data.file(HISTORY_TABLE).exists():
        histories = load_histories(data, prompt)
    else:  # the summaries not written yet: each counted at the length of an answer
        histories = HistoryIndex(train.assign(**{SUMMARY: answer_chars}), max_his=prompt.max_his)
    c = prompt.product_class
    p = Plan(plan_args)
    print(f"Plan for {data.path} ({len(train):,} training, {len(rows):,} validation, {len(test):,} test rows), "
          f"teacher {teacher.model}; a summary or reason not yet written counted at {answer:.0f} tokens "
          f"({f'the mean of the {n:,} teacher answers in {cache}' if n and not plan_args.answer_tokens else 'given' if plan_args.answer_tokens else 'a guess'}).")

    # Stage 1: the Summarizer.
    summarized = train.sample(min(plan_args.summary_sample, len(train)), random_state=data.sample_seed) \
        if plan_args.summary_sample else train
    summary_prompts = [summary_prompt(c, r.title, r.ratings, r.reviews) for r in summarized.itertuples()]
    p.ask("Summarizer 1: teacher summaries", len(summary_prompts), tokens(summary_prompts),
          len(summary_prompts) * answer, teacher)
    s = experts["Summarizer"]
    p.train("Summarizer 3: train", len(summary_prompts), s["num_train_epochs"],
            s["per_device_train_batch_size"] * s["gradient_accumulation_steps"],
            tokens(summary_prompts) + len(summary_prompts) * answer)
    all_summaries = [summary_prompt(c, r.title, r.ratings, r.reviews) for r in train.itertuples()]
    p.infer("Summarizer 4: summarize every training review", len(train), tokens(all_summaries), len(train) * answer,
            len(train) * model.max_new_tokens)

    # Stage 2: targets, reward model, reasons.
    contexts = histories.for_rows(train)
    eligible = [i for i, h in enumerate(contexts) if h.user_count > 0 and h.item_count > 0]
    total, n_reward = plan_args.num_samples, plan_args.num_reward_samples
    if len(eligible) < total:
        n_reward, total = round(len(eligible) * n_reward / total), len(eligible)
    n_reason = total - n_reward
    titles = train.title.to_numpy()
    reward_train = [rating_prompt(c, titles[i], contexts[i], train.reviews[i]) + rating_answer(5)
                    for i in eligible[:n_reward]]
    valid_contexts = histories.for_rows(rows, prompt.test_history_before_target)
    valid_reasoned = [rating_prompt(c, t, h, answer_chars) for t, h in zip(rows.title, valid_contexts)]
    r = experts["reward model"]
    p.train("Reasoner 3: train the reward model", n_reward, r["num_train_epochs"],
            r["per_device_train_batch_size"] * r["gradient_accumulation_steps"], tokens(reward_train))
    p.infer("  its checkpoints on the validation rows", len(rows) * r["num_train_epochs"],
            tokens(valid_reasoned) * r["num_train_epochs"])
    reason_prompts = [reason_prompt(c, titles[i], contexts[i]) for i in eligible[n_reward:total]]
    hinted = [reason_prompt(c, titles[i], contexts[i], hint=5.0) for i in eligible[n_reward:total]]
    p.ask("Reasoner 4: teacher reasons, first try", n_reason, tokens(reason_prompts), n_reason * answer, teacher)
    p.ask(f"Reasoner 4: hinted retries (at most {distill.max_sample_num})", n_reason * distill.max_sample_num,
          tokens(hinted) * distill.max_sample_num, n_reason * answer * distill.max_sample_num, teacher)
    scored = [rating_prompt(c, titles[i], contexts[i], answer_chars) for i in eligible[n_reward:total]]
    unreasoned = [rating_prompt(c, titles[i], contexts[i]) for i in eligible[n_reward:total]]
    p.infer(f"Reasoner 4: reward model (at most {distill.max_sample_num + 1} rounds)",
            n_reason * (distill.max_sample_num + 2), tokens(unreasoned) + tokens(scored) * (distill.max_sample_num + 1))
    s = experts["Reasoner"]
    p.train("Reasoner 6: train (every target kept, at most)", n_reason, s["num_train_epochs"],
            s["per_device_train_batch_size"] * s["gradient_accumulation_steps"], tokens(reason_prompts) + n_reason * answer)
    test_contexts = histories.for_rows(test, prompt.test_history_before_target)
    test_reasons = [reason_prompt(c, t, h) for t, h in zip(test.title, test_contexts)]
    valid_reasons = [reason_prompt(c, t, h) for t, h in zip(rows.title, valid_contexts)]
    held = len(test) + len(rows)
    p.infer("Reasoner 7: reasons for the test and validation rows", held, tokens(test_reasons + valid_reasons),
            held * answer, held * model.max_new_tokens)

    # Stage 3: the Predictor (and the direct-prediction ablation).
    p.infer("Predictor 1: the Reasoner's reasons for its targets", n_reason, tokens(reason_prompts), n_reason * answer,
            n_reason * model.max_new_tokens)
    s = experts["Predictor"]
    batch = s["per_device_train_batch_size"] * s["gradient_accumulation_steps"]
    p.train("Predictor 2: train", n_reason, s["num_train_epochs"], batch, tokens(scored))
    direct = [direct_prediction_prompt(c, titles[i], contexts[i]) for i in eligible[n_reward:total]]
    p.train("Predictor 2: train, no reason", n_reason, s["num_train_epochs"], batch, tokens(direct))
    p.infer("  their checkpoints on the validation rows", len(rows) * s["num_train_epochs"] * 2,
            (tokens(valid_reasoned) + tokens(direct_prediction_prompt(c, t, h) for t, h in zip(rows.title, valid_contexts)))
            * s["num_train_epochs"])
    test_reasoned = [rating_prompt(c, t, h, answer_chars) for t, h in zip(test.title, test_contexts)]
    p.infer("Predictor 3: rate the test and validation rows, with and without reasons", 2 * held,
            2 * tokens(test_reasoned + valid_reasoned))

    # Stage 4: GRPO.
    per_step = plan_args.prompts_per_step or grpo["prompts_per_step"]
    group, length = grpo["num_generations"], grpo["max_completion_length"]
    steps = math.ceil(n_reward / per_step) * grpo["num_train_epochs"]
    completions = steps * per_step * group
    reward_rows = [contexts[i] for i in eligible[:n_reward]]  # GRPO's targets: the reward model's
    reasoned = [rating_prompt(c, h_t, h, answer_chars) for h_t, h in zip(titles[eligible[:n_reward]], reward_rows)]
    grpo_prompts = [reason_prompt(c, t, h) for t, h in zip(titles[eligible[:n_reward]], reward_rows)]
    mean_prompt = tokens(grpo_prompts) / max(n_reward, 1)
    done = min(answer, length)
    p.infer(f"GRPO 1: sample {group} reasons per target ({steps:,} steps x {per_step} targets)", completions,
            completions * mean_prompt, completions * done, completions * length)
    p.infer("GRPO 1: the Predictor's reward, and the KL reference's forward pass", 2 * completions,
            completions * (tokens(reasoned) / max(n_reward, 1) + mean_prompt + done))
    p.train(f"GRPO 1: train ({group} completions per target)", n_reward * group, grpo["num_train_epochs"],
            per_step * group, n_reward * group * (mean_prompt + done))
    candidates = steps // grpo["save_steps"] + 1 + (steps % grpo["save_steps"] > 0)  # the SFT Reasoner, checkpoints
    p.infer(f"GRPO 1: choose among {candidates} candidates on the validation rows", 2 * len(rows) * candidates,
            (tokens(valid_reasons) + tokens(valid_reasoned)) * candidates, len(rows) * answer * candidates,
            len(rows) * model.max_new_tokens * candidates)
    p.infer("GRPO 2-3: reasons and ratings for the test and validation rows", 2 * held,
            tokens(test_reasons + valid_reasons + test_reasoned + valid_reasoned), held * answer,
            held * model.max_new_tokens)

    # The evaluation of the reasons.
    reviews = test.reviews.astype(str)
    p.infer("Evaluate: GPTScore of both Reasoners' test reasons", 2 * len(test),
            2 * tokens(gptscore_prompt(answer_chars) + r for r in reviews))
    if plan_args.judge:
        judged = [judge_prompt(r, answer_chars) for r in reviews]
        p.ask("Evaluate: the teacher judges both Reasoners' test reasons", 2 * len(test), 2 * tokens(judged),
              2 * len(test) * JUDGE_ANSWER_TOKENS, teacher)

    width = max(len(step) for step, _, _ in p.lines)
    for step, work, hours in p.lines:
        print(f"{step:<{width}}  {work}{'  ' + hours if hours else ''}")
    requests, prompt_tokens, completion_tokens = (sum(x) for x in zip(*p.teacher))
    print(f"Teacher, at most: {requests:,.0f} requests, {teacher.cost(teacher.usd(prompt_tokens, completion_tokens))} "
          f"one by one, {teacher.cost(teacher.usd(prompt_tokens, completion_tokens, batch=True))} through the Batch API "
          f"(list prices of {teacher.model}; the hinted retries are asked only for the targets not yet kept).")
    if p.gpu_s is not None:
        print(f"GPU time: {p.gpu_s / 3600:,.1f} hours at the throughputs given.")
    else:
        print("GPU time: the project has no measured throughput of the paper's base model on a GPU; pass "
              "--generate_tokens_per_s, --prompt_tokens_per_s and --train_tokens_per_s (measured on yours) to get it.")


if __name__ == "__main__":
    main()
