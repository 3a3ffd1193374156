"""The base model and its LoRA experts: one way to load them, and what the pipeline asks of a model, batched and
cached: write answers (`Expert.generate`), rate (`Expert.score`, the paper's logits-weighted rating), and, to judge
the reasons, the likelihood of a given answer (`Expert.loglikelihood`, GPTScore).

The paper runs everything through Unsloth's FastLanguageModel; where Unsloth is installed it is used here too,
otherwise transformers + PEFT (+ bitsandbytes for 4-bit) do the same job.  REASON4REC_BACKEND=hf|unsloth forces
one.  Training (qlora_finetune.py) and inference load the base model through the same `load_base`, so they can never
load it differently.  Nothing here names a special token: prompts come from the tokenizer's chat template,
generation stops on the eos tokens of the tokenizer and the generation config.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import parallel
from cache import ResultCache
from prompts import RATING_PREFIX
from settings import DataArguments, ModelPlaces
from utils import fail, require_model


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
class ModelArguments(ModelPlaces):
    adapter_path: str | None = field(default=None, metadata={
        "help": "the expert's LoRA adapter (default: what its *_train.sh writes, "
                "<checkpoint_dir>/<dataset>/<Expert>/final_checkpoint)"})
    batch_size: int = field(default=8, metadata={"help": "prompts per forward pass"})
    max_new_tokens: int = field(default=1024, metadata={"help": "longest generated answer"})
    double_bos: bool = field(default=False, metadata={
        "help": "tokenize the chat text with a second BOS, as the official chat_with_LLM and logits_weighted_predict "
                "do (the published results were made that way); default: the template's BOS only"})


def default_dtype():
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def use_4bit(load_in_4bit) -> bool:
    """"auto" (the default everywhere) means QLoRA as in the paper where there is a CUDA GPU, plain LoRA elsewhere."""
    if load_in_4bit in (None, "auto"):
        return torch.cuda.is_available()
    return str(load_in_4bit).lower() in ("1", "true", "yes")


LOADS: list[dict] = []  # every base model load_base loaded in this process, as loaded (read by scripts/gpu_check.py)


def load_base(path: str | Path, *, load_in_4bit="auto", max_seq_length: int = 4096):
    """(model, tokenizer) of a base model, as training and inference both load it: Unsloth where installed, else
    transformers (+ bitsandbytes NF4 with double quantization for 4-bit); bf16 on a GPU that has it, float32 on a
    CPU (Unsloth would choose bf16 on a CPU that has it: it is told); each process of a data-parallel run on its own
    GPU.  Returns also whether it really is in 4-bit."""
    path, quantize = str(path), use_4bit(load_in_4bit)
    device_map = {"": int(os.environ.get("LOCAL_RANK", 0))} if torch.cuda.is_available() else None
    if backend() == "unsloth":
        from unsloth import FastLanguageModel

        extra = {"device_map": device_map} if device_map else {}
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=path, max_seq_length=max_seq_length, dtype=default_dtype(), load_in_4bit=quantize, **extra)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=default_dtype()) if quantize else None
        model = AutoModelForCausalLM.from_pretrained(path, dtype=default_dtype(), quantization_config=quantization,
                                                     device_map=device_map)
        tokenizer = AutoTokenizer.from_pretrained(path)
    LOADS.append({"path": path, "backend": backend(), "in_4bit": loaded_in_4bit(model), "device": str(model.device)})
    return model, prepare_tokenizer(tokenizer)


def loaded_in_4bit(model) -> bool:
    """Whether the model's weights really are 4-bit, as loaded (not as asked for)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(getattr(model, "config", None),
                                                                       "quantization_config", None))


def prepare_tokenizer(tokenizer):
    # A pad token where the model has none: its value never matters, since generation masks padding with the attention
    # mask, scoring reads each row before its padding, and training masks it out of the loss.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues at the right end of every row
    return tokenizer


