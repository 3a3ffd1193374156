"""Fine-tune one LoRA expert (Summarizer, reward model, Reasoner or Predictor) on an SFT pickle with TRL.

    python qlora_finetune.py --config 1_Summarizer/summarizer.yaml [--max_steps 5 ...]

Each expert's hyper-parameters (the official ones) are in one YAML file beside its *_train.sh, which runs this
script with it; any flag given on the command line (ours, or any of TRL's SFTConfig) overrides the file.  As in the
paper: QLoRA (4-bit base, Unsloth where installed) on q,k,v,o,gate,up,down, bf16, adamw_8bit, seed 42, loss on the
answer only; on a machine without a CUDA GPU the defaults become plain LoRA, float32 and adamw_torch.

Reads <data_dir>/<dataset>/<train_data>; writes <checkpoint_dir>/<dataset>/<expert>/ (or --output_dir, or
$OUTPUT_DIR): a checkpoint per epoch, then final_checkpoint/ (the adapter, the tokenizer, log_history.json and
provenance.json).  An interrupted run resumes from its last complete checkpoint when rerun as the same job (see
JOB_SETTINGS); a different job in the same folder is refused, and no checkpoint is ever deleted.
NUM_GPUS=N trains data-parallel on N GPUs (parallel.py), keeping the configured global batch.
"""
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import llm  # first: it imports Unsloth, where installed, before transformers
import parallel
import torch
from datasets import Dataset
from transformers import TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer, TrlParser

from utils import DataArguments, fail, provenance, read_json, read_pickle, sha256, write_json


@dataclass
class FinetuneArguments:
    expert: str | None = field(default=None, metadata={
        "help": "the expert's name: its adapter goes to <checkpoint_dir>/<dataset>/<expert>"})
    train_data: str | None = field(default=None, metadata={
        "help": "the SFT pickle (a list of {'messages': [user, assistant]}): a file name under <data_dir>/<dataset>, "
                "or a path"})
    model_path: str | None = field(default_factory=lambda: os.environ.get("MODEL_PATH"), metadata={
        "help": "the base model (default: $MODEL_PATH)"})
    checkpoint_dir: str = field(default_factory=lambda: os.environ.get("CHECKPOINT_DIR", "checkpoints"), metadata={
        "help": "where adapters are written (default: $CHECKPOINT_DIR, else checkpoints)"})
    max_len: int = field(default=4096, metadata={"help": "max tokens per example"})
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    load_in_4bit: str = field(default="auto", metadata={"help": "true/false; auto: on a CUDA GPU (QLoRA)"})
    tune_last_layer: bool = field(default=False, metadata={"help": "also train (and save) lm_head"})
    save_lm_head: bool = field(default=True, metadata={
        "help": "false: train lm_head but leave it out of the saved adapter, as the official trainer did (its "
                "published reward model and Predictor were used that way)"})
    mask_loss: bool = field(default=True, metadata={"help": "loss on the assistant's answer only"})
    exact_global_batch: bool = field(default=True, metadata={
        "help": "with NUM_GPUS > 1, refuse a process count that cannot keep the configured global batch exactly"})


# What makes two runs the same training job: a rerun that agrees on all of these resumes; one that differs is
# refused.  Flag order, logging, saving and evaluation options do not count.
JOB_SETTINGS = ("train_data_sha256", "examples", "model_path", "lora_rank", "lora_alpha", "lora_dropout",
                "target_modules", "tune_last_layer", "load_in_4bit", "learning_rate", "lr_scheduler_type",
                "warmup_steps", "weight_decay", "optim", "global_batch", "seed", "num_train_epochs", "max_steps",
                "max_len", "mask_loss")


def hardware_defaults() -> dict:
    """The paper's precision and optimizer where there is a GPU; what a CPU can run elsewhere."""
    if torch.cuda.is_available():
        return dict(bf16=torch.cuda.is_bf16_supported(), fp16=not torch.cuda.is_bf16_supported(), optim="adamw_8bit")
    return dict(bf16=False, fp16=False, optim="adamw_torch")


