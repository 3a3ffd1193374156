"""Stage 4 (beyond the paper), step 1: refine the SFT Reasoner with GRPO, rewarded by the frozen Predictor.

For each training target the Reasoner samples a group of reasons (its own prompt, 2_Reasoner's); each reason is
rewarded by how close the frozen Predictor's logits-weighted rating, given the target's histories and that reason,
comes to the true rating (the GRPO fork of the official code, innocentbai/Reason4Rec-GRPO), minus penalties:

    reward = -|Predictor(histories, reason) - r|
             - forbidden_penalty   if the reason gives the rating away (reason_filter.FORBIDDEN_WORDS)
             - cutoff_penalty      if it is empty, or cut off at --max_completion_length

The rewards of a batch are scored in one batched Predictor pass; the histories are the leakage-safe ones of every
other step (the fork rebuilds them without the time filter).  TRL's GRPOTrainer does the rest (Unsloth's patched one
where Unsloth is installed); it goes on training the SFT Reasoner's LoRA adapter, so its KL term (beta) is measured
against the base model with the adapter disabled, as in the fork.  The targets are those the frozen Predictor never
trained on: review_8000.pkl, the reward model's (a Predictor that has memorised its training ratings would reward
nothing); --targets kept takes the fork's, the Reasoner's kept targets.  Each checkpoint is then scored on the
validation rows (the Predictor's MAE given the checkpoint's greedy reasons) and the best is kept (training.finish).

    bash 4_GRPO/1_reasoner_grpo_train.sh [--max_steps 5 ...]     (hyper-parameters: 4_GRPO/reasoner_grpo.yaml)

reads   Data/<dataset>/review_8000.pkl (or distilling_high_quality_reasons.pkl), train_summarizer_generation_results.pkl,
        raw_data/valid.pkl, checkpoints/<dataset>/Reasoner/final_checkpoint, checkpoints/<dataset>/Predictor/...
writes  checkpoints/<dataset>/Reasoner_GRPO/  (checkpoints, final_checkpoint with selection.json, provenance.json)
"""
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: llm, training, prompts, ...

import llm  # first: it imports Unsloth, where installed, before transformers
import numpy as np
import parallel
import training
from cache import ResultCache
from datasets import Dataset
from histories import load_histories
from prompts import TestPromptArguments, rating_prompt, reason_prompt
from reason_filter import grpo_reward
from transformers import set_seed
from trl import GRPOConfig, GRPOTrainer
from settings import ValidArguments, read_split, read_table
from utils import fail, provenance, require_model, sha256

TARGETS = {"reward": "review_8000.pkl", "kept": "distilling_high_quality_reasons.pkl"}


@dataclass
class ReasonerGRPOArguments:
    targets: str = field(default="reward", metadata={
        "help": "reward: review_8000.pkl, targets the Predictor never trained on; kept: the fork's choice, "
                "distilling_high_quality_reasons.pkl"})
    checkpoint_dir: str = field(default_factory=lambda: os.environ.get("CHECKPOINT_DIR", "checkpoints"),
                                metadata={"help": "where the adapters are (default: $CHECKPOINT_DIR, else checkpoints)"})
    reasoner_path: str | None = field(default=None, metadata={
        "help": "the SFT Reasoner's adapter to start from (default: <checkpoint_dir>/<dataset>/Reasoner/final_checkpoint)"})
    predictor_path: str | None = field(default=None, metadata={
        "help": "the frozen Predictor's adapter (default: <checkpoint_dir>/<dataset>/Predictor/final_checkpoint)"})
    model_path: str | None = field(default=None, metadata={
        "help": "the base model, where the adapters' own record of it is out of date (see llm.base_of)"})
    load_in_4bit: str = field(default="auto", metadata={"help": "true/false; auto: on a CUDA GPU"})
    forbidden_penalty: float = field(default=1.0, metadata={"help": "subtracted from the reward of a reason that "
                                                                    "gives the rating away"})
    cutoff_penalty: float = field(default=1.0, metadata={"help": "subtracted from the reward of an empty reason or "
                                                                 "one cut off at --max_completion_length"})
    select_on_valid: bool = field(default=True, metadata={
        "help": "keep the checkpoint whose reasons give the Predictor the lowest validation MAE; false: the last"})
    exact_global_batch: bool = field(default=True, metadata={
        "help": "with NUM_GPUS > 1, refuse a process count that cannot keep the configured global batch exactly"})


# What makes two runs the same job (see training.resumable_checkpoint).
JOB_SETTINGS = ("targets", "train_data_sha256", "reasoner", "predictor", "forbidden_penalty", "cutoff_penalty",
                "load_in_4bit", "learning_rate", "lr_scheduler_type", "warmup_steps", "optim", "beta", "epsilon",
                "loss_type", "num_generations", "max_completion_length", "temperature", "top_p",
                "mask_truncated_completions", "scale_rewards", "global_batch", "seed", "num_train_epochs", "max_steps")

parallel.relaunch()
data, prompt, valid, args, config = training.parse((TestPromptArguments, ValidArguments, ReasonerGRPOArguments,
                                                    GRPOConfig), save_strategy="epoch")
if args.targets not in TARGETS:
    fail(f"--targets must be one of {', '.join(TARGETS)}, not {args.targets!r}")
