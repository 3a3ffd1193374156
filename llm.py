"""Loading the base model and its LoRA experts, batched generation, and batched logits-weighted rating prediction.

The paper runs everything through Unsloth's FastLanguageModel; where Unsloth is installed it is used here too,
otherwise transformers + PEFT (+ bitsandbytes for 4-bit) do the same job.  REASON4REC_BACKEND=hf|unsloth forces
one.  Nothing here names a special token: prompts come from the tokenizer's chat template, generation stops on
the eos tokens of the tokenizer and the generation config.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from utils import RATING_PREFIX, DataArguments, ResultCache, fail, require_model, shard_path, write_pickle


def backend() -> str:
    choice = os.environ.get("REASON4REC_BACKEND", "auto")
    if choice == "auto":
        return "unsloth" if importlib.util.find_spec("unsloth") else "hf"
    if choice not in ("hf", "unsloth"):
        fail(f"REASON4REC_BACKEND must be hf, unsloth or auto, not {choice!r}")
    return choice


if backend() == "unsloth":
    import unsloth  # noqa: F401  (must come before transformers, which it patches)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402


@dataclass
class ModelArguments:
    model_path: str | None = field(default=None, metadata={
        "help": "the expert's adapter (default: what its *_train.sh writes, "
                "checkpoints/<dataset>/<Name>/final_checkpoint)"})
    base_model_path: str | None = field(default=None, metadata={
        "help": "the base model, where the adapter's own record of it is out of date (default: $MODEL_PATH)"})
    load_in_4bit: str = field(default="auto", metadata={"help": "true/false; auto: on a CUDA GPU"})
    batch_size: int = field(default=8, metadata={"help": "prompts per forward pass"})
    max_new_tokens: int = field(default=1024, metadata={"help": "longest generated answer"})
    num_shards: int = field(default=1, metadata={"help": "split the rows into this many shards (one per GPU or "
                                                         "machine); merge the parts with scripts/merge_shards.py"})
    shard_id: int = field(default=0, metadata={"help": "which shard this run does, 0 .. num_shards-1"})

    def __post_init__(self):
        if not 0 <= self.shard_id < self.num_shards:
            fail(f"--shard_id must be in 0..{self.num_shards - 1}, not {self.shard_id}")

    def shard(self, tokenizer, rows, questions, prefix: str = ""):
        """This run's rows and questions.  Shards take whole batches (batch b goes to shard b % num_shards), the batches
        a single run would form, so that every prompt is computed exactly as in a single run."""
        if self.num_shards == 1:
            return rows, questions
        lengths = [len(ids) for ids in _encode(tokenizer, [chat_text(tokenizer, q, prefix) for q in questions])]
        mine = sorted(i for b, batch in enumerate(batches(lengths, self.batch_size))
                      if b % self.num_shards == self.shard_id for i in batch)
        return rows.iloc[mine], [questions[i] for i in mine]

    def write(self, obj, path: Path, index=None):
        """Write an output, or this shard's part of it, which keeps the row numbers (a DataFrame its index; a list is
        written as {row: item} with the row numbers in `index`) for scripts/merge_shards.py to put it back in order."""
        if self.num_shards == 1:
            return write_pickle(obj, path)
        write_pickle(obj if index is None else dict(zip(index, obj)), shard_path(path, self.shard_id, self.num_shards))
        print(f"this is part {self.shard_id + 1} of {self.num_shards}: when all are done, run "
              f"`python scripts/merge_shards.py {path} --num_shards {self.num_shards}`")


def load_expert(data: DataArguments, args: ModelArguments, expert: str):
    """(model, tokenizer, model_id) of a trained expert; `model_id` identifies its weights in result caches."""
    path = require_model(args.model_path or data.checkpoint(expert))
    model, tokenizer = load_model(path, load_in_4bit=args.load_in_4bit, base_model_path=args.base_model_path)
    return model, tokenizer, fingerprint(path)


def default_dtype():
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def use_4bit(load_in_4bit) -> bool:
    """"auto" (the default everywhere) means QLoRA as in the paper where there is a CUDA GPU, plain LoRA elsewhere."""
    if load_in_4bit in (None, "auto"):
        return torch.cuda.is_available()
    return str(load_in_4bit).lower() in ("1", "true", "yes")


def base_of(adapter: str | Path, base_model_path: str | None = None) -> str:
    """The base model a LoRA adapter was trained on: its adapter_config.json says, unless overridden (--base_model_path
    or $MODEL_PATH), e.g. when the base model has moved since training."""
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    base = base_model_path or config["base_model_name_or_path"]
    if not Path(base).exists() and os.environ.get("MODEL_PATH"):
        base = os.environ["MODEL_PATH"]
    if not (Path(base) / "config.json").exists():
        fail(f"the base model of {adapter} is {base!r}, which is not a model folder here; "
             f"pass --base_model_path or set MODEL_PATH to it.")
    return base


def load_model(path: str | Path, *, load_in_4bit="auto", max_seq_length: int = 4096, base_model_path=None):
    """(model, tokenizer) ready for inference from a base model folder or a LoRA adapter folder."""
    path = str(path)
    adapter = path if (Path(path) / "adapter_config.json").exists() else None
    base = base_of(adapter, base_model_path) if adapter else path
    quantize = use_4bit(load_in_4bit)
    if backend() == "unsloth":
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=base, max_seq_length=max_seq_length, dtype=None, load_in_4bit=quantize)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=default_dtype()) if quantize else None
        model = AutoModelForCausalLM.from_pretrained(
            base, dtype=default_dtype(), quantization_config=quantization,
            device_map="auto" if torch.cuda.is_available() else None)
        tokenizer = AutoTokenizer.from_pretrained(base)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        if (Path(adapter) / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(adapter)
    if backend() == "unsloth":
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
    model.eval()
    return model, prepare_tokenizer(tokenizer)


def prepare_tokenizer(tokenizer):
    if tokenizer.pad_token is None:  # the official code sets pad id 0; padding is masked either way
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues at the right end of every row
    return tokenizer


def fingerprint(path: str | Path) -> str:
    """Identifies a model's weights, so that a cached generation is never reused after retraining."""
    path = Path(path)
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        if f.stat().st_size < 2**30:  # adapters: hash their bytes; base models: their size and time suffice
            h.update(f.read_bytes())
        h.update(f"{f.name}{f.stat().st_size}{f.stat().st_mtime_ns}".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- batching
def chat_text(tokenizer, question: str, prefix: str = "") -> str:
    """The chat-template rendering of one user turn, ready for the assistant's answer (plus an answer prefix)."""
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefix


def _encode(tokenizer, texts):
    # The chat template already holds any BOS token: don't let the tokenizer add a second one.
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def batches(lengths, batch_size: int):
    """Index batches of similar length (longest first, so that an out-of-memory error shows at once): padding
    then costs little.  A function of the lengths alone, so a resumed run forms exactly the same batches."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _pad(tokenizer, ids, side: str):
    """A batch of token-id lists as tensors padded on `side`, with their attention mask."""
    return tokenizer.pad({"input_ids": ids}, padding_side=side, return_tensors="pt")


def _run_batched(kind, keys, ids, batch_size, cache, desc, compute):
    """Run `compute(batch_ids, batch_index)` over length-sorted batches, skipping batches whose answers are cached and
    committing each new batch to the cache at once.  Returns the answers in input order."""
    found = cache.get_many(keys) if cache is not None else {}
    results = [found.get(k) for k in keys]
    todo = [b for b in batches([len(x) for x in ids], batch_size) if any(results[i] is None for i in b)]
    with tqdm(total=len(keys), initial=len(keys) - sum(len(b) for b in todo), desc=desc, unit=kind) as bar:
        for b in todo:
            answers = compute([ids[i] for i in b], b[0])
            for i, answer in zip(b, answers):
                results[i] = answer
            if cache is not None:
                cache.put_many({keys[i]: results[i] for i in b})
            bar.update(len(b))
    return results


def stop_token_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted(set(ids + [tokenizer.eos_token_id]) - {None})


@torch.no_grad()
def generate(model, tokenizer, questions, *, max_new_tokens: int = 1024, temperature: float = 0.0,
             batch_size: int = 8, seed: int = 0, cache: ResultCache | None = None, model_id: str = "",
             keys=None, desc: str = "generating") -> list[str]:
    """Answer every question (one user turn each): greedy when temperature is 0, sampled otherwise.  Left-padded
    batches of similar length; the same answers as one question at a time.  With a `cache`, each batch is kept as
    it is done (under `keys`, by default a hash of the model, the prompt and the settings)."""
    texts = [chat_text(tokenizer, q) for q in questions]
    ids = _encode(tokenizer, texts)
    keys = keys or [ResultCache.key("generate", model_id, t, max_new_tokens, temperature, seed) for t in texts]
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)

    def compute(batch, first):
        if temperature > 0:  # a seed per batch, and batches depend on the inputs only: reruns sample the same
            torch.manual_seed(seed * 1_000_003 + first)
        inputs = _pad(tokenizer, batch, "left").to(model.device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(model, tokenizer),
                             pad_token_id=tokenizer.pad_token_id, **sampling)
        return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    return _run_batched("prompt", keys, ids, batch_size, cache, desc, compute)


def rating_token_ids(tokenizer, prefix: str = RATING_PREFIX) -> list[int]:
    """Token ids of "1".."5" as they follow the answer prefix; checked, not assumed."""
    ids = []
    for digit in "12345":
        token = tokenizer.convert_tokens_to_ids(digit)
        with_digit = _encode(tokenizer, [prefix + digit])[0]
        if token is None or token == tokenizer.unk_token_id or with_digit[-1] != token \
                or with_digit[:-1] != _encode(tokenizer, [prefix])[0]:
            fail(f"this tokenizer does not encode the rating {digit!r} as one token after {prefix!r}")
        ids.append(token)
    return ids


@torch.no_grad()
def predict_ratings(model, tokenizer, questions, *, prefix: str = RATING_PREFIX, batch_size: int = 8,
                    cache: ResultCache | None = None, model_id: str = "", desc: str = "scoring") -> np.ndarray:
    """The paper's logits-weighted prediction: after `prefix`, the softmax over the logits of "1".."5", its
    expectation, clipped to [1, 5].  One forward pass per batch, on the model's device.

    Batches are padded on the right and run without a padding mask: under the causal mask no real token can see the
    padding after it, so each row is computed as it would be alone (the fast causal attention kernel, and the same
    numbers), and the logits are read at each row's own last token."""
    texts = [chat_text(tokenizer, q, prefix) for q in questions]
    ids = _encode(tokenizer, texts)
    keys = [ResultCache.key("rating", model_id, t) for t in texts]
    digits = torch.tensor(rating_token_ids(tokenizer, prefix))

    def compute(batch, first):
        last = torch.tensor([len(seq) - 1 for seq in batch])
        input_ids = _pad(tokenizer, batch, "right")["input_ids"]
        keep = torch.unique(last)  # the sequence positions whose logits are needed, sorted
        logits = model(input_ids=input_ids.to(model.device), logits_to_keep=keep.to(model.device)).logits
        logits = logits[torch.arange(len(batch)), torch.searchsorted(keep, last)].float()
        probs = torch.softmax(logits[:, digits.to(logits.device)], dim=-1)
        expected = probs @ torch.arange(1.0, 6.0, device=probs.device)
        return expected.clamp(1.0, 5.0).tolist()

    return np.array(_run_batched("prompt", keys, ids, batch_size, cache, desc, compute), dtype=float)
