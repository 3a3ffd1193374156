"""Fine-tune one LoRA expert (Summarizer, reward model, Reasoner or Predictor) on an SFT pickle with TRL.

    python qlora_finetune.py --config 1_Summarizer/summarizer.yaml [--max_steps 5 ...]

Each expert's hyper-parameters (the official ones) are in one YAML file beside its *_train.sh, which runs this
script with it; any flag given on the command line (ours, or any of TRL's SFTConfig) overrides the file.  As in the
paper: QLoRA (4-bit base, Unsloth where installed) on q,k,v,o,gate,up,down, bf16, adamw_8bit, seed 42, loss on the
answer only; on a machine without a CUDA GPU the defaults become plain LoRA, float32 and adamw_torch.

Reads <data_dir>/<dataset>/<train_data> (and <valid_data>); writes <checkpoint_dir>/<dataset>/<expert>/ (or
--output_dir, or $OUTPUT_DIR): a checkpoint per epoch, then final_checkpoint/ (the adapter, the tokenizer,
log_history.json, selection.json and provenance.json).  A rating expert (reward model, Predictor) keeps the checkpoint
with the best validation MAE (training.finish); the others their final state.  An interrupted run resumes from its
last complete checkpoint when rerun as the same job (see JOB_SETTINGS); the checkpoints or final_checkpoint of a
different job in the same folder make it refuse, and nothing of them is ever deleted.  NUM_GPUS=N trains
data-parallel on N GPUs (parallel.py), keeping the configured global batch.
"""
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import llm  # first: it imports Unsloth, where installed, before transformers
import parallel
from datasets import Dataset
from transformers import set_seed
from trl import SFTConfig, SFTTrainer

import training
from training import ShowBatch, finish, keep_global_batch, rating_mae, resumable_checkpoint
from settings import DataArguments, ModelPlaces
from utils import fail, provenance, read_pickle, sha256


@dataclass
class FinetuneArguments(ModelPlaces):
    expert: str | None = field(default=None, metadata={
        "help": "the expert's name: its adapter goes to <checkpoint_dir>/<dataset>/<expert>"})
    train_data: str | None = field(default=None, metadata={
        "help": "the SFT pickle (a list of {'messages': [user, assistant]}): a file name under <data_dir>/<dataset>, "
                "or a path"})
    max_len: int = field(default=4096, metadata={"help": "max tokens per example"})
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    tune_last_layer: bool = field(default=False, metadata={"help": "also train (and save) lm_head"})
    save_lm_head: bool = field(default=True, metadata={
        "help": "false: train lm_head but leave it out of the saved adapter, as the official trainer did (its "
                "published reward model and Predictor were used that way)"})
    mask_loss: bool = field(default=True, metadata={"help": "loss on the assistant's answer only"})
    valid_data: str | None = field(default=None, metadata={
        "help": "rating examples of the validation rows, under <data_dir>/<dataset>: every checkpoint is scored on them "
                "(the MAE of its rating) and the best is kept (see --select_on_valid)"})
    select_on_valid: bool = field(default=True, metadata={
        "help": "keep the checkpoint with the best validation metric (this project's choice); false: the final "
                "state, as the official code"})
    exact_global_batch: bool = field(default=True, metadata={
        "help": "with NUM_GPUS > 1, refuse a process count that cannot keep the configured global batch exactly"})


# What makes two runs the same training job, with training.TRAINING_SETTINGS: a rerun that agrees on all of these
# resumes; one that differs is refused.  Flag order, logging, saving and evaluation options do not count.
JOB_SETTINGS = ("train_data_sha256", "examples", "base_model", "lora_rank", "lora_alpha", "lora_dropout",
                "target_modules", "tune_last_layer", "load_in_4bit", "max_len", "mask_loss", "packing",
                "packing_strategy", "padding_free", "loss_type", "assistant_only_loss", "truncation_mode",
                "neftune_noise_alpha")


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
    data, args, config = training.parse((FinetuneArguments, SFTConfig), argv, save_strategy="epoch")
    args.model_path = args.model_path or os.environ.get("MODEL_PATH")
    if not args.model_path or not Path(args.model_path, "config.json").exists():
        fail(f"--model_path {args.model_path!r} is not a model folder (set MODEL_PATH or pass --model_path)")
    args.model_path = str(Path(args.model_path).resolve())  # recorded in the adapter as its base model
    if data.sample is not None:
        fail("qlora_finetune.py trains on every example of --train_data (or the first --limit); it takes no --sample: "
             "sample the rows in the step that writes the training data")
    if not args.train_data or not args.expert:
        fail("say what to train: --config <expert>.yaml (see the *_train.sh scripts), or --train_data and --expert")
    if not config.output_dir:
        config.output_dir = str(Path(args.checkpoint_dir) / data.path.name / args.expert)  # needs a dataset
    config.max_length = args.max_len
    config.completion_only_loss = args.mask_loss
    config.dataset_num_proc = None
    keep_global_batch(config, args.exact_global_batch)
    return data, args, config


def data_path(data: DataArguments, name: str) -> Path:
    """A file name under <data_dir>/<dataset>, or a path."""
    return Path(name) if "/" in name else data.file(name)


def job_of(args: FinetuneArguments, config: SFTConfig, examples: list, data_file: Path) -> dict:
    return training.job_settings(JOB_SETTINGS, config, asdict(args), {
        "load_in_4bit": llm.use_4bit(args.load_in_4bit), "base_model": llm.fingerprint(args.model_path),
        "train_data_sha256": sha256(data_file), "examples": len(examples)})


def main():
    parallel.relaunch()
    data, args, config = parse()
    data_file = data_path(data, args.train_data)
    examples = read_pickle(data_file, what="messages")
    if data.limit is not None:
        examples = examples[: data.limit]
    if not examples:
        fail(f"{data_file} holds no training examples")
    metric, metric_name, inputs = None, None, [data_file]  # the validation metric, checked before any training
    if args.valid_data and args.select_on_valid:
        valid_file = data_path(data, args.valid_data)
        if not valid_file.exists() and not data.file("raw_data/valid.pkl").exists():
            fail(f"{valid_file} not found, and the dataset has no validation split to make it from: pass "
                 f"--select_on_valid false to keep the final state")
        metric, metric_name = rating_mae(data, valid_file, load_in_4bit=args.load_in_4bit,
                                         batch_size=config.per_device_eval_batch_size)
        inputs.append(valid_file)
    output = Path(config.output_dir)
    job = job_of(args, config, examples, data_file)
    print(json.dumps({"finetune": asdict(args), "backend": llm.backend(), "examples": len(examples),
                      "output_dir": str(output)}, indent=1))
    made = training.made_from(job, inputs, select_on_valid=args.select_on_valid, save_lm_head=args.save_lm_head)
    if training.finished(output, made):
        return
    resume = resumable_checkpoint(output, job)

    set_seed(config.seed)  # before LoRA is attached: its initial weights are random
    model, tokenizer, lora = load_for_training(args, config)
    trainer = SFTTrainer(model=model, args=config, train_dataset=to_dataset(examples, args.mask_loss),
                         processing_class=tokenizer, peft_config=lora, callbacks=[ShowBatch()])
    final = training.train(trainer, resume)

    record = provenance({"job": job, "made_from": made, "finetune": asdict(args), "backend": llm.backend(),
                         "loaded_in_4bit": llm.loaded_in_4bit(model)}, inputs)
    finish(trainer, final, tokenizer, output, record, metric=metric, metric_name=metric_name,
           select_on_valid=args.select_on_valid, save_lm_head=args.save_lm_head)


if __name__ == "__main__":
    main()