def load_for_training(args: FinetuneArguments, config: SFTConfig):
    """The base model (llm.load_base, as inference loads it) with LoRA attached (Unsloth), or with a LoraConfig for
    TRL to attach (transformers + PEFT)."""
    model, tokenizer = llm.load_base(args.model_path, load_in_4bit=args.load_in_4bit, max_seq_length=args.max_len)
    targets = args.target_modules.split(",")
    extra = ["lm_head"] if args.tune_last_layer else None  # saved with the adapter (the official code loses it)
    if llm.backend() == "unsloth":
        from unsloth import FastLanguageModel

        model = FastLanguageModel.get_peft_model(
            model, r=args.lora_rank, target_modules=targets, lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout, bias="none", use_gradient_checkpointing="unsloth",
            random_state=config.seed, modules_to_save=extra)
        return model, tokenizer, None
    from peft import LoraConfig

    lora = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, bias="none",
                      target_modules=targets, modules_to_save=extra, task_type="CAUSAL_LM")
    return model, tokenizer, lora


def to_dataset(examples: list, mask_loss: bool) -> Dataset:
    """Prompt/completion pairs make TRL compute the loss on the completion (the answer) only."""
    if mask_loss:
        return Dataset.from_list([{"prompt": x["messages"][:-1], "completion": x["messages"][-1:]} for x in examples])
    return Dataset.from_list([{"messages": x["messages"]} for x in examples])


def parse(argv=None):
    parser = TrlParser((DataArguments, FinetuneArguments, SFTConfig))
    parser.set_defaults(**hardware_defaults(), seed=42, report_to="none", save_strategy="epoch", logging_steps=1,
                        output_dir=os.environ.get("OUTPUT_DIR", ""))
    data, args, config = parser.parse_args_and_config(argv)
    if not args.model_path or not Path(args.model_path, "config.json").exists():
        fail(f"--model_path {args.model_path!r} is not a model folder (set MODEL_PATH or pass --model_path)")
    args.model_path = str(Path(args.model_path).resolve())  # recorded in the adapter as its base model
    if not args.train_data or not args.expert:
        fail("say what to train: --config <expert>.yaml (see the *_train.sh scripts), or --train_data and --expert")
    if not config.output_dir:
        config.output_dir = str(Path(args.checkpoint_dir) / data.path.name / args.expert)  # needs a dataset
    config.max_length = args.max_len
    config.completion_only_loss = args.mask_loss
    config.dataset_num_proc = None
    keep_global_batch(args, config)
    return data, args, config


def keep_global_batch(args: FinetuneArguments, config: SFTConfig):
    """The configured batch (per-device batch x gradient accumulation, the official values for one GPU) is the global
    batch: with N processes each takes 1/N of it, by dividing the per-device batch or else the accumulation."""
    n, per_device, accumulation = parallel.world_size(), config.per_device_train_batch_size, \
        config.gradient_accumulation_steps
    if n == 1:
        return
    if per_device % n == 0:
        config.per_device_train_batch_size = per_device // n
    elif accumulation % n == 0:
        config.gradient_accumulation_steps = accumulation // n
    elif args.exact_global_batch:
        fail(f"the global batch {per_device} x {accumulation} cannot be split over {n} processes; pass "
             f"--per_device_train_batch_size / --gradient_accumulation_steps that can, or --exact_global_batch false "
             f"to train with {per_device * accumulation * n} per step")


def job_of(args: FinetuneArguments, config: SFTConfig, examples: list, data_file: Path) -> dict:
    settings = {**asdict(args), **config.to_dict(), "load_in_4bit": llm.use_4bit(args.load_in_4bit),
                "train_data_sha256": sha256(data_file), "examples": len(examples),
                "global_batch": config.per_device_train_batch_size * config.gradient_accumulation_steps
                * parallel.world_size()}
    return {name: settings[name] for name in JOB_SETTINGS}