experts = Path(args.checkpoint_dir) / data.path.name
reasoner_path = require_model(args.reasoner_path or experts / "Reasoner" / "final_checkpoint")
predictor_path = require_model(args.predictor_path or experts / "Predictor" / "final_checkpoint")
config.output_dir = config.output_dir or str(experts / "Reasoner_GRPO")
config.remove_unused_columns = False  # the reward reads the "row" column
training.keep_global_batch(config, args.exact_global_batch)

# The training targets, their prompts and histories; the validation rows, with histories as the test set's.
targets = read_table(data, TARGETS[args.targets])
histories = load_histories(data, prompt)
contexts = histories.for_rows(targets)
rows = read_split(data, "valid", valid.eval_limit)
valid_contexts = histories.for_rows(rows, prompt.test_history_before_target)
dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": reason_prompt(prompt.product_class, t, h)}],
                              "row": i} for i, (t, h) in enumerate(zip(targets.title, contexts))])
settings = {**asdict(args), **config.to_dict(), "load_in_4bit": llm.use_4bit(args.load_in_4bit),
            "train_data_sha256": sha256(data.file(TARGETS[args.targets])), "reasoner": llm.fingerprint(reasoner_path),
            "predictor": llm.fingerprint(predictor_path), "global_batch": training.global_batch(config)}
job = {name: settings[name] for name in JOB_SETTINGS}
output = Path(config.output_dir)
resume = training.resumable_checkpoint(output, job)

# The frozen Predictor, and the reward.
predictor = llm.load_model(predictor_path, load_in_4bit=args.load_in_4bit, model_path=args.model_path,
                           batch_size=config.per_device_eval_batch_size)
truth = targets["ratings"].to_numpy(dtype=float)


def reward(prompts, completions, completion_ids, row, log_metric=None, **_):
    """reason_filter.grpo_reward of a batch of sampled reasons, all scored by the Predictor in one batched pass."""
    reasons = [c[-1]["content"] for c in completions]
    ratings = predictor.score([rating_prompt(prompt.product_class, targets.title[i], contexts[i], reason)
                               for i, reason in zip(row, reasons)], batch_size=len(reasons), desc=None, share=False)
    cut_off = [len(ids) >= config.max_completion_length and ids[-1] not in stops for ids in completion_ids]
    rewards, forbidden, cut = grpo_reward(ratings, truth[list(row)], reasons, cut_off, args.forbidden_penalty,
                                          args.cutoff_penalty)
    if log_metric is not None:
        log_metric("reward/forbidden_rate", float(forbidden.mean()))
        log_metric("reward/cut_off_rate", float(cut.mean()))
    return rewards.tolist()


# The policy: the SFT Reasoner's adapter on its base model, trained further.
set_seed(config.seed)
model, tokenizer = llm.load_base(llm.base_of(reasoner_path, args.model_path), load_in_4bit=args.load_in_4bit)
from peft import PeftModel  # noqa: E402

model = PeftModel.from_pretrained(model, reasoner_path, is_trainable=True)
stops = set(llm.stop_token_ids(model, tokenizer))
trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset, processing_class=tokenizer,
                      callbacks=[training.ShowBatch()])
trainer.train(resume_from_checkpoint=resume)

clipped = [e["completions/clipped_ratio"] for e in trainer.state.log_history if "completions/clipped_ratio" in e]
learned_nothing = config.mask_truncated_completions and bool(clipped) and min(clipped) >= 1.0
if learned_nothing:
    print(f"warning: every completion of every step was cut off at --max_completion_length "
          f"{config.max_completion_length}, and truncated completions are masked: GRPO learned nothing (loss 0, "
          f"gradient 0). Raise --max_completion_length, or pass --mask_truncated_completions false.", flush=True)

# Choose on the validation rows: the frozen Predictor's MAE given each checkpoint's greedy reasons.
cache = ResultCache(data.file("generation_cache.sqlite"))
valid_questions = [reason_prompt(prompt.product_class, t, h) for t, h in zip(rows.title, valid_contexts)]
valid_truth = rows["ratings"].to_numpy(dtype=float)
predictor.cache = cache


def valid_mae(folder: Path) -> float:
    reasoner = llm.load_model(folder, load_in_4bit=args.load_in_4bit, model_path=args.model_path, cache=cache,
                              batch_size=config.per_device_eval_batch_size, max_new_tokens=config.max_completion_length)
    reasons = reasoner.generate(valid_questions, desc=f"validation reasons, {folder.name}")
    ratings = predictor.score([rating_prompt(prompt.product_class, t, h, r)
                               for t, h, r in zip(rows.title, valid_contexts, reasons)], desc="validation ratings")
    return float(np.abs(ratings - valid_truth).mean())


record = provenance({"job": job, "grpo": asdict(args), "backend": llm.backend(), "learned_nothing": learned_nothing,
                     "loaded_in_4bit": llm.loaded_in_4bit(model)},
                    [data.file(TARGETS[args.targets]), data.file("raw_data/valid.pkl")])
training.finish(trainer, tokenizer, output, record, metric=valid_mae if args.select_on_valid else None,
                metric_name=f"MAE of the frozen Predictor given the checkpoint's greedy reasons on the validation rows "
                            f"({len(rows):,})", select_on_valid=args.select_on_valid)
