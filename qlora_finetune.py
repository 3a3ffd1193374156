"""Fine-tune one LoRA expert (Summarizer, reward model, Reasoner or Predictor) on an SFT pickle with TRL.

    python qlora_finetune.py --model_path BASE --train_data_path Data/<ds>/X_train_instruct.pkl \
        --output_dir checkpoints/<ds>/<Name> [--lora_rank 16 ...] [any SFTConfig flag, e.g. --max_steps 5]

The *_train.sh scripts call this with each expert's official hyper-parameters.  As in the paper: QLoRA (4-bit
base, Unsloth where installed) on q,k,v,o,gate,up,down, bf16, adamw_8bit, seed 42, loss on the answer only; on a
machine without a CUDA GPU the defaults become plain LoRA, float32 and adamw_torch.  The adapter (and the tokenizer)
is saved to <output_dir>/final_checkpoint; an interrupted run resumes from its last checkpoint when rerun.
"""
import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import llm  # first: it imports Unsloth, where installed, before transformers
import torch
from datasets import Dataset
from transformers import set_seed
from trl import SFTConfig, SFTTrainer, TrlParser

from utils import atomic_write, fail, read_pickle, write_json


@dataclass
class FinetuneArguments:
    model_path: str = field(default=os.environ.get("MODEL_PATH"), metadata={"help": "base model (default $MODEL_PATH)"})
    train_data_path: str = field(default=None, metadata={"help": "pickle: a list of {'messages': [user, assistant]}"})
    train_size: int = field(default=-1, metadata={"help": "use only the first N examples (-1: all)"})
    max_len: int = field(default=4096, metadata={"help": "max tokens per example"})
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    load_in_4bit: str = field(default="auto", metadata={"help": "true/false; auto: on a CUDA GPU (QLoRA)"})
    tune_last_layer: bool = field(default=False, metadata={"help": "also train (and save) lm_head"})
    mask_loss: bool = field(default=True, metadata={"help": "loss on the assistant's answer only"})


def hardware_defaults() -> dict:
    """The paper's precision and optimizer where there is a GPU; what a CPU can run elsewhere."""
    if torch.cuda.is_available():
        return dict(bf16=torch.cuda.is_bf16_supported(), fp16=not torch.cuda.is_bf16_supported(), optim="adamw_8bit")
    return dict(bf16=False, fp16=False, optim="adamw_torch")


def load_for_training(args: FinetuneArguments, config: SFTConfig):
    """The base model with LoRA attached (Unsloth), or the base model plus a LoraConfig for TRL to attach (HF)."""
    quantize = llm.use_4bit(args.load_in_4bit)
    targets = args.target_modules.split(",")
    extra = ["lm_head"] if args.tune_last_layer else None  # saved with the adapter (the official code loses it)
    if llm.backend() == "unsloth":
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=args.model_path, max_seq_length=args.max_len, dtype=None, load_in_4bit=quantize)
        model = FastLanguageModel.get_peft_model(
            model, r=args.lora_rank, target_modules=targets, lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout, bias="none", use_gradient_checkpointing="unsloth",
            random_state=config.seed, modules_to_save=extra)
        return model, llm.prepare_tokenizer(tokenizer), None
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=llm.default_dtype()) if quantize else None
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=llm.default_dtype(),
                                                 quantization_config=quantization)
    lora = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, bias="none",
                      target_modules=targets, modules_to_save=extra, task_type="CAUSAL_LM")
    return model, llm.prepare_tokenizer(AutoTokenizer.from_pretrained(args.model_path)), lora


def to_dataset(examples: list, mask_loss: bool) -> Dataset:
    """Prompt/completion pairs make TRL compute the loss on the completion (the answer) only."""
    if mask_loss:
        return Dataset.from_list([{"prompt": x["messages"][:-1], "completion": x["messages"][-1:]} for x in examples])
    return Dataset.from_list([{"messages": x["messages"]} for x in examples])


def main():
    parser = TrlParser((FinetuneArguments, SFTConfig))
    parser.set_defaults(**hardware_defaults(), seed=42, report_to="none", save_strategy="epoch", logging_steps=1)
    args, config = parser.parse_args_and_config()
    if not args.model_path or not Path(args.model_path, "config.json").exists():
        fail(f"--model_path {args.model_path!r} is not a model folder (set MODEL_PATH or pass --model_path)")
    args.model_path = str(Path(args.model_path).resolve())  # recorded in the adapter as its base model
    examples = read_pickle(args.train_data_path, what="messages")
    if args.train_size > 0:
        examples = examples[: args.train_size]
    if not examples:
        fail(f"{args.train_data_path} holds no training examples")
    print(json.dumps({"finetune": asdict(args), "backend": llm.backend(), "examples": len(examples)}, indent=1))

    config.max_length = args.max_len
    config.completion_only_loss = args.mask_loss
    config.dataset_num_proc = None
    output = Path(config.output_dir)
    resume = _resumable_checkpoint(output, args, examples)

    set_seed(config.seed)  # before LoRA is attached: its initial weights are random
    model, tokenizer, lora = load_for_training(args, config)
    trainer = SFTTrainer(model=model, args=config, train_dataset=to_dataset(examples, args.mask_loss),
                         processing_class=tokenizer, peft_config=lora)
    trainer.train(resume_from_checkpoint=resume)

    final = output / "final_checkpoint"
    tmp = output / ".final_checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json(trainer.state.log_history, tmp / "log_history.json")
    config_file = tmp / "adapter_config.json"  # PEFT writes target_modules in set order: sort it, for equal bytes
    adapter_config = json.loads(config_file.read_text())
    if isinstance(adapter_config.get("target_modules"), list):
        adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
    write_json(adapter_config, config_file)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    print(f"saved the adapter to {final}")


def _resumable_checkpoint(output: Path, args: FinetuneArguments, examples: list):
    """The last complete checkpoint of an interrupted run of this very job (same data, same arguments), else None.
    A checkpoint cut short by the interruption (transformers writes trainer_state.json last) is removed, and so are
    the checkpoints of a different job in the same folder, rather than resumed."""
    job = hashlib.sha256(json.dumps([asdict(args), sys.argv[1:], examples], sort_keys=True, default=str).encode())
    stamp = output / "job.sha256"
    same_job = stamp.exists() and stamp.read_text() == job.hexdigest()
    complete = []
    for checkpoint in sorted(output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])):
        if same_job and _is_complete(checkpoint):
            complete.append(checkpoint)
        else:
            shutil.rmtree(checkpoint)
    if complete:
        print(f"resuming from {complete[-1]}")
        return str(complete[-1])
    atomic_write(stamp, lambda f: f.write(job.hexdigest()), mode="w")
    return None


def _is_complete(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


if __name__ == "__main__":
    main()