def resumable_checkpoint(output: Path, job: dict):
    """The last complete checkpoint of an interrupted run of this very job, else None.  Checkpoints of another job
    stop the run (they are the user's, and never deleted); one cut short by the interruption (transformers writes
    trainer_state.json last) is skipped."""
    checkpoints = sorted(output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    record = output / "job.json"
    if checkpoints:
        earlier = read_json(record) if record.exists() else None
        if earlier != job:
            differing = "unknown: it has no job.json" if earlier is None else ", ".join(
                f"{k} {earlier.get(k)!r} -> {job[k]!r}" for k in JOB_SETTINGS if earlier.get(k) != job[k])
            fail(f"{output} holds checkpoints of another training job (what differs: {differing}). They are kept. "
                 f"To resume that job, rerun it with its own settings; to train this one, give it another folder "
                 f"(OUTPUT_DIR=... or --output_dir ...), or move {output} away.")
    complete = [c for c in checkpoints if _is_complete(c)]
    for c in checkpoints:
        if c not in complete:
            print(f"skipping {c}: it was cut short (no trainer_state.json)")
    if complete:
        print(f"resuming from {complete[-1]}")
        return str(complete[-1])
    write_json(job, record)
    return None


def _is_complete(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


class ShowBatch(TrainerCallback):
    """Print what the trainer really uses (Unsloth may change the accumulation by itself)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            print(f"training: global batch {args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size}"
                  f" = {args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} accumulation"
                  f" x {args.world_size} processes; {state.max_steps} steps", flush=True)


def main():
    parallel.relaunch()
    data, args, config = parse()
    data_file = Path(args.train_data) if "/" in args.train_data else data.file(args.train_data)
    examples = read_pickle(data_file, what="messages")
    if data.limit is not None:
        examples = examples[: data.limit]
    if not examples:
        fail(f"{data_file} holds no training examples")
    output = Path(config.output_dir)
    job = job_of(args, config, examples, data_file)
    print(json.dumps({"finetune": asdict(args), "backend": llm.backend(), "examples": len(examples),
                      "output_dir": str(output)}, indent=1))
    resume = resumable_checkpoint(output, job)

    set_seed(config.seed)  # before LoRA is attached: its initial weights are random
    model, tokenizer, lora = load_for_training(args, config)
    trainer = SFTTrainer(model=model, args=config, train_dataset=to_dataset(examples, args.mask_loss),
                         processing_class=tokenizer, peft_config=lora, callbacks=[ShowBatch()])
    trainer.train(resume_from_checkpoint=resume)
    if parallel.is_main_process():
        save(trainer, tokenizer, output, args.save_lm_head, provenance(
            {"job": job, "finetune": asdict(args), "backend": llm.backend(), "loaded_in_4bit": llm.loaded_in_4bit(model)},
            [data_file]))


def save(trainer, tokenizer, output: Path, save_lm_head: bool, record: dict):
    """The adapter, its tokenizer, the training log and the provenance, into <output>/final_checkpoint at once."""
    final, tmp = output / "final_checkpoint", output / ".final_checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json(trainer.state.log_history, tmp / "log_history.json")
    write_json(record, tmp / "provenance.json")
    config_file = tmp / "adapter_config.json"  # PEFT writes target_modules in set order: sort it, for equal bytes
    adapter_config = json.loads(config_file.read_text())
    if isinstance(adapter_config.get("target_modules"), list):
        adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
    if not save_lm_head and adapter_config.get("modules_to_save"):  # the official trainer's adapters: LoRA only
        from safetensors.torch import load_file, save_file

        weights = tmp / "adapter_model.safetensors"
        save_file({k: v for k, v in load_file(weights).items() if "lm_head" not in k}, weights, metadata={"format": "pt"})
        adapter_config["modules_to_save"] = None
    write_json(adapter_config, config_file)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    print(f"saved the adapter to {final}")


if __name__ == "__main__":
    main()
