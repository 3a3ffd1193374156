"""Build a random-weight Llama-architecture model with a small trained BPE tokenizer and a Llama-3 chat template,
without downloading anything.  For tests (`--size tiny`, about 0.2M parameters, builds in a second) and for the
GPU check (`--size 1b`, Llama-3.2-1B's shape).  Random weights say nothing about accuracy: they exercise the code.

    python scripts/build_random_llama.py --output models/tiny-llama [--size tiny|1b]
"""
import argparse
import random
import shutil
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
           "<|finetune_right_pad_id|>"]
# Llama-3's pre-tokenizer: digits in groups of up to three, never glued to a leading space.
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
SIZES = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
}
WORDS = ("guitar string strings sound tone pedal amp cable tuner strap pick capo bass drum mic stand case quality "
         "price cheap solid great good bad noisy clear warm bright heavy light durable works fine broke returned love "
         "recommend value shipping product item user review history rating ratings stars music play stage studio "
         "Positive Negative Aspects User Preference Elements Predicted Rating Analyze whether like new based "
         "preferences features rationale paragraph average past lowest highest").split()


def corpus(seed=0):
    import prompts  # the real prompt texts, so that the vocabulary fits what the pipeline sends

    rng = random.Random(seed)
    text = [prompts.SUMMARY_TEMPLATE] * 5 + [f"Predicted Rating: {d}.0" for d in "12345"] * 20
    text += [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + "." for _ in range(3000)]
    return text


def build_tokenizer(vocab_size=1024, seed=0) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(seed), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[
        ("<|begin_of_text|>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                        pad_token="<|finetune_right_pad_id|>", model_max_length=8192)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build(output: str | Path, size: str = "tiny", seed: int = 0, device: str = "cpu") -> str:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(seed=seed)
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>")]
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
                         rope_theta=500000.0, **SIZES[size])
    with torch.device(device):
        model = LlamaForCausalLM(config)
    if device != "cpu":
        model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                                               pad_token_id=tokenizer.pad_token_id)
    output = Path(output)
    shutil.rmtree(output, ignore_errors=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    print(f"built a {size} random Llama ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) "
          f"in {output}")
    return str(output)


def build_adapter(model_path: str | Path, output: str | Path, seed: int = 0) -> str:
    """A LoRA adapter of the experts' shape (qlora_finetune's rank, alpha and target modules) for the model at
    `model_path`, with random non-zero weights: training starts LoRA's B at zero, which would leave the model as it
    was, and a backend that dropped or misapplied the adapter would go unseen (scripts/backend_values.py)."""
    from peft import LoraConfig, get_peft_model

    from qlora_finetune import FinetuneArguments

    torch.manual_seed(seed)
    shape = FinetuneArguments()
    model = LlamaForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    lora = LoraConfig(r=shape.lora_rank, lora_alpha=shape.lora_alpha, target_modules=shape.target_modules.split(","),
                      init_lora_weights=False, task_type="CAUSAL_LM")  # False: A and B as nn.Linear starts them
    get_peft_model(model, lora).save_pretrained(output)
    return str(output)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: prompts
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build(args.output, args.size, args.seed, "cuda" if torch.cuda.is_available() else "cpu")
