"""Stage 4 (beyond the paper), step 1: refine the SFT Reasoner with GRPO, rewarded by the frozen Predictor.

For each training target the Reasoner samples a group of reasons (its own prompt, 2_Reasoner's); each reason is
rewarded by how close the frozen Predictor's logits-weighted rating, given the target's histories and that reason,
comes to the true rating (the GRPO fork of the official code, innocentbai/Reason4Rec-GRPO), minus penalties
(reason_filter.predictor_reward):

    reward = -|Predictor(histories, reason) - r|
             - forbidden_penalty   if the reason gives the rating away (reason_filter.FORBIDDEN_WORDS)
             - cutoff_penalty      if it is empty, or cut off at --max_completion_length

The rewards of a batch are scored in one batched Predictor pass; the histories are the leakage-safe ones of every
other step (the fork rebuilds them without the time filter).  TRL's GRPOTrainer does the rest (Unsloth's patched one
where Unsloth is installed); it goes on training the SFT Reasoner's LoRA adapter.  Each optimizer step generates
for --prompts_per_step targets (shared by the processes under NUM_GPUS, training.grpo_batch).  The KL term (beta) is
measured against --kl_reference: sft, a frozen copy of the SFT Reasoner's adapter (what TRL's trainer does for a
PEFT model that already has an adapter), or base, the base model with the adapter disabled (the fork's, and what
Unsloth's patched trainer does); provenance.json records which.  The targets are those the frozen Predictor never
trained on: review_8000.pkl, the reward model's (a Predictor that has memorised its training ratings would reward
nothing); --targets kept takes the fork's, the Reasoner's kept targets.

Before training, the SFT Reasoner samples a reason for a few targets: if --max_completion_length cuts off so many
that masking them would leave little to learn from, the run is refused with the numbers.  A checkpoint is saved every
--save_steps steps; then every checkpoint, and the SFT Reasoner itself (step 0), is scored on the validation rows (the
Predictor's MAE given its greedy reasons, as 4_GRPO/2 writes them) and the best is kept (training.finish): GRPO is
kept only where it beats the SFT Reasoner.

    bash 4_GRPO/1_reasoner_grpo_train.sh [--max_steps 5 ...]     (hyper-parameters: 4_GRPO/reasoner_grpo.yaml)

reads   Data/<dataset>/review_8000.pkl (or distilling_high_quality_reasons.pkl), train_summarizer_generation_results.pkl,
        raw_data/valid.pkl, checkpoints/<dataset>/Reasoner/final_checkpoint, checkpoints/<dataset>/Predictor/...
writes  checkpoints/<dataset>/Reasoner_GRPO/  (checkpoints, final_checkpoint with selection.json, provenance.json)
"""
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
from prompts import TestPromptArguments, predictor_prompts, reason_prompt
from reason_filter import predictor_reward
from transformers import set_seed
from settings import ModelPlaces, ValidArguments, read_split, read_table
from trl import GRPOTrainer
from utils import fail, provenance, require_model, sha256

TARGETS = {"reward": "review_8000.pkl", "kept": "distilling_high_quality_reasons.pkl"}
KL_REFERENCES = {"sft": "a frozen copy of the SFT Reasoner's adapter (TRL's \"ref\" adapter)",
                 "base": "the base model, the adapter disabled"}


@dataclass
class ReasonerGRPOArguments(ModelPlaces):
    targets: str = field(default="reward", metadata={
        "help": "reward: review_8000.pkl, targets the Predictor never trained on; kept: the fork's choice, "
                "distilling_high_quality_reasons.pkl"})
    prompts_per_step: int = field(default=1, metadata={
        "help": "targets per optimizer step, each sampled --num_generations times (the fork: 1 on one GPU, 32 in its "
                "recorded 4-GPU run); optimizer steps = targets x epochs / this.  Shared by the processes under "
                "NUM_GPUS; the accumulation follows from it and --per_device_train_batch_size"})
    kl_reference: str | None = field(default=None, metadata={
        "help": "what the KL term (beta) measures against: sft, a frozen copy of the SFT Reasoner's adapter (TRL's "
                "choice), or base, the base model with the adapter disabled (the fork's, and Unsloth's patched "
                "trainer's); default: what the trainer does, sft with transformers, base with Unsloth"})
    reasoner_path: str | None = field(default=None, metadata={
        "help": "the SFT Reasoner's adapter to start from (default: <checkpoint_dir>/<dataset>/Reasoner/final_checkpoint)"})
    predictor_path: str | None = field(default=None, metadata={
        "help": "the frozen Predictor's adapter (default: <checkpoint_dir>/<dataset>/Predictor/final_checkpoint)"})
    forbidden_penalty: float = field(default=1.0, metadata={"help": "subtracted from the reward of a reason that "
                                                                    "gives the rating away"})
    cutoff_penalty: float = field(default=1.0, metadata={"help": "subtracted from the reward of an empty reason or "
                                                                 "one cut off at --max_completion_length"})
    cutoff_probe: int = field(default=16, metadata={
        "help": "before training, the SFT Reasoner samples a reason for this many targets, to measure how many "
                "--max_completion_length cuts off (0: no probe)"})
    max_cutoff_rate: float = field(default=0.5, metadata={
        "help": "with --mask_truncated_completions, refuse to train when more of the probe's reasons than this are "
                "cut off (masked, they teach nothing)"})
    max_new_tokens: int = field(default=llm.ModelArguments.max_new_tokens, metadata={
        "help": "the longest greedy reason in the choice of checkpoint on the validation rows: 4_GRPO/2's "
                "--max_new_tokens, so that selection.json's MAE is the one evaluated"})
    select_on_valid: bool = field(default=True, metadata={
        "help": "keep the candidate (the SFT Reasoner, each checkpoint, the final state) whose reasons give the "
                "Predictor the lowest validation MAE; false: the final state"})