def base_of(adapter: str | Path, model_path: str | None = None) -> str:
    """The base model a LoRA adapter was trained on: its adapter_config.json says, unless overridden (--model_path,
    or $MODEL_PATH where the recorded one is not here), e.g. when the base model has moved since training."""
    if model_path and (Path(model_path) / "adapter_config.json").exists():
        fail(f"--model_path {model_path} is a LoRA adapter; --model_path names the base model, --adapter_path the "
             f"adapter")
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    base = model_path or config["base_model_name_or_path"]
    if not Path(base).exists() and os.environ.get("MODEL_PATH"):
        base = os.environ["MODEL_PATH"]
    if not (Path(base) / "config.json").exists():
        fail(f"the base model of {adapter} is {base!r}, which is not a model folder here; "
             f"pass --model_path or set MODEL_PATH to it.")
    return base


BASE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "tokenizer.model")  # what shapes a base model's answers


def fingerprint(path: str | Path) -> str:
    """Identifies a model's weights wherever they lie (a checkpoint and its copy as final_checkpoint share their
    answers, and so do a base model and a copy of it that keeps its files' times), and changes whenever they do.  An
    adapter: the bytes of its weights and its config, less the path of its base model (which `model_id` identifies by
    its own fingerprint); a base model: the bytes of its config, generation config and tokenizer files, and its weight
    files' names, sizes and times (hashing gigabytes on every run would cost more than it saves)."""
    path = Path(path)
    h = hashlib.sha256()
    if (path / "adapter_config.json").exists():
        config = json.loads((path / "adapter_config.json").read_text())
        config.pop("base_model_name_or_path", None)
        h.update(json.dumps(config, sort_keys=True).encode())
        for f in sorted(path.glob("adapter_model.*")):
            h.update(f.name.encode() + f.read_bytes())
    else:
        for f in (path / name for name in BASE_FILES):
            if f.exists():
                h.update(f.name.encode() + f.read_bytes())
        for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            h.update(f"{f.name}{f.stat().st_size}{f.stat().st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def model_id(model, *paths) -> str:
    """What makes a loaded model's answers what they are, for the cache keys: its weights (the fingerprints of
    `paths`: the adapter, if any, and the base model it was loaded on) and how they run (the backend, the dtype, and
    whether the base is in 4-bit, as loaded)."""
    return ResultCache.key(*map(fingerprint, paths), backend(), str(model.dtype), loaded_in_4bit(model))[:16]


def load_model(path: str | Path, *, load_in_4bit="auto", model_path=None, **expert) -> "Expert":
    """A base model folder, or a LoRA adapter folder on its base model (see `base_of`), ready for inference."""
    path = str(path)
    adapter = path if (Path(path) / "adapter_config.json").exists() else None
    base = base_of(adapter, model_path) if adapter else path
    model, tokenizer = load_base(base, load_in_4bit=load_in_4bit)
    identity = model_id(model, path, base) if adapter else model_id(model, base)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        if (Path(adapter) / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(adapter))
    if backend() == "unsloth":
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
    model.eval()
    return Expert(model, tokenizer, identity, **expert)


def load_expert(data: DataArguments, args: ModelArguments, name: str) -> "Expert":
    """A trained expert (by default the adapter its *_train.sh wrote), with the step's batch settings and the dataset's
    generation cache."""
    path = require_model(args.adapter_path or Path(args.checkpoint_dir) / data.dataset / name / "final_checkpoint")
    expert = load_model(path, load_in_4bit=args.load_in_4bit, model_path=args.model_path,
                        cache=ResultCache(data.file("generation_cache.sqlite")), batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, double_bos=args.double_bos)
    print(f"{name}: {path} on {backend()}, {'4-bit' if loaded_in_4bit(expert.model) else 'not quantized'}")
    return expert


class Expert:
    """A language model (a base model, or a base model with a LoRA adapter) and what the pipeline asks of it:
    `generate` answers, `score` the rating after "Predicted Rating: ", or the `loglikelihood` of given answers.  Work
    goes in length-sorted batches, each kept in `cache` as soon as it is done, under keys that include `model_id`
    (from load_model: the weights and how they run, see the function `model_id`) and `double_bos`."""

    def __init__(self, model, tokenizer, model_id: str = "", *, cache: ResultCache | None = None, batch_size: int = 8,
                 max_new_tokens: int = 1024, double_bos: bool = False):
        self.model, self.tokenizer, self.cache = model, tokenizer, cache
        self.batch_size, self.max_new_tokens, self.double_bos = batch_size, max_new_tokens, double_bos
        self.model_id = f"{model_id}+double_bos" if double_bos else model_id  # other token ids, other cache keys

    def encode(self, texts) -> list[list[int]]:
        """Token ids of rendered chat texts.  The chat template already holds any BOS token: the tokenizer adds none,
        unless `double_bos` asks for the official code's second one."""
        return self.tokenizer(list(texts), add_special_tokens=self.double_bos)["input_ids"]

    @torch.no_grad()
    def generate(self, questions, *, temperature: float = 0.0, seed: int = 0, keys=None, desc: str = "generating",
                 batch_size: int | None = None, max_new_tokens: int | None = None) -> list[str]:
        """Answer every question (one user turn each): greedy when temperature is 0, sampled otherwise.  Left-padded
        batches of similar length; the same answers as one question at a time.  `keys`: the cache keys (default: a
        hash of the model, the prompt and the settings)."""
        max_new_tokens = max_new_tokens or self.max_new_tokens
        texts = [chat_text(self.tokenizer, q) for q in questions]
        ids = self.encode(texts)
        keys = keys or [ResultCache.key("generate", self.model_id, t, max_new_tokens, temperature, seed) for t in texts]

        def compute(batch, rows):
            new = self._new_tokens(batch, rows, max_new_tokens, temperature, seed)
            return self.tokenizer.batch_decode(new, skip_special_tokens=True)

        return _run_batched(keys, ids, batch_size or self.batch_size, self.cache, desc, compute)

    @torch.no_grad()
    def cut_off(self, questions, max_new_tokens: int, *, temperature: float = 0.0, top_p: float | None = None,
                seed: int = 0, desc: str | None = "cut-off probe") -> np.ndarray:
        """Whether each answer, generated as `generate` does (here with `top_p` too; never cached), would run to
        `max_new_tokens` without a stop token: the answers that this length limit cuts off."""
        ids = self.encode(chat_text(self.tokenizer, q) for q in questions)
        stops = torch.tensor(stop_token_ids(self.model, self.tokenizer))

        def compute(batch, rows):
            new = self._new_tokens(batch, rows, max_new_tokens, temperature, seed, top_p)
            stopped = torch.isin(new, stops.to(new.device)).any(dim=1)
            return (~stopped & (new.shape[1] >= max_new_tokens)).tolist()

        return np.array(_run_batched(list(range(len(ids))), ids, self.batch_size, None, desc, compute), dtype=bool)

    def _new_tokens(self, batch, rows, max_new_tokens: int, temperature: float, seed: int, top_p=None):
        """The tokens generated after each token-id list of a batch (left-padded together; padding after a stop):
        greedy when temperature is 0, else sampled with a seed per batch (batches depend on the inputs only, so reruns
        sample the same)."""
        model, tokenizer = self.model, self.tokenizer
        if temperature > 0:
            torch.manual_seed(seed * 1_000_003 + rows[0])
            sampling = dict(do_sample=True, temperature=temperature, **({"top_p": top_p} if top_p else {}))
        else:
            sampling = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        inputs = _pad(tokenizer, batch, "left").to(model.device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=stop_token_ids(model, tokenizer), **sampling)
        return out[:, inputs["input_ids"].shape[1]:]

    @torch.no_grad()
    def score(self, questions, *, desc: str | None = "scoring", batch_size: int | None = None,
              share: bool = True) -> np.ndarray:
        """The paper's logits-weighted rating: after "Predicted Rating: ", the softmax over the logits of "1".."5",
        its expectation, clipped to [1, 5].  One forward pass per batch, on the model's device.

        Batches are padded on the right and run without a padding mask: under the causal mask no real token can see
        the padding after it, so each row is computed as it would be alone (the fast causal attention kernel, and the
        same numbers), and the logits are read at each row's own last token.  `desc` None: no progress bar; `share`:
        see _run_batched."""
        model, tokenizer = self.model, self.tokenizer
        texts = [chat_text(tokenizer, q, RATING_PREFIX) for q in questions]
        ids = self.encode(texts)
        keys = [ResultCache.key("rating", self.model_id, t) for t in texts]
        digits = torch.tensor(rating_token_ids(tokenizer))

        def compute(batch, rows):
            last = torch.tensor([len(seq) - 1 for seq in batch])
            input_ids = _pad(tokenizer, batch, "right")["input_ids"]
            first = int(last.min())  # the logits of positions first .. the end hold every row's last token
            logits = _logits_from(model, input_ids, first)[torch.arange(len(batch)), last - first].float()
            probs = torch.softmax(logits[:, digits.to(logits.device)], dim=-1)
            expected = probs @ torch.arange(1.0, 6.0, device=probs.device)
            return expected.clamp(1.0, 5.0).tolist()

        return np.array(_run_batched(keys, ids, batch_size or self.batch_size, self.cache, desc, compute, share),
                        dtype=float)

    @torch.no_grad()
    def loglikelihood(self, questions, answers, *, desc: str = "log-likelihood",
                      batch_size: int | None = None) -> np.ndarray:
        """GPTScore (Fu et al., 2023): the mean log-probability (nats per token) of each `answers[i]` as the assistant's
        reply to the user turn `questions[i]`.  The sequence is the chat template's rendering of the user turn, then
        the answer's own tokens (encoded alone: what the model would generate there, whatever the tokenizer would
        merge across the boundary); only the answer's tokens count, not the template's end-of-turn token.  An empty
        answer has no tokens: NaN.

        Padded on the right without a padding mask, as `score`: every answer token lies before its row's padding.
        Only the logits from the first answer token of the batch on are computed; a batch holds about batch_size x
        answer length x vocabulary of them, which `batch_size` bounds."""
        model, tokenizer = self.model, self.tokenizer
        prompts, answers = [chat_text(tokenizer, q) for q in questions], [str(a) for a in answers]
        if not prompts:
            return np.array([], dtype=float)
        answer_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
        ids = [p + a for p, a in zip(self.encode(prompts), answer_ids)]
        keys = [ResultCache.key("loglikelihood", self.model_id, p, a) for p, a in zip(prompts, answers)]

        def compute(batch, rows):
            spans = [(len(seq) - len(answer_ids[i]), len(seq)) for seq, i in zip(batch, rows)]  # the answer's tokens
            if all(start == end for start, end in spans):
                return [float("nan")] * len(batch)
            input_ids = _pad(tokenizer, batch, "right")["input_ids"]
            # The logits at position t predict token t + 1: those of positions start - 1 .. end - 2 are needed.
            first = min(start for start, end in spans if end > start) - 1
            logits = _logits_from(model, input_ids, first)
            means = []
            for row, (start, end) in enumerate(spans):
                logprobs = torch.log_softmax(logits[row, start - 1 - first:end - 1 - first].float(), dim=-1)
                targets = input_ids[row, start:end].to(logprobs.device)
                means.append(logprobs.gather(-1, targets[:, None]).mean().item() if end > start else float("nan"))
            return means

        return np.array(_run_batched(keys, ids, batch_size or self.batch_size, self.cache, desc, compute), dtype=float)


# ---------------------------------------------------------------------------------------------- batching
def chat_text(tokenizer, question: str, prefix: str = "") -> str:
    """The chat-template rendering of one user turn, ready for the assistant's answer (plus an answer prefix)."""
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefix


def batches(lengths, batch_size: int):
    """Index batches of similar length (longest first, so that an out-of-memory error shows at once): padding
    then costs little.  A function of the lengths alone, so a resumed run forms exactly the same batches."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _pad(tokenizer, ids, side: str):
    """A batch of token-id lists as tensors padded on `side`, with their attention mask."""
    return tokenizer.pad({"input_ids": ids}, padding_side=side, return_tensors="pt")


def _logits_from(model, input_ids, first: int):
    """The logits of positions `first` .. the end of every row: (rows, length - first, vocabulary).  They are asked for
    as a count of last positions (`logits_to_keep=length - first`), the form that transformers and Unsloth's fast
    forward both honour (Unsloth's ignores a tensor of positions and computes every position's); a batch is sorted
    by length, so the count stays small.  The returned length is checked, not assumed: a model that returns every
    position all the same is read at the right ones."""
    length = input_ids.shape[1]
    logits = model(input_ids=input_ids.to(model.device), logits_to_keep=length - first).logits
    if logits.shape[1] == length:  # every position: what was asked for, or more
        return logits[:, first:]
    if logits.shape[1] != length - first:
        raise RuntimeError(f"the model returned the logits of {logits.shape[1]} positions, neither the last "
                           f"{length - first} asked for nor all {length}")
    return logits


def _run_batched(keys, ids, batch_size, cache, desc, compute, share: bool = True):
    """Run `compute(batch_ids, batch_rows)` (a batch's token ids and their indices in `ids`) over length-sorted
    batches, skipping batches whose answers are cached and committing each new batch to the cache at once.  Returns
    the answers in input order.

    In a data-parallel run (parallel.py) process k takes batches k, k + N, k + 2N, ... of the batches a single
    process would form (so that every answer is the one a single run computes), and the answers are gathered; with
    `share` false each process does all of its own inputs (GRPO's rewards: every process has its own)."""
    found = cache.get_many(keys) if cache is not None else {}
    results = [found.get(k) for k in keys]
    rank, world = (parallel.rank(), parallel.world_size()) if share else (0, 1)
    mine = batches([len(x) for x in ids], batch_size)[rank::world]
    todo = [b for b in mine if any(results[i] is None for i in b)]
    with tqdm(total=sum(map(len, mine)), initial=sum(map(len, mine)) - sum(map(len, todo)), desc=desc,
              unit="prompt", disable=rank != 0 or desc is None) as bar:
        for b in todo:
            answers = compute([ids[i] for i in b], b)
            for i, answer in zip(b, answers):
                results[i] = answer
            if cache is not None:
                cache.put_many({keys[i]: results[i] for i in b})
            bar.update(len(b))
    if world > 1:
        if desc is not None:
            print(f"{desc}: process {rank} of {world} computed {sum(map(len, todo))} of {len(keys)} prompts",
                  flush=True)
        for i, answer in parallel.gather([(i, results[i]) for b in mine for i in b]):
            results[i] = answer
    return results


def stop_token_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted(set(ids + [tokenizer.eos_token_id]) - {None})


def rating_token_ids(tokenizer, prefix: str = RATING_PREFIX) -> list[int]:
    """Token ids of "1".."5" as they follow the answer prefix; checked, not assumed."""
    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = []
    for digit in "12345":
        token = tokenizer.convert_tokens_to_ids(digit)
        with_digit = encode(prefix + digit)
        if token is None or token == tokenizer.unk_token_id or with_digit[-1] != token \
                or with_digit[:-1] != encode(prefix):
            fail(f"this tokenizer does not encode the rating {digit!r} as one token after {prefix!r}")
        ids.append(token)
    return ids
