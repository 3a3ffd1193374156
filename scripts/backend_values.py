"""Unsloth against transformers on the numbers themselves: what one backend (REASON4REC_BACKEND) computes for a base
model and a LoRA adapter through the pipeline's own llm.Expert, on fixed inputs (the logits-weighted ratings of
`Expert.score`, the GPTScores of `Expert.loglikelihood`, the first greedy tokens of `Expert.generate`); and the
comparison of two backends' numbers against the tolerances below, fixed before any run.

    REASON4REC_BACKEND=hf      python scripts/backend_values.py --adapter A --load_in_4bit false --json hf.json
    REASON4REC_BACKEND=unsloth python scripts/backend_values.py --adapter A --load_in_4bit false --json unsloth.json
    python scripts/backend_values.py --compare hf.json unsloth.json

Each backend runs in its own process (Unsloth patches transformers when it is imported).  The inputs are the first
--n examples of Data/<dataset>/review_train_data.pkl (rating prompts, the reward model's: scored) and of
Reasoner_train_instruct.pkl (question and reason: the reason's likelihood, and the question continued greedily),
scored in batches of --batch_size rows of different lengths, as the pipeline scores them.  A comparison exits
non-zero, naming each value out of tolerance, if any is.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: llm, utils

from settings import ModelPlaces  # noqa: E402  (no model library: REASON4REC_BACKEND picks one later)

GREEDY_TOKENS = 4  # "the first few": enough to see generation go wrong, few enough that a near-tie rarely matters
# The largest difference allowed between two backends, by how both ran: ratings (1-5) and mean log-likelihoods (nats
# per token) as the largest absolute difference over the inputs, greedy as the share of inputs whose first
# GREEDY_TOKENS tokens differ.  Fixed before any GPU run; each with its reason in one line.
TOLERANCES = {
    # float32 (a CPU): the same arithmetic up to the order of summation, which moves float32 results by about 1e-6.
    "float32": dict(score=1e-4, loglikelihood=1e-4, greedy=0.0),
    # bf16 on the 1B model (8 inputs, a CPU) moved ratings 0.037, log-likelihoods 0.009 and 3 of 8 greedy continuations
    # (near-ties flip) from float32; two bf16 kernels may each be that far off: about twice (the wrong logits: 1.5, 0.25).
    "bfloat16": dict(score=0.1, loglikelihood=0.03, greedy=0.5),
    # 4-bit: the same NF4 weights on both sides (bitsandbytes, double quantization, bf16 compute), dequantized and
    # multiplied by different kernels, each rounding in bf16: twice bf16's allowance (greedy: one prompt in 8 more).
    "4-bit": dict(score=0.2, loglikelihood=0.06, greedy=0.625),
}


@dataclass
class ValuesArguments(ModelPlaces):
    adapter: str | None = field(default=None, metadata={"help": "the LoRA adapter (on its base model, llm.base_of)"})
    n: int = field(default=8, metadata={"help": "inputs of each kind"})
    batch_size: int = field(default=4, metadata={"help": "rows per forward pass"})
    json: str | None = field(default=None, metadata={"help": "write the values to this file (else print them)"})
    compare: list[str] = field(default_factory=list, metadata={
        "help": "two files written by --json: compare them instead (exit 1 if any value is out of tolerance)"})


def inputs(data, n: int) -> dict:
    """The rating prompts, the question/answer pairs and the questions to continue: the first n of each."""
    from utils import read_pickle

    rating = read_pickle(data.file("review_train_data.pkl"), what="messages")[:n]
    reasons = read_pickle(data.file("Reasoner_train_instruct.pkl"), what="messages")[:n]
    return {"rating": [x["messages"][0]["content"] for x in rating],
            "questions": [x["messages"][0]["content"] for x in reasons],
            "answers": [x["messages"][-1]["content"] for x in reasons]}


def values(expert, given: dict) -> dict:
    """What the Expert computes for the inputs: ratings, mean log-likelihoods, the first greedy tokens."""
    return {"score": expert.score(given["rating"], desc=None).tolist(),
            "loglikelihood": expert.loglikelihood(given["questions"], given["answers"], desc="log-likelihood").tolist(),
            "greedy": expert.generate(given["questions"], max_new_tokens=GREEDY_TOKENS, desc="greedy")}


def precision(model) -> str:
    """How the model computes: 4-bit, else its dtype (bfloat16 on a GPU, float32 on a CPU)."""
    import llm

    return "4-bit" if llm.loaded_in_4bit(model) else str(model.dtype).removeprefix("torch.")


def record(expert, given: dict) -> dict:
    """The values of one backend, with what they are comparable on: the backend, the precision, the inputs."""
    import llm

    digest = hashlib.sha256(json.dumps(given, sort_keys=True).encode()).hexdigest()[:16]
    return {"backend": llm.backend(), "precision": precision(expert.model), "device": str(expert.model.device),
            "inputs_sha256": digest, **values(expert, given)}


def compare(a: dict, b: dict) -> dict:
    """The largest difference of each value between two backends' records, its tolerance (by their precision), and
    what is out of tolerance (`problems`, empty when the two agree)."""
    if a["inputs_sha256"] != b["inputs_sha256"]:
        return {"precision": a["precision"], "differences": {}, "tolerances": {},
                "problems": ["the two records are of different inputs"]}
    if a["precision"] != b["precision"]:
        return {"precision": f"{a['precision']} / {b['precision']}", "differences": {}, "tolerances": {},
                "problems": [f"{a['backend']} ran in {a['precision']}, {b['backend']} in {b['precision']}"]}
    differences = {"score": largest(a["score"], b["score"]),
                   "loglikelihood": largest(a["loglikelihood"], b["loglikelihood"]),
                   "greedy": sum(x != y for x, y in zip(a["greedy"], b["greedy"])) / max(len(a["greedy"]), 1)}
    tolerances = TOLERANCES[a["precision"]]
    problems = [f"{name} differs by {differences[name]:.3g} > {tolerances[name]}" for name in differences
                if not differences[name] <= tolerances[name]]
    return {"precision": a["precision"], "differences": differences, "tolerances": tolerances, "problems": problems}


def largest(xs, ys) -> float:
    """The largest absolute difference; NaN on both sides (an empty answer) agrees, NaN on one side is infinite."""
    return max((0.0 if math.isnan(x) and math.isnan(y) else math.inf if math.isnan(x) or math.isnan(y)
                else abs(x - y) for x, y in zip(xs, ys)), default=0.0)


def main():
    import llm
    from settings import parse_args
    from utils import fail, write_json

    data, args = parse_args(ValuesArguments)
    if args.compare:
        if len(args.compare) != 2:
            fail(f"--compare takes two files written by --json, not {len(args.compare)}")
        a, b = (json.loads(Path(f).read_text()) for f in args.compare)
        result = compare(a, b)
        print(json.dumps(result, indent=1))
        sys.exit(1 if result["problems"] else 0)
    if not args.adapter:
        fail("--adapter is needed (or --compare A B)")
    expert = llm.load_model(args.adapter, load_in_4bit=args.load_in_4bit, model_path=args.model_path,
                            batch_size=args.batch_size)
    result = record(expert, inputs(data, args.n))
    if args.json:
        write_json(result, args.json)
    print(json.dumps({k: result[k] for k in ("backend", "precision", "device", "score", "loglikelihood")}))


if __name__ == "__main__":
    main()