# What makes two runs the same job (see training.resumable_checkpoint), with training.job_settings' shared list: every
# setting that changes the trained weights, the targets trained on (which file, which subset of it) included.
JOB_SETTINGS = ("targets", "train_data_sha256", "limit", "sample", "sample_seed", "target_rows", "reasoner",
                "predictor", "base_model", "load_in_4bit", "kl_reference", "forbidden_penalty", "cutoff_penalty",
                "disable_dropout", "beta", "epsilon", "loss_type", "num_generations", "num_iterations",
                "max_completion_length", "temperature", "top_p", "mask_truncated_completions", "scale_rewards",
                "prompts_per_step")

parallel.relaunch()
data, prompt, valid, args, config = training.parse((TestPromptArguments, ValidArguments, ReasonerGRPOArguments,
                                                    training.GRPOArguments))
if args.targets not in TARGETS:
    fail(f"--targets must be one of {', '.join(TARGETS)}, not {args.targets!r}")
kl_reference = args.kl_reference or ("base" if llm.backend() == "unsloth" else "sft")
if kl_reference not in KL_REFERENCES:
    fail(f"--kl_reference must be one of {', '.join(KL_REFERENCES)}, not {kl_reference!r}")
experts = Path(args.checkpoint_dir) / data.path.name
reasoner_path = require_model(args.reasoner_path or experts / "Reasoner" / "final_checkpoint")
predictor_path = require_model(args.predictor_path or experts / "Predictor" / "final_checkpoint")
base_model = llm.base_of(reasoner_path, args.model_path)
config.output_dir = config.output_dir or str(experts / "Reasoner_GRPO")
config.remove_unused_columns = False  # the reward reads the "row" column
config = training.grpo_batch(config, args.prompts_per_step)

# The training targets, their prompts and histories; the validation rows, with histories as the test set's.
targets = read_table(data, TARGETS[args.targets])
histories = load_histories(data, prompt)
contexts = histories.for_rows(targets)
rows = read_split(data, "valid", valid.eval_limit)
valid_contexts = histories.for_rows(rows, prompt.test_history_before_target)
questions = [reason_prompt(prompt.product_class, t, h) for t, h in zip(targets.title, contexts)]
dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": q}], "row": i} for i, q in enumerate(questions)])
job = training.job_settings(JOB_SETTINGS, config, asdict(data), asdict(args), {
    "load_in_4bit": llm.use_4bit(args.load_in_4bit), "train_data_sha256": sha256(data.file(TARGETS[args.targets])),
    "target_rows": len(targets), "reasoner": llm.fingerprint(reasoner_path),
    "predictor": llm.fingerprint(predictor_path), "base_model": llm.fingerprint(base_model),
    "kl_reference": kl_reference})
output = Path(config.output_dir)
inputs = [data.file(TARGETS[args.targets]), data.file("raw_data/valid.pkl")]
made = training.made_from(job, inputs, select_on_valid=args.select_on_valid, max_new_tokens=args.max_new_tokens)
if training.finished(output, made):
    raise SystemExit(0)
resume = training.resumable_checkpoint(output, job)

# The policy: the SFT Reasoner's adapter on its base model, trained further.
set_seed(config.seed)
model, tokenizer = llm.load_base(base_model, load_in_4bit=args.load_in_4bit)
from peft import PeftModel  # noqa: E402

model = PeftModel.from_pretrained(model, reasoner_path, is_trainable=True)
stops = set(llm.stop_token_ids(model, tokenizer))

# How many of the SFT Reasoner's reasons --max_completion_length cuts off, sampled as training samples them.
probe = None
if args.cutoff_probe > 0 and resume is None:
    model.eval()
    cut = llm.Expert(model, tokenizer, batch_size=config.per_device_eval_batch_size).cut_off(
        questions[:args.cutoff_probe], config.max_completion_length, temperature=config.temperature, top_p=config.top_p,
        seed=config.seed)
    probe = {"targets": len(cut), "cut_off": int(cut.sum()), "rate": float(cut.mean())}
    print(f"cut-off probe: {probe['cut_off']} of the SFT Reasoner's {probe['targets']} sampled reasons run past "
          f"--max_completion_length {config.max_completion_length}", flush=True)
    if config.mask_truncated_completions and probe["rate"] > args.max_cutoff_rate:
        fail(f"{probe['cut_off']} of {probe['targets']} reasons ({probe['rate']:.0%}) that the SFT Reasoner samples for "
             f"the first targets are cut off at --max_completion_length {config.max_completion_length}, and "
             f"--mask_truncated_completions masks them out of the loss: GRPO would learn from "
             f"{1 - probe['rate']:.0%} of its completions at most. Raise --max_completion_length, or pass "
             f"--mask_truncated_completions false (cut-off reasons then lose --cutoff_penalty {args.cutoff_penalty}), "
             f"or --max_cutoff_rate {probe['rate']:.2f} to train anyway.")

# The frozen Predictor, and the reward.
predictor = llm.load_model(predictor_path, load_in_4bit=args.load_in_4bit, model_path=args.model_path,
                           batch_size=config.per_device_eval_batch_size)
truth = targets["ratings"].to_numpy(dtype=float)


def reward(prompts, completions, completion_ids, row, log_metric=None, **_):
    """reason_filter.predictor_reward of a batch of sampled reasons."""
    reasons = [c[-1]["content"] for c in completions]
    cut_off = [len(ids) >= config.max_completion_length and ids[-1] not in stops for ids in completion_ids]
    rewards, forbidden, cut = predictor_reward(predictor, prompt.product_class, [targets.title[i] for i in row],
                                               [contexts[i] for i in row], reasons, truth[list(row)], cut_off,
                                               args.forbidden_penalty, args.cutoff_penalty)
    if log_metric is not None:
        log_metric("reward/forbidden_rate", float(forbidden.mean()))
        log_metric("reward/cut_off_rate", float(cut.mean()))
    return rewards.tolist()


trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset, processing_class=tokenizer,
                      callbacks=[training.ShowBatch()])
# TRL gives a PEFT model that already has an adapter a frozen copy of it, "ref", as the KL reference; Unsloth's trainer
# removes it, and TRL then disables the adapter instead: the base model.
if kl_reference == "base" and "ref" in model.peft_config:
    model.delete_adapter("ref")
used = "sft" if "ref" in model.peft_config else "base"
if config.beta != 0 and used != kl_reference:
    fail(f"--kl_reference {kl_reference} asked, but this trainer ({llm.backend()}) measures the KL against "
         f"{KL_REFERENCES[used]}: pass --kl_reference {used}")
final = training.train(trainer, resume)

clipped = [e["completions/clipped_ratio"] for e in trainer.state.log_history if "completions/clipped_ratio" in e]
learned_nothing = config.mask_truncated_completions and bool(clipped) and min(clipped) >= 1.0
if learned_nothing:
    print(f"warning: every completion of every step was cut off at --max_completion_length "
          f"{config.max_completion_length}, and truncated completions are masked: GRPO learned nothing (loss 0, "
          f"gradient 0). Raise --max_completion_length, or pass --mask_truncated_completions false.", flush=True)

# Choose on the validation rows: the frozen Predictor's MAE given each candidate's greedy reasons, as 4_GRPO/2 writes
# them (the same --max_new_tokens) and 4_GRPO/3 rates them.
cache = ResultCache(data.file("generation_cache.sqlite"))
valid_questions = [reason_prompt(prompt.product_class, t, h) for t, h in zip(rows.title, valid_contexts)]
valid_truth = rows["ratings"].to_numpy(dtype=float)
predictor.cache = cache


def valid_mae(folder: Path) -> float:
    reasoner = llm.load_model(folder, load_in_4bit=args.load_in_4bit, model_path=args.model_path, cache=cache,
                              batch_size=config.per_device_eval_batch_size, max_new_tokens=args.max_new_tokens)
    reasons = reasoner.generate(valid_questions, desc=f"validation reasons, {folder.name}")
    ratings = predictor.score(predictor_prompts(prompt.product_class, rows.title, valid_contexts, reasons),
                              desc="validation ratings")
    return float(np.abs(ratings - valid_truth).mean())


batch = {"prompts_per_step": args.prompts_per_step, "completions_per_step": config.generation_batch_size,
         "processes": parallel.world_size(), "per_device_train_batch_size": config.per_device_train_batch_size,
         "gradient_accumulation_steps": config.gradient_accumulation_steps}
record = provenance({"job": job, "made_from": made, "grpo": asdict(args), "backend": llm.backend(),
                     "learned_nothing": learned_nothing, "loaded_in_4bit": llm.loaded_in_4bit(model), "batch": batch,
                     "cutoff_probe": probe,
                     "kl_reference": {"used": used if config.beta != 0 else None,
                                      "what": KL_REFERENCES[used] if config.beta != 0 else "none: beta is 0"}},
                    inputs)
training.finish(trainer, final, tokenizer, output, record, metric=valid_mae if args.select_on_valid else None,
                metric_name=f"MAE of the frozen Predictor given the candidate's greedy reasons (at most "
                            f"{args.max_new_tokens} tokens) on the validation rows ({len(rows):,})",
                select_on_valid=args.select_on_valid, start=Path(reasoner_path))
